//! The console's page frame, its error pages and small shared pieces.
//! maud escapes every value it renders, so what a tenant or an agent
//! stored (a job name, a reason) cannot become markup.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Session;

/// A page: the header with the navigation for `session` (none on the
/// sign-in page), then `body`.
pub fn frame(session: Option<&Session>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false}"#;
                title { (title) " · gpupool" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/htmx-2.0.11.min.js" defer {}
                script src="/assets/chart-4.6.1.umd.min.js" defer {}
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/pools" { "gpupool" }
                    @if let Some(s) = session {
                        nav aria-label="main" {
                            a href="/pools" { "Pools" }
                            a href="/jobs" { "Jobs" }
                            a href="/usage" { "Usage and bills" }
                            @if s.admin {
                                a href="/admin/nodes" { "Nodes" }
                                a href="/admin/tenants" { "Tenants" }
                            }
                        }
                        form.signout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            span.who {
                                @if s.admin { "admin" } @else { "tenant " b { (s.tenant) } }
                            }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The sign-in page, with an error line.
pub fn login(auth_off: bool, error: Option<&str>) -> Markup {
    frame(
        None,
        "Sign in",
        html! {
            h1 { "Sign in" }
            form.card method="post" action="/login" {
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                @if let Some(e) = error { p.error role="alert" { (e) } }
                button type="submit" { "Sign in" }
                p.hint {
                    "A tenant's token comes from the admin (" code { "gpupool tenant token NAME" } ")."
                    @if auth_off {
                        " This cluster runs without authentication: any token signs you in as the admin."
                    }
                }
            }
        },
    )
}

/// An error page for a failed API call (its gRPC status as HTTP).
pub fn failure(session: Option<&Session>, status: &tonic::Status) -> Response {
    use tonic::Code;
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let page = frame(
        session,
        "Error",
        html! {
            h1 { "That did not work" }
            p.error role="alert" { (status.message()) }
            p { a href="/pools" { "Back to the pools" } }
        },
    );
    (code, Html(page.into_string())).into_response()
}

pub fn not_found(session: &Session, what: &str) -> Response {
    failure(Some(session), &tonic::Status::not_found(what.to_string()))
}

/// A form without this session's CSRF token.
pub fn forbidden_form() -> Response {
    (
        StatusCode::FORBIDDEN,
        "this form's CSRF token is missing or not this session's: reload the page and send it again",
    )
        .into_response()
}

/// The hidden CSRF field of a form.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// An error line above a form, when there is one.
pub fn error_line(error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error { p.error role="alert" { (e) } }
    }
}

/// Money in the cluster's currency.
pub fn money(micros: i64, currency: &str) -> String {
    format!(
        "{} {currency}",
        gpupool_common::display::format_micros(micros)
    )
}

/// A timestamp as RFC 3339, or `-`.
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    gpupool_common::display::ts_ms(ts)
        .map_or_else(|| "-".to_string(), gpupool_common::display::format_time)
}

/// A status word with its class, for colour.
pub fn badge(word: &str) -> Markup {
    let class = match word {
        "Running" | "Succeeded" | "Ready" => "ok",
        "Failed" | "Lost" | "Abnormal" | "CreateFailed" | "NotReady" | "Unavailable" => "bad",
        "Queued" | "Scheduled" | "Creating" | "Scaling" | "Deleting" | "Stopping" => "busy",
        _ => "plain",
    };
    html! { span class={"badge " (class)} { (word) } }
}

/// `s` as one URL path segment: everything but unreserved characters
/// percent-encoded, so a value that came from an agent (a node id such as
/// `../../jobs/j-1/cancel?`) cannot turn a form's action into another one.
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_' | b'.' | b'~') && s != "." && s != ".."
            {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_cannot_climb_or_add_a_query() {
        assert_eq!(super::seg("vm-1.az_2~"), "vm-1.az_2~");
        assert_eq!(
            super::seg("../../jobs/j-1/cancel?"),
            "..%2F..%2Fjobs%2Fj-1%2Fcancel%3F"
        );
        assert_eq!(super::seg(".."), "%2E%2E");
        assert_eq!(super::seg("a b#c"), "a%20b%23c");
    }
}

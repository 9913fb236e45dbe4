//! The web console (`console_listen`): server-rendered pages over the
//! gRPC API. Every page calls the API's own services in process, through
//! the same [`Guard`] the gRPC listener puts in front of them, with the
//! signed-in browser's token as its bearer token: the console has no
//! access rules of its own, and a tenant's browser sees exactly what its
//! token shows on the CLI.
//!
//! Sessions: the token is kept in an HttpOnly, `SameSite=Strict` cookie
//! (`Secure` under TLS). Every form carries a CSRF token (an HMAC of the
//! session's token under a key made at start), and a POST whose `Origin`
//! or `Sec-Fetch-Site` says it comes from another site is refused before
//! it is read.

mod admin;
mod jobs;
mod pools;
mod tls;
mod usage;
mod view;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use gpupool_proto::v1 as pb;
use hmac::{KeyInit, Mac};
use pb::job_service_server::JobServiceServer;
use pb::node_service_server::NodeServiceServer;
use pb::pool_service_server::PoolServiceServer;
use pb::tenant_service_server::TenantServiceServer;
use pb::usage_service_server::UsageServiceServer;

use crate::api::access::Guard;
use crate::api::client::Api;
use crate::api::limits::RateLimiter;
use crate::state::Shared;

/// The session cookie's name (under TLS with the `__Host-` prefix: only
/// a secure origin, this host, path `/`, may set it).
const COOKIE: &str = "gpupool_console";
const HOST_COOKIE: &str = "__Host-gpupool_console";

/// A session unused this long ends (ms).
const SESSION_IDLE_MS: i64 = 12 * 3_600_000;
/// Most sessions kept; the least recently used goes first.
const MAX_SESSIONS: usize = 10_000;
/// Most connections served at once (each holds a file descriptor).
const MAX_CONNECTIONS: usize = 512;

/// A signed-in browser's session, kept in memory: the cookie holds only
/// its random id, never the API token (a restart signs everyone out).
struct Stored {
    token: String,
    last_ms: i64,
}

/// The API's services, each behind its guard, and what the console keeps.
pub struct Console {
    jobs: pb::job_service_client::JobServiceClient<Guard<JobServiceServer<Api>>>,
    nodes: pb::node_service_client::NodeServiceClient<Guard<NodeServiceServer<Api>>>,
    pools: pb::pool_service_client::PoolServiceClient<Guard<PoolServiceServer<Api>>>,
    usage: pb::usage_service_client::UsageServiceClient<Guard<UsageServiceServer<Api>>>,
    tenants: pb::tenant_service_client::TenantServiceClient<Guard<TenantServiceServer<Api>>>,
    /// Signs the CSRF tokens of this process's forms.
    csrf_key: [u8; 32],
    /// Session id -> the token it stands for.
    sessions: Mutex<std::collections::HashMap<String, Stored>>,
    /// `[tls]`'s identity: the console is served over TLS, its cookies
    /// are `Secure`.
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// The config (prices, currency and regions for the forms; the host
    /// names it answers to; whether authentication is on).
    pub(crate) shared: Arc<Shared>,
}

type App = Arc<Console>;

/// A signed-in browser: its token, its forms' CSRF token, who it is.
pub struct Session {
    token: String,
    id: String,
    pub csrf: String,
    pub tenant: String,
    pub admin: bool,
    peer: Option<SocketAddr>,
}

impl Console {
    /// The console of `shared`, its API calls under the gRPC listener's
    /// rate limits (`limiter`), over TLS when the config has `[tls]`.
    pub fn new(shared: Arc<Shared>, limiter: Arc<Mutex<RateLimiter>>) -> anyhow::Result<Self> {
        use std::io::Read;
        let api = Api {
            shared: shared.clone(),
        };
        fn guard<S>(svc: S, shared: &Arc<Shared>, limiter: &Arc<Mutex<RateLimiter>>) -> Guard<S> {
            Guard::new(svc, shared.clone(), limiter.clone())
        }
        let mut csrf_key = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut csrf_key)?;
        Ok(Self {
            jobs: pb::job_service_client::JobServiceClient::new(guard(
                JobServiceServer::new(api.clone()),
                &shared,
                &limiter,
            )),
            nodes: pb::node_service_client::NodeServiceClient::new(guard(
                NodeServiceServer::new(api.clone()),
                &shared,
                &limiter,
            )),
            pools: pb::pool_service_client::PoolServiceClient::new(guard(
                PoolServiceServer::new(api.clone()),
                &shared,
                &limiter,
            )),
            usage: pb::usage_service_client::UsageServiceClient::new(guard(
                UsageServiceServer::new(api.clone()),
                &shared,
                &limiter,
            )),
            tenants: pb::tenant_service_client::TenantServiceClient::new(guard(
                TenantServiceServer::new(api),
                &shared,
                &limiter,
            )),
            csrf_key,
            sessions: Mutex::new(std::collections::HashMap::new()),
            tls: shared
                .config
                .tls
                .as_ref()
                .map(tls::server_config)
                .transpose()?,
            shared,
        })
    }

    fn csrf_of(&self, token: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.csrf_key).expect("any key");
        mac.update(b"gpupool console csrf\0");
        mac.update(token.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A request of the API as the session's caller.
    fn request<T>(&self, session: &Session, message: T) -> tonic::Request<T> {
        request_as(&session.token, session.peer, message)
    }

    /// The cluster has no admin token: every caller is the admin.
    fn auth_off(&self) -> bool {
        self.shared.config.admin_token.is_none()
    }

    fn cookie_name(&self) -> &'static str {
        if self.tls.is_some() {
            HOST_COOKIE
        } else {
            COOKIE
        }
    }

    /// A new session for `token`; its id.
    fn open_session(&self, token: String) -> std::io::Result<String> {
        let id = crate::api::auth::new_token()?.replacen("gpt_", "gcs_", 1);
        let now = gpupool_common::display::now_ms();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| now - s.last_ms < SESSION_IDLE_MS);
        }
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Stored {
                token,
                last_ms: now,
            },
        );
        Ok(id)
    }

    /// The token of session `id`, if it is open (and now used).
    fn token_of(&self, id: &str) -> Option<String> {
        let now = gpupool_common::display::now_ms();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let stored = sessions.get_mut(id)?;
        if now - stored.last_ms >= SESSION_IDLE_MS {
            sessions.remove(id);
            return None;
        }
        stored.last_ms = now;
        Some(stored.token.clone())
    }

    fn close_session(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The session of a request's cookie, asked of the API (WhoAmI), or
    /// the response that sends the browser to sign in. Two session
    /// cookies (one planted by another page of this host) are none.
    async fn session(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<Session, Response> {
        let ids = cookies(headers, self.cookie_name());
        let [id] = ids.as_slice() else {
            return Err(self.to_login());
        };
        let Some(token) = self.token_of(id) else {
            return Err(self.to_login());
        };
        let who = self
            .tenants
            .clone()
            .who_am_i(request_as(&token, peer, pb::WhoAmIRequest {}))
            .await;
        match who {
            Ok(who) => {
                let who = who.into_inner();
                Ok(Session {
                    csrf: self.csrf_of(id),
                    id: id.clone(),
                    token,
                    tenant: who.tenant,
                    admin: who.admin,
                    peer,
                })
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                // The token was revoked: so is the session.
                self.close_session(id);
                Err(self.to_login())
            }
            Err(status) => Err(view::failure(None, &status)),
        }
    }

    /// Whether a form's CSRF token is the session's.
    fn csrf_ok(&self, session: &Session, sent: &str) -> bool {
        crate::api::auth::constant_time_eq(sent.as_bytes(), session.csrf.as_bytes())
    }
}

fn request_as<T>(token: &str, peer: Option<SocketAddr>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    // The audit trail names the browser's address as a gRPC caller's.
    request
        .extensions_mut()
        .insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: peer,
        });
    request
}

/// Tokens are cookie octets (RFC 6265: printable ASCII but for `"`, `,`,
/// `;` and `\\`): they become a header and the cookie's value, and cannot
/// add an attribute to it.
fn token_ok(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 512
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\'))
}

/// The values of cookie `name` in the request's `Cookie` headers.
fn cookies(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .collect()
}

impl Console {
    fn to_login(&self) -> Response {
        (
            [(header::SET_COOKIE, self.session_cookie("", true))],
            Redirect::to("/login"),
        )
            .into_response()
    }

    /// The `Set-Cookie` value of session `id` (or its removal).
    fn session_cookie(&self, id: &str, clear: bool) -> String {
        let secure = if self.tls.is_some() { "; Secure" } else { "" };
        let age = if clear { "; Max-Age=0" } else { "" };
        format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict{secure}{age}",
            self.cookie_name()
        )
    }
}

/// The router of every page.
pub fn router(console: Console) -> Router {
    let app: App = Arc::new(console);
    Router::new()
        .route("/", get(|| async { Redirect::to("/pools") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{file}", get(asset))
        .merge(pools::routes())
        .merge(jobs::routes())
        .merge(usage::routes())
        .merge(admin::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard_request))
        .with_state(app)
}

async fn not_found(Signed { s, .. }: Signed) -> Response {
    view::not_found(&s, "no such page")
}

/// Every response: no caching, no framing, no inline script, no referrer
/// to other sites. A POST from another site is refused before a handler
/// sees it.
async fn guard_request(State(app): State<App>, request: Request, next: Next) -> Response {
    // The host asked for: `Host`, or HTTP/2's `:authority`.
    let authority = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    if !authority
        .as_deref()
        .is_some_and(|a| host_allowed(a, &app.shared.config.console_hosts))
    {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "unknown host: the console answers to its IP addresses, localhost and the names in console_hosts",
        )
            .into_response();
    }
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    if request.method() == Method::POST
        && cross_site(request.headers(), authority.as_deref(), scheme)
    {
        // The form's body (64 KiB at most) is read and dropped first: a
        // reply before the request is sent is reset mid-upload by some
        // clients, which then see no answer at all.
        let _ = axum::body::to_bytes(request.into_body(), 64 << 10).await;
        return (
            StatusCode::FORBIDDEN,
            "cross-site request refused: this form must be sent from the console's own pages",
        )
            .into_response();
    }
    let asset = request.uri().path().starts_with("/assets/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin`: no referrer to other sites (notebook links carry their
    // token), and the console's own posts keep their Origin (under
    // `no-referrer` browsers send `Origin: null`, refused above).
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Whether `authority` (`host[:port]`) names this console: an IP
/// address, `localhost`, or one of `names`. A name a DNS-rebinding site
/// made point here is none of those.
fn host_allowed(authority: &str, names: &[String]) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.parse::<std::net::Ipv4Addr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(host))
}

/// A request that says it comes from another origin: `Sec-Fetch-Site`
/// other than same-origin (or none: typed, bookmarked), or an `Origin`
/// other than `scheme://authority` of this request.
fn cross_site(headers: &HeaderMap, authority: Option<&str>, scheme: &str) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    match authority {
        Some(authority) => !origin.eq_ignore_ascii_case(&format!("{scheme}://{authority}")),
        None => true,
    }
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match file.as_str() {
        "htmx-2.0.11.min.js" => (
            include_bytes!("assets/htmx-2.0.11.min.js"),
            "text/javascript",
        ),
        "chart-4.6.1.umd.min.js" => (
            include_bytes!("assets/chart-4.6.1.umd.min.js"),
            "text/javascript",
        ),
        "console.js" => (include_bytes!("assets/console.js"), "text/javascript"),
        "console.css" => (include_bytes!("assets/console.css"), "text/css"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_str(kind).expect("ascii"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=3600"),
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login_page(State(app): State<App>) -> Html<String> {
    Html(view::login(app.auth_off(), None).into_string())
}

async fn login(
    State(app): State<App>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let token = form.token.trim().to_string();
    if !token_ok(&token) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(
                view::login(
                    app.auth_off(),
                    Some("enter an API token (gpupool tenant token NAME prints one)"),
                )
                .into_string(),
            ),
        )
            .into_response();
    }
    let who = app
        .tenants
        .clone()
        .who_am_i(request_as(&token, Some(peer), pb::WhoAmIRequest {}))
        .await;
    match who {
        Ok(_) => match app.open_session(token) {
            Ok(id) => (
                [(header::SET_COOKIE, app.session_cookie(&id, false))],
                Redirect::to("/pools"),
            )
                .into_response(),
            Err(err) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot make a session: {err}"),
            )
                .into_response(),
        },
        Err(status) => (
            StatusCode::UNAUTHORIZED,
            Html(view::login(app.auth_off(), Some(status.message())).into_string()),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn logout(Signed { app, s }: Signed, axum::Form(form): axum::Form<CsrfOnly>) -> Response {
    check_csrf!(app, s, form.csrf);
    app.close_session(&s.id);
    app.to_login()
}

/// Serves the console on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Console,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match console.tls.clone() {
        Some(config) => {
            run(
                tls::TlsListener::new(listener, config)?,
                router(console),
                stop,
            )
            .await
        }
        None => run(tls::PlainListener::new(listener), router(console), stop).await,
    }
}

/// Serves `router` on the connections of `listener` (HTTP/1.1 and 2),
/// each request told its peer (`ConnectInfo<Peer>`). A client gets 10 s
/// to send a request's headers and HTTP/2 connections are pinged, so a
/// slow or silent client does not keep a connection (and its permit).
/// When `stop` resolves, open connections finish their requests.
async fn run<L>(
    mut listener: L,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use std::time::Duration;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(Peer(peer)));
                request
            },
        );
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "console connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// The browser's address, for the audit trail.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// A signed-in request: the console and the session of its cookie. A
/// handler that takes one is never called for a browser that is not
/// signed in: it is sent to sign in.
pub struct Signed {
    pub app: App,
    pub s: Session,
}

impl axum::extract::FromRequestParts<App> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<Self, Response> {
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0.0);
        let s = app.session(&parts.headers, peer).await?;
        Ok(Self {
            app: app.clone(),
            s,
        })
    }
}

/// Checks a form's CSRF token, else answers 403.
macro_rules! check_csrf {
    ($app:expr, $session:expr, $sent:expr) => {
        if !$app.csrf_ok(&$session, &$sent) {
            return view::forbidden_form();
        }
    };
}
pub(crate) use check_csrf;

/// An html! fragment answered as a page.
pub(crate) fn page(markup: maud::Markup) -> Response {
    Html(markup.into_string()).into_response()
}

/// A form's fields, repeated names kept (the scale-in form's nodes).
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(body: &[u8]) -> Self {
        Self(serde_urlencoded::from_bytes(body).unwrap_or_default())
    }

    /// The first value of `name`, trimmed; empty when absent.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.trim())
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }

    pub fn checked(&self, name: &str) -> bool {
        !self.get(name).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn posts_from_other_sites_are_refused() {
        let host = ("host", "127.0.0.1:7080");
        let cross = |pairs: &[(&'static str, &str)]| {
            cross_site(&headers(pairs), Some("127.0.0.1:7080"), "http")
        };
        // The console's own pages (and a client that sends neither header).
        assert!(!cross(&[host]));
        assert!(!cross(&[host, ("origin", "http://127.0.0.1:7080")]));
        assert!(!cross(&[host, ("sec-fetch-site", "same-origin")]));
        // Another site, port or scheme, an opaque origin, a same-site page.
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8888",
            "https://127.0.0.1:7080",
            "null",
            "garbage",
            "http://127.0.0.1:7080.evil.example",
        ] {
            assert!(cross(&[host, ("origin", origin)]), "{origin}");
        }
        assert!(cross(&[host, ("sec-fetch-site", "cross-site")]));
        assert!(cross(&[host, ("sec-fetch-site", "same-site")]));
        // HTTP/2 sends no Host: the authority decides.
        let h2 = headers(&[("origin", "https://gpu.example:7080")]);
        assert!(!cross_site(&h2, Some("gpu.example:7080"), "https"));
        assert!(cross_site(&h2, None, "https"));
    }

    #[test]
    fn only_ip_addresses_localhost_and_named_hosts_are_served() {
        let names = vec!["gpu.example.org".to_string()];
        for ok in [
            "127.0.0.1:7080",
            "10.0.0.5",
            "[::1]:7080",
            "localhost:7080",
            "GPU.example.org:443",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in [
            "evil.example:7080",
            "127.0.0.1.evil.example:7080",
            "[::1",
            "",
            "gpu.example.org.evil:1",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others_and_tokens_stay_header_safe() {
        let h = headers(&[("cookie", "a=1; gpupool_console=gcs_abc; b=2")]);
        assert_eq!(cookies(&h, COOKIE), ["gcs_abc"]);
        assert!(cookies(&headers(&[("cookie", "xgpupool_console=1")]), COOKIE).is_empty());
        // A second one (planted for a path by another page of the host).
        let two = headers(&[(
            "cookie",
            "gpupool_console=gcs_theirs; gpupool_console=gcs_mine",
        )]);
        assert_eq!(cookies(&two, COOKIE).len(), 2);
        for bad in [
            "",
            "a b",
            "a;Domain=evil",
            "a\r\nSet-Cookie: x",
            "é",
            "a,b",
            "a\"b",
            "a\\b",
        ] {
            assert!(!token_ok(bad), "{bad:?}");
        }
        assert!(!token_ok(&"a".repeat(513)));
    }
}

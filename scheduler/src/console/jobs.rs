//! Jobs: the list with filters, submit, the detail page with its
//! instances and endpoints, the log followed live, cancel.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use gpupool_common::display::{format_command, instance_state_name, job_kind_name, job_state_name};
use gpupool_proto::v1 as pb;
use maud::{Markup, html};

use super::view::{self, badge, csrf, error_line, frame, time};
use super::{App, Fields, Session, Signed, check_csrf, page};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/jobs", get(list).post(submit))
        .route("/jobs/table", get(table))
        .route("/jobs/new", get(submit_form))
        .route("/jobs/{id}", get(detail))
        .route("/jobs/{id}/log", get(log))
        .route("/jobs/{id}/cancel", post(cancel))
}

const STATES: [(&str, pb::JobState); 8] = [
    ("queued", pb::JobState::Queued),
    ("scheduled", pb::JobState::Scheduled),
    ("running", pb::JobState::Running),
    ("succeeded", pb::JobState::Succeeded),
    ("failed", pb::JobState::Failed),
    ("cancelled", pb::JobState::Cancelled),
    ("lost", pb::JobState::Lost),
    ("unavailable", pb::JobState::Unavailable),
];

/// Every job of `pool` (all pools: empty) in these states (all: none).
pub(super) async fn jobs_of(
    app: &App,
    s: &Session,
    pool: &str,
    states: &[pb::JobState],
) -> Result<Vec<pb::Job>, tonic::Status> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .jobs
            .clone()
            .list_jobs(app.request(
                s,
                pb::ListJobsRequest {
                    pool: pool.into(),
                    states: states.iter().map(|s| *s as i32).collect(),
                    page_size: 0,
                    page_token: token,
                },
            ))
            .await?
            .into_inner();
        out.extend(page.jobs);
        if page.next_page_token.is_empty() || out.len() >= 2000 {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

pub(super) fn job_table(jobs: &[pb::Job]) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.empty { "No jobs." }
        } @else {
            table {
                thead { tr { th { "Job" } th { "Name" } th { "Kind" } th { "State" } th { "Pool" } th { "Submitted" } th { "Reason" } } }
                tbody {
                    @for j in jobs.iter().rev() {
                        @let spec = j.spec.clone().unwrap_or_default();
                        tr {
                            td { a.mono href={"/jobs/" (j.job_id)} { (j.job_id) } }
                            td { (spec.name) }
                            td { (job_kind_name(spec.kind)) }
                            td { (badge(job_state_name(j.state))) }
                            td.mono { (j.pool_id) }
                            td { (time(j.submitted_at.as_ref())) }
                            td.reason { (j.reason) }
                        }
                    }
                }
            }
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct Filter {
    #[serde(default)]
    state: String,
    #[serde(default)]
    pool: String,
}

impl Filter {
    fn states(&self) -> Vec<pb::JobState> {
        STATES
            .iter()
            .filter(|(name, _)| *name == self.state)
            .map(|(_, s)| *s)
            .collect()
    }

    fn query(&self) -> String {
        serde_urlencoded::to_string([("state", &self.state), ("pool", &self.pool)])
            .unwrap_or_default()
    }
}

fn jobs_block(jobs: &[pb::Job], filter: &Filter) -> Markup {
    html! {
        div #jobs hx-get={"/jobs/table?" (filter.query())} hx-trigger="every 3s" hx-swap="outerHTML" {
            (job_table(jobs))
        }
    }
}

async fn list(Signed { app, s }: Signed, Query(filter): Query<Filter>) -> Response {
    let jobs = match jobs_of(&app, &s, &filter.pool, &filter.states()).await {
        Ok(jobs) => jobs,
        Err(status) => return view::failure(Some(&s), &status),
    };
    page(frame(
        Some(&s),
        "Jobs",
        html! {
            div.titlebar {
                h1 { "Jobs" }
                a.button href="/jobs/new" { "Submit a job" }
            }
            form.filters method="get" action="/jobs" {
                label for="state" { "State" }
                select #state name="state" {
                    option value="" { "any" }
                    @for (name, _) in STATES { option value=(name) selected[filter.state == name] { (name) } }
                }
                label for="pool" { "Pool" }
                input #pool name="pool" value=(filter.pool) placeholder="any";
                button type="submit" { "Filter" }
            }
            (jobs_block(&jobs, &filter))
        },
    ))
}

async fn table(Signed { app, s }: Signed, Query(filter): Query<Filter>) -> Response {
    match jobs_of(&app, &s, &filter.pool, &filter.states()).await {
        Ok(jobs) => page(jobs_block(&jobs, &filter)),
        Err(status) => view::failure(Some(&s), &status),
    }
}

#[derive(serde::Deserialize, Default)]
struct NewQuery {
    #[serde(default)]
    pool: String,
}

async fn submit_form(Signed { app, s }: Signed, Query(q): Query<NewQuery>) -> Response {
    let mut draft = Fields(Vec::new());
    draft.0.push(("pool".into(), q.pool));
    submit_page(&app, &s, &draft, None).await
}

async fn submit_page(app: &App, s: &Session, d: &Fields, error: Option<&str>) -> Response {
    let kinds = match app
        .jobs
        .clone()
        .list_job_kinds(app.request(s, pb::ListJobKindsRequest {}))
        .await
    {
        Ok(k) => k.into_inner().kinds,
        Err(status) => return view::failure(Some(s), &status),
    };
    let code = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let or = |name: &str, default: &'static str| -> String {
        let v = d.get(name);
        if v.is_empty() {
            default.to_string()
        } else {
            v.to_string()
        }
    };
    let markup = frame(
        Some(s),
        "Submit a job",
        html! {
            h1 { "Submit a job" }
            (error_line(error))
            form.card method="post" action="/jobs" {
                (csrf(s))
                label for="kind" { "Kind" }
                select #kind name="kind" {
                    @for k in &kinds {
                        @let name = job_kind_name(k.kind);
                        option value=(name) selected[d.get("kind") == name] { (name) }
                    }
                }
                label for="name" { "Name" }
                input #name name="name" value=(d.get("name"));
                label for="pool" { "Pool (ID or name; empty: the public pool)" }
                input #pool name="pool" value=(d.get("pool"));
                div.columns {
                    div { label for="gpus" { "GPUs" } input #gpus name="gpus" type="number" min="0" value=(or("gpus", "0")); }
                    div { label for="cpu" { "CPU cores" } input #cpu name="cpu" value=(or("cpu", "0.5")); }
                    div { label for="memory" { "Memory (MiB)" } input #memory name="memory" type="number" min="1" value=(or("memory", "256")); }
                    div { label for="instances" { "Instances" } input #instances name="instances" type="number" min="1" value=(or("instances", "1")); }
                }
                label for="image" { "Image (empty: run on the node's own system)" }
                input #image name="image" value=(d.get("image")) placeholder="registry.example/team/train:1.0";
                label for="command" { "Command (run by /bin/sh -c; empty: the kind's default)" }
                textarea #command name="command" rows="3" { (d.get("command")) }
                label for="class" { "Priority class" }
                select #class name="class" {
                    @for c in ["normal", "preemptible", "high"] { option value=(c) selected[d.get("class") == c] { (c) } }
                }
                button type="submit" { "Submit" }
            }
        },
    );
    (code, page(markup)).into_response()
}

/// `0.5` cores as thousandths.
fn cores_milli(text: &str) -> Option<i64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || (whole.is_empty() && frac.is_empty()) {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(frac) {
        return None;
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().ok()?
    };
    whole.checked_mul(1000)?.checked_add(frac)
}

fn spec_of(f: &Fields) -> Result<pb::JobSpec, String> {
    let kind = crate::domain::JobKind::from_name(f.get("kind"))
        .ok_or_else(|| format!("unknown kind {:?}", f.get("kind")))?;
    let number = |name: &str| -> Result<i64, String> {
        f.get(name)
            .parse::<i64>()
            .map_err(|_| format!("{name} must be a whole number, not {:?}", f.get(name)))
    };
    let cpu = cores_milli(f.get("cpu")).ok_or_else(|| {
        format!(
            "CPU cores must be a number like 0.5, not {:?}",
            f.get("cpu")
        )
    })?;
    let command = f.get("command");
    let class = match f.get("class") {
        "preemptible" => pb::PriorityClass::Preemptible,
        "high" => pb::PriorityClass::High,
        _ => pb::PriorityClass::Unspecified,
    };
    Ok(pb::JobSpec {
        name: f.get("name").into(),
        kind: crate::api::kind_to_pb(kind) as i32,
        pool: f.get("pool").into(),
        resources: Some(pb::Resources {
            gpus: i32::try_from(number("gpus")?).map_err(|_| "too many GPUs".to_string())?,
            cpu_milli: cpu,
            memory_mib: number("memory")?,
            ..Default::default()
        }),
        instances: i32::try_from(number("instances")?)
            .map_err(|_| "too many instances".to_string())?,
        command: if command.is_empty() {
            Vec::new()
        } else {
            vec!["/bin/sh".into(), "-c".into(), command.replace("\r\n", "\n")]
        },
        image: f.get("image").into(),
        priority_class: class as i32,
        ..Default::default()
    })
}

async fn submit(Signed { app, s }: Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    check_csrf!(app, s, f.get("csrf"));
    let spec = match spec_of(&f) {
        Ok(spec) => spec,
        Err(e) => return submit_page(&app, &s, &f, Some(&e)).await,
    };
    let request = app.request(&s, pb::SubmitJobRequest { spec: Some(spec) });
    match app.jobs.clone().submit_job(request).await {
        Ok(job) => Redirect::to(&format!("/jobs/{}", job.into_inner().job_id)).into_response(),
        Err(status) => submit_page(&app, &s, &f, Some(status.message())).await,
    }
}

async fn get_job(app: &App, s: &Session, id: &str) -> Result<pb::Job, tonic::Status> {
    app.jobs
        .clone()
        .get_job(app.request(s, pb::GetJobRequest { job_id: id.into() }))
        .await
        .map(tonic::Response::into_inner)
}

/// The domain's rule: a job in a terminal state is done with.
fn finished(j: &pb::Job) -> bool {
    crate::api::job_state_from_pb(j.state).is_some_and(crate::domain::JobState::is_terminal)
}

async fn detail(Signed { app, s }: Signed, Path(id): Path<String>) -> Response {
    let j = match get_job(&app, &s, &id).await {
        Ok(j) => j,
        Err(status) => return view::failure(Some(&s), &status),
    };
    let spec = j.spec.clone().unwrap_or_default();
    page(frame(
        Some(&s),
        &j.job_id,
        html! {
            div.titlebar {
                h1 { "Job " (j.job_id) }
                (badge(job_state_name(j.state)))
            }
            dl.facts {
                dt { "Name" } dd { (spec.name) }
                dt { "Kind" } dd { (job_kind_name(spec.kind)) }
                dt { "Pool" } dd { a.mono href={"/pools/" (j.pool_id)} { (j.pool_id) } }
                dt { "Command" } dd.mono { (format_command(&spec.command)) }
                @if !spec.image.is_empty() { dt { "Image" } dd.mono { (spec.image) } }
                dt { "Submitted" } dd { (time(j.submitted_at.as_ref())) }
                dt { "Reason" } dd.reason { (j.reason) }
                dt { "Retries" } dd { (j.retries) }
                @if j.preemptions > 0 { dt { "Preempted" } dd { (j.preemptions) " time(s), last by " (j.preempted_by) } }
                @if !j.url.is_empty() {
                    dt { "Open" } dd { a.button href=(j.url) target="_blank" rel="noopener noreferrer" { "Open " (job_kind_name(spec.kind)) } }
                }
            }
            @if !finished(&j) {
                form method="post" action={"/jobs/" (j.job_id) "/cancel"} {
                    (csrf(&s))
                    button.danger type="submit" { "Cancel the job" }
                }
            }
            h2 { "Instances" }
            table {
                thead { tr { th { "Rank" } th { "Instance" } th { "State" } th { "Node" } th { "GPUs" } th { "Endpoint" } th { "Exit" } th { "Reason" } } }
                tbody {
                    @for i in &j.instances {
                        tr {
                            td.num { (i.rank) }
                            td.mono { (i.instance_id) }
                            td { (badge(instance_state_name(i.state))) }
                            td.mono { (i.node_id) }
                            td { (i.gpu_indexes.iter().map(u32::to_string).collect::<Vec<_>>().join(",")) }
                            td.mono { (i.endpoint) }
                            td { (i.exit_code.map_or(String::new(), |c| c.to_string())) }
                            td.reason { (i.reason) }
                        }
                    }
                }
            }
            h2 { "Log" }
            (log_block(&j))
        },
    ))
}

/// The log of rank 0, as the detail page first has it: empty, read at
/// once from the start.
fn log_block(j: &pb::Job) -> Markup {
    html! {
        div #log {
            p.hint { "State: " b #log-state { (job_state_name(j.state)) } }
            (log_poll(j, 0, "load"))
            pre #log-text .log {}
        }
    }
}

/// What fetches the log from `offset` on, when `trigger` fires.
fn log_poll(j: &pb::Job, offset: u64, trigger: &str) -> Markup {
    html! {
        div #log-poll hx-get={"/jobs/" (j.job_id) "/log?offset=" (offset)}
            hx-trigger=(trigger) hx-swap="outerHTML" {}
    }
}

#[derive(serde::Deserialize, Default)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

/// The log's bytes from `offset` on (at most [`LOG_STEP`] per request,
/// so a poll costs what is new, not the whole log): the next poller, the
/// new text appended to the page's (out of band), and the state. It
/// polls every second while the job runs, and once more after it ends.
async fn log(
    Signed { app, s }: Signed,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let j = match get_job(&app, &s, &id).await {
        Ok(j) => j,
        Err(status) => return view::failure(Some(&s), &status),
    };
    let (text, next) = if j.instances.is_empty() {
        (String::new(), q.offset)
    } else {
        match read_log(&app, &s, &id, q.offset).await {
            Ok(read) => read,
            Err(status) => (
                format!("(the log cannot be read: {})\n", status.message()),
                q.offset,
            ),
        }
    };
    let more = next > q.offset;
    let trigger = if more {
        "load delay:100ms"
    } else if finished(&j) {
        "none"
    } else {
        "every 1s"
    };
    page(html! {
        (log_poll(&j, next, trigger))
        b #log-state hx-swap-oob="true" { (job_state_name(j.state)) }
        @if !text.is_empty() {
            pre #log-text hx-swap-oob="beforeend" { (text) }
        }
    })
}

/// Most log bytes one request reads.
const LOG_STEP: usize = 256 << 10;

/// Rank 0's log from `offset`, at most [`LOG_STEP`] bytes of it, and the
/// offset after them.
async fn read_log(
    app: &App,
    s: &Session,
    id: &str,
    offset: u64,
) -> Result<(String, u64), tonic::Status> {
    let mut stream = app
        .jobs
        .clone()
        .get_job_logs(app.request(
            s,
            pb::GetJobLogsRequest {
                job_id: id.into(),
                instance: 0,
                follow: false,
                offset,
            },
        ))
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    let mut next = offset;
    while bytes.len() < LOG_STEP
        && let Some(chunk) = stream.message().await?
    {
        let room = LOG_STEP - bytes.len();
        let take = chunk.data.len().min(room);
        bytes.extend_from_slice(&chunk.data[..take]);
        next = if take == chunk.data.len() {
            chunk.next_offset
        } else {
            chunk.next_offset - (chunk.data.len() - take) as u64
        };
    }
    // A character cut at the step's end is completed by the next read.
    let valid = match std::str::from_utf8(&bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    };
    next -= (bytes.len() - valid) as u64;
    bytes.truncate(valid);
    Ok((String::from_utf8_lossy(&bytes).into_owned(), next))
}

async fn cancel(Signed { app, s }: Signed, Path(id): Path<String>, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    check_csrf!(app, s, f.get("csrf"));
    match app
        .jobs
        .clone()
        .cancel_job(app.request(&s, pb::CancelJobRequest { job_id: id.clone() }))
        .await
    {
        Ok(_) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(status) => view::failure(Some(&s), &status),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cores_parse_as_thousandths() {
        assert_eq!(super::cores_milli("0.5"), Some(500));
        assert_eq!(super::cores_milli("2"), Some(2000));
        assert_eq!(super::cores_milli(".25"), Some(250));
        assert_eq!(super::cores_milli("1.0001"), None);
        assert_eq!(super::cores_milli(""), None);
        assert_eq!(super::cores_milli("-1"), None);
        assert_eq!(super::cores_milli("1e3"), None);
    }
}

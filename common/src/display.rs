//! Human-readable rendering of the API's values, shared by the CLI's tables
//! and JSON and the scheduler's web console: enum names, times, money,
//! quantities, commands, CSV.

use crate::calendar::civil_from_days;
use gpupool_proto::v1::{
    BillingMode, InstanceState, JobKind, JobState, NodeStatus, PoolStatus, PoolType,
};

/// Job state: `Queued`, `Scheduled`, `Running`, `Succeeded`, `Failed`,
/// `Cancelled`, `Lost`, `Unavailable`.
pub fn job_state_name(v: i32) -> &'static str {
    match JobState::try_from(v) {
        Ok(JobState::Unspecified) => "Unspecified",
        Ok(JobState::Queued) => "Queued",
        Ok(JobState::Scheduled) => "Scheduled",
        Ok(JobState::Running) => "Running",
        Ok(JobState::Succeeded) => "Succeeded",
        Ok(JobState::Failed) => "Failed",
        Ok(JobState::Cancelled) => "Cancelled",
        Ok(JobState::Lost) => "Lost",
        Ok(JobState::Unavailable) => "Unavailable",
        Err(_) => "Unknown",
    }
}

/// Instance state: `Scheduled`, `Running`, `Succeeded`, `Failed`, `Stopped`,
/// `Lost`, `Stopping`.
pub fn instance_state_name(v: i32) -> &'static str {
    match InstanceState::try_from(v) {
        Ok(InstanceState::Unspecified) => "Unspecified",
        Ok(InstanceState::Scheduled) => "Scheduled",
        Ok(InstanceState::Running) => "Running",
        Ok(InstanceState::Succeeded) => "Succeeded",
        Ok(InstanceState::Failed) => "Failed",
        Ok(InstanceState::Stopped) => "Stopped",
        Ok(InstanceState::Lost) => "Lost",
        Ok(InstanceState::Stopping) => "Stopping",
        Err(_) => "Unknown",
    }
}

/// Job kind: `notebook`, `training`, `tensorboard`, `online-service`,
/// `batch-service`.
pub fn job_kind_name(v: i32) -> &'static str {
    match JobKind::try_from(v) {
        Ok(JobKind::Unspecified) => "unspecified",
        Ok(JobKind::Notebook) => "notebook",
        Ok(JobKind::Training) => "training",
        Ok(JobKind::Tensorboard) => "tensorboard",
        Ok(JobKind::OnlineService) => "online-service",
        Ok(JobKind::BatchService) => "batch-service",
        Err(_) => "unknown",
    }
}

/// Node status: `Ready`, `NotReady`.
pub fn node_status_name(v: i32) -> &'static str {
    match NodeStatus::try_from(v) {
        Ok(NodeStatus::Unspecified) => "Unspecified",
        Ok(NodeStatus::Ready) => "Ready",
        Ok(NodeStatus::NotReady) => "NotReady",
        Err(_) => "Unknown",
    }
}

/// Pool type: `public`, `train`, `deploy`.
pub fn pool_type_name(v: i32) -> &'static str {
    match PoolType::try_from(v) {
        Ok(PoolType::Unspecified) => "unspecified",
        Ok(PoolType::Public) => "public",
        Ok(PoolType::Train) => "train",
        Ok(PoolType::Deploy) => "deploy",
        Err(_) => "unknown",
    }
}

/// Pool status: `Creating`, `Running`, `Scaling`, `Abnormal`, `Unavailable`,
/// `CreateFailed`, `Deleting`, `Frozen`, `Deleted`.
pub fn pool_status_name(v: i32) -> &'static str {
    match PoolStatus::try_from(v) {
        Ok(PoolStatus::Unspecified) => "Unspecified",
        Ok(PoolStatus::Creating) => "Creating",
        Ok(PoolStatus::Running) => "Running",
        Ok(PoolStatus::Scaling) => "Scaling",
        Ok(PoolStatus::Abnormal) => "Abnormal",
        Ok(PoolStatus::Unavailable) => "Unavailable",
        Ok(PoolStatus::CreateFailed) => "CreateFailed",
        Ok(PoolStatus::Deleting) => "Deleting",
        Ok(PoolStatus::Frozen) => "Frozen",
        Ok(PoolStatus::Deleted) => "Deleted",
        Err(_) => "Unknown",
    }
}

/// Billing mode: `on-demand`, `subscription`.
pub fn billing_mode_name(v: i32) -> &'static str {
    match BillingMode::try_from(v) {
        Ok(BillingMode::Unspecified) => "unspecified",
        Ok(BillingMode::OnDemand) => "on-demand",
        Ok(BillingMode::Subscription) => "subscription",
        Err(_) => "unknown",
    }
}

/// Milliseconds since the Unix epoch of an optional timestamp.
pub fn ts_ms(ts: Option<&prost_types::Timestamp>) -> Option<i64> {
    ts.map(gpupool_proto::unix_ms_from_timestamp)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC time, to the second: `2023-11-14T22:13:20Z`.
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// An optional time with its age: `2023-11-14T22:13:20Z (5m ago)`, or `-`.
pub fn format_time_ago(ms: Option<i64>, now: i64) -> String {
    match ms {
        Some(ms) => format!("{} ({} ago)", format_time(ms), format_age(ms, now)),
        None => "-".to_string(),
    }
}

/// Time elapsed since `ms`, in its largest unit: `45s`, `12m`, `3h`, `2d`.
pub fn format_age(ms: i64, now: i64) -> String {
    let secs = now.saturating_sub(ms).max(0) / 1000;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A fixed-point value in thousandths, without trailing zeros: `1500` ->
/// `1.5`, `2000` -> `2`, `-250` -> `-0.25`.
pub fn format_milli(milli: i64) -> String {
    format_fixed(milli, 1000, 0)
}

/// Money in micro-units, with exactly 6 decimals: `12500000` ->
/// `12.500000`, `-3000000` -> `-3.000000`.
pub fn format_micros(micros: i64) -> String {
    format_fixed(micros, 1_000_000, 6)
}

/// `value / unit` as a decimal with at least `min_decimals` decimals.
fn format_fixed(value: i64, unit: u64, min_decimals: usize) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let abs = value.unsigned_abs();
    let whole = abs / unit;
    let width = unit.ilog10() as usize;
    let frac = format!("{:0width$}", abs % unit);
    let mut frac = frac.trim_end_matches('0').to_string();
    while frac.len() < min_decimals {
        frac.push('0');
    }
    if frac.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{frac}")
    }
}

/// Memory in MiB, in GiB from 1 GiB up: `512MiB`, `4GiB`, `1.5GiB`.
pub fn format_mib(mib: i64) -> String {
    if mib.abs() >= 1024 {
        // Thousandths of a GiB, rounded to a tenth.
        let tenths = (mib as f64 / 1024.0 * 10.0).round() as i64;
        format!("{}GiB", format_milli(tenths * 100))
    } else {
        format!("{mib}MiB")
    }
}

/// `-` for an empty table cell, so that columns stay readable.
pub fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        shown(s)
    }
}

/// `s` with its control characters escaped (`\u{1b}`, `\n`): what the
/// scheduler stores may come from a rogue agent or tenant, and a table or
/// a detail line must not carry terminal escapes or forged lines.
pub fn shown(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A command line, with arguments quoted where a shell would need it.
pub fn format_command(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One CSV record (RFC 4180): fields joined by commas, a field holding a
/// comma, a double quote, CR or LF quoted with its quotes doubled, and the
/// line ended by CRLF.
pub fn csv_line<S: AsRef<str>>(fields: &[S]) -> String {
    let mut line = fields
        .iter()
        .map(|f| {
            let f = f.as_ref();
            if f.contains([',', '"', '\r', '\n']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(-1000), "1969-12-31T23:59:59Z");
        assert_eq!(format_age(0, 45_000), "45s");
        assert_eq!(format_age(0, 12 * 60_000 + 5), "12m");
        assert_eq!(format_age(0, 3 * 3_600_000), "3h");
        assert_eq!(format_age(0, 2 * 86_400_000 + 1), "2d");
        assert_eq!(format_age(10_000, 0), "0s");
    }

    #[test]
    fn quantities() {
        assert_eq!(format_milli(1500), "1.5");
        assert_eq!(format_milli(2000), "2");
        assert_eq!(format_milli(250), "0.25");
        assert_eq!(format_milli(-250), "-0.25");
        assert_eq!(format_micros(12_500_000), "12.500000");
        assert_eq!(format_micros(1_234_567), "1.234567");
        assert_eq!(format_micros(0), "0.000000");
        assert_eq!(format_micros(1), "0.000001");
        assert_eq!(format_micros(-3_000_000), "-3.000000");
        assert_eq!(format_micros(-500_000), "-0.500000");
        assert_eq!(format_micros(i64::MIN), "-9223372036854.775808");
        assert_eq!(format_mib(512), "512MiB");
        assert_eq!(format_mib(4096), "4GiB");
        assert_eq!(format_mib(1536), "1.5GiB");
    }

    #[test]
    fn enum_names() {
        assert_eq!(job_state_name(JobState::Cancelled as i32), "Cancelled");
        assert_eq!(job_state_name(99), "Unknown");
        assert_eq!(
            job_kind_name(JobKind::OnlineService as i32),
            "online-service"
        );
        assert_eq!(node_status_name(NodeStatus::NotReady as i32), "NotReady");
        assert_eq!(
            instance_state_name(InstanceState::Stopping as i32),
            "Stopping"
        );
        assert_eq!(
            pool_status_name(PoolStatus::CreateFailed as i32),
            "CreateFailed"
        );
        assert_eq!(billing_mode_name(BillingMode::OnDemand as i32), "on-demand");
        assert_eq!(pool_type_name(PoolType::Deploy as i32), "deploy");
    }

    #[test]
    fn command_quoting() {
        let args: Vec<String> = ["python", "-c", "print('hi there')", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            format_command(&args),
            r"python -c 'print('\''hi there'\'')' ''"
        );
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_line(&["a", "b", ""]), "a,b,\r\n");
        assert_eq!(
            csv_line(&["team, a", "say \"hi\"", "x"]),
            "\"team, a\",\"say \"\"hi\"\"\",x\r\n"
        );
        assert_eq!(csv_line(&["two\nlines"]), "\"two\nlines\"\r\n");
        assert_eq!(csv_line(&[String::from("-12")]), "-12\r\n");
    }
}

//! Why a command failed, and how it reads: the scheduler's status with API
//! field names turned into the flags the user typed, a connection failure
//! with its causes, or a message already worded for the user.

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The scheduler answered with an error status.
    Status(tonic::Status),
    /// No connection to the scheduler.
    Connect { addr: String, cause: String },
    /// Anything else, already worded for the user.
    Message(String),
}

/// The scheduler's errors name API fields; the CLI user typed flags.
fn in_flag_names(message: &str) -> String {
    const FLAGS: &[(&str, &str)] = &[
        ("gpu_milli", "--gpu-milli"),
        ("cpu_milli", "--cpu"),
        ("memory_mib", "--memory"),
        ("for_job", "--job"),
        ("max_runtime_secs", "--max-runtime"),
        ("idle_timeout_secs", "--idle-timeout"),
        ("max_retries", "--max-retries"),
        ("log_dir", "--log-dir"),
        ("health_check", "--health-http/--health-tcp"),
        ("working_dir", "--workdir"),
        ("node_count", "--nodes"),
    ];
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match FLAGS.iter().find(|(field, _)| *field == word.as_str()) {
            Some((_, flag)) => out.push_str(flag),
            None => out.push_str(word),
        }
        word.clear();
    };
    // Quoted text is left as it is: config fields in backticks, values
    // (ids, names, paths) in double quotes.
    let mut quoted: Option<char> = None;
    for c in message.chars() {
        if quoted.is_none() && (c.is_ascii_alphanumeric() || c == '_') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            if c == '`' || c == '"' {
                quoted = match quoted {
                    Some(q) if q == c => None,
                    None => Some(c),
                    other => other,
                };
            }
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Status(s)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Status(s) => {
                let message = if s.message().is_empty() {
                    s.code().description().to_string()
                } else {
                    in_flag_names(s.message())
                };
                write!(f, "{message} ({:?})", s.code())
            }
            CliError::Connect { addr, cause } => write!(f, "cannot connect to {addr}: {cause}"),
            CliError::Message(m) => f.write_str(m),
        }
    }
}

/// An error and its sources: `transport error: tcp connect error: ...`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_speak_in_flag_names_but_config_fields_stay() {
        assert_eq!(
            in_flag_names("gpu_milli must be 1..999 (got 1500); for_job is not a training job"),
            "--gpu-milli must be 1..999 (got 1500); --job is not a training job"
        );
        assert_eq!(
            in_flag_names(
                "max_retries 9 exceeds the cluster's limit of 5 (`[limits] max_retries`)"
            ),
            "--max-retries 9 exceeds the cluster's limit of 5 (`[limits] max_retries`)"
        );
        assert_eq!(in_flag_names("gpu_milli_x stays"), "gpu_milli_x stays");
        assert_eq!(
            in_flag_names("job \"my_log_dir\" not found; log_dir \"/data/log_dir\""),
            "job \"my_log_dir\" not found; --log-dir \"/data/log_dir\""
        );
    }

    #[test]
    fn status_errors_name_the_code() {
        let e = CliError::from(tonic::Status::not_found("job j-9 not found"));
        assert_eq!(e.to_string(), "job j-9 not found (NotFound)");
        let e = CliError::Connect {
            addr: "http://x:1".into(),
            cause: "refused".into(),
        };
        assert_eq!(e.to_string(), "cannot connect to http://x:1: refused");
    }
}

//! The instance shim: `<agent binary> shim EXIT_FILE -- COMMAND ARGS...`.
//!
//! The agent starts every instance through this shim so that the exit
//! status survives an agent restart: the shim leads the instance's process
//! group, runs the command as its child, and when it ends writes `code N` or
//! `signal N` to EXIT_FILE (atomically) before exiting the same way. A
//! restarted agent finds the file, or the shim still running, and reattaches.
//!
//! The shim itself ignores SIGTERM/SIGINT/SIGHUP (with a handler, which
//! `exec` resets, so the command keeps the default dispositions): a stop
//! signals the whole group, and the shim must outlive the command to record
//! how it ended. SIGKILL ends both.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

extern "C" fn ignore(_: libc::c_int) {}

/// The exit of a command as recorded in an exit file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Reads an exit file written by the shim.
pub fn read_exit(path: &Path) -> Option<Exit> {
    let text = std::fs::read_to_string(path).ok()?;
    let (kind, value) = text.trim().split_once(' ')?;
    let value = value.parse().ok()?;
    match kind {
        "code" => Some(Exit::Code(value)),
        "signal" => Some(Exit::Signal(value)),
        _ => None,
    }
}

/// Runs the shim if `args` (without the program name) start with `shim`;
/// never returns then. Returns otherwise.
pub fn run_if_shim(args: &[String]) {
    if args.first().map(String::as_str) != Some("shim") {
        return;
    }
    std::process::exit(shim(&args[1..]));
}

/// What the shim is asked to do.
#[derive(Debug, PartialEq, Eq)]
struct Args<'a> {
    exit_file: &'a str,
    /// The user the command runs as (None: the shim's).
    user: Option<(u32, u32)>,
    /// The command's environment (None: the shim's own).
    env_file: Option<&'a str>,
    command: &'a [String],
}

/// `EXIT_FILE [--as UID:GID] [--env-file FILE] -- COMMAND ARGS...`.
fn parse(args: &[String]) -> Option<Args<'_>> {
    let exit_file = args.first()?;
    let mut user = None;
    let mut env_file = None;
    let mut rest = &args[1..];
    loop {
        match rest.first().map(String::as_str) {
            Some("--as") => {
                let (uid, gid) = rest.get(1)?.split_once(':')?;
                user = Some((uid.parse().ok()?, gid.parse().ok()?));
                rest = &rest[2..];
            }
            Some("--env-file") => {
                env_file = Some(rest.get(1)?.as_str());
                rest = &rest[2..];
            }
            Some("--") if rest.len() > 1 => {
                return Some(Args {
                    exit_file,
                    user,
                    env_file,
                    command: &rest[1..],
                });
            }
            _ => return None,
        }
    }
}

/// Reads and removes an environment file: `KEY=VALUE` entries, each ended
/// by a NUL.
fn take_env(path: &str) -> std::io::Result<Vec<(String, String)>> {
    let bytes = std::fs::read(path)?;
    let _ = std::fs::remove_file(path);
    Ok(bytes
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let e = String::from_utf8_lossy(e);
            let (k, v) = e.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

fn shim(args: &[String]) -> i32 {
    let Some(Args {
        exit_file,
        user,
        env_file,
        command,
    }) = parse(args)
    else {
        eprintln!("usage: shim EXIT_FILE [--as UID:GID] [--env-file FILE] -- COMMAND ARGS...");
        return 2;
    };
    let (program, rest) = command.split_first().expect("parse checked it");
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that does nothing.
        unsafe {
            libc::signal(sig, ignore as *const () as libc::sighandler_t);
        }
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    if let Some(path) = env_file {
        match take_env(path) {
            Ok(env) => {
                cmd.env_clear().envs(env);
            }
            Err(err) => {
                eprintln!("shim: cannot read the environment {path}: {err}");
                write_exit(exit_file, "code 127");
                return 127;
            }
        }
    }
    if let Some((uid, gid)) = user {
        // Supplementary groups go too (std clears them when root sets a uid).
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let status = match cmd.status() {
        Ok(s) => s,
        Err(err) => {
            let who = user
                .map(|(u, _)| format!(" as uid {u}"))
                .unwrap_or_default();
            eprintln!("failed to start {program}{who}: {err}");
            write_exit(exit_file, "code 127");
            return 127;
        }
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            write_exit(exit_file, &format!("code {code}"));
            code
        }
        (None, Some(sig)) => {
            write_exit(exit_file, &format!("signal {sig}"));
            // Die the same way, so a waiting parent sees the signal.
            // SAFETY: restoring the default action and signalling ourselves.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(libc::getpid(), sig);
            }
            128 + sig
        }
        _ => 1,
    }
}

fn write_exit(path: &str, text: &str) {
    let tmp = format!("{path}.tmp");
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::write(path, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let a = args("/x.exit -- id -u");
        let p = parse(&a).unwrap();
        assert_eq!((p.exit_file, p.user, p.env_file), ("/x.exit", None, None));
        assert_eq!(p.command, &a[2..]);
        let a = args("/x.exit --as 65534:65534 --env-file /x.env -- id");
        let p = parse(&a).unwrap();
        assert_eq!(p.user, Some((65534, 65534)));
        assert_eq!(p.env_file, Some("/x.env"));
        assert_eq!(p.command, &a[6..]);
        for bad in [
            "/x.exit",
            "/x.exit --",
            "/x.exit --as 1 -- id",
            "/x.exit id",
            "/x.exit --env-file",
        ] {
            assert!(parse(&args(bad)).is_none(), "{bad}");
        }
    }

    #[test]
    fn environment_files_are_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.env");
        std::fs::write(&f, b"A=1\0B=two\nlines\0C=x=y\0").unwrap();
        let env = take_env(f.to_str().unwrap()).unwrap();
        assert_eq!(
            env,
            [("A", "1"), ("B", "two\nlines"), ("C", "x=y")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(!f.exists(), "removed once read");
    }

    #[test]
    fn exit_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.exit");
        write_exit(f.to_str().unwrap(), "code 3");
        assert_eq!(read_exit(&f), Some(Exit::Code(3)));
        write_exit(f.to_str().unwrap(), "signal 9");
        assert_eq!(read_exit(&f), Some(Exit::Signal(9)));
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(read_exit(&f), None);
        assert_eq!(read_exit(&dir.path().join("missing")), None);
    }
}

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

/// `EXIT_FILE [--as UID:GID] -- COMMAND ARGS...`: the exit file, the user
/// the command runs as (None: the shim's), the command.
fn parse(args: &[String]) -> Option<(&str, Option<(u32, u32)>, &[String])> {
    let exit_file = args.first()?;
    let (user, rest) = match args.get(1).map(String::as_str) {
        Some("--as") => {
            let (uid, gid) = args.get(2)?.split_once(':')?;
            (Some((uid.parse().ok()?, gid.parse().ok()?)), &args[3..])
        }
        _ => (None, &args[1..]),
    };
    match rest.split_first() {
        Some((dashes, command)) if dashes == "--" && !command.is_empty() => {
            Some((exit_file, user, command))
        }
        _ => None,
    }
}

fn shim(args: &[String]) -> i32 {
    let Some((exit_file, user, command)) = parse(args) else {
        eprintln!("usage: shim EXIT_FILE [--as UID:GID] -- COMMAND ARGS...");
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
        assert_eq!(parse(&a), Some(("/x.exit", None, &a[2..])));
        let a = args("/x.exit --as 65534:65534 -- id");
        assert_eq!(parse(&a), Some(("/x.exit", Some((65534, 65534)), &a[4..])));
        for bad in [
            "/x.exit",
            "/x.exit --",
            "/x.exit --as 1 -- id",
            "/x.exit id",
        ] {
            assert_eq!(parse(&args(bad)), None, "{bad}");
        }
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

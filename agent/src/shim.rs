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

fn shim(args: &[String]) -> i32 {
    let (Some(exit_file), Some("--")) = (args.first(), args.get(1).map(String::as_str)) else {
        eprintln!("usage: shim EXIT_FILE -- COMMAND ARGS...");
        return 2;
    };
    let Some((program, rest)) = args[2..].split_first() else {
        eprintln!("shim: empty command");
        return 2;
    };
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that does nothing.
        unsafe {
            libc::signal(sig, ignore as *const () as libc::sighandler_t);
        }
    }
    let status = match std::process::Command::new(program).args(rest).status() {
        Ok(s) => s,
        Err(err) => {
            eprintln!("failed to start {program}: {err}");
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
    // An unprivileged instance cannot create files in the agent's state
    // dir; the agent pre-creates the exit file for it, owned by its user.
    let _ = std::fs::write(path, text);
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! The processes a benchmark runs: where their binaries are, and what
//! `/proc` says of them (CPU time, resident memory). Shared by `load` and
//! `churn`.

use std::path::PathBuf;

use anyhow::Context;

/// `name` next to this binary, else on `$PATH`; the error says which
/// package to build, then `hint`.
pub(crate) fn find_binary(name: &str, package: &str, hint: &str) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()?.with_file_name(name);
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .with_context(|| {
            format!(
                "{name} is neither next to {} nor on $PATH: build it too \
                 (`cargo build --release -p {package} -p gpupool-bench`){hint}",
                beside.display()
            )
        })
}

/// CPU clock ticks of a process: its own (utime+stime, all threads) and its
/// reaped children's (cutime+cstime).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub own: u64,
    pub children: u64,
}

pub(crate) fn cpu(pid: u32) -> Cpu {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// The CPU fields of a `/proc/PID/stat` line.
pub(crate) fn parse_stat(stat: &str) -> Cpu {
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // After the state: ppid pgrp session tty tpgid flags minflt cminflt
    // majflt cmajflt utime stime cutime cstime.
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Cpu {
        own: at(10) + at(11),
        children: at(12) + at(13),
    }
}

/// A process's resident memory (VmRSS), KiB; 0 if it is gone.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fields_follow_the_command_name() {
        // A name with a space and a parenthesis cannot shift the fields.
        let c = parse_stat("42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 3 2 20 0 9");
        assert_eq!((c.own, c.children), (12, 5));
    }
}

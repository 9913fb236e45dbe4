//! The `gpupool` binary itself: help, exit codes. (Having an integration
//! test also makes `cargo test --workspace` build the binary that the
//! end-to-end tests in `tests/` run.)

use std::process::Command;

#[test]
fn cli_help_lists_every_command_group() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for group in ["node", "pool", "job", "spec", "usage", "order"] {
        assert!(text.contains(group), "{group} missing from:\n{text}");
    }
}

#[test]
fn cli_reports_unreachable_scheduler() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .args(["--addr", "http://127.0.0.1:1", "node", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn usage_errors_exit_with_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool"))
        .args(["job", "submit", "--kind", "weird"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weird"));
}

//! The scheduler and CLI binaries themselves: help, config errors.

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
fn missing_config_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool-scheduler"))
        .args(["serve", "--config", "/nonexistent/gpupool.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gpupool.toml"));
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

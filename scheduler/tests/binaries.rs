//! The scheduler binary itself: config errors. (The CLI's are in
//! `cli/tests/`.)

use std::process::Command;

#[test]
fn missing_config_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool-scheduler"))
        .args(["serve", "--config", "/nonexistent/gpupool.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gpupool.toml"));
}

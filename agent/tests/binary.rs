//! The agent binary itself: flags and config errors.

use std::process::Command;

#[test]
fn bad_config_exits_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "scheduler_addr = \"http://127.0.0.1:1\"\nfake_gpus = 8\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool-agent"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agent.toml") && stderr.contains("fake_gpus"),
        "{stderr}"
    );
}

#[test]
fn bad_fake_gpu_spec_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "scheduler_addr = \"http://127.0.0.1:1\"\nstate_dir = \"{}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpupool-agent"))
        .arg("--config")
        .arg(&path)
        .args(["--fake-gpus", "eightxH100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid fake GPU spec"));
}

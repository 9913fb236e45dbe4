//! An agent restart does not lose instances: a new runtime on the same
//! state dir reattaches to a running instance and reports its real exit
//! code (recorded by the shim, the real agent binary).

use std::path::PathBuf;
use std::time::Duration;

use gpupool_agent::runtime::{InstanceSpec, Phase, Runtime};

fn shim() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gpupool-agent"))
}

/// The ended instances, once `n` have ended (or after 10 s, whatever ended).
async fn ended(rt: &Runtime, n: usize) -> Vec<gpupool_agent::runtime::InstanceReport> {
    let mut done = Vec::new();
    for _ in 0..200 {
        done = rt
            .snapshot()
            .into_iter()
            .filter(|r| r.phase.is_terminal())
            .collect();
        if done.len() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done
}

#[tokio::test]
async fn restarted_runtime_reattaches_and_reports_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let first = Runtime::new(dir.path()).unwrap().with_shim(shim());
    first.start(InstanceSpec {
        instance_id: "j-1-0".into(),
        job_id: "j-1".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "sleep 1; echo done; exit 3".into(),
        ],
        world_size: 1,
        ..Default::default()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = first.snapshot();
    assert_eq!(running[0].phase, Phase::Running);
    // "Restart": a new runtime on the same state dir.
    let second = Runtime::new(dir.path()).unwrap().with_shim(shim());
    second.recover();
    let adopted = second.snapshot();
    assert_eq!(adopted.len(), 1);
    assert_eq!(
        (adopted[0].phase, adopted[0].pid),
        (Phase::Running, running[0].pid)
    );
    let mut end = None;
    for _ in 0..100 {
        let r = second.snapshot().remove(0);
        if r.phase.is_terminal() {
            end = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = end.expect("the adopted instance ended");
    assert_eq!(
        (end.phase, end.exit_code),
        (Phase::Failed, Some(3)),
        "{end:?}"
    );
    let (log, _) = second.read_log("j-1-0", 0, 1024).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&log).trim(), "done");
    // Once forgotten, nothing is recovered again.
    second.forget("j-1-0");
    let third = Runtime::new(dir.path()).unwrap().with_shim(shim());
    third.recover();
    assert!(third.snapshot().is_empty());
}

#[tokio::test]
async fn shim_passes_success_and_signals_through() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(dir.path()).unwrap().with_shim(shim());
    for (id, cmd) in [("ok-0", "exit 0"), ("sig-0", "kill -KILL $$")] {
        rt.start(InstanceSpec {
            instance_id: id.into(),
            command: vec!["sh".into(), "-c".into(), cmd.into()],
            world_size: 1,
            ..Default::default()
        });
    }
    let done = ended(&rt, 2).await;
    let ok = done.iter().find(|r| r.instance_id == "ok-0").unwrap();
    assert_eq!((ok.phase, ok.exit_code), (Phase::Succeeded, Some(0)));
    let sig = done.iter().find(|r| r.instance_id == "sig-0").unwrap();
    assert_eq!((sig.phase, sig.signal), (Phase::Failed, Some(9)), "{sig:?}");
}

#[tokio::test]
async fn shim_records_the_exit_of_an_unprivileged_instance() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("SKIPPED: not root, cannot switch users");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The shim runs as `nobody`: use a copy it can reach whatever the
    // permissions of the checkout's parents.
    let bin_dir = tempfile::tempdir().unwrap();
    let shim_copy = bin_dir.path().join("gpupool-agent");
    std::fs::copy(shim(), &shim_copy).unwrap();
    for p in [bin_dir.path(), dir.path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let rt = Runtime::new(dir.path())
        .unwrap()
        .with_shim(shim_copy)
        .with_user("nobody")
        .unwrap();
    rt.start(InstanceSpec {
        instance_id: "u-0".into(),
        command: vec!["sh".into(), "-c".into(), "exit 5".into()],
        world_size: 1,
        ..Default::default()
    });
    for _ in 0..100 {
        if rt.snapshot()[0].phase.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = rt.snapshot().remove(0);
    assert_eq!((r.phase, r.exit_code), (Phase::Failed, Some(5)), "{r:?}");
    let exit = std::fs::read_to_string(dir.path().join("instances/u-0.exit")).unwrap();
    assert_eq!(exit, "code 5");
}

#[tokio::test]
async fn the_environment_reaches_the_command_whole_and_never_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(dir.path()).unwrap().with_shim(shim());
    // One small environment (written at once) and one larger than a pipe's
    // buffer (written from a thread while the shim reads; one variable may
    // hold at most 128 KiB).
    let marker = "s3cr3t-marker-";
    let big = format!("{marker}{}", "x".repeat(100 * 1024));
    for (id, value) in [("small-0", format!("{marker}a b")), ("big-0", big.clone())] {
        let want = value.len();
        rt.start(InstanceSpec {
            instance_id: id.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "test ${{#SECRET}} -eq {want} && test \"$PLAIN\" = 'two words' && echo whole"
                ),
            ],
            env: [("SECRET", value.as_str()), ("PLAIN", "two words")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into_iter()
                .collect(),
            world_size: 1,
            ..Default::default()
        });
    }
    let done = ended(&rt, 2).await;
    for id in ["small-0", "big-0"] {
        let r = done.iter().find(|r| r.instance_id == id).expect("ended");
        let (log, _) = rt.read_log(id, 0, 4096).await.unwrap();
        assert_eq!(
            (r.phase, String::from_utf8_lossy(&log).trim()),
            (Phase::Succeeded, "whole"),
            "{r:?}"
        );
    }
    // Nothing under the state dir ever held the secret.
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if let Ok(bytes) = std::fs::read(&p) {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{} holds the environment",
                p.display()
            );
        }
    }
}

#[tokio::test]
async fn commands_get_dev_null_and_no_other_instances_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(dir.path()).unwrap().with_shim(shim());
    // Several at once, some with environments larger than a pipe's atomic
    // write, so their pipes are open in the agent while others spawn.
    let ids: Vec<String> = (0..6).map(|i| format!("fd-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        rt.start(InstanceSpec {
            instance_id: id.clone(),
            command: vec!["sleep".into(), "5".into()],
            env: [(
                "PAD".to_string(),
                "p".repeat(if i % 2 == 0 { 10 } else { 20_000 }),
            )]
            .into_iter()
            .collect(),
            world_size: 1,
            ..Default::default()
        });
    }
    for id in &ids {
        let mut command_pid = None;
        for _ in 0..100 {
            let shim = rt
                .snapshot()
                .into_iter()
                .find(|r| &r.instance_id == id)
                .map(|r| r.pid)
                .unwrap_or(0);
            let children = std::fs::read_to_string(format!("/proc/{shim}/task/{shim}/children"))
                .unwrap_or_default();
            // Once it is the command: between the shim's fork and its exec
            // the child still holds the shim's descriptors.
            if let Some(pid) = children.split_whitespace().next()
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            {
                command_pid = Some(pid.to_string());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = command_pid.unwrap_or_else(|| panic!("{id}'s command never ran"));
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        fds.sort();
        assert_eq!(
            fds,
            ["0", "1", "2"],
            "{id}'s command holds more descriptors"
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
            std::path::Path::new("/dev/null"),
            "{id}'s stdin"
        );
    }
    for id in &ids {
        rt.stop(id, Duration::from_millis(100), "test over");
    }
}

//! The house's shape, as issue 16 left it: the scheduler's modules import
//! in no circle (`domain` imports none of the others), and no function in
//! the scheduler's state machine, gRPC edge or the CLI runs past 120 lines.
//! Both checks are scripts under `scripts/` (Python 3, on every machine of
//! this project); this runs them with the suite.

use std::path::Path;
use std::process::Command;

use gpupool_e2e::in_ci;

fn run_script(script: &str, args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = match Command::new("python3")
        .arg(root.join("scripts").join(script))
        .args(args)
        .current_dir(&root)
        .output()
    {
        Ok(out) => out,
        Err(err) => {
            assert!(!in_ci(), "python3 is needed for {script}: {err}");
            eprintln!("SKIPPED: no python3 to run {script}: {err}");
            return;
        }
    };
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scheduler_s_modules_import_in_no_circle() {
    run_script("import-graph.py", &["scheduler/src"]);
}

#[test]
fn no_function_of_the_state_machine_the_api_or_the_cli_is_over_120_lines() {
    run_script(
        "long-functions.py",
        &[
            "--limit",
            "120",
            "scheduler/src/cluster",
            "scheduler/src/api",
            "scheduler/src/state",
            "cli/src",
        ],
    );
}

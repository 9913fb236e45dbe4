//! The web console in a real browser: a real `gpupool-scheduler dev`
//! (three nodes of fake H100s, and one more agent of fake A100s whose one
//! node tenant B takes, so that spec is sold out), two tenants made with
//! the CLI, then `tests/console/console.test.mjs` drives Debian's
//! chromium through Playwright (`playwright-core`, installed by `.ci/run`
//! with `npm ci` in `tests/console`). Its screenshots land in
//! `target/console-screenshots/` (README shows copies from `docs/console/`).
//! Under CI=true a missing node, chromium or playwright-core fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gpupool_e2e::*;

const ADMIN: &str = "console-test-admin-token-0123456789";

use gpupool_e2e::cli_ok_at as cli;

/// node, chromium and tests/console/node_modules/playwright-core, or None
/// (outside CI: the test is skipped, loudly).
fn browser_tools(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let node = require_tool("node", "nodejs")?;
    let chromium = require_tool("chromium", "chromium")?;
    if !dir.join("node_modules/playwright-core").is_dir() {
        assert!(
            !in_ci(),
            "playwright-core is required under CI=true: run `npm ci` in tests/console"
        );
        eprintln!(
            "SKIPPED CHECK: tests/console/node_modules has no playwright-core (run `npm ci` in tests/console); this check fails under CI=true"
        );
        return None;
    }
    Some((node, chromium))
}

/// Tenant `name` with a token and room for `nodes` dedicated nodes.
fn tenant(addr: &str, name: &str, nodes: u32) -> String {
    cli(addr, ADMIN, &["tenant", "create", name]);
    let gpus = (nodes * 8).to_string();
    let nodes = nodes.to_string();
    cli(
        addr,
        ADMIN,
        &[
            "tenant",
            "quota",
            name,
            "--max-nodes",
            &nodes,
            "--max-gpus",
            &gpus,
        ],
    );
    let out = cli(addr, ADMIN, &["tenant", "token", name]);
    out.lines()
        .map(str::trim)
        .find(|l| l.starts_with("gpt_"))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_string()
}

#[test]
fn console_in_a_real_browser() {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
    let Some((node, chromium)) = browser_tools(&scripts) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (grpc, console) = (free_port(), free_port());
    let addr = format!("http://127.0.0.1:{grpc}");
    let mut cmd = Command::new(bin("gpupool-scheduler"));
    cmd.arg("dev")
        .args(["--nodes", "3", "--fake-gpus", "8xH100-80GB"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--console-listen", &format!("127.0.0.1:{console}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--agent-metrics-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--admin-token", ADMIN]);
    let dev = Proc::spawn(cmd, dir.path().join("dev.log"));
    wait_until(Duration::from_secs(60), "dev's three nodes", || {
        dev.log_text().contains("gpupool dev cluster is up")
            && cli(&addr, ADMIN, &["node", "list"])
                .matches("Ready")
                .count()
                >= 3
    });
    assert!(
        dev.log_text()
            .contains(&format!("web console    : http://127.0.0.1:{console}/")),
        "the banner names the console:\n{}",
        dev.log_text()
    );

    // One more node, of another spec, as a separate agent.
    let join = std::fs::read_to_string(data.join("join-token")).unwrap();
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "scheduler_addr = \"{addr}\"\nnode_id = \"extra-a100\"\nstate_dir = \"{}\"\n\
             fake_gpus = \"4xA100-40GB\"\naz = \"AZ1\"\njoin_token = \"{}\"\nport_range = [40000, 40999]\n",
            dir.path().join("agent-extra").display(),
            join.trim()
        ),
    )
    .unwrap();
    let mut agent = Command::new(bin("gpupool-agent"));
    agent.arg("--config").arg(&agent_toml);
    let _agent = Proc::spawn(agent, dir.path().join("agent.log"));
    wait_until(Duration::from_secs(60), "the A100 node", || {
        cli(&addr, ADMIN, &["spec", "list"]).contains("A100")
    });
    let sold_out = cli(&addr, ADMIN, &["spec", "list"])
        .lines()
        .find(|l| l.contains("A100"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();

    let token_a = tenant(&addr, "alpha", 3);
    let token_b = tenant(&addr, "beta", 1);
    cli(
        &addr,
        &token_b,
        &[
            "pool",
            "create",
            "--type",
            "train",
            "--name",
            "beta-a100",
            "--spec",
            &sold_out,
            "--nodes",
            "1",
        ],
    );
    wait_until(Duration::from_secs(60), "the A100 spec sold out", || {
        cli(&addr, &token_a, &["spec", "list"])
            .lines()
            .any(|l| l.starts_with(&sold_out) && l.contains("sold out"))
    });

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    let out = Command::new(node)
        .arg(scripts.join("console.test.mjs"))
        .current_dir(&scripts)
        .env("CONSOLE_URL", format!("http://127.0.0.1:{console}"))
        .env("TOKEN_A", &token_a)
        .env("TOKEN_B", &token_b)
        .env("ADMIN_TOKEN", ADMIN)
        .env("SOLD_OUT_SPEC", &sold_out)
        .env("SHOTS_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success() && text.contains("all console checks passed"),
        "the browser test failed:\n{text}\n--- dev log:\n{}",
        dev.log_text()
    );
}

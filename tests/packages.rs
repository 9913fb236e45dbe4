//! The Debian packages (README, *Install on a node / on the control host*), built by
//! `cargo deb` from the binaries this test run built, installed with
//! `dpkg -i` on this machine: every file where the units expect it (the
//! installed units pass `systemd-analyze verify`), the user and directories
//! made, nothing enabled, the installed binaries run; an upgrade in place
//! keeps an edited config; `dpkg -r` leaves only the conffiles and
//! `dpkg -P` removes them.
//!
//! It installs packages system-wide, so it runs under `CI=true` (where it
//! must) or with `GPUPOOL_TEST_PACKAGES=1`, as root; otherwise it says it
//! skipped.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpupool_e2e::*;

const PACKAGES: [&str; 3] = ["gpupool-scheduler", "gpupool-agent", "gpupool-cli"];

/// Every file the packages install that the units, the snippets or the
/// README name.
const INSTALLED: [&str; 10] = [
    "/usr/bin/gpupool-scheduler",
    "/usr/bin/gpupool-agent",
    "/usr/bin/gpupool",
    "/usr/lib/systemd/system/gpupool-scheduler.service",
    "/usr/lib/systemd/system/gpupool-agent.service",
    "/usr/lib/sysusers.d/gpupool.conf",
    "/usr/lib/tmpfiles.d/gpupool-scheduler.conf",
    "/usr/lib/tmpfiles.d/gpupool-agent.conf",
    "/usr/share/doc/gpupool-scheduler/README.md",
    "/usr/share/doc/gpupool-agent/README.md",
];
const CONFFILES: [&str; 2] = ["/etc/gpupool/scheduler.toml", "/etc/gpupool/agent.toml"];

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn dpkg(args: &[&str]) -> String {
    let out = Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    ok(out, &format!("dpkg {}", args.join(" ")))
}

/// `dpkg-query`'s status and version of `package` ("" when unknown).
fn status(package: &str) -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status} ${Version}", package])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn cargo_deb() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/cargo-deb"));
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|p| p.join("cargo-deb"))
        .chain(home)
        .find(|p| p.is_file())
}

/// Purges the packages and what the test made, whatever happened.
struct Cleanup {
    made_state: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .arg("-P")
            .args(PACKAGES)
            .stdin(std::process::Stdio::null())
            .output();
        if self.made_state {
            let _ = std::fs::remove_dir_all("/var/lib/gpupool");
        }
        // Neither existed before the test (it checks).
        let _ = Command::new("userdel").arg("gpupool").output();
        let _ = Command::new("groupdel").arg("gpupool").output();
    }
}

/// Builds the three packages at Debian revision `revision` into `out`.
fn build(cargo_deb: &Path, revision: &str, out: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = bin_dir().parent().unwrap().to_path_buf();
    PACKAGES
        .iter()
        .map(|p| {
            let made = Command::new(cargo_deb)
                .current_dir(&root)
                .env("CARGO_TARGET_DIR", &target)
                // The binaries `cargo test` built (debug: stripped, still
                // the same programs); releases are `cargo deb -p NAME`.
                .args([
                    "-p",
                    p,
                    "--no-build",
                    "--profile",
                    "dev",
                    "--fast",
                    "--quiet",
                ])
                .args(["--deb-revision", revision, "-o"])
                .arg(out)
                .output()
                .unwrap();
            PathBuf::from(ok(made, &format!("cargo deb -p {p}")).trim())
        })
        .collect()
}

fn install(debs: &[PathBuf]) {
    let mut args = vec!["-i".to_string()];
    args.extend(debs.iter().map(|d| d.display().to_string()));
    dpkg(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn meta(path: &str) -> std::fs::Metadata {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn gid_of(group: &str) -> u32 {
    let out = ok(
        Command::new("getent")
            .args(["group", group])
            .output()
            .unwrap(),
        "getent group",
    );
    out.split(':').nth(2).unwrap().trim().parse().unwrap()
}

/// After the first install: the files, the user, the modes, the units.
fn installed_as_the_units_expect() {
    for path in INSTALLED.iter().chain(&CONFFILES) {
        assert!(Path::new(path).exists(), "{path} not installed");
    }
    let gpupool = gid_of("gpupool");
    let conf = meta("/etc/gpupool/scheduler.toml");
    assert_eq!((conf.gid(), conf.mode() & 0o777), (gpupool, 0o640));
    let overrides = ok(
        Command::new("dpkg-statoverride")
            .args(["--list", "/etc/gpupool/scheduler.toml"])
            .output()
            .unwrap(),
        "dpkg-statoverride --list",
    );
    assert_eq!(
        overrides.trim(),
        "root gpupool 640 /etc/gpupool/scheduler.toml"
    );
    let conf = meta("/etc/gpupool/agent.toml");
    assert_eq!((conf.uid(), conf.mode() & 0o777), (0, 0o600));
    let state = meta("/var/lib/gpupool/scheduler");
    assert_eq!((state.gid(), state.mode() & 0o777), (gpupool, 0o750));
    assert_eq!(meta("/var/lib/gpupool/agent").mode() & 0o777, 0o700);
    let verify = Command::new("systemd-analyze")
        .args(["verify"])
        .args(&INSTALLED[3..5])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify on the installed units:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    for bin in &INSTALLED[..3] {
        let said = ok(
            Command::new(bin).arg("--version").output().unwrap(),
            &format!("{bin} --version"),
        );
        assert!(said.contains(env!("CARGO_PKG_VERSION")), "{bin}: {said}");
    }
    // Nothing enabled or started by the install.
    for unit in ["gpupool-scheduler.service", "gpupool-agent.service"] {
        let wants = Path::new("/etc/systemd/system/multi-user.target.wants").join(unit);
        assert!(!wants.exists(), "{unit} was enabled by the install");
    }
}

#[test]
fn debian_packages_install_upgrade_and_purge_cleanly() {
    if !in_ci() && std::env::var("GPUPOOL_TEST_PACKAGES").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED CHECK: installs the .debs system-wide with dpkg; set GPUPOOL_TEST_PACKAGES=1 \
             (as root) to run it; it runs under CI=true"
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "dpkg -i needs root");
    for tool in ["dpkg", "dpkg-query", "systemd-analyze", "systemd-sysusers"] {
        require_tool(
            tool,
            if tool.starts_with("dpkg") {
                "dpkg"
            } else {
                "systemd"
            },
        )
        .unwrap_or_else(|| panic!("{tool} is needed"));
    }
    let cargo_deb = cargo_deb().expect("cargo-deb not found: cargo install cargo-deb --locked");
    // What the test installs and purges must not be here already (a real
    // install by package or by hand, which dpkg would take over and purge).
    for p in PACKAGES {
        assert!(
            !status(p).contains(" installed") && !status(p).contains("config-files"),
            "{p} is already installed here ({}); the test installs and purges its own",
            status(p)
        );
    }
    for path in INSTALLED.iter().chain(&CONFFILES).chain(&["/etc/gpupool"]) {
        assert!(
            !Path::new(path).exists(),
            "{path} exists here; the test installs and purges its own"
        );
    }
    let exists = |db: &str| {
        Command::new("getent")
            .args([db, "gpupool"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        !exists("passwd") && !exists("group"),
        "a user or group gpupool exists here; the test makes and removes its own"
    );
    let _cleanup = Cleanup {
        made_state: !Path::new("/var/lib/gpupool").exists(),
    };
    let dir = tempfile::tempdir().unwrap();
    let first = build(&cargo_deb, "1", &dir.path().join("1"));
    let second = build(&cargo_deb, "2", &dir.path().join("2"));
    let version = env!("CARGO_PKG_VERSION");

    install(&first);
    for p in PACKAGES {
        assert_eq!(status(p), format!("install ok installed {version}-1"));
    }
    installed_as_the_units_expect();

    // Upgrade in place: the edited configs stay as edited.
    let edit = "\n# edited by the operator\n";
    for conf in CONFFILES {
        let mut text = std::fs::read_to_string(conf).unwrap();
        text.push_str(edit);
        std::fs::write(conf, text).unwrap();
    }
    install(&second);
    for p in PACKAGES {
        assert_eq!(status(p), format!("install ok installed {version}-2"));
    }
    for conf in CONFFILES {
        assert!(
            std::fs::read_to_string(conf).unwrap().ends_with(edit),
            "{conf} lost its edit on upgrade"
        );
    }
    installed_as_the_units_expect();

    // Remove: everything but the conffiles goes.
    let mut args = vec!["-r"];
    args.extend(PACKAGES);
    dpkg(&args);
    for path in INSTALLED {
        assert!(!Path::new(path).exists(), "{path} left after dpkg -r");
    }
    for conf in CONFFILES {
        assert!(Path::new(conf).exists(), "{conf} removed by dpkg -r");
    }
    for p in &PACKAGES[..2] {
        assert!(
            status(p).starts_with("deinstall ok config-files"),
            "{p}: {}",
            status(p)
        );
    }
    // Purge: the conffiles and /etc/gpupool go too.
    args[0] = "-P";
    dpkg(&args);
    for conf in CONFFILES {
        assert!(!Path::new(conf).exists(), "{conf} left after dpkg -P");
    }
    assert!(
        !Path::new("/etc/gpupool").exists(),
        "/etc/gpupool left after dpkg -P"
    );
    let overrides = Command::new("dpkg-statoverride")
        .args(["--list", "/etc/gpupool/scheduler.toml"])
        .output()
        .unwrap();
    assert!(
        !overrides.status.success(),
        "the stat override outlived the purge"
    );
    for p in PACKAGES {
        let s = status(p);
        assert!(s.is_empty() || s.contains("not-installed"), "{p}: {s}");
    }
}

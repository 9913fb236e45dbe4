//! TLS end to end: a scheduler serving gRPC over TLS (rustls) with mutual
//! TLS required of agents, certificates from a throwaway CA. The CLI and
//! agents verify the scheduler; agents without a CA-signed client
//! certificate are turned away; plaintext and wrong CAs fail; no secret
//! reaches the logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gpupool_e2e::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate signed by `issuer`, written as NAME.pem / NAME.key.
fn leaf(
    dir: &Path,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn cli(addr: &str, ca: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("gpupool"))
        .args(args)
        .env("GPUPOOL_ADDR", addr)
        .env("GPUPOOL_TOKEN", ADMIN_TOKEN)
        .env("GPUPOOL_TLS_CA", ca)
        .output()
        .unwrap()
}

/// The web console with `[tls]`: HTTPS with the scheduler's certificate,
/// a `Secure` session cookie, and no plain HTTP on its port.
fn console_over_tls(port: u16, ca: &Path) {
    let Some(curl) = require_tool("curl", "curl") else {
        return;
    };
    let url = format!("https://127.0.0.1:{port}");
    let run = |args: &[&str]| {
        let out = Command::new(&curl).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cacert = ca.display().to_string();
    let page = run(&["-s", "--cacert", &cacert, &format!("{url}/login")]);
    assert!(page.contains("<h1>Sign in</h1>"), "{page}");
    let login = run(&[
        "-s",
        "-i",
        "--cacert",
        &cacert,
        "-d",
        &format!("token={ADMIN_TOKEN}"),
        &format!("{url}/login"),
    ]);
    let cookie = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {login}"));
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(cookie.contains("__Host-gpupool_console=gcs_"), "{cookie}");
    // A browser's form post over HTTP/2 (no Host header, `:authority`
    // instead) with its own origin is taken; another origin's is not.
    let origin = format!("Origin: https://127.0.0.1:{port}");
    let post = |origin: &str| {
        run(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            // A connection that fails under load (not an HTTP answer) is
            // tried again.
            "--retry",
            "3",
            "--retry-all-errors",
            "--http2",
            "--cacert",
            &cacert,
            "-H",
            origin,
            "-d",
            &format!("token={ADMIN_TOKEN}"),
            &format!("{url}/login"),
        ])
    };
    assert_eq!(post(&origin), "2 303");
    assert_eq!(post(&format!("Origin: http://127.0.0.1:{port}")), "2 403");
    let plain = run(&["-s", "-m", "5", &format!("http://127.0.0.1:{port}/login")]);
    assert!(!plain.contains("Sign in"), "plain HTTP answered: {plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_mutual_tls_for_agents() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let cluster_ca = ca("gpupool test CA");
    let ca_pem = pki.join("ca.pem");
    std::fs::write(&ca_pem, cluster_ca.pem()).unwrap();
    let rogue_ca = ca("someone else");
    let rogue_pem = pki.join("rogue-ca.pem");
    std::fs::write(&rogue_pem, rogue_ca.pem()).unwrap();
    let (server_cert, server_key) = leaf(
        &pki,
        &cluster_ca,
        "scheduler",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (agent_cert, agent_key) = leaf(
        &pki,
        &cluster_ca,
        "node-good",
        &["node-good"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (rogue_cert, rogue_key) = leaf(
        &pki,
        &rogue_ca,
        "node-rogue",
        &["node-rogue"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );

    let console_port = free_port();
    let mut sched = Scheduler::spawn_with_config(
        dir.path(),
        &format!(
            "console_listen = \"127.0.0.1:{console_port}\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\nrequire_agent_client_cert = true\n",
            server_cert.display(),
            server_key.display(),
            ca_pem.display()
        ),
    );
    let https = format!("https://127.0.0.1:{}", sched.grpc_port);
    // The CLI over TLS, verifying the scheduler against the cluster CA.
    eventually(Duration::from_secs(20), "scheduler serving TLS", || async {
        cli(&https, &ca_pem, &["node", "list"])
            .status
            .success()
            .then_some(())
    })
    .await;
    // Plaintext, or a CA that did not sign the scheduler: refused.
    let plain = Command::new(bin("gpupool"))
        .args(["node", "list"])
        .env(
            "GPUPOOL_ADDR",
            format!("http://127.0.0.1:{}", sched.grpc_port),
        )
        .env("GPUPOOL_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!plain.status.success());
    console_over_tls(console_port, &ca_pem);
    let wrong = cli(&https, &rogue_pem, &["node", "list"]);
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("cannot connect"), "{err}");

    // Agents: with a cluster-signed certificate it joins; without one it is
    // told why; with a rogue CA's it fails the handshake.
    let tls_agent = |node: &str, cert: Option<(&Path, &Path)>| {
        let mut extra = format!("tls_ca_file = \"{}\"\n", ca_pem.display());
        if let Some((c, k)) = cert {
            extra.push_str(&format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                c.display(),
                k.display()
            ));
        }
        Agent::start_at_with(dir.path(), &https, node, "1xH100-80GB", &extra)
    };
    let good = tls_agent("good", Some((&agent_cert, &agent_key)));
    let bare = tls_agent("bare", None);
    let rogue = tls_agent("rogue", Some((&rogue_cert, &rogue_key)));
    eventually(Duration::from_secs(20), "the good agent joins", || async {
        let out = cli(&https, &ca_pem, &["node", "list", "-o", "json"]);
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ids: Vec<&str> = nodes
            .as_array()?
            .iter()
            .filter_map(|n| n["node_id"].as_str())
            .collect();
        (ids == ["good"]).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the bare agent is told why",
        || async {
            bare.proc
                .log_text()
                .contains("must present a client certificate")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = cli(&https, &ca_pem, &["node", "list", "-o", "json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        nodes.as_array().unwrap().len(),
        1,
        "only the good agent: {nodes}"
    );
    assert!(!rogue.proc.log_text().contains("session established"));
    // A job runs through the TLS session.
    let out = cli(
        &https,
        &ca_pem,
        &[
            "job", "submit", "--cpu", "100m", "--memory", "64", "--", "true",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(20), "job succeeds over TLS", || async {
        let out = cli(&https, &ca_pem, &["job", "get", &job, "-o", "json"]);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (j["state"] == "Succeeded").then_some(())
    })
    .await;
    drop(good);

    // No secret in any log.
    sched.proc.kill();
    let key_text = std::fs::read_to_string(&server_key).unwrap();
    let key_line = key_text.lines().nth(1).unwrap();
    for log in [
        sched.proc.log_text(),
        bare.proc.log_text(),
        rogue.proc.log_text(),
    ] {
        for secret in [ADMIN_TOKEN, "test-join-token", key_line] {
            assert!(!log.contains(secret), "a secret reached a log");
        }
    }
}

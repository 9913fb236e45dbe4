//! A real registry for tests: Debian's `docker-registry` (distribution 2.8)
//! on a free 127.0.0.1 port with filesystem storage in a temp dir, and
//! images built here (a busybox-static rootfs, or any layers a test makes)
//! pushed to it over plain HTTP with oci-client.
//!
//! The API is synchronous (each push runs a small tokio runtime on a thread
//! of its own, so it may be called from inside another runtime too).
//! The agent's `image_pull` test includes this file with `#[path]`; it must
//! not use anything of the e2e harness.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// Where Debian's `docker-registry` package puts the registry.
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";

/// The registry binary: `GPUPOOL_DOCKER_REGISTRY`, else Debian's.
pub fn docker_registry() -> PathBuf {
    std::env::var_os("GPUPOOL_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DOCKER_REGISTRY))
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The busybox applets linked into `/bin` of [`busybox_rootfs`] images.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "id", "sleep", "ps", "kill", "touch", "mkdir", "wget", "env",
    "true", "false", "head", "tail", "dd", "yes", "grep", "seq", "stat", "readlink",
];

/// A running `docker-registry`; killed on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The registry's filesystem storage root.
    pub storage: PathBuf,
    /// Credentials pushes use (a registry started with auth).
    pub credentials: Option<(String, String)>,
    /// The CA that signed the registry's certificate (a registry started
    /// with TLS); pushes trust it.
    pub tls_ca: Option<PathBuf>,
    child: Child,
    _dir: TempDir,
}

/// The run configuration of a pushed busybox image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyboxConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl Default for BusyboxConfig {
    /// `cmd ["/bin/sh"]`, a PATH, everything else empty.
    fn default() -> Self {
        Self {
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: String::new(),
            user: String::new(),
        }
    }
}

/// One layer blob and its media type.
#[derive(Debug, Clone)]
pub struct Layer {
    pub data: Vec<u8>,
    pub media_type: String,
    /// sha256 of the uncompressed tar (`None` for layers that are not a tar).
    pub diff_id: Option<String>,
}

impl Layer {
    /// A gzip-compressed OCI layer of `tar`.
    pub fn gzip(tar: &[u8]) -> Self {
        Self {
            data: gzip(tar),
            media_type: OCI_LAYER_GZIP.into(),
            diff_id: Some(sha256_digest(tar)),
        }
    }
    /// An uncompressed OCI layer.
    pub fn tar(tar: &[u8]) -> Self {
        Self {
            data: tar.to_vec(),
            media_type: OCI_LAYER_TAR.into(),
            diff_id: Some(sha256_digest(tar)),
        }
    }
}

/// Which manifest schema a push writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    Oci,
    /// Docker v2 schema 2 (Docker media types for the config too).
    DockerV2,
}

impl Registry {
    /// Whether Debian's registry is installed here.
    pub fn available() -> bool {
        docker_registry().exists()
    }

    /// Starts a registry, or — when docker-registry is missing and `CI` is
    /// not `true` — prints a notice and returns `None` so the test can
    /// return. Under `CI=true` a missing registry fails the test.
    pub fn start_or_skip(test: &str) -> Option<Registry> {
        if !Self::available() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{DOCKER_REGISTRY} is missing and CI=true: install Debian's docker-registry"
                );
            }
            eprintln!("notice: {test} skipped: {DOCKER_REGISTRY} is not installed");
            return None;
        }
        Some(Self::start())
    }

    /// Starts Debian's docker-registry on a free 127.0.0.1 port with
    /// filesystem storage in a temp dir; returns once `GET /v2/` answers.
    pub fn start() -> Registry {
        Self::launch(None, None)
    }

    /// Like [`Registry::start`], serving HTTPS with `cert`/`key` (PEM files);
    /// `ca` is the PEM of the CA that signed `cert`, for pushes.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Registry {
        Self::launch(None, Some((cert, key, ca)))
    }

    /// Like [`Registry::start`], with htpasswd basic auth for one user.
    /// `bcrypt_hash` is the htpasswd hash of the password (`$2b$…`);
    /// `password` is kept for pushes.
    pub fn start_with_auth(user: &str, password: &str, bcrypt_hash: &str) -> Registry {
        Self::launch(Some((user, password, bcrypt_hash)), None)
    }

    fn launch(auth: Option<(&str, &str, &str)>, tls: Option<(&Path, &Path, &Path)>) -> Registry {
        // Pushes use rustls's process-wide provider.
        gpupool_proto::install_tls_provider();
        assert!(
            Self::available(),
            "{DOCKER_REGISTRY} is missing: install Debian's docker-registry package (apt-get install docker-registry)"
        );
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let auth_yml = match auth {
            Some((user, _, hash)) => {
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: gpupool-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let tls_yml = match tls {
            Some((cert, key, _)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: gpupool-test-secret\n{tls_yml}\
                 {auth_yml}",
                storage.display()
            ),
        )
        .unwrap();
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(docker_registry())
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {DOCKER_REGISTRY}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "docker-registry exited ({status}) before answering:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            // A TLS listener answers plain HTTP with 400.
            if let Some(code) = http_status(&addr, "/v2/")
                && (code == 200 || code == 401 || (tls.is_some() && code == 400))
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "docker-registry did not answer on {addr}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry {
            addr,
            storage,
            credentials: auth.map(|(u, p, _)| (u.to_string(), p.to_string())),
            tls_ca: tls.map(|(_, _, ca)| ca.to_path_buf()),
            child,
            _dir: dir,
        }
    }

    /// Stops the registry now (a later pull finds nothing listening).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `{addr}/{repo}:{tag}`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// Builds an image whose single layer is a busybox-static rootfs (see
    /// [`busybox_layer`]) with `config`, pushes it as `{addr}/{repo}:{tag}`
    /// and returns the manifest digest.
    pub fn push_busybox(&self, repo: &str, tag: &str, config: BusyboxConfig) -> String {
        let layer = Layer::gzip(&busybox_layer());
        let config = image_config(&config, &[layer.diff_id.clone().unwrap()]);
        self.push_image(repo, tag, &[layer], &config, ManifestFormat::Oci)
    }

    /// Pushes `layers` and the config blob `config`, then a manifest of
    /// `format` as `{addr}/{repo}:{tag}`; returns the manifest digest.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Layer],
        config: &[u8],
        format: ManifestFormat,
    ) -> String {
        let (manifest_type, config_type) = match format {
            ManifestFormat::Oci => (OCI_MANIFEST, OCI_CONFIG),
            ManifestFormat::DockerV2 => (DOCKER_MANIFEST, DOCKER_CONFIG),
        };
        let mut blobs: Vec<Vec<u8>> = layers.iter().map(|l| l.data.clone()).collect();
        blobs.push(config.to_vec());
        let layer_descriptors: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "mediaType": l.media_type,
                    "digest": sha256_digest(&l.data),
                    "size": l.data.len(),
                })
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "digest": sha256_digest(config),
                "size": config.len(),
            },
            "layers": layer_descriptors,
        }))
        .unwrap();
        self.push_raw(repo, tag, blobs, manifest, manifest_type)
    }

    /// Pushes an OCI index as `{addr}/{repo}:{tag}` whose entries are
    /// `(manifest digest, manifest size, os, architecture)` of manifests
    /// already in `repo`; returns the index digest.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(String, u64, &str, &str)],
    ) -> String {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(digest, size, os, arch)| {
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": size,
                    "platform": {"os": os, "architecture": arch},
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }))
        .unwrap();
        self.push_raw(repo, tag, Vec::new(), index, OCI_INDEX)
    }

    /// Pushes `blobs`, then `manifest` (of `media_type`) as `repo:tag`;
    /// returns the manifest's digest.
    pub fn push_raw(
        &self,
        repo: &str,
        tag: &str,
        blobs: Vec<Vec<u8>>,
        manifest: Vec<u8>,
        media_type: &str,
    ) -> String {
        let reference: Reference = self.reference(repo, tag).parse().unwrap();
        let auth = match &self.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let digest = sha256_digest(&manifest);
        let media_type = media_type.to_string();
        let (protocol, extra_root_certificates) = match &self.tls_ca {
            Some(ca) => (
                ClientProtocol::Https,
                vec![Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: std::fs::read(ca).unwrap(),
                }],
            ),
            None => (ClientProtocol::Http, Vec::new()),
        };
        run_async(async move {
            let client = Client::try_from(ClientConfig {
                protocol,
                extra_root_certificates,
                ..Default::default()
            })
            .expect("a push client");
            client
                .store_auth_if_needed(reference.resolve_registry(), &auth)
                .await;
            for blob in blobs {
                let d = sha256_digest(&blob);
                client
                    .push_blob(&reference, blob, &d)
                    .await
                    .unwrap_or_else(|e| panic!("push of blob {d} failed: {e}"));
            }
            client
                .push_manifest_raw(&reference, manifest, media_type.parse().unwrap())
                .await
                .unwrap_or_else(|e| panic!("push of manifest {reference} failed: {e}"));
        });
        digest
    }

    fn registry_root(&self) -> PathBuf {
        self.storage.join("docker/registry/v2")
    }

    /// The manifest digest `repo:tag` points to, read from the storage.
    pub fn tag_digest(&self, repo: &str, tag: &str) -> String {
        let link = self
            .registry_root()
            .join("repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link");
        std::fs::read_to_string(&link)
            .unwrap_or_else(|e| panic!("no tag {repo}:{tag} in the registry storage ({e})"))
            .trim()
            .to_string()
    }

    /// Where the registry keeps the bytes of blob `digest`.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.registry_root()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The first layer digest of the manifest `repo:tag`.
    pub fn layer_digest(&self, repo: &str, tag: &str) -> String {
        let manifest = std::fs::read(self.blob_data_path(&self.tag_digest(repo, tag))).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        manifest["layers"][0]["digest"]
            .as_str()
            .expect("a manifest with layers")
            .to_string()
    }

    /// Overwrites the stored bytes of the image's (first) layer blob, keeping
    /// its length, so the registry serves content that does not match its
    /// digest.
    pub fn tamper_layer(&self, repo: &str, tag: &str) {
        let digest = self.layer_digest(repo, tag);
        self.tamper_blob(&digest);
    }

    /// Flips bytes in the middle of blob `digest` in the storage.
    pub fn tamper_blob(&self, digest: &str) {
        let path = self.blob_data_path(digest);
        let mut data = std::fs::read(&path).unwrap();
        assert!(!data.is_empty(), "blob {digest} is empty");
        let mid = data.len() / 2;
        let end = (mid + 16).min(data.len());
        for b in &mut data[mid..end] {
            *b ^= 0xff;
        }
        std::fs::write(&path, data).unwrap();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `fut` to completion on a current-thread runtime of its own, on a
/// thread of its own (so callers may already be inside a runtime).
fn run_async<F: std::future::Future<Output = ()> + Send>(fut: F) {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status code of `GET path`, or `None` when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// gzip of `data` (deterministic: no timestamp in the header).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The `GOARCH` of this host.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image config blob for `config` with these layer diff_ids.
pub fn image_config(config: &BusyboxConfig, diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": config.entrypoint,
            "Cmd": config.cmd,
            "Env": config.env,
            "WorkingDir": config.working_dir,
            "User": config.user,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    }))
    .unwrap()
}

/// The busybox-static binary of this host.
pub fn busybox_binary() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("busybox is missing: install Debian's busybox-static package")
}

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

/// (path, mode) of the rootfs's directories.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("etc", 0o755),
    ("tmp", 0o1777),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("root", 0o700),
];

/// An uncompressed tar of a busybox-static rootfs: `/bin/busybox` and
/// [`APPLETS`] as symlinks to it, `/tmp` (1777), `/etc` with `passwd` and
/// `group`, `/proc`, `/sys`, `/dev`, `/root`. Owned by root; deterministic.
pub fn busybox_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    for (dir, mode) in DIRS {
        let mut h = header(tar::EntryType::Directory, *mode, 0);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())
            .unwrap();
    }
    let busybox = std::fs::read(busybox_binary()).unwrap();
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox.as_slice())
        .unwrap();
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    for (path, text) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
        b.append_data(&mut h, path, text.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// The same rootfs as [`busybox_layer`], as a plain directory `dir`
/// (created if missing; owners are left as they come).
pub fn busybox_rootfs(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    for (sub, mode) in DIRS {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    let bin = dir.join("bin/busybox");
    std::fs::copy(busybox_binary(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for applet in APPLETS {
        let link = dir.join("bin").join(applet);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("busybox", &link).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), PASSWD).unwrap();
    std::fs::write(dir.join("etc/group"), GROUP).unwrap();
}

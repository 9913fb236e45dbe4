//! Images: pulled from OCI registries, verified, unpacked into a cache.
//!
//! [`ImageStore::prepare`] turns a reference (`host:port/repo:tag` or
//! `repo@sha256:…`) into a flattened, read-only root filesystem directory
//! plus the image's run configuration. Registry access goes through
//! `oci-client`; everything that touches the disk is here:
//!
//! * every blob (manifest, config, layer) is hashed while it streams to a
//!   temp file and renamed into the content store only once its sha256
//!   matches the digest that named it; blobs in the store are trusted;
//! * layers are unpacked in order into one directory built under `tmp/`
//!   and renamed into place, so a crash never leaves a partial rootfs that
//!   looks complete. Whiteouts and opaque dirs are applied while flattening;
//!   entries that would write outside the rootfs (`..`, absolute names,
//!   parents that are symlinks leading out, hardlinks to outside) are
//!   refused, device nodes and fifos are skipped;
//! * owners are shifted into the node's id range for the container
//!   (`id_shift`), and the rootfs cache is keyed by (manifest digest, shift).
//!
//! On-disk layout under `root` (mode 0700, one store per root):
//!
//! ```text
//! blobs/sha256/<hex>              verified blobs (manifests, indexes, configs, layers), 0600
//! rootfs/<hex>-<shift base>/      one unpacked image (<hex> = platform manifest digest)
//!     rootfs/                     the flattened root filesystem (overlay lower dir)
//!     image.json                  ImageRecord: config, size, largest owner id
//!     last-used                   its mtime is the LRU clock
//! refs.json                       RefsRecord: reference -> platform manifest digest
//! tmp/                            downloads and unpacks in progress; emptied on start
//! ```
//!
//! What must not live here: policy about which images a tenant may use
//! (the scheduler decides), and container setup (the runtime mounts the
//! rootfs).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{self as media, OciDescriptor, OciImageIndex, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

/// How to reach one registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryOptions {
    /// Plain HTTP instead of HTTPS.
    #[serde(default)]
    pub insecure: bool,
    /// A PEM file of extra root certificates to trust for this registry
    /// (self-signed registries).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// When a tag is resolved against the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// A tag already resolved and unpacked here is used without contacting
    /// the registry.
    #[default]
    IfNotPresent,
    /// Every prepare of a tag asks the registry what it points to now
    /// (unchanged blobs are still not downloaded again).
    Always,
}

/// Configuration of an [`ImageStore`].
#[derive(Debug, Clone)]
pub struct ImageStoreConfig {
    /// Where blobs, unpacked rootfs dirs and refs live (e.g. STATE_DIR/images);
    /// created mode 0700.
    pub root: PathBuf,
    /// Per registry `host[:port]`; a registry not listed is reached over
    /// HTTPS with the system's roots.
    pub registries: BTreeMap<String, RegistryOptions>,
    /// Docker-style `auth.json` (`{"auths":{"host":{"auth":"base64(user:pass)"}}}`),
    /// read on every registry contact.
    pub auth_file: Option<PathBuf>,
    /// Cache budget in bytes for [`ImageStore::collect_garbage`]; 0 = unlimited.
    pub max_bytes: u64,
    /// When tags are resolved against the registry.
    pub pull_policy: PullPolicy,
}

impl ImageStoreConfig {
    /// Defaults: no registry options, anonymous, unlimited, IfNotPresent.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            registries: BTreeMap::new(),
            auth_file: None,
            max_bytes: 0,
            pull_policy: PullPolicy::default(),
        }
    }
}

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The reference as asked.
    pub reference: String,
    /// The platform image manifest's digest, `sha256:…`: pulling
    /// `repo@<digest>` gives exactly this image. (For an index, this is the
    /// digest of the entry chosen for this host, not of the index.)
    pub digest: String,
    /// The flattened root filesystem, for read-only use (overlay lower dir).
    pub rootfs: PathBuf,
    /// From the image config blob.
    pub config: ImageConfig,
    /// Bytes of blobs downloaded by this call; 0 when served from cache.
    pub pulled_bytes: u64,
}

/// The parts of an image config a runtime needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// Why an image could not be prepared. Display strings contain the phrases
/// `image not found`, `unauthorized`, `digest mismatch` and
/// `registry unreachable` for those causes; the source error, where there is
/// one, is left to the error chain.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// 404, MANIFEST_UNKNOWN, NAME_UNKNOWN, BLOB_UNKNOWN.
    #[error("image not found: {reference}")]
    NotFound { reference: String },
    /// An index without an entry for this host's platform.
    #[error("image not found for platform {platform}: the index of {reference} offers {offered}")]
    NoMatchingPlatform {
        reference: String,
        platform: String,
        offered: String,
    },
    /// 401, 403, UNAUTHORIZED, DENIED.
    #[error("unauthorized to pull {reference} from {registry}")]
    Unauthorized { reference: String, registry: String },
    /// Bytes that do not hash to the digest that names them.
    #[error("digest mismatch for {what}: expected {expected}, got {got}")]
    DigestMismatch {
        what: String,
        expected: String,
        got: String,
    },
    /// Connect, DNS, TLS or timeout failure.
    #[error("registry unreachable: {registry} ({reason})")]
    Unreachable {
        registry: String,
        reason: &'static str,
        #[source]
        source: OciDistributionError,
    },
    /// Any other answer from the registry (5xx, spec violations…).
    #[error("registry {registry} failed while pulling {reference}: {detail}")]
    Registry {
        registry: String,
        reference: String,
        detail: String,
    },
    #[error("download of {what} from {registry} was interrupted")]
    Interrupted {
        what: String,
        registry: String,
        #[source]
        source: io::Error,
    },
    #[error("unsupported media type {media_type} for {what}{note}")]
    UnsupportedMediaType {
        what: String,
        media_type: String,
        note: &'static str,
    },
    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },
    /// Path traversal, symlink escapes, bad hardlinks.
    #[error("refusing entry {path:?} in layer {layer}: {reason}")]
    UnsafeEntry {
        layer: String,
        path: String,
        reason: String,
    },
    /// An owner that does not fit the container's id range (refused, not clamped).
    #[error(
        "{path:?} in layer {layer} is owned by id {id}, outside the container's id range 0..{size}"
    )]
    IdOutOfRange {
        layer: String,
        path: String,
        id: u64,
        size: u32,
    },
    #[error("cannot unpack {path:?} from layer {layer}")]
    Unpack {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read registry auth file {path}: {reason}")]
    AuthFile { path: PathBuf, reason: String },
    #[error("cannot read CA file {path} for registry {registry}")]
    CaFile {
        registry: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up a client for registry {registry}")]
    Client {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("image store i/o error: {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> PullError {
    let context = context.into();
    move |source| PullError::Io { context, source }
}

/// Pulls, verifies, unpacks and caches images. Cheap to clone; usable from
/// several tasks at once (prepares of one reference or one digest are
/// serialized, so an image is pulled once).
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.config.root)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ImageStoreConfig,
    /// One client per registry (its TLS roots and scheme differ).
    clients: Mutex<HashMap<String, Client>>,
    /// Keyed async locks: `ref:<reference>`, `image:<hex>`, `blob:<hex>`.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Blobs and rootfs keys a prepare in flight is using; GC leaves them.
    pins: Mutex<HashMap<String, usize>>,
    /// Serializes refs.json updates, and cache hits against GC removals.
    index: Mutex<()>,
    seq: AtomicU64,
}

const LAYER_TAR: &[&str] = &[
    media::IMAGE_LAYER_MEDIA_TYPE,
    media::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    media::IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE,
];
const LAYER_GZIP: &[&str] = &[
    media::IMAGE_LAYER_GZIP_MEDIA_TYPE,
    media::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    media::IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
const CONFIG_TYPES: &[&str] = &[
    media::IMAGE_CONFIG_MEDIA_TYPE,
    media::IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
];
const MANIFEST_TYPES: &[&str] = &[
    media::OCI_IMAGE_MEDIA_TYPE,
    media::IMAGE_MANIFEST_MEDIA_TYPE,
];
const INDEX_TYPES: &[&str] = &[
    media::OCI_IMAGE_INDEX_MEDIA_TYPE,
    media::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];
const ACCEPT: &[&str] = &[
    media::OCI_IMAGE_MEDIA_TYPE,
    media::IMAGE_MANIFEST_MEDIA_TYPE,
    media::OCI_IMAGE_INDEX_MEDIA_TYPE,
    media::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// A sha256 digest, validated: only 64 lowercase hex digits ever become a
/// file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Sha256Digest(String);

impl Sha256Digest {
    fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("sha256", hex))
                if hex.len() == 64
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(Self(hex.to_string()))
            }
            Some(("sha256", _)) => Err(format!("{s:?} is not a sha256 digest")),
            Some((algo, _)) => Err(format!(
                "digest algorithm {algo} is not supported (only sha256)"
            )),
            None => Err(format!("{s:?} is not a digest")),
        }
    }
    fn of(bytes: &[u8]) -> Self {
        Self(hex(&Sha256::digest(bytes)))
    }
    fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The container's id mapping: container id 0 is host id `base`; ids
/// `>= size` are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdShift {
    base: u32,
    size: u32,
}

/// `image.json`: what a cached rootfs needs to be served without its blobs.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageRecord {
    version: u32,
    manifest_digest: String,
    shift_base: u32,
    /// Largest uid/gid found in the layers (before shifting).
    max_id: u64,
    size_bytes: u64,
    config: ConfigRecord,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigRecord {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    user: String,
}

impl From<&ConfigRecord> for ImageConfig {
    fn from(r: &ConfigRecord) -> Self {
        Self {
            entrypoint: r.entrypoint.clone(),
            cmd: r.cmd.clone(),
            env: r.env.clone(),
            working_dir: r.working_dir.clone(),
            user: r.user.clone(),
        }
    }
}

const IMAGE_RECORD_VERSION: u32 = 1;
const REFS_RECORD_VERSION: u32 = 1;

/// `refs.json`: reference (as `Reference::whole` spells it) -> platform
/// manifest digest.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefsRecord {
    version: u32,
    refs: BTreeMap<String, String>,
}

/// The image config blob, as far as it is read.
#[derive(Debug, Default, Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ConfigBlobRun>,
    #[serde(default)]
    rootfs: Option<ConfigBlobRootfs>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigBlobRun {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigBlobRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Where blobs come from when they are not in the store.
struct Remote {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    registry: String,
}

/// A manifest or index, parsed.
enum ManifestKind {
    Image(Box<OciImageManifest>),
    Index(OciImageIndex),
}

impl ImageStore {
    /// Opens (creating) the store at `config.root`, mode 0700, and removes
    /// leftovers of downloads and unpacks a previous run did not finish.
    pub fn new(config: ImageStoreConfig) -> io::Result<Self> {
        // Registry clients use rustls's process-wide provider.
        gpupool_proto::install_tls_provider();
        let root = &config.root;
        for dir in [
            root.clone(),
            root.join("blobs"),
            root.join("blobs/sha256"),
            root.join("rootfs"),
            root.join("tmp"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let path = entry?.path();
            if let Err(err) = remove_any(&path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove image store leftover");
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                clients: Mutex::default(),
                locks: Mutex::default(),
                pins: Mutex::default(),
                index: Mutex::default(),
                seq: AtomicU64::new(0),
            }),
        })
    }

    /// The store's configuration.
    pub fn config(&self) -> &ImageStoreConfig {
        &self.inner.config
    }

    /// Pulls (or finds in the cache) `reference` and returns its unpacked
    /// rootfs, with owners shifted by `id_shift` = (host id of container id
    /// 0, size of the range). Files owned by ids `>= size` are refused
    /// ([`PullError::IdOutOfRange`]), not clamped. `progress(done, total)` is
    /// called as blobs download (total = bytes still to download).
    /// A digest reference that is cached never contacts the registry,
    /// whatever the pull policy.
    pub async fn prepare(
        &self,
        reference: &str,
        id_shift: (u32, u32),
        progress: impl Fn(u64, u64) + Send + Sync,
    ) -> Result<Prepared, PullError> {
        let invalid = |reason: String| PullError::InvalidReference {
            reference: reference.to_string(),
            reason,
        };
        let parsed: Reference = reference.parse().map_err(|e| invalid(format!("{e}")))?;
        let pinned = parsed
            .digest()
            .map(Sha256Digest::parse)
            .transpose()
            .map_err(invalid)?;
        let shift = IdShift {
            base: id_shift.0,
            size: id_shift.1,
        };
        if u64::from(shift.base) + u64::from(shift.size) > 1 << 32 {
            return Err(invalid(format!(
                "id shift {}+{} does not fit in 32 bits",
                shift.base, shift.size
            )));
        }
        let canonical = parsed.whole();
        let _ref_lock = self.lock(format!("ref:{canonical}")).await;

        // What this host already knows, without the registry.
        let known = match (&pinned, self.inner.config.pull_policy) {
            (Some(pinned), _) => Some(self.resolved(&canonical).unwrap_or_else(|| pinned.clone())),
            (None, PullPolicy::IfNotPresent) => self.resolved(&canonical),
            (None, PullPolicy::Always) => None,
        };
        if let Some(digest) = known.and_then(|d| self.local_image_digest(d))
            && let Some(prepared) = self
                .assemble(reference, &digest, shift, None, &progress)
                .await?
        {
            tracing::debug!(reference, digest = %digest, "image served from the local store");
            return Ok(prepared);
        }

        let remote = self.remote(&parsed)?;
        let digest = self
            .fetch_manifest(&remote, reference, pinned.as_ref())
            .await?;
        let prepared = self
            .assemble(reference, &digest, shift, Some(&remote), &progress)
            .await?
            .ok_or_else(|| PullError::Io {
                context: format!("manifest blob {digest} vanished during the pull"),
                source: io::ErrorKind::NotFound.into(),
            })?;
        self.record_ref(&canonical, &digest)?;
        tracing::info!(
            reference,
            digest = %digest,
            pulled_bytes = prepared.pulled_bytes,
            "image prepared"
        );
        Ok(prepared)
    }

    /// Removes least-recently-used unpacked rootfs dirs and blobs until the
    /// store is within `max_bytes`, never a rootfs in `in_use` (paths as
    /// returned in [`Prepared::rootfs`]) nor anything a prepare in flight is
    /// using. Returns the bytes freed. Blocking (walks directories).
    pub fn collect_garbage(&self, in_use: &HashSet<PathBuf>) -> u64 {
        let max = self.inner.config.max_bytes;
        if max == 0 {
            return 0;
        }
        let _index = self.inner.index.lock().unwrap();
        let pins: HashSet<String> = self.inner.pins.lock().unwrap().keys().cloned().collect();
        enum Item {
            Rootfs(PathBuf),
            Blob(PathBuf),
        }
        let mut total = 0u64;
        let mut candidates: Vec<(SystemTime, u64, Item)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.rootfs_root()) {
            for entry in entries.flatten() {
                let dir = entry.path();
                let key = entry.file_name().to_string_lossy().into_owned();
                let size = read_record(&dir.join("image.json"))
                    .map(|r| r.size_bytes)
                    .unwrap_or(0);
                total += size;
                if in_use.contains(&dir.join("rootfs"))
                    || in_use.contains(&dir)
                    || pins.contains(&format!("image:{key}"))
                {
                    continue;
                }
                let used = mtime(&dir.join("last-used"))
                    .or_else(|| mtime(&dir))
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                candidates.push((used, size, Item::Rootfs(dir)));
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.blob_root()) {
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                total += meta.len();
                let hex = entry.file_name().to_string_lossy().into_owned();
                if pins.contains(&format!("blob:{hex}")) {
                    continue;
                }
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                candidates.push((used, meta.len(), Item::Blob(entry.path())));
            }
        }
        candidates.sort_by_key(|(used, _, _)| *used);
        let mut freed = 0u64;
        for (_, size, item) in candidates {
            if total <= max {
                break;
            }
            let removed = match &item {
                Item::Rootfs(dir) => {
                    // Out of sight first, so nobody finds a half-deleted rootfs.
                    let trash = self.tmp_path("trash");
                    std::fs::rename(dir, &trash).and_then(|()| std::fs::remove_dir_all(&trash))
                }
                Item::Blob(path) => std::fs::remove_file(path),
            };
            match removed {
                Ok(()) => {
                    total -= size.min(total);
                    freed += size;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "image garbage collection could not remove an entry")
                }
            }
        }
        if freed > 0 {
            tracing::info!(freed, remaining = total, "image cache garbage collected");
        }
        freed
    }

    // --- paths ---

    fn blob_root(&self) -> PathBuf {
        self.inner.config.root.join("blobs/sha256")
    }
    fn blob_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.blob_root().join(digest.hex())
    }
    fn rootfs_root(&self) -> PathBuf {
        self.inner.config.root.join("rootfs")
    }
    fn rootfs_key(digest: &Sha256Digest, shift: IdShift) -> String {
        format!("{}-{}", digest.hex(), shift.base)
    }
    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        self.inner
            .config
            .root
            .join("tmp")
            .join(format!("{what}-{}-{n}-{nanos}", std::process::id()))
    }

    // --- locks and pins ---

    async fn lock(&self, key: String) -> KeyLock {
        let mutex = self
            .inner
            .locks
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = mutex.lock_owned().await;
        KeyLock {
            inner: self.inner.clone(),
            key,
            guard: Some(guard),
        }
    }

    fn pin(&self, key: String) -> PinGuard {
        *self
            .inner
            .pins
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default() += 1;
        PinGuard {
            inner: self.inner.clone(),
            key,
        }
    }

    // --- refs ---

    fn refs_path(&self) -> PathBuf {
        self.inner.config.root.join("refs.json")
    }

    fn read_refs(&self) -> RefsRecord {
        match std::fs::read(self.refs_path()) {
            Ok(bytes) => match serde_json::from_slice::<RefsRecord>(&bytes) {
                Ok(r) if r.version == REFS_RECORD_VERSION => r,
                Ok(r) => {
                    tracing::warn!(
                        version = r.version,
                        "unknown refs.json version; ignoring it"
                    );
                    RefsRecord::default()
                }
                Err(err) => {
                    tracing::warn!(error = %err, "refs.json is unreadable; ignoring it");
                    RefsRecord::default()
                }
            },
            Err(_) => RefsRecord::default(),
        }
    }

    fn resolved(&self, canonical: &str) -> Option<Sha256Digest> {
        let _index = self.inner.index.lock().unwrap();
        let refs = self.read_refs();
        refs.refs
            .get(canonical)
            .and_then(|d| Sha256Digest::parse(d).ok())
    }

    fn record_ref(&self, canonical: &str, digest: &Sha256Digest) -> Result<(), PullError> {
        let _index = self.inner.index.lock().unwrap();
        let mut refs = self.read_refs();
        refs.version = REFS_RECORD_VERSION;
        refs.refs.insert(canonical.to_string(), digest.to_string());
        let bytes = serde_json::to_vec_pretty(&refs).expect("refs serialize");
        write_atomically(&self.tmp_path("refs"), &self.refs_path(), &bytes)
            .map_err(io_err("cannot write refs.json"))
    }

    // --- local assembly ---

    /// `digest`, or for a stored index the digest of its entry for this
    /// host (`None` when it has none).
    fn local_image_digest(&self, digest: Sha256Digest) -> Option<Sha256Digest> {
        let Ok(bytes) = std::fs::read(self.blob_path(&digest)) else {
            return Some(digest);
        };
        match parse_manifest(&bytes, "stored manifest") {
            Ok(ManifestKind::Index(index)) => {
                choose_platform(&index).and_then(|d| Sha256Digest::parse(&d).ok())
            }
            _ => Some(digest),
        }
    }

    /// Serves `digest` for `shift` from the rootfs cache, or unpacks it from
    /// blobs (downloading the missing ones from `remote`). `None` when
    /// something is missing and there is no remote.
    async fn assemble(
        &self,
        asked: &str,
        digest: &Sha256Digest,
        shift: IdShift,
        remote: Option<&Remote>,
        progress: &(impl Fn(u64, u64) + Send + Sync),
    ) -> Result<Option<Prepared>, PullError> {
        let _image_lock = self.lock(format!("image:{}", digest.hex())).await;
        let key = Self::rootfs_key(digest, shift);
        let _pin = self.pin(format!("image:{key}"));
        let _manifest_pin = self.pin(format!("blob:{}", digest.hex()));
        if let Some(prepared) = self.cached_rootfs(asked, digest, &key, shift)? {
            return Ok(Some(prepared));
        }
        let manifest_bytes = match std::fs::read(self.blob_path(digest)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("cannot read manifest blob {digest}"))(e)),
        };
        let manifest = match parse_manifest(&manifest_bytes, &format!("manifest {digest}"))? {
            ManifestKind::Image(m) => m,
            ManifestKind::Index(_) => {
                return Err(PullError::Malformed {
                    what: format!("manifest {digest}"),
                    reason: "an image index where an image manifest was expected".into(),
                });
            }
        };
        // Check everything before downloading anything.
        if !CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) {
            return Err(PullError::UnsupportedMediaType {
                what: format!("config of {asked}"),
                media_type: manifest.config.media_type.clone(),
                note: " (not a container image)",
            });
        }
        let config_digest = descriptor_digest(&manifest.config, "config")?;
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            let d = descriptor_digest(layer, "layer")?;
            let mt = layer.media_type.as_str();
            if !LAYER_TAR.contains(&mt) && !LAYER_GZIP.contains(&mt) {
                return Err(PullError::UnsupportedMediaType {
                    what: format!("layer {d}"),
                    media_type: layer.media_type.clone(),
                    note: if mt.ends_with("zstd") {
                        ": zstd-compressed layers are not supported (only gzip and uncompressed tar)"
                    } else {
                        ""
                    },
                });
            }
            layers.push((d, layer));
        }
        let mut needed = vec![(config_digest.clone(), &manifest.config)];
        needed.extend(layers.iter().map(|(d, l)| (d.clone(), *l)));
        let _blob_pins: Vec<PinGuard> = needed
            .iter()
            .map(|(d, _)| self.pin(format!("blob:{}", d.hex())))
            .collect();
        let missing: Vec<&(Sha256Digest, &OciDescriptor)> = needed
            .iter()
            .filter(|(d, _)| !self.blob_path(d).exists())
            .collect();
        let mut pulled = 0u64;
        if !missing.is_empty() {
            let Some(remote) = remote else {
                return Ok(None);
            };
            let total: u64 = missing
                .iter()
                .map(|(_, desc)| desc.size.max(0) as u64)
                .sum();
            progress(0, total);
            let done = AtomicU64::new(0);
            for (d, desc) in missing {
                let what = if *d == config_digest {
                    format!("config {d}")
                } else {
                    format!("layer {d}")
                };
                pulled += self
                    .download_blob(remote, d, desc, &what, &|n| {
                        let now = done.fetch_add(n, Ordering::Relaxed) + n;
                        progress(now, total.max(now));
                    })
                    .await?;
            }
        }
        for (d, _) in &needed {
            touch(&self.blob_path(d));
        }

        let config_bytes = std::fs::read(self.blob_path(&config_digest))
            .map_err(io_err(format!("cannot read config blob {config_digest}")))?;
        let config: ConfigBlob =
            serde_json::from_slice(&config_bytes).map_err(|e| PullError::Malformed {
                what: format!("config {config_digest}"),
                reason: e.to_string(),
            })?;
        let diff_ids = config
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.clone())
            .unwrap_or_default();
        if !diff_ids.is_empty() && diff_ids.len() != layers.len() {
            return Err(PullError::Malformed {
                what: format!("config {config_digest}"),
                reason: format!("{} diff_ids for {} layers", diff_ids.len(), layers.len()),
            });
        }
        let run = config.config.unwrap_or_default();
        let config_record = ConfigRecord {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.unwrap_or_default(),
            user: run.user.unwrap_or_default(),
        };

        let plan: Vec<LayerPlan> = layers
            .iter()
            .enumerate()
            .map(|(i, (d, _))| LayerPlan {
                digest: d.to_string(),
                blob: self.blob_path(d),
                diff_id: diff_ids.get(i).cloned(),
            })
            .collect();
        let build = self.tmp_path("rootfs");
        let target = self.rootfs_root().join(&key);
        let manifest_digest = digest.to_string();
        let build_dir = build.clone();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), PullError> {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&build_dir)
                .map_err(io_err("cannot create a rootfs build dir"))?;
            let rootfs = build_dir.join("rootfs");
            let report = unpack_layers(&rootfs, &plan, shift)?;
            let record = ImageRecord {
                version: IMAGE_RECORD_VERSION,
                manifest_digest,
                shift_base: shift.base,
                max_id: report.max_id,
                size_bytes: disk_usage(&rootfs),
                config: config_record,
            };
            let bytes = serde_json::to_vec_pretty(&record).expect("record serializes");
            std::fs::write(build_dir.join("image.json"), bytes)
                .map_err(io_err("cannot write image.json"))?;
            std::fs::write(build_dir.join("last-used"), b"")
                .map_err(io_err("cannot write last-used"))?;
            // The rename is the commit: a rootfs dir exists only complete.
            std::fs::rename(&build_dir, &target).map_err(io_err(format!(
                "cannot move rootfs into {}",
                target.display()
            )))
        })
        .await
        .map_err(|e| PullError::Io {
            context: "the unpack task failed".into(),
            source: io::Error::other(e.to_string()),
        })?;
        if let Err(err) = unpacked {
            let _ = remove_any(&build);
            return Err(err);
        }
        let mut prepared = self
            .cached_rootfs(asked, digest, &key, shift)?
            .ok_or_else(|| PullError::Io {
                context: format!("rootfs {key} vanished right after unpacking"),
                source: io::ErrorKind::NotFound.into(),
            })?;
        prepared.pulled_bytes = pulled;
        Ok(Some(prepared))
    }

    fn cached_rootfs(
        &self,
        asked: &str,
        digest: &Sha256Digest,
        key: &str,
        shift: IdShift,
    ) -> Result<Option<Prepared>, PullError> {
        let _index = self.inner.index.lock().unwrap();
        let dir = self.rootfs_root().join(key);
        if !dir.join("rootfs").is_dir() {
            return Ok(None);
        }
        let record = match read_record(&dir.join("image.json")) {
            Some(r) => r,
            None => {
                tracing::warn!(dir = %dir.display(), "cached rootfs has no readable image.json; unpacking again");
                let trash = self.tmp_path("trash");
                std::fs::rename(&dir, &trash)
                    .map_err(io_err("cannot set a broken rootfs aside"))?;
                let _ = std::fs::remove_dir_all(&trash);
                return Ok(None);
            }
        };
        if record.max_id >= u64::from(shift.size) {
            return Err(PullError::IdOutOfRange {
                layer: digest.to_string(),
                path: "(cached rootfs)".into(),
                id: record.max_id,
                size: shift.size,
            });
        }
        touch(&dir.join("last-used"));
        Ok(Some(Prepared {
            reference: asked.to_string(),
            digest: digest.to_string(),
            rootfs: dir.join("rootfs"),
            config: ImageConfig::from(&record.config),
            pulled_bytes: 0,
        }))
    }

    // --- registry ---

    fn remote(&self, reference: &Reference) -> Result<Remote, PullError> {
        let registry = reference.resolve_registry().to_string();
        let auth = self.auth(reference)?;
        // A client per registry and credentials: a changed auth.json takes
        // effect at the next pull.
        let who = match &auth {
            RegistryAuth::Anonymous => "anonymous".to_string(),
            RegistryAuth::Basic(user, pass) => {
                Sha256Digest::of(format!("basic\0{user}\0{pass}").as_bytes()).0
            }
            RegistryAuth::Bearer(token) => {
                Sha256Digest::of(format!("bearer\0{token}").as_bytes()).0
            }
        };
        let key = format!("{registry} {who}");
        let cached = self.inner.clients.lock().unwrap().get(&key).cloned();
        let client = match cached {
            Some(c) => c,
            None => {
                let c = self.new_client(reference)?;
                self.inner
                    .clients
                    .lock()
                    .unwrap()
                    .entry(key)
                    .or_insert(c)
                    .clone()
            }
        };
        Ok(Remote {
            client,
            auth,
            reference: reference.clone(),
            registry,
        })
    }

    fn registry_options(&self, reference: &Reference) -> RegistryOptions {
        let regs = &self.inner.config.registries;
        regs.get(reference.registry())
            .or_else(|| regs.get(reference.resolve_registry()))
            .cloned()
            .unwrap_or_default()
    }

    fn new_client(&self, reference: &Reference) -> Result<Client, PullError> {
        let registry = reference.resolve_registry().to_string();
        let options = self.registry_options(reference);
        let mut extra_root_certificates = Vec::new();
        if let Some(path) = &options.ca_file {
            let data = std::fs::read(path).map_err(|source| PullError::CaFile {
                registry: registry.clone(),
                path: path.clone(),
                source,
            })?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if options.insecure {
                ClientProtocol::HttpsExcept(vec![registry.clone()])
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            max_concurrent_download: 4,
            ..Default::default()
        };
        Client::try_from(config).map_err(|source| PullError::Client { registry, source })
    }

    fn auth(&self, reference: &Reference) -> Result<RegistryAuth, PullError> {
        let Some(path) = &self.inner.config.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        let bad = |reason: String| PullError::AuthFile {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{e}")))?;
        auth_from_file(&text, reference.registry(), reference.resolve_registry()).map_err(bad)
    }

    /// Fetches the manifest for `remote.reference`, following an index to
    /// this host's platform; stores the (verified) manifests as blobs and
    /// returns the platform manifest's digest.
    async fn fetch_manifest(
        &self,
        remote: &Remote,
        asked: &str,
        pinned: Option<&Sha256Digest>,
    ) -> Result<Sha256Digest, PullError> {
        let auth = &remote.auth;
        let (bytes, _) = remote
            .client
            .pull_manifest_raw(&remote.reference, auth, ACCEPT)
            .await
            .map_err(|e| map_oci(e, asked, &remote.registry, "manifest"))?;
        let got = Sha256Digest::of(&bytes);
        if let Some(pinned) = pinned
            && *pinned != got
        {
            return Err(PullError::DigestMismatch {
                what: format!("manifest of {asked}"),
                expected: pinned.to_string(),
                got: got.to_string(),
            });
        }
        self.store_blob(&got, &bytes)?;
        match parse_manifest(&bytes, &format!("manifest of {asked}"))? {
            ManifestKind::Image(_) => Ok(got),
            ManifestKind::Index(index) => {
                let chosen =
                    choose_platform(&index).ok_or_else(|| PullError::NoMatchingPlatform {
                        reference: asked.to_string(),
                        platform: host_platform(),
                        offered: offered_platforms(&index),
                    })?;
                let chosen =
                    Sha256Digest::parse(&chosen).map_err(|reason| PullError::Malformed {
                        what: format!("index of {asked}"),
                        reason,
                    })?;
                let child = remote.reference.clone_with_digest(chosen.to_string());
                let (bytes, _) = remote
                    .client
                    .pull_manifest_raw(&child, auth, ACCEPT)
                    .await
                    .map_err(|e| map_oci(e, asked, &remote.registry, "manifest"))?;
                let got = Sha256Digest::of(&bytes);
                if got != chosen {
                    return Err(PullError::DigestMismatch {
                        what: format!("platform manifest of {asked}"),
                        expected: chosen.to_string(),
                        got: got.to_string(),
                    });
                }
                match parse_manifest(&bytes, &format!("manifest {chosen}"))? {
                    ManifestKind::Image(_) => {
                        self.store_blob(&chosen, &bytes)?;
                        Ok(chosen)
                    }
                    ManifestKind::Index(_) => Err(PullError::Malformed {
                        what: format!("index of {asked}"),
                        reason: "its platform entry is another index".into(),
                    }),
                }
            }
        }
    }

    /// Stores bytes already verified to hash to `digest`.
    fn store_blob(&self, digest: &Sha256Digest, bytes: &[u8]) -> Result<(), PullError> {
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&self.tmp_path("blob"), &path, bytes)
            .map_err(io_err(format!("cannot store blob {digest}")))
    }

    /// Streams one blob into the store, hashing as it goes; renames it into
    /// place only when the hash matches. Returns the bytes downloaded.
    async fn download_blob(
        &self,
        remote: &Remote,
        digest: &Sha256Digest,
        desc: &OciDescriptor,
        what: &str,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, PullError> {
        let _blob_lock = self.lock(format!("blob:{}", digest.hex())).await;
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(0);
        }
        let tmp = self.tmp_path("blob");
        let result = self
            .download_to(remote, digest, desc, what, on_bytes, &tmp)
            .await;
        match result {
            Ok(n) => match tokio::fs::rename(&tmp, &path).await {
                Ok(()) => Ok(n),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(io_err(format!("cannot store blob {digest}"))(e))
                }
            },
            Err(err) => {
                let _ = std::fs::remove_file(&tmp);
                Err(err)
            }
        }
    }

    async fn download_to(
        &self,
        remote: &Remote,
        digest: &Sha256Digest,
        desc: &OciDescriptor,
        what: &str,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        tmp: &Path,
    ) -> Result<u64, PullError> {
        use tokio_stream::StreamExt as _;
        remote
            .client
            .store_auth_if_needed(&remote.registry, &remote.auth)
            .await;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .await
            .map_err(io_err(format!("cannot create {}", tmp.display())))?;
        let mut stream = remote
            .client
            .pull_blob_stream(&remote.reference, desc)
            .await
            .map_err(|e| map_oci(e, &remote.reference.whole(), &remote.registry, what))?;
        let limit = desc.size.max(0) as u64;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        let mut unreported = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // oci-client verifies too and says so at the end of the
                    // stream; report it in our words, with what we got.
                    if e.get_ref()
                        .is_some_and(|i| i.is::<oci_client::errors::DigestError>())
                    {
                        return Err(PullError::DigestMismatch {
                            what: what.to_string(),
                            expected: digest.to_string(),
                            got: format!("sha256:{}", hex(&hasher.finalize())),
                        });
                    }
                    return Err(PullError::Interrupted {
                        what: what.to_string(),
                        registry: remote.registry.clone(),
                        source: e,
                    });
                }
            };
            n += chunk.len() as u64;
            if n > limit {
                return Err(PullError::DigestMismatch {
                    what: what.to_string(),
                    expected: format!("{digest} ({limit} bytes)"),
                    got: format!("more than {limit} bytes"),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(io_err(format!("cannot write {}", tmp.display())))?;
            unreported += chunk.len() as u64;
            if unreported >= 256 * 1024 {
                on_bytes(unreported);
                unreported = 0;
            }
        }
        if unreported > 0 {
            on_bytes(unreported);
        }
        let got = format!("sha256:{}", hex(&hasher.finalize()));
        if got != digest.to_string() {
            return Err(PullError::DigestMismatch {
                what: what.to_string(),
                expected: digest.to_string(),
                got,
            });
        }
        file.sync_all()
            .await
            .map_err(io_err(format!("cannot sync {}", tmp.display())))?;
        Ok(n)
    }
}

struct KeyLock {
    inner: Arc<Inner>,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.inner.locks.lock().unwrap();
        if locks
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

struct PinGuard {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = self.inner.pins.lock().unwrap();
        if let Some(n) = pins.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

/// Maps an oci-client error to ours; `what` names the object being fetched.
fn map_oci(err: OciDistributionError, reference: &str, registry: &str, what: &str) -> PullError {
    let not_found = || PullError::NotFound {
        reference: reference.to_string(),
    };
    let unauthorized = || PullError::Unauthorized {
        reference: reference.to_string(),
        registry: registry.to_string(),
    };
    let other = |detail: String| PullError::Registry {
        registry: registry.to_string(),
        reference: reference.to_string(),
        detail,
    };
    match err {
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestBlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized()
            } else {
                other(envelope.to_string())
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        }
        | OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unauthorized(),
        OciDistributionError::ServerError { code, message, .. } => {
            let mut message = message;
            message.truncate(200);
            other(format!("HTTP {code}: {}", message.trim()))
        }
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => PullError::DigestMismatch {
            what: format!("{what} of {reference}"),
            expected,
            got: actual,
        },
        OciDistributionError::UnsupportedMediaTypeError(media_type) => {
            PullError::UnsupportedMediaType {
                what: format!("{what} of {reference}"),
                media_type,
                note: "",
            }
        }
        OciDistributionError::UnsupportedSchemaVersionError(v) => PullError::UnsupportedMediaType {
            what: format!("{what} of {reference}"),
            media_type: format!("schema version {v}"),
            note: " (only schema 2 manifests are supported)",
        },
        OciDistributionError::ManifestParsingError(reason)
        | OciDistributionError::VersionedParsingError(reason) => PullError::Malformed {
            what: format!("{what} of {reference}"),
            reason,
        },
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            let reason = classify_connect_failure(&e);
            PullError::Unreachable {
                registry: registry.to_string(),
                reason,
                source: OciDistributionError::RequestError(e),
            }
        }
        other_err => other(other_err.to_string()),
    }
}

/// A short, user-facing cause for a connect failure, from the error chain.
fn classify_connect_failure(err: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut text = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let (mut timed_out, mut refused, mut invalid_data) = (false, false, false);
    while let Some(e) = cur {
        text.push_str(&e.to_string().to_ascii_lowercase());
        text.push(' ');
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => refused = true,
                io::ErrorKind::TimedOut => timed_out = true,
                // rustls reports handshake failures as InvalidData.
                io::ErrorKind::InvalidData => invalid_data = true,
                _ => {}
            }
        }
        cur = e.source();
    }
    if refused || text.contains("connection refused") {
        "connection refused"
    } else if text.contains("dns") || text.contains("lookup") || text.contains("resolve") {
        "name resolution failed"
    } else if invalid_data
        || ["certificate", "tls", "handshake", "corrupt message"]
            .iter()
            .any(|w| text.contains(w))
    {
        "TLS handshake failed"
    } else if timed_out || text.contains("timed out") || text.contains("timeout") {
        "timed out"
    } else {
        "connection failed"
    }
}

fn descriptor_digest(desc: &OciDescriptor, what: &str) -> Result<Sha256Digest, PullError> {
    Sha256Digest::parse(&desc.digest).map_err(|reason| PullError::Malformed {
        what: format!("{what} descriptor"),
        reason,
    })
}

fn parse_manifest(bytes: &[u8], what: &str) -> Result<ManifestKind, PullError> {
    let malformed = |reason: String| PullError::Malformed {
        what: what.to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let media_type = value.get("mediaType").and_then(|m| m.as_str());
    let schema = value.get("schemaVersion").and_then(|v| v.as_i64());
    if schema != Some(2) {
        return Err(PullError::UnsupportedMediaType {
            what: what.to_string(),
            media_type: media_type
                .map(str::to_string)
                .unwrap_or_else(|| format!("schema version {}", schema.unwrap_or(0))),
            note: " (only schema 2 manifests are supported)",
        });
    }
    let is_index = match media_type {
        Some(mt) if INDEX_TYPES.contains(&mt) => true,
        Some(mt) if MANIFEST_TYPES.contains(&mt) => false,
        Some(mt) => {
            return Err(PullError::UnsupportedMediaType {
                what: what.to_string(),
                media_type: mt.to_string(),
                note: "",
            });
        }
        None => value.get("manifests").is_some(),
    };
    if is_index {
        serde_json::from_value(value)
            .map(ManifestKind::Index)
            .map_err(|e| malformed(e.to_string()))
    } else {
        serde_json::from_value(value)
            .map(|m| ManifestKind::Image(Box::new(m)))
            .map_err(|e| malformed(e.to_string()))
    }
}

/// `linux/<GOARCH of this host>`.
fn host_platform() -> String {
    format!("linux/{}", host_arch())
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn choose_platform(index: &OciImageIndex) -> Option<String> {
    let arch = host_arch();
    index
        .manifests
        .iter()
        .find(|entry| {
            entry
                .platform
                .as_ref()
                .is_some_and(|p| p.os.to_string() == "linux" && p.architecture.to_string() == arch)
        })
        .map(|entry| entry.digest.clone())
}

fn offered_platforms(index: &OciImageIndex) -> String {
    let offered: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    if offered.is_empty() {
        "no platforms".into()
    } else {
        offered.join(", ")
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Credentials for `registry` (as written, or as resolved: `docker.io` ->
/// `index.docker.io`) from a docker-style auth.json; anonymous when absent.
fn auth_from_file(text: &str, registry: &str, resolved: &str) -> Result<RegistryAuth, String> {
    let file: AuthFile = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let host_of = |key: &str| -> String {
        let key = key
            .strip_prefix("https://")
            .or_else(|| key.strip_prefix("http://"))
            .unwrap_or(key);
        key.split('/').next().unwrap_or(key).to_string()
    };
    let wanted = |host: &str| {
        host == registry
            || host == resolved
            || (registry == "docker.io"
                && (host == "index.docker.io" || host == "registry-1.docker.io"))
    };
    let Some((key, entry)) = file.auths.iter().find(|(k, _)| wanted(&host_of(k))) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(auth) = &entry.auth {
        let decoded = base64_decode(auth.trim())
            .ok_or_else(|| format!("the auth of {key:?} is not base64"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("the auth of {key:?} is not UTF-8"))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| format!("the auth of {key:?} is not user:password"))?;
        return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Err(format!(
            "the entry {key:?} has neither auth nor username and password"
        )),
    }
}

/// Standard base64 (padding optional).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for b in s.bytes().filter(|b| *b != b'=') {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// --- files ---

fn read_record(path: &Path) -> Option<ImageRecord> {
    let bytes = std::fs::read(path).ok()?;
    let record: ImageRecord = serde_json::from_slice(&bytes).ok()?;
    (record.version == IMAGE_RECORD_VERSION).then_some(record)
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::symlink_metadata(path).ok()?.modified().ok()
}

/// Sets `path`'s mtime to now (the LRU clock); best effort.
fn touch(path: &Path) {
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(err) = result {
        tracing::debug!(path = %path.display(), error = %err, "cannot record image use");
    }
}

fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Removes a file, symlink or whole directory (never following symlinks);
/// a missing path is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Bytes on disk under `root`, hardlinks counted once.
fn disk_usage(root: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

// --- unpacking ---

/// One layer to apply: its blob and, when the config lists it, the digest
/// of its uncompressed tar.
struct LayerPlan {
    digest: String,
    blob: PathBuf,
    diff_id: Option<String>,
}

#[derive(Debug, Default)]
struct UnpackReport {
    max_id: u64,
    skipped_devices: u64,
}

/// Unpacks `layers` in order into `rootfs` (which must not exist yet).
fn unpack_layers(
    rootfs: &Path,
    layers: &[LayerPlan],
    shift: IdShift,
) -> Result<UnpackReport, PullError> {
    let as_root = effective_uid() == 0;
    if !as_root {
        tracing::warn!(
            "the agent is not root: unpacked files keep its own owner, ids are not shifted"
        );
    }
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(rootfs)
        .map_err(io_err(format!("cannot create {}", rootfs.display())))?;
    let mut unpacker = Unpacker {
        root: rootfs.to_path_buf(),
        shift,
        as_root,
        layer: String::new(),
        written: HashSet::new(),
        dirs: Vec::new(),
        report: UnpackReport::default(),
    };
    unpacker.chown(rootfs, 0, 0, "./")?;
    for layer in layers {
        unpacker.layer.clone_from(&layer.digest);
        unpacker.written.clear();
        unpacker.apply_layer(layer)?;
    }
    if unpacker.report.skipped_devices > 0 {
        tracing::info!(
            skipped = unpacker.report.skipped_devices,
            "device and fifo entries in the image were skipped"
        );
    }
    Ok(unpacker.report)
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Hashes what passes through (the layer's diff_id).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A path component still to resolve: a name, or `..` from a symlink target.
enum Step {
    Name(OsString),
    Up,
}

struct Unpacker {
    root: PathBuf,
    shift: IdShift,
    as_root: bool,
    /// Digest of the layer being applied (for errors).
    layer: String,
    /// Real relative paths this layer wrote, with their ancestors: what an
    /// opaque dir or whiteout in this layer must not remove.
    written: HashSet<PathBuf>,
    /// Directories whose mode and mtime are set at the end of the layer (so
    /// a read-only dir does not block its own children).
    dirs: Vec<(PathBuf, u32, u64)>,
    report: UnpackReport,
}

impl Unpacker {
    fn apply_layer(&mut self, layer: &LayerPlan) -> Result<(), PullError> {
        let archive_err = |source: io::Error| PullError::Unpack {
            layer: layer.digest.clone(),
            path: "(archive)".into(),
            source,
        };
        let file = std::fs::File::open(&layer.blob).map_err(archive_err)?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let magic = reader.fill_buf().map_err(archive_err)?.to_vec();
        let decompressed: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(reader))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(PullError::UnsupportedMediaType {
                what: format!("layer {}", layer.digest),
                media_type: "zstd-compressed tar".into(),
                note: ": zstd-compressed layers are not supported (only gzip and uncompressed tar)",
            });
        } else {
            Box::new(reader)
        };
        let hashing = HashingReader {
            inner: decompressed,
            hasher: Sha256::new(),
        };
        let mut archive = tar::Archive::new(hashing);
        for entry in archive.entries().map_err(archive_err)? {
            let entry = entry.map_err(archive_err)?;
            self.apply_entry(entry)?;
        }
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(archive_err)?;
        self.finish_dirs()?;
        if let Some(expected) = &layer.diff_id {
            let got = format!("sha256:{}", hex(&rest.hasher.finalize()));
            if *expected != got {
                return Err(PullError::DigestMismatch {
                    what: format!("uncompressed layer {} (its diff_id)", layer.digest),
                    expected: expected.clone(),
                    got,
                });
            }
        }
        Ok(())
    }

    fn unsafe_entry(&self, path: &str, reason: impl Into<String>) -> PullError {
        PullError::UnsafeEntry {
            layer: self.layer.clone(),
            path: path.to_string(),
            reason: reason.into(),
        }
    }

    fn io(&self, path: &str) -> impl FnOnce(io::Error) -> PullError {
        let layer = self.layer.clone();
        let path = path.to_string();
        move |source| PullError::Unpack {
            layer,
            path,
            source,
        }
    }

    fn apply_entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), PullError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Char | T::Block | T::Fifo => {
                self.report.skipped_devices += 1;
                if self.report.skipped_devices == 1 {
                    tracing::info!(path = %shown, layer = %self.layer, "skipping a device or fifo entry (and any more in this image)");
                }
                return Ok(());
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(()),
            T::Regular | T::Continuous | T::GNUSparse | T::Directory | T::Symlink | T::Link => {}
            other => {
                tracing::debug!(path = %shown, kind = ?other, "skipping an unknown tar entry type");
                return Ok(());
            }
        }
        let comps = sanitize(Path::new(OsStr::from_bytes(&raw_path)))
            .map_err(|reason| self.unsafe_entry(&shown, reason))?;
        let header = entry.header();
        let old = header.as_old();
        let uid = numeric(&old.uid, header.uid()).map_err(self.io(&shown))?;
        let gid = numeric(&old.gid, header.gid()).map_err(self.io(&shown))?;
        for id in [uid, gid] {
            if id >= u64::from(self.shift.size) {
                return Err(PullError::IdOutOfRange {
                    layer: self.layer.clone(),
                    path: shown,
                    id,
                    size: self.shift.size,
                });
            }
        }
        self.report.max_id = self.report.max_id.max(uid).max(gid);
        let mode = numeric(&old.mode, header.mode().map(u64::from)).map_err(self.io(&shown))?
            as u32
            & 0o7777;
        let mtime = header.mtime().unwrap_or(0);

        let Some((name, parent)) = comps.split_last() else {
            // The archive's root ("./"): the rootfs dir itself.
            if kind == T::Directory {
                self.chown(&self.root.clone(), uid, gid, &shown)?;
                self.dirs.push((PathBuf::new(), mode, mtime));
            }
            return Ok(());
        };
        let name_bytes = name.as_bytes();
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            return self.whiteout(parent, hidden, &shown);
        }
        let dir = self
            .resolve_dir(parent, true, &shown)?
            .expect("created when missing");
        let rel = dir.join(name);
        let abs = self.root.join(&rel);
        self.mark_written(&rel);
        match kind {
            T::Directory => {
                match std::fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        std::fs::remove_file(&abs).map_err(self.io(&shown))?;
                        self.mkdir(&abs, &shown)?;
                    }
                    Err(_) => self.mkdir(&abs, &shown)?,
                }
                self.chown(&abs, uid, gid, &shown)?;
                self.dirs.push((rel, mode, mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                remove_any(&abs).map_err(self.io(&shown))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&abs)
                    .map_err(self.io(&shown))?;
                io::copy(&mut entry, &mut file).map_err(self.io(&shown))?;
                if self.as_root {
                    std::os::unix::fs::fchown(
                        &file,
                        Some(self.host_id(uid)),
                        Some(self.host_id(gid)),
                    )
                    .map_err(self.io(&shown))?;
                }
                // After chown, which clears setuid bits.
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(self.io(&shown))?;
                if mtime > 0 {
                    let _ = file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
                }
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.unsafe_entry(&shown, "a symlink without a target"))?;
                remove_any(&abs).map_err(self.io(&shown))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs)
                    .map_err(self.io(&shown))?;
                self.chown(&abs, uid, gid, &shown)?;
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| self.unsafe_entry(&shown, "a hardlink without a target"))?;
                let shown_target = String::from_utf8_lossy(&target).into_owned();
                let tcomps = sanitize(Path::new(OsStr::from_bytes(&target))).map_err(|reason| {
                    self.unsafe_entry(
                        &shown,
                        format!("hardlink target {shown_target:?}: {reason}"),
                    )
                })?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(self.unsafe_entry(&shown, "a hardlink to the root"));
                };
                let tdir = self.resolve_dir(tparent, false, &shown)?.ok_or_else(|| {
                    self.unsafe_entry(
                        &shown,
                        format!("hardlink target {shown_target:?} does not exist"),
                    )
                })?;
                let trel = tdir.join(tname);
                if trel == rel {
                    return Ok(());
                }
                let tabs = self.root.join(&trel);
                match std::fs::symlink_metadata(&tabs) {
                    Ok(m) if m.is_dir() => {
                        return Err(self.unsafe_entry(
                            &shown,
                            format!("hardlink target {shown_target:?} is a directory"),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(self.unsafe_entry(
                            &shown,
                            format!("hardlink target {shown_target:?} does not exist"),
                        ));
                    }
                }
                remove_any(&abs).map_err(self.io(&shown))?;
                // linkat without AT_SYMLINK_FOLLOW: a link to a symlink is a
                // link to the symlink itself.
                std::fs::hard_link(&tabs, &abs).map_err(self.io(&shown))?;
            }
            _ => unreachable!("filtered above"),
        }
        Ok(())
    }

    /// `.wh.NAME` removes NAME of lower layers; `.wh..wh..opq` empties the
    /// directory of lower-layer content.
    fn whiteout(
        &mut self,
        parent: &[OsString],
        hidden: &[u8],
        shown: &str,
    ) -> Result<(), PullError> {
        if hidden == b".wh..opq" {
            let dir = self
                .resolve_dir(parent, true, shown)?
                .expect("created when missing");
            self.mark_written(&dir);
            let abs = self.root.join(&dir);
            return self.purge(&abs, &dir).map_err(self.io(shown));
        }
        if hidden.starts_with(b".wh.") || hidden.is_empty() {
            // Other aufs metadata (.wh..wh.plnk, …): nothing to apply.
            return Ok(());
        }
        let hidden = OsStr::from_bytes(hidden);
        if hidden == "." || hidden == ".." || hidden.as_bytes().contains(&b'/') {
            return Err(self.unsafe_entry(shown, "a whiteout of . or .."));
        }
        let Some(dir) = self.resolve_dir(parent, false, shown)? else {
            return Ok(());
        };
        let rel = dir.join(hidden);
        if self.written.contains(&rel) {
            return Ok(());
        }
        remove_any(&self.root.join(&rel)).map_err(self.io(shown))
    }

    /// Removes from `abs` (real relative path `rel`) whatever this layer did
    /// not write.
    fn purge(&self, abs: &Path, rel: &Path) -> io::Result<()> {
        for child in std::fs::read_dir(abs)? {
            let child = child?;
            let name = child.file_name();
            let crel = rel.join(&name);
            let cabs = abs.join(&name);
            if self.written.contains(&crel) {
                if child.file_type()?.is_dir() {
                    self.purge(&cabs, &crel)?;
                }
            } else {
                remove_any(&cabs)?;
            }
        }
        Ok(())
    }

    fn mark_written(&mut self, rel: &Path) {
        for a in rel.ancestors() {
            if a.as_os_str().is_empty() || !self.written.insert(a.to_path_buf()) {
                break;
            }
        }
    }

    /// Resolves the directory `parent` inside the rootfs to its real
    /// relative path. Symlinks on the way are followed only when they are
    /// relative and stay inside; a missing directory is created (`create`)
    /// or ends the walk with `None`.
    fn resolve_dir(
        &self,
        parent: &[OsString],
        create: bool,
        shown: &str,
    ) -> Result<Option<PathBuf>, PullError> {
        let mut real: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<Step> = parent.iter().cloned().map(Step::Name).collect();
        let mut hops = 0;
        while let Some(step) = pending.pop_front() {
            let name = match step {
                Step::Up => {
                    if real.pop().is_none() {
                        return Err(self.unsafe_entry(
                            shown,
                            "it goes through a symlink that leads outside the rootfs",
                        ));
                    }
                    continue;
                }
                Step::Name(n) => n,
            };
            let rel: PathBuf = real.iter().chain(std::iter::once(&name)).collect();
            let abs = self.root.join(&rel);
            match std::fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => real.push(name),
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(self.unsafe_entry(shown, "too many levels of symlinks"));
                    }
                    let target = std::fs::read_link(&abs).map_err(self.io(shown))?;
                    if target.is_absolute() {
                        return Err(self.unsafe_entry(
                            shown,
                            format!(
                                "it goes through symlink {} -> {} that leads outside the rootfs",
                                rel.display(),
                                target.display()
                            ),
                        ));
                    }
                    let mut steps = Vec::new();
                    for c in target.components() {
                        match c {
                            Component::Normal(n) => steps.push(Step::Name(n.to_owned())),
                            Component::ParentDir => steps.push(Step::Up),
                            Component::CurDir => {}
                            Component::RootDir | Component::Prefix(_) => {
                                return Err(
                                    self.unsafe_entry(shown, "an absolute symlink on the way")
                                );
                            }
                        }
                    }
                    for s in steps.into_iter().rev() {
                        pending.push_front(s);
                    }
                }
                Ok(_) => {
                    return Err(self.unsafe_entry(
                        shown,
                        format!("its parent {} is not a directory", rel.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    self.mkdir(&abs, shown)?;
                    self.chown(&abs, 0, 0, shown)?;
                    real.push(name);
                }
                Err(e) => return Err(self.io(shown)(e)),
            }
        }
        Ok(Some(real.iter().collect()))
    }

    fn mkdir(&self, abs: &Path, shown: &str) -> Result<(), PullError> {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(abs)
            .map_err(self.io(shown))
    }

    fn host_id(&self, id: u64) -> u32 {
        // Checked against the range (which fits in 32 bits) before.
        self.shift.base + id as u32
    }

    fn chown(&self, abs: &Path, uid: u64, gid: u64, shown: &str) -> Result<(), PullError> {
        if !self.as_root {
            return Ok(());
        }
        std::os::unix::fs::lchown(abs, Some(self.host_id(uid)), Some(self.host_id(gid)))
            .map_err(self.io(shown))
    }

    fn finish_dirs(&mut self) -> Result<(), PullError> {
        // Deepest first, so a read-only parent is set last.
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(rel, _, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, mode, mtime) in dirs {
            let abs = self.root.join(&rel);
            let shown = rel.display().to_string();
            // A later entry of the layer may have made a parent a symlink
            // (`a/etc` then `a -> /`): chmod through it would reach the
            // host. Only a path of real directories inside the rootfs is
            // touched (nothing else writes here meanwhile: the build dir
            // is the agent's alone).
            if !no_symlink_on_the_way(&self.root, &rel) {
                continue;
            }
            match std::fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                _ => continue, // replaced later in the layer
            }
            std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode))
                .map_err(self.io(&shown))?;
            if mtime > 0
                && let Ok(dir) = std::fs::File::open(&abs)
            {
                let _ = dir.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime));
            }
        }
        Ok(())
    }
}

/// True when every component of `rel` below `root` is a real directory or
/// the last one (not a symlink).
fn no_symlink_on_the_way(root: &Path, rel: &Path) -> bool {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if !m.file_type().is_symlink() => {}
            _ => return false,
        }
    }
    true
}

/// A numeric header field: an empty one (all NULs or spaces) reads as 0,
/// as Go's archive/tar reads it.
fn numeric(field: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if field.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        Err(e) => Err(e),
    }
}

/// An entry name as components; refuses absolute names and `..`.
fn sanitize(path: &Path) -> Result<Vec<OsString>, &'static str> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in the path"),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::MetadataExt;

    /// A tar entry for tests; `name` is written raw (so `..` and absolute
    /// names can be built).
    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32),
        Owned(&'a str, &'a [u8], u64, u64),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn raw_header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let (mut h, data): (tar::Header, &[u8]) = match e {
                E::Dir(n, m) => (raw_header(n, tar::EntryType::Directory, 0, *m), b""),
                E::File(n, d, m) => (
                    raw_header(n, tar::EntryType::Regular, d.len() as u64, *m),
                    d,
                ),
                E::Owned(n, d, u, g) => {
                    let mut h = raw_header(n, tar::EntryType::Regular, d.len() as u64, 0o644);
                    h.set_uid(*u);
                    h.set_gid(*g);
                    (h, d)
                }
                E::Symlink(n, t) => {
                    let mut h = raw_header(n, tar::EntryType::Symlink, 0, 0o777);
                    h.set_link_name_literal(t).unwrap();
                    (h, b"")
                }
                E::Hardlink(n, t) => {
                    let mut h = raw_header(n, tar::EntryType::Link, 0, 0o644);
                    h.set_link_name_literal(t).unwrap();
                    (h, b"")
                }
                E::Fifo(n) => (raw_header(n, tar::EntryType::Fifo, 0, 0o644), b""),
            };
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    const SHIFT: IdShift = IdShift {
        base: 100_000,
        size: 65_536,
    };

    /// Unpacks layers (tars, gzipped when `gzip`) into `dir/rootfs`.
    fn unpack(dir: &Path, layers: &[Vec<u8>]) -> Result<PathBuf, PullError> {
        let plans: Vec<LayerPlan> = layers
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let blob = dir.join(format!("layer{i}"));
                let bytes = if i % 2 == 0 { gz(data) } else { data.clone() };
                std::fs::write(&blob, bytes).unwrap();
                LayerPlan {
                    digest: format!("layer{i}"),
                    blob,
                    diff_id: Some(format!("sha256:{}", hex(&Sha256::digest(data)))),
                }
            })
            .collect();
        let rootfs = dir.join("rootfs");
        unpack_layers(&rootfs, &plans, SHIFT).map(|_| rootfs)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn is_root() -> bool {
        effective_uid() == 0
    }

    #[test]
    fn files_dirs_links_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = unpack(
            dir.path(),
            &[tar(&[
                E::Dir("./", 0o755),
                E::Dir("./bin/", 0o755),
                E::File("./bin/tool", b"#!/bin/sh\n", 0o4755),
                E::Symlink("./bin/sh", "tool"),
                E::Hardlink("./bin/again", "bin/tool"),
                E::Owned("./home/user/file", b"x", 1000, 1001),
                E::Dir("./ro/", 0o555),
                E::File("./ro/inside", b"y", 0o444),
                E::Fifo("./fifo"),
            ])],
        )
        .unwrap();
        let tool = std::fs::metadata(rootfs.join("bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755);
        assert_eq!(
            std::fs::read_link(rootfs.join("bin/sh")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(
            std::fs::metadata(rootfs.join("bin/again")).unwrap().ino(),
            tool.ino()
        );
        assert!(!rootfs.join("fifo").exists());
        assert_eq!(
            std::fs::metadata(rootfs.join("ro")).unwrap().mode() & 0o777,
            0o555
        );
        if is_root() {
            let user = std::fs::metadata(rootfs.join("home/user/file")).unwrap();
            assert_eq!((user.uid(), user.gid()), (101_000, 101_001));
            assert_eq!((tool.uid(), tool.gid()), (100_000, 100_000));
            let implicit = std::fs::metadata(rootfs.join("home")).unwrap();
            assert_eq!(implicit.uid(), 100_000);
            let link = std::fs::symlink_metadata(rootfs.join("bin/sh")).unwrap();
            assert_eq!(link.uid(), 100_000);
        }
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_layers_only() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = unpack(
            dir.path(),
            &[
                tar(&[
                    E::File("etc/keep", b"1", 0o644),
                    E::File("etc/gone", b"1", 0o644),
                    E::Dir("etc/sub/", 0o755),
                    E::File("etc/sub/deep", b"1", 0o644),
                    E::File("opq/old", b"1", 0o644),
                    E::Dir("opq/olddir/", 0o755),
                    E::File("opq/olddir/x", b"1", 0o644),
                    E::File("opq/kept/lower", b"1", 0o644),
                ]),
                tar(&[
                    E::File(".wh.nothing-there", b"", 0o644),
                    E::File("etc/.wh.gone", b"", 0o644),
                    E::File("etc/.wh.sub", b"", 0o644),
                    // An entry of this layer before the opaque marker survives it.
                    E::File("opq/kept/new", b"2", 0o644),
                    E::File("opq/.wh..wh..opq", b"", 0o644),
                    E::File("opq/after", b"2", 0o644),
                ]),
            ],
        )
        .unwrap();
        assert_eq!(names(&rootfs.join("etc")), ["keep"]);
        assert_eq!(names(&rootfs.join("opq")), ["after", "kept"]);
        assert_eq!(names(&rootfs.join("opq/kept")), ["new"]);
    }

    #[test]
    fn later_layers_replace_types() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = unpack(
            dir.path(),
            &[
                tar(&[
                    E::Dir("a/", 0o755),
                    E::File("a/x", b"1", 0o644),
                    E::File("b", b"1", 0o644),
                ]),
                tar(&[E::File("a", b"file now", 0o644), E::Dir("b/", 0o700)]),
            ],
        )
        .unwrap();
        assert_eq!(std::fs::read(rootfs.join("a")).unwrap(), b"file now");
        assert!(rootfs.join("b").is_dir());
    }

    #[test]
    fn relative_symlinks_inside_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = unpack(
            dir.path(),
            &[
                tar(&[E::Dir("usr/lib/", 0o755), E::Symlink("lib", "usr/lib")]),
                tar(&[E::File("lib/libc.so", b"elf", 0o755)]),
            ],
        )
        .unwrap();
        assert_eq!(
            std::fs::read(rootfs.join("usr/lib/libc.so")).unwrap(),
            b"elf"
        );
        assert!(
            std::fs::symlink_metadata(rootfs.join("lib"))
                .unwrap()
                .is_symlink()
        );
    }

    /// A directory entry whose parent a later entry of the same layer turns
    /// into a link (`a/etc` 0777, then `a -> OUTSIDE`): its mode is set on
    /// nothing outside the rootfs (it was `chmod 0777 /etc` as root).
    #[test]
    fn a_later_link_does_not_redirect_a_directory_mode() {
        use std::os::unix::fs::PermissionsExt;
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("etc");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = outside.path().display().to_string();
        let dir = tempfile::tempdir().unwrap();
        let layers = vec![tar(&[
            E::Dir("a/", 0o755),
            E::Dir("a/etc/", 0o777),
            E::Symlink("a", &out),
        ])];
        let _ = unpack(dir.path(), &layers);
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "the host directory's mode was changed");
    }

    #[test]
    fn escapes_are_refused_and_touch_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"original").unwrap();
        let out = outside.path().display().to_string();
        let abs_victim = victim.display().to_string();
        let through_up = format!("d/up{abs_victim}");
        let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
            (
                vec![
                    tar(&[E::Symlink("evil", &out)]),
                    tar(&[E::File("evil/victim", b"pwned", 0o644)]),
                ],
                "leads outside the rootfs",
            ),
            (
                vec![tar(&[E::Symlink("evil", &out), E::Dir("evil/sub/", 0o755)])],
                "leads outside the rootfs",
            ),
            (vec![tar(&[E::File("../victim", b"pwned", 0o644)])], "`..`"),
            (
                vec![tar(&[E::File("a/../../victim", b"pwned", 0o644)])],
                "`..`",
            ),
            (
                vec![tar(&[E::File(&abs_victim, b"pwned", 0o644)])],
                "absolute",
            ),
            (
                vec![tar(&[
                    E::Dir("d/", 0o755),
                    E::Symlink("d/up", "../../../../../../../.."),
                    E::File(&through_up, b"pwned", 0o644),
                ])],
                "leads outside the rootfs",
            ),
            (vec![tar(&[E::Hardlink("h", &abs_victim)])], "absolute"),
            (vec![tar(&[E::Hardlink("h", "../victim")])], "`..`"),
            (
                vec![tar(&[
                    E::Symlink("s", "/etc"),
                    E::Hardlink("h", "s/passwd"),
                ])],
                "leads outside the rootfs",
            ),
            (vec![tar(&[E::File("d/.wh..", b"", 0o644)])], "whiteout"),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (layers, needle)) in cases.into_iter().enumerate() {
            let d = dir.path().join(format!("case{i}"));
            std::fs::create_dir_all(&d).unwrap();
            match unpack(&d, &layers) {
                Err(err @ PullError::UnsafeEntry { .. }) => {
                    assert!(err.to_string().contains(needle), "case {i}: {err}")
                }
                other => panic!("case {i}: expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"original");
        assert_eq!(names(outside.path()), ["victim"]);
    }

    #[test]
    fn owners_outside_the_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let result = unpack(dir.path(), &[tar(&[E::Owned("f", b"x", 70_000, 0)])]);
        match result {
            Err(err @ PullError::IdOutOfRange { id: 70_000, .. }) => {
                assert!(err.to_string().contains("outside the container's id range"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn diff_id_mismatch_is_a_digest_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("l");
        std::fs::write(&blob, tar(&[E::File("f", b"x", 0o644)])).unwrap();
        let plan = LayerPlan {
            digest: "sha256:layer".into(),
            blob,
            diff_id: Some(format!("sha256:{}", "0".repeat(64))),
        };
        let err = unpack_layers(&dir.path().join("rootfs"), &[plan], SHIFT).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");
    }

    #[test]
    fn zstd_layers_are_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("l");
        std::fs::write(&blob, [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]).unwrap();
        let plan = LayerPlan {
            digest: "sha256:layer".into(),
            blob,
            diff_id: None,
        };
        let err = unpack_layers(&dir.path().join("rootfs"), &[plan], SHIFT).unwrap_err();
        assert!(err.to_string().contains("zstd"), "{err}");
    }

    #[test]
    fn digests_are_validated_before_becoming_paths() {
        assert!(Sha256Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(128)),
            "a".repeat(64),
        ] {
            assert!(Sha256Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn auth_file_entries() {
        // "user:pa:ss" in base64.
        let text = r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "other.example":{"username":"u","password":"p"}}}"#;
        match auth_from_file(text, "reg.example:5000", "reg.example:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("user", "pa:ss")),
            _ => panic!("expected basic auth"),
        }
        assert!(matches!(
            auth_from_file(text, "other.example", "other.example").unwrap(),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            auth_from_file(text, "nobody.example", "nobody.example").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(auth_from_file("{", "x", "x").is_err());
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
    }

    #[test]
    fn manifests_are_classified_by_media_type() {
        let image = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(matches!(
            parse_manifest(image, "m").unwrap(),
            ManifestKind::Image(_)
        ));
        let index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:00","size":1,"platform":{"os":"linux","architecture":"arm64"}}]}"#;
        let ManifestKind::Index(idx) = parse_manifest(index, "m").unwrap() else {
            panic!("expected an index")
        };
        assert_eq!(offered_platforms(&idx), "linux/arm64");
        let schema1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(matches!(
            parse_manifest(schema1, "m"),
            Err(PullError::UnsupportedMediaType { .. })
        ));
    }
}

//! Configuration: every tunable of the daemon and CLI, with its default as a named const.
//!
//! [`Config`] is the resolved configuration (what the rest of the crate reads); it deserialises
//! from TOML with unknown keys rejected. [`ConfigArgs`] holds the command-line flags and
//! `WASMCACHE_*` environment variables that override it. This is the only module that reads the
//! process environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod args;
mod peers;
mod signatures;
pub use args::ConfigArgs;
pub use peers::*;
pub use signatures::*;

/// Largest manifest or config document accepted from a registry (4 MiB, as containerd).
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest module accepted (256 MiB, as Istio's agent).
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 256 << 20;
/// Most bytes read out of one tar or tar+gzip layer, decompressed (stops gzip bombs).
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 512 << 20;
/// Most layers in a manifest, or entries in an image index.
pub const DEFAULT_MAX_LAYERS: usize = 64;
/// Most entries read from one tar layer while looking for the module.
pub const DEFAULT_MAX_TAR_ENTRIES: usize = 10_000;
/// Longest reference accepted from a client.
pub const DEFAULT_MAX_REFERENCE_BYTES: usize = 1024;
/// Largest request body (HTTP) or message (gRPC) accepted from a client.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 << 10;
/// Most different references one client may be fetching at once.
pub const DEFAULT_MAX_FETCHES_PER_CLIENT: usize = 64;
/// Default most references queued or running in prefetches started through the APIs.
pub const DEFAULT_MAX_PREFETCH_QUEUE: usize = 10_000;
/// Default most of them one client may have queued or running.
pub const DEFAULT_MAX_PREFETCH_PER_CLIENT: usize = 2_000;
/// Default bytes that manifests and other documents being read may hold at once, across every
/// registry, mirror and peer.
pub const DEFAULT_MAX_MANIFEST_BYTES_IN_FLIGHT: u64 = 16 << 20;
/// Time allowed to open a connection to a registry.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a registry may stay silent while a response is read.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a whole fetch may take at the registry: probe, token, manifest and blob.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a caller waits for a tag's re-resolution before it gets the last known module.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(3);
/// How long a resolved tag is trusted under the `IF_NOT_PRESENT` pull policy.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
/// Downloads running at once (others queue).
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: usize = 8;
/// Mode of the unix socket: owner and group may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Send buffer asked for on each unix socket connection, so a large module leaves in few
/// round trips between the daemon and its reader.
pub const DEFAULT_SOCKET_SEND_BUFFER_BYTES: usize = 4 << 20;
/// Time a client has to send a request's headers (the first request's from when it
/// connects, on HTTP/1 each later one's from the previous answer).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client connection whose writes make no progress this long (the client stopped
/// reading), or an HTTP/2 client that does not answer a ping this long, is dropped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most client connections open at once on each listener; more wait to be accepted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Threads that run the daemon's async side (accepting, parsing and answering requests,
/// registry I/O); 0 is one per CPU. Hashing, decompressing, writing and the index run on a
/// separate pool of blocking threads that grows on demand, so one is enough for a node:
/// it is what a pod with the DaemonSet's CPU limit gets anyway, and on two cores it answered
/// warm hits with lower latency than two threads at every load measured (BENCHMARKS.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// Most async threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 512;
/// File name of the socket inside the data dir when no socket path is configured.
pub const DEFAULT_SOCKET_NAME: &str = "wasmcache.sock";
/// How long requests in flight may run after a shutdown signal (below Kubernetes' default
/// `terminationGracePeriodSeconds` of 30 s).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Address of the solo.io `wasme cache` compatible listener when `wasme_compat` is on.
pub const DEFAULT_WASME_LISTEN: &str = "127.0.0.1:9979";
/// Whether the OCI view pulls what it does not have from upstream.
pub const DEFAULT_OCI_FETCH_THROUGH: bool = true;
/// Prefetches running at once: each lane resolves its reference, then waits for a download
/// permit of the prefetches' share, so lanes beyond the share overlap their manifests'
/// round trips with other lanes' downloads.
pub const DEFAULT_PREFETCH_CONCURRENCY: usize = 8;
/// Share of `max_concurrent_downloads` that downloads started by prefetches may hold at once
/// (rounded down, at least one); the rest are kept for on-demand fetches.
pub const DEFAULT_PREFETCH_DOWNLOAD_SHARE: f64 = 0.5;
/// Retries of a prefetch after a transient registry error.
pub const DEFAULT_PREFETCH_RETRIES: u32 = 3;
/// How often listed and pinned tags are re-resolved.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Whether readiness waits for the first attempt at the prefetch lists.
pub const DEFAULT_READY_AFTER_PREFETCH: bool = true;
/// Most bytes of modules the cache may hold (10 GiB).
pub const DEFAULT_MAX_CACHE_BYTES: u64 = 10 << 30;
/// Fraction of the budget past which eviction starts.
pub const DEFAULT_HIGH_WATERMARK: f64 = 0.9;
/// Fraction of the budget eviction brings usage under.
pub const DEFAULT_LOW_WATERMARK: f64 = 0.8;
/// Modules unused this long are evicted (Istio's agent uses 24 h).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Modules handed out by path this recently are never evicted: a proxy may open the file
/// after the reply.
pub const DEFAULT_PATH_GRACE: Duration = Duration::from_secs(10 * 60);
/// Longest lease a client may ask for.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// How often the daemon runs eviction and saves access times.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(60);
/// Whether modules are fully validated with wasmparser before they are stored.
pub const DEFAULT_VALIDATE_WASM: bool = true;
/// Addresses no outbound connection may go to: the link-local ranges (where AWS, GCP, Azure
/// and others serve instance metadata) and the metadata services outside them (Alibaba
/// Cloud's, and AWS's IPv6 one in its reserved `fd00:ec2::/32`), as Istio's default for
/// `BLOCKED_CIDRS_IN_WASM_FETCH`.
pub const DEFAULT_BLOCKED_CIDRS: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "100.100.100.200/32",
    "fd00:ec2::/32",
];
/// Directory name used under the user's cache directory when no data dir is configured.
const DATA_DIR_NAME: &str = "wasmcache";

/// The resolved configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the blobs and the index.
    pub data_dir: PathBuf,
    /// Registries (`host:port`) spoken to over plain HTTP instead of HTTPS.
    pub insecure_registries: Vec<String>,
    /// Docker `config.json` holding registry credentials.
    pub registry_auth_file: Option<PathBuf>,
    /// More Docker config files (e.g. several mounted `dockerconfigjson` Secrets), merged after
    /// `registry_auth_file`; later files win for a registry named twice. All are watched.
    pub registry_auth_files: Vec<PathBuf>,
    /// Extra PEM CA bundle trusted for registry TLS, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Time allowed to open a connection to a registry.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Longest a registry may stay silent while a response is read.
    #[serde(with = "duration")]
    pub read_timeout: Duration,
    /// Longest a whole fetch may take at the registry (challenge probe, token, manifest and
    /// blob); past it the fetch fails with the registry named, or the last known module of a
    /// tag is served.
    #[serde(with = "duration")]
    pub fetch_timeout: Duration,
    /// When a cached tag must be re-resolved (`ALWAYS`, or `tag_ttl` passed) and the
    /// registry has not answered within this long, the last known module is answered
    /// (`stale`) and the resolution goes on in the background.
    #[serde(with = "duration")]
    pub stale_after: Duration,
    /// Validate each module fully with wasmparser (the magic number is always checked).
    pub validate_wasm: bool,
    /// Refuse modules that export no proxy-wasm ABI (`proxy_abi_version_*`), which Envoy
    /// could not load as a filter.
    pub require_proxy_wasm: bool,
    /// How long a resolved tag is trusted under `IF_NOT_PRESENT` before it is re-resolved.
    #[serde(with = "duration")]
    pub tag_ttl: Duration,
    /// Downloads running at once; more wait their turn.
    pub max_concurrent_downloads: usize,
    /// The daemon's unix socket (default `<data_dir>/wasmcache.sock`).
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket, as an octal string (`"0660"`).
    #[serde(with = "octal")]
    pub socket_mode: u32,
    /// Group (numeric gid) the socket is handed to; default: the daemon's own group. The
    /// daemon must be a member of it (or root).
    pub socket_group: Option<u32>,
    /// Send buffer (`SO_SNDBUF`) asked for on each unix socket connection; 0 keeps the
    /// kernel's default. The kernel caps it at `net.core.wmem_max`. A bigger buffer means fewer
    /// round trips between the daemon and the reader of a large module.
    pub socket_send_buffer_bytes: usize,
    /// Time a client has to send a request's headers: the first request's from when it
    /// connects, on HTTP/1 each later one's from the previous answer. A client that sends
    /// nothing, or half a request, is dropped after it.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A client connection whose writes make no progress this long (the client stopped
    /// reading), or an HTTP/2 client that does not answer a keep-alive ping within it (the
    /// ping is sent after this long without frames), is dropped.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Threads for the async side, 1 by default; 0 means one per CPU the process may run on
    /// (for a pod, as its CPU limit allows). Downloads' hashing, decompression and disk writes
    /// do not run on these threads. One thread answers over 30,000 warm hits a second on two
    /// cores, with less CPU per hit and lower tail latency than two (no wake-ups and shared
    /// cache lines between threads per request); raise it only if the daemon's one thread is
    /// seen saturated.
    pub worker_threads: usize,
    /// Optional TCP address for gRPC and HTTP (e.g. `127.0.0.1:9977`); off by default.
    pub grpc_listen: Option<std::net::SocketAddr>,
    /// Optional TCP address for HTTP (and gRPC) for `hostPort`/`hostNetwork` use.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Serve solo.io `wasme cache` compatible `GET /<sha256>` and `GET /<image-ref>`.
    pub wasme_compat: bool,
    /// Address of the `wasme cache` compatible listener.
    pub wasme_listen: std::net::SocketAddr,
    /// Whether the OCI view fetches what it does not have from upstream.
    pub oci_fetch_through: bool,
    /// Short names for registries in the OCI view: `/v2/<alias>/<repository>`.
    pub registry_aliases: std::collections::BTreeMap<String, RegistryAlias>,
    /// Registry for OCI view paths that name none (`/v2/<repository>` without `ns`).
    pub default_upstream: Option<String>,
    /// Registries that may be pulled from (`host[:port]`, `*.example.com`, `*`); empty = all.
    pub allowed_registries: Vec<String>,
    /// Registries that may never be pulled from; wins over `allowed_registries`.
    pub blocked_registries: Vec<String>,
    /// Addresses no outbound connection may go to (CIDRs, or single addresses), checked on the
    /// address actually connected to, after DNS and at every redirect: token realms, the
    /// registries' challenge probes, mirrors with headers and peers. Default: the link-local
    /// ranges and the cloud metadata addresses; empty: no address is refused.
    pub blocked_cidrs: Vec<String>,
    /// Token realm hosts (`host[:port]`) on another host than the registry that may receive
    /// the registry's credentials, by registry. A realm on the registry's own host always
    /// may; default: Docker Hub's `auth.docker.io`.
    pub trusted_token_realms: std::collections::BTreeMap<String, Vec<String>>,
    /// Mirrors (`host[:port]`) asked first for a registry's manifests and blobs, in order;
    /// the registry itself is asked when every mirror fails.
    pub registry_mirrors: std::collections::BTreeMap<String, Vec<String>>,
    /// Request headers sent to a mirror (`host[:port]` → header → value), e.g. Dragonfly's
    /// `X-Dragonfly-Registry = "https://{registry}"`; `{registry}` becomes the registry the
    /// mirror stands in for. Requests to such a mirror are anonymous.
    pub mirror_headers:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// Most bytes of modules the cache may hold.
    pub max_cache_bytes: u64,
    /// Fraction of `max_cache_bytes` past which eviction starts.
    pub cache_high_watermark: f64,
    /// Fraction of `max_cache_bytes` eviction brings usage under.
    pub cache_low_watermark: f64,
    /// Modules unused this long are evicted.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// Modules handed out by path this recently are never evicted.
    #[serde(with = "duration")]
    pub path_grace: Duration,
    /// Longest lease a client may ask for.
    #[serde(with = "duration")]
    pub max_lease: Duration,
    /// How often the daemon runs eviction and saves access times.
    #[serde(with = "duration")]
    pub gc_interval: Duration,
    /// Prefetch list files, or directories of them (a mounted ConfigMap).
    pub prefetch_files: Vec<PathBuf>,
    /// Prefetches running at once (resolving, or downloading within their share).
    pub prefetch_concurrency: usize,
    /// Share of `max_concurrent_downloads` that downloads started by prefetches may hold at
    /// once, rounded down and at least one; the rest are kept for on-demand fetches, so a
    /// prefetch stuck on a slow registry never makes a sidecar's fetch wait. 1 lets
    /// prefetches take every download permit.
    pub prefetch_download_share: f64,
    /// Retries of a prefetch after a transient registry error (with doubling backoff).
    pub prefetch_retries: u32,
    /// Bandwidth each download started by a prefetch may take, bytes per second (0: no limit).
    pub prefetch_max_bytes_per_second: u64,
    /// How often listed and pinned tags are re-resolved.
    #[serde(with = "duration")]
    pub refresh_interval: Duration,
    /// Report not-ready until the prefetch lists were attempted once.
    pub ready_after_prefetch: bool,
    /// Unix socket peers allowed by uid (root always is); empty with `allowed_gids` = everyone
    /// who can open the socket.
    pub allowed_uids: Vec<u32>,
    /// Unix socket peers allowed by primary gid.
    pub allowed_gids: Vec<u32>,
    /// File holding a bearer token that mutating calls on TCP listeners must present.
    pub tcp_token_file: Option<PathBuf>,
    /// What TCP clients without the token may do besides probes and metrics: `open` (every
    /// read, fetching what is not cached), `cached` (cached modules only; nothing they ask
    /// makes the daemon contact anything) or `token` (nothing). `cached` and `token` need
    /// `tcp_token_file`.
    pub tcp_reads: TcpReads,
    /// How long requests in flight may finish after SIGTERM.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Size limits for everything read from a registry.
    pub limits: Limits,
    /// Other daemons this one fetches through.
    pub peers: PeersConfig,
    /// Signature policies (`[[signature_policies]]`); none: no signature is checked.
    pub signature_policies: Vec<SignaturePolicyConfig>,
}

/// A registry named by a short alias in the OCI view.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAlias {
    /// `host[:port]` of the registry.
    pub host: String,
    /// Speak plain HTTP to it.
    #[serde(default)]
    pub insecure: bool,
    /// Extra PEM CA bundle for it (added to the trusted roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// What a TCP client without the token (`tcp_token_file`) may do besides probes, metrics and
/// gRPC health; mutating calls always need the token when one is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpReads {
    /// Every read: `Fetch`, the module API, the OCI view, fetching what is not cached.
    #[default]
    Open,
    /// Cached modules only: the same reads, answered as under pull policy `NEVER`, so nothing
    /// such a client asks makes the daemon contact a registry, a URL or a peer.
    Cached,
    /// Nothing without the token (`Authorization: Bearer <token>`, or HTTP Basic with the
    /// token as password, which is how an OCI client presents a pull secret).
    Token,
}

/// Size limits for documents and blobs read from registries.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest manifest, index or config document.
    pub max_manifest_bytes: u64,
    /// Largest module.
    pub max_module_bytes: u64,
    /// Most bytes read from one tar or tar+gzip layer after decompression.
    pub max_layer_bytes: u64,
    /// Most layers in a manifest, or entries in an image index.
    pub max_layers: usize,
    /// Most entries read from one tar layer.
    pub max_tar_entries: usize,
    /// Longest reference accepted from a client.
    pub max_reference_bytes: usize,
    /// Largest request body (HTTP) or message (gRPC) accepted from a client.
    pub max_request_bytes: usize,
    /// Most different references one client (a uid on the socket, an address on TCP) may
    /// be fetching at once.
    pub max_fetches_per_client: usize,
    /// Most references queued or running, in all prefetches started through the APIs
    /// (prefetch lists and refreshes are the node's own and not counted).
    pub max_prefetch_queue: usize,
    /// Most of them one client may have queued or running.
    pub max_prefetch_per_client: usize,
    /// Bytes that documents being read (manifests, indexes, referrers, peers' manifests) may
    /// hold at once, in all; a read that finds no room fails (`RESOURCE_EXHAUSTED`).
    pub max_manifest_bytes_in_flight: u64,
    /// Most client connections open at once on each listener (the unix socket, each TCP
    /// address); further clients wait to be accepted until one closes.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_layers: DEFAULT_MAX_LAYERS,
            max_tar_entries: DEFAULT_MAX_TAR_ENTRIES,
            max_reference_bytes: DEFAULT_MAX_REFERENCE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_fetches_per_client: DEFAULT_MAX_FETCHES_PER_CLIENT,
            max_prefetch_queue: DEFAULT_MAX_PREFETCH_QUEUE,
            max_prefetch_per_client: DEFAULT_MAX_PREFETCH_PER_CLIENT,
            max_manifest_bytes_in_flight: DEFAULT_MAX_MANIFEST_BYTES_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: default_data_dir(),
            insecure_registries: Vec::new(),
            registry_auth_file: None,
            registry_auth_files: Vec::new(),
            ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            stale_after: DEFAULT_STALE_AFTER,
            validate_wasm: DEFAULT_VALIDATE_WASM,
            require_proxy_wasm: false,
            tag_ttl: DEFAULT_TAG_TTL,
            max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
            socket: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            socket_send_buffer_bytes: DEFAULT_SOCKET_SEND_BUFFER_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            worker_threads: DEFAULT_WORKER_THREADS,
            grpc_listen: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            tcp_token_file: None,
            tcp_reads: TcpReads::default(),
            http_listen: None,
            wasme_compat: false,
            wasme_listen: DEFAULT_WASME_LISTEN.parse().expect("valid default address"),
            oci_fetch_through: DEFAULT_OCI_FETCH_THROUGH,
            registry_aliases: Default::default(),
            max_cache_bytes: DEFAULT_MAX_CACHE_BYTES,
            cache_high_watermark: DEFAULT_HIGH_WATERMARK,
            cache_low_watermark: DEFAULT_LOW_WATERMARK,
            max_age: DEFAULT_MAX_AGE,
            path_grace: DEFAULT_PATH_GRACE,
            max_lease: DEFAULT_MAX_LEASE,
            gc_interval: DEFAULT_GC_INTERVAL,
            prefetch_files: Vec::new(),
            prefetch_concurrency: DEFAULT_PREFETCH_CONCURRENCY,
            prefetch_download_share: DEFAULT_PREFETCH_DOWNLOAD_SHARE,
            prefetch_retries: DEFAULT_PREFETCH_RETRIES,
            prefetch_max_bytes_per_second: 0,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            ready_after_prefetch: DEFAULT_READY_AFTER_PREFETCH,
            default_upstream: None,
            allowed_registries: Vec::new(),
            blocked_registries: Vec::new(),
            blocked_cidrs: DEFAULT_BLOCKED_CIDRS
                .iter()
                .map(|c| c.to_string())
                .collect(),
            trusted_token_realms: default_trusted_token_realms(),
            registry_mirrors: Default::default(),
            mirror_headers: Default::default(),
            limits: Limits::default(),
            peers: PeersConfig::default(),
            signature_policies: Vec::new(),
        }
    }
}

/// The cache's size limits and eviction rules, as the store's eviction reads them.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most bytes of modules the cache may hold.
    pub max_bytes: u64,
    /// Fraction of `max_bytes` past which eviction starts.
    pub high_watermark: f64,
    /// Fraction of `max_bytes` eviction brings usage under.
    pub low_watermark: f64,
    /// Modules unused this long are evicted.
    pub max_age: Duration,
    /// Modules handed out this recently are never evicted.
    pub path_grace: Duration,
}

impl Budget {
    /// Bytes past which eviction starts.
    pub fn high_mark(&self) -> u64 {
        (self.max_bytes as f64 * self.high_watermark) as u64
    }

    /// Bytes eviction brings usage under.
    pub fn low_mark(&self) -> u64 {
        (self.max_bytes as f64 * self.low_watermark) as u64
    }
}

/// A configuration that cannot be read or cannot work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for [`Config`] (unknown keys included).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A field has a value outside its range.
    #[error("invalid configuration: {field} = {value}: {reason}")]
    Invalid {
        /// The config key.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl Config {
    /// Reads a TOML config file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| Error::Parse {
            path: path.to_owned(),
            message: error.to_string().trim().replace('\n', " "),
        })
    }

    /// The configuration for a command line: the file named by `--config` (if any), then
    /// the flags and environment variables on top, validated.
    pub fn resolve(args: ConfigArgs) -> Result<Config, Error> {
        let mut config = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        args.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// Checks every field once at start-up so later code can rely on them.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field, value: String, reason| {
            Err(Error::Invalid {
                field,
                value,
                reason,
            })
        };
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", String::new(), "must not be empty");
        }
        let in_flight = self.limits.max_manifest_bytes_in_flight;
        if in_flight < self.limits.max_manifest_bytes || in_flight > u64::from(u32::MAX) {
            return invalid(
                "limits.max_manifest_bytes_in_flight",
                in_flight.to_string(),
                "must be at least limits.max_manifest_bytes and at most 4 GiB - 1",
            );
        }
        if self.tcp_reads != TcpReads::Open && self.tcp_token_file.is_none() {
            return invalid(
                "tcp_reads",
                format!("{:?}", self.tcp_reads).to_lowercase(),
                "needs tcp_token_file: without a token every TCP client is the same",
            );
        }
        for (field, value) in [
            ("limits.max_manifest_bytes", self.limits.max_manifest_bytes),
            ("limits.max_module_bytes", self.limits.max_module_bytes),
            ("limits.max_layer_bytes", self.limits.max_layer_bytes),
            (
                "limits.max_reference_bytes",
                self.limits.max_reference_bytes as u64,
            ),
            (
                "limits.max_request_bytes",
                self.limits.max_request_bytes as u64,
            ),
        ] {
            if value < 8 {
                return invalid(field, value.to_string(), "must be at least 8 bytes");
            }
        }
        for (field, value) in [
            ("limits.max_layers", self.limits.max_layers),
            ("limits.max_tar_entries", self.limits.max_tar_entries),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "must be at least 1");
            }
        }
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("read_timeout", self.read_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("fetch_timeout", self.fetch_timeout),
            ("stale_after", self.stale_after),
        ] {
            if value.is_zero() {
                return invalid(field, "0s".into(), "must be greater than zero");
            }
        }
        if self.socket_mode > 0o777 {
            return invalid(
                "socket_mode",
                format!("{:o}", self.socket_mode),
                "must be permission bits (at most 0777)",
            );
        }
        let watermarks = (self.cache_low_watermark, self.cache_high_watermark);
        if !(0.0 < watermarks.0 && watermarks.0 <= watermarks.1 && watermarks.1 <= 1.0) {
            return invalid(
                "cache_low_watermark / cache_high_watermark",
                format!("{} / {}", watermarks.0, watermarks.1),
                "need 0 < low <= high <= 1",
            );
        }
        if self.max_cache_bytes == 0 {
            return invalid("max_cache_bytes", "0".into(), "must be greater than zero");
        }
        if self.gc_interval.is_zero() {
            return invalid("gc_interval", "0s".into(), "must be greater than zero");
        }
        if self.prefetch_concurrency == 0 {
            return invalid("prefetch_concurrency", "0".into(), "must be at least 1");
        }
        if self.refresh_interval.is_zero() {
            return invalid("refresh_interval", "0s".into(), "must be greater than zero");
        }
        if self.limits.max_connections == 0 {
            return invalid("limits.max_connections", "0".into(), "must be at least 1");
        }
        for (field, value) in [
            (
                "limits.max_fetches_per_client",
                self.limits.max_fetches_per_client,
            ),
            ("limits.max_prefetch_queue", self.limits.max_prefetch_queue),
            (
                "limits.max_prefetch_per_client",
                self.limits.max_prefetch_per_client,
            ),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "must be at least 1");
            }
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return invalid(
                "worker_threads",
                self.worker_threads.to_string(),
                "must be at most 512 (0 = one per CPU)",
            );
        }
        if self.max_concurrent_downloads == 0 {
            return invalid("max_concurrent_downloads", "0".into(), "must be at least 1");
        }
        let share = self.prefetch_download_share;
        if !(share > 0.0 && share <= 1.0) {
            return invalid(
                "prefetch_download_share",
                share.to_string(),
                "must be greater than 0 and at most 1 (a share of max_concurrent_downloads)",
            );
        }
        for (alias, target) in &self.registry_aliases {
            let valid_alias = !alias.is_empty()
                && alias.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_alias {
                return invalid(
                    "registry_aliases",
                    alias.clone(),
                    "aliases are lowercase letters, digits, '-' and '_' (no '.')",
                );
            }
            if target.host.is_empty() || target.host.contains('/') {
                return invalid(
                    "registry_aliases.host",
                    target.host.clone(),
                    "expected 'host' or 'host:port'",
                );
            }
        }
        for (registry, mirrors) in &self.registry_mirrors {
            for mirror in mirrors {
                if mirror.is_empty() || mirror.contains('/') || mirror == registry {
                    return invalid(
                        "registry_mirrors",
                        format!("{registry} = {mirror}"),
                        "expected 'host' or 'host:port', other than the registry itself",
                    );
                }
            }
        }
        for (mirror, headers) in &self.mirror_headers {
            for (name, value) in headers {
                let valid = http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && http::HeaderValue::from_str(value).is_ok();
                if !valid {
                    return invalid(
                        "mirror_headers",
                        format!("{mirror}: {name} = {value}"),
                        "expected an HTTP header name and a printable ASCII value",
                    );
                }
            }
        }
        for (registry, hosts) in &self.trusted_token_realms {
            for host in hosts {
                if host.is_empty() || host.contains('/') {
                    return invalid(
                        "trusted_token_realms",
                        format!("{registry} = {host}"),
                        "expected 'host' or 'host:port'",
                    );
                }
            }
        }
        for cidr in &self.blocked_cidrs {
            let address = cidr.parse::<std::net::IpAddr>().is_ok();
            if !address && cidr.parse::<ipnet::IpNet>().is_err() {
                return invalid(
                    "blocked_cidrs",
                    cidr.clone(),
                    "expected a CIDR ('169.254.0.0/16', 'fe80::/10') or an address",
                );
            }
        }
        for registry in &self.insecure_registries {
            if registry.is_empty() || registry.contains('/') {
                return invalid(
                    "insecure_registries",
                    registry.clone(),
                    "expected 'host' or 'host:port'",
                );
            }
        }
        for policy in &self.signature_policies {
            policy.validate()?;
        }
        self.peers.validate()
    }

    /// Whether the registry policy lets the cache pull from `registry` (`host[:port]`).
    pub fn registry_allowed(&self, registry: &str) -> bool {
        let matches = |pattern: &String| match pattern.strip_prefix("*.") {
            Some(suffix) => registry
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.')),
            None => pattern == "*" || pattern == registry,
        };
        if self.blocked_registries.iter().any(matches) {
            return false;
        }
        self.allowed_registries.is_empty() || self.allowed_registries.iter().any(matches)
    }

    /// Every registry spoken to over plain HTTP: the configured ones and insecure aliases.
    pub fn plain_http_registries(&self) -> Vec<String> {
        let mut registries = self.insecure_registries.clone();
        registries.extend(
            self.registry_aliases
                .values()
                .filter(|alias| alias.insecure)
                .map(|alias| alias.host.clone()),
        );
        registries
    }

    /// Download permits that downloads started by prefetches may hold at once:
    /// `prefetch_download_share` of `max_concurrent_downloads`, rounded down, at least one.
    pub fn prefetch_download_permits(&self) -> usize {
        let share = self.max_concurrent_downloads as f64 * self.prefetch_download_share;
        (share.floor() as usize).clamp(1, self.max_concurrent_downloads.max(1))
    }

    /// The cache budget for the store's eviction.
    pub fn budget(&self) -> Budget {
        Budget {
            max_bytes: self.max_cache_bytes,
            high_watermark: self.cache_high_watermark,
            low_watermark: self.cache_low_watermark,
            max_age: self.max_age,
            path_grace: self.path_grace,
        }
    }

    /// Every extra CA file: the global one and the aliases' ones.
    pub fn ca_files(&self) -> Vec<PathBuf> {
        self.ca_file
            .iter()
            .chain(
                self.registry_aliases
                    .values()
                    .filter_map(|a| a.ca_file.as_ref()),
            )
            .cloned()
            .collect()
    }

    /// The daemon's unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DEFAULT_SOCKET_NAME))
    }

    /// Every credentials file, in merge order: [`Config::registry_auth_path`], then
    /// `registry_auth_files`.
    pub fn registry_auth_paths(&self) -> Vec<PathBuf> {
        self.registry_auth_path()
            .into_iter()
            .chain(self.registry_auth_files.iter().cloned())
            .collect()
    }

    /// The Docker `config.json` to read credentials from: the configured one, else
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn registry_auth_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.registry_auth_file {
            return Some(path.clone());
        }
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(Path::new(&dir).join("config.json"));
        }
        std::env::home_dir().map(|home| home.join(".docker/config.json"))
    }
}

/// Docker Hub's registry sends clients to its token server on another host.
fn default_trusted_token_realms() -> std::collections::BTreeMap<String, Vec<String>> {
    std::collections::BTreeMap::from([("docker.io".to_owned(), vec!["auth.docker.io".to_owned()])])
}

/// `$XDG_CACHE_HOME/wasmcache`, else `~/.cache/wasmcache`, else `./wasmcache`.
fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Path::new(&dir).join(DATA_DIR_NAME);
    }
    match std::env::home_dir() {
        Some(home) => home.join(".cache").join(DATA_DIR_NAME),
        None => PathBuf::from(DATA_DIR_NAME),
    }
}

/// Serde adapter for permission bits written as an octal string (`"0660"`).
mod octal {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
        let text = String::deserialize(deserializer)?;
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .map_err(|_| serde::de::Error::custom(format!("'{text}' is not an octal mode")))
    }
}

/// Serde adapter for durations written as humantime strings (`"10s"`, `"5m"`).
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|error| serde::de::Error::custom(format!("'{text}': {error}")))
    }
}

#[cfg(test)]
mod tests;

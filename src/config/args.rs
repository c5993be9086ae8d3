//! The command-line flags and `WASMCACHE_*` environment variables that override the config
//! file's keys.

use std::path::PathBuf;

use super::Config;

/// Command-line flags and environment variables shared by every subcommand that opens the
/// store or talks to registries. Each overrides the matching [`Config`] field when given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML config file; flags and environment variables override its keys.
    #[arg(long, env = "WASMCACHE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Directory holding the blobs and the index [default: $XDG_CACHE_HOME/wasmcache].
    #[arg(long, env = "WASMCACHE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Registry (host:port) to reach over plain HTTP; repeatable.
    #[arg(
        long = "insecure-registry",
        env = "WASMCACHE_INSECURE_REGISTRIES",
        value_delimiter = ',',
        global = true
    )]
    pub insecure_registries: Vec<String>,
    /// Docker config.json with registry credentials [default: $DOCKER_CONFIG/config.json].
    #[arg(long, env = "WASMCACHE_REGISTRY_AUTH_FILE", global = true)]
    pub registry_auth_file: Option<PathBuf>,
    /// Extra PEM CA bundle trusted for registry TLS.
    #[arg(long, env = "WASMCACHE_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// The daemon's unix socket [default: <data-dir>/wasmcache.sock].
    #[arg(long, env = "WASMCACHE_SOCKET", global = true)]
    pub socket: Option<PathBuf>,
    /// Also serve gRPC and HTTP on this TCP address (e.g. 127.0.0.1:9977).
    #[arg(long, env = "WASMCACHE_GRPC_LISTEN", global = true)]
    pub grpc_listen: Option<std::net::SocketAddr>,
    /// Also serve HTTP (and gRPC) on this TCP address, e.g. for hostPort use.
    #[arg(long, env = "WASMCACHE_HTTP_LISTEN", global = true)]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Serve the solo.io `wasme cache` API (`GET /<sha256>`, `GET /<image-ref>`) on
    /// `wasme_listen` (default 127.0.0.1:9979).
    #[arg(long, env = "WASMCACHE_WASME_COMPAT", global = true)]
    pub wasme_compat: bool,
    /// Prefetch list file or directory of them; repeatable.
    #[arg(
        long = "prefetch-file",
        env = "WASMCACHE_PREFETCH_FILES",
        value_delimiter = ',',
        global = true
    )]
    pub prefetch_files: Vec<PathBuf>,
    /// Skip full wasmparser validation (the magic number is still checked).
    #[arg(long, env = "WASMCACHE_NO_VALIDATE", global = true)]
    pub no_validate: bool,
    /// A peer daemon (HOST:PORT) to fetch through; repeatable (`peers.static`).
    #[arg(
        long = "peer",
        env = "WASMCACHE_PEERS",
        value_delimiter = ',',
        global = true
    )]
    pub peers: Vec<String>,
    /// This daemon's own peer address, HOST:PORT (`peers.self_address`).
    #[arg(long = "peer-self", env = "WASMCACHE_PEER_SELF", global = true)]
    pub peer_self: Option<String>,
    /// The pod's IP (downward API): this daemon's peer address, with its listener's port,
    /// when `peers.self_address` is not set.
    #[arg(long, env = "POD_IP", hide = true, global = true)]
    pub pod_ip: Option<std::net::IpAddr>,
}

impl ConfigArgs {
    /// Applies the flags that were given on top of `config`.
    pub fn apply(self, config: &mut Config) {
        if let Some(dir) = self.data_dir {
            config.data_dir = dir;
        }
        config.insecure_registries.extend(
            self.insecure_registries
                .into_iter()
                .filter(|r| !r.is_empty()),
        );
        if let Some(file) = self.registry_auth_file {
            config.registry_auth_file = Some(file);
        }
        if let Some(file) = self.ca_file {
            config.ca_file = Some(file);
        }
        if let Some(socket) = self.socket {
            config.socket = Some(socket);
        }
        if let Some(address) = self.grpc_listen {
            config.grpc_listen = Some(address);
        }
        config.prefetch_files.extend(self.prefetch_files);
        if let Some(address) = self.http_listen {
            config.http_listen = Some(address);
        }
        if self.wasme_compat {
            config.wasme_compat = true;
        }
        if self.no_validate {
            config.validate_wasm = false;
        }
        config
            .peers
            .static_peers
            .extend(self.peers.into_iter().filter(|p| !p.is_empty()));
        if let Some(address) = self.peer_self {
            config.peers.self_address = Some(address);
        }
        if config.peers.self_address.is_none() {
            let port = config
                .peers
                .listen
                .or(config.http_listen)
                .or(config.grpc_listen)
                .map(|address| address.port());
            if let (Some(ip), Some(port)) = (self.pod_ip, port) {
                config.peers.self_address = Some(std::net::SocketAddr::new(ip, port).to_string());
            }
        }
    }
}

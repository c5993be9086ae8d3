//! The daemon's APIs: gRPC (`wasmcache.v1.WasmCache`, health, reflection) and HTTP, served
//! together by one router on the unix socket and on optional TCP listeners ([`Server`]), each
//! listener through hyper-util's connection builder (`serve`) with its own layers: the
//! socket's peer check (`guard::unix_peer`), the TCP token (`guard::tcp_token`).
//!
//! This is the only module that knows about tonic, axum and hyper. It holds cheap handles to
//! the fetcher and store and never opens cache files itself, except to stream a module file the
//! store named.

pub mod codec;
pub mod error;
pub mod grpc;
pub mod guard;
pub mod http;
pub mod oci;
pub mod peer;
pub mod respond;
pub mod serve;
pub mod wasme;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::fetch::{Fetcher, PullPolicy};
use crate::prefetch::Prefetcher;

/// Code generated from `proto/wasmcache/v1/wasmcache.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("wasmcache.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmcache_descriptor.bin"));
}

/// Why [`State::fetch_for`] gave no module.
#[derive(Debug)]
pub enum Refused {
    /// The client has `limits.max_fetches_per_client` other references in flight; the
    /// message says so.
    TooMany(String),
    /// The client may read only cached modules (`tcp_reads = "cached"`) and this one is not
    /// cached; the message says so.
    NotCached(String),
    /// The fetch failed.
    Fetch(crate::fetch::Error),
}

/// What every API handler shares; cheap to clone.
#[derive(Clone)]
pub struct State {
    /// Pulls and looks up modules.
    pub fetcher: Fetcher,
    /// Runs prefetches.
    pub prefetcher: Prefetcher,
    ready: Arc<AtomicBool>,
    tcp_token: Arc<RwLock<Option<Arc<str>>>>,
    client_fetches: Arc<guard::ClientFetches>,
}

impl State {
    /// Handlers over `fetcher` and `prefetcher`; not ready until [`State::set_ready`].
    pub fn new(fetcher: Fetcher, prefetcher: Prefetcher) -> State {
        let client_fetches =
            guard::ClientFetches::new(fetcher.config().limits.max_fetches_per_client);
        State {
            fetcher,
            prefetcher,
            ready: Arc::default(),
            tcp_token: Arc::default(),
            client_fetches,
        }
    }

    /// Requires `token` on TCP listeners for mutating calls, and for reads as `tcp_reads`
    /// says.
    pub fn with_tcp_token(self, token: Option<String>) -> State {
        self.set_tcp_token(token);
        self
    }

    /// Replaces the TCP token (a rotated `tcp_token_file`), for every listener at once. The
    /// shipped placeholder is kept, so that it is never accepted and every refusal says why.
    pub fn set_tcp_token(&self, token: Option<String>) {
        if token.as_deref().is_some_and(guard::is_placeholder) {
            tracing::error!(
                "the TCP token (tcp_token_file) is the shipped placeholder: every call that \
                 needs the token is refused until the file holds a token of your own"
            );
        }
        *self.tcp_token.write().expect("tcp token poisoned") = token.map(Arc::from);
    }

    /// The token TCP clients present, if configured.
    pub fn tcp_token(&self) -> Option<Arc<str>> {
        self.tcp_token.read().expect("tcp token poisoned").clone()
    }

    /// Parses a reference from a client, refusing text over `limits.max_reference_bytes`
    /// before parsing it.
    pub fn parse_reference(&self, text: &str) -> Result<crate::reference::Reference, String> {
        let limit = self.fetcher.config().limits.max_reference_bytes;
        if text.len() > limit {
            return Err(format!(
                "reference of {} bytes is over the limit of {limit} (limits.max_reference_bytes)",
                text.len()
            ));
        }
        text.parse()
            .map_err(|error: crate::reference::ParseError| error.to_string())
    }

    /// Parses an expected module digest (`expected_sha256`): `<64 hex>` or `sha256:<64 hex>`;
    /// empty text expects nothing.
    pub fn parse_expected(text: &str) -> Result<Option<crate::digest::Digest>, String> {
        if text.is_empty() {
            return Ok(None);
        }
        let full = match text.contains(':') {
            true => text.to_owned(),
            false => format!("sha256:{text}"),
        };
        full.parse().map(Some).map_err(|_| {
            format!("expected_sha256 '{text}' is not 64 hex digits (optionally after 'sha256:')")
        })
    }

    /// Fetches `reference` for `client`, counted against `limits.max_fetches_per_client`
    /// until the fetch ends, even when the client goes away first: the fetch runs in a task
    /// of its own that holds the client's place, so hanging up frees nothing early. The
    /// caller waits at most `deadline` (gRPC's `grpc-timeout`); a module that is not
    /// `expected` is refused.
    pub async fn fetch_for(
        &self,
        client: Option<&guard::Client>,
        reference: &crate::reference::Reference,
        policy: PullPolicy,
        deadline: Option<std::time::Duration>,
        expected: Option<&crate::digest::Digest>,
    ) -> Result<crate::fetch::Fetched, Refused> {
        let ticket = self
            .client_fetches
            .enter(client, &reference.to_string())
            .map_err(Refused::TooMany)?;
        let cache_only = client.is_some_and(guard::Client::cache_only);
        let policy = if cache_only {
            PullPolicy::Never
        } else {
            policy
        };
        let (fetcher, owned) = (self.fetcher.clone(), reference.clone());
        let expected = expected.cloned();
        let work = tokio::spawn(async move {
            let _ticket = ticket;
            (fetcher.fetch_expecting(&owned, policy, deadline, expected.as_ref())).await
        });
        match work.await {
            Ok(Err(crate::fetch::Error::NotCached { reference })) if cache_only => {
                Err(Refused::NotCached(format!(
                    "{reference} is not cached on this node, and a TCP client without the \
                     token reads cached modules only (tcp_reads = \"cached\"): list it for \
                     prefetch, ask over the unix socket, or present the token"
                )))
            }
            Ok(result) => result.map_err(Refused::Fetch),
            Err(_) => Err(Refused::Fetch(crate::fetch::Error::TaskFailed {
                reference: reference.to_string(),
            })),
        }
    }

    /// Marks the daemon ready (or not) for `/readyz` and gRPC health.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the daemon is ready to serve.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Asks for `bytes` of send buffer on an accepted socket connection (0 keeps the kernel's
/// default). With the default of about 200 KiB, a large module leaves the daemon in many small
/// writes, each waiting for the reader to drain the last: 4 MiB doubled `/v1/modules`
/// throughput over the socket (BENCHMARKS.md). Best effort: the kernel caps it at
/// `net.core.wmem_max`, and a failure only costs speed.
fn set_send_buffer(stream: &tokio::net::UnixStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if let Err(error) = socket2::SockRef::from(stream).set_send_buffer_size(bytes) {
        tracing::debug!(%error, bytes, "the socket's send buffer was not enlarged");
    }
}

/// Every API, ready to serve on the daemon's listeners.
pub struct Server {
    state: State,
    /// Every API: gRPC (with health and reflection) and HTTP, without listener layers.
    router: axum::Router,
    /// Flips gRPC health at start-up and shutdown.
    health: tonic_health::server::HealthReporter,
    limits: serve::Limits,
    activity: Arc<serve::Activity>,
}

impl Server {
    /// Builds the services of every API over `state`.
    pub fn new(state: State) -> Server {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("embedded descriptor sets are valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("embedded descriptor sets are valid");
        let routes = tonic::service::Routes::new(grpc::service(state.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .prepare()
            .into_axum_router();
        let router = routes
            .merge(http::router(state.clone()))
            .fallback(respond::no_route);
        let config = state.fetcher.config();
        let limits = serve::Limits {
            max_connections: config.limits.max_connections,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        };
        Server {
            state,
            router,
            health,
            limits,
            activity: Arc::default(),
        }
    }

    /// Counts the requests of every listener (for the daemon's idle detection).
    pub fn activity(&self) -> Arc<serve::Activity> {
        self.activity.clone()
    }

    fn serve(&self, name: &'static str, router: axum::Router) -> serve::Serve {
        serve::Serve {
            name,
            router,
            limits: self.limits,
            metrics: self.state.fetcher.metrics().clone(),
            activity: self.activity.clone(),
        }
    }

    /// Serves every API on the unix socket until `stop`: each request is attributed to the
    /// peer's credentials and checked against `allowed_uids` / `allowed_gids`.
    pub async fn serve_unix(&self, listener: UnixListener, stop: CancellationToken) {
        let send_buffer = self.state.fetcher.config().socket_send_buffer_bytes;
        let router = self
            .router
            .clone()
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                guard::unix_peer,
            ));
        self.serve("unix", router)
            .run(
                listener,
                |stream, _| {
                    set_send_buffer(stream, send_buffer);
                    guard::Peer::of(stream)
                },
                stop,
            )
            .await;
    }

    /// Serves every API on a TCP listener until `stop`: each request is counted against its
    /// peer's address, and mutating calls need the TCP token when one is configured.
    pub async fn serve_tcp(&self, listener: TcpListener, stop: CancellationToken) {
        self.serve("tcp", self.tcp_router())
            .run(listener, |_, address| guard::TcpPeer(address), stop)
            .await;
    }

    /// The router with the TCP listeners' layers: the client's address, the TCP token.
    fn tcp_router(&self) -> axum::Router {
        self.router
            .clone()
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                guard::tcp_token,
            ))
            .layer(axum::middleware::from_fn(guard::tcp_peer))
    }

    /// Serves every API on the `peers.listen` listener until `stop`, as on TCP; requests
    /// marked as a peer's are answered only here when this listener is configured.
    pub async fn serve_peers(&self, listener: TcpListener, stop: CancellationToken) {
        let router = self.tcp_router().layer(axum::Extension(peer::PeerListener));
        self.serve("peer", router)
            .run(listener, |_, address| guard::TcpPeer(address), stop)
            .await;
    }

    /// Serves the `wasme cache` compatible API on its own TCP listener until `stop`.
    pub async fn serve_wasme(&self, listener: TcpListener, stop: CancellationToken) {
        let router = wasme::router(self.state.clone())
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                guard::tcp_token,
            ))
            .layer(axum::middleware::from_fn(guard::tcp_peer));
        self.serve("wasme", router)
            .run(listener, |_, address| guard::TcpPeer(address), stop)
            .await;
    }

    /// Reports every service (and the server as a whole, `""`) as serving or not.
    pub async fn set_health(&self, serving: bool) {
        use tonic_health::ServingStatus;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in ["", grpc::SERVICE_NAME] {
            self.health.set_service_status(service, status).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn socket_connections_get_the_send_buffer_asked_for() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let size = || socket2::SockRef::from(&ours).send_buffer_size().unwrap();
        let before = size();
        // The kernel caps the request at net.core.wmem_max (and reports it doubled).
        let cap = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        super::set_send_buffer(&ours, 4 * before);
        if cap > before {
            assert!(size() > before, "{} is not above {before}", size());
        }
    }
}

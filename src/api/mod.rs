//! The daemon's APIs: gRPC (`wasmcache.v1.WasmCache`, health, reflection) and HTTP, served
//! together by one router on the unix socket and on optional TCP listeners.
//!
//! This is the only module that knows about tonic, axum and hyper. It holds cheap handles to
//! the fetcher and store and never opens cache files itself, except to stream a module file the
//! store named.

pub mod error;
pub mod grpc;
pub mod guard;
pub mod http;
pub mod listener;
pub mod oci;
pub mod serve;
pub mod unix;
pub mod wasme;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fetch::Fetcher;
use crate::prefetch::Prefetcher;

/// Code generated from `proto/wasmcache/v1/wasmcache.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("wasmcache.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/wasmcache_descriptor.bin"));
}

/// What every API handler shares; cheap to clone.
#[derive(Clone)]
pub struct State {
    /// Pulls and looks up modules.
    pub fetcher: Fetcher,
    /// Runs prefetches.
    pub prefetcher: Prefetcher,
    ready: Arc<AtomicBool>,
    tcp_token: Option<Arc<str>>,
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
            tcp_token: None,
            client_fetches,
        }
    }

    /// Requires `token` for mutating calls on TCP listeners.
    pub fn with_tcp_token(mut self, token: Option<String>) -> State {
        self.tcp_token = token.map(Arc::from);
        self
    }

    /// The bearer token mutating calls on TCP need, if configured.
    pub fn tcp_token(&self) -> Option<&str> {
        self.tcp_token.as_deref()
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

    /// Counts a client's request for `reference` against `limits.max_fetches_per_client`;
    /// keep the ticket until the fetch is done.
    pub fn enter_fetch(
        &self,
        client: Option<&guard::Client>,
        reference: &crate::reference::Reference,
    ) -> Result<guard::FetchTicket, String> {
        self.client_fetches.enter(client, &reference.to_string())
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

/// The gRPC health reporter, to flip serving status at start-up and shutdown.
pub type HealthReporter = tonic_health::server::HealthReporter;

/// What serves the APIs: the router of every API, the `wasmcache.v1.WasmCache` service in it
/// (for the unix socket's direct path, [`unix::MakeUnixService`]), and the health reporter.
pub struct Services {
    /// Every API: gRPC (with health and reflection) and HTTP.
    pub router: axum::Router,
    /// The gRPC service the router holds; clones share its state.
    pub grpc: proto::wasm_cache_server::WasmCacheServer<grpc::Api>,
    /// That service's implementation, for the unix socket's warm-hit path.
    pub api: std::sync::Arc<grpc::Api>,
    /// Flips gRPC health at start-up and shutdown.
    pub health: HealthReporter,
}

/// Builds the services of every API.
pub fn router(state: State) -> Services {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
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
    let api = grpc::api(state.clone());
    let wasmcache = grpc::service(api.clone());
    let routes = tonic::service::Routes::new(wasmcache.clone())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router();
    Services {
        router: routes.merge(http::router(state)),
        grpc: wasmcache,
        api,
        health: health_reporter,
    }
}

/// Reports every service (and the server as a whole, `""`) as serving or not.
pub async fn set_health(reporter: &HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", grpc::SERVICE_NAME] {
        reporter.set_service_status(service, status).await;
    }
}

//! The pull pipeline: reference → manifest → packaging → verified module in the store.
//!
//! One job per file:
//! - `policy.rs`: pull policy and tag TTL, warm hits, one shared resolution per reference,
//!   stale answers (registry failing or silent for `stale_after`), deadlines;
//! - `resolve.rs`: manifest and image index, packaging, recording the pull in the store;
//! - `download.rs`: one download per layer (raw or tar) with the permits (prefetches within
//!   their share), the budget, the disk-full retry, mirrors and the rate limit, and the commit;
//! - `layer.rs`: the blocking side of a download (copy, or decompress and extract), and the
//!   module check, which `push` gives a file before it goes up;
//! - `url.rs`: modules served over HTTP(S), re-checked with their ETag;
//! - `error.rs`: the error type; `flight.rs`: single-flight; `memo.rs`: warm answers.
//!
//! Nothing is downloaded when the module is already stored under any name.

mod download;
mod error;
mod flight;
mod layer;
pub mod memo;
mod peers;
mod policy;
mod resolve;
mod signatures;
mod url;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::config::Config;
use crate::digest::Digest;
pub use crate::error::error_chain;
use crate::metrics::Metrics;
use crate::registry::RegistryClient;
pub use crate::store::Fetched;
use crate::store::Store;
pub use error::Error;
pub(crate) use error::Result;
use flight::SingleFlight;
pub use layer::ModuleCheck;
use memo::AnswerMemo;
pub use policy::PullPolicy;
pub use signatures::Verdict;

/// Pulls modules into the store; cheap to clone.
///
/// Owns the runs in flight: concurrent requests for one reference share one resolution, and
/// concurrent downloads of one layer (under any reference) share one download.
#[derive(Clone)]
pub struct Fetcher {
    registry: RegistryClient,
    store: Store,
    config: Arc<Config>,
    resolutions: SingleFlight<String, Fetched>,
    downloads: SingleFlight<String, Option<(Digest, u64)>>,
    /// Layers being asked of peers, by digest (`None`: no peer had it).
    peer_downloads: SingleFlight<String, Option<Option<(Digest, u64)>>>,
    download_permits: Arc<Semaphore>,
    /// The prefetches' share of `download_permits`: a download a prefetch starts holds one of
    /// these before it waits for a download permit, so prefetches never hold them all.
    prefetch_download_permits: Arc<Semaphore>,
    /// Whether this handle runs prefetches (its downloads count against their share).
    prefetching: bool,
    metrics: Metrics,
    progress: Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>>,
    /// Most bytes per second a download started by this handle may take (prefetches).
    download_rate: Option<u64>,
    /// Warm-hit answers by normalised reference, valid while the index is unchanged.
    memo: Arc<AnswerMemo<Fetched>>,
    /// Peers asked before the registry (`None`: peers off, or a peer's request).
    peers: Option<crate::peers::Peers>,
    /// Manifest requests at the registry in flight, by reference.
    manifests: SingleFlight<String, (bytes::Bytes, Digest)>,
    /// Manifests resolved at the registry, kept to answer peers.
    kept: Arc<peers::KeptManifests>,
    /// Signature policies and verdicts.
    signatures: Arc<signatures::Signatures>,
}

impl Fetcher {
    /// A fetcher pulling with `registry` into `store`.
    pub fn new(
        registry: RegistryClient,
        store: Store,
        config: Arc<Config>,
        metrics: Metrics,
    ) -> Fetcher {
        Fetcher {
            registry,
            store,
            download_permits: Arc::new(Semaphore::new(config.max_concurrent_downloads)),
            prefetch_download_permits: Arc::new(Semaphore::new(config.prefetch_download_permits())),
            prefetching: false,
            config,
            resolutions: SingleFlight::default(),
            downloads: SingleFlight::default(),
            peer_downloads: SingleFlight::default(),
            metrics,
            progress: Arc::default(),
            download_rate: None,
            memo: Arc::default(),
            peers: None,
            manifests: SingleFlight::default(),
            kept: Arc::default(),
            signatures: Arc::default(),
        }
    }

    /// The same fetcher (shared runs in flight, store and metrics) for prefetches: each
    /// download it starts holds one of the prefetches' share of the download permits
    /// (`prefetch_download_share`) and takes at most `prefetch_max_bytes_per_second`, so
    /// on-demand fetches always find permits and bandwidth.
    pub fn for_prefetch(&self) -> Fetcher {
        let rate = self.config.prefetch_max_bytes_per_second;
        Fetcher {
            download_rate: Some(rate).filter(|rate| *rate > 0),
            prefetching: true,
            ..self.clone()
        }
    }

    /// Bytes received and expected of the download running for `reference`, if any.
    pub fn progress(&self, reference: &str) -> Option<(u64, u64)> {
        self.progress
            .lock()
            .expect("progress map poisoned")
            .get(reference)
            .copied()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics this fetcher records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store modules are pulled into.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

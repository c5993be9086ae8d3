//! Prometheus metrics (OpenMetrics text via prometheus-client).
//!
//! One [`Metrics`] handle is created at start-up and cloned into the fetcher, the registry
//! client and the APIs; each records what it sees. Cache size gauges are filled in from the
//! index when `/metrics` is scraped, so they are never out of date.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `wasmcache_fetch_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// `hit`, `download`, `stale` or `error`.
    pub result: &'static str,
    /// The packaging, or `unknown` when the fetch failed before it was known.
    pub format: &'static str,
}

/// Labels of `wasmcache_registry_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// Registry host.
    pub registry: String,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// HTTP status code, or `error` when no response came.
    pub code: String,
}

/// Labels of `wasmcache_served_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// `http`, `grpc`, `oci`, `wasme` or `peer`.
    pub api: &'static str,
}

/// Labels of the connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `unix`, `tcp`, `peer` or `wasme`.
    pub listener: &'static str,
}

/// Labels of `wasmcache_connections_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    /// `unix`, `tcp` or `wasme`.
    pub listener: &'static str,
    /// `header_timeout`, `stalled` or `error`.
    pub reason: &'static str,
}

/// Labels of `wasmcache_peer_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// `client` (this daemon asked a peer) or `server` (a peer asked this daemon).
    pub role: &'static str,
    /// `served`, `not_found`, `refused_bytes`, `timed_out`, `unreachable`, `failed` or
    /// (server) `denied`.
    pub result: &'static str,
}

/// Labels of `wasmcache_signature_checks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignatureLabels {
    /// `verified`, `no_signature`, `bad_signature`, `unknown_key`, `digest_mismatch`,
    /// `identity_mismatch`, or `warned` (served under a `warn` policy).
    pub result: &'static str,
}

/// Labels of `wasmcache_evictions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    /// `size` or `age`.
    pub reason: &'static str,
}

/// Labels of `wasmcache_reconciled_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// What start-up reconciliation did.
    pub action: &'static str,
}

/// One open connection in `wasmcache_connections_open`; dropping it closes the count.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric the daemon exports; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    fetch_total: Family<FetchLabels, Counter>,
    fetch_duration: Histogram,
    registry_requests: Family<RegistryLabels, Counter>,
    downloaded_bytes: Counter,
    served_bytes: Family<ApiLabels, Counter>,
    blob_read_errors: Family<ApiLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    connections_dropped: Family<DroppedLabels, Counter>,
    singleflight_joined: Counter,
    cache_bytes: Gauge,
    cache_entries: Gauge,
    cache_budget: Gauge,
    evictions: Family<EvictionLabels, Counter>,
    evicted_bytes: Counter,
    reconciled: Family<ReconcileLabels, Counter>,
    peer_requests: Family<PeerLabels, Counter>,
    peers_known: Gauge,
    peers_up: Gauge,
    signature_checks: Family<SignatureLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let fetch_total = Family::<FetchLabels, Counter>::default();
        // 0.5 ms to ~16 s: warm hits land in the first buckets, downloads in the last.
        let fetch_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let registry_requests = Family::<RegistryLabels, Counter>::default();
        let downloaded_bytes = Counter::default();
        let served_bytes = Family::<ApiLabels, Counter>::default();
        let blob_read_errors = Family::<ApiLabels, Counter>::default();
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        let connections_dropped = Family::<DroppedLabels, Counter>::default();
        let singleflight_joined = Counter::default();
        let cache_bytes = Gauge::default();
        let cache_entries = Gauge::default();
        let cache_budget = Gauge::default();
        let evictions = Family::<EvictionLabels, Counter>::default();
        let evicted_bytes = Counter::default();
        let reconciled = Family::<ReconcileLabels, Counter>::default();
        let peer_requests = Family::<PeerLabels, Counter>::default();
        let peers_known = Gauge::default();
        let peers_up = Gauge::default();
        let signature_checks = Family::<SignatureLabels, Counter>::default();
        registry.register(
            "wasmcache_signature_checks",
            "Signature checks by result (verified, no_signature, bad_signature, unknown_key, digest_mismatch, identity_mismatch, warned)",
            signature_checks.clone(),
        );
        registry.register(
            "wasmcache_peer_requests",
            "Requests between peer daemons, by role (client, server) and result",
            peer_requests.clone(),
        );
        registry.register(
            "wasmcache_peers_known",
            "Other daemons in this one's peer membership",
            peers_known.clone(),
        );
        registry.register(
            "wasmcache_peers_up",
            "Known peers not in backoff after a failure",
            peers_up.clone(),
        );
        registry.register(
            "wasmcache_cache_budget_bytes",
            "The cache's size budget (max_cache_bytes)",
            cache_budget.clone(),
        );
        registry.register(
            "wasmcache_evictions",
            "Modules evicted, by reason (size, age)",
            evictions.clone(),
        );
        registry.register(
            "wasmcache_evicted_bytes",
            "Bytes of modules evicted",
            evicted_bytes.clone(),
        );
        registry.register(
            "wasmcache_reconciled",
            "Start-up repairs, by action (temp_files, missing_blobs, adopted, deleted_orphans, index_rebuilt)",
            reconciled.clone(),
        );
        registry.register(
            "wasmcache_fetch",
            "Fetches by result (hit, download, stale, error) and packaging",
            fetch_total.clone(),
        );
        registry.register(
            "wasmcache_fetch_duration_seconds",
            "Time to answer a fetch",
            fetch_duration.clone(),
        );
        registry.register(
            "wasmcache_registry_requests",
            "Requests sent to registries, by registry, kind and HTTP status",
            registry_requests.clone(),
        );
        registry.register(
            "wasmcache_downloaded_bytes",
            "Bytes downloaded from registries",
            downloaded_bytes.clone(),
        );
        registry.register(
            "wasmcache_served_bytes",
            "Module bytes served, by API",
            served_bytes.clone(),
        );
        registry.register(
            "wasmcache_blob_read_errors",
            "Module files that could not be served whole (changed or removed behind the daemon's back), by API",
            blob_read_errors.clone(),
        );
        registry.register(
            "wasmcache_connections_open",
            "Client connections open, by listener",
            connections_open.clone(),
        );
        registry.register(
            "wasmcache_connections_dropped",
            "Client connections the daemon closed, by listener and reason (header_timeout, stalled, error)",
            connections_dropped.clone(),
        );
        registry.register(
            "wasmcache_singleflight_joined",
            "Requests that joined a resolution or download already in flight",
            singleflight_joined.clone(),
        );
        registry.register(
            "wasmcache_cache_bytes",
            "Bytes of module blobs in the cache",
            cache_bytes.clone(),
        );
        registry.register(
            "wasmcache_cache_entries",
            "Modules in the cache",
            cache_entries.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                fetch_total,
                fetch_duration,
                registry_requests,
                downloaded_bytes,
                served_bytes,
                blob_read_errors,
                connections_open,
                connections_dropped,
                singleflight_joined,
                cache_bytes,
                cache_entries,
                cache_budget,
                evictions,
                evicted_bytes,
                reconciled,
                peer_requests,
                peers_known,
                peers_up,
                signature_checks,
            }),
        }
    }
}

impl Metrics {
    /// Counts one answered fetch and its duration.
    pub fn fetch_done(&self, result: &'static str, format: &'static str, seconds: f64) {
        self.inner
            .fetch_total
            .get_or_create(&FetchLabels { result, format })
            .inc();
        self.inner.fetch_duration.observe(seconds);
    }

    /// Counts one request to a registry.
    pub fn registry_request(&self, registry: &str, kind: &'static str, code: Option<u16>) {
        let labels = RegistryLabels {
            registry: registry.to_owned(),
            kind,
            code: code.map_or_else(|| "error".to_owned(), |c| c.to_string()),
        };
        self.inner.registry_requests.get_or_create(&labels).inc();
    }

    /// Counts bytes received from a registry.
    pub fn downloaded(&self, bytes: u64) {
        self.inner.downloaded_bytes.inc_by(bytes);
    }

    /// Counts module bytes served by `api`.
    pub fn served(&self, api: &'static str, bytes: u64) {
        self.inner
            .served_bytes
            .get_or_create(&ApiLabels { api })
            .inc_by(bytes);
    }

    /// Counts a module file that `api` could not serve whole.
    pub fn blob_read_error(&self, api: &'static str) {
        self.inner
            .blob_read_errors
            .get_or_create(&ApiLabels { api })
            .inc();
    }

    /// Counts a connection open on `listener` until the returned guard is dropped.
    pub fn connection_opened(&self, listener: &'static str) -> OpenConnection {
        let gauge = self
            .inner
            .connections_open
            .get_or_create(&ListenerLabels { listener })
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts a connection the daemon closed on `listener`, and why.
    pub fn connection_dropped(&self, listener: &'static str, reason: &'static str) {
        self.inner
            .connections_dropped
            .get_or_create(&DroppedLabels { listener, reason })
            .inc();
    }

    /// Counts a request that joined work in flight.
    pub fn joined(&self) {
        self.inner.singleflight_joined.inc();
    }

    /// How many requests joined work in flight since start.
    pub fn joined_total(&self) -> u64 {
        self.inner.singleflight_joined.get()
    }

    /// Counts one evicted module.
    pub fn evicted(&self, reason: &'static str, bytes: u64) {
        self.inner
            .evictions
            .get_or_create(&EvictionLabels { reason })
            .inc();
        self.inner.evicted_bytes.inc_by(bytes);
    }

    /// Records what start-up reconciliation did: a count per action (`temp_files`,
    /// `missing_blobs`, …).
    pub fn reconciled(&self, counts: &[(&'static str, u64)]) {
        for &(action, count) in counts {
            self.inner
                .reconciled
                .get_or_create(&ReconcileLabels { action })
                .inc_by(count);
        }
    }

    /// Counts one request between peers.
    pub fn peer_request(&self, role: &'static str, result: &'static str) {
        self.inner
            .peer_requests
            .get_or_create(&PeerLabels { role, result })
            .inc();
    }

    /// Sets the peer gauges: other daemons known, and how many of them are not in backoff.
    pub fn set_peers(&self, known: usize, up: usize) {
        self.inner.peers_known.set(known as i64);
        self.inner.peers_up.set(up as i64);
    }

    /// Counts one signature check.
    pub fn signature_check(&self, result: &'static str) {
        self.inner
            .signature_checks
            .get_or_create(&SignatureLabels { result })
            .inc();
    }

    /// Sets the budget gauge.
    pub fn set_budget(&self, bytes: u64) {
        self.inner
            .cache_budget
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Renders every metric, with the cache gauges set to `cache_bytes` and `cache_entries`.
    pub fn encode(&self, cache_bytes: u64, cache_entries: u64) -> String {
        self.inner
            .cache_bytes
            .set(i64::try_from(cache_bytes).unwrap_or(i64::MAX));
        self.inner
            .cache_entries
            .set(i64::try_from(cache_entries).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_the_documented_names() {
        let metrics = Metrics::default();
        metrics.fetch_done("download", "cncf-wasm", 0.25);
        metrics.registry_request("ghcr.io", "blob", Some(200));
        metrics.downloaded(10);
        metrics.served("http", 5);
        metrics.joined();
        let text = metrics.encode(100, 2);
        for line in [
            "wasmcache_fetch_total{result=\"download\",format=\"cncf-wasm\"} 1",
            "wasmcache_registry_requests_total{registry=\"ghcr.io\",kind=\"blob\",code=\"200\"} 1",
            "wasmcache_downloaded_bytes_total 10",
            "wasmcache_served_bytes_total{api=\"http\"} 5",
            "wasmcache_singleflight_joined_total 1",
            "wasmcache_cache_bytes 100",
            "wasmcache_cache_entries 2",
            "wasmcache_fetch_duration_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}

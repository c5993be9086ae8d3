//! The pull pipeline: reference → manifest → packaging → verified module in the store.
//!
//! [`Fetcher::pull`] resolves a reference to a manifest (through an image index if needed),
//! recognises the packaging, and gets the module bytes into the store: a raw module layer is
//! streamed straight into an ingest file; a tar or tar+gzip layer is streamed through a
//! decompressor and `plugin.wasm` is copied out of it. Network reads run on the async side,
//! hashing and writing on a blocking thread, so the two overlap. Nothing is downloaded when
//! the module is already stored under any name.

mod flight;
mod layer;
pub mod memo;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, instrument, warn, Span};

use crate::config::Config;
use crate::digest::Digest;
use crate::format::{self, Descriptor, Format, LayerEncoding, ModulePlan, Parsed, WasmeMetadata};
use crate::metrics::Metrics;
use crate::reference::Reference;
use crate::registry::{self, RegistryClient};
use crate::store::{self, ManifestRecord, ReferenceRecord, Store};
use flight::SingleFlight;
use layer::{check_wasm, extract, write_raw, ChannelReader, ModuleIngest};
use memo::AnswerMemo;

/// Chunks buffered between the network and the writer thread.
const PIPE_CHUNKS: usize = 64;

/// A module in the store, as handed to callers.
#[derive(Debug, Clone, Serialize)]
pub struct Fetched {
    /// The reference as normalised.
    pub reference: String,
    /// Digest of the image manifest (of the chosen platform, for an index).
    pub manifest_digest: Digest,
    /// Digest of the image index the manifest was chosen from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// `sha256:<hex>` of the module bytes; Envoy's `sha256` is its hex part.
    pub digest: Digest,
    /// Module size in bytes.
    pub size: u64,
    /// The packaging.
    pub format: Format,
    /// Absolute path of the verified module file.
    pub path: PathBuf,
    /// Whether the module bytes were already stored (no blob was downloaded).
    pub cache_hit: bool,
    /// Whether the registry failed and this is the last known resolution of the tag.
    pub stale: bool,
    /// Unix time (seconds) the reference was last resolved at its registry.
    pub resolved_at: u64,
    /// wasme config fields, for wasme images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wasme: Option<WasmeMetadata>,
}

/// Why a pull failed. Every variant names the reference.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry failed or refused.
    #[error("pulling {reference}")]
    Registry {
        /// The reference.
        reference: String,
        /// What the registry did.
        #[source]
        source: registry::Error,
    },
    /// The manifest is not a packaging we can read.
    #[error("pulling {reference}")]
    Format {
        /// The reference.
        reference: String,
        /// What is wrong with the manifest.
        #[source]
        source: format::Error,
    },
    /// An index entry leads to another index.
    #[error("pulling {reference}: image index entry {digest} is itself an index")]
    NestedIndex {
        /// The reference.
        reference: String,
        /// The entry.
        digest: String,
    },
    /// The module is over `max_module_bytes`.
    #[error(
        "pulling {reference}: module is over the limit of {limit} bytes (at least {size} bytes)"
    )]
    ModuleTooLarge {
        /// The reference.
        reference: String,
        /// Its size, or a lower bound when the download was stopped.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A tar layer has more entries than `max_tar_entries`.
    #[error("pulling {reference}: layer {layer} has more than {limit} entries")]
    TooManyTarEntries {
        /// The reference.
        reference: String,
        /// The layer digest.
        layer: String,
        /// The limit.
        limit: usize,
    },
    /// A tar layer decompresses past `max_layer_bytes` (a gzip bomb, or a huge image).
    #[error("pulling {reference}: layer {layer} decompresses to more than {limit} bytes")]
    LayerTooLarge {
        /// The reference.
        reference: String,
        /// The layer digest.
        layer: String,
        /// The limit.
        limit: u64,
    },
    /// A blob's length differs from its descriptor.
    #[error("pulling {reference}: blob {digest} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The reference.
        reference: String,
        /// The blob.
        digest: String,
        /// Size in the descriptor.
        expected: u64,
        /// Bytes received (at least).
        actual: u64,
    },
    /// Content does not hash to its digest.
    #[error("pulling {reference}: {what} {expected}: content hashed to {actual}")]
    DigestMismatch {
        /// The reference.
        reference: String,
        /// `blob` or `manifest`.
        what: &'static str,
        /// The digest announced.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// No layer holds a module.
    #[error("pulling {reference}: no plugin.wasm or single *.wasm file in layers [{layers}]; files seen: [{files}]")]
    NoModule {
        /// The reference.
        reference: String,
        /// Layers searched.
        layers: String,
        /// Regular files seen in them (first few).
        files: String,
    },
    /// Several `*.wasm` files and no `plugin.wasm`.
    #[error("pulling {reference}: layer {layer} holds several *.wasm files [{files}] and no plugin.wasm")]
    AmbiguousModule {
        /// The reference.
        reference: String,
        /// The layer.
        layer: String,
        /// The candidates.
        files: String,
    },
    /// The bytes are not WebAssembly.
    #[error("pulling {reference}: module {digest} is not WebAssembly: {reason}")]
    NotWasm {
        /// The reference.
        reference: String,
        /// The module digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// A tar or gzip layer is corrupt.
    #[error("pulling {reference}: reading layer {layer}")]
    Layer {
        /// The reference.
        reference: String,
        /// The layer.
        layer: String,
        /// The decoding error.
        #[source]
        source: io::Error,
    },
    /// The store failed (disk full, permissions, index).
    #[error("pulling {reference}")]
    Store {
        /// The reference.
        reference: String,
        /// The store error.
        #[source]
        source: store::Error,
    },
    /// The registry policy does not allow the reference's registry.
    #[error("{reference}: registry {registry} is not allowed by this node's registry policy")]
    Denied {
        /// The reference.
        reference: String,
        /// Its registry.
        registry: String,
    },
    /// Pull policy `NEVER` and the reference is not cached.
    #[error("{reference} is not cached and the pull policy is NEVER")]
    NotCached {
        /// The reference.
        reference: String,
    },
    /// The task doing the work died (a bug); callers may retry.
    #[error("pulling {reference}: the download task failed unexpectedly")]
    TaskFailed {
        /// The reference.
        reference: String,
    },
    /// The error of a run shared with other callers.
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl Error {
    /// The error itself, looking through [`Error::Shared`].
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }

    fn from_shared(error: Arc<Error>) -> Error {
        Arc::try_unwrap(error).unwrap_or_else(Error::Shared)
    }

    /// Whether the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self.root() {
            Error::Store { source, .. } => source.is_disk_full(),
            _ => false,
        }
    }

    /// Whether the registry was unreachable or failed on its side, so that a previously
    /// resolved answer may be served instead.
    pub fn is_transient(&self) -> bool {
        matches!(self.root(), Error::Registry { source, .. } if source.is_transient())
    }
}

/// When a tag is resolved at its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the cache; re-resolve a tag at most once per `tag_ttl`.
    #[default]
    IfNotPresent,
    /// Re-resolve the tag now; the module is not downloaded again if unchanged.
    Always,
    /// Only the cache.
    Never,
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

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
    download_permits: Arc<Semaphore>,
    metrics: Metrics,
    progress: Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>>,
    /// Most bytes per second a download started by this handle may take (prefetches).
    download_rate: Option<u64>,
    /// Warm-hit answers by normalised reference, valid while the index is unchanged.
    memo: Arc<AnswerMemo<Fetched>>,
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
            config,
            resolutions: SingleFlight::default(),
            downloads: SingleFlight::default(),
            metrics,
            progress: Arc::default(),
            download_rate: None,
            memo: Arc::default(),
        }
    }

    /// The same fetcher (shared runs in flight, store and metrics) whose own downloads take
    /// at most `bytes_per_second`; prefetches use one so they leave bandwidth to on-demand
    /// fetches.
    pub fn with_download_rate(&self, bytes_per_second: Option<u64>) -> Fetcher {
        Fetcher {
            download_rate: bytes_per_second.filter(|rate| *rate > 0),
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

    /// Runs a full eviction pass (age and size) off the async threads, counting what it
    /// evicted; failures are logged, as eviction is best effort.
    pub async fn evict(&self, incoming: u64) -> Vec<store::Evicted> {
        self.make_room(incoming, true).await
    }

    /// Makes room for `incoming` bytes: a full pass with `full`, else the cheap check that
    /// runs around every download and only evicts past the high watermark.
    async fn make_room(&self, incoming: u64, full: bool) -> Vec<store::Evicted> {
        let store = self.store.clone();
        let budget = self.config.budget();
        let result = tokio::task::spawn_blocking(move || {
            if full {
                store.evict(&budget, incoming)
            } else {
                store.make_room(&budget, incoming)
            }
        })
        .await;
        match result {
            Ok(Ok(evicted)) => {
                for module in &evicted {
                    self.metrics.evicted(module.reason.as_str(), module.size);
                }
                evicted
            }
            Ok(Err(error)) => {
                warn!(error = %error_chain(&error), "eviction failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics this fetcher records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Returns `reference`'s module under `policy`, pulling it if needed.
    ///
    /// A cached digest reference never needs the registry; a tag is re-resolved when the
    /// policy says so. When the registry is unreachable or failing and the tag was resolved
    /// before, the last known module is returned with `stale` set.
    #[instrument(level = "debug", skip_all, fields(reference = %reference, ?policy, digest, cache_hit, stale, bytes))]
    pub async fn fetch(&self, reference: &Reference, policy: PullPolicy) -> Result<Fetched> {
        let started = std::time::Instant::now();
        let result = self.fetch_uninstrumented(reference, policy).await;
        if let Ok(fetched) = &result {
            // Handed out by path: protected from eviction for `path_grace`.
            self.store.touch(&fetched.digest);
        }
        let span = Span::current();
        let (outcome, format) = match &result {
            Ok(fetched) if fetched.stale => ("stale", fetched.format.as_str()),
            Ok(fetched) if fetched.cache_hit => ("hit", fetched.format.as_str()),
            Ok(fetched) => ("download", fetched.format.as_str()),
            Err(_) => ("error", "unknown"),
        };
        self.metrics
            .fetch_done(outcome, format, started.elapsed().as_secs_f64());
        match &result {
            Ok(fetched) => {
                span.record("digest", tracing::field::display(&fetched.digest));
                span.record("cache_hit", fetched.cache_hit);
                span.record("stale", fetched.stale);
                span.record("bytes", fetched.size);
                debug!(
                    duration_us = started.elapsed().as_micros() as u64,
                    "fetched"
                );
            }
            Err(error) => {
                debug!(duration_us = started.elapsed().as_micros() as u64, error = %error_chain(error), "fetch failed");
            }
        }
        result
    }

    async fn fetch_uninstrumented(
        &self,
        reference: &Reference,
        policy: PullPolicy,
    ) -> Result<Fetched> {
        let name = reference.to_string();
        if let Some(fetched) = self.answer_from_cache(reference, &name, policy)? {
            return Ok(fetched);
        }
        if policy == PullPolicy::Never {
            return Err(Error::NotCached { reference: name });
        }
        let key = format!("{name}|{policy:?}");
        let (flight, joined) = self.resolutions.run(
            key,
            || {
                let this = self.clone();
                let reference = reference.clone();
                async move { this.resolve(&reference, policy).await }
            },
            {
                let name = name.clone();
                move || Error::TaskFailed { reference: name }
            },
        );
        if joined {
            self.metrics.joined();
        }
        flight.await.map_err(Error::from_shared)
    }

    /// The cached answer, if the policy allows one without asking the registry.
    fn answer_from_cache(
        &self,
        reference: &Reference,
        name: &str,
        policy: PullPolicy,
    ) -> Result<Option<Fetched>> {
        let is_tag = reference.digest().is_none();
        if is_tag && policy == PullPolicy::Always {
            return Ok(None);
        }
        let generation = self.store.index().generation();
        let found = match self.memo.get(name, generation) {
            Some(fetched) if self.store.has_blob(&fetched.digest) => Some(fetched),
            _ => {
                let found = self
                    .read_answer(reference, name)
                    .map_err(|source| Error::Store {
                        reference: name.to_owned(),
                        source,
                    })?;
                if let Some(fetched) = &found {
                    self.memo.offer(name, generation, fetched);
                }
                found
            }
        };
        Ok(found.filter(|fetched| self.fresh_enough(is_tag, policy, fetched.resolved_at)))
    }

    /// Whether a cached answer resolved at `resolved_at` may be given under `policy` without
    /// asking the registry: always for a digest reference; for a tag, never under `ALWAYS`
    /// and under `IF_NOT_PRESENT` only within `tag_ttl`.
    pub fn fresh_enough(&self, is_tag: bool, policy: PullPolicy, resolved_at: u64) -> bool {
        if !is_tag {
            return true;
        }
        let age = store::now().saturating_sub(resolved_at);
        match policy {
            PullPolicy::Always => false,
            PullPolicy::IfNotPresent => age < self.config.tag_ttl.as_secs(),
            PullPolicy::Never => true,
        }
    }

    /// Counts a warm hit that an API answered from its own memo without calling
    /// [`Fetcher::fetch`], and protects the module as a hit by `fetch` does.
    pub fn answered_from_memory(
        &self,
        digest: &Digest,
        format: &'static str,
        started: std::time::Instant,
    ) {
        self.store.touch(digest);
        self.metrics
            .fetch_done("hit", format, started.elapsed().as_secs_f64());
    }

    /// What the index holds for `reference`, whatever its age.
    fn read_answer(
        &self,
        reference: &Reference,
        name: &str,
    ) -> Result<Option<Fetched>, store::Error> {
        match reference.digest() {
            Some(digest) => lookup(&self.store, name, digest, None),
            None => lookup_reference(&self.store, name),
        }
    }

    /// One resolution at the registry, shared by every caller waiting for `reference`.
    async fn resolve(&self, reference: &Reference, policy: PullPolicy) -> Result<Fetched> {
        let name = reference.to_string();
        // A run that finished just before this one may have made the answer fresh.
        if let Some(fetched) = self.answer_from_cache(reference, &name, policy)? {
            return Ok(fetched);
        }
        match self.pull(reference).await {
            Ok(fetched) => Ok(fetched),
            Err(error) if error.is_transient() => {
                let record = self.store.index().reference(&name).ok().flatten();
                let last_known = record.and_then(|record| {
                    lookup(
                        &self.store,
                        &name,
                        &record.manifest_digest,
                        record.index_digest.as_ref(),
                    )
                    .ok()
                    .flatten()
                    .map(|fetched| Fetched {
                        resolved_at: record.resolved_at,
                        stale: true,
                        ..fetched
                    })
                });
                match last_known {
                    Some(fetched) => {
                        warn!(reference = %name, error = %error_chain(&error),
                              "registry failing; serving the last known module");
                        Ok(fetched)
                    }
                    None => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// The store modules are pulled into.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolves `reference` at its registry and makes sure its module is stored.
    ///
    /// A digest reference whose manifest is known is answered without the network; a tag is
    /// always resolved, but no blob is downloaded when the module is already stored.
    #[instrument(skip_all, fields(reference = %reference, digest))]
    pub async fn pull(&self, reference: &Reference) -> Result<Fetched> {
        let name = reference.to_string();
        if let Some(digest) = reference.digest() {
            if let Some(fetched) = self.cached_manifest(&name, digest, None)? {
                Span::current().record("digest", tracing::field::display(&fetched.digest));
                debug!("digest reference answered from the cache");
                return Ok(fetched);
            }
        }
        let limits = self.config.limits;
        let (mut bytes, mut manifest_digest) = self
            .registry
            .fetch_manifest(reference, limits.max_manifest_bytes)
            .await
            .map_err(|source| registry_error(&name, source))?;
        let mut index_digest = None;
        let mut parsed = self.parse(&name, &bytes)?;
        if let Parsed::Index { chosen } = parsed {
            debug!(platform = ?chosen.platform, digest = %chosen.digest, "chose index entry");
            let entry = chosen.digest.parse::<Digest>().map_err(|_| Error::Format {
                reference: name.clone(),
                source: format::Error::Malformed(format!(
                    "index entry digest '{}' is not a sha256 digest",
                    chosen.digest
                )),
            })?;
            if let Some(fetched) = self.cached_manifest(&name, &entry, Some(&manifest_digest))? {
                return Ok(fetched);
            }
            let (entry_bytes, entry_digest) = self
                .registry
                .fetch_manifest(&reference.with_digest(entry), limits.max_manifest_bytes)
                .await
                .map_err(|source| registry_error(&name, source))?;
            if entry_bytes.len() as u64 != chosen.size {
                return Err(Error::SizeMismatch {
                    reference: name,
                    digest: chosen.digest,
                    expected: chosen.size,
                    actual: entry_bytes.len() as u64,
                });
            }
            index_digest = Some(manifest_digest);
            (bytes, manifest_digest) = (entry_bytes, entry_digest);
            parsed = self.parse(&name, &bytes)?;
            if let Parsed::Index { chosen } = parsed {
                return Err(Error::NestedIndex {
                    reference: name,
                    digest: chosen.digest,
                });
            }
        }
        if let Some(fetched) =
            self.cached_manifest(&name, &manifest_digest, index_digest.as_ref())?
        {
            Span::current().record("digest", tracing::field::display(&fetched.digest));
            return Ok(fetched);
        }
        let Parsed::Image(plan) = parsed else {
            unreachable!("indexes were resolved above")
        };
        // Artifacts keep their manifest so the OCI view can serve it as published. Only the
        // wasme config is read now (it holds metadata); a CNCF config is fetched when the view
        // is first asked for it, so a plain pull costs one manifest and one blob request.
        let artifact = matches!(plan.format, Format::CncfWasm | Format::Wasme);
        let config_bytes = match (&plan.config, plan.format) {
            (Some(config), Format::Wasme) => self
                .fetch_document(reference, config)
                .await
                .inspect_err(|error| {
                    warn!(error = %error_chain(error), "wasme config unreadable; metadata left out")
                })
                .ok(),
            _ => None,
        };
        let wasme = match (plan.format, &config_bytes) {
            (Format::Wasme, Some(bytes)) => format::parse_wasme_config(bytes)
                .inspect_err(|error| warn!(%error, "unreadable wasme config; metadata left out"))
                .ok(),
            _ => None,
        };
        let (digest, size, layer, cache_hit) = self.store_module(reference, &name, &plan).await?;
        Span::current().record("digest", tracing::field::display(&digest));

        let index = self.store.index();
        let store_error = |source| Error::Store {
            reference: name.clone(),
            source,
        };
        if artifact {
            index
                .put_document(&manifest_digest.to_string(), &bytes)
                .map_err(store_error)?;
        }
        if let (Some(config), Some(bytes)) = (&plan.config, &config_bytes) {
            index
                .put_document(&config.digest, bytes)
                .map_err(store_error)?;
        }
        let config_digest = plan
            .config
            .as_ref()
            .filter(|_| artifact)
            .map(|config| config.digest.clone());
        self.store.add_module(&digest, size).map_err(store_error)?;
        if plan.layers[0].1 != LayerEncoding::Raw {
            index.put_layer(&layer, &digest).map_err(store_error)?;
        }
        let record = ManifestRecord {
            module_digest: digest.clone(),
            format: plan.format,
            layer_digest: layer,
            wasme: wasme.clone(),
            media_type: plan.media_type.clone(),
            config_digest,
            served: artifact,
        };
        index
            .put_manifest(&manifest_digest, &record)
            .map_err(store_error)?;
        self.record_reference(&name, &manifest_digest, index_digest.as_ref())?;
        info!(%digest, size, format = %plan.format, cache_hit, "module stored");
        Ok(Fetched {
            reference: name.clone(),
            manifest_digest,
            index_digest,
            path: self.store.blob_path(&digest),
            digest,
            size,
            format: plan.format,
            cache_hit,
            stale: false,
            resolved_at: store::now(),
            wasme,
        })
    }

    fn parse(&self, name: &str, bytes: &[u8]) -> Result<Parsed> {
        let limit = self.config.limits.max_layers;
        format::parse(bytes, format::host_architecture(), limit).map_err(|source| Error::Format {
            reference: name.to_owned(),
            source,
        })
    }

    /// Answers from the index when `manifest_digest` is known and its module is on disk.
    fn cached_manifest(
        &self,
        name: &str,
        manifest_digest: &Digest,
        index_digest: Option<&Digest>,
    ) -> Result<Option<Fetched>> {
        let found = lookup(&self.store, name, manifest_digest, index_digest).map_err(|source| {
            Error::Store {
                reference: name.to_owned(),
                source,
            }
        })?;
        if found.is_some() {
            self.record_reference(name, manifest_digest, index_digest)?;
        }
        Ok(found)
    }

    fn record_reference(
        &self,
        name: &str,
        manifest_digest: &Digest,
        index_digest: Option<&Digest>,
    ) -> Result<()> {
        let index = self.store.index();
        let record = ReferenceRecord {
            manifest_digest: manifest_digest.clone(),
            index_digest: index_digest.cloned(),
            resolved_at: store::now(),
        };
        index
            .put_reference(name, &record)
            .and_then(|()| index.flush())
            .map_err(|source| Error::Store {
                reference: name.to_owned(),
                source,
            })
    }

    /// Reads a small blob (a config) from `reference`'s repository, checked against its
    /// descriptor and bounded by `max_manifest_bytes`.
    pub async fn fetch_document(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
    ) -> Result<Vec<u8>> {
        let name = reference.to_string();
        let limit = self.config.limits.max_manifest_bytes;
        if descriptor.size > limit {
            return Err(Error::ModuleTooLarge {
                reference: name,
                size: descriptor.size,
                limit,
            });
        }
        let mut blob = self
            .registry
            .blob_stream(
                reference,
                &descriptor.digest,
                registry::Hosts::MirrorsThenOrigin,
            )
            .await
            .map_err(|source| registry_error(&name, source))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = blob.stream.next().await {
            let chunk = chunk.map_err(|error| {
                stream_error(
                    &name,
                    descriptor,
                    bytes.len() as u64,
                    error,
                    reference.registry(),
                )
            })?;
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > descriptor.size {
                break;
            }
        }
        if bytes.len() as u64 != descriptor.size {
            return Err(Error::SizeMismatch {
                reference: name,
                digest: descriptor.digest.clone(),
                expected: descriptor.size,
                actual: bytes.len() as u64,
            });
        }
        let actual = Digest::of(&bytes).to_string();
        if actual != descriptor.digest {
            return Err(Error::DigestMismatch {
                reference: name,
                what: "blob",
                expected: descriptor.digest.clone(),
                actual,
            });
        }
        self.metrics.downloaded(bytes.len() as u64);
        Ok(bytes)
    }

    /// Gets the module of `plan` into the store; returns its digest, size, the layer it
    /// came from, and whether it was already there.
    async fn store_module(
        &self,
        reference: &Reference,
        name: &str,
        plan: &ModulePlan,
    ) -> Result<(Digest, u64, String, bool)> {
        let limits = self.config.limits;
        let store_error = |source| Error::Store {
            reference: name.to_owned(),
            source,
        };
        let mut files_seen = Vec::new();
        for (layer, encoding) in &plan.layers {
            if *encoding == LayerEncoding::Raw {
                if layer.size > limits.max_module_bytes {
                    return Err(Error::ModuleTooLarge {
                        reference: name.to_owned(),
                        size: layer.size,
                        limit: limits.max_module_bytes,
                    });
                }
                let expected = format::sha256_of(layer).ok_or_else(|| Error::Format {
                    reference: name.to_owned(),
                    source: format::Error::Malformed(format!(
                        "module layer digest '{}' is not a sha256 digest",
                        layer.digest
                    )),
                })?;
                if let Some(record) = self.store.index().module(&expected).map_err(store_error)? {
                    if self.store.has_blob(&expected) {
                        return Ok((expected, record.size, layer.digest.clone(), true));
                    }
                }
                let (digest, size) = self
                    .download_once(reference, name, layer, *encoding)
                    .await?
                    .expect("raw layers always yield a module");
                return Ok((digest, size, layer.digest.clone(), false));
            }
            if let Some(module) = self
                .store
                .index()
                .layer(&layer.digest)
                .map_err(store_error)?
            {
                if let Some(record) = self.store.index().module(&module).map_err(store_error)? {
                    if self.store.has_blob(&module) {
                        return Ok((module, record.size, layer.digest.clone(), true));
                    }
                }
            }
            match self.download(reference, name, layer, *encoding).await {
                Ok(Some((digest, size))) => return Ok((digest, size, layer.digest.clone(), false)),
                Ok(None) => {}
                Err(Error::NoModule { files, .. }) => files_seen.push(files),
                Err(error) => return Err(error),
            }
        }
        Err(Error::NoModule {
            reference: name.to_owned(),
            layers: plan
                .layers
                .iter()
                .map(|(l, _)| l.digest.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            files: files_seen.join(", "),
        })
    }

    /// [`Fetcher::download`], shared with concurrent downloads of the same layer and limited
    /// to `max_concurrent_downloads` at a time.
    async fn download_once(
        &self,
        reference: &Reference,
        name: &str,
        layer: &Descriptor,
        encoding: LayerEncoding,
    ) -> Result<Option<(Digest, u64)>> {
        let (flight, joined) = self.downloads.run(
            layer.digest.clone(),
            || {
                let this = self.clone();
                let reference = reference.clone();
                let name = name.to_owned();
                let layer = layer.clone();
                async move {
                    let _permit = this
                        .download_permits
                        .acquire()
                        .await
                        .expect("the download semaphore is never closed");
                    // Make room first, so the budget is never overshot by more than the
                    // module in flight; a full disk gets one more eviction and one retry.
                    this.make_room(layer.size, false).await;
                    let result = match this.download(&reference, &name, &layer, encoding).await {
                        Err(error) if error.is_disk_full() => {
                            warn!(reference = %name, "disk full; evicting and retrying once");
                            this.make_room(layer.size.saturating_mul(2), true).await;
                            this.download(&reference, &name, &layer, encoding).await
                        }
                        other => other,
                    };
                    this.make_room(0, false).await;
                    result
                }
            },
            {
                let name = name.to_owned();
                move || Error::TaskFailed { reference: name }
            },
        );
        if joined {
            self.metrics.joined();
        }
        flight.await.map_err(Error::from_shared)
    }

    /// Streams one layer from the registry into the store.
    ///
    /// The network is read here; a blocking thread hashes and writes (raw) or decompresses
    /// and extracts (tar). The layer's size and digest are checked before the module is
    /// committed, so a bad layer leaves nothing behind.
    async fn download(
        &self,
        reference: &Reference,
        name: &str,
        layer: &Descriptor,
        encoding: LayerEncoding,
    ) -> Result<Option<(Digest, u64)>> {
        let mut mirror = None;
        let hosts = registry::Hosts::MirrorsThenOrigin;
        match self
            .download_from(reference, name, layer, encoding, hosts, &mut mirror)
            .await
        {
            // A mirror is trusted for availability only: whatever went wrong with its bytes,
            // the registry itself gets the last word.
            Err(error) if mirror.is_some() && !matches!(error, Error::Store { .. }) => {
                warn!(
                    reference = %name,
                    mirror = mirror.as_deref().unwrap_or_default(),
                    error = %error_chain(&error),
                    "the mirror's blob was refused; downloading it from the registry"
                );
                let hosts = registry::Hosts::OriginOnly;
                self.download_from(reference, name, layer, encoding, hosts, &mut mirror)
                    .await
            }
            other => other,
        }
    }

    /// [`Fetcher::download`] from `hosts`; notes in `mirror` which mirror served the blob.
    async fn download_from(
        &self,
        reference: &Reference,
        name: &str,
        layer: &Descriptor,
        encoding: LayerEncoding,
        hosts: registry::Hosts,
        mirror: &mut Option<String>,
    ) -> Result<Option<(Digest, u64)>> {
        let limits = self.config.limits;
        let validate = self.config.validate_wasm;
        // A raw layer is the module, and the ingest hashes it and checks the layer digest
        // before committing, so it need not be hashed on the way in as well.
        let blob = match encoding {
            LayerEncoding::Raw if format::sha256_of(layer).is_some() => {
                self.registry
                    .blob_stream_checked_by_caller(reference, &layer.digest, layer.size, hosts)
                    .await
            }
            _ => {
                self.registry
                    .blob_stream(reference, &layer.digest, hosts)
                    .await
            }
        };
        let mut blob = blob.map_err(|source| registry_error(name, source))?;
        mirror.clone_from(&blob.mirror);
        debug!(layer = %layer.digest, size = layer.size, ?encoding, "downloading layer");

        let (sender, receiver) = mpsc::channel::<Bytes>(PIPE_CHUNKS);
        let writer = {
            let name = name.to_owned();
            let layer_digest = layer.digest.clone();
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                let new_ingest = || {
                    store
                        .begin_ingest(limits.max_module_bytes)
                        .map(|ingest| ModuleIngest::new(ingest, validate))
                        .map_err(|source| Error::Store {
                            reference: name.clone(),
                            source,
                        })
                };
                let mut reader = ChannelReader::new(receiver);
                let result = match encoding {
                    LayerEncoding::Raw => new_ingest()
                        .and_then(|ingest| write_raw(&mut reader, ingest, &name))
                        .map(Some),
                    LayerEncoding::Tar | LayerEncoding::TarGzip => extract(
                        &mut reader,
                        &new_ingest,
                        encoding == LayerEncoding::TarGzip,
                        &name,
                        &layer_digest,
                        &limits,
                    ),
                };
                // Whatever happened, let the network side finish so it can verify the layer.
                reader.drain();
                result
            })
        };

        let mut received: u64 = 0;
        let mut network_error = None;
        let started = std::time::Instant::now();
        while let Some(chunk) = blob.stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    network_error = Some(error);
                    break;
                }
            };
            received += chunk.len() as u64;
            self.progress
                .lock()
                .expect("progress map poisoned")
                .insert(name.to_owned(), (received, layer.size));
            if received > layer.size {
                network_error = Some(io::Error::other("longer than its descriptor"));
                break;
            }
            if let Some(rate) = self.download_rate {
                // Keep the average at `rate`: sleep until this many bytes are due.
                let due = std::time::Duration::from_secs_f64(received as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if sender.send(chunk).await.is_err() {
                // The writer stopped early with an error of its own; report that one.
                break;
            }
        }
        drop(sender);
        self.progress
            .lock()
            .expect("progress map poisoned")
            .remove(name);
        self.metrics.downloaded(received);
        let written = writer.await.expect("layer writer panicked");

        if let Some(error) = network_error {
            return Err(stream_error(
                name,
                layer,
                received,
                error,
                reference.registry(),
            ));
        }
        let written = written?;
        if received != layer.size {
            return Err(Error::SizeMismatch {
                reference: name.to_owned(),
                digest: layer.digest.clone(),
                expected: layer.size,
                actual: received,
            });
        }
        let Some(module) = written else {
            return Ok(None);
        };
        // A raw layer is the module, so the ingest must hash to the layer digest.
        let expected = match encoding {
            LayerEncoding::Raw => format::sha256_of(layer),
            _ => None,
        };
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let check_name = name.clone();
            let ModuleIngest { ingest, sections } = module;
            store
                .commit(ingest, expected.as_ref(), move |_| {
                    check_wasm(sections, &check_name).map_err(CommitError::Fetch)
                })
                .map_err(|error: CommitError| match error {
                    CommitError::Store(store::Error::DigestMismatch { expected, actual }) => {
                        Error::DigestMismatch {
                            reference: name.clone(),
                            what: "blob",
                            expected: expected.to_string(),
                            actual: actual.to_string(),
                        }
                    }
                    CommitError::Store(source) => Error::Store {
                        reference: name.clone(),
                        source,
                    },
                    CommitError::Fetch(error) => error,
                })
        })
        .await
        .expect("commit panicked")
        .map(Some)
    }
}

/// What the index knows about `manifest_digest`, if its module is on disk.
pub fn lookup(
    store: &Store,
    name: &str,
    manifest_digest: &Digest,
    index_digest: Option<&Digest>,
) -> Result<Option<Fetched>, store::Error> {
    let index = store.index();
    let Some(record) = index.manifest(manifest_digest)? else {
        return Ok(None);
    };
    let Some(module) = index.module(&record.module_digest)? else {
        return Ok(None);
    };
    if !store.has_blob(&record.module_digest) {
        return Ok(None);
    }
    Ok(Some(Fetched {
        reference: name.to_owned(),
        manifest_digest: manifest_digest.clone(),
        index_digest: index_digest.cloned(),
        path: store.blob_path(&record.module_digest),
        digest: record.module_digest,
        size: module.size,
        format: record.format,
        cache_hit: true,
        stale: false,
        resolved_at: 0,
        wasme: record.wasme,
    }))
}

/// What the cache holds for one reference (normalised text), without scanning the others.
pub fn lookup_reference(store: &Store, name: &str) -> Result<Option<Fetched>, store::Error> {
    let Some(record) = store.index().reference(name)? else {
        return Ok(None);
    };
    let found = lookup(
        store,
        name,
        &record.manifest_digest,
        record.index_digest.as_ref(),
    )?;
    Ok(found.map(|entry| Fetched {
        resolved_at: record.resolved_at,
        ..entry
    }))
}

/// Every cached reference whose module is on disk, in reference order.
pub fn list(store: &Store) -> Result<Vec<Fetched>, store::Error> {
    let mut entries = Vec::new();
    for (name, record) in store.index().references()? {
        if let Some(entry) = lookup(
            store,
            &name,
            &record.manifest_digest,
            record.index_digest.as_ref(),
        )? {
            entries.push(Fetched {
                resolved_at: record.resolved_at,
                ..entry
            });
        }
    }
    Ok(entries)
}

/// Errors of the commit step: the store's own, or the Wasm check's.
enum CommitError {
    Store(store::Error),
    Fetch(Error),
}

impl From<store::Error> for CommitError {
    fn from(error: store::Error) -> Self {
        CommitError::Store(error)
    }
}

/// An error and its sources on one line, `a: b: c`, for logs and API messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn registry_error(name: &str, source: registry::Error) -> Error {
    Error::Registry {
        reference: name.to_owned(),
        source,
    }
}

/// Classifies an error from the middle of a blob stream.
fn stream_error(
    name: &str,
    layer: &Descriptor,
    received: u64,
    error: io::Error,
    registry: &str,
) -> Error {
    if received > layer.size {
        return Error::SizeMismatch {
            reference: name.to_owned(),
            digest: layer.digest.clone(),
            expected: layer.size,
            actual: received,
        };
    }
    let inner = error.into_inner();
    if let Some(inner) = &inner {
        if let Some(oci_client::errors::DigestError::VerificationError { expected, actual }) =
            inner.downcast_ref::<oci_client::errors::DigestError>()
        {
            // oci-client reports the `Docker-Content-Digest` header as `expected` whenever the
            // registry sent one; the descriptor's digest is the one that matters.
            if *actual == layer.digest {
                return Error::Registry {
                    reference: name.to_owned(),
                    source: registry::Error::DigestMismatch {
                        registry: registry.to_owned(),
                        expected: expected.clone(),
                        actual: format!("{actual} (Docker-Content-Digest header of blob)"),
                    },
                };
            }
            return Error::DigestMismatch {
                reference: name.to_owned(),
                what: "blob",
                expected: layer.digest.clone(),
                actual: actual.clone(),
            };
        }
    }
    let message = inner.map_or_else(|| "stream ended".to_owned(), |e| e.to_string());
    Error::Registry {
        reference: name.to_owned(),
        source: registry::Error::Protocol {
            registry: registry.to_owned(),
            message: format!(
                "blob {} broke off after {received} of {} bytes: {message}",
                layer.digest, layer.size
            ),
        },
    }
}

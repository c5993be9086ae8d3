//! Downloading: which layer to get (skipping what is stored), one download per layer in
//! flight (raw or tar, every layer takes this one path), at most `max_concurrent_downloads` at
//! once (prefetches' downloads within their share of them), room made in the budget before
//! and after, one evict-and-retry on a full disk, the prefetch rate limit, mirrors before the
//! registry (a mirror's bad bytes are fetched once more from the registry), and the commit
//! into the store. Network reads run here; hashing, writing and decompressing run on a
//! blocking thread (`layer.rs`). Every download ends within `fetch_timeout`.

use std::io;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{debug, warn};

use super::error::{registry_error, stream_error, Error, Result};
use super::layer::{check_wasm, extract, unbox, write_raw, ChannelReader, ModuleIngest};
use super::{error_chain, Fetcher};
use crate::digest::Digest;
use crate::format::{self, Descriptor, LayerEncoding, ModulePlan};
use crate::reference::Reference;
use crate::registry;
use crate::store;

/// Chunks buffered between the network and the writer thread.
const PIPE_CHUNKS: usize = 64;

/// One layer to download, and for which reference (named in errors and logs).
#[derive(Clone)]
pub(super) struct LayerDownload {
    pub(super) reference: Reference,
    /// The reference as normalised.
    pub(super) name: String,
    pub(super) layer: Descriptor,
    pub(super) encoding: LayerEncoding,
}

impl Fetcher {
    /// Runs a full eviction pass (age and size) off the async threads, counting what it
    /// evicted; failures are logged, as eviction is best effort.
    pub async fn evict(&self, incoming: u64) -> Vec<store::Evicted> {
        self.make_room(incoming, true).await
    }

    /// Makes room for `incoming` bytes: a full pass with `full`, else the cheap check that
    /// runs around every download and only evicts past the high watermark.
    pub(super) async fn make_room(&self, incoming: u64, full: bool) -> Vec<store::Evicted> {
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

    /// Reads a small blob (a config) from `reference`'s repository, checked against its
    /// descriptor and bounded by `max_manifest_bytes` and `fetch_timeout`.
    pub async fn fetch_document(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
    ) -> Result<Vec<u8>> {
        let read = self.read_document(reference, descriptor);
        self.within_fetch_timeout(reference, read).await
    }

    async fn read_document(
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
    pub(super) async fn store_module(
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
            // What is already stored is not downloaded again: a raw layer is the module, an
            // image layer maps to the module extracted from it before.
            let stored = if *encoding == LayerEncoding::Raw {
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
                let size = self.store.stored_module(&expected).map_err(store_error)?;
                size.map(|size| (expected, size))
            } else {
                self.store
                    .module_of_layer(&layer.digest)
                    .map_err(store_error)?
            };
            if let Some((digest, size)) = stored {
                return Ok((digest, size, layer.digest.clone(), true));
            }
            // Every layer, raw or tar, goes through the one download path.
            let job = LayerDownload {
                reference: reference.clone(),
                name: name.to_owned(),
                layer: layer.clone(),
                encoding: *encoding,
            };
            match self.download_once(job).await {
                Ok(Some((digest, size))) => return Ok((digest, size, layer.digest.clone(), false)),
                Ok(None) => {}
                Err(error) => match error.root() {
                    Error::NoModule { files, .. } => files_seen.push(files.clone()),
                    _ => return Err(error),
                },
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

    /// For a prefetch, one of the prefetches' share of the download permits; `None` for an
    /// on-demand fetch. A prefetch takes it before its download starts or joins a run, and
    /// the run it starts holds it until it ends: a prefetch waiting for its share is not in
    /// flight, so an on-demand fetch of the same layer starts a run of its own instead of
    /// queueing behind it.
    pub(super) async fn prefetch_share(&self) -> Option<OwnedSemaphorePermit> {
        if !self.prefetching {
            return None;
        }
        let permits = self.prefetch_download_permits.clone();
        let permit = permits.acquire_owned().await;
        Some(permit.expect("the prefetch download semaphore is never closed"))
    }

    /// [`Fetcher::download`], shared with concurrent downloads of the same layer and limited
    /// to `max_concurrent_downloads` at a time, of which prefetches hold at most their share.
    /// A raw layer that peers rank before this daemon is asked of them first, in a run of its
    /// own; when no peer had it, the registry run follows, the one a peer's request for the
    /// layer would join.
    pub(super) async fn download_once(&self, job: LayerDownload) -> Result<Option<(Digest, u64)>> {
        let name = job.name.clone();
        let via_peers = self.peers.as_ref().is_some_and(|peers| {
            job.encoding == LayerEncoding::Raw && !peers.candidates(&job.layer.digest).is_empty()
        });
        if via_peers {
            let share = self.prefetch_share().await;
            let (flight, joined) = self.peer_downloads.run(
                job.layer.digest.clone(),
                || {
                    let (this, job) = (self.clone(), job.clone());
                    async move {
                        let _share = share;
                        let _permit = this
                            .download_permits
                            .acquire()
                            .await
                            .expect("the download semaphore is never closed");
                        this.make_room(job.layer.size, false).await;
                        let result = this.layer_from_peers(&job).await.transpose();
                        this.make_room(0, false).await;
                        result
                    }
                },
                {
                    let name = name.clone();
                    move || Error::TaskFailed { reference: name }
                },
            );
            if joined {
                self.metrics.joined();
            }
            if let Some(stored) = flight.await.map_err(Error::from_shared)? {
                return Ok(stored);
            }
        }
        let share = self.prefetch_share().await;
        let (flight, joined) = self.downloads.run(
            job.layer.digest.clone(),
            || {
                let this = self.clone();
                async move {
                    let _share = share;
                    let LayerDownload {
                        reference, layer, ..
                    } = &job;
                    // A run that ended since the caller looked may have stored it.
                    let stored = (job.encoding == LayerEncoding::Raw)
                        .then(|| format::sha256_of(layer))
                        .flatten()
                        .and_then(|digest| Some((digest.clone(), this.store.blob_size(&digest)?)));
                    if let Some(stored) = stored {
                        return Ok(Some(stored));
                    }
                    let _permit = this
                        .download_permits
                        .acquire()
                        .await
                        .expect("the download semaphore is never closed");
                    // Make room first, so the budget is never overshot by more than the
                    // module in flight; a full disk gets one more eviction and one retry.
                    // Each attempt ends within `fetch_timeout`.
                    let attempt = || this.within_fetch_timeout(reference, this.download(&job));
                    this.make_room(layer.size, false).await;
                    let result = match attempt().await {
                        Err(error) if error.is_disk_full() => {
                            warn!(reference = %job.name, layer = %layer.digest,
                                  "disk full; evicting and retrying once");
                            this.make_room(layer.size.saturating_mul(2), true).await;
                            attempt().await
                        }
                        other => other,
                    };
                    this.make_room(0, false).await;
                    result
                }
            },
            move || Error::TaskFailed { reference: name },
        );
        if joined {
            self.metrics.joined();
        }
        flight.await.map_err(Error::from_shared)
    }

    /// Runs `work` for `reference`, failing with [`Error::Timeout`] past `fetch_timeout`.
    pub(super) async fn within_fetch_timeout<T>(
        &self,
        reference: &Reference,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = self.config.fetch_timeout;
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    reference: reference.to_string(),
                    registry: reference.registry().to_owned(),
                    timeout,
                })
            })
    }

    /// Streams one layer into the store: from the mirrors first, then (if a mirror's bytes
    /// were bad) once more from the registry.
    ///
    /// The network is read here; a blocking thread hashes and writes (raw) or decompresses
    /// and extracts (tar). The layer's size and digest are checked before the module is
    /// committed, so a bad layer leaves nothing behind (an abandoned ingest, on a timeout
    /// say, deletes its temp file).
    async fn download(&self, job: &LayerDownload) -> Result<Option<(Digest, u64)>> {
        let mut mirror = None;
        let hosts = registry::Hosts::MirrorsThenOrigin;
        match self.download_from(job, hosts, &mut mirror).await {
            // A mirror is trusted for availability only: whatever went wrong with its bytes,
            // the registry itself gets the last word.
            Err(error) if mirror.is_some() && !matches!(error, Error::Store { .. }) => {
                warn!(
                    reference = %job.name,
                    mirror = mirror.as_deref().unwrap_or_default(),
                    error = %error_chain(&error),
                    "the mirror's blob was refused; downloading it from the registry"
                );
                let hosts = registry::Hosts::OriginOnly;
                self.download_from(job, hosts, &mut mirror).await
            }
            other => other,
        }
    }

    /// [`Fetcher::download`] from `hosts`; notes in `mirror` which mirror served the blob.
    async fn download_from(
        &self,
        job: &LayerDownload,
        hosts: registry::Hosts,
        mirror: &mut Option<String>,
    ) -> Result<Option<(Digest, u64)>> {
        let LayerDownload {
            reference,
            name,
            layer,
            encoding,
        } = job;
        // A raw layer is the module, and the ingest hashes it and checks the layer digest
        // before committing, so it need not be hashed on the way in as well.
        let blob = match encoding {
            LayerEncoding::Raw if format::sha256_of(layer).is_some() => {
                self.registry
                    .blob_stream_checked_by_caller(reference, &layer.digest, hosts)
                    .await
            }
            _ => {
                self.registry
                    .blob_stream(reference, &layer.digest, hosts)
                    .await
            }
        };
        let blob = blob.map_err(|source| registry_error(name, source))?;
        mirror.clone_from(&blob.mirror);
        self.ingest(job, blob).await
    }

    /// Streams `blob`, the bytes of `job`'s layer, into the store; see
    /// [`Fetcher::download`].
    pub(super) async fn ingest(
        &self,
        job: &LayerDownload,
        mut blob: registry::BlobStream,
    ) -> Result<Option<(Digest, u64)>> {
        let LayerDownload {
            reference,
            name,
            layer,
            encoding,
        } = job;
        let (name, encoding) = (name.as_str(), *encoding);
        let limits = self.config.limits;
        let validate = self.config.validate_wasm;
        debug!(layer = %layer.digest, size = layer.size, ?encoding, source = ?blob.mirror, "downloading layer");

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
                    LayerEncoding::Sniffed => unbox(&mut reader, &new_ingest, &name, &limits),
                };
                // Whatever happened, let the network side finish so it can verify the layer.
                reader.drain();
                result
            })
        };

        // An HTTP source's body has no descriptor: `layer.size` is its limit, and the total
        // shown in progress is what the server announced.
        let sniffed = encoding == LayerEncoding::Sniffed;
        let total = match sniffed {
            true => blob.content_length.unwrap_or(0),
            false => layer.size,
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
                .insert(name.to_owned(), (received, total));
            if received > layer.size && sniffed {
                drop(sender);
                let _ = writer.await;
                self.progress
                    .lock()
                    .expect("progress map poisoned")
                    .remove(name);
                return Err(Error::ModuleTooLarge {
                    reference: name.to_owned(),
                    size: received,
                    limit: layer.size,
                });
            }
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
        if received != layer.size && !sniffed {
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

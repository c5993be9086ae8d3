//! Fetching through peers, and fetching for them.
//!
//! As a client: a manifest is asked of the peers that rank before this daemon for the
//! reference, a raw layer of those that rank before it for the layer digest; on any failure
//! the next is asked, then the registry (bad bytes from a peer go straight to the registry).
//!
//! As a server: a peer's request is answered from the cache or by this daemon's own registry
//! fetch ([`Fetcher::direct`]), never by another peer. Runs that go straight to the registry
//! are the only ones a peer's request joins, so two daemons with different views of the
//! membership cannot wait on each other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::error::{registry_error, Error, Result};
use super::{error_chain, Fetcher};
use crate::digest::Digest;
use crate::format::{Descriptor, LayerEncoding};
use crate::peers::Peers;
use crate::reference::Reference;
use crate::registry;

/// Most manifests kept to answer peers.
const MAX_KEPT_MANIFESTS: usize = 1024;

/// Manifests this daemon resolved at the registry, kept to answer peers for `tag_ttl`.
#[derive(Default)]
pub(super) struct KeptManifests {
    entries: Mutex<HashMap<String, (Bytes, Digest, Instant)>>,
}

impl KeptManifests {
    /// The manifest resolved for `name` at or after `since` (`None`: within `max_age`).
    fn resolved_since(
        &self,
        name: &str,
        since: Option<Instant>,
        max_age: Duration,
    ) -> Option<(Bytes, Digest)> {
        let entries = self.entries.lock().expect("kept manifests poisoned");
        let (bytes, digest, at) = entries.get(name)?;
        let fresh = match since {
            Some(since) => *at >= since,
            None => at.elapsed() < max_age,
        };
        fresh.then(|| (bytes.clone(), digest.clone()))
    }

    fn keep(&self, name: &str, bytes: &Bytes, digest: &Digest, max_age: Duration) {
        let mut entries = self.entries.lock().expect("kept manifests poisoned");
        if entries.len() >= MAX_KEPT_MANIFESTS {
            entries.retain(|_, (_, _, at)| at.elapsed() < max_age);
            if entries.len() >= MAX_KEPT_MANIFESTS {
                entries.clear();
            }
        }
        entries.insert(
            name.to_owned(),
            (bytes.clone(), digest.clone(), Instant::now()),
        );
    }
}

impl Fetcher {
    /// The same fetcher asking `peers` first (none: the registry only).
    pub fn with_peers(&self, peers: Option<Peers>) -> Fetcher {
        Fetcher {
            peers,
            ..self.clone()
        }
    }

    /// The same fetcher without peers: what answers a peer's request.
    pub fn direct(&self) -> Fetcher {
        self.with_peers(None)
    }

    /// The peers this fetcher asks, if any.
    pub fn peers(&self) -> Option<&Peers> {
        self.peers.as_ref()
    }

    /// `reference`'s manifest: from the peers that rank before this daemon, else from the
    /// registry. `fresh`: a tag must be resolved now (pull policy `ALWAYS`), not answered
    /// from what a peer resolved within `tag_ttl`.
    pub(super) async fn manifest(
        &self,
        reference: &Reference,
        fresh: bool,
    ) -> Result<(Bytes, Digest)> {
        let name = reference.to_string();
        let limit = self.config.limits.max_manifest_bytes;
        if let Some(peers) = &self.peers {
            for peer in peers.candidates(&name) {
                match peers.manifest(&peer, reference, limit, fresh).await {
                    Ok(found) => return Ok(found),
                    Err(crate::peers::Error::NotFound { what, .. }) => {
                        return Err(registry_error(
                            &name,
                            registry::Error::NotFound {
                                registry: reference.registry().to_owned(),
                                what,
                            },
                        ))
                    }
                    Err(error) => {
                        info!(%peer, reference = %name, error = %error_chain(&error),
                              "peer failed; asking the next");
                    }
                }
            }
        }
        // A tag resolved here within `tag_ttl` (for a peer, or a moment ago) does unless the
        // policy wants it resolved now.
        let since = fresh.then(Instant::now);
        self.direct_manifest(reference, since).await
    }

    /// One resolution of `reference` at the registry at a time, shared by this daemon's
    /// pulls and its peers' requests; the answer is kept for peers for `tag_ttl`. A caller
    /// that came at `since` takes an answer resolved since then (by a run that ended between
    /// its look at the kept answers and this one) as it would join a run in flight.
    async fn direct_manifest(
        &self,
        reference: &Reference,
        since: Option<Instant>,
    ) -> Result<(Bytes, Digest)> {
        let name = reference.to_string();
        // A caller that needs a fresh answer never joins a run that may give a kept one.
        let (flight, joined) = self.manifests.run(
            format!("{name}|{}", since.is_some()),
            || {
                let this = self.clone();
                let reference = reference.clone();
                async move {
                    let name = reference.to_string();
                    let ttl = this.config.tag_ttl;
                    if let Some(found) = this.kept.resolved_since(&name, since, ttl) {
                        return Ok(found);
                    }
                    let limit = this.config.limits.max_manifest_bytes;
                    let (bytes, digest) = this
                        .registry
                        .fetch_manifest(&reference, limit)
                        .await
                        .map_err(|source| registry_error(&name, source))?;
                    this.kept.keep(&name, &bytes, &digest, this.config.tag_ttl);
                    Ok((bytes, digest))
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
        flight.await.map_err(Error::from_shared)
    }

    /// A manifest for a peer: what this daemon resolved within `tag_ttl` (unless `fresh`),
    /// a kept document for a digest, else this daemon's own registry fetch. Bounded by
    /// `fetch_timeout`.
    pub async fn manifest_for_peer(
        &self,
        reference: &Reference,
        fresh: bool,
    ) -> Result<(Bytes, Digest)> {
        let since = fresh.then(Instant::now);
        if let Some(digest) = reference.digest() {
            let kept = self.store.document(&digest.to_string()).ok().flatten();
            if let Some(bytes) = kept.filter(|bytes| Digest::of(bytes) == *digest) {
                return Ok((Bytes::from(bytes), digest.clone()));
            }
        }
        let direct = self.direct();
        self.within_fetch_timeout(reference, direct.direct_manifest(reference, since))
            .await
    }

    /// Makes sure blob `digest` (a raw module layer of `size` bytes in `reference`'s
    /// repository) is stored, for a peer: this daemon's own download from the registry,
    /// shared with its own pulls of the same layer.
    pub async fn blob_for_peer(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        if self.store.has_blob(digest) {
            return Ok(());
        }
        let limit = self.config.limits.max_module_bytes;
        if size > limit {
            return Err(Error::ModuleTooLarge {
                reference: reference.to_string(),
                size,
                limit,
            });
        }
        let job = super::download::LayerDownload {
            reference: reference.clone(),
            name: reference.to_string(),
            layer: Descriptor {
                media_type: String::new(),
                digest: digest.to_string(),
                size,
                platform: None,
            },
            encoding: LayerEncoding::Raw,
        };
        let stored = self.direct().download_once(job).await?;
        if let Some((module, size)) = stored {
            self.store
                .record_module(&module, size)
                .map_err(|source| Error::Store {
                    reference: reference.to_string(),
                    source,
                })?;
        }
        Ok(())
    }

    /// A raw layer from the peers that rank before this daemon for its digest. `None`: no
    /// peer had it (or this daemon owns it); the caller downloads it from the registry.
    pub(super) async fn layer_from_peers(
        &self,
        job: &super::download::LayerDownload,
    ) -> Option<Result<Option<(Digest, u64)>>> {
        let peers = self.peers.as_ref()?;
        if job.encoding != LayerEncoding::Raw {
            return None;
        }
        for peer in peers.candidates(&job.layer.digest) {
            let opened = peers
                .blob(&peer, &job.reference, &job.layer.digest, job.layer.size)
                .await;
            let blob = match opened {
                Ok(blob) => blob,
                Err(error) => {
                    info!(%peer, layer = %job.layer.digest, error = %error_chain(&error),
                          "peer failed; asking the next");
                    continue;
                }
            };
            let attempt = self.within_fetch_timeout(&job.reference, self.ingest(job, blob));
            match attempt.await {
                Ok(stored) => {
                    peers.outcome(&peer, "served");
                    debug!(%peer, layer = %job.layer.digest, "layer from a peer");
                    return Some(Ok(stored));
                }
                // This daemon's own failure (disk, budget) is not the peer's.
                Err(error @ Error::Store { .. }) => return Some(Err(error)),
                Err(error) => {
                    let result = match error {
                        Error::DigestMismatch { .. }
                        | Error::SizeMismatch { .. }
                        | Error::NotWasm { .. }
                        | Error::Layer { .. } => "refused_bytes",
                        _ => "failed",
                    };
                    peers.outcome(&peer, result);
                    warn!(%peer, layer = %job.layer.digest, error = %error_chain(&error),
                          "the peer's blob was refused; downloading it from the registry");
                    return None;
                }
            }
        }
        None
    }
}

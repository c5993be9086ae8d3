//! Modules served over HTTP(S), as Istio's and Envoy's `http(s)://` module URLs: the body
//! is the module, a gzip of it, or a tar (or tar+gzip) holding one `.wasm` file; it is
//! stored by the module's sha256, shared with OCI pulls of the same bytes. A URL is re-checked
//! like a tag (after `tag_ttl`, or under `ALWAYS`) with `If-None-Match`, so an unchanged
//! module is not downloaded again; a 5xx or a broken connection is retried with backoff.
//!
//! The pull is recorded like a manifest's: a small JSON note of the URL, its ETag and module
//! ([`UrlNote`]), kept in the store under its own digest, is what the reference resolves to.

use std::time::Duration;

use tracing::{debug, info, warn};

use super::download::LayerDownload;
use super::error::{registry_error, Error, Result};
use super::{error_chain, Fetched, Fetcher};
use crate::digest::Digest;
use crate::format::{Descriptor, Format, LayerEncoding};
use crate::reference::Reference;
use crate::registry::UrlAnswer;
use crate::store::{ManifestRecord, PullRecord};

/// Attempts at a URL that answers 5xx or breaks off (all within `fetch_timeout`).
const ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled before each next one.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// What the store keeps about a URL's last answer.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct UrlNote {
    url: String,
    etag: Option<String>,
    module: String,
    size: u64,
}

impl Fetcher {
    /// Gets the module at `reference`'s URL into the store (or learns that the one known is
    /// unchanged) and records it under the reference, unless it is not `expected`.
    pub(super) async fn pull_url(
        &self,
        reference: &Reference,
        expected: Option<&Digest>,
    ) -> Result<Fetched> {
        let name = reference.to_string();
        let store_error = |source| Error::Store {
            reference: name.clone(),
            source,
        };
        // The last answer, for its ETag, while its module is still stored.
        let known = self
            .store
            .lookup_reference(&name)
            .map_err(store_error)?
            .filter(|fetched| fetched.format == Format::Http);
        let etag = known.as_ref().and_then(|fetched| {
            let bytes = self
                .store
                .document(&fetched.manifest_digest.to_string())
                .ok()??;
            serde_json::from_slice::<UrlNote>(&bytes).ok()?.etag
        });
        // The resolution's own caller may not wait: the check runs under the resolution.
        let _share = self.prefetch_share().await;
        let _permit = self
            .download_permits
            .acquire()
            .await
            .expect("the download semaphore is never closed");
        let answer = self.get_url_retrying(reference, etag.as_deref()).await?;
        let (etag, blob) = match answer {
            UrlAnswer::NotModified => {
                let Some(known) = known.filter(|_| etag.is_some()) else {
                    return Err(registry_error(
                        &name,
                        crate::registry::Error::Protocol {
                            registry: reference.registry().to_owned(),
                            message: "304 Not Modified to a request that was not conditional"
                                .into(),
                        },
                    ));
                };
                self.check_expected(&name, &known, expected)?;
                debug!(reference = %name, "module unchanged (304)");
                let resolved_at = self
                    .store
                    .record_resolution(&name, &known.manifest_digest, None)
                    .map_err(store_error)?;
                return Ok(Fetched {
                    resolved_at,
                    cache_hit: true,
                    stale: false,
                    ..known
                });
            }
            UrlAnswer::Body { etag, blob } => (etag, blob),
        };
        let limit = self.config.limits.max_module_bytes;
        if let Some(length) = blob.content_length.filter(|length| *length > limit) {
            return Err(Error::ModuleTooLarge {
                reference: name,
                size: length,
                limit,
            });
        }
        let job = LayerDownload {
            reference: reference.clone(),
            name: name.clone(),
            layer: Descriptor {
                media_type: String::new(),
                digest: String::new(),
                size: limit,
                platform: None,
            },
            encoding: LayerEncoding::Sniffed,
        };
        self.make_room(blob.content_length.unwrap_or(0), false)
            .await;
        let stored = self.ingest(&job, blob).await;
        self.make_room(0, false).await;
        let (digest, size) = stored?.ok_or_else(|| Error::NoModule {
            reference: name.clone(),
            layers: "the body".into(),
            files: String::new(),
        })?;
        let cache_hit = known.as_ref().is_some_and(|known| known.digest == digest);
        let proxy_wasm_abi = self.module_abi(&name, &digest, None).await?;
        let note = UrlNote {
            url: name.clone(),
            etag,
            module: digest.to_string(),
            size,
        };
        let note = serde_json::to_vec(&note).expect("a URL note serialises");
        let note_digest = Digest::of(&note);
        let fetched = Fetched {
            signature: None,
            reference: name.clone(),
            manifest_digest: note_digest.clone(),
            index_digest: None,
            resolved_digest: digest.clone(),
            path: self.store.blob_path(&digest),
            digest: digest.clone(),
            size,
            format: Format::Http,
            cache_hit,
            stale: false,
            resolved_at: 0,
            wasme: None,
            proxy_wasm_abi: proxy_wasm_abi.clone(),
        };
        self.check_expected(&name, &fetched, expected)?;
        let resolved_at = self
            .store
            .record_pull(&PullRecord {
                reference: &name,
                manifest_digest: &note_digest,
                index_digest: None,
                manifest: ManifestRecord {
                    module_digest: digest.clone(),
                    format: Format::Http,
                    layer_digest: digest.to_string(),
                    wasme: None,
                    media_type: "application/wasm".into(),
                    config_digest: None,
                    served: false,
                    proxy_wasm_abi,
                },
                module_size: size,
                image_layer: false,
                documents: vec![(note_digest.to_string(), &note[..])],
            })
            .map_err(store_error)?;
        info!(%digest, size, format = "http", cache_hit, "module stored");
        Ok(Fetched {
            resolved_at,
            ..fetched
        })
    }

    /// The URL's answer; a 5xx, 429 or broken connection is tried again after a backoff, up
    /// to [`ATTEMPTS`] times.
    async fn get_url_retrying(
        &self,
        reference: &Reference,
        etag: Option<&str>,
    ) -> Result<UrlAnswer> {
        let name = reference.to_string();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.registry.get_url(reference, etag).await {
                Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                    warn!(reference = %name, attempt, error = %error_chain(&error),
                          "module URL failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                other => return other.map_err(|source| registry_error(&name, source)),
            }
        }
    }

    /// Fails with [`Error::UnexpectedDigest`] when `expected` is set and is neither the
    /// module's digest nor what the reference resolved to.
    pub(super) fn check_expected(
        &self,
        name: &str,
        fetched: &Fetched,
        expected: Option<&Digest>,
    ) -> Result<()> {
        match expected {
            Some(expected) if !matches_expected(fetched, expected) => {
                Err(Error::UnexpectedDigest {
                    reference: name.to_owned(),
                    expected: expected.to_string(),
                    module: fetched.digest.to_string(),
                    resolved: fetched.resolved_digest.to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Whether `expected` names `fetched`: its module, or the manifest or index its reference
/// resolved to (what a WasmPlugin's `sha256` names for `oci://` URLs).
pub(super) fn matches_expected(fetched: &Fetched, expected: &Digest) -> bool {
    [
        &fetched.digest,
        &fetched.resolved_digest,
        &fetched.manifest_digest,
    ]
    .contains(&expected)
}

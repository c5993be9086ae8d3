//! Resolution: reference → manifest (through an image index to the platform's manifest) →
//! packaging → the module stored (by `download.rs`) → the pull recorded in the store. A
//! manifest already known is answered from the store without downloading anything.

use tracing::{debug, info, instrument, warn, Span};

use super::error::{Error, Result};
use super::{error_chain, Fetched, Fetcher};
use crate::digest::Digest;
use crate::format::{self, Format, LayerEncoding, Parsed};
use crate::reference::Reference;
use crate::store::{ManifestRecord, PullRecord};

impl Fetcher {
    /// Resolves `reference` at its registry and makes sure its module is stored.
    ///
    /// A digest reference whose manifest is known is answered without the network; a tag is
    /// always resolved, but no blob is downloaded when the module is already stored.
    #[instrument(skip_all, fields(reference = %reference, digest))]
    pub async fn pull(&self, reference: &Reference) -> Result<Fetched> {
        self.pull_fresh(reference, false).await
    }

    /// [`Fetcher::pull`]; with `fresh`, a tag is resolved now even if a peer resolved it
    /// within `tag_ttl` (pull policy `ALWAYS`).
    pub(super) async fn pull_fresh(&self, reference: &Reference, fresh: bool) -> Result<Fetched> {
        self.pull_checked(reference, fresh, None).await
    }

    /// [`Fetcher::pull_fresh`] of a module that must be `expected` (see
    /// [`Fetcher::fetch_expecting`]): checked before anything is recorded under the
    /// reference.
    pub(super) async fn pull_checked(
        &self,
        reference: &Reference,
        fresh: bool,
        expected: Option<&Digest>,
    ) -> Result<Fetched> {
        if reference.url().is_some() {
            return self.pull_url(reference, expected).await;
        }
        let name = reference.to_string();
        if let Some(digest) = reference.digest() {
            if let Some(fetched) = self.cached_manifest(&name, digest, None, expected)? {
                self.check_signature(reference, digest).await?;
                Span::current().record("digest", tracing::field::display(&fetched.digest));
                debug!("digest reference answered from the cache");
                return Ok(fetched);
            }
        }
        let (mut bytes, mut manifest_digest) = self.manifest(reference, fresh).await?;
        // What the reference resolved to (an index's own digest) is what a signature signs;
        // it is checked before anything is downloaded or recorded.
        self.check_signature(reference, &manifest_digest).await?;
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
            let cached = self.cached_manifest(&name, &entry, Some(&manifest_digest), expected)?;
            if let Some(fetched) = cached {
                return Ok(fetched);
            }
            let (entry_bytes, entry_digest) =
                self.manifest(&reference.with_digest(entry), fresh).await?;
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
            self.cached_manifest(&name, &manifest_digest, index_digest.as_ref(), expected)?
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
        let proxy_wasm_abi = self.module_abi(&name, &digest, wasme.as_ref()).await?;

        let resolved_digest = index_digest
            .clone()
            .unwrap_or_else(|| manifest_digest.clone());
        let fetched = Fetched {
            signature: None,
            reference: name.clone(),
            resolved_digest,
            manifest_digest: manifest_digest.clone(),
            index_digest: index_digest.clone(),
            path: self.store.blob_path(&digest),
            digest: digest.clone(),
            size,
            format: plan.format,
            cache_hit,
            stale: false,
            resolved_at: 0,
            wasme: wasme.clone(),
            proxy_wasm_abi: proxy_wasm_abi.clone(),
        };
        self.check_expected(&name, &fetched, expected)?;

        let manifest_key = manifest_digest.to_string();
        let mut documents = Vec::new();
        if artifact {
            documents.push((manifest_key, &bytes[..]));
        }
        if let (Some(config), Some(config_bytes)) = (&plan.config, &config_bytes) {
            documents.push((config.digest.clone(), &config_bytes[..]));
        }
        let config_digest = plan
            .config
            .as_ref()
            .filter(|_| artifact)
            .map(|config| config.digest.clone());
        let resolved_at = self
            .store
            .record_pull(&PullRecord {
                reference: &name,
                manifest_digest: &manifest_digest,
                index_digest: index_digest.as_ref(),
                manifest: ManifestRecord {
                    module_digest: digest.clone(),
                    format: plan.format,
                    layer_digest: layer,
                    wasme: wasme.clone(),
                    media_type: plan.media_type.clone(),
                    config_digest,
                    served: artifact,
                    proxy_wasm_abi,
                },
                module_size: size,
                image_layer: plan.layers[0].1 != LayerEncoding::Raw,
                documents,
            })
            .map_err(|source| Error::Store {
                reference: name.clone(),
                source,
            })?;
        info!(%digest, size, format = %plan.format, cache_hit, "module stored");
        Ok(Fetched {
            resolved_at,
            ..fetched
        })
    }

    /// The proxy-wasm ABI versions module `digest` exports, read from its file; a wasme
    /// config claiming one it does not export is a warning, and under `require_proxy_wasm` a
    /// module exporting none is refused before anything is recorded.
    pub(super) async fn module_abi(
        &self,
        name: &str,
        digest: &Digest,
        wasme: Option<&format::WasmeMetadata>,
    ) -> Result<Vec<String>> {
        let path = self.store.blob_path(digest);
        let exported = tokio::task::spawn_blocking(move || {
            std::fs::read(&path)
                .map(|bytes| crate::wasm::proxy_wasm_abi(&bytes))
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        if let Some(wasme) = wasme {
            let unclaimed = crate::wasm::unclaimed_abi(&wasme.abi_versions, &exported);
            if !unclaimed.is_empty() {
                warn!(reference = %name, %digest, ?unclaimed, ?exported,
                      "the wasme config claims proxy-wasm ABI versions the module does not export");
            }
        }
        if exported.is_empty() && self.config.require_proxy_wasm {
            return Err(Error::NotProxyWasm {
                reference: name.to_owned(),
                digest: digest.to_string(),
            });
        }
        Ok(exported)
    }

    fn parse(&self, name: &str, bytes: &[u8]) -> Result<Parsed> {
        let limit = self.config.limits.max_layers;
        format::parse(bytes, format::host_architecture(), limit).map_err(|source| Error::Format {
            reference: name.to_owned(),
            source,
        })
    }

    /// Answers from the index when `manifest_digest` is known and its module is on disk.
    /// (When the module is not `expected`, fails before recording anything.)
    fn cached_manifest(
        &self,
        name: &str,
        manifest_digest: &Digest,
        index_digest: Option<&Digest>,
        expected: Option<&Digest>,
    ) -> Result<Option<Fetched>> {
        let store_error = |source| Error::Store {
            reference: name.to_owned(),
            source,
        };
        let found = self
            .store
            .lookup_manifest(name, manifest_digest, index_digest)
            .map_err(store_error)?;
        let Some(found) = found else {
            return Ok(None);
        };
        self.check_expected(name, &found, expected)?;
        let resolved_at = self
            .store
            .record_resolution(name, manifest_digest, index_digest)
            .map_err(store_error)?;
        Ok(Some(Fetched {
            resolved_at,
            ..found
        }))
    }
}

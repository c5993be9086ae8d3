//! The pull pipeline: reference → manifest → packaging → verified module in the store.
//!
//! [`Fetcher::pull`] resolves a reference to a manifest (through an image index if needed),
//! recognises the packaging, and gets the module bytes into the store: a raw module layer is
//! streamed straight into an ingest file; a tar or tar+gzip layer is streamed through a
//! decompressor and `plugin.wasm` is copied out of it. Network reads run on the async side,
//! hashing and writing on a blocking thread, so the two overlap. Nothing is downloaded when
//! the module is already stored under any name.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, instrument, Span};

use crate::config::Config;
use crate::digest::Digest;
use crate::format::{self, Descriptor, Format, LayerEncoding, ModulePlan, Parsed, WasmeMetadata};
use crate::reference::Reference;
use crate::registry::{self, RegistryClient};
use crate::store::{self, Ingest, ManifestRecord, ReferenceRecord, Store};

/// Chunks buffered between the network and the writer thread.
const PIPE_CHUNKS: usize = 64;
/// The file name Istio's `docker build` flow puts the module under.
const PLUGIN_FILE_NAME: &str = "plugin.wasm";
/// How many file names of a layer an error message lists.
const MAX_FILES_REPORTED: usize = 20;
/// Wasm binary magic number.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// Version field of a core module.
const WASM_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];
/// Version and layer fields of a component.
const WASM_COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

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
    #[error("pulling {reference}: module is {size} bytes, over the limit of {limit}")]
    ModuleTooLarge {
        /// The reference.
        reference: String,
        /// Its size (or the size known so far).
        size: u64,
        /// The limit.
        limit: u64,
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
    #[error("pulling {reference}: no {PLUGIN_FILE_NAME} or single *.wasm file in layers [{layers}]; files seen: [{files}]")]
    NoModule {
        /// The reference.
        reference: String,
        /// Layers searched.
        layers: String,
        /// Regular files seen in them (first few).
        files: String,
    },
    /// Several `*.wasm` files and no `plugin.wasm`.
    #[error("pulling {reference}: layer {layer} holds several *.wasm files [{files}] and no {PLUGIN_FILE_NAME}")]
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
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Pulls modules into the store; cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    registry: RegistryClient,
    store: Store,
    config: Arc<Config>,
}

impl Fetcher {
    /// A fetcher pulling with `registry` into `store`.
    pub fn new(registry: RegistryClient, store: Store, config: Arc<Config>) -> Fetcher {
        Fetcher {
            registry,
            store,
            config,
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
        let wasme = match (plan.format, &plan.config) {
            (Format::Wasme, Some(config)) => self.wasme_metadata(reference, config).await,
            _ => None,
        };
        let (digest, size, layer, cache_hit) = self.store_module(reference, &name, &plan).await?;
        Span::current().record("digest", tracing::field::display(&digest));

        let index = self.store.index();
        let store_error = |source| Error::Store {
            reference: name.clone(),
            source,
        };
        index.put_module(&digest, size).map_err(store_error)?;
        if plan.layers[0].1 != LayerEncoding::Raw {
            index.put_layer(&layer, &digest).map_err(store_error)?;
        }
        let record = ManifestRecord {
            module_digest: digest.clone(),
            format: plan.format,
            layer_digest: layer,
            wasme: wasme.clone(),
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
            wasme,
        })
    }

    fn parse(&self, name: &str, bytes: &[u8]) -> Result<Parsed> {
        format::parse(bytes, format::host_architecture()).map_err(|source| Error::Format {
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

    /// Reads the wasme config blob; metadata is informative, so failures only log.
    async fn wasme_metadata(
        &self,
        reference: &Reference,
        config: &Descriptor,
    ) -> Option<WasmeMetadata> {
        let limit = self.config.limits.max_manifest_bytes;
        if config.size > limit {
            debug!(
                size = config.size,
                "wasme config over the manifest limit; skipped"
            );
            return None;
        }
        let result = async {
            let mut blob = self
                .registry
                .blob_stream(reference, &config.digest)
                .await
                .ok()?;
            let mut bytes = Vec::new();
            while let Some(chunk) = blob.stream.next().await {
                bytes.extend_from_slice(&chunk.ok()?);
                if bytes.len() as u64 > limit {
                    return None;
                }
            }
            Some(bytes)
        }
        .await;
        match result.map(|bytes| format::parse_wasme_config(&bytes)) {
            Some(Ok(metadata)) => Some(metadata),
            _ => {
                tracing::warn!(config = %config.digest, "could not read the wasme config; metadata left out");
                None
            }
        }
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
                    .download(reference, name, layer, *encoding)
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
        let limits = self.config.limits;
        let validate = self.config.validate_wasm;
        let mut blob = self
            .registry
            .blob_stream(reference, &layer.digest)
            .await
            .map_err(|source| registry_error(name, source))?;
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
                        limits.max_layer_bytes,
                    ),
                };
                // Whatever happened, let the network side finish so it can verify the layer.
                reader.drain();
                result
            })
        };

        let mut received: u64 = 0;
        let mut network_error = None;
        while let Some(chunk) = blob.stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    network_error = Some(error);
                    break;
                }
            };
            received += chunk.len() as u64;
            if received > layer.size {
                network_error = Some(io::Error::other("longer than its descriptor"));
                break;
            }
            if sender.send(chunk).await.is_err() {
                // The writer stopped early with an error of its own; report that one.
                break;
            }
        }
        drop(sender);
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
        let Some(ingest) = written else {
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
            store
                .commit(ingest, expected.as_ref(), |path| {
                    check_wasm(path, validate, &check_name).map_err(CommitError::Fetch)
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
        wasme: record.wasme,
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
            entries.push(entry);
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

/// Copies a raw module layer into the ingest.
fn write_raw(reader: &mut ChannelReader, mut ingest: Ingest, name: &str) -> Result<Ingest> {
    let mut buffer = vec![0; 256 << 10];
    loop {
        let n = reader.read(&mut buffer).expect("channel reads cannot fail");
        if n == 0 {
            return Ok(ingest);
        }
        if let Err(error) = ingest.write_all(&buffer[..n]) {
            return Err(ingest_error(error, &ingest, name));
        }
    }
}

fn ingest_error(error: io::Error, ingest: &Ingest, name: &str) -> Error {
    if Ingest::is_limit_error(&error) {
        Error::ModuleTooLarge {
            reference: name.to_owned(),
            size: ingest.written() + 1,
            limit: ingest.written(),
        }
    } else {
        Error::Store {
            reference: name.to_owned(),
            source: store::Error::Io {
                action: "write",
                path: PathBuf::from("ingest file"),
                source: error,
            },
        }
    }
}

/// Finds the module in a tar layer and copies it into `ingest`.
///
/// Returns `Ok(None)` when the layer holds no module (the caller tries the next layer). The
/// rest of the layer is drained so the network side can verify its digest.
fn extract(
    reader: &mut ChannelReader,
    new_ingest: &dyn Fn() -> Result<Ingest>,
    gzip: bool,
    name: &str,
    layer: &str,
    limit: u64,
) -> Result<Option<Ingest>> {
    let result = {
        let decoded: Box<dyn Read + '_> = if gzip {
            Box::new(flate2::read::GzDecoder::new(&mut *reader))
        } else {
            Box::new(&mut *reader)
        };
        let limited = LimitedReader {
            inner: decoded,
            remaining: limit,
        };
        find_module(tar::Archive::new(limited), new_ingest, name, layer)
    };
    match result {
        Err(Error::Layer { source, .. }) if is_read_limit(&source) => Err(Error::LayerTooLarge {
            reference: name.to_owned(),
            layer: layer.to_owned(),
            limit,
        }),
        other => other,
    }
}

fn find_module<R: Read>(
    mut archive: tar::Archive<R>,
    new_ingest: &dyn Fn() -> Result<Ingest>,
    name: &str,
    layer: &str,
) -> Result<Option<Ingest>> {
    let layer_error = |source| Error::Layer {
        reference: name.to_owned(),
        layer: layer.to_owned(),
        source,
    };
    let mut files = Vec::new();
    let mut wasm_files: Vec<String> = Vec::new();
    // A lone `*.wasm` is kept as a candidate; `plugin.wasm` wins over it, a second one
    // makes the layer ambiguous.
    let mut candidate = None;
    for entry in archive.entries().map_err(layer_error)? {
        let mut entry = entry.map_err(layer_error)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(layer_error)?.into_owned();
        let Some(path) = safe_path(&path) else {
            debug!(path = %path.display(), "ignoring tar entry outside the archive root");
            continue;
        };
        let display = path.display().to_string();
        if files.len() < MAX_FILES_REPORTED {
            files.push(display.clone());
        }
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if base == PLUGIN_FILE_NAME {
            let mut ingest = new_ingest()?;
            copy_entry(&mut entry, &mut ingest, name, layer)?;
            return Ok(Some(ingest));
        }
        if !base.ends_with(".wasm") {
            continue;
        }
        wasm_files.push(display);
        candidate = match wasm_files.len() {
            1 => {
                let mut ingest = new_ingest()?;
                copy_entry(&mut entry, &mut ingest, name, layer)?;
                Some(ingest)
            }
            _ => None,
        };
    }
    match wasm_files.len() {
        0 => Err(Error::NoModule {
            reference: name.to_owned(),
            layers: layer.to_owned(),
            files: files.join(", "),
        }),
        1 => Ok(candidate),
        _ => Err(Error::AmbiguousModule {
            reference: name.to_owned(),
            layer: layer.to_owned(),
            files: wasm_files.join(", "),
        }),
    }
}

fn copy_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    ingest: &mut Ingest,
    name: &str,
    layer: &str,
) -> Result<()> {
    let mut buffer = vec![0; 256 << 10];
    loop {
        let n = entry.read(&mut buffer).map_err(|source| Error::Layer {
            reference: name.to_owned(),
            layer: layer.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        ingest
            .write_all(&buffer[..n])
            .map_err(|error| ingest_error(error, ingest, name))?;
    }
}

/// The entry's path relative to the archive root, or `None` if it climbs out of it.
fn safe_path(path: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// Checks the magic number and version, then (when enabled) validates the whole module.
fn check_wasm(path: &Path, validate: bool, name: &str) -> Result<()> {
    let not_wasm = |reason: String| Error::NotWasm {
        reference: name.to_owned(),
        digest: "(being stored)".to_owned(),
        reason,
    };
    let read_error = |source| Error::Store {
        reference: name.to_owned(),
        source: store::Error::Io {
            action: "read",
            path: path.to_owned(),
            source,
        },
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut header = [0u8; 8];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]).map_err(read_error)? {
            0 => break,
            n => filled += n,
        }
    }
    if filled < 8 || &header[..4] != WASM_MAGIC {
        return Err(not_wasm(format!(
            "does not start with the Wasm magic number 00 61 73 6d (first bytes: {})",
            hex::encode(&header[..filled])
        )));
    }
    let version: [u8; 4] = header[4..].try_into().expect("four bytes");
    if version != WASM_MODULE_VERSION && version != WASM_COMPONENT_VERSION {
        return Err(not_wasm(format!(
            "unknown binary version {}",
            hex::encode(version)
        )));
    }
    if validate {
        let bytes = std::fs::read(path).map_err(read_error)?;
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&bytes)
            .map_err(|error| not_wasm(format!("validation failed: {error}")))?;
    }
    Ok(())
}

/// A blocking `Read` over chunks sent from the async side.
struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            receiver,
            current: Bytes::new(),
        }
    }

    /// Consumes whatever is still coming so the sender can finish its stream.
    fn drain(&mut self) {
        while self.receiver.blocking_recv().is_some() {}
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len());
        buffer[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Fails reads once more than `remaining` bytes have come out of `inner`.
struct LimitedReader<R> {
    inner: R,
    remaining: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("read limit reached")]
struct ReadLimit;

/// Whether `error` was raised by a [`LimitedReader`] running out.
fn is_read_limit(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<ReadLimit>().is_some())
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buffer)?;
        if n as u64 > self.remaining {
            return Err(io::Error::other(ReadLimit));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

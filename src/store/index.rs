//! The sled index: what the cache knows about references, manifests, layers and modules.
//! Private to the store: the rest of the crate goes through `Store`'s methods (`records.rs`).
//!
//! Four trees, each value a small JSON record:
//!
//! | tree         | key                          | value                                     |
//! |--------------|------------------------------|-------------------------------------------|
//! | `references` | normalised reference         | manifest digest, when it was resolved     |
//! | `manifests`  | manifest digest              | module digest, format, packaging metadata |
//! | `layers`     | layer digest (image layers)  | module digest extracted from it           |
//! | `modules`    | module digest                | size, created, last access                |
//! | `documents`  | manifest or config digest    | the raw bytes, as published               |
//! | `pins`       | normalised reference         | who pinned it (`api` or `list`)           |
//! | `signatures` | resolved digest `\|` key set  | the verified signature: key id, scope     |
//!
//! Records are written module first and reference last, so every lookup chain that starts at
//! a reference ends at a module record.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::digest::Digest;
use crate::format::{Format, WasmeMetadata};

/// sled's page cache: records are small and hot ones stay in the OS page cache anyway; sled's
/// default (1 GiB) lets a long-running daemon's memory grow with the number of entries read.
const INDEX_CACHE_BYTES: u64 = 8 << 20;

/// What a reference last resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceRecord {
    /// Digest of the manifest (of the chosen platform, for an index).
    pub manifest_digest: Digest,
    /// Digest of the image index the manifest was chosen from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// Unix time (seconds) of the resolution.
    pub resolved_at: u64,
}

/// What a manifest holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Digest of the module bytes.
    pub module_digest: Digest,
    /// The packaging.
    pub format: Format,
    /// Digest of the layer the module came from.
    pub layer_digest: String,
    /// wasme config fields, for wasme images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasme: Option<WasmeMetadata>,
    /// The manifest's media type.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the config document, when it is kept in `documents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Whether the manifest itself is kept in `documents` (artifact packagings only).
    #[serde(default)]
    pub served: bool,
    /// The proxy-wasm ABI versions the module exports (empty: none, or recorded before
    /// they were read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_wasm_abi: Vec<String>,
}

/// A module blob's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// Size in bytes.
    pub size: u64,
    /// Unix time (seconds) it was stored.
    pub created: u64,
    /// Unix time (seconds) it was last handed out.
    pub last_access: u64,
}

/// The sled database and its trees.
pub(super) struct Index {
    path: PathBuf,
    /// Bumped after every change to the records answers are built from (any record written;
    /// references, manifests, layers and modules removed), so that answers derived from the
    /// index can be kept in memory and known to be stale once it changes
    /// ([`Index::generation`]).
    generation: AtomicU64,
    db: sled::Db,
    references: sled::Tree,
    manifests: sled::Tree,
    layers: sled::Tree,
    modules: sled::Tree,
    documents: sled::Tree,
    pins: sled::Tree,
    signatures: sled::Tree,
}

/// A verified signature of a resolved digest under one key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureRecord {
    /// Whether a signature verified (`false`: served under a `warn` policy without one).
    pub verified: bool,
    /// The id of the key that verified it.
    pub key: String,
    /// The scope of the policy it was checked under.
    pub scope: String,
    /// The digest of the signature manifest that held it.
    pub signature: String,
}

/// Who pinned a reference: removing a reference from a prefetch list only undoes list pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinSource {
    /// Pinned through the API or CLI.
    Api,
    /// Pinned by a prefetch list entry.
    List,
}

/// Current Unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Index {
    pub(super) fn open(path: &Path) -> Result<Index> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(INDEX_CACHE_BYTES)
            .open()
            .map_err(|source| {
                let locked =
                    matches!(&source, sled::Error::Io(io) if io.to_string().contains("lock"));
                if locked {
                    Error::Locked {
                        path: path.to_owned(),
                    }
                } else {
                    Error::Index {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| Error::Index {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Index {
            path: path.to_owned(),
            generation: AtomicU64::new(0),
            references: tree("references")?,
            manifests: tree("manifests")?,
            layers: tree("layers")?,
            modules: tree("modules")?,
            documents: tree("documents")?,
            pins: tree("pins")?,
            signatures: tree("signatures")?,
            db,
        })
    }

    /// Changes whenever the index does. Read it *before* reading records: an answer built
    /// from those records is current for as long as the generation stays the same (a write
    /// bumps it only after it is done, so a read that saw the old generation is discarded).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// What `reference` (normalised text) last resolved to.
    pub fn reference(&self, reference: &str) -> Result<Option<ReferenceRecord>> {
        self.get(&self.references, reference)
    }

    /// Records what `reference` resolved to.
    pub fn put_reference(&self, reference: &str, record: &ReferenceRecord) -> Result<()> {
        self.put(&self.references, reference, record)
    }

    /// Forgets a reference; returns what it pointed to.
    pub fn remove_reference(&self, reference: &str) -> Result<Option<ReferenceRecord>> {
        let old = self
            .references
            .remove(reference)
            .map_err(|e| self.sled_error(e));
        self.changed();
        old?.map(|bytes| decode(reference, &bytes)).transpose()
    }

    /// Every reference with its record, in key order.
    pub fn references(&self) -> Result<Vec<(String, ReferenceRecord)>> {
        self.scan(&self.references)
    }

    /// The references starting with `prefix`, with their records, in key order.
    pub fn references_under(&self, prefix: &str) -> Result<Vec<(String, ReferenceRecord)>> {
        self.references
            .scan_prefix(prefix)
            .map(|item| {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let value = decode(&key, &value)?;
                Ok((key, value))
            })
            .collect()
    }

    /// What a manifest holds.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.get(&self.manifests, &digest.to_string())
    }

    /// Records what a manifest holds.
    pub fn put_manifest(&self, digest: &Digest, record: &ManifestRecord) -> Result<()> {
        self.put(&self.manifests, &digest.to_string(), record)
    }

    /// Every manifest with its record.
    pub fn manifests(&self) -> Result<Vec<(String, ManifestRecord)>> {
        self.scan(&self.manifests)
    }

    /// Forgets a manifest.
    pub fn remove_manifest(&self, digest: &str) -> Result<()> {
        let removed = self
            .manifests
            .remove(digest)
            .map_err(|e| self.sled_error(e));
        self.changed();
        removed?;
        Ok(())
    }

    /// The module extracted from an image layer before.
    pub fn layer(&self, layer_digest: &str) -> Result<Option<Digest>> {
        self.get(&self.layers, layer_digest)
    }

    /// Records the module extracted from an image layer.
    pub fn put_layer(&self, layer_digest: &str, module: &Digest) -> Result<()> {
        self.put(&self.layers, layer_digest, module)
    }

    /// Forgets every layer that maps to one of `modules`.
    pub fn remove_layers_of(&self, modules: &std::collections::HashSet<Digest>) -> Result<()> {
        for (layer, digest) in self.scan::<Digest>(&self.layers)? {
            if modules.contains(&digest) {
                let removed = self.layers.remove(layer).map_err(|e| self.sled_error(e));
                self.changed();
                removed?;
            }
        }
        Ok(())
    }

    /// A module's bookkeeping.
    pub fn module(&self, digest: &Digest) -> Result<Option<ModuleRecord>> {
        self.get(&self.modules, &digest.to_string())
    }

    /// Records a stored module (keeping its creation time if it was known).
    pub fn put_module(&self, digest: &Digest, size: u64) -> Result<ModuleRecord> {
        let now = now();
        let created = self.module(digest)?.map_or(now, |m| m.created);
        let record = ModuleRecord {
            size,
            created,
            last_access: now,
        };
        self.put(&self.modules, &digest.to_string(), &record)?;
        Ok(record)
    }

    /// Updates a module's last access time (kept if the record has a later one).
    pub fn set_last_access(&self, digest: &Digest, time: u64) -> Result<()> {
        if let Some(mut record) = self.module(digest)? {
            if time > record.last_access {
                record.last_access = time;
                self.put(&self.modules, &digest.to_string(), &record)?;
            }
        }
        Ok(())
    }

    /// Forgets a module record.
    pub fn remove_module(&self, digest: &Digest) -> Result<Option<ModuleRecord>> {
        let key = digest.to_string();
        let old = self.modules.remove(&key).map_err(|e| self.sled_error(e));
        self.changed();
        old?.map(|bytes| decode(&key, &bytes)).transpose()
    }

    /// Every module with its record.
    pub fn modules(&self) -> Result<Vec<(String, ModuleRecord)>> {
        self.scan(&self.modules)
    }

    /// A stored manifest or config, by digest (the caller checked the bytes against it).
    pub fn document(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let document = self.documents.get(digest).map_err(|e| self.sled_error(e))?;
        Ok(document.map(|bytes| bytes.to_vec()))
    }

    /// Stores a manifest or config whose bytes hash to `digest`.
    pub fn put_document(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.documents
            .insert(digest, bytes)
            .map_err(|e| self.sled_error(e))?;
        Ok(())
    }

    /// Forgets a stored document.
    pub fn remove_document(&self, digest: &str) -> Result<()> {
        self.documents
            .remove(digest)
            .map_err(|e| self.sled_error(e))?;
        Ok(())
    }

    /// The signature verified for `key` (resolved digest and key set), if any.
    pub fn signature(&self, key: &str) -> Result<Option<SignatureRecord>> {
        self.get(&self.signatures, key)
    }

    /// Keeps a verified signature.
    pub fn put_signature(&self, key: &str, record: &SignatureRecord) -> Result<()> {
        self.put(&self.signatures, key, record)
    }

    /// Every pinned reference and who pinned it.
    pub fn pins(&self) -> Result<Vec<(String, PinSource)>> {
        self.scan(&self.pins)
    }

    /// Who pinned `reference`, if anyone.
    pub fn pin(&self, reference: &str) -> Result<Option<PinSource>> {
        self.get(&self.pins, reference)
    }

    /// Pins `reference`; an API pin is never downgraded to a list pin.
    pub fn put_pin(&self, reference: &str, source: PinSource) -> Result<()> {
        if source == PinSource::List && self.pin(reference)? == Some(PinSource::Api) {
            return Ok(());
        }
        self.put(&self.pins, reference, &source)
    }

    /// Unpins `reference`; returns who had pinned it.
    pub fn remove_pin(&self, reference: &str) -> Result<Option<PinSource>> {
        let old = self
            .pins
            .remove(reference)
            .map_err(|e| self.sled_error(e))?;
        old.map(|bytes| decode(reference, &bytes)).transpose()
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(|e| self.sled_error(e))?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, tree: &sled::Tree, key: &str) -> Result<Option<T>> {
        let value = tree.get(key).map_err(|e| self.sled_error(e))?;
        value.map(|bytes| decode(key, &bytes)).transpose()
    }

    fn put<T: Serialize>(&self, tree: &sled::Tree, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).expect("index records serialise");
        let inserted = tree.insert(key, bytes).map_err(|e| self.sled_error(e));
        self.changed();
        inserted?;
        Ok(())
    }

    fn scan<T: DeserializeOwned>(&self, tree: &sled::Tree) -> Result<Vec<(String, T)>> {
        tree.iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| self.sled_error(e))?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let value = decode(&key, &value)?;
                Ok((key, value))
            })
            .collect()
    }

    fn sled_error(&self, source: sled::Error) -> Error {
        Error::Index {
            path: self.path.clone(),
            source,
        }
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|error| Error::Corrupt {
        key: key.to_owned(),
        reason: error.to_string(),
    })
}

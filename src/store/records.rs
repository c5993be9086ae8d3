//! What the index says, in the terms callers mean: recording a pull, looking a reference or a
//! manifest up, listing, pins, kept documents and usage. Write ordering and flushes live here
//! and nowhere else: a pull is recorded module first and reference last, then flushed, so
//! every lookup chain that starts at a reference ends at a module whose blob is stored.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::index::{
    now, ManifestRecord, ModuleRecord, PinSource, ReferenceRecord, SignatureRecord,
};
use super::{Result, Store};
use crate::digest::Digest;
use crate::format::{Format, WasmeMetadata};

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
    /// The digest the reference resolved to: the image index's own when the tag names an
    /// index, else the manifest's (a URL's: the module's). What `@sha256:` pins and a
    /// signature signs; Istio's agent, which resolves an index to its platform's image,
    /// compares a WasmPlugin's `sha256` for an `oci://` URL with `manifest_digest`.
    pub resolved_digest: Digest,
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
    /// Whether this is the last known resolution of the tag, because the registry failed
    /// or did not answer within `stale_after`.
    pub stale: bool,
    /// Unix time (seconds) the reference was last resolved at its registry.
    pub resolved_at: u64,
    /// wasme config fields, for wasme images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wasme: Option<WasmeMetadata>,
    /// The proxy-wasm ABI versions the module exports (`0.2.1`); empty for a module that is
    /// not a proxy-wasm filter.
    pub proxy_wasm_abi: Vec<String>,
    /// The signature check, when a signature policy covers the reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureRecord>,
}

/// Usage of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes of module blobs.
    pub bytes: u64,
    /// Number of modules.
    pub modules: u64,
}

/// Everything a finished pull leaves in the index (see [`Store::record_pull`]).
#[derive(Debug, Clone)]
pub struct PullRecord<'a> {
    /// The reference as normalised.
    pub reference: &'a str,
    /// The manifest it resolved to.
    pub manifest_digest: &'a Digest,
    /// The image index the manifest was chosen from, if any.
    pub index_digest: Option<&'a Digest>,
    /// What the manifest holds (module digest, packaging, the layer it came from, …).
    pub manifest: ManifestRecord,
    /// Size of the committed module.
    pub module_size: u64,
    /// Whether the module was extracted from an image layer (so the layer is remembered).
    pub image_layer: bool,
    /// Documents to keep as published (`digest`, bytes): an artifact's manifest, a config.
    pub documents: Vec<(String, &'a [u8])>,
}

impl Store {
    /// Changes whenever the index does; answers built from the index are current for as
    /// long as it stays the same. Read it *before* looking anything up.
    pub fn generation(&self) -> u64 {
        self.index().generation()
    }

    /// Makes every index write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.index().flush()
    }

    /// Bytes and count of the stored modules, kept in memory (O(1)).
    pub fn usage(&self) -> Result<Usage> {
        Ok(Usage {
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            modules: self.inner.modules.load(Ordering::Relaxed),
        })
    }

    /// Records a pull whose module is committed: the module, the layer it came from, the
    /// manifest, the documents, then the reference, and flushes. Returns when it resolved.
    pub fn record_pull(&self, pull: &PullRecord<'_>) -> Result<u64> {
        let resolved_at = self.put_pull(pull)?;
        self.index().flush()?;
        Ok(resolved_at)
    }

    /// Records many pulls, each as [`Store::record_pull`] orders it, with one flush at the
    /// end (importing a cache's worth of entries at once).
    pub fn record_pulls<'a>(&self, pulls: impl IntoIterator<Item = PullRecord<'a>>) -> Result<()> {
        for pull in pulls {
            self.put_pull(&pull)?;
        }
        self.index().flush()
    }

    /// Records a committed module that no reference names yet (one stored for a peer), and
    /// flushes; eviction treats it like any other module.
    pub fn record_module(&self, digest: &Digest, size: u64) -> Result<()> {
        self.add_module(digest, size)?;
        self.index().flush()
    }

    /// [`Store::record_pull`] without the flush.
    fn put_pull(&self, pull: &PullRecord<'_>) -> Result<u64> {
        let index = self.index();
        let module = &pull.manifest.module_digest;
        self.add_module(module, pull.module_size)?;
        if pull.image_layer {
            index.put_layer(&pull.manifest.layer_digest, module)?;
        }
        index.put_manifest(pull.manifest_digest, &pull.manifest)?;
        for (digest, bytes) in &pull.documents {
            index.put_document(digest, bytes)?;
        }
        self.put_resolution(pull.reference, pull.manifest_digest, pull.index_digest)
    }

    /// Records that `reference` resolved to an already known manifest just now, and flushes.
    /// Returns when it resolved.
    pub fn record_resolution(
        &self,
        reference: &str,
        manifest_digest: &Digest,
        index_digest: Option<&Digest>,
    ) -> Result<u64> {
        let resolved_at = self.put_resolution(reference, manifest_digest, index_digest)?;
        self.index().flush()?;
        Ok(resolved_at)
    }

    fn put_resolution(
        &self,
        reference: &str,
        manifest_digest: &Digest,
        index_digest: Option<&Digest>,
    ) -> Result<u64> {
        let resolved_at = now();
        let record = ReferenceRecord {
            manifest_digest: manifest_digest.clone(),
            index_digest: index_digest.cloned(),
            resolved_at,
        };
        self.index().put_reference(reference, &record)?;
        Ok(resolved_at)
    }

    /// Records a committed module in the index and in the usage totals.
    fn add_module(&self, digest: &Digest, size: u64) -> Result<()> {
        let known = self.index().module(digest)?.is_some();
        self.index().put_module(digest, size)?;
        if !known {
            self.inner.bytes.fetch_add(size, Ordering::Relaxed);
            self.inner.modules.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The size of module `digest` if it is recorded and its blob is on disk.
    pub fn stored_module(&self, digest: &Digest) -> Result<Option<u64>> {
        let Some(record) = self.index().module(digest)? else {
            return Ok(None);
        };
        Ok(self.has_blob(digest).then_some(record.size))
    }

    /// Every recorded module with its bookkeeping, in digest order.
    pub fn modules(&self) -> Result<Vec<(Digest, ModuleRecord)>> {
        let modules = self.index().modules()?;
        Ok(modules
            .into_iter()
            .filter_map(|(key, record)| Some((key.parse().ok()?, record)))
            .collect())
    }

    /// The module extracted from image layer `layer_digest` before, with its size, if it
    /// is still stored.
    pub fn module_of_layer(&self, layer_digest: &str) -> Result<Option<(Digest, u64)>> {
        let Some(module) = self.index().layer(layer_digest)? else {
            return Ok(None);
        };
        Ok(self.stored_module(&module)?.map(|size| (module, size)))
    }

    /// What the index knows about `manifest_digest`, if its module is on disk, as the
    /// answer for `reference` (`resolved_at` 0: the caller knows when it resolved).
    pub fn lookup_manifest(
        &self,
        reference: &str,
        manifest_digest: &Digest,
        index_digest: Option<&Digest>,
    ) -> Result<Option<Fetched>> {
        let index = self.index();
        let Some(record) = index.manifest(manifest_digest)? else {
            return Ok(None);
        };
        let Some(size) = self.stored_module(&record.module_digest)? else {
            return Ok(None);
        };
        Ok(Some(Fetched {
            signature: None,
            reference: reference.to_owned(),
            manifest_digest: manifest_digest.clone(),
            index_digest: index_digest.cloned(),
            // A URL resolves to its module (the record's digest names the daemon's own note
            // of the URL, its ETag and module).
            resolved_digest: match record.format {
                crate::format::Format::Http => record.module_digest.clone(),
                _ => index_digest.unwrap_or(manifest_digest).clone(),
            },
            path: self.blob_path(&record.module_digest),
            digest: record.module_digest,
            size,
            format: record.format,
            cache_hit: true,
            stale: false,
            resolved_at: 0,
            wasme: record.wasme,
            proxy_wasm_abi: record.proxy_wasm_abi,
        }))
    }

    /// What the cache holds for one reference (normalised text), whatever its age.
    pub fn lookup_reference(&self, reference: &str) -> Result<Option<Fetched>> {
        let Some(record) = self.index().reference(reference)? else {
            return Ok(None);
        };
        self.answer(reference, &record)
    }

    /// Whether a reference of repository `name` (`registry/repository`) resolves to a
    /// manifest that is `digest` or names it (its module, layer or config): what the OCI view
    /// may serve under that name.
    pub fn repository_holds(&self, name: &str, digest: &Digest) -> Result<bool> {
        let index = self.index();
        let wanted = digest.to_string();
        for separator in [':', '@'] {
            for (_, record) in index.references_under(&format!("{name}{separator}"))? {
                if record.manifest_digest == *digest || record.index_digest.as_ref() == Some(digest)
                {
                    return Ok(true);
                }
                let Some(manifest) = index.manifest(&record.manifest_digest)? else {
                    continue;
                };
                if manifest.module_digest == *digest
                    || manifest.layer_digest == wanted
                    || manifest.config_digest.as_deref() == Some(wanted.as_str())
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Every cached reference whose module is on disk, in reference order.
    pub fn list(&self) -> Result<Vec<Fetched>> {
        let mut entries = Vec::new();
        for (name, record) in self.index().references()? {
            entries.extend(self.answer(&name, &record)?);
        }
        Ok(entries)
    }

    fn answer(&self, reference: &str, record: &ReferenceRecord) -> Result<Option<Fetched>> {
        let found = self.lookup_manifest(
            reference,
            &record.manifest_digest,
            record.index_digest.as_ref(),
        )?;
        Ok(found.map(|entry| Fetched {
            resolved_at: record.resolved_at,
            ..entry
        }))
    }

    /// Pins `reference` and flushes; an API pin is never downgraded to a list pin. Returns
    /// who had pinned it before.
    pub fn pin(&self, reference: &str, source: PinSource) -> Result<Option<PinSource>> {
        let index = self.index();
        let before = index.pin(reference)?;
        index.put_pin(reference, source)?;
        index.flush()?;
        Ok(before)
    }

    /// Unpins `reference` and flushes; returns who had pinned it.
    pub fn unpin(&self, reference: &str) -> Result<Option<PinSource>> {
        let removed = self.index().remove_pin(reference)?;
        self.index().flush()?;
        Ok(removed)
    }

    /// Unpins `reference` if `source` pinned it (a list no longer pins what the API did);
    /// returns whether it did.
    pub fn unpin_from(&self, reference: &str, source: PinSource) -> Result<bool> {
        if self.index().pin(reference)? != Some(source) {
            return Ok(false);
        }
        self.unpin(reference).map(|_| true)
    }

    /// Every pinned reference and who pinned it.
    pub fn pins(&self) -> Result<Vec<(String, PinSource)>> {
        self.index().pins()
    }

    /// A kept manifest or config, by digest, as published.
    pub fn document(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.index().document(digest)
    }

    /// The signature verified for `resolved` under the key set `key_set`, if any.
    pub fn signature(&self, resolved: &Digest, key_set: &str) -> Result<Option<SignatureRecord>> {
        self.index().signature(&format!("{resolved}|{key_set}"))
    }

    /// Keeps a verified signature of `resolved` under `key_set`, and flushes.
    pub fn record_signature(
        &self,
        resolved: &Digest,
        key_set: &str,
        record: &SignatureRecord,
    ) -> Result<()> {
        self.index()
            .put_signature(&format!("{resolved}|{key_set}"), record)?;
        self.index().flush()
    }

    /// Keeps a manifest or config whose bytes the caller checked against `digest`.
    pub fn keep_document(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.index().put_document(digest, bytes)
    }

    /// A manifest kept as published (artifact packagings), with its record.
    pub fn served_manifest(&self, digest: &Digest) -> Result<Option<(ManifestRecord, Vec<u8>)>> {
        let Some(record) = self.index().manifest(digest)?.filter(|r| r.served) else {
            return Ok(None);
        };
        Ok(self
            .index()
            .document(&digest.to_string())?
            .map(|bytes| (record, bytes)))
    }

    /// The kept manifest (digest and bytes) whose config is `config_digest`, if any.
    pub fn manifest_with_config(&self, config_digest: &str) -> Result<Option<(String, Vec<u8>)>> {
        let manifests = self.index().manifests()?;
        let Some((manifest_digest, _)) = manifests
            .into_iter()
            .find(|(_, record)| record.config_digest.as_deref() == Some(config_digest))
        else {
            return Ok(None);
        };
        Ok(self
            .index()
            .document(&manifest_digest)?
            .map(|bytes| (manifest_digest, bytes)))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::store::Error;

    /// Commits `bytes` as a module and records it as pulled under `reference`, as a wasme
    /// image whose manifest and config are kept.
    fn pull(store: &Store, reference: &str, bytes: &[u8], image_layer: bool) -> Digest {
        let mut ingest = store.begin_ingest(1 << 20).unwrap();
        ingest.write_all(bytes).unwrap();
        let (module, size) = store.commit(ingest, None, |_| Ok::<(), Error>(())).unwrap();
        let manifest_digest = Digest::of(reference.as_bytes());
        let manifest_bytes = format!("manifest of {reference}");
        let config_digest = format!("sha256:config-of-{reference}");
        let wasme = WasmeMetadata {
            kind: Some("envoy_proxy".into()),
            ..WasmeMetadata::default()
        };
        let documents = vec![
            (manifest_digest.to_string(), manifest_bytes.as_bytes()),
            (config_digest.clone(), &b"{}"[..]),
        ];
        let manifest = ManifestRecord {
            layer_digest: format!("sha256:layer-of-{reference}"),
            config_digest: Some(config_digest),
            wasme: Some(wasme),
            proxy_wasm_abi: Vec::new(),
            format: Format::Wasme,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            module_digest: module.clone(),
            served: true,
        };
        let pulled = PullRecord {
            reference,
            manifest_digest: &manifest_digest,
            index_digest: None,
            manifest,
            module_size: size,
            image_layer,
            documents,
        };
        store.record_pull(&pulled).unwrap();
        module
    }

    #[test]
    fn a_recorded_pull_is_found_by_reference_manifest_layer_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let before = store.generation();
        let module = pull(&store, "r.example/a:v1", b"\0asm\x01\0\0\0", true);
        assert_ne!(store.generation(), before, "answers built before are stale");

        let found = store.lookup_reference("r.example/a:v1").unwrap().unwrap();
        assert_eq!(found.digest, module);
        assert_eq!(found.path, store.blob_path(&module));
        assert!(found.resolved_at > 0 && found.cache_hit && !found.stale);
        assert_eq!(found.wasme.unwrap().kind.as_deref(), Some("envoy_proxy"));
        let manifest = Digest::of(b"r.example/a:v1");
        let (record, bytes) = store.served_manifest(&manifest).unwrap().unwrap();
        assert_eq!(record.module_digest, module);
        assert_eq!(bytes, b"manifest of r.example/a:v1");
        let config = "sha256:config-of-r.example/a:v1";
        assert_eq!(store.document(config).unwrap().unwrap(), b"{}");
        assert_eq!(
            store.manifest_with_config(config).unwrap(),
            Some((manifest.to_string(), bytes))
        );
        assert_eq!(
            store
                .module_of_layer("sha256:layer-of-r.example/a:v1")
                .unwrap(),
            Some((module.clone(), 8))
        );
        assert_eq!(
            store.usage().unwrap(),
            Usage {
                bytes: 8,
                modules: 1
            }
        );
        let listed: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|f| f.reference)
            .collect();
        assert_eq!(listed, ["r.example/a:v1"]);

        // The same bytes under another name share the module and count once.
        pull(&store, "r.example/b:v1", b"\0asm\x01\0\0\0", false);
        assert_eq!(
            store.usage().unwrap(),
            Usage {
                bytes: 8,
                modules: 1
            }
        );
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(store
            .module_of_layer("sha256:layer-of-r.example/b:v1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_reference_whose_blob_is_gone_is_not_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let module = pull(&store, "r.example/a:v1", b"\0asm\x01\0\0\0", false);
        std::fs::remove_file(store.blob_path(&module)).unwrap();
        assert!(store.lookup_reference("r.example/a:v1").unwrap().is_none());
        assert!(store.stored_module(&module).unwrap().is_none());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn list_pins_never_downgrade_api_pins_and_unpin_only_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.pin("r.example/a:v1", PinSource::Api).unwrap(), None);
        assert_eq!(
            store.pin("r.example/a:v1", PinSource::List).unwrap(),
            Some(PinSource::Api)
        );
        assert!(!store.unpin_from("r.example/a:v1", PinSource::List).unwrap());
        assert_eq!(
            store.pins().unwrap(),
            [("r.example/a:v1".to_owned(), PinSource::Api)]
        );
        store.pin("r.example/b:v1", PinSource::List).unwrap();
        assert!(store.unpin_from("r.example/b:v1", PinSource::List).unwrap());
        assert_eq!(store.unpin("r.example/a:v1").unwrap(), Some(PinSource::Api));
        assert!(store.pins().unwrap().is_empty());
    }
}

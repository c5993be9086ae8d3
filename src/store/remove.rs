//! Removing references and modules on request (`wasmcache rm`, the `Remove` call) and the
//! purge every removal ends with: index entries first, in one pass and one flush, then files,
//! so no index entry ever points to a missing blob.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use super::{Error, Result, Store};
use crate::digest::Digest;

impl Store {
    /// Forgets a reference; its module is deleted if no other reference uses it.
    pub fn remove_reference(&self, reference: &str) -> Result<Removed> {
        let index = self.index();
        if index.pin(reference)?.is_some() {
            return Err(Error::Pinned {
                reference: reference.to_owned(),
            });
        }
        let Some(record) = index.remove_reference(reference)? else {
            return Ok(Removed::default());
        };
        let mut removed = Removed {
            references: vec![reference.to_owned()],
            modules: Vec::new(),
        };
        if let Some(manifest) = index.manifest(&record.manifest_digest)? {
            removed.modules = self.collect_unreferenced(&[manifest.module_digest])?;
        }
        index.flush()?;
        Ok(removed)
    }

    /// Deletes a module (by module digest) or a manifest (by manifest digest) together with
    /// every reference that resolves to it.
    pub fn remove_digest(&self, digest: &Digest) -> Result<Removed> {
        let index = self.index();
        let manifests = index.manifests()?;
        let targets: Vec<String> = manifests
            .iter()
            .filter(|(key, record)| *key == digest.to_string() || record.module_digest == *digest)
            .map(|(key, _)| key.clone())
            .collect();
        let mut removed = Removed::default();
        let mut modules = Vec::new();
        let doomed: Vec<String> = index
            .references()?
            .into_iter()
            .filter(|(_, record)| targets.contains(&record.manifest_digest.to_string()))
            .map(|(key, _)| key)
            .collect();
        for key in &doomed {
            if index.pin(key)?.is_some() {
                return Err(Error::Pinned {
                    reference: key.clone(),
                });
            }
        }
        for key in doomed {
            index.remove_reference(&key)?;
            removed.references.push(key);
        }
        for (key, record) in &manifests {
            if targets.contains(key) {
                modules.push(record.module_digest.clone());
            }
        }
        if index.module(digest)?.is_some() || self.has_blob(digest) {
            modules.push(digest.clone());
        }
        modules.sort();
        modules.dedup();
        removed.modules = self.collect_unreferenced(&modules)?;
        index.flush()?;
        Ok(removed)
    }

    /// Deletes those of `modules` that no reference resolves to any more: index entries
    /// first, then the file, so no index entry ever points to a missing blob.
    fn collect_unreferenced(&self, modules: &[Digest]) -> Result<Vec<Digest>> {
        let in_use = self.referenced_modules()?;
        let doomed: HashSet<Digest> = modules
            .iter()
            .filter(|module| !in_use.contains(module))
            .cloned()
            .collect();
        self.purge_entries(&doomed)?;
        let mut deleted = Vec::new();
        for module in modules.iter().filter(|m| doomed.contains(m)) {
            self.delete_blob(module)?;
            deleted.push(module.clone());
        }
        Ok(deleted)
    }

    /// Every module some reference resolves to.
    fn referenced_modules(&self) -> Result<HashSet<Digest>> {
        let index = self.index();
        let manifests: HashMap<String, Digest> = index
            .manifests()?
            .into_iter()
            .map(|(key, record)| (key, record.module_digest))
            .collect();
        Ok(index
            .references()?
            .iter()
            .filter_map(|(_, record)| manifests.get(&record.manifest_digest.to_string()).cloned())
            .collect())
    }

    /// Removes every index entry leading to `modules` (references, manifests and their
    /// documents, layers, the module records) in one pass over each tree, and flushes; the
    /// caller deletes the files after. Returns the references removed.
    pub(super) fn purge_entries(&self, modules: &HashSet<Digest>) -> Result<Vec<String>> {
        if modules.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.index();
        let manifests = index.manifests()?;
        let doomed: HashSet<&String> = manifests
            .iter()
            .filter(|(_, record)| modules.contains(&record.module_digest))
            .map(|(key, _)| key)
            .collect();
        let mut references = Vec::new();
        for (key, record) in index.references()? {
            if doomed.contains(&record.manifest_digest.to_string()) {
                index.remove_reference(&key)?;
                index.remove_pin(&key)?;
                references.push(key);
            }
        }
        let surviving_configs: HashSet<&String> = manifests
            .iter()
            .filter(|(key, _)| !doomed.contains(key))
            .filter_map(|(_, record)| record.config_digest.as_ref())
            .collect();
        for (key, record) in &manifests {
            if !doomed.contains(key) {
                continue;
            }
            index.remove_manifest(key)?;
            index.remove_document(key)?;
            if let Some(config) = &record.config_digest {
                if !surviving_configs.contains(config) {
                    index.remove_document(config)?;
                }
            }
        }
        index.remove_layers_of(modules)?;
        for module in modules {
            if let Some(record) = index.remove_module(module)? {
                self.inner.bytes.fetch_sub(record.size, Ordering::Relaxed);
                self.inner.modules.fetch_sub(1, Ordering::Relaxed);
            }
        }
        index.flush()?;
        Ok(references)
    }
}

/// What a removal deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// References forgotten.
    pub references: Vec<String>,
    /// Module blobs deleted.
    pub modules: Vec<Digest>,
}

//! Bringing index and disk into agreement: at open (torn temp files, index entries whose blob
//! is gone, blobs the index does not know) and on demand (`verify` re-hashes every blob).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::blobs::{hash_file, io_error};
use super::{Result, Store};
use crate::digest::Digest;

impl Store {
    /// What the last open found and repaired.
    pub fn reconciled(&self) -> Reconciled {
        *self.inner.reconciled.lock().expect("poisoned")
    }

    /// Brings index and blobs into agreement: temp files go; index entries whose blob is
    /// missing go; blobs the index does not know are re-hashed and adopted if their name is
    /// their digest, deleted otherwise.
    pub(super) fn reconcile(&self, report: &mut Reconciled) -> Result<()> {
        // Ingest files only ever belong to a live writer, and the index lock proves there is
        // none: whatever is left was torn by a crash.
        // Nothing there is followed: a symlink goes as a link, a directory with its contents
        // (which `remove_dir_all` does not follow out of it either).
        let ingest = &self.inner.ingest;
        for entry in fs::read_dir(ingest).map_err(io_error("read directory", ingest))? {
            let entry = entry.map_err(io_error("read directory", ingest))?;
            remove_entry(&entry)?;
            report.temp_files += 1;
        }
        // Compare the index with one listing of the blob directory, as two sets.
        let index = self.index();
        let blobs = &self.inner.blobs;
        let mut files: HashMap<Digest, PathBuf> = HashMap::new();
        for entry in fs::read_dir(blobs).map_err(io_error("read directory", blobs))? {
            let entry = entry.map_err(io_error("read directory", blobs))?;
            let path = entry.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // Only regular files the store made count; symlinks and directories go unfollowed.
            let regular = entry.file_type().is_ok_and(|kind| kind.is_file());
            match Digest::from_hex(name) {
                Ok(digest) if regular => {
                    files.insert(digest, path);
                }
                _ => {
                    remove_entry(&entry)?;
                    report.deleted_orphans += 1;
                }
            }
        }
        let mut missing = HashSet::new();
        let (mut bytes, mut count) = (0, 0);
        for (key, record) in index.modules()? {
            let Ok(digest) = key.parse::<Digest>() else {
                continue;
            };
            if files.remove(&digest).is_some() {
                bytes += record.size;
                count += 1;
            } else {
                missing.insert(digest);
            }
        }
        report.missing_blobs = missing.len() as u64;
        self.purge_entries(&missing)?;
        // What is left in `files` is unknown to the index.
        for (digest, path) in files {
            match hash_file(&path) {
                Ok((actual, size)) if actual == digest => {
                    index.put_module(&digest, size)?;
                    bytes += size;
                    count += 1;
                    report.adopted += 1;
                }
                _ => {
                    fs::remove_file(&path).map_err(io_error("remove", &path))?;
                    report.deleted_orphans += 1;
                }
            }
        }
        self.inner.bytes.store(bytes, Ordering::Relaxed);
        self.inner.modules.store(count, Ordering::Relaxed);
        index.flush()
    }

    /// Re-hashes every blob; bad ones (content not matching the name) are reported and, with
    /// `repair`, removed together with their index entries.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport> {
        let blobs = &self.inner.blobs;
        let mut report = VerifyReport::default();
        for entry in fs::read_dir(blobs).map_err(io_error("read directory", blobs))? {
            let path = entry.map_err(io_error("read directory", blobs))?.path();
            let Some(digest) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| Digest::from_hex(n).ok())
            else {
                continue;
            };
            report.checked += 1;
            let good = matches!(hash_file(&path), Ok((actual, _)) if actual == digest);
            if good {
                continue;
            }
            if repair {
                self.purge_entries(&HashSet::from([digest.clone()]))?;
                self.delete_blob(&digest)?;
                report.repaired += 1;
            }
            report.bad.push(digest);
        }
        Ok(report)
    }
}

/// Removes a directory entry of the store without following it: a file or symlink is
/// unlinked, a directory removed with what it holds.
fn remove_entry(entry: &fs::DirEntry) -> Result<()> {
    let path = entry.path();
    let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
    let removed = match is_dir {
        true => fs::remove_dir_all(&path),
        false => fs::remove_file(&path),
    };
    removed.map_err(io_error("remove", &path))
}

/// What reconciliation found at open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reconciled {
    /// Temp files of interrupted writes, deleted.
    pub temp_files: u64,
    /// Index entries whose blob was missing, dropped.
    pub missing_blobs: u64,
    /// Blobs the index did not know whose content matched their name, adopted.
    pub adopted: u64,
    /// Blobs the index did not know whose content did not match their name, deleted.
    pub deleted_orphans: u64,
    /// Whether the index could not be opened and was rebuilt.
    pub index_rebuilt: bool,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub checked: u64,
    /// Blobs whose content does not match their name.
    pub bad: Vec<Digest>,
    /// Bad blobs removed.
    pub repaired: u64,
}

impl Reconciled {
    /// Each count with its metrics label, for `wasmcache_reconciled_total`.
    pub fn counts(&self) -> [(&'static str, u64); 5] {
        [
            ("temp_files", self.temp_files),
            ("missing_blobs", self.missing_blobs),
            ("adopted", self.adopted),
            ("deleted_orphans", self.deleted_orphans),
            ("index_rebuilt", u64::from(self.index_rebuilt)),
        ]
    }
}

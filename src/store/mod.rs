//! The on-disk cache: content-addressed blob files plus a sled index beside them.
//!
//! ```text
//! <data-dir>/blobs/sha256/<hex>   module bytes, named by their sha256, read-only
//! <data-dir>/ingest/              temp files being written (cleared at open)
//! <data-dir>/index/               sled database (see `index`)
//! ```
//!
//! `Store` is the only owner of these files; everyone else holds a cheap clone. Writes go
//! through [`Ingest`]: bytes are hashed as they are written to a temp file, and
//! [`Store::commit`] checks the digest, fsyncs, renames into `blobs/` and fsyncs the directory.
//! Only then may the caller record the blob in the index, so **an index entry never points to
//! a blob that is not fully written and verified**.

mod index;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
pub use index::{now, ManifestRecord, ModuleRecord, PinSource, ReferenceRecord};

const BLOBS_DIR: &str = "blobs/sha256";
const INGEST_DIR: &str = "ingest";
const INDEX_DIR: &str = "index";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be created, written or read.
    #[error("cache {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The index database failed.
    #[error("cache index at {path}")]
    Index {
        /// The database directory.
        path: PathBuf,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// The index is held by another process.
    #[error("cache index at {path} is in use by another wasmcache process")]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The reference (or a reference of the module) is pinned.
    #[error("{reference} is pinned; unpin it first (wasmcache unpin {reference})")]
    Pinned {
        /// The pinned reference.
        reference: String,
    },
    /// A record in the index could not be decoded.
    #[error("cache index record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Written bytes do not hash to the digest they were announced with.
    #[error("blob {expected}: content hashed to {actual}")]
    DigestMismatch {
        /// The announced digest.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// More bytes were written than allowed.
    #[error("blob exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

impl Error {
    /// Whether the error means the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.raw_os_error() == Some(28 /* ENOSPC */) || source.kind() == io::ErrorKind::StorageFull)
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Handle to the cache directory; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    blobs: PathBuf,
    ingest: PathBuf,
    index: index::Index,
}

impl Store {
    /// Opens (creating if needed) the cache at `root`, clearing temp files left by a crash.
    pub fn open(root: &Path) -> Result<Store> {
        let blobs = root.join(BLOBS_DIR);
        let ingest = root.join(INGEST_DIR);
        for dir in [&blobs, &ingest] {
            fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        }
        let index = index::Index::open(&root.join(INDEX_DIR))?;
        // Ingest files only ever belong to a live writer, and the index lock proves there is
        // none: whatever is left was torn by a crash.
        let mut removed = 0;
        for entry in fs::read_dir(&ingest).map_err(io_error("read directory", &ingest))? {
            let path = entry.map_err(io_error("read directory", &ingest))?.path();
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "removed temp files left by an interrupted write");
        }
        Ok(Store {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                blobs,
                ingest,
                index,
            }),
        })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the blob named `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.blobs.join(digest.hex())
    }

    /// Whether the blob is present on disk.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Starts writing a new blob of at most `limit` bytes into a temp file.
    pub fn begin_ingest(&self, limit: u64) -> Result<Ingest> {
        let file = tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".partial")
            .tempfile_in(&self.inner.ingest)
            .map_err(io_error("create temp file in", &self.inner.ingest))?;
        Ok(Ingest {
            file,
            hasher: Sha256::new(),
            written: 0,
            limit,
        })
    }

    /// Verifies a finished ingest and moves it into place; returns its digest and size.
    ///
    /// With `expected`, a mismatch is an error and nothing becomes visible. `check` runs on
    /// the finished temp file (e.g. Wasm validation) before it is renamed. Blocking: call from
    /// a blocking thread.
    pub fn commit<E: From<Error>>(
        &self,
        ingest: Ingest,
        expected: Option<&Digest>,
        check: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(Digest, u64), E> {
        let Ingest {
            file,
            hasher,
            written,
            ..
        } = ingest;
        let actual = Digest::from_hasher(hasher);
        if let Some(expected) = expected {
            if *expected != actual {
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                }
                .into());
            }
        }
        let target = self.blob_path(&actual);
        if target.is_file() {
            // The same bytes arrived by another path: keep the existing file.
            return Ok((actual, written));
        }
        check(file.path())?;
        let temp_path = file.path().to_owned();
        file.as_file()
            .sync_all()
            .map_err(io_error("sync", &temp_path))?;
        let mut permissions = file
            .as_file()
            .metadata()
            .map_err(io_error("stat", &temp_path))?
            .permissions();
        permissions.set_readonly(true);
        fs::set_permissions(&temp_path, permissions).map_err(io_error("chmod", &temp_path))?;
        file.persist(&target)
            .map_err(|error| io_error("rename into", &target)(error.error))?;
        sync_dir(&self.inner.blobs)?;
        Ok((actual, written))
    }

    /// Deletes a blob file (index entries must already be gone).
    pub fn delete_blob(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io_error("remove", &path)(error)),
        }
    }

    /// The index.
    pub fn index(&self) -> &index::Index {
        &self.inner.index
    }

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
        let index = self.index();
        let manifests = index.manifests()?;
        let module_of = |manifest: &Digest| {
            manifests
                .iter()
                .find(|(key, _)| *key == manifest.to_string())
                .map(|(_, record)| record.module_digest.clone())
        };
        let in_use: Vec<Digest> = index
            .references()?
            .iter()
            .filter_map(|(_, record)| module_of(&record.manifest_digest))
            .collect();
        let mut deleted = Vec::new();
        for module in modules {
            if in_use.contains(module) {
                continue;
            }
            for (key, record) in &manifests {
                if record.module_digest == *module {
                    index.remove_manifest(key)?;
                    index.remove_document(key)?;
                    let config_shared = record.config_digest.as_ref().is_some_and(|config| {
                        manifests.iter().any(|(other, r)| {
                            other != key
                                && r.module_digest != *module
                                && r.config_digest.as_ref() == Some(config)
                        })
                    });
                    if let (Some(config), false) = (&record.config_digest, config_shared) {
                        index.remove_document(config)?;
                    }
                }
            }
            index.remove_layers_of(module)?;
            index.remove_module(module)?;
            index.flush()?;
            self.delete_blob(module)?;
            deleted.push(module.clone());
        }
        Ok(deleted)
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

/// A blob being written: a temp file plus the running hash of what went into it.
///
/// Dropping an uncommitted ingest deletes its temp file.
pub struct Ingest {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    limit: u64,
}

impl Ingest {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The most bytes this ingest accepts.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether `error` (returned by `write`) means the size limit was hit.
    pub fn is_limit_error(error: &io::Error) -> bool {
        error
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<LimitExceeded>().is_some())
    }
}

/// Marker carried inside the `io::Error` returned when an ingest passes its limit.
#[derive(Debug, thiserror::Error)]
#[error("blob exceeds the limit of {0} bytes")]
struct LimitExceeded(u64);

impl Write for Ingest {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.written + bytes.len() as u64 > self.limit {
            return Err(io::Error::other(LimitExceeded(self.limit)));
        }
        let n = self.file.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(store: &Store, ingest: Ingest, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        store.commit(ingest, expected, |_| Ok::<(), Error>(()))
    }

    #[test]
    fn commit_verifies_and_names_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut ingest = store.begin_ingest(1024).unwrap();
        ingest.write_all(b"\0asm\x01\0\0\0").unwrap();
        let expected = Digest::of(b"\0asm\x01\0\0\0");
        let (digest, size) = commit(&store, ingest, Some(&expected)).unwrap();
        assert_eq!((digest.clone(), size), (expected, 8));
        assert_eq!(
            fs::read(store.blob_path(&digest)).unwrap(),
            b"\0asm\x01\0\0\0"
        );
        assert!(fs::read_dir(dir.path().join(INGEST_DIR))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut ingest = store.begin_ingest(1024).unwrap();
        ingest.write_all(b"evil").unwrap();
        let expected = Digest::of(b"good");
        let error = commit(&store, ingest, Some(&expected)).unwrap_err();
        assert!(matches!(error, Error::DigestMismatch { .. }), "{error}");
        assert!(!store.has_blob(&expected));
        assert!(!store.has_blob(&Digest::of(b"evil")));
        assert!(fs::read_dir(dir.path().join(INGEST_DIR))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn limit_stops_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut ingest = store.begin_ingest(4).unwrap();
        let error = ingest.write_all(b"12345").unwrap_err();
        assert!(Ingest::is_limit_error(&error));
    }

    #[test]
    fn open_clears_torn_writes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut ingest = store.begin_ingest(1024).unwrap();
            ingest.write_all(b"half").unwrap();
            // Simulate a crash: the temp file survives the process.
            std::mem::forget(ingest);
        }
        assert_eq!(
            fs::read_dir(dir.path().join(INGEST_DIR)).unwrap().count(),
            1
        );
        let _store = Store::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join(INGEST_DIR)).unwrap().count(),
            0
        );
    }
}

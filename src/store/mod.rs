//! The on-disk cache: content-addressed blob files plus a sled index beside them.
//!
//! ```text
//! <data-dir>/blobs/sha256/<hex>   module bytes, named by their sha256, read-only
//! <data-dir>/ingest/              temp files being written (cleared at open)
//! <data-dir>/index/               sled database (see `index`)
//! ```
//!
//! `Store` is the only owner of these files and of the index; everyone else holds a cheap
//! clone and calls methods that say what they mean. One job per file:
//!
//! - `blobs.rs`: ingest files and the commit protocol (hash while writing, fsync, rename,
//!   fsync the directory), so **an index entry never points to a blob that is not fully
//!   written and verified**;
//! - `records.rs`: what the index says, in callers' terms: recording a pull (module, layer,
//!   manifest, documents, then reference, and a flush), lookups, listing, pins, documents,
//!   usage;
//! - `evict.rs`: the [`Budget`]: access times, leases, eviction by age and size;
//! - `remove.rs`: removal on request and the purge that eviction and removal end with;
//! - `reconcile.rs`: agreement of index and disk at open, and `verify`;
//! - `index.rs`: the sled trees; nothing outside this module names sled.

mod blobs;
mod evict;
mod index;
mod reconcile;
mod records;
mod remove;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use blobs::io_error;
pub use blobs::Ingest;
pub use evict::{Budget, Evicted, EvictionReason, Lease};
pub use index::{now, ManifestRecord, ModuleRecord, PinSource, ReferenceRecord, SignatureRecord};
pub use reconcile::{Reconciled, VerifyReport};
pub use records::{Fetched, PullRecord, Usage};
pub use remove::Removed;

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
    /// `blobs` opened, so that checking for a blob looks up one name, not the whole path.
    blobs_dir: File,
    ingest: PathBuf,
    index: index::Index,
    /// Recent hand-outs, newer than the index's `last_access`: Unix milliseconds, and a
    /// sequence number that orders hand-outs within the same millisecond.
    access: Mutex<HashMap<Digest, (u64, u64)>>,
    touches: AtomicU64,
    leases: Mutex<HashMap<u64, Lease>>,
    next_lease: AtomicU64,
    reconciled: Mutex<Reconciled>,
    /// Bytes and count of the modules in the index, kept current by `add_module` and purges.
    bytes: AtomicU64,
    modules: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the cache at `root` and reconciles it with the disk before
    /// anyone reads it: see [`Reconciled`].
    pub fn open(root: &Path) -> Result<Store> {
        let blobs = root.join(BLOBS_DIR);
        let ingest = root.join(INGEST_DIR);
        for dir in [&root.join("blobs"), &blobs, &ingest] {
            // The store's own directories are never followed elsewhere: a symlink (or a file)
            // in their place is removed and a directory made.
            if let Ok(metadata) = fs::symlink_metadata(dir) {
                if !metadata.is_dir() {
                    tracing::warn!(path = %dir.display(), "not a directory; replacing it");
                    fs::remove_file(dir).map_err(io_error("remove", dir))?;
                }
            }
            fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        }
        let mut reconciled = Reconciled::default();
        let index_dir = root.join(INDEX_DIR);
        let index = match index::Index::open(&index_dir) {
            Ok(index) => index,
            Err(error @ Error::Locked { .. }) => return Err(error),
            Err(error) => {
                // A database that cannot be opened is kept for inspection and rebuilt from the
                // blobs; references are re-resolved on demand.
                let aside = root.join(format!("{INDEX_DIR}.corrupt-{}", now()));
                tracing::warn!(error = %crate::error::error_chain(&error), aside = %aside.display(), "index unreadable; rebuilding it from the blobs");
                fs::rename(&index_dir, &aside).map_err(io_error("move aside", &index_dir))?;
                reconciled.index_rebuilt = true;
                index::Index::open(&index_dir)?
            }
        };
        let blobs_dir = File::open(&blobs).map_err(io_error("open directory", &blobs))?;
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                blobs_dir,
                blobs,
                ingest,
                index,
                access: Mutex::default(),
                touches: AtomicU64::new(1),
                leases: Mutex::default(),
                next_lease: AtomicU64::new(1),
                reconciled: Mutex::default(),
                bytes: AtomicU64::new(0),
                modules: AtomicU64::new(0),
            }),
        };
        store.reconcile(&mut reconciled)?;
        if reconciled != Reconciled::default() {
            tracing::info!(?reconciled, "cache reconciled with the disk");
        }
        *store.inner.reconciled.lock().expect("poisoned") = reconciled;
        Ok(store)
    }

    /// Whether `root` holds a cache (one was opened there before); a command that only reads
    /// a cache asks this instead of creating an empty one.
    pub fn exists(root: &Path) -> bool {
        root.join(INDEX_DIR).is_dir()
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The index; private to the store, whose methods say what callers mean.
    fn index(&self) -> &index::Index {
        &self.inner.index
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn commit(store: &Store, ingest: Ingest, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        store.commit(ingest, expected, |_| Ok::<(), Error>(()))
    }

    #[test]
    fn every_index_change_moves_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = store.index();
        let module = Digest::of(b"module");
        let mut seen = vec![index.generation()];
        let mut changed = |what: &str| {
            let now = index.generation();
            assert!(!seen.contains(&now), "{what} left the generation at {now}");
            seen.push(now);
        };
        index.put_module(&module, 6).unwrap();
        changed("put_module");
        index.remove_module(&module).unwrap();
        changed("remove_module");
        let record = ReferenceRecord {
            manifest_digest: Digest::of(b"manifest"),
            index_digest: None,
            resolved_at: 1,
        };
        index.put_reference("r.example/a:v1", &record).unwrap();
        changed("put_reference");
        index.remove_reference("r.example/a:v1").unwrap();
        changed("remove_reference");
        index
            .remove_manifest(&record.manifest_digest.to_string())
            .unwrap();
        changed("remove_manifest");
        let reads = index.generation();
        index.reference("r.example/a:v1").unwrap();
        index.module(&module).unwrap();
        assert_eq!(index.generation(), reads, "reads change nothing");
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
    fn nothing_the_store_did_not_make_is_followed_or_served() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        fs::write(&secret, b"outside the cache").unwrap();
        let planted = Digest::of(b"outside the cache");
        let later = Digest::of(b"\0asm\x01\0\0\0");
        {
            let store = Store::open(dir.path()).unwrap();
            let blobs = store.blob_path(&planted);
            symlink(&secret, &blobs).unwrap();
            symlink(&secret, store.blob_path(&later)).unwrap();
            assert!(!store.has_blob(&planted));
            assert_eq!(store.blob_size(&planted), None);
            let error = store.open_blob(&planted).unwrap_err();
            assert_ne!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
            // A verified commit replaces a link planted at its name; it never writes through.
            let mut ingest = store.begin_ingest(1024).unwrap();
            ingest.write_all(b"\0asm\x01\0\0\0").unwrap();
            commit(&store, ingest, Some(&later)).unwrap();
            assert!(fs::symlink_metadata(store.blob_path(&later))
                .unwrap()
                .is_file());
            assert_eq!(fs::read(&secret).unwrap(), b"outside the cache");
        }
        // A directory in `ingest/` and in the blob directory, and `ingest` itself replaced
        // by a link to a directory outside: the next open removes the links and directories,
        // deletes nothing outside, and starts.
        fs::create_dir(dir.path().join(INGEST_DIR).join("stray")).unwrap();
        fs::create_dir(dir.path().join(BLOBS_DIR).join("stray")).unwrap();
        fs::remove_dir_all(dir.path().join(INGEST_DIR)).unwrap();
        symlink(outside.path(), dir.path().join(INGEST_DIR)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(fs::read(&secret).unwrap(), b"outside the cache");
        let ingest = fs::symlink_metadata(dir.path().join(INGEST_DIR)).unwrap();
        assert!(ingest.is_dir());
        assert!(!dir.path().join(BLOBS_DIR).join("stray").exists());
        assert!(fs::symlink_metadata(store.blob_path(&planted)).is_err());
        assert!(store.has_blob(&later));
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

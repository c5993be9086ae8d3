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
//!
//! The store also keeps the cache within its [`Budget`]: eviction by age and by size (least
//! recently handed out first), never touching pinned, leased or just-handed-out modules; and it
//! reconciles index and disk when opened, so a crash at any instant restarts clean.

mod index;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
        for dir in [&blobs, &ingest] {
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
                tracing::warn!(error = %crate::fetch::error_chain(&error), aside = %aside.display(), "index unreadable; rebuilding it from the blobs");
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

    /// What the last open found and repaired.
    pub fn reconciled(&self) -> Reconciled {
        *self.inner.reconciled.lock().expect("poisoned")
    }

    /// Brings index and blobs into agreement: temp files go; index entries whose blob is
    /// missing go; blobs the index does not know are re-hashed and adopted if their name is
    /// their digest, deleted otherwise.
    fn reconcile(&self, report: &mut Reconciled) -> Result<()> {
        // Ingest files only ever belong to a live writer, and the index lock proves there is
        // none: whatever is left was torn by a crash.
        let ingest = &self.inner.ingest;
        for entry in fs::read_dir(ingest).map_err(io_error("read directory", ingest))? {
            let path = entry.map_err(io_error("read directory", ingest))?.path();
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
            report.temp_files += 1;
        }
        // Compare the index with one listing of the blob directory, as two sets.
        let index = self.index();
        let blobs = &self.inner.blobs;
        let mut files: HashMap<Digest, PathBuf> = HashMap::new();
        for entry in fs::read_dir(blobs).map_err(io_error("read directory", blobs))? {
            let path = entry.map_err(io_error("read directory", blobs))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            match Digest::from_hex(name) {
                Ok(digest) => {
                    files.insert(digest, path);
                }
                Err(_) => {
                    fs::remove_file(&path).map_err(io_error("remove", &path))?;
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

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the blob named `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.blobs.join(digest.hex())
    }

    /// Opens a stored blob for reading; returns the file and its length. Blob files are
    /// never changed in place (written under a temporary name, renamed read-only into place,
    /// only ever unlinked), so a reader sees whole content unless someone outside the daemon
    /// changes the file: readers must still stop at the length and treat an early end as an
    /// error. Blocking: call from a blocking thread.
    ///
    /// A file whose length is not the size the index recorded was changed behind the
    /// daemon's back: that is an [`io::ErrorKind::InvalidData`] error, so nothing that is not
    /// the module is served. A missing file is [`io::ErrorKind::NotFound`].
    pub fn open_blob(&self, digest: &Digest) -> io::Result<(File, u64)> {
        let file = File::open(self.blob_path(digest))?;
        let length = file.metadata()?.len();
        let recorded = self.index().module(digest).map_err(io::Error::other)?;
        if let Some(record) = recorded.filter(|record| record.size != length) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "module file {digest} is {length} bytes on disk, {} when it was stored: it \
                     was changed behind the daemon's back (run `wasmcache verify --repair`)",
                    record.size
                ),
            ));
        }
        Ok((file, length))
    }

    /// Whether the blob is present on disk.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        // Asked on every warm hit: a lookup of one name in the open directory, and (the name
        // being short) no allocation. A miss asks again by path, in case the directory itself
        // was replaced behind the daemon's back.
        rustix::fs::statat(
            &self.inner.blobs_dir,
            digest.hex(),
            rustix::fs::AtFlags::empty(),
        )
        .is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file())
            || self.blob_path(digest).is_file()
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
            written_back: 0,
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
    fn purge_entries(&self, modules: &HashSet<Digest>) -> Result<Vec<String>> {
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

    /// Records that `module` was just handed out (kept in memory, ordered exactly even within
    /// a millisecond; see `persist_access`).
    pub fn touch(&self, module: &Digest) {
        let sequence = self.inner.touches.fetch_add(1, Ordering::Relaxed);
        let stamp = (now_millis(), sequence);
        let mut access = self.inner.access.lock().expect("poisoned");
        // Every warm hit lands here: update in place rather than clone the key again.
        match access.get_mut(module) {
            Some(entry) => *entry = stamp,
            None => {
                access.insert(module.clone(), stamp);
            }
        }
    }

    /// Writes the in-memory access times into the module records.
    pub fn persist_access(&self) -> Result<()> {
        let access: Vec<(Digest, u64)> = self
            .inner
            .access
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(d, (millis, _))| (d.clone(), *millis))
            .collect();
        for (digest, millis) in access {
            self.index().set_last_access(&digest, millis / 1000)?;
        }
        self.index().flush()
    }

    /// When `module` was last handed out: Unix milliseconds, then the hand-out sequence
    /// (0 for times known only from the index), so sorting gives exact LRU order.
    fn last_access(&self, module: &Digest, record: &ModuleRecord) -> (u64, u64) {
        let recorded = (record.last_access * 1000, 0);
        let recent = self
            .inner
            .access
            .lock()
            .expect("poisoned")
            .get(module)
            .copied();
        recent.map_or(recorded, |recent| recent.max(recorded))
    }

    /// Protects `module` from eviction for `duration`; returns the lease.
    pub fn lease(&self, module: &Digest, duration: std::time::Duration) -> Lease {
        let lease = Lease {
            id: self.inner.next_lease.fetch_add(1, Ordering::Relaxed),
            module: module.clone(),
            expires: now() + duration.as_secs().max(1),
        };
        self.inner
            .leases
            .lock()
            .expect("poisoned")
            .insert(lease.id, lease.clone());
        lease
    }

    /// Ends a lease early; `false` if it did not exist or had expired.
    pub fn release(&self, id: u64) -> bool {
        let mut leases = self.inner.leases.lock().expect("poisoned");
        let now = now();
        leases.retain(|_, lease| lease.expires > now);
        leases.remove(&id).is_some()
    }

    /// Modules no eviction may take: pinned, leased, or handed out within `path_grace`.
    fn protected(&self, path_grace: std::time::Duration) -> Result<HashSet<Digest>> {
        let index = self.index();
        let now = now();
        let mut protected: HashSet<Digest> = self
            .inner
            .leases
            .lock()
            .expect("poisoned")
            .values()
            .filter(|lease| lease.expires > now)
            .map(|lease| lease.module.clone())
            .collect();
        for (reference, _) in index.pins()? {
            let module = index
                .reference(&reference)?
                .and_then(|r| index.manifest(&r.manifest_digest).ok().flatten())
                .map(|m| m.module_digest);
            protected.extend(module);
        }
        for (key, record) in index.modules()? {
            if let Ok(digest) = key.parse::<Digest>() {
                let since = now_millis().saturating_sub(self.last_access(&digest, &record).0);
                if u128::from(since) < path_grace.as_millis() {
                    protected.insert(digest);
                }
            }
        }
        Ok(protected)
    }

    /// Bytes and count of the stored modules.
    pub fn usage(&self) -> Result<Usage> {
        Ok(Usage {
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            modules: self.inner.modules.load(Ordering::Relaxed),
        })
    }

    /// Records a committed module in the index and in the usage totals.
    pub fn add_module(&self, digest: &Digest, size: u64) -> Result<ModuleRecord> {
        let known = self.index().module(digest)?.is_some();
        let record = self.index().put_module(digest, size)?;
        if !known {
            self.inner.bytes.fetch_add(size, Ordering::Relaxed);
            self.inner.modules.fetch_add(1, Ordering::Relaxed);
        }
        Ok(record)
    }

    /// Makes room for `incoming` bytes under the budget's high watermark: returns at once
    /// when there is room (the common case, cheap enough to run before every download),
    /// otherwise evicts by size as [`Store::evict`] does.
    pub fn make_room(&self, budget: &Budget, incoming: u64) -> Result<Vec<Evicted>> {
        if self.inner.bytes.load(Ordering::Relaxed) + incoming <= budget.high_mark() {
            return Ok(Vec::new());
        }
        self.evict(budget, incoming)
    }

    /// Evicts modules per `budget`, making room for `incoming` more bytes: unused modules
    /// older than `max_age` go; then, when usage plus `incoming` passes the high watermark,
    /// least recently used modules go until it is under the low watermark. Pinned, leased and
    /// recently handed-out modules are never taken. Index entries go before files.
    pub fn evict(&self, budget: &Budget, incoming: u64) -> Result<Vec<Evicted>> {
        let protected = self.protected(budget.path_grace)?;
        let now = now_millis();
        let mut candidates: Vec<((u64, u64), Digest, u64)> = self
            .index()
            .modules()?
            .into_iter()
            .filter_map(|(key, record)| {
                let digest = key.parse::<Digest>().ok()?;
                let last = self.last_access(&digest, &record);
                Some((last, digest, record.size))
            })
            .collect();
        let mut total: u64 = candidates.iter().map(|(_, _, size)| size).sum();
        candidates.retain(|(_, digest, _)| !protected.contains(digest));
        candidates.sort();
        let mut evicted = Vec::new();
        let high = budget.high_mark();
        let low = budget.low_mark();
        let over = total + incoming > high;
        for (last, digest, size) in candidates {
            let reason = if u128::from(now.saturating_sub(last.0)) > budget.max_age.as_millis() {
                EvictionReason::Age
            } else if over && total + incoming > low {
                EvictionReason::Size
            } else {
                continue;
            };
            total -= size;
            evicted.push(Evicted {
                digest,
                size,
                reason,
            });
        }
        // Index entries first (one pass, one flush), then the files.
        let victims: HashSet<Digest> = evicted.iter().map(|e| e.digest.clone()).collect();
        self.purge_entries(&victims)?;
        let mut access = self.inner.access.lock().expect("poisoned");
        for module in &evicted {
            access.remove(&module.digest);
        }
        drop(access);
        for module in &evicted {
            self.delete_blob(&module.digest)?;
            tracing::info!(digest = %module.digest, size = module.size, reason = ?module.reason, "evicted");
        }
        Ok(evicted)
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

/// The cache's size limits and eviction rules.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most bytes of modules the cache may hold.
    pub max_bytes: u64,
    /// Fraction of `max_bytes` past which eviction starts.
    pub high_watermark: f64,
    /// Fraction of `max_bytes` eviction brings usage under.
    pub low_watermark: f64,
    /// Modules unused this long are evicted.
    pub max_age: std::time::Duration,
    /// Modules handed out this recently are never evicted.
    pub path_grace: std::time::Duration,
}

impl Budget {
    fn high_mark(&self) -> u64 {
        (self.max_bytes as f64 * self.high_watermark) as u64
    }

    fn low_mark(&self) -> u64 {
        (self.max_bytes as f64 * self.low_watermark) as u64
    }
}

/// Why a module was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionReason {
    /// The cache passed its high watermark.
    Size,
    /// Unused for longer than `max_age`.
    Age,
}

impl EvictionReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::Size => "size",
            EvictionReason::Age => "age",
        }
    }
}

/// One evicted module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Evicted {
    /// The module.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Why.
    pub reason: EvictionReason,
}

/// Usage of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes of module blobs.
    pub bytes: u64,
    /// Number of modules.
    pub modules: u64,
}

/// A protection of one module from eviction until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Identifier to release it with.
    pub id: u64,
    /// The module.
    pub module: Digest,
    /// Unix time (seconds) it ends.
    pub expires: u64,
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

/// Current Unix time in milliseconds.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Hashes a file in chunks; returns its digest and size.
fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut size = 0;
    loop {
        let n = io::Read::read(&mut file, &mut buffer)?;
        if n == 0 {
            return Ok((Digest::from_hasher(hasher), size));
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
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
    /// Bytes whose writeback has been started (see [`Ingest::start_writeback`]).
    written_back: u64,
    limit: u64,
}

/// How many written bytes an ingest lets pile up before asking the kernel to start writing
/// them out.
const WRITEBACK_CHUNK: u64 = 1 << 20;

impl Ingest {
    /// Starts writing the bytes written since the last call out to disk, without waiting.
    ///
    /// The commit's `fsync` must wait for every dirty page of the blob; started early, most
    /// of that writeback overlaps the download instead of following it. Only a hint: errors
    /// are ignored (the `fsync` reports real ones), and other systems than Linux skip it.
    fn start_writeback(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: sync_file_range only reads its integer arguments; the descriptor is
            // open for as long as `self.file` lives.
            unsafe {
                libc::sync_file_range(
                    self.file.as_file().as_raw_fd(),
                    self.written_back as libc::off64_t,
                    (self.written - self.written_back) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.written_back = self.written;
    }

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
        if self.written - self.written_back >= WRITEBACK_CHUNK {
            self.start_writeback();
        }
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

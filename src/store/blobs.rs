//! Blob files: `blobs/sha256/<hex>` (read-only module bytes named by their sha256) and the
//! `ingest/` temp files they are written through.
//!
//! An [`Ingest`] hashes bytes as they are written; [`Store::commit`] checks the digest, fsyncs,
//! makes the file read-only, renames it into `blobs/` and fsyncs the directory. Recording a
//! committed blob in the index is the caller's next step (see `records.rs`), never this one's.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{Error, Result, Store};
use crate::digest::Digest;

impl Store {
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
        let file = open_no_follow(&self.blob_path(digest))?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("module file {digest} is not a regular file"),
            ));
        }
        let length = metadata.len();
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

    /// The length of blob `digest` on disk, if it is there (committed, so verified).
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        std::fs::symlink_metadata(self.blob_path(digest))
            .ok()
            .filter(|metadata| metadata.is_file())
            .map(|metadata| metadata.len())
    }

    /// Whether the blob is present on disk.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        // Asked on every warm hit: a lookup of one name in the open directory, and (the name
        // being short) no allocation. A miss asks again by path, in case the directory itself
        // was replaced behind the daemon's back.
        rustix::fs::statat(
            &self.inner.blobs_dir,
            digest.hex(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file())
            || fs::symlink_metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file())
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
        match fs::symlink_metadata(&target) {
            // The same bytes arrived by another path: keep the existing file.
            Ok(metadata) if metadata.is_file() => return Ok((actual, written)),
            // Not a file the store made (a directory, say): out of the way. A symlink is
            // replaced by the rename itself, never followed.
            Ok(metadata) if metadata.is_dir() => {
                fs::remove_dir_all(&target).map_err(io_error("remove", &target))?;
            }
            _ => {}
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

/// Hashes a file in chunks; returns its digest and size.
/// Opens `path` for reading, refusing a symlink (`ELOOP`) instead of following it.
pub(super) fn open_no_follow(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Hashes the regular file at `path` (a symlink is an error, never followed).
pub(super) fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut file = open_no_follow(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
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

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

pub(super) fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

//! Sending stored blobs to sockets without copying them through the daemon.
//!
//! [`map`] maps a blob file read-only and registers the mapping's address range together with
//! the open file. A connection wrapped in [`SpliceIo`] looks up each buffer it is asked to
//! write: one that lies inside a registered mapping is sent from the file with `sendfile(2)`
//! instead, so the kernel moves page-cache pages into the socket (a unix socket takes them
//! without copying on Linux 6.5 and later; the reader's `read` is then the only copy, as with
//! reading the file itself). The bytes are the same either way: the mapping is of that very
//! file, and blob files are never changed in place. A mapped buffer under 64 KiB that follows
//! others (an h2 DATA frame after its header) is written with them in one `writev` instead. Any writer that
//! copies the bytes first (an encoder, TLS) simply reads the mapping as memory, so correctness never rests on
//! the lookup.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{PoisonError, RwLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Live mappings by start address: where each ends and the file it maps.
static REGIONS: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());

struct Region {
    end: usize,
    file: RawFd,
}

/// A registered mapping; unregisters itself before the mapping and the file go away.
struct Mapping {
    map: memmap2::Mmap,
    _file: File,
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let start = self.map.as_ptr() as usize;
        REGIONS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&start);
    }
}

/// Maps `file` (opened read-only, never changed in place while mapped) as [`Bytes`] that a
/// [`SpliceIo`] sends with `sendfile(2)`. Readahead of the whole file is started, so that
/// sending rarely waits for the disk. Blocking.
pub fn map(file: File) -> io::Result<Bytes> {
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the caller promises the file is not truncated or rewritten while mapped; the
    // store's blob files are written once, renamed read-only into place and only unlinked.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let _ = map.advise(memmap2::Advice::WillNeed);
    let start = map.as_ptr() as usize;
    let region = Region {
        end: start + map.len(),
        file: file.as_raw_fd(),
    };
    REGIONS
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(start, region);
    Ok(Bytes::from_owner(Mapping { map, _file: file }))
}

/// Smallest buffer sent with `sendfile` when other buffers come before it: below it, one
/// `writev` that copies it along with them (an h2 frame header, say) costs less than a system
/// call of its own. A mapped buffer that comes first is always sent from the file.
const SENDFILE_MIN: usize = 64 << 10;

/// The file and offset behind `buffer`, if it lies inside one live mapping.
fn find(buffer: &[u8]) -> Option<(RawFd, u64)> {
    if buffer.is_empty() {
        return None;
    }
    let start = buffer.as_ptr() as usize;
    let regions = REGIONS.read().unwrap_or_else(PoisonError::into_inner);
    let (&base, region) = regions.range(..=start).next_back()?;
    (start + buffer.len() <= region.end).then_some((region.file, (start - base) as u64))
}

/// A stream socket tokio drives, on which a raw system call can wait for write readiness.
pub trait Socket: AsyncRead + AsyncWrite + AsFd + AsRawFd + Unpin + Send + 'static {
    /// Polls for write readiness.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Runs `f` and clears write readiness if it would block.
    fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
}

impl Socket for UnixStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, f)
    }
}

impl Socket for TcpStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, f)
    }
}

/// A connection that sends mapped blobs (see [`map`]) with `sendfile(2)`.
pub struct SpliceIo<S> {
    inner: S,
    /// `SO_SNDBUF` to ask for before the first file is sent (then `None`).
    send_buffer: Option<usize>,
    sent: Counter,
}

impl<S: Socket> SpliceIo<S> {
    /// Wraps `inner`. `send_buffer`, if given, is set as the socket's send buffer before the
    /// first file goes out (the kernel caps it at `net.core.wmem_max`); `sent` counts the
    /// bytes sent from files.
    pub fn new(inner: S, send_buffer: Option<usize>, sent: Counter) -> Self {
        SpliceIo {
            inner,
            send_buffer,
            sent,
        }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        buffer: &[u8],
        file: RawFd,
        offset: u64,
    ) -> Poll<io::Result<usize>> {
        if let Some(size) = self.send_buffer.take() {
            if let Err(error) = socket2::SockRef::from(&self.inner).set_send_buffer_size(size) {
                tracing::debug!(%error, size, "cannot enlarge the socket's send buffer");
            }
        }
        let socket = self.inner.as_raw_fd();
        loop {
            ready!(self.inner.poll_writable(cx))?;
            let sent = self.inner.try_write_with(|| {
                let mut offset = offset as libc::off_t;
                // SAFETY: both descriptors are open: the socket is owned by `self.inner`, the
                // file by the mapping `buffer` borrows from.
                let sent = unsafe { libc::sendfile(socket, file, &mut offset, buffer.len()) };
                if sent < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(sent as usize)
                }
            });
            match sent {
                Ok(count) => {
                    self.sent.inc_by(count as u64);
                    return Poll::Ready(Ok(count));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                // A socket or file the kernel cannot send from: copy instead.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                    ) =>
                {
                    return Pin::new(&mut self.inner).poll_write(cx, buffer);
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl<S: Socket> AsyncRead for SpliceIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: Socket> AsyncWrite for SpliceIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match find(buf) {
            Some((file, offset)) => self.poll_send_file(cx, buf, file, offset),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    /// Writes the buffers before the first mapped one of at least [`SENDFILE_MIN`] bytes as
    /// usual; a mapped first buffer goes out with `sendfile(2)`. Either way a short write,
    /// which callers handle.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mapped = bufs.iter().enumerate().find_map(|(index, buffer)| {
            let found = find(buffer)?;
            (index == 0 || buffer.len() >= SENDFILE_MIN).then_some((index, found))
        });
        match mapped {
            Some((0, (file, offset))) => self.poll_send_file(cx, &bufs[0], file, offset),
            Some((index, _)) => Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[..index]),
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper queues body chunks (rather than copying them into its own buffer) only for
        // vectored writers, and the chunks must reach us as they are.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use bytes::Buf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn mapped(content: &[u8]) -> Bytes {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(content).unwrap();
        map(file).unwrap()
    }

    #[tokio::test]
    async fn mapped_buffers_go_out_with_sendfile_and_arrive_intact() {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let bytes = mapped(&content);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let sent = Counter::default();
        let default_buffer = socket2::SockRef::from(&ours).send_buffer_size().unwrap();
        let mut io = SpliceIo::new(ours, Some(1 << 20), sent.clone());
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            theirs.read_to_end(&mut received).await.unwrap();
            received
        });
        let middle = bytes.slice(1000..2_000_000);
        // Three buffers, as hyper queues them: a head, a mapped body, a trailer.
        let mut chained = Buf::chain(&b"head:"[..], middle).chain(&b":tail"[..]);
        io.write_all_buf(&mut chained).await.unwrap();
        let send_buffer = socket2::SockRef::from(io.get_ref())
            .send_buffer_size()
            .unwrap();
        assert!(
            send_buffer > default_buffer,
            "{send_buffer} <= {default_buffer}"
        );
        io.shutdown().await.unwrap();
        drop(io);
        let received = reader.await.unwrap();
        let mut expected = b"head:".to_vec();
        expected.extend_from_slice(&content[1000..2_000_000]);
        expected.extend_from_slice(b":tail");
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "the bytes differ");
        assert_eq!(sent.get(), 2_000_000 - 1000, "sent by sendfile");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_mappings_of_one_file_each_send_their_own_bytes() {
        let content: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&content).unwrap();
        let content = std::sync::Arc::new(content);
        let sent = Counter::default();
        let tasks: Vec<_> = (0..8usize)
            .map(|k| {
                let (path, content, sent) = (file.path().to_owned(), content.clone(), sent.clone());
                tokio::spawn(async move {
                    let bytes = map(File::open(path).unwrap()).unwrap();
                    let (start, end) = (k * 100_000, 1_500_000 - k * 50_000);
                    let (ours, mut theirs) = UnixStream::pair().unwrap();
                    let mut io = SpliceIo::new(ours, None, sent);
                    let reader = tokio::spawn(async move {
                        let mut received = Vec::new();
                        theirs.read_to_end(&mut received).await.unwrap();
                        received
                    });
                    io.write_all_buf(&mut bytes.slice(start..end))
                        .await
                        .unwrap();
                    io.shutdown().await.unwrap();
                    drop(io);
                    assert!(reader.await.unwrap() == content[start..end], "task {k}");
                    end - start
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        assert_eq!(
            sent.get(),
            total as u64,
            "every byte went out with sendfile"
        );
    }

    #[tokio::test]
    async fn a_small_mapped_buffer_after_a_header_is_written_with_it() {
        let bytes = mapped(&[7u8; 100_000]);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let sent = Counter::default();
        let mut io = SpliceIo::new(ours, Some(1 << 20), sent.clone());
        // An h2 DATA frame: a 9-byte header, then 16 KiB of payload.
        let payload = bytes.slice(0..16 << 10);
        let frame = [IoSlice::new(&[0; 9]), IoSlice::new(&payload)];
        let written = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write_vectored(cx, &frame))
            .await
            .unwrap();
        assert_eq!(written, 9 + (16 << 10), "one writev for both");
        assert_eq!(sent.get(), 0);
        // The same payload first in line goes out from the file.
        let first = [IoSlice::new(&payload)];
        let written = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write_vectored(cx, &first))
            .await
            .unwrap();
        assert_eq!(sent.get(), written as u64);
        io.shutdown().await.unwrap();
        drop(io);
        let mut received = Vec::new();
        theirs.read_to_end(&mut received).await.unwrap();
        assert_eq!(received.len(), 9 + 2 * (16 << 10));
        assert!(received[9..].iter().all(|&b| b == 7));
    }

    #[test]
    fn only_live_mappings_are_found() {
        let bytes = mapped(&[5u8; 100_000]);
        assert!(find(&bytes[10..20]).is_some_and(|(_, offset)| offset == 10));
        let copy = bytes.to_vec();
        assert!(find(&copy).is_none(), "a copy is ordinary memory");
        let address = bytes.as_ptr() as usize;
        drop(bytes);
        let regions = REGIONS.read().unwrap();
        assert!(
            !regions.contains_key(&address),
            "dropped mapping unregistered"
        );
    }
}

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
//!
//! [`SpliceIo`] also holds small writes back until the writer flushes, so the frames of one
//! small answer (an h2 response's headers, message and trailers) leave in one system call
//! and wake the reader once. On HTTP/2 its [`FlushGate`] lets the task that drives the
//! connection hold even the flushes back while it polls, so that the answers to a batch of
//! requests leave together (see `api::serve`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
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

/// Most bytes of small writes held back until the writer flushes: h2 writes a response's
/// frames in up to three system calls (the DATA payload as a buffer of its own, then the
/// trailers), each of which may wake the reader; held back, they go out in one.
const COALESCE_MAX: usize = 16 << 10;

/// How an HTTP/2 connection starts (`PRI * HTTP/2.0…`); no HTTP/1 request does.
const H2_PREFACE_START: &[u8] = b"PRI ";

/// Most buffers passed to one `writev`.
const MAX_IOVECS: usize = 64;

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

/// Shared by a [`SpliceIo`] and the task that drives its connection: while that task says
/// [`FlushGate::hold`], an HTTP/2 connection's flushes leave the held-back bytes in place, and
/// the task polls its connection once more after [`FlushGate::release`] says some were held.
///
/// Only the driving task touches it, within its own polls, so relaxed atomics suffice (they
/// are atomics because the task may move between threads between polls).
#[derive(Debug, Default)]
pub struct FlushGate {
    /// Flushes are held while this is set.
    holding: AtomicBool,
    /// A flush was held since [`FlushGate::hold`].
    held: AtomicBool,
}

impl FlushGate {
    /// Holds flushes from now on.
    pub fn hold(&self) {
        self.held.store(false, Ordering::Relaxed);
        self.holding.store(true, Ordering::Relaxed);
    }

    /// Lets flushes through again; true if one was held since [`FlushGate::hold`], so that
    /// bytes wait for the next flush.
    pub fn release(&self) -> bool {
        self.holding.store(false, Ordering::Relaxed);
        self.held.swap(false, Ordering::Relaxed)
    }

    /// Whether to hold a flush now (noting that one was).
    fn holds(&self) -> bool {
        let holding = self.holding.load(Ordering::Relaxed);
        if holding {
            self.held.store(true, Ordering::Relaxed);
        }
        holding
    }
}

/// A connection that sends mapped blobs (see [`map`]) with `sendfile(2)`, and holds small
/// writes back until the writer flushes (hyper and h2 flush after every batch of frames), so
/// that a small response goes out in one system call.
pub struct SpliceIo<S> {
    inner: S,
    /// `SO_SNDBUF` to ask for before the first file is sent (then `None`).
    send_buffer: Option<usize>,
    sent: Counter,
    /// Bytes accepted from the writer and not yet written to the socket.
    pending: Vec<u8>,
    /// The first bytes read, until there are enough to tell HTTP/2 (see
    /// [`SpliceIo::is_write_vectored`]).
    opening: Vec<u8>,
    /// Lets the driving task hold flushes back on HTTP/2.
    gate: Arc<FlushGate>,
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
            pending: Vec::new(),
            opening: Vec::new(),
            gate: Arc::default(),
        }
    }

    /// The gate through which the task driving this connection holds its flushes back.
    pub fn flush_gate(&self) -> Arc<FlushGate> {
        self.gate.clone()
    }

    /// Whether the peer opened with the HTTP/2 preface.
    fn is_h2(&self) -> bool {
        self.opening == H2_PREFACE_START
    }

    /// Writes `pending` and then `bufs` in one `writev`, returning how many bytes of `bufs`
    /// went out; a write that takes only (part of) `pending` is retried.
    fn poll_write_after_pending(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.pending.is_empty() {
                if bufs.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            slices[0] = IoSlice::new(&self.pending);
            let count = 1 + bufs.len().min(MAX_IOVECS - 1);
            slices[1..count].copy_from_slice(&bufs[..count - 1]);
            let written =
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..count]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_pending = written.min(self.pending.len());
            self.pending.drain(..from_pending);
            if written > from_pending {
                return Poll::Ready(Ok(written - from_pending));
            }
        }
    }

    /// Writes every held-back byte.
    fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_after_pending(cx, &[]))?;
        Poll::Ready(Ok(()))
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.opening.len() >= H2_PREFACE_START.len() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        let wanted = H2_PREFACE_START.len() - this.opening.len();
        this.opening
            .extend_from_slice(&read[..read.len().min(wanted)]);
        if read.is_empty() {
            // End of stream: nothing more to tell.
            this.opening.resize(H2_PREFACE_START.len(), 0);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Socket> AsyncWrite for SpliceIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Holds small writes back (see [`COALESCE_MAX`]); otherwise writes what is held back and
    /// the buffers before the first mapped one of at least [`SENDFILE_MIN`] bytes in one
    /// `writev`, or sends a mapped first buffer with `sendfile(2)` once nothing is held back.
    /// Either way a short write, which callers handle.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Bytes held back come first, as a buffer before all of these.
        let first = this.pending.is_empty();
        let mapped = bufs.iter().enumerate().find_map(|(index, buffer)| {
            let found = find(buffer)?;
            ((first && index == 0) || buffer.len() >= SENDFILE_MIN).then_some((index, found))
        });
        match mapped {
            Some((0, (file, offset))) => {
                ready!(this.poll_write_pending(cx))?;
                this.poll_send_file(cx, &bufs[0], file, offset)
            }
            Some((index, _)) => this.poll_write_after_pending(cx, &bufs[..index]),
            None => {
                let total: usize = bufs.iter().map(|buffer| buffer.len()).sum();
                if this.pending.len() + total <= COALESCE_MAX {
                    for buffer in bufs {
                        this.pending.extend_from_slice(buffer);
                    }
                    return Poll::Ready(Ok(total));
                }
                this.poll_write_after_pending(cx, bufs)
            }
        }
    }

    /// Yes for HTTP/1: hyper queues body chunks (rather than copying them into its own
    /// buffer) only for vectored writers, and the chunks must reach us as they are. No once
    /// the peer has opened with the HTTP/2 preface (h2 asks when the connection starts): h2
    /// then copies DATA payloads under 1 KiB into its frame buffer instead of 256 bytes, so a
    /// whole gRPC answer (headers, message, trailers) is written by one flush rather than
    /// two, and the client is woken once. Larger payloads still reach us as they are.
    fn is_write_vectored(&self) -> bool {
        !self.is_h2()
    }

    /// Writes what is held back, unless the [`FlushGate`] holds flushes on an HTTP/2
    /// connection: h2 ends every poll of its connection with a flush, so the driving task's
    /// next poll writes them.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pending.is_empty() && this.is_h2() && this.gate.holds() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
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

    #[tokio::test]
    async fn small_writes_are_held_back_until_the_flush() {
        let bytes = mapped(&[9u8; 200_000]);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let sent = Counter::default();
        let mut io = SpliceIo::new(ours, None, sent.clone());
        // A gRPC answer as h2 writes it: headers, a message chained as its own buffer,
        // trailers; then a small mapped payload behind them.
        io.write_all(b"headers").await.unwrap();
        io.write_all(&[1; 300]).await.unwrap();
        io.write_all(b"trailers").await.unwrap();
        io.write_all(&bytes[..4096]).await.unwrap();
        let mut buffer = vec![0; 1 << 16];
        let early = theirs.try_read(&mut buffer);
        assert!(
            early
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
            "nothing is sent before the flush: {early:?}"
        );
        io.flush().await.unwrap();
        theirs.readable().await.unwrap();
        let read = theirs.try_read(&mut buffer).unwrap();
        assert_eq!(read, 7 + 300 + 8 + 4096, "everything arrives at the flush");
        assert_eq!(
            sent.get(),
            0,
            "a small mapped buffer behind others is copied"
        );
        // A large mapped buffer behind held-back bytes: those first, then the file.
        io.write_all(b"head").await.unwrap();
        io.write_all(&bytes[..SENDFILE_MIN]).await.unwrap();
        assert_eq!(sent.get(), SENDFILE_MIN as u64);
        io.shutdown().await.unwrap();
        drop(io);
        let mut rest = Vec::new();
        let mut theirs = theirs;
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[..4], b"head");
        assert_eq!(rest.len(), 4 + SENDFILE_MIN);
        assert!(rest[4..].iter().all(|&b| b == 9));
    }

    #[tokio::test]
    async fn http2_connections_are_told_to_copy_small_payloads() {
        for (opening, h2) in [
            (&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], true),
            (&b"GET /v1/modules HTTP/1.1\r\n"[..], false),
            (&b"PR"[..], false),
        ] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let mut io = SpliceIo::new(ours, None, Counter::default());
            assert!(io.is_write_vectored(), "before anything is read");
            theirs.write_all(opening).await.unwrap();
            theirs.shutdown().await.unwrap();
            // Read in pieces of 2 bytes: the preface may arrive split.
            let mut received = Vec::new();
            loop {
                let mut piece = [0u8; 2];
                let read = io.read(&mut piece).await.unwrap();
                if read == 0 {
                    break;
                }
                received.extend_from_slice(&piece[..read]);
            }
            assert_eq!(received, opening, "the bytes pass through");
            assert_eq!(!io.is_write_vectored(), h2, "{opening:?}");
        }
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

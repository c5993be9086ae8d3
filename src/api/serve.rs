//! The accept loop every listener runs: hyper's HTTP/1 and HTTP/2 server on each connection,
//! with a graceful stop, like `axum::serve`, and one difference in how HTTP/2 requests run.
//!
//! hyper hands each HTTP/2 request to an executor as a task of its own. With tokio's
//! scheduler, a request task that answers at once wakes its connection's task, which then
//! runs next and writes that one answer: a batch of requests read in one `recv` went out in
//! as many `writev`s, each waking the client again. [`InlineFirst`] polls a request's future
//! once, right where the connection accepted it, and spawns it only if it is not done. A
//! warm hit is answered in that poll, so every answer to a batch is queued before the
//! connection next flushes, and leaves in one write; a request that waits (a download, a
//! large body held back by flow control) goes on as a task, as before.
//!
//! hyper's HTTP/2 server still flushes after each request it takes from the connection, so
//! the connection's task holds those flushes back while it polls (the connection's
//! [`FlushGate`]): what the poll wrote stays in the connection's buffer (at most
//! `splice::COALESCE_MAX` bytes; more is written at once), and if any flush was held the task
//! polls the connection once more with the gate open, which ends in the flush that writes
//! it all. A batch of warm hits read in one `recv` is answered by one `writev`.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};
use tracing::{debug, error, trace};

use crate::splice::{FlushGate, Socket, SpliceIo};

/// Counts the polls of every connection's task, so that the daemon can tell when it has been
/// idle (see `daemon::trim_when_idle`).
#[derive(Debug, Default)]
pub struct Activity(AtomicU64);

impl Activity {
    /// Connection polls so far.
    pub fn polls(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn note(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves each connection `listener` accepts with the service `make` builds for it (from
/// the connection and its peer's address), until `stop` is cancelled; then stops accepting,
/// asks every open connection to finish its requests and close, and returns once they have.
/// Every poll of a connection is counted in `activity`.
pub async fn serve<L, I, M, S>(
    mut listener: L,
    mut make: M,
    stop: CancellationToken,
    activity: Arc<Activity>,
) where
    L: Listener<Io = SpliceIo<I>>,
    I: Socket,
    M: FnMut(&L::Io, L::Addr) -> S,
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let connections = TaskTracker::new();
    loop {
        let (io, address) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let service = make(&io, address)
            .map_request(|request: hyper::Request<Incoming>| request.map(Body::new));
        let stop = stop.clone();
        let gate = io.flush_gate();
        let activity = activity.clone();
        connections.spawn(async move {
            let mut builder = Builder::new(InlineFirst);
            builder.http2().enable_connect_protocol();
            let mut connection = pin!(builder.serve_connection_with_upgrades(
                TokioIo::new(io),
                TowerToHyperService::new(service)
            ));
            let served = tokio::select! {
                served = poll_fn(|cx| poll_gated(connection.as_mut(), &gate, &activity, cx)) => served,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    poll_fn(|cx| poll_gated(connection.as_mut(), &gate, &activity, cx)).await
                }
            };
            if let Err(error) = served {
                trace!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    debug!(
        open = connections.len(),
        "listener stopped; finishing open connections"
    );
    connections.wait().await;
}

/// Polls `connection` with its flushes held back, and once more with them let through if
/// any was held (see the module docs); counts the poll in `activity`.
fn poll_gated<F: Future>(
    mut connection: Pin<&mut F>,
    gate: &FlushGate,
    activity: &Activity,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    activity.note();
    gate.hold();
    let polled = connection.as_mut().poll(cx);
    if !gate.release() || polled.is_ready() {
        return polled;
    }
    connection.poll(cx)
}

/// hyper's executor for HTTP/2 requests: polls a request's future once in place, and spawns
/// it on tokio only if that poll left it pending (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct InlineFirst;

impl<F> hyper::rt::Executor<F> for InlineFirst
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let mut future = Box::pin(future);
        // The no-op waker is never relied on: a pending future is spawned, and tokio polls
        // it again with its real waker before it waits for anything.
        let mut cx = Context::from_waker(Waker::noop());
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
            Ok(Poll::Ready(_)) => {}
            Ok(Poll::Pending) => {
                tokio::spawn(future);
            }
            // As a spawned task's panic would, this ends the request (its stream is reset),
            // not the connection it came on.
            Err(_) => error!("an HTTP/2 request's handler panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InlineFirst;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_ready_future_runs_in_place_and_a_pending_one_is_finished_by_tokio() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        InlineFirst.execute(async move {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "ran before execute returned"
        );

        let (send, receive) = tokio::sync::oneshot::channel::<u32>();
        let (done, finished) = tokio::sync::oneshot::channel();
        InlineFirst.execute(async move {
            let value = receive.await.expect("sent");
            done.send(value).expect("test waits");
        });
        send.send(7).expect("the task holds the receiver");
        let value = tokio::time::timeout(std::time::Duration::from_secs(5), finished)
            .await
            .expect("the pending future was spawned and woken")
            .expect("sent");
        assert_eq!(value, 7);
    }

    #[tokio::test]
    async fn a_panic_in_place_does_not_reach_the_caller() {
        InlineFirst.execute(async {
            panic!("handler bug");
        });
    }
}

#[cfg(test)]
mod batching {
    //! A batch of HTTP/2 requests read together is answered by one write.

    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use axum::routing::get;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::UnixStream;
    use tokio_util::sync::CancellationToken;

    use crate::splice::{Socket, SpliceIo};

    /// A unix stream that counts the writes that put bytes on it.
    struct Counting {
        inner: UnixStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
                this.writes.fetch_add(1, Ordering::SeqCst);
            }
            written
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    impl AsFd for Counting {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.inner.as_fd()
        }
    }

    impl AsRawFd for Counting {
        fn as_raw_fd(&self) -> RawFd {
            self.inner.as_raw_fd()
        }
    }

    impl Socket for Counting {
        fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.inner.poll_writable(cx)
        }
        fn try_write_with(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
            self.inner.try_write_with(f)
        }
    }

    /// Hands out one connection, then none.
    struct One(Option<SpliceIo<Counting>>);

    impl axum::serve::Listener for One {
        type Io = SpliceIo<Counting>;
        type Addr = ();
        async fn accept(&mut self) -> (Self::Io, ()) {
            match self.0.take() {
                Some(io) => (io, ()),
                None => std::future::pending().await,
            }
        }
        fn local_addr(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The server runs on a multi-thread runtime (whose scheduler runs a task woken by the
    /// running one next, which made each answer a write of its own), the client on a
    /// one-thread runtime of its own, where its connection task runs only once all the
    /// requests are queued, and writes them together.
    #[test]
    fn answers_to_requests_read_together_leave_in_one_write() {
        let server = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        client.block_on(batch_of_requests(server.handle()));
    }

    async fn batch_of_requests(server_runtime: &tokio::runtime::Handle) {
        const BATCH: usize = 16;
        let (ours, theirs) = UnixStream::pair().unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let io = SpliceIo::new(
            Counting {
                inner: ours,
                writes: writes.clone(),
            },
            None,
            Counter::default(),
        );
        let router = axum::Router::new().route("/", get(|| async { "answer" }));
        let stop = CancellationToken::new();
        let server = server_runtime.spawn(super::serve(
            One(Some(io)),
            move |_, ()| router.clone(),
            stop.clone(),
            Arc::default(),
        ));

        let (mut client, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(theirs))
                .await
                .unwrap();
        tokio::spawn(connection);
        let get_one =
            |client: &mut hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>| {
                let request = hyper::Request::get("http://localhost/")
                    .body(Empty::new())
                    .unwrap();
                let response = client.send_request(request);
                async move {
                    let response = response.await.unwrap();
                    assert_eq!(response.status(), 200);
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(&body[..], b"answer");
                }
            };
        // Settle the handshake (settings and their acknowledgements) first.
        get_one(&mut client).await;
        let before = writes.load(Ordering::SeqCst);
        let batch: Vec<_> = (0..BATCH).map(|_| get_one(&mut client)).collect();
        futures_util::future::join_all(batch).await;
        let batch_writes = writes.load(Ordering::SeqCst) - before;
        assert!(
            batch_writes <= 2,
            "{BATCH} answers took {batch_writes} writes"
        );
        stop.cancel();
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server stops once asked and its connection closes")
            .unwrap();
    }
}

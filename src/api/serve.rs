//! The accept loop every listener runs: hyper-util's HTTP/1 and HTTP/2 connection builder on
//! each accepted connection, with the peer's identity put into every request as an
//! extension, and the limits every listener keeps.
//!
//! - **Open connections** are capped at [`Limits::max_connections`] per listener: past the
//!   cap the loop stops accepting, and new connections wait in the kernel's backlog until one
//!   closes (as mini-redis does).
//! - **Request headers** must arrive within [`Limits::header_read_timeout`]: the first
//!   request's from when the connection is accepted (whatever its protocol), and on HTTP/1
//!   each later request's from when the previous answer was sent (hyper's own timer). So a
//!   client that connects and sends nothing, or half a request, is dropped.
//! - **A client that stops reading** is dropped after [`Limits::idle_timeout`]: a write that
//!   makes no progress for that long fails the connection, and an HTTP/2 client must answer
//!   the keep-alive ping sent after that long without frames within the same time.
//!
//! On `stop`, the loop stops accepting and every open connection is asked to finish the
//! requests it has and close (hyper's graceful shutdown).

use std::error::Error as _;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, trace};

use crate::metrics::Metrics;

/// What every listener enforces on its connections (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once on one listener.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time after which a connection whose writes make no progress, or an HTTP/2 client that
    /// does not answer a ping, is dropped.
    pub idle_timeout: Duration,
}

/// Counts the requests every listener has taken, so that the daemon can tell when it has
/// been idle (see `daemon::trim_when_idle`).
#[derive(Debug, Default)]
pub struct Activity(AtomicU64);

impl Activity {
    /// Requests taken so far.
    pub fn requests(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn note(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One listener: what it is called in metrics and logs, its routes, and what it shares with
/// the daemon's other listeners.
pub struct Serve {
    /// `unix`, `tcp` or `wasme`: the `listener` label of the connection metrics.
    pub name: &'static str,
    /// The routes, with the listener's own layers on.
    pub router: axum::Router,
    /// The limits every connection is held to.
    pub limits: Limits,
    /// Where the connection metrics go.
    pub metrics: Metrics,
    /// Counts requests for the daemon's idle detection.
    pub activity: Arc<Activity>,
}

impl Serve {
    /// Serves each connection `listener` accepts, with the peer `identify` names (from the
    /// connection and its address) in every request's extensions, until `stop` is
    /// cancelled; then stops accepting, lets open connections finish their requests and
    /// close, and returns once they have.
    pub async fn run<L, P>(
        self,
        mut listener: L,
        identify: impl Fn(&L::Io, L::Addr) -> P,
        stop: CancellationToken,
    ) where
        L: Listener,
        L::Io: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        P: Clone + Send + Sync + 'static,
    {
        let Serve {
            name,
            router,
            limits,
            metrics,
            activity,
        } = self;
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let connections = TaskTracker::new();
        loop {
            if permits.available_permits() == 0 {
                debug!(
                    listener = name,
                    max_connections = limits.max_connections,
                    "connection limit reached; new connections wait"
                );
            }
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                () = stop.cancelled() => break,
            };
            let (io, address) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => break,
            };
            let peer = identify(&io, address);
            let connection = Connection {
                name,
                limits,
                metrics: metrics.clone(),
                first_request: Arc::default(),
            };
            let activity = activity.clone();
            let first_request = connection.first_request.clone();
            let service = router
                .clone()
                .map_request(move |request: hyper::Request<Incoming>| {
                    let mut request = request.map(Body::new);
                    request.extensions_mut().insert(peer.clone());
                    first_request.store(true, Ordering::Relaxed);
                    activity.note();
                    request
                });
            let stop = stop.clone();
            connections.spawn(async move {
                connection.serve(io, service, stop).await;
                drop(permit);
            });
        }
        drop(listener);
        connections.close();
        debug!(
            listener = name,
            open = connections.len(),
            "listener stopped; finishing open connections"
        );
        connections.wait().await;
    }
}

/// One accepted connection's settings and state.
struct Connection {
    name: &'static str,
    limits: Limits,
    metrics: Metrics,
    /// Set once the connection's first request has arrived.
    first_request: Arc<AtomicBool>,
}

impl Connection {
    async fn serve<I, S>(self, io: I, service: S, stop: CancellationToken)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        S: tower::Service<
                hyper::Request<Incoming>,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let Limits {
            header_read_timeout,
            idle_timeout,
            ..
        } = self.limits;
        let mut io = TimeoutStream::new(io);
        io.set_write_timeout(Some(idle_timeout));
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(idle_timeout)
            .keep_alive_timeout(idle_timeout)
            .enable_connect_protocol();
        let mut connection = pin!(builder.serve_connection_with_upgrades(
            TokioIo::new(Box::pin(io)),
            TowerToHyperService::new(service)
        ));
        let open = self.metrics.connection_opened(self.name);
        let mut first_deadline = pin!(tokio::time::sleep(header_read_timeout));
        let (mut awaiting_first, mut stopping) = (true, false);
        let reason = loop {
            tokio::select! {
                served = connection.as_mut() => break served.err().map(|error| classify(&*error)),
                () = &mut first_deadline, if awaiting_first => {
                    if !self.first_request.load(Ordering::Relaxed) {
                        break Some(Dropped::HeaderTimeout);
                    }
                    awaiting_first = false;
                }
                () = stop.cancelled(), if !stopping => {
                    connection.as_mut().graceful_shutdown();
                    stopping = true;
                }
            }
        };
        drop(open);
        if let Some(reason) = reason {
            trace!(
                listener = self.name,
                reason = reason.as_str(),
                "connection dropped"
            );
            self.metrics.connection_dropped(self.name, reason.as_str());
        }
    }
}

/// Why a connection was closed before its client closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// Request headers did not arrive in time.
    HeaderTimeout,
    /// A write made no progress for `idle_timeout`, or an HTTP/2 ping went unanswered.
    Stalled,
    /// Any other connection error (a protocol error, a reset).
    Error,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::HeaderTimeout => "header_timeout",
            Dropped::Stalled => "stalled",
            Dropped::Error => "error",
        }
    }
}

/// Sorts a connection's error by what the client did.
fn classify(error: &(dyn std::error::Error + 'static)) -> Dropped {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(error) = error.downcast_ref::<hyper::Error>() {
            if error.is_timeout() {
                // hyper's own timers: the HTTP/1 header read is a timeout of its own kind,
                // the HTTP/2 keep-alive ping an HTTP/2 error caused by a timeout.
                return if error.source().is_none() {
                    Dropped::HeaderTimeout
                } else {
                    Dropped::Stalled
                };
            }
        }
        if let Some(error) = error.downcast_ref::<io::Error>() {
            if error.kind() == io::ErrorKind::TimedOut {
                return Dropped::Stalled;
            }
        }
        cause = error.source();
    }
    Dropped::Error
}

//! A TCP relay that puts a fixed one-way delay on every byte, so that a loopback registry
//! looks like one across a network: each request pays twice the delay, as a round trip.
//!
//! Each direction of each connection is a delay line: a reader stamps every chunk with the
//! time it was read and queues it, a writer sends each chunk once its stamp is `delay` old.
//! Chunks keep their order and the delays overlap, so the delay adds latency without cutting
//! throughput. The end of a stream is delayed the same way.
//!
//! Opening a connection is not delayed by [`Relay::start`] (the relay accepts at once and
//! connects upstream at once): a fresh connection pays no extra round trip for its TCP
//! handshake, which flatters clients that open many connections. [`Relay::start_with_handshake`]
//! charges it: the bytes a client sends upstream are held until one round trip (2 × delay)
//! after the relay accepted its connection, then pay the one-way delay as any others, as if
//! they had waited in the client's kernel for the SYN-ACK. Bytes sent later are not held; the
//! downstream direction is not held (the server answers only what reached it). Each accepted
//! connection is counted ([`Relay::connections`]).

use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// A relay on a free loopback port to `upstream`; it stops, with every connection through it,
/// when dropped.
pub struct Relay {
    /// `127.0.0.1:PORT`, to be used instead of the upstream's address.
    pub addr: String,
    accepting: JoinHandle<()>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `upstream` (`HOST:PORT`),
    /// each direction `delay` late; opening a connection costs nothing.
    pub fn start(runtime: &tokio::runtime::Runtime, upstream: &str, delay: Duration) -> Relay {
        Relay::open(runtime, upstream, delay, false)
    }

    /// Like [`Relay::start`], but a new connection pays one round trip (2 × `delay`) for its
    /// handshake before its first bytes go upstream.
    pub fn start_with_handshake(
        runtime: &tokio::runtime::Runtime,
        upstream: &str,
        delay: Duration,
    ) -> Relay {
        Relay::open(runtime, upstream, delay, true)
    }

    /// How many connections the relay has accepted since it started.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn open(
        runtime: &tokio::runtime::Runtime,
        upstream: &str,
        delay: Duration,
        handshake: bool,
    ) -> Relay {
        let listener = StdListener::bind("127.0.0.1:0").expect("a free port for the relay");
        let addr = listener.local_addr().expect("relay address").to_string();
        listener.set_nonblocking(true).expect("non-blocking relay");
        let _context = runtime.enter();
        let listener = TcpListener::from_std(listener).expect("relay listener");
        let upstream = upstream.to_owned();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let accepting = runtime.spawn(async move {
            // Owned by this task: aborting it drops the set, which aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors, say: try again a little later.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                // The handshake's round trip, counted from the accept.
                let held_until = match handshake {
                    true => Instant::now() + 2 * delay,
                    false => Instant::now(),
                };
                while connections.try_join_next().is_some() {}
                connections.spawn(relay(client, upstream.clone(), delay, held_until));
            }
        });
        Relay {
            addr,
            accepting,
            accepted,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Relays one connection both ways until both directions have ended; nothing goes upstream
/// before `held_until`.
async fn relay(client: TcpStream, upstream: String, delay: Duration, held_until: Instant) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let now = Instant::now();
    tokio::join!(
        delay_line(client_read, server_write, delay, held_until),
        delay_line(server_read, client_write, delay, now),
    );
}

/// One direction: everything read from `from` is written to `to` `delay` after it was read,
/// or after `held_until` if it was read before then.
async fn delay_line(from: OwnedReadHalf, to: OwnedWriteHalf, delay: Duration, held_until: Instant) {
    let (queue, queued) = unbounded_channel();
    tokio::join!(
        read_into(from, queue, delay, held_until),
        write_when_due(queued, to)
    );
}

/// Reads chunks and queues each with the time it is due; an empty chunk marks the end.
async fn read_into(
    mut from: OwnedReadHalf,
    queue: UnboundedSender<(Instant, Vec<u8>)>,
    delay: Duration,
    held_until: Instant,
) {
    let mut buffer = vec![0; 64 << 10];
    loop {
        // An error ends the stream like an end of file.
        let read = from.read(&mut buffer).await.unwrap_or(0);
        let chunk = buffer[..read].to_vec();
        let due = Instant::now().max(held_until) + delay;
        if queue.send((due, chunk)).is_err() || read == 0 {
            return;
        }
    }
}

/// Writes each queued chunk when it is due; at the end marker, shuts the write side down.
async fn write_when_due(mut queued: UnboundedReceiver<(Instant, Vec<u8>)>, mut to: OwnedWriteHalf) {
    while let Some((due, chunk)) = queued.recv().await {
        tokio::time::sleep_until(due).await;
        if chunk.is_empty() {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&chunk).await.is_err() {
            // The receiver is dropped on return, which stops the reader at its next chunk.
            return;
        }
    }
}

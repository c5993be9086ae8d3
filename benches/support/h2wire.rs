//! A lean HTTP/2 client for unary gRPC calls over a unix socket, used to generate load.
//!
//! tonic's client (a tower buffer task, hyper and h2 behind a `Channel`) spends about as much
//! CPU per call as the daemon spends answering it. On a two-core machine the load generator
//! then competes with the daemon for the cores being measured, and its own queueing shows up in
//! the daemon's latencies. This client does the least a correct HTTP/2 peer can: a call is one
//! `write` of a HEADERS and a DATA frame, and the connection's reader task parses the frames
//! of many answers from one `read`. It still speaks real HTTP/2 (RFC 9113): the preface,
//! SETTINGS and their ACKs, PING ACKs, flow control in both directions, header blocks encoded
//! and decoded with the `hpack` crate (one encoder and one decoder per connection, so the
//! dynamic tables stay in step), RST_STREAM and GOAWAY as errors. Every answer is checked:
//! `:status` 200, `content-type: application/grpc…`, `grpc-status` 0 and exactly one
//! uncompressed length-prefixed message, which the caller decodes.
//!
//! It is not a general client: no CONTINUATION frames (an answer's header block must fit one
//! frame), no server push (disabled in our SETTINGS), no request bodies larger than the peer's
//! initial stream window, and answers of at most [`STREAM_WINDOW`] bytes.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// Frame payloads we accept (our SETTINGS leave SETTINGS_MAX_FRAME_SIZE at its default).
const MAX_FRAME: usize = 16_384;
/// The receive window we grant each stream (SETTINGS_INITIAL_WINDOW_SIZE): a unary answer
/// must fit in it, as streams are never replenished.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// The connection receive window we keep open; replenished once half of it is used.
const CONNECTION_WINDOW: u32 = 1 << 30;
/// The window every peer starts with (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// Why a call failed: the connection broke, or the answer was not a successful gRPC answer.
#[derive(Debug)]
pub struct CallError(pub String);

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CallError {}

/// One HTTP/2 connection; clones share it and its reader task, which ends with the last clone.
#[derive(Clone)]
pub struct Connection {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Shared {
    authority: String,
    /// The write half and the header encoder: a stream's id is taken, its header block encoded
    /// and its frames written under this one lock, so ids and encoder state reach the peer in
    /// order.
    writer: tokio::sync::Mutex<Writer>,
    state: Mutex<State>,
    /// Signalled when the peer grows our connection send window.
    window_grown: Notify,
}

struct Writer {
    socket: OwnedWriteHalf,
    encoder: hpack::Encoder<'static>,
    buffer: Vec<u8>,
}

struct State {
    next_stream: u32,
    calls: HashMap<u32, Call>,
    /// Connection-level send window for our DATA frames.
    send_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE (each new stream's send window).
    stream_send_window: i64,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS, if it set one.
    max_streams: Option<u32>,
    /// Set once the connection is unusable; every later call fails with it.
    broken: Option<String>,
}

struct Call {
    status_ok: bool,
    grpc_status: Option<String>,
    body: BytesMut,
    done: oneshot::Sender<Result<Bytes, CallError>>,
}

impl Connection {
    /// Connects to `socket` and sends the preface; `authority` goes in every `:authority`.
    pub async fn connect(socket: &Path, authority: &str) -> std::io::Result<Connection> {
        let stream = UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let mut opening = PREFACE.to_vec();
        let settings = [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
        ];
        frame_header(&mut opening, 6 * settings.len(), SETTINGS, 0, 0);
        for (id, value) in settings {
            opening.extend_from_slice(&id.to_be_bytes());
            opening.extend_from_slice(&value.to_be_bytes());
        }
        window_update(&mut opening, 0, CONNECTION_WINDOW - DEFAULT_WINDOW as u32);
        write.write_all(&opening).await?;
        let shared = Arc::new(Shared {
            authority: authority.to_owned(),
            writer: tokio::sync::Mutex::new(Writer {
                socket: write,
                encoder: hpack::Encoder::new(),
                buffer: Vec::with_capacity(512),
            }),
            state: Mutex::new(State {
                next_stream: 1,
                calls: HashMap::new(),
                send_window: DEFAULT_WINDOW,
                stream_send_window: DEFAULT_WINDOW,
                max_streams: None,
                broken: None,
            }),
            window_grown: Notify::new(),
        });
        let reader = tokio::spawn(read_frames(shared.clone(), read));
        Ok(Connection {
            handle: Arc::new(Handle { shared, reader }),
        })
    }

    /// Calls the unary method `path` (`/package.Service/Method`) with the encoded request
    /// `message`; returns the answer's encoded message.
    pub async fn call(&self, path: &str, message: &[u8]) -> Result<Bytes, CallError> {
        let shared = &self.handle.shared;
        let body_len = 5 + message.len();
        let (done, answer) = oneshot::channel();
        let mut done = Some(done);
        let mut writer = shared.writer.lock().await;
        // Waits for connection window (the peer replenishes it as it reads our requests).
        loop {
            let grown = shared.window_grown.notified();
            let stream = {
                let mut state = shared.state.lock().expect("poisoned");
                if let Some(reason) = &state.broken {
                    return Err(CallError(reason.clone()));
                }
                if body_len as i64 > state.stream_send_window {
                    return Err(CallError(format!(
                        "a {body_len}-byte request exceeds the peer's stream window of {}",
                        state.stream_send_window
                    )));
                }
                if let Some(max) = state.max_streams {
                    if state.calls.len() >= max as usize {
                        return Err(CallError(format!(
                            "more than the peer's {max} concurrent streams"
                        )));
                    }
                }
                (state.send_window >= body_len as i64).then(|| {
                    state.send_window -= body_len as i64;
                    let stream = state.next_stream;
                    state.next_stream += 2;
                    let call = Call {
                        status_ok: false,
                        grpc_status: None,
                        body: BytesMut::new(),
                        done: done.take().expect("sent once"),
                    };
                    state.calls.insert(stream, call);
                    stream
                })
            };
            if let Some(stream) = stream {
                let Writer {
                    socket,
                    encoder,
                    buffer,
                } = &mut *writer;
                buffer.clear();
                encode_call(buffer, encoder, stream, &shared.authority, path, message);
                if let Err(error) = socket.write_all(buffer).await {
                    return Err(CallError(format!("writing the request: {error}")));
                }
                break;
            }
            grown.await;
        }
        drop(writer);
        answer
            .await
            .unwrap_or_else(|_| Err(CallError("the connection's reader ended".to_owned())))
    }
}

/// Appends a HEADERS frame and a DATA frame (END_STREAM) for one call on `stream`.
fn encode_call(
    buffer: &mut Vec<u8>,
    encoder: &mut hpack::Encoder<'static>,
    stream: u32,
    authority: &str,
    path: &str,
    message: &[u8],
) {
    let headers: [(&[u8], &[u8]); 7] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"user-agent", b"wasmcache-bench-h2wire"),
    ];
    let start = buffer.len();
    buffer.resize(start + FRAME_HEADER, 0);
    encoder
        .encode_into(headers, buffer)
        .expect("writing into a Vec");
    let block = buffer.len() - start - FRAME_HEADER;
    assert!(block <= MAX_FRAME, "a header block of {block} bytes");
    let mut header = Vec::with_capacity(FRAME_HEADER);
    frame_header(&mut header, block, HEADERS, END_HEADERS, stream);
    buffer[start..start + FRAME_HEADER].copy_from_slice(&header);
    frame_header(buffer, 5 + message.len(), DATA, END_STREAM, stream);
    buffer.push(0);
    buffer.extend_from_slice(&(message.len() as u32).to_be_bytes());
    buffer.extend_from_slice(message);
}

fn frame_header(buffer: &mut Vec<u8>, length: usize, kind: u8, flags: u8, stream: u32) {
    assert!(length < 1 << 24);
    buffer.extend_from_slice(&(length as u32).to_be_bytes()[1..]);
    buffer.push(kind);
    buffer.push(flags);
    buffer.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

fn window_update(buffer: &mut Vec<u8>, stream: u32, increment: u32) {
    frame_header(buffer, 4, WINDOW_UPDATE, 0, stream);
    buffer.extend_from_slice(&increment.to_be_bytes());
}

/// Sends control frames (ACKs, window updates) without holding up the reader.
fn send_control(shared: &Arc<Shared>, frames: Vec<u8>) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut writer = shared.writer.lock().await;
        if let Err(error) = writer.socket.write_all(&frames).await {
            fail_all(&shared, format!("writing a control frame: {error}"));
        }
    });
}

/// Marks the connection broken and fails every call in flight with `reason`.
fn fail_all(shared: &Shared, reason: String) {
    let calls: Vec<Call> = {
        let mut state = shared.state.lock().expect("poisoned");
        state.broken.get_or_insert_with(|| reason.clone());
        state.calls.drain().map(|(_, call)| call).collect()
    };
    for call in calls {
        let _ = call.done.send(Err(CallError(reason.clone())));
    }
    shared.window_grown.notify_waiters();
}

/// The connection's reader: parses frames until the socket closes or the peer errs.
async fn read_frames(shared: Arc<Shared>, mut socket: OwnedReadHalf) {
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let mut decoder = hpack::Decoder::new();
    let mut received = 0u64;
    let reason = loop {
        while buffer.len() >= FRAME_HEADER {
            let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
            if length > MAX_FRAME {
                fail_all(
                    &shared,
                    format!("a {length}-byte frame over the 16 KiB maximum"),
                );
                return;
            }
            if buffer.len() < FRAME_HEADER + length {
                break;
            }
            let kind = buffer[3];
            let flags = buffer[4];
            let stream =
                u32::from_be_bytes([buffer[5], buffer[6], buffer[7], buffer[8]]) & 0x7fff_ffff;
            buffer.advance(FRAME_HEADER);
            let payload = buffer.split_to(length).freeze();
            if kind == DATA {
                received += length as u64;
                if received >= u64::from(CONNECTION_WINDOW / 2) {
                    let mut frames = Vec::new();
                    window_update(&mut frames, 0, received as u32);
                    send_control(&shared, frames);
                    received = 0;
                }
            }
            if let Err(reason) = on_frame(&shared, &mut decoder, kind, flags, stream, payload) {
                fail_all(&shared, reason);
                return;
            }
        }
        buffer.reserve(16 * 1024);
        match socket.read_buf(&mut buffer).await {
            Ok(0) => break "the daemon closed the connection".to_owned(),
            Ok(_) => {}
            Err(error) => break format!("reading from the daemon: {error}"),
        }
    };
    fail_all(&shared, reason);
}

fn on_frame(
    shared: &Arc<Shared>,
    decoder: &mut hpack::Decoder<'static>,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Bytes,
) -> Result<(), String> {
    match kind {
        SETTINGS if flags & ACK == 0 => {
            if !payload.len().is_multiple_of(6) {
                return Err(format!("a SETTINGS frame of {} bytes", payload.len()));
            }
            let mut state = shared.state.lock().expect("poisoned");
            for setting in payload.chunks_exact(6) {
                let id = u16::from_be_bytes([setting[0], setting[1]]);
                let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                match id {
                    SETTINGS_INITIAL_WINDOW_SIZE => state.stream_send_window = i64::from(value),
                    SETTINGS_MAX_CONCURRENT_STREAMS => state.max_streams = Some(value),
                    _ => {}
                }
            }
            drop(state);
            let mut frames = Vec::new();
            frame_header(&mut frames, 0, SETTINGS, ACK, 0);
            send_control(shared, frames);
        }
        PING if flags & ACK == 0 => {
            let mut frames = Vec::new();
            frame_header(&mut frames, payload.len(), PING, ACK, 0);
            frames.extend_from_slice(&payload);
            send_control(shared, frames);
        }
        WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(format!("a WINDOW_UPDATE of {} bytes", payload.len()));
            }
            let increment =
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
            // Stream windows are checked against the peer's initial window when a call is
            // sent; a unary request never needs more than that.
            if stream == 0 {
                shared.state.lock().expect("poisoned").send_window += i64::from(increment);
                shared.window_grown.notify_waiters();
            }
        }
        HEADERS => {
            if flags & END_HEADERS == 0 {
                return Err(format!(
                    "stream {stream}: a header block split into CONTINUATION frames"
                ));
            }
            let block = unpad(payload, flags, stream)?;
            let block = if flags & PRIORITY != 0 {
                block.get(5..).ok_or("a short PRIORITY block")?
            } else {
                &block[..]
            };
            // Decoded even for an unknown stream: the decoder's table must see every block.
            let fields = decoder
                .decode(block)
                .map_err(|error| format!("stream {stream}: undecodable header block: {error:?}"))?;
            let mut state = shared.state.lock().expect("poisoned");
            let Some(call) = state.calls.get_mut(&stream) else {
                return Err(format!("HEADERS on stream {stream}, which has no call"));
            };
            for (name, value) in fields {
                match &name[..] {
                    b":status" => call.status_ok = value == b"200",
                    b"content-type" if !value.starts_with(b"application/grpc") => {
                        call.status_ok = false;
                    }
                    b"grpc-status" => {
                        call.grpc_status = Some(String::from_utf8_lossy(&value).into_owned());
                    }
                    b"grpc-message" => {
                        let message = String::from_utf8_lossy(&value).into_owned();
                        call.grpc_status = call
                            .grpc_status
                            .take()
                            .map(|status| format!("{status} ({message})"));
                    }
                    _ => {}
                }
            }
            if flags & END_STREAM != 0 {
                let call = state.calls.remove(&stream).expect("looked up above");
                drop(state);
                finish(call, stream);
            }
        }
        DATA => {
            let data = unpad(payload, flags, stream)?;
            let mut state = shared.state.lock().expect("poisoned");
            let Some(call) = state.calls.get_mut(&stream) else {
                return Err(format!("DATA on stream {stream}, which has no call"));
            };
            if call.body.len() + data.len() > STREAM_WINDOW as usize {
                return Err(format!(
                    "stream {stream}: an answer over {STREAM_WINDOW} bytes"
                ));
            }
            call.body.extend_from_slice(&data);
            if flags & END_STREAM != 0 {
                let call = state.calls.remove(&stream).expect("looked up above");
                drop(state);
                finish(call, stream);
            }
        }
        RST_STREAM => {
            let code = payload.get(..4).map_or(0, |code| {
                u32::from_be_bytes([code[0], code[1], code[2], code[3]])
            });
            let call = shared.state.lock().expect("poisoned").calls.remove(&stream);
            if let Some(call) = call {
                let _ = call.done.send(Err(CallError(format!(
                    "stream {stream} reset by the daemon (error code {code})"
                ))));
            }
        }
        GOAWAY => {
            let code = payload.get(4..8).map_or(0, |code| {
                u32::from_be_bytes([code[0], code[1], code[2], code[3]])
            });
            return Err(format!("the daemon sent GOAWAY (error code {code})"));
        }
        PUSH_PROMISE | CONTINUATION => {
            return Err(format!("an unexpected frame of type {kind}"));
        }
        // SETTINGS ACK, PING ACK, PRIORITY and unknown frame types are ignored (§5.5).
        _ => {}
    }
    Ok(())
}

/// The payload without its padding, when the PADDED flag is set.
fn unpad(payload: Bytes, flags: u8, stream: u32) -> Result<Bytes, String> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let padding = *payload
        .first()
        .ok_or_else(|| format!("stream {stream}: an empty padded frame"))?
        as usize;
    if padding + 1 > payload.len() {
        return Err(format!("stream {stream}: padding longer than its frame"));
    }
    Ok(payload.slice(1..payload.len() - padding))
}

/// Completes a call whose stream ended: a gRPC success with one message, or why not.
fn finish(call: Call, stream: u32) {
    let result = if !call.status_ok {
        Err(CallError(format!(
            "stream {stream}: not a 200 application/grpc answer"
        )))
    } else {
        match call.grpc_status.as_deref() {
            Some("0") => message_of(call.body.freeze(), stream),
            Some(status) => Err(CallError(format!("stream {stream}: grpc-status {status}"))),
            None => Err(CallError(format!("stream {stream}: no grpc-status"))),
        }
    };
    let _ = call.done.send(result);
}

/// The one uncompressed message of a unary answer's body.
fn message_of(body: Bytes, stream: u32) -> Result<Bytes, CallError> {
    if body.len() < 5 || body[0] != 0 {
        return Err(CallError(format!(
            "stream {stream}: a body of {} bytes is not one uncompressed gRPC message",
            body.len()
        )));
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + length {
        return Err(CallError(format!(
            "stream {stream}: a {length}-byte message in a body of {} bytes",
            body.len()
        )));
    }
    Ok(body.slice(5..))
}

//! A tiny HTTP/1.1 server that misbehaves on purpose: truncated bodies, stalls and error
//! statuses from a fixed route table, to test a puller's retries, timeouts and verification.
//!
//! It runs on its own thread and tokio runtime, so sync and async tests alike can use it; it
//! logs every request and stops (dropping every connection, stalled ones included) on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::wasm::digest;

/// Largest request head the server reads.
const MAX_HEAD: usize = 64 * 1024;

/// What the server does for one request to a route.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// A complete response.
    Ok {
        /// Status code.
        status: u16,
        /// Extra headers; `Content-Length` is added.
        headers: Vec<(String, String)>,
        /// Body (not sent for HEAD).
        body: Vec<u8>,
    },
    /// Announces the full `Content-Length`, sends the first `send_bytes` then closes.
    Truncate {
        /// Extra headers; `Content-Length` of the full body is added.
        headers: Vec<(String, String)>,
        /// The full body.
        body: Vec<u8>,
        /// How many body bytes are actually sent.
        send_bytes: usize,
    },
    /// Sends the headers and the first `after_bytes`, then hangs until the server is dropped.
    Stall {
        /// Extra headers; `Content-Length` of the full body is added.
        headers: Vec<(String, String)>,
        /// The full body.
        body: Vec<u8>,
        /// How many body bytes are sent before hanging.
        after_bytes: usize,
    },
    /// An empty response with this status.
    Status(u16),
}

impl Behaviour {
    /// A 200 with `body` as `application/octet-stream`.
    pub fn ok(body: Vec<u8>) -> Behaviour {
        Behaviour::Ok {
            status: 200,
            headers: vec![octet_stream()],
            body,
        }
    }

    /// A 200 blob response with `Docker-Content-Digest` of the (correct) body.
    pub fn blob(body: Vec<u8>) -> Behaviour {
        Behaviour::Ok {
            status: 200,
            headers: vec![octet_stream(), content_digest(&body)],
            body,
        }
    }

    /// A 206 answer to `Range: bytes=0-` carrying all of `body`, as registries that honour
    /// ranges send it, with `Docker-Content-Digest` of `body`.
    pub fn ranged(body: Vec<u8>) -> Behaviour {
        let range = format!("bytes 0-{}/{}", body.len().saturating_sub(1), body.len());
        Behaviour::Ok {
            status: 206,
            headers: vec![
                octet_stream(),
                content_digest(&body),
                ("Content-Range".into(), range),
            ],
            body,
        }
    }

    /// A blob response cut off after `send_bytes` body bytes.
    pub fn truncate(body: Vec<u8>, send_bytes: usize) -> Behaviour {
        Behaviour::Truncate {
            headers: vec![octet_stream(), content_digest(&body)],
            body,
            send_bytes,
        }
    }

    /// A blob response that hangs after `after_bytes` body bytes.
    pub fn stall(body: Vec<u8>, after_bytes: usize) -> Behaviour {
        Behaviour::Stall {
            headers: vec![octet_stream(), content_digest(&body)],
            body,
            after_bytes,
        }
    }
}

/// One request the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultyRequest {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The request target, including any query string.
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

/// Routes and request log, shared with the server thread.
#[derive(Debug, Default)]
struct State {
    /// Each route answers with its behaviours in turn, repeating the last one.
    routes: HashMap<String, (Vec<Behaviour>, usize)>,
    requests: Vec<FaultyRequest>,
}

/// A running faulty server; stops on drop.
#[derive(Debug)]
pub struct FaultyServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FaultyServer {
    /// Starts a server that answers `GET /v2/` with 200 and everything else with 404.
    pub fn start() -> FaultyServer {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding faulty server");
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("faulty server address");
        let state = Arc::new(Mutex::new(State::default()));
        let (shutdown, shutdown_signal) = oneshot::channel();
        let thread_state = Arc::clone(&state);
        let thread = thread::Builder::new()
            .name("faulty-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("faulty server runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    tokio::select! {
                        _ = accept_loop(listener, thread_state) => {}
                        _ = shutdown_signal => {}
                    }
                });
                // Dropping the runtime cancels every connection task, closing stalled sockets.
            })
            .expect("spawning faulty server thread");
        let server = FaultyServer {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        server.route(
            "/v2/",
            Behaviour::Ok {
                status: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: b"{}".to_vec(),
            },
        );
        server
    }

    /// Serves one image like a registry: the manifest by tag and by digest (GET and HEAD, with
    /// `Docker-Content-Digest` and `Content-Type`), and each blob `(digest, behaviour)`.
    pub fn serve_image(
        repo: &str,
        tag: &str,
        manifest: &[u8],
        manifest_media_type: &str,
        blobs: Vec<(String, Behaviour)>,
    ) -> FaultyServer {
        let server = FaultyServer::start();
        let manifest_digest = digest(manifest);
        let response = Behaviour::Ok {
            status: 200,
            headers: vec![
                ("Content-Type".into(), manifest_media_type.into()),
                ("Docker-Content-Digest".into(), manifest_digest.clone()),
            ],
            body: manifest.to_vec(),
        };
        for reference in [tag, manifest_digest.as_str()] {
            server.route(
                &format!("/v2/{repo}/manifests/{reference}"),
                response.clone(),
            );
        }
        for (blob_digest, behaviour) in blobs {
            server.route(&format!("/v2/{repo}/blobs/{blob_digest}"), behaviour);
        }
        server
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets (or replaces) the behaviour of `path` for all methods.
    pub fn route(&self, path: &str, behaviour: Behaviour) {
        self.route_sequence(path, vec![behaviour]);
    }

    /// Answers successive requests to `path` with `behaviours` in order, then repeats the last
    /// (e.g. a 503, then a truncated body, then the real blob).
    pub fn route_sequence(&self, path: &str, behaviours: Vec<Behaviour>) {
        assert!(!behaviours.is_empty(), "route {path} needs a behaviour");
        let mut state = self.state.lock().unwrap();
        state.routes.insert(path.to_owned(), (behaviours, 0));
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<FaultyRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many requests used `method` on a path containing `path_substring`.
    pub fn count(&self, method: &str, path_substring: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|request| request.method == method && request.path.contains(path_substring))
            .count()
    }
}

impl Drop for FaultyServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until cancelled.
async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_connection(stream, Arc::clone(&state)));
    }
}

/// Serves requests on one keep-alive connection until the client closes or a fault ends it.
async fn serve_connection(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buffer).await {
        let behaviour = next_behaviour(&state, &request);
        let head_only = request.method == "HEAD";
        state.lock().unwrap().requests.push(request);
        if !respond(&mut stream, behaviour, head_only).await {
            return;
        }
    }
}

/// Picks the behaviour for a request and advances its route's sequence.
fn next_behaviour(state: &Mutex<State>, request: &FaultyRequest) -> Behaviour {
    let mut state = state.lock().unwrap();
    let without_query = request.path.split('?').next().unwrap_or("");
    let key = if state.routes.contains_key(&request.path) {
        request.path.clone()
    } else {
        without_query.to_owned()
    };
    match state.routes.get_mut(&key) {
        Some((behaviours, hits)) => {
            let behaviour = behaviours[(*hits).min(behaviours.len() - 1)].clone();
            *hits += 1;
            behaviour
        }
        None => not_found(without_query),
    }
}

/// A 404 with an OCI error body whose code fits the path.
fn not_found(path: &str) -> Behaviour {
    let code = if path.contains("/blobs/") {
        "BLOB_UNKNOWN"
    } else if path.contains("/manifests/") {
        "MANIFEST_UNKNOWN"
    } else {
        "NAME_UNKNOWN"
    };
    let body =
        serde_json::json!({"errors": [{"code": code, "message": "not served", "detail": path}]});
    Behaviour::Ok {
        status: 404,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

/// Reads one request head (and discards any body); `None` at end of stream or on garbage.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<FaultyRequest> {
    let head_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position + 4;
        }
        if buffer.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 8192];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    buffer.drain(..head_end);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let body_length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    while buffer.len() < body_length {
        let mut chunk = [0u8; 8192];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    buffer.drain(..body_length);
    Some(FaultyRequest {
        method,
        path,
        headers,
    })
}

/// Writes the response; returns whether the connection may serve another request.
async fn respond(stream: &mut TcpStream, behaviour: Behaviour, head_only: bool) -> bool {
    let (status, headers, body, send, stall) = match behaviour {
        Behaviour::Ok {
            status,
            headers,
            body,
        } => {
            let send = body.len();
            (status, headers, body, send, false)
        }
        Behaviour::Truncate {
            headers,
            body,
            send_bytes,
        } => (200, headers, body, send_bytes, false),
        Behaviour::Stall {
            headers,
            body,
            after_bytes,
        } => (200, headers, body, after_bytes, true),
        Behaviour::Status(status) => (status, Vec::new(), Vec::new(), 0, false),
    };
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    if head_only {
        return stream.flush().await.is_ok();
    }
    let send = send.min(body.len());
    if stream.write_all(&body[..send]).await.is_err() || stream.flush().await.is_err() {
        return false;
    }
    if stall {
        // Hang until the runtime is dropped with the server.
        std::future::pending::<()>().await;
    }
    send == body.len()
}

/// A reason phrase; clients ignore it, but a blank one reads oddly in logs.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// `Content-Type: application/octet-stream`.
fn octet_stream() -> (String, String) {
    ("Content-Type".into(), "application/octet-stream".into())
}

/// `Docker-Content-Digest` of `body`.
fn content_digest(body: &[u8]) -> (String, String) {
    ("Docker-Content-Digest".into(), digest(body))
}

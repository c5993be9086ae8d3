//! A tiny HTTP/1.1 server that misbehaves on purpose (truncated bodies, stalls, error statuses
//! from a route table) to test a puller's retries, timeouts and verification, and that serves
//! files like a web server (`ETag`, `304 Not Modified`) for module URLs. [`Server`], also
//! under the token server, runs on a runtime of its own, counts the streamed bodies (endless
//! or dripping) a client hung up on, and drops every connection on drop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::wasm::digest;

/// What the server does for one request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// A complete response; `Content-Length` is added to the headers.
    Ok {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A 200 `(headers, body, sent, stall)` that announces the full `Content-Length` but
    /// sends only the first `sent` bytes, then closes the connection or, with `stall`, hangs
    /// until the server is dropped.
    Partial(Vec<(String, String)>, Vec<u8>, usize, bool),
    /// An empty response with this status.
    Status(u16),
    /// A chunked answer with this status whose body never ends (64 KiB chunks of `{`), until
    /// the client hangs up.
    Endless {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// A 200 `(headers, body, every)` that announces the full `Content-Length` and sends one
    /// byte of the body every `every`, like a registry at the end of a very slow link (never
    /// silent long enough for a read timeout).
    Drip(Vec<(String, String)>, Vec<u8>, Duration),
    /// A 200 with `ETag: <etag>` and the body, or an empty `304 Not Modified` (with the same
    /// `ETag`) when the request's `If-None-Match` names `etag`, as a web server serving a file.
    Etagged {
        etag: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

impl Behaviour {
    fn with(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Behaviour {
        Behaviour::Ok {
            status,
            headers,
            body,
        }
    }

    /// A 200 with `body` as `application/octet-stream`.
    pub fn ok(body: Vec<u8>) -> Behaviour {
        Behaviour::with(200, vec![octet_stream()], body)
    }

    /// A 200 blob response with `Docker-Content-Digest` of the (correct) body.
    pub fn blob(body: Vec<u8>) -> Behaviour {
        Behaviour::with(200, blob_headers(&body), body)
    }

    /// A blob response cut off after `send_bytes` body bytes.
    pub fn truncate(body: Vec<u8>, send_bytes: usize) -> Behaviour {
        Behaviour::Partial(blob_headers(&body), body, send_bytes, false)
    }

    /// A blob response that hangs after `after_bytes` body bytes.
    pub fn stall(body: Vec<u8>, after_bytes: usize) -> Behaviour {
        Behaviour::Partial(blob_headers(&body), body, after_bytes, true)
    }

    /// A blob response that sends one byte every `every`.
    pub fn drip(body: Vec<u8>, every: Duration) -> Behaviour {
        Behaviour::Drip(blob_headers(&body), body, every)
    }

    /// A JSON response.
    pub fn json(status: u16, body: String) -> Behaviour {
        let headers = vec![("Content-Type".into(), "application/json".into())];
        Behaviour::with(status, headers, body.into_bytes())
    }

    /// A file served with a strong `etag` (quotes included, `"v1"`) as
    /// `application/octet-stream`, answered with 304 to a matching `If-None-Match`.
    pub fn etagged(body: Vec<u8>, etag: &str) -> Behaviour {
        Behaviour::Etagged {
            etag: etag.to_owned(),
            headers: vec![octet_stream()],
            body,
        }
    }

    /// The same answer with header `name` set to `value` (replacing a header of that name).
    pub fn header(mut self, name: &str, value: &str) -> Behaviour {
        if let Behaviour::Status(status) = self {
            self = Behaviour::with(status, Vec::new(), Vec::new());
        }
        let (Behaviour::Ok { headers, .. }
        | Behaviour::Partial(headers, ..)
        | Behaviour::Drip(headers, ..)
        | Behaviour::Endless { headers, .. }
        | Behaviour::Etagged { headers, .. }) = &mut self
        else {
            unreachable!("a status answer was made an `Ok` above");
        };
        headers.retain(|(key, _)| !key.eq_ignore_ascii_case(name));
        headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// What is sent for `request`: a [`Behaviour::Etagged`] file becomes its 200 or its 304.
    fn answer(self, request: &FaultyRequest) -> Behaviour {
        let Behaviour::Etagged {
            etag,
            mut headers,
            body,
        } = self
        else {
            return self;
        };
        headers.push(("ETag".into(), etag.clone()));
        match request.header("if-none-match") {
            Some(asked) if etag_matches(asked, &etag) => {
                Behaviour::with(304, vec![("ETag".into(), etag)], Vec::new())
            }
            _ => Behaviour::with(200, headers, body),
        }
    }

    /// The status line's code.
    fn status(&self) -> u16 {
        match self {
            Behaviour::Ok { status, .. }
            | Behaviour::Status(status)
            | Behaviour::Endless { status, .. } => *status,
            Behaviour::Partial(..) | Behaviour::Drip(..) | Behaviour::Etagged { .. } => 200,
        }
    }
}

/// Whether an `If-None-Match` value (`*`, or a list of entity tags, weak or strong) names
/// `etag`, by the weak comparison RFC 9110 prescribes for it.
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    if_none_match
        .split(',')
        .any(|asked| asked.trim() == "*" || opaque(asked) == opaque(etag))
}

/// One request the server received: `path` includes any query string, header names are in
/// lower case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultyRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FaultyRequest {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Answers each request.
pub type Handler = Arc<dyn Fn(FaultyRequest) -> Behaviour + Send + Sync>;

/// An HTTP/1.1 server on a free loopback port, on a runtime of its own; stops on drop.
#[derive(Debug)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    cut_off: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(handler: Handler) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a test server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("test server address");
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        let runtime = runtime.worker_threads(1).enable_all().build();
        let runtime = runtime.expect("test server runtime");
        let cut_off = Arc::new(AtomicUsize::new(0));
        let counter = cut_off.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_connection(stream, handler.clone(), counter.clone()));
                }
            }
        });
        Server {
            addr,
            runtime: Some(runtime),
            cut_off,
        }
    }

    /// How many streamed bodies (endless or dripping) were dropped before their end: the
    /// client hung up on them.
    pub fn cut_off(&self) -> usize {
        self.cut_off.load(Ordering::SeqCst)
    }
}

/// Counts a streamed body into its server's `cut_off` when it is dropped before its end.
struct CutOffGuard {
    counter: Arc<AtomicUsize>,
    ended: bool,
}

impl CutOffGuard {
    /// The body was sent whole.
    fn end(&mut self) {
        self.ended = true;
    }
}

impl Drop for CutOffGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Drops every connection task, closing stalled sockets; allowed in async tests too.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Routes (each answers with its behaviours in turn, repeating the last) and the request log
/// with the status each request was answered with.
#[derive(Debug, Default)]
struct State {
    routes: HashMap<String, (Vec<Behaviour>, usize)>,
    requests: Vec<FaultyRequest>,
    statuses: Vec<u16>,
}

/// A running faulty server; stops on drop.
pub struct FaultyServer {
    server: Server,
    state: Arc<Mutex<State>>,
}

impl FaultyServer {
    /// Starts a server that answers `GET /v2/` with 200 and everything else with 404.
    pub fn start() -> FaultyServer {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let server = Server::start(Arc::new(move |request| {
            let mut state = shared.lock().unwrap();
            let behaviour = next_behaviour(&mut state, &request).answer(&request);
            state.statuses.push(behaviour.status());
            state.requests.push(request);
            behaviour
        }));
        let server = FaultyServer { server, state };
        server.route("/v2/", Behaviour::json(200, "{}".into()));
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
        server.route_manifest(repo, tag, manifest, manifest_media_type);
        for (blob_digest, behaviour) in blobs {
            server.route(&format!("/v2/{repo}/blobs/{blob_digest}"), behaviour);
        }
        server
    }

    /// Serves `manifest` like a registry, by tag and by digest (GET and HEAD, with
    /// `Docker-Content-Digest` and `Content-Type`).
    pub fn route_manifest(&self, repo: &str, tag: &str, manifest: &[u8], media_type: &str) {
        let manifest_digest = digest(manifest);
        let headers = vec![
            ("Content-Type".into(), media_type.into()),
            ("Docker-Content-Digest".into(), manifest_digest.clone()),
        ];
        let response = Behaviour::Ok {
            status: 200,
            headers,
            body: manifest.to_vec(),
        };
        for reference in [tag, manifest_digest.as_str()] {
            self.route(
                &format!("/v2/{repo}/manifests/{reference}"),
                response.clone(),
            );
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.server.addr.to_string()
    }

    /// How many endless or dripping bodies the client hung up on.
    pub fn cut_off(&self) -> usize {
        self.server.cut_off()
    }

    /// Sets (or replaces) the behaviour of `path` for all methods.
    pub fn route(&self, path: &str, behaviour: Behaviour) {
        self.route_sequence(path, vec![behaviour]);
    }

    /// Answers successive requests to `path` with `behaviours` in order, then repeats the last
    /// (e.g. a 503, then a truncated body, then the real blob).
    pub fn route_sequence(&self, path: &str, behaviours: Vec<Behaviour>) {
        assert!(!behaviours.is_empty(), "route {path} needs a behaviour");
        self.state
            .lock()
            .unwrap()
            .routes
            .insert(path.to_owned(), (behaviours, 0));
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<FaultyRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many requests used `method` on a path containing `path_substring`.
    pub fn count(&self, method: &str, path_substring: &str) -> usize {
        let state = self.state.lock().unwrap();
        let matches = |r: &&FaultyRequest| r.method == method && r.path.contains(path_substring);
        state.requests.iter().filter(matches).count()
    }

    /// How many requests used `method` on a path containing `path_substring` and were answered
    /// with `status` (a 304 says no body was sent).
    pub fn count_answered(&self, method: &str, path_substring: &str, status: u16) -> usize {
        let state = self.state.lock().unwrap();
        let answered = state.requests.iter().zip(&state.statuses);
        answered
            .filter(|(r, answer)| {
                r.method == method && r.path.contains(path_substring) && **answer == status
            })
            .count()
    }
}

/// Picks the behaviour for a request (by path with its query, else without) and advances its
/// route's sequence; unrouted paths get a 404 with an OCI error body whose code fits the path.
fn next_behaviour(state: &mut State, request: &FaultyRequest) -> Behaviour {
    let without_query = request.path.split('?').next().unwrap_or("");
    let key = match state.routes.contains_key(&request.path) {
        true => request.path.as_str(),
        false => without_query,
    };
    if let Some((behaviours, hits)) = state.routes.get_mut(key) {
        *hits += 1;
        return behaviours[(*hits - 1).min(behaviours.len() - 1)].clone();
    }
    let code = match without_query {
        path if path.contains("/blobs/") => "BLOB_UNKNOWN",
        path if path.contains("/manifests/") => "MANIFEST_UNKNOWN",
        _ => "NAME_UNKNOWN",
    };
    let error = serde_json::json!({"code": code, "message": "not served", "detail": without_query});
    Behaviour::json(404, serde_json::json!({ "errors": [error] }).to_string())
}

/// Serves requests on one keep-alive connection until the client closes or a fault ends it.
async fn serve_connection(stream: TcpStream, handler: Handler, cut_off: Arc<AtomicUsize>) {
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let (handler, cut_off) = (handler.clone(), cut_off.clone());
        async move {
            let (head, body) = request.into_parts();
            let body = body.collect().await.map(|body| body.to_bytes().to_vec());
            let headers = head.headers.iter().map(|(name, value)| {
                (
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            });
            let request = FaultyRequest {
                method: head.method.to_string(),
                path: head
                    .uri
                    .path_and_query()
                    .map_or("/", |path| path.as_str())
                    .to_owned(),
                headers: headers.collect(),
                body: body.unwrap_or_default(),
            };
            Ok::<_, Infallible>(response(handler(request), cut_off))
        }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let _ = connection.await;
}

/// The response for `behaviour`. `Content-Length` announces the whole body, so a body that
/// ends early makes hyper close the connection, and one that stalls keeps the client waiting.
/// A streamed body dropped before its end is counted in `cut_off`.
fn response(
    behaviour: Behaviour,
    cut_off: Arc<AtomicUsize>,
) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let guard = || CutOffGuard {
        counter: cut_off.clone(),
        ended: false,
    };
    if let Behaviour::Endless { status, headers } = behaviour {
        let mut response = hyper::Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(name, value);
        }
        let chunk = Bytes::from(vec![b'{'; 64 << 10]);
        let guard = guard();
        let frames = stream::repeat_with(move || {
            let _held = &guard;
            Ok(Frame::data(chunk.clone()))
        });
        let body = BodyExt::boxed(StreamBody::new(frames));
        return response.body(body).expect("a response");
    }
    if let Behaviour::Drip(headers, body, every) = behaviour {
        let mut response = hyper::Response::builder()
            .status(200)
            .header("Content-Length", body.len());
        for (name, value) in headers {
            response = response.header(name, value);
        }
        let frames = stream::unfold(
            (0, body, guard()),
            move |(sent, body, mut guard)| async move {
                if sent == body.len() {
                    guard.end();
                    return None;
                }
                tokio::time::sleep(every).await;
                let byte = Bytes::copy_from_slice(&body[sent..=sent]);
                Some((Ok(Frame::data(byte)), (sent + 1, body, guard)))
            },
        );
        let body = BodyExt::boxed(StreamBody::new(frames));
        return response.body(body).expect("a response");
    }
    let (status, headers, body, send, stall) = match behaviour {
        Behaviour::Ok {
            status,
            headers,
            body,
        } => (status, headers, body, usize::MAX, false),
        Behaviour::Partial(headers, body, sent, stall) => (200, headers, body, sent, stall),
        Behaviour::Status(status) => (status, Vec::new(), Vec::new(), 0, false),
        Behaviour::Endless { .. } | Behaviour::Drip(..) => unreachable!("answered above"),
        Behaviour::Etagged {
            etag,
            mut headers,
            body,
        } => {
            headers.push(("ETag".into(), etag));
            (200, headers, body, usize::MAX, false)
        }
    };
    let length = body.len();
    let mut response = hyper::Response::builder().status(status);
    // A 304 may only announce the length of the 200 it stands for (RFC 9110), so none.
    if status != 304 {
        response = response.header("Content-Length", length);
    }
    for (name, value) in headers {
        response = response.header(name, value);
    }
    let sent = Bytes::copy_from_slice(&body[..send.min(body.len())]);
    let frames = stream::iter([Ok(Frame::data(sent))]);
    let body = match stall {
        true => BodyExt::boxed(StreamBody::new(frames.chain(stream::pending()))),
        false => BodyExt::boxed(StreamBody::new(frames)),
    };
    response.body(body).expect("a response")
}

fn octet_stream() -> (String, String) {
    ("Content-Type".into(), "application/octet-stream".into())
}

/// `application/octet-stream` with `Docker-Content-Digest` of `body`.
fn blob_headers(body: &[u8]) -> Vec<(String, String)> {
    vec![
        octet_stream(),
        ("Docker-Content-Digest".into(), digest(body)),
    ]
}

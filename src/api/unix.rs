//! The service of the unix socket: `wasmcache.v1.WasmCache` calls go straight to the gRPC
//! service, everything else (health, reflection, HTTP, the OCI view) through the router.
//!
//! Proxies and agents call `Fetch` over this socket far more often than anything else, and
//! for a warm hit the router and its middleware cost a good part of the whole request (a
//! route lookup and three boxed layers). The direct path admits the peer exactly as the
//! router's [`guard::unix_peer`] layer does.
//!
//! A `Fetch` that is a warm hit with a kept answer ([`Api::warm_fetch`]) is answered here,
//! without tonic: its request is read (it is one small message, already received in
//! the common case), and the answer is the kept, encoded message and `grpc-status: 0`,
//! exactly what tonic would send. Anything else (a compressed or odd request, a miss, a
//! lease) goes on to tonic with the bytes read so far put back in front of the body.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Frame;
use tokio::net::UnixStream;
use tower::Service;

use super::grpc::{Api, MESSAGE_PREFIX, SERVICE_NAME};
use super::guard::{self, Peer};
use super::proto::wasm_cache_server::WasmCacheServer;
use super::State;
use crate::splice::SpliceIo;

/// Makes one [`UnixService`] per connection, knowing the connection's peer.
#[derive(Clone)]
pub struct MakeUnixService {
    /// Shared by every connection's service, which is cloned for each request.
    services: Arc<Services>,
}

struct Services {
    state: State,
    grpc: WasmCacheServer<Api>,
    /// The implementation behind `grpc`, for warm `Fetch`es.
    api: Arc<Api>,
    /// The router for everything else, with [`guard::unix_peer`] layered on.
    router: axum::Router,
}

impl MakeUnixService {
    /// `grpc` (implemented by `api`) answers `wasmcache.v1.WasmCache` calls; `router`
    /// everything else.
    pub fn new(
        state: State,
        grpc: WasmCacheServer<Api>,
        api: Arc<Api>,
        router: axum::Router,
    ) -> Self {
        MakeUnixService {
            services: Arc::new(Services {
                state,
                grpc,
                api,
                router,
            }),
        }
    }

    /// The service of one accepted connection.
    pub fn service_for(&self, connection: &SpliceIo<UnixStream>) -> UnixService {
        UnixService {
            peer: Peer::of(connection.get_ref()),
            services: self.services.clone(),
        }
    }
}

/// One connection's service; cheap to clone (hyper clones it for every request).
#[derive(Clone)]
pub struct UnixService {
    peer: Peer,
    services: Arc<Services>,
}

/// The path of `Fetch`.
const FETCH_PATH: &str = "/wasmcache.v1.WasmCache/Fetch";

/// `/wasmcache.v1.WasmCache/`, the prefix of the service's method paths.
fn is_wasmcache_call(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|rest| rest.strip_prefix(SERVICE_NAME))
        .is_some_and(|rest| rest.starts_with('/'))
}

impl Service<Request> for UnixService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        if !is_wasmcache_call(request.uri().path()) {
            request.extensions_mut().insert(ConnectInfo(self.peer));
            let mut router = self.services.router.clone();
            return Box::pin(async move { router.call(request).await });
        }
        if let Some(refused) = guard::admit_unix_peer(&self.services.state, self.peer, &mut request)
        {
            return Box::pin(ready(Ok(refused)));
        }
        let services = self.services.clone();
        // gRPC's trailers need HTTP/2; anything else is tonic's to answer (or refuse).
        if request.uri().path() == FETCH_PATH
            && request.version() == axum::http::Version::HTTP_2
            && is_plain_grpc(request.headers())
        {
            return Box::pin(async move {
                let (parts, body) = request.into_parts();
                let limit = services.state.fetcher.config().limits.max_request_bytes;
                let body = match read_whole(body, MESSAGE_PREFIX + limit).await {
                    Ok(whole) => {
                        if let Some(answer) =
                            one_message(&whole).and_then(|message| services.api.warm_fetch(message))
                        {
                            return Ok(unary_answer(answer));
                        }
                        Body::from(whole)
                    }
                    Err(rest) => rest,
                };
                Ok(call_grpc(&services, Request::from_parts(parts, body)).await)
            });
        }
        Box::pin(async move { Ok(call_grpc(&services, request).await) })
    }
}

async fn call_grpc(services: &Services, request: Request) -> Response {
    let mut grpc = services.grpc.clone();
    match grpc.call(request).await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    }
}

/// Whether a request's headers say gRPC without compression (what the kept answers are).
fn is_plain_grpc(headers: &HeaderMap) -> bool {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    let plain = headers
        .get("grpc-encoding")
        .is_none_or(|value| value == "identity");
    grpc && plain
}

/// Reads `body` to its end if it is data alone and at most `limit` bytes. Otherwise (more
/// bytes, trailers, an error) gives back a body that yields everything read so far and then
/// the rest, so that nothing is lost for whoever reads it next.
async fn read_whole(mut body: Body, limit: usize) -> Result<Bytes, Body> {
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(read.freeze()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if read.len() + data.len() <= limit => read.extend_from_slice(&data),
                Ok(data) => return Err(put_back(read.freeze(), Ok(Frame::data(data)), body)),
                Err(frame) => return Err(put_back(read.freeze(), Ok(frame), body)),
            },
            Some(Err(error)) => return Err(put_back(read.freeze(), Err(error), body)),
        }
    }
}

/// A body of `read`, then `next`, then what is left of `rest`.
fn put_back(read: Bytes, next: Result<Frame<Bytes>, axum::Error>, rest: Body) -> Body {
    let first = (!read.is_empty()).then(|| Ok(Frame::data(read)));
    let frames =
        futures_util::stream::iter(first.into_iter().chain([next])).chain(BodyStream::new(rest));
    Body::new(StreamBody::new(frames))
}

/// The message of a body that is exactly one uncompressed gRPC message.
fn one_message(body: &[u8]) -> Option<&[u8]> {
    let (prefix, message) = body.split_at_checked(MESSAGE_PREFIX)?;
    let length = u32::from_be_bytes(prefix[1..].try_into().ok()?);
    (prefix[0] == 0 && message.len() == length as usize).then_some(message)
}

/// A successful unary gRPC answer: `message` (prefixed), then `grpc-status: 0`.
fn unary_answer(message: Bytes) -> Response {
    let mut response = Response::new(Body::new(UnaryAnswer {
        message: Some(message),
        trailers: true,
    }));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The body of [`unary_answer`].
struct UnaryAnswer {
    message: Option<Bytes>,
    trailers: bool,
}

impl hyper::body::Body for UnaryAnswer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && !self.trailers
    }
}

#[cfg(test)]
mod tests {
    use super::{is_plain_grpc, is_wasmcache_call, one_message, read_whole};
    use axum::body::Body;
    use axum::http::HeaderMap;
    use http_body_util::BodyExt;

    #[test]
    fn one_message_takes_exactly_one_uncompressed_message() {
        assert_eq!(one_message(&[0, 0, 0, 0, 2, 7, 8]), Some(&[7u8, 8][..]));
        assert_eq!(one_message(&[0, 0, 0, 0, 0]), Some(&[][..]));
        for other in [
            &[1, 0, 0, 0, 2, 7, 8][..], // compressed
            &[0, 0, 0, 0, 3, 7, 8],     // short
            &[0, 0, 0, 0, 1, 7, 8],     // two messages, or trailing bytes
            &[0, 0, 0],
        ] {
            assert_eq!(one_message(other), None, "{other:?}");
        }
    }

    #[test]
    fn only_plain_grpc_requests_are_answered_from_kept_answers() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().unwrap());
            }
            map
        };
        assert!(is_plain_grpc(&headers(&[(
            "content-type",
            "application/grpc"
        )])));
        assert!(is_plain_grpc(&headers(&[
            ("content-type", "application/grpc+proto"),
            ("grpc-encoding", "identity"),
        ])));
        assert!(!is_plain_grpc(&headers(&[
            ("content-type", "application/grpc"),
            ("grpc-encoding", "gzip"),
        ])));
        assert!(!is_plain_grpc(&headers(&[(
            "content-type",
            "application/json"
        )])));
        assert!(!is_plain_grpc(&headers(&[])));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_given_back_whole() {
        let chunks = ["first ", "second ", "third"];
        let frames = futures_util::stream::iter(
            chunks
                .map(|c| Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(c)))),
        );
        let body = Body::new(http_body_util::StreamBody::new(frames));
        let rest = read_whole(body, 8).await.expect_err("over the limit");
        let all = rest.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"first second third");

        let whole = read_whole(Body::from("small"), 8).await.unwrap();
        assert_eq!(&whole[..], b"small");
    }

    #[test]
    fn only_the_services_own_methods_take_the_direct_path() {
        assert!(is_wasmcache_call("/wasmcache.v1.WasmCache/Fetch"));
        assert!(is_wasmcache_call("/wasmcache.v1.WasmCache/NoSuchMethod"));
        for other in [
            "/wasmcache.v1.WasmCacheX/Fetch",
            "/wasmcache.v1.WasmCache",
            "/grpc.health.v1.Health/Check",
            "/v1/modules/sha256:00",
            "wasmcache.v1.WasmCache/Fetch",
        ] {
            assert!(!is_wasmcache_call(other), "{other}");
        }
    }
}

//! How the HTTP APIs answer: JSON errors, refusals in the caller's protocol, the answer to a
//! path no route knows, and stored module bytes streamed from their file.
//!
//! Every HTTP API (`http`, `oci`, `wasme`) and the request guard answer through these, so one
//! error body and one way of sending a module exist.
//!
//! Module bytes are read from the open blob file on a blocking thread, one chunk at a time
//! ([`BLOB_CHUNK_BYTES`], at most [`READ_AHEAD_CHUNKS`] ahead of the socket), never mapped:
//! a file truncated or removed behind the daemon's back ends that one answer with an error
//! (counted in `wasmcache_blob_read_errors_total`), and the process goes on.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::error::{client_message, code, code_name, http_status};
use super::{Refused, State};
use crate::digest::Digest;
use crate::metrics::Metrics;

/// Bytes read from a module file at a time while it is served.
const BLOB_CHUNK_BYTES: usize = 256 << 10;
/// Chunks read ahead of the socket per answer, so reading and sending overlap.
const READ_AHEAD_CHUNKS: usize = 2;
/// Module files never change under their digest.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The `{"error": …, "code": …}` body every JSON error uses, with the matching status.
pub fn json_error(code: Code, message: String) -> Response {
    let status = StatusCode::from_u16(http_status(code)).expect("valid status codes");
    let body = serde_json::json!({"error": message, "code": code_name(code)});
    (status, Json(body)).into_response()
}

/// `429 Too Many Requests` for a client over `limits.max_fetches_per_client`.
fn too_many(message: String) -> Response {
    let body = serde_json::json!({"error": message, "code": code_name(Code::ResourceExhausted)});
    (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
}

/// The JSON answer to a fetch that gave no module: 429 for a client over its limit, else the
/// fetch error's status.
pub fn refused(refused: Refused) -> Response {
    match refused {
        Refused::TooMany(message) => too_many(message),
        Refused::NotCached(message) => json_error(Code::NotFound, message),
        Refused::Fetch(error) => json_error(code(&error), client_message(&error)),
    }
}

/// Whether a request is gRPC (by its content type).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A refusal in the caller's protocol: a gRPC status (tonic's encoding of it), or a JSON
/// error.
pub fn refuse(headers: &HeaderMap, code: Code, message: String) -> Response {
    if is_grpc(headers) {
        Status::new(code, message).into_http()
    } else {
        json_error(code, message)
    }
}

/// The answer to a path no route knows: `UNIMPLEMENTED` for a gRPC call, a JSON 404
/// otherwise.
pub async fn no_route(request: Request) -> Response {
    let (method, path) = (request.method(), request.uri().path());
    let code = if is_grpc(request.headers()) {
        Code::Unimplemented
    } else {
        Code::NotFound
    };
    refuse(
        request.headers(),
        code,
        format!("no route for {method} {path}"),
    )
}

/// Serves a stored blob with a strong `ETag` (its digest), `If-None-Match`, single `Range`
/// requests and a body read from the file (see the module docs). `None` when the blob is not
/// stored; a blob file that cannot be served whole is a `DATA_LOSS` error. `api` labels the
/// served-bytes and read-error metrics.
pub async fn serve_blob(
    state: &State,
    digest: &Digest,
    headers: &HeaderMap,
    content_type: &'static str,
    api: &'static str,
) -> Option<Response> {
    let store = state.fetcher.store().clone();
    let blob = digest.clone();
    let metrics = state.fetcher.metrics();
    let opened = tokio::task::spawn_blocking(move || store.open_blob(&blob))
        .await
        .expect("opening a blob panicked");
    let (file, length) = match opened {
        Ok(opened) => opened,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(%digest, api, %error, "module file cannot be served");
            metrics.blob_read_error(api);
            return Some(json_error(Code::DataLoss, client_message(&error)));
        }
    };
    let etag = format!("\"{digest}\"");
    let mut response_headers = HeaderMap::new();
    let set = |headers: &mut HeaderMap, name, value: String| {
        headers.insert(
            name,
            HeaderValue::from_str(&value).expect("ASCII header value"),
        );
    };
    set(&mut response_headers, header::ETAG, etag.clone());
    set(
        &mut response_headers,
        header::CONTENT_TYPE,
        content_type.into(),
    );
    set(&mut response_headers, header::ACCEPT_RANGES, "bytes".into());
    set(
        &mut response_headers,
        header::CACHE_CONTROL,
        IMMUTABLE.into(),
    );
    set(
        &mut response_headers,
        HeaderName::from_static("docker-content-digest"),
        digest.to_string(),
    );

    if let Some(tags) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if tags.split(',').any(|t| t.trim() == etag || t.trim() == "*") {
            return Some((StatusCode::NOT_MODIFIED, response_headers).into_response());
        }
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(text) => match parse_range(text, length) {
            Range::Whole => None,
            Range::Bytes(start, end) => Some((start, end)),
            Range::Unsatisfiable => {
                set(
                    &mut response_headers,
                    header::CONTENT_RANGE,
                    format!("bytes */{length}"),
                );
                return Some((StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response());
            }
        },
        None => None,
    };
    let (status, start, count) = match range {
        Some((start, end)) => {
            set(
                &mut response_headers,
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{length}"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        None => (StatusCode::OK, 0, length),
    };
    set(
        &mut response_headers,
        header::CONTENT_LENGTH,
        count.to_string(),
    );
    metrics.served(api, count);
    let chunks = read_blob(
        file,
        digest.clone(),
        start,
        count,
        BLOB_CHUNK_BYTES,
        metrics.clone(),
        api,
    );
    Some((status, response_headers, Body::from_stream(chunks)).into_response())
}

/// `count` bytes of the blob file `file` (named `digest`) from `start`, read on a blocking
/// thread in chunks of `chunk` bytes, a few ahead of the consumer. A file that ends early
/// (truncated behind the daemon's back) or fails to read ends the stream with an error, counted
/// against `api`; a consumer that goes away stops the reading.
pub fn read_blob(
    mut file: File,
    digest: Digest,
    start: u64,
    count: u64,
    chunk: usize,
    metrics: Metrics,
    api: &'static str,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (sender, receiver) = mpsc::channel(READ_AHEAD_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let mut send_all = || -> io::Result<()> {
            file.seek(SeekFrom::Start(start))?;
            let mut left = count;
            while left > 0 {
                let want = left.min(chunk as u64);
                let mut buffer = Vec::with_capacity(want as usize);
                (&mut file).take(want).read_to_end(&mut buffer)?;
                if buffer.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "module file {digest} ended {left} bytes early: it was changed \
                             behind the daemon's back (run `wasmcache verify --repair`)"
                        ),
                    ));
                }
                left -= buffer.len() as u64;
                if sender.blocking_send(Ok(Bytes::from(buffer))).is_err() {
                    return Ok(()); // The client went away.
                }
            }
            Ok(())
        };
        if let Err(error) = send_all() {
            tracing::warn!(%digest, api, %error, "module file could not be served whole");
            metrics.blob_read_error(api);
            let _ = sender.blocking_send(Err(error));
        }
    });
    ReceiverStream::new(receiver)
}

/// What a `Range` header asks of a file.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// The whole file: no range this server serves (several ranges, another unit), which
    /// RFC 9110 lets a server ignore.
    Whole,
    /// One byte range, inclusive.
    Bytes(u64, u64),
    /// A single byte range outside the file (416).
    Unsatisfiable,
}

/// Parses a `Range` header against a file of `length` bytes: one `bytes=` range is served,
/// anything else it cannot serve is ignored.
fn parse_range(text: &str, length: u64) -> Range {
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Range::Whole;
    };
    let bounds = match (first.trim(), last.trim()) {
        ("", suffix) => suffix
            .parse::<u64>()
            .ok()
            .filter(|suffix| *suffix > 0 && length > 0)
            .map(|suffix| (length.saturating_sub(suffix), length - 1)),
        (start, "") => start
            .parse::<u64>()
            .ok()
            .map(|start| (start, length.saturating_sub(1))),
        (start, end) => start.parse::<u64>().ok().zip(
            end.parse::<u64>()
                .ok()
                .map(|end| end.min(length.saturating_sub(1))),
        ),
    };
    match bounds {
        Some((start, end)) if start <= end && start < length => Range::Bytes(start, end),
        _ => Range::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_range, Range};

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Range::Bytes(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Range::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Range::Bytes(90, 99));
        assert_eq!(parse_range("bytes=95-200", 100), Range::Bytes(95, 99));
        assert_eq!(parse_range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=x-1", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Range::Unsatisfiable);
        // Ranges this server does not serve are ignored: the whole file.
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Range::Whole);
        assert_eq!(parse_range("items=0-1", 100), Range::Whole);
        assert_eq!(parse_range("bytes=7", 100), Range::Whole);
    }

    #[tokio::test]
    async fn a_file_cut_short_ends_the_stream_with_an_error() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let metrics = crate::metrics::Metrics::default();
        let digest = crate::digest::Digest::of(b"x");
        // The answer promised 1,500 bytes; the file holds 1,000.
        let chunks: Vec<_> = super::read_blob(file, digest, 0, 1500, 400, metrics, "http")
            .collect()
            .await;
        let sizes: Vec<_> = chunks
            .iter()
            .map(|c| c.as_ref().map(|b| b.len()).map_err(|e| e.kind()))
            .collect();
        assert_eq!(
            sizes,
            vec![
                Ok(400),
                Ok(400),
                Ok(200),
                Err(std::io::ErrorKind::UnexpectedEof)
            ]
        );
    }
}

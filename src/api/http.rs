//! HTTP endpoints for proxies and operators: module bytes, fetch as JSON, metrics, probes.
//!
//! | route                              | what                                                  |
//! |------------------------------------|-------------------------------------------------------|
//! | `GET/HEAD /v1/modules/sha256:<hex>`| verified module bytes (`?ref=` fetches through)       |
//! | `POST /v1/fetch`                   | `{"reference", "pull_policy"}` → the fetch as JSON    |
//! | `/v2/…`                            | the read-only OCI view (see `oci`)                    |
//! | `GET /metrics`                     | Prometheus metrics, OpenMetrics text                  |
//! | `GET /healthz`, `GET /readyz`      | liveness, readiness                                   |

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use tonic::Code;

use super::error::{code, http_status};
use super::guard::Client;
use super::State;
use crate::digest::Digest;
use crate::fetch::{error_chain, PullPolicy};

/// `Content-Type` of module bytes.
const WASM_CONTENT_TYPE: &str = "application/wasm";
/// `Content-Type` of `/metrics`.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Module files never change under their digest.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The HTTP routes of the main listeners.
pub fn router(state: State) -> axum::Router {
    let body_limit = state.fetcher.config().limits.max_request_bytes;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/modules/{digest}", get(module))
        .route("/v1/fetch", post(fetch))
        .merge(super::oci::router())
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// 200 once the store is open and the daemon accepts work; 503 before and while stopping.
async fn readyz(Extract(state): Extract<State>) -> (StatusCode, &'static str) {
    if state.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(Extract(state): Extract<State>) -> Response {
    let usage = match state.fetcher.store().usage() {
        Ok(usage) => usage,
        Err(_) => return json_error(Code::Internal, "reading the cache usage failed".into()),
    };
    let text = state.fetcher.metrics().encode(usage.bytes, usage.modules);
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response()
}

/// The `{"error": …, "code": …}` body every JSON error uses, with the matching status.
pub fn json_error(code: Code, message: String) -> Response {
    let status = StatusCode::from_u16(http_status(code)).expect("valid status codes");
    let body = serde_json::json!({"error": message, "code": code_name(code)});
    (status, Json(body)).into_response()
}

/// `429 Too Many Requests` for a client over `limits.max_fetches_per_client`.
pub fn too_many(message: String) -> Response {
    let body = serde_json::json!({"error": message, "code": code_name(Code::ResourceExhausted)});
    (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
}

/// The gRPC code's canonical upper-case name (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `POST /v1/fetch` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchBody {
    reference: String,
    #[serde(default)]
    pull_policy: Option<String>,
}

/// Parses a pull policy as the API spells it (`IF_NOT_PRESENT`, `ALWAYS`, `NEVER`).
pub fn parse_policy(text: Option<&str>) -> Result<PullPolicy, String> {
    match text
        .map(|t| t.to_ascii_uppercase().replace('-', "_"))
        .as_deref()
    {
        None | Some("") | Some("IF_NOT_PRESENT") | Some("IFNOTPRESENT") => {
            Ok(PullPolicy::IfNotPresent)
        }
        Some("ALWAYS") => Ok(PullPolicy::Always),
        Some("NEVER") => Ok(PullPolicy::Never),
        Some(other) => Err(format!(
            "unknown pull_policy '{other}' (IF_NOT_PRESENT, ALWAYS or NEVER)"
        )),
    }
}

async fn fetch(
    Extract(state): Extract<State>,
    client: Option<Extension<Client>>,
    body: axum::body::Bytes,
) -> Response {
    let request: FetchBody = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return json_error(Code::InvalidArgument, format!("request body: {error}")),
    };
    let reference = match state.parse_reference(&request.reference) {
        Ok(reference) => reference,
        Err(message) => return json_error(Code::InvalidArgument, message),
    };
    let policy = match parse_policy(request.pull_policy.as_deref()) {
        Ok(policy) => policy,
        Err(message) => return json_error(Code::InvalidArgument, message),
    };
    let _ticket = match state.enter_fetch(client.as_deref(), &reference) {
        Ok(ticket) => ticket,
        Err(message) => return too_many(message),
    };
    match state.fetcher.fetch(&reference, policy).await {
        Ok(fetched) => Json(fetched).into_response(),
        Err(error) => json_error(code(&error), error_chain(&error)),
    }
}

async fn module(
    Extract(state): Extract<State>,
    client: Option<Extension<Client>>,
    Path(digest): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let digest: Digest = match digest.parse() {
        Ok(digest) => digest,
        Err(error) => return json_error(Code::InvalidArgument, format!("{error}")),
    };
    if let Some(reference) = query.get("ref") {
        let reference = match state.parse_reference(reference) {
            Ok(reference) => reference,
            Err(message) => return json_error(Code::InvalidArgument, message),
        };
        let _ticket = match state.enter_fetch(client.as_deref(), &reference) {
            Ok(ticket) => ticket,
            Err(message) => return too_many(message),
        };
        match state
            .fetcher
            .fetch(&reference, PullPolicy::IfNotPresent)
            .await
        {
            Ok(fetched) if fetched.digest == digest => {}
            Ok(fetched) => {
                return json_error(
                    Code::FailedPrecondition,
                    format!(
                        "{} resolves to module {}, not {digest}",
                        fetched.reference, fetched.digest
                    ),
                )
            }
            Err(error) => return json_error(code(&error), error_chain(&error)),
        }
    }
    serve_blob(&state, &digest, &headers, WASM_CONTENT_TYPE, "http")
        .await
        .unwrap_or_else(|| json_error(Code::NotFound, format!("module {digest} is not cached")))
}

/// Serves a stored blob with a strong `ETag` (its digest), `If-None-Match`, single `Range`
/// requests and a body that is not copied in memory ([`crate::store::Store::blob_bytes`]).
/// `None` when the blob is not stored.
pub async fn serve_blob(
    state: &State,
    digest: &Digest,
    headers: &HeaderMap,
    content_type: &'static str,
    api: &'static str,
) -> Option<Response> {
    let store = state.fetcher.store().clone();
    let blob = digest.clone();
    let content = tokio::task::spawn_blocking(move || store.blob_bytes(&blob))
        .await
        .expect("mapping a blob panicked")
        .ok()?;
    let length = content.len() as u64;
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
    response_headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("ASCII digest"),
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
            Some(range) => Some(range),
            None => {
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
    state.fetcher.metrics().served(api, count);
    let body = Body::from(content.slice(start as usize..(start + count) as usize));
    Some((status, response_headers, body).into_response())
}

/// Parses one `bytes=` range against a file of `length` bytes; `None` if unsatisfiable or
/// not a single byte range. Returns inclusive `(start, end)`.
fn parse_range(text: &str, length: u64) -> Option<(u64, u64)> {
    let spec = text.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || length == 0 {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (start, end) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let suffix: u64 = suffix.parse().ok()?;
            if suffix == 0 {
                return None;
            }
            (length.saturating_sub(suffix), length - 1)
        }
        (start, "") => (start.parse().ok()?, length - 1),
        (start, end) => (
            start.parse().ok()?,
            end.parse::<u64>().ok()?.min(length - 1),
        ),
    };
    (start <= end && start < length).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
    }
}

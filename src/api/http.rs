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

use axum::extract::{DefaultBodyLimit, Path, Query, State as Extract};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use tonic::Code;

use super::guard::Client;
use super::respond::{json_error, refused, serve_blob};
use super::State;
use crate::digest::Digest;
use crate::fetch::PullPolicy;

/// `Content-Type` of module bytes.
const WASM_CONTENT_TYPE: &str = "application/wasm";
/// `Content-Type` of `/metrics`.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// `POST /v1/fetch` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchBody {
    reference: String,
    #[serde(default)]
    pull_policy: Option<String>,
    /// The module's sha256, or the digest the reference must resolve to.
    #[serde(default)]
    expected_sha256: Option<String>,
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
    let expected = match State::parse_expected(request.expected_sha256.as_deref().unwrap_or("")) {
        Ok(expected) => expected,
        Err(message) => return json_error(Code::InvalidArgument, message),
    };
    match state
        .fetch_for(
            client.as_deref(),
            &reference,
            policy,
            None,
            expected.as_ref(),
        )
        .await
    {
        Ok(fetched) => Json(fetched).into_response(),
        Err(error) => refused(error),
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
        match state
            .fetch_for(
                client.as_deref(),
                &reference,
                PullPolicy::IfNotPresent,
                None,
                None,
            )
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
            Err(error) => return refused(error),
        }
    }
    serve_blob(&state, &digest, &headers, WASM_CONTENT_TYPE, "http")
        .await
        .unwrap_or_else(|| json_error(Code::NotFound, format!("module {digest} is not cached")))
}

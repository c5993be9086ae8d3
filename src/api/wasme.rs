//! A drop-in for solo.io's `wasme cache` daemon, which Gloo and older Istio set-ups point
//! Envoy at: `GET /<64 hex sha256>` serves a cached module, `GET /<image-ref>` pulls the image
//! and serves its module; `ETag` is the digest. Served on its own listener (port 9979 as
//! wasme's) because image references in the path would clash with the main routes.

use axum::extract::{Path, State as Extract};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Extension;
use tonic::Code;

use super::error::code;
use super::guard::Client;
use super::respond::{json_error, serve_blob, too_many};
use super::State;
use crate::digest::Digest;
use crate::fetch::{error_chain, PullPolicy};

/// The wasme-compatible routes.
pub fn router(state: State) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/{*target}", get(module))
        .fallback(super::respond::no_route)
        .with_state(state)
}

async fn module(
    Extract(state): Extract<State>,
    client: Option<Extension<Client>>,
    Path(target): Path<String>,
    headers: HeaderMap,
) -> Response {
    let digest = match Digest::from_hex(&target) {
        Ok(digest) => digest,
        Err(_) => {
            let reference = match state.parse_reference(&target) {
                Ok(reference) => reference,
                Err(message) => {
                    return json_error(
                        Code::InvalidArgument,
                        format!("expected a 64-hex sha256 or an image reference: {message}"),
                    )
                }
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
                Ok(fetched) => fetched.digest,
                Err(error) => return json_error(code(&error), error_chain(&error)),
            }
        }
    };
    serve_blob(&state, &digest, &headers, "application/wasm", "wasme")
        .await
        .unwrap_or_else(|| json_error(Code::NotFound, format!("module {digest} is not cached")))
}

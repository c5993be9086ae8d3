//! Answering other daemons: OCI view requests marked with [`PEER_HEADER`].
//!
//! A peer's request is answered from the cache or by this daemon's own registry fetch
//! (`Fetcher::direct`), never passed on to another peer, so requests cannot loop. It needs
//! peers configured here, the cluster's token when `peers.token_file` is set, and, when
//! `peers.listen` is set, must arrive on that listener.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use super::oci::{
    fetch_error, invalid_name, manifest_response, oci_error, with_api_version, Upstream,
    BLOB_CONTENT_TYPE,
};
use super::respond::serve_blob;
use super::State;
use crate::digest::Digest;
use crate::peers::{PEER_HEADER, SIZE_HEADER, TOKEN_HEADER};

/// Marks requests that arrived on the `peers.listen` listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerListener;

/// Whether `headers` mark a request as a peer's.
pub fn is_peer_request(headers: &HeaderMap) -> bool {
    headers.contains_key(PEER_HEADER)
}

/// Answers a peer's manifest or blob request for `target` in `upstream`.
pub(super) async fn answer(
    state: &State,
    upstream: &Upstream,
    kind: &str,
    target: &str,
    headers: &HeaderMap,
    on_peer_listener: bool,
) -> Response {
    let Some(peers) = state.fetcher.peers() else {
        return oci_error(
            StatusCode::FORBIDDEN,
            "DENIED",
            "this daemon has no peers configured ([peers]); it answers no peer requests".into(),
        );
    };
    let config = state.fetcher.config();
    if config.peers.listen.is_some() && !on_peer_listener {
        peers.served("denied");
        return oci_error(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!(
                "peer requests are answered on the peer listener ({}) only",
                config
                    .peers
                    .listen
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            ),
        );
    }
    if !peers.accepts(headers.get(TOKEN_HEADER).map(HeaderValue::as_bytes)) {
        peers.served("denied");
        return oci_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            format!("peer request without the cluster's peer token ({TOKEN_HEADER})"),
        );
    }
    let response = match kind {
        "manifests" => manifest(state, upstream, target, headers).await,
        _ => blob(state, upstream, target, headers).await,
    };
    peers.served(match response.status() {
        StatusCode::OK => "served",
        StatusCode::NOT_FOUND => "not_found",
        _ => "failed",
    });
    response
}

async fn manifest(
    state: &State,
    upstream: &Upstream,
    target: &str,
    headers: &HeaderMap,
) -> Response {
    let reference = match upstream.reference(target) {
        Ok(reference) => reference,
        Err(error) => return invalid_name(error),
    };
    let fresh = headers
        .get(header::CACHE_CONTROL)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("no-cache"));
    let (bytes, digest) = match state.fetcher.manifest_for_peer(&reference, fresh).await {
        Ok(found) => found,
        Err(error) => return fetch_error(&error),
    };
    let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|json| json.get("mediaType")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned());
    manifest_response(&media_type, &digest, bytes)
}

async fn blob(state: &State, upstream: &Upstream, target: &str, headers: &HeaderMap) -> Response {
    let digest: Digest = match target.parse() {
        Ok(digest) => digest,
        Err(error) => {
            return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", error.to_string())
        }
    };
    if let Some(response) = serve_blob(state, &digest, headers, BLOB_CONTENT_TYPE, "peer").await {
        return with_api_version(response);
    }
    let size = headers
        .get(SIZE_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let Some(size) = size else {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "SIZE_INVALID",
            format!("a peer's request for an uncached blob needs its size in {SIZE_HEADER}"),
        );
    };
    let reference = match upstream.reference(&digest.to_string()) {
        Ok(reference) => reference,
        Err(error) => return invalid_name(error),
    };
    if let Err(error) = state.fetcher.blob_for_peer(&reference, &digest, size).await {
        return fetch_error(&error);
    }
    match serve_blob(state, &digest, headers, BLOB_CONTENT_TYPE, "peer").await {
        Some(response) => with_api_version(response),
        None => oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} was stored but is gone (evicted)"),
        ),
    }
}

//! A read-only OCI Distribution API over the cache, so any OCI client (skopeo, oras, Istio's
//! agent, containerd) can pull modules through the node's daemon.
//!
//! The upstream registry is named in one of three ways:
//!
//! | request                                   | upstream                                   |
//! |-------------------------------------------|--------------------------------------------|
//! | `/v2/<repo>/…?ns=<host[:port]>`           | `ns` (containerd mirror mode)              |
//! | `/v2/<alias>/<repo>/…`                    | `registry_aliases.<alias>`                 |
//! | `/v2/<host>/<repo>/…` (host without port) | `<host>`                                   |
//! | `/v2/<repo>/…`                            | `default_upstream`, when configured        |
//!
//! Manifests and configs are served as published (kept by digest in the index); layers are
//! the module files. Only artifact packagings (CNCF, wasme) are served: image packagings keep
//! just the extracted module. A miss fetches through from upstream when `oci_fetch_through`
//! is on. Errors use the distribution spec's JSON error body.

use std::collections::HashMap;

use axum::extract::{Path, Query, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json};
use tonic::Code;

use super::error::{client_message, code};
use super::guard::Client;
use super::respond::serve_blob;
use super::State;
use crate::digest::Digest;
use crate::fetch::{error_chain, PullPolicy};
use crate::format::Descriptor;
use crate::reference::Reference;

/// `Content-Type` of blobs.
pub(super) const BLOB_CONTENT_TYPE: &str = "application/octet-stream";

/// The `/v2/` routes.
pub fn router() -> axum::Router<State> {
    axum::Router::new()
        .route("/v2/", get(version))
        .route("/v2", get(version))
        .route("/v2/{*path}", get(dispatch))
}

async fn version() -> Response {
    with_api_version((StatusCode::OK, Json(serde_json::json!({}))).into_response())
}

pub(super) fn with_api_version(mut response: Response) -> Response {
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

/// An OCI distribution error response.
pub(super) fn oci_error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
    with_api_version((status, Json(body)).into_response())
}

/// The OCI error for a failed fetch.
pub(super) fn fetch_error(error: &crate::fetch::Error) -> Response {
    let message = client_message(error);
    match code(error) {
        Code::NotFound => oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", message),
        Code::InvalidArgument => oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", message),
        Code::PermissionDenied | Code::Unauthenticated => {
            oci_error(StatusCode::FORBIDDEN, "DENIED", message)
        }
        Code::FailedPrecondition | Code::ResourceExhausted => {
            oci_error(StatusCode::CONFLICT, "UNSUPPORTED", message)
        }
        _ => oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", message),
    }
}

/// Where a view request goes upstream.
pub(super) struct Upstream {
    pub(super) registry: String,
    pub(super) repository: String,
}

impl Upstream {
    /// The reference of `target` (a tag or digest) in this upstream repository.
    pub(super) fn reference(
        &self,
        target: &str,
    ) -> Result<Reference, crate::reference::ParseError> {
        let separator = if target.starts_with("sha256:") {
            "@"
        } else {
            ":"
        };
        format!("{}/{}{separator}{target}", self.registry, self.repository).parse()
    }
}

/// The OCI error for a reference that does not parse.
pub(super) fn invalid_name(error: crate::reference::ParseError) -> Response {
    oci_error(
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
        error.to_string(),
    )
}

/// A refused view path: the status, OCI error code and message to answer with.
struct Refused(StatusCode, &'static str, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        oci_error(self.0, self.1, self.2)
    }
}

/// Reads the upstream registry out of the repository path (and `ns`), per the module table.
fn upstream(state: &State, name: &str, ns: Option<&str>) -> Result<Upstream, Refused> {
    let config = state.fetcher.config();
    let unknown = |message: String| Refused(StatusCode::NOT_FOUND, "NAME_UNKNOWN", message);
    let (registry, repository) = if let Some(ns) = ns {
        (ns.to_owned(), name.to_owned())
    } else {
        let (first, rest) = name.split_once('/').unwrap_or((name, ""));
        if let Some(alias) = config.registry_aliases.get(first) {
            (alias.host.clone(), rest.to_owned())
        } else if (first.contains('.') || first == "localhost") && !rest.is_empty() {
            (first.to_owned(), rest.to_owned())
        } else if let Some(default) = &config.default_upstream {
            (default.clone(), name.to_owned())
        } else {
            return Err(unknown(format!(
                "'{name}' names no upstream registry: use /v2/<host>/<repository>, a configured \
                 alias, or ?ns=<host[:port]>"
            )));
        }
    };
    // The reference parser is the judge of what a registry and repository are.
    let probe = format!("{registry}/{repository}:probe");
    match probe.parse::<Reference>() {
        Ok(reference) if reference.registry() == registry => {}
        _ => {
            return Err(unknown(format!(
                "'{registry}' / '{repository}' is not a valid registry host and repository"
            )))
        }
    }
    if !config.registry_allowed(&registry) {
        return Err(Refused(
            StatusCode::FORBIDDEN,
            "DENIED",
            format!("registry {registry} is not allowed by this node's registry policy"),
        ));
    }
    Ok(Upstream {
        registry,
        repository,
    })
}

async fn dispatch(
    Extract(state): Extract<State>,
    client: Option<Extension<Client>>,
    peer_listener: Option<Extension<super::peer::PeerListener>>,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let ns = query.get("ns").map(String::as_str);
    let (name, kind, target) = match split_path(&path) {
        Some(parts) => parts,
        None => {
            return oci_error(
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
                format!("'/v2/{path}' is not a manifest or blob path of this read-only view"),
            )
        }
    };
    let upstream = match upstream(&state, name, ns) {
        Ok(upstream) => upstream,
        Err(refused) => return refused.into_response(),
    };
    if super::peer::is_peer_request(&headers) {
        let on_peer_listener = peer_listener.is_some();
        return super::peer::answer(&state, &upstream, kind, target, &headers, on_peer_listener)
            .await;
    }
    match kind {
        "manifests" => manifest(&state, client.as_deref(), &upstream, target, &method).await,
        _ => blob(&state, &upstream, target, &headers).await,
    }
}

/// `<name>/manifests/<ref>` or `<name>/blobs/<digest>` → `(name, kind, ref)`.
fn split_path(path: &str) -> Option<(&str, &'static str, &str)> {
    for kind in ["manifests", "blobs"] {
        let marker = format!("/{kind}/");
        if let Some(at) = path.rfind(&marker) {
            let (name, target) = (&path[..at], &path[at + marker.len()..]);
            if !name.is_empty() && !target.is_empty() && !target.contains('/') {
                return Some((
                    name,
                    if kind == "blobs" {
                        "blobs"
                    } else {
                        "manifests"
                    },
                    target,
                ));
            }
        }
    }
    None
}

async fn manifest(
    state: &State,
    client: Option<&Client>,
    upstream: &Upstream,
    target: &str,
    method: &Method,
) -> Response {
    let reference = match upstream.reference(target) {
        Ok(reference) => reference,
        Err(error) => return invalid_name(error),
    };
    let policy = if state.fetcher.config().oci_fetch_through {
        PullPolicy::IfNotPresent
    } else {
        PullPolicy::Never
    };
    let fetched = match state
        .fetch_for(client, &reference, policy, None, None)
        .await
    {
        Ok(fetched) => fetched,
        Err(super::Refused::TooMany(message)) => {
            return oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", message)
        }
        Err(super::Refused::Fetch(error)) => return fetch_error(&error),
        Err(super::Refused::NotCached(message)) => {
            return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", message)
        }
    };
    let digest = fetched.manifest_digest;
    let (record, bytes) = match state.fetcher.store().served_manifest(&digest) {
        Ok(Some(served)) => served,
        _ => {
            return oci_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                format!(
                "{reference} is a {} packaging; the OCI view serves CNCF and wasme artifacts only \
                     (fetch the module with /v1/modules/{})",
                fetched.format, fetched.digest
            ),
            )
        }
    };
    if method != Method::HEAD {
        state.fetcher.metrics().served("oci", bytes.len() as u64);
    }
    manifest_response(&record.media_type, &digest, bytes)
}

/// A manifest as the distribution API answers it: its media type and digest in the headers.
pub(super) fn manifest_response(
    media_type: &str,
    digest: &Digest,
    bytes: impl Into<axum::body::Body>,
) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(media_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("ASCII digest"),
    );
    with_api_version((StatusCode::OK, headers, bytes.into()).into_response())
}

async fn blob(state: &State, upstream: &Upstream, target: &str, headers: &HeaderMap) -> Response {
    let digest: Digest = match target.parse() {
        Ok(digest) => digest,
        Err(error) => {
            return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", error.to_string())
        }
    };
    let store = state.fetcher.store();
    // Only what this repository's manifests led to is served under its name: a module cached
    // for one registry or repository is not handed out as another's.
    let name = format!("{}/{}", upstream.registry, upstream.repository);
    if !store.repository_holds(&name, &digest).unwrap_or(false) {
        return oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} is not known under {name}; pull its manifest through this view first"),
        );
    }
    if let Some(response) = serve_blob(state, &digest, headers, BLOB_CONTENT_TYPE, "oci").await {
        return with_api_version(response);
    }
    let document = match store.document(&digest.to_string()) {
        Ok(Some(bytes)) => Some(bytes),
        _ => config_through(state, upstream, &digest).await,
    };
    match document {
        Some(bytes) => {
            let mut response_headers = HeaderMap::new();
            response_headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(BLOB_CONTENT_TYPE),
            );
            response_headers.insert(
                "docker-content-digest",
                HeaderValue::from_str(&digest.to_string()).expect("ASCII digest"),
            );
            state.fetcher.metrics().served("oci", bytes.len() as u64);
            with_api_version((StatusCode::OK, response_headers, bytes).into_response())
        }
        None => oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} is not cached; pull its manifest through this view first"),
        ),
    }
}

/// Fetches the config of a cached artifact from upstream the first time it is asked for, and
/// keeps it. Only digests that a cached manifest names as its config are fetched: the view
/// is no open proxy.
async fn config_through(state: &State, upstream: &Upstream, digest: &Digest) -> Option<Vec<u8>> {
    if !state.fetcher.config().oci_fetch_through {
        return None;
    }
    let store = state.fetcher.store();
    let wanted = digest.to_string();
    let (manifest_digest, manifest) = store.manifest_with_config(&wanted).ok()??;
    let config: Descriptor = serde_json::from_slice::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|json| serde_json::from_value(json.get("config")?.clone()).ok())?;
    let reference = upstream.reference(&manifest_digest.to_string()).ok()?;
    match state.fetcher.fetch_document(&reference, &config).await {
        Ok(bytes) => {
            store.keep_document(&wanted, &bytes).ok()?;
            Some(bytes)
        }
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "fetching a config through the OCI view failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_path;

    #[test]
    fn splits_view_paths() {
        assert_eq!(
            split_path("ghcr.io/org/f/manifests/v1"),
            Some(("ghcr.io/org/f", "manifests", "v1"))
        );
        assert_eq!(
            split_path("org/blobs/f/blobs/sha256:ab"),
            Some(("org/blobs/f", "blobs", "sha256:ab"))
        );
        assert_eq!(split_path("org/f/tags/list"), None);
        assert_eq!(split_path("manifests/v1"), None);
    }
}

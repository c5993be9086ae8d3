//! A drop-in for solo.io's `wasme cache` daemon, which Gloo and older Istio set-ups point
//! Envoy at: `GET /<64 hex sha256>` serves a cached module, `GET /<image-ref>` pulls the image
//! and serves its module; `ETag` is the digest. `GET /sha256:<hex>` is taken too; a bare run
//! of hex digits is always a digest, so a malformed one is refused rather than fetched as a
//! Docker Hub image. Served on its own listener (port 9979 as wasme's) because image
//! references in the path would clash with the main routes.

use axum::extract::{Path, State as Extract};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Extension;
use tonic::Code;

use super::guard::Client;
use super::respond::{json_error, refused, serve_blob};
use super::State;
use crate::digest::Digest;
use crate::fetch::PullPolicy;

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
    let digest = match named_digest(&target) {
        Some(Ok(digest)) => digest,
        Some(Err(error)) => {
            return json_error(
                Code::InvalidArgument,
                format!("expected a 64-hex sha256: {error}"),
            )
        }
        None => {
            let reference = match state.parse_reference(&target) {
                Ok(reference) => reference,
                Err(message) => {
                    return json_error(
                        Code::InvalidArgument,
                        format!("expected a 64-hex sha256 or an image reference: {message}"),
                    )
                }
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
                Ok(fetched) => fetched.digest,
                Err(error) => return refused(error),
            }
        }
    };
    serve_blob(&state, &digest, &headers, "application/wasm", "wasme")
        .await
        .unwrap_or_else(|| json_error(Code::NotFound, format!("module {digest} is not cached")))
}

/// The module digest a path names, if it names one: `sha256:<hex>`, or bare hexadecimal
/// digits (wasme's `GET /<sha256>`). A bare run of hex digits of the wrong length is a
/// malformed digest, not a Docker Hub image of that name: it is refused, never fetched.
fn named_digest(target: &str) -> Option<Result<Digest, crate::digest::ParseError>> {
    if target.starts_with("sha256:") {
        return Some(target.parse());
    }
    target
        .bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| Digest::from_hex(target))
}

#[cfg(test)]
mod tests {
    use super::named_digest;

    #[test]
    fn hex_paths_name_digests_and_only_they_do() {
        let hex = "ab".repeat(32);
        assert!(matches!(named_digest(&hex), Some(Ok(_))));
        assert!(matches!(
            named_digest(&format!("sha256:{hex}")),
            Some(Ok(_))
        ));
        for bad in [
            &hex[..63],
            &format!("{hex}0"),
            &hex.to_uppercase(),
            "sha256:xyz",
        ] {
            assert!(matches!(named_digest(bad), Some(Err(_))), "{bad}");
        }
        for image in ["library/envoy:v1", "ghcr.io/a/b:v1", "filter"] {
            assert!(named_digest(image).is_none(), "{image}");
        }
    }
}

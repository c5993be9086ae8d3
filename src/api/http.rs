//! HTTP endpoints on the daemon's listeners: liveness and readiness for Kubernetes probes.

use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::routing::get;

use super::State;

/// The HTTP routes.
pub fn router(state: State) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
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

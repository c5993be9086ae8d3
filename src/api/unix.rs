//! The service of the unix socket: `wasmcache.v1.WasmCache` calls go straight to the gRPC
//! service, everything else (health, reflection, HTTP, the OCI view) through the router.
//!
//! Proxies and agents call `Fetch` over this socket far more often than anything else, and
//! for a warm hit the router and its middleware cost a good part of the whole request (a
//! route lookup and three boxed layers). The direct path admits the peer exactly as the
//! router's [`guard::unix_peer`] layer does.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::Request;
use axum::response::Response;
use tokio::net::UnixStream;
use tower::Service;

use super::grpc::{Api, SERVICE_NAME};
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
    /// The router for everything else, with [`guard::unix_peer`] layered on.
    router: axum::Router,
}

impl MakeUnixService {
    /// `grpc` answers `wasmcache.v1.WasmCache` calls; `router` everything else.
    pub fn new(state: State, grpc: WasmCacheServer<Api>, router: axum::Router) -> Self {
        MakeUnixService {
            services: Arc::new(Services {
                state,
                grpc,
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
        let mut grpc = self.services.grpc.clone();
        Box::pin(async move {
            let response = match grpc.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(axum::body::Body::new))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_wasmcache_call;

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

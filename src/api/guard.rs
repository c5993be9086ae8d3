//! Who may call the daemon.
//!
//! On the unix socket every request is attributed to its peer (`SO_PEERCRED`: uid, gid, pid),
//! logged at debug level, and refused when `allowed_uids` / `allowed_gids` are set and the
//! peer is in neither. On TCP listeners, when `tcp_token_file` is configured, mutating calls
//! (remove, pin, prefetch, gc, verify, leases) need the token, and `tcp_reads` says what other
//! calls may do without it: everything (`open`), cached modules only (`cached`) or nothing
//! (`token`). Probes, metrics, gRPC health and reflection, and peers' requests (which carry
//! the peer token, checked by `peer.rs`) are always let through. The token comes as
//! `Authorization: Bearer <token>` or as the password of HTTP Basic credentials (an OCI
//! client's pull secret). Refusals are gRPC statuses for gRPC requests, OCI errors with a
//! Basic challenge in the OCI view, and JSON errors otherwise. The token is never logged; the
//! placeholder the manifests ship with is never accepted.
//!
//! Each request also carries the [`Client`] it is counted against (uid on the socket, IP
//! address on TCP): [`ClientFetches`] caps how many different references one client may have
//! in flight at once (`limits.max_fetches_per_client`), so that no pod can make the node
//! fetch without bound. Asking again for a reference already in flight costs nothing; a
//! ticket is held by the fetch's own task (`State::fetch_for`), so it counts until the fetch
//! ends, not until the client hangs up.

use axum::extract::{Request, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Extension;
use base64::Engine as _;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::net::UnixStream;
use tonic::Code;

use super::respond::refuse;
use super::State;
use crate::config::TcpReads;

/// gRPC methods that change the cache, guarded on TCP listeners.
const MUTATING_METHODS: &[&str] = &[
    "Remove",
    "Pin",
    "Unpin",
    "Prefetch",
    "Gc",
    "Verify",
    "Lease",
    "ReleaseLease",
];

/// The process at the other end of a unix socket connection, if the OS told us; every
/// request on the socket carries it as an extension.
#[derive(Debug, Clone, Copy)]
pub struct Peer(Option<(u32, u32, Option<i32>)>);

impl Peer {
    /// The credentials the kernel gives for `socket`'s other end.
    pub fn of(socket: &UnixStream) -> Peer {
        Peer(socket.peer_cred().ok().map(|c| (c.uid(), c.gid(), c.pid())))
    }
}

/// The address of a TCP peer, put into each request by the TCP listeners as an extension.
#[derive(Debug, Clone, Copy)]
pub struct TcpPeer(pub SocketAddr);

/// Who a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// A unix socket peer, by uid.
    Uid(u32),
    /// A TCP peer, by address.
    Address(IpAddr),
    /// A TCP peer without the token under `tcp_reads = "cached"`: its fetches are answered
    /// from the cache alone.
    CacheOnly(IpAddr),
    /// A peer the OS did not identify.
    Unknown,
}

impl Client {
    /// Whether this client's fetches may only be answered from the cache.
    pub fn cache_only(&self) -> bool {
        matches!(self, Client::CacheOnly(_))
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Uid(uid) => write!(f, "uid {uid}"),
            Client::Address(address) => write!(f, "{address}"),
            Client::CacheOnly(address) => write!(f, "{address} (no TCP token: cached only)"),
            Client::Unknown => f.write_str("an unidentified peer"),
        }
    }
}

/// References in flight per client, capped.
#[derive(Debug)]
pub struct ClientFetches {
    max: usize,
    in_flight: Mutex<HashMap<Client, HashMap<String, usize>>>,
}

/// One request's place in [`ClientFetches`]; released on drop.
#[derive(Debug)]
pub struct FetchTicket {
    owner: Arc<ClientFetches>,
    client: Client,
    reference: String,
}

impl ClientFetches {
    /// At most `max` different references in flight per client.
    pub fn new(max: usize) -> Arc<ClientFetches> {
        Arc::new(ClientFetches {
            max,
            in_flight: Mutex::default(),
        })
    }

    /// Counts a request of `client` for `reference`, or says why it is refused.
    pub fn enter(
        self: &Arc<Self>,
        client: Option<&Client>,
        reference: &str,
    ) -> Result<FetchTicket, String> {
        let client = client.cloned().unwrap_or(Client::Unknown);
        let mut in_flight = self.in_flight.lock().expect("client fetches poisoned");
        let references = in_flight.entry(client.clone()).or_default();
        if !references.contains_key(reference) && references.len() >= self.max {
            tracing::warn!(%client, reference, "refused: too many fetches in flight");
            return Err(format!(
                "{client} already has {} different references in flight, the limit \
                 (limits.max_fetches_per_client); {reference} was not fetched",
                references.len()
            ));
        }
        *references.entry(reference.to_owned()).or_default() += 1;
        Ok(FetchTicket {
            owner: self.clone(),
            client,
            reference: reference.to_owned(),
        })
    }
}

impl Drop for FetchTicket {
    fn drop(&mut self) {
        let mut in_flight = self
            .owner
            .in_flight
            .lock()
            .expect("client fetches poisoned");
        if let Some(references) = in_flight.get_mut(&self.client) {
            if let Some(count) = references.get_mut(&self.reference) {
                *count -= 1;
                if *count == 0 {
                    references.remove(&self.reference);
                }
            }
            if references.is_empty() {
                in_flight.remove(&self.client);
            }
        }
    }
}

/// Notes the TCP peer's address as the request's [`Client`].
pub async fn tcp_peer(
    Extension(TcpPeer(address)): Extension<TcpPeer>,
    mut request: Request,
    next: Next,
) -> Response {
    request
        .extensions_mut()
        .insert(Client::Address(address.ip()));
    next.run(request).await
}

/// Checks and logs the peer of each request on the unix socket.
pub async fn unix_peer(
    Extract(state): Extract<State>,
    Extension(peer): Extension<Peer>,
    mut request: Request,
    next: Next,
) -> Response {
    match admit_unix_peer(&state, peer, &mut request) {
        None => next.run(request).await,
        Some(refused) => refused,
    }
}

/// What [`unix_peer`] does before it passes a request on: notes the peer as the request's
/// [`Client`], logs it, and refuses it when `allowed_uids` / `allowed_gids` leave it out.
/// Returns the refusal to send, if any.
fn admit_unix_peer(state: &State, peer: Peer, request: &mut Request) -> Option<Response> {
    let config = state.fetcher.config();
    let Peer(credentials) = peer;
    request
        .extensions_mut()
        .insert(credentials.map_or(Client::Unknown, |(uid, _, _)| Client::Uid(uid)));
    let path = request.uri().path();
    match credentials {
        Some((uid, gid, pid)) => tracing::debug!(uid, gid, ?pid, %path, "request"),
        None => tracing::debug!(%path, "request from a peer without credentials"),
    }
    let restricted = !config.allowed_uids.is_empty() || !config.allowed_gids.is_empty();
    let allowed = match credentials {
        _ if !restricted => true,
        Some((uid, gid, _)) => {
            uid == 0 || config.allowed_uids.contains(&uid) || config.allowed_gids.contains(&gid)
        }
        None => false,
    };
    if allowed {
        return None;
    }
    let who = credentials.map_or("unknown peer".to_owned(), |(uid, gid, _)| {
        format!("uid {uid} gid {gid}")
    });
    tracing::warn!(%who, %path, "refused: not in allowed_uids / allowed_gids");
    Some(refuse(
        request.headers(),
        Code::PermissionDenied,
        format!("{who} may not use this daemon (allowed_uids / allowed_gids)"),
    ))
}

/// Paths a TCP client needs no token for: probes, metrics, gRPC health and reflection.
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
        || path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.")
}

/// Whether `path` is a gRPC method that changes the cache.
fn is_mutating(path: &str) -> bool {
    path.strip_prefix("/wasmcache.v1.WasmCache/")
        .is_some_and(|method| MUTATING_METHODS.contains(&method))
}

/// The token a request presents: `Bearer <token>`, or the password of `Basic` credentials.
fn presented(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.trim().as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

/// Whether `token` is the placeholder the Kubernetes manifests ship with, which anyone who
/// read them knows.
pub fn is_placeholder(token: &str) -> bool {
    token.contains("REPLACE-ME")
}

/// The TCP listeners' guard (see the module's documentation).
pub async fn tcp_token(
    Extract(state): Extract<State>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.tcp_token() else {
        return next.run(request).await;
    };
    let path = request.uri().path().to_owned();
    let placeholder = is_placeholder(&expected);
    let authorized = !placeholder
        && presented(request.headers())
            .is_some_and(|given| constant_time_eq(&given, expected.as_bytes()));
    if authorized || is_public(&path) || super::peer::is_peer_request(request.headers()) {
        return next.run(request).await;
    }
    let reads = state.fetcher.config().tcp_reads;
    if !is_mutating(&path) {
        match reads {
            TcpReads::Open => return next.run(request).await,
            TcpReads::Cached => {
                if let Some(Client::Address(address)) = request.extensions().get::<Client>() {
                    let address = *address;
                    request.extensions_mut().insert(Client::CacheOnly(address));
                }
                return next.run(request).await;
            }
            TcpReads::Token => {}
        }
    }
    let what = if is_mutating(&path) {
        format!("{path} over TCP needs the daemon's bearer token (tcp_token_file)")
    } else {
        format!("{path} over TCP needs the daemon's token (tcp_token_file; tcp_reads = \"token\")")
    };
    let message = if placeholder {
        format!(
            "{what}; the configured token is the shipped placeholder, which this daemon never \
             accepts: write a token of your own to the file (deploy/kubernetes/api-token)"
        )
    } else {
        what
    };
    tracing::debug!(%path, "refused: no TCP token");
    if path.starts_with("/v2") {
        // An OCI client (a pull secret's credentials) sends them after a Basic challenge.
        let mut response = super::oci::oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"wasmcache\""),
        );
        return response;
    }
    refuse(request.headers(), Code::Unauthenticated, message)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

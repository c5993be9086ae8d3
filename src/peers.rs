//! Peers: the other daemons of the cluster, which one owns what, and how to ask it.
//!
//! Membership is the configured list (`peers.static`, `--peer`), the addresses behind
//! `peers.dns` (a headless Service, resolved again every `peers.refresh`) and this daemon's
//! own address. Ownership is rendezvous hashing: every member gets the score
//! `sha256(address, key)` for a key (a reference, or a layer digest), and the highest score
//! owns it. Every daemon computes the same order from the same membership; a caller walks it
//! until it reaches itself, skipping peers in backoff, and then goes to the registry.
//!
//! A peer is asked through its OCI view with [`PEER_HEADER`] (and [`TOKEN_HEADER`] when a
//! token is configured). A peer serves such a request from its cache or from the registry
//! itself, never from another peer. Whatever a peer sends is checked here or by the caller:
//! a manifest against the digest asked for or the one the peer announced, a blob against its
//! descriptor's digest and size. A peer on an address in `blocked_cidrs` is never connected
//! to (it is skipped like one that is down).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, PeersConfig};
use crate::digest::Digest;
use crate::format::ACCEPTED_MANIFESTS;
use crate::metrics::Metrics;
use crate::reference::Reference;
use crate::registry::address::{blocked_cause, AddressPolicy, Blocked};
use crate::registry::budget::DocumentBudget;
use crate::registry::BlobStream;

/// Marks a request as a peer's: answer it from the cache or the registry, never forward it.
pub const PEER_HEADER: &str = "x-wasmcache-peer";
/// The cluster's peer token, when `peers.token_file` is set.
pub const TOKEN_HEADER: &str = "x-wasmcache-peer-token";
/// The size of the blob asked for, from the caller's descriptor, so the owner can download
/// and check it.
pub const SIZE_HEADER: &str = "x-wasmcache-blob-size";
/// Longest a DNS lookup of `peers.dns` may take.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong asking a peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made within `peer_connect_timeout`.
    #[error("peer {peer} is unreachable")]
    Unreachable {
        /// The peer.
        peer: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The peer's address is in `blocked_cidrs`; nothing was sent to it.
    #[error("peer {peer} refused")]
    Blocked {
        /// The peer.
        peer: String,
        /// The address and the entry covering it.
        #[source]
        source: Blocked,
    },
    /// The peer sent no answer within `peer_first_byte_timeout`.
    #[error("peer {peer} did not answer within {timeout:?}")]
    TimedOut {
        /// The peer.
        peer: String,
        /// The time it had.
        timeout: Duration,
    },
    /// The peer (from its registry) says the manifest does not exist.
    #[error("peer {peer}: {what} not found")]
    NotFound {
        /// The peer.
        peer: String,
        /// What was asked for.
        what: String,
    },
    /// Any other answer.
    #[error("peer {peer} answered {status} for {what}")]
    Status {
        /// The peer.
        peer: String,
        /// HTTP status.
        status: u16,
        /// What was asked for.
        what: String,
    },
    /// The bytes do not match what was asked for; they are thrown away.
    #[error("peer {peer} sent bad bytes for {what}: {reason}")]
    BadBytes {
        /// The peer.
        peer: String,
        /// What was asked for.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// The peer token file could not be read.
    #[error("peer token file {path}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The `result` label of `wasmcache_peer_requests_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Error::Unreachable { .. } => "unreachable",
            Error::Blocked { .. } => "blocked",
            Error::TimedOut { .. } => "timed_out",
            Error::NotFound { .. } => "not_found",
            Error::BadBytes { .. } => "refused_bytes",
            Error::Status { .. } | Error::TokenFile { .. } => "failed",
        }
    }

    /// Whether the peer is put in backoff: it did not connect or answer in time, or its
    /// address is blocked.
    fn marks_down(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. } | Error::TimedOut { .. } | Error::Blocked { .. }
        )
    }
}

/// The membership and a client for it; cheap to clone.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

struct Inner {
    own: String,
    statics: Vec<String>,
    dns: Option<String>,
    members: RwLock<Arc<[String]>>,
    /// Peers in backoff, until when.
    down: Mutex<HashMap<String, Instant>>,
    token_file: Option<PathBuf>,
    token: RwLock<Option<String>>,
    client: reqwest::Client,
    address_policy: AddressPolicy,
    /// Room for manifests being read, shared with the registry client.
    budget: DocumentBudget,
    settings: PeersConfig,
    metrics: Metrics,
}

impl Peers {
    /// The peers of `config`, or `None` when none is configured; connects only where
    /// `address_policy` allows, and reads manifests within `budget`. Reads the token file.
    pub fn new(
        config: &Config,
        address_policy: AddressPolicy,
        budget: DocumentBudget,
        metrics: Metrics,
    ) -> Result<Option<Peers>, Error> {
        let settings = config.peers.clone();
        if !settings.enabled() {
            return Ok(None);
        }
        let own = settings
            .self_address
            .clone()
            .expect("validated: peers need self_address");
        crate::registry::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(settings.peer_connect_timeout)
            .read_timeout(config.read_timeout)
            .no_proxy()
            .user_agent(concat!("wasmcache/", env!("CARGO_PKG_VERSION"), " peer"))
            .redirect(address_policy.redirect_policy())
            .dns_resolver(address_policy.clone())
            .build()
            .expect("a plain HTTP client builds");
        let peers = Peers {
            inner: Arc::new(Inner {
                statics: settings.static_peers.clone(),
                dns: settings.dns.clone(),
                members: RwLock::new(Arc::from(Vec::new())),
                down: Mutex::default(),
                token_file: settings.token_file.clone(),
                token: RwLock::new(None),
                client,
                address_policy,
                budget,
                own,
                settings,
                metrics,
            }),
        };
        peers.reload_token()?;
        peers.set_members(Vec::new());
        Ok(Some(peers))
    }

    /// This daemon's own peer address.
    pub fn own_address(&self) -> &str {
        &self.inner.own
    }

    /// Every member, this daemon included, sorted.
    pub fn members(&self) -> Arc<[String]> {
        self.inner.members.read().expect("members poisoned").clone()
    }

    /// The peers to ask for `key`, in rendezvous order, up to (not including) this daemon
    /// and without those in backoff. Empty: this daemon owns `key` (or every peer before it
    /// is down) and goes to the registry itself.
    pub fn candidates(&self, key: &str) -> Vec<String> {
        let members = self.members();
        let now = Instant::now();
        let down = self.inner.down.lock().expect("backoff poisoned");
        rank(&members, key)
            .into_iter()
            .take_while(|peer| **peer != self.inner.own)
            .filter(|peer| down.get(*peer).is_none_or(|until| *until <= now))
            .cloned()
            .collect()
    }

    /// Resolves `peers.dns` again and re-reads the token file; a failed lookup keeps the
    /// last membership.
    pub async fn refresh(&self) {
        if let Err(error) = self.reload_token() {
            warn!(error = %crate::error::error_chain(&error), "peer token not reloaded");
        }
        let mut found = Vec::new();
        if let Some(name) = &self.inner.dns {
            match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host(name.as_str())).await {
                // On a dual-stack Service every pod has an A and an AAAA record: keep the
                // family of this daemon's own address, so each daemon is one member.
                Ok(Ok(addresses)) => found.extend(
                    addresses
                        .filter(|address| self.same_family(address))
                        .map(|address| address.to_string()),
                ),
                Ok(Err(error)) => {
                    warn!(dns = %name, %error, "peer lookup failed; keeping the last members");
                    return;
                }
                Err(_) => {
                    warn!(dns = %name, "peer lookup timed out; keeping the last members");
                    return;
                }
            }
        }
        self.set_members(found);
    }

    /// Keeps the membership fresh until `cancel`: resolves `peers.dns` every `refresh`.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            self.refresh().await;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.inner.settings.refresh) => {}
            }
        }
    }

    /// Whether `address` is of the family of this daemon's own address (any, when that is
    /// a name).
    fn same_family(&self, address: &std::net::SocketAddr) -> bool {
        match self.inner.own.parse::<std::net::SocketAddr>() {
            Ok(own) => own.is_ipv4() == address.is_ipv4(),
            Err(_) => true,
        }
    }

    fn set_members(&self, resolved: Vec<String>) {
        let mut members: Vec<String> = self
            .inner
            .statics
            .iter()
            .cloned()
            .chain(resolved)
            .chain([self.inner.own.clone()])
            .collect();
        members.sort();
        members.dedup();
        let changed = {
            let mut current = self.inner.members.write().expect("members poisoned");
            let changed = **current != *members;
            *current = Arc::from(members);
            changed
        };
        if changed {
            info!(members = ?self.members(), "peer membership");
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let members = self.members();
        let known = members.len().saturating_sub(1);
        let now = Instant::now();
        let down = self.inner.down.lock().expect("backoff poisoned");
        let up = members
            .iter()
            .filter(|peer| **peer != self.inner.own)
            .filter(|peer| down.get(*peer).is_none_or(|until| *until <= now))
            .count();
        self.inner.metrics.set_peers(known, up);
    }

    fn reload_token(&self) -> Result<(), Error> {
        let Some(path) = &self.inner.token_file else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::TokenFile {
            path: path.clone(),
            source,
        })?;
        let token = text.trim().to_owned();
        if token.contains("REPLACE-ME") {
            warn!(file = %path.display(),
                  "the peer token is the shipped placeholder: anyone who reads the manifests knows it");
        }
        if token.is_empty() {
            return Err(Error::TokenFile {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
            });
        }
        *self.inner.token.write().expect("token poisoned") = Some(token);
        Ok(())
    }

    /// Whether a request presenting `token` may act as a peer: always when no token is
    /// configured. The comparison takes the same time wherever the tokens differ.
    pub fn accepts(&self, token: Option<&[u8]>) -> bool {
        let expected = self.inner.token.read().expect("token poisoned");
        let Some(expected) = expected.as_deref() else {
            return true;
        };
        let Some(token) = token else {
            return false;
        };
        Sha256::digest(expected.as_bytes()) == Sha256::digest(token)
    }

    /// Counts a request a peer made of this daemon.
    pub fn served(&self, result: &'static str) {
        self.inner.metrics.peer_request("server", result);
    }

    fn request(&self, peer: &str, path: &str, registry: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .inner
            .client
            .get(format!("http://{peer}{path}"))
            .query(&[("ns", registry)])
            .header(PEER_HEADER, "1");
        if let Some(token) = self.inner.token.read().expect("token poisoned").as_deref() {
            request = request.header(TOKEN_HEADER, token);
        }
        request
    }

    /// Sends `request` (when the peer's address is not blocked), waiting at most
    /// `peer_first_byte_timeout` for the answer's head.
    async fn send(
        &self,
        peer: &str,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let timeout = self.inner.settings.peer_first_byte_timeout;
        let sent = async {
            let request = request.build()?;
            if let Err(blocked) = self.inner.address_policy.check_url(request.url()) {
                return Ok(Err(blocked));
            }
            self.inner.client.execute(request).await.map(Ok)
        };
        let response = match tokio::time::timeout(timeout, sent).await {
            Err(_) => Err(Error::TimedOut {
                peer: peer.to_owned(),
                timeout,
            }),
            Ok(Ok(Err(source))) => Err(Error::Blocked {
                peer: peer.to_owned(),
                source,
            }),
            Ok(Err(source)) => match blocked_cause(&source) {
                Some(blocked) => Err(Error::Blocked {
                    peer: peer.to_owned(),
                    source: *blocked,
                }),
                None => Err(Error::Unreachable {
                    peer: peer.to_owned(),
                    source,
                }),
            },
            Ok(Ok(Ok(response))) => {
                let status = response.status().as_u16();
                if status == 200 {
                    Ok(response)
                } else if status == 404 && is_manifest_unknown(response).await {
                    Err(Error::NotFound {
                        peer: peer.to_owned(),
                        what: what.to_owned(),
                    })
                } else {
                    Err(Error::Status {
                        peer: peer.to_owned(),
                        status,
                        what: what.to_owned(),
                    })
                }
            }
        };
        self.note(peer, &response);
        response
    }

    /// Counts the outcome of a request to `peer` and puts it in backoff when it failed to
    /// connect or answer.
    fn note<T>(&self, peer: &str, result: &Result<T, Error>) {
        match result {
            Ok(_) => {}
            Err(error) => {
                self.inner.metrics.peer_request("client", error.result());
                if error.marks_down() {
                    let until = Instant::now() + self.inner.settings.peer_backoff;
                    self.inner
                        .down
                        .lock()
                        .expect("backoff poisoned")
                        .insert(peer.to_owned(), until);
                    warn!(%peer, error = %crate::error::error_chain(error),
                          backoff = ?self.inner.settings.peer_backoff, "peer skipped");
                    self.update_gauges();
                }
            }
        }
    }

    /// Counts a request to a peer that was answered and whose bytes were right, or refused.
    pub fn outcome(&self, peer: &str, result: &'static str) {
        self.inner.metrics.peer_request("client", result);
        if result == "served" {
            let recovered = self
                .inner
                .down
                .lock()
                .expect("backoff poisoned")
                .remove(peer)
                .is_some();
            if recovered {
                self.update_gauges();
            }
        }
    }

    /// Asks `peer` for `reference`'s manifest (at most `limit` bytes). A digest reference's
    /// bytes must hash to it; a tag's to the digest the peer announces.
    pub async fn manifest(
        &self,
        peer: &str,
        reference: &Reference,
        limit: u64,
        fresh: bool,
    ) -> Result<(Bytes, Digest), Error> {
        let target = match (reference.digest(), reference.tag()) {
            (Some(digest), _) => digest.to_string(),
            (None, tag) => tag.unwrap_or(crate::reference::DEFAULT_TAG).to_owned(),
        };
        let what = format!("manifest {reference}");
        let path = format!("/v2/{}/manifests/{target}", reference.repository());
        let request = self
            .request(peer, &path, reference.registry())
            .header(reqwest::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "));
        let request = match fresh {
            true => request.header(reqwest::header::CACHE_CONTROL, "no-cache"),
            false => request,
        };
        let response = self.send(peer, &what, request).await?;
        let announced = response
            .headers()
            .get("docker-content-digest")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bad = |reason: String| Error::BadBytes {
            peer: peer.to_owned(),
            what: what.clone(),
            reason,
        };
        let over_limit = |size: u64| {
            let error = bad(format!("{size} bytes, over the manifest limit of {limit}"));
            self.outcome(peer, error.result());
            error
        };
        // Refused as soon as it is announced or read past the limit, before it is buffered,
        // as the registry's own manifests are.
        if let Some(length) = response.content_length().filter(|length| *length > limit) {
            return Err(over_limit(length));
        }
        let mut reserved = self.inner.budget.reader();
        let mut body = crate::registry::Chunks::default();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| bad(format!("transfer failed: {error}")))?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(over_limit((body.len() + chunk.len()) as u64));
            }
            // Not the peer's fault: no backoff.
            reserved
                .grow(chunk.len())
                .map_err(|room| bad(room.to_string()))?;
            body.push(chunk);
        }
        let body = body.concat();
        let actual = Digest::of(&body);
        let expected = reference
            .digest()
            .map(Digest::to_string)
            .or(announced)
            .unwrap_or_default();
        if actual.to_string() != expected {
            let error = bad(format!("expected {expected}, got {actual}"));
            self.outcome(peer, error.result());
            return Err(error);
        }
        self.outcome(peer, "served");
        debug!(%peer, %reference, digest = %actual, "manifest from a peer");
        Ok((body, actual))
    }

    /// Opens a stream of blob `digest` (of `size` bytes) in `reference`'s repository from
    /// `peer`. The caller hashes every byte and checks digest and size before using them,
    /// and reports the outcome with [`Peers::outcome`].
    pub async fn blob(
        &self,
        peer: &str,
        reference: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<BlobStream, Error> {
        let what = format!("blob {digest} in {}", reference.name());
        let path = format!("/v2/{}/blobs/{digest}", reference.repository());
        let request = self
            .request(peer, &path, reference.registry())
            .header(SIZE_HEADER, size.to_string());
        let response = self.send(peer, &what, request).await?;
        let content_length = response.content_length();
        if content_length.is_some_and(|length| length != size) {
            let error = Error::BadBytes {
                peer: peer.to_owned(),
                what,
                reason: format!(
                    "{} bytes announced, {size} expected",
                    content_length.unwrap_or(0)
                ),
            };
            self.outcome(peer, error.result());
            return Err(error);
        }
        let stream = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other));
        Ok(BlobStream {
            content_length,
            mirror: Some(format!("peer {peer}")),
            stream: stream.boxed(),
        })
    }
}

/// Whether a 404 says the manifest is unknown upstream (the peer asked its registry), rather
/// than that the peer refused the name.
async fn is_manifest_unknown(response: reqwest::Response) -> bool {
    let body = crate::registry::read_capped(response, crate::registry::MAX_ERROR_BODY).await;
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| {
            let code = json
                .get("errors")?
                .get(0)?
                .get("code")?
                .as_str()?
                .to_owned();
            Some(code == "MANIFEST_UNKNOWN")
        })
        .unwrap_or(false)
}

/// The members in rendezvous order for `key`: highest `sha256(member, 0, key)` first (its
/// first eight bytes, big-endian), ties by address. Every daemon computes the same order from
/// the same members.
pub fn rank<'a>(members: &'a [String], key: &str) -> Vec<&'a String> {
    let mut scored: Vec<(u64, &String)> = members
        .iter()
        .map(|member| {
            let mut hasher = Sha256::new();
            hasher.update(member.as_bytes());
            hasher.update([0]);
            hasher.update(key.as_bytes());
            let hash = hasher.finalize();
            let score = u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"));
            (score, member)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, member)| member).collect()
}

#[cfg(test)]
mod tests {
    use super::rank;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:9978", i / 200, i % 200 + 1))
            .collect()
    }

    fn owner(members: &[String], key: &str) -> String {
        rank(members, key)[0].clone()
    }

    #[test]
    fn the_order_does_not_depend_on_how_members_are_listed() {
        let mut listed = members(7);
        let key = "ghcr.io/org/filter:v1";
        let order: Vec<String> = rank(&listed, key).into_iter().cloned().collect();
        listed.reverse();
        let again: Vec<String> = rank(&listed, key).into_iter().cloned().collect();
        assert_eq!(order, again);
        assert_eq!(order.len(), 7);
    }

    #[tokio::test]
    async fn dns_names_the_members_in_this_daemons_address_family() {
        let mut config = crate::config::Config::default();
        config.peers.dns = Some("localhost:9978".into());
        config.peers.static_peers = vec!["127.0.0.3:9978".into()];
        config.peers.self_address = Some("127.0.0.2:9978".into());
        let metrics = crate::metrics::Metrics::default();
        let policy = crate::registry::address::AddressPolicy::default_blocked();
        let peers = super::Peers::new(
            &config,
            policy,
            super::DocumentBudget::new(1 << 20),
            metrics,
        )
        .unwrap()
        .unwrap();
        assert_eq!(&*peers.members(), ["127.0.0.2:9978", "127.0.0.3:9978"]);
        peers.refresh().await;
        let members = peers.members();
        assert!(
            members.contains(&"127.0.0.1:9978".to_owned()),
            "{members:?}"
        );
        assert!(members.iter().all(|m| !m.starts_with('[')), "{members:?}");
        // This daemon is never a candidate, whoever owns the key.
        for key in ["a", "b", "c", "d", "e", "f"] {
            assert!(!peers.candidates(key).contains(&"127.0.0.2:9978".to_owned()));
        }
    }

    #[tokio::test]
    async fn peers_on_blocked_addresses_are_skipped_without_a_connection() {
        crate::registry::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        let (literal, named) = (format!("127.0.0.1:{port}"), format!("localhost:{port}"));
        let mut config = crate::config::Config::default();
        config.peers.static_peers = vec![literal.clone(), named.clone()];
        config.peers.self_address = Some("10.0.0.2:9978".into());
        let no_loopback =
            crate::registry::address::AddressPolicy::new(&["127.0.0.0/8".into(), "::1/128".into()])
                .unwrap();
        let metrics = crate::metrics::Metrics::default();
        let peers = super::Peers::new(
            &config,
            no_loopback,
            super::DocumentBudget::new(1 << 20),
            metrics,
        )
        .unwrap()
        .unwrap();
        let reference: crate::reference::Reference = "ghcr.io/org/filter:v1".parse().unwrap();
        for peer in [&literal, &named] {
            let refused = peers.manifest(peer, &reference, 1 << 20, false).await;
            match refused {
                Err(super::Error::Blocked { source, .. }) => assert!(source.address.is_loopback()),
                other => panic!("{peer}: {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Both are in backoff: no key is asked of them.
        assert!(peers.candidates("ghcr.io/org/filter:v1").is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Adding or removing one of n members moves about 1/n of the keys: only keys the new
        /// member wins move to it, and only the removed member's keys move away.
        #[test]
        fn one_member_more_or_less_moves_about_one_nth(n in 3usize..12, seed in any::<u64>()) {
            let before = members(n);
            let mut after = before.clone();
            after.push(format!("10.9.9.{}:9978", seed % 250 + 1));
            let keys: Vec<String> = (0..2000).map(|i| format!("sha256:{seed:x}{i:08x}")).collect();
            let mut moved = 0;
            for key in &keys {
                let (old, new) = (owner(&before, key), owner(&after, key));
                if old != new {
                    prop_assert_eq!(&new, after.last().unwrap());
                    moved += 1;
                }
            }
            let expected = keys.len() as f64 / (n + 1) as f64;
            prop_assert!((moved as f64 - expected).abs() < expected * 0.35 + 20.0,
                "{moved} of {} keys moved; about {expected} expected", keys.len());

            // Removing a member: only its own keys move.
            let removed = before[(seed as usize) % n].clone();
            let fewer: Vec<String> = before.iter().filter(|m| **m != removed).cloned().collect();
            let mut moved = 0;
            for key in &keys {
                let (old, new) = (owner(&before, key), owner(&fewer, key));
                if old != new {
                    prop_assert_eq!(&old, &removed);
                    moved += 1;
                }
            }
            let expected = keys.len() as f64 / n as f64;
            prop_assert!((moved as f64 - expected).abs() < expected * 0.35 + 20.0,
                "{moved} of {} keys moved on removal; about {expected} expected", keys.len());
        }
    }
}

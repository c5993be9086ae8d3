//! The OCI distribution client: manifests and blob streams from registries.
//!
//! What the cache needs of the distribution API's reads, as plain GETs over one HTTP client
//! per session (`distribution.rs`): credentials chosen by registry host, plain HTTP only for
//! registries configured as insecure, mirrors tried before the origin, size limits on
//! documents while they stream, and errors that name the registry, the reference and what
//! went wrong. It knows nothing about packagings or the store. Pushing (`push.rs`: blob
//! checks, uploads, manifests) asks for tokens with push access.

pub mod address;
pub mod auth;
pub mod budget;
mod distribution;
mod error;
mod push;
pub mod token;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use std::sync::{Arc, RwLock};
use tracing::debug;

use crate::config::Config;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::reference::Reference;
use address::AddressPolicy;
pub use auth::{Credential, Credentials, Secret};
use budget::DocumentBudget;
pub(crate) use distribution::{read_capped, Chunks, MAX_ERROR_BODY};
pub use distribution::{BlobMismatch, UrlAnswer};
use distribution::{Distribution, Target};
use error::token_error;
pub use error::Error;
pub use push::{Upload, UPLOAD_CHUNK_BYTES};
use token::{Access, Challenge, Tokens};

/// `User-Agent` sent to registries.
const USER_AGENT: &str = concat!("wasmcache/", env!("CARGO_PKG_VERSION"));
/// Most bytes of a referrers index read.
const MAX_REFERRERS_BYTES: u64 = 4 << 20;

/// Where a blob may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hosts {
    /// The registry's mirrors in order, then the registry.
    MirrorsThenOrigin,
    /// The registry only (after a mirror served bad bytes).
    OriginOnly,
}

/// A stream of a blob's bytes, as they arrive.
pub struct BlobStream {
    /// `Content-Length` sent by the registry, if any.
    pub content_length: Option<u64>,
    /// The mirror that serves it (`None`: the registry itself).
    pub mirror: Option<String>,
    /// The bytes; errors are I/O errors (transport failures, or a [`BlobMismatch`] at the
    /// end of a stream hashed on the way).
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
}

/// Client for every registry the cache talks to; cheap to clone.
///
/// Credentials can be reloaded while running ([`RegistryClient::reload_credentials`]); the
/// session, which caches challenges and tokens per registry, is replaced then.
#[derive(Clone)]
pub struct RegistryClient {
    session: Arc<RwLock<Session>>,
    settings: Arc<Settings>,
    metrics: Metrics,
}

/// What requests use: the credentials and the tokens they were given.
#[derive(Clone)]
struct Session {
    credentials: Arc<Credentials>,
    tokens: Arc<Tokens>,
}

/// What building a session needs, and the HTTP client every session shares.
struct Settings {
    plain_http: Vec<String>,
    certificates: Vec<reqwest::Certificate>,
    trusted_token_realms: std::collections::BTreeMap<String, Vec<String>>,
    mirrors: std::collections::BTreeMap<String, Vec<String>>,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
    auth_files: Vec<std::path::PathBuf>,
    /// Manifests, blobs, referrers and module URLs.
    distribution: Distribution,
    budget: DocumentBudget,
    /// `blocked_cidrs`, for every client.
    address_policy: AddressPolicy,
}

impl Settings {
    fn session(&self, credentials: Credentials) -> Session {
        Session {
            credentials: Arc::new(credentials),
            tokens: Arc::new(Tokens::new(
                &self.certificates,
                self.plain_http.clone(),
                self.trusted_token_realms.clone(),
                self.address_policy.clone(),
                self.connect_timeout,
                self.read_timeout,
                USER_AGENT,
            )),
        }
    }
}

impl RegistryClient {
    /// Builds the client from the configuration (reads the credentials and CA files).
    pub fn new(config: &Config, metrics: Metrics) -> Result<RegistryClient, Error> {
        install_crypto_provider();
        let address_policy = AddressPolicy::new(&config.blocked_cidrs)?;
        let mut certificates = Vec::new();
        for path in config.ca_files() {
            let data = std::fs::read(&path).map_err(|source| Error::CaFile {
                path: path.clone(),
                source,
            })?;
            let parsed =
                reqwest::Certificate::from_pem_bundle(&data).map_err(|error| Error::CaFile {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, error),
                })?;
            certificates.extend(parsed);
        }
        let registry_policy = config.clone();
        let client = distribution::client(
            &certificates,
            &address_policy,
            move |host| registry_policy.registry_allowed(host),
            config.connect_timeout,
            config.read_timeout,
            USER_AGENT,
        );
        let budget = DocumentBudget::new(config.limits.max_manifest_bytes_in_flight);
        let distribution = Distribution::new(
            client,
            address_policy.clone(),
            config.mirror_headers.clone(),
            config.plain_http_registries(),
            budget.clone(),
        );
        let settings = Settings {
            plain_http: config.plain_http_registries(),
            certificates,
            trusted_token_realms: config.trusted_token_realms.clone(),
            mirrors: config.registry_mirrors.clone(),
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
            auth_files: config.registry_auth_paths(),
            distribution,
            address_policy,
            budget,
        };
        let credentials = Credentials::load_all(&settings.auth_files)?;
        Ok(RegistryClient {
            session: Arc::new(RwLock::new(settings.session(credentials))),
            settings: Arc::new(settings),
            metrics,
        })
    }

    /// The `blocked_cidrs` policy, for every other client that connects somewhere.
    pub(crate) fn address_policy(&self) -> &AddressPolicy {
        &self.settings.address_policy
    }

    /// The room documents being read share (`limits.max_manifest_bytes_in_flight`), for
    /// every other client that reads manifests (peers).
    pub(crate) fn document_budget(&self) -> &DocumentBudget {
        &self.settings.budget
    }

    /// The credential files in use, in the order they are merged (later ones win).
    pub fn credential_files(&self) -> &[std::path::PathBuf] {
        &self.settings.auth_files
    }

    /// Re-reads the credential files; when they changed, later requests use the new ones
    /// (with a fresh session, so no cached token or password outlives a rotation). Returns
    /// whether anything changed.
    pub fn reload_credentials(&self) -> Result<bool, Error> {
        let credentials = Credentials::load_all(&self.settings.auth_files)?;
        let mut session = self.session.write().expect("registry session poisoned");
        if *session.credentials == credentials {
            return Ok(false);
        }
        tracing::info!(
            registries = credentials.len(),
            "registry credentials reloaded"
        );
        *session = self.settings.session(credentials);
        Ok(true)
    }

    fn session(&self) -> Session {
        self.session
            .read()
            .expect("registry session poisoned")
            .clone()
    }

    /// The `Authorization` header value for `access` to `reference`'s repository on `host`
    /// under the registry's `challenge`, and whether it is a token (which may be refused early
    /// and renewed). A token comes from [`Tokens`], which checks its realm and keeps it per
    /// repository and access until it expires.
    async fn authorize(
        &self,
        session: &Session,
        reference: &Reference,
        host: &str,
        challenge: Challenge,
        access: Access,
    ) -> Result<(Option<String>, bool), Error> {
        let registry = reference.registry();
        let credential = session
            .credentials
            .for_repository(registry, reference.repository());
        match challenge {
            Challenge::None => Ok((None, false)),
            Challenge::Basic => match credential {
                Some(Credential {
                    username,
                    secret: Secret::Password(password),
                }) => {
                    let pair = format!("{username}:{password}");
                    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                    Ok((Some(format!("Basic {encoded}")), false))
                }
                _ => Ok((None, false)),
            },
            Challenge::Bearer { realm, service } => {
                let result = session
                    .tokens
                    .token(
                        host,
                        reference.repository(),
                        access,
                        &realm,
                        service.as_deref(),
                        credential,
                    )
                    .await;
                let code = match &result {
                    Ok(_) => Some(200),
                    Err(token::Error::Denied { status, .. }) => Some(*status),
                    Err(_) => None,
                };
                self.metrics.registry_request(registry, "token", code);
                let token = result.map_err(|error| token_error(error, registry))?;
                Ok((Some(format!("Bearer {token}")), true))
            }
        }
    }

    /// Runs `request` with the authorization for `candidate` (the registry, or a mirror
    /// without headers of its own, asked with the credentials filed for the mirror's host);
    /// when a token is refused (it expired early, or was
    /// revoked), gets a new one and runs it once more. A mirror with `mirror_headers` is
    /// asked anonymously: a registry's credentials never go to it.
    async fn with_auth<T, F, Fut>(
        &self,
        candidate: &Reference,
        origin: &str,
        request: F,
    ) -> Result<T, Error>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let host = candidate.registry();
        if host != origin && self.settings.distribution.has_headers(host) {
            return request(None).await;
        }
        let api = distribution::api_host(host);
        let session = self.session();
        // Anonymous until the registry says otherwise: a 401 names the challenge, which the
        // session keeps, so an anonymous registry is never asked anything but the request.
        let (authorization, _) = match session.tokens.known(api) {
            Some(challenge) => {
                (self.authorize(&session, candidate, api, challenge, Access::Pull)).await?
            }
            None => (None, false),
        };
        match request(authorization).await {
            Err(Error::Unauthorized {
                challenge: Some(header),
                ..
            }) => {
                // No challenge known yet, or a token refused (expired early, revoked): learn
                // the challenge again, get a fresh token, and ask once more.
                debug!(registry = host, "401; authenticating and asking again");
                session.tokens.forget(api, candidate.repository());
                let challenge = (session.tokens.learn(api, &header))
                    .map_err(|error| token_error(error, candidate.registry()))?;
                let (authorization, _) =
                    (self.authorize(&session, candidate, api, challenge, Access::Pull)).await?;
                request(authorization).await
            }
            other => other,
        }
    }

    /// Where to ask for `reference`: its mirrors from `registry_mirrors`, in order, then the
    /// registry itself.
    fn candidates(&self, reference: &Reference) -> Vec<Reference> {
        let mut candidates: Vec<Reference> = self
            .settings
            .mirrors
            .get(reference.registry())
            .into_iter()
            .flatten()
            .map(|mirror| reference.with_registry(mirror))
            .collect();
        candidates.push(reference.clone());
        candidates
    }

    /// Runs `request` against each candidate in turn until one succeeds; the origin's error
    /// is the one returned. Every byte is checked against its digest afterwards, so a mirror
    /// is trusted for nothing but availability.
    async fn mirrors_then_origin<T, F, Fut>(
        &self,
        reference: &Reference,
        request: F,
    ) -> Result<T, Error>
    where
        F: Fn(Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut candidates = self.candidates(reference);
        let origin = candidates.pop().expect("the origin is always a candidate");
        for mirror in candidates {
            match request(mirror.clone()).await {
                Ok(value) => return Ok(value),
                Err(error) => tracing::info!(
                    mirror = mirror.registry(),
                    registry = reference.registry(),
                    error = %crate::error::error_chain(&error),
                    "mirror failed; trying the next"
                ),
            }
        }
        request(origin).await
    }

    /// Fetches a manifest or index by tag or digest (from a mirror first when one is
    /// configured); checks it against the digest in the reference and in
    /// `Docker-Content-Digest`, and against `limit` while it streams.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        limit: u64,
    ) -> Result<(Bytes, Digest), Error> {
        let origin = reference.registry();
        self.mirrors_then_origin(reference, |candidate| async move {
            let result = self
                .with_auth(&candidate, origin, |authorization| {
                    let candidate = &candidate;
                    async move {
                        let target = Target {
                            candidate,
                            origin,
                            authorization: authorization.as_deref(),
                        };
                        self.settings.distribution.manifest(&target, limit).await
                    }
                })
                .await;
            self.count("manifest", candidate.registry(), &result);
            result
        })
        .await
    }

    /// The digests of the manifests that refer to `reference` (a digest reference) with
    /// `artifact_type`, from the registry's OCI 1.1 referrers API, or the referrers tag
    /// schema (`sha256-<hex>`) where the registry has no such API. Asks the registry itself.
    pub async fn referrers(
        &self,
        reference: &Reference,
        artifact_type: &str,
    ) -> Result<Vec<Digest>, Error> {
        let origin = reference.registry();
        let result = self
            .with_auth(reference, origin, |authorization| async move {
                let target = Target {
                    candidate: reference,
                    origin,
                    authorization: authorization.as_deref(),
                };
                self.settings
                    .distribution
                    .referrers(
                        &target,
                        artifact_type,
                        MAX_REFERRERS_BYTES,
                        crate::config::DEFAULT_MAX_LAYERS,
                    )
                    .await
            })
            .await;
        self.count("referrers", origin, &result);
        result
    }

    /// Opens a stream of the blob `digest` in the reference's repository, hashed on the way:
    /// its end fails with a [`BlobMismatch`] when the bytes do not match `digest`.
    pub async fn blob_stream(
        &self,
        reference: &Reference,
        digest: &str,
        hosts: Hosts,
    ) -> Result<BlobStream, Error> {
        self.open_blob(reference, digest, false, hosts).await
    }

    /// Like [`RegistryClient::blob_stream`], for a caller that hashes every byte itself and
    /// checks the result against `digest` before using it: the stream is not hashed a
    /// second time.
    pub async fn blob_stream_checked_by_caller(
        &self,
        reference: &Reference,
        digest: &str,
        hosts: Hosts,
    ) -> Result<BlobStream, Error> {
        self.open_blob(reference, digest, true, hosts).await
    }

    async fn open_blob(
        &self,
        reference: &Reference,
        digest: &str,
        caller_hashes: bool,
        hosts: Hosts,
    ) -> Result<BlobStream, Error> {
        let origin = reference.registry();
        let open = |candidate: Reference| async move {
            let result = self
                .with_auth(&candidate, origin, |authorization| {
                    let candidate = &candidate;
                    async move {
                        let target = Target {
                            candidate,
                            origin,
                            authorization: authorization.as_deref(),
                        };
                        (self.settings.distribution)
                            .blob(&target, digest, caller_hashes)
                            .await
                    }
                })
                .await;
            self.count("blob", candidate.registry(), &result);
            result
        };
        match hosts {
            Hosts::OriginOnly => open(reference.clone()).await,
            Hosts::MirrorsThenOrigin => self.mirrors_then_origin(reference, open).await,
        }
    }
}

impl RegistryClient {
    /// `GET` of a module URL (`reference.url()`), conditional on `etag` when given.
    pub async fn get_url(
        &self,
        reference: &Reference,
        etag: Option<&str>,
    ) -> Result<UrlAnswer, Error> {
        let result = self.settings.distribution.get_url(reference, etag).await;
        let code = match &result {
            Ok(UrlAnswer::NotModified) => Some(304),
            Ok(UrlAnswer::Body { .. }) => Some(200),
            Err(error) => error.status_code(),
        };
        self.metrics
            .registry_request(reference.registry(), "url", code);
        result
    }
}

impl RegistryClient {
    fn count<T>(&self, kind: &'static str, registry: &str, result: &Result<T, Error>) {
        let code = match result {
            Ok(_) => Some(200),
            Err(error) => error.status_code(),
        };
        self.metrics.registry_request(registry, kind, code);
    }
}

/// Makes *ring* the process's TLS crypto provider, which the HTTP clients' rustls uses; a
/// no-op once one is installed. (rustls' default provider, aws-lc-rs, builds a C library of
/// its own and took most of a fresh build's time.)
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

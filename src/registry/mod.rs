//! The OCI distribution client: manifests and blob streams from registries.
//!
//! A thin layer over `oci-client` that adds what the cache needs: credentials chosen by
//! registry host, plain HTTP only for registries configured as insecure, size limits on
//! documents, and errors that name the registry, the reference and what went wrong. It knows
//! nothing about packagings or the store.

pub mod address;
pub mod auth;
mod error;
mod headed;
pub mod token;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};

use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use std::sync::{Arc, RwLock};
use tracing::debug;

use crate::config::Config;
use crate::digest::Digest;
use crate::format::ACCEPTED_MANIFESTS;
use crate::metrics::Metrics;
use crate::reference::Reference;
use address::AddressPolicy;
pub use auth::{Credential, Credentials, Secret};
pub(crate) use error::map_error;
use error::token_error;
pub use error::Error;
use token::{Challenge, Tokens};

/// `User-Agent` sent to registries.
const USER_AGENT: &str = concat!("wasmcache/", env!("CARGO_PKG_VERSION"));

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
    /// The bytes; errors are I/O errors (transport failures, or oci-client's digest check).
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
}

/// Client for every registry the cache talks to; cheap to clone.
///
/// Credentials can be reloaded while running ([`RegistryClient::reload_credentials`]); the
/// oci-client session, which caches credentials and tokens per registry, is replaced then.
#[derive(Clone)]
pub struct RegistryClient {
    session: Arc<RwLock<Session>>,
    settings: Arc<Settings>,
    metrics: Metrics,
}

/// What requests use: the oci-client and the credentials it was given.
#[derive(Clone)]
struct Session {
    client: oci_client::Client,
    credentials: Arc<Credentials>,
    tokens: Arc<Tokens>,
}

/// What building a session needs.
struct Settings {
    plain_http: Vec<String>,
    certificates: Vec<Certificate>,
    /// The same CAs, for the token client.
    token_certificates: Vec<reqwest::Certificate>,
    trusted_token_realms: std::collections::BTreeMap<String, Vec<String>>,
    mirrors: std::collections::BTreeMap<String, Vec<String>>,
    connect_timeout: std::time::Duration,
    read_timeout: std::time::Duration,
    auth_files: Vec<std::path::PathBuf>,
    /// Mirrors that need request headers of their own.
    headed: headed::HeadedMirrors,
    /// `blocked_cidrs`, for every client but oci-client's.
    address_policy: AddressPolicy,
}

impl Settings {
    fn session(&self, credentials: Credentials) -> Session {
        Session {
            client: self.client(),
            credentials: Arc::new(credentials),
            tokens: Arc::new(Tokens::new(
                &self.token_certificates,
                self.plain_http.clone(),
                self.trusted_token_realms.clone(),
                self.address_policy.clone(),
                self.connect_timeout,
                self.read_timeout,
                USER_AGENT,
            )),
        }
    }

    fn client(&self) -> oci_client::Client {
        oci_client::Client::new(ClientConfig {
            // `*` (as Istio's `WASM_INSECURE_REGISTRIES`): every registry over plain HTTP.
            protocol: match self.plain_http.iter().any(|host| host == "*") {
                true => ClientProtocol::Http,
                false => ClientProtocol::HttpsExcept(self.plain_http.clone()),
            },
            extra_root_certificates: self.certificates.clone(),
            connect_timeout: Some(self.connect_timeout),
            read_timeout: Some(self.read_timeout),
            platform_resolver: None,
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        })
    }
}

impl RegistryClient {
    /// Builds the client from the configuration (reads the credentials and CA files).
    pub fn new(config: &Config, metrics: Metrics) -> Result<RegistryClient, Error> {
        install_crypto_provider();
        let address_policy = AddressPolicy::new(&config.blocked_cidrs)?;
        let mut certificates = Vec::new();
        let mut token_certificates = Vec::new();
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
            token_certificates.extend(parsed);
            certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let headed = headed::HeadedMirrors::new(
            config.mirror_headers.clone(),
            &token_certificates,
            config.plain_http_registries(),
            address_policy.clone(),
            config.connect_timeout,
            config.read_timeout,
            USER_AGENT,
        );
        let settings = Settings {
            plain_http: config.plain_http_registries(),
            certificates,
            token_certificates,
            trusted_token_realms: config.trusted_token_realms.clone(),
            mirrors: config.registry_mirrors.clone(),
            connect_timeout: config.connect_timeout,
            read_timeout: config.read_timeout,
            auth_files: config.registry_auth_paths(),
            headed,
            address_policy,
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

    /// Gets what oci-client needs to authenticate requests for `target`'s repository.
    ///
    /// For a registry with a `Bearer` challenge the token comes from [`Tokens`] (whose realm
    /// checks oci-client lacks) and is placed in oci-client's token cache, so oci-client
    /// never runs a token flow of its own. Returns whether a token is in use.
    async fn authorize(
        &self,
        session: &Session,
        reference: &Reference,
        target: &oci_client::Reference,
    ) -> Result<(RegistryAuth, bool), Error> {
        let registry = reference.registry();
        let host = target.resolve_registry();
        let credential = session
            .credentials
            .for_repository(registry, reference.repository());
        let challenge = session
            .tokens
            .challenge(host)
            .await
            .map_err(|error| token_error(error, registry))?;
        match challenge {
            Challenge::None => Ok((RegistryAuth::Anonymous, false)),
            Challenge::Basic => match credential {
                Some(Credential {
                    username,
                    secret: Secret::Password(password),
                }) => {
                    let auth = RegistryAuth::Basic(username.clone(), password.clone());
                    // oci-client otherwise uses the first credentials it saw for a registry
                    // for all its repositories; this files them under this repository.
                    if !session.tokens.basic_known(host, reference.repository()) {
                        session
                            .client
                            .auth(target, &auth, RegistryOperation::Pull)
                            .await
                            .map_err(|error| map_error(error, registry, "credentials"))?;
                        session.tokens.remember_basic(host, reference.repository());
                    }
                    Ok((auth, false))
                }
                _ => Ok((RegistryAuth::Anonymous, false)),
            },
            Challenge::Bearer { realm, service } => {
                let result = session
                    .tokens
                    .token(
                        host,
                        reference.repository(),
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
                let auth = RegistryAuth::Bearer(token);
                // Only fills oci-client's cache: a Bearer auth makes no request.
                session
                    .client
                    .auth(target, &auth, RegistryOperation::Pull)
                    .await
                    .map_err(|error| map_error(error, registry, "token"))?;
                Ok((auth, true))
            }
        }
    }

    /// Runs `request` with authentication for `reference`; when a token is refused (it
    /// expired early, or was revoked), gets a new one and runs it once more.
    async fn with_auth<T, F, Fut>(
        &self,
        reference: &Reference,
        target: &oci_client::Reference,
        request: F,
    ) -> Result<T, Error>
    where
        F: Fn(Session, RegistryAuth) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let session = self.session();
        let (auth, bearer) = self.authorize(&session, reference, target).await?;
        match request(session.clone(), auth).await {
            Err(Error::Unauthorized { .. }) if bearer => {
                debug!(
                    registry = reference.registry(),
                    "token refused; asking for a new one"
                );
                session
                    .tokens
                    .forget(target.resolve_registry(), reference.repository());
                let (auth, _) = self.authorize(&session, reference, target).await?;
                request(session, auth).await
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
    /// `Docker-Content-Digest`, and against `limit`.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        limit: u64,
    ) -> Result<(Bytes, Digest), Error> {
        self.mirrors_then_origin(reference, |candidate| async move {
            let mirror = candidate.registry();
            if mirror != reference.registry() && self.settings.headed.has(mirror) {
                let origin = reference.registry();
                let result = self
                    .settings
                    .headed
                    .manifest(&candidate, origin, limit)
                    .await;
                self.count("manifest", mirror, &result);
                return result;
            }
            self.fetch_manifest_from(&candidate, limit).await
        })
        .await
    }

    async fn fetch_manifest_from(
        &self,
        reference: &Reference,
        limit: u64,
    ) -> Result<(Bytes, Digest), Error> {
        let registry = reference.registry();
        let target = to_oci_reference(reference);
        let what = format!("manifest {reference}");
        let (bytes, digest) = self
            .with_auth(reference, &target, |session, auth| {
                let (target, what) = (&target, &what);
                async move {
                    let result = session
                        .client
                        .pull_manifest_raw(target, &auth, ACCEPTED_MANIFESTS)
                        .await
                        .map_err(|error| map_error(error, registry, what));
                    self.count("manifest", registry, &result);
                    result
                }
            })
            .await?;
        if bytes.len() as u64 > limit {
            return Err(Error::TooLarge {
                registry: registry.to_owned(),
                what,
                size: bytes.len() as u64,
                limit,
            });
        }
        let actual = Digest::of(&bytes);
        if digest != actual.to_string() {
            return Err(Error::DigestMismatch {
                registry: registry.to_owned(),
                expected: digest,
                actual: actual.to_string(),
            });
        }
        Ok((bytes, actual))
    }

    /// The digests of the manifests that refer to `reference` (a digest reference) with
    /// `artifact_type`, from the registry's OCI 1.1 referrers API, or the referrers tag
    /// schema (`sha256-<hex>`) where the registry has no such API. Asks the registry itself.
    pub async fn referrers(
        &self,
        reference: &Reference,
        artifact_type: &str,
    ) -> Result<Vec<Digest>, Error> {
        let registry = reference.registry();
        let target = to_oci_reference(reference);
        let what = format!("referrers of {reference}");
        let index = self
            .with_auth(reference, &target, |session, auth| {
                let (target, what) = (&target, &what);
                async move {
                    session
                        .client
                        .store_auth_if_needed(target.resolve_registry(), &auth)
                        .await;
                    let result = session
                        .client
                        .pull_referrers(target, Some(artifact_type))
                        .await
                        .map_err(|error| map_error(error, registry, what));
                    self.count("referrers", registry, &result);
                    result
                }
            })
            .await?;
        let digests = index
            .manifests
            .iter()
            .take(crate::config::DEFAULT_MAX_LAYERS);
        Ok(digests
            .filter_map(|entry| entry.digest.parse().ok())
            .collect())
    }

    /// Opens a stream of the blob `digest` in the reference's repository; oci-client checks
    /// the bytes against `digest` and fails the stream's end on a mismatch.
    pub async fn blob_stream(
        &self,
        reference: &Reference,
        digest: &str,
        hosts: Hosts,
    ) -> Result<BlobStream, Error> {
        self.open_blob(reference, digest, None, hosts).await
    }

    /// Like [`RegistryClient::blob_stream`], for a caller that hashes every byte itself and
    /// checks the result against `digest` (of `size` bytes) before using it: the stream is
    /// not hashed a second time. (The request asks for `bytes=0-`, which oci-client passes
    /// through unhashed; a registry that ignores ranges answers 200 and the stream is checked
    /// as usual, and one that answers with less than `size` bytes is asked again without a
    /// range.)
    pub async fn blob_stream_checked_by_caller(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
        hosts: Hosts,
    ) -> Result<BlobStream, Error> {
        self.open_blob(reference, digest, Some(size), hosts).await
    }

    /// Opens the blob; with `unhashed_size`, asks for the open range `bytes=0-` so that
    /// oci-client leaves the hashing to the caller.
    async fn open_blob(
        &self,
        reference: &Reference,
        digest: &str,
        unhashed_size: Option<u64>,
        hosts: Hosts,
    ) -> Result<BlobStream, Error> {
        if hosts == Hosts::OriginOnly {
            return self.open_blob_from(reference, digest, unhashed_size).await;
        }
        self.mirrors_then_origin(reference, |candidate| async move {
            let mirror = candidate.registry();
            if mirror != reference.registry() && self.settings.headed.has(mirror) {
                let (origin, caller_hashes) = (reference.registry(), unhashed_size.is_some());
                let result = (self.settings.headed)
                    .blob(&candidate, origin, digest, caller_hashes)
                    .await;
                self.count("blob", mirror, &result);
                return result;
            }
            let mut blob = self
                .open_blob_from(&candidate, digest, unhashed_size)
                .await?;
            if candidate.registry() != reference.registry() {
                blob.mirror = Some(candidate.registry().to_owned());
            }
            Ok(blob)
        })
        .await
    }

    async fn open_blob_from(
        &self,
        reference: &Reference,
        digest: &str,
        unhashed_size: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let registry = reference.registry();
        let target = to_oci_reference(reference);
        let what = format!("blob {digest} in {}", reference.name());
        let sized = self
            .with_auth(reference, &target, |session, auth| {
                let (target, what) = (&target, &what);
                async move {
                    session
                        .client
                        .store_auth_if_needed(target.resolve_registry(), &auth)
                        .await;
                    let result = match unhashed_size {
                        None => session.client.pull_blob_stream(target, digest).await,
                        Some(size) => {
                            match session
                                .client
                                .pull_blob_stream_partial(target, digest, 0, None)
                                .await
                            {
                                Ok(BlobResponse::Partial(sized))
                                    if sized.content_length.is_some_and(|n| n != size) =>
                                {
                                    // Part of the blob only: ask again, plainly (and hashed).
                                    drop(sized);
                                    session.client.pull_blob_stream(target, digest).await
                                }
                                other => other.map(|response| match response {
                                    BlobResponse::Full(sized) | BlobResponse::Partial(sized) => {
                                        sized
                                    }
                                }),
                            }
                        }
                    }
                    .map_err(|error| map_error(error, registry, what));
                    self.count("blob", registry, &result);
                    result
                }
            })
            .await?;
        Ok(BlobStream {
            content_length: sized.content_length,
            mirror: None,
            stream: sized.stream,
        })
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

/// The oci-client form of a reference; a digest wins over a tag.
fn to_oci_reference(reference: &Reference) -> oci_client::Reference {
    let registry = reference.registry().to_owned();
    let repository = reference.repository().to_owned();
    match (reference.digest(), reference.tag()) {
        (Some(digest), _) => {
            oci_client::Reference::with_digest(registry, repository, digest.to_string())
        }
        (None, tag) => oci_client::Reference::with_tag(
            registry,
            repository,
            tag.unwrap_or(crate::reference::DEFAULT_TAG).to_owned(),
        ),
    }
}

/// Makes *ring* the process's TLS crypto provider, which the HTTP clients' rustls uses; a
/// no-op once one is installed. (rustls' default provider, aws-lc-rs, builds a C library of
/// its own and took most of a fresh build's time.)
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

//! The distribution API's reads as plain GETs: manifests, blobs and referrers, over one
//! HTTP client that keeps its connections to each registry.
//!
//! Every body is bounded while it streams (manifests by the caller's limit, error bodies by
//! [`MAX_ERROR_BODY`]), only the distribution error code and a short, printable excerpt of
//! its message ever leave this module, and manifests are checked against the digest asked
//! for or announced. A blob the caller does not hash itself is hashed on the way and fails
//! at its end when it does not match. Requests carry the `Authorization` the caller worked
//! out (see `registry/token.rs`) and, for mirrors configured with them, `mirror_headers`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use super::address::{blocked_cause, AddressPolicy, RedirectRefused};
use super::budget::DocumentBudget;
use super::{BlobStream, Error};
use crate::digest::Digest;
use crate::format::ACCEPTED_MANIFESTS;
use crate::reference::Reference;

/// `{registry}` in a header value is replaced by the registry the mirror stands in for.
const REGISTRY_PLACEHOLDER: &str = "{registry}";
/// Most bytes of an error answer read (the rest is dropped with the connection).
pub(crate) const MAX_ERROR_BODY: usize = 4096;
/// Longest excerpt of an upstream's error message passed on.
const MAX_EXCERPT: usize = 160;
/// Media type of the referrers API's answer.
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// The host the distribution API of `registry` is served on (Docker Hub's differs from its
/// name).
pub(crate) fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// A blob that did not hash to its digest.
#[derive(Debug, thiserror::Error)]
#[error("blob hashed to {actual}, not {expected}")]
pub struct BlobMismatch {
    /// The digest asked for.
    pub expected: String,
    /// What the bytes hashed to.
    pub actual: String,
}

/// One request's target: the registry or mirror asked, the registry it stands in for, and
/// the `Authorization` header value, if any.
pub(super) struct Target<'a> {
    /// The reference on the host asked (a mirror's name, or the registry's).
    pub candidate: &'a Reference,
    /// The registry the candidate stands in for.
    pub origin: &'a str,
    /// `Basic …` or `Bearer …`.
    pub authorization: Option<&'a str>,
}

/// The client for the distribution API's reads.
pub(super) struct Distribution {
    client: reqwest::Client,
    address_policy: AddressPolicy,
    headers: BTreeMap<String, BTreeMap<String, String>>,
    plain_http: Vec<String>,
    budget: DocumentBudget,
}

impl Distribution {
    pub(super) fn new(
        client: reqwest::Client,
        address_policy: AddressPolicy,
        headers: BTreeMap<String, BTreeMap<String, String>>,
        plain_http: Vec<String>,
        budget: DocumentBudget,
    ) -> Distribution {
        Distribution {
            client,
            address_policy,
            headers,
            plain_http,
            budget,
        }
    }

    /// Whether `mirror` is sent headers of its own (and so never a registry's credentials).
    pub(super) fn has_headers(&self, mirror: &str) -> bool {
        self.headers.contains_key(mirror)
    }

    /// A GET of `path` on the target's host, with its headers and authorization.
    fn get(&self, target: &Target<'_>, path: &str) -> reqwest::RequestBuilder {
        let host = target.candidate.registry();
        let scheme = match self
            .plain_http
            .iter()
            .any(|entry| entry == "*" || entry == host)
        {
            true => "http",
            false => "https",
        };
        let mut request = self
            .client
            .get(format!("{scheme}://{}{path}", api_host(host)));
        for (name, value) in self.headers.get(host).into_iter().flatten() {
            request = request.header(name, value.replace(REGISTRY_PLACEHOLDER, target.origin));
        }
        if let Some(authorization) = target.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        request
    }

    /// `scheme://host` where the distribution API of `host` is asked (plain HTTP only for
    /// registries in `insecure_registries`).
    pub(super) fn base_url(&self, host: &str) -> String {
        let plain = (self.plain_http.iter()).any(|entry| entry == "*" || entry == host);
        let scheme = if plain { "http" } else { "https" };
        format!("{scheme}://{}", api_host(host))
    }

    /// A `method` request to `url` with the target's headers, and its authorization when
    /// `url` is on the target's own host (an upload may be sent elsewhere).
    pub(super) fn request(
        &self,
        method: reqwest::Method,
        target: &Target<'_>,
        url: reqwest::Url,
    ) -> reqwest::RequestBuilder {
        let host = target.candidate.registry();
        let authority = match (url.host_str(), url.port()) {
            (Some(name), Some(port)) => format!("{name}:{port}"),
            (Some(name), None) => name.to_owned(),
            (None, _) => String::new(),
        };
        let same_host = authority == api_host(host);
        let mut request = self.client.request(method, url);
        for (name, value) in self.headers.get(host).into_iter().flatten() {
            request = request.header(name, value.replace(REGISTRY_PLACEHOLDER, target.origin));
        }
        if let Some(authorization) = target.authorization.filter(|_| same_host) {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        request
    }

    /// Sends `request`; any answer but 200 is an error naming the host and `what`,
    /// with at most the distribution error code and a short excerpt of its message.
    async fn send(
        &self,
        host: &str,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let response = self.execute(host, request).await?;
        self.check_status(host, what, response).await
    }

    /// Sends `request` unless its URL names a blocked address literally (a name is checked
    /// by the client's resolver, and each redirect by its policy).
    pub(super) async fn execute(
        &self,
        host: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let request = request.build().map_err(|error| transport(host, error))?;
        if let Err(source) = self.address_policy.check_url(request.url()) {
            return Err(Error::Blocked {
                registry: host.to_owned(),
                url: redacted(request.url()),
                source,
            });
        }
        self.client
            .execute(request)
            .await
            .map_err(|error| transport(host, error))
    }

    /// `response` if it is a 200, else the error it stands for (nothing is asked for in
    /// part, so a 206 is an error too).
    pub(super) async fn check_status(
        &self,
        host: &str,
        what: &str,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, Error> {
        let status = response.status().as_u16();
        if status == 200 {
            return Ok(response);
        }
        let url = redacted(response.url());
        let challenge = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(response, MAX_ERROR_BODY).await;
        let (code, message) = error_envelope(&body);
        let registry = host.to_owned();
        let what = what.to_owned();
        Err(match (status, code.as_deref()) {
            (401, _) | (_, Some("UNAUTHORIZED")) => Error::Unauthorized {
                registry,
                challenge,
            },
            (403, _) | (_, Some("DENIED")) => Error::Forbidden { registry, what },
            (404, _)
            | (_, Some("MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN" | "NOT_FOUND")) => {
                Error::NotFound { registry, what }
            }
            _ => Error::Status {
                registry,
                status,
                url,
                message: match (code, message) {
                    (Some(code), Some(message)) => format!("{code}: {message}"),
                    (Some(code), None) => code,
                    _ => String::new(),
                },
            },
        })
    }

    /// The target's manifest (by its digest, else its tag), at most `limit` bytes, checked
    /// against the digest asked for or the one announced in `Docker-Content-Digest`.
    pub(super) async fn manifest(
        &self,
        target: &Target<'_>,
        limit: u64,
    ) -> Result<(Bytes, Digest), Error> {
        let candidate = target.candidate;
        let host = candidate.registry();
        let tag_or_digest = match (candidate.digest(), candidate.tag()) {
            (Some(digest), _) => digest.to_string(),
            (None, tag) => tag.unwrap_or(crate::reference::DEFAULT_TAG).to_owned(),
        };
        let what = format!("manifest {candidate}");
        let path = format!("/v2/{}/manifests/{tag_or_digest}", candidate.repository());
        let request = self
            .get(target, &path)
            .header(reqwest::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "));
        let response = self.send(host, &what, request).await?;
        let announced = response
            .headers()
            .get("docker-content-digest")
            .and_then(|value| value.to_str().ok())
            .filter(|value| value.starts_with("sha256:"))
            .map(str::to_owned);
        let body = read_limited(response, limit, host, &what, &self.budget).await?;
        let actual = Digest::of(&body);
        let expected = candidate.digest().map(Digest::to_string).or(announced);
        if let Some(expected) = expected.filter(|expected| *expected != actual.to_string()) {
            return Err(Error::DigestMismatch {
                registry: host.to_owned(),
                expected,
                actual: actual.to_string(),
            });
        }
        Ok((body, actual))
    }

    /// Blob `digest` of the target's repository; hashed and checked at its end unless
    /// `caller_hashes`.
    pub(super) async fn blob(
        &self,
        target: &Target<'_>,
        digest: &str,
        caller_hashes: bool,
    ) -> Result<BlobStream, Error> {
        let candidate = target.candidate;
        let host = candidate.registry();
        let what = format!("blob {digest} in {}", candidate.name());
        let path = format!("/v2/{}/blobs/{digest}", candidate.repository());
        let response = self.send(host, &what, self.get(target, &path)).await?;
        let content_length = response.content_length();
        let stream = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other))
            .boxed();
        let stream = match caller_hashes {
            true => stream,
            false => verified(stream, digest.to_owned()),
        };
        Ok(BlobStream {
            content_length,
            mirror: (host != target.origin).then(|| host.to_owned()),
            stream,
        })
    }

    /// The digests of the manifests referring to the target's digest with `artifact_type`:
    /// the OCI 1.1 referrers API, else the referrers tag schema (`sha256-<hex>`); none when
    /// neither exists. At most `limit` bytes of index, `max` digests.
    pub(super) async fn referrers(
        &self,
        target: &Target<'_>,
        artifact_type: &str,
        limit: u64,
        max: usize,
    ) -> Result<Vec<Digest>, Error> {
        let candidate = target.candidate;
        let host = candidate.registry();
        let Some(subject) = candidate.digest() else {
            return Ok(Vec::new());
        };
        let what = format!("referrers of {candidate}");
        let path = format!("/v2/{}/referrers/{subject}", candidate.repository());
        let request = self
            .get(target, &path)
            .query(&[("artifactType", artifact_type)])
            .header(reqwest::header::ACCEPT, INDEX_MEDIA_TYPE);
        let body = match self.send(host, &what, request).await {
            Ok(response) => read_limited(response, limit, host, &what, &self.budget).await?,
            Err(Error::NotFound { .. }) => {
                let tag = subject.to_string().replace(':', "-");
                let tagged = candidate.with_tag(&tag);
                let fallback = Target {
                    candidate: &tagged,
                    ..*target
                };
                match self.manifest(&fallback, limit).await {
                    Ok((body, _)) => body,
                    Err(Error::NotFound { .. }) => return Ok(Vec::new()),
                    Err(error) => return Err(error),
                }
            }
            Err(error) => return Err(error),
        };
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry {
            digest: String,
            #[serde(default)]
            artifact_type: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Entry>,
        }
        let index: Index = serde_json::from_slice(&body).map_err(|error| Error::Protocol {
            registry: host.to_owned(),
            message: format!("{what}: not an image index ({})", error.classify_name()),
        })?;
        Ok(index
            .manifests
            .into_iter()
            .filter(|entry| {
                entry
                    .artifact_type
                    .as_deref()
                    .is_none_or(|kind| kind == artifact_type)
            })
            .filter_map(|entry| entry.digest.parse().ok())
            .take(max)
            .collect())
    }
}

/// What an HTTP source answered.
pub enum UrlAnswer {
    /// `304`: the module with the ETag asked about is still current.
    NotModified,
    /// The body, and the ETag to ask about next time.
    Body {
        /// The `ETag` header, if any.
        etag: Option<String>,
        /// The bytes as they arrive.
        blob: BlobStream,
    },
}

impl Distribution {
    /// `GET` of a module URL; with `etag`, asks `If-None-Match` so an unchanged module is
    /// not sent again. Plain `http://` only for hosts in `insecure_registries`.
    pub(super) async fn get_url(
        &self,
        reference: &Reference,
        etag: Option<&str>,
    ) -> Result<UrlAnswer, Error> {
        let host = reference.registry();
        let url = reference.url().unwrap_or_default();
        let plain = url.starts_with("http:");
        if plain
            && !self
                .plain_http
                .iter()
                .any(|entry| entry == "*" || entry == host)
        {
            return Err(Error::PlainHttpRefused {
                registry: host.to_owned(),
            });
        }
        let mut request = self.client.get(url);
        if let Some(etag) = etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let what = format!("module {}", redacted_text(url));
        let response = self.execute(host, request).await?;
        if response.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(UrlAnswer::NotModified);
        }
        let response = self.check_status(host, &what, response).await?;
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| printable(value, MAX_EXCERPT));
        let content_length = response.content_length();
        let stream = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other))
            .boxed();
        Ok(UrlAnswer::Body {
            etag,
            blob: BlobStream {
                content_length,
                mirror: None,
                stream,
            },
        })
    }
}

/// `url` without its query, for errors and logs.
fn redacted_text(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(|_| url.to_owned(), |url| redacted(&url))
}

/// A short name for a JSON error's category, without any of the document's text.
trait Classify {
    fn classify_name(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "invalid JSON",
            serde_json::error::Category::Data => "unexpected fields",
            serde_json::error::Category::Eof => "cut short",
        }
    }
}

/// The body of `response`, failing with [`Error::TooLarge`] as soon as it passes `limit`
/// (announced or streamed), so a huge answer never sits in memory, and holding room in
/// `budget` for what it buffered (see [`DocumentBudget`]).
pub(super) async fn read_limited(
    response: reqwest::Response,
    limit: u64,
    host: &str,
    what: &str,
    budget: &DocumentBudget,
) -> Result<Bytes, Error> {
    let too_large = |size: u64| Error::TooLarge {
        registry: host.to_owned(),
        what: what.to_owned(),
        size,
        limit,
    };
    if let Some(length) = response.content_length().filter(|length| *length > limit) {
        return Err(too_large(length));
    }
    let mut reserved = budget.reader();
    let mut body = Chunks::default();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| transport(host, error))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large((body.len() + chunk.len()) as u64));
        }
        reserved.grow(chunk.len()).map_err(|room| Error::Busy {
            registry: host.to_owned(),
            what: what.to_owned(),
            source: room,
        })?;
        body.push(chunk);
    }
    Ok(body.concat())
}

/// A body as it arrived, in chunks: no buffer grown by doubling (which would hold up to twice
/// what was read, and both buffers while it copies); one copy at the end when there are
/// several.
#[derive(Default)]
pub(crate) struct Chunks {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    /// Bytes so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `chunk`.
    pub(crate) fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }

    /// The whole body.
    pub(crate) fn concat(mut self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().expect("one chunk"),
            _ => {
                let mut body = Vec::with_capacity(self.len);
                for chunk in &self.chunks {
                    body.extend_from_slice(chunk);
                }
                Bytes::from(body)
            }
        }
    }
}

/// At most `cap` bytes of `response`'s body (a failure reads as what arrived).
pub(crate) async fn read_capped(response: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = cap - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == cap {
            break;
        }
    }
    body
}

/// The first error's code and message of a distribution error body, as short printable
/// text; nothing of a body that is not one.
fn error_envelope(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: String,
        #[serde(default)]
        message: Option<String>,
    }
    let Ok(envelope) = serde_json::from_slice::<Envelope>(body) else {
        return (None, None);
    };
    let Some(first) = envelope.errors.into_iter().next() else {
        return (None, None);
    };
    let code = printable(&first.code, 40).filter(|code| {
        code.chars()
            .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
    });
    (code, first.message.and_then(|m| printable(&m, MAX_EXCERPT)))
}

/// `text` with control characters dropped, cut at `max` characters; `None` when empty.
pub(crate) fn printable(text: &str, max: usize) -> Option<String> {
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(max + 1)
        .collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() {
        return None;
    }
    Some(match cleaned.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &cleaned[..end]),
        None => cleaned.to_owned(),
    })
}

/// `url` without its query (which may carry a signed storage URL's credentials).
fn redacted(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// `stream`, failing at its end with [`BlobMismatch`] when its bytes do not hash to
/// `expected`.
pub(super) fn verified(
    stream: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
    expected: String,
) -> futures_util::stream::BoxStream<'static, std::io::Result<Bytes>> {
    async_stream::stream! {
        let mut hasher = Sha256::new();
        for await chunk in stream {
            match chunk {
                Ok(chunk) => {
                    hasher.update(&chunk);
                    yield Ok(chunk);
                }
                Err(error) => {
                    yield Err(error);
                    return;
                }
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != expected {
            yield Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                BlobMismatch { expected, actual },
            ));
        }
    }
    .boxed()
}

/// A transport failure as the registry's error: a timeout, else unreachable.
pub(super) fn transport(host: &str, error: reqwest::Error) -> Error {
    let registry = host.to_owned();
    if let Some(blocked) = blocked_cause(&error) {
        Error::Blocked {
            registry,
            url: error.url().map(redacted).unwrap_or_default(),
            source: *blocked,
        }
    } else if let Some(refused) = redirect_refusal(&error) {
        Error::Redirect {
            registry,
            reason: refused.0.clone(),
        }
    } else if error.is_timeout() {
        Error::Timeout { registry }
    } else {
        Error::Unreachable {
            registry,
            source: Box::new(error),
        }
    }
}

/// The redirect refusal somewhere in `error`'s sources, if any.
fn redirect_refusal(error: &reqwest::Error) -> Option<&RedirectRefused> {
    let mut source = std::error::Error::source(error);
    while let Some(error) = source {
        if let Some(refused) = error.downcast_ref::<RedirectRefused>() {
            return Some(refused);
        }
        source = error.source();
    }
    None
}

/// The HTTP client for registries, mirrors and module URLs: their CAs and timeouts,
/// `blocked_cidrs` checked on every address connected to, and redirects followed only as the
/// address policy allows (a few hops, never down to plain HTTP) to hosts `host_allowed`
/// (the node's registry policy) accepts.
pub(super) fn client(
    certificates: &[reqwest::Certificate],
    address_policy: &AddressPolicy,
    host_allowed: impl Fn(&str) -> bool + Send + Sync + 'static,
    connect_timeout: Duration,
    read_timeout: Duration,
    user_agent: &str,
) -> reqwest::Client {
    let policy = address_policy.clone();
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if let Err(refused) = policy.check_redirect(attempt.url(), attempt.previous()) {
            return attempt.error(refused);
        }
        let next = attempt.url();
        let host = match (next.host_str(), next.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => String::new(),
        };
        match host_allowed(&host) {
            true => attempt.follow(),
            false => attempt.error(RedirectRefused(format!(
                "redirect to {host} refused: not allowed by this node's registry policy \
                 (allowed_registries, blocked_registries)"
            ))),
        }
    });
    reqwest::Client::builder()
        .tls_certs_merge(certificates.iter().cloned())
        .dns_resolver(std::sync::Arc::new(address_policy.clone()))
        .redirect(redirects)
        .connect_timeout(connect_timeout)
        .read_timeout(read_timeout)
        .user_agent(user_agent)
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_that_does_not_hash_to_its_digest_fails_at_its_end() {
        let good = Bytes::from_static(b"module bytes");
        let digest = Digest::of(&good).to_string();
        let chunks = |bytes: Bytes| futures_util::stream::iter([Ok(bytes)]).boxed();
        let read: Vec<_> = verified(chunks(good.clone()), digest.clone())
            .collect()
            .await;
        assert!(read.iter().all(Result::is_ok));
        let read: Vec<_> = verified(chunks(Bytes::from_static(b"other")), digest)
            .collect()
            .await;
        let error = read.last().unwrap().as_ref().unwrap_err();
        let inner = error.get_ref().unwrap();
        assert!(inner.downcast_ref::<BlobMismatch>().is_some());
    }

    #[test]
    fn error_bodies_give_only_a_code_and_a_short_printable_message() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no\nsuch\u0007 thing","detail":"SECRET"}]}"#;
        let (code, message) = error_envelope(body);
        assert_eq!(code.as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(message.as_deref(), Some("nosuch thing"));
        assert_eq!(error_envelope(b"SECRET admin token=abc123"), (None, None));
        let long = format!(
            r#"{{"errors":[{{"code":"X","message":"{}"}}]}}"#,
            "a".repeat(5000)
        );
        let (_, message) = error_envelope(long.as_bytes());
        assert_eq!(message.unwrap().chars().count(), MAX_EXCERPT + 1);
        let odd = br#"{"errors":[{"code":"lower case <b>","message":"m"}]}"#;
        assert_eq!(error_envelope(odd).0, None);
    }

    #[test]
    fn authorization_goes_only_to_the_registry_own_host() {
        crate::registry::install_crypto_provider();
        let policy = AddressPolicy::new(&[]).unwrap();
        let plain = vec!["127.0.0.1:5000".to_owned()];
        let distribution = Distribution::new(
            reqwest::Client::new(),
            policy,
            BTreeMap::new(),
            plain,
            DocumentBudget::new(1 << 20),
        );
        assert_eq!(
            distribution.base_url("127.0.0.1:5000"),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            distribution.base_url("docker.io"),
            "https://registry-1.docker.io"
        );
        let reference: Reference = "127.0.0.1:5000/a/b:v1".parse().unwrap();
        let target = Target {
            candidate: &reference,
            origin: "127.0.0.1:5000",
            authorization: Some("Bearer t"),
        };
        let authorization = |url: &str| {
            let url = reqwest::Url::parse(url).unwrap();
            let request = distribution.request(reqwest::Method::PUT, &target, url);
            let request = request.build().unwrap();
            request
                .headers()
                .get(reqwest::header::AUTHORIZATION)
                .cloned()
        };
        assert!(authorization("http://127.0.0.1:5000/v2/a/b/blobs/uploads/1").is_some());
        assert!(authorization("http://127.0.0.1:5001/v2/a/b/blobs/uploads/1").is_none());
        assert!(authorization("https://storage.example/upload/1").is_none());
    }

    #[test]
    fn docker_hub_is_asked_on_its_api_host() {
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert_eq!(api_host("ghcr.io"), "ghcr.io");
    }
}

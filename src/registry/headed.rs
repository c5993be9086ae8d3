//! Mirrors that need request headers of their own (`mirror_headers`), such as Dragonfly's
//! proxy, which learns the upstream registry from `X-Dragonfly-Registry`. oci-client sends no
//! extra headers, so these requests are plain GETs of the distribution API, anonymous (a
//! registry's credentials never go to a mirror), with the same timeouts and CAs as the rest,
//! and only to addresses outside `blocked_cidrs`.
//! Every manifest is checked against its digest here; a blob the caller does not hash itself
//! is hashed on the way and fails at its end when it does not match.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use super::address::{blocked_cause, AddressPolicy};
use super::{BlobStream, Error};
use crate::digest::Digest;
use crate::format::ACCEPTED_MANIFESTS;
use crate::reference::Reference;

/// `{registry}` in a header value is replaced by the registry the mirror stands in for.
const REGISTRY_PLACEHOLDER: &str = "{registry}";

/// The client for mirrors with headers.
pub(super) struct HeadedMirrors {
    client: reqwest::Client,
    headers: BTreeMap<String, BTreeMap<String, String>>,
    plain_http: Vec<String>,
    address_policy: AddressPolicy,
}

impl HeadedMirrors {
    pub(super) fn new(
        headers: BTreeMap<String, BTreeMap<String, String>>,
        certificates: &[reqwest::Certificate],
        plain_http: Vec<String>,
        address_policy: AddressPolicy,
        connect_timeout: Duration,
        read_timeout: Duration,
        user_agent: &str,
    ) -> HeadedMirrors {
        let client = reqwest::Client::builder()
            .tls_certs_merge(certificates.iter().cloned())
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .user_agent(user_agent)
            .redirect(address_policy.redirect_policy())
            .dns_resolver(address_policy.clone())
            .build()
            .unwrap_or_default();
        HeadedMirrors {
            client,
            headers,
            plain_http,
            address_policy,
        }
    }

    /// Whether requests to `mirror` go through here.
    pub(super) fn has(&self, mirror: &str) -> bool {
        self.headers.contains_key(mirror)
    }

    /// A GET of `path` on `mirror` (standing in for `origin`) with its headers.
    fn get(&self, mirror: &str, origin: &str, path: &str) -> reqwest::RequestBuilder {
        let scheme = if self
            .plain_http
            .iter()
            .any(|host| host == "*" || host == mirror)
        {
            "http"
        } else {
            "https"
        };
        let mut request = self.client.get(format!("{scheme}://{mirror}{path}"));
        for (name, value) in self.headers.get(mirror).into_iter().flatten() {
            request = request.header(name, value.replace(REGISTRY_PLACEHOLDER, origin));
        }
        request
    }

    /// Sends `request` (when its address is not blocked); any answer but 200 (or 206) is an
    /// error naming `mirror` and `what`.
    async fn send(
        &self,
        mirror: &str,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let request = request.build().map_err(|error| transport(mirror, error))?;
        if let Err(source) = self.address_policy.check_url(request.url()) {
            return Err(Error::Blocked {
                registry: mirror.to_owned(),
                url: request.url().to_string(),
                source,
            });
        }
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|error| transport(mirror, error))?;
        let status = response.status().as_u16();
        let registry = mirror.to_owned();
        match status {
            200 | 206 => Ok(response),
            401 => Err(Error::Unauthorized { registry }),
            403 => Err(Error::Forbidden {
                registry,
                what: what.to_owned(),
            }),
            404 => Err(Error::NotFound {
                registry,
                what: what.to_owned(),
            }),
            _ => Err(Error::Status {
                registry,
                status,
                url: response.url().to_string(),
                message: String::new(),
            }),
        }
    }

    /// `candidate`'s manifest from its mirror, at most `limit` bytes, checked against the
    /// digest asked for or the one the mirror announces.
    pub(super) async fn manifest(
        &self,
        candidate: &Reference,
        origin: &str,
        limit: u64,
    ) -> Result<(Bytes, Digest), Error> {
        let mirror = candidate.registry();
        let target = match (candidate.digest(), candidate.tag()) {
            (Some(digest), _) => digest.to_string(),
            (None, tag) => tag.unwrap_or(crate::reference::DEFAULT_TAG).to_owned(),
        };
        let what = format!("manifest {candidate}");
        let path = format!("/v2/{}/manifests/{target}", candidate.repository());
        let request = self
            .get(mirror, origin, &path)
            .header(reqwest::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "));
        let response = self.send(mirror, &what, request).await?;
        let announced = response
            .headers()
            .get("docker-content-digest")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(|error| transport(mirror, error))?);
            if body.len() as u64 > limit {
                return Err(Error::TooLarge {
                    registry: mirror.to_owned(),
                    what,
                    size: body.len() as u64,
                    limit,
                });
            }
        }
        let actual = Digest::of(&body);
        let expected = candidate.digest().map(Digest::to_string).or(announced);
        if let Some(expected) = expected.filter(|expected| *expected != actual.to_string()) {
            return Err(Error::DigestMismatch {
                registry: mirror.to_owned(),
                expected,
                actual: actual.to_string(),
            });
        }
        Ok((Bytes::from(body), actual))
    }

    /// Blob `digest` of `candidate`'s repository from its mirror; hashed and checked at its
    /// end unless `caller_hashes`.
    pub(super) async fn blob(
        &self,
        candidate: &Reference,
        origin: &str,
        digest: &str,
        caller_hashes: bool,
    ) -> Result<BlobStream, Error> {
        let mirror = candidate.registry();
        let what = format!("blob {digest} in {}", candidate.name());
        let path = format!("/v2/{}/blobs/{digest}", candidate.repository());
        let response = self
            .send(mirror, &what, self.get(mirror, origin, &path))
            .await?;
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
            mirror: Some(mirror.to_owned()),
            stream,
        })
    }
}

/// `stream`, failing at its end when its bytes do not hash to `expected`.
fn verified(
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
                format!("blob hashed to {actual}, not {expected}"),
            ));
        }
    }
    .boxed()
}

fn transport(mirror: &str, error: reqwest::Error) -> Error {
    let registry = mirror.to_owned();
    if let Some(blocked) = blocked_cause(&error) {
        let url = error.url().map(|url| url.to_string()).unwrap_or_default();
        Error::Blocked {
            registry,
            url,
            source: *blocked,
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
        assert!(read.last().unwrap().is_err());
    }
}

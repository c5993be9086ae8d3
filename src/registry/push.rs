//! The distribution API's writes, for `wasmcache push`: whether a blob is already there
//! (`HEAD`), blob uploads (`POST` for a session, then one `PUT ?digest=`, or `PATCH`es with
//! `Content-Range` and a closing `PUT`), and manifests (`PUT` by tag).
//!
//! Every request asks for push access (a token scoped `repository:<name>:pull,push`) the way
//! reads ask for pull: anonymously until a 401 names the registry's challenge, then once more
//! with what the challenge asks for (a token, or basic credentials). Only the registry itself
//! is written to, never a mirror. Each request ends within the client's connect and read
//! timeouts plus [`MIN_UPLOAD_BYTES_PER_SECOND`] for the bytes it carries. What to upload,
//! and in which chunks, is the caller's choice (`crate::push`); this file only speaks the
//! protocol.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Url};

use super::distribution::{api_host, Target};
use super::error::token_error;
use super::token::Access;
use super::{Error, RegistryClient};
use crate::digest::Digest;
use crate::reference::{Reference, DEFAULT_TAG};

/// Blobs larger than this go up in `PATCH`es of this size (or the registry's
/// `OCI-Chunk-Min-Length`, when larger); smaller ones in one `PUT`.
pub const UPLOAD_CHUNK_BYTES: u64 = 8 << 20;
/// Slowest upload tolerated: a request may take the connect and read timeouts plus one second
/// per this many bytes it sends.
const MIN_UPLOAD_BYTES_PER_SECOND: u64 = 1 << 20;
/// Where a registry states the smallest chunk it accepts (distribution spec 1.1).
const CHUNK_MIN_LENGTH: &str = "oci-chunk-min-length";
/// The media type of blob bytes in uploads.
const OCTET_STREAM: &str = "application/octet-stream";

/// An upload session: where the next request goes and how many bytes the registry holds.
#[derive(Debug)]
pub struct Upload {
    location: Url,
    offset: u64,
    chunk_bytes: u64,
}

impl Upload {
    /// The size of the chunks this registry should get: [`UPLOAD_CHUNK_BYTES`], or the
    /// smallest chunk it accepts when that is larger.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// How many bytes went up so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl RegistryClient {
    /// Whether `reference`'s repository holds blob `digest`.
    pub async fn blob_exists(&self, reference: &Reference, digest: &Digest) -> Result<bool, Error> {
        let host = reference.registry();
        let what = format!("blob {digest} in {}", reference.name());
        let url = self.api_url(reference, &format!("blobs/{digest}"))?;
        let result = self
            .with_push_access(reference, |authorization| {
                let (url, what) = (url.clone(), &what);
                async move {
                    let target = target(reference, authorization.as_deref());
                    let request = (self.settings.distribution)
                        .request(Method::HEAD, &target, url)
                        .timeout(self.request_deadline(0));
                    let response = (self.settings.distribution.execute(host, request)).await?;
                    match response.status().as_u16() {
                        200 => Ok(true),
                        404 => Ok(false),
                        _ => Err(self.refusal(host, what, response).await),
                    }
                }
            })
            .await;
        self.count("blob_head", host, &result);
        result
    }

    /// Opens an upload session in `reference`'s repository (`POST .../blobs/uploads/`).
    pub async fn start_upload(&self, reference: &Reference) -> Result<Upload, Error> {
        let host = reference.registry();
        let what = format!("a blob upload to {}", reference.name());
        let url = self.api_url(reference, "blobs/uploads/")?;
        let result = self
            .with_push_access(reference, |authorization| {
                let (url, what) = (url.clone(), &what);
                async move {
                    let target = target(reference, authorization.as_deref());
                    let request = (self.settings.distribution)
                        .request(Method::POST, &target, url)
                        .header(CONTENT_LENGTH, 0)
                        .timeout(self.request_deadline(0));
                    let response = self.send(host, what, request).await?;
                    let minimum = (response.headers().get(CHUNK_MIN_LENGTH))
                        .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    Ok(Upload {
                        location: location(host, what, &response)?,
                        offset: 0,
                        chunk_bytes: UPLOAD_CHUNK_BYTES.max(minimum),
                    })
                }
            })
            .await;
        self.count("upload", host, &result);
        result
    }

    /// Sends `chunk` as the next bytes of `upload` (`PATCH` with `Content-Range`), and
    /// checks that the registry holds everything sent so far.
    pub async fn upload_chunk(
        &self,
        reference: &Reference,
        upload: &mut Upload,
        chunk: Bytes,
    ) -> Result<(), Error> {
        let host = reference.registry();
        let (start, length) = (upload.offset, chunk.len() as u64);
        let end = start + length;
        let what = format!("bytes {start}-{end} of an upload to {}", reference.name());
        let result = self
            .with_push_access(reference, |authorization| {
                let (url, what, chunk) = (upload.location.clone(), &what, chunk.clone());
                async move {
                    let target = target(reference, authorization.as_deref());
                    let request = (self.settings.distribution)
                        .request(Method::PATCH, &target, url)
                        .header(CONTENT_TYPE, OCTET_STREAM)
                        .header(CONTENT_LENGTH, length)
                        .header("content-range", format!("{start}-{}", end - 1))
                        .timeout(self.request_deadline(length))
                        .body(chunk);
                    let response = self.send(host, what, request).await?;
                    // The registry says which bytes it holds; anything but all of them
                    // would leave a hole in the blob.
                    let held = (response.headers().get("range"))
                        .and_then(|value| value.to_str().ok())
                        .map(str::to_owned);
                    if let Some(held) = held.filter(|held| *held != format!("0-{}", end - 1)) {
                        return Err(Error::Protocol {
                            registry: host.to_owned(),
                            message: format!("{what}: the registry holds bytes {held}"),
                        });
                    }
                    location(host, what, &response)
                }
            })
            .await;
        self.count("upload", host, &result);
        upload.location = result?;
        upload.offset = end;
        Ok(())
    }

    /// Ends `upload` with its last bytes (all of a blob uploaded in one request, or none after
    /// chunks): the registry checks them against `digest` and stores the blob.
    pub async fn finish_upload(
        &self,
        reference: &Reference,
        upload: Upload,
        digest: &Digest,
        last: Bytes,
    ) -> Result<(), Error> {
        let host = reference.registry();
        let what = format!("blob {digest} in {}", reference.name());
        let mut url = upload.location.clone();
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let length = last.len() as u64;
        let result = self
            .with_push_access(reference, |authorization| {
                let (url, what, last) = (url.clone(), &what, last.clone());
                async move {
                    let target = target(reference, authorization.as_deref());
                    let request = (self.settings.distribution)
                        .request(Method::PUT, &target, url)
                        .header(CONTENT_TYPE, OCTET_STREAM)
                        .header(CONTENT_LENGTH, length)
                        .timeout(self.request_deadline(length))
                        .body(last);
                    self.send(host, what, request).await.map(drop)
                }
            })
            .await;
        self.count("upload", host, &result);
        result
    }

    /// Puts `manifest` under `reference`'s tag as `media_type`; returns its digest, after
    /// checking it against the one the registry reports.
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        manifest: Bytes,
        media_type: &str,
    ) -> Result<Digest, Error> {
        let host = reference.registry();
        let tag = reference.tag().unwrap_or(DEFAULT_TAG);
        let what = format!("manifest {}:{tag}", reference.name());
        let url = self.api_url(reference, &format!("manifests/{tag}"))?;
        let digest = Digest::of(&manifest);
        let length = manifest.len() as u64;
        let result = self
            .with_push_access(reference, |authorization| {
                let (url, what, manifest, digest) = (url.clone(), &what, manifest.clone(), &digest);
                async move {
                    let target = target(reference, authorization.as_deref());
                    let request = (self.settings.distribution)
                        .request(Method::PUT, &target, url)
                        .header(CONTENT_TYPE, media_type)
                        .header(CONTENT_LENGTH, length)
                        .timeout(self.request_deadline(length))
                        .body(manifest);
                    let response = self.send(host, what, request).await?;
                    let reported = (response.headers().get("docker-content-digest"))
                        .and_then(|value| value.to_str().ok())
                        .map(str::to_owned);
                    match reported {
                        Some(reported) if reported != digest.to_string() => {
                            Err(Error::DigestMismatch {
                                registry: host.to_owned(),
                                expected: digest.to_string(),
                                actual: reported,
                            })
                        }
                        _ => Ok(()),
                    }
                }
            })
            .await;
        self.count("manifest_put", host, &result);
        result.map(|()| digest)
    }

    /// Runs `request` with push access to `reference`'s repository: with what the session
    /// knows of the registry's challenge, else anonymously; on a 401, learns the challenge,
    /// authorizes (a fresh token, or basic credentials) and runs it once more.
    async fn with_push_access<T, F, Fut>(
        &self,
        reference: &Reference,
        request: F,
    ) -> Result<T, Error>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let api = api_host(reference.registry());
        let session = self.session();
        let authorization = match session.tokens.known(api) {
            Some(challenge) => {
                let access = Access::PullPush;
                (self
                    .authorize(&session, reference, api, challenge, access)
                    .await?)
                    .0
            }
            None => None,
        };
        match request(authorization).await {
            Err(Error::Unauthorized {
                challenge: Some(header),
                ..
            }) => {
                tracing::debug!(
                    registry = reference.registry(),
                    "401; authenticating to push"
                );
                session.tokens.forget(api, reference.repository());
                let challenge = (session.tokens.learn(api, &header))
                    .map_err(|error| token_error(error, reference.registry()))?;
                let access = Access::PullPush;
                let (authorization, _) =
                    (self.authorize(&session, reference, api, challenge, access)).await?;
                request(authorization).await
            }
            other => other,
        }
    }

    /// `/v2/<repository>/<path>` on `reference`'s registry.
    fn api_url(&self, reference: &Reference, path: &str) -> Result<Url, Error> {
        let base = self.settings.distribution.base_url(reference.registry());
        let url = format!("{base}/v2/{}/{path}", reference.repository());
        Url::parse(&url).map_err(|error| Error::Protocol {
            registry: reference.registry().to_owned(),
            message: format!("cannot make a URL of {url}: {error}"),
        })
    }

    /// Sends a push request: any 2xx answer is the registry's yes, anything else the error it
    /// stands for.
    async fn send(
        &self,
        host: &str,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let response = (self.settings.distribution.execute(host, request)).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.refusal(host, what, response).await)
    }

    /// The error an answer other than the one hoped for stands for (the distribution
    /// client's reading of it, which names the registry and `what`).
    async fn refusal(&self, host: &str, what: &str, response: reqwest::Response) -> Error {
        let status = response.status().as_u16();
        let distribution = &self.settings.distribution;
        match distribution.check_status(host, what, response).await {
            Err(error) => error,
            Ok(_) => Error::Protocol {
                registry: host.to_owned(),
                message: format!("{what}: unexpected status {status}"),
            },
        }
    }

    /// How long a request that sends `bytes` may take in all.
    fn request_deadline(&self, bytes: u64) -> Duration {
        let sending = Duration::from_secs(bytes.div_ceil(MIN_UPLOAD_BYTES_PER_SECOND));
        self.settings.connect_timeout + self.settings.read_timeout + sending
    }
}

/// The registry itself, asked with `authorization`.
fn target<'a>(reference: &'a Reference, authorization: Option<&'a str>) -> Target<'a> {
    Target {
        candidate: reference,
        origin: reference.registry(),
        authorization,
    }
}

/// Where an upload goes next: the answer's `Location`, absolute or relative to the URL asked.
fn location(host: &str, what: &str, response: &reqwest::Response) -> Result<Url, Error> {
    let header = response.headers().get(LOCATION);
    let text = header.map(|value| {
        value
            .to_str()
            .map_err(|_| "an unreadable Location".to_owned())
    });
    let text = text.unwrap_or_else(|| Err("no Location in the answer".to_owned()));
    text.and_then(|text| resolve(response.url(), text))
        .map_err(|message| Error::Protocol {
            registry: host.to_owned(),
            message: format!("{what}: {message}"),
        })
}

/// `location` read against the URL that answered it.
fn resolve(asked: &Url, location: &str) -> Result<Url, String> {
    (asked.join(location)).map_err(|error| format!("Location {location:?} is not a URL: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_absolute_or_relative_to_the_url_asked() {
        let asked = Url::parse("http://127.0.0.1:5000/v2/a/b/blobs/uploads/").unwrap();
        let absolute = "https://storage.example/upload/1?_state=x%3D";
        assert_eq!(resolve(&asked, absolute).unwrap().as_str(), absolute);
        assert_eq!(
            resolve(&asked, "/v2/a/b/blobs/uploads/u1?_state=y")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?_state=y"
        );
        assert_eq!(
            resolve(&asked, "u2").unwrap().as_str(),
            "http://127.0.0.1:5000/v2/a/b/blobs/uploads/u2"
        );
        assert!(resolve(&asked, "http://[bad").is_err());
    }
}

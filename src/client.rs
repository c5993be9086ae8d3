//! A gRPC client for the daemon's unix socket, used by the CLI's client subcommands and by
//! other Rust programs on the node.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::api::proto::wasm_cache_client::WasmCacheClient;
use crate::api::proto::{self, FetchResponse};
use crate::digest::Digest;
use crate::fetch::{Fetched, PullPolicy};
use crate::format::WasmeMetadata;
use crate::reference::Reference;
use crate::store::Removed;

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the wasmcache daemon at {socket} (is `wasmcache serve` running?)")]
pub struct ConnectError {
    /// The socket tried.
    pub socket: PathBuf,
    /// The transport error.
    #[source]
    pub source: tonic::transport::Error,
}

/// A gRPC channel to the daemon listening on `socket` (for any of its services).
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket. Large
    // frames and windows let `ReadModule` stream a module in 1 MiB frames instead of 16 KiB
    // ones, without stalling on flow control: 2–3× faster for a 50 MiB module.
    Endpoint::from_static("http://localhost")
        .max_frame_size(1 << 20)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError {
            socket: socket.to_owned(),
            source,
        })
}

/// Connects to the daemon listening on `socket`.
pub async fn connect(socket: &Path) -> Result<WasmCacheClient<Channel>, ConnectError> {
    Ok(WasmCacheClient::new(channel(socket).await?).max_decoding_message_size(8 << 20))
}

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The daemon answered with an error status; its message names what was wrong.
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// The daemon's answer could not be understood.
    #[error("malformed answer from the daemon: {0}")]
    Malformed(String),
    /// An HTTP request to the daemon failed before it answered.
    #[error("asking the daemon for {path}")]
    Request {
        /// The path asked for.
        path: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(status)
    }
}

impl Error {
    /// The gRPC code, when the daemon answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// Converts an API entry back into the library's type (same JSON as `pull --json`).
pub fn from_response(response: FetchResponse) -> Result<Fetched, Error> {
    let digest = |text: &str| {
        text.parse::<Digest>()
            .map_err(|error| Error::Malformed(error.to_string()))
    };
    let format = serde_json::from_value(serde_json::Value::String(response.format.clone()))
        .map_err(|_| Error::Malformed(format!("unknown format '{}'", response.format)))?;
    let signature = response
        .signature
        .clone()
        .map(|s| crate::store::SignatureRecord {
            verified: s.verified,
            key: s.key,
            scope: s.scope,
            signature: s.signature_digest,
        });
    let index_digest = match response.index_digest.as_str() {
        "" => None,
        text => Some(digest(text)?),
    };
    let manifest_digest = digest(&response.manifest_digest)?;
    Ok(Fetched {
        signature,
        digest: digest(&response.digest)?,
        resolved_digest: match response.resolved_digest.as_str() {
            "" => index_digest
                .clone()
                .unwrap_or_else(|| manifest_digest.clone()),
            text => digest(text)?,
        },
        manifest_digest,
        index_digest,
        reference: response.reference,
        size: response.size,
        format,
        path: PathBuf::from(response.path),
        cache_hit: response.cache_hit,
        stale: response.stale,
        resolved_at: u64::try_from(response.resolved_at_unix).unwrap_or(0),
        proxy_wasm_abi: response.proxy_wasm_abi,
        wasme: response.wasme.map(|w| WasmeMetadata {
            kind: Some(w.r#type).filter(|t| !t.is_empty()),
            abi_versions: w.abi_versions,
            root_ids: w.root_ids,
        }),
    })
}

/// `Fetch` over the socket.
pub async fn fetch(socket: &Path, reference: String, policy: PullPolicy) -> Result<Fetched, Error> {
    fetch_expecting(socket, reference, policy, String::new()).await
}

/// `Fetch` over the socket of a module that must have `expected_sha256` (or the reference
/// must resolve to it); empty expects nothing.
pub async fn fetch_expecting(
    socket: &Path,
    reference: String,
    policy: PullPolicy,
    expected_sha256: String,
) -> Result<Fetched, Error> {
    let mut client = connect(socket).await?;
    let policy = match policy {
        PullPolicy::IfNotPresent => proto::PullPolicy::IfNotPresent,
        PullPolicy::Always => proto::PullPolicy::Always,
        PullPolicy::Never => proto::PullPolicy::Never,
    };
    let response = client
        .fetch(proto::FetchRequest {
            reference,
            pull_policy: policy.into(),
            lease_seconds: 0,
            expected_sha256,
        })
        .await?;
    from_response(response.into_inner())
}

/// `Stat` over the socket.
pub async fn stat(socket: &Path, target: String) -> Result<Vec<Fetched>, Error> {
    let mut client = connect(socket).await?;
    let response = client.stat(proto::StatRequest { target }).await?;
    response
        .into_inner()
        .entries
        .into_iter()
        .map(from_response)
        .collect()
}

/// Every page of `List` over the socket.
pub async fn list(socket: &Path) -> Result<Vec<Fetched>, Error> {
    let mut client = connect(socket).await?;
    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list(proto::ListRequest {
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        for entry in page.entries {
            entries.push(from_response(entry)?);
        }
        if page.next_page_token.is_empty() {
            return Ok(entries);
        }
        page_token = page.next_page_token;
    }
}

/// `Remove` over the socket.
pub async fn remove(socket: &Path, target: String) -> Result<Removed, Error> {
    let mut client = connect(socket).await?;
    let response = client
        .remove(proto::RemoveRequest { target })
        .await?
        .into_inner();
    Ok(Removed {
        references: response.references,
        modules: response
            .modules
            .iter()
            .map(|m| {
                m.parse()
                    .map_err(|e: crate::digest::ParseError| Error::Malformed(e.to_string()))
            })
            .collect::<Result<_, _>>()?,
    })
}

/// `Prefetch` over the socket: the stream of progress events.
pub async fn prefetch(
    socket: &Path,
    references: Vec<String>,
    pin: bool,
) -> Result<tonic::Streaming<proto::PrefetchProgress>, Error> {
    let mut client = connect(socket).await?;
    let response = client
        .prefetch(proto::PrefetchRequest { references, pin })
        .await?;
    Ok(response.into_inner())
}

/// `Pin` (or `Unpin` with `pin = false`) over the socket.
pub async fn pin(socket: &Path, reference: String, pin: bool) -> Result<proto::PinResponse, Error> {
    let mut client = connect(socket).await?;
    let request = proto::PinRequest { reference };
    let response = if pin {
        client.pin(request).await?
    } else {
        client.unpin(request).await?
    };
    Ok(response.into_inner())
}

/// `Gc` over the socket.
pub async fn gc(socket: &Path) -> Result<proto::GcResponse, Error> {
    let mut client = connect(socket).await?;
    Ok(client.gc(proto::GcRequest {}).await?.into_inner())
}

/// `Usage` over the socket.
pub async fn usage(socket: &Path) -> Result<proto::UsageResponse, Error> {
    let mut client = connect(socket).await?;
    Ok(client.usage(proto::UsageRequest {}).await?.into_inner())
}

/// `Verify` over the socket.
pub async fn verify(socket: &Path, repair: bool) -> Result<proto::VerifyResponse, Error> {
    let mut client = connect(socket).await?;
    Ok(client
        .verify(proto::VerifyRequest { repair })
        .await?
        .into_inner())
}

/// `ReadModule` over the socket: the module's bytes, checked against `digest`.
pub async fn read_module(socket: &Path, digest: &Digest) -> Result<Vec<u8>, Error> {
    let mut client = connect(socket).await?;
    let mut chunks = client
        .read_module(proto::ReadModuleRequest {
            digest: digest.to_string(),
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        bytes.extend_from_slice(&chunk.data);
    }
    checked(bytes, digest).ok_or_else(|| {
        Error::Malformed(format!(
            "the module read as {digest} hashes to another digest"
        ))
    })
}

/// A manifest or config the daemon keeps as published, by digest; `None` when it keeps
/// none (image packagings keep only their module). Read through the OCI view's blob route,
/// which answers kept documents of `reference`'s registry without asking the registry, and
/// checked against `digest`.
pub async fn kept_document(
    socket: &Path,
    reference: &Reference,
    digest: &Digest,
) -> Result<Option<Vec<u8>>, Error> {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let path = format!(
        "/v2/{}/blobs/{digest}?ns={}",
        reference.repository(),
        reference.registry()
    );
    let request = http::Request::get(format!("http://localhost{path}"))
        .body(tonic::body::Body::empty())
        .map_err(|error| Error::Malformed(format!("{path}: {error}")))?;
    let response = channel(socket)
        .await?
        .oneshot(request)
        .await
        .map_err(|source| Error::Request {
            path: path.clone(),
            source,
        })?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    match status {
        http::StatusCode::OK => checked(body, digest)
            .map(Some)
            .ok_or_else(|| Error::Malformed(format!("{path} answered another document"))),
        http::StatusCode::NOT_FOUND => Ok(None),
        other => Err(Error::Malformed(format!("{path} answered {other}"))),
    }
}

/// `bytes` when they hash to `digest`.
fn checked(bytes: Vec<u8>, digest: &Digest) -> Option<Vec<u8>> {
    (Digest::of(&bytes) == *digest).then_some(bytes)
}

/// Asks the daemon's standard gRPC health service about the whole daemon; `true` when it is
/// serving (the store is open and it is ready), `false` while it starts or stops.
pub async fn health(socket: &Path) -> Result<bool, Error> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let mut client = HealthClient::new(channel(socket).await?);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    Ok(response.status() == ServingStatus::Serving)
}

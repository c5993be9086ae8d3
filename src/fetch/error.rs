//! Why a fetch failed: one error type for the whole pipeline, every variant naming the
//! reference, and the classification the API's status table and the stale-answer policy read
//! (`is_transient`, `is_disk_full`).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::format::{self, Descriptor};
use crate::registry;
use crate::store;

/// Why a pull failed. Every variant names the reference.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry failed or refused.
    #[error("pulling {reference}")]
    Registry {
        /// The reference.
        reference: String,
        /// What the registry did.
        #[source]
        source: registry::Error,
    },
    /// The manifest is not a packaging we can read.
    #[error("pulling {reference}")]
    Format {
        /// The reference.
        reference: String,
        /// What is wrong with the manifest.
        #[source]
        source: format::Error,
    },
    /// An index entry leads to another index.
    #[error("pulling {reference}: image index entry {digest} is itself an index")]
    NestedIndex {
        /// The reference.
        reference: String,
        /// The entry.
        digest: String,
    },
    /// The module is over `max_module_bytes`.
    #[error(
        "pulling {reference}: module is over the limit of {limit} bytes (at least {size} bytes)"
    )]
    ModuleTooLarge {
        /// The reference.
        reference: String,
        /// Its size, or a lower bound when the download was stopped.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A tar layer has more entries than `max_tar_entries`.
    #[error("pulling {reference}: layer {layer} has more than {limit} entries")]
    TooManyTarEntries {
        /// The reference.
        reference: String,
        /// The layer digest.
        layer: String,
        /// The limit.
        limit: usize,
    },
    /// A tar layer decompresses past `max_layer_bytes` (a gzip bomb, or a huge image).
    #[error("pulling {reference}: layer {layer} decompresses to more than {limit} bytes")]
    LayerTooLarge {
        /// The reference.
        reference: String,
        /// The layer digest.
        layer: String,
        /// The limit.
        limit: u64,
    },
    /// A blob's length differs from its descriptor.
    #[error("pulling {reference}: blob {digest} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The reference.
        reference: String,
        /// The blob.
        digest: String,
        /// Size in the descriptor.
        expected: u64,
        /// Bytes received (at least).
        actual: u64,
    },
    /// Content does not hash to its digest.
    #[error("pulling {reference}: {what} {expected}: content hashed to {actual}")]
    DigestMismatch {
        /// The reference.
        reference: String,
        /// `blob` or `manifest`.
        what: &'static str,
        /// The digest announced.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// The module is not the one the caller expected (`expected_sha256`).
    #[error("pulling {reference}: expected sha256 {expected}, but the module is {module} (the reference resolved to {resolved}); nothing was recorded under the reference")]
    UnexpectedDigest {
        /// The reference.
        reference: String,
        /// The digest the caller expected.
        expected: String,
        /// The module's digest.
        module: String,
        /// The digest the reference resolved to.
        resolved: String,
    },
    /// `require_proxy_wasm` is set and the module exports no proxy-wasm ABI.
    #[error("pulling {reference}: module {digest} exports no proxy-wasm ABI (no proxy_abi_version_* export), which require_proxy_wasm refuses")]
    NotProxyWasm {
        /// The reference.
        reference: String,
        /// The module's digest.
        digest: String,
    },
    /// No layer holds a module.
    #[error("pulling {reference}: no plugin.wasm or single *.wasm file in layers [{layers}]; files seen: [{files}]")]
    NoModule {
        /// The reference.
        reference: String,
        /// Layers searched.
        layers: String,
        /// Regular files seen in them (first few).
        files: String,
    },
    /// Several `*.wasm` files and no `plugin.wasm`.
    #[error("pulling {reference}: layer {layer} holds several *.wasm files [{files}] and no plugin.wasm")]
    AmbiguousModule {
        /// The reference.
        reference: String,
        /// The layer.
        layer: String,
        /// The candidates.
        files: String,
    },
    /// The bytes are not WebAssembly.
    #[error("pulling {reference}: module {digest} is not WebAssembly: {reason}")]
    NotWasm {
        /// The reference.
        reference: String,
        /// The module digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },
    /// A tar or gzip layer is corrupt.
    #[error("pulling {reference}: reading layer {layer}")]
    Layer {
        /// The reference.
        reference: String,
        /// The layer.
        layer: String,
        /// The decoding error.
        #[source]
        source: io::Error,
    },
    /// The store failed (disk full, permissions, index).
    #[error("pulling {reference}")]
    Store {
        /// The reference.
        reference: String,
        /// The store error.
        #[source]
        source: store::Error,
    },
    /// The registry policy does not allow the reference's registry.
    #[error("{reference}: registry {registry} is not allowed by this node's registry policy")]
    Denied {
        /// The reference.
        reference: String,
        /// Its registry.
        registry: String,
    },
    /// A signature policy in `enforce` mode covers the reference and no signature verified.
    #[error("{reference}: refused by signature policy '{scope}': {refusal}")]
    Unsigned {
        /// The reference.
        reference: String,
        /// The policy's scope.
        scope: String,
        /// Why no signature counted.
        refusal: crate::signature::Refusal,
    },
    /// Pull policy `NEVER` and the reference is not cached.
    #[error("{reference} is not cached and the pull policy is NEVER")]
    NotCached {
        /// The reference.
        reference: String,
    },
    /// The task doing the work died (a bug); callers may retry.
    #[error("pulling {reference}: the download task failed unexpectedly")]
    TaskFailed {
        /// The reference.
        reference: String,
    },
    /// The registry did not finish answering within `fetch_timeout`.
    #[error("pulling {reference}: registry {registry} gave no complete answer within the fetch timeout of {timeout:?}")]
    Timeout {
        /// The reference.
        reference: String,
        /// Its registry.
        registry: String,
        /// The `fetch_timeout` that ran out.
        timeout: Duration,
    },
    /// The caller's own deadline (gRPC's `grpc-timeout`) passed first; the shared work goes
    /// on for other callers.
    #[error("fetching {reference}: the caller's deadline of {deadline:?} passed before the fetch finished")]
    CallerDeadline {
        /// The reference.
        reference: String,
        /// The deadline the caller gave.
        deadline: Duration,
    },
    /// The error of a run shared with other callers.
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl Error {
    /// The error itself, looking through [`Error::Shared`].
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }

    pub(super) fn from_shared(error: Arc<Error>) -> Error {
        Arc::try_unwrap(error).unwrap_or_else(Error::Shared)
    }

    /// Whether the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self.root() {
            Error::Store { source, .. } => source.is_disk_full(),
            _ => false,
        }
    }

    /// Whether the registry was unreachable, too slow or failed on its side, so that a
    /// previously resolved answer may be served instead.
    pub fn is_transient(&self) -> bool {
        match self.root() {
            Error::Registry { source, .. } => source.is_transient(),
            Error::Timeout { .. } => true,
            _ => false,
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

pub(super) fn registry_error(name: &str, source: registry::Error) -> Error {
    Error::Registry {
        reference: name.to_owned(),
        source,
    }
}

/// Whether `error` is the registry (or a peer) saying the thing asked for does not exist.
pub(super) fn is_not_found(error: &Error) -> bool {
    matches!(
        error.root(),
        Error::Registry {
            source: registry::Error::NotFound { .. },
            ..
        }
    )
}

/// Classifies an error from the middle of a blob stream.
pub(super) fn stream_error(
    name: &str,
    layer: &Descriptor,
    received: u64,
    error: io::Error,
    registry: &str,
) -> Error {
    if received > layer.size {
        return Error::SizeMismatch {
            reference: name.to_owned(),
            digest: layer.digest.clone(),
            expected: layer.size,
            actual: received,
        };
    }
    let inner = error.into_inner();
    if let Some(inner) = &inner {
        if let Some(registry::BlobMismatch { actual, .. }) =
            inner.downcast_ref::<registry::BlobMismatch>()
        {
            return Error::DigestMismatch {
                reference: name.to_owned(),
                what: "blob",
                expected: layer.digest.clone(),
                actual: actual.clone(),
            };
        }
    }
    let message = inner.map_or_else(|| "stream ended".to_owned(), |e| e.to_string());
    Error::Registry {
        reference: name.to_owned(),
        source: registry::Error::Protocol {
            registry: registry.to_owned(),
            message: format!(
                "blob {} broke off after {received} of {} bytes: {message}",
                layer.digest, layer.size
            ),
        },
    }
}

//! What went wrong talking to a registry, and turning the token flow's errors into it: every
//! error names the registry and what was asked for.

use super::{address, auth, token};

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest, tag, repository or blob does not exist.
    #[error("registry {registry}: {what} not found")]
    NotFound {
        /// The registry.
        registry: String,
        /// What was looked for.
        what: String,
    },
    /// The registry wants credentials, or refused the ones given.
    #[error("registry {registry}: authentication required or credentials rejected")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The `WWW-Authenticate` header of the 401, if any.
        challenge: Option<String>,
    },
    /// The registry refused access with the credentials given.
    #[error("registry {registry}: access to {what} denied")]
    Forbidden {
        /// The registry.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// No connection could be made.
    #[error("registry {registry} is unreachable")]
    Unreachable {
        /// The registry.
        registry: String,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The registry did not answer in time.
    #[error("registry {registry} timed out")]
    Timeout {
        /// The registry.
        registry: String,
    },
    /// Any other unexpected status.
    #[error("registry {registry} returned {status} for {url}: {message}")]
    Status {
        /// The registry.
        registry: String,
        /// HTTP status code.
        status: u16,
        /// The URL requested.
        url: String,
        /// The body or error text, shortened.
        message: String,
    },
    /// A manifest's content does not match its digest.
    #[error("registry {registry}: manifest {expected} hashed to {actual}")]
    DigestMismatch {
        /// The registry.
        registry: String,
        /// The digest asked for or announced.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A document is larger than the configured limit.
    #[error("registry {registry}: {what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// The registry.
        registry: String,
        /// The document.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The registry answered something that breaks the distribution spec.
    #[error("registry {registry}: {message}")]
    Protocol {
        /// The registry.
        registry: String,
        /// What was wrong.
        message: String,
    },
    /// The registry's token realm is refused (see [`token`]).
    #[error("registry {registry}: {source}")]
    RealmRefused {
        /// The registry.
        registry: String,
        /// The realm and why.
        #[source]
        source: token::Error,
    },
    /// A plain `http://` module URL for a host not in `insecure_registries`.
    #[error("{registry}: plain http:// is allowed only for hosts in insecure_registries")]
    PlainHttpRefused {
        /// The URL's host.
        registry: String,
    },
    /// A registry, mirror or token realm is on an address in `blocked_cidrs` (see
    /// [`address`]); nothing was sent to it.
    #[error("registry {registry}: {url} refused")]
    Blocked {
        /// The registry (or mirror).
        registry: String,
        /// What was to be asked.
        url: String,
        /// The address and the `blocked_cidrs` entry covering it.
        #[source]
        source: address::Blocked,
    },
    /// A redirect was not followed (too many, down to plain HTTP, to a blocked address or
    /// to a host the node's registry policy refuses).
    #[error("registry {registry}: {reason}")]
    Redirect {
        /// The registry (or mirror, or module URL's host).
        registry: String,
        /// Why it was not followed.
        reason: String,
    },
    /// No room was left for a document in `limits.max_manifest_bytes_in_flight`: many
    /// large documents are being read at once.
    #[error("registry {registry}: {what} not read")]
    Busy {
        /// The registry.
        registry: String,
        /// The document.
        what: String,
        /// The budget.
        #[source]
        source: super::budget::NoRoom,
    },
    /// The credentials file could not be used.
    #[error(transparent)]
    Credentials(#[from] auth::Error),
    /// An entry of `blocked_cidrs` is not a CIDR.
    #[error(transparent)]
    AddressPolicy(#[from] address::InvalidCidr),
    /// The CA file could not be read.
    #[error("CA file {path}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The HTTP status the registry answered with, when it answered.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            Error::NotFound { .. } => Some(404),
            Error::Unauthorized { .. } => Some(401),
            Error::Forbidden { .. } => Some(403),
            Error::Status { status, .. } => Some(*status),
            Error::DigestMismatch { .. } | Error::TooLarge { .. } => Some(200),
            _ => None,
        }
    }

    /// Whether the registry could not be reached or failed on its side (5xx, timeout), as
    /// opposed to answering that something is wrong with the request.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Turns a token-flow error into one that names the registry.
pub(super) fn token_error(error: token::Error, registry: &str) -> Error {
    let registry = registry.to_owned();
    match error {
        token::Error::Refused { .. } => Error::RealmRefused {
            registry,
            source: error,
        },
        token::Error::Blocked { url, source } => Error::Blocked {
            registry,
            url,
            source,
        },
        token::Error::Denied { status: 401, .. } => Error::Unauthorized {
            registry,
            challenge: None,
        },
        token::Error::Denied {
            status: 403,
            ref realm,
        } => Error::Forbidden {
            what: format!("a token from {realm}"),
            registry,
        },
        token::Error::Denied { status, ref realm } => Error::Status {
            registry,
            status,
            url: realm.clone(),
            message: "token request failed".into(),
        },
        error if error.is_timeout() => Error::Timeout { registry },
        token::Error::Transport { source, .. } => Error::Unreachable { registry, source },
        token::Error::Malformed(message) => Error::Protocol { registry, message },
    }
}

//! The one place where errors become gRPC statuses and HTTP status codes.
//!
//! | error                                             | gRPC                | HTTP |
//! |---------------------------------------------------|---------------------|------|
//! | malformed reference or request                    | INVALID_ARGUMENT    | 400  |
//! | unknown tag/repository, not cached under NEVER    | NOT_FOUND           | 404  |
//! | registry 401 / 403                                | UNAUTHENTICATED / PERMISSION_DENIED | 401 / 403 |
//! | token realm refused, address in `blocked_cidrs`   | PERMISSION_DENIED   | 403  |
//! | redirect refused (hops, HTTPS→HTTP, policy)       | PERMISSION_DENIED   | 403  |
//! | plain http:// to a host not in insecure_registries | PERMISSION_DENIED  | 403  |
//! | digest or size mismatch, not the expected sha256  | DATA_LOSS           | 502  |
//! | no Wasm in the image, unsupported media type      | FAILED_PRECONDITION | 409  |
//! | over a size limit, disk full                      | RESOURCE_EXHAUSTED  | 413  |
//! | registry unreachable / failing, nothing cached    | UNAVAILABLE         | 502  |
//! | registry silent past `fetch_timeout`, nothing cached | UNAVAILABLE       | 502  |
//! | the caller's own deadline (`grpc-timeout`) passed | DEADLINE_EXCEEDED   | 502  |
//! | shutting down                                     | UNAVAILABLE         | 503  |
//!
//! The message is the error's chain (`a: b: c`), told as [`client_message`] tells it: what a
//! client learns of the daemon's surroundings is the registry and what failed, never the
//! transport's own words (which would tell a closed port from one that does not speak TLS)
//! nor a path on the host; the daemon's log has those.
//!
//! A fetch past `fetch_timeout` is the registry failing, like a refused connection: the
//! daemon's own budget for the upstream ran out and a retry may succeed, so UNAVAILABLE.
//! DEADLINE_EXCEEDED is kept for the one deadline that is the caller's.

use tonic::{Code, Status};

use crate::fetch::{self, error_chain};
use crate::{registry, store};

/// The longest message a client is sent, in characters.
const MAX_MESSAGE_CHARS: usize = 1024;

/// The gRPC code for a fetch error.
pub fn code(error: &fetch::Error) -> Code {
    use fetch::Error as E;
    match error.root() {
        E::Registry { source, .. } => match source {
            registry::Error::NotFound { .. } => Code::NotFound,
            registry::Error::Unauthorized { .. } => Code::Unauthenticated,
            registry::Error::Forbidden { .. }
            | registry::Error::RealmRefused { .. }
            | registry::Error::PlainHttpRefused { .. }
            | registry::Error::Redirect { .. }
            | registry::Error::Blocked { .. } => Code::PermissionDenied,
            registry::Error::Unreachable { .. }
            | registry::Error::Timeout { .. }
            | registry::Error::Protocol { .. } => Code::Unavailable,
            registry::Error::Status { status, .. } if *status >= 500 || *status == 429 => {
                Code::Unavailable
            }
            registry::Error::Status { .. } => Code::FailedPrecondition,
            registry::Error::DigestMismatch { .. } => Code::DataLoss,
            registry::Error::TooLarge { .. } | registry::Error::Busy { .. } => {
                Code::ResourceExhausted
            }
            registry::Error::Credentials(_)
            | registry::Error::CaFile { .. }
            | registry::Error::AddressPolicy(_) => Code::Internal,
        },
        E::Format {
            source: crate::format::Error::TooManyEntries { .. },
            ..
        } => Code::ResourceExhausted,
        E::Format { .. }
        | E::NestedIndex { .. }
        | E::NoModule { .. }
        | E::AmbiguousModule { .. }
        | E::NotWasm { .. }
        | E::NotProxyWasm { .. }
        | E::Layer { .. } => Code::FailedPrecondition,
        E::ModuleTooLarge { .. } | E::LayerTooLarge { .. } | E::TooManyTarEntries { .. } => {
            Code::ResourceExhausted
        }
        E::SizeMismatch { .. } | E::DigestMismatch { .. } | E::UnexpectedDigest { .. } => {
            Code::DataLoss
        }
        E::Store { source, .. } if source.is_disk_full() => Code::ResourceExhausted,
        E::Store { .. } | E::TaskFailed { .. } => Code::Internal,
        E::NotCached { .. } => Code::NotFound,
        E::Timeout { .. } => Code::Unavailable,
        E::CallerDeadline { .. } => Code::DeadlineExceeded,
        E::Denied { .. } | E::Unsigned { .. } => Code::PermissionDenied,
        E::Shared(_) => unreachable!("root() looks through shared errors"),
    }
}

/// The gRPC status for a fetch error: its code and its chain as [`client_message`] tells it.
pub fn status(error: &fetch::Error) -> Status {
    Status::new(code(error), client_message(error))
}

/// An error and its sources on one line, as a client of the daemon is told: like
/// [`error_chain`], except that the chain ends
/// - at a registry that could not be reached, without the transport's cause (refused, reset,
///   not TLS, a certificate that did not verify: telling them apart maps the ports behind the
///   address a caller named);
/// - at a store error, without the file or directory on the host;
///
/// and that it is cut at [`MAX_MESSAGE_CHARS`] with control characters replaced. What was
/// left out is logged, with the whole chain, at warn level.
pub fn client_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut withheld = false;
    let mut next = Some(error);
    while let Some(current) = next {
        let (part, last) = told(current);
        withheld |= last && current.source().is_some();
        if !text.ends_with(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        if last {
            break;
        }
        next = current.source();
    }
    if withheld {
        tracing::warn!(error = %error_chain(error), "request failed");
    }
    let mut told: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if text.chars().count() > MAX_MESSAGE_CHARS {
        told.push('…');
    }
    told
}

/// How one error of a chain is told to a client, and whether the chain ends with it.
fn told(error: &(dyn std::error::Error + 'static)) -> (String, bool) {
    if let Some(registry::Error::Unreachable { registry, .. }) = error.downcast_ref() {
        return (
            format!(
                "registry {registry} is unreachable (no connection or TLS session could be \
                 made; the daemon's log has the cause)"
            ),
            true,
        );
    }
    if let Some(error) = error.downcast_ref::<store::Error>() {
        return (store_message(error), true);
    }
    if let Some(inner) = error
        .downcast_ref::<std::io::Error>()
        .and_then(|e| e.get_ref())
        .and_then(|inner| inner.downcast_ref::<store::Error>())
    {
        return (store_message(inner), true);
    }
    (error.to_string(), false)
}

/// A store error without the path it names.
fn store_message(error: &store::Error) -> String {
    match error {
        // The OS error's kind alone: its text may carry the path (tempfile's does).
        store::Error::Io { action, source, .. } => {
            format!(
                "cache: {action} failed in the data directory: {}",
                source.kind()
            )
        }
        store::Error::Index { .. } => "cache index failed (the daemon's log has why)".to_owned(),
        store::Error::Locked { .. } => "cache index is in use by another process".to_owned(),
        other => other.to_string(),
    }
}

/// The gRPC status for a store error met outside a fetch (stat, list, remove).
pub fn store_status(error: &crate::store::Error) -> Status {
    let code = if error.is_disk_full() {
        Code::ResourceExhausted
    } else if matches!(error, crate::store::Error::Pinned { .. }) {
        Code::FailedPrecondition
    } else {
        Code::Internal
    };
    Status::new(code, client_message(error))
}

/// The HTTP status matching a gRPC code.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 413,
        Code::DataLoss | Code::Unavailable | Code::DeadlineExceeded => 502,
        Code::Cancelled | Code::Unknown | Code::Unimplemented | Code::Internal => 500,
    }
}

/// The gRPC code's canonical upper-case name (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

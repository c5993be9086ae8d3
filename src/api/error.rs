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
//! A fetch past `fetch_timeout` is the registry failing, like a refused connection: the
//! daemon's own budget for the upstream ran out and a retry may succeed, so UNAVAILABLE.
//! DEADLINE_EXCEEDED is kept for the one deadline that is the caller's.

use tonic::{Code, Status};

use crate::fetch::{self, error_chain};
use crate::registry;

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
            registry::Error::TooLarge { .. } => Code::ResourceExhausted,
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

/// The gRPC status for a fetch error: its code and the whole error chain as message.
pub fn status(error: &fetch::Error) -> Status {
    Status::new(code(error), error_chain(error))
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
    Status::new(code, error_chain(error))
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

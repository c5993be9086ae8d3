//! wasmcache: a node-local, content-addressed cache for WebAssembly modules stored in OCI
//! registries.
//!
//! A module is pulled once per node, by digest, verified, and stored under the sha256 of its
//! bytes; every tag, repository and registry that names the same bytes shares one file.
//!
//! The main parts:
//! - [`reference`] parses `[oci://]registry/repository[:tag][@digest]`;
//! - [`registry`] talks to OCI registries (credentials, TLS, errors that name the registry);
//! - [`format`] recognises the four packagings of a Wasm module from its manifest;
//! - [`store`] owns the cache directory: blob files and the sled index;
//! - [`fetch`] is the pull pipeline from a reference to a verified file in the store;
//! - [`push`] checks a module file, packages it (CNCF or wasme) and writes it to a registry;
//! - [`api`] serves gRPC and HTTP on the unix socket and TCP listeners;
//! - [`config`] holds every tunable with its default;
//! - [`wasm`] reads what a module's bytes say: core module or component, imports, exports and
//!   the proxy-wasm ABI versions it speaks;
//! - [`wasmplugin`] renders the Istio `WasmPlugin` that loads a module as the daemon holds it;
//! - [`error`] holds what every error type shares (`error_chain`); a leaf.
//!
//! See `ARCHITECTURE.md` for how a fetch flows through them.

pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod format;
pub mod metrics;
pub mod peers;
pub mod prefetch;
pub mod push;
pub mod reference;
pub mod registry;
pub mod signature;
pub mod store;
pub mod wasm;
pub mod wasmplugin;
pub mod watch;

pub use config::Config;
pub use digest::Digest;
pub use fetch::{Fetched, Fetcher};
pub use reference::Reference;
pub use store::Store;

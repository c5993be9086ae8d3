//! The integration tests: one binary (so the crate is linked once), with shared helpers in
//! `common/` and one module per area. They run the real `wasmcache` binary against a real
//! registry and third-party clients; see `common/mod.rs`.

mod cache;
mod common;
mod crash;
mod daemon;
mod deploy;
mod examples;
mod fetch;
mod hostile;
mod http;
mod inspect;
mod kubernetes;
mod limits;
mod peers;
mod prefetch;
mod pull;
mod push;
mod requests;
mod security;
mod serving;
mod signatures;
mod sources;
mod tokens;

//! The `[peers]` table: which daemons this one fetches through, and how long it waits for them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, Error};

/// How often the peers' DNS name is resolved again.
pub const DEFAULT_PEER_REFRESH: Duration = Duration::from_secs(10);
/// Time a peer has to accept a connection.
pub const DEFAULT_PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Time a peer has to send the first byte of its answer (its own registry fetch included).
pub const DEFAULT_PEER_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a peer that failed to connect or answer is skipped.
pub const DEFAULT_PEER_BACKOFF: Duration = Duration::from_secs(10);

/// Peers: other daemons of the cluster that own references and layers by rendezvous hashing.
/// Off while neither `static` nor `dns` names one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Peer addresses (`host:port`, the peers' HTTP or peer listener).
    #[serde(rename = "static")]
    pub static_peers: Vec<String>,
    /// A DNS name and port (`name:port`) whose A/AAAA records are the peers (the headless
    /// Service of the DaemonSet), resolved again every `refresh`.
    pub dns: Option<String>,
    /// How often `dns` is resolved again.
    #[serde(with = "duration")]
    pub refresh: Duration,
    /// A TCP listener for peer requests only; when set, requests marked as a peer's are
    /// answered there and refused elsewhere.
    pub listen: Option<std::net::SocketAddr>,
    /// This daemon's own peer address, as the others list it (default: `$POD_IP` with the
    /// port of `listen`, else of `http_listen`). A daemon never asks itself.
    pub self_address: Option<String>,
    /// File holding the token peers present (`X-Wasmcache-Peer-Token`); re-read when changed.
    pub token_file: Option<PathBuf>,
    /// Time a peer has to accept a connection.
    #[serde(with = "duration")]
    pub peer_connect_timeout: Duration,
    /// Time a peer has to send the first byte of its answer.
    #[serde(with = "duration")]
    pub peer_first_byte_timeout: Duration,
    /// How long a peer that did not connect or answer in time is skipped.
    #[serde(with = "duration")]
    pub peer_backoff: Duration,
}

impl Default for PeersConfig {
    fn default() -> Self {
        PeersConfig {
            static_peers: Vec::new(),
            dns: None,
            refresh: DEFAULT_PEER_REFRESH,
            listen: None,
            self_address: None,
            token_file: None,
            peer_connect_timeout: DEFAULT_PEER_CONNECT_TIMEOUT,
            peer_first_byte_timeout: DEFAULT_PEER_FIRST_BYTE_TIMEOUT,
            peer_backoff: DEFAULT_PEER_BACKOFF,
        }
    }
}

impl PeersConfig {
    /// Whether any peer is configured.
    pub fn enabled(&self) -> bool {
        !self.static_peers.is_empty() || self.dns.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), Error> {
        let invalid = |field, value: String, reason| {
            Err(Error::Invalid {
                field,
                value,
                reason,
            })
        };
        let addresses = self.static_peers.iter().map(|a| ("peers.static", a));
        let dns = self.dns.iter().map(|a| ("peers.dns", a));
        let own = self.self_address.iter().map(|a| ("peers.self_address", a));
        for (field, address) in addresses.chain(dns).chain(own) {
            if !is_host_port(address) {
                return invalid(field, address.clone(), "expected 'host:port'");
            }
        }
        for (field, value) in [
            ("peers.refresh", self.refresh),
            ("peers.peer_connect_timeout", self.peer_connect_timeout),
            (
                "peers.peer_first_byte_timeout",
                self.peer_first_byte_timeout,
            ),
        ] {
            if value.is_zero() {
                return invalid(field, "0s".into(), "must be greater than zero");
            }
        }
        if self.enabled() && self.self_address.is_none() {
            return invalid(
                "peers.self_address",
                String::new(),
                "needed with peers: set it, --peer-self, or POD_IP with a TCP listener",
            );
        }
        Ok(())
    }
}

/// `host:port` with a port number and a host without a path (IPv6 in brackets).
fn is_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains('/')
                && port.parse::<u16>().is_ok_and(|port| port > 0)
                && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::is_host_port;

    #[test]
    fn peer_addresses() {
        assert!(is_host_port("10.0.0.5:9978"));
        assert!(is_host_port("[fd00::1]:9978"));
        assert!(is_host_port(
            "wasmcache-peers.wasmcache.svc.cluster.local:9978"
        ));
        assert!(!is_host_port("10.0.0.5"));
        assert!(!is_host_port("fd00::1:9978"));
        assert!(!is_host_port("http://x:1"));
        assert!(!is_host_port("x:0"));
    }
}

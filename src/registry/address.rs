//! Which addresses outbound requests may connect to: the `blocked_cidrs` policy.
//!
//! A registry chooses its token realm and its redirects, a mirror or peer is named in the
//! configuration, and any of them may be a name that resolves anywhere. Cloud instance
//! metadata services answer on addresses every node can reach (`169.254.169.254`,
//! `fd00:ec2::254`, `100.100.100.200`) and hand out the node's credentials, so the address
//! actually connected to is checked, after DNS, against `blocked_cidrs` (by default the
//! link-local ranges and the metadata addresses outside them, as Istio's
//! `BLOCKED_CIDRS_IN_WASM_FETCH`):
//!
//! - a name is resolved by [`AddressPolicy`] itself (it is the HTTP clients' resolver), which
//!   drops blocked addresses and fails with [`Blocked`] when none is left, so a name re-bound
//!   between a check and the request gains nothing;
//! - an address literal in a URL is never resolved, so callers check it with
//!   [`AddressPolicy::check_url`] before the request, and the redirect policy checks it before
//!   each hop;
//! - an IPv4-mapped IPv6 address (`::ffff:169.254.169.254`) is checked as the IPv4 address
//!   it stands for.
//!
//! A refusal is a [`Blocked`] error somewhere in the client's error chain;
//! [`blocked_cause`] finds it, and the callers report it as `PERMISSION_DENIED`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ipnet::IpNet;
use reqwest::Url;

pub use crate::config::DEFAULT_BLOCKED_CIDRS;

/// Most redirects a request follows under [`AddressPolicy::redirect_policy`].
pub const MAX_REDIRECTS: usize = 5;

/// The configured `blocked_cidrs`; cheap to clone.
#[derive(Clone, Debug)]
pub struct AddressPolicy {
    blocked: Arc<[IpNet]>,
}

/// A connection refused because its address is in `blocked_cidrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{address} is in blocked_cidrs ({cidr})")]
pub struct Blocked {
    /// The address that would have been connected to.
    pub address: IpAddr,
    /// The entry of `blocked_cidrs` that covers it.
    pub cidr: IpNet,
}

/// An entry of `blocked_cidrs` that is neither a CIDR nor an address.
#[derive(Debug, thiserror::Error)]
#[error("blocked_cidrs entry '{entry}' is not a CIDR (169.254.0.0/16, fe80::/10) or an address")]
pub struct InvalidCidr {
    /// The entry, as configured.
    pub entry: String,
}

impl AddressPolicy {
    /// The policy for the configured `blocked_cidrs`: CIDRs, or addresses (one-address
    /// ranges). An empty list blocks nothing.
    pub fn new(cidrs: &[String]) -> Result<AddressPolicy, InvalidCidr> {
        let blocked = cidrs
            .iter()
            .map(|entry| parse_cidr(entry))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AddressPolicy {
            blocked: blocked.into(),
        })
    }

    /// The policy of [`DEFAULT_BLOCKED_CIDRS`].
    pub fn default_blocked() -> AddressPolicy {
        let defaults: Vec<String> = DEFAULT_BLOCKED_CIDRS
            .iter()
            .map(|s| s.to_string())
            .collect();
        AddressPolicy::new(&defaults).expect("the default blocked_cidrs parse")
    }

    /// Whether a connection to `address` is allowed; an IPv4-mapped IPv6 address is also
    /// checked as the IPv4 address it stands for.
    pub fn check(&self, address: IpAddr) -> Result<(), Blocked> {
        let mapped = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let covering = self
            .blocked
            .iter()
            .find(|cidr| cidr.contains(&address) || mapped.is_some_and(|v4| cidr.contains(&v4)));
        match covering {
            Some(cidr) => Err(Blocked {
                address,
                cidr: *cidr,
            }),
            None => Ok(()),
        }
    }

    /// Checks a URL whose host is an address literal (the HTTP clients connect to those
    /// without asking the resolver); a URL naming a host by name passes, its addresses are
    /// checked when it is resolved.
    pub fn check_url(&self, url: &Url) -> Result<(), Blocked> {
        match url.host_str().map(|host| host.trim_matches(['[', ']'])) {
            Some(host) => match host.parse::<IpAddr>() {
                Ok(address) => self.check(address),
                Err(_) => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Resolves `host` (port 0: the client puts in the URL's) and keeps the allowed
    /// addresses; fails with [`Blocked`] (boxed as is, so [`blocked_cause`] finds it) when
    /// every address is blocked.
    pub async fn resolve_allowed(
        &self,
        host: &str,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let mut allowed = Vec::new();
        let mut refused = None;
        for address in tokio::net::lookup_host((host, 0)).await? {
            match self.check(address.ip()) {
                Ok(()) => allowed.push(address),
                Err(blocked) => refused = refused.or(Some(blocked)),
            }
        }
        match (allowed.is_empty(), refused) {
            (true, Some(blocked)) => Err(Box::new(blocked)),
            _ => Ok(allowed),
        }
    }

    /// A redirect policy: at most [`MAX_REDIRECTS`] hops, never from HTTPS down to plain
    /// HTTP, and never to a blocked address literal (names are checked by the resolver).
    pub fn redirect_policy(&self) -> reqwest::redirect::Policy {
        let policy = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            match policy.check_redirect(attempt.url(), attempt.previous()) {
                Ok(()) => attempt.follow(),
                Err(refused) => attempt.error(refused),
            }
        })
    }

    /// Whether a redirect to `next` after `previous` (which starts with the URL first asked
    /// for) may be followed; the refusal says why.
    pub fn check_redirect(&self, next: &Url, previous: &[Url]) -> Result<(), RedirectRefused> {
        if previous.len() > MAX_REDIRECTS {
            return Err(RedirectRefused(format!(
                "more than {MAX_REDIRECTS} redirects"
            )));
        }
        if next.scheme() != "https" && previous.iter().any(|url| url.scheme() == "https") {
            let host = next.host_str().unwrap_or_default();
            return Err(RedirectRefused(format!(
                "redirect from HTTPS to plain HTTP ({host}) refused"
            )));
        }
        self.check_url(next)
            .map_err(|blocked| RedirectRefused(format!("redirect refused: {blocked}")))
    }
}

/// Why a redirect was not followed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RedirectRefused(pub String);

/// The clients' resolver: names resolve to their allowed addresses only.
impl reqwest::dns::Resolve for AddressPolicy {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (policy, host) = (self.clone(), name.as_str().to_owned());
        Box::pin(async move {
            let addresses = policy.resolve_allowed(&host).await?;
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The same resolver for hyper-util's `HttpConnector` (the plain-HTTP challenge probe).
impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for AddressPolicy {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let (policy, host) = (self.clone(), name.as_str().to_owned());
        Box::pin(async move { Ok(policy.resolve_allowed(&host).await?.into_iter()) })
    }
}

/// The [`Blocked`] refusal behind `error`, if any: `error` itself or one of its sources
/// (looking inside `io::Error`s, whose `source` skips the error they wrap).
pub fn blocked_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Blocked> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(blocked) = error.downcast_ref::<Blocked>() {
            return Some(blocked);
        }
        let wrapped = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if let Some(blocked) = wrapped.and_then(|inner| blocked_cause(inner)) {
            return Some(blocked);
        }
        current = error.source();
    }
    None
}

/// One `blocked_cidrs` entry: a CIDR, or an address standing for itself alone.
pub fn parse_cidr(entry: &str) -> Result<IpNet, InvalidCidr> {
    entry
        .parse::<IpNet>()
        .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| InvalidCidr {
            entry: entry.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(cidrs: &[&str]) -> AddressPolicy {
        let cidrs: Vec<String> = cidrs.iter().map(|s| s.to_string()).collect();
        AddressPolicy::new(&cidrs).unwrap()
    }

    fn blocked(policy: &AddressPolicy, address: &str) -> bool {
        policy.check(address.parse().unwrap()).is_err()
    }

    #[test]
    fn entries_parse_as_cidrs_or_addresses() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("100.100.100.200").unwrap(),
            "100.100.100.200/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("fd00:ec2::254").unwrap(),
            "fd00:ec2::254/128".parse::<IpNet>().unwrap()
        );
        for bad in [
            "",
            "169.254.0.0/33",
            "fe80::/129",
            "metadata.internal",
            "10.0.0/8",
        ] {
            let error = AddressPolicy::new(&["10.0.0.0/8".into(), bad.into()])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("'{bad}'")) && error.contains("blocked_cidrs"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_default_list_blocks_link_local_and_metadata_addresses() {
        let defaults = AddressPolicy::default_blocked();
        for address in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.0.1",
            "fe80::1",
            "febf::1",
            "100.100.100.200",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "::ffff:169.254.169.254",
            "::ffff:100.100.100.200",
        ] {
            assert!(blocked(&defaults, address), "{address}");
        }
        for address in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "100.100.100.199",
            "8.8.8.8",
            "::1",
            "fd00::1",
            "fd12:3456::1",
            "fec0::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!blocked(&defaults, address), "{address}");
        }
    }

    #[test]
    fn refusals_name_the_address_the_key_and_the_entry() {
        let defaults = AddressPolicy::default_blocked();
        let refusal = defaults
            .check("169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "169.254.169.254 is in blocked_cidrs (169.254.0.0/16)"
        );
        let mapped = defaults
            .check("::ffff:169.254.169.254".parse().unwrap())
            .unwrap_err();
        assert_eq!(mapped.cidr, "169.254.0.0/16".parse::<IpNet>().unwrap());
        // Found again through a chain of sources, and inside an `io::Error`.
        #[derive(Debug, thiserror::Error)]
        #[error("token realm refused")]
        struct Outer(#[source] Blocked);
        assert_eq!(blocked_cause(&Outer(refusal)), Some(&refusal));
        let wrapped = std::io::Error::other(Outer(refusal));
        assert_eq!(blocked_cause(&wrapped), Some(&refusal));
        assert_eq!(blocked_cause(&std::io::Error::other("refused")), None);
    }

    #[test]
    fn an_empty_list_blocks_nothing_and_v6_ranges_cover_mapped_forms() {
        let open = policy(&[]);
        assert!(!blocked(&open, "169.254.169.254"));
        let mapped_range = policy(&["::ffff:0:0/96"]);
        assert!(blocked(&mapped_range, "::ffff:10.0.0.1"));
        assert!(!blocked(&mapped_range, "10.0.0.1"));
    }

    #[test]
    fn only_address_literals_are_checked_in_urls() {
        let defaults = AddressPolicy::default_blocked();
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "https://[fe80::1]:5000/v2/",
            "http://[::ffff:169.254.169.254]/",
            "http://2852039166/",
        ] {
            let url = Url::parse(url).unwrap();
            assert!(defaults.check_url(&url).is_err(), "{url}");
        }
        for url in ["https://ghcr.io/v2/", "http://127.0.0.1:5000/v2/"] {
            let url = Url::parse(url).unwrap();
            assert!(defaults.check_url(&url).is_ok(), "{url}");
        }
    }

    #[tokio::test]
    async fn the_resolver_keeps_allowed_addresses_and_refuses_when_none_is_left() {
        use reqwest::dns::Resolve;
        let defaults = AddressPolicy::default_blocked();
        let refused = defaults
            .resolve("169.254.169.254".parse().unwrap())
            .await
            .err()
            .expect("a metadata address resolves to nothing");
        let refusal = blocked_cause(&*refused).expect("the refusal is a Blocked");
        assert_eq!(
            refusal.address,
            "169.254.169.254".parse::<IpAddr>().unwrap()
        );

        // `localhost` (resolved from the hosts file, never by asking a DNS server) is
        // allowed by default and refused by a policy that blocks loopback.
        let found: Vec<SocketAddr> = defaults
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(found.iter().any(|a| a.ip().is_loopback()), "{found:?}");
        let no_loopback = policy(&["127.0.0.0/8", "::1/128"]);
        let refused = no_loopback
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost resolves to loopback only");
        let refusal = blocked_cause(&*refused).expect("the refusal is a Blocked");
        assert!(refusal.address.is_loopback(), "{refusal}");
    }

    /// A listener on 127.0.0.1 that counts the connections it accepts.
    async fn counting_listener() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        (address, accepted)
    }

    #[tokio::test]
    async fn a_client_with_the_policy_never_connects_to_a_blocked_address() {
        crate::registry::install_crypto_provider();
        let (listener, accepted) = counting_listener().await;
        let no_loopback = policy(&["169.254.0.0/16", "127.0.0.0/8", "::1/128"]);
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(no_loopback.clone())
            .redirect(no_loopback.redirect_policy())
            .build()
            .unwrap();

        // A literal: refused before the request is sent (nothing leaves the machine).
        let url = Url::parse("http://169.254.169.254/latest/meta-data").unwrap();
        let refusal = no_loopback.check_url(&url).unwrap_err();
        assert_eq!(
            refusal.address,
            "169.254.169.254".parse::<IpAddr>().unwrap()
        );
        let url = Url::parse(&format!("http://127.0.0.1:{}/", listener.port())).unwrap();
        assert!(no_loopback.check_url(&url).is_err());

        // A name: the resolver leaves nothing to connect to, and says why.
        let url = format!("http://localhost:{}/", listener.port());
        let error = client.get(&url).send().await.unwrap_err();
        let refusal = blocked_cause(&error).unwrap_or_else(|| panic!("{error:?}"));
        assert!(refusal.address.is_loopback(), "{refusal}");
        assert!(
            crate::error::error_chain(&error).contains("blocked_cidrs"),
            "{error:?}"
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

        // The same name with the default policy connects.
        let defaults = AddressPolicy::default_blocked();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(defaults.clone())
            .build()
            .unwrap();
        let _ = client.get(&url).send().await;
        assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}

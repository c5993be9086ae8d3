//! The registry token flow, with the checks that let it be trusted.
//!
//! A registry says how it wants to be authenticated in the `WWW-Authenticate` header of a
//! 401 answer; the first request to a registry goes out anonymously, and a 401 teaches the
//! session the registry's challenge ([`Tokens::learn`]), kept until a 401 says otherwise (no
//! `GET /v2/` probe, so an anonymous registry costs nothing but the requests themselves). For
//! a `Bearer` challenge the client asks the named *realm* (a token
//! server) for a token scoped to one repository, and sends that token to the registry. The
//! realm is chosen by the registry, so it is checked before anything is sent to it:
//!
//! - a realm, like the registry's own `/v2/`, is only reached on an address outside
//!   `blocked_cidrs` (cloud metadata services; see [`super::address`]), whether named by
//!   address, by a name that resolves there, or reached through a redirect;
//! - the registry's credentials go to the realm only when it is on the registry's own host
//!   (any port), or when `trusted_token_realms` names it for that registry; otherwise the fetch fails
//!   with an error that says so (a registry without credentials may use any realm);
//! - credentials never go to a plain-HTTP realm of an HTTPS registry.
//!
//! Tokens are cached per registry, repository and [`Access`] (a pull token never stands in for
//! a push token, nor the other way round) until shortly before they expire, and dropped when
//! the registry answers 401 (the caller then asks again, once). Credentials are
//! a password (HTTP basic at the realm) or a Docker `identitytoken` (the OAuth2 refresh-token
//! grant, `POST` to the realm).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Url;
use serde::Deserialize;

use super::address::{blocked_cause, AddressPolicy, Blocked};
use super::auth::{Credential, Secret};

/// Lifetime assumed for a token whose response names none (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A cached token is not used when it expires within this margin.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Largest token response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 << 10;
/// Most tokens kept; past it (or past [`MAX_CACHED_TOKEN_BYTES`]) the least recently used go.
const MAX_CACHED_TOKENS: usize = 1024;
/// Most bytes of tokens kept.
const MAX_CACHED_TOKEN_BYTES: usize = 8 << 20;
/// `client_id` sent with the refresh-token grant.
const CLIENT_ID: &str = "wasmcache";

/// How a registry wants to be authenticated, from its `GET /v2/` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// No authentication (`/v2/` answered 200).
    None,
    /// HTTP basic authentication.
    Basic,
    /// Tokens from a realm.
    Bearer {
        /// The token server's URL.
        realm: String,
        /// The `service` parameter to pass on.
        service: Option<String>,
    },
}

/// Why the token flow failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry or realm could not be reached.
    #[error("{url}: {source}")]
    Transport {
        /// What was requested.
        url: String,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// Whether it was a timeout.
        timeout: bool,
    },
    /// The registry or realm is on an address in `blocked_cidrs`; nothing was sent to it.
    #[error("{url} refused")]
    Blocked {
        /// What was to be requested.
        url: String,
        /// The address and the entry covering it.
        #[source]
        source: Blocked,
    },
    /// The realm is refused.
    #[error("token realm {realm} refused: {reason}")]
    Refused {
        /// The realm.
        realm: String,
        /// Why.
        reason: String,
    },
    /// The token server refused the credentials (or anonymous access).
    #[error("token server {realm} answered {status}")]
    Denied {
        /// The realm.
        realm: String,
        /// Its status.
        status: u16,
    },
    /// The registry's challenge or the token server's answer is malformed.
    #[error("{0}")]
    Malformed(String),
}

impl Error {
    /// Whether a transport error was a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Transport { timeout: true, .. })
    }
}

/// What a token is asked for: the actions of its `repository:<name>:<actions>` scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Access {
    /// Reads (every fetch).
    #[default]
    Pull,
    /// Reads and writes (`wasmcache push`).
    PullPush,
}

impl Access {
    /// The scope's actions.
    pub fn actions(self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::PullPush => "pull,push",
        }
    }
}

/// Challenges and tokens of one credentials generation (a session).
pub struct Tokens {
    http: Http,
    address_policy: AddressPolicy,
    trusted_realms: BTreeMap<String, Vec<String>>,
    plain_http: Vec<String>,
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<(String, String, Access), Cached>>,
}

#[derive(Clone)]
struct Cached {
    token: String,
    usable_until: Instant,
    /// When it was last handed out, for least-recently-used eviction.
    last_used: Instant,
}

/// Keeps `tokens` within [`MAX_CACHED_TOKENS`] entries and [`MAX_CACHED_TOKEN_BYTES`]
/// bytes, dropping expired tokens first, then the least recently used.
fn bound<K: Clone + Eq + std::hash::Hash>(tokens: &mut HashMap<K, Cached>) {
    let now = Instant::now();
    tokens.retain(|_, cached| cached.usable_until > now);
    let mut bytes: usize = tokens.values().map(|cached| cached.token.len()).sum();
    while tokens.len() > MAX_CACHED_TOKENS || bytes > MAX_CACHED_TOKEN_BYTES {
        let Some(oldest) = (tokens.iter())
            .min_by_key(|(_, cached)| cached.last_used)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        if let Some(gone) = tokens.remove(&oldest) {
            bytes -= gone.token.len();
        }
    }
}

/// What a token server answers.
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Tokens {
    /// A token client with the registries' TLS settings, connecting only where
    /// `address_policy` allows.
    pub fn new(
        certificates: &[reqwest::Certificate],
        plain_http: Vec<String>,
        trusted_realms: BTreeMap<String, Vec<String>>,
        address_policy: AddressPolicy,
        connect_timeout: Duration,
        read_timeout: Duration,
        user_agent: &str,
    ) -> Tokens {
        let certificates = certificates.to_vec();
        let user_agent_owned = user_agent.to_owned();
        let policy = address_policy.clone();
        let http = Http::lazy(move || {
            reqwest::Client::builder()
                .tls_certs_merge(certificates.iter().cloned())
                .connect_timeout(connect_timeout)
                .read_timeout(read_timeout)
                .user_agent(user_agent_owned.as_str())
                .redirect(policy.redirect_policy())
                .dns_resolver(policy.clone())
                .build()
                .unwrap_or_default()
        });
        Tokens {
            http,
            address_policy,
            trusted_realms,
            plain_http,
            challenges: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn scheme(&self, registry: &str) -> &'static str {
        if self.plain_http.iter().any(|r| r == "*" || r == registry) {
            "http"
        } else {
            "https"
        }
    }

    /// What `registry` (the host the distribution API is asked on) said about how it wants
    /// to be authenticated, if it said anything in this session.
    pub fn known(&self, registry: &str) -> Option<Challenge> {
        self.challenges
            .lock()
            .expect("poisoned")
            .get(registry)
            .cloned()
    }

    /// Keeps the challenge of a 401's `WWW-Authenticate` header from `registry` for the rest
    /// of the session (or until [`Tokens::forget`]).
    pub fn learn(&self, registry: &str, header: &str) -> Result<Challenge, Error> {
        let challenge = parse_challenge(header).ok_or_else(|| {
            Error::Malformed(format!("{registry}: unreadable WWW-Authenticate header"))
        })?;
        self.challenges
            .lock()
            .expect("poisoned")
            .insert(registry.to_owned(), challenge.clone());
        Ok(challenge)
    }

    /// A token for `access` to `repository`, from the cache or from the realm.
    pub async fn token(
        &self,
        registry: &str,
        repository: &str,
        access: Access,
        realm: &str,
        service: Option<&str>,
        credential: Option<&Credential>,
    ) -> Result<String, Error> {
        let key = (registry.to_owned(), repository.to_owned(), access);
        if let Some(cached) = self.tokens.lock().expect("poisoned").get_mut(&key) {
            if cached.usable_until > Instant::now() {
                cached.last_used = Instant::now();
                return Ok(cached.token.clone());
            }
        }
        let realm_url = self.check_realm(registry, realm, credential.is_some())?;
        let scope = format!("repository:{repository}:{}", access.actions());
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let http = self.http.client().await;
        let request = match credential.map(|c| (&c.username, &c.secret)) {
            Some((_, Secret::IdentityToken(refresh))) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", CLIENT_ID),
                    ("scope", scope.as_str()),
                ];
                if let Some(service) = service {
                    form.push(("service", service));
                }
                http.post(realm_url).form(&form)
            }
            Some((username, Secret::Password(password))) => http
                .get(realm_url)
                .query(&query)
                .basic_auth(username, Some(password)),
            None => http.get(realm_url).query(&query),
        };
        let started = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|source| transport(realm, source))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::Denied {
                realm: realm.to_owned(),
                status: status.as_u16(),
            });
        }
        let body = read_limited(response, realm).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|error| Error::Malformed(format!("token server {realm}: {error}")))?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| Error::Malformed(format!("token server {realm}: no token")))?;
        let lifetime = parsed
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .max(DEFAULT_TOKEN_LIFETIME);
        let usable_until = started + lifetime.saturating_sub(EXPIRY_MARGIN);
        let mut tokens = self.tokens.lock().expect("poisoned");
        tokens.insert(
            key,
            Cached {
                token: token.clone(),
                usable_until,
                last_used: Instant::now(),
            },
        );
        bound(&mut tokens);
        Ok(token)
    }

    /// Drops what is known about `registry`'s challenge and its tokens for `repository`,
    /// whatever their access (after a 401: a token expired early or was revoked, or the
    /// registry changed).
    pub fn forget(&self, registry: &str, repository: &str) {
        self.challenges.lock().expect("poisoned").remove(registry);
        let mut tokens = self.tokens.lock().expect("poisoned");
        for access in [Access::Pull, Access::PullPush] {
            tokens.remove(&(registry.to_owned(), repository.to_owned(), access));
        }
    }

    /// Checks a realm against the rules in the module docs (an address it names literally
    /// here, one it resolves to when it is connected to); returns it parsed.
    fn check_realm(
        &self,
        registry: &str,
        realm: &str,
        with_credentials: bool,
    ) -> Result<Url, Error> {
        let refused = |reason: String| Error::Refused {
            realm: realm.to_owned(),
            reason,
        };
        let url = Url::parse(realm).map_err(|_| refused("not a URL".into()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused("not an http(s) URL".into()));
        }
        let host = url
            .host_str()
            .ok_or_else(|| refused("no host".into()))?
            .trim_matches(['[', ']']);
        self.address_policy
            .check_url(&url)
            .map_err(|source| Error::Blocked {
                url: realm.to_owned(),
                source,
            })?;
        if with_credentials {
            self.check_credentials_may_go(registry, realm, &url, host)?;
        }
        Ok(url)
    }

    /// Whether `registry`'s credentials may be sent to its realm `url`.
    fn check_credentials_may_go(
        &self,
        registry: &str,
        realm: &str,
        url: &Url,
        host: &str,
    ) -> Result<(), Error> {
        let refused = |reason: String| Error::Refused {
            realm: realm.to_owned(),
            reason,
        };
        if self.scheme(registry) == "https" && url.scheme() != "https" {
            return Err(refused(format!(
                "registry {registry} is HTTPS but its realm is plain HTTP; its credentials \
                 are not sent in the clear"
            )));
        }
        let realm_host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let same_host = host == host_of(registry);
        let trusted = self
            .trusted_realms
            .iter()
            .filter(|(name, _)| registry_matches(name, registry))
            .flat_map(|(_, hosts)| hosts)
            .any(|trusted| *trusted == realm_host || *trusted == host);
        if same_host || trusted {
            Ok(())
        } else {
            Err(refused(format!(
                "it is on another host than registry {registry}, and the registry's \
                 credentials are only sent there when trusted_token_realms.\"{registry}\" \
                 names \"{realm_host}\""
            )))
        }
    }
}

/// The host of `host[:port]` (IPv6 literals keep no brackets).
fn host_of(registry: &str) -> &str {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host
        }
        _ => registry,
    };
    host.trim_matches(['[', ']'])
}

/// Whether a `trusted_token_realms` key names `registry` (Docker Hub's API host is
/// `registry-1.docker.io`; configs say `docker.io`).
fn registry_matches(name: &str, registry: &str) -> bool {
    name == registry
        || (name == "docker.io" && matches!(registry, "index.docker.io" | "registry-1.docker.io"))
}

/// The token client, built when first needed (on a blocking thread: loading the system's
/// CA roots takes milliseconds). Registries without a token realm spoken to over plain HTTP
/// never need it.
struct Http {
    client: tokio::sync::OnceCell<reqwest::Client>,
    build: Arc<dyn Fn() -> reqwest::Client + Send + Sync>,
}

impl Http {
    fn lazy(build: impl Fn() -> reqwest::Client + Send + Sync + 'static) -> Http {
        Http {
            client: tokio::sync::OnceCell::new(),
            build: Arc::new(build),
        }
    }

    async fn client(&self) -> &reqwest::Client {
        self.client
            .get_or_init(|| async {
                let build = self.build.clone();
                tokio::task::spawn_blocking(move || build())
                    .await
                    .expect("building the token client panicked")
            })
            .await
    }
}

/// A reqwest failure as an [`Error::Transport`], or [`Error::Blocked`] when the address
/// policy refused the connection.
fn transport(url: &str, source: reqwest::Error) -> Error {
    if let Some(blocked) = blocked_cause(&source) {
        return Error::Blocked {
            url: url.to_owned(),
            source: *blocked,
        };
    }
    Error::Transport {
        url: url.to_owned(),
        timeout: source.is_timeout(),
        source: Box::new(source),
    }
}

/// Reads a response body of at most [`MAX_TOKEN_RESPONSE_BYTES`].
async fn read_limited(mut response: reqwest::Response, realm: &str) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| transport(realm, source))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err(Error::Malformed(format!(
                "token server {realm}: answer over {MAX_TOKEN_RESPONSE_BYTES} bytes"
            )));
        }
    }
    Ok(body)
}

/// Parses `Basic realm="x"` or `Bearer realm="https://auth/token",service="registry"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remainder) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim(), &after[end..])
            }
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = Some(value.to_owned()),
            _ => {}
        }
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: realm.filter(|r| !r.is_empty())?,
        service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge(
                r#"bearer service="s", realm="http://127.0.0.1:5/t",scope="repository:a:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:5/t".into(),
                service: Some("s".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge(r#"Bearer service="s""#), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
    }

    fn tokens(plain_http: Vec<String>, policy: AddressPolicy) -> Tokens {
        Tokens::new(
            &[],
            plain_http,
            BTreeMap::from([("docker.io".into(), vec!["auth.docker.io".into()])]),
            policy,
            Duration::from_secs(1),
            Duration::from_secs(1),
            "test",
        )
    }

    #[test]
    fn realms_are_checked_before_anything_is_sent() {
        let tokens = tokens(
            vec!["127.0.0.1:5000".into(), "[::1]:5000".into()],
            AddressPolicy::default_blocked(),
        );
        let check = |registry, realm, credentials| tokens.check_realm(registry, realm, credentials);
        // An address in blocked_cidrs: refused with or without credentials, before the
        // question of credentials comes up.
        for credentials in [false, true] {
            let refused = check(
                "127.0.0.1:5000",
                "http://169.254.169.254/token",
                credentials,
            )
            .unwrap_err();
            assert!(matches!(refused, Error::Blocked { .. }), "{refused:?}");
            let refused = crate::error::error_chain(&refused);
            assert!(
                refused.contains("169.254.169.254 is in blocked_cidrs (169.254.0.0/16)"),
                "{refused}"
            );
        }
        for realm in ["http://[fe80::1]:80/t", "http://[fd00:ec2::254]/t"] {
            assert!(
                matches!(
                    check("127.0.0.1:5000", realm, false),
                    Err(Error::Blocked { .. })
                ),
                "{realm}"
            );
        }
        // The same host, on any port: credentials may go.
        for realm in ["http://127.0.0.1:5000/token", "http://127.0.0.1:6000/token"] {
            assert!(check("127.0.0.1:5000", realm, true).is_ok(), "{realm}");
        }
        assert!(check("[::1]:5000", "http://[::1]:6000/token", true).is_ok());
        // Another host: only anonymously.
        let refused = check("127.0.0.1:5000", "http://127.0.0.2:6000/token", true)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("trusted_token_realms"), "{refused}");
        assert!(check("127.0.0.1:5000", "http://127.0.0.2:6000/token", false).is_ok());
        // HTTPS registry, plain HTTP realm: never with credentials.
        let refused = check("example.com", "http://example.com/token", true)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("in the clear"), "{refused}");
        assert!(matches!(
            check("example.com", "ftp://example.com/token", false),
            Err(Error::Refused { .. })
        ));
    }

    #[tokio::test]
    async fn realms_on_blocked_addresses_are_never_connected_to() {
        crate::registry::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        let no_loopback = AddressPolicy::new(&["127.0.0.0/8".into(), "::1/128".into()]).unwrap();
        let tokens = tokens(Vec::new(), no_loopback);
        // By address (refused before the request) and by a name that resolves there
        // (refused by the resolver).
        for host in ["127.0.0.1", "localhost"] {
            let realm = format!("http://{host}:{port}/token");
            let refused = tokens
                .token("127.0.0.1:5000", "a/b", Access::Pull, &realm, None, None)
                .await
                .unwrap_err();
            match &refused {
                Error::Blocked { source, .. } => assert!(source.address.is_loopback()),
                other => panic!("{realm}: {other:?}"),
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A realm on loopback that answers every request with a new token, and tells what
    /// each request's query was.
    async fn counting_realm() -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = vec![0; 4096];
                let n = stream.read(&mut head).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).into_owned();
                let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
                let body = {
                    let mut log = log.lock().unwrap();
                    log.push(target);
                    format!(r#"{{"token":"t{}","expires_in":300}}"#, log.len())
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        (realm, asked)
    }

    #[tokio::test]
    async fn tokens_are_cached_per_access() {
        crate::registry::install_crypto_provider();
        let (realm, asked) = counting_realm().await;
        let tokens = tokens(Vec::new(), AddressPolicy::new(&[]).unwrap());
        let token = |access| tokens.token("127.0.0.1:5000", "a/b", access, &realm, None, None);
        assert_eq!(token(Access::Pull).await.unwrap(), "t1");
        assert_eq!(token(Access::PullPush).await.unwrap(), "t2");
        assert_eq!(token(Access::Pull).await.unwrap(), "t1");
        assert_eq!(token(Access::PullPush).await.unwrap(), "t2");
        let scopes: Vec<String> = asked
            .lock()
            .unwrap()
            .iter()
            .map(|target| {
                let url = Url::parse(&format!("http://realm{target}")).unwrap();
                let scope = url.query_pairs().find(|(name, _)| name == "scope");
                scope
                    .map(|(_, value)| value.into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(scopes, ["repository:a/b:pull", "repository:a/b:pull,push"]);
        // A 401 drops both.
        tokens.forget("127.0.0.1:5000", "a/b");
        assert_eq!(token(Access::PullPush).await.unwrap(), "t3");
        assert_eq!(token(Access::Pull).await.unwrap(), "t4");
    }

    #[test]
    fn challenges_are_learned_from_401s_and_forgotten() {
        let tokens = tokens(Vec::new(), AddressPolicy::default_blocked());
        assert_eq!(tokens.known("r.example"), None);
        let header = r#"Bearer realm="https://r.example/token",service="r""#;
        let learned = tokens.learn("r.example", header).unwrap();
        assert_eq!(tokens.known("r.example"), Some(learned));
        assert!(tokens.learn("r.example", "Negotiate").is_err());
        tokens.forget("r.example", "a/b");
        assert_eq!(tokens.known("r.example"), None);
    }

    #[test]
    fn the_token_cache_is_bounded_by_entries_and_bytes() {
        let now = Instant::now();
        // `order` stands for when it was last used: lower is longer ago.
        let cached = |token: String, order: usize| Cached {
            token,
            usable_until: now + Duration::from_secs(3600),
            last_used: now + Duration::from_secs(order as u64),
        };
        let mut tokens = HashMap::new();
        for i in 0..MAX_CACHED_TOKENS + 10 {
            tokens.insert(i, cached("t".into(), i));
        }
        bound(&mut tokens);
        assert_eq!(tokens.len(), MAX_CACHED_TOKENS);
        assert!(
            !tokens.contains_key(&0),
            "the least recently used went first"
        );
        assert!(tokens.contains_key(&(MAX_CACHED_TOKENS + 9)));
        let mut big = HashMap::new();
        for i in 0..200 {
            big.insert(i, cached("x".repeat(60 << 10), i));
        }
        bound(&mut big);
        let bytes: usize = big.values().map(|c| c.token.len()).sum();
        assert!(bytes <= MAX_CACHED_TOKEN_BYTES && big.len() < 200);
        assert!(big.contains_key(&199) && !big.contains_key(&0));
        let gone = Cached {
            usable_until: now,
            ..cached("t".into(), 0)
        };
        let mut expired = HashMap::from([(1, gone)]);
        bound(&mut expired);
        assert!(expired.is_empty());
    }
}

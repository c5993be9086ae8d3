//! An in-process Docker registry token server, for registries started with
//! [`RegistryBuilder::token_auth`](super::registry::RegistryBuilder::token_auth): it checks
//! basic credentials, OAuth2 password and refresh-token grants, and answers with RS256 JWTs that
//! the `openssl` CLI signs with a fresh self-signed key, which the registry trusts through its
//! `rootcertbundle`.
//!
//! Like [`FaultyServer`](super::FaultyServer) it runs on its own thread and tokio runtime, so
//! sync and async tests alike can use it; it logs every request (never a password) and stops on
//! drop. Switches change the announced token lifetime or make it issue tokens that are already
//! expired, to test how a client renews tokens when the registry refuses them.
//!
//! Tokens carry the issuer certificate in an `x5c` header; distribution 2.8 verifies that chain
//! against `rootcertbundle`. Its clock leeway is 60 s, so an "expired" token expired an hour ago.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::http::Endpoint;
use super::{require_tool, run_checked, ChildGuard};

/// The `iss` claim of every token, and the CN of the signing certificate.
pub const ISSUER: &str = "wasmcache-test-token-issuer";

/// The `aud` claim of every token: the service name the registry announces and checks.
pub const SERVICE: &str = "wasmcache-test-registry";

/// The token lifetime announced (and put in `exp`) unless changed.
pub const DEFAULT_EXPIRES_IN: u64 = 300;

/// How long ago an expired token expired: well past distribution's 60 s leeway.
const EXPIRED_FOR: u64 = 3600;

/// How long one `openssl dgst -sign` may take.
const SIGN_TIMEOUT: Duration = Duration::from_secs(20);

/// One request the token server received; passwords are never kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The request path without the query (`/token` unless a client got it wrong).
    pub path: String,
    /// Every `scope` (`repository:NAME:ACTIONS`), space-separated lists split, in order.
    pub scopes: Vec<String>,
    /// The `service` parameter.
    pub service: Option<String>,
    /// The `grant_type` of a POST (`password`, `refresh_token`, …).
    pub grant_type: Option<String>,
    /// The user named by `Authorization: Basic` or by a password grant's `username`, whether or
    /// not the password was right.
    pub user: Option<String>,
    /// Whether the request had an `Authorization` header at all.
    pub authorization: bool,
    /// The `refresh_token` of a refresh-token grant.
    pub refresh_token: Option<String>,
    /// The `client_id` of a POST.
    pub client_id: Option<String>,
    /// The `sub` of the token issued, `None` when refused (`""` for anonymous).
    pub subject: Option<String>,
    /// The response status.
    pub status: u16,
}

/// A parsed `WWW-Authenticate: Bearer …` challenge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BearerChallenge {
    /// The token endpoint URL.
    pub realm: String,
    /// The service to name in the token request.
    pub service: Option<String>,
    /// The scope the refused request needs, if the registry named one.
    pub scope: Option<String>,
    /// `invalid_token`, `insufficient_scope`, … when given.
    pub error: Option<String>,
}

/// Options for [`TokenServer::builder`].
#[derive(Debug)]
pub struct TokenServerBuilder {
    users: Vec<(String, String)>,
    anonymous_pull: bool,
    expires_in: u64,
}

/// What the server thread shares with the handle.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The `openssl` binary.
    openssl: PathBuf,
    /// The RSA private key (PEM).
    key: PathBuf,
    /// The signing certificate as standard base64 DER, for the `x5c` header.
    x5c: String,
}

/// Users, switches and the request log.
#[derive(Debug)]
struct State {
    users: Vec<(String, String)>,
    /// Refresh token → user.
    refresh_tokens: HashMap<String, String>,
    anonymous_pull: bool,
    expires_in: u64,
    issue_expired: bool,
    requests: Vec<TokenRequest>,
    /// Tokens and refresh tokens issued so far, for unique `jti`s.
    issued: u64,
}

/// A running token server; stops on drop.
///
/// `GET /token?service=…&scope=…` authenticates with `Authorization: Basic`; a wrong password,
/// an unknown user or any other `Authorization` gets 401, and no header at all is anonymous
/// (see [`TokenServerBuilder::anonymous_pull`]); `offline_token=true` adds a `refresh_token`.
/// `POST /token` takes the OAuth2 form grants `password` (`access_type=offline` adds a
/// `refresh_token`) and `refresh_token`; other grants get 400, wrong credentials 401. A user
/// gets every action asked for, on every scope; a `service` other than [`SERVICE`] gets 400.
#[derive(Debug)]
pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    users: Vec<(String, String)>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    // Dropped after the thread has stopped (see `Drop`), so no signing reads a removed key.
    dir: TempDir,
}

/// What a token request is granted, or why it is refused.
enum Decision {
    Grant {
        subject: String,
        access: Vec<Value>,
        refresh_token: Option<String>,
    },
    Refuse {
        status: u16,
        message: String,
    },
}

impl TokenServerBuilder {
    /// Adds a user that may authenticate with this password.
    pub fn user(mut self, user: &str, password: &str) -> TokenServerBuilder {
        self.users.push((user.to_owned(), password.to_owned()));
        self
    }

    /// Whether requests without credentials get `pull` on every repository they ask for;
    /// by default they get a token with an empty access list, which the registry refuses for
    /// anything but `GET /v2/`.
    pub fn anonymous_pull(mut self, allow: bool) -> TokenServerBuilder {
        self.anonymous_pull = allow;
        self
    }

    /// The token lifetime in seconds (default [`DEFAULT_EXPIRES_IN`]).
    pub fn expires_in(mut self, seconds: u64) -> TokenServerBuilder {
        self.expires_in = seconds;
        self
    }

    /// Makes the signing key and certificate, binds a free loopback port and starts serving.
    pub fn start(self) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("token-server-")
            .tempdir()
            .expect("token server temp dir");
        let openssl = require_tool("openssl");
        run_checked(
            Command::new(&openssl)
                .current_dir(dir.path())
                .args(["req", "-x509", "-days", "2", "-nodes"])
                .args(["-newkey", "rsa:2048"])
                .args(["-keyout", "key.pem", "-out", "cert.pem"])
                .arg("-subj")
                .arg(format!("/CN={ISSUER}")),
        );
        let x5c = pem_to_base64_der(&dir.path().join("cert.pem"));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                users: self.users.clone(),
                refresh_tokens: HashMap::new(),
                anonymous_pull: self.anonymous_pull,
                expires_in: self.expires_in,
                issue_expired: false,
                requests: Vec::new(),
                issued: 0,
            }),
            openssl,
            key: dir.path().join("key.pem"),
            x5c,
        });

        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding token server");
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("token server address");
        let (shutdown, shutdown_signal) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("token server runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                    tokio::select! {
                        _ = accept_loop(listener, thread_shared) => {}
                        _ = shutdown_signal => {}
                    }
                });
            })
            .expect("spawning token server thread");
        TokenServer {
            addr,
            shared,
            users: self.users,
            shutdown: Some(shutdown),
            thread: Some(thread),
            dir,
        }
    }
}

impl TokenServer {
    /// Starts a server that knows these `(user, password)` pairs; anonymous requests get
    /// tokens granting nothing.
    pub fn start(users: &[(&str, &str)]) -> TokenServer {
        users
            .iter()
            .fold(TokenServer::builder(), |builder, (user, password)| {
                builder.user(user, password)
            })
            .start()
    }

    /// Options: users, anonymous pull, token lifetime.
    pub fn builder() -> TokenServerBuilder {
        TokenServerBuilder {
            users: Vec::new(),
            anonymous_pull: false,
            expires_in: DEFAULT_EXPIRES_IN,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The port it listens on (loopback only).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        self.realm_on("127.0.0.1")
    }

    /// `http://HOST:PORT/token`: the same server under another name (e.g. `localhost`, so that
    /// it looks like a different host from a registry on `127.0.0.1`).
    pub fn realm_on(&self, host: &str) -> String {
        format!("http://{host}:{}/token", self.addr.port())
    }

    /// The self-signed signing certificate (PEM), the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The `iss` of every token: [`ISSUER`].
    pub fn issuer(&self) -> &'static str {
        ISSUER
    }

    /// The `aud` of every token and the `service` registries announce: [`SERVICE`].
    pub fn service(&self) -> &'static str {
        SERVICE
    }

    /// The first user and password given at start, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.users
            .first()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// Accepts `token` in refresh-token grants (`POST grant_type=refresh_token`) as `user`.
    pub fn add_refresh_token(&self, token: &str, user: &str) {
        self.state()
            .refresh_tokens
            .insert(token.to_owned(), user.to_owned());
    }

    /// Sets the lifetime of later tokens (the `expires_in` announced and the `exp` claim).
    pub fn set_expires_in(&self, seconds: u64) {
        self.state().expires_in = seconds;
    }

    /// When set, later tokens have an `exp` an hour in the past while the response still
    /// announces the usual `expires_in`, so the registry refuses them at first use.
    pub fn set_issue_expired(&self, expired: bool) {
        self.state().issue_expired = expired;
    }

    /// Changes whether anonymous requests get `pull`; see [`TokenServerBuilder::anonymous_pull`].
    pub fn set_anonymous_pull(&self, allow: bool) {
        self.state().anonymous_pull = allow;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state().requests.clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.state().requests.len()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until cancelled.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(request, shared).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Answers one token request and logs it.
async fn handle(request: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return reply(400, error_body("unreadable request body")),
    };
    let mut params = parse_form(&query);
    if method == "POST" {
        params.extend(parse_form(&String::from_utf8_lossy(&body)));
    }
    let basic = authorization.as_deref().and_then(parse_basic);
    let grant_type = param(&params, "grant_type");
    let mut logged = TokenRequest {
        method: method.clone(),
        path: path.clone(),
        scopes: params
            .iter()
            .filter(|(name, _)| name == "scope")
            .flat_map(|(_, value)| value.split(' '))
            .filter(|scope| !scope.is_empty())
            .map(str::to_owned)
            .collect(),
        service: param(&params, "service"),
        grant_type: grant_type.clone(),
        user: match grant_type.as_deref() {
            Some("password") => param(&params, "username"),
            _ => basic.as_ref().map(|(user, _)| user.clone()),
        },
        authorization: authorization.is_some(),
        refresh_token: param(&params, "refresh_token"),
        client_id: param(&params, "client_id"),
        subject: None,
        status: 0,
    };

    let decision = decide(&shared, &logged, &path, &params, authorization, basic);
    let (status, body) = match decision {
        Decision::Refuse { status, message } => (status, error_body(&message)),
        Decision::Grant {
            subject,
            access,
            refresh_token,
        } => {
            let (claims, expires_in) = {
                let mut state = shared.state.lock().unwrap();
                state.issued += 1;
                let claims = claims(
                    &subject,
                    access,
                    state.issued,
                    state.issue_expired,
                    state.expires_in,
                );
                (claims, state.expires_in)
            };
            let signer = Arc::clone(&shared);
            let signed = tokio::task::spawn_blocking(move || sign(&signer, &claims)).await;
            match signed {
                Ok(Ok(token)) => {
                    logged.subject = Some(subject);
                    let mut answer = json!({
                        "token": token,
                        "access_token": token,
                        "expires_in": expires_in,
                        "issued_at": humantime::format_rfc3339_seconds(SystemTime::now())
                            .to_string(),
                    });
                    if let Some(refresh_token) = refresh_token {
                        answer["refresh_token"] = json!(refresh_token);
                    }
                    (200, answer.to_string())
                }
                Ok(Err(error)) => (500, error_body(&error)),
                Err(error) => (500, error_body(&format!("signing task failed: {error}"))),
            }
        }
    };
    logged.status = status;
    shared.state.lock().unwrap().requests.push(logged);
    reply(status, body)
}

/// Checks the credentials or grant of a request and works out what it may do.
fn decide(
    shared: &Shared,
    request: &TokenRequest,
    path: &str,
    params: &[(String, String)],
    authorization: Option<String>,
    basic: Option<(String, String)>,
) -> Decision {
    let refuse = |status: u16, message: &str| Decision::Refuse {
        status,
        message: message.to_owned(),
    };
    if path != "/token" {
        return refuse(404, "no such endpoint; the realm is /token");
    }
    if request
        .service
        .as_deref()
        .is_some_and(|service| service != SERVICE)
    {
        return refuse(400, "unknown service");
    }
    let mut state = shared.state.lock().unwrap();
    let check_password = |state: &State, user: &str, password: &str| {
        state
            .users
            .iter()
            .any(|(known, right)| known == user && right == password)
    };
    // `Some(user)` when authenticated, `None` when anonymous.
    let (user, offline) = match request.method.as_str() {
        "GET" => {
            let user = match (&authorization, &basic) {
                (None, _) => None,
                (Some(_), Some((user, password))) if check_password(&state, user, password) => {
                    Some(user.clone())
                }
                (Some(_), _) => return refuse(401, "invalid credentials"),
            };
            (
                user,
                param(params, "offline_token").as_deref() == Some("true"),
            )
        }
        "POST" => match request.grant_type.as_deref() {
            Some("password") => {
                let user = param(params, "username").unwrap_or_default();
                let password = param(params, "password").unwrap_or_default();
                if !check_password(&state, &user, &password) {
                    return refuse(401, "invalid username or password");
                }
                (
                    Some(user),
                    param(params, "access_type").as_deref() == Some("offline"),
                )
            }
            Some("refresh_token") => {
                let token = param(params, "refresh_token").unwrap_or_default();
                match state.refresh_tokens.get(&token) {
                    Some(user) => (Some(user.clone()), false),
                    None => return refuse(401, "invalid refresh token"),
                }
            }
            _ => return refuse(400, "unsupported grant_type"),
        },
        _ => return refuse(405, "use GET or POST"),
    };
    let access = request
        .scopes
        .iter()
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|action| !action.is_empty())
                .filter(|action| match &user {
                    Some(_) => true,
                    None => state.anonymous_pull && kind == "repository" && *action == "pull",
                })
                .collect();
            (!granted.is_empty()).then(|| json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let refresh_token = match (&user, offline) {
        (Some(user), true) => {
            state.issued += 1;
            let token = format!("wasmcache-refresh-{}-{}", state.issued, unix_nanos());
            state.refresh_tokens.insert(token.clone(), user.clone());
            Some(token)
        }
        _ => None,
    };
    Decision::Grant {
        subject: user.unwrap_or_default(),
        access,
        refresh_token,
    }
}

/// The JWT claims; an expired token expired [`EXPIRED_FOR`] seconds ago.
fn claims(subject: &str, access: Vec<Value>, serial: u64, expired: bool, lifetime: u64) -> Value {
    let now = unix_seconds();
    let (issued_at, expires) = if expired {
        (now - 2 * EXPIRED_FOR, now - EXPIRED_FOR)
    } else {
        (now, now + lifetime)
    };
    json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": expires,
        "nbf": issued_at,
        "iat": issued_at,
        "jti": format!("wasmcache-{serial}-{}", unix_nanos()),
        "access": access,
    })
}

/// Signs `claims` as an RS256 JWT whose header carries the certificate chain (`x5c`).
fn sign(shared: &Shared, claims: &Value) -> Result<String, String> {
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [shared.x5c]});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = openssl_sign(&shared.openssl, &shared.key, signing_input.as_bytes())?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// Pipes `input` to `openssl dgst -sha256 -sign KEY` and returns the raw signature.
fn openssl_sign(openssl: &Path, key: &Path, input: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = ChildGuard::spawn(
        Command::new(openssl)
            .args(["dgst", "-sha256", "-sign"])
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // The input and the 256-byte signature both fit in a pipe buffer, so no reader thread.
    let mut stdin = child.child_mut().stdin.take().expect("piped stdin");
    stdin
        .write_all(input)
        .map_err(|error| format!("writing to openssl: {error}"))?;
    drop(stdin);
    let deadline = Instant::now() + SIGN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.child_mut().try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "openssl dgst did not finish within {SIGN_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_millis(2));
    };
    let mut signature = Vec::new();
    let mut stderr = String::new();
    let child = child.child_mut();
    let _ = child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_end(&mut signature);
    let _ = child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr);
    if !status.success() || signature.is_empty() {
        return Err(format!("openssl dgst failed with {status}: {stderr}"));
    }
    Ok(signature)
}

/// A JSON response.
fn reply(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(status)
        .header("Content-Type", "application/json");
    if status == 401 {
        builder = builder.header("WWW-Authenticate", "Basic realm=\"wasmcache-test-token\"");
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("token server response")
}

/// A distribution-style error body.
fn error_body(message: &str) -> String {
    json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]}).to_string()
}

/// `user:password` of an `Authorization: Basic …` header.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The first value of parameter `name`.
fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

/// Splits `a=1&b=2` (a query or a form body), percent- and `+`-decoding names and values.
pub fn parse_form(encoded: &str) -> Vec<(String, String)> {
    encoded
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(name), form_decode(value))
        })
        .collect()
}

/// Encodes `pairs` as a query string or `application/x-www-form-urlencoded` body.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Undoes form encoding: `+` is a space, `%XX` a byte; malformed escapes stay as they are.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                match (hex_value(bytes[index + 1]), hex_value(bytes[index + 2])) {
                    (Some(high), Some(low)) => {
                        decoded.push(high << 4 | low);
                        index += 2;
                    }
                    _ => decoded.push(b'%'),
                }
            }
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The value of one hex digit.
fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

/// Parses `Bearer realm="…",service="…",scope="…"`; `None` for other schemes.
pub fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut challenge = BearerChallenge::default();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if name.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        let value = value.trim().to_owned();
        match name.trim().to_ascii_lowercase().as_str() {
            "realm" => challenge.realm = value,
            "service" => challenge.service = Some(value),
            "scope" => challenge.scope = Some(value),
            "error" => challenge.error = Some(value),
            _ => {}
        }
    }
    Some(challenge)
}

/// Fetches a token the way registry clients do: `GET realm?service=…&scope=…` with basic
/// `credentials` if given. Panics unless the token server answers 200 with a token.
///
/// Only plain-HTTP realms are supported (the test token server serves HTTP).
pub fn fetch_token(challenge: &BearerChallenge, credentials: Option<(&str, &str)>) -> String {
    let rest = challenge
        .realm
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("realm {:?} is not plain http://", challenge.realm));
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut endpoint = Endpoint::plain(host);
    if let Some((user, password)) = credentials {
        endpoint = endpoint.with_credentials(user, password);
    }
    let mut query = Vec::new();
    if let Some(service) = &challenge.service {
        query.push(("service", service.as_str()));
    }
    if let Some(scope) = &challenge.scope {
        query.push(("scope", scope.as_str()));
    }
    let path = format!(
        "{}?{}",
        if path.is_empty() { "/" } else { path },
        form_encode(&query)
    );
    let response = endpoint.get(&path, &[]);
    assert_eq!(
        response.status,
        200,
        "token request to {}: {}",
        challenge.realm,
        response.text()
    );
    let answer: Value = serde_json::from_slice(&response.body).expect("token response is JSON");
    answer["token"]
        .as_str()
        .or(answer["access_token"].as_str())
        .expect("token response has a token")
        .to_owned()
}

/// The decoded header (`.0`) and claims (`.1`) of a JWT; the signature is not checked.
pub fn decode_jwt(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut part = |what: &str| -> Value {
        let encoded = parts.next().unwrap_or_else(|| panic!("JWT without {what}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .unwrap_or_else(|error| panic!("JWT {what} is not base64url: {error}"));
        serde_json::from_slice(&bytes).unwrap_or_else(|error| panic!("JWT {what}: {error}"))
    };
    (part("header"), part("claims"))
}

/// The base64 body of a PEM file: standard base64 of the DER, as `x5c` wants it.
fn pem_to_base64_der(path: &Path) -> String {
    let pem = fs::read_to_string(path).expect("reading the issuer certificate");
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::trim)
        .collect();
    assert!(
        STANDARD.decode(&body).is_ok(),
        "{} is not a PEM certificate",
        path.display()
    );
    body
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

//! An in-process Docker registry token server (on the faulty server's [`Server`]) for
//! registries started with [`RegistryBuilder::token_auth`](super::registry::RegistryBuilder).
//! `GET /token?service=…&scope=…` checks `Authorization: Basic` (none: anonymous); `POST` takes
//! the `refresh_token` grant. Tokens are RS256 JWTs signed by `openssl` with a fresh key and
//! carrying its certificate (`x5c`), which distribution checks against its `rootcertbundle`.
//! Every request is logged, never a password.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::faulty::{Behaviour, FaultyRequest, Server};
use super::{require_tool, run_checked};

/// The `iss` claim of every token, and the CN of the signing certificate.
pub const ISSUER: &str = "wasmcache-test-token-issuer";
/// The `aud` claim of every token: the service name the registry announces and checks.
pub const SERVICE: &str = "wasmcache-test-registry";
/// The token lifetime announced and put in `exp`.
const EXPIRES_IN: u64 = 300;
/// How long ago an expired token expired: well past distribution's 60 s leeway.
const EXPIRED_FOR: u64 = 3600;

/// One request the token server received: method, path without the query, every `scope`
/// (lists split), the form's fields, the user named by `Authorization: Basic` (whether or not
/// the password was right), whether there was an `Authorization` at all, and the status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    pub scopes: Vec<String>,
    pub service: Option<String>,
    pub grant_type: Option<String>,
    pub user: Option<String>,
    pub authorization: bool,
    pub refresh_token: Option<String>,
    pub client_id: Option<String>,
    pub status: u16,
}

/// Options for [`TokenServer::builder`].
#[derive(Debug, Default)]
pub struct TokenServerBuilder {
    users: Vec<(String, String)>,
    anonymous_pull: bool,
}

/// Users, switches and the request log, shared with the server.
#[derive(Debug, Default)]
struct State {
    users: Vec<(String, String)>,
    /// Refresh token → user.
    refresh_tokens: Vec<(String, String)>,
    anonymous_pull: bool,
    issue_expired: bool,
    requests: Vec<TokenRequest>,
}

/// A running token server; stops on drop.
pub struct TokenServer {
    server: Server,
    state: Arc<Mutex<State>>,
    users: Vec<(String, String)>,
    // Dropped after the server has stopped, so no signing reads a removed key.
    dir: TempDir,
}

impl TokenServerBuilder {
    /// Adds a user that may authenticate with this password.
    pub fn user(mut self, user: &str, password: &str) -> TokenServerBuilder {
        self.users.push((user.to_owned(), password.to_owned()));
        self
    }

    /// Whether requests without credentials get `pull` on every repository they ask for; by
    /// default their token grants nothing, which the registry refuses but for `GET /v2/`.
    pub fn anonymous_pull(mut self, allow: bool) -> TokenServerBuilder {
        self.anonymous_pull = allow;
        self
    }

    /// Makes the signing key and certificate, binds a free loopback port and starts serving.
    pub fn start(self) -> TokenServer {
        let dir = tempfile::Builder::new().prefix("token-server-").tempdir();
        let dir = dir.expect("token server dir");
        let mut openssl = Command::new(require_tool("openssl"));
        openssl.current_dir(dir.path()).args([
            "req", "-x509", "-days", "2", "-nodes", "-newkey", "rsa:2048", "-keyout", "key.pem",
            "-out", "cert.pem", "-subj",
        ]);
        run_checked(openssl.arg(format!("/CN={ISSUER}")));
        let mut state = State::default();
        (state.users, state.anonymous_pull) = (self.users.clone(), self.anonymous_pull);
        let state = Arc::new(Mutex::new(state));
        let (shared, files, serial) = (state.clone(), dir.path().to_owned(), AtomicU64::new(0));
        let server = Server::start(Arc::new(move |request| {
            let serial = serial.fetch_add(1, Ordering::Relaxed);
            let (logged, status, body) =
                answer(&shared, request, |claims| sign(&files, serial, claims));
            let logged = TokenRequest { status, ..logged };
            shared.lock().unwrap().requests.push(logged);
            let mut answer = Behaviour::json(status, body);
            if let (Behaviour::Ok { headers, .. }, 401) = (&mut answer, status) {
                let challenge = "Basic realm=\"wasmcache-test-token\"";
                headers.push(("WWW-Authenticate".into(), challenge.into()));
            }
            answer
        }));
        TokenServer {
            server,
            state,
            users: self.users,
            dir,
        }
    }
}

impl TokenServer {
    /// Starts a server that knows these `(user, password)` pairs; anonymous requests get
    /// tokens granting nothing.
    pub fn start(users: &[(&str, &str)]) -> TokenServer {
        let builder = users
            .iter()
            .fold(TokenServer::builder(), |b, (u, p)| b.user(u, p));
        builder.start()
    }

    /// Options: users, anonymous pull.
    pub fn builder() -> TokenServerBuilder {
        TokenServerBuilder::default()
    }

    /// The port it listens on (loopback only).
    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }

    /// `http://HOST:PORT/token`: the realm, under another name than `127.0.0.1` if wanted
    /// (e.g. `localhost`, so that it looks like another host than a registry on `127.0.0.1`).
    pub fn realm_on(&self, host: &str) -> String {
        format!("http://{host}:{}/token", self.port())
    }

    /// The self-signed signing certificate (PEM), the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The `aud` of every token and the `service` registries announce: [`SERVICE`].
    pub fn service(&self) -> &'static str {
        SERVICE
    }

    /// The first user and password given at start, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        let first = self.users.first();
        first.map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// Accepts `token` in refresh-token grants (`POST grant_type=refresh_token`) as `user`.
    pub fn add_refresh_token(&self, token: &str, user: &str) {
        let entry = (token.to_owned(), user.to_owned());
        self.state.lock().unwrap().refresh_tokens.push(entry);
    }

    /// When set, later tokens have an `exp` an hour in the past while the response still
    /// announces the usual `expires_in`, so the registry refuses them at first use.
    pub fn set_issue_expired(&self, expired: bool) {
        self.state.lock().unwrap().issue_expired = expired;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

/// Parses and answers one token request: what to log, the status and the JSON body; `sign`
/// turns claims into a signed JWT.
fn answer(
    state: &Mutex<State>,
    request: FaultyRequest,
    sign: impl FnOnce(Value) -> String,
) -> (TokenRequest, u16, String) {
    let (path, query) = request.path.split_once('?').unwrap_or((&request.path, ""));
    let form = String::from_utf8_lossy(&request.body);
    let form = if request.method == "POST" {
        form
    } else {
        "".into()
    };
    let url = reqwest::Url::parse(&format!("http://form/?{query}&{form}")).expect("a form");
    let params: Vec<(String, String)> = url
        .query_pairs()
        .map(|(n, v)| (n.into(), v.into()))
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, v)| v.clone())
    };
    let authorization = request.header("authorization");
    let basic = authorization.and_then(|header| {
        let encoded = header.strip_prefix("Basic ")?;
        let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
        decoded
            .split_once(':')
            .map(|(user, pw)| (user.to_owned(), pw.to_owned()))
    });
    let scopes = params.iter().filter(|(name, _)| name == "scope");
    let scopes = scopes.flat_map(|(_, value)| value.split(' ').filter(|s| !s.is_empty()));
    let logged = TokenRequest {
        method: request.method.clone(),
        path: path.to_owned(),
        scopes: scopes.map(str::to_owned).collect(),
        service: param("service"),
        grant_type: param("grant_type"),
        user: basic.as_ref().map(|(user, _)| user.clone()),
        authorization: authorization.is_some(),
        refresh_token: param("refresh_token"),
        client_id: param("client_id"),
        status: 0,
    };
    let refuse = |logged, status, message: &str| {
        let body = json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]});
        (logged, status, body.to_string())
    };
    let state = state.lock().unwrap();
    // `Some(user)` when authenticated, `None` when anonymous.
    let user = match (request.method.as_str(), logged.grant_type.as_deref()) {
        _ if path != "/token" => return refuse(logged, 404, "no such endpoint; use /token"),
        _ if logged.service.as_deref().is_some_and(|s| s != SERVICE) => {
            return refuse(logged, 400, "unknown service")
        }
        ("GET", _) => match (authorization, &basic) {
            (None, _) => None,
            (Some(_), Some(user)) if state.users.contains(user) => Some(user.0.clone()),
            (Some(_), _) => return refuse(logged, 401, "invalid credentials"),
        },
        ("POST", Some("refresh_token")) => {
            let token = param("refresh_token").unwrap_or_default();
            match state
                .refresh_tokens
                .iter()
                .find(|(known, _)| *known == token)
            {
                Some((_, user)) => Some(user.clone()),
                None => return refuse(logged, 401, "invalid refresh token"),
            }
        }
        _ => return refuse(logged, 400, "unsupported method or grant_type"),
    };
    let access: Vec<Value> = (logged.scopes.iter())
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let anonymous =
                |action: &str| state.anonymous_pull && kind == "repository" && action == "pull";
            let granted = actions
                .split(',')
                .filter(|a| !a.is_empty() && (user.is_some() || anonymous(a)));
            let granted: Vec<&str> = granted.collect();
            (!granted.is_empty()).then(|| json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let (issued, expires) = match state.issue_expired {
        true => (now.as_secs() - 2 * EXPIRED_FOR, now.as_secs() - EXPIRED_FOR),
        false => (now.as_secs(), now.as_secs() + EXPIRES_IN),
    };
    drop(state);
    let token = sign(json!({
        "iss": ISSUER, "sub": user.unwrap_or_default(), "aud": SERVICE, "exp": expires,
        "nbf": issued, "iat": issued, "jti": format!("wasmcache-{}", now.as_nanos()), "access": access,
    }));
    let answer = json!({"token": token, "access_token": token, "expires_in": EXPIRES_IN});
    (logged, 200, answer.to_string())
}

/// `claims` as an RS256 JWT signed by the key in `files`, with the certificate as `x5c`.
fn sign(files: &Path, serial: u64, claims: Value) -> String {
    let pem = fs::read_to_string(files.join("cert.pem")).expect("issuer certificate");
    let x5c: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let encode = |value: Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let input = format!("{}.{}", encode(header), encode(claims));
    let (input_file, signature) = (
        files.join(format!("in-{serial}")),
        files.join(format!("sig-{serial}")),
    );
    fs::write(&input_file, &input).expect("writing the signing input");
    let mut openssl = Command::new(require_tool("openssl"));
    openssl
        .args(["dgst", "-sha256", "-sign"])
        .arg(files.join("key.pem"));
    run_checked(openssl.arg("-out").arg(&signature).arg(&input_file));
    let signature = fs::read(&signature).expect("reading the signature");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

//! A real CNCF distribution 2.8 registry (Debian's `/usr/bin/docker-registry`) on a free
//! loopback port, with filesystem storage in a temp dir, optional TLS, and optional basic auth or
//! bearer-token auth against an in-process [`TokenServer`].
//!
//! Its log is parsed to count requests, which is how tests prove single-flight and dedup. Every
//! request produces two lines: an app line (`msg="response completed"`, logfmt) and an access
//! line in combined log format (`127.0.0.1 - user [date] "GET /v2/… HTTP/1.1" 200 …`); only the
//! access lines are counted, so each request counts once.

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use super::http::Endpoint;
use super::token::TokenServer;
use super::{isolate, require_tool, run_checked, wait_until, ChildGuard};

/// The registry binary from Debian's `docker-registry` package.
const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer `GET /v2/` after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Marks the harness's own log-sync requests so that they are left out of counts.
const SYNC_MARKER: &str = "wasmcache-harness-sync";

/// One request from the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    /// `GET`, `HEAD`, `PUT`, …
    pub method: String,
    /// The request URI, including any query string.
    pub path: String,
    /// The response status.
    pub status: u16,
}

/// Options for [`Registry::builder`].
#[derive(Debug, Default)]
pub struct RegistryBuilder {
    basic_auth: Option<(String, String)>,
    token_auth: Option<TokenAuth>,
    token_realm: Option<String>,
    tls: bool,
    port: Option<u16>,
}

/// The `auth.token` settings of a registry that trusts a [`TokenServer`].
#[derive(Clone, Debug)]
struct TokenAuth {
    /// The realm announced in `WWW-Authenticate: Bearer realm=…`.
    realm: String,
    service: String,
    issuer: String,
    /// The token server's signing certificate, copied so that it outlives the server.
    cert_pem: Vec<u8>,
    /// The token server's first user, the default client credentials.
    credentials: Option<(String, String)>,
}

/// How the registry authenticates clients.
#[derive(Clone, Debug)]
enum Auth {
    None,
    /// An htpasswd file with one bcrypt entry.
    Htpasswd(PathBuf),
    Token(TokenAuth),
}

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct Registry {
    // Declared first so that the process dies before its directory is removed.
    child: Option<ChildGuard>,
    dir: TempDir,
    port: u16,
    credentials: Option<(String, String)>,
    ca_cert: Option<PathBuf>,
    auth: Auth,
    syncs: AtomicU64,
}

impl RegistryBuilder {
    /// Requires HTTP basic auth with this user (an htpasswd file with a bcrypt hash).
    ///
    /// With [`RegistryBuilder::token_auth`] no htpasswd is written: the user and password are
    /// only the credentials [`Registry::credentials`] hands to clients (which present them at
    /// the realm), so they should be one of the token server's users.
    pub fn basic_auth(mut self, user: &str, password: &str) -> RegistryBuilder {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Serves HTTPS with a server certificate (SAN `IP:127.0.0.1`, `DNS:localhost`) signed by a
    /// fresh test CA; see [`Registry::ca_cert_path`].
    pub fn tls(mut self) -> RegistryBuilder {
        self.tls = true;
        self
    }

    /// Requires bearer tokens from `server` (distribution's `auth.token`): the registry
    /// announces `server`'s realm and service, and trusts tokens signed by its certificate.
    ///
    /// Client credentials ([`Registry::credentials`], used by the fixture helpers) default to
    /// the server's first user; [`RegistryBuilder::basic_auth`] names others. `GET /v2/` without
    /// a token answers 401 with the Bearer challenge.
    pub fn token_auth(mut self, server: &TokenServer) -> RegistryBuilder {
        let cert_pem = fs::read(server.cert_path()).expect("reading the token issuer cert");
        self.token_auth = Some(TokenAuth {
            realm: server.realm(),
            service: server.service().to_owned(),
            issuer: server.issuer().to_owned(),
            cert_pem,
            credentials: server
                .credentials()
                .map(|(user, password)| (user.to_owned(), password.to_owned())),
        });
        self
    }

    /// Announces `realm` instead of the token server's own realm, e.g. the same server as
    /// `http://localhost:PORT/token` ([`TokenServer::realm_on`]) or an address no client should
    /// send credentials to. Needs [`RegistryBuilder::token_auth`].
    ///
    /// The fixture helpers follow the announced realm, so push fixtures before switching to an
    /// unreachable one with [`Registry::set_token_realm`].
    pub fn token_realm(mut self, realm: &str) -> RegistryBuilder {
        self.token_realm = Some(realm.to_owned());
        self
    }

    /// Listens on this port instead of a free one (e.g. 80, for a registry named without a
    /// port).
    pub fn port(mut self, port: u16) -> RegistryBuilder {
        self.port = Some(port);
        self
    }

    /// Writes the config, starts the registry and waits until it answers `GET /v2/`.
    pub fn start(self) -> Registry {
        require_tool(REGISTRY_BINARY);
        let dir = tempfile::Builder::new()
            .prefix("registry-")
            .tempdir()
            .expect("registry temp dir");
        assert!(
            self.token_realm.is_none() || self.token_auth.is_some(),
            ".token_realm() needs .token_auth()"
        );
        let (auth, credentials) = match (self.token_auth, self.basic_auth) {
            (Some(mut token), basic_auth) => {
                if let Some(realm) = self.token_realm {
                    token.realm = realm;
                }
                fs::write(token_cert_path(dir.path()), &token.cert_pem)
                    .expect("writing the token issuer cert");
                let credentials = basic_auth.or_else(|| token.credentials.clone());
                (Auth::Token(token), credentials)
            }
            (None, Some((user, password))) => {
                let htpasswd = dir.path().join("htpasswd");
                write_htpasswd(&htpasswd, &user, &password);
                (Auth::Htpasswd(htpasswd), Some((user, password)))
            }
            (None, None) => (Auth::None, None),
        };
        let ca_cert = self.tls.then(|| write_certificates(dir.path()));
        let mut registry = Registry {
            child: None,
            dir,
            port: 0,
            credentials,
            ca_cert,
            auth,
            syncs: AtomicU64::new(0),
        };
        // A free port can be taken between probing and binding; try a few.
        for _ in 0..3 {
            registry.port = self.port.unwrap_or_else(free_port);
            registry.write_config();
            if registry.spawn() {
                return registry;
            }
        }
        panic!(
            "docker-registry did not become ready; its log:\n{}",
            registry.log()
        );
    }
}

impl Registry {
    /// Starts a plain-HTTP registry without auth.
    pub fn start() -> Registry {
        Registry::builder().start()
    }

    /// Options: basic or token auth, TLS, port.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` or `https://…` with TLS.
    pub fn url(&self) -> String {
        self.endpoint().url("")
    }

    /// Address, credentials and CA, for the fixture and HTTP helpers.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr(),
            credentials: self.credentials.clone(),
            ca_cert: self.ca_cert.clone(),
        }
    }

    /// The basic-auth user and password, when started with them; with token auth, the
    /// credentials clients present at the realm.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The realm announced in the Bearer challenge, when started with token auth.
    pub fn token_realm(&self) -> Option<&str> {
        match &self.auth {
            Auth::Token(token) => Some(&token.realm),
            _ => None,
        }
    }

    /// Restarts the registry (same port and storage) announcing `realm` instead; e.g. push
    /// fixtures through the real realm first, then switch to one clients must not trust.
    ///
    /// Panics unless the registry was started with [`RegistryBuilder::token_auth`].
    pub fn set_token_realm(&mut self, realm: &str) {
        match &mut self.auth {
            Auth::Token(token) => token.realm = realm.to_owned(),
            _ => panic!("registry was started without .token_auth()"),
        }
        self.write_config();
        self.restart();
    }

    /// The test CA that signed the server certificate.
    ///
    /// Panics unless the registry was started with [`RegistryBuilder::tls`].
    pub fn ca_cert_path(&self) -> &Path {
        self.ca_cert
            .as_deref()
            .expect("registry was started without .tls()")
    }

    /// The storage root, for tests that tamper with stored blobs.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's process id while it runs (to pause it with `kill -STOP`, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::id)
    }

    /// Whether the registry process is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The combined stdout and stderr of every run so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Every request in the access log, oldest first, across restarts.
    ///
    /// While running, a marker request is sent first and awaited in the log, so that requests
    /// answered before this call are all included.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        if self.is_running() {
            self.sync_log();
        }
        self.log()
            .lines()
            .filter_map(parse_access_line)
            .filter(|request| !request.path.contains(SYNC_MARKER))
            .collect()
    }

    /// How many requests used `method` on a path containing `path_substring`.
    pub fn count(&self, method: &str, path_substring: &str) -> usize {
        self.requests()
            .iter()
            .filter(|request| request.method == method && request.path.contains(path_substring))
            .count()
    }

    /// How many blob GETs the registry answered, in `repo` or in any repository.
    ///
    /// Requests rejected with 401 (auth challenges a client then retries) are left out; use
    /// [`Registry::count`] or [`Registry::requests`] to see those.
    pub fn blob_gets(&self, repo: Option<&str>) -> usize {
        self.count_gets(repo, "/blobs/sha256:")
    }

    /// How many manifest GETs (by tag or digest) the registry answered, in `repo` or any;
    /// 401s are left out as in [`Registry::blob_gets`].
    pub fn manifest_gets(&self, repo: Option<&str>) -> usize {
        self.count_gets(repo, "/manifests/")
    }

    /// Kills the registry (by PID) and waits for it; the port and storage are kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the registry again on the same port with the same storage and log.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "docker-registry did not restart on port {}; its log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Counts non-401 GETs whose path is `/v2/<repo>/<kind>…` (any repo when `None`).
    fn count_gets(&self, repo: Option<&str>, kind: &str) -> usize {
        let prefix = repo.map(|repo| format!("/v2/{repo}{kind}"));
        self.requests()
            .iter()
            .filter(|request| request.method == "GET" && request.status != 401)
            .filter(|request| match &prefix {
                Some(prefix) => request.path.starts_with(prefix),
                None => request.path.starts_with("/v2/") && request.path.contains(kind),
            })
            .count()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn write_config(&self) {
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  secret: wasmcache-test\n",
            storage = self.storage_dir().display(),
            addr = self.addr(),
        );
        if let Some(ca) = &self.ca_cert {
            let tls_dir = ca.parent().and_then(Path::parent).expect("tls dir");
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                tls_dir.join("server.crt").display(),
                tls_dir.join("server.key").display()
            ));
        }
        match &self.auth {
            Auth::None => {}
            Auth::Htpasswd(htpasswd) => config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: wasmcache-test\n    path: {}\n",
                htpasswd.display()
            )),
            // JSON strings are valid YAML double-quoted scalars.
            Auth::Token(token) => config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                 rootcertbundle: {}\n",
                serde_json::json!(token.realm),
                serde_json::json!(token.service),
                serde_json::json!(token.issuer),
                serde_json::json!(token_cert_path(self.dir.path())),
            )),
        }
        fs::write(self.dir.path().join("config.yml"), config).expect("writing registry config");
    }

    /// Spawns the process and waits for `GET /v2/`; `false` if it never became ready.
    fn spawn(&mut self) -> bool {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening registry log");
        let mut command = Command::new(REGISTRY_BINARY);
        // The registry reads every REGISTRY_* variable as a config override.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(name);
            }
        }
        isolate(&mut command, self.dir.path())
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut command);
        let endpoint = self.endpoint();
        // Any HTTP answer means it is serving: with auth, `GET /v2/` is a 401 challenge (basic
        // credentials are refused by a token registry, which wants a Bearer token).
        let ready = wait_until(READY_TIMEOUT, || {
            let exited = matches!(child.child_mut().try_wait(), Ok(Some(_)));
            exited || endpoint.try_request("GET", "/v2/", &[], None).is_ok()
        });
        if ready && child.child_mut().try_wait().ok().flatten().is_none() {
            self.child = Some(child);
            true
        } else {
            false
        }
    }

    /// Sends a marked request and waits until its access line is in the log.
    fn sync_log(&self) {
        let marker = format!(
            "{SYNC_MARKER}={}",
            self.syncs.fetch_add(1, Ordering::Relaxed)
        );
        let path = format!("/v2/?{marker}");
        if self
            .endpoint()
            .try_request("GET", &path, &[], None)
            .is_err()
        {
            return;
        }
        let logged = wait_until(Duration::from_secs(2), || {
            self.log()
                .lines()
                .any(|line| line.contains(&marker) && parse_access_line(line).is_some())
        });
        assert!(logged, "registry access log never showed {path}");
    }
}

impl From<&Registry> for Endpoint {
    fn from(registry: &Registry) -> Endpoint {
        registry.endpoint()
    }
}

/// Parses `IP - USER [DATE] "METHOD URI PROTO" STATUS SIZE "REFERER" "AGENT"`.
fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut request = request.split(' ');
    let method = request.next()?.to_owned();
    let path = request.next()?.to_owned();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(LoggedRequest {
        method,
        path,
        status,
    })
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("probing for a free port")
        .port()
}

/// Where the registry keeps its copy of the token issuer certificate.
fn token_cert_path(dir: &Path) -> PathBuf {
    dir.join("token-issuer.crt")
}

/// Writes an htpasswd file with a bcrypt hash, which is all distribution accepts.
fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let output = run_checked(
        Command::new(require_tool("htpasswd"))
            .arg("-Bbn")
            .arg(user)
            .arg(password),
    );
    fs::write(path, output.stdout).expect("writing htpasswd");
}

/// Creates `tls/ca/ca.crt` and a server certificate and key under `dir/tls`; returns the CA path.
///
/// The CA sits alone in its directory so that the directory can be handed to skopeo's
/// `--dest-cert-dir`, which treats every `*.key` there as a client key.
fn write_certificates(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    let ca_dir = tls.join("ca");
    fs::create_dir_all(&ca_dir).expect("creating tls dir");
    let openssl = require_tool("openssl");
    let ec_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_checked(
        Command::new(&openssl)
            .current_dir(&tls)
            .args([
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=wasmcache test CA",
            ])
            .args(ec_key)
            .args(["-keyout", "ca.key", "-out", "ca/ca.crt"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
    );
    run_checked(
        Command::new(&openssl)
            .current_dir(&tls)
            .args(["req", "-subj", "/CN=localhost"])
            .args(ec_key)
            .args(["-keyout", "server.key", "-out", "server.csr"]),
    );
    fs::write(
        tls.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("writing server.ext");
    run_checked(
        Command::new(&openssl)
            .current_dir(&tls)
            .args(["x509", "-req", "-days", "2", "-in", "server.csr"])
            .args(["-CA", "ca/ca.crt", "-CAkey", "ca.key", "-CAcreateserial"])
            .args(["-extfile", "server.ext", "-out", "server.crt"]),
    );
    ca_dir.join("ca.crt")
}

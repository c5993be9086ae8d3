//! A real CNCF distribution 2.8 registry (Debian's `/usr/bin/docker-registry`) on a free
//! loopback port, with filesystem storage in a temp dir, and optional basic auth or
//! bearer-token auth against an in-process [`TokenServer`].
//!
//! Its access log (combined log format, one line per request beside the logfmt app lines) is
//! parsed to count requests, which is how tests prove single-flight and dedup.

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use super::http::Endpoint;
use super::token::TokenServer;
use super::{isolate, require_tool, run_checked, wait_until, ChildGuard};

/// The registry binary from Debian's `docker-registry` package.
const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
/// Marks the harness's own log-sync requests so that they are left out of counts.
const SYNC_MARKER: &str = "wasmcache-harness-sync";

/// One request from the registry's access log; `path` includes any query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// Options for [`Registry::builder`].
#[derive(Debug, Default)]
pub struct RegistryBuilder {
    basic_auth: Option<(String, String)>,
    token_auth: Option<TokenAuth>,
    port: Option<u16>,
}

/// The `auth.token` settings of a registry that trusts a [`TokenServer`]: the realm it
/// announces, and the server's signing certificate (copied so that it outlives the server).
#[derive(Clone, Debug)]
struct TokenAuth {
    realm: String,
    cert_pem: Vec<u8>,
}

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct Registry {
    // Declared first so that the process dies before its directory is removed.
    child: Option<ChildGuard>,
    dir: TempDir,
    port: u16,
    credentials: Option<(String, String)>,
    token: Option<TokenAuth>,
    syncs: AtomicU64,
}

impl RegistryBuilder {
    /// Requires HTTP basic auth with this user (a bcrypt htpasswd); with
    /// [`RegistryBuilder::token_auth`], names the token server's user clients present instead.
    pub fn basic_auth(mut self, user: &str, password: &str) -> RegistryBuilder {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Requires bearer tokens from `server` (distribution's `auth.token`), whose first user
    /// becomes the client credentials unless [`RegistryBuilder::basic_auth`] names another.
    pub fn token_auth(mut self, server: &TokenServer) -> RegistryBuilder {
        let cert_pem = fs::read(server.cert_path()).expect("reading the token issuer cert");
        let realm = server.realm_on("127.0.0.1");
        self.token_auth = Some(TokenAuth { realm, cert_pem });
        if self.basic_auth.is_none() {
            self.basic_auth = server
                .credentials()
                .map(|(u, p)| (u.to_owned(), p.to_owned()));
        }
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
        let dir = tempfile::Builder::new().prefix("registry-").tempdir();
        let dir = dir.expect("registry dir");
        if let Some(token) = &self.token_auth {
            fs::write(dir.path().join("token-issuer.crt"), &token.cert_pem).expect("issuer cert");
        } else if let Some((user, password)) = &self.basic_auth {
            let mut htpasswd = Command::new(require_tool("htpasswd"));
            let hash = run_checked(htpasswd.args(["-Bbn", user, password])).stdout;
            fs::write(dir.path().join("htpasswd"), hash).expect("htpasswd");
        }
        let mut registry = Registry {
            child: None,
            dir,
            port: 0,
            credentials: self.basic_auth,
            token: self.token_auth,
            syncs: AtomicU64::new(0),
        };
        // A free port can be taken between probing and binding; try a few.
        for _ in 0..3 {
            registry.port = self.port.unwrap_or_else(free_port);
            if registry.spawn() {
                return registry;
            }
        }
        panic!(
            "docker-registry did not start; its log:\n{}",
            registry.log()
        );
    }
}

impl Registry {
    /// Starts a plain-HTTP registry without auth.
    pub fn start() -> Registry {
        Registry::builder().start()
    }

    /// Options: basic or token auth, port.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Address and credentials, for the fixture and HTTP helpers.
    pub fn endpoint(&self) -> Endpoint {
        let credentials = self.credentials.clone();
        Endpoint {
            addr: self.addr(),
            credentials,
        }
    }

    /// The basic-auth user and password, when started with them; with token auth, the
    /// credentials clients present at the realm.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// Restarts the registry (same port and storage) announcing `realm` instead, e.g. one
    /// clients must not trust; needs [`RegistryBuilder::token_auth`].
    pub fn set_token_realm(&mut self, realm: &str) {
        let token = self
            .token
            .as_mut()
            .expect("registry was started without .token_auth()");
        token.realm = realm.to_owned();
        self.restart();
    }

    /// The registry's process id while it runs (to pause it with `kill -STOP`, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::id)
    }

    /// The combined stdout and stderr of every run so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Every request in the access log, oldest first, across restarts. While running, a marker
    /// request is awaited in the log first, so that every request answered before is in it.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        if self.child.is_some() {
            let marker = format!(
                "{SYNC_MARKER}={}",
                self.syncs.fetch_add(1, Ordering::Relaxed)
            );
            let path = format!("/v2/?{marker}");
            if self.endpoint().try_request("GET", &path, &[], None).is_ok() {
                let logged = wait_until(Duration::from_secs(2), || {
                    self.log()
                        .lines()
                        .any(|l| l.contains(&marker) && parse_access_line(l).is_some())
                });
                assert!(logged, "registry access log never showed {path}");
            }
        }
        let log = self.log();
        let requests = log.lines().filter_map(parse_access_line);
        requests
            .filter(|request| !request.path.contains(SYNC_MARKER))
            .collect()
    }

    /// How many requests used `method` on a path containing `path_substring`.
    pub fn count(&self, method: &str, path_substring: &str) -> usize {
        let requests = self.requests();
        requests
            .iter()
            .filter(|r| r.method == method && r.path.contains(path_substring))
            .count()
    }

    /// How many blob GETs the registry answered, in `repo` or in any repository; 401s (auth
    /// challenges a client then retries) are left out.
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
        let port = self.port;
        assert!(
            self.spawn(),
            "docker-registry did not restart on port {port}:\n{}",
            self.log()
        );
    }

    /// Counts non-401 GETs whose path is `/v2/<repo>/<kind>…` (any repo when `None`).
    fn count_gets(&self, repo: Option<&str>, kind: &str) -> usize {
        let prefix = repo.map(|repo| format!("/v2/{repo}{kind}"));
        let matches = |request: &&LoggedRequest| match &prefix {
            Some(prefix) => request.path.starts_with(prefix),
            None => request.path.starts_with("/v2/") && request.path.contains(kind),
        };
        let requests = self.requests();
        let gets = requests
            .iter()
            .filter(|request| request.method == "GET" && request.status != 401);
        gets.filter(matches).count()
    }

    /// Writes the config, spawns the process and waits for `GET /v2/`; `false` if it never
    /// became ready.
    fn spawn(&mut self) -> bool {
        let dir = self.dir.path();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: {}\n  secret: wasmcache-test\n",
            dir.join("storage").display(),
            self.addr(),
        );
        // JSON strings are valid YAML double-quoted scalars.
        match (&self.token, &self.credentials) {
            (Some(token), _) => config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                 rootcertbundle: {}\n",
                serde_json::json!(token.realm),
                super::token::SERVICE,
                super::token::ISSUER,
                serde_json::json!(dir.join("token-issuer.crt")),
            )),
            (None, Some(_)) => config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: wasmcache-test\n    path: {}\n",
                dir.join("htpasswd").display()
            )),
            (None, None) => {}
        }
        fs::write(dir.join("config.yml"), config).expect("writing registry config");
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"));
        let log = log.expect("opening registry log");
        let mut command = Command::new(REGISTRY_BINARY);
        // The registry reads every REGISTRY_* variable as a config override.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(name);
            }
        }
        isolate(&mut command, dir)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning log handle"))
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut command);
        let endpoint = self.endpoint();
        // Any HTTP answer means it is serving: with auth, `GET /v2/` is a 401 challenge.
        let ready = wait_until(Duration::from_secs(5), || {
            let exited = matches!(child.child_mut().try_wait(), Ok(Some(_)));
            exited || endpoint.try_request("GET", "/v2/", &[], None).is_ok()
        });
        let running = ready && child.child_mut().try_wait().ok().flatten().is_none();
        self.child = running.then_some(child);
        running
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
    let (method, path) = (request.next()?.to_owned(), request.next()?.to_owned());
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(LoggedRequest {
        method,
        path,
        status,
    })
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("probing for a free port");
    listener.local_addr().expect("local address").port()
}

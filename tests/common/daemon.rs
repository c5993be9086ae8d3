//! The real `wasmcache serve` process on a unix socket in a temp data dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;

use super::cli::wasmcache_in;
use super::{wait_until, ChildGuard};

/// How long the daemon may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running daemon; killed when dropped.
pub struct Daemon {
    /// Data dir, kept across restarts.
    pub data_dir: PathBuf,
    /// Its unix socket.
    pub socket: PathBuf,
    home: TempDir,
    child: Option<ChildGuard>,
    args: Vec<String>,
    config: Option<String>,
    log: PathBuf,
}

impl Daemon {
    /// Starts a daemon with `args` after `serve` (e.g. `--insecure-registry`), and the TOML
    /// `config` text when given.
    pub fn start(args: &[&str], config: Option<&str>) -> Daemon {
        Daemon::start_at(None, args, config)
    }

    /// Like [`Daemon::start`] with the data dir at `data_dir` (e.g. a small filesystem).
    pub fn start_at(data_dir: Option<PathBuf>, args: &[&str], config: Option<&str>) -> Daemon {
        let home = tempfile::Builder::new()
            .prefix("daemon-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("daemon home");
        let data_dir = data_dir.unwrap_or_else(|| home.path().join("data"));
        let mut daemon = Daemon {
            socket: data_dir.join("wasmcache.sock"),
            data_dir,
            log: home.path().join("daemon.log"),
            home,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            config: config.map(str::to_owned),
        };
        daemon.spawn();
        daemon
    }

    /// The command line the daemon runs with.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut command = wasmcache_in(self.home.path());
        command
            .arg(subcommand)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(config) = &self.config {
            let path = self.home.path().join("wasmcache.toml");
            fs::write(&path, config).expect("writing the daemon config");
            command.arg("--config").arg(path);
        }
        command
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut command = self.command("serve");
        command
            .args(&self.args)
            .env("WASMCACHE_LOG", "info,wasmcache=debug")
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .stdin(Stdio::null());
        self.child = Some(ChildGuard::spawn(&mut command));
        let socket = self.socket.clone();
        let ready = wait_until(START_TIMEOUT, || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(ready, "daemon did not start serving:\n{}", self.log());
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A gRPC client on the daemon's socket.
    pub async fn client(&self) -> WasmCacheClient<tonic::transport::Channel> {
        wasmcache::client::connect(&self.socket)
            .await
            .expect("connecting to the daemon")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(ChildGuard::id)
            .expect("daemon running")
    }

    /// Sends `signal` (e.g. "TERM", "KILL") and waits up to `timeout` for the exit.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> ExitStatus {
        let pid = self.pid();
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -{signal} {pid}");
        let mut child = self.child.take().expect("daemon running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child
                .child_mut()
                .try_wait()
                .expect("waiting for the daemon")
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?} of SIG{signal}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon again on the same data dir.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.signal_and_wait("TERM", Duration::from_secs(30));
        }
        self.spawn();
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and waits for it to be gone.
    pub fn kill9(&mut self) {
        if self.child.is_some() {
            self.signal_and_wait("KILL", Duration::from_secs(10));
        }
    }

    /// Forgets the log so far (long fault-injection runs would grow it without bound).
    pub fn clear_log(&self) {
        let _ = fs::write(&self.log, b"");
    }

    /// Files directly under `<data-dir>/<sub>`.
    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
        list(&self.data_dir.join(sub))
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A response read by [`unix_request`].
#[derive(Debug)]
pub struct UnixResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

impl UnixResponse {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request over a unix socket with a hyper client.
pub async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> UnixResponse {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connecting to the daemon socket");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
        .expect("valid request");
    let response = sender.send_request(request).await.expect("HTTP request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading the body")
        .to_bytes()
        .to_vec();
    UnixResponse {
        status,
        headers,
        body,
    }
}

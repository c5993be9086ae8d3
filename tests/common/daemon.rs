//! The real `wasmcache serve` process on a unix socket in a temp data dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;

use super::cli::wasmcache_in;
use super::{run_checked, wait_until, ChildGuard};

/// A running daemon; killed when dropped.
pub struct Daemon {
    /// Data dir, kept across restarts.
    pub data_dir: PathBuf,
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
        let home = TempDir::with_prefix_in("daemon-", env!("CARGO_TARGET_TMPDIR"));
        let home = home.expect("daemon home");
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
        command.args([subcommand, "--data-dir"]).arg(&self.data_dir);
        if let Some(config) = &self.config {
            let path = self.home.path().join("wasmcache.toml");
            fs::write(&path, config).expect("writing the daemon config");
            command.arg("--config").arg(path);
        }
        command
    }

    fn spawn(&mut self) {
        let mut log = fs::File::options();
        let log = log
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let starts = self.log().matches("startup_ms=").count();
        let mut command = self.command("serve");
        command
            .args(&self.args)
            .env("WASMCACHE_LOG", "info,wasmcache=debug")
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .stdin(Stdio::null());
        self.child = Some(ChildGuard::spawn(&mut command));
        // The socket is bound before the TCP listeners; `startup_ms` is logged once all are.
        let ready = wait_until(Duration::from_secs(10), || {
            self.log().matches("startup_ms=").count() > starts
        });
        assert!(ready, "daemon did not start serving:\n{}", self.log());
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A gRPC client on the daemon's socket.
    pub async fn client(&self) -> WasmCacheClient<tonic::transport::Channel> {
        let client = wasmcache::client::connect(&self.socket).await;
        client.expect("connecting to the daemon")
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(ChildGuard::id)
            .expect("daemon running")
    }

    /// Sends `signal` (e.g. "TERM", "KILL") and waits up to `timeout` for the exit.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> ExitStatus {
        run_checked(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string()),
        );
        let mut child = self.child.take().expect("daemon running");
        let mut status = None;
        let exited = wait_until(timeout, || {
            status = child
                .child_mut()
                .try_wait()
                .expect("waiting for the daemon");
            status.is_some()
        });
        assert!(
            exited,
            "daemon did not exit within {timeout:?} of SIG{signal}:\n{}",
            self.log()
        );
        status.expect("exited")
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
        let entries = fs::read_dir(self.data_dir.join(sub)).into_iter().flatten();
        entries
            .map(|entry| entry.expect("dir entry").path())
            .collect()
    }
}

/// A response read by [`unix_request`].
pub type UnixResponse = super::http::Response;

/// One HTTP/1.1 request over a unix socket.
pub async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> UnixResponse {
    let stream = tokio::net::UnixStream::connect(socket).await;
    let stream = stream.expect("connecting to the daemon socket");
    let body = body.unwrap_or_default();
    let response = super::http::send(stream, "localhost", method, path, headers, body).await;
    response.unwrap_or_else(|error| panic!("{method} {path} on the daemon socket: {error}"))
}

//! What the end-to-end sections share: child processes under `timeout`, a CNCF distribution
//! registry with its access log, fixtures pushed through the distribution API, the daemon,
//! a cache filled with the library, `/proc` figures, statistics and Markdown tables.
//!
//! Nothing here compiles `tests/common`: the bench needs a plain registry and none of the test
//! harness's auth, TLS or fault injection.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tonic::transport::Channel;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;
use wasmcache::api::proto::{FetchRequest, FetchResponse, PullPolicy};
use wasmcache::format::{Format, OCI_MANIFEST};
use wasmcache::store::{ManifestRecord, PullRecord, Store};
use wasmcache::Digest;

/// Longest any child process, gRPC call or wait may take before the bench fails.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The registry binary from Debian's `docker-registry` package.
const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
/// Where the entries written with the library claim to come from (never contacted).
pub const SYNTHETIC_REGISTRY: &str = "bench.example";

// ---------------------------------------------------------------------------------------------
// Child processes

/// Panics with a hint unless every tool is installed.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = if tool.contains('/') {
            Path::new(tool).is_file()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        };
        assert!(found, "`{tool}` is not installed: run scripts/test-deps");
    }
}

/// The Python of the venv made by `scripts/test-deps` (oras-py).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("WASMCACHE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no venv at {}: run scripts/test-deps",
        venv.display()
    );
    python
}

/// Makes `command` run with `home` as its home and none of the user's credentials, proxies or
/// `WASMCACHE_*` settings.
pub fn isolate<'a>(command: &'a mut Command, home: &Path) -> &'a mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WASMCACHE_") {
            command.env_remove(name);
        }
    }
    command
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .current_dir(home)
        .stdin(Stdio::null())
}

/// `program` under `timeout` (killed after [`TIMEOUT`]), [`isolate`]d in `home`.
pub fn command(program: impl AsRef<std::ffi::OsStr>, home: &Path) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["-k", "5", &TIMEOUT.as_secs().to_string()])
        .arg(program);
    isolate(&mut command, home);
    command
}

/// The `wasmcache` binary measured: the one cargo built for this bench, or another build
/// named by `WASMCACHE_BENCH_BIN` (to compare a baseline in the same tables' form).
pub fn wasmcache() -> String {
    std::env::var("WASMCACHE_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wasmcache").to_owned())
}

/// Runs `command` to its end and panics with its output unless it exits 0.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The first line a short informational command prints (`?` if it cannot run).
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|output| {
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.lines().next().map(|line| line.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Polls `condition` every millisecond until it holds; panics with `what` after [`TIMEOUT`].
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// One oras-py pull, for the venv's Python: `ADDR REFERENCE OUTDIR`.
pub const ORAS_PULL: &str = "import sys, oras.client
addr, reference, outdir = sys.argv[1:4]
client = oras.client.OrasClient(hostname=addr, insecure=True)
client.pull(target=addr + '/' + reference, outdir=outdir)
";

/// Every pull in one Python process: `ADDR OUTDIR REFERENCE…`, reference `i` into `OUTDIR/m{i}`.
pub const ORAS_PULL_ALL: &str = "import os, sys, oras.client
addr, outdir = sys.argv[1:3]
client = oras.client.OrasClient(hostname=addr, insecure=True)
for i, reference in enumerate(sys.argv[3:]):
    client.pull(target=addr + '/' + reference, outdir=os.path.join(outdir, 'm%d' % i))
";

/// Runs `sync -f` on the filesystem of `path`, so that no run pays for another's writeback.
pub fn sync_fs(path: &Path) {
    run_ok(Command::new("sync").arg("-f").arg(path));
}

/// Panics unless the file at `path` hashes to `digest`.
pub fn check_file(path: &Path, digest: &Digest) {
    let bytes = fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    assert_eq!(
        &Digest::of(&bytes),
        digest,
        "{} has other bytes",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Registry

/// A CNCF distribution registry on a free loopback port, storage in a temp dir; killed on drop.
pub struct Registry {
    child: Child,
    dir: TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    marks: AtomicU64,
}

impl Registry {
    pub fn start() -> Registry {
        require_tools(&[REGISTRY_BINARY]);
        let dir = tempfile::Builder::new()
            .prefix("wasmcache-bench-registry-")
            .tempdir()
            .expect("registry dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: bench\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("registry config");
        let log = File::create(dir.path().join("registry.log")).expect("registry log");
        let mut command = Command::new(REGISTRY_BINARY);
        // The registry reads every REGISTRY_* variable as a config override.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry {
            child,
            dir,
            addr,
            marks: AtomicU64::new(0),
        };
        wait_for("the registry to answer", || {
            registry
                .get("/v2/")
                .is_some_and(|head| head.contains(" 200 "))
        });
        registry
    }

    /// Sends `GET path` and returns the status line and headers, or `None` if unreachable.
    fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(TIMEOUT)).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    /// How many non-401 `GET /v2/<repo>/<kind>` the registry answered (`kind`: `blobs` or
    /// `manifests`), from its access log.
    pub fn gets(&self, repo: &str, kind: &str) -> usize {
        let prefix = format!("\"GET /v2/{repo}/{kind}/");
        self.log_complete()
            .lines()
            .filter(|line| line.contains(&prefix) && !line.contains("\" 401 "))
            .count()
    }

    /// How many `GET /v2/` version probes the registry answered, from its access log.
    pub fn probes(&self) -> usize {
        self.log_complete()
            .lines()
            .filter(|line| line.contains("\"GET /v2/ HTTP"))
            .count()
    }

    /// Every request the registry answered, in the order its access log has them, as
    /// `METHOD URI STATUS` (the bench's own marks left out).
    pub fn requests(&self) -> Vec<String> {
        self.log_complete()
            .lines()
            .filter_map(access_entry)
            .filter(|entry| !entry.contains("?mark="))
            .collect()
    }

    /// The access log, once every request sent before this call is in it.
    fn log_complete(&self) -> String {
        // A marked request, awaited in the log, so that every earlier request is in it too.
        let mark = format!("/v2/?mark={}", self.marks.fetch_add(1, Ordering::Relaxed));
        self.get(&mark).expect("the registry answers");
        let log = || fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        wait_for("the registry's access log", || {
            log().contains(&format!("\"GET {mark} "))
        });
        log()
    }
}

/// `METHOD URI STATUS` of an access-log line (`… [time] "GET /v2/ HTTP/1.1" 200 2 …`), or
/// `None` for the registry's other log lines.
fn access_entry(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let (method, uri) = (parts.next()?, parts.next()?);
    parts.next()?.starts_with("HTTP/").then_some(())?;
    let status = rest.split_whitespace().next()?;
    Some(format!("{method} {uri} {status}"))
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer or config to push: media type, bytes, and the file name oras-py writes it to.
pub struct Blob<'a> {
    pub media_type: &'a str,
    pub bytes: &'a [u8],
    pub title: Option<&'a str>,
}

/// Pushes an OCI image manifest of `config` and `layers` as `repo:tag` through the
/// distribution API (what oras-py and skopeo do, without their start-up).
pub async fn push(addr: &str, reference: &str, config: Blob<'_>, layers: &[Blob<'_>]) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (repo, tag) = reference.rsplit_once(':').expect("repo:tag");
    let client = reqwest::Client::new();
    let mut descriptors = Vec::new();
    for blob in std::iter::once(&config).chain(layers) {
        let digest = Digest::of(blob.bytes);
        let started = client
            .post(format!("http://{addr}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .expect("starting an upload");
        assert_eq!(started.status(), 202, "starting an upload to {repo}");
        let location = started.headers()["location"].to_str().expect("location");
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = if location.starts_with("http") {
            format!("{location}{separator}digest={digest}")
        } else {
            format!("http://{addr}{location}{separator}digest={digest}")
        };
        let finished = client
            .put(url)
            .body(blob.bytes.to_vec())
            .send()
            .await
            .expect("uploading a blob");
        assert_eq!(finished.status(), 201, "uploading {digest} to {repo}");
        let mut descriptor = serde_json::json!({
            "mediaType": blob.media_type, "digest": digest.to_string(), "size": blob.bytes.len(),
        });
        if let Some(title) = blob.title {
            descriptor["annotations"] =
                serde_json::json!({"org.opencontainers.image.title": title});
        }
        descriptors.push(descriptor);
    }
    let config = descriptors.remove(0);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": descriptors,
    });
    let answer = client
        .put(format!("http://{addr}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.to_string())
        .send()
        .await
        .expect("putting the manifest");
    assert_eq!(answer.status(), 201, "putting the manifest of {reference}");
}

/// Pushes `module` as a CNCF Wasm artifact (`application/wasm` layer titled `module.wasm`).
pub async fn push_module(addr: &str, reference: &str, module: &[u8]) {
    let config = serde_json::json!({
        "architecture": "wasm", "os": "wasip1", "layerDigests": [Digest::of(module).to_string()],
    })
    .to_string();
    let config = Blob {
        media_type: "application/vnd.wasm.config.v0+json",
        bytes: config.as_bytes(),
        title: None,
    };
    let layer = Blob {
        media_type: "application/wasm",
        bytes: module,
        title: Some("module.wasm"),
    };
    push(addr, reference, config, &[layer]).await;
}

/// A valid module of exactly `size` bytes (at least 64): the 41-byte module exporting
/// `add(i32, i32) -> i32` and a custom section `pad` of pseudo-random bytes from `seed`.
pub fn module(size: usize, seed: u64) -> Vec<u8> {
    const ADD: [u8; 41] = [
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 0x01, 0x07, 0x01, 0x60, 0x02, 0x7f, 0x7f,
        0x01, 0x7f, 0x03, 0x02, 0x01, 0x00, 0x07, 0x07, 0x01, 0x03, b'a', b'd', b'd', 0x00, 0x00,
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x20, 0x00, 0x20, 0x01, 0x6a, 0x0b,
    ];
    assert!(size >= 64, "a padded module has at least 64 bytes");
    let mut bytes = ADD.to_vec();
    // Section id, a 5-byte LEB128 length (padded, so any size fits), the name "pad".
    let payload = size - ADD.len() - 1 - 5;
    bytes.push(0);
    let mut length = payload as u64;
    for i in 0..5 {
        bytes.push((length & 0x7f) as u8 | if i < 4 { 0x80 } else { 0 });
        length >>= 7;
    }
    bytes.extend_from_slice(b"\x03pad");
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while bytes.len() < size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    bytes.truncate(size);
    bytes
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// A `wasmcache serve --log info` process on `dir/data`; ready when `start` returns, killed on
/// drop.
pub struct Daemon {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pid: u32,
    /// Spawn → the socket accepts a connection.
    pub accepted: Duration,
    /// Spawn → `GET /readyz` answers 200.
    pub ready: Duration,
}

impl Daemon {
    /// Starts a daemon on `dir/data` (which may hold a cache) with the TOML `config` and `args`.
    pub fn start(dir: &Path, config: &str, args: &[&str]) -> Daemon {
        let home = dir.join("home");
        fs::create_dir_all(&home).expect("daemon home");
        let data_dir = dir.join("data");
        let socket = data_dir.join("wasmcache.sock");
        let log = dir.join("serve.log");
        let config_path = home.join("wasmcache.toml");
        fs::write(&config_path, config).expect("daemon config");
        let mut command = Command::new(wasmcache());
        isolate(&mut command, &home)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(config_path)
            .args(["--log", "info"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("daemon log"));
        let spawned = Instant::now();
        let child = command.spawn().expect("starting wasmcache serve");
        let pid = child.id();
        let mut accepted = None;
        let mut daemon = Daemon {
            child: Some(child),
            data_dir,
            socket,
            log,
            pid,

            accepted: Duration::ZERO,
            ready: Duration::ZERO,
        };
        wait_for("the daemon to answer /readyz", || {
            let Ok(stream) = UnixStream::connect(&daemon.socket) else {
                return false;
            };
            accepted.get_or_insert(spawned.elapsed());
            readyz(stream)
        });
        daemon.ready = spawned.elapsed();
        daemon.accepted = accepted.expect("connected");
        daemon
    }

    /// The `startup_ms` the daemon logged (from entering `daemon::run` to serving).
    pub fn logged_startup_ms(&self) -> u64 {
        let mut logged = None;
        wait_for("startup_ms in the daemon's log", || {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            logged = text
                .split("startup_ms=")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse().ok());
            logged.is_some()
        });
        logged.expect("logged")
    }

    /// A gRPC client on the socket.
    pub async fn client(&self) -> WasmCacheClient<Channel> {
        tokio::time::timeout(TIMEOUT, wasmcache::client::connect(&self.socket))
            .await
            .expect("connecting timed out")
            .expect("connecting to the daemon")
    }

    /// SIGTERM, then waits for a clean exit; returns how long the daemon took to exit.
    pub fn stop(&mut self) -> Duration {
        let signalled = Instant::now();
        run_ok(Command::new("kill").args(["-TERM", &self.pid.to_string()]));
        let mut child = self.child.take().expect("daemon running");
        let mut status = None;
        wait_for("the daemon to exit after SIGTERM", || {
            status = child.try_wait().expect("waiting for the daemon");
            status.is_some()
        });
        let status = status.expect("exited");
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "the daemon exited with {status}:\n{log}");
        signalled.elapsed()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `GET /readyz` on a fresh HTTP/1.1 connection; whether it answered 200.
fn readyz(mut stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut answer = Vec::new();
    stream.write_all(request).is_ok()
        && stream.take(64 << 10).read_to_end(&mut answer).is_ok()
        && answer.starts_with(b"HTTP/1.1 200")
}

/// `Fetch(reference, policy)` under [`TIMEOUT`]; panics on an error.
pub async fn fetch(
    client: &mut WasmCacheClient<Channel>,
    reference: &str,
    policy: PullPolicy,
) -> FetchResponse {
    let request = FetchRequest {
        reference: reference.to_owned(),
        pull_policy: policy.into(),
        ..Default::default()
    };
    tokio::time::timeout(TIMEOUT, client.fetch(request))
        .await
        .expect("Fetch timed out")
        .unwrap_or_else(|status| panic!("Fetch {reference}: {status}"))
        .into_inner()
}

// ---------------------------------------------------------------------------------------------
// A cache written with the library

/// The reference of synthetic entry `i`.
pub fn synthetic_reference(i: usize) -> String {
    format!("{SYNTHETIC_REGISTRY}/r/m{i}:v1")
}

/// Writes `count` entries into `data_dir` with no daemon running, as pulls of CNCF artifacts
/// leave them: a distinct 64-byte module file per entry (read-only, as `commit` leaves it;
/// one `sync -f` at the end instead of an fsync per file) with its module, manifest and
/// reference records. This is the one place the bench writes the index itself.
pub fn populate(data_dir: &Path, count: usize) {
    let store = Store::open(data_dir).expect("opening the store");
    let write = |i: usize| {
        let bytes = module(64, i as u64);
        let digest = Digest::of(&bytes);
        let path = store.blob_path(&digest);
        fs::write(&path, &bytes).expect("writing a blob");
        let mut permissions = fs::metadata(&path).expect("stat").permissions();
        permissions.set_readonly(true);
        fs::set_permissions(&path, permissions).expect("chmod");
        (digest, bytes.len() as u64)
    };
    let modules: Vec<(Digest, u64)> = thread::scope(|scope| {
        let halves: Vec<_> = (0..2)
            .map(|t| {
                let write = &write;
                scope.spawn(move || {
                    (t..count)
                        .step_by(2)
                        .map(|i| (i, write(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<_> = halves
            .into_iter()
            .flat_map(|half| half.join().expect("writer thread"))
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, module)| module).collect()
    });
    let references: Vec<String> = (0..count).map(synthetic_reference).collect();
    let manifests: Vec<Digest> = (0..count)
        .map(|i| Digest::of(format!("manifest {i}").as_bytes()))
        .collect();
    let pulls = modules
        .iter()
        .enumerate()
        .map(|(i, (digest, size))| PullRecord {
            reference: &references[i],
            manifest_digest: &manifests[i],
            index_digest: None,
            manifest: ManifestRecord {
                module_digest: digest.clone(),
                format: Format::CncfWasm,
                layer_digest: digest.to_string(),
                wasme: None,
                media_type: OCI_MANIFEST.to_owned(),
                config_digest: None,
                served: false,
                proxy_wasm_abi: Vec::new(),
            },
            module_size: *size,
            image_layer: false,
            documents: Vec::new(),
        });
    store.record_pulls(pulls).expect("recording the entries");
    drop(store);
    sync_fs(data_dir);
}

// ---------------------------------------------------------------------------------------------
// /proc

/// Clock ticks per second of `/proc` CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// User + system CPU time of every thread of `pid`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/<pid>/stat");
    // Fields after the command name (which may hold spaces): utime is field 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

/// A `/proc/<pid>/status` line in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------------------------
// Statistics and tables

/// Nearest-rank quantile of sorted `samples`, `q` in (0, 1].
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median of `samples` (any order).
pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    quantile(&sorted, 0.5)
}

/// `12 µs`, `3.4 ms`, `120 ms`.
pub fn time(duration: Duration) -> String {
    let us = duration.as_secs_f64() * 1e6;
    match us {
        _ if us < 1000.0 => format!("{us:.0} µs"),
        _ if us < 10_000.0 => format!("{:.2} ms", us / 1000.0),
        _ => format!("{:.0} ms", us / 1000.0),
    }
}

/// `8` if every run counted as many, else `8–9`.
pub fn count_range(counts: impl Iterator<Item = usize> + Clone) -> String {
    let (low, high) = (counts.clone().min(), counts.max());
    match (low, high) {
        (Some(low), Some(high)) if low == high => low.to_string(),
        (Some(low), Some(high)) => format!("{low}–{high}"),
        _ => "–".to_owned(),
    }
}

/// `{:.1} MiB` of a KiB figure.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints one Markdown table: a heading, the command that produced it, the rows.
pub fn print_table(heading: &str, command: &str, columns: &[&str], rows: &[Vec<String>]) {
    println!("\n#### {heading}\n\nCommand: `{command}`\n");
    println!("| {} |", columns.join(" | "));
    // Text columns are left-aligned, figures right-aligned.
    let rule: Vec<&str> = columns
        .iter()
        .enumerate()
        .map(|(i, name)| {
            match i == 0 || matches!(*name, "command" | "load" | "registry access log") {
                true => "---",
                false => "---:",
            }
        })
        .collect();
    println!("|{}|", rule.join("|"));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

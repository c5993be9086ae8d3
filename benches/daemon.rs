//! The `wasmcache serve` daemon measured over its unix socket:
//!
//! 1. warm-hit `Fetch` (gRPC, `IF_NOT_PRESENT`, module cached): p50, p99 and hits/s at 1, 64
//!    and 256 concurrent clients in a closed loop and at 64 clients with Poisson arrivals at 10,000 and 20,000 hits/s,
//!    with the daemon's CPU time per hit;
//! 2. single-flight: 1000 concurrent `Fetch`es of one uncached 32 MiB module, the registry's
//!    blob and manifest GETs counted in its access log, against lone cold fetches of equal
//!    modules;
//! 3. start-up time (spawn → socket accepts → `/readyz` 200) and RSS with 10,000 cached
//!    entries, and with an empty cache;
//! 4. a 50 MiB module read over the socket (curl, gRPC `ReadModule`, an in-process hyper
//!    client) against `cat` of its blob file;
//! 5. the `/v1/modules` request rate at 64 keep-alive HTTP/1.1 connections, for a 41-byte and
//!    a 1 MiB module.
//!
//! Everything runs on this machine: a CNCF distribution registry on a free loopback port and
//! fixtures pushed with oras-py (the test helpers in `tests/common`), the real `wasmcache`
//! binary run as `wasmcache serve --log info` in a temp data dir, and the load generator in
//! this process (a tokio runtime with two worker threads; the paced loads on one thread of
//! their own). The load generator shares the
//! machine's cores with the daemon, so every load table shows the daemon's own CPU time
//! (`/proc/<pid>/stat` utime + stime over the measured window) beside the rate, and the CPU
//! time of the rest of the machine (`/proc/stat`), which shows when other work skewed a run. The 10,000
//! entries are written with the library (`Store::commit` and the index) while no daemon runs,
//! not pulled. Every response is checked (cache hit, digest, status, byte count) before it
//! counts, and every request, child process and loop is bounded in time.
//!
//! Environment:
//! - `WASMCACHE_BENCH_WARM_ONLY=1`: run the warm-hit loads alone, print their table and stop
//!   (writes nothing), for quick rounds of latency work.
//! - `WASMCACHE_BENCH_LOADS=GENERATOR:CLIENTS[:RATE],...` (with `WARM_ONLY`): run these
//!   warm-hit loads instead of the usual rows, in this order (a load may repeat), e.g.
//!   `h2wire:64:20000,h2wire:64:20000,tonic:1`, to profile or repeat one row.
//! - `WASMCACHE_BENCH_DAEMON_CONFIG=TOML`: a config file for the daemon of the warm-hit and
//!   single-flight sections (e.g. `worker_threads = 2`), to compare settings.
//! - `WASMCACHE_BENCH_WRITE=1`: also write the tables into `BENCHMARKS.md` between
//!   `<!-- daemon:begin -->` and `<!-- daemon:end -->` (appended under `## Daemon` when the
//!   markers are missing).
//!
//! Run without `--bench` (e.g. `cargo test --benches`), everything runs once at a small scale
//! as a smoke test and nothing is written.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::{cpu_model, h2wire, tool_output};

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::runtime::Runtime;
use tokio::time::timeout;
use tonic::transport::Channel;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;
use wasmcache::api::proto::{FetchRequest, FetchResponse, PullPolicy, ReadModuleRequest};
use wasmcache::store::Store;
use wasmcache::Digest;

use common::{fixtures, wasm, ChildGuard, Daemon, Registry};

/// The warm-hit `Fetch` loads: concurrent clients, the total rate they are paced to (`None`:
/// each sends its next request as soon as the last is answered), and the client they use.
const FETCH_LEVELS: [(usize, Option<u32>, Generator); 10] = [
    (1, None, Generator::Tonic),
    (64, None, Generator::Tonic),
    (256, None, Generator::Tonic),
    (64, Some(PACED_RATES[0]), Generator::Tonic),
    (64, Some(PACED_RATES[1]), Generator::Tonic),
    (1, None, Generator::Wire),
    (64, None, Generator::Wire),
    (256, None, Generator::Wire),
    (64, Some(PACED_RATES[0]), Generator::Wire),
    (64, Some(PACED_RATES[1]), Generator::Wire),
];
/// The gRPC client a warm-hit load is generated with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Generator {
    /// `wasmcache::client` (a tonic `Channel`): what a Rust agent would use.
    Tonic,
    /// [`support::h2wire`]: the same calls for a fraction of the CPU, so that the load
    /// generator takes less of the two cores from the daemon it measures.
    Wire,
}

impl Generator {
    fn label(self) -> &'static str {
        match self {
            Generator::Tonic => "tonic",
            Generator::Wire => "h2wire",
        }
    }
}
/// Total hits per second offered by the paced rows: half the 20,000/s target, and the target.
const PACED_RATES: [u32; 2] = [10_000, 20_000];
/// Concurrent gRPC clients sharing one HTTP/2 connection.
const CLIENTS_PER_CONNECTION: usize = 32;
/// Keep-alive HTTP/1.1 connections of the `/v1/modules` load.
const HTTP_CONNECTIONS: usize = 64;
/// Worker threads of the load generator's runtime (the machine has two cores).
const LOAD_THREADS: usize = 2;
/// Longest any one request may take before the bench fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the daemon may take to start or stop.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a child process (curl, cat, kill) may run.
const CHILD_TIMEOUT_SECS: u32 = 60;
/// Threads writing the cache entries (fsyncs from many threads share journal commits).
const POPULATE_THREADS: usize = 16;
/// Longest wait, before each measured section, for other work on the machine to stop.
const QUIET_WAIT: Duration = Duration::from_secs(20);
/// CPU share of one core that the rest of the machine may use for it to count as quiet.
const QUIET_SHARE: f64 = 0.15;
/// Idle time before the idle RSS is read.
const IDLE: Duration = Duration::from_secs(1);
/// The small module served by the registry for warm hits.
const HOT: &str = "bench/hot:v1";
/// The module fetched by 1000 callers at once.
const FLIGHT: &str = "bench/flight:v1";
/// Where the synthetic cache entries claim to come from (never contacted).
const SYNTHETIC_REGISTRY: &str = "bench.example";
/// Markers around the generated part of `BENCHMARKS.md`.
const BEGIN_MARKER: &str = "<!-- daemon:begin -->";
const END_MARKER: &str = "<!-- daemon:end -->";

/// How much of everything to do.
struct Scale {
    /// Warm-up before each measured load window.
    warmup: Duration,
    /// Measured window of each load.
    window: Duration,
    /// Concurrent callers of the single-flight case.
    flight_callers: usize,
    /// Size of the single-flight and lone modules.
    flight_bytes: usize,
    /// Lone cold fetches (each of its own module).
    lone_fetches: usize,
    /// Cache entries for the start-up and RSS case.
    entries: usize,
    /// Start-ups timed per data dir.
    startups: usize,
    /// Warm hits before the idle RSS is read.
    rss_hits: usize,
    /// Size of the module downloaded whole.
    download_bytes: usize,
    /// Size of the larger `/v1/modules` module.
    medium_bytes: usize,
    /// Measured downloads per reader.
    download_runs: usize,
}

/// `cargo bench --bench daemon`.
const FULL: Scale = Scale {
    warmup: Duration::from_millis(500),
    window: Duration::from_secs(3),
    flight_callers: 1000,
    flight_bytes: 32 << 20,
    lone_fetches: 3,
    entries: 10_000,
    startups: 5,
    rss_hits: 500,
    download_bytes: 50 << 20,
    medium_bytes: 1 << 20,
    download_runs: 11,
};

/// A smoke run (`cargo test --benches`): every path once, quickly.
const SMOKE: Scale = Scale {
    warmup: Duration::from_millis(50),
    window: Duration::from_millis(200),
    flight_callers: 50,
    flight_bytes: 1 << 20,
    lone_fetches: 1,
    entries: 200,
    startups: 1,
    rss_hits: 20,
    download_bytes: 4 << 20,
    medium_bytes: 1 << 20,
    download_runs: 1,
};

fn main() {
    let bench_mode = std::env::args().any(|arg| arg == "--bench");
    let write = bench_mode && std::env::var_os("WASMCACHE_BENCH_WRITE").is_some_and(|v| v == "1");
    let scale = if bench_mode { &FULL } else { &SMOKE };
    for tool in ["curl", "cat", "kill", "getconf", "timeout"] {
        common::require_tool(tool);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(LOAD_THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let began = Instant::now();

    eprintln!("daemon bench: starting a registry and pushing fixtures");
    let registry = Registry::start();
    let addr = registry.addr();
    let hot = wasm::module(1024, 1);
    fixtures::oras_push_cncf(&registry, HOT, &hot);
    let flight_module = module_of_size(scale.flight_bytes, 0xf1);
    fixtures::oras_push_cncf(&registry, FLIGHT, &flight_module);
    let flight_digest = wasm::digest(&flight_module);
    drop(flight_module);
    let mut lone_digests = Vec::new();
    for k in 0..scale.lone_fetches {
        let module = module_of_size(scale.flight_bytes, 0x10 + k as u64);
        fixtures::oras_push_cncf(&registry, &lone(k), &module);
        lone_digests.push(wasm::digest(&module));
    }
    let daemon_config = std::env::var("WASMCACHE_BENCH_DAEMON_CONFIG").ok();
    let warm_only = std::env::var_os("WASMCACHE_BENCH_WARM_ONLY").is_some_and(|v| v == "1");
    assert!(
        warm_only || std::env::var_os("WASMCACHE_BENCH_LOADS").is_none(),
        "WASMCACHE_BENCH_LOADS needs WASMCACHE_BENCH_WARM_ONLY=1 (the tables expect every row)"
    );
    let daemon = Daemon::start(
        &["--log", "info", "--insecure-registry", &addr],
        daemon_config.as_deref(),
    );

    wait_for_quiet("warm-hit Fetch");
    let hot_reference = format!("{addr}/{HOT}");
    let fetch_loads = warm_hits(&runtime, &registry, &daemon, &hot_reference, scale);
    if warm_only {
        print!("{}", warm_hit_table(&fetch_loads, scale));
        return;
    }

    wait_for_quiet("single-flight");
    let flight = single_flight(
        &runtime,
        &registry,
        &daemon,
        &hot_reference,
        &flight_digest,
        &lone_digests,
        scale,
    );
    drop(daemon);
    drop(registry);

    wait_for_quiet("start-up with an empty cache");
    let logs = tempfile::Builder::new()
        .prefix("wasmcache-bench-daemon-")
        .tempdir()
        .expect("bench log dir");
    let empty = stopped_daemon();
    let (empty_startup, mut child) = startups(&empty, 0, scale.startups, logs.path());
    let mut empty_startup = idle_rss(&runtime, empty_startup, &child, &empty, &[]);
    empty_startup
        .stops
        .push(stop(&mut child, &empty_startup.last_log));
    drop(empty);

    eprintln!(
        "daemon bench: writing {} cache entries with the library",
        scale.entries
    );
    let full = stopped_daemon();
    let populated = Instant::now();
    let cache = populate(&full.data_dir, scale);
    let populate_time = populated.elapsed();
    wait_for_quiet(&format!("start-up with {} entries", scale.entries));
    let (full_startup, mut child) = startups(&full, scale.entries, scale.startups, logs.path());
    let rss_references: Vec<String> = (0..scale.rss_hits)
        .map(|i| tiny_reference(i * cache.tiny.len() / scale.rss_hits))
        .collect();
    check_served(&runtime, &full, &cache);
    let mut full_startup = idle_rss(&runtime, full_startup, &child, &full, &rss_references);
    let every: Vec<String> = (0..cache.tiny.len()).map(tiny_reference).collect();
    full_startup.rss_all_kib = Some(rss_after_every_hit(&runtime, &child, &full, every));
    let pid = child.id().expect("daemon running");

    wait_for_quiet("module downloads");
    let downloads = downloads(&runtime, &full, &cache.big, &cache.small, scale);
    wait_for_quiet("/v1/modules request rate");
    let module_loads = [&cache.small, &cache.medium].map(|module| {
        (
            module.size,
            runtime.block_on(modules_load(&full.socket, pid, module, scale)),
        )
    });
    let rss_after_load = rss_kib(pid, "VmRSS");
    full_startup
        .stops
        .push(stop(&mut child, &full_startup.last_log));
    drop(full);

    let tables = tables(&Results {
        fetch_loads,
        flight,
        startups: [empty_startup, full_startup],
        populate_time,
        downloads,
        module_loads,
        rss_after_load,
        scale,
    });
    print!("{tables}");
    eprintln!(
        "daemon bench: done in {:.0} s",
        began.elapsed().as_secs_f64()
    );
    if write {
        write_benchmarks_md(&tables);
        eprintln!("daemon bench: wrote BENCHMARKS.md");
    }
}

/// Waits up to [`QUIET_WAIT`] until the rest of the machine (everything but this process and
/// the idle daemon) used less than [`QUIET_SHARE`] of a core over half a second, so that other
/// work skews the next section less; goes on regardless after that, saying so. The load tables
/// show what the rest of the machine used during each window either way.
fn wait_for_quiet(section: &str) {
    let sample = Duration::from_millis(500);
    let deadline = Instant::now() + QUIET_WAIT;
    loop {
        let before = machine_cpu_time().saturating_sub(own_and_children_cpu_time());
        thread::sleep(sample);
        let other = machine_cpu_time()
            .saturating_sub(own_and_children_cpu_time())
            .saturating_sub(before);
        let share = other.as_secs_f64() / sample.as_secs_f64();
        if share < QUIET_SHARE {
            eprintln!("daemon bench: {section}");
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "daemon bench: {section} (the rest of the machine still uses {:.0} % of a core \
                 after {} s of waiting; measuring anyway)",
                share * 100.0,
                QUIET_WAIT.as_secs()
            );
            return;
        }
    }
}

/// The repository and tag of the `k`th lone module.
fn lone(k: usize) -> String {
    format!("bench/lone{k}:v1")
}

/// A valid module of exactly `size` bytes (the padding shrunk by the section header).
fn module_of_size(size: usize, seed: u64) -> Vec<u8> {
    let mut extra = size.saturating_sub(50);
    for _ in 0..4 {
        let module = wasm::module(extra, seed);
        if module.len() == size {
            return module;
        }
        if module.len() > size {
            extra -= module.len() - size;
        } else {
            extra += size - module.len();
        }
    }
    panic!("cannot make a module of exactly {size} bytes");
}

// ---------------------------------------------------------------------------------------------
// Load generation

/// One measured load window.
struct Load {
    /// Requests per second offered in total, or `None` for a closed loop.
    paced: Option<u32>,
    /// The gRPC client of a warm-hit load (`None` for the HTTP loads).
    generator: Option<Generator>,
    /// Connections the clients were spread over.
    connections: usize,
    window: Duration,
    /// Latency of each request that completed inside the window, sorted, in nanoseconds.
    latencies: Vec<u64>,
    /// Body bytes received by those requests.
    bytes: u64,
    /// The daemon's CPU time over the window.
    daemon_cpu: Duration,
    /// This process's CPU time over the window.
    own_cpu: Duration,
    /// CPU time of every other process on the machine over the window.
    other_cpu: Duration,
    /// With `paced`: how late the pacer itself handed out arrivals (p99), the load
    /// generator's own share of the latencies.
    pacer_late_p99: Option<Duration>,
}

impl Load {
    fn requests(&self) -> usize {
        self.latencies.len()
    }

    fn rate(&self) -> f64 {
        self.requests() as f64 / self.window.as_secs_f64()
    }

    /// Nearest-rank quantile, `q` in (0, 1].
    fn quantile(&self, q: f64) -> Duration {
        let n = self.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Duration::from_nanos(self.latencies[rank - 1])
    }

    fn daemon_cpu_per_request(&self) -> Duration {
        self.daemon_cpu
            .checked_div(self.requests().max(1) as u32)
            .unwrap_or_default()
    }

    fn cpu_share(cpu: Duration, window: Duration) -> String {
        format!("{:.0} %", 100.0 * cpu.as_secs_f64() / window.as_secs_f64())
    }
}

/// Runs `request` on every worker: a warm-up, then a measured window in which every request
/// that completes is counted; the daemon's, this process's and the machine's CPU time are
/// read at the window's edges.
///
/// Without `paced`, each worker sends its next request as soon as the last is answered (a
/// closed loop). With `paced: Some(rate)`, requests arrive as a Poisson process of `rate` per
/// second in total (exponential gaps from a seeded generator), dealt to the workers in turn by
/// a pacer task that sleeps to each arrival on a [`Timer`] (tokio's timer, with its 1 ms
/// resolution, would release every request due within a millisecond at once). A request that
/// waits for its worker's previous one is timed from its arrival, so queueing is not hidden.
async fn run_load<W, F, Fut>(
    pid: u32,
    connections: usize,
    workers: Vec<W>,
    scale: &Scale,
    paced: Option<u32>,
    request: F,
) -> Load
where
    W: Send + 'static,
    F: Fn(W) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = (W, u64)> + Send + 'static,
{
    let start = Instant::now();
    let begin = start + scale.warmup;
    let end = begin + scale.window;
    let count = workers.len();
    let mut arrivals = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..count {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(sender);
        arrivals.push(receiver);
    }
    let pacer = paced.map(|rate| {
        tokio::spawn(async move {
            let timer = Timer::new();
            let mut random = 0x9e37_79b9_7f4a_7c15_u64;
            let mut due = start;
            let mut next_worker = 0;
            let mut late = Vec::new();
            while due < end {
                // xorshift64*, then an exponential gap of mean 1/rate.
                random ^= random >> 12;
                random ^= random << 25;
                random ^= random >> 27;
                let uniform =
                    (random.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
                due += Duration::from_secs_f64(-(1.0 - uniform).ln() / f64::from(rate));
                if due > Instant::now() {
                    timer.sleep_until(due).await;
                }
                if due >= begin {
                    late.push(Instant::now().saturating_duration_since(due));
                }
                if senders[next_worker].send(due).is_err() {
                    break;
                }
                next_worker = (next_worker + 1) % senders.len();
            }
            late
        })
    });
    let tasks: Vec<_> = workers
        .into_iter()
        .zip(arrivals)
        .map(|(worker, mut arrivals)| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut worker = worker;
                let mut latencies = Vec::new();
                let mut bytes = 0;
                loop {
                    let sent = if paced.is_some() {
                        match arrivals.recv().await {
                            Some(due) => due,
                            None => break,
                        }
                    } else {
                        Instant::now()
                    };
                    if sent >= end {
                        break;
                    }
                    let (next, received) = timeout(REQUEST_TIMEOUT, request(worker))
                        .await
                        .expect("a request timed out");
                    worker = next;
                    let done = Instant::now();
                    if done >= begin && done < end {
                        latencies.push(done.duration_since(sent).as_nanos() as u64);
                        bytes += received;
                    }
                }
                (latencies, bytes)
            })
        })
        .collect();
    tokio::time::sleep_until(begin.into()).await;
    let before = (
        cpu_time(&pid.to_string()),
        cpu_time("self"),
        machine_cpu_time(),
    );
    tokio::time::sleep_until(end.into()).await;
    let after = (
        cpu_time(&pid.to_string()),
        cpu_time("self"),
        machine_cpu_time(),
    );
    let mut latencies = Vec::new();
    let mut bytes = 0;
    let pacer_late_p99 = match pacer {
        Some(pacer) => Some(pacer.await.expect("the pacer panicked")),
        None => None,
    }
    .map(|mut late| {
        late.sort_unstable();
        late.get((late.len() * 99 / 100).min(late.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    });
    for task in tasks {
        let (some, received) = task.await.expect("a load worker failed");
        latencies.extend(some);
        bytes += received;
    }
    latencies.sort_unstable();
    assert!(!latencies.is_empty(), "no request completed in the window");
    let daemon_cpu = after.0.saturating_sub(before.0);
    let own_cpu = after.1.saturating_sub(before.1);
    Load {
        paced,
        generator: None,
        connections,
        window: scale.window,
        latencies,
        bytes,
        daemon_cpu,
        own_cpu,
        other_cpu: after
            .2
            .saturating_sub(before.2)
            .saturating_sub(daemon_cpu + own_cpu),
        pacer_late_p99,
    }
}

/// A one-shot timer with nanosecond resolution that the runtime's own event loop waits on
/// (a `timerfd`), so a paced arrival wakes the load generator's thread directly, without a
/// second thread handing it over. tokio's timer rounds to 1 ms.
struct Timer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// `Instant::now()` and `CLOCK_MONOTONIC` read together (`Instant` is that clock).
    base: (Instant, libc::timespec),
}

impl Timer {
    fn new() -> Timer {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system calls; the fd is owned from here on.
        let fd = unsafe {
            let raw = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            assert!(
                raw >= 0,
                "timerfd_create: {}",
                std::io::Error::last_os_error()
            );
            std::os::fd::OwnedFd::from_raw_fd(raw)
        };
        let instant = Instant::now();
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes into `now`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        Timer {
            // SAFETY: the OwnedFd stays open, and the same fd, for the AsyncFd's lifetime.
            fd: unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .unwrap_or_else(|error| panic!("registering the timerfd: {error}")),
            base: (instant, now),
        }
    }

    /// Waits until `due` (returns at once if it has passed).
    async fn sleep_until(&self, due: Instant) {
        use std::os::fd::AsRawFd;
        let offset = due.saturating_duration_since(self.base.0);
        let nanos = self.base.1.tv_nsec as u64 + u64::from(offset.subsec_nanos());
        let value = libc::timespec {
            tv_sec: self.base.1.tv_sec
                + offset.as_secs() as libc::time_t
                + (nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: arms our own timerfd with an absolute expiry.
        let armed = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(
            armed,
            0,
            "timerfd_settime: {}",
            std::io::Error::last_os_error()
        );
        loop {
            let mut ready = self.fd.readable().await.expect("timerfd readable");
            let read = ready.try_io(|fd| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads 8 bytes into the buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n == 8 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
            if let Ok(result) = read {
                result.expect("reading the timerfd");
                return;
            }
        }
    }
}

/// Clock ticks per second of `/proc` CPU times.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let output = common::run_checked(Command::new("getconf").arg("CLK_TCK"));
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("getconf CLK_TCK prints a number")
    })
}

/// Busy CPU time of the whole machine (every CPU, everything but idle and iowait), from
/// `/proc/stat`.
fn machine_cpu_time() -> Duration {
    let stat = fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .expect("a cpu line in /proc/stat")
        .split_whitespace()
        .map(|field| field.parse().expect("numeric /proc/stat field"))
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    Duration::from_secs_f64(busy as f64 / clock_ticks() as f64)
}

/// CPU time (user + system, all threads) of `/proc/<pid>`, `pid` a number or `self`.
fn cpu_time(pid: &str) -> Duration {
    stat_cpu_time(pid, false)
}

/// CPU time of this process plus that of its children that have exited and been waited for
/// (the daemons stopped so far, curl, cat).
fn own_and_children_cpu_time() -> Duration {
    stat_cpu_time("self", true)
}

fn stat_cpu_time(pid: &str, children: bool) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|error| panic!("reading /proc/{pid}/stat: {error}"));
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14, stime 15, cutime 16 and cstime 17.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat has a comm") + 1..]
        .split_whitespace()
        .collect();
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("numeric stat field") };
    let mut ticks = field(14) + field(15);
    if children {
        ticks += field(16) + field(17);
    }
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// A line of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn rss_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("reading /proc/{pid}/status: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

async fn connect(socket: &Path) -> WasmCacheClient<Channel> {
    timeout(REQUEST_TIMEOUT, wasmcache::client::connect(socket))
        .await
        .expect("connecting timed out")
        .expect("connecting to the daemon")
}

fn fetch_request(reference: &str, policy: PullPolicy) -> FetchRequest {
    FetchRequest {
        reference: reference.to_owned(),
        pull_policy: policy.into(),

        ..Default::default()
    }
}

async fn fetch(
    client: &mut WasmCacheClient<Channel>,
    reference: &str,
    policy: PullPolicy,
) -> FetchResponse {
    timeout(
        REQUEST_TIMEOUT,
        client.fetch(fetch_request(reference, policy)),
    )
    .await
    .expect("Fetch timed out")
    .unwrap_or_else(|status| panic!("Fetch {reference}: {status}"))
    .into_inner()
}

// ---------------------------------------------------------------------------------------------
// 1. Warm-hit Fetch

/// Warm-hit `Fetch` loads at each of [`FETCH_LEVELS`].
fn warm_hits(
    runtime: &Runtime,
    registry: &Registry,
    daemon: &Daemon,
    reference: &str,
    scale: &Scale,
) -> Vec<(usize, Load)> {
    let first = runtime.block_on(async {
        fetch(
            &mut connect(&daemon.socket).await,
            reference,
            PullPolicy::IfNotPresent,
        )
        .await
    });
    assert!(
        !first.cache_hit,
        "the hot module was cached before its pull"
    );
    let repo = HOT.split(':').next().expect("repo");
    let manifest_gets = registry.manifest_gets(Some(repo));
    let levels = match std::env::var("WASMCACHE_BENCH_LOADS") {
        Ok(list) => parse_loads(&list),
        Err(_) => FETCH_LEVELS.to_vec(),
    };
    let loads = levels
        .iter()
        .map(|&(clients, paced, generator)| {
            // Paced loads run on a runtime of their own with a single thread: every arrival
            // and every answer wakes that thread alone, and its timer is a timerfd.
            let single;
            let runtime = match paced {
                None => runtime,
                Some(_) => {
                    single = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime");
                    &single
                }
            };
            let load = runtime.block_on(fetch_load(
                daemon, reference, clients, paced, generator, scale,
            ));
            eprintln!(
                "  {clients} {} clients{}: {:.0} hits/s, p99 {}, daemon {} per hit, load generator {}",
                generator.label(),
                paced.map_or(String::new(), |rate| format!(
                    " with Poisson arrivals at {rate}/s"
                )),
                load.rate(),
                micros(load.quantile(0.99)),
                micros(load.daemon_cpu_per_request()),
                Load::cpu_share(load.own_cpu, load.window),
            );
            (clients, load)
        })
        .collect();
    assert_eq!(
        registry.manifest_gets(Some(repo)),
        manifest_gets,
        "a warm hit asked the registry"
    );
    loads
}

/// Parses `WASMCACHE_BENCH_LOADS`: `GENERATOR:CLIENTS[:RATE]`, comma-separated.
fn parse_loads(list: &str) -> Vec<(usize, Option<u32>, Generator)> {
    list.split(',')
        .map(|load| {
            let fields: Vec<&str> = load.trim().split(':').collect();
            let generator = match fields[0] {
                "tonic" => Generator::Tonic,
                "h2wire" => Generator::Wire,
                other => panic!("WASMCACHE_BENCH_LOADS: unknown client {other:?} (tonic, h2wire)"),
            };
            let number = |i: usize| -> Option<u32> {
                fields.get(i).map(|text| {
                    text.parse()
                        .unwrap_or_else(|_| panic!("WASMCACHE_BENCH_LOADS: bad number in {load:?}"))
                })
            };
            let clients = number(1)
                .unwrap_or_else(|| panic!("WASMCACHE_BENCH_LOADS: {load:?} names no client count"));
            assert!(
                fields.len() <= 3,
                "WASMCACHE_BENCH_LOADS: {load:?} has too many fields"
            );
            (clients as usize, number(2), generator)
        })
        .collect()
}

/// The path of the `Fetch` method, as sent in `:path`.
const FETCH_PATH: &str = "/wasmcache.v1.WasmCache/Fetch";

async fn fetch_load(
    daemon: &Daemon,
    reference: &str,
    clients: usize,
    paced: Option<u32>,
    generator: Generator,
    scale: &Scale,
) -> Load {
    let connections = clients.div_ceil(CLIENTS_PER_CONNECTION);
    let request = fetch_request(reference, PullPolicy::IfNotPresent);
    let check = |response: FetchResponse| {
        assert!(
            response.cache_hit && !response.stale,
            "not a warm hit: {response:?}"
        );
    };
    let mut load = match generator {
        Generator::Tonic => {
            let mut channels = Vec::new();
            for _ in 0..connections {
                channels.push(connect(&daemon.socket).await);
            }
            let workers = (0..clients)
                .map(|i| channels[i % connections].clone())
                .collect();
            run_load(
                daemon.pid(),
                connections,
                workers,
                scale,
                paced,
                move |mut client: WasmCacheClient<Channel>| {
                    let request = request.clone();
                    async move {
                        let response = client
                            .fetch(request)
                            .await
                            .unwrap_or_else(|status| panic!("warm Fetch: {status}"))
                            .into_inner();
                        check(response);
                        (client, 0)
                    }
                },
            )
            .await
        }
        Generator::Wire => {
            let mut wires = Vec::new();
            for _ in 0..connections {
                let wire = timeout(
                    REQUEST_TIMEOUT,
                    h2wire::Connection::connect(&daemon.socket, "localhost"),
                )
                .await
                .expect("connecting timed out")
                .expect("connecting to the daemon");
                wires.push(wire);
            }
            let workers = (0..clients)
                .map(|i| wires[i % connections].clone())
                .collect();
            let message = Bytes::from(prost::Message::encode_to_vec(&request));
            run_load(
                daemon.pid(),
                connections,
                workers,
                scale,
                paced,
                move |wire: h2wire::Connection| {
                    let message = message.clone();
                    async move {
                        let answer = wire
                            .call(FETCH_PATH, &message)
                            .await
                            .unwrap_or_else(|error| panic!("warm Fetch: {error}"));
                        let response: FetchResponse = prost::Message::decode(answer)
                            .unwrap_or_else(|error| panic!("warm Fetch answer: {error}"));
                        check(response);
                        (wire, 0)
                    }
                },
            )
            .await
        }
    };
    load.generator = Some(generator);
    load
}

// ---------------------------------------------------------------------------------------------
// 2. Single-flight

struct Flight {
    callers: usize,
    connections: usize,
    module_bytes: usize,
    blob_gets: usize,
    manifest_gets: usize,
    /// Increase of `wasmcache_singleflight_joined_total`.
    joined: u64,
    /// Callers whose answer was the shared pull (`cache_hit: false`).
    misses: usize,
    /// From releasing the callers to the last answer.
    wall: Duration,
    /// Each caller's time from release to answer, sorted.
    latencies: Vec<Duration>,
    /// The same for the same crowd asking for a cached module.
    warm_latencies: Vec<Duration>,
    /// Lone cold fetches of equal modules.
    lone: Vec<Duration>,
    /// Blob GETs of each lone fetch.
    lone_blob_gets: Vec<usize>,
}

fn single_flight(
    runtime: &Runtime,
    registry: &Registry,
    daemon: &Daemon,
    warm_reference: &str,
    digest: &str,
    lone_digests: &[String],
    scale: &Scale,
) -> Flight {
    let addr = registry.addr();
    let lone_fetch = |k: usize| {
        let repo = format!("bench/lone{k}");
        let blob_gets = registry.blob_gets(Some(&repo));
        let reference = format!("{addr}/{}", lone(k));
        let took = runtime.block_on(async {
            let mut client = connect(&daemon.socket).await;
            fetch(&mut client, warm_reference, PullPolicy::Never).await;
            let started = Instant::now();
            let response = fetch(&mut client, &reference, PullPolicy::IfNotPresent).await;
            let took = started.elapsed();
            assert!(!response.cache_hit, "lone module {k} was cached");
            assert_eq!(response.digest, lone_digests[k]);
            took
        });
        (took, registry.blob_gets(Some(&repo)) - blob_gets)
    };
    // Lone fetches before and after the crowd, so that drift falls on both.
    let mut lone = Vec::new();
    lone.push(lone_fetch(0));

    let repo = FLIGHT.split(':').next().expect("repo");
    let reference = format!("{addr}/{FLIGHT}");
    let (blob_gets, manifest_gets) = (
        registry.blob_gets(Some(repo)),
        registry.manifest_gets(Some(repo)),
    );
    let callers = scale.flight_callers;
    let connections = callers.div_ceil(CLIENTS_PER_CONNECTION);
    let (joined, mut latencies, misses, mut warm_latencies) = runtime.block_on(async {
        let joined = joined_total(&daemon.socket).await;
        let mut channels = Vec::new();
        for _ in 0..connections {
            let mut client = connect(&daemon.socket).await;
            // One cheap hit per connection, so that every HTTP/2 handshake is done.
            fetch(&mut client, warm_reference, PullPolicy::Never).await;
            channels.push(client);
        }
        let mut latencies = Vec::new();
        let mut misses = 0;
        for (took, response) in crowd(&channels, &reference, callers).await {
            assert_eq!(response.digest, digest, "a caller got another module");
            misses += usize::from(!response.cache_hit);
            latencies.push(took);
        }
        let joined = joined_total(&daemon.socket).await - joined;
        // The same crowd on a cached module: what answering 1000 callers costs by itself.
        let warm = crowd(&channels, warm_reference, callers).await;
        assert!(warm.iter().all(|(_, response)| response.cache_hit));
        let warm_latencies = warm.into_iter().map(|(took, _)| took).collect::<Vec<_>>();
        (joined, latencies, misses, warm_latencies)
    });
    latencies.sort_unstable();
    warm_latencies.sort_unstable();
    let wall = latencies.last().copied().unwrap_or_default();
    let flight = (
        registry.blob_gets(Some(repo)) - blob_gets,
        registry.manifest_gets(Some(repo)) - manifest_gets,
    );
    for k in 1..scale.lone_fetches {
        lone.push(lone_fetch(k));
    }
    eprintln!(
        "  {callers} callers: {} blob GETs, {} manifest GETs, {} ms",
        flight.0,
        flight.1,
        wall.as_millis()
    );
    Flight {
        callers,
        connections,
        module_bytes: scale.flight_bytes,
        blob_gets: flight.0,
        manifest_gets: flight.1,
        joined,
        misses,
        wall,
        latencies,
        warm_latencies,
        lone: lone.iter().map(|(took, _)| *took).collect(),
        lone_blob_gets: lone.iter().map(|(_, gets)| *gets).collect(),
    }
}

/// `callers` tasks, spread over `channels`, released together by a barrier, each sending one
/// `Fetch(IF_NOT_PRESENT)` of `reference`; each one's time from release to answer.
async fn crowd(
    channels: &[WasmCacheClient<Channel>],
    reference: &str,
    callers: usize,
) -> Vec<(Duration, FetchResponse)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(callers + 1));
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let mut client = channels[i % channels.len()].clone();
            let barrier = barrier.clone();
            let reference = reference.to_owned();
            tokio::spawn(async move {
                barrier.wait().await;
                let response = fetch(&mut client, &reference, PullPolicy::IfNotPresent).await;
                (Instant::now(), response)
            })
        })
        .collect();
    barrier.wait().await;
    let released = Instant::now();
    let mut answers = Vec::new();
    for task in tasks {
        let (done, response) = task.await.expect("a caller failed");
        answers.push((done.saturating_duration_since(released), response));
    }
    answers
}

/// `wasmcache_singleflight_joined_total` from `/metrics`.
async fn joined_total(socket: &Path) -> u64 {
    let response = timeout(
        REQUEST_TIMEOUT,
        common::daemon::unix_request(socket, "GET", "/metrics", &[], None),
    )
    .await
    .expect("GET /metrics timed out");
    assert_eq!(response.status, 200, "GET /metrics");
    String::from_utf8_lossy(&response.body)
        .lines()
        .find_map(|line| line.strip_prefix("wasmcache_singleflight_joined_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// 3. Start-up and RSS

/// A stopped daemon: its data dir (kept alive by the value) and command line.
fn stopped_daemon() -> Daemon {
    let mut daemon = Daemon::start(&["--log", "info"], None);
    daemon.signal_and_wait("TERM", DAEMON_TIMEOUT);
    daemon
}

/// One module in the populated cache.
struct Module {
    digest: Digest,
    size: usize,
    reference: String,
}

/// What [`populate`] wrote.
struct Cache {
    /// The tiny modules, by index.
    tiny: Vec<Digest>,
    /// The 41-byte module.
    small: Module,
    /// The 1 MiB module.
    medium: Module,
    /// The 50 MiB module.
    big: Module,
}

fn tiny_reference(i: usize) -> String {
    format!("{SYNTHETIC_REGISTRY}/r/m{i}:v1")
}

/// Writes `scale.entries` cache entries into `data_dir` with the library: three modules for
/// the download benches and tiny distinct modules for the rest, each with a module, manifest
/// and reference record, as a pull would leave them.
fn populate(data_dir: &Path, scale: &Scale) -> Cache {
    let store = Store::open(data_dir).expect("opening the store");
    let add = |module: &[u8], reference: &str, seed: &str| -> Digest {
        let mut ingest = store
            .begin_ingest(module.len() as u64)
            .expect("begin ingest");
        ingest.write_all(module).expect("ingest write");
        let (digest, size) = store
            .commit(ingest, None, |_| Ok::<(), wasmcache::store::Error>(()))
            .expect("commit");
        support::index_as_pulled(&store, &digest, size, reference, seed);
        digest
    };
    let special = |module: Vec<u8>, reference: String| Module {
        digest: add(&module, &reference, &reference),
        size: module.len(),
        reference,
    };
    let small = special(
        wasm::module(0, 0),
        format!("{SYNTHETIC_REGISTRY}/small/add:v1"),
    );
    let medium = special(
        module_of_size(scale.medium_bytes, 0x4d),
        format!("{SYNTHETIC_REGISTRY}/medium/m:v1"),
    );
    let big = special(
        module_of_size(scale.download_bytes, 0xb16),
        format!("{SYNTHETIC_REGISTRY}/big/m:v1"),
    );
    let tiny_count = scale.entries - 3;
    let mut tiny: Vec<Option<Digest>> = vec![None; tiny_count];
    thread::scope(|scope| {
        for (t, chunk) in tiny
            .chunks_mut(tiny_count.div_ceil(POPULATE_THREADS))
            .enumerate()
        {
            let add = &add;
            let first = t * tiny_count.div_ceil(POPULATE_THREADS);
            scope.spawn(move || {
                for (offset, slot) in chunk.iter_mut().enumerate() {
                    let i = first + offset;
                    let module = wasm::module(8, i as u64);
                    *slot = Some(add(&module, &tiny_reference(i), &format!("m{i}")));
                }
            });
        }
    });
    store.flush().expect("flushing the index");
    drop(store);
    Cache {
        tiny: tiny.into_iter().map(|d| d.expect("written")).collect(),
        small,
        medium,
        big,
    }
}

/// Start-up times and RSS of one data dir.
struct Startup {
    entries: usize,
    /// Spawn → the socket accepts a connection.
    accept: Vec<Duration>,
    /// Spawn → `/readyz` answers 200.
    ready: Vec<Duration>,
    /// `startup_ms` the daemon logs itself (from `daemon::run`'s start to serving).
    logged_ms: Vec<u64>,
    rss_start_kib: u64,
    rss_idle_kib: u64,
    hwm_kib: u64,
    hits: usize,
    /// SIGTERM → exit of each daemon stopped; `None` when it had to be killed.
    stops: Vec<Option<Duration>>,
    /// The log of the daemon still running.
    last_log: PathBuf,
    /// CPU share of one core used by the rest of the machine while the starts were timed.
    other_share: f64,
    /// Idle RSS after every cached entry was fetched once.
    rss_all_kib: Option<u64>,
}

/// Starts the daemon `runs` times, timing each start; every run but the last is stopped.
fn startups(daemon: &Daemon, entries: usize, runs: usize, logs: &Path) -> (Startup, ChildGuard) {
    let mut startup = Startup {
        entries,
        accept: Vec::new(),
        ready: Vec::new(),
        logged_ms: Vec::new(),
        rss_start_kib: 0,
        rss_idle_kib: 0,
        hwm_kib: 0,
        hits: 0,
        stops: Vec::new(),
        last_log: PathBuf::new(),
        other_share: 0.0,
        rss_all_kib: None,
    };
    let began = Instant::now();
    let before = machine_cpu_time().saturating_sub(own_and_children_cpu_time());
    for run in 0..runs {
        let log = logs.join(format!("serve-{entries}-{run}.log"));
        let mut command = daemon.command("serve");
        command
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("daemon log"));
        let spawned = Instant::now();
        let mut child = ChildGuard::spawn(&mut command);
        let mut accepted = None;
        let ready = loop {
            let elapsed = spawned.elapsed();
            assert!(
                elapsed < DAEMON_TIMEOUT,
                "the daemon did not become ready:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            if let Ok(stream) = StdUnixStream::connect(&daemon.socket) {
                accepted.get_or_insert(elapsed);
                if readyz(stream) {
                    break spawned.elapsed();
                }
            }
            thread::sleep(Duration::from_micros(200));
        };
        startup.accept.push(accepted.expect("connected"));
        startup.ready.push(ready);
        startup.logged_ms.push(support::logged_startup_ms(&log));
        if run + 1 == runs {
            let pid = child.id().expect("running");
            let other = machine_cpu_time()
                .saturating_sub(own_and_children_cpu_time())
                .saturating_sub(cpu_time(&pid.to_string()))
                .saturating_sub(before);
            startup.other_share = other.as_secs_f64() / began.elapsed().as_secs_f64();
            startup.rss_start_kib = rss_kib(pid, "VmRSS");
            startup.last_log = log;
            return (startup, child);
        }
        startup.stops.push(stop(&mut child, &log));
    }
    panic!("no start-up runs");
}

/// Sends `GET /readyz` on a fresh connection; whether it answered 200.
fn readyz(mut stream: StdUnixStream) -> bool {
    let limit = Some(Duration::from_secs(5));
    stream.set_read_timeout(limit).expect("read timeout");
    stream.set_write_timeout(limit).expect("write timeout");
    if stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.take(64 << 10).read_to_end(&mut response);
    response.starts_with(b"HTTP/1.1 200")
}

/// Stops a daemon with SIGTERM and waits up to [`DAEMON_TIMEOUT`] for it to exit; returns
/// how long that took, or `None` (after printing the end of its log) when it had to be killed.
fn stop(child: &mut ChildGuard, log: &Path) -> Option<Duration> {
    let pid = child.id().expect("daemon running");
    let signalled = Instant::now();
    common::run_checked(
        Command::new("timeout")
            .arg(CHILD_TIMEOUT_SECS.to_string())
            .args(["kill", "-TERM", &pid.to_string()]),
    );
    let deadline = signalled + DAEMON_TIMEOUT;
    let stopped = loop {
        if let Some(status) = child
            .child_mut()
            .try_wait()
            .expect("waiting for the daemon")
        {
            assert!(status.success(), "the daemon exited with {status}");
            break Some(signalled.elapsed());
        }
        if Instant::now() > deadline {
            let text = fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!(
                "daemon bench: the daemon did not exit within {DAEMON_TIMEOUT:?} of SIGTERM; \
                 killing it. End of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    child.kill();
    stopped
}

/// One `Fetch(NEVER)` of a tiny entry and of each special module, checked against what was
/// written, so that the daemon is known to really serve the populated cache.
fn check_served(runtime: &Runtime, daemon: &Daemon, cache: &Cache) {
    runtime.block_on(async {
        let mut client = connect(&daemon.socket).await;
        let i = cache.tiny.len() / 2;
        let mut expected = vec![(tiny_reference(i), &cache.tiny[i])];
        for module in [&cache.small, &cache.medium, &cache.big] {
            expected.push((module.reference.clone(), &module.digest));
        }
        for (reference, digest) in expected {
            let response = fetch(&mut client, &reference, PullPolicy::Never).await;
            assert_eq!(response.digest, digest.to_string(), "{reference}");
            assert!(response.cache_hit, "{reference} is not a hit");
            let path = daemon.data_dir.join("blobs/sha256").join(digest.hex());
            assert_eq!(Path::new(&response.path), path, "{reference}");
        }
    });
}

/// Warm hits on `references` (one client, one after another), then [`IDLE`], then the RSS.
fn idle_rss(
    runtime: &Runtime,
    mut startup: Startup,
    child: &ChildGuard,
    daemon: &Daemon,
    references: &[String],
) -> Startup {
    let pid = child.id().expect("daemon running");
    if !references.is_empty() {
        runtime.block_on(async {
            let mut client = connect(&daemon.socket).await;
            for reference in references {
                let response = fetch(&mut client, reference, PullPolicy::IfNotPresent).await;
                assert!(response.cache_hit, "{reference} is not a hit");
            }
        });
    }
    startup.hits = references.len();
    thread::sleep(IDLE);
    startup.rss_idle_kib = rss_kib(pid, "VmRSS");
    startup.hwm_kib = rss_kib(pid, "VmHWM");
    startup
}

/// Fetches every one of `references` once (8 concurrent clients on one connection), waits
/// [`IDLE`] and returns the daemon's RSS.
fn rss_after_every_hit(
    runtime: &Runtime,
    child: &ChildGuard,
    daemon: &Daemon,
    references: Vec<String>,
) -> u64 {
    runtime.block_on(async {
        let client = connect(&daemon.socket).await;
        let references = Arc::new(references);
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let mut client = client.clone();
                let references = references.clone();
                tokio::spawn(async move {
                    for reference in references.iter().skip(task).step_by(8) {
                        let response =
                            fetch(&mut client, reference, PullPolicy::IfNotPresent).await;
                        assert!(response.cache_hit, "{reference} is not a hit");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a client failed");
        }
    });
    thread::sleep(IDLE);
    rss_kib(child.id().expect("daemon running"), "VmRSS")
}

// ---------------------------------------------------------------------------------------------
// 4. Module download

/// Ways of reading the big module.
#[derive(Clone, Copy, PartialEq)]
enum Reader {
    ReadFile,
    ReadSocket,
    Cat,
    Curl,
    CatSmall,
    CurlSmall,
    CurlFile,
    ReadModule,
    Hyper,
}

/// Buffer of the in-process read loops: what `cat` reads at a time (curl reads 100 KiB).
const READ_BUFFER: usize = 128 << 10;

impl Reader {
    const ALL: [Reader; 9] = [
        Reader::ReadFile,
        Reader::ReadSocket,
        Reader::Cat,
        Reader::Curl,
        Reader::CatSmall,
        Reader::CurlSmall,
        Reader::CurlFile,
        Reader::ReadModule,
        Reader::Hyper,
    ];

    fn name(self) -> &'static str {
        match self {
            Reader::ReadFile => "read the blob file in this process",
            Reader::ReadSocket => "HTTP/1.1 GET over the socket in this process",
            Reader::Cat => "cat the blob file",
            Reader::Curl => "curl over the socket",
            Reader::CatSmall => "cat the 41-byte module's blob file (process start-up)",
            Reader::CurlSmall => "curl the 41-byte module over the socket (process start-up)",
            Reader::CurlFile => "curl the blob file itself (curl's own cost)",
            Reader::ReadModule => "gRPC `ReadModule` stream (Rust client)",
            Reader::Hyper => "hyper HTTP/1.1 client in this process (extra)",
        }
    }

    fn shown(self) -> &'static str {
        match self {
            Reader::ReadFile => "open, then `read` into one 128 KiB buffer to the end (what `cat` does)",
            Reader::ReadSocket => {
                "connect, write the request, then `read` into one 128 KiB buffer to the last body byte"
            }
            Reader::Cat | Reader::CatSmall => "`cat <data-dir>/blobs/sha256/<hex> > /dev/null`",
            Reader::Curl | Reader::CurlSmall => {
                "`curl -s --unix-socket SOCK -o /dev/null http://localhost/v1/modules/sha256:<hex>`"
            }
            Reader::CurlFile => "`curl -s -o /dev/null file://<data-dir>/blobs/sha256/<hex>`",
            Reader::ReadModule => {
                "`ReadModule{digest}` via `wasmcache::client::connect`, chunks counted"
            }
            Reader::Hyper => {
                "`GET /v1/modules/sha256:<hex>` on a new connection, body frames counted"
            }
        }
    }
}

struct Downloads {
    size: usize,
    runs: Vec<(Reader, Vec<Duration>)>,
    /// curl's own `%{time_total}` per run.
    curl_total: Vec<Duration>,
}

impl Downloads {
    fn median_of(&self, reader: Reader) -> Duration {
        let (_, runs) = self
            .runs
            .iter()
            .find(|(r, _)| *r == reader)
            .expect("every reader ran");
        median(runs)
    }

    /// `cat`'s and curl's time on the big module's bytes alone: each one's median minus its
    /// median for the 41-byte module (start-up, connection and request).
    fn marginal(&self) -> (Duration, Duration) {
        let bytes_only = |big, small| {
            self.median_of(big)
                .saturating_sub(self.median_of(small))
                .max(Duration::from_micros(1))
        };
        (
            bytes_only(Reader::Cat, Reader::CatSmall),
            bytes_only(Reader::Curl, Reader::CurlSmall),
        )
    }
}

fn downloads(
    runtime: &Runtime,
    daemon: &Daemon,
    module: &Module,
    small: &Module,
    scale: &Scale,
) -> Downloads {
    let blob_of = |module: &Module| {
        daemon
            .data_dir
            .join("blobs/sha256")
            .join(module.digest.hex())
    };
    let blob = blob_of(module);
    let mut result = Downloads {
        size: module.size,
        runs: Reader::ALL.iter().map(|&r| (r, Vec::new())).collect(),
        curl_total: Vec::new(),
    };
    // One warm-up round (content checked), then the readers round-robin.
    for round in 0..=scale.download_runs {
        for offset in 0..Reader::ALL.len() {
            let row = (round + offset) % Reader::ALL.len();
            let reader = Reader::ALL[row];
            let (took, curl_total) = match reader {
                Reader::ReadFile => (read_file(&blob, &module.digest, round == 0), None),
                Reader::ReadSocket => (
                    read_socket(&daemon.socket, &module.digest, module.size, round == 0),
                    None,
                ),
                Reader::Cat => (cat(&blob), None),
                Reader::CatSmall => (cat(&blob_of(small)), None),
                Reader::Curl => {
                    let (took, total) = curl(&daemon.socket, &module.digest, module.size);
                    (took, Some(total))
                }
                Reader::CurlSmall => (curl(&daemon.socket, &small.digest, small.size).0, None),
                Reader::CurlFile => (curl_file(&blob, module.size), None),
                Reader::ReadModule => (
                    runtime.block_on(read_module(
                        &daemon.socket,
                        &module.digest,
                        module.size,
                        round == 0,
                    )),
                    None,
                ),
                Reader::Hyper => (
                    runtime.block_on(hyper_download(
                        &daemon.socket,
                        &module.digest,
                        module.size,
                        round == 0,
                    )),
                    None,
                ),
            };
            if round > 0 {
                result.runs[row].1.push(took);
                result.curl_total.extend(curl_total);
            }
        }
    }
    result
}

/// Reads `blob` as `cat` does; with `verify`, checks its sha256 (outside the timing).
fn read_file(blob: &Path, digest: &Digest, verify: bool) -> Duration {
    let mut buffer = vec![0; READ_BUFFER];
    let mut hasher = verify.then(Sha256::new);
    let started = Instant::now();
    let mut file = File::open(blob).expect("opening the blob");
    loop {
        let count = file.read(&mut buffer).expect("reading the blob");
        if count == 0 {
            break;
        }
        if let Some(hasher) = &mut hasher {
            hasher.update(&buffer[..count]);
        }
    }
    let took = started.elapsed();
    if let Some(hasher) = hasher {
        assert_eq!(hex::encode(hasher.finalize()), digest.hex(), "file bytes");
    }
    took
}

/// `GET /v1/modules/<digest>` on a new connection, read as curl does: one buffer, `read` to
/// the last body byte. Checks the status and length, and with `verify` the sha256.
fn read_socket(socket: &Path, digest: &Digest, size: usize, verify: bool) -> Duration {
    let mut buffer = vec![0; READ_BUFFER];
    let mut hasher = verify.then(Sha256::new);
    let started = Instant::now();
    let mut stream = StdUnixStream::connect(socket).expect("connecting");
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("read timeout");
    stream
        .write_all(
            format!(
                "GET /v1/modules/{digest} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("writing the request");
    let mut head = Vec::new();
    let mut body = 0;
    while body < size {
        let count = stream.read(&mut buffer).expect("reading the response");
        assert!(count > 0, "the response ended after {body} body bytes");
        let mut data = &buffer[..count];
        if body == 0 && !head.ends_with(b"\r\n\r\n") {
            let end = head.len();
            head.extend_from_slice(data);
            let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let text = String::from_utf8_lossy(&head[..at]).to_lowercase();
            assert!(text.starts_with("http/1.1 200"), "response head: {text}");
            assert!(
                text.contains(&format!("content-length: {size}")),
                "response head: {text}"
            );
            data = &data[at + 4 - end..];
            head.truncate(at + 4);
        }
        body += data.len();
        if let Some(hasher) = &mut hasher {
            hasher.update(data);
        }
    }
    let took = started.elapsed();
    assert_eq!(body, size, "body bytes");
    if let Some(hasher) = hasher {
        assert_eq!(hex::encode(hasher.finalize()), digest.hex(), "socket bytes");
    }
    took
}

/// Runs `command` to its end (it is killed by `timeout` after [`CHILD_TIMEOUT_SECS`]);
/// returns the wall time and stdout.
fn timed(command: &mut Command) -> (Duration, String) {
    let started = Instant::now();
    let mut child = ChildGuard::spawn(command.stdin(Stdio::null()));
    let status = child.child_mut().wait().expect("waiting for a child");
    let took = started.elapsed();
    let mut stdout = String::new();
    if let Some(mut pipe) = child.child_mut().stdout.take() {
        pipe.read_to_string(&mut stdout).expect("child stdout");
    }
    assert!(status.success(), "{command:?} failed with {status}");
    (took, stdout)
}

fn dev_null() -> File {
    OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null")
}

fn cat(blob: &Path) -> Duration {
    timed(
        Command::new("timeout")
            .arg(CHILD_TIMEOUT_SECS.to_string())
            .arg("cat")
            .arg(blob)
            .stdout(dev_null()),
    )
    .0
}

fn curl(socket: &Path, digest: &Digest, size: usize) -> (Duration, Duration) {
    let (took, stdout) = timed(
        Command::new("timeout")
            .arg(CHILD_TIMEOUT_SECS.to_string())
            .arg("curl")
            .args(["-s", "--unix-socket"])
            .arg(socket)
            .args([
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{time_total}",
            ])
            .arg(format!("http://localhost/v1/modules/{digest}"))
            .stdout(Stdio::piped()),
    );
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        fields.get(..2),
        Some(&["200", size.to_string().as_str()][..]),
        "curl printed {stdout:?}"
    );
    let total: f64 = fields[2].parse().expect("curl time_total");
    (took, Duration::from_secs_f64(total))
}

fn curl_file(blob: &Path, size: usize) -> Duration {
    let (took, stdout) = timed(
        Command::new("timeout")
            .arg(CHILD_TIMEOUT_SECS.to_string())
            .arg("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{size_download}"])
            .arg(format!("file://{}", blob.display()))
            .stdout(Stdio::piped()),
    );
    assert_eq!(
        stdout.trim(),
        size.to_string(),
        "curl file:// printed {stdout:?}"
    );
    took
}

async fn read_module(socket: &Path, digest: &Digest, size: usize, verify: bool) -> Duration {
    let started = Instant::now();
    let mut client = connect(socket).await;
    let mut stream = timeout(
        REQUEST_TIMEOUT,
        client.read_module(ReadModuleRequest {
            digest: digest.to_string(),
        }),
    )
    .await
    .expect("ReadModule timed out")
    .expect("ReadModule")
    .into_inner();
    let mut received = 0;
    let mut hasher = verify.then(Sha256::new);
    while let Some(chunk) = timeout(REQUEST_TIMEOUT, stream.message())
        .await
        .expect("ReadModule stalled")
        .expect("ReadModule chunk")
    {
        assert_eq!(chunk.offset, received as u64, "chunk offset");
        received += chunk.data.len();
        if let Some(hasher) = &mut hasher {
            hasher.update(&chunk.data);
        }
    }
    let took = started.elapsed();
    assert_eq!(received, size, "ReadModule bytes");
    if let Some(hasher) = hasher {
        assert_eq!(
            hex::encode(hasher.finalize()),
            digest.hex(),
            "ReadModule bytes"
        );
    }
    took
}

/// A keep-alive HTTP/1.1 connection to the socket, its driver spawned.
async fn http1(socket: &Path) -> SendRequest<Empty<Bytes>> {
    let stream = timeout(REQUEST_TIMEOUT, tokio::net::UnixStream::connect(socket))
        .await
        .expect("connect timed out")
        .expect("connecting to the socket");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// `GET /v1/modules/<digest>` on `sender`; checks the status and counts the body bytes.
async fn get_module(
    sender: &mut SendRequest<Empty<Bytes>>,
    digest: &Digest,
    mut hasher: Option<&mut Sha256>,
) -> usize {
    sender.ready().await.expect("connection ready");
    let request = http::Request::get(format!("/v1/modules/{digest}"))
        .header(http::header::HOST, "localhost")
        .body(Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("GET module");
    assert_eq!(response.status(), 200, "GET /v1/modules/{digest}");
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            received += data.len();
            if let Some(hasher) = hasher.as_deref_mut() {
                hasher.update(&data);
            }
        }
    }
    received
}

async fn hyper_download(socket: &Path, digest: &Digest, size: usize, verify: bool) -> Duration {
    let started = Instant::now();
    let mut sender = http1(socket).await;
    let mut hasher = Sha256::new();
    let received = timeout(
        REQUEST_TIMEOUT,
        get_module(&mut sender, digest, verify.then_some(&mut hasher)),
    )
    .await
    .expect("download timed out");
    let took = started.elapsed();
    assert_eq!(received, size, "downloaded bytes");
    if verify {
        assert_eq!(
            hex::encode(hasher.finalize()),
            digest.hex(),
            "downloaded bytes"
        );
    }
    took
}

// ---------------------------------------------------------------------------------------------
// 5. /v1/modules request rate

async fn modules_load(socket: &Path, pid: u32, module: &Module, scale: &Scale) -> Load {
    let mut workers = Vec::new();
    for _ in 0..HTTP_CONNECTIONS {
        workers.push(http1(socket).await);
    }
    let digest = module.digest.clone();
    let size = module.size;
    let load = run_load(
        pid,
        HTTP_CONNECTIONS,
        workers,
        scale,
        None,
        move |mut sender: SendRequest<Empty<Bytes>>| {
            let digest = digest.clone();
            async move {
                let received = get_module(&mut sender, &digest, None).await;
                assert_eq!(received, size, "body of {digest}");
                (sender, received as u64)
            }
        },
    )
    .await;
    eprintln!(
        "  {size} B: {:.0} requests/s, p99 {}",
        load.rate(),
        micros(load.quantile(0.99))
    );
    load
}

// ---------------------------------------------------------------------------------------------
// Tables

struct Results<'a> {
    fetch_loads: Vec<(usize, Load)>,
    flight: Flight,
    startups: [Startup; 2],
    populate_time: Duration,
    downloads: Downloads,
    module_loads: [(usize, Load); 2],
    rss_after_load: u64,
    scale: &'a Scale,
}

/// The warm-hit `Fetch` table, with the text that says how it was measured.
fn warm_hit_table(fetch_loads: &[(usize, Load)], scale: &Scale) -> String {
    let mut out = String::new();
    let window = format!(
        "{:.1} s measured after a {:.1} s warm-up",
        scale.window.as_secs_f64(),
        scale.warmup.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "#### Warm-hit `Fetch` over the unix socket\n\n\
         gRPC `Fetch{{reference: \"ADDR/{HOT}\", pull_policy: IF_NOT_PRESENT}}` for a module \
         already cached (a 1 KiB CNCF artifact pulled once before). Each client is a task in \
         this process; the clients are spread over ⌈clients / {CLIENTS_PER_CONNECTION}⌉ HTTP/2 \
         connections, client *i* on connection *i* mod *n*. The *tonic* rows use one tonic \
         `Channel` per connection (from `wasmcache::client::connect`, what a Rust agent uses); \
         the *h2wire* rows send the same calls with `benches/support/h2wire.rs`, a minimal \
         HTTP/2 client (a call is one write of a HEADERS and a DATA frame, answers are parsed \
         from whatever the connection reads, and each is checked for `:status` 200, \
         `grpc-status` 0 and exactly one message), which needs about half of tonic's CPU per \
         call and so leaves more of the two cores to the daemon being measured. In a *closed loop* each client sends its next request as soon \
         as the last is answered, so the rows show the most the daemon answers with this load \
         generator beside it; by Little's law the mean latency there is clients ÷ hits/s, so a \
         p99 under 1 ms at 64 clients in a closed loop would take more than 64,000 hits/s. The \
         *paced* rows offer {paced} hits/s in total as Poisson arrivals (exponential gaps, \
         dealt to the clients in turn by a pacer task that sleeps on a `timerfd`; a request that \
         waits for its client's previous one is timed from its arrival, so queueing is not \
         hidden). The paced clients run on a tokio runtime of their own with one thread, so each \
         arrival and each answer wakes that one thread (with the two-thread runtime and a pacer \
         thread, the generator used ≈ 1.4 times the CPU per hit). {window}; a \
         request counts when it \
         completes inside the window, and every answer must say `cache_hit` (the registry log \
         shows no manifest GET during the loads). CPU columns are utime + stime over the window \
         (`/proc/<pid>/stat`; the rest of the machine from `/proc/stat`), as a share of one core \
         (the machine has {cores}).\n",
        cores = cores(),
        paced = PACED_RATES
            .map(|rate| support::thousands(rate.into()))
            .join(" or "),
    );
    out.push_str(
        "| client | clients | load | HTTP/2 conns | hits | hits/s | p50 | p99 | p99.9 | max | daemon CPU | daemon CPU per hit | load generator CPU | rest of machine |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (clients, load) in fetch_loads {
        let _ = writeln!(
            out,
            "| {} | {clients} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            load.generator.map_or("–", Generator::label),
            load.paced.map_or("closed loop".to_owned(), |rate| format!(
                "Poisson arrivals, {} hits/s offered (pacer late by ≤ {} at p99)",
                support::thousands(rate.into()),
                micros(load.pacer_late_p99.unwrap_or_default())
            )),
            load.connections,
            support::thousands(load.requests() as u64),
            support::thousands(load.rate() as u64),
            micros(load.quantile(0.50)),
            micros(load.quantile(0.99)),
            micros(load.quantile(0.999)),
            micros(load.quantile(1.0)),
            Load::cpu_share(load.daemon_cpu, load.window),
            micros(load.daemon_cpu_per_request()),
            Load::cpu_share(load.own_cpu, load.window),
            Load::cpu_share(load.other_cpu, load.window),
        );
    }

    out
}

fn tables(results: &Results) -> String {
    let mut out = String::new();
    let scale = results.scale;
    let window = format!(
        "{:.1} s measured after a {:.1} s warm-up",
        scale.window.as_secs_f64(),
        scale.warmup.as_secs_f64()
    );

    out.push_str(&warm_hit_table(&results.fetch_loads, scale));

    // 2
    let flight = &results.flight;
    let lone_median = median(&flight.lone);
    let _ = writeln!(
        out,
        "\n#### Single-flight: {} concurrent `Fetch`es of one uncached {} MiB module\n\n\
         {} callers on {} HTTP/2 connections (each connection warmed with one hit first) are \
         released together by a barrier; all ask `IF_NOT_PRESENT` for `ADDR/{FLIGHT}`, a CNCF \
         artifact pushed with oras-py and never fetched before. GETs are counted in the \
         registry's access log for that repository. The lone rows are cold fetches of equal-size \
         modules in their own repositories on the same daemon, one before and the rest after the \
         crowd; the validation and fsync of the module are part of every fetch. The extra row \
         sends the same crowd again for the cached hot module, to show what answering that many \
         callers costs by itself.\n",
        flight.callers,
        flight.module_bytes >> 20,
        flight.callers,
        flight.connections,
    );
    out.push_str(
        "| case | callers | blob GETs | manifest GETs | joined (metric) | answered by the pull | wall time | first answer | caller p50 | vs lone |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let _ = writeln!(
        out,
        "| crowd on one module | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}× |",
        flight.callers,
        flight.blob_gets,
        flight.manifest_gets,
        flight.joined,
        flight.misses,
        millis(flight.wall),
        millis(flight.latencies.first().copied().unwrap_or_default()),
        millis(median(&flight.latencies)),
        flight.wall.as_secs_f64() / lone_median.as_secs_f64(),
    );
    let _ = writeln!(
        out,
        "| same crowd on a cached module (extra) | {} | 0 | 0 | – | 0 | {} | {} | {} | – |",
        flight.warm_latencies.len(),
        millis(flight.warm_latencies.last().copied().unwrap_or_default()),
        millis(flight.warm_latencies.first().copied().unwrap_or_default()),
        millis(median(&flight.warm_latencies)),
    );
    let _ = writeln!(
        out,
        "| lone cold fetch, median of {} | 1 | {} | – | – | 1 | {} | – | – | 1.00× |",
        flight.lone.len(),
        flight
            .lone_blob_gets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        millis_list(&flight.lone),
    );

    // 3
    let _ = writeln!(
        out,
        "\n#### Start-up and RSS\n\n\
         Start-up is timed from spawning `wasmcache serve --data-dir DIR --log info` until the \
         socket accepts a connection and until `GET /readyz` (HTTP/1.1 on a fresh connection, \
         polled every 0.2 ms) answers 200; median and range of {} starts, each stopped with \
         SIGTERM before the next (\"SIGTERM → exit\" is how long those stops took, the last one \
         after all the measurements below; \"rest of machine\" is the CPU share of one core used by \
         other processes while the starts were timed). \"logged\" is the `startup_ms` the daemon logs itself (from \
         entering `daemon::run` to serving). The {} entries were written with the library before \
         the first start ({} references to {} distinct modules, including the 41-byte, {} MiB and \
         {} MiB modules used below; {:.1} s with {POPULATE_THREADS} writer threads), and one \
         `Fetch(NEVER)` per special module plus one tiny entry confirmed the daemon serves them. \
         RSS is `VmRSS` from `/proc/<pid>/status` right after the last start, then after \
         the warm hits shown (one client, distinct references) and {} s idle, and once more \
         after every cached reference was fetched once (8 concurrent clients) and 1 s idle.\n",
        scale.startups,
        support::thousands(scale.entries as u64),
        support::thousands(scale.entries as u64),
        support::thousands(scale.entries as u64),
        scale.medium_bytes >> 20,
        scale.download_bytes >> 20,
        results.populate_time.as_secs_f64(),
        IDLE.as_secs(),
    );
    out.push_str(
        "| cached entries | socket accepts | `/readyz` 200 (median) | range | logged | RSS after start | warm hits | RSS idle | peak RSS | RSS idle after every entry was hit once | SIGTERM → exit | rest of machine |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for startup in &results.startups {
        let mut logged = startup.logged_ms.clone();
        logged.sort_unstable();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {} ms | {} | {} | {} | {} | {} | {} | {:.0} % |",
            support::thousands(startup.entries as u64),
            millis(median(&startup.accept)),
            millis(median(&startup.ready)),
            millis(*startup.ready.iter().min().expect("runs")),
            millis(*startup.ready.iter().max().expect("runs")),
            logged[logged.len() / 2],
            mib(startup.rss_start_kib),
            startup.hits,
            mib(startup.rss_idle_kib),
            mib(startup.hwm_kib),
            startup.rss_all_kib.map_or("–".to_owned(), mib),
            stop_times(&startup.stops),
            startup.other_share * 100.0,
        );
    }

    // 4
    let downloads = &results.downloads;
    let file_median = downloads.median_of(Reader::ReadFile);
    let cat_median = downloads.median_of(Reader::Cat);
    let curl_total = median(&downloads.curl_total);
    let marginal = downloads.marginal();
    let _ = writeln!(
        out,
        "\n#### Reading a {} MiB module: over the socket vs the file\n\n\
         The module is in the page cache (one warm-up round per reader, with the content's \
         sha256 checked for the in-process readers, is discarded); then {} rounds with the \
         readers in rotating order. Wall time around the child process for `cat` and curl \
         (both under `timeout`, so process start-up included), around open or connect + request \
         + last byte for the in-process readers; MB = 10⁶ bytes. \"vs the file\" divides the \
         in-process file read's median by the row's, \"vs cat\" divides `cat`'s. curl's own \
         `time_total` (median {}) excludes its process start-up.\n",
        downloads.size >> 20,
        scale.download_runs,
        millis(curl_total),
    );
    out.push_str(
        "| reader | command | median | min | throughput | vs the file | vs cat |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (reader, runs) in &downloads.runs {
        let took = median(runs);
        let (throughput, versus_file, versus_cat) =
            if matches!(reader, Reader::CatSmall | Reader::CurlSmall) {
                ("–".to_owned(), "–".to_owned(), "–".to_owned())
            } else {
                (
                    format!(
                        "{:.0} MB/s",
                        downloads.size as f64 / took.as_secs_f64() / 1e6
                    ),
                    format!("{:.2}×", file_median.as_secs_f64() / took.as_secs_f64()),
                    format!("{:.2}×", cat_median.as_secs_f64() / took.as_secs_f64()),
                )
            };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {throughput} | {versus_file} | {versus_cat} |",
            reader.name(),
            reader.shown(),
            millis(took),
            millis(*runs.iter().min().expect("runs")),
        );
    }
    let _ = writeln!(
        out,
        "\nThroughput of the two processes on the bytes alone (the {} MiB median minus the \
         41-byte median, which is each tool's start-up and request): `cat` {} → {:.0} MB/s, \
         curl over the socket {} → {:.0} MB/s, **{:.2}× of `cat`**.",
        downloads.size >> 20,
        millis(marginal.0),
        downloads.size as f64 / marginal.0.as_secs_f64() / 1e6,
        millis(marginal.1),
        downloads.size as f64 / marginal.1.as_secs_f64() / 1e6,
        marginal.0.as_secs_f64() / marginal.1.as_secs_f64(),
    );

    // 5
    let _ = writeln!(
        out,
        "\n#### `/v1/modules` request rate at {HTTP_CONNECTIONS} keep-alive connections\n\n\
         {HTTP_CONNECTIONS} HTTP/1.1 connections (hyper client in this process) each send \
         `GET /v1/modules/sha256:<hex>` back-to-back and read the whole body (status and length \
         checked); {window}.\n"
    );
    out.push_str(
        "| module | requests | requests/s | body MB/s | p50 | p99 | max | daemon CPU | daemon CPU per request | load generator CPU | rest of machine |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (size, load) in &results.module_loads {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            bytes_label(*size),
            support::thousands(load.requests() as u64),
            support::thousands(load.rate() as u64),
            load.bytes as f64 / load.window.as_secs_f64() / 1e6,
            micros(load.quantile(0.50)),
            micros(load.quantile(0.99)),
            micros(load.quantile(1.0)),
            Load::cpu_share(load.daemon_cpu, load.window),
            micros(load.daemon_cpu_per_request()),
            Load::cpu_share(load.own_cpu, load.window),
            Load::cpu_share(load.other_cpu, load.window),
        );
    }
    let _ = writeln!(
        out,
        "\nRSS of the daemon after these loads: {}.",
        mib(results.rss_after_load)
    );

    out.push('\n');
    out.push_str(&targets(results));
    out
}

fn targets(results: &Results) -> String {
    let mut out = String::from("#### Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    let at = |clients: usize, paced: Option<u32>, generator: Generator| {
        results
            .fetch_loads
            .iter()
            .find(|(c, load)| {
                *c == clients && load.paced == paced && load.generator == Some(generator)
            })
            .map(|(_, load)| load)
            .expect("load level")
    };
    let sixty_four = at(64, None, Generator::Tonic);
    let mut loads = Vec::new();
    for generator in [Generator::Tonic, Generator::Wire] {
        loads.push((at(64, None, generator), generator, "closed loop".to_owned()));
        for rate in PACED_RATES {
            loads.push((
                at(64, Some(rate), generator),
                generator,
                format!(
                    "Poisson arrivals at {} hits/s",
                    support::thousands(rate.into())
                ),
            ));
        }
    }
    for (load, generator, how) in loads {
        let p99 = load.quantile(0.99);
        let _ = writeln!(
            out,
            "| warm-hit `Fetch` p99 < 1 ms at 64 clients ({how}, {} client) | {} at {} hits/s | {} |",
            generator.label(),
            micros(p99),
            support::thousands(load.rate() as u64),
            verdict(p99 < Duration::from_millis(1))
        );
    }
    let best = results
        .fetch_loads
        .iter()
        .filter(|(_, load)| load.paced.is_none())
        .map(|(clients, load)| (load.rate(), *clients))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    let _ = writeln!(
        out,
        "| ≥ 20,000 warm hits/s | {} at 64 clients; best {} at {} clients | {} |",
        support::thousands(sixty_four.rate() as u64),
        support::thousands(best.0 as u64),
        best.1,
        verdict(best.0 >= 20_000.0)
    );
    let flight = &results.flight;
    let _ = writeln!(
        out,
        "| one blob GET for {} concurrent callers | {} blob GET(s), {} manifest GET(s) | {} |",
        flight.callers,
        flight.blob_gets,
        flight.manifest_gets,
        verdict(flight.blob_gets == 1)
    );
    let full = &results.startups[1];
    let _ = writeln!(
        out,
        "| idle RSS < 32 MiB with {} entries ({} of them fetched) | {} | {} |",
        support::thousands(full.entries as u64),
        full.hits,
        mib(full.rss_idle_kib),
        verdict(full.rss_idle_kib < 32 << 10)
    );
    if let Some(all) = full.rss_all_kib {
        let _ = writeln!(
            out,
            "| idle RSS < 32 MiB with {} entries, every one fetched once | {} | {} |",
            support::thousands(full.entries as u64),
            mib(all),
            verdict(all < 32 << 10)
        );
    }
    let ready = median(&full.ready);
    let _ = writeln!(
        out,
        "| start-up < 200 ms with {} entries | {} (median to `/readyz` 200) | {} |",
        support::thousands(full.entries as u64),
        millis(ready),
        verdict(ready < Duration::from_millis(200))
    );
    let downloads = &results.downloads;
    let socket = downloads.median_of(Reader::ReadSocket);
    let cat_wall = downloads.median_of(Reader::Cat);
    let ratio = cat_wall.as_secs_f64() / socket.as_secs_f64();
    let _ = writeln!(
        out,
        "| socket download ≥ 0.8× `cat` throughput ({} MiB; the client in-process, as a proxy is) \
         | {ratio:.2}× ({} vs `cat`'s {}) | {} |",
        downloads.size >> 20,
        millis(socket),
        millis(cat_wall),
        verdict(ratio >= 0.8)
    );
    let (cat, curl) = downloads.marginal();
    let ratio = cat.as_secs_f64() / curl.as_secs_f64();
    let _ = writeln!(
        out,
        "| the same with curl as the client, start-up subtracted from curl and `cat` (extra) \
         | {ratio:.2}× ({} vs {}) | {} |",
        millis(curl),
        millis(cat),
        verdict(ratio >= 0.8)
    );
    let file = downloads.median_of(Reader::ReadFile);
    let ratio = file.as_secs_f64() / socket.as_secs_f64();
    let _ = writeln!(
        out,
        "| the same against an in-process read loop on the file, no start-up at all (extra) | \
         {ratio:.2}× ({} vs {}) | {} |",
        millis(socket),
        millis(file),
        verdict(ratio >= 0.8)
    );
    out
}

fn cores() -> usize {
    thread::available_parallelism().map_or(0, usize::from)
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

fn micros(duration: Duration) -> String {
    let us = duration.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn millis(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// The median stop time, and how many stops had to be killed.
fn stop_times(stops: &[Option<Duration>]) -> String {
    let stopped: Vec<Duration> = stops.iter().flatten().copied().collect();
    let killed = stops.len() - stopped.len();
    let mut text = if stopped.is_empty() {
        String::new()
    } else {
        format!("{} (median of {})", millis(median(&stopped)), stopped.len())
    };
    if killed > 0 {
        if !text.is_empty() {
            text.push_str("; ");
        }
        let _ = write!(
            text,
            "**{killed} did not exit within {} s and were killed**",
            DAEMON_TIMEOUT.as_secs()
        );
    }
    text
}

fn millis_list(samples: &[Duration]) -> String {
    let listed: Vec<String> = samples.iter().map(|d| millis(*d)).collect();
    format!("{} ({})", millis(median(samples)), listed.join(", "))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn bytes_label(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{size} B")
    }
}

// ---------------------------------------------------------------------------------------------
// BENCHMARKS.md

/// Replaces what lies between the daemon markers in `BENCHMARKS.md` (adding them under a
/// `## Daemon` heading at the end when missing); the file is read right before it is written,
/// and nothing outside the markers changes.
fn write_benchmarks_md(tables: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let generated = format!(
        "\n<!-- Generated by benches/daemon.rs; edits here are overwritten. -->\n\n\
         Command: `WASMCACHE_BENCH_WRITE=1 cargo bench --bench daemon`, run on {date}.\n\
         Machine: nproc {cores}, {cpu}, {kernel}. The daemon (`wasmcache serve --log info`, the \
         binary cargo builds for benches, with its default of one async worker thread per CPU) and the \
         load generator (this bench: a tokio runtime with {LOAD_THREADS} worker threads; the \
         paced loads on one thread) share these cores; other work on the machine \
         shows in the \"rest of machine\" columns (before each section the bench waits up to \
         {quiet} s for it to fall under {share:.0} % of a core). Tools: {curl}; CNCF \
         distribution {registry}.\n\n{tables}",
        date = tool_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cores = cores(),
        quiet = QUIET_WAIT.as_secs(),
        share = QUIET_SHARE * 100.0,
        cpu = cpu_model(),
        kernel = tool_output("uname", &["-sr"]),
        curl = tool_output("curl", &["--version"])
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
        registry = tool_output("/usr/bin/docker-registry", &["--version"])
            .split_whitespace()
            .nth(2)
            .unwrap_or("?"),
    );
    support::replace_section(&path, BEGIN_MARKER, END_MARKER, "## Daemon", &generated);
}

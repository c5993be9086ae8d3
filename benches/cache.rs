//! Prewarming and the bounded cache, measured on this machine:
//!
//! 1. **Prewarm 100 distinct 1 MiB modules** from a CNCF distribution registry on a free
//!    loopback port (pushed first with oras-py as CNCF Wasm artifacts `prewarm/m{i}:v1`; the
//!    push is setup): one gRPC `Prefetch` call with all references against a fresh daemon
//!    (`prefetch_concurrency` 2, the default, and 8), timed from the call to the `SUMMARY`
//!    event; `wasmcache prefetch --file LIST` (process wall time, start-up included); and
//!    oras-py, once as 100 sequential `python` processes (as a node script would run
//!    `oras pull`) and once as one process calling `OrasClient.pull` 100 times. Every run is
//!    checked: 100 successes, every module's digest and size, every file re-hashed.
//! 2. **Start-up with 10,000 and 100,000 cached entries**: the data dir is written with the
//!    library while no daemon runs (module blob, module, manifest and reference records per
//!    entry), then `wasmcache serve` is spawned repeatedly and timed until its socket accepts
//!    and until `GET /readyz` answers 200, beside the `startup_ms` it logs. `Store::open` and
//!    its reconciliation steps are timed in-process to show where the time goes, and so is
//!    the eviction pass every download runs; then some prewarm modules are prefetched into
//!    each populated cache, to show what a large cache costs a download.
//! 3. **Eviction of 10,000 entries** under a budget that forces all of them out: the
//!    library's `Store::evict`, and the daemon's `Gc` call (`max_cache_bytes = 1`), each
//!    verified afterwards (no blob, no module, manifest, reference or pin left), with the
//!    index work and the file deletions replayed apart, and a control run showing the
//!    eviction pass the daemon makes by itself as it starts.
//!
//! The machine's two cores are shared with whatever else runs; every figure is a median of
//! several runs, shown with its range, and the load average is recorded with the results.
//! Every child process runs under `timeout`, every gRPC call under a deadline.
//!
//! Environment:
//! - `WASMCACHE_BENCH_WRITE=1`: also write the tables into `BENCHMARKS.md` between
//!   `<!-- cache:begin -->` and `<!-- cache:end -->` (appended under
//!   `## Prewarming and the bounded cache` when the markers are missing).
//!
//! Run without `--bench` (e.g. `cargo test --benches`), everything runs once at a small scale
//! as a smoke test and nothing is written.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::{cpu_model, tool_output};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::runtime::Runtime;
use tokio::time::timeout;
use wasmcache::api::proto::prefetch_progress::Stage;
use wasmcache::api::proto::{
    FetchRequest, FetchResponse, GcRequest, PrefetchRequest, PullPolicy, UsageRequest,
};
use wasmcache::store::{Budget, Reconciled, Store};
use wasmcache::Digest;

use common::{cli, fixtures, isolate, require_tool, venv_python, wasm, ChildGuard, Registry};

/// Longest a child process may run before `timeout` kills it.
const CHILD_TIMEOUT_SECS: u32 = 120;
/// Longest a gRPC call (a whole prefetch stream included) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest the daemon may take to become ready or to stop.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);
/// Repository prefix of the prewarm fixtures.
const PREWARM_REPO: &str = "prewarm";
/// Where the synthetic cache entries claim to come from (never contacted).
const SYNTHETIC_REGISTRY: &str = "bench.example";
/// Extra bytes of each synthetic module (as `common::wasm::module(8, i)`).
const TINY_EXTRA: usize = 8;
/// Writer threads when entries are populated through `Store::commit` (fsyncs from several
/// threads share journal commits).
const COMMIT_THREADS: usize = 8;
/// `path_grace` of the daemon in the `Gc` case: long enough to protect every entry from the
/// eviction pass the daemon runs as it starts, short enough to wait out.
const GC_PATH_GRACE_SECS: u64 = 5;
/// Markers around the generated part of `BENCHMARKS.md`.
const BEGIN_MARKER: &str = "<!-- cache:begin -->";
const END_MARKER: &str = "<!-- cache:end -->";
const HEADING: &str = "## Prewarming and the bounded cache";

/// Every pull in one process: `ADDR OUTDIR REFERENCE…`, reference `i` into `OUTDIR/m{i}`.
const ORAS_PULL_ALL: &str = "\
import os
import sys
import oras.client

addr, outdir = sys.argv[1:3]
client = oras.client.OrasClient(hostname=addr, insecure=True)
for i, reference in enumerate(sys.argv[3:]):
    client.pull(target=addr + '/' + reference, outdir=os.path.join(outdir, 'm%d' % i))
";

/// How much of everything to do.
struct Scale {
    /// Modules prewarmed.
    modules: usize,
    /// Size of each prewarmed module, exactly.
    module_bytes: usize,
    /// Threads pushing the fixtures.
    push_threads: usize,
    /// Measured runs of each wasmcache prewarm row.
    wasmcache_runs: usize,
    /// Measured runs of each oras-py row.
    oras_runs: usize,
    /// Cache sizes of the start-up case.
    startup_entries: [usize; 2],
    /// Entry counts populated through `Store::commit` (the others: blob files written
    /// directly, records through the index).
    commit_populated: usize,
    /// Daemon starts timed per cache size.
    startups: usize,
    /// In-process `Store::open` timings per cache size.
    open_runs: usize,
    /// Prewarm modules prefetched into each populated cache (the first ones of the list).
    populated_prefetch: usize,
    /// Entries evicted.
    evict_entries: usize,
    /// Runs of the library eviction.
    evict_runs: usize,
    /// Runs of the daemon's `Gc`.
    gc_runs: usize,
}

/// `cargo bench --bench cache`.
const FULL: Scale = Scale {
    modules: 100,
    module_bytes: 1 << 20,
    push_threads: 4,
    wasmcache_runs: 5,
    oras_runs: 3,
    startup_entries: [10_000, 100_000],
    commit_populated: 10_000,
    startups: 5,
    open_runs: 5,
    populated_prefetch: 20,
    evict_entries: 10_000,
    evict_runs: 3,
    gc_runs: 3,
};

/// A smoke run (`cargo test --benches`): every path once, quickly.
const SMOKE: Scale = Scale {
    modules: 4,
    module_bytes: 64 << 10,
    push_threads: 2,
    wasmcache_runs: 1,
    oras_runs: 1,
    startup_entries: [200, 1_000],
    commit_populated: 200,
    startups: 1,
    open_runs: 1,
    populated_prefetch: 2,
    evict_entries: 200,
    evict_runs: 1,
    gc_runs: 1,
};

fn main() {
    let bench_mode = std::env::args().any(|arg| arg == "--bench");
    let scale = if bench_mode { &FULL } else { &SMOKE };
    let write = bench_mode && std::env::var_os("WASMCACHE_BENCH_WRITE").is_some_and(|v| v == "1");
    for tool in ["timeout", "sync", "kill", "/usr/bin/docker-registry"] {
        require_tool(tool);
    }
    let load_before = loadavg();
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let work = tempfile::Builder::new()
        .prefix("wasmcache-bench-cache-")
        .tempdir()
        .expect("bench work dir");

    eprintln!(
        "cache bench: starting a registry, pushing {} modules of {} with oras-py",
        scale.modules,
        bytes_label(scale.module_bytes)
    );
    let registry = Registry::start();
    let pushed = Instant::now();
    let fixtures = push_fixtures(&registry, scale);
    let push = pushed.elapsed();
    eprintln!("cache bench: pushed in {:.1} s", push.as_secs_f64());

    let prewarm = prewarm(&runtime, work.path(), scale, &registry, &fixtures, push);
    let startups: Vec<StartupCase> = scale
        .startup_entries
        .iter()
        .map(|&entries| startup_case(&runtime, work.path(), entries, scale, &fixtures))
        .collect();
    drop(registry);
    let eviction = eviction(&runtime, work.path(), scale);

    let load_after = loadavg();
    let tables = tables(scale, &prewarm, &startups, &eviction);
    print!("{tables}");
    eprintln!(
        "cache bench: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if write {
        write_benchmarks_md(&tables, &load_before, &load_after);
        eprintln!("cache bench: wrote BENCHMARKS.md");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Prewarming

/// One row of the prewarm table.
struct Row {
    name: &'static str,
    shown: String,
    runs: usize,
    samples: Vec<Duration>,
    /// The daemon's CPU time (user + system) over each timed window, for wasmcache rows.
    daemon_cpu: Vec<Duration>,
    /// What the registry answered during the row's first run.
    requests: Option<Requests>,
}

/// One timed prewarm run.
struct Outcome {
    wall: Duration,
    daemon_cpu: Option<Duration>,
}

/// Registry requests of one run, from its access log.
#[derive(Clone, Copy, Default)]
struct Requests {
    /// `GET /v2/` (the API version check clients use to discover authentication).
    probes: usize,
    manifests: usize,
    blobs: usize,
    other: usize,
}

impl Requests {
    fn of(requests: &[common::LoggedRequest]) -> Requests {
        let mut counts = Requests::default();
        for request in requests {
            if request.path == "/v2/" {
                counts.probes += 1;
            } else if request.path.contains("/manifests/") {
                counts.manifests += 1;
            } else if request.path.contains("/blobs/") {
                counts.blobs += 1;
            } else {
                counts.other += 1;
            }
        }
        counts
    }

    fn total(&self) -> usize {
        self.probes + self.manifests + self.blobs + self.other
    }
}

/// What the prewarm case measured.
struct Prewarm {
    rows: Vec<Row>,
    push: Duration,
    /// Python start-up with `import oras.client`, median.
    python_start: Duration,
}

/// The prewarm fixtures in the registry.
struct Fixtures {
    addr: String,
    /// `prewarm/m{i}:v1`, by index.
    references: Vec<String>,
    /// sha256 hex of module `i`.
    hexes: Vec<String>,
    module_bytes: usize,
}

fn prewarm(
    runtime: &Runtime,
    work: &Path,
    scale: &Scale,
    registry: &Registry,
    fixtures: &Fixtures,
    push: Duration,
) -> Prewarm {
    let python = venv_python();

    let scripts = work.join("scripts");
    fs::create_dir_all(&scripts).expect("scripts dir");
    let pull_one = scripts.join("oras_pull_one.py");
    let pull_all = scripts.join("oras_pull_all.py");
    fs::write(&pull_one, support::ORAS_PULL_ONE).expect("writing the oras-py script");
    fs::write(&pull_all, ORAS_PULL_ALL).expect("writing the oras-py script");
    let list = scripts.join("prewarm.txt");
    let mut text = String::new();
    for reference in &fixtures.references {
        let _ = writeln!(text, "{}/{reference}", fixtures.addr);
    }
    fs::write(&list, text).expect("writing the prefetch list");

    let n = scale.modules;
    let mut rows = vec![
        Row {
            name: "wasmcache gRPC `Prefetch`, `prefetch_concurrency` 2 (default)",
            shown: format!("Prefetch{{references: [{n} × ADDR/prewarm/mI:v1]}} → SUMMARY"),
            runs: scale.wasmcache_runs,
            samples: Vec::new(),
            daemon_cpu: Vec::new(),
            requests: None,
        },
        Row {
            name: "wasmcache gRPC `Prefetch`, `prefetch_concurrency` 8",
            shown: format!(
                "Prefetch{{references: [{n} × …]}} → SUMMARY; config prefetch_concurrency = 8"
            ),
            runs: scale.wasmcache_runs,
            samples: Vec::new(),
            daemon_cpu: Vec::new(),
            requests: None,
        },
        Row {
            name: "wasmcache CLI (process start included)",
            shown: "wasmcache prefetch --file LIST --data-dir DIR".to_owned(),
            runs: scale.wasmcache_runs,
            samples: Vec::new(),
            daemon_cpu: Vec::new(),
            requests: None,
        },
        Row {
            name: "oras-py, one Python process per module",
            shown: format!("{n} × python oras_pull_one.py ADDR prewarm/mI:v1 OUT/mI"),
            runs: scale.oras_runs,
            samples: Vec::new(),
            daemon_cpu: Vec::new(),
            requests: None,
        },
        Row {
            name: "oras-py, one Python process for all (extra)",
            shown: format!("python oras_pull_all.py ADDR OUT … ({n} × OrasClient.pull)"),
            runs: scale.oras_runs,
            samples: Vec::new(),
            daemon_cpu: Vec::new(),
            requests: None,
        },
    ];
    let rounds = rows.iter().map(|r| r.runs).max().unwrap_or(0);
    for round in 0..rounds {
        eprintln!("cache bench: prewarm round {} of {rounds}", round + 1);
        let count = rows.len();
        for offset in 0..count {
            // Rotate the order so no row always runs right after the same other one.
            let row = (round + offset) % count;
            if round >= rows[row].runs {
                continue;
            }
            let scratch = tempfile::Builder::new()
                .prefix("prewarm-")
                .tempdir_in(work)
                .expect("run scratch dir");
            let logged_before = rows[row]
                .requests
                .is_none()
                .then(|| registry.requests().len());
            let outcome = match row {
                0 => prefetch_grpc(runtime, scratch.path(), fixtures, None),
                1 => prefetch_grpc(
                    runtime,
                    scratch.path(),
                    fixtures,
                    Some("prefetch_concurrency = 8\n"),
                ),
                2 => prefetch_cli(runtime, scratch.path(), fixtures, &list),
                3 => oras_per_process(scratch.path(), fixtures, &python, &pull_one),
                _ => oras_one_process(scratch.path(), fixtures, &python, &pull_all),
            };
            if let Some(before) = logged_before {
                rows[row].requests = Some(Requests::of(&registry.requests()[before..]));
            }
            eprintln!("  {}: {}", rows[row].name, millis(outcome.wall));
            rows[row].samples.push(outcome.wall);
            rows[row].daemon_cpu.extend(outcome.daemon_cpu);
            // What this run left dirty is written back before the next one, outside timing.
            make_writable(scratch.path());
            drop(scratch);
            sync_fs(work);
        }
    }
    let mut python_start = Vec::new();
    for _ in 0..scale.oras_runs.max(3) {
        let scratch = tempfile::tempdir_in(work).expect("scratch dir");
        let mut command = Command::new(&python);
        isolate(&mut command, scratch.path())
            .current_dir(scratch.path())
            .args(["-c", "import oras.client"]);
        let (wall, status) = timed(command, scratch.path());
        assert!(status.success(), "python -c 'import oras.client' failed");
        python_start.push(wall);
    }
    Prewarm {
        rows,
        push,
        python_start: median(&python_start),
    }
}

/// Pushes the prewarm modules with oras-py from a few threads.
fn push_fixtures(registry: &Registry, scale: &Scale) -> Fixtures {
    let n = scale.modules;
    let references: Vec<String> = (0..n).map(|i| format!("{PREWARM_REPO}/m{i}:v1")).collect();
    let mut hexes: Vec<Option<String>> = vec![None; n];
    let per_thread = n.div_ceil(scale.push_threads);
    thread::scope(|scope| {
        for (t, chunk) in hexes.chunks_mut(per_thread).enumerate() {
            let endpoint = registry.endpoint();
            let references = &references;
            scope.spawn(move || {
                for (offset, slot) in chunk.iter_mut().enumerate() {
                    let i = t * per_thread + offset;
                    let module = module_of_size(scale.module_bytes, 0xc0de_0000 + i as u64);
                    let hex = wasm::sha256_hex(&module);
                    let manifest =
                        fixtures::oras_push_cncf(endpoint.clone(), &references[i], &module);
                    assert_eq!(
                        manifest.layer_digests(),
                        [format!("sha256:{hex}")],
                        "oras-py pushed another layer for {}",
                        references[i]
                    );
                    *slot = Some(hex);
                }
            });
        }
    });
    Fixtures {
        addr: registry.addr(),
        references,
        hexes: hexes.into_iter().map(|h| h.expect("pushed")).collect(),
        module_bytes: scale.module_bytes,
    }
}

/// A valid module of exactly `size` bytes (`size` ≥ 64 KiB): the 41-byte module and a custom
/// section of seeded pseudo-random bytes.
fn module_of_size(size: usize, seed: u64) -> Vec<u8> {
    // 41-byte module, section id, 3-byte LEB128 length, 4-byte name ("pad" and its length).
    let module = wasm::module(size - 41 - 1 - 3 - 4, seed);
    assert_eq!(module.len(), size, "module size");
    module
}

/// A fresh daemon on `scratch/data` (not timed), then one gRPC `Prefetch` of every fixture,
/// timed from the call to the `SUMMARY` event; every result and file is checked.
fn prefetch_grpc(
    runtime: &Runtime,
    scratch: &Path,
    fixtures: &Fixtures,
    config: Option<&str>,
) -> Outcome {
    let mut daemon = Serve::start(
        runtime,
        scratch,
        config,
        &["--insecure-registry", &fixtures.addr],
    );
    let outcome = prefetch_call(runtime, &daemon, fixtures, fixtures.references.len());
    daemon.stop();
    outcome
}

/// One gRPC `Prefetch` of the first `count` fixtures, timed from the call to the `SUMMARY`
/// event, with the daemon's CPU time over that window; every result and file is checked.
fn prefetch_call(runtime: &Runtime, daemon: &Serve, fixtures: &Fixtures, count: usize) -> Outcome {
    let pid = daemon.child.id().expect("daemon running");
    let references: Vec<String> = fixtures.references[..count]
        .iter()
        .map(|r| format!("{}/{r}", fixtures.addr))
        .collect();
    let mut cpu_before = Duration::ZERO;
    let (wall, results) = runtime.block_on(async {
        let mut client = wasmcache::client::connect(&daemon.socket)
            .await
            .expect("connecting to the daemon");
        cpu_before = cpu_time(pid);
        let started = Instant::now();
        let call = async {
            let mut stream = client
                .prefetch(PrefetchRequest {
                    references: references.clone(),
                    pin: false,
                })
                .await
                .expect("Prefetch call")
                .into_inner();
            let mut results: HashMap<String, FetchResponse> = HashMap::new();
            while let Some(event) = stream.message().await.expect("Prefetch stream") {
                match event.stage() {
                    Stage::Done => {
                        let result = event.result.expect("DONE carries a result");
                        results.insert(event.reference, result);
                    }
                    Stage::Failed => panic!(
                        "prefetch of {} failed: {} {}",
                        event.reference, event.error_code, event.message
                    ),
                    Stage::Summary => {
                        let wall = started.elapsed();
                        assert_eq!(
                            (event.succeeded, event.failed),
                            (references.len() as u32, 0),
                            "prefetch summary"
                        );
                        return (wall, results);
                    }
                    _ => {}
                }
            }
            panic!("the Prefetch stream ended without a SUMMARY");
        };
        timeout(CALL_TIMEOUT, call)
            .await
            .expect("Prefetch did not finish in time")
    });
    let daemon_cpu = cpu_time(pid).saturating_sub(cpu_before);
    for (i, reference) in references.iter().enumerate() {
        let result = results
            .get(reference)
            .unwrap_or_else(|| panic!("no DONE event for {reference}"));
        assert_eq!(
            result.digest,
            format!("sha256:{}", fixtures.hexes[i]),
            "{reference}"
        );
        assert_eq!(result.size, fixtures.module_bytes as u64, "{reference}");
        assert!(!result.cache_hit, "{reference} was a cache hit");
        assert_eq!(result.format, "cncf-wasm", "{reference}");
        check_file(Path::new(&result.path), &fixtures.hexes[i]);
    }
    Outcome {
        wall,
        daemon_cpu: Some(daemon_cpu),
    }
}

/// A fresh daemon (not timed), then `wasmcache prefetch --file LIST` as a process; every
/// module is then checked in the daemon's blob directory.
fn prefetch_cli(runtime: &Runtime, scratch: &Path, fixtures: &Fixtures, list: &Path) -> Outcome {
    let mut daemon = Serve::start(
        runtime,
        scratch,
        None,
        &["--insecure-registry", &fixtures.addr],
    );
    let mut command = cli::wasmcache_in(&daemon.home);
    command
        .arg("prefetch")
        .arg("--file")
        .arg(list)
        .arg("--data-dir")
        .arg(&daemon.data_dir);
    let pid = daemon.child.id().expect("daemon running");
    let cpu_before = cpu_time(pid);
    let (wall, status) = timed(command, scratch);
    let daemon_cpu = cpu_time(pid).saturating_sub(cpu_before);
    assert!(
        status.success(),
        "wasmcache prefetch failed with {status}:\n{}",
        fs::read_to_string(scratch.join("stderr")).unwrap_or_default()
    );
    for hex in &fixtures.hexes {
        check_file(&daemon.data_dir.join("blobs/sha256").join(hex), hex);
    }
    daemon.stop();
    Outcome {
        wall,
        daemon_cpu: Some(daemon_cpu),
    }
}

/// `oras pull` as a node script would run it: a new Python process per module.
fn oras_per_process(scratch: &Path, fixtures: &Fixtures, python: &Path, script: &Path) -> Outcome {
    let out = scratch.join("out");
    let started = Instant::now();
    for (i, reference) in fixtures.references.iter().enumerate() {
        let mut command = Command::new(python);
        isolate(&mut command, scratch)
            .current_dir(scratch)
            .arg(script)
            .args([fixtures.addr.as_str(), reference])
            .arg(out.join(format!("m{i}")));
        let (_, status) = timed(command, scratch);
        assert!(
            status.success(),
            "oras-py pull of {reference} failed with {status}:\n{}",
            fs::read_to_string(scratch.join("stderr")).unwrap_or_default()
        );
    }
    let wall = started.elapsed();
    check_oras_output(&out, fixtures);
    Outcome {
        wall,
        daemon_cpu: None,
    }
}

/// One Python process pulling every module with one `OrasClient`.
fn oras_one_process(scratch: &Path, fixtures: &Fixtures, python: &Path, script: &Path) -> Outcome {
    let out = scratch.join("out");
    let mut command = Command::new(python);
    isolate(&mut command, scratch)
        .current_dir(scratch)
        .arg(script)
        .arg(&fixtures.addr)
        .arg(&out)
        .args(&fixtures.references);
    let (wall, status) = timed(command, scratch);
    assert!(
        status.success(),
        "oras-py failed with {status}:\n{}",
        fs::read_to_string(scratch.join("stderr")).unwrap_or_default()
    );
    check_oras_output(&out, fixtures);
    Outcome {
        wall,
        daemon_cpu: None,
    }
}

fn check_oras_output(out: &Path, fixtures: &Fixtures) {
    for (i, hex) in fixtures.hexes.iter().enumerate() {
        check_file(&out.join(format!("m{i}/module.wasm")), hex);
    }
}

/// Panics unless the file at `path` hashes to `hex`.
fn check_file(path: &Path, hex: &str) {
    let bytes = fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let actual = wasm::sha256_hex(&bytes);
    assert_eq!(actual, hex, "{} has other bytes", path.display());
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// A `wasmcache serve --log info` process in its own home, ready when `start` returns.
struct Serve {
    child: ChildGuard,
    home: PathBuf,
    data_dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    spawned: Instant,
    /// Spawn → the socket accepts a connection.
    accepted: Duration,
    /// Spawn → `GET /readyz` answers 200.
    ready: Duration,
}

impl Serve {
    /// Starts a daemon on `dir/data` (which may already hold a cache) with the TOML `config`.
    fn start(runtime: &Runtime, dir: &Path, config: Option<&str>, args: &[&str]) -> Serve {
        let home = dir.join("home");
        fs::create_dir_all(&home).expect("daemon home");
        let data_dir = dir.join("data");
        let socket = data_dir.join("wasmcache.sock");
        let log = dir.join(format!("serve-{}.log", now_nanos()));
        let mut command = cli::wasmcache_in(&home);
        command.arg("serve").arg("--data-dir").arg(&data_dir);
        if let Some(config) = config {
            let path = home.join("wasmcache.toml");
            fs::write(&path, config).expect("writing the daemon config");
            command.arg("--config").arg(path);
        }
        command
            .args(["--log", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("daemon log"));
        let spawned = Instant::now();
        let child = ChildGuard::spawn(&mut command);
        let mut accepted = None;
        let ready = loop {
            let elapsed = spawned.elapsed();
            assert!(
                elapsed < DAEMON_TIMEOUT,
                "the daemon did not become ready:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            if StdUnixStream::connect(&socket).is_ok() {
                accepted.get_or_insert(elapsed);
                let response = runtime.block_on(async {
                    timeout(
                        Duration::from_secs(10),
                        common::daemon::unix_request(&socket, "GET", "/readyz", &[], None),
                    )
                    .await
                });
                if matches!(response, Ok(ref r) if r.status == 200) {
                    break spawned.elapsed();
                }
            }
            thread::sleep(Duration::from_micros(200));
        };
        Serve {
            child,
            home,
            data_dir,
            socket,
            log,
            spawned,
            accepted: accepted.expect("connected"),
            ready,
        }
    }

    /// SIGTERM, then waits for the exit (killing it after [`DAEMON_TIMEOUT`]).
    fn stop(&mut self) {
        let pid = self.child.id().expect("daemon running");
        common::run_checked(
            Command::new("timeout")
                .arg(CHILD_TIMEOUT_SECS.to_string())
                .args(["kill", "-TERM", &pid.to_string()]),
        );
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .child_mut()
                .try_wait()
                .expect("waiting for the daemon")
            {
                assert!(
                    status.success(),
                    "the daemon exited with {status}:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "cache bench: the daemon ignored SIGTERM for {DAEMON_TIMEOUT:?}; killing it"
                );
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        self.child.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic cache entries

/// How a data dir was filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// `Store::begin_ingest` + `write_all` + `Store::commit` (fsync per blob), from
    /// [`COMMIT_THREADS`] threads.
    Commit,
    /// Blob files written directly under `blobs/sha256/<hex>` (read-only, as `commit` leaves
    /// them) without a per-file fsync, then one `sync -f`.
    Direct,
}

impl Fill {
    fn describe(self) -> String {
        match self {
            Fill::Commit => format!("`Store::commit` per blob, {COMMIT_THREADS} threads"),
            Fill::Direct => "blob files written directly, one `sync -f`".to_owned(),
        }
    }
}

fn tiny_reference(i: usize) -> String {
    format!("{SYNTHETIC_REGISTRY}/r/m{i}:v1")
}

/// How long populating took.
#[derive(Clone, Copy)]
struct Populated {
    /// Blobs and records written, index flushed.
    write: Duration,
    /// The `sync -f` after (the whole filesystem, so other processes' writes count too).
    sync: Duration,
}

/// Writes `count` entries into `data_dir` with no daemon running: a distinct tiny module per
/// entry with its module, manifest and reference records, as a pull leaves them; then checks
/// that opening the store finds nothing to reconcile.
fn populate(data_dir: &Path, count: usize, fill: Fill) -> Populated {
    let started = Instant::now();
    let store = Store::open(data_dir).expect("opening the store");
    let add = |i: usize| {
        let module = wasm::module(TINY_EXTRA, i as u64);
        let digest = match fill {
            Fill::Commit => {
                let mut ingest = store.begin_ingest(1 << 20).expect("begin ingest");
                ingest.write_all(&module).expect("ingest write");
                let (digest, size) = store
                    .commit(ingest, None, |_| Ok::<(), wasmcache::store::Error>(()))
                    .expect("commit");
                assert_eq!(size, module.len() as u64);
                digest
            }
            Fill::Direct => {
                let digest = Digest::of(&module);
                let path = store.blob_path(&digest);
                fs::write(&path, &module).expect("writing a blob");
                let mut permissions = fs::metadata(&path).expect("stat").permissions();
                permissions.set_readonly(true);
                fs::set_permissions(&path, permissions).expect("chmod");
                digest
            }
        };
        support::index_as_pulled(
            &store,
            &digest,
            module.len() as u64,
            &tiny_reference(i),
            &format!("m{i}"),
        );
    };
    let threads = match fill {
        Fill::Commit => COMMIT_THREADS,
        Fill::Direct => 2,
    };
    let per_thread = count.div_ceil(threads);
    thread::scope(|scope| {
        for t in 0..threads {
            let add = &add;
            scope.spawn(move || {
                for i in t * per_thread..((t + 1) * per_thread).min(count) {
                    add(i);
                }
            });
        }
    });
    store.flush().expect("flushing the index");
    drop(store);
    let write = started.elapsed();
    let started = Instant::now();
    sync_fs(data_dir);
    let sync = started.elapsed();
    let store = Store::open(data_dir).expect("reopening the store");
    assert_eq!(
        store.reconciled(),
        Reconciled::default(),
        "the populated cache needed reconciling"
    );
    let usage = store.usage().expect("usage");
    assert_eq!(
        usage.modules, count as u64,
        "modules in the populated cache"
    );
    assert_eq!(store.list().expect("references").len(), count);
    Populated { write, sync }
}

// ---------------------------------------------------------------------------------------------
// 2. Start-up

/// Start-up figures for one cache size.
struct StartupCase {
    entries: usize,
    fill: Fill,
    populate: Populated,
    accept: Vec<Duration>,
    ready: Vec<Duration>,
    logged_ms: Vec<u64>,
    /// `Store::open`, in process.
    open: Vec<Duration>,
    /// Opening the sled database and its six trees alone.
    sled_open: Vec<Duration>,
    /// `store.modules()`: the module records read and decoded.
    scan_modules: Vec<Duration>,
    /// `has_blob` (a `stat`) for every module.
    stat_blobs: Vec<Duration>,
    /// Listing `blobs/sha256` and one index lookup per file.
    list_blobs: Vec<Duration>,
    /// Listing `blobs/sha256` alone (names collected into a `Vec`).
    list_only: Vec<Duration>,
    /// An eviction pass with nothing to evict (default budget), as run before and after each
    /// download and at every gc tick.
    noop_evict: Vec<Duration>,
    /// One gRPC `Prefetch` of the prewarm fixtures into this populated cache (default config).
    prefetch: Outcome,
}

fn startup_case(
    runtime: &Runtime,
    work: &Path,
    entries: usize,
    scale: &Scale,
    fixtures: &Fixtures,
) -> StartupCase {
    let dir = tempfile::Builder::new()
        .prefix(&format!("startup-{entries}-"))
        .tempdir_in(work)
        .expect("startup dir");
    let data_dir = dir.path().join("data");
    let fill = if entries <= scale.commit_populated {
        Fill::Commit
    } else {
        Fill::Direct
    };
    eprintln!(
        "cache bench: populating {entries} entries ({})",
        fill.describe()
    );
    let populate = populate(&data_dir, entries, fill);
    eprintln!(
        "cache bench: populated in {:.1} s + {:.1} s sync",
        populate.write.as_secs_f64(),
        populate.sync.as_secs_f64()
    );
    let mut case = StartupCase {
        entries,
        fill,
        populate,
        accept: Vec::new(),
        ready: Vec::new(),
        logged_ms: Vec::new(),
        open: Vec::new(),
        sled_open: Vec::new(),
        scan_modules: Vec::new(),
        stat_blobs: Vec::new(),
        list_blobs: Vec::new(),
        list_only: Vec::new(),
        noop_evict: Vec::new(),
        prefetch: Outcome {
            wall: Duration::ZERO,
            daemon_cpu: None,
        },
    };
    for run in 0..scale.startups {
        let mut daemon = Serve::start(runtime, dir.path(), None, &[]);
        case.accept.push(daemon.accepted);
        case.ready.push(daemon.ready);
        case.logged_ms.push(support::logged_startup_ms(&daemon.log));
        if run + 1 == scale.startups {
            check_served(runtime, &daemon, entries);
        }
        daemon.stop();
    }
    eprintln!(
        "cache bench: {entries} entries: /readyz after {} (median of {})",
        millis(median(&case.ready)),
        case.ready.len()
    );
    let index_dir = data_dir.join("index");
    for _ in 0..scale.open_runs {
        let started = Instant::now();
        let store = Store::open(&data_dir).expect("opening the store");
        case.open.push(started.elapsed());
        assert_eq!(store.reconciled(), Reconciled::default());

        let started = Instant::now();
        let modules = store.modules().expect("modules");
        case.scan_modules.push(started.elapsed());
        assert_eq!(modules.len(), entries);

        let digests: Vec<Digest> = modules.iter().map(|(digest, _)| digest.clone()).collect();
        let started = Instant::now();
        let present = digests.iter().filter(|d| store.has_blob(d)).count();
        case.stat_blobs.push(started.elapsed());
        assert_eq!(present, entries);

        let blobs = data_dir.join("blobs/sha256");
        let started = Instant::now();
        let mut known = 0;
        for entry in fs::read_dir(&blobs).expect("listing blobs") {
            let name = entry.expect("dir entry").file_name();
            let digest = Digest::from_hex(name.to_str().expect("UTF-8 name")).expect("hex name");
            known += usize::from(store.stored_module(&digest).expect("lookup").is_some());
        }
        case.list_blobs.push(started.elapsed());
        assert_eq!(known, entries);

        let started = Instant::now();
        let names: Vec<std::ffi::OsString> = fs::read_dir(&blobs)
            .expect("listing blobs")
            .map(|entry| entry.expect("dir entry").file_name())
            .collect();
        case.list_only.push(started.elapsed());
        assert_eq!(names.len(), entries);

        let started = Instant::now();
        let evicted = store
            .evict(&wasmcache::Config::default().budget(), 0)
            .expect("no-op eviction");
        case.noop_evict.push(started.elapsed());
        assert!(evicted.is_empty(), "the default budget evicted something");
        drop(store);

        let started = Instant::now();
        let db = sled::Config::new()
            .path(&index_dir)
            .open()
            .expect("opening sled");
        for tree in [
            "references",
            "manifests",
            "layers",
            "modules",
            "documents",
            "pins",
        ] {
            db.open_tree(tree).expect("opening a tree");
        }
        case.sled_open.push(started.elapsed());
        drop(db);
    }
    eprintln!(
        "cache bench: {entries} entries: prefetching {} prewarm modules into them",
        scale.populated_prefetch
    );
    let mut daemon = Serve::start(
        runtime,
        dir.path(),
        None,
        &["--insecure-registry", &fixtures.addr],
    );
    case.prefetch = prefetch_call(runtime, &daemon, fixtures, scale.populated_prefetch);
    daemon.stop();
    make_writable(dir.path());
    case
}

/// `Fetch(NEVER)` of a few populated entries through the daemon: it really serves them.
fn check_served(runtime: &Runtime, daemon: &Serve, entries: usize) {
    runtime.block_on(async {
        let mut client = wasmcache::client::connect(&daemon.socket)
            .await
            .expect("connecting to the daemon");
        for i in [0, entries / 2, entries - 1] {
            let request = FetchRequest {
                reference: tiny_reference(i),
                pull_policy: PullPolicy::Never.into(),
                lease_seconds: 0,
            };
            let response = timeout(CALL_TIMEOUT, client.fetch(request))
                .await
                .expect("Fetch timed out")
                .expect("Fetch of a populated entry")
                .into_inner();
            let module = wasm::module(TINY_EXTRA, i as u64);
            assert_eq!(response.digest, Digest::of(&module).to_string());
            assert!(response.cache_hit);
            assert_eq!(fs::read(&response.path).expect("module file"), module);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Eviction

struct Eviction {
    entries: usize,
    library: Vec<Duration>,
    gc: Vec<Duration>,
    populate: Vec<Duration>,
    /// `modules()` ×2 + `list()`, reads like those one eviction makes.
    scans: Vec<Duration>,
    /// `Store::remove_digest` per module: its index entries, flushed, then its file.
    removals: Vec<Duration>,
    /// Control: a daemon with `path_grace = "0s"` empties the cache by itself as it starts;
    /// spawn → `Usage` reports no module, and spawn → `/readyz` 200 of that start.
    startup_pass: (Duration, Duration),
}

/// A budget no module fits in.
fn evict_all_budget() -> Budget {
    Budget {
        max_bytes: 1,
        high_watermark: 0.9,
        low_watermark: 0.5,
        max_age: Duration::from_secs(7 * 24 * 3600),
        path_grace: Duration::ZERO,
    }
}

fn eviction(runtime: &Runtime, work: &Path, scale: &Scale) -> Eviction {
    let entries = scale.evict_entries;
    let mut result = Eviction {
        entries,
        library: Vec::new(),
        gc: Vec::new(),
        populate: Vec::new(),
        scans: Vec::new(),
        removals: Vec::new(),
        startup_pass: (Duration::ZERO, Duration::ZERO),
    };
    for run in 0..scale.evict_runs {
        eprintln!(
            "cache bench: eviction of {entries} entries, library run {} of {}",
            run + 1,
            scale.evict_runs
        );
        let dir = tempfile::tempdir_in(work).expect("eviction dir");
        let data_dir = dir.path().join("data");
        result
            .populate
            .push(populate(&data_dir, entries, Fill::Direct).write);
        let store = Store::open(&data_dir).expect("opening the store");

        let started = Instant::now();
        let scanned = store.modules().expect("modules").len()
            + store.modules().expect("modules").len()
            + store.list().expect("references").len();
        result.scans.push(started.elapsed());
        assert_eq!(scanned, 3 * entries);

        let started = Instant::now();
        let evicted = store.evict(&evict_all_budget(), 0).expect("Store::evict");
        result.library.push(started.elapsed());
        assert_eq!(evicted.len(), entries, "modules evicted");
        assert!(evicted.iter().all(|e| e.reason.as_str() == "size"));
        drop(store);
        check_empty(&data_dir);

        // The same modules removed one by one on a fresh copy (index entries, then the file).
        let replay = tempfile::tempdir_in(work).expect("replay dir");
        let replay_data = replay.path().join("data");
        populate(&replay_data, entries, Fill::Direct);
        let store = Store::open(&replay_data).expect("opening the store");
        let modules = store.modules().expect("modules");
        let started = Instant::now();
        for (digest, _) in &modules {
            let removed = store.remove_digest(digest).expect("remove module");
            assert_eq!(removed.modules.len(), 1, "module {digest} removed");
        }
        result.removals.push(started.elapsed());
        drop(store);
    }
    for run in 0..scale.gc_runs {
        eprintln!(
            "cache bench: eviction of {entries} entries, daemon `Gc` run {} of {}",
            run + 1,
            scale.gc_runs
        );
        let dir = tempfile::tempdir_in(work).expect("gc dir");
        result.gc.push(daemon_gc(runtime, dir.path(), entries));
    }
    eprintln!("cache bench: control: the daemon's own first gc pass");
    let dir = tempfile::tempdir_in(work).expect("control dir");
    result.startup_pass = daemon_startup_pass(runtime, dir.path(), entries);
    result
}

/// `Usage` from the daemon.
fn daemon_usage(runtime: &Runtime, daemon: &Serve) -> wasmcache::api::proto::UsageResponse {
    runtime.block_on(async {
        let mut client = wasmcache::client::connect(&daemon.socket)
            .await
            .expect("connecting to the daemon");
        timeout(CALL_TIMEOUT, client.usage(UsageRequest {}))
            .await
            .expect("Usage timed out")
            .expect("Usage")
            .into_inner()
    })
}

/// The control for [`daemon_gc`]: the same daemon with `path_grace = "0s"`, `gc_interval =
/// "1s"` and no call at all, so its own first gc pass (one interval after start) empties the
/// cache. Returns spawn → `Usage` reports an empty cache, and spawn → `/readyz` 200.
fn daemon_startup_pass(runtime: &Runtime, dir: &Path, entries: usize) -> (Duration, Duration) {
    let data_dir = dir.join("data");
    populate(&data_dir, entries, Fill::Direct);
    let config = "max_cache_bytes = 1\ngc_interval = \"1s\"\npath_grace = \"0s\"\n";
    let mut daemon = Serve::start(runtime, dir, Some(config), &[]);
    let emptied = loop {
        if daemon_usage(runtime, &daemon).modules == 0 {
            break daemon.spawned.elapsed();
        }
        assert!(
            daemon.spawned.elapsed() < DAEMON_TIMEOUT,
            "the daemon did not evict by itself"
        );
        thread::sleep(Duration::from_millis(2));
    };
    daemon.stop();
    check_empty(&data_dir);
    (emptied, daemon.ready)
}

/// A daemon with `max_cache_bytes = 1` on a fresh cache of `entries`, then one timed `Gc`.
///
/// The daemon runs an eviction pass as it starts (its gc ticker fires at once, whatever
/// `gc_interval` says), which would empty the cache before the call. So every module's
/// last access is set to now and `path_grace` is [`GC_PATH_GRACE_SECS`]: the start-up pass
/// finds them all protected, `Usage` proves nothing went, and `Gc` is called once the grace
/// has passed.
fn daemon_gc(runtime: &Runtime, dir: &Path, entries: usize) -> Duration {
    let data_dir = dir.join("data");
    populate(&data_dir, entries, Fill::Direct);
    let touched = {
        let store = Store::open(&data_dir).expect("opening the store");
        let now = wasmcache::store::now();
        for (digest, _) in store.modules().expect("modules") {
            store.touch(&digest);
        }
        store.persist_access().expect("saving access times");
        now
    };
    let config = format!(
        "max_cache_bytes = 1\ngc_interval = \"1h\"\npath_grace = \"{GC_PATH_GRACE_SECS}s\"\n"
    );
    let mut daemon = Serve::start(runtime, dir, Some(&config), &[]);
    let usage = |daemon: &Serve| daemon_usage(runtime, daemon);
    assert_eq!(
        usage(&daemon).modules,
        entries as u64,
        "the daemon's start-up eviction pass took modules despite path_grace:\n{}",
        fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    // Wait until every module's grace is over (last access has one-second resolution).
    let unprotected = UNIX_EPOCH + Duration::from_secs(touched + GC_PATH_GRACE_SECS + 1);
    if let Ok(wait) = unprotected.duration_since(SystemTime::now()) {
        thread::sleep(wait + Duration::from_millis(200));
    }
    assert_eq!(
        usage(&daemon).modules,
        entries as u64,
        "modules went before the Gc call"
    );
    let (wall, response) = runtime.block_on(async {
        let mut client = wasmcache::client::connect(&daemon.socket)
            .await
            .expect("connecting to the daemon");
        let started = Instant::now();
        let response = timeout(CALL_TIMEOUT, client.gc(GcRequest {}))
            .await
            .expect("Gc timed out")
            .expect("Gc")
            .into_inner();
        (started.elapsed(), response)
    });
    assert_eq!(response.evicted.len(), entries, "modules evicted by Gc");
    let usage_after = response.usage.expect("Gc reports usage");
    assert_eq!((usage_after.modules, usage_after.bytes), (0, 0));
    assert_eq!(
        fs::read_dir(data_dir.join("blobs/sha256"))
            .expect("blobs dir")
            .count(),
        0,
        "blob files left after Gc"
    );
    daemon.stop();
    check_empty(&data_dir);
    wall
}

/// Panics unless the cache at `data_dir` holds no blob and no index entry.
fn check_empty(data_dir: &Path) {
    let store = Store::open(data_dir).expect("reopening the store");
    assert_eq!(store.reconciled(), Reconciled::default());
    assert!(
        store.modules().expect("modules").is_empty(),
        "module records left"
    );
    assert!(
        store.list().expect("references").is_empty(),
        "references left"
    );
    assert!(store.pins().expect("pins").is_empty(), "pins left");
    let left = fs::read_dir(data_dir.join("blobs/sha256"))
        .expect("blobs dir")
        .count();
    assert_eq!(left, 0, "blob files left");
}

// ---------------------------------------------------------------------------------------------
// Tables

fn tables(
    scale: &Scale,
    prewarm: &Prewarm,
    startups: &[StartupCase],
    eviction: &Eviction,
) -> String {
    let mut out = String::new();
    let n = scale.modules;
    let size = bytes_label(scale.module_bytes);
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();

    // Prewarm.
    let base = median(&prewarm.rows[0].samples);
    let _ = write!(
        out,
        "#### Prewarming {n} distinct {size} modules\n\n\
         Setup (not timed): {n} CNCF Wasm artifacts pushed with oras-py in {:.0} s. wasmcache rows \
         start a fresh daemon (`wasmcache serve --insecure-registry ADDR --log info`, empty data \
         dir) before the clock starts; the gRPC rows are timed from the call to the `SUMMARY` \
         event, the CLI row around its process. Every run is verified: {n} successes, each \
         module's digest and size, every file re-hashed (wasmcache's blob files and oras-py's \
         `module.wasm`). \"daemon CPU\" is the daemon's user + system time over the timed window \
         (`/proc/<pid>/stat`, 10 ms ticks); \"registry requests\" are counted in the registry's \
         access log during the row's first run. Python's start-up with `import oras.client` \
         alone: {}.\n\n\
         | row | command | median | range | runs | per module | daemon CPU | registry requests | ÷ wasmcache gRPC (2) |\n\
         |---|---|---:|---:|---:|---:|---:|---|---:|\n",
        prewarm.push.as_secs_f64(),
        millis(prewarm.python_start),
    );
    for row in &prewarm.rows {
        let m = median(&row.samples);
        let cpu = if row.daemon_cpu.is_empty() {
            "–".to_owned()
        } else {
            millis(median(&row.daemon_cpu))
        };
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {} | {} | {} | {cpu} | {} | {:.2}× |",
            row.name,
            row.shown,
            millis(m),
            range(&row.samples),
            row.samples.len(),
            millis(m / n as u32),
            row.requests.map_or("–".to_owned(), |r| requests_label(&r)),
            ratio(m, base),
        );
    }
    let oras = median(&prewarm.rows[3].samples);
    let oras_one = median(&prewarm.rows[4].samples);
    out.push_str("\n| target | oras-py ÷ wasmcache | |\n|---|---:|---|\n");
    for (label, wasmcache_row) in [
        ("gRPC `Prefetch`, concurrency 2", 0),
        ("gRPC `Prefetch`, concurrency 8", 1),
        ("CLI `wasmcache prefetch`", 2),
    ] {
        let r = ratio(oras, median(&prewarm.rows[wasmcache_row].samples));
        let _ = writeln!(
            out,
            "| ≥ 3× faster than `oras pull` in a loop (one process per module): {label} | {r:.1}× | {} |",
            verdict(r >= 3.0)
        );
    }
    for (label, wasmcache_row) in [
        ("gRPC `Prefetch`, concurrency 2", 0),
        ("gRPC `Prefetch`, concurrency 8", 1),
    ] {
        let r = ratio(oras_one, median(&prewarm.rows[wasmcache_row].samples));
        let _ = writeln!(
            out,
            "| (extra, no target) one oras-py process for all ÷ {label} | {r:.1}× | – |"
        );
    }

    // Start-up.
    let _ = write!(
        out,
        "\n#### Start-up with a populated cache\n\n\
         Each data dir was written with the library while no daemon ran: per entry a distinct \
         {}-byte module (`common::wasm::module({TINY_EXTRA}, i)`) and its module, manifest and \
         reference records; opening it afterwards found nothing to reconcile. \"populate\" is \
         the writing (index flushed) plus one `sync -f` (of the whole filesystem, shared with \
         other processes). Each start is `wasmcache serve --data-dir DIR --log info` (default \
         config, no registry), timed from spawn until the socket accepts and until `GET /readyz` \
         answers 200 (a fresh HTTP/1.1 connection per probe, polled every 0.2 ms); \"logged\" is \
         the daemon's own `startup_ms` (from `daemon::run` entry to serving, process start-up \
         excluded). The page cache is warm (the data was just written), as on a daemon restart; \
         a cold node boot reads more from disk. The last start also served `Fetch(NEVER)` for \
         three entries.\n\n\
         | cached entries | populated by | populate | socket accepts | `/readyz` 200 (median) | range | runs | logged `startup_ms` | target | |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        wasm::module(TINY_EXTRA, 0).len()
    );
    for case in startups {
        let ready = median(&case.ready);
        let target = startup_target(case.entries);
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} s + {:.1} s sync | {} | {} | {} | {} | {} ms | {} | {} |",
            support::thousands(case.entries as u64),
            case.fill.describe(),
            case.populate.write.as_secs_f64(),
            case.populate.sync.as_secs_f64(),
            millis(median(&case.accept)),
            millis(ready),
            range(&case.ready),
            case.ready.len(),
            median_u64(&case.logged_ms),
            target.map_or("–".to_owned(), millis),
            target.map_or("–", |t| verdict(ready < t)),
        );
    }
    let open_runs = startups.first().map_or(0, |c| c.open.len());
    let _ = write!(
        out,
        "\nWhere the time goes: the same data dirs opened in this process with no daemon \
         running, median of {open_runs} runs of each step. `Store::open` opens the sled index \
         and reconciles it with the disk on one thread: it reads and decodes every module record \
         and `stat`s its blob, then lists `blobs/sha256` and looks every file up in the index. \
         The steps are timed apart on an open store (so they need not add up to the total); the \
         sled open is timed on its own, and the listing alone shows what the per-file lookups \
         add to it. The no-op eviction pass is not part of start-up: it is what the daemon runs \
         before and after every download and at every gc tick (and once right after start), \
         with the default 10 GiB budget and nothing to evict.\n\n\
         | cached entries | `Store::open` | sled open + 6 trees | decode every module record | `stat` every blob | list blobs + index lookup per file | list blobs alone | no-op eviction pass |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for case in startups {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            support::thousands(case.entries as u64),
            millis(median(&case.open)),
            millis(median(&case.sled_open)),
            millis(median(&case.scan_modules)),
            millis(median(&case.stat_blobs)),
            millis(median(&case.list_blobs)),
            millis(median(&case.list_only)),
            millis(median(&case.noop_evict)),
        );
    }
    let k = scale.populated_prefetch;
    let base_cpu = median(&prewarm.rows[0].daemon_cpu);
    let _ = write!(
        out,
        "\nThe cost of a large cache on downloads: after the starts above, one gRPC `Prefetch` of \
         the first {k} of the same {size} modules (same registry, default config, \
         `prefetch_concurrency` 2) into each populated cache, beside the empty-cache row of the \
         prewarm table ({n} modules), compared per module. Every download runs an eviction pass \
         before and after it (the \"no-op eviction pass\" above).\n\n\
         | cached entries | modules fetched | `Prefetch` wall | per module | daemon CPU per module | ÷ empty cache (per module) |\n\
         |---:|---:|---:|---:|---:|---:|\n\
         | 0 | {n} (median of {}) | {} | {} | {} | 1.00× |\n",
        prewarm.rows[0].samples.len(),
        millis(base),
        millis(base / n as u32),
        millis(base_cpu / n as u32),
    );
    for case in startups {
        let per_module = case.prefetch.wall / k as u32;
        let _ = writeln!(
            out,
            "| {} | {k} (one run) | {} | {} | {} | {:.1}× |",
            support::thousands(case.entries as u64),
            millis(case.prefetch.wall),
            millis(per_module),
            case.prefetch
                .daemon_cpu
                .map_or("–".to_owned(), |cpu| millis(cpu / k as u32)),
            ratio(per_module, base / n as u32),
        );
    }

    // Eviction.
    let e = support::thousands(eviction.entries as u64);
    let _ = write!(
        out,
        "\n#### Evicting {e} entries\n\n\
         Each run starts from a fresh data dir of {e} entries (as above, blob files written \
         directly; {} median to write, then a `sync -f`) and a budget no module fits in, so \
         every entry goes (reason `size`). Afterwards the store is reopened and checked: no blob \
         file, no module, manifest, reference or pin record left, nothing to reconcile. The \
         daemon runs with `max_cache_bytes = 1`, `gc_interval = \"1h\"`, \
         `path_grace = \"{GC_PATH_GRACE_SECS}s\"`: its ticker fires once as it starts regardless \
         of `gc_interval` (see the control below), so every module's last access was set to the \
         populate time, `Usage` confirmed all {e} were still there after that pass, and `Gc` was \
         called once the grace was over. The \"part\" rows replay pieces of an eviction on \
         another fresh copy, to show where its time goes.\n\n\
         | how | command | median | range | runs | per entry |\n\
         |---|---|---:|---:|---:|---:|\n",
        millis(median(&eviction.populate)),
    );
    let rows: [(&str, &str, &[Duration]); 4] = [
        (
            "library",
            "store.evict(&Budget { max_bytes: 1, path_grace: 0, … }, 0)",
            &eviction.library,
        ),
        (
            "daemon (gRPC, log level info)",
            "Gc {} (daemon with max_cache_bytes = 1)",
            &eviction.gc,
        ),
        (
            "part: reads like those an eviction makes",
            "store.modules() ×2, store.list()",
            &eviction.scans,
        ),
        (
            "part: the same removals one module at a time",
            "store.remove_digest per module (index entries, flush, file)",
            &eviction.removals,
        ),
    ];
    for (name, shown, samples) in rows {
        let m = median(samples);
        let _ = writeln!(
            out,
            "| {name} | `{shown}` | {} | {} | {} | {} |",
            millis(m),
            range(samples),
            samples.len(),
            micros(m / eviction.entries as u32),
        );
    }
    let (emptied, ready) = eviction.startup_pass;
    let _ = writeln!(
        out,
        "\nControl for the daemon row: the same daemon with `path_grace = \"0s\"`, \
         `gc_interval = \"1s\"` and no call at all emptied the cache of {e} entries by itself, \
         {} after spawn (`/readyz` answered 200 after {}; one run, `Usage` polled every 2 ms): \
         the first gc pass runs one `gc_interval` after start, never at start-up.",
        millis(emptied),
        millis(ready),
    );
    out
}

/// `400: 200 GET /v2/, 100 manifests, 100 blobs` for one run's registry requests.
fn requests_label(requests: &Requests) -> String {
    let mut label = format!(
        "{}: {} `GET /v2/`, {} manifest, {} blob",
        requests.total(),
        requests.probes,
        requests.manifests,
        requests.blobs
    );
    if requests.other > 0 {
        let _ = write!(label, ", {} other", requests.other);
    }
    label
}

fn startup_target(entries: usize) -> Option<Duration> {
    match entries {
        10_000 => Some(Duration::from_millis(200)),
        100_000 => Some(Duration::from_secs(1)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs `inner` under `timeout`, its output in `dir/stdout` and `dir/stderr`; returns the wall
/// time around the child and its status.
fn timed(inner: Command, dir: &Path) -> (Duration, ExitStatus) {
    let mut command = Command::new("timeout");
    command
        .args(["-k", "5", &CHILD_TIMEOUT_SECS.to_string()])
        .arg(inner.get_program())
        .args(inner.get_args())
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("stdout")).expect("stdout file"))
        .stderr(File::create(dir.join("stderr")).expect("stderr file"));
    for (name, value) in inner.get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    if let Some(cwd) = inner.get_current_dir() {
        command.current_dir(cwd);
    }
    let started = Instant::now();
    let status = command
        .status()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    (started.elapsed(), status)
}

/// Flushes the filesystem holding `path`.
fn sync_fs(path: &Path) {
    common::run_checked(
        Command::new("timeout")
            .arg(CHILD_TIMEOUT_SECS.to_string())
            .args(["sync", "-f"])
            .arg(path),
    );
}

/// wasmcache stores blobs read-only; clear the way for the temp dir's removal.
fn make_writable(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if let Ok(metadata) = fs::symlink_metadata(&path) {
            if metadata.is_dir() {
                make_writable(&path);
            } else if metadata.is_file() && metadata.permissions().readonly() {
                let mut permissions = metadata.permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                permissions.set_readonly(false);
                let _ = fs::set_permissions(&path, permissions);
            }
        }
    }
}

/// User + system CPU time of process `pid` so far (`/proc/<pid>/stat`).
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|error| panic!("/proc/{pid}/stat: {error}"));
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        tool_output("getconf", &["CLK_TCK"])
            .parse()
            .expect("CLK_TCK is a number")
    })
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
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

fn median_u64(samples: &[u64]) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

fn range(samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    format!("{}–{}", millis_bare(min), millis(max))
}

fn millis(duration: Duration) -> String {
    format!("{} ms", millis_bare(duration))
}

fn millis_bare(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn micros(duration: Duration) -> String {
    let us = duration.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn bytes_label(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".to_owned())
}

// ---------------------------------------------------------------------------------------------
// BENCHMARKS.md

/// Replaces what lies between the cache markers in `BENCHMARKS.md` (adding them under their
/// heading at the end when missing); the file is read right before it is written, and nothing
/// outside the markers changes.
fn write_benchmarks_md(tables: &str, load_before: &str, load_after: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let generated = format!(
        "\n<!-- Generated by benches/cache.rs; edits here are overwritten. -->\n\n\
         Command: `WASMCACHE_BENCH_WRITE=1 cargo bench --bench cache`, run on {date}.\n\
         Machine: nproc {cores}, {cpu}, {kernel}; ext4 on a virtual disk, loopback only. The two \
         cores were shared with other builds and benchmarks during the run (load average \
         {load_before} at the start, {load_after} at the end), so medians of several runs are \
         shown with their range. Tools: oras-py {oras} (Python venv), CNCF distribution \
         {registry}; wasmcache is the release binary cargo builds for benches.\n\n{tables}",
        date = tool_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cores = thread::available_parallelism().map_or(0, usize::from),
        cpu = cpu_model(),
        kernel = tool_output("uname", &["-sr"]),
        oras = tool_output(
            venv_python().as_os_str(),
            &["-c", "import oras; print(oras.__version__)"]
        ),
        registry = tool_output("/usr/bin/docker-registry", &["--version"])
            .split_whitespace()
            .nth(2)
            .unwrap_or("?")
            .to_owned(),
    );
    support::replace_section(&path, BEGIN_MARKER, END_MARKER, HEADING, &generated);
}

//! End-to-end figures of wasmcache on this machine, each printed as a Markdown table under the
//! command that produced it, for `BENCHMARKS.md` to quote:
//!
//! - `pull`: a cold pull of a 50 MiB module (CNCF artifact and OCI image) side by side:
//!   `wasmcache pull`, a cold daemon `Fetch`, curl of the raw blob, `skopeo copy`, oras-py;
//! - `hits`: warm `Fetch` through a stock tonic client over the unix socket, closed loop at 1
//!   and 64 clients, and Poisson arrivals at 2,000 hits/s from 64 clients;
//! - `modules`: `GET /v1/modules/<digest>` of a 50 MiB module over the socket, against curl
//!   of the raw blob from the registry;
//! - `flight`: 1000 concurrent `Fetch`es of one uncached module, registry GETs counted;
//! - `peers`: 8 daemons `Fetch` one new module at once from a registry 20 ms away, with and
//!   without peers, against one daemon's cold `Fetch`, registry GETs counted;
//! - `remote`: cold pulls of a 4 MiB module and a prefetch of 50 modules from a registry 20 ms
//!   away (connection set-up charged): curl, `wasmcache pull`, daemon `Fetch`es, `skopeo
//!   copy`, oras-py, with the requests the registry saw in each run;
//! - `prefetch`: 100 modules prewarmed by `Prefetch`, the CLI and oras-py;
//! - `startup`: start-up time and RSS of the daemon with 0, 10,000 and 100,000 cached entries;
//! - `evict`: evicting 10,000 entries, by the library and by the daemon's `Gc`.
//!
//! Run `cargo bench --bench e2e` for every section, or name some: `cargo bench --bench e2e --
//! hits modules`. `WASMCACHE_BENCH_QUICK=1` (and any run without `--bench`, such as
//! `cargo test --benches`) does every section once at a small scale, to prove it works.
//! `WASMCACHE_BENCH_RUNS=N` sets the measured runs of the pull, peers, remote, prefetch and
//! start-up rows; `WASMCACHE_BENCH_CONFIG=TOML` is given to every daemon (e.g.
//! `worker_threads = 2`); `WASMCACHE_BENCH_BIN=PATH` measures another `wasmcache` build (a
//! baseline) instead.
//!
//! Everything runs here: the registry (`docker-registry`) on a free loopback port, the real
//! `wasmcache` binary in temp data dirs, the load generator in this process. The machine is
//! shared, so load tables show the daemon's and the generator's CPU time beside the rates.
//! Every answer is checked before it counts, and every child, call and wait is bounded.

mod cache;
mod peers;
mod pull;
mod relay;
mod remote;
mod serve;
mod support;

use std::time::Duration;

/// How much of everything to do.
pub struct Scale {
    /// Measured runs of each pull, peers, remote, prefetch and start-up row.
    pub runs: usize,
    /// Discarded warm-up rounds before them.
    pub warmups: usize,
    /// Size of the module pulled cold and downloaded from the daemon.
    pub big_bytes: usize,
    /// Warm-up and measured window of each load.
    pub warmup: Duration,
    pub window: Duration,
    /// Callers of the single-flight crowd, and the size of its module.
    pub flight_callers: usize,
    pub flight_bytes: usize,
    /// Size of the module of the rollout storm (`peers`).
    pub peers_bytes: usize,
    /// Size of the module pulled cold through the relay (`remote`), and the modules
    /// prefetched through it and the size of each.
    pub remote_bytes: usize,
    pub remote_prefetch_modules: usize,
    pub remote_prefetch_bytes: usize,
    /// Modules prefetched, and the size of each.
    pub prefetch_modules: usize,
    pub prefetch_bytes: usize,
    /// Cache sizes the daemon starts with, and the warm hits before its idle RSS is read.
    pub entries: &'static [usize],
    pub rss_hits: usize,
    /// Entries evicted.
    pub evict_entries: usize,
}

const FULL: Scale = Scale {
    runs: 5,
    warmups: 1,
    big_bytes: 50 << 20,
    warmup: Duration::from_millis(500),
    window: Duration::from_secs(3),
    flight_callers: 1000,
    flight_bytes: 32 << 20,
    peers_bytes: 4 << 20,
    remote_bytes: 4 << 20,
    remote_prefetch_modules: 50,
    remote_prefetch_bytes: 256 << 10,
    prefetch_modules: 100,
    prefetch_bytes: 1 << 20,
    entries: &[0, 10_000, 100_000],
    rss_hits: 500,
    evict_entries: 10_000,
};

const QUICK: Scale = Scale {
    runs: 1,
    warmups: 0,
    big_bytes: 4 << 20,
    warmup: Duration::from_millis(100),
    window: Duration::from_millis(300),
    flight_callers: 100,
    flight_bytes: 1 << 20,
    peers_bytes: 1 << 20,
    remote_bytes: 1 << 20,
    remote_prefetch_modules: 4,
    remote_prefetch_bytes: 64 << 10,
    prefetch_modules: 4,
    prefetch_bytes: 64 << 10,
    entries: &[0, 300],
    rss_hits: 20,
    evict_entries: 300,
};

/// Every section, in the order they run.
const SECTIONS: [&str; 9] = [
    "pull", "hits", "modules", "flight", "peers", "remote", "prefetch", "startup", "evict",
];

/// What a section needs to run and to say how it was run.
pub struct Bench {
    pub scale: Scale,
    pub runtime: tokio::runtime::Runtime,
    /// Extra TOML for every daemon (`WASMCACHE_BENCH_CONFIG`).
    pub config: String,
    /// The environment part of the command line that reproduces this run.
    env: String,
}

impl Bench {
    /// The command that reproduces `section`.
    pub fn command(&self, section: &str) -> String {
        format!("{}cargo bench --bench e2e -- {section}", self.env)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench_mode = args.iter().any(|arg| arg == "--bench");
    let quick = !bench_mode || std::env::var_os("WASMCACHE_BENCH_QUICK").is_some_and(|v| v == "1");
    let mut scale = if quick { QUICK } else { FULL };
    let mut env = String::new();
    if quick {
        env.push_str("WASMCACHE_BENCH_QUICK=1 ");
    }
    if let Ok(runs) = std::env::var("WASMCACHE_BENCH_RUNS") {
        scale.runs = runs
            .parse()
            .ok()
            .filter(|&runs| runs > 0)
            .unwrap_or_else(|| {
                panic!("WASMCACHE_BENCH_RUNS must be a positive integer, got {runs:?}")
            });
        env.push_str(&format!("WASMCACHE_BENCH_RUNS={runs} "));
    }
    if let Ok(binary) = std::env::var("WASMCACHE_BENCH_BIN") {
        env.push_str(&format!("WASMCACHE_BENCH_BIN={binary} "));
    }
    let config = std::env::var("WASMCACHE_BENCH_CONFIG").unwrap_or_default();
    if !config.is_empty() {
        env.push_str(&format!("WASMCACHE_BENCH_CONFIG='{config}' "));
    }
    let chosen: Vec<&str> = args
        .iter()
        .filter(|arg| !arg.starts_with('-'))
        .map(String::as_str)
        .collect();
    for name in &chosen {
        assert!(
            SECTIONS.contains(name),
            "unknown section {name:?}; sections: {SECTIONS:?}"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let bench = Bench {
        scale,
        runtime,
        config,
        env,
    };
    println!(
        "Machine: nproc {}, {}, {}. Tools: {}; {}; CNCF distribution {}.",
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model(),
        support::first_line("uname", &["-sr"]),
        support::first_line("curl", &["--version"]),
        support::first_line("skopeo", &["--version"]),
        support::first_line("/usr/bin/docker-registry", &["--version"]),
    );
    for section in SECTIONS {
        if !chosen.is_empty() && !chosen.contains(&section) {
            continue;
        }
        eprintln!("e2e bench: {section}");
        match section {
            "pull" => pull::run(&bench),
            "hits" => serve::hits(&bench),
            "modules" => serve::modules(&bench),
            "flight" => serve::flight(&bench),
            "peers" => peers::run(&bench),
            "remote" => remote::run(&bench),
            "prefetch" => cache::prefetch(&bench),
            "startup" => cache::startup(&bench),
            _ => cache::evict(&bench),
        }
    }
}

/// The CPU model from `/proc/cpuinfo`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

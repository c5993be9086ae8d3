//! Cold pulls from a registry a real network away: as few round trips as the protocol allows.
//!
//! The registry is reached through a [`Relay`] that delays every chunk 20 ms each way (a 40 ms
//! round trip) and charges a new connection one round trip for its TCP handshake; fixtures are
//! pushed to the registry directly. Two tables:
//!
//! - a cold pull of one CNCF module: curl of the blob alone (its digest known), curl of the
//!   manifest then the blob in two invocations (as a script would), `wasmcache pull`, a daemon's
//!   `Fetch` after it fetched another module from the registry, a fresh daemon's first `Fetch`,
//!   `skopeo copy` and oras-py. Every run pushes a module of its own under a repository of its
//!   own, so every pull is cold;
//! - a prefetch of many small modules by a fresh daemon (gRPC `Prefetch` and the CLI) against
//!   one Python process pulling them in a loop with oras-py.
//!
//! Child processes are spawned directly (no `timeout` wrapper, which would charge curl's
//! two invocations twice) with a watchdog that kills them after [`TIMEOUT`], and timed from
//! spawn to exit; a daemon's `Fetch` is timed around the call on a connected client. Every
//! run counts the requests the registry's access log gained and the connections the relay
//! accepted while it ran (for the warm daemon: from its clock's start). A run counts only if
//! its output hashes to the expected digest.

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use wasmcache::api::proto::PullPolicy;
use wasmcache::format::OCI_MANIFEST;
use wasmcache::Digest;

use crate::relay::Relay;
use crate::support::{self, count_range, time, Daemon, Registry, TIMEOUT};
use crate::Bench;

/// One-way delay between every client and the registry.
const ONE_WAY: Duration = Duration::from_millis(20);
/// The row every pull is compared with, and the goals' rows.
const CURL_PAIR: &str = "curl, manifest then blob";
const WASMCACHE_PULL: &str = "wasmcache pull";
const DAEMON_WARM: &str = "wasmcache daemon `Fetch`, registry talked to before";
const GRPC_PREFETCH: &str = "wasmcache gRPC `Prefetch`, default config (`prefetch_concurrency` 8)";
const ORAS_LOOP: &str = "oras-py, one Python process pulling in a loop";
/// Goals: `wasmcache pull` and the warm daemon's `Fetch` against the curl pair (at most),
/// the prefetch against the oras-py loop (at least this many times faster).
const PULL_GOAL: f64 = 1.15;
const DAEMON_GOAL: f64 = 0.75;
const PREFETCH_GOAL: f64 = 5.0;

/// One measured run: its time, and what the registry and the relay saw meanwhile.
struct Sample {
    wall: Duration,
    /// `METHOD URI STATUS` of every request the registry answered.
    requests: Vec<String>,
    /// Connections the relay accepted.
    connections: usize,
}

/// Counts what the registry and the relay see from a point on (the start of a run, unless a
/// row restarts it after its untimed set-up).
struct Window<'a> {
    registry: &'a Registry,
    relay: &'a Relay,
    /// Requests in the registry's log and connections through the relay at the start.
    start: Cell<(usize, usize)>,
}

impl Window<'_> {
    fn restart(&self) {
        let requests = self.registry.requests().len();
        self.start.set((requests, self.relay.connections()));
    }

    /// A sample of `wall` with what was seen since the start.
    fn sample(&self, wall: Duration) -> Sample {
        let (requests, connections) = self.start.get();
        Sample {
            wall,
            requests: self.registry.requests().split_off(requests),
            connections: self.relay.connections() - connections,
        }
    }
}

/// What one cold-pull run pulls: a repository and module of its own.
struct Fixture {
    /// `bench/remote-…`, and `RELAY/bench/remote-…:v1`.
    repo: String,
    reference: String,
    digest: Digest,
}

/// Runs a cold pull once in a fresh scratch dir and returns the time measured.
type PullRun<'a> = Box<dyn Fn(&Path, &Fixture, &Window) -> Duration + 'a>;

/// One row: what it runs (shown), and how to run it once.
struct Row<'a> {
    name: &'static str,
    shown: String,
    run: PullRun<'a>,
    samples: Vec<Sample>,
}

pub fn run(bench: &Bench) {
    support::require_tools(&["curl", "skopeo", "sync"]);
    let python = support::venv_python();
    let work = tempfile::Builder::new()
        .prefix("wasmcache-bench-remote-")
        .tempdir()
        .expect("bench dir");
    let registry = Registry::start();
    let relay = Relay::start_with_handshake(&bench.runtime, &registry.addr, ONE_WAY);
    let window = Window {
        registry: &registry,
        relay: &relay,
        start: Cell::new((0, 0)),
    };
    let oras_pull = work.path().join("oras_pull.py");
    fs::write(&oras_pull, support::ORAS_PULL).expect("oras-py script");
    let oras_pull_all = work.path().join("oras_pull_all.py");
    fs::write(&oras_pull_all, support::ORAS_PULL_ALL).expect("oras-py script");
    let warm_module = support::module(64 << 10, 0x4e40_ffff);
    bench.runtime.block_on(support::push_module(
        &registry.addr,
        "bench/remote-warm:v1",
        &warm_module,
    ));
    let warm_reference = format!("{}/bench/remote-warm:v1", relay.addr);

    let mut rows = pull_rows(bench, &relay.addr, &python, &oras_pull, &warm_reference);
    let count = rows.len();
    let fixture = |round: usize, index: usize| {
        let repo = format!("bench/remote-r{round}-{index}");
        let seed = 0x4e40_0000 + (round * count + index) as u64;
        let module = support::module(bench.scale.remote_bytes, seed);
        let tagged = format!("{repo}:v1");
        bench
            .runtime
            .block_on(support::push_module(&registry.addr, &tagged, &module));
        Fixture {
            reference: format!("{}/{repo}:v1", relay.addr),
            repo,
            digest: Digest::of(&module),
        }
    };
    let measured = measure(
        bench,
        "cold pulls",
        &work,
        &window,
        count,
        fixture,
        |i, dir, f| (rows[i].run)(dir, f, &window),
    );
    for (row, samples) in rows.iter_mut().zip(measured) {
        row.samples = samples;
    }
    let pull_ratios = print_pulls(bench, &rows);

    let set = PrefetchSet::push(bench, &registry, &relay.addr, work.path());
    let mut prefetch = prefetch_rows(bench, &set, &relay.addr, (&python, &oras_pull_all));
    let count = prefetch.len();
    let measured = measure(
        bench,
        "prefetch",
        &work,
        &window,
        count,
        |_, _| (),
        |i, dir, _| (prefetch[i].run)(dir),
    );
    for (row, samples) in prefetch.iter_mut().zip(measured) {
        row.samples = samples;
    }
    let speedup = print_prefetch(bench, &prefetch);

    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    println!(
        "\nGoals (medians): `wasmcache pull` ≤ {PULL_GOAL}× of curl's manifest-then-blob pair: \
         {} ({:.2}×); a daemon's `Fetch` from a registry it has talked to ≤ {DAEMON_GOAL}× of \
         that pair: {} ({:.2}×); prefetch of {} modules ≥ {PREFETCH_GOAL}× faster than the \
         oras-py loop: {} ({speedup:.2}×).",
        verdict(pull_ratios.0 <= PULL_GOAL),
        pull_ratios.0,
        verdict(pull_ratios.1 <= DAEMON_GOAL),
        pull_ratios.1,
        bench.scale.remote_prefetch_modules,
        verdict(speedup >= PREFETCH_GOAL),
    );
}

/// Runs each of `rows` rows once a round, warm-up rounds first, in rotating order so that no
/// row always runs right after the same other one. Each run gets what `prepare` made for it
/// (not counted) and a fresh scratch dir under `work`; the samples after the warm-ups, by row.
fn measure<T>(
    bench: &Bench,
    what: &str,
    work: &TempDir,
    window: &Window,
    rows: usize,
    mut prepare: impl FnMut(usize, usize) -> T,
    run: impl Fn(usize, &Path, &T) -> Duration,
) -> Vec<Vec<Sample>> {
    let mut samples: Vec<Vec<Sample>> = (0..rows).map(|_| Vec::new()).collect();
    let rounds = bench.scale.warmups + bench.scale.runs;
    for round in 0..rounds {
        eprintln!("  {what}: round {} of {rounds}", round + 1);
        for offset in 0..rows {
            let index = (round + offset) % rows;
            let prepared = prepare(round, index);
            let scratch = tempfile::tempdir_in(work.path()).expect("run dir");
            window.restart();
            let wall = run(index, scratch.path(), &prepared);
            let sample = window.sample(wall);
            if round >= bench.scale.warmups {
                samples[index].push(sample);
            }
            crate::pull::make_writable(scratch.path());
            drop(scratch);
            support::sync_fs(work.path());
        }
    }
    samples
}

/// The cold-pull rows, in the table's order.
fn pull_rows<'a>(
    bench: &'a Bench,
    relay: &'a str,
    python: &'a Path,
    oras_pull: &'a Path,
    warm_reference: &'a str,
) -> Vec<Row<'a>> {
    let blob_url = move |fixture: &Fixture, digest: &str| {
        format!("http://{relay}/v2/{}/blobs/{digest}", fixture.repo)
    };
    vec![
        Row {
            name: "curl, blob only (digest known)",
            shown: "curl -sSf -o FILE http://ADDR/v2/REPO/blobs/sha256:…".to_owned(),
            run: Box::new(move |scratch, fixture, _| {
                let file = scratch.join("module.wasm");
                let url = blob_url(fixture, &fixture.digest.to_string());
                let (wall, _) = timed(curl(scratch).arg("-o").arg(&file).arg(url));
                support::check_file(&file, &fixture.digest);
                wall
            }),
            samples: Vec::new(),
        },
        Row {
            name: CURL_PAIR,
            shown: format!(
                "curl -sSf -H 'Accept: {OCI_MANIFEST}' -o M http://ADDR/v2/REPO/manifests/v1; \
                 curl -sSf -o FILE http://ADDR/v2/REPO/blobs/<layers[0].digest of M>"
            ),
            run: Box::new(move |scratch, fixture, _| {
                let manifest = scratch.join("manifest.json");
                let url = format!("http://{relay}/v2/{}/manifests/v1", fixture.repo);
                let started = Instant::now();
                timed(
                    curl(scratch)
                        .args(["-H", &format!("Accept: {OCI_MANIFEST}")])
                        .arg("-o")
                        .arg(&manifest)
                        .arg(url),
                );
                // Reading the digest is the script's `jq`; here it is timed with the rest.
                let text = fs::read_to_string(&manifest).expect("the manifest curl wrote");
                let json: serde_json::Value = serde_json::from_str(&text).expect("manifest JSON");
                let layer = json["layers"][0]["digest"]
                    .as_str()
                    .expect("a layer digest")
                    .to_owned();
                let file = scratch.join("module.wasm");
                timed(
                    curl(scratch)
                        .arg("-o")
                        .arg(&file)
                        .arg(blob_url(fixture, &layer)),
                );
                let wall = started.elapsed();
                support::check_file(&file, &fixture.digest);
                wall
            }),
            samples: Vec::new(),
        },
        Row {
            name: WASMCACHE_PULL,
            shown: "wasmcache pull --json --insecure-registry ADDR --data-dir DIR ADDR/REPO:v1"
                .to_owned(),
            run: Box::new(move |scratch, fixture, _| {
                let mut command = Command::new(support::wasmcache());
                support::isolate(&mut command, scratch)
                    .args(["pull", "--json", "--insecure-registry", relay, "--data-dir"])
                    .arg(scratch.join("data"))
                    .arg(&fixture.reference);
                let (wall, stdout) = timed(&mut command);
                let json: serde_json::Value =
                    serde_json::from_str(stdout.trim()).expect("wasmcache pull prints JSON");
                assert_eq!(json["digest"], fixture.digest.to_string(), "{json}");
                assert_eq!(json["cache_hit"], false, "{json}");
                let path = json["path"].as_str().expect("path");
                support::check_file(Path::new(path), &fixture.digest);
                wall
            }),
            samples: Vec::new(),
        },
        Row {
            name: DAEMON_WARM,
            shown: "Fetch{reference: ADDR/REPO:v1} to wasmcache serve --insecure-registry ADDR, \
                    after its Fetch{reference: ADDR/bench/remote-warm:v1} (64 KiB)"
                .to_owned(),
            run: Box::new(move |scratch, fixture, window| {
                daemon_fetch(
                    bench,
                    relay,
                    scratch,
                    fixture,
                    Some((warm_reference, window)),
                )
            }),
            samples: Vec::new(),
        },
        Row {
            name: "wasmcache daemon, first `Fetch` (fresh daemon)",
            shown: "Fetch{reference: ADDR/REPO:v1} to wasmcache serve --insecure-registry ADDR"
                .to_owned(),
            run: Box::new(move |scratch, fixture, _| {
                daemon_fetch(bench, relay, scratch, fixture, None)
            }),
            samples: Vec::new(),
        },
        Row {
            name: "skopeo copy",
            shown: "skopeo copy --src-tls-verify=false docker://ADDR/REPO:v1 oci:DIR:v1".to_owned(),
            run: Box::new(move |scratch, fixture, _| {
                let layout = format!("oci:{}:v1", scratch.join("oci").display());
                let mut command = Command::new("skopeo");
                support::isolate(&mut command, scratch)
                    .args([
                        "--insecure-policy",
                        "copy",
                        "--quiet",
                        "--retry-times",
                        "0",
                        "--src-tls-verify=false",
                        "--src-no-creds",
                    ])
                    .arg(format!("docker://{}", fixture.reference))
                    .arg(layout);
                let (wall, _) = timed(&mut command);
                let blob = scratch.join("oci/blobs/sha256").join(fixture.digest.hex());
                support::check_file(&blob, &fixture.digest);
                wall
            }),
            samples: Vec::new(),
        },
        Row {
            name: "oras-py pull",
            shown: "python oras_pull.py ADDR REPO:v1 OUT (OrasClient.pull)".to_owned(),
            run: Box::new(move |scratch, fixture, _| {
                let out = scratch.join("out");
                let mut command = Command::new(python);
                support::isolate(&mut command, scratch)
                    .arg(oras_pull)
                    .arg(relay)
                    .arg(format!("{}:v1", fixture.repo))
                    .arg(&out);
                let (wall, _) = timed(&mut command);
                support::check_file(&out.join("module.wasm"), &fixture.digest);
                wall
            }),
            samples: Vec::new(),
        },
        Row {
            name: "Python start-up alone (part of oras-py pull)",
            shown: "python -c 'import oras.client'".to_owned(),
            run: Box::new(move |scratch, _, _| {
                let mut command = Command::new(python);
                support::isolate(&mut command, scratch).args(["-c", "import oras.client"]);
                timed(&mut command).0
            }),
            samples: Vec::new(),
        },
    ]
}

/// `curl -sSf` isolated in `scratch`.
fn curl(scratch: &Path) -> Command {
    let mut command = Command::new("curl");
    support::isolate(&mut command, scratch).arg("-sSf");
    command
}

/// A fresh daemon (not timed), then its `Fetch` of the fixture, timed around the call. With
/// `warm`, the daemon first fetches that other module through the relay and the window
/// restarts after it, so that the run counts only the timed `Fetch`.
fn daemon_fetch(
    bench: &Bench,
    relay: &str,
    scratch: &Path,
    fixture: &Fixture,
    warm: Option<(&str, &Window)>,
) -> Duration {
    let mut daemon = Daemon::start(scratch, &bench.config, &["--insecure-registry", relay]);
    let (wall, answer) = bench.runtime.block_on(async {
        let mut client = daemon.client().await;
        if let Some((warm_reference, window)) = warm {
            let answer =
                support::fetch(&mut client, warm_reference, PullPolicy::IfNotPresent).await;
            assert!(!answer.cache_hit, "{warm_reference} was cached");
            window.restart();
        }
        let started = Instant::now();
        let answer =
            support::fetch(&mut client, &fixture.reference, PullPolicy::IfNotPresent).await;
        (started.elapsed(), answer)
    });
    assert!(!answer.cache_hit, "{} was cached", fixture.reference);
    assert_eq!(
        answer.digest,
        fixture.digest.to_string(),
        "{}",
        fixture.reference
    );
    support::check_file(Path::new(&answer.path), &fixture.digest);
    daemon.stop();
    wall
}

/// Runs `command` to its end, killed after [`TIMEOUT`]; its time from spawn to exit and its
/// standard output. Panics unless it exits 0.
fn timed(command: &mut Command) -> (Duration, String) {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let pid = child.id();
    let (done, watched) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if watched.recv_timeout(TIMEOUT) == Err(RecvTimeoutError::Timeout) {
            // SAFETY: kill only sends a signal; the child is not reaped before `done` is sent.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let output = child.wait_with_output().expect("waiting for a child");
    let wall = started.elapsed();
    let _ = done.send(());
    watchdog.join().expect("watchdog");
    assert!(
        output.status.success(),
        "{command:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (wall, String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Prints the cold-pull table; returns the medians of `wasmcache pull` and of the warm
/// daemon's `Fetch` as ratios to the curl pair's.
fn print_pulls(bench: &Bench, rows: &[Row]) -> (f64, f64) {
    let walls = |row: &Row| row.samples.iter().map(|s| s.wall).collect::<Vec<_>>();
    let best = |row: &Row| walls(row).into_iter().min().unwrap_or_default();
    let find = |name: &str| rows.iter().find(|row| row.name == name).expect("row");
    let pair = find(CURL_PAIR);
    let (pair_median, pair_best) = (support::median(&walls(pair)), best(pair));
    let ratio = |own: Duration, base: Duration| own.as_secs_f64() / base.as_secs_f64();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let (median, min) = (support::median(&walls(row)), best(row));
            let python = row.name.starts_with("Python");
            let shown_ratio = |own, base| match python {
                true => "–".to_owned(),
                false => format!("{:.2}×", ratio(own, base)),
            };
            vec![
                row.name.to_owned(),
                format!("`{}`", row.shown),
                time(median),
                time(min),
                count_range(row.samples.iter().map(|s| s.requests.len())),
                count_range(row.samples.iter().map(|s| s.connections)),
                seen(&row.samples),
                shown_ratio(median, pair_median),
                shown_ratio(min, pair_best),
            ]
        })
        .collect();
    let columns = [
        "tool",
        "command",
        "median",
        "best",
        "requests",
        "connections",
        "registry access log",
        "median vs curl pair",
        "best vs curl pair",
    ];
    let heading = format!(
        "Cold pull of a {} MiB CNCF module, registry {} ms away (handshakes charged)",
        bench.scale.remote_bytes >> 20,
        ONE_WAY.as_millis()
    );
    support::print_table(&heading, &bench.command("remote"), &columns, &table);
    println!(
        "\nThe registry is behind a relay adding {} ms each way, and one round trip before a new \
         connection's first bytes go upstream (its TCP handshake). Each run pulls a module of its \
         own from a repository of its own; median and best of {} runs after {} discarded warm-up \
         round(s), rows in rotating order. Child processes are timed from spawn to exit (the curl \
         pair: both invocations and reading the layer digest between them); daemon rows around \
         the `Fetch` call on a connected client, the daemon started before the clock (\"talked \
         to before\": after it fetched another module through the relay; its requests and \
         connections are counted from the clock's start). Requests: what the registry's access \
         log gained during the run (a range when runs differed); connections: what the relay \
         accepted.",
        ONE_WAY.as_millis(),
        bench.scale.runs,
        bench.scale.warmups,
    );
    (
        ratio(support::median(&walls(find(WASMCACHE_PULL))), pair_median),
        ratio(support::median(&walls(find(DAEMON_WARM))), pair_median),
    )
}

/// One prefetch row: what it runs (shown), and how to run it once in a fresh scratch dir.
struct PrefetchRow<'a> {
    name: &'static str,
    shown: String,
    run: Box<dyn Fn(&Path) -> Duration + 'a>,
    samples: Vec<Sample>,
}

/// The modules every prefetch row fetches, pushed once.
struct PrefetchSet {
    /// `bench/remote-prefetch/mI:v1`, and the same through the relay.
    repos: Vec<String>,
    references: Vec<String>,
    digests: Vec<Digest>,
    /// The references, one a line, for `wasmcache prefetch --file`.
    list: PathBuf,
}

impl PrefetchSet {
    fn push(bench: &Bench, registry: &Registry, relay: &str, work: &Path) -> PrefetchSet {
        let scale = &bench.scale;
        let repos: Vec<String> = (0..scale.remote_prefetch_modules)
            .map(|i| format!("bench/remote-prefetch/m{i}:v1"))
            .collect();
        let mut digests = Vec::new();
        bench.runtime.block_on(async {
            for (i, repo) in repos.iter().enumerate() {
                let module = support::module(scale.remote_prefetch_bytes, 0x4e41_0000 + i as u64);
                digests.push(Digest::of(&module));
                support::push_module(&registry.addr, repo, &module).await;
            }
        });
        let references: Vec<String> = repos.iter().map(|r| format!("{relay}/{r}")).collect();
        let list = work.join("prefetch.txt");
        fs::write(&list, references.join("\n") + "\n").expect("prefetch list");
        PrefetchSet {
            repos,
            references,
            digests,
            list,
        }
    }
}

/// The prefetch rows, in the table's order.
fn prefetch_rows<'a>(
    bench: &'a Bench,
    set: &'a PrefetchSet,
    relay: &'a str,
    (python, oras_pull_all): (&'a Path, &'a Path),
) -> Vec<PrefetchRow<'a>> {
    let count = set.repos.len();
    let grpc = move |scratch: &Path, config: &str| {
        let config = format!("{}\n{config}", bench.config);
        let mut daemon = Daemon::start(scratch, &config, &["--insecure-registry", relay]);
        let (wall, _) = crate::cache::prefetch_call(bench, &daemon, &set.references, &set.digests);
        daemon.stop();
        wall
    };
    vec![
        PrefetchRow {
            name: GRPC_PREFETCH,
            shown: format!("Prefetch{{references: [{count} × ADDR/REPO/mI:v1]}} → SUMMARY"),
            run: Box::new(move |scratch| grpc(scratch, "")),
            samples: Vec::new(),
        },
        PrefetchRow {
            name: "wasmcache gRPC `Prefetch`, no permits kept for on-demand fetches (extra)",
            shown: format!("Prefetch{{references: [{count} × …]}}; prefetch_download_share = 1"),
            run: Box::new(move |scratch| grpc(scratch, "prefetch_download_share = 1.0")),
            samples: Vec::new(),
        },
        PrefetchRow {
            name: "wasmcache CLI, default concurrency (process start-up included)",
            shown: "wasmcache prefetch --file LIST --data-dir DIR".to_owned(),
            run: Box::new(move |scratch| {
                let mut daemon =
                    Daemon::start(scratch, &bench.config, &["--insecure-registry", relay]);
                let mut command = Command::new(support::wasmcache());
                support::isolate(&mut command, scratch)
                    .arg("prefetch")
                    .arg("--file")
                    .arg(&set.list)
                    .arg("--data-dir")
                    .arg(&daemon.data_dir);
                let (wall, _) = timed(&mut command);
                for digest in &set.digests {
                    let blob = daemon.data_dir.join("blobs/sha256").join(digest.hex());
                    support::check_file(&blob, digest);
                }
                daemon.stop();
                wall
            }),
            samples: Vec::new(),
        },
        PrefetchRow {
            name: ORAS_LOOP,
            shown: format!("python oras_pull_all.py ADDR OUT … ({count} × OrasClient.pull)"),
            run: Box::new(move |scratch| {
                let out = scratch.join("out");
                let mut command = Command::new(python);
                support::isolate(&mut command, scratch)
                    .arg(oras_pull_all)
                    .arg(relay)
                    .arg(&out)
                    .args(&set.repos);
                let (wall, _) = timed(&mut command);
                for (i, digest) in set.digests.iter().enumerate() {
                    support::check_file(&out.join(format!("m{i}/module.wasm")), digest);
                }
                wall
            }),
            samples: Vec::new(),
        },
    ]
}

/// Prints the prefetch table; returns how many times faster the default `Prefetch` is than
/// the oras-py loop (medians).
fn print_prefetch(bench: &Bench, rows: &[PrefetchRow]) -> f64 {
    let count = bench.scale.remote_prefetch_modules;
    let walls = |row: &PrefetchRow| row.samples.iter().map(|s| s.wall).collect::<Vec<_>>();
    let median = |row: &PrefetchRow| support::median(&walls(row));
    let find = |name: &str| rows.iter().find(|row| row.name == name).expect("row");
    let oras = median(find(ORAS_LOOP));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let own = median(row);
            vec![
                row.name.to_owned(),
                format!("`{}`", row.shown),
                time(own),
                time(walls(row).into_iter().min().unwrap_or_default()),
                time(own / count as u32),
                count_range(row.samples.iter().map(|s| s.requests.len())),
                count_range(row.samples.iter().map(|s| s.connections)),
                seen(&row.samples),
                format!("{:.2}×", oras.as_secs_f64() / own.as_secs_f64()),
            ]
        })
        .collect();
    let columns = [
        "row",
        "command",
        "median",
        "best",
        "per module",
        "requests",
        "connections",
        "registry access log",
        "oras-py loop ÷ row",
    ];
    let heading = format!(
        "Prefetch of {count} modules of {} KiB, registry {} ms away (handshakes charged)",
        bench.scale.remote_prefetch_bytes >> 10,
        ONE_WAY.as_millis()
    );
    support::print_table(&heading, &bench.command("remote"), &columns, &table);
    println!(
        "\nThe same relay and modules for every row; each wasmcache run starts a fresh daemon on \
         an empty data dir before the clock (gRPC rows: timed from the call to the SUMMARY \
         event); the oras-py row is one Python process from spawn to exit (its start-up, about \
         0.2 s, included). Median and best of {} runs after {} discarded warm-up round(s); every \
         file is checked.",
        bench.scale.runs, bench.scale.warmups,
    );
    oras.as_secs_f64() / median(find(GRPC_PREFETCH)).as_secs_f64()
}

/// The requests of each run, grouped by kind (`GET manifest`, `2 × GET blob`, a status other
/// than 2xx in brackets); the distinct groupings of all runs, joined by `; `.
fn seen(samples: &[Sample]) -> String {
    let mut distinct: Vec<String> = Vec::new();
    for sample in samples {
        let mut kinds: Vec<(usize, String, usize)> = Vec::new();
        for request in &sample.requests {
            let (order, kind) = kind(request);
            match kinds.iter_mut().find(|(_, known, _)| *known == kind) {
                Some((_, _, count)) => *count += 1,
                None => kinds.push((order, kind, 1)),
            }
        }
        kinds.sort();
        let text = kinds
            .iter()
            .map(|(_, kind, count)| match count {
                1 => kind.clone(),
                _ => format!("{count} × {kind}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let text = if text.is_empty() {
            "–".to_owned()
        } else {
            text
        };
        if !distinct.contains(&text) {
            distinct.push(text);
        }
    }
    distinct.join("; ")
}

/// The kind of a `METHOD URI STATUS` request (`GET /v2/`, `HEAD manifest`, `GET blob (404)`),
/// with its place in the grouping.
fn kind(request: &str) -> (usize, String) {
    let mut parts = request.split(' ');
    let (method, uri, status) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let path = uri.split('?').next().unwrap_or(uri);
    let (order, what) = match path {
        "/v2/" => (0, "/v2/"),
        _ if path.contains("/manifests/") => (1, "manifest"),
        _ if path.contains("/blobs/uploads") => (3, "upload"),
        _ if path.contains("/blobs/") => (2, "blob"),
        _ if path.contains("/referrers/") => (4, "referrers"),
        _ => (5, path),
    };
    let mut kind = format!("{method} {what}");
    if !status.starts_with('2') {
        kind.push_str(&format!(" ({status})"));
    }
    (order, kind)
}

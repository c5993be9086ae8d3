//! The cache as a whole: prewarming many modules, starting with a large index, evicting it.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use wasmcache::api::proto::prefetch_progress::Stage;
use wasmcache::api::proto::{GcRequest, PrefetchRequest, PullPolicy, UsageRequest};
use wasmcache::store::Store;
use wasmcache::Digest;

use crate::support::{self, mib, time, Daemon, Registry, TIMEOUT};
use crate::Bench;

/// Measured runs of the slow rows (oras-py, eviction).
const SLOW_RUNS: usize = 3;

/// One timed run: wall time, and the daemon's CPU time over it for wasmcache rows.
type Run = (Duration, Option<Duration>);

// ---------------------------------------------------------------------------------------------
// Prefetch

pub fn prefetch(bench: &Bench) {
    let scale = &bench.scale;
    let count = scale.prefetch_modules;
    let python = support::venv_python();
    let work = tempfile::Builder::new()
        .prefix("wasmcache-bench-prefetch-")
        .tempdir()
        .expect("bench dir");
    let registry = Registry::start();
    let addr = registry.addr.as_str();
    let references: Vec<String> = (0..count).map(|i| format!("prewarm/m{i}:v1")).collect();
    let mut digests = Vec::new();
    bench.runtime.block_on(async {
        for (i, reference) in references.iter().enumerate() {
            let module = support::module(scale.prefetch_bytes, 0xc0de_0000 + i as u64);
            digests.push(Digest::of(&module));
            support::push_module(addr, reference, &module).await;
        }
    });
    let full: Vec<String> = references.iter().map(|r| format!("{addr}/{r}")).collect();
    let list = work.path().join("prewarm.txt");
    fs::write(&list, full.join("\n") + "\n").expect("prefetch list");
    let pull_one = work.path().join("oras_pull.py");
    fs::write(&pull_one, support::ORAS_PULL).expect("oras-py script");
    let pull_all = work.path().join("oras_pull_all.py");
    fs::write(&pull_all, support::ORAS_PULL_ALL).expect("oras-py script");
    let check_oras = |out: &Path| {
        for (i, digest) in digests.iter().enumerate() {
            support::check_file(&out.join(format!("m{i}/module.wasm")), digest);
        }
    };
    let grpc = |scratch: &Path, config: &str| -> Run {
        let config = format!("{}\n{config}", bench.config);
        let mut daemon = Daemon::start(scratch, &config, &["--insecure-registry", addr]);
        let run = prefetch_call(bench, &daemon, &full, &digests);
        daemon.stop();
        run
    };
    let n = count;
    type Row<'a> = (&'static str, String, usize, Box<dyn Fn(&Path) -> Run + 'a>);
    let rows: Vec<Row> = vec![
        (
            "wasmcache gRPC `Prefetch`, `prefetch_concurrency` 2",
            format!(
                "Prefetch{{references: [{n} × ADDR/prewarm/mI:v1]}} → SUMMARY; \
                 prefetch_concurrency = 2"
            ),
            scale.runs,
            Box::new(|scratch| grpc(scratch, "prefetch_concurrency = 2")),
        ),
        (
            "wasmcache gRPC `Prefetch`, `prefetch_concurrency` 8 (default)",
            format!("Prefetch{{references: [{n} × …]}} → SUMMARY"),
            scale.runs,
            Box::new(|scratch| grpc(scratch, "")),
        ),
        (
            "wasmcache CLI (process start-up included)",
            "wasmcache prefetch --file LIST --data-dir DIR".to_owned(),
            scale.runs,
            Box::new(|scratch| {
                let mut daemon =
                    Daemon::start(scratch, &bench.config, &["--insecure-registry", addr]);
                let mut command = support::command(support::wasmcache(), scratch);
                command
                    .arg("prefetch")
                    .arg("--file")
                    .arg(&list)
                    .arg("--data-dir")
                    .arg(&daemon.data_dir);
                let cpu = support::cpu_time(daemon.pid);
                let started = Instant::now();
                support::run_ok(&mut command);
                let wall = started.elapsed();
                let cpu = support::cpu_time(daemon.pid).saturating_sub(cpu);
                for digest in &digests {
                    support::check_file(
                        &daemon.data_dir.join("blobs/sha256").join(digest.hex()),
                        digest,
                    );
                }
                daemon.stop();
                (wall, Some(cpu))
            }),
        ),
        (
            "oras-py, one Python process per module",
            format!("{n} × python oras_pull.py ADDR prewarm/mI:v1 OUT/mI"),
            scale.runs.min(SLOW_RUNS),
            Box::new(|scratch| {
                let started = Instant::now();
                for (i, reference) in references.iter().enumerate() {
                    let out = scratch.join(format!("out/m{i}"));
                    let mut command = support::command(&python, scratch);
                    support::run_ok(command.arg(&pull_one).args([addr, reference]).arg(out));
                }
                let wall = started.elapsed();
                check_oras(&scratch.join("out"));
                (wall, None)
            }),
        ),
        (
            "oras-py, one Python process for all (extra)",
            format!("python oras_pull_all.py ADDR OUT … ({n} × OrasClient.pull)"),
            scale.runs.min(SLOW_RUNS),
            Box::new(|scratch| {
                let mut command = support::command(&python, scratch);
                command
                    .arg(&pull_all)
                    .arg(addr)
                    .arg(scratch.join("out"))
                    .args(&references);
                let started = Instant::now();
                support::run_ok(&mut command);
                let wall = started.elapsed();
                check_oras(&scratch.join("out"));
                (wall, None)
            }),
        ),
    ];
    let mut samples: Vec<Vec<Run>> = vec![Vec::new(); rows.len()];
    for round in 0..scale.runs {
        eprintln!("  round {} of {}", round + 1, scale.runs);
        // Rotate the order so that no row always runs right after the same other one.
        for offset in 0..rows.len() {
            let row = (round + offset) % rows.len();
            if round < rows[row].2 {
                let scratch = tempfile::tempdir_in(work.path()).expect("run dir");
                samples[row].push((rows[row].3)(scratch.path()));
                support::sync_fs(work.path());
            }
        }
    }
    let grpc_median = support::median(&samples[0].iter().map(|run| run.0).collect::<Vec<_>>());
    let table: Vec<Vec<String>> = rows
        .iter()
        .zip(&samples)
        .map(|((name, shown, _, _), runs)| {
            let walls: Vec<Duration> = runs.iter().map(|run| run.0).collect();
            let cpu: Vec<Duration> = runs.iter().filter_map(|run| run.1).collect();
            let own = support::median(&walls);
            vec![
                name.to_string(),
                format!("`{shown}`"),
                time(own),
                range(&walls),
                walls.len().to_string(),
                time(own / n as u32),
                if cpu.is_empty() {
                    "–".to_owned()
                } else {
                    time(support::median(&cpu))
                },
                format!("{:.2}×", own.as_secs_f64() / grpc_median.as_secs_f64()),
            ]
        })
        .collect();
    let heading = format!(
        "Prewarming {n} distinct modules of {} KiB",
        scale.prefetch_bytes >> 10
    );
    let columns = [
        "row",
        "command",
        "median",
        "range",
        "runs",
        "per module",
        "daemon CPU",
        "÷ gRPC (2)",
    ];
    support::print_table(&heading, &bench.command("prefetch"), &columns, &table);
    println!(
        "\nEach wasmcache run starts a fresh daemon on an empty data dir before the clock starts; \
         every result and file is checked (digest, size, the file re-hashed)."
    );
}

/// One gRPC `Prefetch` of `references`, timed from the call to the `SUMMARY` event, with the
/// daemon's CPU time over that window; every result and file is checked.
pub fn prefetch_call(
    bench: &Bench,
    daemon: &Daemon,
    references: &[String],
    digests: &[Digest],
) -> Run {
    let cpu = support::cpu_time(daemon.pid);
    let (wall, results) = bench.runtime.block_on(async {
        let mut client = daemon.client().await;
        let started = Instant::now();
        let call = async {
            let request = PrefetchRequest {
                references: references.to_vec(),
                pin: false,
            };
            let mut stream = client
                .prefetch(request)
                .await
                .expect("Prefetch")
                .into_inner();
            let mut results = HashMap::new();
            while let Some(event) = stream.message().await.expect("Prefetch stream") {
                match event.stage() {
                    Stage::Done => {
                        results.insert(
                            event.reference,
                            event.result.expect("DONE carries a result"),
                        );
                    }
                    Stage::Failed => {
                        panic!("prefetch of {} failed: {}", event.reference, event.message)
                    }
                    Stage::Summary => return (started.elapsed(), results),
                    _ => {}
                }
            }
            panic!("the Prefetch stream ended without a SUMMARY");
        };
        tokio::time::timeout(TIMEOUT, call)
            .await
            .expect("Prefetch timed out")
    });
    let cpu = support::cpu_time(daemon.pid).saturating_sub(cpu);
    for (reference, digest) in references.iter().zip(digests) {
        let result = results
            .get(reference)
            .unwrap_or_else(|| panic!("no DONE for {reference}"));
        assert!(!result.cache_hit, "{reference} was a cache hit");
        assert_eq!(result.digest, digest.to_string(), "{reference}");
        support::check_file(Path::new(&result.path), digest);
    }
    (wall, Some(cpu))
}

/// `min–max` of `samples`.
fn range(samples: &[Duration]) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let max = samples.iter().max().copied().unwrap_or_default();
    format!("{}–{}", time(min), time(max))
}

// ---------------------------------------------------------------------------------------------
// Start-up and RSS

pub fn startup(bench: &Bench) {
    let scale = &bench.scale;
    let mut rows = Vec::new();
    for &entries in scale.entries {
        let dir = tempfile::Builder::new()
            .prefix("wasmcache-bench-startup-")
            .tempdir()
            .expect("bench dir");
        let populated = Instant::now();
        if entries > 0 {
            eprintln!("  writing {entries} entries with the library");
            support::populate(&dir.path().join("data"), entries);
        }
        let populated = populated.elapsed();
        let (mut accepted, mut ready, mut logged, mut exits) = (vec![], vec![], vec![], vec![]);
        let mut rss = [0; 4];
        for run in 0..scale.runs {
            let mut daemon = Daemon::start(dir.path(), &bench.config, &[]);
            accepted.push(daemon.accepted);
            ready.push(daemon.ready);
            logged.push(Duration::from_millis(daemon.logged_startup_ms()));
            if run + 1 == scale.runs {
                rss = rss_after_hits(bench, &daemon, entries);
            }
            exits.push(daemon.stop());
        }
        eprintln!(
            "  {entries} entries: /readyz after {}",
            time(support::median(&ready))
        );
        rows.push(vec![
            entries.to_string(),
            if entries > 0 {
                time(populated)
            } else {
                "–".to_owned()
            },
            time(support::median(&accepted)),
            time(support::median(&ready)),
            range(&ready),
            time(support::median(&logged)),
            mib(rss[0]),
            mib(rss[1]),
            if entries > 0 {
                mib(rss[2])
            } else {
                "–".to_owned()
            },
            mib(rss[3]),
            time(support::median(&exits)),
        ]);
    }
    let columns = [
        "cached entries",
        "populate",
        "socket accepts",
        "`/readyz` 200 (median)",
        "range",
        "logged `startup_ms`",
        "RSS after start",
        "RSS idle after the warm hits",
        "RSS idle after every entry was hit once",
        "peak RSS",
        "SIGTERM → exit",
    ];
    support::print_table(
        "Start-up and RSS",
        &bench.command("startup"),
        &columns,
        &rows,
    );
    println!(
        "\n`wasmcache serve --data-dir DIR --log info`, timed from spawn until the socket accepts \
         and until `GET /readyz` answers 200 (fresh HTTP/1.1 connection, polled every 1 ms); {} \
         starts each, stopped with SIGTERM. The entries (one distinct 64-byte module each, with \
         its module, manifest and reference records) were written with the library. RSS is \
         `VmRSS` after the last start, after {} warm hits on distinct references (one client) \
         and 1 s idle, and after every entry was fetched once (8 clients) and 1 s idle.",
        scale.runs, scale.rss_hits
    );
}

/// The daemon's RSS (KiB) after start, after warm hits and after a hit on every entry (each
/// followed by a second idle), and its peak; checks that it serves what was written.
fn rss_after_hits(bench: &Bench, daemon: &Daemon, entries: usize) -> [u64; 4] {
    let rss = || support::status_kib(daemon.pid, "VmRSS");
    let after_start = rss();
    let hit_all = |references: Vec<String>, clients: usize| {
        bench.runtime.block_on(async {
            let client = daemon.client().await;
            let references = Arc::new(references);
            let tasks: Vec<_> = (0..clients)
                .map(|task| {
                    let (mut client, references) = (client.clone(), references.clone());
                    tokio::spawn(async move {
                        for reference in references.iter().skip(task).step_by(clients) {
                            let answer =
                                support::fetch(&mut client, reference, PullPolicy::Never).await;
                            assert!(answer.cache_hit, "{reference} is not a hit");
                            let i: u64 = reference
                                .split("/m")
                                .nth(1)
                                .and_then(|rest| rest.split(':').next()?.parse().ok())
                                .expect("entry number");
                            assert_eq!(
                                answer.digest,
                                Digest::of(&support::module(64, i)).to_string()
                            );
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("a client failed");
            }
        });
        thread::sleep(Duration::from_secs(1));
        rss()
    };
    if entries == 0 {
        let idle = hit_all(Vec::new(), 1);
        return [
            after_start,
            idle,
            0,
            support::status_kib(daemon.pid, "VmHWM"),
        ];
    }
    let hits = bench.scale.rss_hits.min(entries);
    let some = hit_all(
        (0..hits)
            .map(|k| support::synthetic_reference(k * entries / hits))
            .collect(),
        1,
    );
    let every = hit_all((0..entries).map(support::synthetic_reference).collect(), 8);
    [
        after_start,
        some,
        every,
        support::status_kib(daemon.pid, "VmHWM"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Eviction

pub fn evict(bench: &Bench) {
    let entries = bench.scale.evict_entries;
    let runs = bench.scale.runs.min(SLOW_RUNS);
    let (mut library, mut daemon_gc) = (Vec::new(), Vec::new());
    for run in 0..runs {
        eprintln!("  run {} of {runs}", run + 1);
        let dir = tempfile::tempdir().expect("eviction dir");
        let data_dir = dir.path().join("data");
        support::populate(&data_dir, entries);
        let store = Store::open(&data_dir).expect("opening the store");
        let mut budget = wasmcache::Config::default().budget();
        budget.max_bytes = 1;
        budget.path_grace = Duration::ZERO;
        let started = Instant::now();
        let evicted = store.evict(&budget, 0).expect("Store::evict");
        library.push(started.elapsed());
        assert_eq!(evicted.len(), entries, "modules evicted");
        drop(store);
        check_empty(&data_dir);

        let dir = tempfile::tempdir().expect("eviction dir");
        let data_dir = dir.path().join("data");
        support::populate(&data_dir, entries);
        // The daemon's first gc pass comes one `gc_interval` after start: none before the call.
        let config = format!(
            "{}\nmax_cache_bytes = 1\ngc_interval = \"1h\"\npath_grace = \"0s\"\n",
            bench.config
        );
        let mut daemon = Daemon::start(dir.path(), &config, &[]);
        let (wall, evicted) = bench.runtime.block_on(async {
            let mut client = daemon.client().await;
            let usage = client
                .usage(UsageRequest {})
                .await
                .expect("Usage")
                .into_inner();
            assert_eq!(
                usage.modules, entries as u64,
                "modules went before the Gc call"
            );
            let started = Instant::now();
            let call = tokio::time::timeout(TIMEOUT, client.gc(GcRequest {}));
            let answer = call.await.expect("Gc timed out").expect("Gc").into_inner();
            (started.elapsed(), answer.evicted.len())
        });
        daemon_gc.push(wall);
        assert_eq!(evicted, entries, "modules evicted by Gc");
        daemon.stop();
        check_empty(&data_dir);
    }
    let row = |how: &str, shown: &str, samples: &[Duration]| {
        let own = support::median(samples);
        vec![
            how.to_owned(),
            format!("`{shown}`"),
            time(own),
            range(samples),
            samples.len().to_string(),
            time(own / entries as u32),
        ]
    };
    let rows = vec![
        row(
            "library",
            "store.evict(&Budget { max_bytes: 1, path_grace: 0, … }, 0)",
            &library,
        ),
        row(
            "daemon (gRPC)",
            "Gc {} to a daemon with max_cache_bytes = 1",
            &daemon_gc,
        ),
    ];
    let heading = format!("Evicting {entries} entries");
    let columns = ["how", "command", "median", "range", "runs", "per entry"];
    support::print_table(&heading, &bench.command("evict"), &columns, &rows);
    println!(
        "\nEach run starts from a fresh data dir of {entries} entries written with the library and a \
         budget no module fits in; afterwards the store is reopened: no module and no blob file left."
    );
}

/// Panics unless the cache at `data_dir` holds no module and no blob file.
fn check_empty(data_dir: &Path) {
    let store = Store::open(data_dir).expect("reopening the store");
    assert_eq!(store.usage().expect("usage").modules, 0, "modules left");
    let left = fs::read_dir(data_dir.join("blobs/sha256"))
        .expect("blobs dir")
        .count();
    assert_eq!(left, 0, "blob files left");
}

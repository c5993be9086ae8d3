//! A rollout storm: 8 nodes asking for the same new module at once, with the registry 20 ms
//! away, with and without fetching through peers.
//!
//! Eight daemons listen on 127.0.0.2 to 127.0.0.9 (Linux routes all of 127/8 to loopback), on
//! one HTTP port. With peers on, each is started with `--peer` naming all eight and
//! `--peer-self` its own address, so one owner resolves the tag and one downloads the blob, and
//! the others get them from the owners. The registry is reached through a [`Relay`] that delays
//! every chunk 20 ms each way; fixtures are pushed to the registry directly.
//!
//! A run starts fresh daemons (not timed), connects one gRPC client to each over its unix
//! socket, then starts the clock and sends one `Fetch` to every daemon at once; the clock stops
//! at the last answer. Each run pushes a module of its own (seeded) under a repository of its
//! own, so every fetch is cold and the registry's access log counts that run's GETs alone.
//! Every answer must be a download of the pushed module into that daemon's own data dir. The
//! baseline is the same with one daemon and peers off: one node's cold `Fetch`.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use wasmcache::api::proto::{PullPolicy, UsageRequest};
use wasmcache::Digest;

use crate::relay::Relay;
use crate::support::{self, count_range, time, Daemon, Registry, TIMEOUT};
use crate::Bench;

/// Nodes in the storm, on 127.0.0.2 and up.
const NODES: usize = 8;
/// One-way delay between the daemons and the registry.
const ONE_WAY: Duration = Duration::from_millis(20);

/// One case: how many nodes fetch at once, and whether they fetch through each other.
struct Case {
    name: &'static str,
    nodes: usize,
    peers: bool,
    /// Whether each daemon fetched another module from the registry before the clock (as a
    /// running node has), so its registry session is set up.
    warm: bool,
    samples: Vec<Sample>,
}

/// One measured run: time until every node held the module, and the registry GETs it made.
struct Sample {
    wall: Duration,
    manifest_gets: usize,
    blob_gets: usize,
    /// `GET /v2/` version probes.
    probes: usize,
}

pub fn run(bench: &Bench) {
    let scale = &bench.scale;
    let work = tempfile::Builder::new()
        .prefix("wasmcache-bench-peers-")
        .tempdir()
        .expect("bench dir");
    let registry = Registry::start();
    let relay = Relay::start(&bench.runtime, &registry.addr, ONE_WAY);
    let mut cases = [
        Case {
            name: "fresh daemons: one node's cold `Fetch`, peers off (baseline)",
            nodes: 1,
            peers: false,
            warm: false,
            samples: Vec::new(),
        },
        Case {
            name: "fresh daemons: 8 nodes at once, peers off",
            nodes: NODES,
            peers: false,
            warm: false,
            samples: Vec::new(),
        },
        Case {
            name: "fresh daemons: 8 nodes at once, peers on",
            nodes: NODES,
            peers: true,
            warm: false,
            samples: Vec::new(),
        },
        Case {
            name: "daemons that talked to the registry before: one node's cold `Fetch`, peers off (baseline)",
            nodes: 1,
            peers: false,
            warm: true,
            samples: Vec::new(),
        },
        Case {
            name: "daemons that talked to the registry before: 8 nodes at once, peers off",
            nodes: NODES,
            peers: false,
            warm: true,
            samples: Vec::new(),
        },
        Case {
            name: "daemons that talked to the registry before: 8 nodes at once, peers on",
            nodes: NODES,
            peers: true,
            warm: true,
            samples: Vec::new(),
        },
    ];
    let count = cases.len();
    let warm_module = support::module(64 << 10, 0x9ee5_ffff);
    bench.runtime.block_on(support::push_module(
        &registry.addr,
        "bench/peers-warm:v1",
        &warm_module,
    ));
    for round in 0..scale.warmups + scale.runs {
        eprintln!("  round {} of {}", round + 1, scale.warmups + scale.runs);
        // Rotate the order so that drift falls on every case alike.
        for offset in 0..count {
            let index = (round + offset) % count;
            let case = &mut cases[index];
            let repo = format!("bench/peers-r{round}-c{index}");
            let seed = 0x9ee5_0000 + (round * count + index) as u64;
            let module = support::module(scale.peers_bytes, seed);
            let digest = Digest::of(&module);
            bench.runtime.block_on(support::push_module(
                &registry.addr,
                &format!("{repo}:v1"),
                &module,
            ));
            let reference = format!("{}/{repo}:v1", relay.addr);
            let scratch = tempfile::tempdir_in(work.path()).expect("run dir");
            let warm_reference = format!("{}/bench/peers-warm:v1", relay.addr);
            let (wall, probes) = storm(
                bench,
                scratch.path(),
                case,
                (&registry, &relay.addr),
                (&reference, &warm_reference),
                &digest,
            );
            let sample = Sample {
                wall,
                manifest_gets: registry.gets(&repo, "manifests"),
                blob_gets: registry.gets(&repo, "blobs"),
                probes,
            };
            if round >= scale.warmups {
                case.samples.push(sample);
            }
            drop(scratch);
            support::sync_fs(work.path());
        }
    }
    drop(relay);
    print_cases(bench, &cases);
}

/// Starts `case.nodes` fresh daemons in `dir` (not timed; for a warm case each fetches
/// `warm_reference` first), then sends one `Fetch` of `reference` to each at once; the time
/// until the last one answered, every answer checked, and the registry's `GET /v2/` probes
/// in that time.
fn storm(
    bench: &Bench,
    dir: &Path,
    case: &Case,
    (counter, registry): (&Registry, &str),
    (reference, warm_reference): (&str, &str),
    digest: &Digest,
) -> (Duration, usize) {
    let hosts: Vec<String> = (0..case.nodes)
        .map(|i| format!("127.0.0.{}", 2 + i))
        .collect();
    let port = common_port(&hosts);
    let addrs: Vec<String> = hosts.iter().map(|host| format!("{host}:{port}")).collect();
    let mut daemons: Vec<Daemon> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let mut args = vec![
                "--insecure-registry",
                registry,
                "--http-listen",
                addr.as_str(),
            ];
            if case.peers {
                for peer in &addrs {
                    args.extend(["--peer", peer.as_str()]);
                }
                args.extend(["--peer-self", addr.as_str()]);
            }
            Daemon::start(&dir.join(format!("node{i}")), &bench.config, &args)
        })
        .collect();
    let answers = bench.runtime.block_on(async {
        let mut clients = Vec::new();
        for daemon in &daemons {
            let mut client = daemon.client().await;
            // One call first, so that every HTTP/2 handshake is done before the clock starts.
            tokio::time::timeout(TIMEOUT, client.usage(UsageRequest {}))
                .await
                .expect("Usage timed out")
                .expect("Usage");
            if case.warm {
                support::fetch(&mut client, warm_reference, PullPolicy::IfNotPresent).await;
            }
            clients.push(client);
        }
        let probes = counter.probes();
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                let reference = reference.to_owned();
                tokio::spawn(async move {
                    let answer =
                        support::fetch(&mut client, &reference, PullPolicy::IfNotPresent).await;
                    (started.elapsed(), answer)
                })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("a fetch failed"));
        }
        (answers, counter.probes() - probes)
    });
    let (answers, probes) = answers;
    for (daemon, (_, answer)) in daemons.iter().zip(&answers) {
        assert!(!answer.cache_hit, "{reference} was cached");
        assert_eq!(answer.digest, digest.to_string(), "{reference}");
        let path = Path::new(&answer.path);
        support::check_file(path, digest);
        let data_dir = fs::canonicalize(&daemon.data_dir).expect("data dir");
        assert!(
            fs::canonicalize(path)
                .expect("module path")
                .starts_with(&data_dir),
            "{} is not in the node's own data dir {}",
            path.display(),
            data_dir.display()
        );
    }
    for daemon in &mut daemons {
        daemon.stop();
    }
    let wall = answers.iter().map(|(took, _)| *took).max();
    (wall.expect("at least one node"), probes)
}

/// A port that is free on every one of `hosts`, so that each node listens on its own host
/// with the same port.
fn common_port(hosts: &[String]) -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind((hosts[0].as_str(), 0)).expect("a free port");
        let port = first.local_addr().expect("local address").port();
        let free = hosts[1..]
            .iter()
            .all(|host| TcpListener::bind((host.as_str(), port)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no port free on every one of {hosts:?}");
}

fn print_cases(bench: &Bench, cases: &[Case]) {
    let median =
        |case: &Case| support::median(&case.samples.iter().map(|s| s.wall).collect::<Vec<_>>());
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|case| {
            let own = median(case);
            let baseline = cases
                .iter()
                .find(|other| other.nodes == 1 && other.warm == case.warm)
                .map_or(own, median);
            vec![
                case.name.to_owned(),
                time(own),
                format!("{:.2}×", own.as_secs_f64() / baseline.as_secs_f64()),
                count_range(case.samples.iter().map(|s| s.manifest_gets)),
                count_range(case.samples.iter().map(|s| s.blob_gets)),
                count_range(case.samples.iter().map(|s| s.probes)),
            ]
        })
        .collect();
    let columns = [
        "case",
        "time (median)",
        "× one node's cold fetch",
        "manifest GETs",
        "blob GETs",
        "`GET /v2/` probes",
    ];
    let heading = format!(
        "Rollout storm: {NODES} nodes fetch one uncached {} MiB module, registry {} ms away",
        bench.scale.peers_bytes >> 20,
        ONE_WAY.as_millis()
    );
    support::print_table(&heading, &bench.command("peers"), &columns, &rows);
    println!(
        "\nTime from sending one `Fetch` to every node at once until every node answered with the \
         module in its own data dir; median of {} runs after {} discarded warm-up round(s), each \
         with a new module and fresh daemons. The registry is behind a relay adding {} ms each \
         way; GETs counted in its access log for the run's repository (a range when runs \
         differed); `GET /v2/` probes counted from the clock's start to its stop. \
         \"Talked to the registry before\": each daemon fetched another module from it before \
         the clock, as a running node has; the ratio is to one node's cold fetch under the same \
         condition. Peers on: `--peer` naming all {NODES} nodes (127.0.0.2–9, one port) and \
         `--peer-self`. Goal: peers on within 1.3× of one node's cold fetch.",
        bench.scale.runs,
        bench.scale.warmups,
        ONE_WAY.as_millis()
    );
}

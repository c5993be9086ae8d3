//! The daemon answering over its unix socket: warm `Fetch` hits under load, module downloads
//! from `/v1/modules`, and single-flight under a crowd of callers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tonic::transport::Channel;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;
use wasmcache::api::proto::{FetchRequest, FetchResponse, PullPolicy};
use wasmcache::Digest;

use crate::support::{self, time, Daemon, Registry, TIMEOUT};
use crate::Bench;

/// The small module of the warm hits.
const HOT: &str = "bench/hot:v1";
/// Concurrent gRPC clients sharing one HTTP/2 connection.
const CLIENTS_PER_CONNECTION: usize = 32;
/// Total hits per second of the paced load, as Poisson arrivals from 64 clients.
const PACED_RATE: f64 = 2_000.0;

/// A registry holding `modules` (reference, bytes), and a daemon allowed to pull from it.
fn setup(bench: &Bench, modules: &[(&str, &[u8])]) -> (Registry, tempfile::TempDir, Daemon) {
    let registry = Registry::start();
    bench.runtime.block_on(async {
        for (reference, module) in modules {
            support::push_module(&registry.addr, reference, module).await;
        }
    });
    let dir = tempfile::Builder::new()
        .prefix("wasmcache-bench-daemon-")
        .tempdir()
        .expect("daemon dir");
    let daemon = Daemon::start(
        dir.path(),
        &bench.config,
        &["--insecure-registry", &registry.addr],
    );
    (registry, dir, daemon)
}

// ---------------------------------------------------------------------------------------------
// Warm hits

/// One measured load window.
struct Load {
    /// Latency of every request that completed inside the window, sorted.
    latencies: Vec<Duration>,
    daemon_cpu: Duration,
    own_cpu: Duration,
    /// With pacing: how late the pacer handed out arrivals, p99.
    pacer_late: Option<Duration>,
}

pub fn hits(bench: &Bench) {
    let hot = support::module(1024, 1);
    let (registry, _dir, daemon) = setup(bench, &[(HOT, &hot)]);
    let reference = format!("{}/{HOT}", registry.addr);
    let first = bench.runtime.block_on(async {
        support::fetch(
            &mut daemon.client().await,
            &reference,
            PullPolicy::IfNotPresent,
        )
        .await
    });
    assert!(
        !first.cache_hit,
        "the hot module was cached before its pull"
    );
    let manifest_gets = registry.gets("bench/hot", "manifests");
    let window = bench.scale.window;
    let mut rows = Vec::new();
    let mut floor = Vec::new();
    for (clients, paced) in [(1, None), (64, None), (64, Some(PACED_RATE))] {
        let load = fetch_load(bench, &daemon, &reference, clients, paced);
        let hits = load.latencies.len();
        let rate = hits as f64 / window.as_secs_f64();
        let p99 = support::quantile(&load.latencies, 0.99);
        let share =
            |cpu: Duration| format!("{:.0} %", 100.0 * cpu.as_secs_f64() / window.as_secs_f64());
        let how = match (paced, load.pacer_late) {
            (Some(rate), Some(late)) => {
                floor.push(format!(
                    "p99 ≤ 1 ms at {rate:.0} hits/s offered: {} ({})",
                    verdict(p99 <= Duration::from_millis(1)),
                    time(p99)
                ));
                format!(
                    "Poisson arrivals, {rate:.0} hits/s offered (pacer late ≤ {} at p99)",
                    time(late)
                )
            }
            _ => {
                if clients == 64 {
                    floor.push(format!(
                        "≥ 20,000 hits/s at 64 clients: {} ({rate:.0})",
                        verdict(rate >= 20_000.0)
                    ));
                }
                "closed loop".to_owned()
            }
        };
        eprintln!(
            "  {clients} clients, {how}: {rate:.0} hits/s, p99 {}",
            time(p99)
        );
        rows.push(vec![
            clients.to_string(),
            how,
            clients.div_ceil(CLIENTS_PER_CONNECTION).to_string(),
            hits.to_string(),
            format!("{rate:.0}"),
            time(support::quantile(&load.latencies, 0.5)),
            time(p99),
            time(support::quantile(&load.latencies, 0.999)),
            time(support::quantile(&load.latencies, 1.0)),
            time(load.daemon_cpu / hits.max(1) as u32),
            share(load.daemon_cpu),
            share(load.own_cpu),
        ]);
    }
    assert_eq!(
        registry.gets("bench/hot", "manifests"),
        manifest_gets,
        "a warm hit asked the registry"
    );
    let columns = [
        "clients",
        "load",
        "HTTP/2 conns",
        "hits",
        "hits/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        "daemon CPU per hit",
        "daemon CPU",
        "load generator CPU",
    ];
    support::print_table(
        "Warm-hit `Fetch` over the unix socket (tonic client)",
        &bench.command("hits"),
        &columns,
        &rows,
    );
    println!(
        "\n`Fetch{{reference: \"ADDR/{HOT}\", pull_policy: IF_NOT_PRESENT}}` for a cached 1 KiB module, \
         from `wasmcache::client::connect` channels in this process ({CLIENTS_PER_CONNECTION} clients \
         per connection); {:.1} s measured after {:.1} s of warm-up; a paced request is timed from \
         when the pacer handed it to its client; CPU as a share of one core. \
         Floor: {}.",
        window.as_secs_f64(),
        bench.scale.warmup.as_secs_f64(),
        floor.join("; ")
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

/// Warm `Fetch`es of `reference` from `clients` tonic clients. Without `paced`, each sends its
/// next request as soon as the last is answered (closed loop); with `paced: Some(rate)`,
/// requests arrive as a Poisson process of `rate` per second in total, dealt to the clients in
/// turn, and each is timed from when the pacer handed it to its client, so waiting for a busy
/// client is not hidden (and the pacer's own lateness, reported beside, is not counted).
fn fetch_load(
    bench: &Bench,
    daemon: &Daemon,
    reference: &str,
    clients: usize,
    paced: Option<f64>,
) -> Load {
    bench.runtime.block_on(async {
        let connections = clients.div_ceil(CLIENTS_PER_CONNECTION);
        let mut channels = Vec::new();
        for _ in 0..connections {
            channels.push(daemon.client().await);
        }
        let request = FetchRequest {
            reference: reference.to_owned(),
            pull_policy: PullPolicy::IfNotPresent.into(),
            ..Default::default()
        };
        let start = Instant::now();
        let begin = start + bench.scale.warmup;
        let end = begin + bench.scale.window;
        let mut senders = Vec::new();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let mut client = channels[i % connections].clone();
                let (sender, mut arrivals) = unbounded_channel::<Instant>();
                senders.push(sender);
                let request = request.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    loop {
                        let sent = match paced {
                            Some(_) => match arrivals.recv().await {
                                Some(due) => due,
                                None => break,
                            },
                            None => Instant::now(),
                        };
                        if sent >= end {
                            break;
                        }
                        let answer = tokio::time::timeout(TIMEOUT, client.fetch(request.clone()))
                            .await
                            .expect("a warm Fetch timed out")
                            .unwrap_or_else(|status| panic!("warm Fetch: {status}"))
                            .into_inner();
                        assert!(
                            answer.cache_hit && !answer.stale,
                            "not a warm hit: {answer:?}"
                        );
                        let done = Instant::now();
                        if done >= begin && done < end {
                            latencies.push(done - sent);
                        }
                    }
                    latencies
                })
            })
            .collect();
        let pacer = paced.map(|rate| thread::spawn(move || pace(senders, rate, start, begin, end)));
        tokio::time::sleep_until(begin.into()).await;
        let own = std::process::id();
        let before = (support::cpu_time(daemon.pid), support::cpu_time(own));
        tokio::time::sleep_until(end.into()).await;
        let after = (support::cpu_time(daemon.pid), support::cpu_time(own));
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("a client failed"));
        }
        latencies.sort_unstable();
        assert!(!latencies.is_empty(), "no request completed in the window");
        Load {
            latencies,
            daemon_cpu: after.0.saturating_sub(before.0),
            own_cpu: after.1.saturating_sub(before.1),
            pacer_late: pacer.map(|pacer| pacer.join().expect("the pacer panicked")),
        }
    })
}

/// Hands out Poisson arrivals of `rate` per second (exponential gaps from a seeded xorshift)
/// to `senders` in turn until `end`, sleeping on its own thread until each is due; returns
/// how late it was at p99 inside the window.
fn pace(
    senders: Vec<UnboundedSender<Instant>>,
    rate: f64,
    start: Instant,
    begin: Instant,
    end: Instant,
) -> Duration {
    let mut random = 0x9e37_79b9_7f4a_7c15_u64;
    let mut due = start;
    let mut late = Vec::new();
    for sender in senders.iter().cycle() {
        random ^= random >> 12;
        random ^= random << 25;
        random ^= random >> 27;
        let uniform =
            (random.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        due += Duration::from_secs_f64(-(1.0 - uniform).ln() / rate);
        if due >= end {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        // Timed from now: a late wake-up of this thread is the generator's delay, not the
        // daemon's.
        let handed = Instant::now();
        if due >= begin {
            late.push(handed - due);
        }
        if sender.send(handed).is_err() {
            break;
        }
    }
    late.sort_unstable();
    support::quantile(&late, 0.99)
}

// ---------------------------------------------------------------------------------------------
// Module downloads

pub fn modules(bench: &Bench) {
    support::require_tools(&["curl", "cat", "timeout"]);
    let size = bench.scale.big_bytes;
    let module = support::module(size, 0xb16);
    let digest = Digest::of(&module);
    let (registry, dir, daemon) = setup(bench, &[("bench/big:v1", &module)]);
    drop(module);
    let reference = format!("{}/bench/big:v1", registry.addr);
    let answer = bench.runtime.block_on(async {
        support::fetch(
            &mut daemon.client().await,
            &reference,
            PullPolicy::IfNotPresent,
        )
        .await
    });
    assert_eq!(answer.digest, digest.to_string());
    let blob = answer.path;
    let socket = daemon.socket.to_str().expect("UTF-8 socket path");
    let from_daemon = format!("http://localhost/v1/modules/{digest}");
    let from_registry = format!("http://{}/v2/bench/big/blobs/{digest}", registry.addr);
    let curl = |args: &[&str]| {
        let mut command = support::command("curl", dir.path());
        command
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
            ])
            .args(args);
        let (took, output) = timed(&mut command);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            format!("200 {size}"),
            "{command:?}"
        );
        took
    };
    type Reader<'a> = (&'static str, String, Box<dyn Fn(bool) -> Duration + 'a>);
    let readers: Vec<Reader> = vec![
        (
            "HTTP/1.1 GET over the socket in this process",
            "connect, `GET /v1/modules/<digest>`, `read` into one 128 KiB buffer to the last byte"
                .to_owned(),
            Box::new(|verify| read_socket(&daemon.socket, &digest, size, verify)),
        ),
        (
            "curl over the socket",
            format!(
                "curl -s --unix-socket SOCK -o /dev/null {}",
                from_daemon.replace(&digest.to_string(), "<digest>")
            ),
            Box::new(|_| curl(&["--unix-socket", socket, &from_daemon])),
        ),
        (
            "curl of the raw blob from the registry",
            "curl -s -o /dev/null http://ADDR/v2/bench/big/blobs/<digest>".to_owned(),
            Box::new(|_| curl(&[&from_registry])),
        ),
        (
            "cat the blob file (reference)",
            "cat <data-dir>/blobs/sha256/<hex> > /dev/null".to_owned(),
            Box::new(|_| timed(support::command("cat", dir.path()).arg(&blob)).0),
        ),
    ];
    let runs = 2 * bench.scale.runs + 1;
    let mut samples = vec![Vec::new(); readers.len()];
    // One warm-up round (the in-process reader checks the bytes), then the readers in turn.
    for round in 0..=runs {
        for offset in 0..readers.len() {
            let row = (round + offset) % readers.len();
            let took = (readers[row].2)(round == 0);
            if round > 0 {
                samples[row].push(took);
            }
        }
    }
    let rate = |took: Duration| size as f64 / took.as_secs_f64() / 1e9;
    let baseline = support::median(&samples[2]);
    let rows: Vec<Vec<String>> = readers
        .iter()
        .zip(&samples)
        .map(|((name, shown, _), samples)| {
            let own = support::median(samples);
            vec![
                name.to_string(),
                format!("`{shown}`"),
                time(own),
                time(samples.iter().copied().min().unwrap_or_default()),
                format!("{:.2} GB/s", rate(own)),
                format!("{:.2}×", baseline.as_secs_f64() / own.as_secs_f64()),
            ]
        })
        .collect();
    let heading = format!(
        "`/v1/modules` of a {} MiB module over the unix socket",
        size >> 20
    );
    let columns = [
        "reader",
        "command",
        "median",
        "min",
        "throughput",
        "vs curl of the registry blob",
    ];
    support::print_table(&heading, &bench.command("modules"), &columns, &rows);
    let own = rate(support::median(&samples[0]));
    println!(
        "\nThe module is in the page cache; {runs} rounds after a warm-up, readers in turn; child \
         processes timed from spawn to exit (start-up included); GB = 10⁹ bytes. Floor: ≥ 1.5 GB/s \
         over the socket: {} ({own:.2} GB/s in process).",
        verdict(own >= 1.5)
    );
}

/// Runs `command` to its end; its wall time and output.
fn timed(command: &mut Command) -> (Duration, std::process::Output) {
    let started = Instant::now();
    let output = support::run_ok(command);
    (started.elapsed(), output)
}

/// `GET /v1/modules/<digest>` on a new connection, read as a proxy would: one 128 KiB buffer,
/// `read` to the last body byte. Checks the status and length, and with `verify` the sha256.
fn read_socket(socket: &Path, digest: &Digest, size: usize, verify: bool) -> Duration {
    let mut buffer = vec![0; 128 << 10];
    let mut hasher = Sha256::new();
    let started = Instant::now();
    let mut stream = UnixStream::connect(socket).expect("connecting");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let request = format!(
        "GET /v1/modules/{digest} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .expect("writing the request");
    let mut head = Vec::new();
    let mut body = None;
    while body.is_none_or(|body| body < size) {
        let count = stream.read(&mut buffer).expect("reading the response");
        assert!(count > 0, "the response ended early");
        let mut data = &buffer[..count];
        if body.is_none() {
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
            body = Some(0);
        }
        *body.as_mut().expect("in the body") += data.len();
        if verify {
            hasher.update(data);
        }
    }
    let took = started.elapsed();
    if verify {
        assert_eq!(hex::encode(hasher.finalize()), digest.hex(), "socket bytes");
    }
    took
}

// ---------------------------------------------------------------------------------------------
// Single-flight

pub fn flight(bench: &Bench) {
    let scale = &bench.scale;
    let hot = support::module(1024, 1);
    let crowd_module = support::module(scale.flight_bytes, 0xf1);
    let lone_modules: Vec<Vec<u8>> = (0..3)
        .map(|k| support::module(scale.flight_bytes, 0x10 + k))
        .collect();
    let lone_names: Vec<String> = (0..3).map(|k| format!("bench/lone{k}:v1")).collect();
    let mut pushed = vec![(HOT, &hot[..]), ("bench/flight:v1", &crowd_module[..])];
    pushed.extend(
        lone_names
            .iter()
            .map(String::as_str)
            .zip(lone_modules.iter().map(Vec::as_slice)),
    );
    let (registry, _dir, daemon) = setup(bench, &pushed);
    let addr = registry.addr.as_str();
    let hot_reference = format!("{addr}/{HOT}");
    let crowd_reference = format!("{addr}/bench/flight:v1");
    let digest = Digest::of(&crowd_module).to_string();
    let runtime = &bench.runtime;
    let lone = |k: usize| {
        runtime.block_on(async {
            let mut client = daemon.client().await;
            support::fetch(&mut client, &hot_reference, PullPolicy::IfNotPresent).await;
            let started = Instant::now();
            let answer = support::fetch(
                &mut client,
                &format!("{addr}/{}", lone_names[k]),
                PullPolicy::IfNotPresent,
            )
            .await;
            assert!(!answer.cache_hit, "lone module {k} was cached");
            started.elapsed()
        })
    };
    // Lone fetches before and after the crowd, so that drift falls on both.
    let mut lone_times = vec![lone(0)];
    let (cold, warm) = runtime.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..scale.flight_callers.div_ceil(CLIENTS_PER_CONNECTION) {
            let mut client = daemon.client().await;
            // One hit per connection first, so that every HTTP/2 handshake is done.
            support::fetch(&mut client, &hot_reference, PullPolicy::Never).await;
            channels.push(client);
        }
        let cold = crowd(&channels, &crowd_reference, scale.flight_callers).await;
        let warm = crowd(&channels, &hot_reference, scale.flight_callers).await;
        (cold, warm)
    });
    lone_times.extend([lone(1), lone(2)]);
    assert!(
        cold.iter().all(|(_, answer)| answer.digest == digest),
        "a caller got another module"
    );
    assert!(
        warm.iter().all(|(_, answer)| answer.cache_hit),
        "a cached module was fetched again"
    );
    let lone_median = support::median(&lone_times);
    let row = |case: &str, answers: &[(Duration, FetchResponse)], gets: [String; 2]| {
        let mut times: Vec<Duration> = answers.iter().map(|(took, _)| *took).collect();
        times.sort_unstable();
        let wall = times.last().copied().unwrap_or_default();
        let pulled = answers
            .iter()
            .filter(|(_, answer)| !answer.cache_hit)
            .count();
        let [blobs, manifests] = gets;
        vec![
            case.to_owned(),
            answers.len().to_string(),
            blobs,
            manifests,
            pulled.to_string(),
            time(wall),
            time(times.first().copied().unwrap_or_default()),
            time(support::quantile(&times, 0.5)),
            format!("{:.2}×", wall.as_secs_f64() / lone_median.as_secs_f64()),
        ]
    };
    let gets = |kind| registry.gets("bench/flight", kind).to_string();
    let rows = vec![
        row(
            "crowd on one uncached module",
            &cold,
            [gets("blobs"), gets("manifests")],
        ),
        row(
            "the same crowd on a cached module (extra)",
            &warm,
            ["0".into(), "0".into()],
        ),
        vec![
            "lone cold fetch (median of 3, before and after)".to_owned(),
            "1".to_owned(),
            (0..3)
                .map(|k| {
                    registry
                        .gets(&format!("bench/lone{k}"), "blobs")
                        .to_string()
                })
                .collect::<Vec<_>>()
                .join(", "),
            "–".to_owned(),
            "1".to_owned(),
            time(lone_median),
            "–".to_owned(),
            "–".to_owned(),
            "1.00×".to_owned(),
        ],
    ];
    let columns = [
        "case",
        "callers",
        "blob GETs",
        "manifest GETs",
        "answered by the pull",
        "wall time",
        "first answer",
        "caller p50",
        "vs lone",
    ];
    let heading = format!(
        "Single-flight: {} concurrent `Fetch`es of one uncached {} MiB module",
        scale.flight_callers,
        scale.flight_bytes >> 20
    );
    support::print_table(&heading, &bench.command("flight"), &columns, &rows);
    println!(
        "\nCallers on {CLIENTS_PER_CONNECTION}-per-connection HTTP/2 channels, released together by a \
         barrier; GETs counted in the registry's access log for `bench/flight`."
    );
    assert_eq!(gets("blobs"), "1", "single-flight: one blob GET");
    assert_eq!(gets("manifests"), "1", "single-flight: one manifest GET");
}

/// `callers` tasks over `channels`, released together, each sending one
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
                let answer =
                    support::fetch(&mut client, &reference, PullPolicy::IfNotPresent).await;
                (Instant::now(), answer)
            })
        })
        .collect();
    barrier.wait().await;
    let released = Instant::now();
    let mut answers = Vec::new();
    for task in tasks {
        let (done, answer) = task.await.expect("a caller failed");
        answers.push((done.saturating_duration_since(released), answer));
    }
    answers
}

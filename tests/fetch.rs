//! The download path and bounded waits, against a real registry: image layers (tar+gzip with
//! `plugin.wasm`) take the same path as raw ones (one download per layer, the budget, the
//! disk-full retry), and a registry that accepts connections but never answers (stopped with
//! SIGSTOP) holds no caller longer than `stale_after`, `fetch_timeout` or its own deadline.

use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;
use wasmcache::api::proto::{FetchRequest, FetchResponse, PullPolicy, UsageRequest};

use crate::cache::SmallDisk;
use crate::common::fixtures::{oras_push_cncf, skopeo_push_image, tar_layer, OCI_LAYER_TAR_GZIP};
use crate::common::wasm::{digest, module};
use crate::common::{Daemon, ImageFormat, PushedManifest, Registry};

/// Longest any single call in these tests may take before the test fails instead of hanging.
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// Pushes an OCI image whose one tar+gzip layer holds `wasm` as `plugin.wasm`.
fn push_image(registry: &Registry, reference: &str, wasm: &[u8]) -> PushedManifest {
    skopeo_push_image(
        registry,
        reference,
        vec![tar_layer(&[("plugin.wasm", wasm)], true)],
        OCI_LAYER_TAR_GZIP,
        ImageFormat::Oci,
    )
}

async fn try_fetch(
    daemon: &Daemon,
    reference: &str,
    policy: PullPolicy,
) -> Result<FetchResponse, tonic::Status> {
    let request = FetchRequest {
        reference: reference.to_owned(),
        pull_policy: policy.into(),
        lease_seconds: 0,
        ..Default::default()
    };
    let mut client = daemon.client().await;
    tokio::time::timeout(CALL_LIMIT, client.fetch(request))
        .await
        .unwrap_or_else(|_| panic!("{reference}: no answer within {CALL_LIMIT:?}"))
        .map(tonic::Response::into_inner)
}

async fn fetch(daemon: &Daemon, reference: &str) -> FetchResponse {
    try_fetch(daemon, reference, PullPolicy::IfNotPresent)
        .await
        .unwrap_or_else(|status| panic!("{reference}: {status:?}\n{}", daemon.log()))
}

/// A `Fetch` sent as a plain HTTP/2 request with a `grpc-timeout` header, by a client that
/// does not enforce the deadline itself (tonic's client would give up at the same instant),
/// so the status seen is the daemon's: its `grpc-status` code and `grpc-message`.
async fn fetch_with_grpc_timeout(
    daemon: &Daemon,
    reference: &str,
    grpc_timeout: &str,
) -> (i32, String) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use prost::Message;

    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .expect("connecting to the daemon socket");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let message = FetchRequest {
        reference: reference.to_owned(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/wasmcache.v1.WasmCache/Fetch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(Full::new(bytes::Bytes::from(body)))
        .expect("valid request");
    let answer = async {
        let response = sender.send_request(request).await.expect("HTTP/2 request");
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.expect("the answer");
        // A status without a message comes in the headers ("trailers-only"), else in trailers.
        let trailers = collected.trailers().cloned().unwrap_or(headers);
        let field = |name: &str| {
            trailers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let code = field("grpc-status").parse().expect("a grpc-status");
        (code, field("grpc-message"))
    };
    tokio::time::timeout(CALL_LIMIT, answer)
        .await
        .unwrap_or_else(|_| panic!("{reference}: no answer within {CALL_LIMIT:?}"))
}

async fn usage_bytes(daemon: &Daemon) -> u64 {
    daemon
        .client()
        .await
        .usage(UsageRequest {})
        .await
        .expect("usage")
        .into_inner()
        .bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_fetched_by_tag_and_by_digest_at_once_gets_its_layer_once() {
    let registry = Registry::start();
    let addr = registry.addr();
    // Large enough that the two pulls overlap: extracting it takes far longer than a
    // manifest request.
    let wasm = module(24 << 20, 4100);
    let pushed = push_image(&registry, "img/once:v1", &wasm);
    let layer = pushed.json()["layers"][0]["digest"]
        .as_str()
        .expect("the image's layer")
        .to_owned();
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);

    let by_tag = format!("{addr}/img/once:v1");
    let by_digest = format!("{addr}/img/once@{}", pushed.digest);
    let (tagged, pinned) = tokio::join!(fetch(&daemon, &by_tag), fetch(&daemon, &by_digest));
    assert_eq!(tagged.digest, digest(&wasm));
    assert_eq!(pinned.digest, digest(&wasm));
    assert_eq!(tagged.path, pinned.path);
    let layer_gets = registry.count("GET", &format!("/blobs/{layer}"));
    assert_eq!(layer_gets, 1, "layer {layer} requested {layer_gets} times");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_pulls_stay_within_the_budget_plus_the_module_in_flight() {
    const MODULES: u64 = 6;
    const MODULE_EXTRA: usize = 249_950;
    const BUDGET: u64 = 1_000_000;
    let registry = Registry::start();
    let addr = registry.addr();
    let modules: Vec<Vec<u8>> = (0..MODULES)
        .map(|i| module(MODULE_EXTRA, 4200 + i))
        .collect();
    for (i, wasm) in modules.iter().enumerate() {
        push_image(&registry, &format!("img/budget{i}:v1"), wasm);
    }
    let largest = modules.iter().map(Vec::len).max().unwrap() as u64;
    let config = format!(
        "max_cache_bytes = {BUDGET}\ncache_high_watermark = 0.9\ncache_low_watermark = 0.5\n\
         path_grace = \"0s\"\ngc_interval = \"1h\"\nmax_concurrent_downloads = 2\n"
    );
    let daemon = Daemon::start(&["--insecure-registry", &addr], Some(&config));

    let pulls = modules.iter().enumerate().map(|(i, wasm)| {
        let (daemon, addr) = (&daemon, &addr);
        async move {
            let fetched = fetch(daemon, &format!("{addr}/img/budget{i}:v1")).await;
            assert_eq!(fetched.digest, digest(wasm));
            usage_bytes(daemon).await
        }
    });
    let (seen, ()) = tokio::join!(futures_util::future::join_all(pulls), async {
        // Sample the usage while the pulls run, as well as after each one.
        for _ in 0..50 {
            let usage = usage_bytes(&daemon).await;
            assert!(
                usage <= BUDGET + largest,
                "usage {usage} while pulling, over the budget {BUDGET} + one module {largest}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    for usage in seen {
        assert!(
            usage <= BUDGET + largest,
            "usage {usage} after a pull, over the budget {BUDGET} + one module {largest}\n{}",
            daemon.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_during_an_image_layer_is_resource_exhausted_and_leaves_nothing() {
    let registry = Registry::start();
    let addr = registry.addr();
    let small = module(10_000, 4300);
    let big = module(12 << 20, 4301);
    push_image(&registry, "img/small:v1", &small);
    push_image(&registry, "img/big:v1", &big);
    let disk = SmallDisk::mount(8 << 20);
    let data_dir = disk.dir.path().join("data");
    let daemon = Daemon::start_at(Some(data_dir), &["--insecure-registry", &addr], None);
    let kept = fetch(&daemon, &format!("{addr}/img/small:v1")).await;

    let reference = format!("{addr}/img/big:v1");
    let status = try_fetch(&daemon, &reference, PullPolicy::IfNotPresent)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&reference),
        "{}",
        status.message()
    );
    assert!(daemon.files("ingest").is_empty(), "no partial file");
    assert!(
        daemon
            .log()
            .contains("disk full; evicting and retrying once"),
        "an image layer goes through the disk-full retry:\n{}",
        daemon.log()
    );
    let again = fetch(&daemon, &format!("{addr}/img/small:v1")).await;
    assert_eq!(again.path, kept.path);
    assert_eq!(std::fs::read(&again.path).unwrap(), small);
    drop(daemon);
}

/// The registry process paused with SIGSTOP (connections are accepted by the kernel, nothing
/// answers); resumed on drop so that its harness can stop it.
struct Paused(u32);

impl Paused {
    fn pause(registry: &Registry) -> Paused {
        let pid = registry.pid().expect("the registry runs");
        signal("STOP", pid);
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal("CONT", self.0);
    }
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_registry_gets_the_last_known_module_after_stale_after() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(1_000, 4400);
    oras_push_cncf(&registry, "silent/a:v1", &wasm);
    let daemon = Daemon::start(
        &["--insecure-registry", &addr],
        Some("stale_after = \"1s\"\n"),
    );
    let reference = format!("{addr}/silent/a:v1");
    let first = fetch(&daemon, &reference).await;
    assert!(!first.stale);

    let paused = Paused::pause(&registry);
    let started = Instant::now();
    let answer = try_fetch(&daemon, &reference, PullPolicy::Always)
        .await
        .unwrap_or_else(|status| panic!("{status:?}\n{}", daemon.log()));
    let waited = started.elapsed();
    drop(paused);
    assert!(answer.stale, "{answer:?}");
    assert_eq!(answer.digest, digest(&wasm));
    assert_eq!(answer.path, first.path);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "answered after {waited:?}; stale_after is 1s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_registry_fails_an_uncached_fetch_after_fetch_timeout() {
    let registry = Registry::start();
    let addr = registry.addr();
    oras_push_cncf(&registry, "silent/b:v1", &module(1_000, 4500));
    let daemon = Daemon::start(
        &["--insecure-registry", &addr],
        Some("fetch_timeout = \"2s\"\n"),
    );
    let reference = format!("{addr}/silent/b:v1");

    let paused = Paused::pause(&registry);
    let started = Instant::now();
    let status = try_fetch(&daemon, &reference, PullPolicy::IfNotPresent)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    drop(paused);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    for part in [reference.as_str(), addr.as_str(), "2s"] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(6),
        "failed after {waited:?}; fetch_timeout is 2s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callers_grpc_deadline_is_honoured_and_the_fetch_goes_on() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(1_000, 4600);
    oras_push_cncf(&registry, "silent/c:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let reference = format!("{addr}/silent/c:v1");

    let paused = Paused::pause(&registry);
    let started = Instant::now();
    let (code, message) = fetch_with_grpc_timeout(&daemon, &reference, "1S").await;
    let waited = started.elapsed();
    assert_eq!(
        Code::from_i32(code),
        Code::DeadlineExceeded,
        "{code}: {message}"
    );
    assert!(message.contains(&reference), "{message}");
    assert!(
        waited < Duration::from_secs(5),
        "answered after {waited:?}; the deadline was 1s"
    );
    // The shared fetch went on: once the registry answers, it finishes, and the module is
    // cached for the next caller.
    drop(paused);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cached = try_fetch(&daemon, &reference, PullPolicy::Never).await;
        match cached {
            Ok(cached) => {
                assert_eq!(cached.digest, digest(&wasm));
                break;
            }
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("the fetch did not go on: {status:?}\n{}", daemon.log()),
        }
    }
}

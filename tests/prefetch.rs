//! Prewarming against a running daemon and a real registry: watched lists (edits, atomic
//! replaces, ConfigMap `..data` swaps), the streaming Prefetch API, the CLI, pins, refresh and
//! the readiness gate.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::prefetch_progress::Stage;
use wasmcache::api::proto::{FetchRequest, PinRequest, PrefetchRequest, StatRequest};

use crate::common::daemon::unix_request;
use crate::common::fixtures::oras_push_cncf;
use crate::common::wasm::{digest, module};
use crate::common::{wait_until, Behaviour, Daemon, FaultyServer, Registry};

/// How long a change to a list may take to show (the issue allows 2 s; leave CI headroom).
const ARRIVAL: Duration = Duration::from_secs(10);

/// The module digest the daemon holds for `reference`, if any (no registry involved).
async fn cached(daemon: &Daemon, reference: &str) -> Option<String> {
    let mut client = daemon.client().await;
    let response = client
        .stat(StatRequest {
            target: reference.to_owned(),
        })
        .await
        .ok()?;
    response
        .into_inner()
        .entries
        .first()
        .map(|e| e.digest.clone())
}

/// Polls until `reference` is cached with `expected` digest, within [`ARRIVAL`].
async fn arrives(daemon: &Daemon, reference: &str, expected: &str) -> bool {
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    while tokio::time::Instant::now() < deadline {
        if cached(daemon, reference).await.as_deref() == Some(expected) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn write_atomically(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    fs::write(&temp, text).unwrap();
    fs::rename(&temp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watched_list_is_followed_through_edits_and_atomic_replaces() {
    let registry = Registry::start();
    let addr = registry.addr();
    let modules: Vec<Vec<u8>> = (0..4).map(|i| module(1000, 100 + i)).collect();
    for (i, wasm) in modules.iter().enumerate() {
        oras_push_cncf(&registry, &format!("list/m{i}:v1"), wasm);
    }
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    let reference = |i: usize| format!("{addr}/list/m{i}:v1");
    fs::write(
        &list,
        format!(
            "# wasme images.txt style\n{}\nNot/A/Ref\n{} pin\n{addr}/list/missing:v1\n",
            reference(0),
            reference(1)
        ),
    )
    .unwrap();
    let list_arg = list.display().to_string();
    let daemon = Daemon::start(
        &["--insecure-registry", &addr, "--prefetch-file", &list_arg],
        None,
    );

    // The first reading is done before the daemon reports ready, bad lines notwithstanding.
    assert!(wait_until(ARRIVAL, || daemon
        .log()
        .contains("initial prefetch attempted")));
    assert_eq!(
        cached(&daemon, &reference(0)).await,
        Some(digest(&modules[0]))
    );
    assert_eq!(
        cached(&daemon, &reference(1)).await,
        Some(digest(&modules[1]))
    );
    let log = daemon.log();
    assert!(log.contains("bad prefetch line skipped"), "{log}");
    assert!(
        log.contains("images.txt") && log.contains("line=3"),
        "{log}"
    );
    assert!(log.contains("list/missing:v1"), "{log}");

    // An edit in place adds a module.
    let mut text = fs::read_to_string(&list).unwrap();
    text.push_str(&format!("{}\n", reference(2)));
    fs::write(&list, &text).unwrap();
    assert!(
        arrives(&daemon, &reference(2), &digest(&modules[2])).await,
        "{}",
        daemon.log()
    );

    // An atomic replace drops m1 (unpinned, still cached) and adds m3.
    write_atomically(&list, &format!("{}\n{}\n", reference(0), reference(3)));
    assert!(
        arrives(&daemon, &reference(3), &digest(&modules[3])).await,
        "{}",
        daemon.log()
    );
    let mut client = daemon.client().await;
    let unpin = client
        .unpin(PinRequest {
            reference: reference(1),
        })
        .await;
    assert_eq!(
        unpin.unwrap_err().code(),
        Code::NotFound,
        "the list's pin was undone"
    );
    assert_eq!(
        cached(&daemon, &reference(1)).await,
        Some(digest(&modules[1])),
        "not deleted"
    );

    // The file disappears and comes back.
    fs::remove_file(&list).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = module(1000, 200);
    oras_push_cncf(&registry, "list/back:v1", &fresh);
    fs::write(&list, format!("{addr}/list/back:v1\n")).unwrap();
    assert!(arrives(&daemon, &format!("{addr}/list/back:v1"), &digest(&fresh)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_data_symlink_swap_is_picked_up() {
    let registry = Registry::start();
    let addr = registry.addr();
    let first = module(100, 300);
    let second = module(100, 301);
    oras_push_cncf(&registry, "cm/a:v1", &first);
    oras_push_cncf(&registry, "cm/b:v1", &second);

    // What kubelet writes for a mounted ConfigMap with key `images.txt`.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("..2026_11_25_10_00_00.1")).unwrap();
    fs::write(
        root.join("..2026_11_25_10_00_00.1/images.txt"),
        format!("{addr}/cm/a:v1\n"),
    )
    .unwrap();
    symlink("..2026_11_25_10_00_00.1", root.join("..data")).unwrap();
    symlink("..data/images.txt", root.join("images.txt")).unwrap();
    let root_arg = root.display().to_string();
    let daemon = Daemon::start(
        &["--insecure-registry", &addr, "--prefetch-file", &root_arg],
        None,
    );
    assert!(arrives(&daemon, &format!("{addr}/cm/a:v1"), &digest(&first)).await);

    // The update: a new timestamped dir, `..data_tmp` pointing at it, renamed over `..data`.
    fs::create_dir(root.join("..2026_11_25_10_05_00.2")).unwrap();
    fs::write(
        root.join("..2026_11_25_10_05_00.2/images.txt"),
        format!("{addr}/cm/a:v1\n{addr}/cm/b:v1\n"),
    )
    .unwrap();
    symlink("..2026_11_25_10_05_00.2", root.join("..data_tmp")).unwrap();
    fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    fs::remove_dir_all(root.join("..2026_11_25_10_00_00.1")).unwrap();
    assert!(
        arrives(&daemon, &format!("{addr}/cm/b:v1"), &digest(&second)).await,
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_streams_events_in_order_and_pins() {
    let registry = Registry::start();
    let addr = registry.addr();
    let big = module(16 << 20, 400);
    let small = module(100, 401);
    oras_push_cncf(&registry, "s/big:v1", &big);
    oras_push_cncf(&registry, "s/small:v1", &small);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let references = vec![
        format!("{addr}/s/big:v1"),
        format!("{addr}/s/small:v1"),
        format!("{addr}/s/missing:v1"),
        "Not/Valid".to_owned(),
    ];
    let mut stream = daemon
        .client()
        .await
        .prefetch(PrefetchRequest {
            references: references.clone(),
            pin: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    let last = events.last().unwrap();
    assert_eq!(last.stage(), Stage::Summary);
    assert_eq!((last.succeeded, last.failed), (2, 2));
    for reference in &references {
        let stages: Vec<Stage> = events
            .iter()
            .filter(|e| &e.reference == reference)
            .map(|e| e.stage())
            .filter(|s| *s != Stage::Downloading)
            .collect();
        let expected_end = if reference.contains("s/big") || reference.contains("s/small") {
            Stage::Done
        } else {
            Stage::Failed
        };
        let expected = if reference == "Not/Valid" {
            vec![Stage::Queued, Stage::Failed]
        } else {
            vec![Stage::Queued, Stage::Resolving, expected_end]
        };
        assert_eq!(stages, expected, "{reference}: {events:?}");
    }
    let failure = |reference: &str| {
        events
            .iter()
            .find(|e| e.reference == reference && e.stage() == Stage::Failed)
            .unwrap()
    };
    assert_eq!(failure(&references[2]).error_code, "NOT_FOUND");
    assert_eq!(failure("Not/Valid").error_code, "INVALID_ARGUMENT");
    let done = events
        .iter()
        .find(|e| e.reference == references[0] && e.stage() == Stage::Done)
        .unwrap();
    assert_eq!(done.result.as_ref().unwrap().digest, digest(&big));
    for progress in events.iter().filter(|e| e.stage() == Stage::Downloading) {
        assert!(
            progress.bytes_done <= progress.bytes_total && progress.bytes_total == big.len() as u64
        );
    }

    // Pinned: rm refuses, by reference and by digest, with a clear error; unpin, then rm works.
    let (code, error) = crate::common::cli::run_err(daemon.command("rm").arg(&references[1]));
    assert_eq!(code, 1);
    assert!(error.contains("is pinned; unpin it first"), "{error}");
    let (_, error) = crate::common::cli::run_err(daemon.command("rm").arg(digest(&big)));
    assert!(error.contains("is pinned"), "{error}");
    let out = crate::common::cli::run_ok(daemon.command("unpin").arg(&references[1]));
    assert!(out.contains("unpinned"), "{out}");
    let out = crate::common::cli::run_ok(daemon.command("rm").arg(&references[1]));
    assert!(
        out.contains(&format!("deleted: {}", digest(&small))),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reports_each_reference_and_fails_if_any_failed() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(100, 500);
    oras_push_cncf(&registry, "cli/ok:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let list = daemon.data_dir.parent().unwrap().join("more.txt");
    fs::write(
        &list,
        format!("{addr}/cli/ok:v1 pin\n{addr}/cli/missing:v1\n"),
    )
    .unwrap();

    let output = crate::common::run_with_timeout(
        daemon.command("prefetch").arg("--file").arg(&list),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("done        {addr}/cli/ok:v1 {}", digest(&wasm))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("failed      {addr}/cli/missing:v1 NOT_FOUND")),
        "{stdout}"
    );
    assert!(
        stdout.contains("summary     1 succeeded, 1 failed"),
        "{stdout}"
    );
    assert!(stderr.contains("1 of the references failed"), "{stderr}");

    let out =
        crate::common::cli::run_ok(daemon.command("prefetch").arg(format!("{addr}/cli/ok:v1")));
    assert!(out.contains("(cached)"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_follows_a_moved_tag_before_anyone_asks() {
    let registry = Registry::start();
    let addr = registry.addr();
    let old = module(100, 600);
    let new = module(100, 601);
    oras_push_cncf(&registry, "r/f:stable", &old);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    fs::write(&list, format!("{addr}/r/f:stable pin\n")).unwrap();
    let list_arg = list.display().to_string();
    let mut registry = registry;
    let daemon = Daemon::start(
        &["--insecure-registry", &addr, "--prefetch-file", &list_arg],
        Some("refresh_interval = \"1s\"\nprefetch_retries = 0\n"),
    );
    let reference = format!("{addr}/r/f:stable");
    assert!(arrives(&daemon, &reference, &digest(&old)).await);

    // A failed refresh keeps the old digest.
    registry.stop();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(cached(&daemon, &reference).await, Some(digest(&old)));
    registry.restart();
    oras_push_cncf(&registry, "r/f:stable", &new);
    assert!(
        arrives(&daemon, &reference, &digest(&new)).await,
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_the_initial_list() {
    // A registry whose manifest hangs: the initial prefetch takes until read_timeout.
    let faulty = FaultyServer::start();
    faulty.route(
        "/v2/slow/f/manifests/v1",
        Behaviour::stall(vec![b'{'; 100], 10),
    );
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    fs::write(&list, format!("{}/slow/f:v1\n", faulty.addr())).unwrap();
    let list_arg = list.display().to_string();
    let addr = faulty.addr();
    let daemon = Daemon::start(
        &["--insecure-registry", &addr, "--prefetch-file", &list_arg],
        Some("read_timeout = \"3s\"\nprefetch_retries = 0\n"),
    );
    let readyz = unix_request(&daemon.socket, "GET", "/readyz", &[], None).await;
    assert_eq!(readyz.status, 503);
    assert_eq!(
        unix_request(&daemon.socket, "GET", "/healthz", &[], None)
            .await
            .status,
        200
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        wasmcache::client::channel(&daemon.socket).await.unwrap(),
    );
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    let status = health
        .check(check("wasmcache.v1.WasmCache"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    // The exec-probe form: not ready (exit 1), but alive.
    let (code, error) = crate::common::cli::run_err(&mut daemon.command("health"));
    assert_eq!(code, 1);
    assert!(error.contains("is not ready"), "{error}");
    let live = crate::common::cli::run_ok(daemon.command("health").arg("--live"));
    assert_eq!(live.trim(), "alive, not ready");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let readyz = unix_request(&daemon.socket, "GET", "/readyz", &[], None).await;
        if readyz.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became ready:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(daemon.log().contains("initial prefetch attempted"));
    let status = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let ready = crate::common::cli::run_ok(&mut daemon.command("health"));
    assert_eq!(ready.trim(), "ready");

    // No daemon: exit 1, saying so.
    drop(daemon);
    let (code, error) = crate::common::cli::run_err(
        crate::common::cli::wasmcache()
            .arg("--socket")
            .arg(dir.path().join("none.sock"))
            .arg("health")
            .arg("--live"),
    );
    assert_eq!(code, 1);
    assert!(
        error.contains("cannot reach the wasmcache daemon"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_downloads_keep_to_their_bandwidth_share() {
    let registry = Registry::start();
    let addr = registry.addr();
    let prewarmed = module(4_000_000, 700);
    let wanted = module(4_000_000, 701);
    oras_push_cncf(&registry, "bw/pre:v1", &prewarmed);
    oras_push_cncf(&registry, "bw/now:v1", &wanted);
    let daemon = Daemon::start(
        &["--insecure-registry", &addr],
        Some("prefetch_max_bytes_per_second = 2000000\n"),
    );

    // 4 MB at 2 MB/s cannot take less than about 2 s.
    let started = std::time::Instant::now();
    let mut stream = daemon
        .client()
        .await
        .prefetch(PrefetchRequest {
            references: vec![format!("{addr}/bw/pre:v1")],
            pin: false,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if event.stage() == Stage::Summary {
            assert_eq!(event.succeeded, 1);
        }
    }
    let prefetch_time = started.elapsed();
    assert!(
        prefetch_time >= Duration::from_millis(1500),
        "{prefetch_time:?}"
    );

    // An on-demand fetch of the same size is not held back.
    let started = std::time::Instant::now();
    let fetched = daemon
        .client()
        .await
        .fetch(wasmcache::api::proto::FetchRequest {
            reference: format!("{addr}/bw/now:v1"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.digest, digest(&wanted));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

/// Downloads started by prefetches hold at most `prefetch_download_share` of the
/// download permits, so a prefetch stuck on a stalled registry (every lane busy) leaves
/// permits to on-demand fetches, which a sidecar waits on.
#[tokio::test(flavor = "multi_thread")]
async fn a_prefetch_stuck_on_a_stalled_registry_leaves_permits_to_on_demand_fetches() {
    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    // More modules than download permits (8 by default), whose blobs hang after a few bytes
    // until the daemon gives up (`read_timeout`, a minute here).
    let stalled = 12;
    let faulty = FaultyServer::start();
    let config = br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec();
    for i in 0..stalled {
        let wasm = module(1000, 800 + i);
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                       "digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": "application/wasm", "digest": digest(&wasm),
                        "size": wasm.len()}],
        });
        let repo = format!("stall/m{i}");
        faulty.route_manifest(&repo, "v1", manifest.to_string().as_bytes(), OCI_MANIFEST);
        faulty.route(
            &format!("/v2/{repo}/blobs/{}", digest(&wasm)),
            Behaviour::stall(wasm, 10),
        );
    }
    let registry = Registry::start();
    let wanted = module(1000, 850);
    oras_push_cncf(&registry, "now/f:v1", &wanted);
    let (faddr, addr) = (faulty.addr(), registry.addr());
    // Default prefetch lanes, share and permits; stalls outlast the test by far.
    let daemon = Daemon::start(
        &["--insecure-registry", &faddr, "--insecure-registry", &addr],
        Some("read_timeout = \"60s\"\nfetch_timeout = \"90s\"\nprefetch_retries = 0\n"),
    );
    let started = std::time::Instant::now();
    let mut stream = daemon
        .client()
        .await
        .prefetch(PrefetchRequest {
            references: (0..stalled)
                .map(|i| format!("{faddr}/stall/m{i}:v1"))
                .collect(),
            pin: false,
        })
        .await
        .unwrap()
        .into_inner();

    // Prefetches' downloads take their share (half of 8) and no more: every lane resolved its
    // manifest (no download permit needed), four of them hang in a download, the rest wait.
    let blob_gets = || faulty.count("GET", "/blobs/");
    assert!(
        wait_until(ARRIVAL, || blob_gets() >= 4),
        "{} blob GETs\n{}",
        blob_gets(),
        daemon.log()
    );
    assert!(wait_until(ARRIVAL, || faulty.count("GET", "/manifests/") >= 8));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(blob_gets(), 4, "prefetch downloads past their share");

    // An on-demand fetch from a healthy registry gets a permit at once: it ends long before
    // the stalled downloads (60 s), with a generous bound for a loaded machine.
    let mut client = daemon.client().await;
    let fetch = client.fetch(FetchRequest {
        reference: format!("{addr}/now/f:v1"),
        ..Default::default()
    });
    let fetched = tokio::time::timeout(Duration::from_secs(20), fetch)
        .await
        .unwrap_or_else(|_| panic!("the on-demand fetch starved\n{}", daemon.log()))
        .unwrap()
        .into_inner();
    assert_eq!(fetched.digest, digest(&wanted));
    assert!(started.elapsed() < Duration::from_secs(45));

    // The prefetches are still stuck: nothing of theirs has ended.
    assert_eq!(blob_gets(), 4);
    while let Ok(message) = tokio::time::timeout(Duration::from_millis(100), stream.message()).await
    {
        let event = message.unwrap().expect("the stream ends after its summary");
        assert!(
            matches!(
                event.stage(),
                Stage::Queued | Stage::Resolving | Stage::Downloading
            ),
            "{event:?}"
        );
    }
}

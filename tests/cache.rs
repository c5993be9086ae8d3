//! The bounded cache with real modules: eviction order and watermarks, what is never evicted,
//! age, a full disk, corrupted blobs, and reconciliation after damage done while stopped.

use std::fs;
use std::process::Command;
use std::time::Duration;

use tonic::Code;
use wasmcache::api::proto::{
    FetchRequest, FetchResponse, GcRequest, LeaseRequest, PinRequest, PullPolicy,
    ReleaseLeaseRequest, StatRequest,
};

use crate::common::cli::{run_err, run_ok};
use crate::common::daemon::unix_request;
use crate::common::fixtures::oras_push_cncf;
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{wait_until, Daemon, Registry};

/// Modules of 250,000 bytes and a budget of 1,000,000: three fit, a fourth passes the high mark.
const MODULE_EXTRA: usize = 249_950;
const BUDGET: &str =
    "max_cache_bytes = 1000000\ncache_high_watermark = 0.9\ncache_low_watermark = 0.5\n";

struct Fixture {
    registry: Registry,
    modules: Vec<Vec<u8>>,
}

impl Fixture {
    fn new(count: u64) -> Fixture {
        let registry = Registry::start();
        let modules: Vec<Vec<u8>> = (0..count).map(|i| module(MODULE_EXTRA, 700 + i)).collect();
        for (i, wasm) in modules.iter().enumerate() {
            oras_push_cncf(&registry, &format!("c/m{i}:v1"), wasm);
        }
        Fixture { registry, modules }
    }

    fn reference(&self, i: usize) -> String {
        format!("{}/c/m{i}:v1", self.registry.addr())
    }

    fn daemon(&self, config: &str) -> Daemon {
        Daemon::start(
            &["--insecure-registry", &self.registry.addr()],
            Some(config),
        )
    }
}

async fn fetch(daemon: &Daemon, reference: &str, lease_seconds: u32) -> FetchResponse {
    daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: reference.to_owned(),
            pull_policy: PullPolicy::IfNotPresent.into(),
            lease_seconds,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("{reference}: {status:?}\n{}", daemon.log()))
        .into_inner()
}

async fn is_cached(daemon: &Daemon, reference: &str) -> bool {
    let mut client = daemon.client().await;
    client
        .stat(StatRequest {
            target: reference.to_owned(),
        })
        .await
        .is_ok()
}

async fn metric(daemon: &Daemon, name: &str) -> String {
    let response = unix_request(&daemon.socket, "GET", "/metrics", &[], None).await;
    String::from_utf8(response.body)
        .unwrap()
        .lines()
        .filter(|line| line.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn least_recently_used_modules_go_first_down_to_the_low_watermark() {
    let fixture = Fixture::new(4);
    let daemon = fixture.daemon(&format!("{BUDGET}path_grace = \"0s\"\n"));
    for i in 0..3 {
        fetch(&daemon, &fixture.reference(i), 0).await;
    }
    // m0 is used again, so m1 and m2 are the least recently used.
    fetch(&daemon, &fixture.reference(0), 0).await;
    let fourth = fetch(&daemon, &fixture.reference(3), 0).await;
    assert!(!fourth.cache_hit);

    // 750,000 + 250,000 passes 900,000: evict until usage + incoming is under 500,000.
    let cached = [
        is_cached(&daemon, &fixture.reference(0)).await,
        is_cached(&daemon, &fixture.reference(1)).await,
        is_cached(&daemon, &fixture.reference(2)).await,
        is_cached(&daemon, &fixture.reference(3)).await,
    ];
    assert_eq!(cached, [true, false, false, true], "{}", daemon.log());
    let blobs = daemon.files("blobs/sha256");
    assert_eq!(blobs.len(), 2, "{blobs:?}");
    assert_eq!(
        metric(&daemon, "wasmcache_evictions_total").await,
        "wasmcache_evictions_total{reason=\"size\"} 2"
    );
    assert!(metric(&daemon, "wasmcache_cache_budget_bytes")
        .await
        .ends_with(" 1000000"));

    // `du` through the daemon (it holds the data dir) reports usage against the budget.
    let usage = run_ok(&mut daemon.command("du"));
    let expected = fixture.modules[0].len() + fixture.modules[3].len();
    assert!(
        usage.starts_with(&format!("{expected} bytes in 2 modules")),
        "{usage}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_leases_and_path_grace_are_never_evicted() {
    let fixture = Fixture::new(5);
    // Everything handed out in the last hour is protected: nothing can be evicted.
    let daemon = fixture.daemon(&format!("{BUDGET}path_grace = \"1h\"\n"));
    for i in 0..5 {
        fetch(&daemon, &fixture.reference(i), 0).await;
    }
    assert_eq!(
        daemon.files("blobs/sha256").len(),
        5,
        "path grace protects all"
    );
    drop(daemon);

    let daemon = fixture.daemon(&format!("{BUDGET}path_grace = \"0s\"\n"));
    let mut client = daemon.client().await;
    // m0 pinned, m1 leased, m2 plain.
    client
        .pin(PinRequest {
            reference: fixture.reference(0),
        })
        .await
        .unwrap();
    let leased = fetch(&daemon, &fixture.reference(1), 3600).await;
    assert!(leased.lease_id > 0 && leased.lease_expires_unix > 0);
    fetch(&daemon, &fixture.reference(2), 0).await;
    fetch(&daemon, &fixture.reference(3), 0).await;
    assert!(is_cached(&daemon, &fixture.reference(0)).await, "pinned");
    assert!(is_cached(&daemon, &fixture.reference(1)).await, "leased");
    assert!(!is_cached(&daemon, &fixture.reference(2)).await, "evicted");

    // Releasing the lease makes m1 evictable: the next download takes it.
    client
        .release_lease(ReleaseLeaseRequest {
            lease_id: leased.lease_id,
        })
        .await
        .unwrap();
    let status = client
        .release_lease(ReleaseLeaseRequest {
            lease_id: leased.lease_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    fetch(&daemon, &fixture.reference(4), 0).await;
    assert!(
        !is_cached(&daemon, &fixture.reference(1)).await,
        "no longer leased"
    );
    assert!(
        is_cached(&daemon, &fixture.reference(0)).await,
        "still pinned"
    );

    // A lease by digest works too, and an unknown target is NOT_FOUND.
    let lease = client
        .lease(LeaseRequest {
            target: fixture.reference(4),
            seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.digest, digest(&fixture.modules[4]));
    let status = client
        .lease(LeaseRequest {
            target: fixture.reference(2),
            seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn unused_modules_age_out() {
    let fixture = Fixture::new(1);
    let daemon = fixture.daemon("max_age = \"1s\"\npath_grace = \"0s\"\ngc_interval = \"500ms\"\n");
    fetch(&daemon, &fixture.reference(0), 0).await;
    assert!(
        wait_until(Duration::from_secs(10), || daemon
            .files("blobs/sha256")
            .is_empty()),
        "{}",
        daemon.log()
    );
    // The pass counts what it evicted once its files are gone: wait for the count too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut evictions = metric(&daemon, "wasmcache_evictions_total").await;
    while evictions.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        evictions = metric(&daemon, "wasmcache_evictions_total").await;
    }
    assert_eq!(evictions, "wasmcache_evictions_total{reason=\"age\"} 1");
    let gc = daemon
        .client()
        .await
        .gc(GcRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(gc.evicted.is_empty());
    assert_eq!(gc.usage.unwrap().modules, 0);
}

/// A small tmpfs mounted for the test, unmounted on drop.
pub(crate) struct SmallDisk {
    pub(crate) dir: tempfile::TempDir,
}

impl SmallDisk {
    pub(crate) fn mount(bytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the test suite runs as root in CI)"
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_cleanly_and_harms_nothing() {
    let registry = Registry::start();
    let addr = registry.addr();
    let small = module(10_000, 800);
    let big = module(12 << 20, 801);
    oras_push_cncf(&registry, "disk/small:v1", &small);
    oras_push_cncf(&registry, "disk/big:v1", &big);
    let disk = SmallDisk::mount(8 << 20);
    let data_dir = disk.dir.path().join("data");
    let daemon = Daemon::start_at(Some(data_dir), &["--insecure-registry", &addr], None);
    let kept = fetch(&daemon, &format!("{addr}/disk/small:v1"), 0).await;

    let status = daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: format!("{addr}/disk/big:v1"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&format!("{addr}/disk/big:v1")),
        "{}",
        status.message()
    );
    assert!(daemon.files("ingest").is_empty(), "no partial file");
    assert!(daemon
        .log()
        .contains("disk full; evicting and retrying once"));
    let again = fetch(&daemon, &format!("{addr}/disk/small:v1"), 0).await;
    assert_eq!(again.path, kept.path);
    assert_eq!(fs::read(&again.path).unwrap(), small);
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_blob_is_found_by_verify_and_never_served_after_repair() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(50_000, 900);
    oras_push_cncf(&registry, "v/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let fetched = fetch(&daemon, &format!("{addr}/v/f:v1"), 0).await;

    let mut bytes = fs::read(&fetched.path).unwrap();
    bytes[1000] ^= 0xff;
    fs::write(&fetched.path, &bytes).unwrap();

    let (code, error) = run_err(&mut daemon.command("verify"));
    assert_eq!(code, 1);
    assert!(error.contains("do not match their digest"), "{error}");
    let out = run_ok(daemon.command("verify").arg("--repair"));
    assert!(
        out.contains(&format!("bad: {} (removed)", digest(&wasm))),
        "{out}"
    );
    let served = unix_request(
        &daemon.socket,
        "GET",
        &format!("/v1/modules/{}", digest(&wasm)),
        &[],
        None,
    )
    .await;
    assert_eq!(served.status, 404, "the bad bytes are gone");
    let refetched = fetch(&daemon, &format!("{addr}/v/f:v1"), 0).await;
    assert!(!refetched.cache_hit);
    assert_eq!(fs::read(&refetched.path).unwrap(), wasm);
    let out = run_ok(&mut daemon.command("verify"));
    assert!(out.contains("checked 1 blobs: 0 bad"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn damage_done_while_stopped_is_reconciled_at_start() {
    let registry = Registry::start();
    let addr = registry.addr();
    let kept = module(1000, 1000);
    let lost = module(1000, 1001);
    oras_push_cncf(&registry, "rec/kept:v1", &kept);
    oras_push_cncf(&registry, "rec/lost:v1", &lost);
    let mut daemon = Daemon::start(&["--insecure-registry", &addr], None);
    fetch(&daemon, &format!("{addr}/rec/kept:v1"), 0).await;
    let lost_path = fetch(&daemon, &format!("{addr}/rec/lost:v1"), 0).await.path;
    daemon.signal_and_wait("TERM", Duration::from_secs(10));

    // While it is down: a blob vanishes, an unknown good blob and a bad one appear, a torn
    // write is left behind.
    fs::remove_file(&lost_path).unwrap();
    let adopted = module(2000, 1002);
    let blobs = daemon.data_dir.join("blobs/sha256");
    fs::write(blobs.join(sha256_hex(&adopted)), &adopted).unwrap();
    fs::write(blobs.join(sha256_hex(b"claimed")), b"something else").unwrap();
    fs::write(daemon.data_dir.join("ingest/blob-torn.partial"), b"half").unwrap();

    daemon.restart();
    assert!(daemon.files("ingest").is_empty());
    let log = daemon.log();
    assert!(log.contains("cache reconciled with the disk"), "{log}");
    for line in [
        "wasmcache_reconciled_total{action=\"temp_files\"} 1",
        "wasmcache_reconciled_total{action=\"missing_blobs\"} 1",
        "wasmcache_reconciled_total{action=\"adopted\"} 1",
        "wasmcache_reconciled_total{action=\"deleted_orphans\"} 1",
    ] {
        assert!(
            metric(&daemon, "wasmcache_reconciled_total")
                .await
                .contains(line),
            "{line}"
        );
    }
    // The adopted blob is served by digest; the lost one is no longer claimed; the kept one is.
    let served = unix_request(
        &daemon.socket,
        "GET",
        &format!("/v1/modules/{}", digest(&adopted)),
        &[],
        None,
    )
    .await;
    assert_eq!(served.body, adopted);
    assert!(!is_cached(&daemon, &format!("{addr}/rec/lost:v1")).await);
    assert!(is_cached(&daemon, &format!("{addr}/rec/kept:v1")).await);
    assert!(!blobs.join(sha256_hex(b"claimed")).exists());
    let refetched = fetch(&daemon, &format!("{addr}/rec/lost:v1"), 0).await;
    assert_eq!(fs::read(&refetched.path).unwrap(), lost);

    // An index that cannot be opened is moved aside and rebuilt from the blobs.
    daemon.signal_and_wait("TERM", Duration::from_secs(10));
    let index = daemon.data_dir.join("index");
    fs::remove_dir_all(&index).unwrap();
    fs::write(&index, b"not a database").unwrap();
    daemon.restart();
    assert!(daemon
        .log()
        .contains("index unreadable; rebuilding it from the blobs"));
    let served = unix_request(
        &daemon.socket,
        "GET",
        &format!("/v1/modules/{}", digest(&kept)),
        &[],
        None,
    )
    .await;
    assert_eq!(served.body, kept, "blobs survive an index rebuild");
    let again = fetch(&daemon, &format!("{addr}/rec/kept:v1"), 0).await;
    assert!(
        again.cache_hit,
        "references are re-resolved, the blob is reused"
    );
}

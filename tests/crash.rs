//! Fault injection: the real daemon is killed with SIGKILL at random instants while it fetches
//! a stream of modules, 200 times, and must restart clean every time.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use tonic::Code;
use wasmcache::api::proto::{FetchRequest, ListRequest, PullPolicy, RemoveRequest};

use crate::common::fixtures::{oras_push_cncf, skopeo_push_image, tar_layer};
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{Daemon, ImageFormat, Registry};

/// Kills in this test; the suite's total must be at least 200.
const KILLS: usize = 200;
/// Upper bound for the whole loop, so a regression cannot hang the suite.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// xorshift64*: reproducible randomness without a dependency.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every invariant a restarted cache must hold; `fetched` maps references that were answered
/// before a kill to the module bytes they must still name.
async fn check_restart(
    daemon: &Daemon,
    fetched: &BTreeMap<String, Vec<u8>>,
    round: usize,
) -> usize {
    let context = || format!("round {round}\n{}", daemon.log());
    assert!(
        daemon.files("ingest").is_empty(),
        "temp files survived start-up: {}",
        context()
    );
    for path in daemon.files("blobs/sha256") {
        let bytes = fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "{} does not hash to its name: {}",
            path.display(),
            context()
        );
    }
    let mut client = daemon.client().await;
    let listed = client
        .list(ListRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    for entry in &listed.entries {
        assert!(
            std::path::Path::new(&entry.path).is_file(),
            "index entry {} has no file: {}",
            entry.reference,
            context()
        );
    }
    let mut refetched = 0;
    for (reference, bytes) in fetched {
        let request = |policy: PullPolicy| FetchRequest {
            reference: reference.clone(),
            pull_policy: policy.into(),
            ..Default::default()
        };
        let response = match client.fetch(request(PullPolicy::Never)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                refetched += 1;
                client
                    .fetch(request(PullPolicy::IfNotPresent))
                    .await
                    .unwrap_or_else(|status| {
                        panic!("re-fetching {reference}: {status:?}: {}", context())
                    })
                    .into_inner()
            }
            Err(status) => panic!("{reference}: {status:?}: {}", context()),
        };
        assert_eq!(response.digest, digest(bytes), "{reference}: {}", context());
        assert_eq!(
            &fs::read(&response.path).unwrap(),
            bytes,
            "{reference}: {}",
            context()
        );
    }
    refetched
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_instants_always_restarts_clean() {
    let registry = Registry::start();
    let addr = registry.addr();
    // Several sizes and both a raw artifact and an image layer, so kills land in downloads,
    // extraction, commits and index writes.
    let sizes = [1_000, 60_000, 500_000, 2_000_000, 6_000_000];
    let mut sources: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let wasm = module(*size, 2000 + i as u64);
        oras_push_cncf(&registry, &format!("crash/a{i}:v1"), &wasm);
        sources.push((format!("{addr}/crash/a{i}:v1"), wasm));
    }
    for (i, size) in [300_000, 3_000_000].iter().enumerate() {
        let wasm = module(*size, 3000 + i as u64);
        skopeo_push_image(
            &registry,
            &format!("crash/img{i}:v1"),
            vec![tar_layer(&[("plugin.wasm", &wasm)], true)],
            "application/vnd.oci.image.layer.v1.tar+gzip",
            ImageFormat::Oci,
        );
        sources.push((format!("{addr}/crash/img{i}:v1"), wasm));
    }

    let mut daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let mut random = Random(0x5eed_cafe_f00d_d00d);
    let mut fetched: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let started = Instant::now();
    let mut refetched = 0;
    let mut repaired = 0;
    for round in 0..KILLS {
        assert!(
            started.elapsed() < TIME_LIMIT,
            "only {round} kills in {TIME_LIMIT:?}"
        );
        // Keep downloads happening: now and then forget a module the daemon holds.
        let mut client = daemon.client().await;
        if round % 3 == 0 {
            let (reference, _) = &sources[random.below(sources.len() as u64) as usize];
            let _ = client
                .remove(RemoveRequest {
                    target: reference.clone(),
                })
                .await;
            fetched.remove(reference);
        }
        let mut calls = Vec::new();
        for _ in 0..4 {
            let (reference, bytes) = sources[random.below(sources.len() as u64) as usize].clone();
            let mut client = client.clone();
            calls.push(tokio::spawn(async move {
                let response = client
                    .fetch(FetchRequest {
                        reference: reference.clone(),
                        ..Default::default()
                    })
                    .await;
                (reference, bytes, response)
            }));
        }
        tokio::time::sleep(Duration::from_millis(random.below(60))).await;
        daemon.kill9();
        for call in calls {
            let (reference, bytes, response) = call.await.unwrap();
            if let Ok(response) = response {
                assert_eq!(response.into_inner().digest, digest(&bytes));
                fetched.insert(reference, bytes);
            }
        }
        daemon.clear_log();
        daemon.restart();
        if daemon.log().contains("cache reconciled with the disk") {
            repaired += 1;
        }
        refetched += check_restart(&daemon, &fetched, round).await;
    }
    // The kills must land inside writes, or the test proves nothing about torn writes.
    assert!(repaired > 0, "no kill interrupted a write");
    // Answered fetches were made durable before the answer: none should need re-fetching.
    assert_eq!(refetched, 0, "answered modules lost across kills");
    eprintln!(
        "{KILLS} kills in {:?}; {repaired} restarts repaired a torn write; {} references answered and intact",
        started.elapsed(),
        fetched.len()
    );
}

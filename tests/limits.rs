//! Every input limit in `[limits]`, met exactly and passed by one: the first works, the second
//! is refused with the right status and a message naming the limit.

use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::{FetchRequest, StatRequest};

use crate::common::daemon::unix_request;
use crate::common::fixtures::{oras_push_cncf, push_raw, skopeo_push_image, tar_layer};
use crate::common::wasm::{digest, module};
use std::time::Duration;

use crate::common::faulty::{Behaviour, FaultyServer};
use crate::common::{free_port, wait_until, Daemon, ImageFormat, Registry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const LIMITS: &str = "[limits]\n\
                      max_reference_bytes = 80\n\
                      max_request_bytes = 2048\n\
                      max_manifest_bytes = 4096\n\
                      max_layers = 3\n\
                      max_tar_entries = 10\n\
                      max_module_bytes = 20000\n";

async fn fetch_status(daemon: &Daemon, reference: &str) -> Result<(), tonic::Status> {
    daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: reference.to_owned(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// A CNCF manifest for `wasm` with `extra` other layers and annotations padding it to `size`
/// bytes exactly (when `size` is given).
fn artifact(wasm: &[u8], extra: &[Vec<u8>], size: Option<usize>) -> Vec<u8> {
    let config = b"{}".to_vec();
    let mut layers =
        vec![json!({"mediaType": "application/wasm", "digest": digest(wasm), "size": wasm.len()})];
    for blob in extra {
        layers.push(json!({"mediaType": "text/plain", "digest": digest(blob), "size": blob.len()}));
    }
    let mut manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": digest(&config), "size": 2},
        "layers": layers,
        "annotations": {"pad": ""},
    });
    if let Some(size) = size {
        let base = serde_json::to_vec(&manifest).unwrap().len();
        manifest["annotations"]["pad"] = json!("x".repeat(size - base));
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    if let Some(size) = size {
        assert_eq!(bytes.len(), size);
    }
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn each_limit_holds_at_its_value_and_refuses_one_more() {
    let registry = Registry::start();
    let addr = registry.addr();
    let push = |repo: &str, manifest: Vec<u8>, blobs: Vec<Vec<u8>>| {
        let mut all = vec![b"{}".to_vec()];
        all.extend(blobs);
        push_raw(&registry, repo, "v1", &manifest, OCI_MANIFEST, all);
    };

    // Manifest size: 4096 bytes pass, 4097 do not.
    let small = module(100, 1);
    push(
        "lim/manifest-ok",
        artifact(&small, &[], Some(4096)),
        vec![small.clone()],
    );
    push(
        "lim/manifest-over",
        artifact(&small, &[], Some(4097)),
        vec![small.clone()],
    );
    // Layers: 3 pass, 4 do not.
    let extras: Vec<Vec<u8>> = (0..3).map(|i| format!("extra {i}").into_bytes()).collect();
    let mut blobs = vec![small.clone()];
    blobs.extend(extras.clone());
    push(
        "lim/layers-ok",
        artifact(&small, &extras[..2], None),
        blobs.clone(),
    );
    push("lim/layers-over", artifact(&small, &extras, None), blobs);
    // Tar entries: 10 pass, 11 do not.
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("f{i}.txt"), vec![b'x'; 10]))
        .collect();
    let entries = |count: usize| {
        let mut entries: Vec<(&str, &[u8])> = files[..count - 1]
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
            .collect();
        entries.push(("plugin.wasm", small.as_slice()));
        tar_layer(&entries, true)
    };
    let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    skopeo_push_image(
        &registry,
        "lim/tar-ok:v1",
        vec![entries(10)],
        gzip,
        ImageFormat::Oci,
    );
    skopeo_push_image(
        &registry,
        "lim/tar-over:v1",
        vec![entries(11)],
        gzip,
        ImageFormat::Oci,
    );
    // Module size: 20,000 bytes pass, 20,001 do not.
    let exact = pad_to(20_000, 2);
    let over = pad_to(20_001, 3);
    oras_push_cncf(&registry, "lim/module-ok:v1", &exact);
    oras_push_cncf(&registry, "lim/module-over:v1", &over);

    let daemon = Daemon::start(&["--insecure-registry", &addr], Some(LIMITS));
    for (repo, limit_text) in [
        ("manifest", "over the limit of 4096"),
        ("layers", "has 4 entries, over the limit of 3"),
        ("tar", "has more than 10 entries"),
        ("module", "over the limit of 20000 bytes"),
    ] {
        fetch_status(&daemon, &format!("{addr}/lim/{repo}-ok:v1"))
            .await
            .unwrap_or_else(|status| panic!("{repo} at the limit: {status:?}"));
        let status = fetch_status(&daemon, &format!("{addr}/lim/{repo}-over:v1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{repo}: {status:?}");
        assert!(
            status.message().contains(limit_text),
            "{repo}: {}",
            status.message()
        );
    }

    // Reference length: 80 bytes are parsed (and not cached), 81 are refused unparsed.
    let name = |length: usize| {
        let prefix = format!("{addr}/lim/");
        format!("{prefix}{}", "r".repeat(length - prefix.len()))
    };
    let mut client = daemon.client().await;
    let at = client
        .stat(StatRequest { target: name(80) })
        .await
        .unwrap_err();
    assert_eq!(at.code(), Code::NotFound, "{at:?}");
    let over = client
        .stat(StatRequest { target: name(81) })
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument);
    assert!(
        over.message().contains("over the limit of 80"),
        "{}",
        over.message()
    );

    // Request size: HTTP bodies and gRPC messages over 2048 bytes are refused.
    let body = |size: usize| {
        let text = json!({"reference": format!("{addr}/lim/module-ok:v1")}).to_string();
        format!("{text}{}", " ".repeat(size - text.len())).into_bytes()
    };
    let post = |bytes: Vec<u8>| {
        unix_request(
            &daemon.socket,
            "POST",
            "/v1/fetch",
            &[("content-type", "application/json")],
            Some(bytes),
        )
    };
    assert_eq!(post(body(2048)).await.status, 200);
    assert_eq!(post(body(2049)).await.status, 413);
    let huge = client
        .stat(StatRequest {
            target: "x".repeat(4096),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(huge.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{huge:?}"
    );
}

/// A valid module of exactly `size` bytes (a custom section absorbs the difference).
fn pad_to(size: usize, seed: u64) -> Vec<u8> {
    for extra in (size.saturating_sub(64))..size {
        let candidate = module(extra, seed);
        if candidate.len() == size {
            return candidate;
        }
    }
    panic!("no module of exactly {size} bytes");
}

/// A registry whose manifests of `slow/{a,b,c}:v1` stall, so fetches of them stay in flight
/// until the server is dropped (or the daemon's `fetch_timeout` ends them).
fn stalling_registry() -> FaultyServer {
    let faulty = FaultyServer::start();
    for repo in ["a", "b", "c"] {
        faulty.route(
            &format!("/v2/slow/{repo}/manifests/v1"),
            Behaviour::stall(vec![b'{'; 100], 10),
        );
    }
    faulty
}

/// Two stalled fetches (`slow/a` and `slow/b`) from this process over the socket, the most
/// a client of these tests may have; returns once both have reached `faulty`.
async fn fill_both_places(
    daemon: &Daemon,
    faulty: &FaultyServer,
) -> (
    tokio::task::JoinHandle<Result<(), tonic::Status>>,
    tokio::task::JoinHandle<Result<(), tonic::Status>>,
) {
    let faddr = faulty.addr();
    let a = stalled_fetch(daemon.client().await, format!("{faddr}/slow/a:v1"));
    let b = stalled_fetch(daemon.client().await, format!("{faddr}/slow/b:v1"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            faulty.count("GET", "/v2/slow/a/manifests/v1") == 1
                && faulty.count("GET", "/v2/slow/b/manifests/v1") == 1
        }),
        "the two fetches never reached the registry"
    );
    (a, b)
}

/// A stalled fetch of `repo:v1` from `faulty` over `client`, run in the background.
fn stalled_fetch(
    mut client: wasmcache::api::proto::wasm_cache_client::WasmCacheClient<
        tonic::transport::Channel,
    >,
    reference: String,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    tokio::spawn(async move {
        client
            .fetch(FetchRequest {
                reference,
                ..Default::default()
            })
            .await
            .map(|_| ())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_may_fetch_only_so_many_references_at_once() {
    let faulty = stalling_registry();
    let faddr = faulty.addr();
    let port = free_port();
    let daemon = Daemon::start(
        &["--insecure-registry", &faddr],
        Some(&format!(
            "grpc_listen = \"127.0.0.1:{port}\"\nread_timeout = \"60s\"\n\
             [limits]\nmax_fetches_per_client = 2\n"
        )),
    );
    let reference = |repo: &str| format!("{faddr}/slow/{repo}:v1");
    let (a, b) = fill_both_places(&daemon, &faulty).await;

    // A third reference from the same client (this process, over the socket) is refused,
    // over gRPC and HTTP alike, before any registry request.
    let refused = fetch_status(&daemon, &reference("c")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limits.max_fetches_per_client")
            && refused.message().contains("slow/c")
            && refused.message().contains("uid "),
        "{refused:?}"
    );
    let body = json!({"reference": reference("c")})
        .to_string()
        .into_bytes();
    let response = unix_request(&daemon.socket, "POST", "/v1/fetch", &[], Some(body)).await;
    assert_eq!(response.status, 429);
    assert_eq!(response.json()["code"], "RESOURCE_EXHAUSTED");
    assert_eq!(faulty.count("GET", "/v2/slow/c/"), 0);

    // Asking again for a reference in flight joins it, and another client (TCP) has its
    // own count.
    let again = stalled_fetch(daemon.client().await, reference("a"));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let other = stalled_fetch(
        wasmcache::api::proto::wasm_cache_client::WasmCacheClient::new(channel),
        reference("c"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || faulty
            .count("GET", "/v2/slow/c/manifests/v1")
            == 1),
        "the TCP client's fetch never reached the registry"
    );

    // Once the registry goes, every one of them fails for that reason, not the limit.
    drop(faulty);
    for fetch in [a, b, again, other] {
        let status = fetch.await.unwrap().unwrap_err();
        assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    // The count went back down: the same client may fetch again.
    let status = fetch_status(&daemon, &reference("c")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_keeps_its_place_until_its_fetches_end() {
    let faulty = stalling_registry();
    let faddr = faulty.addr();
    let daemon = Daemon::start(
        &["--insecure-registry", &faddr],
        Some("fetch_timeout = \"3s\"\n[limits]\nmax_fetches_per_client = 2\n"),
    );
    let reference = |repo: &str| format!("{faddr}/slow/{repo}:v1");
    let (a, b) = fill_both_places(&daemon, &faulty).await;
    // The client gives up on both (its calls are cancelled, their streams reset) ...
    a.abort();
    b.abort();
    let _ = (a.await, b.await);
    // ... but the fetches go on, and so does its count: a third reference is refused.
    let refused = fetch_status(&daemon, &reference("c")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(faulty.count("GET", "/v2/slow/c/"), 0);
    // Once they end at fetch_timeout, the client may fetch again (and meets the same
    // stalled registry).
    let started = std::time::Instant::now();
    let mut status = refused;
    while status.code() == Code::ResourceExhausted && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = fetch_status(&daemon, &reference("c")).await.unwrap_err();
    }
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

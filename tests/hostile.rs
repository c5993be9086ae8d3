//! Input from an attacker on the node or the pod network, and registries that misbehave on
//! purpose: prefetch floods bounded per client and in all (also when the client hangs up),
//! the OCI view serving a blob only under a repository that led to it, redirects followed only
//! where the registry policy allows and never down to plain HTTP, and upstream error bodies
//! that never reach the caller.

use std::time::Duration;

use tonic::Code;
use wasmcache::api::proto::{FetchRequest, PrefetchRequest, PullPolicy};

use crate::common::fixtures::oras_push_cncf;
use crate::common::wasm::{digest, module};
use crate::common::{free_port, Behaviour, Daemon, Endpoint, FaultyServer, Registry};

async fn try_fetch(daemon: &Daemon, reference: &str) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(FetchRequest {
        reference: reference.to_owned(),
        pull_policy: PullPolicy::IfNotPresent.into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(30));
    let mut client = daemon.client().await;
    let answer = tokio::time::timeout(Duration::from_secs(40), client.fetch(request));
    answer
        .await
        .expect("an answer in time")
        .map(|response| response.into_inner().digest)
}

async fn prefetch(
    daemon: &Daemon,
    references: Vec<String>,
) -> Result<tonic::Streaming<wasmcache::api::proto::PrefetchProgress>, tonic::Status> {
    let mut client = daemon.client().await;
    let call = client.prefetch(PrefetchRequest {
        references,
        pin: false,
    });
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("an answer in time")
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_floods_are_refused_per_client_and_in_all_until_the_work_ends() {
    // Module URLs that hang after a few bytes keep each prefetch queued or running.
    let server = FaultyServer::start();
    let urls: Vec<String> = (0..4)
        .map(|i| {
            let path = format!("/hang/{i}.wasm");
            server.route(&path, Behaviour::stall(module(10_000, 700 + i), 100));
            format!("http://{}{path}", server.addr())
        })
        .collect();
    let config = "insecure_registries = [\"*\"]\nfetch_timeout = \"8s\"\nprefetch_retries = 0\n\n\
                  [limits]\nmax_prefetch_per_client = 3\nmax_prefetch_queue = 3\n";
    let daemon = Daemon::start(&[], Some(config));

    // More than a client may queue at once: refused whole, nothing asked upstream.
    let refused = prefetch(&daemon, urls.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limits.max_prefetch_per_client"),
        "{refused:?}"
    );
    assert_eq!(server.requests().len(), 0);

    // Three are accepted; the client hangs up at once, but they still count until each
    // prefetch ends, so a fourth is refused.
    let stream = prefetch(&daemon, urls[..3].to_vec()).await.unwrap();
    drop(stream);
    let refused = prefetch(&daemon, urls[3..].to_vec()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // Once the hanging fetches hit `fetch_timeout`, the places are given back.
    let freed = crate::common::wait_until(Duration::from_secs(30), || {
        let daemon = &daemon;
        let url = urls[3].clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                match prefetch(daemon, vec![url]).await {
                    Ok(_) => true,
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        false
                    }
                }
            })
        })
    });
    assert!(freed, "the places were never given back\n{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_oci_view_serves_a_blob_only_under_a_repository_that_led_to_it() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(20_000, 710);
    oras_push_cncf(&registry, "view/held:v1", &wasm);
    let listen = format!("127.0.0.1:{}", free_port());
    let config =
        "[registry_aliases.local]\nhost = \"ADDR\"\ninsecure = true\n".replace("ADDR", &addr);
    let daemon = Daemon::start(
        &["--insecure-registry", &addr, "--http-listen", &listen],
        Some(&config),
    );
    let view = Endpoint::plain(listen.clone());
    let manifest = view.get(
        "/v2/local/view/held/manifests/v1",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    );
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    let blob = format!("/blobs/{}", digest(&wasm));
    let held = view.get(&format!("/v2/local/view/held{blob}"), &[]);
    assert_eq!(held.status, 200);
    assert_eq!(held.body, wasm);
    let before = registry.requests().len();
    for other in ["/v2/local/view/other", "/v2/ghcr.io/someone/else"] {
        let refused = view.get(&format!("{other}{blob}"), &[]);
        assert_eq!(refused.status, 404, "{other}: {}", refused.text());
        assert_eq!(refused.json()["errors"][0]["code"], "BLOB_UNKNOWN");
    }
    assert_eq!(registry.requests().len(), before, "no upstream was asked");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_go_only_where_the_registry_policy_allows_and_bodies_stay_upstream() {
    // An internal service holding a secret, on another loopback port.
    let internal = FaultyServer::start();
    internal.route(
        "/secret",
        Behaviour::Ok {
            status: 500,
            headers: Vec::new(),
            body: b"SECRET-FROM-INTERNAL admin token=abc123".to_vec(),
        },
    );
    let registry = FaultyServer::start();
    let location = format!("http://{}/secret", internal.addr());
    registry.route(
        "/v2/r/m/manifests/v1",
        Behaviour::Ok {
            status: 307,
            headers: vec![("Location".into(), location)],
            body: Vec::new(),
        },
    );
    registry.route(
        "/v2/r/e/manifests/v1",
        Behaviour::Ok {
            status: 500,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: b"SECRET-IN-ERROR-BODY admin token=abc123".to_vec(),
        },
    );
    let config = format!(
        "insecure_registries = [\"*\"]\nallowed_registries = [\"{}\"]\n",
        registry.addr()
    );
    let daemon = Daemon::start(&[], Some(&config));

    let refused = try_fetch(&daemon, &format!("{}/r/m:v1", registry.addr()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("redirect"), "{refused:?}");
    assert!(!refused.message().contains("SECRET"), "{refused:?}");
    assert_eq!(
        internal.requests().len(),
        0,
        "the redirect was not followed"
    );

    let failed = try_fetch(&daemon, &format!("{}/r/e:v1", registry.addr()))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert!(failed.message().contains("500"), "{failed:?}");
    assert!(!failed.message().contains("SECRET"), "{failed:?}");
    assert!(!daemon.log().contains("SECRET"), "nor in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&["--http-listen", &listen], None);
    // A `FetchRequest` whose `reference` (field 1) is not UTF-8, in one gRPC frame, sent as
    // a plain HTTP/1.1 POST.
    let message = [0x0a, 0x02, 0xff, 0xfe];
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let answer = Endpoint::plain(listen).request(
        "POST",
        "/wasmcache.v1.WasmCache/Fetch",
        &[("Content-Type", "application/grpc"), ("TE", "trailers")],
        Some(&frame),
    );
    assert_eq!(answer.header("grpc-status"), Some("3"), "{answer:?}");
    drop(daemon);
}

/// Peak resident memory of process `pid` (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn endless_manifests_and_error_bodies_are_cut_off_while_they_stream() {
    let server = FaultyServer::start();
    let manifest_type = (
        "Content-Type".to_owned(),
        "application/vnd.oci.image.manifest.v1+json".to_owned(),
    );
    // Ten tags of each, so that ten fetches run at once (one tag's would share one).
    for tag in 0..=10 {
        server.route(
            &format!("/v2/r/huge/manifests/v{tag}"),
            Behaviour::Endless {
                status: 200,
                headers: vec![manifest_type.clone()],
            },
        );
        server.route(
            &format!("/v2/r/error/manifests/v{tag}"),
            Behaviour::Endless {
                status: 500,
                headers: Vec::new(),
            },
        );
    }
    let daemon = Daemon::start(&[], Some("insecure_registries = [\"*\"]\n"));
    // One fetch first, so the idle figure includes a warmed-up client.
    let first = try_fetch(&daemon, &format!("{}/r/huge:v10", server.addr())).await;
    assert_eq!(first.unwrap_err().code(), Code::ResourceExhausted);
    let idle = peak_rss_kib(daemon.pid());
    let fetches = (0..10).flat_map(|tag| {
        let huge = format!("{}/r/huge:v{tag}", server.addr());
        let error = format!("{}/r/error:v{tag}", server.addr());
        [huge, error]
    });
    let answers = futures_util::future::join_all(fetches.map(|reference| {
        let daemon = &daemon;
        async move { (reference.clone(), try_fetch(daemon, &reference).await) }
    }))
    .await;
    for (reference, answer) in answers {
        let status = answer.unwrap_err();
        let expected = match reference.contains("huge") {
            true => Code::ResourceExhausted,
            false => Code::Unavailable,
        };
        assert_eq!(status.code(), expected, "{reference}: {status:?}");
    }
    let peak = peak_rss_kib(daemon.pid());
    assert!(
        peak.saturating_sub(idle) < 64 << 10,
        "peak RSS grew from {idle} KiB to {peak} KiB"
    );
}

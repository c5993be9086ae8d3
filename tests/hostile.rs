//! Input from an attacker on the node or the pod network, and registries that misbehave on
//! purpose: prefetch floods bounded per client and in all (also when the client hangs up),
//! the OCI view serving a blob only under a repository that led to it, redirects followed only
//! where the registry policy allows and never down to plain HTTP, and upstream error bodies
//! that never reach the caller. Resident memory stays within 64 MiB of the idle figure while
//! registries and peers send endless manifests and error bodies, blobs drip (and the download
//! permits they hold come back at `fetch_timeout`), and token servers hand out huge tokens
//! for many repositories.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tonic::Code;
use wasmcache::api::proto::{FetchRequest, PrefetchRequest, PullPolicy};
use wasmcache::peers::rank;
use wasmcache::reference::Reference;

use crate::common::faulty::{FaultyRequest, Server};
use crate::common::fixtures::oras_push_cncf;
use crate::common::http::counter;
use crate::common::wasm::{digest, module};
use crate::common::{free_port, Behaviour, Daemon, Endpoint, FaultyServer, Registry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

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
    const TAGS: usize = 24;
    let server = FaultyServer::start();
    let manifest_type = (
        "Content-Type".to_owned(),
        "application/vnd.oci.image.manifest.v1+json".to_owned(),
    );
    // Twenty-four tags of each, so that many fetches run at once (one tag's would share one):
    // more than `limits.max_manifest_bytes_in_flight` holds of 4 MiB manifests.
    for tag in 0..=TAGS {
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
    let first = try_fetch(&daemon, &format!("{}/r/huge:v{TAGS}", server.addr())).await;
    assert_eq!(first.unwrap_err().code(), Code::ResourceExhausted);
    let idle = peak_rss_kib(daemon.pid());
    let fetches = (0..TAGS).flat_map(|tag| {
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
    assert_under_bound("endless", idle, peak_rss_kib(daemon.pid()));
}

/// Resident memory of process `pid` now (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Fails unless `peak` stays under `idle` + 64 MiB, the bound on what hostile input may cost.
fn assert_under_bound(what: &str, idle: u64, peak: u64) {
    eprintln!("{what}: idle {idle} KiB, peak {peak} KiB");
    assert!(
        peak.saturating_sub(idle) < 64 << 10,
        "{what}: resident memory grew from {idle} KiB to {peak} KiB"
    );
}

/// A fetch of `reference` that ends with the caller's own deadline, `deadline`.
async fn fetch_within(
    daemon: &Daemon,
    reference: &str,
    deadline: Duration,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(FetchRequest {
        reference: reference.to_owned(),
        pull_policy: PullPolicy::IfNotPresent.into(),
        ..Default::default()
    });
    request.set_timeout(deadline);
    let mut client = daemon.client().await;
    let answer = tokio::time::timeout(deadline + Duration::from_secs(10), client.fetch(request));
    answer
        .await
        .expect("an answer in time")
        .map(|response| response.into_inner().digest)
}

/// Whether a call ended at its deadline: the daemon's answer, or the client's own timer
/// (tonic enforces `grpc-timeout` on its side too, as `CANCELLED`).
fn deadline_passed(status: &tonic::Status) -> bool {
    status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Cancelled && status.message().contains("Timeout expired"))
}

/// Serves `repository` with `tags` on `server`: a CNCF artifact whose module layer, `wasm`, is
/// sent one byte every `every`.
fn serve_dripping(
    server: &FaultyServer,
    repository: &str,
    tags: &[&str],
    wasm: &[u8],
    every: Duration,
) {
    let config = br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": digest(wasm), "size": wasm.len()}],
    });
    let manifest = manifest.to_string().into_bytes();
    let answer = Behaviour::Ok {
        status: 200,
        headers: vec![
            ("Content-Type".into(), OCI_MANIFEST.into()),
            ("Docker-Content-Digest".into(), digest(&manifest)),
        ],
        body: manifest.clone(),
    };
    for target in tags.iter().copied().chain([digest(&manifest).as_str()]) {
        server.route(
            &format!("/v2/{repository}/manifests/{target}"),
            answer.clone(),
        );
    }
    let blobs = format!("/v2/{repository}/blobs");
    server.route(
        &format!("{blobs}/{}", digest(&config)),
        Behaviour::blob(config),
    );
    server.route(
        &format!("{blobs}/{}", digest(wasm)),
        Behaviour::drip(wasm.to_vec(), every),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dripping_blobs_nobody_waits_for_give_their_download_permits_back_at_fetch_timeout() {
    const FETCH_TIMEOUT: Duration = Duration::from_secs(4);
    let registry = Registry::start();
    let healthy: Vec<(String, Vec<u8>)> = ["warm", "queued", "after1", "after2"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let wasm = module(50_000, 720 + i as u64);
            oras_push_cncf(&registry, &format!("healthy/{name}:v1"), &wasm);
            (format!("{}/healthy/{name}:v1", registry.addr()), wasm)
        })
        .collect();
    // Two module layers, each named by two tags, dripping one byte every 100 ms: each would
    // take almost two hours, and no read timeout ever fires.
    let dripping = FaultyServer::start();
    let drips: Vec<Vec<u8>> = (0..2).map(|i| module(64 << 10, 730 + i)).collect();
    for (i, wasm) in drips.iter().enumerate() {
        let repository = format!("drip/m{i}");
        serve_dripping(
            &dripping,
            &repository,
            &["a", "b"],
            wasm,
            Duration::from_millis(100),
        );
    }
    let config = format!(
        "insecure_registries = [\"*\"]\nfetch_timeout = \"{}s\"\nmax_concurrent_downloads = 2\n",
        FETCH_TIMEOUT.as_secs()
    );
    let daemon = Daemon::start(&[], Some(&config));
    let warm = try_fetch(&daemon, &healthy[0].0).await;
    assert_eq!(warm.unwrap(), digest(&healthy[0].1), "{}", daemon.log());
    let idle = peak_rss_kib(daemon.pid());

    // Four fetches, abandoned: two at their gRPC deadline, two by clients that hang up.
    let abandoned: Vec<_> = (0..4)
        .map(|n| {
            let reference = format!("{}/drip/m{}:{}", dripping.addr(), n % 2, ["a", "b"][n / 2]);
            let socket = daemon.socket.clone();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(FetchRequest {
                    reference,
                    ..Default::default()
                });
                if n < 2 {
                    request.set_timeout(Duration::from_millis(500));
                }
                let mut client = wasmcache::client::connect(&socket).await.unwrap();
                client.fetch(request).await.map(|_| ())
            })
        })
        .collect();
    let drip_gets = || {
        drips
            .iter()
            .map(|wasm| dripping.count("GET", &digest(wasm)))
    };
    let dripping_both = crate::common::wait_until(Duration::from_secs(20), || {
        drip_gets().all(|gets| gets == 1)
    });
    // The downloads (one per layer) hold both permits from here on.
    let started = std::time::Instant::now();
    assert!(dripping_both, "{:?}\n{}", dripping.requests(), daemon.log());
    for task in &abandoned[2..] {
        task.abort();
    }
    let mut abandoned = abandoned.into_iter();
    for task in abandoned.by_ref().take(2) {
        let status = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the deadline ended the call")
            .unwrap()
            .unwrap_err();
        assert!(deadline_passed(&status), "{status:?}");
    }
    for task in abandoned {
        assert!(task.await.unwrap_err().is_cancelled());
    }

    // A fetch from the healthy registry now resolves, but its download waits for a permit:
    // its caller's deadline passes first, and the registry has not been asked for the blob.
    let (queued, queued_wasm) = &healthy[1];
    let status = fetch_within(&daemon, queued, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(deadline_passed(&status), "{status:?}");
    assert!(
        started.elapsed() < FETCH_TIMEOUT - Duration::from_millis(500),
        "too slow to tell a queued download from a free permit: {:?}",
        started.elapsed()
    );
    let queued_gets = || registry.count("GET", &digest(queued_wasm));
    assert_eq!(queued_gets(), 0, "the queued download ran");

    // At `fetch_timeout` the daemon hangs up on both drips, and the permits are free.
    let cut_off = crate::common::wait_until(FETCH_TIMEOUT + Duration::from_secs(10), || {
        dripping.cut_off() == 2
    });
    assert!(cut_off, "the drips were never cut off\n{}", daemon.log());
    let held = started.elapsed();
    assert!(held < FETCH_TIMEOUT + Duration::from_secs(5), "{held:?}");
    eprintln!("the drips were cut off {held:?} after both had started");

    // Two fetches at once take both permits and end well within `fetch_timeout`; the queued
    // download ran once a permit was free, and its module is stored.
    let since = std::time::Instant::now();
    let after = healthy[2..].iter().map(|(reference, wasm)| {
        let daemon = &daemon;
        async move {
            let answer = fetch_within(daemon, reference, FETCH_TIMEOUT * 3).await;
            assert_eq!(answer.unwrap(), digest(wasm), "{reference}");
        }
    });
    futures_util::future::join_all(after).await;
    assert!(since.elapsed() < FETCH_TIMEOUT, "{:?}", since.elapsed());
    let answer = fetch_within(&daemon, queued, FETCH_TIMEOUT * 3).await;
    assert_eq!(answer.unwrap(), digest(queued_wasm));
    assert_eq!(queued_gets(), 1);
    // Nothing asked for a drip again.
    assert!(drip_gets().all(|gets| gets == 1));
    assert_under_bound("drips", idle, peak_rss_kib(daemon.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_manifests_through_peers_are_cut_off_by_every_daemon() {
    // The registry, and a member of the cluster that is no daemon: both answer every manifest
    // with an endless body.
    let registry = FaultyServer::start();
    let hostile = FaultyServer::start();
    let port = free_port();
    let daemons: Vec<String> = (2..4).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let members: Vec<String> = daemons.iter().cloned().chain([hostile.addr()]).collect();
    // A warm-up tag the hostile member owns, then two tags owned by each member.
    let mut owned: Vec<Vec<String>> = vec![Vec::new(); members.len()];
    let mut warm = None;
    for n in 0..1_000 {
        let reference = format!("{}/r/huge:v{n}", registry.addr());
        let key = reference.parse::<Reference>().unwrap().to_string();
        let owner = rank(&members, &key)[0];
        let index = members.iter().position(|m| m == owner).unwrap();
        match (&warm, index) {
            (None, 2) => warm = Some(reference),
            _ if owned[index].len() < 2 => owned[index].push(reference),
            _ => {}
        }
        if warm.is_some() && owned.iter().all(|tags| tags.len() == 2) {
            break;
        }
    }
    let warm = warm.expect("a tag the hostile member owns");
    let references: Vec<String> = owned.concat();
    assert_eq!(references.len(), 6, "two tags for each member");
    let manifest_type = ("Content-Type".to_owned(), OCI_MANIFEST.to_owned());
    for reference in references.iter().chain([&warm]) {
        let (_, tag) = reference.rsplit_once(':').unwrap();
        for server in [&registry, &hostile] {
            server.route(
                &format!("/v2/r/huge/manifests/{tag}"),
                Behaviour::Endless {
                    status: 200,
                    headers: vec![manifest_type.clone()],
                },
            );
        }
    }
    let cluster: Vec<Daemon> = daemons
        .iter()
        .map(|own| {
            let mut args = vec!["--http-listen", own, "--peer-self", own];
            for member in &members {
                args.extend(["--peer", member]);
            }
            Daemon::start(&args, Some("insecure_registries = [\"*\"]\n"))
        })
        .collect();

    // The warm-up goes through every path (the hostile member, the registry, and at one of
    // the daemons the other daemon), so the idle figures include warmed-up clients.
    for daemon in &cluster {
        let warmed = try_fetch(daemon, &warm).await.unwrap_err();
        assert_eq!(warmed.code(), Code::ResourceExhausted, "{warmed:?}");
    }
    let idle: Vec<u64> = cluster.iter().map(|d| peak_rss_kib(d.pid())).collect();
    let (registry_gets, hostile_gets) = (
        registry.count("GET", "/manifests/"),
        hostile.count("GET", "/manifests/"),
    );

    // Every tag at every daemon at once.
    let fetches = cluster.iter().flat_map(|daemon| {
        references
            .iter()
            .map(move |reference| async move { (reference, try_fetch(daemon, reference).await) })
    });
    for (reference, answer) in futures_util::future::join_all(fetches).await {
        let status = answer.unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{reference}: {status:?}"
        );
        let refusal = format!("over the limit of {}", 4 << 20);
        assert!(status.message().contains(&refusal), "{status:?}");
    }

    // The hostile member was asked for each of its tags by both daemons, each daemon was
    // asked by the other for its own tags and failed them, and every daemon asked the
    // registry; every endless body was cut off.
    assert!(hostile.count("GET", "/manifests/") - hostile_gets >= 4);
    assert!(registry.count("GET", "/manifests/") - registry_gets >= 6);
    for address in &daemons {
        let asked = r#"wasmcache_peer_requests_total{role="server",result="failed"}"#;
        assert!(counter(address, asked) >= 2, "{address}");
        let refused = r#"wasmcache_peer_requests_total{role="client",result="refused_bytes"}"#;
        assert!(counter(address, refused) >= 3, "{address}");
    }
    let manifests_asked = |server: &FaultyServer| {
        let requests = server.requests();
        requests
            .iter()
            .filter(|r| r.path.contains("/manifests/"))
            .count()
    };
    let all_cut_off = crate::common::wait_until(Duration::from_secs(10), || {
        let asked = manifests_asked(&registry) + manifests_asked(&hostile);
        registry.cut_off() + hostile.cut_off() == asked
    });
    assert!(all_cut_off, "an endless body was still being read");
    for ((daemon, idle), address) in cluster.iter().zip(idle).zip(&daemons) {
        assert_under_bound(address, idle, peak_rss_kib(daemon.pid()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_tokens_for_many_repositories_stay_within_the_token_cache_bound() {
    const REPOSITORIES: usize = 1_500;
    const TOKEN_BYTES: usize = 60_000;
    // A token server handing out a 60 KB token for any scope: 90 MB of tokens in all.
    let issued = Arc::new(AtomicUsize::new(0));
    let realm = {
        let issued = issued.clone();
        Server::start(Arc::new(move |_request| {
            let serial = issued.fetch_add(1, Ordering::SeqCst);
            let mut token = format!("t{serial}-");
            token.extend(std::iter::repeat_n('x', TOKEN_BYTES - token.len()));
            let answer = serde_json::json!({"token": token, "expires_in": 3600});
            Behaviour::json(200, answer.to_string())
        }))
    };
    // A registry that asks for a token, and knows no repository.
    let authorized = Arc::new(AtomicUsize::new(0));
    let registry = {
        let authorized = authorized.clone();
        let challenge = format!(
            "Bearer realm=\"http://{}/token\",service=\"hostile\"",
            realm.addr
        );
        Server::start(Arc::new(move |request: FaultyRequest| {
            let bearer = request.header("authorization").unwrap_or_default();
            if bearer.len() < TOKEN_BYTES {
                let refused =
                    Behaviour::json(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.into());
                return refused.header("WWW-Authenticate", &challenge);
            }
            authorized.fetch_add(1, Ordering::SeqCst);
            let unknown = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#;
            Behaviour::json(404, unknown.into())
        }))
    };
    let reference = |n: usize| format!("{}/tok/r{n}:v1", registry.addr);
    let daemon = Daemon::start(&[], Some("insecure_registries = [\"*\"]\n"));
    let unknown = |answer: Result<String, tonic::Status>| {
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    };
    unknown(try_fetch(&daemon, &reference(REPOSITORIES)).await);
    let (idle_peak, idle_now) = (peak_rss_kib(daemon.pid()), rss_kib(daemon.pid()));

    // One token per repository, sixteen fetches at a time.
    let fetches = futures_util::stream::iter(0..REPOSITORIES).map(|n| {
        let (daemon, reference) = (&daemon, reference(n));
        async move { try_fetch(daemon, &reference).await }
    });
    let answers: Vec<_> = fetches.buffer_unordered(16).collect().await;
    answers.into_iter().for_each(unknown);
    assert_eq!(issued.load(Ordering::SeqCst), REPOSITORIES + 1);
    assert_eq!(authorized.load(Ordering::SeqCst), REPOSITORIES + 1);
    assert_under_bound("tokens (peak)", idle_peak, peak_rss_kib(daemon.pid()));
    assert_under_bound("tokens (after)", idle_now, rss_kib(daemon.pid()));

    // The cache kept the last tokens and let the first go: the registry is asked again
    // for both, the token server only for the first.
    unknown(try_fetch(&daemon, &reference(REPOSITORIES - 1)).await);
    assert_eq!(issued.load(Ordering::SeqCst), REPOSITORIES + 1);
    unknown(try_fetch(&daemon, &reference(0)).await);
    assert_eq!(issued.load(Ordering::SeqCst), REPOSITORIES + 2);
    assert_eq!(authorized.load(Ordering::SeqCst), REPOSITORIES + 3);
}

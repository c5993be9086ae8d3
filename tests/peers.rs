//! Peers: real daemons on their own loopback addresses (127.0.0.2, 127.0.0.3, …, one port),
//! each listing all of them, against one real registry. A rollout costs the registry one
//! manifest GET and one blob GET; a dead owner is skipped; a peer's bad bytes are refused; a
//! peer's request is never passed on.

use std::time::Duration;

use futures_util::future::join_all;
use wasmcache::api::proto::{FetchRequest, FetchResponse};
use wasmcache::peers::rank;
use wasmcache::reference::Reference;

use crate::common::http::counter;
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{free_port, Behaviour, Daemon, Endpoint, Registry};

/// Longest any single call in these tests may take before the test fails instead of hanging.
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// Daemons fetching through each other.
struct Cluster {
    daemons: Vec<Daemon>,
    /// Their peer (HTTP listener) addresses, in the same order.
    addresses: Vec<String>,
}

impl Cluster {
    /// `n` daemons on 127.0.0.2, 127.0.0.3, …, each listing all of them and `more` as peers.
    fn start(registry: &Registry, n: usize, more: &[String], config: Option<&str>) -> Cluster {
        let port = free_port();
        let addresses: Vec<String> = (0..n)
            .map(|i| format!("127.0.0.{}:{port}", i + 2))
            .collect();
        let daemons = addresses
            .iter()
            .map(|own| {
                let mut args = vec![
                    "--insecure-registry".to_owned(),
                    registry.addr(),
                    "--http-listen".to_owned(),
                    own.clone(),
                    "--peer-self".to_owned(),
                    own.clone(),
                ];
                for peer in addresses.iter().chain(more) {
                    args.extend(["--peer".to_owned(), peer.clone()]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Daemon::start(&args, config)
            })
            .collect();
        Cluster { daemons, addresses }
    }

    /// Every member's address, as the daemons list them.
    fn members(&self, more: &[String]) -> Vec<String> {
        self.addresses.iter().chain(more).cloned().collect()
    }
}

/// The owner of `key` among `members`.
fn owner(members: &[String], key: &str) -> String {
    rank(members, key)[0].clone()
}

async fn fetch(daemon: &Daemon, reference: &str) -> FetchResponse {
    let mut client = daemon.client().await;
    let request = FetchRequest {
        reference: reference.to_owned(),
        ..Default::default()
    };
    tokio::time::timeout(CALL_LIMIT, client.fetch(request))
        .await
        .unwrap_or_else(|_| panic!("{reference}: no answer within {CALL_LIMIT:?}"))
        .unwrap_or_else(|status| panic!("{reference}: {status:?}\n{}", daemon.log()))
        .into_inner()
}

/// Checks that `answer` is `wasm`, and that the file it names holds exactly those bytes.
fn check_answer(answer: &FetchResponse, wasm: &[u8]) {
    assert_eq!(answer.digest, digest(wasm));
    let stored = std::fs::read(&answer.path).expect("reading the module file");
    assert_eq!(sha256_hex(&stored), sha256_hex(wasm), "{}", answer.path);
}

/// Every blob file of `daemon` hashes to its name: nothing bad was stored.
fn check_blobs(daemon: &Daemon) {
    for path in daemon.files("blobs/sha256") {
        let bytes = std::fs::read(&path).expect("reading a blob");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "a blob whose bytes are not its name"
        );
    }
}

/// A module (seeded from `seed`) whose reference key and layer digest satisfy `wanted`,
/// found in a bounded number of tries.
fn module_where(
    registry: &Registry,
    repo: &str,
    wanted: impl Fn(&str, &str) -> bool,
) -> (String, Vec<u8>) {
    for seed in 0..200u64 {
        let wasm = module(4096, 7_000 + seed);
        let reference = format!("{}/{repo}:s{seed}", registry.addr());
        let key = reference
            .parse::<Reference>()
            .expect("reference")
            .to_string();
        if wanted(&key, &digest(&wasm)) {
            return (reference, wasm);
        }
    }
    panic!("no module among 200 seeds has the wanted owners");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_costs_the_registry_one_manifest_and_one_blob() {
    let registry = Registry::start();
    let cluster = Cluster::start(&registry, 4, &[], None);
    let wasm = module(256 << 10, 91);
    crate::common::fixtures::oras_push_cncf(&registry, "peers/storm:v1", &wasm);
    let reference = format!("{}/peers/storm:v1", registry.addr());
    let (manifests, blobs) = (
        registry.manifest_gets(Some("peers/storm")),
        registry.blob_gets(Some("peers/storm")),
    );

    let reference = reference.as_str();
    let calls = cluster
        .daemons
        .iter()
        .flat_map(|daemon| (0..50).map(move |_| fetch(daemon, reference)));
    let answers = join_all(calls).await;
    assert_eq!(answers.len(), 200);
    for answer in &answers {
        check_answer(answer, &wasm);
    }
    assert_eq!(
        registry.manifest_gets(Some("peers/storm")) - manifests,
        1,
        "manifest GETs at the registry"
    );
    assert_eq!(
        registry.blob_gets(Some("peers/storm")) - blobs,
        1,
        "blob GETs at the registry"
    );
    // Every node holds the module itself, and the others got it from its owners.
    for daemon in &cluster.daemons {
        let path = daemon.data_dir.join("blobs/sha256").join(sha256_hex(&wasm));
        assert_eq!(
            std::fs::read(&path).expect("each node stores the module"),
            wasm
        );
    }
    let asked: u64 = cluster
        .addresses
        .iter()
        .map(|address| {
            counter(
                address,
                "wasmcache_peer_requests_total{role=\"server\",result=\"served\"}",
            )
        })
        .sum();
    assert!(asked >= 2, "peers answered {asked} requests");
    for address in &cluster.addresses {
        assert_eq!(counter(address, "wasmcache_peers_known"), 3, "{address}");
        assert_eq!(counter(address, "wasmcache_peers_up"), 3, "{address}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_owner_is_skipped() {
    let registry = Registry::start();
    let mut cluster = Cluster::start(&registry, 4, &[], None);
    let members = cluster.members(&[]);
    // The same node owns the reference and the layer, and is killed first.
    let (reference, wasm) = module_where(&registry, "peers/dead", |key, layer| {
        owner(&members, key) == owner(&members, layer)
    });
    let repo = reference
        .split_once('/')
        .unwrap()
        .1
        .split_once(':')
        .unwrap()
        .0
        .to_owned();
    let tag = reference.rsplit_once(':').unwrap().1;
    crate::common::fixtures::oras_push_cncf(&registry, &format!("{repo}:{tag}"), &wasm);
    let key = reference.parse::<Reference>().unwrap().to_string();
    let dead = cluster
        .addresses
        .iter()
        .position(|address| *address == owner(&members, &key))
        .unwrap();
    cluster.daemons[dead].kill9();
    let blobs = registry.blob_gets(Some(&repo));

    let alive = (0..cluster.daemons.len()).filter(|i| *i != dead);
    let calls = alive.map(|i| fetch(&cluster.daemons[i], &reference));
    for answer in join_all(calls).await {
        check_answer(&answer, &wasm);
    }
    assert!(
        registry.blob_gets(Some(&repo)) - blobs <= 1,
        "blob GETs at the registry: {}",
        registry.blob_gets(Some(&repo)) - blobs
    );
    let skipped: u64 = (0..cluster.daemons.len())
        .filter(|i| *i != dead)
        .map(|i| {
            counter(
                &cluster.addresses[i],
                "wasmcache_peer_requests_total{role=\"client\",result=\"unreachable\"}",
            )
        })
        .sum();
    assert!(skipped >= 1, "no daemon counted the dead peer");
    // A refused connection is skipped at once, not after the first-byte timeout.
    for i in (0..cluster.daemons.len()).filter(|i| *i != dead) {
        let series = "wasmcache_peer_requests_total{role=\"client\",result=\"timed_out\"}";
        assert_eq!(counter(&cluster.addresses[i], series), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peers_bad_bytes_are_refused_and_fetched_from_the_registry() {
    let registry = Registry::start();
    // A "peer" that answers every blob with other bytes of the right length, and refuses
    // manifests.
    let liar = crate::common::faulty::Server::start(std::sync::Arc::new(|request| {
        if request.path.contains("/blobs/") {
            let size = request
                .header("x-wasmcache-blob-size")
                .and_then(|size| size.parse().ok())
                .unwrap_or(16);
            Behaviour::ok(vec![0x5a; size])
        } else {
            Behaviour::json(404, r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#.into())
        }
    }));
    let liar_address = liar.addr.to_string();
    let more = [liar_address.clone()];
    let cluster = Cluster::start(&registry, 2, &more, None);
    let members = cluster.members(&more);
    // The liar owns the layer, so every daemon asks it first.
    let (reference, wasm) = module_where(&registry, "peers/liar", |_, layer| {
        owner(&members, layer) == liar_address
    });
    let (repo_tag, repo) = {
        let path = reference.split_once('/').unwrap().1;
        (path.to_owned(), path.split_once(':').unwrap().0.to_owned())
    };
    crate::common::fixtures::oras_push_cncf(&registry, &repo_tag, &wasm);
    let blobs = registry.blob_gets(Some(&repo));

    let answers = join_all(cluster.daemons.iter().map(|d| fetch(d, &reference))).await;
    for answer in &answers {
        check_answer(answer, &wasm);
    }
    assert!(registry.blob_gets(Some(&repo)) - blobs >= 1);
    let refused: u64 = cluster
        .addresses
        .iter()
        .map(|address| {
            counter(
                address,
                "wasmcache_peer_requests_total{role=\"client\",result=\"refused_bytes\"}",
            )
        })
        .sum();
    assert!(refused >= 1, "no daemon refused the liar's bytes");
    for daemon in &cluster.daemons {
        check_blobs(daemon);
        assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_request_is_never_forwarded_and_needs_the_token() {
    let registry = Registry::start();
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "s3cret-peer-token\n").unwrap();
    let config = format!("[peers]\ntoken_file = {:?}\n", token_file.to_str().unwrap());
    let cluster = Cluster::start(&registry, 2, &[], Some(&config));
    let members = cluster.members(&[]);
    // The second daemon owns both the reference and the layer; the first is asked.
    let (reference, wasm) = module_where(&registry, "peers/nofwd", |key, layer| {
        owner(&members, key) == members[1] && owner(&members, layer) == members[1]
    });
    let path = reference.split_once('/').unwrap().1.to_owned();
    let (repo, tag) = path.split_once(':').unwrap();
    let pushed = crate::common::fixtures::oras_push_cncf(&registry, &path, &wasm);
    let asked = Endpoint::plain(cluster.addresses[0].clone());
    let ns = registry.addr();
    let manifest_path = format!("/v2/{repo}/manifests/{tag}?ns={ns}");
    let blob_path = format!("/v2/{repo}/blobs/{}?ns={ns}", digest(&wasm));
    let size = wasm.len().to_string();
    let (manifests, blobs) = (
        registry.manifest_gets(Some(repo)),
        registry.blob_gets(Some(repo)),
    );

    // Without the token, or with another one: refused.
    let refused = asked.get(&manifest_path, &[("X-Wasmcache-Peer", "1")]);
    assert_eq!(refused.status, 401, "{}", refused.text());
    let peer = [
        ("X-Wasmcache-Peer", "1"),
        ("X-Wasmcache-Peer-Token", "wrong"),
    ];
    assert_eq!(asked.get(&manifest_path, &peer).status, 401);

    let peer = [
        ("X-Wasmcache-Peer", "1"),
        ("X-Wasmcache-Peer-Token", "s3cret-peer-token"),
        ("X-Wasmcache-Blob-Size", size.as_str()),
    ];
    let manifest = asked.get(&manifest_path, &peer);
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    assert_eq!(manifest.body, pushed.bytes);
    assert_eq!(
        manifest.header("docker-content-digest"),
        Some(pushed.digest.as_str())
    );
    let blob = asked.get(&blob_path, &peer);
    assert_eq!(blob.status, 200, "{}", blob.text());
    assert_eq!(blob.body, wasm);
    // The first daemon fetched both itself: the owner was never asked.
    let owner_served = counter(
        &cluster.addresses[1],
        "wasmcache_peer_requests_total{role=\"server\",result=\"served\"}",
    );
    assert_eq!(owner_served, 0, "a peer request was passed on");
    assert_eq!(registry.manifest_gets(Some(repo)) - manifests, 1);
    assert_eq!(registry.blob_gets(Some(repo)) - blobs, 1);

    // An ordinary fetch on the first daemon now goes through the owner, with the token.
    check_answer(&fetch(&cluster.daemons[0], &reference).await, &wasm);
    let owner_served = counter(
        &cluster.addresses[1],
        "wasmcache_peer_requests_total{role=\"server\",result=\"served\"}",
    );
    assert!(owner_served >= 1, "the owner was not asked");
    assert_eq!(
        registry.manifest_gets(Some(repo)) - manifests,
        2,
        "the owner resolved the tag"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_peers_a_peer_request_is_refused_and_fetches_work_as_before() {
    let registry = Registry::start();
    let address = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(
        &[
            "--insecure-registry",
            &registry.addr(),
            "--http-listen",
            &address,
        ],
        None,
    );
    let wasm = module(1024, 93);
    crate::common::fixtures::oras_push_cncf(&registry, "peers/off:v1", &wasm);
    let (manifests, blobs) = (
        registry.manifest_gets(Some("peers/off")),
        registry.blob_gets(Some("peers/off")),
    );
    let path = format!("/v2/peers/off/manifests/v1?ns={}", registry.addr());
    let refused = Endpoint::plain(address.clone()).get(&path, &[("X-Wasmcache-Peer", "1")]);
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("no peers configured"),
        "{}",
        refused.text()
    );
    check_answer(
        &fetch(&daemon, &format!("{}/peers/off:v1", registry.addr())).await,
        &wasm,
    );
    assert_eq!(registry.manifest_gets(Some("peers/off")) - manifests, 1);
    assert_eq!(registry.blob_gets(Some("peers/off")) - blobs, 1);
}

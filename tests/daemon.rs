//! `wasmcache serve` as a process: gRPC over its unix socket against a real registry.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::{FetchRequest, FetchResponse, PullPolicy, RemoveRequest, StatRequest};

use crate::common::cli::{run_err, run_ok};
use crate::common::fixtures::{oras_push_cncf, push_raw, skopeo_push_image, tar_layer};
use crate::common::wasm::{digest, module};
use crate::common::{
    run_checked, venv_python, Behaviour, Daemon, FaultyServer, ImageFormat, Registry,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn request(reference: &str, policy: PullPolicy) -> FetchRequest {
    FetchRequest {
        reference: reference.to_owned(),
        pull_policy: policy.into(),

        ..Default::default()
    }
}

async fn fetch(
    daemon: &Daemon,
    reference: &str,
    policy: PullPolicy,
) -> Result<FetchResponse, tonic::Status> {
    daemon
        .client()
        .await
        .fetch(request(reference, policy))
        .await
        .map(tonic::Response::into_inner)
}

async fn fetch_err(daemon: &Daemon, reference: &str, policy: PullPolicy) -> tonic::Status {
    match fetch(daemon, reference, policy).await {
        Ok(response) => panic!("fetching {reference} succeeded: {response:?}"),
        Err(status) => status,
    }
}

fn insecure(addr: &str) -> Vec<String> {
    vec!["--insecure-registry".into(), addr.into()]
}

fn start(registry_addrs: &[&str], config: Option<&str>) -> Daemon {
    let args: Vec<String> = registry_addrs.iter().flat_map(|a| insecure(a)).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&args, config)
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_returns_the_verified_path_and_digests() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(10_000, 1);
    let pushed = oras_push_cncf(&registry, "d/f:v1", &wasm);
    let daemon = start(&[&addr], None);
    // The fixture read its manifest back once; count from here.
    let base = registry.manifest_gets(Some("d/f"));

    let first = fetch(
        &daemon,
        &format!("oci://{addr}/d/f:v1"),
        PullPolicy::Unspecified,
    )
    .await
    .unwrap();
    assert_eq!(first.digest, digest(&wasm));
    assert_eq!(first.manifest_digest, pushed.digest);
    assert_eq!(first.size, wasm.len() as u64);
    assert_eq!(first.format, "cncf-wasm");
    assert!(!first.cache_hit && !first.stale);
    assert_eq!(std::fs::read(&first.path).unwrap(), wasm);
    assert!(first.path.starts_with(daemon.data_dir.to_str().unwrap()));

    let second = fetch(&daemon, &format!("{addr}/d/f:v1"), PullPolicy::IfNotPresent)
        .await
        .unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.path, first.path);
    assert_eq!(
        registry.manifest_gets(Some("d/f")),
        base + 1,
        "answered within tag_ttl"
    );

    let stat = daemon
        .client()
        .await
        .stat(StatRequest {
            target: digest(&wasm),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.entries.len(), 1);
    assert_eq!(stat.entries[0].reference, format!("{addr}/d/f:v1"));

    // The CLI client subcommands speak to the same daemon; `ls` and `rm` go through it because
    // the daemon holds the data dir.
    let out = run_ok(
        daemon
            .command("fetch")
            .arg("--json")
            .arg(format!("{addr}/d/f:v1")),
    );
    let fetched: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fetched["path"], first.path);
    assert_eq!(fetched["cache_hit"], true);
    let listed = run_ok(daemon.command("ls").arg("--json"));
    assert!(listed.contains(&first.path), "{listed}");
    let out = run_ok(daemon.command("rm").arg(format!("{addr}/d/f:v1")));
    assert!(
        out.contains(&format!("deleted: {}", digest(&wasm))),
        "{out}"
    );
    assert!(daemon.files("blobs/sha256").is_empty());
    let status = fetch_err(&daemon, &format!("{addr}/d/f:v1"), PullPolicy::Never).await;
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_failure_has_its_status_code_and_names_the_reference() {
    let registry = Registry::start();
    let addr = registry.addr();
    let private = Registry::builder().basic_auth("alice", "pw").start();
    oras_push_cncf(&private, "p/f:v1", &module(0, 0));
    oras_push_cncf(&registry, "big/f:v1", &module(100_000, 2));
    skopeo_push_image(
        &registry,
        "img/empty:v1",
        vec![tar_layer(&[("README", b"no wasm here")], true)],
        "application/vnd.oci.image.layer.v1.tar+gzip",
        ImageFormat::Oci,
    );
    let text = b"text".to_vec();
    let config = b"{}".to_vec();
    let odd = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/x-config", "digest": digest(&config), "size": 2},
        "layers": [{"mediaType": "text/plain", "digest": digest(&text), "size": 4}],
    });
    push_raw(
        &registry,
        "odd/f",
        "v1",
        odd.to_string().as_bytes(),
        OCI_MANIFEST,
        vec![config, text],
    );

    let good = module(1000, 3);
    let mut evil = good.clone();
    evil[100] ^= 1;
    let wasm_config = br#"{"os":"wasip1","architecture":"wasm"}"#.to_vec();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                   "digest": digest(&wasm_config), "size": wasm_config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": digest(&good), "size": good.len()}],
    });
    let faulty = FaultyServer::serve_image(
        "evil/f",
        "v1",
        manifest.to_string().as_bytes(),
        OCI_MANIFEST,
        vec![(digest(&good), Behaviour::blob(evil))],
    );
    faulty.route("/v2/denied/f/manifests/v1", Behaviour::Status(403));
    faulty.route("/v2/down/f/manifests/v1", Behaviour::Status(503));

    let paddr = private.addr();
    let faddr = faulty.addr();
    let daemon = start(
        &[&addr, &paddr, &faddr],
        Some("[limits]\nmax_module_bytes = 65536\n"),
    );
    let cases = [
        (
            "ghcr.io/Bad/ref",
            PullPolicy::IfNotPresent,
            Code::InvalidArgument,
            "invalid reference",
        ),
        (
            &format!("{addr}/nope/f:v1"),
            PullPolicy::IfNotPresent,
            Code::NotFound,
            "not found",
        ),
        (
            &format!("{addr}/big/f:v9"),
            PullPolicy::Never,
            Code::NotFound,
            "pull policy is NEVER",
        ),
        (
            &format!("{paddr}/p/f:v1"),
            PullPolicy::Always,
            Code::Unauthenticated,
            "authentication required",
        ),
        (
            &format!("{faddr}/denied/f:v1"),
            PullPolicy::Always,
            Code::PermissionDenied,
            "denied",
        ),
        (
            &format!("{faddr}/evil/f:v1"),
            PullPolicy::Always,
            Code::DataLoss,
            "content hashed to",
        ),
        (
            &format!("{faddr}/down/f:v1"),
            PullPolicy::Always,
            Code::Unavailable,
            "returned 503",
        ),
        (
            &format!("{addr}/img/empty:v1"),
            PullPolicy::Always,
            Code::FailedPrecondition,
            "no plugin.wasm",
        ),
        (
            &format!("{addr}/odd/f:v1"),
            PullPolicy::Always,
            Code::FailedPrecondition,
            "unsupported media type",
        ),
        (
            &format!("{addr}/big/f:v1"),
            PullPolicy::Always,
            Code::ResourceExhausted,
            "over the limit of 65536",
        ),
        (
            "127.0.0.1:1/closed/f:v1",
            PullPolicy::Always,
            Code::Unavailable,
            "unreachable",
        ),
    ];
    for (reference, policy, code, text) in cases {
        let status = fetch_err(&daemon, reference, policy).await;
        assert_eq!(status.code(), code, "{reference}: {status:?}");
        assert!(
            status.message().contains(text),
            "{reference}: {}",
            status.message()
        );
        let named = reference
            .trim_start_matches("oci://")
            .replace("ghcr.io/Bad/ref", "'ghcr.io/Bad/ref'");
        assert!(
            status.message().contains(&named),
            "{reference}: {}",
            status.message()
        );
    }
    assert!(daemon.files("blobs/sha256").is_empty());
    assert!(daemon.files("ingest").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_fetches_cause_one_manifest_and_one_blob_get() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(32 << 20, 4);
    oras_push_cncf(&registry, "hot/f:v1", &wasm);
    let daemon = start(&[&addr], None);
    let base = registry.manifest_gets(Some("hot/f"));
    let reference = format!("{addr}/hot/f:v1");

    // Several connections, each multiplexing many streams, all sent at once.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(daemon.client().await);
    }
    let calls = (0..1000).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let request = request(&reference, PullPolicy::IfNotPresent);
        tokio::spawn(async move { client.fetch(request).await.map(tonic::Response::into_inner) })
    });
    let responses = futures_util::future::join_all(calls).await;
    let mut downloaded = 0;
    for response in responses {
        let response = response.unwrap().unwrap();
        assert_eq!(response.digest, digest(&wasm));
        downloaded += usize::from(!response.cache_hit);
    }
    assert_eq!(registry.manifest_gets(Some("hot/f")), base + 1);
    assert_eq!(registry.blob_gets(Some("hot/f")), 1);
    // Callers that joined the download in flight report it as theirs.
    assert!(
        downloaded > 1,
        "only {downloaded} calls joined the download"
    );
    assert_eq!(daemon.files("blobs/sha256").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_policies_and_tag_ttl() {
    let registry = Registry::start();
    let addr = registry.addr();
    let v1 = module(100, 5);
    let v2 = module(100, 6);
    oras_push_cncf(&registry, "pol/f:latest", &v1);
    let daemon = start(&[&addr], Some("tag_ttl = \"2s\"\n"));
    let reference = format!("{addr}/pol/f");
    let base = registry.manifest_gets(Some("pol/f"));

    let first = fetch(&daemon, &reference, PullPolicy::IfNotPresent)
        .await
        .unwrap();
    assert_eq!(first.digest, digest(&v1));
    // ALWAYS re-resolves, but an unchanged digest downloads nothing.
    let again = fetch(&daemon, &reference, PullPolicy::Always)
        .await
        .unwrap();
    assert!(again.cache_hit);
    assert_eq!(registry.manifest_gets(Some("pol/f")), base + 2);
    assert_eq!(registry.blob_gets(Some("pol/f")), 1);

    // The tag moves; within tag_ttl IF_NOT_PRESENT and NEVER keep the old module.
    oras_push_cncf(&registry, "pol/f:latest", &v2);
    let base = registry.manifest_gets(Some("pol/f"));
    let cached = fetch(&daemon, &reference, PullPolicy::IfNotPresent)
        .await
        .unwrap();
    assert_eq!(cached.digest, digest(&v1));
    let never = fetch(&daemon, &reference, PullPolicy::Never).await.unwrap();
    assert_eq!(never.digest, digest(&v1));
    assert_eq!(registry.manifest_gets(Some("pol/f")), base);
    // ALWAYS sees the move now.
    let moved = fetch(&daemon, &reference, PullPolicy::Always)
        .await
        .unwrap();
    assert_eq!(moved.digest, digest(&v2));
    assert!(!moved.cache_hit);
    // Warm hits are answered from memory; the move must show there too.
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let warm = fetch(&daemon, &reference, policy).await.unwrap();
        assert_eq!(warm.digest, digest(&v2), "{policy:?} after the move");
    }

    // After tag_ttl, IF_NOT_PRESENT re-resolves by itself.
    oras_push_cncf(&registry, "pol/f:latest", &v1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = fetch(&daemon, &reference, PullPolicy::IfNotPresent)
        .await
        .unwrap();
    assert_eq!(expired.digest, digest(&v1));
    assert!(expired.cache_hit, "v1 is still stored");
    // A digest reference never goes to the registry.
    let before = registry.manifest_gets(Some("pol/f"));
    let by_digest = format!("{addr}/pol/f@{}", expired.manifest_digest);
    let pinned = fetch(&daemon, &by_digest, PullPolicy::Always)
        .await
        .unwrap();
    assert_eq!(pinned.digest, digest(&v1));
    assert_eq!(registry.manifest_gets(Some("pol/f")), before);

    // A blob deleted behind the daemon's back is noticed on the next hit and fetched again.
    for _ in 0..3 {
        fetch(&daemon, &by_digest, PullPolicy::IfNotPresent)
            .await
            .unwrap();
    }
    std::fs::remove_file(&pinned.path).unwrap();
    let refetched = fetch(&daemon, &by_digest, PullPolicy::IfNotPresent)
        .await
        .unwrap();
    assert!(!refetched.cache_hit, "{refetched:?}");
    assert_eq!(std::fs::read(&refetched.path).unwrap(), v1);

    // A removed reference is forgotten at once, however often it was answered before.
    for _ in 0..3 {
        fetch(&daemon, &reference, PullPolicy::Never).await.unwrap();
    }
    daemon
        .client()
        .await
        .remove(RemoveRequest {
            target: reference.clone(),
        })
        .await
        .unwrap();
    let gone = fetch_err(&daemon, &reference, PullPolicy::Never).await;
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_outage_serves_stale_tags_and_cached_digests() {
    let mut registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(100, 7);
    let pushed = oras_push_cncf(&registry, "out/f:v1", &wasm);
    oras_push_cncf(&registry, "out/other:v1", &module(100, 8));
    let daemon = start(&[&addr], Some("tag_ttl = \"1s\"\n"));
    fetch(
        &daemon,
        &format!("{addr}/out/f:v1"),
        PullPolicy::IfNotPresent,
    )
    .await
    .unwrap();

    registry.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Always] {
        let stale = fetch(&daemon, &format!("{addr}/out/f:v1"), policy)
            .await
            .unwrap();
        assert!(stale.stale, "{policy:?}: {stale:?}");
        assert_eq!(stale.digest, digest(&wasm));
    }
    let by_digest = fetch(
        &daemon,
        &format!("{addr}/out/f@{}", pushed.digest),
        PullPolicy::Always,
    )
    .await
    .unwrap();
    assert!(!by_digest.stale && by_digest.cache_hit);
    let status = fetch_err(
        &daemon,
        &format!("{addr}/out/other:v1"),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(daemon.log().contains("serving the last known module"));

    // Back up: the next resolution is fresh again.
    registry.restart();
    let fresh = fetch(&daemon, &format!("{addr}/out/f:v1"), PullPolicy::Always)
        .await
        .unwrap();
    assert!(!fresh.stale);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_the_cache_and_sigterm_drains_cleanly() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(100, 9);
    oras_push_cncf(&registry, "rs/f:v1", &wasm);

    // A download that stalls half-way, so SIGTERM arrives while it is in flight.
    let slow = module(200_000, 10);
    let config = br#"{"os":"wasip1","architecture":"wasm"}"#.to_vec();
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": digest(&slow), "size": slow.len()}],
    });
    let faulty = FaultyServer::serve_image(
        "slow/f",
        "v1",
        manifest.to_string().as_bytes(),
        OCI_MANIFEST,
        vec![(digest(&slow), Behaviour::stall(slow.clone(), 100_000))],
    );
    let faddr = faulty.addr();
    let mut daemon = start(&[&addr, &faddr], Some("shutdown_grace = \"1s\"\n"));
    let kept = fetch(
        &daemon,
        &format!("{addr}/rs/f:v1"),
        PullPolicy::IfNotPresent,
    )
    .await
    .unwrap();

    let mut client = daemon.client().await;
    let in_flight = tokio::spawn(async move {
        client
            .fetch(request(
                &format!("{faddr}/slow/f:v1"),
                PullPolicy::IfNotPresent,
            ))
            .await
    });
    let blob_path = format!("/v2/slow/f/blobs/{}", digest(&slow));
    assert!(
        crate::common::wait_until(Duration::from_secs(10), || faulty.count("GET", &blob_path)
            == 1),
        "the stalled download never started"
    );
    let status = daemon.signal_and_wait("TERM", Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}\n{}", daemon.log());
    assert!(in_flight.await.unwrap().is_err());
    assert!(!daemon.socket.exists(), "socket removed on shutdown");
    assert_eq!(
        daemon.files("blobs/sha256").len(),
        1,
        "only the finished module"
    );

    daemon.restart();
    assert!(daemon.files("ingest").is_empty());
    let again = fetch(&daemon, &format!("{addr}/rs/f:v1"), PullPolicy::Never)
        .await
        .unwrap_or_else(|status| panic!("{status:?}\n{}", daemon.log()));
    assert_eq!(again.path, kept.path);
    assert_eq!(std::fs::read(&again.path).unwrap(), wasm);
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_mode_lock_and_stale_socket() {
    let mut daemon = Daemon::start(&[], Some("socket_mode = \"0600\"\nsocket_group = 4321\n"));
    let metadata = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&metadata), 4321);

    // A second daemon on the same data dir is refused, and the first keeps serving.
    let (code, error) = run_err(&mut daemon.command("serve"));
    assert_eq!(code, 1);
    assert!(
        error.contains("is in use by another wasmcache process"),
        "{error}"
    );
    daemon.client().await;

    // kill -9 leaves the socket file behind; the next start replaces it.
    daemon.signal_and_wait("KILL", Duration::from_secs(5));
    assert!(daemon.socket.exists());
    daemon.restart();
    daemon.client().await;

    let default = Daemon::start(&[], None);
    let metadata = std::fs::metadata(&default.socket).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    // SAFETY: getegid has no preconditions.
    let own_group = unsafe { libc::getegid() };
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&metadata), own_group);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_work_for_a_third_party_client() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(100, 11);
    oras_push_cncf(&registry, "py/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);

    // Python grpcio knows nothing of our proto: it discovers the service by reflection.
    let script = r#"
import json, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf import message_factory, json_format

# A stock channel with its defaults: grpc-core sends the socket path as :authority.
channel = grpc.insecure_channel("unix:" + sys.argv[1])
health = health_pb2_grpc.HealthStub(channel)
overall = health.Check(health_pb2.HealthCheckRequest(service="")).status
service = health.Check(health_pb2.HealthCheckRequest(service="wasmcache.v1.WasmCache")).status
database = ProtoReflectionDescriptorDatabase(channel)
services = sorted(database.get_services())
pool = DescriptorPool(database)
method = pool.FindServiceByName("wasmcache.v1.WasmCache").FindMethodByName("Fetch")
Request = message_factory.GetMessageClass(method.input_type)
Response = message_factory.GetMessageClass(method.output_type)
fetch = channel.unary_unary("/wasmcache.v1.WasmCache/Fetch",
    request_serializer=Request.SerializeToString, response_deserializer=Response.FromString)
reply = fetch(Request(reference=sys.argv[2]))
# Warm hits: the daemon keeps an answer from a reference's second warm hit on; answers from
# it must not differ from the first.
warm = [fetch(Request(reference=sys.argv[2])) for _ in range(4)]
def code_of(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return error.code().name
bad = code_of(lambda: fetch(Request(reference="Not/A/Valid/Ref")))
unknown = code_of(lambda: channel.unary_unary("/wasmcache.v1.WasmCache/NoSuchMethod")(b""))
print(json.dumps({"overall": overall, "service": service, "services": services,
                  "reply": json_format.MessageToDict(reply, preserving_proto_field_name=True),
                  "warm": [json_format.MessageToDict(w, preserving_proto_field_name=True) for w in warm],
                  "warm_bytes": sorted(set(w.SerializeToString().hex() for w in warm)),
                  "bad": bad, "unknown": unknown}))
"#;
    let output = run_checked(
        std::process::Command::new(venv_python())
            .arg("-c")
            .arg(script)
            .arg(&daemon.socket)
            .arg(format!("{addr}/py/f:v1")),
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["overall"], 1, "SERVING: {result}");
    assert_eq!(result["service"], 1, "SERVING: {result}");
    let services = result["services"].to_string();
    assert!(services.contains("wasmcache.v1.WasmCache"), "{services}");
    assert!(services.contains("grpc.health.v1.Health"), "{services}");
    assert_eq!(result["reply"]["digest"], digest(&wasm));
    assert_eq!(result["reply"]["format"], "cncf-wasm");
    assert_eq!(result["bad"], "INVALID_ARGUMENT");
    assert_eq!(result["unknown"], "UNIMPLEMENTED");
    for warm in result["warm"].as_array().unwrap() {
        assert_eq!(warm["cache_hit"], true, "{result}");
        assert_eq!(warm["digest"], digest(&wasm), "{result}");
        assert_eq!(warm["path"], result["reply"]["path"], "{result}");
    }
    assert_eq!(
        result["warm_bytes"].as_array().unwrap().len(),
        1,
        "warm answers differ: {result}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn read_module_streams_the_verified_bytes_in_chunks() {
    let registry = Registry::start();
    let addr = registry.addr();
    // Over two 1 MiB chunks, so the stream has three.
    let wasm = module(2_500_000, 12);
    oras_push_cncf(&registry, "rm/big:v1", &wasm);
    let daemon = start(&[&addr], None);
    let fetched = fetch(
        &daemon,
        &format!("{addr}/rm/big:v1"),
        PullPolicy::IfNotPresent,
    )
    .await
    .unwrap();

    let read = |digest: String| {
        let socket = daemon.socket.clone();
        async move {
            wasmcache::client::connect(&socket)
                .await
                .unwrap()
                .read_module(wasmcache::api::proto::ReadModuleRequest { digest })
                .await
        }
    };
    let mut stream = read(fetched.digest.clone()).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset, bytes.len() as u64);
        assert!(!chunk.data.is_empty());
        bytes.extend_from_slice(&chunk.data);
        chunks += 1;
    }
    assert_eq!(chunks, 3);
    assert_eq!(bytes, wasm);

    let missing = format!("sha256:{}", "ab".repeat(32));
    let status = read(missing.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains(&missing), "{status:?}");
    let status = read("sha256:xyz".into()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

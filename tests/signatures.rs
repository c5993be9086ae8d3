//! Signed modules: cosign signatures made inside the test (a P-256 key from `openssl`, the
//! payload and the `sha256-<hex>.sig` manifest built as cosign builds them, pushed to a real
//! registry), checked by the daemon before a module is stored or served.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::FetchRequest;

use crate::common::daemon::unix_request;
use crate::common::fixtures::{
    oras_push_cncf, push_raw, skopeo_push_index, OCI_CONFIG, OCI_MANIFEST,
};
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{require_tool, run_checked, Daemon, Registry};

const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// A P-256 key pair made by openssl in `dir`: (private key, public key) files.
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (private, public) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
    );
    let openssl = require_tool("openssl");
    run_checked(
        Command::new(&openssl)
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&private),
    );
    run_checked(
        Command::new(&openssl)
            .args(["ec", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public),
    );
    (private, public)
}

/// cosign's simple-signing payload for `digest` in `repository` (`registry/repo`).
fn payload(repository: &str, digest: &str) -> Vec<u8> {
    json!({
        "critical": {
            "identity": {"docker-reference": repository},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    })
    .to_string()
    .into_bytes()
}

/// The base64 DER ECDSA signature of `payload` by `key`, as cosign's annotation holds it.
fn sign(dir: &Path, key: &Path, payload: &[u8]) -> String {
    let (input, output) = (dir.join("payload.json"), dir.join("payload.sig"));
    std::fs::write(&input, payload).unwrap();
    let openssl = require_tool("openssl");
    run_checked(
        Command::new(openssl)
            .args(["dgst", "-sha256", "-sign"])
            .arg(key)
            .arg("-out")
            .arg(&output)
            .arg(&input),
    );
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(&output).unwrap())
}

/// Pushes cosign's signature manifest for `signed` (a manifest digest) in `repo`: one
/// simple-signing layer `payload` with `signature` in its annotation.
fn push_signature(registry: &Registry, repo: &str, signed: &str, payload: &[u8], signature: &str) {
    let config =
        br#"{"architecture":"","config":{},"created":"0001-01-01T00:00:00Z","os":""}"#.to_vec();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest(&config), "size": config.len()},
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "digest": digest(payload),
            "size": payload.len(),
            "annotations": {"dev.cosignproject.cosign/signature": signature}
        }],
    })
    .to_string()
    .into_bytes();
    let tag = format!("sha256-{}.sig", signed.trim_start_matches("sha256:"));
    push_raw(
        registry,
        repo,
        &tag,
        &manifest,
        OCI_MANIFEST,
        vec![config, payload.to_vec()],
    );
}

/// Signs `signed` (a manifest digest) for `repo` of `registry` with `key`, as cosign does, and
/// pushes the signature there.
fn sign_and_push(registry: &Registry, dir: &Path, key: &Path, repo: &str, signed: &str) {
    let body = payload(&format!("{}/{repo}", registry.addr()), signed);
    push_signature(registry, repo, signed, &body, &sign(dir, key, &body));
}

/// Fetches `reference`, which must be refused with PERMISSION_DENIED saying `why`.
async fn assert_refused(daemon: &Daemon, reference: &str, why: &str) {
    let refused = fetch(daemon, reference).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(why), "{}", refused.message());
}

async fn fetch(
    daemon: &Daemon,
    reference: &str,
) -> Result<wasmcache::api::proto::FetchResponse, tonic::Status> {
    let request = FetchRequest {
        reference: reference.to_owned(),
        ..Default::default()
    };
    daemon
        .client()
        .await
        .fetch(request)
        .await
        .map(tonic::Response::into_inner)
}

/// One of the daemon's Prometheus counters (0 when absent), read over its socket.
async fn counter(daemon: &Daemon, series: &str) -> u64 {
    let metrics = unix_request(&daemon.socket, "GET", "/metrics", &[], None).await;
    String::from_utf8_lossy(&metrics.body)
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_modules_signed_by_a_policy_key_are_stored_and_served() {
    let registry = Registry::start();
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path(), "team");
    let (stranger, _) = key_pair(keys.path(), "stranger");
    let addr = registry.addr();
    let config = format!(
        "[[signature_policies]]\nscope = \"{addr}/signed\"\nkeys = [{public:?}]\nmode = \"enforce\"\n\n\
         [[signature_policies]]\nscope = \"{addr}/signed/lax\"\nkeys = [{public:?}]\nmode = \"warn\"\n"
    );
    let daemon = Daemon::start(&["--insecure-registry", &addr], Some(&config));

    // Signed by the team's key, for this digest and repository: verified and served.
    let good = module(2048, 201);
    let pushed = oras_push_cncf(&registry, "signed/good:v1", &good);
    sign_and_push(
        &registry,
        keys.path(),
        &private,
        "signed/good",
        &pushed.digest,
    );
    let answer = fetch(&daemon, &format!("{addr}/signed/good:v1"))
        .await
        .unwrap();
    assert_eq!(answer.digest, digest(&good));
    assert_eq!(
        counter(
            &daemon,
            "wasmcache_signature_checks_total{result=\"verified\"}"
        )
        .await,
        1
    );
    // A warm hit does not verify again: no second request for the signature.
    let signature_gets = || registry.count("GET", "/manifests/sha256-");
    let before = signature_gets();
    fetch(&daemon, &format!("{addr}/signed/good:v1"))
        .await
        .unwrap();
    assert_eq!(signature_gets(), before, "the signature was fetched again");

    // Refusals: each PERMISSION_DENIED naming the reference, the scope and why, with
    // nothing stored.
    type Signer<'a> = Box<dyn Fn(&str) -> Option<(Vec<u8>, PathBuf)> + 'a>;
    let cases: Vec<(&str, u64, Signer, &str)> = vec![
        ("unsigned", 202, Box::new(|_| None), "no signature"),
        (
            "stranger",
            203,
            Box::new(|d: &str| {
                Some((
                    payload(&format!("{addr}/signed/stranger"), d),
                    stranger.clone(),
                ))
            }),
            "none of the policy's keys",
        ),
        (
            "elsewhere",
            204,
            Box::new(|_| {
                Some((
                    payload(&format!("{addr}/signed/elsewhere"), &digest(b"other")),
                    private.clone(),
                ))
            }),
            "the signature is for",
        ),
        (
            "renamed",
            205,
            Box::new(|d: &str| {
                Some((
                    payload(&format!("{addr}/signed/other-repo"), d),
                    private.clone(),
                ))
            }),
            "repository",
        ),
    ];
    for (name, seed, signature, why) in cases {
        let wasm = module(2048, seed);
        let repo = format!("signed/{name}");
        let pushed = oras_push_cncf(&registry, &format!("{repo}:v1"), &wasm);
        if let Some((body, key)) = signature(&pushed.digest) {
            push_signature(
                &registry,
                &repo,
                &pushed.digest,
                &body,
                &sign(keys.path(), &key, &body),
            );
        }
        let reference = format!("{addr}/{repo}:v1");
        let refused = fetch(&daemon, &reference).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{name}: {refused:?}"
        );
        let message = refused.message();
        assert!(message.contains(&reference), "{message}");
        assert!(message.contains(&format!("{addr}/signed")), "{message}");
        assert!(message.contains(why), "{name}: {message}");
        let stored = daemon.data_dir.join("blobs/sha256").join(sha256_hex(&wasm));
        assert!(!stored.exists(), "{name}: an unverified module was stored");
        // (The signature's payload is a blob of the same repository.)
        let module_gets = registry.count("GET", &format!("/v2/{repo}/blobs/{}", digest(&wasm)));
        assert_eq!(module_gets, 0, "{name}: the module was downloaded");

        // The module API and the OCI view refuse it too.
        let path = format!("/v1/modules/{}?ref={reference}", digest(&wasm));
        let http = unix_request(&daemon.socket, "GET", &path, &[], None).await;
        assert_eq!(http.status, 403, "{name}");
        let view = format!("/v2/{repo}/manifests/v1?ns={addr}");
        let oci = unix_request(&daemon.socket, "GET", &view, &[], None).await;
        assert_eq!(oci.status, 403, "{name}");
        assert!(
            String::from_utf8_lossy(&oci.body).contains("DENIED"),
            "{name}"
        );
    }

    // A payload changed after it was signed: its signature verifies with no key.
    let wasm = module(2048, 208);
    let pushed = oras_push_cncf(&registry, "signed/tampered:v1", &wasm);
    let body = payload(&format!("{addr}/signed/tampered"), &pushed.digest);
    let signature = sign(keys.path(), &private, &body);
    let mut changed = body.clone();
    changed.push(b'\n');
    push_signature(
        &registry,
        "signed/tampered",
        &pushed.digest,
        &changed,
        &signature,
    );
    let refused = fetch(&daemon, &format!("{addr}/signed/tampered:v1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("none of the policy's keys"),
        "{}",
        refused.message()
    );

    // Under a `warn` policy an unsigned module is served, and counted.
    let lax = module(2048, 206);
    oras_push_cncf(&registry, "signed/lax/filter:v1", &lax);
    let answer = fetch(&daemon, &format!("{addr}/signed/lax/filter:v1"))
        .await
        .unwrap();
    assert_eq!(answer.digest, digest(&lax));
    assert_eq!(
        counter(
            &daemon,
            "wasmcache_signature_checks_total{result=\"warned\"}"
        )
        .await,
        1
    );
    // Outside every scope, nothing is checked.
    let free = module(2048, 207);
    oras_push_cncf(&registry, "free/filter:v1", &free);
    fetch(&daemon, &format!("{addr}/free/filter:v1"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_is_signed_by_its_own_digest_and_a_rotated_key_verifies_again() {
    let registry = Registry::start();
    let keys = tempfile::tempdir().unwrap();
    let (old, public) = key_pair(keys.path(), "old");
    let addr = registry.addr();
    let config = format!(
        "[[signature_policies]]\nscope = \"{addr}/idx\"\nkeys = [{public:?}]\nmode = \"enforce\"\n"
    );
    let mut daemon = Daemon::start(&["--insecure-registry", &addr], Some(&config));
    let wasm = module(2048, 211);
    let index = skopeo_push_index(
        &registry,
        "idx/filter:v1",
        vec![("wasip1", "wasm", vec![wasm.clone()])],
    );
    let platform = index.json()["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let reference = format!("{addr}/idx/filter:v1");

    // A signature of the platform manifest does not sign the tag, which names the index.
    sign_and_push(&registry, keys.path(), &old, "idx/filter", &platform);
    assert_refused(&daemon, &reference, "no signature").await;

    // The index's own digest signed: verified, and the answer says by which key and policy.
    sign_and_push(&registry, keys.path(), &old, "idx/filter", &index.digest);
    let answer = fetch(&daemon, &reference).await.unwrap();
    assert_eq!(answer.digest, digest(&wasm));
    assert_eq!(answer.index_digest, index.digest);
    let verdict = answer.signature.clone().expect("a signature verdict");
    assert!(verdict.verified);
    assert_eq!(verdict.scope, format!("{addr}/idx"));
    assert!(verdict.key.starts_with("sha256:"), "{verdict:?}");

    // `stat` shows it too.
    let mut client = daemon.client().await;
    let request = wasmcache::api::proto::StatRequest {
        target: reference.clone(),
    };
    let stat = client.stat(request).await.unwrap().into_inner();
    assert_eq!(stat.entries[0].signature.as_ref(), Some(&verdict));

    // The verdict is kept in the index: after a restart, no signature is fetched again.
    let signature_gets = || registry.count("GET", "/manifests/sha256-");
    let before = signature_gets();
    daemon.restart();
    assert!(
        fetch(&daemon, &reference)
            .await
            .unwrap()
            .signature
            .unwrap()
            .verified
    );
    assert_eq!(signature_gets(), before, "verified again after a restart");

    // The key rotated on disk (a Secret update replaces the file): the module is checked
    // again at its next use, and the old key's signature no longer counts.
    let (new, rotated) = key_pair(keys.path(), "new");
    std::fs::rename(&rotated, &public).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        match fetch(&daemon, &reference).await {
            Err(status) => break status,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Ok(_) => panic!("still served 10 s after the key changed:\n{}", daemon.log()),
        }
    };
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("none of the policy's keys"),
        "{refused:?}"
    );
    sign_and_push(&registry, keys.path(), &new, "idx/filter", &index.digest);
    let answer = fetch(&daemon, &reference).await.unwrap();
    assert_ne!(
        answer.signature.unwrap().key,
        verdict.key,
        "the new key verified it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_stored_as_a_referrer_is_found() {
    let registry = Registry::start();
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path(), "team");
    let addr = registry.addr();
    let config = format!(
        "[[signature_policies]]\nscope = \"{addr}\"\nkeys = [{public:?}]\nmode = \"enforce\"\n"
    );
    let daemon = Daemon::start(&["--insecure-registry", &addr], Some(&config));
    let wasm = module(2048, 221);
    let pushed = oras_push_cncf(&registry, "refs/filter:v1", &wasm);
    let body = payload(&format!("{addr}/refs/filter"), &pushed.digest);
    let signature = sign(keys.path(), &private, &body);

    // cosign's OCI 1.1 mode: the signature manifest names the module's manifest as its
    // subject; this registry has no referrers API, so it is listed under the referrers tag
    // schema (`sha256-<hex>`, an index), as the distribution spec says.
    let config_blob = b"{}".to_vec();
    let artifact = "application/vnd.dev.cosign.artifact.sig.v1+json";
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(&config_blob), "size": 2},
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "digest": digest(&body),
            "size": body.len(),
            "annotations": {"dev.cosignproject.cosign/signature": signature}
        }],
        "subject": {"mediaType": OCI_MANIFEST, "digest": pushed.digest, "size": pushed.bytes.len()},
    })
    .to_string()
    .into_bytes();
    let signature_digest = digest(&manifest);
    push_raw(
        &registry,
        "refs/filter",
        &signature_digest,
        &manifest,
        OCI_MANIFEST,
        vec![config_blob, body],
    );
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": signature_digest, "size": manifest.len(),
                       "artifactType": artifact}],
    })
    .to_string()
    .into_bytes();
    let tag = pushed.digest.replace(':', "-");
    push_raw(
        &registry,
        "refs/filter",
        &tag,
        &index,
        "application/vnd.oci.image.index.v1+json",
        vec![],
    );

    let answer = fetch(&daemon, &format!("{addr}/refs/filter:v1"))
        .await
        .unwrap();
    let verdict = answer.signature.expect("a verdict");
    assert!(verdict.verified);
    assert_eq!(verdict.signature_digest, signature_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_cached_before_a_policy_is_not_served_unverified_during_an_outage() {
    let mut registry = Registry::start();
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = key_pair(keys.path(), "team");
    let addr = registry.addr();
    let wasm = module(2048, 231);
    oras_push_cncf(&registry, "late/filter:v1", &wasm);
    let reference = format!("{addr}/late/filter:v1");

    // Cached while no policy covered it.
    let mut before = Daemon::start(&["--insecure-registry", &addr], None);
    assert_eq!(
        fetch(&before, &reference).await.unwrap().digest,
        digest(&wasm)
    );
    let data_dir = before.data_dir.clone();
    before.signal_and_wait("TERM", std::time::Duration::from_secs(20));

    // An enforcing policy now covers it, and the registry is down: the cached module is not
    // given as the last known answer, nor as a fresh one.
    let config = format!(
        "stale_after = \"200ms\"\n[[signature_policies]]\nscope = \"{addr}/late\"\nkeys = [{public:?}]\nmode = \"enforce\"\n"
    );
    registry.stop();
    let after = Daemon::start_at(
        Some(data_dir),
        &["--insecure-registry", &addr],
        Some(&config),
    );
    // `ALWAYS`: the tag is re-resolved, and the registry's failure would otherwise be answered
    // with the last known module.
    let request = FetchRequest {
        reference: reference.clone(),
        pull_policy: wasmcache::api::proto::PullPolicy::Always.into(),
        ..Default::default()
    };
    let refused = after.client().await.fetch(request).await.unwrap_err();
    let log = after.log();
    assert!(!log.contains("serving the last known module"), "{log}");
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::PermissionDenied),
        "{refused:?}"
    );
}

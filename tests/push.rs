//! `wasmcache push` against a real registry: both packagings pulled back by oras, skopeo and
//! `wasmcache pull`; blobs the repository holds are not sent again; basic auth from a Docker
//! config and tokens with push scope; large modules in chunks; and modules refused before any
//! request.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::cli::{run_err, run_ok, wasmcache};
use crate::common::fixtures::{
    fetch_manifest, oras_pull, CNCF_CONFIG, CNCF_LAYER, OCI_MANIFEST, WASME_CONFIG, WASME_LAYER,
};
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{isolate, require_tool, run_checked, LoggedRequest, Registry, TokenServer};

const USER: &str = "pusher";
const PASSWORD: &str = "push-pw-8c41d0";
const ABI: &str = "v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f";

/// A scratch dir with a config for one registry (plain HTTP, credentials from `auths`), the
/// module files and a cache for `wasmcache pull`.
struct Pusher {
    dir: TempDir,
}

impl Pusher {
    fn new(registry: &Registry, auths: Value) -> Pusher {
        let dir = tempfile::tempdir().expect("push dir");
        let auth_file = dir.path().join("docker-config.json");
        fs::write(&auth_file, json!({ "auths": auths }).to_string()).expect("auth file");
        let config = format!(
            "insecure_registries = [\"{}\"]\nregistry_auth_file = \"{}\"\n",
            registry.addr(),
            auth_file.display()
        );
        fs::write(dir.path().join("wasmcache.toml"), config).expect("config file");
        Pusher { dir }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).expect("module file");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = wasmcache();
        let config = self.dir.path().join("wasmcache.toml");
        command.arg("--config").arg(config);
        command.arg("--data-dir").arg(self.dir.path().join("cache"));
        command.args(args);
        command
    }

    fn push(&self, file: &Path, reference: &str, extra: &[&str]) -> Value {
        let file = file.to_str().expect("UTF-8 path");
        let mut args = vec!["push", "--json", file, reference];
        args.extend_from_slice(extra);
        let out = run_ok(&mut self.command(&args));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("push --json printed {out:?}: {e}"))
    }

    /// A refused push: exit 1 and one line on stderr, returned.
    fn push_err(&self, file: &Path, reference: &str, extra: &[&str]) -> String {
        let file = file.to_str().expect("UTF-8 path");
        let mut args = vec!["push", file, reference];
        args.extend_from_slice(extra);
        let (code, stderr) = run_err(&mut self.command(&args));
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
        stderr
    }

    fn pull(&self, reference: &str) -> Value {
        let out = run_ok(&mut self.command(&["pull", "--json", reference]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("pull --json printed {out:?}: {e}"))
    }
}

/// The blob `digest` of `repo` as the registry serves it.
fn blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let response = registry
        .endpoint()
        .get(&format!("/v2/{repo}/blobs/{digest}"), &[]);
    assert_eq!(response.status, 200, "{digest}: {}", response.text());
    response.body
}

/// `skopeo copy` of `reference` into an OCI layout in `dir`; returns the layout's blob dir.
fn skopeo_copy(registry: &Registry, reference: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let mut skopeo = Command::new(require_tool("skopeo"));
    isolate(&mut skopeo, dir).args(["--insecure-policy", "copy", "--quiet"]);
    skopeo.args(["--src-tls-verify=false", "--retry-times", "0"]);
    match registry.credentials() {
        Some((user, password)) => skopeo.arg(format!("--src-creds={user}:{password}")),
        None => skopeo.arg("--src-no-creds"),
    };
    skopeo.arg(format!("docker://{}/{reference}", registry.addr()));
    run_checked(skopeo.arg(format!("oci:{}:copied", layout.display())));
    layout.join("blobs/sha256")
}

/// The requests the registry answered after the first `from`.
fn since(registry: &Registry, from: usize) -> Vec<LoggedRequest> {
    registry.requests().into_iter().skip(from).collect()
}

#[test]
fn cncf_artifacts_pull_back_with_oras_skopeo_and_wasmcache() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(100_000, 71);
    let pusher = Pusher::new(&registry, json!({}));
    let file = pusher.file("add.wasm", &wasm);
    let reference = format!("{addr}/push/cncf:v1");
    let source = "org.opencontainers.image.source=https://example.com/add";
    let author = "org.opencontainers.image.authors=Ada Lovelace";
    let pushed = pusher.push(
        &file,
        &reference,
        &["--annotation", source, "--annotation", author],
    );
    assert_eq!(pushed["reference"], reference.as_str());
    assert_eq!(pushed["digest"], digest(&wasm).as_str());
    assert_eq!(pushed["size"], wasm.len());
    assert_eq!(pushed["format"], "cncf-wasm");
    assert_eq!(
        (
            pushed["uploaded_blobs"].as_u64(),
            pushed["skipped_blobs"].as_u64()
        ),
        (Some(2), Some(0))
    );
    // Without --json, the manifest digest alone (the same: the same file and annotations).
    let file_arg = file.to_str().unwrap();
    let args = [
        "push",
        file_arg,
        &reference,
        "--annotation",
        source,
        "--annotation",
        author,
    ];
    let again = run_ok(&mut pusher.command(&args));
    assert_eq!(again.trim(), pushed["manifest_digest"]);

    // As stored: the CNCF layout, the annotations, the config the spec describes.
    let manifest = fetch_manifest(&registry, "push/cncf", "v1");
    assert_eq!(manifest.digest, pushed["manifest_digest"]);
    assert_eq!(manifest.media_type, OCI_MANIFEST);
    let document = manifest.json();
    assert_eq!(document["mediaType"], OCI_MANIFEST);
    assert_eq!(document["artifactType"], CNCF_CONFIG);
    assert_eq!(document["config"]["mediaType"], CNCF_CONFIG);
    let layers = document["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{document}");
    assert_eq!(layers[0]["mediaType"], CNCF_LAYER);
    assert_eq!(layers[0]["digest"], digest(&wasm).as_str());
    assert_eq!(layers[0]["size"], wasm.len());
    assert_eq!(
        document["annotations"],
        json!({"org.opencontainers.image.source": "https://example.com/add",
               "org.opencontainers.image.authors": "Ada Lovelace"})
    );
    let config_digest = document["config"]["digest"].as_str().unwrap();
    let config: Value =
        serde_json::from_slice(&blob(&registry, "push/cncf", config_digest)).unwrap();
    assert_eq!(config["architecture"], "wasm");
    assert_eq!(config["os"], "wasip1");
    assert_eq!(config["layerDigests"], json!([digest(&wasm)]));
    assert_eq!(config["author"], "Ada Lovelace");
    let created = config["created"].as_str().unwrap();
    assert!(created.len() == 20 && created.ends_with('Z'), "{created}");

    // oras-py writes the module under its file name.
    let out = tempfile::tempdir().unwrap();
    let files = oras_pull(&registry, "push/cncf:v1", out.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("add.wasm"), "{files:?}");
    assert_eq!(fs::read(&files[0]).unwrap(), wasm);

    // skopeo copies manifest, config and module byte for byte.
    let home = tempfile::tempdir().unwrap();
    let blobs = skopeo_copy(&registry, "push/cncf:v1", home.path());
    assert_eq!(fs::read(blobs.join(sha256_hex(&wasm))).unwrap(), wasm);
    let copied = fs::read(blobs.join(&manifest.digest["sha256:".len()..])).unwrap();
    assert_eq!(copied, manifest.bytes);
    let copied = fs::read(blobs.join(&config_digest["sha256:".len()..])).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&copied).unwrap(), config);

    // And wasmcache reads it as what it is.
    let pulled = pusher.pull(&reference);
    assert_eq!(pulled["format"], "cncf-wasm");
    assert_eq!(pulled["digest"], digest(&wasm).as_str());
    assert_eq!(pulled["manifest_digest"], pushed["manifest_digest"]);
    assert_eq!(fs::read(pulled["path"].as_str().unwrap()).unwrap(), wasm);
}

#[test]
fn wasme_images_pull_back_with_skopeo_and_wasmcache() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(50_000, 72);
    let pusher = Pusher::new(&registry, json!({}));
    let file = pusher.file("filter.wasm", &wasm);
    let reference = format!("{addr}/push/wasme:v1");
    let args = [
        "--format",
        "wasme",
        "--abi-version",
        ABI,
        "--root-id",
        "add_header",
        "--root-id",
        "auth",
        "--annotation",
        "team=edge",
    ];
    let pushed = pusher.push(&file, &reference, &args);
    assert_eq!(pushed["format"], "wasme");
    assert_eq!(pushed["digest"], digest(&wasm).as_str());
    // The config is one blob, though the manifest names it twice.
    assert_eq!(pushed["uploaded_blobs"], 2);

    // As stored: the config, also as the first of two layers (what Istio's agent reads).
    let manifest = fetch_manifest(&registry, "push/wasme", "v1");
    assert_eq!(manifest.digest, pushed["manifest_digest"]);
    assert_eq!(manifest.media_type, OCI_MANIFEST);
    let document = manifest.json();
    assert_eq!(document["config"]["mediaType"], WASME_CONFIG);
    assert_eq!(document["annotations"], json!({"team": "edge"}));
    let layers = document["layers"].as_array().unwrap();
    let media_types: Vec<&str> = layers
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(media_types, [WASME_CONFIG, WASME_LAYER]);
    assert_eq!(layers[0]["digest"], document["config"]["digest"]);
    assert_eq!(layers[1]["digest"], digest(&wasm).as_str());
    let config_digest = document["config"]["digest"].as_str().unwrap();
    let config: Value =
        serde_json::from_slice(&blob(&registry, "push/wasme", config_digest)).unwrap();
    assert_eq!(
        config,
        json!({"type": "envoy_proxy", "abiVersions": [ABI],
               "config": {"rootIds": ["add_header", "auth"]}})
    );

    // skopeo copies it byte for byte.
    let home = tempfile::tempdir().unwrap();
    let blobs = skopeo_copy(&registry, "push/wasme:v1", home.path());
    assert_eq!(fs::read(blobs.join(sha256_hex(&wasm))).unwrap(), wasm);
    let copied = fs::read(blobs.join(&manifest.digest["sha256:".len()..])).unwrap();
    assert_eq!(copied, manifest.bytes);

    // wasmcache reads the wasme metadata back.
    let pulled = pusher.pull(&reference);
    assert_eq!(pulled["format"], "wasme");
    assert_eq!(pulled["digest"], digest(&wasm).as_str());
    assert_eq!(
        pulled["wasme"],
        json!({"type": "envoy_proxy", "abi_versions": [ABI], "root_ids": ["add_header", "auth"]})
    );
    assert_eq!(fs::read(pulled["path"].as_str().unwrap()).unwrap(), wasm);
}

#[test]
fn a_second_push_of_the_same_module_uploads_no_blob() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(200_000, 73);
    let pusher = Pusher::new(&registry, json!({}));
    let file = pusher.file("m.wasm", &wasm);
    let reference = format!("{addr}/push/again:v1");
    let first = pusher.push(&file, &reference, &[]);
    assert_eq!(first["uploaded_blobs"], 2);

    let start = registry.requests().len();
    let second = pusher.push(&file, &reference, &[]);
    assert_eq!(
        (
            second["uploaded_blobs"].as_u64(),
            second["skipped_blobs"].as_u64()
        ),
        (Some(0), Some(2))
    );
    assert_eq!(second["manifest_digest"], first["manifest_digest"]);
    let asked: Vec<(String, String)> = since(&registry, start)
        .into_iter()
        .map(|request| (request.method, request.path))
        .collect();
    let config = fetch_manifest(&registry, "push/again", "v1").json()["config"]["digest"].clone();
    let expected = [
        (
            "HEAD",
            format!("/v2/push/again/blobs/{}", config.as_str().unwrap()),
        ),
        ("HEAD", format!("/v2/push/again/blobs/{}", digest(&wasm))),
        ("PUT", "/v2/push/again/manifests/v1".to_owned()),
    ];
    let expected: Vec<(String, String)> = expected
        .into_iter()
        .map(|(method, path)| (method.to_owned(), path))
        .collect();
    assert_eq!(asked, expected);

    // Another tag of the same module: nothing uploaded either.
    let tagged = pusher.push(&file, &format!("{addr}/push/again:v2"), &[]);
    assert_eq!(tagged["uploaded_blobs"], 0);
    assert_eq!(tagged["manifest_digest"], first["manifest_digest"]);
}

#[test]
fn basic_auth_credentials_come_from_the_docker_config_and_a_push_without_is_refused() {
    let registry = Registry::builder().basic_auth(USER, PASSWORD).start();
    let addr = registry.addr();
    let wasm = module(10_000, 74);
    let reference = format!("{addr}/push/private:v1");

    let pusher = Pusher::new(
        &registry,
        json!({ addr.clone(): {"username": USER, "password": PASSWORD} }),
    );
    let file = pusher.file("m.wasm", &wasm);
    let pushed = pusher.push(&file, &reference, &[]);
    assert_eq!(pushed["uploaded_blobs"], 2);
    let pulled = pusher.pull(&reference);
    assert_eq!(pulled["digest"], digest(&wasm).as_str());

    // Without credentials, or with a wrong password: a one-line error naming the registry,
    // and nothing written.
    let other = module(10_000, 75);
    for auths in [
        json!({}),
        json!({ addr.clone(): {"username": USER, "password": "wrong-pw-5e1a"} }),
    ] {
        let pusher = Pusher::new(&registry, auths);
        let file = pusher.file("other.wasm", &other);
        let start = registry.requests().len();
        let refused = pusher.push_err(&file, &format!("{addr}/push/private:v2"), &[]);
        for part in [
            addr.as_str(),
            "authentication required",
            "checking for blob",
        ] {
            assert!(refused.contains(part), "{part}: {refused}");
        }
        assert!(!refused.contains("wrong-pw"), "{refused}");
        let asked = since(&registry, start);
        assert!(
            asked.iter().all(|request| request.status == 401),
            "{asked:?}"
        );
        assert!(
            !asked.iter().any(|request| request.method == "POST"),
            "{asked:?}"
        );
    }
}

#[test]
fn token_registries_get_asked_for_pull_and_push() {
    let server = TokenServer::start(&[(USER, PASSWORD)]);
    let registry = Registry::builder().token_auth(&server).start();
    let addr = registry.addr();
    let wasm = module(10_000, 76);
    let pusher = Pusher::new(
        &registry,
        json!({ addr.clone(): {"username": USER, "password": PASSWORD} }),
    );
    let file = pusher.file("m.wasm", &wasm);
    let start = server.count();
    let pushed = pusher.push(
        &file,
        &format!("{addr}/push/token:v1"),
        &["--format", "wasme"],
    );
    assert_eq!(pushed["uploaded_blobs"], 2);
    // One token for the whole push, scoped to pull and push that repository.
    let asked: Vec<_> = server.requests().into_iter().skip(start).collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].scopes, ["repository:push/token:pull,push"]);
    assert_eq!(asked[0].user.as_deref(), Some(USER));
    // A pull of it asks for a pull token of its own.
    let pulled = pusher.pull(&format!("{addr}/push/token:v1"));
    assert_eq!(pulled["manifest_digest"], pushed["manifest_digest"]);
    assert_eq!(pulled["wasme"]["type"], "envoy_proxy");
    let asked: Vec<_> = server.requests().into_iter().skip(start + 1).collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].scopes, ["repository:push/token:pull"]);
}

#[test]
fn large_modules_go_up_in_chunks() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(20 << 20, 77);
    let pusher = Pusher::new(&registry, json!({}));
    let file = pusher.file("large.wasm", &wasm);
    let reference = format!("{addr}/push/large:v1");
    let start = registry.requests().len();
    let pushed = pusher.push(&file, &reference, &[]);
    assert_eq!(pushed["size"], wasm.len());
    let asked = since(&registry, start);
    let count = |method: &str, path: &str| {
        (asked.iter())
            .filter(|r| r.method == method && r.path.starts_with(path))
            .count()
    };
    // 20 MiB in 8 MiB chunks: three PATCHes, then the closing PUT; the config in one PUT.
    assert_eq!(
        count("PATCH", "/v2/push/large/blobs/uploads/"),
        3,
        "{asked:?}"
    );
    assert_eq!(
        count("POST", "/v2/push/large/blobs/uploads/"),
        2,
        "{asked:?}"
    );
    assert_eq!(
        count("PUT", "/v2/push/large/blobs/uploads/"),
        2,
        "{asked:?}"
    );
    let missing = |r: &LoggedRequest| r.method == "HEAD" && r.status == 404;
    assert!(
        asked.iter().all(|r| r.status < 300 || missing(r)),
        "{asked:?}"
    );

    let pulled = pusher.pull(&reference);
    assert_eq!(pulled["digest"], digest(&wasm).as_str());
    assert!(fs::read(pulled["path"].as_str().unwrap()).unwrap() == wasm);
}

#[test]
fn invalid_modules_are_refused_before_any_request() {
    let registry = Registry::start();
    let addr = registry.addr();
    let pusher = Pusher::new(&registry, json!({}));
    let reference = format!("{addr}/push/invalid:v1");
    let start = registry.requests().len();

    let script = pusher.file("script.wasm", b"#!/bin/sh\necho not wasm\n");
    let refused = pusher.push_err(&script, &reference, &[]);
    assert!(
        refused.contains("script.wasm is not a valid WebAssembly module"),
        "{refused}"
    );
    assert!(refused.contains("magic number"), "{refused}");

    // The right magic number, then a code section that is cut short.
    let mut broken = module(0, 0);
    broken.truncate(broken.len() - 3);
    let broken = pusher.file("broken.wasm", &broken);
    let refused = pusher.push_err(&broken, &reference, &[]);
    assert!(
        refused.contains("broken.wasm is not a valid WebAssembly module"),
        "{refused}"
    );

    let missing = pusher.dir.path().join("missing.wasm");
    let refused = pusher.push_err(&missing, &reference, &[]);
    assert!(
        refused.contains("reading module") && refused.contains("missing.wasm"),
        "{refused}"
    );

    let valid = pusher.file("valid.wasm", &module(100, 78));
    let refused = pusher.push_err(&valid, &reference, &["--root-id", "x"]);
    assert!(refused.contains("--format wasme"), "{refused}");
    let pinned = format!("{addr}/push/invalid@{}", digest(b"x"));
    let refused = pusher.push_err(&valid, &pinned, &[]);
    assert!(refused.contains("name a tag"), "{refused}");
    let refused = pusher.push_err(&valid, &reference, &["--annotation", "novalue"]);
    assert!(refused.contains("annotation 'novalue'"), "{refused}");

    assert_eq!(since(&registry, start), Vec::new());
}

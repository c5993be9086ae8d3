//! `wasmcache pull`, `ls` and `rm` against a real registry, with fixtures pushed by oras and
//! skopeo, and a faulty server for what no real registry does on purpose.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::cli::{run_err, run_ok, wasmcache};
use crate::common::fixtures::{
    oras_push_cncf, oras_push_wasme, push_raw, skopeo_push_image, skopeo_push_index, tar_entries,
    tar_layer,
};
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{free_port, Behaviour, FaultyServer, ImageFormat, Registry, TarEntry};

const OCI_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const WASME_CONFIG: &str = r#"{"type":"envoy_proxy","abiVersions":["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f"],"config":{"rootIds":["add_header"]}}"#;

/// A cache directory plus the flags that point the CLI at it and at plain-HTTP registries.
struct Cache {
    dir: TempDir,
    insecure: Vec<String>,
    extra: Vec<String>,
}

impl Cache {
    fn new(registries: &[&str]) -> Cache {
        Cache {
            dir: tempfile::tempdir().expect("cache dir"),
            insecure: registries.iter().map(|r| r.to_string()).collect(),
            extra: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = wasmcache();
        command.arg("--data-dir").arg(self.dir.path());
        for registry in &self.insecure {
            command.arg("--insecure-registry").arg(registry);
        }
        command.args(&self.extra).args(args);
        command
    }

    /// Runs every later command with `text` as its config file.
    fn use_config(&mut self, text: &str) {
        let path = self.dir.path().join("wasmcache-test.toml");
        fs::write(&path, text).expect("writing the config file");
        self.extra = vec!["--config".into(), path.display().to_string()];
    }

    fn pull(&self, reference: &str) -> Value {
        let out = run_ok(&mut self.command(&["pull", "--json", reference]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("pull --json printed {out:?}: {e}"))
    }

    fn pull_err(&self, reference: &str) -> String {
        let (code, stderr) = run_err(&mut self.command(&["pull", reference]));
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
        stderr
    }

    fn blob_files(&self) -> Vec<PathBuf> {
        files_in(&self.dir.path().join("blobs/sha256"))
    }

    fn ingest_files(&self) -> Vec<PathBuf> {
        files_in(&self.dir.path().join("ingest"))
    }

    fn assert_untouched(&self) {
        assert!(self.blob_files().is_empty(), "{:?}", self.blob_files());
        assert!(self.ingest_files().is_empty(), "{:?}", self.ingest_files());
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Checks what every successful pull must hold: the file is the module, named by its digest.
fn assert_module(fetched: &Value, expected: &[u8], format: &str) {
    assert_eq!(fetched["format"], format, "{fetched}");
    assert_eq!(fetched["digest"], digest(expected), "{fetched}");
    assert_eq!(fetched["size"], expected.len(), "{fetched}");
    let path = Path::new(fetched["path"].as_str().unwrap());
    assert!(path.is_absolute());
    assert_eq!(
        path.file_name().unwrap().to_str().unwrap(),
        sha256_hex(expected)
    );
    assert_eq!(fs::read(path).unwrap(), expected);
}

#[test]
fn pulls_the_cncf_artifact_pushed_by_oras() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(4096, 1);
    let pushed = oras_push_cncf(&registry, "filters/cncf:v1", &wasm);
    let cache = Cache::new(&[&addr]);

    let fetched = cache.pull(&format!("oci://{addr}/filters/cncf:v1"));
    assert_module(&fetched, &wasm, "cncf-wasm");
    assert_eq!(fetched["manifest_digest"], pushed.digest);
    assert_eq!(fetched["cache_hit"], false);
    assert_eq!(fetched["reference"], format!("{addr}/filters/cncf:v1"));
    assert_eq!(registry.blob_gets(Some("filters/cncf")), 1);
    assert!(cache.ingest_files().is_empty());
}

#[test]
fn pulls_the_wasme_image_and_keeps_its_config() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(1000, 2);
    oras_push_wasme(&registry, "filters/wasme:v1", &wasm, WASME_CONFIG);
    let cache = Cache::new(&[&addr]);

    let fetched = cache.pull(&format!("{addr}/filters/wasme:v1"));
    assert_module(&fetched, &wasm, "wasme");
    assert_eq!(
        fetched["wasme"],
        json!({"type": "envoy_proxy",
               "abi_versions": ["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f"],
               "root_ids": ["add_header"]})
    );
}

#[test]
fn pulls_plugin_wasm_out_of_oci_and_docker_images() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(200_000, 3);
    let gzip_layer = tar_layer(
        &[("etc/readme.txt", b"hello"), ("plugin.wasm", &wasm)],
        true,
    );
    skopeo_push_image(
        &registry,
        "images/oci:v1",
        vec![gzip_layer.clone()],
        OCI_TAR_GZIP,
        ImageFormat::Oci,
    );
    let docker = skopeo_push_image(
        &registry,
        "images/docker:v1",
        vec![gzip_layer],
        OCI_TAR_GZIP,
        ImageFormat::DockerV2S2,
    );
    assert_eq!(
        docker.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let other = module(10, 4);
    skopeo_push_image(
        &registry,
        "images/plain-tar:v1",
        vec![tar_layer(&[("./filter/other.wasm", &other)], false)],
        OCI_TAR,
        ImageFormat::Oci,
    );
    let cache = Cache::new(&[&addr]);

    let oci = cache.pull(&format!("{addr}/images/oci:v1"));
    assert_module(&oci, &wasm, "oci-image");
    assert_eq!(oci["cache_hit"], false);
    // The Docker copy has the same layer: nothing is downloaded, the module is stored once.
    let docker = cache.pull(&format!("{addr}/images/docker:v1"));
    assert_module(&docker, &wasm, "docker-image");
    assert_eq!(docker["cache_hit"], true);
    assert_eq!(registry.blob_gets(Some("images/docker")), 0);
    // A single `*.wasm` entry stands in for `plugin.wasm`, in a plain tar.
    let plain = cache.pull(&format!("{addr}/images/plain-tar:v1"));
    assert_module(&plain, &other, "oci-image");
    assert_eq!(cache.blob_files().len(), 2);
}

#[test]
fn image_index_picks_wasm_then_host_platform() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm_module = module(100, 5);
    let linux_module = module(100, 6);
    let host = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let index = skopeo_push_index(
        &registry,
        "multi/both:v1",
        vec![
            (
                "linux",
                host,
                vec![tar_layer(&[("plugin.wasm", &linux_module)], true)],
            ),
            ("wasip1", "wasm", vec![wasm_module.clone()]),
        ],
    );
    skopeo_push_index(
        &registry,
        "multi/linux:v1",
        vec![
            (
                "linux",
                "s390x",
                vec![tar_layer(&[("plugin.wasm", &wasm_module)], true)],
            ),
            (
                "linux",
                host,
                vec![tar_layer(&[("plugin.wasm", &linux_module)], true)],
            ),
        ],
    );
    skopeo_push_index(
        &registry,
        "multi/none:v1",
        vec![
            (
                "linux",
                "s390x",
                vec![tar_layer(&[("plugin.wasm", &wasm_module)], true)],
            ),
            (
                "windows",
                "riscv64",
                vec![tar_layer(&[("plugin.wasm", &wasm_module)], true)],
            ),
        ],
    );
    let cache = Cache::new(&[&addr]);

    let both = cache.pull(&format!("{addr}/multi/both:v1"));
    assert_module(&both, &wasm_module, "cncf-wasm");
    assert!(both["index_digest"].is_string(), "{both}");
    // What the tag resolved to, the checksum Istio compares with: the index's own digest.
    assert_eq!(both["resolved_digest"], index.digest, "{both}");
    assert_eq!(both["index_digest"], index.digest, "{both}");
    assert_ne!(both["manifest_digest"], index.digest, "{both}");
    let linux = cache.pull(&format!("{addr}/multi/linux:v1"));
    assert_module(&linux, &linux_module, "oci-image");
    let error = cache.pull_err(&format!("{addr}/multi/none:v1"));
    assert!(error.contains("no wasm platform"), "{error}");
    assert!(error.contains("linux/s390x, windows/riscv64"), "{error}");
}

#[test]
fn same_module_in_two_repositories_is_downloaded_once() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(300_000, 7);
    oras_push_cncf(&registry, "team-a/filter:v1", &wasm);
    oras_push_wasme(&registry, "team-b/filter:latest", &wasm, WASME_CONFIG);
    let cache = Cache::new(&[&addr]);

    let first = cache.pull(&format!("{addr}/team-a/filter:v1"));
    assert_eq!(first["cache_hit"], false);
    let second = cache.pull(&format!("{addr}/team-b/filter"));
    assert_eq!(second["cache_hit"], true);
    assert_eq!(second["path"], first["path"]);
    assert_eq!(registry.blob_gets(Some("team-a/filter")), 1);
    // The wasme config is read for its metadata; the module blob is not downloaded again.
    let module_gets = registry.count("GET", &format!("team-b/filter/blobs/{}", digest(&wasm)));
    assert_eq!(module_gets, 0);
    assert_eq!(cache.blob_files().len(), 1);

    let listed: Value =
        serde_json::from_str(&run_ok(&mut cache.command(&["ls", "--json"]))).unwrap();
    let references: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        references,
        [
            format!("{addr}/team-a/filter:v1"),
            format!("{addr}/team-b/filter:latest")
        ]
    );

    // Removing one reference keeps the blob the other still uses; removing both deletes it.
    let out = run_ok(&mut cache.command(&["rm", &format!("{addr}/team-a/filter:v1")]));
    assert!(out.contains("untagged"), "{out}");
    assert!(!out.contains("deleted"), "{out}");
    assert_eq!(cache.blob_files().len(), 1);
    let out = run_ok(&mut cache.command(&["rm", &format!("{addr}/team-b/filter:latest")]));
    assert!(
        out.contains(&format!("deleted: {}", digest(&wasm))),
        "{out}"
    );
    assert!(cache.blob_files().is_empty());
    let (_, error) = run_err(&mut cache.command(&["rm", &format!("{addr}/team-b/filter")]));
    assert!(error.contains("is not in the cache"), "{error}");
}

#[test]
fn rm_by_module_digest_forgets_every_reference() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(10, 8);
    oras_push_cncf(&registry, "rm/a:v1", &wasm);
    oras_push_cncf(&registry, "rm/a:v2", &wasm);
    let cache = Cache::new(&[&addr]);
    cache.pull(&format!("{addr}/rm/a:v1"));
    cache.pull(&format!("{addr}/rm/a:v2"));

    let out = run_ok(&mut cache.command(&["rm", &digest(&wasm)]));
    assert_eq!(out.matches("untagged").count(), 2, "{out}");
    assert!(cache.blob_files().is_empty());
    assert_eq!(run_ok(&mut cache.command(&["ls", "--json"])).trim(), "[]");
}

#[test]
fn cache_survives_restart_and_serves_digests_offline() {
    let mut registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(5000, 9);
    let pushed = oras_push_cncf(&registry, "offline/f:v1", &wasm);
    let cache = Cache::new(&[&addr]);
    let first = cache.pull(&format!("{addr}/offline/f:v1"));

    registry.stop();
    // A new process finds the index and the blob again, without the registry.
    let by_digest = cache.pull(&format!("{addr}/offline/f@{}", pushed.digest));
    assert_eq!(by_digest["cache_hit"], true);
    assert_eq!(by_digest["path"], first["path"]);
    let listed = run_ok(&mut cache.command(&["ls"]));
    assert!(listed.contains(&format!("{addr}/offline/f:v1")), "{listed}");
    // A tag needs the registry for `pull`; the error says it is unreachable.
    let error = cache.pull_err(&format!("{addr}/offline/f:v1"));
    assert!(error.contains("unreachable"), "{error}");
}

#[test]
fn basic_auth_credentials_come_from_a_docker_config() {
    let registry = Registry::builder().basic_auth("alice", "s3cret").start();
    let addr = registry.addr();
    let wasm = module(100, 10);
    oras_push_cncf(&registry, "private/f:v1", &wasm);
    let mut cache = Cache::new(&[&addr]);

    let error = cache.pull_err(&format!("{addr}/private/f:v1"));
    assert!(error.contains("authentication required"), "{error}");

    let auth_file = cache.dir.path().join("docker-config.json");
    let token = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    fs::write(
        &auth_file,
        json!({"auths": {format!("http://{addr}"): {"auth": token}}}).to_string(),
    )
    .unwrap();
    cache.extra = vec![
        "--registry-auth-file".into(),
        auth_file.display().to_string(),
    ];
    assert_module(
        &cache.pull(&format!("{addr}/private/f:v1")),
        &wasm,
        "cncf-wasm",
    );

    fs::write(
        &auth_file,
        json!({"auths": {addr.clone(): {"username": "alice", "password": "wrong"}}}).to_string(),
    )
    .unwrap();
    let error = cache.pull_err(&format!("{addr}/private/f:v1"));
    assert!(error.contains("credentials rejected"), "{error}");
    assert!(
        !error.contains("wrong"),
        "the password must not be printed: {error}"
    );
}

#[test]
fn unknown_tags_and_bad_references_are_clear_errors() {
    let registry = Registry::start();
    let addr = registry.addr();
    oras_push_cncf(&registry, "known/f:v1", &module(0, 0));
    let cache = Cache::new(&[&addr]);

    let error = cache.pull_err(&format!("{addr}/known/f:v2"));
    assert!(error.contains(&format!("{addr}/known/f:v2")), "{error}");
    assert!(error.contains("not found"), "{error}");
    let error = cache.pull_err(&format!("{addr}/unknown/repo:v1"));
    assert!(error.contains("not found"), "{error}");

    let error = cache.pull_err("ghcr.io/Upper/case:v1");
    assert!(
        error.contains("invalid reference 'ghcr.io/Upper/case:v1'"),
        "{error}"
    );
    assert!(error.contains("component 'Upper'"), "{error}");
    let error = cache.pull_err("ghcr.io/a/b@sha256:1234");
    assert!(
        error.contains("expected 64 hexadecimal characters"),
        "{error}"
    );
    cache.assert_untouched();
}

#[test]
fn unsupported_media_types_and_non_wasm_content_are_refused() {
    let registry = Registry::start();
    let addr = registry.addr();
    let config = b"{}".to_vec();
    let text = b"just text".to_vec();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.config+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "text/plain", "digest": digest(&text), "size": text.len()}],
    });
    push_raw(
        &registry,
        "odd/thing",
        "v1",
        manifest.to_string().as_bytes(),
        OCI_MANIFEST,
        vec![config, text],
    );
    let not_wasm = b"#!/bin/sh\necho not wasm\n".to_vec();
    skopeo_push_image(
        &registry,
        "odd/script:v1",
        vec![tar_layer(&[("plugin.wasm", &not_wasm)], true)],
        OCI_TAR_GZIP,
        ImageFormat::Oci,
    );
    skopeo_push_image(
        &registry,
        "odd/empty:v1",
        vec![tar_layer(
            &[("bin/sh", b"x"), ("etc/passwd", b"root")],
            true,
        )],
        OCI_TAR_GZIP,
        ImageFormat::Oci,
    );
    let cache = Cache::new(&[&addr]);

    let error = cache.pull_err(&format!("{addr}/odd/thing:v1"));
    assert!(error.contains("unsupported media type"), "{error}");
    assert!(
        error.contains("application/vnd.example.config+json"),
        "{error}"
    );
    assert!(error.contains("text/plain"), "{error}");
    let error = cache.pull_err(&format!("{addr}/odd/script:v1"));
    assert!(error.contains("is not WebAssembly"), "{error}");
    assert!(error.contains("magic number"), "{error}");
    let error = cache.pull_err(&format!("{addr}/odd/empty:v1"));
    assert!(error.contains("no plugin.wasm"), "{error}");
    assert!(error.contains("bin/sh, etc/passwd"), "{error}");
    cache.assert_untouched();
}

#[test]
fn tar_entries_outside_the_root_or_not_regular_are_ignored() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(64, 11);
    let evil = module(64, 12);
    let layer = tar_entries(
        &[
            TarEntry::File("../plugin.wasm", &evil),
            TarEntry::Symlink("plugin.wasm", "/etc/passwd"),
            TarEntry::Dir("filter"),
            TarEntry::File("filter/plugin.wasm", &wasm),
        ],
        true,
    );
    skopeo_push_image(
        &registry,
        "tar/tricks:v1",
        vec![layer],
        OCI_TAR_GZIP,
        ImageFormat::Oci,
    );
    let cache = Cache::new(&[&addr]);
    assert_module(
        &cache.pull(&format!("{addr}/tar/tricks:v1")),
        &wasm,
        "oci-image",
    );
    assert_eq!(cache.blob_files().len(), 1);
}

#[test]
fn a_gzip_bomb_stops_at_the_layer_limit() {
    let registry = Registry::start();
    let addr = registry.addr();
    // 64 MiB of zeros compress to a few dozen KiB; the limit is set to 16 MiB.
    let zeros = vec![0u8; 64 << 20];
    let layer = tar_layer(
        &[("padding.bin", &zeros), ("plugin.wasm", &module(0, 0))],
        true,
    );
    assert!(layer.len() < 1 << 20);
    skopeo_push_image(
        &registry,
        "bomb/gz:v1",
        vec![layer],
        OCI_TAR_GZIP,
        ImageFormat::Oci,
    );
    let mut cache = Cache::new(&[&addr]);
    let config = cache.dir.path().join("wasmcache.toml");
    fs::write(&config, "[limits]\nmax_layer_bytes = 16777216\n").unwrap();
    cache.extra = vec!["--config".into(), config.display().to_string()];

    let error = cache.pull_err(&format!("{addr}/bomb/gz:v1"));
    assert!(
        error.contains("decompresses to more than 16777216 bytes"),
        "{error}"
    );
    cache.assert_untouched();
}

#[test]
fn modules_over_the_size_limit_are_refused_before_download() {
    let registry = Registry::start();
    let addr = registry.addr();
    oras_push_cncf(&registry, "big/f:v1", &module(100_000, 13));
    let mut cache = Cache::new(&[&addr]);
    let config = cache.dir.path().join("wasmcache.toml");
    fs::write(&config, "[limits]\nmax_module_bytes = 65536\n").unwrap();
    cache.extra = vec!["--config".into(), config.display().to_string()];

    let error = cache.pull_err(&format!("{addr}/big/f:v1"));
    assert!(error.contains("over the limit of 65536"), "{error}");
    assert_eq!(registry.blob_gets(Some("big/f")), 0);
    cache.assert_untouched();
}

#[test]
fn unknown_config_keys_are_named() {
    let cache = Cache::new(&[]);
    let config = cache.dir.path().join("wasmcache.toml");
    fs::write(&config, "[limits]\nmax_module_byte = 1\n").unwrap();
    let (_, error) = run_err(&mut cache.command(&[
        "--config",
        config.to_str().unwrap(),
        "pull",
        "example.com/a:v1",
    ]));
    assert!(error.contains("max_module_byte"), "{error}");
    assert!(error.contains("wasmcache.toml"), "{error}");
}

/// An image whose module layer is served by `behaviour`.
fn faulty_cncf_image(good: &[u8], behaviour: Behaviour) -> FaultyServer {
    let config = br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": digest(good), "size": good.len()}],
    });
    FaultyServer::serve_image(
        "faulty/f",
        "v1",
        manifest.to_string().as_bytes(),
        OCI_MANIFEST,
        vec![
            (digest(&config), Behaviour::blob(config.clone())),
            (digest(good), behaviour),
        ],
    )
}

#[test]
fn a_blob_with_wrong_bytes_is_refused_and_leaves_nothing() {
    let good = module(100_000, 14);
    let mut evil = good.clone();
    let last = evil.len() - 1;
    evil[last] ^= 0xff;
    // Blobs are asked for whole (no `Range`), hashed by the store as they are written, and
    // checked against the descriptor before anything is committed.
    let server = faulty_cncf_image(&good, Behaviour::blob(evil.clone()));
    let cache = Cache::new(&[&server.addr()]);
    let error = cache.pull_err(&format!("{}/faulty/f:v1", server.addr()));
    assert!(error.contains(&digest(&good)), "{error}");
    assert!(
        error.contains(&format!("content hashed to {}", digest(&evil))),
        "{error}"
    );
    cache.assert_untouched();
    assert_eq!(run_ok(&mut cache.command(&["ls", "--json"])).trim(), "[]");
    let ranges = server
        .requests()
        .into_iter()
        .filter(|request| request.headers.iter().any(|(name, _)| name == "range"))
        .count();
    assert_eq!(ranges, 0, "blobs are asked for whole");
}

#[test]
fn a_truncated_blob_is_refused_and_leaves_nothing() {
    let good = module(100_000, 15);
    let server = faulty_cncf_image(&good, Behaviour::truncate(good.clone(), 50_000));
    let cache = Cache::new(&[&server.addr()]);

    let error = cache.pull_err(&format!("{}/faulty/f:v1", server.addr()));
    assert!(error.contains(&digest(&good)), "{error}");
    cache.assert_untouched();
}

#[test]
fn a_blob_longer_than_its_descriptor_is_refused() {
    let good = module(1000, 16);
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    let server = faulty_cncf_image(&good, Behaviour::blob(longer));
    let cache = Cache::new(&[&server.addr()]);

    let error = cache.pull_err(&format!("{}/faulty/f:v1", server.addr()));
    assert!(error.contains("the manifest says 1"), "{error}");
    cache.assert_untouched();
}

#[test]
fn a_registry_error_status_is_reported_with_the_url() {
    let good = module(10, 17);
    let server = faulty_cncf_image(&good, Behaviour::Status(500));
    let cache = Cache::new(&[&server.addr()]);

    let error = cache.pull_err(&format!("{}/faulty/f:v1", server.addr()));
    assert!(error.contains("returned 500"), "{error}");
    assert!(
        error.contains(&format!("/v2/faulty/f/blobs/{}", digest(&good))),
        "{error}"
    );
    cache.assert_untouched();
}

#[test]
fn mirrors_are_asked_first_and_the_origin_when_they_fail() {
    let origin = Registry::start();
    let mirror = Registry::start();
    let only_on_mirror = module(3000, 31);
    let only_on_origin = module(3000, 32);
    oras_push_cncf(&mirror, "mir/a:v1", &only_on_mirror);
    oras_push_cncf(&origin, "mir/b:v1", &only_on_origin);
    // A mirror that is down comes first: it is skipped.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut cache = Cache::new(&[&origin.addr(), &mirror.addr(), &dead]);
    cache.use_config(&format!(
        "[registry_mirrors]\n\"{}\" = [\"{dead}\", \"{}\"]\n",
        origin.addr(),
        mirror.addr()
    ));

    // On the mirror only: served from it, with no request to the origin for it.
    let a = cache.pull(&format!("{}/mir/a:v1", origin.addr()));
    assert_eq!(a["digest"], digest(&only_on_mirror));
    assert_eq!(a["reference"], format!("{}/mir/a:v1", origin.addr()));
    assert_eq!(mirror.blob_gets(Some("mir/a")), 1);
    assert_eq!(origin.count("GET", "/v2/mir/a/"), 0);

    // Not on the mirror (404): the origin answers.
    let b = cache.pull(&format!("{}/mir/b:v1", origin.addr()));
    assert_eq!(b["digest"], digest(&only_on_origin));
    assert_eq!(origin.blob_gets(Some("mir/b")), 1);
    assert!(mirror.count("GET", "/v2/mir/b/manifests/v1") >= 1);

    // Nowhere: the origin's error is the one reported.
    let error = cache.pull_err(&format!("{}/mir/c:v1", origin.addr()));
    assert!(error.contains(&origin.addr()), "{error}");
    assert!(error.contains("not found"), "{error}");
}

#[test]
fn a_mirror_serving_bad_bytes_is_overruled_by_the_registry() {
    let good = module(5000, 33);
    let mut bad = good.clone();
    bad[100] ^= 0x55;
    let config = br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                   "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": digest(&good), "size": good.len()}],
    })
    .to_string()
    .into_bytes();
    let origin = Registry::start();
    push_raw(
        &origin,
        "mir/bad",
        "v1",
        &manifest,
        OCI_MANIFEST,
        vec![config.clone(), good.clone()],
    );
    let mirror = FaultyServer::serve_image(
        "mir/bad",
        "v1",
        &manifest,
        OCI_MANIFEST,
        vec![
            (digest(&config), Behaviour::blob(config.clone())),
            (digest(&good), Behaviour::blob(bad)),
        ],
    );
    let mut cache = Cache::new(&[&origin.addr(), &mirror.addr()]);
    cache.use_config(&format!(
        "[registry_mirrors]\n\"{}\" = [\"{}\"]\n",
        origin.addr(),
        mirror.addr()
    ));

    let pulled = cache.pull(&format!("{}/mir/bad:v1", origin.addr()));
    assert_eq!(pulled["digest"], digest(&good));
    assert_eq!(fs::read(pulled["path"].as_str().unwrap()).unwrap(), good);
    let blob_path = format!("/v2/mir/bad/blobs/{}", digest(&good));
    assert_eq!(
        mirror.count("GET", &blob_path),
        1,
        "the mirror was asked first"
    );
    assert_eq!(origin.blob_gets(Some("mir/bad")), 1, "then the registry");
    assert_eq!(cache.blob_files().len(), 1);
}

#[test]
fn a_partial_answer_to_a_whole_blob_request_is_refused() {
    let good = module(100_000, 34);
    let half = good[..50_000].to_vec();
    let partial = Behaviour::Ok {
        status: 206,
        headers: vec![(
            "Content-Range".into(),
            format!("bytes 0-49999/{}", good.len()),
        )],
        body: half,
    };
    let server = faulty_cncf_image(&good, partial);
    let cache = Cache::new(&[&server.addr()]);

    let error = cache.pull_err(&format!("{}/faulty/f:v1", server.addr()));
    assert!(error.contains("206"), "{error}");
    cache.assert_untouched();
    let path = format!("/v2/faulty/f/blobs/{}", digest(&good));
    assert_eq!(server.count("GET", &path), 1);
}

#[test]
fn a_mirror_gets_its_own_request_headers_and_its_bytes_are_still_checked() {
    let config = br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec();
    let manifest_of = |module: &[u8]| {
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                       "digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": "application/wasm", "digest": digest(module),
                        "size": module.len()}],
        })
        .to_string()
        .into_bytes()
    };
    let (first, second) = (module(5000, 35), module(5000, 36));
    let origin = Registry::start();
    for (repo, module) in [("mirh/good", &first), ("mirh/bad", &second)] {
        let blobs = vec![config.clone(), module.clone()];
        push_raw(
            &origin,
            repo,
            "v1",
            &manifest_of(module),
            OCI_MANIFEST,
            blobs,
        );
    }
    // A Dragonfly-like mirror: it serves `mirh/good` as published, and `mirh/bad` with other
    // bytes for the module.
    let mirror = FaultyServer::serve_image(
        "mirh/good",
        "v1",
        &manifest_of(&first),
        OCI_MANIFEST,
        vec![
            (digest(&config), Behaviour::blob(config.clone())),
            (digest(&first), Behaviour::blob(first.clone())),
        ],
    );
    let bad_manifest = manifest_of(&second);
    let manifest_answer = Behaviour::Ok {
        status: 200,
        headers: vec![
            ("Content-Type".into(), OCI_MANIFEST.into()),
            ("Docker-Content-Digest".into(), digest(&bad_manifest)),
        ],
        body: bad_manifest,
    };
    mirror.route("/v2/mirh/bad/manifests/v1", manifest_answer);
    let mut bad = second.clone();
    bad[200] ^= 0x11;
    let bad_path = format!("/v2/mirh/bad/blobs/{}", digest(&second));
    mirror.route(&bad_path, Behaviour::ok(bad));
    let mut cache = Cache::new(&[&origin.addr(), &mirror.addr()]);
    cache.use_config(&format!(
        "[registry_mirrors]\n\"{o}\" = [\"{m}\"]\n\
         [mirror_headers.\"{m}\"]\n\"X-Dragonfly-Registry\" = \"http://{{registry}}\"\n",
        o = origin.addr(),
        m = mirror.addr(),
    ));

    let pulled = cache.pull(&format!("{}/mirh/good:v1", origin.addr()));
    assert_eq!(pulled["digest"], digest(&first));
    let requests = mirror.requests();
    assert!(
        requests.len() >= 2,
        "the mirror was not asked: {requests:?}"
    );
    let upstream = format!("http://{}", origin.addr());
    for request in &requests {
        let header = request.header("x-dragonfly-registry");
        assert_eq!(header, Some(upstream.as_str()), "{request:?}");
        assert_eq!(request.header("authorization"), None, "{request:?}");
    }
    assert_eq!(
        origin.blob_gets(Some("mirh/good")),
        0,
        "served by the mirror"
    );

    // Bad bytes from such a mirror are refused, and the registry serves the module.
    let pulled = cache.pull(&format!("{}/mirh/bad:v1", origin.addr()));
    assert_eq!(pulled["digest"], digest(&second));
    assert_eq!(fs::read(pulled["path"].as_str().unwrap()).unwrap(), second);
    assert_eq!(
        mirror.count("GET", &bad_path),
        1,
        "the mirror was asked first"
    );
    assert_eq!(origin.blob_gets(Some("mirh/bad")), 1, "then the registry");
}

#[test]
fn a_star_in_insecure_registries_means_every_registry() {
    let registry = Registry::start();
    let wasm = module(1000, 41);
    let pushed = oras_push_cncf(&registry, "star/f:v1", &wasm);
    let reference = format!("{}/star/f:v1", registry.addr());
    // HTTPS to this plain-HTTP registry fails; `*` (as Istio's WASM_INSECURE_REGISTRIES) speaks
    // plain HTTP to every registry.
    let error = Cache::new(&[]).pull_err(&reference);
    assert!(error.contains(&registry.addr()), "{error}");
    let pulled = Cache::new(&["*"]).pull(&reference);
    assert_eq!(pulled["digest"], digest(&wasm));
    assert_eq!(pulled["resolved_digest"], pushed.digest);
}

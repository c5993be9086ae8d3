//! Checks that the harness itself works against the real tools: fixtures land in a real
//! registry with the expected media types, request counting is exact, and the faulty server
//! really truncates and stalls.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::fixtures::{self, *};
use super::http::Endpoint;
use super::{cli, wasm, Behaviour, FaultyServer, ImageFormat, Registry};

/// Fetches blob `digest` of `repo` and returns its bytes, asserting a 200.
fn get_blob(endpoint: &Endpoint, repo: &str, digest: &str) -> Vec<u8> {
    let response = endpoint.get(&format!("/v2/{repo}/blobs/{digest}"), &[]);
    assert_eq!(response.status, 200, "blob {digest}: {}", response.text());
    response.body
}

/// Sends a raw `GET path` and reads until EOF or until `timeout` passes without data.
fn raw_get(addr: &str, path: &str, timeout: Duration) -> (String, Vec<u8>, bool) {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    stream.set_read_timeout(Some(timeout)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let timed_out = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break false,
            Ok(read) => received.extend_from_slice(&chunk[..read]),
            Err(_) => break true,
        }
    };
    let split = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8_lossy(&received[..split]).into_owned();
    (head, received[split..].to_vec(), timed_out)
}

#[test]
fn wasm_modules_are_valid_and_seeded() {
    let small = wasm::module(0, 0);
    assert_eq!(small.len(), 41);
    wasmparser::validate(&small).expect("small module validates");

    let big = wasm::module(1 << 20, 7);
    assert!(big.len() > 1 << 20 && big.len() < (1 << 20) + 64);
    assert!(big.starts_with(&[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]));
    wasmparser::validate(&big).expect("big module validates");
    assert_eq!(big, wasm::module(1 << 20, 7));
    assert_ne!(big, wasm::module(1 << 20, 8));
    assert_eq!(
        wasm::digest(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn oras_pushes_cncf_and_wasme_artifacts() {
    let registry = Registry::start();
    let endpoint = registry.endpoint();
    let module = wasm::module(1000, 1);

    let cncf = oras_push_cncf(&registry, "wasm/cncf:v1", &module);
    assert_eq!(cncf.media_type, OCI_MANIFEST);
    let manifest = cncf.json();
    assert_eq!(manifest["config"]["mediaType"], CNCF_CONFIG);
    assert_eq!(manifest["layers"][0]["mediaType"], CNCF_LAYER);
    assert_eq!(cncf.layer_digests(), vec![wasm::digest(&module)]);
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&get_blob(&endpoint, "wasm/cncf", config_digest)).unwrap();
    assert_eq!(config["layerDigests"][0], wasm::digest(&module).as_str());

    let wasme = oras_push_wasme(&registry, "wasm/wasme:v1", &module, WASME_CONFIG_JSON);
    let manifest = wasme.json();
    assert_eq!(manifest["config"]["mediaType"], WASME_CONFIG);
    assert_eq!(manifest["layers"][0]["mediaType"], WASME_LAYER);
    assert_eq!(
        get_blob(&endpoint, "wasm/wasme", &wasm::digest(&module)),
        module
    );

    let out = tempfile::tempdir().unwrap();
    let files = oras_pull(&registry, "wasm/cncf:v1", out.path());
    assert_eq!(files, vec![out.path().join("module.wasm")]);
    assert_eq!(std::fs::read(&files[0]).unwrap(), module);
}

#[test]
fn skopeo_pushes_oci_docker_and_index() {
    let registry = Registry::start();
    let module = wasm::module(100, 2);
    let layer = tar_layer(&[("plugin.wasm", &module)], true);

    let oci = skopeo_push_image(
        &registry,
        "img/oci:v1",
        vec![layer.clone()],
        OCI_LAYER_TAR_GZIP,
        ImageFormat::Oci,
    );
    assert_eq!(oci.media_type, OCI_MANIFEST);
    assert_eq!(oci.json()["config"]["mediaType"], OCI_CONFIG);
    assert_eq!(oci.json()["layers"][0]["mediaType"], OCI_LAYER_TAR_GZIP);
    assert_eq!(oci.layer_digests(), vec![wasm::digest(&layer)]);

    let docker = skopeo_push_image(
        &registry,
        "img/docker:v1",
        vec![layer.clone()],
        OCI_LAYER_TAR_GZIP,
        ImageFormat::DockerV2S2,
    );
    assert_eq!(docker.media_type, DOCKER_MANIFEST);
    assert_eq!(docker.json()["config"]["mediaType"], DOCKER_CONFIG);
    assert_eq!(
        docker.json()["layers"][0]["mediaType"],
        DOCKER_LAYER_TAR_GZIP
    );
    assert_eq!(docker.layer_digests(), vec![wasm::digest(&layer)]);

    let index = skopeo_push_index(
        &registry,
        "img/multi:v1",
        vec![
            ("linux", "amd64", vec![layer.clone()]),
            ("wasip1", "wasm", vec![module.clone()]),
        ],
    );
    assert_eq!(index.media_type, OCI_INDEX);
    let platforms: Vec<String> = index.json()["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let platform = &entry["platform"];
            format!(
                "{}/{}",
                platform["os"].as_str().unwrap(),
                platform["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "wasip1/wasm"]);
    let wasm_entry = index.json()["manifests"][1]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let image = fetch_manifest(&registry, "img/multi", &wasm_entry);
    assert_eq!(image.json()["layers"][0]["mediaType"], CNCF_LAYER);
    assert_eq!(image.layer_digests(), vec![wasm::digest(&module)]);
}

#[test]
fn push_raw_stores_manifests_verbatim() {
    let registry = Registry::start();
    let module = wasm::module(0, 0);
    let config = br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec();
    // The layer claims a wrong size: distribution stores it regardless.
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CNCF_CONFIG, "digest": wasm::digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/x-unknown", "digest": wasm::digest(&module), "size": 7}],
    })
    .to_string();
    let pushed = push_raw(
        &registry,
        "raw/odd",
        "v1",
        manifest.as_bytes(),
        OCI_MANIFEST,
        vec![config, module],
    );
    let fetched = fetch_manifest(&registry, "raw/odd", "v1");
    assert_eq!(fetched.bytes, manifest.as_bytes());
    assert_eq!(fetched.digest, pushed.digest);
    assert_eq!(
        fetch_manifest(&registry, "raw/odd", &pushed.digest).bytes,
        fetched.bytes
    );
}

#[test]
fn registry_counts_each_request_once() {
    let registry = Registry::start();
    let endpoint = registry.endpoint();
    let blob = wasm::module(10, 3);
    let blob_digest = push_blob(&endpoint, "count/me", &blob);
    assert_eq!(registry.blob_gets(None), 0);

    assert_eq!(get_blob(&endpoint, "count/me", &blob_digest), blob);
    assert_eq!(get_blob(&endpoint, "count/me", &blob_digest), blob);
    let head = endpoint.request(
        "HEAD",
        &format!("/v2/count/me/blobs/{blob_digest}"),
        &[],
        None,
    );
    assert_eq!(head.status, 200);

    assert_eq!(registry.blob_gets(Some("count/me")), 2);
    assert_eq!(registry.blob_gets(Some("count")), 0);
    assert_eq!(registry.blob_gets(None), 2);
    assert_eq!(registry.count("HEAD", "/blobs/"), 1);
    assert_eq!(registry.manifest_gets(None), 0);
    let missing = endpoint.get("/v2/count/me/manifests/nope", &[]);
    assert_eq!(missing.status, 404);
    assert_eq!(registry.manifest_gets(Some("count/me")), 1);
    let logged = registry.requests();
    assert!(logged
        .iter()
        .any(|request| request.path == "/v2/count/me/manifests/nope"
            && request.method == "GET"
            && request.status == 404));
}

#[test]
fn registry_restarts_with_its_storage() {
    let mut registry = Registry::start();
    let endpoint = registry.endpoint();
    let blob = wasm::module(10, 4);
    let blob_digest = push_blob(&endpoint, "restart/me", &blob);

    registry.stop();
    assert!(endpoint.try_request("GET", "/v2/", &[], None).is_err());
    registry.restart();
    assert_eq!(registry.endpoint().addr, endpoint.addr);
    assert_eq!(get_blob(&endpoint, "restart/me", &blob_digest), blob);
    assert_eq!(registry.blob_gets(Some("restart/me")), 1);
    assert_eq!(registry.count("PUT", "/v2/restart/me/blobs/uploads/"), 1);
}

#[test]
fn registry_with_basic_auth_over_tls() {
    let registry = Registry::builder()
        .basic_auth("alice", "s3cret")
        .tls()
        .start();
    assert!(registry.url().starts_with("https://127.0.0.1:"));
    assert!(registry.ca_cert_path().is_file());
    let anonymous = Endpoint {
        credentials: None,
        ..registry.endpoint()
    };
    assert_eq!(anonymous.get("/v2/", &[]).status, 401);
    let wrong = registry.endpoint().with_credentials("alice", "wrong");
    assert_eq!(wrong.get("/v2/", &[]).status, 401);

    let module = wasm::module(10, 5);
    let cncf = oras_push_cncf(&registry, "secure/cncf:v1", &module);
    assert_eq!(cncf.layer_digests(), vec![wasm::digest(&module)]);
    let layer = tar_layer(&[("plugin.wasm", &module)], true);
    let docker = skopeo_push_image(
        &registry,
        "secure/docker:v1",
        vec![layer],
        OCI_LAYER_TAR_GZIP,
        ImageFormat::DockerV2S2,
    );
    assert_eq!(docker.media_type, DOCKER_MANIFEST);
    assert!(registry.count("GET", "/v2/") >= 2);
}

#[test]
fn tar_layers_can_hold_unsafe_entries() {
    let layer = fixtures::tar_entries(
        &[
            TarEntry::Dir("etc/"),
            TarEntry::File("../evil", b"x"),
            TarEntry::Symlink("plugin.wasm", "/etc/passwd"),
        ],
        true,
    );
    let plain = flate2::read::GzDecoder::new(layer.as_slice());
    let mut archive = tar::Archive::new(plain);
    let entries: Vec<(String, tar::EntryType)> = archive
        .entries()
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            (path, entry.header().entry_type())
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("etc/".to_owned(), tar::EntryType::Directory),
            ("../evil".to_owned(), tar::EntryType::Regular),
            ("plugin.wasm".to_owned(), tar::EntryType::Symlink),
        ]
    );
}

#[test]
fn faulty_server_truncates_stalls_and_sequences() {
    let body = wasm::module(10_000, 6);
    let server = FaultyServer::serve_image(
        "faulty/img",
        "v1",
        b"{}",
        OCI_MANIFEST,
        vec![
            ("sha256:aa".into(), Behaviour::truncate(body.clone(), 100)),
            ("sha256:bb".into(), Behaviour::stall(body.clone(), 200)),
        ],
    );
    let addr = server.addr();

    let (head, received, timed_out) = raw_get(
        &addr,
        "/v2/faulty/img/blobs/sha256:aa",
        Duration::from_secs(5),
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert_eq!(received, body[..100]);
    assert!(!timed_out, "truncation must close the connection");

    let (_, received, timed_out) = raw_get(
        &addr,
        "/v2/faulty/img/blobs/sha256:bb",
        Duration::from_millis(300),
    );
    assert_eq!(received, body[..200]);
    assert!(timed_out, "a stall must keep the connection open");

    let endpoint = Endpoint::plain(addr.as_str());
    let manifest = fetch_manifest(&endpoint, "faulty/img", "v1");
    assert_eq!(manifest.media_type, OCI_MANIFEST);
    assert_eq!(
        fetch_manifest(&endpoint, "faulty/img", &manifest.digest).bytes,
        b"{}"
    );
    let missing = endpoint.get("/v2/faulty/img/blobs/sha256:cc", &[]);
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("BLOB_UNKNOWN"));

    server.route_sequence(
        "/flaky",
        vec![Behaviour::Status(503), Behaviour::ok(b"fine".to_vec())],
    );
    assert_eq!(endpoint.get("/flaky", &[]).status, 503);
    assert_eq!(endpoint.get("/flaky?again", &[]).body, b"fine");
    assert_eq!(endpoint.get("/flaky", &[]).body, b"fine");
    assert_eq!(server.count("GET", "/flaky"), 3);
    assert_eq!(server.count("GET", "/blobs/"), 3);
}

#[test]
fn cli_command_is_isolated() {
    let command = cli::wasmcache();
    let envs: Vec<(String, Option<String>)> = command
        .get_envs()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.map(|value| value.to_string_lossy().into_owned()),
            )
        })
        .collect();
    let home = envs
        .iter()
        .find(|(name, _)| name == "HOME")
        .and_then(|(_, value)| value.clone())
        .expect("HOME is set");
    assert!(home.starts_with(env!("CARGO_TARGET_TMPDIR")));
    assert!(envs.contains(&("DOCKER_CONFIG".to_owned(), None)));
}

//! Checks that the harness itself works against the real tools: fixtures land in a real
//! registry with the expected media types, request counting is exact, the faulty server
//! really truncates and stalls, and a token registry accepts exactly the tokens the in-process
//! token server should make it accept.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use super::fixtures::{self, *};
use super::http::{Endpoint, Response};
use super::token::{self, decode_jwt, fetch_token, form_encode, parse_bearer_challenge};
use super::{cli, wasm, Behaviour, FaultyServer, ImageFormat, Registry, TokenServer};

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

/// The Bearer challenge of a 401, panicking if there is none.
fn bearer_challenge(response: &Response) -> token::BearerChallenge {
    assert_eq!(
        response.status,
        401,
        "expected a challenge: {}",
        response.text()
    );
    let header = response
        .header("www-authenticate")
        .expect("401 without WWW-Authenticate");
    parse_bearer_challenge(header).unwrap_or_else(|| panic!("not a Bearer challenge: {header}"))
}

/// The token server's answer to `GET /token?QUERY` as status and JSON.
fn token_get(server: &TokenServer, credentials: Option<(&str, &str)>, query: &str) -> (u16, Value) {
    let mut endpoint = Endpoint::plain(server.addr());
    if let Some((user, password)) = credentials {
        endpoint = endpoint.with_credentials(user, password);
    }
    json_answer(endpoint.get(&format!("/token?{query}"), &[]))
}

/// The token server's answer to a `POST /token` form as status and JSON.
fn token_post(server: &TokenServer, form: &[(&str, &str)]) -> (u16, Value) {
    let body = form_encode(form);
    json_answer(Endpoint::plain(server.addr()).request(
        "POST",
        "/token",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(body.as_bytes()),
    ))
}

fn json_answer(response: Response) -> (u16, Value) {
    let json = serde_json::from_slice(&response.body)
        .unwrap_or_else(|error| panic!("token server sent {:?}: {error}", response.text()));
    (response.status, json)
}

/// The token of a 200 answer.
fn token_of((status, answer): (u16, Value)) -> String {
    assert_eq!(status, 200, "token request refused: {answer}");
    let token = answer["token"].as_str().expect("token").to_owned();
    assert_eq!(answer["access_token"], token.as_str());
    token
}

/// `GET path` at the registry with `Authorization: Bearer TOKEN` (or none) and no basic auth.
fn bearer_get(registry: &Registry, path: &str, token: Option<&str>) -> Response {
    let anonymous = Endpoint {
        credentials: None,
        ..registry.endpoint()
    };
    let bearer = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("Accept", MANIFEST_ACCEPT)];
    if let Some(bearer) = &bearer {
        headers.push(("Authorization", bearer));
    }
    anonymous.get(path, &headers)
}

/// `TYPE:NAME:ACTIONS` with the actions sorted.
fn sorted_scope(scope: &str) -> String {
    let (resource, actions) = scope.rsplit_once(':').expect("TYPE:NAME:ACTIONS");
    let mut actions: Vec<&str> = actions.split(',').collect();
    actions.sort_unstable();
    format!("{resource}:{}", actions.join(","))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn token_registry_challenges_with_the_token_realm() {
    let server = TokenServer::start(&[("alice", "s3cret")]);
    let mut registry = Registry::builder().token_auth(&server).start();
    assert_eq!(registry.token_realm(), Some(server.realm().as_str()));
    assert_eq!(registry.credentials(), Some(("alice", "s3cret")));
    assert_eq!(
        server.realm(),
        format!("http://127.0.0.1:{}/token", server.port())
    );

    let anonymous = bearer_get(&registry, "/v2/", None);
    let challenge = bearer_challenge(&anonymous);
    assert_eq!(challenge.realm, server.realm());
    assert_eq!(challenge.service.as_deref(), Some(server.service()));
    assert_eq!(challenge.scope, None);
    // Basic credentials are no use at a token registry.
    let basic = registry.endpoint().get("/v2/", &[]);
    assert_eq!(bearer_challenge(&basic).realm, server.realm());

    let manifest = bearer_get(&registry, "/v2/some/repo/manifests/v1", None);
    assert_eq!(
        bearer_challenge(&manifest).scope.as_deref(),
        Some("repository:some/repo:pull")
    );
    let upload = Endpoint {
        credentials: None,
        ..registry.endpoint()
    }
    .request("POST", "/v2/some/repo/blobs/uploads/", &[], None);
    // Distribution lists the actions of a challenge in random order (a Go map).
    let upload_scope = bearer_challenge(&upload)
        .scope
        .expect("upload challenge scope");
    assert_eq!(
        sorted_scope(&upload_scope),
        "repository:some/repo:pull,push"
    );
    assert_eq!(
        server.count(),
        0,
        "the registry never calls the token server"
    );

    // The fixture helpers follow the challenge to the realm with the registry's credentials.
    let blob = wasm::module(10, 11);
    let blob_digest = push_blob(&registry, "some/repo", &blob);
    assert!(server.requests().iter().any(|request| request
        .scopes
        .iter()
        .map(|scope| sorted_scope(scope))
        .eq(["repository:some/repo:pull,push"])
        && request.user.as_deref() == Some("alice")
        && request.status == 200));

    let named = Registry::builder()
        .token_auth(&server)
        .token_realm(&server.realm_on("localhost"))
        .start();
    let localhost = format!("http://localhost:{}/token", server.port());
    assert_eq!(
        bearer_challenge(&bearer_get(&named, "/v2/", None)).realm,
        localhost
    );

    registry.set_token_realm("http://169.254.169.254/token");
    let moved = bearer_challenge(&bearer_get(&registry, "/v2/", None));
    assert_eq!(moved.realm, "http://169.254.169.254/token");
    // Same storage and trust after the restart: a token from the real server still reads it.
    let token = fetch_token(
        &token::BearerChallenge {
            realm: server.realm(),
            service: moved.service,
            scope: Some("repository:some/repo:pull".into()),
            error: None,
        },
        registry.credentials(),
    );
    let fetched = bearer_get(
        &registry,
        &format!("/v2/some/repo/blobs/{blob_digest}"),
        Some(&token),
    );
    assert_eq!(fetched.status, 200, "{}", fetched.text());
    assert_eq!(fetched.body, blob);
}

#[test]
fn token_from_the_token_server_opens_a_token_registry() {
    let server = TokenServer::start(&[("alice", "s3cret"), ("bob", "hunter2")]);
    // Over TLS, so that the tools also cope with an https registry and an http realm.
    let registry = Registry::builder().token_auth(&server).tls().start();
    assert!(registry.url().starts_with("https://"));
    let module = wasm::module(1000, 12);

    let cncf = oras_push_cncf(&registry, "wasm/cncf:v1", &module);
    assert_eq!(cncf.layer_digests(), vec![wasm::digest(&module)]);
    let out = tempfile::tempdir().unwrap();
    let files = oras_pull(&registry, "wasm/cncf:v1", out.path());
    assert_eq!(files, vec![out.path().join("module.wasm")]);
    assert_eq!(std::fs::read(&files[0]).unwrap(), module);
    let layer = tar_layer(&[("plugin.wasm", &module)], true);
    let docker = skopeo_push_image(
        &registry,
        "img/docker:v1",
        vec![layer],
        OCI_LAYER_TAR_GZIP,
        ImageFormat::DockerV2S2,
    );
    assert_eq!(docker.media_type, DOCKER_MANIFEST);
    let requests = server.requests();
    for repo in ["wasm/cncf", "img/docker"] {
        let scope = format!("repository:{repo}:pull,push");
        assert!(
            requests
                .iter()
                .any(|request| request.scopes == [scope.clone()]
                    && request.user.as_deref() == Some("alice")
                    && request.authorization
                    && request.status == 200),
            "no authenticated push token for {repo}: {requests:#?}"
        );
    }
    assert!(!format!("{requests:?}").contains("s3cret"));

    // A pull token for wasm/cncf, fetched with curl and basic credentials.
    let query = form_encode(&[
        ("service", server.service()),
        ("scope", "repository:wasm/cncf:pull"),
    ]);
    let (status, answer) = token_get(&server, Some(("bob", "hunter2")), &query);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["expires_in"], 300);
    let issued_at = answer["issued_at"].as_str().expect("issued_at");
    humantime::parse_rfc3339(issued_at).expect("issued_at is RFC 3339");
    let token = token_of((status, answer));
    let (header, claims) = decode_jwt(&token);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    let cert = std::fs::read_to_string(server.cert_path()).unwrap();
    let der: String = cert
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    assert_eq!(header["x5c"], serde_json::json!([der]));
    assert_eq!(claims["iss"], server.issuer());
    assert_eq!(claims["aud"], server.service());
    assert_eq!(claims["sub"], "bob");
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "wasm/cncf", "actions": ["pull"]}])
    );
    let exp = claims["exp"].as_i64().unwrap();
    assert_eq!(exp - claims["iat"].as_i64().unwrap(), 300);
    assert!((exp - unix_now() - 300).abs() <= 5);

    assert_eq!(bearer_get(&registry, "/v2/", Some(&token)).status, 200);
    let manifest_path = "/v2/wasm/cncf/manifests/v1";
    let manifest = bearer_get(&registry, manifest_path, Some(&token));
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    assert_eq!(manifest.body, cncf.bytes);
    let blob_path = format!("/v2/wasm/cncf/blobs/{}", wasm::digest(&module));
    let blob = bearer_get(&registry, &blob_path, Some(&token));
    assert_eq!(blob.status, 200, "{}", blob.text());
    assert_eq!(blob.body, module);
    assert_eq!(bearer_get(&registry, manifest_path, None).status, 401);
    assert_eq!(bearer_get(&registry, &blob_path, None).status, 401);
    // The token is scoped: no other repository, no push.
    let other = bearer_get(&registry, "/v2/img/docker/manifests/v1", Some(&token));
    assert_eq!(
        bearer_challenge(&other).error.as_deref(),
        Some("insufficient_scope")
    );
    let bearer = format!("Bearer {token}");
    let push = Endpoint {
        credentials: None,
        ..registry.endpoint()
    }
    .request(
        "POST",
        "/v2/wasm/cncf/blobs/uploads/",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(push.status, 401, "{}", push.text());

    // Anonymous: nothing by default, pull only with anonymous pull on.
    let anonymous_query = form_encode(&[
        ("service", server.service()),
        ("scope", "repository:wasm/cncf:pull,push"),
    ]);
    let nothing = token_of(token_get(&server, None, &anonymous_query));
    assert_eq!(decode_jwt(&nothing).1["access"], serde_json::json!([]));
    assert_eq!(decode_jwt(&nothing).1["sub"], "");
    assert_eq!(bearer_get(&registry, "/v2/", Some(&nothing)).status, 200);
    assert_eq!(
        bearer_get(&registry, manifest_path, Some(&nothing)).status,
        401
    );
    server.set_anonymous_pull(true);
    let pull = token_of(token_get(&server, None, &anonymous_query));
    assert_eq!(
        decode_jwt(&pull).1["access"],
        serde_json::json!([{"type": "repository", "name": "wasm/cncf", "actions": ["pull"]}])
    );
    assert_eq!(
        bearer_get(&registry, manifest_path, Some(&pull)).status,
        200
    );
    let last = server.requests().pop().unwrap();
    assert_eq!(last.method, "GET");
    assert_eq!(last.scopes, ["repository:wasm/cncf:pull,push"]);
    assert_eq!(last.service.as_deref(), Some(server.service()));
    assert_eq!((last.user, last.authorization), (None, false));
    assert_eq!(last.subject.as_deref(), Some(""));
}

#[test]
fn expired_and_foreign_tokens_are_refused_by_the_registry() {
    let server = TokenServer::start(&[("alice", "s3cret")]);
    let registry = Registry::builder().token_auth(&server).start();
    let blob = wasm::module(10, 13);
    let blob_path = format!(
        "/v2/exp/repo/blobs/{}",
        push_blob(&registry, "exp/repo", &blob)
    );
    let query = form_encode(&[
        ("service", server.service()),
        ("scope", "repository:exp/repo:pull"),
    ]);
    let alice = Some(("alice", "s3cret"));

    server.set_issue_expired(true);
    let (status, answer) = token_get(&server, alice, &query);
    assert_eq!(answer["expires_in"], 300, "{answer}");
    let expired = token_of((status, answer));
    let claims = decode_jwt(&expired).1;
    assert!(
        claims["exp"].as_i64().unwrap() < unix_now() - 600,
        "{claims}"
    );
    let refused = bearer_get(&registry, &blob_path, Some(&expired));
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(
        bearer_challenge(&refused).error.as_deref(),
        Some("invalid_token")
    );
    assert_eq!(bearer_get(&registry, "/v2/", Some(&expired)).status, 401);

    server.set_issue_expired(false);
    server.set_expires_in(5);
    let (status, answer) = token_get(&server, alice, &query);
    assert_eq!(answer["expires_in"], 5, "{answer}");
    let fresh = token_of((status, answer));
    let claims = decode_jwt(&fresh).1;
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        5
    );
    let accepted = bearer_get(&registry, &blob_path, Some(&fresh));
    assert_eq!(accepted.status, 200, "{}", accepted.text());
    assert_eq!(accepted.body, blob);

    // Same issuer, service and claims, but signed by a key the registry does not trust.
    let impostor = TokenServer::start(&[("alice", "s3cret")]);
    let foreign = token_of(token_get(&impostor, alice, &query));
    assert_eq!(decode_jwt(&foreign).1["access"], claims["access"]);
    assert_eq!(
        bearer_get(&registry, &blob_path, Some(&foreign)).status,
        401
    );
}

#[test]
fn token_server_grants_refresh_and_password_and_refuses_wrong_credentials() {
    let server = TokenServer::start(&[("alice", "s3cret")]);
    let registry = Registry::builder().token_auth(&server).start();
    let blob = wasm::module(10, 14);
    let blob_path = format!(
        "/v2/grant/repo/blobs/{}",
        push_blob(&registry, "grant/repo", &blob)
    );
    let scope = "repository:grant/repo:pull";
    let query = form_encode(&[("service", server.service()), ("scope", scope)]);
    let before = server.count();

    let (status, _) = token_get(&server, Some(("alice", "wrong-pw")), &query);
    assert_eq!(status, 401);
    let (status, _) = token_get(&server, Some(("mallory", "s3cret")), &query);
    assert_eq!(status, 401);
    let password = |password: &str, offline: &str| {
        token_post(
            &server,
            &[
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", password),
                ("service", server.service()),
                ("scope", scope),
                ("client_id", "wasmcache-test"),
                ("access_type", offline),
            ],
        )
    };
    assert_eq!(password("wrong-pw", "offline").0, 401);
    let (status, answer) = password("s3cret", "offline");
    assert_eq!(status, 200, "{answer}");
    let issued_refresh = answer["refresh_token"]
        .as_str()
        .expect("offline grant has a refresh token")
        .to_owned();
    assert!(password("s3cret", "online")
        .1
        .get("refresh_token")
        .is_none());

    let refresh = |refresh_token: &str| {
        token_post(
            &server,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("service", server.service()),
                ("scope", scope),
                ("client_id", "wasmcache-test"),
            ],
        )
    };
    assert_eq!(refresh("made-up-refresh-token").0, 401);
    server.add_refresh_token("handed-out-refresh-token", "alice");
    for refresh_token in ["handed-out-refresh-token", issued_refresh.as_str()] {
        let token = token_of(refresh(refresh_token));
        let claims = decode_jwt(&token).1;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
        let fetched = bearer_get(&registry, &blob_path, Some(&token));
        assert_eq!(fetched.status, 200, "{}", fetched.text());
        assert_eq!(fetched.body, blob);
    }
    let (status, answer) = token_post(&server, &[("grant_type", "client_credentials")]);
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = token_get(
        &server,
        Some(("alice", "s3cret")),
        &format!("{query}&offline_token=true"),
    );
    assert_eq!(status, 200);
    assert!(answer["refresh_token"].is_string(), "{answer}");

    let requests = &server.requests()[before..];
    let summary: Vec<(&str, Option<&str>, Option<&str>, u16)> = requests
        .iter()
        .map(|request| {
            (
                request.method.as_str(),
                request.grant_type.as_deref(),
                request.user.as_deref(),
                request.status,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("GET", None, Some("alice"), 401),
            ("GET", None, Some("mallory"), 401),
            ("POST", Some("password"), Some("alice"), 401),
            ("POST", Some("password"), Some("alice"), 200),
            ("POST", Some("password"), Some("alice"), 200),
            ("POST", Some("refresh_token"), None, 401),
            ("POST", Some("refresh_token"), None, 200),
            ("POST", Some("refresh_token"), None, 200),
            ("POST", Some("client_credentials"), None, 400),
            ("GET", None, Some("alice"), 200),
        ]
    );
    let refreshed = &requests[6];
    assert_eq!(
        refreshed.refresh_token.as_deref(),
        Some("handed-out-refresh-token")
    );
    assert_eq!(refreshed.client_id.as_deref(), Some("wasmcache-test"));
    assert_eq!(refreshed.scopes, [scope]);
    assert_eq!(refreshed.subject.as_deref(), Some("alice"));
    assert!(!refreshed.authorization);
    assert_eq!(requests[0].subject, None);
    assert!(requests[0].authorization);
    let logged = format!("{requests:?}");
    assert!(
        !logged.contains("s3cret") && !logged.contains("wrong-pw"),
        "{logged}"
    );
}

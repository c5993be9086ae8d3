//! Where modules come from besides registries, and what a caller may demand of any fetch:
//! http(s) module URLs (plain HTTP only for `insecure_registries`, raw, gzip, tar and tar+gzip
//! bodies, retries of 5xx, size limits, `ETag` re-checks like a tag's, stale answers), an
//! expected sha256 on a fetch (`DATA_LOSS` and nothing recorded when it does not match), and
//! addresses no fetch may reach (`blocked_cidrs`, link-local by default), checked after DNS.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tonic::Code;
use wasmcache::api::proto::{FetchRequest, FetchResponse, PullPolicy, StatRequest};

use crate::common::cli::{run_err, run_ok, wasmcache};
use crate::common::daemon::{unix_request, UnixResponse};
use crate::common::fixtures::{gzip_bytes, oras_push_cncf, skopeo_push_index, tar_layer};
use crate::common::wasm::{compressible_module, digest, module, sha256_hex};
use crate::common::{wait_until, Behaviour, Daemon, FaultyServer, Registry};

/// Longest any single call may take before the test fails instead of hanging.
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// The `format` of a module fetched from a URL.
const HTTP_FORMAT: &str = "http";

/// A module URL on `server`.
fn url(server: &FaultyServer, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

fn request(reference: &str, policy: PullPolicy) -> FetchRequest {
    FetchRequest {
        reference: reference.to_owned(),
        pull_policy: policy.into(),
        ..Default::default()
    }
}

/// `request` with `expected_sha256` set.
fn expecting(reference: &str, expected_sha256: &str) -> FetchRequest {
    FetchRequest {
        expected_sha256: expected_sha256.to_owned(),
        ..request(reference, PullPolicy::IfNotPresent)
    }
}

/// Sends `request` with a gRPC deadline of [`CALL_LIMIT`], and fails the test if no answer
/// comes even then.
async fn try_fetch(daemon: &Daemon, request: FetchRequest) -> Result<FetchResponse, tonic::Status> {
    let reference = request.reference.clone();
    let mut request = tonic::Request::new(request);
    request.set_timeout(CALL_LIMIT);
    let mut client = daemon.client().await;
    let answer = tokio::time::timeout(CALL_LIMIT + Duration::from_secs(5), client.fetch(request));
    answer
        .await
        .unwrap_or_else(|_| panic!("{reference}: no answer within {CALL_LIMIT:?}"))
        .map(tonic::Response::into_inner)
}

async fn fetch(daemon: &Daemon, reference: &str, policy: PullPolicy) -> FetchResponse {
    try_fetch(daemon, request(reference, policy))
        .await
        .unwrap_or_else(|status| panic!("{reference}: {status:?}\n{}", daemon.log()))
}

async fn fetch_err(daemon: &Daemon, request: FetchRequest) -> tonic::Status {
    let reference = request.reference.clone();
    match try_fetch(daemon, request).await {
        Ok(answer) => panic!("fetching {reference} succeeded: {answer:?}"),
        Err(status) => status,
    }
}

/// Asserts `reference` is not cached: a fetch under `NEVER` is `NOT_FOUND`.
async fn assert_not_cached(daemon: &Daemon, reference: &str) {
    let status = fetch_err(daemon, request(reference, PullPolicy::Never)).await;
    assert_eq!(status.code(), Code::NotFound, "{reference}: {status:?}");
}

/// `POST /v1/fetch` with `body` over the daemon's socket.
async fn post_fetch(daemon: &Daemon, body: Value) -> UnixResponse {
    let headers = [("content-type", "application/json")];
    let body = Some(body.to_string().into_bytes());
    unix_request(&daemon.socket, "POST", "/v1/fetch", &headers, body).await
}

/// Asserts an HTTP API refusal: the status and the JSON `code`.
fn assert_refused(response: &UnixResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.json()["code"], code, "{}", response.text());
}

/// Percent-encodes `text` for a query string (everything but RFC 3986's unreserved bytes).
fn query_encode(text: &str) -> String {
    let encode = |byte: u8| match byte {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
            char::from(byte).to_string()
        }
        _ => format!("%{byte:02X}"),
    };
    text.bytes().map(encode).collect()
}

/// Checks what every answer for `wasm` must hold: digest, size, and a file named by the digest
/// that holds exactly the module.
fn assert_module(fetched: &FetchResponse, wasm: &[u8]) {
    assert_eq!(fetched.digest, digest(wasm), "{fetched:?}");
    assert_eq!(fetched.size, wasm.len() as u64, "{fetched:?}");
    let path = Path::new(&fetched.path);
    assert!(path.is_absolute(), "{fetched:?}");
    assert_eq!(
        path.file_name().and_then(|name| name.to_str()),
        Some(sha256_hex(wasm).as_str()),
        "{fetched:?}"
    );
    let stored = fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", fetched.path));
    assert!(
        stored == wasm,
        "{}: the bytes differ from the module",
        fetched.path
    );
}

/// [`assert_module`] for a module fetched from a URL: the module's digest is also what the
/// reference resolved to.
fn assert_http_module(fetched: &FetchResponse, wasm: &[u8]) {
    assert_module(fetched, wasm);
    assert_eq!(fetched.format, HTTP_FORMAT, "{fetched:?}");
    assert_eq!(fetched.resolved_digest, digest(wasm), "{fetched:?}");
}

/// [`assert_http_module`] for a JSON answer (HTTP API, CLI).
fn assert_http_module_json(fetched: &Value, wasm: &[u8]) {
    assert_eq!(fetched["digest"], digest(wasm), "{fetched}");
    assert_eq!(fetched["resolved_digest"], digest(wasm), "{fetched}");
    assert_eq!(fetched["format"], HTTP_FORMAT, "{fetched}");
    assert_eq!(fetched["size"], wasm.len(), "{fetched}");
    let path = fetched["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{fetched}"));
    assert!(fs::read(path).unwrap() == wasm, "{path}: the bytes differ");
}

/// A daemon that speaks plain HTTP to `addrs` (`host:port`), with `config` when given.
fn insecure_daemon(addrs: &[&str], config: Option<&str>) -> Daemon {
    let args: Vec<&str> = addrs
        .iter()
        .flat_map(|addr| ["--insecure-registry", *addr])
        .collect();
    Daemon::start(&args, config)
}

/// A valid module of exactly `size` bytes (a custom section absorbs the difference).
fn module_of_size(size: usize, seed: u64) -> Vec<u8> {
    let candidates = (size.saturating_sub(64)..size).map(|extra| module(extra, seed));
    let mut exact = candidates.filter(|candidate| candidate.len() == size);
    exact
        .next()
        .unwrap_or_else(|| panic!("no module of exactly {size} bytes"))
}

/// The references `wasmcache ls --json` lists for the daemon's cache.
fn listed_references(daemon: &Daemon) -> Vec<String> {
    let listed = run_ok(daemon.command("ls").arg("--json"));
    let listed: Value =
        serde_json::from_str(&listed).unwrap_or_else(|error| panic!("{listed}: {error}"));
    let entries = listed.as_array().unwrap_or_else(|| panic!("{listed}"));
    let reference = |entry: &Value| entry["reference"].as_str().unwrap_or_default().to_owned();
    entries.iter().map(reference).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_serves_raw_gzip_tar_and_targz() {
    let faulty = FaultyServer::start();
    let modules: Vec<Vec<u8>> = (0..4).map(|i| module(20_000, 5100 + i)).collect();
    // The paths give nothing away: the packaging is read from the bytes (the types are what
    // web servers send for `.wasm` and `.gz` files, or none in particular).
    let bodies = [
        ("/f/raw", modules[0].clone(), "application/wasm"),
        ("/f/gzip", gzip_bytes(&modules[1]), "application/gzip"),
        (
            "/f/tar",
            tar_layer(
                &[
                    ("README.md", b"a filter"),
                    ("dist/any-name.wasm", &modules[2]),
                ],
                false,
            ),
            "application/octet-stream",
        ),
        (
            "/f/targz",
            tar_layer(&[("filter.wasm", &modules[3])], true),
            "application/octet-stream",
        ),
    ];
    for (path, body, content_type) in &bodies {
        let answer = Behaviour::ok(body.clone()).header("Content-Type", content_type);
        faulty.route(path, answer);
    }
    let daemon = insecure_daemon(&[&faulty.addr()], None);

    for ((path, ..), wasm) in bodies.iter().zip(&modules) {
        let fetched = fetch(&daemon, &url(&faulty, path), PullPolicy::IfNotPresent).await;
        assert_http_module(&fetched, wasm);
        assert!(!fetched.cache_hit && !fetched.stale, "{path}: {fetched:?}");
        assert_eq!(faulty.count("GET", path), 1, "{path}");
    }
    let blobs = daemon.files("blobs/sha256");
    assert_eq!(blobs.len(), 4, "{blobs:?}");
    assert!(
        daemon.files("ingest").is_empty(),
        "{:?}",
        daemon.files("ingest")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_through_the_http_api_the_cli_and_pull() {
    let faulty = FaultyServer::start();
    let [posted, through, fetched, pulled]: [Vec<u8>; 4] =
        std::array::from_fn(|i| module(5000, 5200 + i as u64));
    faulty.route("/api/posted.wasm", Behaviour::ok(posted.clone()));
    faulty.route("/api/through.wasm", Behaviour::ok(through.clone()));
    faulty.route("/cli/fetched.wasm.gz", Behaviour::ok(gzip_bytes(&fetched)));
    faulty.route(
        "/cli/pulled.tgz",
        Behaviour::ok(tar_layer(&[("plugin.wasm", &pulled)], true)),
    );
    let addr = faulty.addr();
    let daemon = insecure_daemon(&[&addr], None);

    // POST /v1/fetch.
    let answer = post_fetch(
        &daemon,
        json!({"reference": url(&faulty, "/api/posted.wasm")}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_http_module_json(&answer.json(), &posted);

    // GET /v1/modules/<digest>?ref=<the URL>: fetched through, then served.
    let reference = query_encode(&url(&faulty, "/api/through.wasm"));
    let path = format!("/v1/modules/{}?ref={reference}", digest(&through));
    let answer = unix_request(&daemon.socket, "GET", &path, &[], None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.body == through, "GET {path}: the bytes differ");
    assert_eq!(faulty.count("GET", "/api/through.wasm"), 1);

    // `wasmcache fetch URL` asks the daemon.
    let out = run_ok(
        daemon
            .command("fetch")
            .arg("--json")
            .arg(url(&faulty, "/cli/fetched.wasm.gz")),
    );
    let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_http_module_json(&answer, &fetched);
    assert_eq!(faulty.count("GET", "/cli/fetched.wasm.gz"), 1);

    // `wasmcache pull URL` without a daemon, into a data dir of its own.
    let data_dir = tempfile::tempdir().unwrap();
    let mut pull = wasmcache();
    pull.arg("--data-dir").arg(data_dir.path());
    pull.args(["--insecure-registry", &addr, "pull", "--json"]);
    let out = run_ok(pull.arg(url(&faulty, "/cli/pulled.tgz")));
    let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_http_module_json(&answer, &pulled);
    let path = answer["path"].as_str().unwrap();
    assert!(
        path.starts_with(data_dir.path().to_str().unwrap()),
        "{path}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_in_a_prefetch_list_is_fetched_before_ready() {
    let faulty = FaultyServer::start();
    let wasm = module(3000, 5300);
    faulty.route("/pre/filter.wasm", Behaviour::ok(wasm.clone()));
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    let reference = url(&faulty, "/pre/filter.wasm");
    fs::write(&list, format!("# a module URL\n{reference} pin\n")).unwrap();
    let list_arg = list.display().to_string();
    let addr = faulty.addr();
    let daemon = Daemon::start(
        &["--insecure-registry", &addr, "--prefetch-file", &list_arg],
        None,
    );

    let attempted = wait_until(Duration::from_secs(20), || {
        daemon.log().contains("initial prefetch attempted")
    });
    assert!(attempted, "{}", daemon.log());
    assert!(
        !daemon.log().contains("bad prefetch line skipped"),
        "{}",
        daemon.log()
    );
    let cached = fetch(&daemon, &reference, PullPolicy::Never).await;
    assert_http_module(&cached, &wasm);
    assert_eq!(faulty.count("GET", "/pre/filter.wasm"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_sources_need_insecure_registries_and_obey_allowed_registries() {
    let faulty = FaultyServer::start();
    let wasm = module(1000, 5400);
    faulty.route("/p/filter.wasm", Behaviour::ok(wasm.clone()));
    let addr = faulty.addr();
    let reference = url(&faulty, "/p/filter.wasm");

    // Not in `insecure_registries`: refused, and nothing reaches the server.
    let daemon = insecure_daemon(&["127.0.0.1:1"], None);
    let refused = fetch_err(&daemon, request(&reference, PullPolicy::IfNotPresent)).await;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    for part in [addr.as_str(), "insecure_registries"] {
        assert!(refused.message().contains(part), "{part}: {refused:?}");
    }
    let answer = post_fetch(&daemon, json!({"reference": reference})).await;
    assert_refused(&answer, 403, "PERMISSION_DENIED");
    assert!(
        answer.text().contains("insecure_registries"),
        "{}",
        answer.text()
    );
    assert_eq!(faulty.requests(), Vec::new(), "the server was asked");
    drop(daemon);

    // Every host insecure, but the host outside `allowed_registries`: refused likewise.
    let config = "insecure_registries = [\"*\"]\nallowed_registries = [\"127.0.0.1:1\"]\n";
    let daemon = Daemon::start(&[], Some(config));
    let refused = fetch_err(&daemon, request(&reference, PullPolicy::IfNotPresent)).await;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&addr), "{refused:?}");
    assert_eq!(faulty.requests(), Vec::new(), "the server was asked");
    drop(daemon);

    // Allowed by `host:port`, insecure by `*`: fetched.
    let config = format!("insecure_registries = [\"*\"]\nallowed_registries = [\"{addr}\"]\n");
    let daemon = Daemon::start(&[], Some(&config));
    let fetched = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_http_module(&fetched, &wasm);
    assert_eq!(faulty.count("GET", "/p/filter.wasm"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_retries_5xx_then_succeeds() {
    let faulty = FaultyServer::start();
    let wasm = module(8000, 5500);
    faulty.route_sequence(
        "/r/filter.wasm",
        vec![Behaviour::Status(500), Behaviour::ok(wasm.clone())],
    );
    let daemon = insecure_daemon(&[&faulty.addr()], None);

    let fetched = fetch(&daemon, &url(&faulty, "/r/filter.wasm"), PullPolicy::Always).await;
    assert_http_module(&fetched, &wasm);
    assert_eq!(faulty.count("GET", "/r/filter.wasm"), 2);
    assert_eq!(faulty.count_answered("GET", "/r/filter.wasm", 500), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_404_is_not_found_and_not_retried() {
    let faulty = FaultyServer::start();
    faulty.route("/missing.wasm", Behaviour::Status(404));
    let daemon = insecure_daemon(&[&faulty.addr()], None);
    let reference = url(&faulty, "/missing.wasm");

    let status = fetch_err(&daemon, request(&reference, PullPolicy::IfNotPresent)).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains(&reference), "{status:?}");
    assert_eq!(faulty.count("GET", "/missing.wasm"), 1);
    let answer = post_fetch(&daemon, json!({"reference": reference})).await;
    assert_refused(&answer, 404, "NOT_FOUND");
    assert_eq!(faulty.count("GET", "/missing.wasm"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_over_max_module_bytes_is_resource_exhausted_and_not_cached() {
    const LIMIT: usize = 20_000;
    let faulty = FaultyServer::start();
    let exact = module_of_size(LIMIT, 5600);
    let over = module_of_size(LIMIT + 1, 5601);
    let bomb = compressible_module(10 * LIMIT);
    let bomb_body = gzip_bytes(&bomb);
    assert!(bomb_body.len() < LIMIT, "{} bytes gzipped", bomb_body.len());
    faulty.route("/l/exact.wasm", Behaviour::ok(exact.clone()));
    faulty.route("/l/over.wasm", Behaviour::ok(over));
    faulty.route("/l/bomb.wasm.gz", Behaviour::ok(bomb_body));
    let config = format!("[limits]\nmax_module_bytes = {LIMIT}\n");
    let daemon = insecure_daemon(&[&faulty.addr()], Some(&config));

    let fetched = fetch(
        &daemon,
        &url(&faulty, "/l/exact.wasm"),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_http_module(&fetched, &exact);
    for path in ["/l/over.wasm", "/l/bomb.wasm.gz"] {
        let reference = url(&faulty, path);
        let status = fetch_err(&daemon, request(&reference, PullPolicy::IfNotPresent)).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{path}: {status:?}");
        assert!(status.message().contains(&LIMIT.to_string()), "{status:?}");
        assert_not_cached(&daemon, &reference).await;
        let answer = post_fetch(&daemon, json!({"reference": reference})).await;
        assert_refused(&answer, 413, "RESOURCE_EXHAUSTED");
    }
    assert_eq!(daemon.files("blobs/sha256").len(), 1);
    assert!(
        daemon.files("ingest").is_empty(),
        "{:?}",
        daemon.files("ingest")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_tar_without_wasm_is_failed_precondition() {
    let faulty = FaultyServer::start();
    let body = tar_layer(
        &[("README.md", b"no module here"), ("lib/x.so", b"\x7fELF")],
        true,
    );
    faulty.route("/t/filter.tgz", Behaviour::ok(body));
    let daemon = insecure_daemon(&[&faulty.addr()], None);
    let reference = url(&faulty, "/t/filter.tgz");

    let status = fetch_err(&daemon, request(&reference, PullPolicy::IfNotPresent)).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(&reference), "{status:?}");
    let answer = post_fetch(&daemon, json!({"reference": reference})).await;
    assert_refused(&answer, 409, "FAILED_PRECONDITION");
    assert_not_cached(&daemon, &reference).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_is_rechecked_with_if_none_match_like_a_tag() {
    let faulty = FaultyServer::start();
    let first = module(50_000, 5700);
    let second = module(50_000, 5701);
    let path = "/e/filter.wasm";
    faulty.route(path, Behaviour::etagged(first.clone(), "\"v1\""));
    let daemon = insecure_daemon(&[&faulty.addr()], Some("tag_ttl = \"2s\"\n"));
    let reference = url(&faulty, path);
    // The `If-None-Match` of the `nth` GET of the module.
    let if_none_match = |nth: usize| {
        let requests = faulty.requests();
        let mut gets =
            (requests.iter()).filter(|request| request.method == "GET" && request.path == path);
        let request = gets.nth(nth).unwrap_or_else(|| panic!("{requests:?}"));
        request.header("if-none-match").map(str::to_owned)
    };

    let fetched = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_http_module(&fetched, &first);
    assert!(!fetched.cache_hit, "{fetched:?}");
    assert_eq!(if_none_match(0), None);

    // Within `tag_ttl`: answered without a request.
    let again = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_eq!(again.digest, digest(&first));
    assert!(again.cache_hit, "{again:?}");
    assert_eq!(faulty.count("GET", path), 1, "asked again within tag_ttl");

    // ALWAYS: a conditional request; the 304 carries no body and the answer is the same.
    let rechecked = fetch(&daemon, &reference, PullPolicy::Always).await;
    assert_http_module(&rechecked, &first);
    assert!(rechecked.cache_hit && !rechecked.stale, "{rechecked:?}");
    assert_eq!(faulty.count("GET", path), 2);
    assert_eq!(if_none_match(1).as_deref(), Some("\"v1\""));
    assert_eq!(faulty.count_answered("GET", path, 304), 1);

    // Past `tag_ttl`: re-checked the same way under IF_NOT_PRESENT.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let expired = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_eq!(expired.digest, digest(&first));
    assert!(expired.cache_hit, "{expired:?}");
    assert_eq!(faulty.count("GET", path), 3);
    assert_eq!(if_none_match(2).as_deref(), Some("\"v1\""));
    assert_eq!(faulty.count_answered("GET", path, 304), 2);

    // A new module behind the URL (new ETag): downloaded, and the next re-check names its ETag.
    faulty.route(path, Behaviour::etagged(second.clone(), "\"v2\""));
    let changed = fetch(&daemon, &reference, PullPolicy::Always).await;
    assert_http_module(&changed, &second);
    assert!(!changed.cache_hit, "{changed:?}");
    assert_eq!(if_none_match(3).as_deref(), Some("\"v1\""));
    let unchanged = fetch(&daemon, &reference, PullPolicy::Always).await;
    assert_eq!(unchanged.digest, digest(&second));
    assert!(unchanged.cache_hit, "{unchanged:?}");
    assert_eq!(if_none_match(4).as_deref(), Some("\"v2\""));
    assert_eq!(faulty.count_answered("GET", path, 304), 3);
    assert_eq!(faulty.count_answered("GET", path, 200), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_source_down_after_a_fetch_answers_the_last_module_stale() {
    let faulty = FaultyServer::start();
    let wasm = module(4000, 5800);
    faulty.route("/s/filter.wasm", Behaviour::etagged(wasm.clone(), "\"s1\""));
    let daemon = insecure_daemon(&[&faulty.addr()], None);
    let reference = url(&faulty, "/s/filter.wasm");
    let never_fetched = url(&faulty, "/s/other.wasm");
    let fetched = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_http_module(&fetched, &wasm);

    // The server goes away (its port now refuses connections).
    drop(faulty);
    let stale = fetch(&daemon, &reference, PullPolicy::Always).await;
    assert!(stale.stale, "{stale:?}");
    assert_eq!(stale.path, fetched.path);
    assert_http_module(&stale, &wasm);
    let status = fetch_err(&daemon, request(&never_fetched, PullPolicy::IfNotPresent)).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn same_module_from_a_registry_and_a_url_is_stored_once() {
    let registry = Registry::start();
    let faulty = FaultyServer::start();
    let wasm = module(30_000, 5900);
    oras_push_cncf(&registry, "both/filter:v1", &wasm);
    faulty.route("/both/filter.wasm", Behaviour::ok(wasm.clone()));
    let daemon = insecure_daemon(&[&registry.addr(), &faulty.addr()], None);

    let from_registry = fetch(
        &daemon,
        &format!("{}/both/filter:v1", registry.addr()),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_module(&from_registry, &wasm);
    assert_eq!(from_registry.format, "cncf-wasm");
    let from_url = fetch(
        &daemon,
        &url(&faulty, "/both/filter.wasm"),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_http_module(&from_url, &wasm);
    assert_eq!(from_url.path, from_registry.path);
    let blobs = daemon.files("blobs/sha256");
    assert_eq!(blobs.len(), 1, "{blobs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_naming_an_index_reports_the_index_digest_as_resolved_digest() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(2000, 6000);
    let index = skopeo_push_index(
        &registry,
        "idx/filter:v1",
        vec![("wasip1", "wasm", vec![wasm.clone()])],
    );
    let platform = index.json()["manifests"][0]["digest"]
        .as_str()
        .expect("the index names its manifest")
        .to_owned();
    let daemon = insecure_daemon(&[&addr], None);

    // By tag and by the index's digest, through gRPC and HTTP: the index is what was named.
    let by_digest = format!("{addr}/idx/filter@{}", index.digest);
    for reference in [format!("{addr}/idx/filter:v1"), by_digest] {
        let fetched = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
        assert_module(&fetched, &wasm);
        assert_eq!(fetched.resolved_digest, index.digest, "{fetched:?}");
        assert_eq!(fetched.index_digest, index.digest, "{fetched:?}");
        assert_eq!(fetched.manifest_digest, platform, "{fetched:?}");
        let answer = post_fetch(&daemon, json!({"reference": reference})).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["resolved_digest"], index.digest);
        assert_eq!(answer.json()["manifest_digest"], platform);
    }
    let mut client = daemon.client().await;
    let target = format!("{addr}/idx/filter:v1");
    let stat = client.stat(StatRequest { target }).await;
    let stat = stat.expect("stat").into_inner();
    assert_eq!(stat.entries.len(), 1, "{stat:?}");
    assert_eq!(stat.entries[0].resolved_digest, index.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_sha256_matching_the_module_or_what_the_reference_resolved_to_is_ok() {
    let registry = Registry::start();
    let faulty = FaultyServer::start();
    let addr = registry.addr();
    let [plain, indexed, served]: [Vec<u8>; 3] =
        std::array::from_fn(|i| module(3000, 6100 + i as u64));
    let manifest = oras_push_cncf(&registry, "exp/plain:v1", &plain);
    let index = skopeo_push_index(
        &registry,
        "exp/indexed:v1",
        vec![("wasip1", "wasm", vec![indexed.clone()])],
    );
    let platform = index.json()["manifests"][0]["digest"]
        .as_str()
        .expect("the index names its manifest")
        .to_owned();
    faulty.route("/exp/filter.wasm", Behaviour::ok(served.clone()));
    let daemon = insecure_daemon(&[&addr, &faulty.addr()], None);

    // An OCI manifest: the module's digest (bare hex or prefixed) or the manifest's.
    let reference = format!("{addr}/exp/plain:v1");
    for expected in [
        sha256_hex(&plain),
        digest(&plain),
        manifest.digest.clone(),
        manifest.digest.trim_start_matches("sha256:").to_owned(),
    ] {
        let answer = try_fetch(&daemon, expecting(&reference, &expected)).await;
        let answer = answer.unwrap_or_else(|status| panic!("{expected}: {status:?}"));
        assert_module(&answer, &plain);
        assert_eq!(answer.resolved_digest, manifest.digest);
    }
    // A tag naming an index: the index's digest (what Istio compares), the platform
    // manifest's, or the module's.
    let reference = format!("{addr}/exp/indexed:v1");
    for expected in [index.digest.clone(), platform.clone(), digest(&indexed)] {
        let answer = try_fetch(&daemon, expecting(&reference, &expected)).await;
        let answer = answer.unwrap_or_else(|status| panic!("{expected}: {status:?}"));
        assert_module(&answer, &indexed);
        assert_eq!(answer.resolved_digest, index.digest);
    }
    // A URL: the module's digest, over gRPC and HTTP.
    let reference = url(&faulty, "/exp/filter.wasm");
    let answer = try_fetch(&daemon, expecting(&reference, &sha256_hex(&served))).await;
    assert_http_module(
        &answer.unwrap_or_else(|status| panic!("{status:?}")),
        &served,
    );
    let body = json!({"reference": reference, "expected_sha256": digest(&served)});
    let answer = post_fetch(&daemon, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_http_module_json(&answer.json(), &served);
    let body =
        json!({"reference": format!("{addr}/exp/indexed:v1"), "expected_sha256": index.digest});
    let answer = post_fetch(&daemon, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["digest"], digest(&indexed));
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_sha256_mismatch_is_data_loss_and_not_recorded() {
    let registry = Registry::start();
    let faulty = FaultyServer::start();
    let addr = registry.addr();
    let [by_grpc, by_http, served_grpc, served_http]: [Vec<u8>; 4] =
        std::array::from_fn(|i| module(3000, 6200 + i as u64));
    let grpc_manifest = oras_push_cncf(&registry, "mm/grpc:v1", &by_grpc);
    oras_push_cncf(&registry, "mm/http:v1", &by_http);
    faulty.route("/mm/grpc.wasm", Behaviour::ok(served_grpc.clone()));
    faulty.route("/mm/http.wasm", Behaviour::ok(served_http.clone()));
    let daemon = insecure_daemon(&[&addr, &faulty.addr()], None);
    let wrong = sha256_hex(b"not the module");

    // Over gRPC: DATA_LOSS naming the reference, the expected and the actual digest.
    let oci = format!("{addr}/mm/grpc:v1");
    // For a registry, the module's digest or the manifest's may be named as the actual one.
    let oci_actual = [digest(&by_grpc), grpc_manifest.digest.clone()];
    let url_grpc = url(&faulty, "/mm/grpc.wasm");
    let url_actual = [digest(&served_grpc)];
    for (reference, actual) in [(&oci, &oci_actual[..]), (&url_grpc, &url_actual[..])] {
        let status = fetch_err(&daemon, expecting(reference, &wrong)).await;
        assert_eq!(status.code(), Code::DataLoss, "{reference}: {status:?}");
        let message = status.message();
        assert!(message.contains(reference.as_str()), "{message}");
        assert!(message.contains(&wrong), "{message}");
        assert!(
            actual
                .iter()
                .any(|digest| message.contains(digest.as_str())),
            "none of {actual:?} in: {message}"
        );
        assert_not_cached(&daemon, reference).await;
    }

    // Over HTTP: 502 with the JSON code, and nothing recorded either.
    let url_http = url(&faulty, "/mm/http.wasm");
    for reference in [format!("{addr}/mm/http:v1"), url_http.clone()] {
        let body = json!({"reference": reference, "expected_sha256": format!("sha256:{wrong}")});
        let answer = post_fetch(&daemon, body).await;
        assert_refused(&answer, 502, "DATA_LOSS");
        let message = answer.json()["error"].to_string();
        assert!(
            message.contains(&reference) && message.contains(&wrong),
            "{message}"
        );
        assert_not_cached(&daemon, &reference).await;
    }
    let listed = listed_references(&daemon);
    assert!(listed.is_empty(), "listed after refusals: {listed:?}");

    // The same references fetched without a wrong expectation are fine: the refusal was the
    // expectation's, not the source's.
    let answer = fetch(&daemon, &oci, PullPolicy::IfNotPresent).await;
    assert_module(&answer, &by_grpc);
    let answer = fetch(&daemon, &url_http, PullPolicy::IfNotPresent).await;
    assert_http_module(&answer, &served_http);

    // A cached reference is checked too; the refusal leaves its entry alone.
    let status = fetch_err(&daemon, expecting(&oci, &wrong)).await;
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let kept = fetch(&daemon, &oci, PullPolicy::Never).await;
    assert_module(&kept, &by_grpc);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_expected_sha256_is_invalid_argument() {
    let registry = Registry::start();
    let faulty = FaultyServer::start();
    let addr = registry.addr();
    let wasm = module(100, 6300);
    oras_push_cncf(&registry, "bad/filter:v1", &wasm);
    faulty.route("/bad/filter.wasm", Behaviour::ok(wasm.clone()));
    let daemon = insecure_daemon(&[&addr, &faulty.addr()], None);
    let oci = format!("{addr}/bad/filter:v1");
    let manifest_gets = registry.manifest_gets(Some("bad/filter"));
    let hex = sha256_hex(&wasm);

    for reference in [oci.clone(), url(&faulty, "/bad/filter.wasm")] {
        for malformed in [
            "sha256:xyz".to_owned(),
            "not-a-digest".to_owned(),
            hex[..63].to_owned(),
            format!("{hex}0"),
            format!("md5:{}", &hex[..32]),
            format!("sha512:{hex}"),
        ] {
            // Refused as the request's fault, naming the value.
            let status = fetch_err(&daemon, expecting(&reference, &malformed)).await;
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{malformed}: {status:?}"
            );
            assert!(status.message().contains(&malformed), "{status:?}");
            let body = json!({"reference": reference, "expected_sha256": malformed});
            let answer = post_fetch(&daemon, body).await;
            assert_refused(&answer, 400, "INVALID_ARGUMENT");
            assert!(answer.text().contains(&malformed), "{}", answer.text());
        }
    }
    // Before any network access; the reference itself is fine.
    assert_eq!(
        faulty.requests(),
        Vec::new(),
        "a malformed request reached the server"
    );
    assert_eq!(registry.manifest_gets(Some("bad/filter")), manifest_gets);
    let fetched = fetch(&daemon, &oci, PullPolicy::IfNotPresent).await;
    assert_module(&fetched, &wasm);
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_sha256_through_the_cli() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(2500, 6400);
    let manifest = oras_push_cncf(&registry, "cli/filter:v1", &wasm);
    let daemon = insecure_daemon(&[&addr], None);
    let reference = format!("{addr}/cli/filter:v1");
    let wrong = sha256_hex(b"something else");

    let (code, stderr) = run_err(
        daemon
            .command("fetch")
            .args(["--sha256", &wrong])
            .arg(&reference),
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
    for part in [reference.as_str(), wrong.as_str()] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    // The actual digest: the module's, or the manifest's the tag resolved to.
    let actual = [sha256_hex(&wasm), manifest.digest.clone()];
    assert!(
        actual.iter().any(|digest| stderr.contains(digest.as_str())),
        "none of {actual:?} in: {stderr}"
    );
    let listed = listed_references(&daemon);
    assert!(!listed.contains(&reference), "{listed:?}");

    let out = run_ok(
        daemon
            .command("fetch")
            .args(["--json", "--sha256", &sha256_hex(&wasm)])
            .arg(&reference),
    );
    let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
    assert_eq!(answer["digest"], digest(&wasm), "{answer}");
    assert_eq!(listed_references(&daemon), vec![reference]);
}

#[tokio::test(flavor = "multi_thread")]
async fn link_local_sources_and_registries_are_blocked_before_any_connection() {
    // A short connect timeout and fetch timeout, so a daemon that does connect fails fast
    // instead of hanging the test; the gRPC deadline bounds each call besides.
    let config =
        "insecure_registries = [\"*\"]\nconnect_timeout = \"1s\"\nfetch_timeout = \"5s\"\n";
    let daemon = Daemon::start(&[], Some(config));

    for (reference, address) in [
        (
            "http://169.254.169.254/latest/filter.wasm",
            "169.254.169.254",
        ),
        ("http://[fe80::1]:8080/filter.wasm", "fe80::1"),
        ("169.254.169.254:5000/x/y:v1", "169.254.169.254"),
    ] {
        let status = fetch_err(&daemon, request(reference, PullPolicy::IfNotPresent)).await;
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{reference}: {status:?}"
        );
        for part in [address, "blocked_cidrs"] {
            assert!(status.message().contains(part), "{part}: {status:?}");
        }
        let answer = post_fetch(&daemon, json!({"reference": reference})).await;
        assert_refused(&answer, 403, "PERMISSION_DENIED");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_cidrs_are_checked_after_dns() {
    let faulty = FaultyServer::start();
    let wasm = module(1500, 6500);
    faulty.route("/m.wasm", Behaviour::ok(wasm.clone()));
    let port = faulty
        .addr()
        .rsplit_once(':')
        .expect("host:port")
        .1
        .to_owned();
    // A name, not an address: only its DNS answer (127.0.0.1) is in the blocked range.
    let reference = format!("http://localhost:{port}/m.wasm");

    let config = "insecure_registries = [\"*\"]\nconnect_timeout = \"1s\"\n\
                  blocked_cidrs = [\"127.0.0.0/8\", \"::1/128\"]\n";
    let daemon = Daemon::start(&[], Some(config));
    let status = fetch_err(&daemon, request(&reference, PullPolicy::IfNotPresent)).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("blocked_cidrs"), "{status:?}");
    assert_eq!(
        faulty.requests(),
        Vec::new(),
        "the blocked address was asked"
    );
    drop(daemon);

    // The default ranges leave loopback alone: the same URL is fetched.
    let daemon = Daemon::start(&[], Some("insecure_registries = [\"*\"]\n"));
    let fetched = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_http_module(&fetched, &wasm);
    assert_eq!(faulty.count("GET", "/m.wasm"), 1);
}

//! The daemon's HTTP side: module bytes for Envoy, JSON fetch, the OCI view (with skopeo and
//! oras pulling through it), the wasme-compatible API, metrics and probes.

use std::process::Command;

use serde_json::json;

use crate::common::daemon::{unix_request, UnixResponse};
use crate::common::fixtures::{fetch_manifest, oras_pull, oras_push_cncf, oras_push_wasme};
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{free_port, isolate, require_tool, run_checked, Daemon, Registry};

const WASME_CONFIG: &str =
    r#"{"type":"envoy_proxy","abiVersions":["v0-1"],"config":{"rootIds":["add"]}}"#;

async fn get(daemon: &Daemon, path: &str, headers: &[(&str, &str)]) -> UnixResponse {
    unix_request(&daemon.socket, "GET", path, headers, None).await
}

fn curl_unix(daemon: &Daemon, args: &[&str], url_path: &str) -> (String, Vec<u8>) {
    let home = tempfile::tempdir().unwrap();
    let headers = home.path().join("headers");
    let output = run_checked(
        isolate(&mut Command::new(require_tool("curl")), home.path())
            .arg("-sS")
            .arg("--unix-socket")
            .arg(&daemon.socket)
            .arg("-D")
            .arg(&headers)
            .args(args)
            .arg(format!("http://localhost{url_path}")),
    );
    (std::fs::read_to_string(headers).unwrap(), output.stdout)
}

fn daemon_with_http(registry_addr: &str, config: &str) -> (Daemon, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(
        &[
            "--insecure-registry",
            registry_addr,
            "--http-listen",
            &listen,
        ],
        Some(config),
    );
    (daemon, listen)
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_are_served_with_etag_range_and_head() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(300_000, 1);
    oras_push_cncf(&registry, "h/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let path = format!("/v1/modules/{}", digest(&wasm));

    // Not cached yet: 404 with a JSON error; `?ref=` fetches it through.
    let missing = get(&daemon, &path, &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "NOT_FOUND");
    let through = get(&daemon, &format!("{path}?ref={addr}/h/f:v1"), &[]).await;
    assert_eq!(
        through.status,
        200,
        "{}",
        String::from_utf8_lossy(&through.body)
    );
    assert_eq!(through.body, wasm);
    assert_eq!(through.header("content-type"), Some("application/wasm"));
    assert_eq!(
        through.header("content-length"),
        Some(wasm.len().to_string().as_str())
    );
    let etag = format!("\"{}\"", digest(&wasm));
    assert_eq!(through.header("etag"), Some(etag.as_str()));

    // curl sees the same bytes; Range and If-None-Match behave.
    let (headers, body) = curl_unix(&daemon, &[], &path);
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert_eq!(sha256_hex(&body), sha256_hex(&wasm));
    let (headers, body) = curl_unix(&daemon, &["-r", "100-199"], &path);
    assert!(headers.starts_with("HTTP/1.1 206"), "{headers}");
    assert!(
        headers
            .to_lowercase()
            .contains(&format!("content-range: bytes 100-199/{}", wasm.len())),
        "{headers}"
    );
    assert_eq!(body, &wasm[100..200]);
    let tail = get(&daemon, &path, &[("range", "bytes=-10")]).await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &wasm[wasm.len() - 10..]);
    let unsatisfiable = get(&daemon, &path, &[("range", "bytes=999999999-")]).await;
    assert_eq!(unsatisfiable.status, 416);
    // Several ranges, or another unit, are ignored (RFC 9110): the whole module.
    for ignored in ["bytes=0-1,5-6", "items=0-9"] {
        let whole = get(&daemon, &path, &[("range", ignored)]).await;
        assert_eq!(whole.status, 200, "{ignored}");
        assert!(whole.body == wasm, "{ignored}: the bytes differ");
    }
    let cached = get(&daemon, &path, &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());
    let head = unix_request(&daemon.socket, "HEAD", &path, &[], None).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(wasm.len().to_string().as_str())
    );

    // A reference that resolves to another module is a conflict, not silently served.
    let other = format!("/v1/modules/{}?ref={addr}/h/f:v1", digest(b"other"));
    let conflict = get(&daemon, &other, &[]).await;
    assert_eq!(conflict.status, 409);
    assert!(conflict.json()["error"]
        .as_str()
        .unwrap()
        .contains("resolves to module"));
    let bad = get(&daemon, "/v1/modules/sha256:xyz", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["code"], "INVALID_ARGUMENT");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_modules_are_streamed_whole_over_the_socket_and_tcp() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(3_000_000, 11);
    oras_push_cncf(&registry, "big/f:v1", &wasm);
    // Everything below is served by one async thread.
    let (daemon, listen) = daemon_with_http(&addr, "worker_threads = 1\n");
    let path = format!("/v1/modules/{}", digest(&wasm));
    let through = get(&daemon, &format!("{path}?ref={addr}/big/f:v1"), &[]).await;
    assert_eq!(through.status, 200);
    assert!(through.body == wasm, "fetched through: the bytes differ");
    let size = wasm.len() as u64;

    // HTTP/1.1 over the socket: the whole module, then a range from its middle.
    let (headers, body) = curl_unix(&daemon, &[], &path);
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(
        body == wasm,
        "whole module over the socket: the bytes differ"
    );
    let (headers, body) = curl_unix(&daemon, &["-r", "1000000-1999999"], &path);
    assert!(headers.starts_with("HTTP/1.1 206"), "{headers}");
    assert!(
        body == wasm[1_000_000..2_000_000],
        "range: the bytes differ"
    );

    // The TCP listener.
    let home = tempfile::tempdir().unwrap();
    let output = run_checked(
        isolate(&mut Command::new(require_tool("curl")), home.path())
            .arg("-sS")
            .arg(format!("http://{listen}{path}")),
    );
    assert!(output.stdout == wasm, "over TCP: the bytes differ");

    // HTTP/2 over the socket.
    let (headers, body) = curl_unix(&daemon, &["--http2-prior-knowledge"], &path);
    assert!(headers.starts_with("HTTP/2 200"), "{headers}");
    assert!(body == wasm, "over h2: the bytes differ");
    let served = get(&daemon, "/metrics", &[]).await;
    let text = String::from_utf8(served.body).unwrap();
    let line = format!(
        "wasmcache_served_bytes_total{{api=\"http\"}} {}",
        4 * size + 1_000_000
    );
    assert!(
        text.lines().any(|l| l == line),
        "missing `{line}` in\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_file_changed_behind_the_daemons_back_fails_only_its_request() {
    let registry = Registry::start();
    let addr = registry.addr();
    // Three times the socket's send buffer (4 MiB asked for, 8 MiB granted), so the daemon
    // is still reading the file when it is cut.
    let wasm = module(24_000_000, 13);
    oras_push_cncf(&registry, "cut/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let path = format!("/v1/modules/{}", digest(&wasm));
    let through = get(&daemon, &format!("{path}?ref={addr}/cut/f:v1"), &[]).await;
    assert_eq!(through.status, 200);
    let blob = daemon
        .data_dir
        .join("blobs/sha256")
        .join(digest(&wasm).trim_start_matches("sha256:"));

    // A slow reader is halfway through when the file is cut short on the host.
    let home = tempfile::tempdir().unwrap();
    let slow = isolate(&mut Command::new(require_tool("curl")), home.path())
        .args(["-sS", "--limit-rate", "500k", "--max-time", "30", "-o"])
        .arg(home.path().join("body"))
        .arg("--unix-socket")
        .arg(&daemon.socket)
        .arg(format!("http://localhost{path}"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut permissions = std::fs::metadata(&blob).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o644);
    std::fs::set_permissions(&blob, permissions).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let output = slow.wait_with_output().unwrap();
    let received = std::fs::metadata(home.path().join("body")).unwrap().len();
    assert!(
        !output.status.success() && received < wasm.len() as u64,
        "the cut file was answered as whole ({received} bytes): {output:?}"
    );

    // The next request is refused before any byte is sent; the daemon lives on.
    let refused = get(&daemon, &path, &[]).await;
    assert_eq!(refused.status, 502, "{:?}", refused.body);
    assert_eq!(refused.json()["code"], "DATA_LOSS");
    let message = refused.json()["error"].to_string();
    assert!(message.contains("behind the daemon's back"), "{message}");
    assert_eq!(get(&daemon, "/healthz", &[]).await.status, 200);
    let metrics = String::from_utf8(get(&daemon, "/metrics", &[]).await.body).unwrap();
    let line = "wasmcache_blob_read_errors_total{api=\"http\"} 2";
    assert!(
        metrics.lines().any(|l| l == line),
        "missing `{line}` in\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_fetch_answers_json_with_matching_statuses() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(100, 2);
    let pushed = oras_push_cncf(&registry, "j/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let post = |body: serde_json::Value| {
        let socket = daemon.socket.clone();
        async move {
            unix_request(
                &socket,
                "POST",
                "/v1/fetch",
                &[("content-type", "application/json")],
                Some(body.to_string().into_bytes()),
            )
            .await
        }
    };

    let ok = post(json!({"reference": format!("{addr}/j/f:v1")})).await;
    assert_eq!(ok.status, 200);
    let body = ok.json();
    assert_eq!(body["digest"], digest(&wasm));
    assert_eq!(body["manifest_digest"], pushed.digest);
    assert_eq!(body["format"], "cncf-wasm");
    assert_eq!(std::fs::read(body["path"].as_str().unwrap()).unwrap(), wasm);

    for (request, status, code) in [
        (json!({"reference": "Bad/Ref"}), 400, "INVALID_ARGUMENT"),
        (
            json!({"reference": format!("{addr}/j/f:v1"), "pull_policy": "SOMETIMES"}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"reference": format!("{addr}/j/nope:v1")}),
            404,
            "NOT_FOUND",
        ),
        (
            json!({"reference": format!("{addr}/j/f:v9"), "pull_policy": "NEVER"}),
            404,
            "NOT_FOUND",
        ),
        (
            json!({"reference": "127.0.0.1:1/x/y:v1"}),
            502,
            "UNAVAILABLE",
        ),
        (json!({"ref": "typo"}), 400, "INVALID_ARGUMENT"),
    ] {
        let response = post(request.clone()).await;
        assert_eq!(
            response.status,
            status,
            "{request}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.json()["code"], code, "{request}");
    }
    let oversized = post(json!({"reference": "x".repeat(100_000)})).await;
    assert_eq!(oversized.status, 413);
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_and_oras_pull_through_the_oci_view_by_alias_ns_and_host() {
    let registry = Registry::start();
    let addr = registry.addr();
    let cncf = module(50_000, 3);
    let wasme = module(50_000, 4);
    let pushed_cncf = oras_push_cncf(&registry, "org/cncf:v1", &cncf);
    let pushed_wasme = oras_push_wasme(&registry, "org/wasme:v1", &wasme, WASME_CONFIG);
    let config = format!(
        "allowed_registries = [\"{addr}\", \"*.allowed.example\"]\n\n\
         [registry_aliases.local]\nhost = \"{addr}\"\ninsecure = true\n"
    );
    let (daemon, view) = daemon_with_http(&addr, &config);

    // skopeo through the alias: the manifest is byte-identical to the upstream's.
    let home = tempfile::tempdir().unwrap();
    let inspect = run_checked(
        isolate(&mut Command::new(require_tool("skopeo")), home.path())
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{view}/local/org/cncf:v1")),
    );
    assert_eq!(inspect.stdout, pushed_cncf.bytes);
    let layout = home.path().join("layout");
    run_checked(
        isolate(&mut Command::new(require_tool("skopeo")), home.path())
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{view}/local/org/wasme:v1"))
            .arg(format!("oci:{}:v1", layout.display())),
    );
    let copied = std::fs::read(layout.join("blobs/sha256").join(sha256_hex(&wasme))).unwrap();
    assert_eq!(copied, wasme);
    let manifest = std::fs::read(
        layout
            .join("blobs/sha256")
            .join(&pushed_wasme.digest["sha256:".len()..]),
    )
    .unwrap();
    assert_eq!(manifest, pushed_wasme.bytes);

    // oras pulls the module file through the alias.
    let out = tempfile::tempdir().unwrap();
    let files = oras_pull(view.as_str(), "local/org/cncf:v1", out.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), cncf);

    // containerd's mirror form: `?ns=` names the upstream, with its port.
    let accept = crate::common::fixtures::MANIFEST_ACCEPT;
    let via_ns = get(
        &daemon,
        &format!("/v2/org/cncf/manifests/v1?ns={addr}"),
        &[("accept", accept)],
    )
    .await;
    assert_eq!(via_ns.status, 200);
    assert_eq!(via_ns.body, pushed_cncf.bytes);
    assert_eq!(
        via_ns.header("docker-content-digest"),
        Some(pushed_cncf.digest.as_str())
    );
    let blob = get(
        &daemon,
        &format!("/v2/org/cncf/blobs/{}?ns={addr}", digest(&cncf)),
        &[],
    )
    .await;
    assert_eq!(blob.body, cncf);
    let upstream = fetch_manifest(&registry, "org/cncf", "v1");
    assert_eq!(upstream.bytes, via_ns.body);

    // Refusals never reach any registry.
    let before = registry.requests().len();
    for (path, status, code) in [
        ("/v2/nosuchalias/org/cncf/manifests/v1", 404, "NAME_UNKNOWN"),
        ("/v2/ghcr.io/org/cncf/manifests/v1", 403, "DENIED"),
        (
            "/v2/org/cncf/manifests/v1?ns=bad%20host",
            404,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/org/cncf/manifests/v1?ns=evil.example:5000",
            403,
            "DENIED",
        ),
    ] {
        let response = get(&daemon, path, &[]).await;
        assert_eq!(
            response.status,
            status,
            "{path}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.json()["errors"][0]["code"], code, "{path}");
    }
    assert_eq!(registry.requests().len(), before);
    let version = get(&daemon, "/v2/", &[]).await;
    assert_eq!(version.status, 200);
    assert_eq!(
        version.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wasme_compatible_api_serves_by_sha_and_by_image() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(1000, 5);
    oras_push_wasme(&registry, "hub/filter:v1", &wasm, WASME_CONFIG);
    let port = free_port();
    let config = format!("wasme_listen = \"127.0.0.1:{port}\"\n");
    let _daemon = Daemon::start(
        &["--insecure-registry", &addr, "--wasme-compat"],
        Some(&config),
    );
    let endpoint = crate::common::Endpoint::plain(format!("127.0.0.1:{port}"));

    let missing = endpoint.get(&format!("/{}", sha256_hex(&wasm)), &[]);
    assert_eq!(missing.status, 404);
    let by_image = endpoint.get(&format!("/{addr}/hub/filter:v1"), &[]);
    assert_eq!(by_image.status, 200, "{}", by_image.text());
    assert_eq!(by_image.body, wasm);
    let by_sha = endpoint.get(&format!("/{}", sha256_hex(&wasm)), &[]);
    assert_eq!(by_sha.body, wasm);
    assert_eq!(
        by_sha.header("etag"),
        Some(format!("\"{}\"", digest(&wasm)).as_str())
    );
    let by_digest = endpoint.get(&format!("/{}", digest(&wasm)), &[]);
    assert_eq!(by_digest.status, 200, "{}", by_digest.text());
    assert_eq!(by_digest.body, wasm);
    // A hex run of the wrong length is a malformed digest, not a Docker Hub image.
    let hex = sha256_hex(&wasm);
    for bad in [&hex[..63], &format!("{hex}0"), "sha256:xyz"] {
        let refused = endpoint.get(&format!("/{bad}"), &[]);
        assert_eq!(refused.status, 400, "{bad}: {}", refused.text());
        assert!(refused.text().contains("INVALID_ARGUMENT"), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_sequence_exactly() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(12_345, 6);
    oras_push_cncf(&registry, "m/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    assert_eq!(get(&daemon, "/readyz", &[]).await.status, 200);
    assert_eq!(get(&daemon, "/healthz", &[]).await.status, 200);

    let reference = format!("{addr}/m/f:v1");
    let mut client = daemon.client().await;
    let request = |policy: wasmcache::api::proto::PullPolicy| wasmcache::api::proto::FetchRequest {
        reference: reference.clone(),
        pull_policy: policy.into(),

        ..Default::default()
    };
    use wasmcache::api::proto::PullPolicy;
    client
        .fetch(request(PullPolicy::IfNotPresent))
        .await
        .unwrap();
    client
        .fetch(request(PullPolicy::IfNotPresent))
        .await
        .unwrap();
    client.fetch(request(PullPolicy::Always)).await.unwrap();
    assert!(client
        .fetch(wasmcache::api::proto::FetchRequest {
            reference: format!("{addr}/m/missing:v1"),
            pull_policy: 0,

            ..Default::default()
        })
        .await
        .is_err());
    let served = get(&daemon, &format!("/v1/modules/{}", digest(&wasm)), &[]).await;
    assert_eq!(served.status, 200);

    let metrics = get(&daemon, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(metrics.body).unwrap();
    let size = wasm.len();
    for line in [
        "wasmcache_fetch_total{result=\"download\",format=\"cncf-wasm\"} 1".to_owned(),
        "wasmcache_fetch_total{result=\"hit\",format=\"cncf-wasm\"} 2".to_owned(),
        "wasmcache_fetch_total{result=\"error\",format=\"unknown\"} 1".to_owned(),
        "wasmcache_fetch_duration_seconds_count 4".to_owned(),
        format!("wasmcache_registry_requests_total{{registry=\"{addr}\",kind=\"manifest\",code=\"200\"}} 2"),
        format!("wasmcache_registry_requests_total{{registry=\"{addr}\",kind=\"manifest\",code=\"404\"}} 1"),
        format!("wasmcache_registry_requests_total{{registry=\"{addr}\",kind=\"blob\",code=\"200\"}} 1"),
        format!("wasmcache_downloaded_bytes_total {size}"),
        format!("wasmcache_served_bytes_total{{api=\"http\"}} {size}"),
        "wasmcache_singleflight_joined_total 0".to_owned(),
        format!("wasmcache_cache_bytes {size}"),
        "wasmcache_cache_entries 1".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_without_a_port_is_named_by_its_host_in_the_view() {
    // Port 80, so that `127.0.0.1` alone names it, as `ghcr.io` would.
    let registry = Registry::builder().port(80).start();
    let wasm = module(20_000, 7);
    let pushed = oras_push_cncf(&registry, "plain/f:v1", &wasm);
    let (_daemon, view) = daemon_with_http("127.0.0.1", "");

    let home = tempfile::tempdir().unwrap();
    let inspect = run_checked(
        isolate(&mut Command::new(require_tool("skopeo")), home.path())
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{view}/127.0.0.1/plain/f:v1")),
    );
    assert_eq!(inspect.stdout, pushed.bytes);
    let out = tempfile::tempdir().unwrap();
    let files = oras_pull(view.as_str(), "127.0.0.1/plain/f:v1", out.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), wasm);
}

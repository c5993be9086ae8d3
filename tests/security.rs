//! Who may use the daemon, and what it never reveals: socket peer checks, the TCP token for
//! mutating calls and (`tcp_reads`) for reads, one message per unary call, and registry
//! credentials kept out of logs, errors, metrics and listings.

use std::process::Command;

use base64::Engine as _;
use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;
use wasmcache::api::proto::{FetchRequest, RemoveRequest};

use crate::common::cli::{run_err, run_ok};
use crate::common::daemon::unix_request;
use crate::common::fixtures::oras_push_cncf;
use crate::common::http::Endpoint;
use crate::common::wasm::{digest, module};
use crate::common::{
    free_port, isolate, require_tool, run_with_timeout, venv_python, Daemon, Registry, TOOL_TIMEOUT,
};

/// `curl` run as another user (uid, gid, no supplementary groups).
fn curl_command_as(uid: u32, gid: u32) -> Command {
    let mut command = Command::new(require_tool("setpriv"));
    command
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ])
        .arg(require_tool("curl"));
    command
}

/// `curl` over the daemon's socket as another user; returns (HTTP status, body).
fn curl_as(daemon: &Daemon, uid: u32, gid: u32, path: &str) -> (u16, String) {
    let output = run_with_timeout(
        curl_command_as(uid, gid)
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&daemon.socket)
            .arg(format!("http://localhost{path}")),
        TOOL_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_peers_are_logged_and_checked_against_allowed_ids() {
    let daemon = Daemon::start(
        &[],
        Some("socket_mode = \"0666\"\nallowed_uids = [12001]\nallowed_gids = [12002]\n"),
    );
    let (status, _) = curl_as(&daemon, 12001, 12999, "/healthz");
    assert_eq!(status, 200, "allowed by uid");
    let (status, _) = curl_as(&daemon, 12999, 12002, "/healthz");
    assert_eq!(status, 200, "allowed by gid");
    let (status, body) = curl_as(&daemon, 12999, 12999, "/healthz");
    assert_eq!(status, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["code"], "PERMISSION_DENIED");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("uid 12999 gid 12999"));
    let log = daemon.log();
    assert!(
        log.contains("uid=12001") && log.contains("gid=12002"),
        "{log}"
    );
    // Root (this test) is always allowed.
    assert_eq!(
        unix_request(&daemon.socket, "GET", "/healthz", &[], None)
            .await
            .status,
        200
    );

    // gRPC `Fetch` (which skips the router on the socket) is checked the same way; Python's
    // grpcio as the other user sends an empty `FetchRequest` (with a valid `:authority`:
    // grpc-core would send the socket path, which HTTP/2 servers such as hyper reject).
    let script = "import sys, grpc\n\
        call = grpc.insecure_channel('unix:' + sys.argv[1],\
        options=[('grpc.default_authority', 'localhost')]).unary_unary(\
        '/wasmcache.v1.WasmCache/Fetch',\
        request_serializer=lambda b: b, response_deserializer=lambda b: b)\n\
        error = call.future(b'', timeout=30).exception()\n\
        print('OK' if error is None else error.code().name + ' ' + error.details())\n";
    let grpc_as = |uid: u32, gid: u32| {
        let output = run_with_timeout(
            Command::new(require_tool("setpriv"))
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    "--clear-groups",
                ])
                .arg(venv_python())
                .args(["-c", script])
                .arg(&daemon.socket),
            TOOL_TIMEOUT,
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let refused = grpc_as(12999, 12999);
    assert!(refused.starts_with("PERMISSION_DENIED"), "{refused}");
    assert!(refused.contains("uid 12999 gid 12999"), "{refused}");
    // Allowed: the empty reference gets INVALID_ARGUMENT from the service itself.
    let allowed = grpc_as(12001, 12999);
    assert!(allowed.starts_with("INVALID_ARGUMENT"), "{allowed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutating_calls_over_tcp_need_the_bearer_token() {
    let port = free_port();
    let home = tempfile::tempdir().unwrap();
    let token_file = home.path().join("token");
    std::fs::write(&token_file, "s3cr3t-token\n").unwrap();
    let config = format!(
        "grpc_listen = \"127.0.0.1:{port}\"\ntcp_token_file = \"{}\"\n",
        token_file.display()
    );
    let daemon = Daemon::start(&[], Some(&config));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = WasmCacheClient::new(channel);
    let remove = || RemoveRequest {
        target: "example.com/a/b:v1".into(),
    };

    let status = client.remove(remove()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("bearer token"));
    let mut wrong = tonic::Request::new(remove());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        client.remove(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(remove());
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cr3t-token".parse().unwrap());
    let status = client.remove(right).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "past the guard: {status:?}");

    // Reads need no token; the unix socket needs none either.
    let status = client
        .fetch(FetchRequest {
            reference: "Bad/Ref".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = daemon.client().await.remove(remove()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(!daemon.log().contains("s3cr3t-token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_appear_in_logs_errors_metrics_or_listings() {
    let password = "pw-9f8e7d6c5b4a";
    let registry = Registry::builder().basic_auth("carol", password).start();
    let addr = registry.addr();
    oras_push_cncf(&registry, "sec/f:v1", &module(100, 1));
    let home = tempfile::tempdir().unwrap();
    let auth = home.path().join("config.json");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("carol:{password}"));
    std::fs::write(
        &auth,
        json!({"auths": {addr.clone(): {"auth": token}}}).to_string(),
    )
    .unwrap();
    let auth_arg = auth.display().to_string();
    let daemon = Daemon::start(
        &[
            "--insecure-registry",
            &addr,
            "--registry-auth-file",
            &auth_arg,
        ],
        None,
    );
    // Trace everything the daemon does with the credentials.
    let fetched = run_ok(
        daemon
            .command("fetch")
            .arg("--json")
            .arg(format!("{addr}/sec/f:v1")),
    );
    let (_, missing) = run_err(
        daemon
            .command("fetch")
            .arg(format!("{addr}/sec/missing:v1")),
    );
    let listed = run_ok(daemon.command("ls").arg("--json"));
    let metrics = unix_request(&daemon.socket, "GET", "/metrics", &[], None).await;
    let metrics = String::from_utf8(metrics.body).unwrap();
    let log = daemon.log();
    for (what, text) in [
        ("fetch output", &fetched),
        ("error", &missing),
        ("ls", &listed),
        ("metrics", &metrics),
        ("log", &log),
    ] {
        assert!(!text.contains(password), "{what} shows the password");
        assert!(
            !text.contains(&token),
            "{what} shows the encoded credentials"
        );
    }
    assert!(log.contains("sec/f:v1"), "the log is not empty: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_files_are_merged_and_a_rotation_is_picked_up() {
    let first = Registry::builder().basic_auth("alice", "right-1").start();
    let second = Registry::builder().basic_auth("bob", "right-2").start();
    oras_push_cncf(&first, "rot/f:v1", &module(100, 2));
    oras_push_cncf(&second, "rot/f:v1", &module(100, 3));
    let home = tempfile::tempdir().unwrap();
    let secret = |user: &str, password: &str, addr: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        json!({"auths": {addr: {"auth": auth}}}).to_string()
    };
    let one = home.path().join("one/.dockerconfigjson");
    let two = home.path().join("two/.dockerconfigjson");
    std::fs::create_dir_all(one.parent().unwrap()).unwrap();
    std::fs::create_dir_all(two.parent().unwrap()).unwrap();
    std::fs::write(&one, secret("alice", "old-pw-4c3b", &first.addr())).unwrap();
    std::fs::write(&two, secret("bob", "right-2", &second.addr())).unwrap();
    let config = format!(
        "insecure_registries = [\"{}\", \"{}\"]\nregistry_auth_file = \"{}\"\nregistry_auth_files = [\"{}\"]\n",
        first.addr(),
        second.addr(),
        one.display(),
        two.display()
    );
    let daemon = Daemon::start(&[], Some(&config));
    let fetch = |addr: String| {
        let socket = daemon.socket.clone();
        async move {
            wasmcache::client::connect(&socket)
                .await
                .unwrap()
                .fetch(FetchRequest {
                    reference: format!("{addr}/rot/f:v1"),
                    pull_policy: wasmcache::api::proto::PullPolicy::Always.into(),
                    ..Default::default()
                })
                .await
        }
    };
    fetch(second.addr())
        .await
        .expect("the second file's credentials are merged in");
    let status = fetch(first.addr()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The Secret is rotated the way kubelet does it: the file is replaced.
    let replacement = one.with_extension("new");
    std::fs::write(&replacement, secret("alice", "right-1", &first.addr())).unwrap();
    std::fs::rename(&replacement, &one).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while fetch(first.addr()).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let log = daemon.log();
    assert!(log.contains("registry credentials reloaded"), "{log}");
    assert!(
        !log.contains("right-1") && !log.contains("old-pw-4c3b"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_keyed_by_repository_prefix_win_over_the_hosts() {
    let registry = Registry::builder()
        .basic_auth("dave", "right-pw-77")
        .start();
    let addr = registry.addr();
    oras_push_cncf(&registry, "team/app:v1", &module(100, 5));
    oras_push_cncf(&registry, "other/app:v1", &module(100, 6));
    let home = tempfile::tempdir().unwrap();
    let auth = home.path().join("config.json");
    std::fs::write(
        &auth,
        json!({"auths": {
            addr.clone(): {"username": "dave", "password": "stale-pw-12"},
            format!("{addr}/team"): {"username": "dave", "password": "right-pw-77"},
        }})
        .to_string(),
    )
    .unwrap();
    let config = format!(
        "insecure_registries = [\"{addr}\"]\nregistry_auth_file = \"{}\"\n",
        auth.display()
    );
    let daemon = Daemon::start(&[], Some(&config));
    let request = |repository: &str| FetchRequest {
        reference: format!("{addr}/{repository}:v1"),
        ..Default::default()
    };
    let mut client = daemon.client().await;
    client
        .fetch(request("team/app"))
        .await
        .expect("the team/ entry's credentials are used under team/");
    let status = client.fetch(request("other/app")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// What a TCP client without the token gets under `tcp_reads = "token"` and `"cached"`, with
/// the token (bearer, or a pull secret's Basic credentials, as skopeo sends them), and with
/// the placeholder the manifests ship.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_reads_need_the_token_or_get_the_cache_alone() {
    let registry = Registry::start();
    let addr = registry.addr();
    let cached = module(30_000, 71);
    let uncached = module(30_000, 72);
    oras_push_cncf(&registry, "org/cached:v1", &cached);
    oras_push_cncf(&registry, "org/uncached:v1", &uncached);
    let home = tempfile::tempdir().unwrap();
    let token_file = home.path().join("token");
    let accept = crate::common::fixtures::MANIFEST_ACCEPT;
    let cached_path = format!("/v1/modules/{}", digest(&cached));
    let uncached_path = format!(
        "/v1/modules/{}?ref={addr}/org/uncached:v1",
        digest(&uncached)
    );
    let view_path = "/v2/local/org/cached/manifests/v1";

    for mode in ["token", "cached"] {
        std::fs::write(&token_file, "tcp-s3cret\n").unwrap();
        let port = free_port();
        let config = format!(
            "http_listen = \"127.0.0.1:{port}\"\ntcp_token_file = \"{}\"\n\
             tcp_reads = \"{mode}\"\ninsecure_registries = [\"{addr}\"]\n\
             [registry_aliases.local]\nhost = \"{addr}\"\ninsecure = true\n",
            token_file.display()
        );
        let daemon = Daemon::start(&[], Some(&config));
        daemon
            .client()
            .await
            .fetch(FetchRequest {
                reference: format!("{addr}/org/cached:v1"),
                ..Default::default()
            })
            .await
            .expect("the socket needs no token");
        let endpoint = Endpoint::plain(format!("127.0.0.1:{port}"));
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(endpoint.get(path, &[]).status, 200, "{mode}: {path}");
        }

        // Without the token: refused, or the cache alone; never a registry request.
        let before = registry.requests().len();
        let module_answer = endpoint.get(&cached_path, &[]);
        let fetch_answer = endpoint.get(&uncached_path, &[]);
        let view_answer = endpoint.get(view_path, &[("Accept", accept)]);
        let mut channel = WasmCacheClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let grpc_answer = channel
            .fetch(FetchRequest {
                reference: format!("{addr}/org/uncached:v1"),
                ..Default::default()
            })
            .await
            .unwrap_err();
        if mode == "token" {
            for answer in [&module_answer, &fetch_answer, &view_answer] {
                assert_eq!(answer.status, 401, "{mode}: {}", answer.text());
            }
            assert!(
                fetch_answer.text().contains("tcp_token_file"),
                "{}",
                fetch_answer.text()
            );
            assert_eq!(
                view_answer.header("www-authenticate"),
                Some("Basic realm=\"wasmcache\""),
                "an OCI client's cue to send its pull secret"
            );
            assert_eq!(view_answer.json()["errors"][0]["code"], "UNAUTHORIZED");
            assert_eq!(grpc_answer.code(), Code::Unauthenticated, "{grpc_answer:?}");
        } else {
            assert_eq!(module_answer.status, 200, "{}", module_answer.text());
            assert_eq!(module_answer.body, cached);
            assert_eq!(view_answer.status, 200, "{}", view_answer.text());
            assert_eq!(fetch_answer.status, 404, "{}", fetch_answer.text());
            assert!(
                fetch_answer.text().contains("tcp_reads"),
                "{}",
                fetch_answer.text()
            );
            assert_eq!(grpc_answer.code(), Code::NotFound, "{grpc_answer:?}");
            assert!(grpc_answer.message().contains("cached"), "{grpc_answer:?}");
        }
        assert_eq!(
            registry.requests().len(),
            before,
            "{mode}: a client without the token made the daemon ask the registry"
        );

        // With the token, as a bearer token or a pull secret's password: everything.
        let fetched = endpoint.get(&uncached_path, &[("Authorization", "Bearer tcp-s3cret")]);
        assert_eq!(fetched.status, 200, "{mode}: {}", fetched.text());
        assert_eq!(fetched.body, uncached);
        assert!(
            registry.requests().len() > before,
            "fetched from the registry"
        );
        let inspect = |creds: Option<&str>| {
            let mut command = Command::new(require_tool("skopeo"));
            isolate(&mut command, home.path()).args(["inspect", "--raw", "--tls-verify=false"]);
            if let Some(creds) = creds {
                command.args(["--creds", creds]);
            }
            command.arg(format!("docker://127.0.0.1:{port}/local/org/cached:v1"));
            run_with_timeout(&mut command, TOOL_TIMEOUT)
        };
        let with_secret = inspect(Some("anyone:tcp-s3cret"));
        assert!(
            with_secret.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&with_secret.stderr)
        );
        let without = inspect(None);
        assert_eq!(without.status.success(), mode == "cached", "{mode}");
        let wrong = inspect(Some("anyone:wrong"));
        assert_eq!(wrong.status.success(), mode == "cached", "{mode}");
        assert!(
            !daemon.log().contains("tcp-s3cret"),
            "the token is never logged"
        );
        drop(daemon);
    }

    // The placeholder the Kubernetes manifests ship is never accepted, and says so.
    let placeholder = "REPLACE-ME-placeholder-api-token-see-kustomization.yaml";
    std::fs::write(&token_file, format!("{placeholder}\n")).unwrap();
    let port = free_port();
    let config = format!(
        "http_listen = \"127.0.0.1:{port}\"\ntcp_token_file = \"{}\"\ntcp_reads = \"token\"\n",
        token_file.display()
    );
    let daemon = Daemon::start(&[], Some(&config));
    let endpoint = Endpoint::plain(format!("127.0.0.1:{port}"));
    let bearer = format!("Bearer {placeholder}");
    let refused = endpoint.get(&cached_path, &[("Authorization", &bearer)]);
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(refused.text().contains("placeholder"), "{}", refused.text());
    assert!(
        daemon.log().contains("shipped placeholder"),
        "{}",
        daemon.log()
    );
    assert_eq!(endpoint.get("/readyz", &[]).status, 200);
}

/// A unary call carries one request message; a second one in the same call is the caller's
/// error, not silently dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_unary_call_with_two_messages_is_invalid_argument() {
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&["--http-listen", &listen], None);
    // Two `UsageRequest`s (empty messages), one gRPC frame each, in one HTTP/1.1 POST.
    let frame = [0u8, 0, 0, 0, 0];
    let call = |frames: &[u8]| {
        Endpoint::plain(listen.clone()).request(
            "POST",
            "/wasmcache.v1.WasmCache/Usage",
            &[("Content-Type", "application/grpc"), ("TE", "trailers")],
            Some(frames),
        )
    };
    // One message: answered (the status comes in the trailers, after a response frame).
    let one = call(&frame);
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.header("grpc-status"), None, "{one:?}");
    assert!(
        one.body.len() >= 5 && one.body[0] == 0,
        "a response message: {one:?}"
    );
    let two = call(&[frame, frame].concat());
    assert_eq!(two.header("grpc-status"), Some("3"), "{two:?}");
    let message = two
        .header("grpc-message")
        .unwrap_or_default()
        .replace("%20", " ");
    assert!(
        message.contains("more than one request message"),
        "{message}"
    );
    drop(daemon);
}

/// The error of a `Fetch` of `reference` over the daemon's socket, which must fail.
async fn fetch_err(daemon: &Daemon, reference: String) -> tonic::Status {
    let request = FetchRequest {
        reference,
        ..Default::default()
    };
    let answer = daemon.client().await.fetch(request).await;
    answer.expect_err("the fetch fails")
}

/// What a client learns from a failed fetch: the registry and what failed, not whether the
/// port behind it was closed or spoke something other than TLS (which would map the ports of
/// any address a client names), and no path on the host. The daemon's log has both.
#[tokio::test(flavor = "multi_thread")]
async fn errors_tell_clients_no_transport_causes_and_no_host_paths() {
    let plain = Registry::start();
    let closed = free_port();
    let daemon = Daemon::start(&[], None);
    // A closed port, and a plain-HTTP registry asked over HTTPS.
    let refused = fetch_err(&daemon, format!("127.0.0.1:{closed}/org/m:v1")).await;
    let (host, port) = plain
        .addr()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .unwrap();
    let not_tls = fetch_err(&daemon, format!("{host}:{port}/org/m:v1")).await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(not_tls.code(), Code::Unavailable, "{not_tls:?}");
    assert_eq!(
        refused.message().replace(&closed.to_string(), "PORT"),
        not_tls.message().replace(&port, "PORT"),
        "the two look alike"
    );
    assert!(refused.message().contains("unreachable"), "{refused:?}");
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|line| line.contains("request failed") && line.contains("onnection refused")),
        "the log has the cause:\n{log}"
    );

    // A store error: `ingest` turned into a file behind the daemon's back.
    let registry = Registry::start();
    oras_push_cncf(&registry, "org/m:v1", &module(20_000, 91));
    let daemon = Daemon::start(&["--insecure-registry", &registry.addr()], None);
    let ingest = daemon.data_dir.join("ingest");
    std::fs::remove_dir_all(&ingest).unwrap();
    std::fs::write(&ingest, b"not a directory").unwrap();
    let failed = fetch_err(&daemon, format!("{}/org/m:v1", registry.addr())).await;
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    assert!(failed.message().contains("cache"), "{failed:?}");
    let data_dir = daemon.data_dir.display().to_string();
    assert!(!failed.message().contains(&data_dir), "{failed:?}");
    assert!(!failed.message().contains("/ingest"), "{failed:?}");
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|line| line.contains("request failed") && line.contains(&data_dir)),
        "the log names the file:\n{log}"
    );
}

/// A registry's redirects to a link-local address, or round in a loop, are refused before any
/// connection, naming why, whatever else the policy allows.
#[tokio::test(flavor = "multi_thread")]
async fn redirects_to_blocked_addresses_or_in_loops_are_refused() {
    use crate::common::{Behaviour, FaultyServer};

    let registry = FaultyServer::start();
    let redirect = |location: String| Behaviour::Ok {
        status: 307,
        headers: vec![("Location".into(), location)],
        body: Vec::new(),
    };
    registry.route(
        "/v2/r/metadata/manifests/v1",
        redirect("http://169.254.169.254/latest/meta-data/".into()),
    );
    registry.route(
        "/v2/r/loop/manifests/v1",
        redirect(format!("http://{}/v2/r/loop/manifests/v1", registry.addr())),
    );
    // Everything allowed but the default blocked_cidrs; a connection would fail slowly.
    let config = "insecure_registries = [\"*\"]\nconnect_timeout = \"1s\"\n";
    let daemon = Daemon::start(&[], Some(config));
    let metadata = fetch_err(&daemon, format!("{}/r/metadata:v1", registry.addr())).await;
    assert_eq!(metadata.code(), Code::PermissionDenied, "{metadata:?}");
    for part in ["169.254.169.254", "blocked_cidrs"] {
        assert!(metadata.message().contains(part), "{part}: {metadata:?}");
    }
    let looped = fetch_err(&daemon, format!("{}/r/loop:v1", registry.addr())).await;
    assert_eq!(looped.code(), Code::PermissionDenied, "{looped:?}");
    assert!(looped.message().contains("redirect"), "{looped:?}");
    let hops = registry
        .requests()
        .iter()
        .filter(|request| request.path == "/v2/r/loop/manifests/v1")
        .count();
    assert!((2..=6).contains(&hops), "at most a few hops: {hops}");
}

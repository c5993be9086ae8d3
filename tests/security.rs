//! Who may use the daemon, and what it never reveals: socket peer checks, the TCP bearer token
//! for mutating calls, and registry credentials kept out of logs, errors, metrics and listings.

use std::process::Command;

use base64::Engine as _;
use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::wasm_cache_client::WasmCacheClient;
use wasmcache::api::proto::{FetchRequest, RemoveRequest};

use crate::common::cli::{run_err, run_ok};
use crate::common::daemon::unix_request;
use crate::common::fixtures::oras_push_cncf;
use crate::common::wasm::module;
use crate::common::{
    free_port, require_tool, run_with_timeout, venv_python, Daemon, Registry, TOOL_TIMEOUT,
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

//! The examples in `deploy/examples/` are checked against a running daemon: the URLs, socket
//! paths, ports and digests they show are the ones the daemon really serves (the Istio and
//! Envoy Gateway ones in `examples.rs`).

use std::path::{Path, PathBuf};

use wasmcache::api::proto::{FetchRequest, PullPolicy};
use wasmcache::Config;

use crate::common::daemon::unix_request;
use crate::common::wasm::{module, sha256_hex};
use crate::common::{Daemon, Registry};

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples")
        .join(path)
}

fn yaml(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(example(path)).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

fn node_config() -> Config {
    Config::from_file(&example("wasmcache.toml")).expect("the example config is valid")
}

/// Walks `value` along `path` (object keys and array indexes).
fn at<'a>(value: &'a serde_json::Value, path: &[&str]) -> &'a serde_json::Value {
    path.iter()
        .fold(value, |value, key| match key.parse::<usize>() {
            Ok(index) => &value[index],
            Err(_) => &value[*key],
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_example_matches_what_the_daemon_serves() {
    let envoy = yaml("envoy/envoy.yaml");
    let filters = at(
        &envoy,
        &[
            "static_resources",
            "listeners",
            "0",
            "filter_chains",
            "0",
            "filters",
            "0",
            "typed_config",
            "http_filters",
        ],
    );
    let remote = at(
        filters,
        &["0", "typed_config", "config", "vm_config", "code", "remote"],
    );
    let uri = remote["http_uri"]["uri"].as_str().unwrap();
    let sha256 = remote["sha256"].as_str().unwrap();
    let cluster = remote["http_uri"]["cluster"].as_str().unwrap();
    assert_eq!(uri, format!("http://{cluster}/v1/modules/sha256:{sha256}"));
    let clusters = at(&envoy, &["static_resources", "clusters"]);
    let target = clusters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap();
    let pipe = at(
        target,
        &[
            "load_assignment",
            "endpoints",
            "0",
            "lb_endpoints",
            "0",
            "endpoint",
            "address",
            "pipe",
            "path",
        ],
    );
    assert_eq!(
        pipe.as_str().map(PathBuf::from),
        Some(node_config().socket_path())
    );

    // The example's digest is the 41-byte `add` module's; the daemon serves exactly that.
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(0, 0);
    crate::common::fixtures::oras_push_cncf(&registry, "filters/add:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let fetched = daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: format!("{addr}/filters/add:v1"),
            pull_policy: PullPolicy::IfNotPresent.into(),

            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.digest, format!("sha256:{sha256}"));
    let path = uri.trim_start_matches(&format!("http://{cluster}"));
    let response = unix_request(&daemon.socket, "GET", path, &[], None).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        sha256_hex(&response.body),
        sha256,
        "what Envoy would verify"
    );
}

#[test]
fn containerd_example_points_at_the_daemon_view() {
    let text = std::fs::read_to_string(example("containerd/hosts.toml")).unwrap();
    let hosts: toml::Table = toml::from_str(&text).unwrap();
    let server = hosts["server"].as_str().unwrap();
    let mirrors = hosts["host"].as_table().unwrap();
    assert_eq!(mirrors.len(), 1);
    let (mirror, settings) = mirrors.iter().next().unwrap();
    let listen = node_config().http_listen.unwrap();
    assert_eq!(mirror, &format!("http://{listen}"));
    let capabilities = settings["capabilities"].as_array().unwrap();
    assert!(capabilities.iter().any(|c| c.as_str() == Some("pull")));
    assert!(server.starts_with("https://registry.example.com:5000"));
}

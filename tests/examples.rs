//! The Istio and Envoy Gateway examples (`deploy/examples/istio/`, `deploy/examples/envoy-gateway/`)
//! and `wasmcache wasmplugin`: every document lints clean and uses only the fields of its
//! kind's schema, the address it names is the node-local Service of the deployment, and
//! each URL and `sha256` is what a running daemon really serves. `wasmcache wasmplugin`
//! prints, for each `--via`, a document of the same shape naming what the daemon holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{json, Value};
use wasmcache::api::proto::{FetchRequest, FetchResponse, PinRequest, PullPolicy, RemoveRequest};
use wasmcache::Config;

use crate::common::cli::{run_err, run_ok};
use crate::common::fixtures::{
    oras_push_cncf, push_raw, MANIFEST_ACCEPT, OCI_MANIFEST, WASME_CONFIG, WASME_LAYER,
};
use crate::common::wasm::{digest, module, sha256_hex};
use crate::common::{free_port, isolate, run_checked, venv_python, Daemon, Endpoint, Registry};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The YAML documents of `path` (relative to the repository), each non-empty one.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    parse_documents(&text, path)
}

fn parse_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The one document of `kind` in `documents`, read as `T` (unknown fields refused).
fn typed<T: serde::de::DeserializeOwned>(documents: &[Value], kind: &str) -> Vec<T> {
    let found: Vec<T> = documents
        .iter()
        .filter(|document| document["kind"] == kind)
        .map(|document| {
            serde_json::from_value(document.clone())
                .unwrap_or_else(|e| panic!("a {kind} with a field its schema lacks: {e}"))
        })
        .collect();
    assert!(!found.is_empty(), "no {kind}");
    found
}

/// Runs yamllint with the repository's settings for `deploy/` on `file`.
fn yamllint(file: &Path) {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(venv_python());
    isolate(&mut command, home.path())
        .current_dir(repo())
        .args(["-m", "yamllint", "--strict", "--format", "parsable", "-c"])
        .arg(repo().join("deploy/.yamllint"))
        .arg(file);
    run_checked(&mut command);
}

// The schema structs below list the fields the examples may use; serde alone reads some.

/// The fields of Istio's `WasmPlugin` the examples may use (`extensions/v1alpha1/wasm.proto`).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WasmPlugin {
    api_version: String,
    metadata: Metadata,
    spec: WasmPluginSpec,
    kind: String,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WasmPluginSpec {
    selector: Option<Selector>,
    url: String,
    sha256: String,
    image_pull_policy: Option<String>,
    image_pull_secret: Option<String>,
    phase: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Selector {
    match_labels: BTreeMap<String, String>,
}

/// The fields of Envoy Gateway's `EnvoyExtensionPolicy` the example may use
/// (`api/v1alpha1/envoyextensionpolicy_types.go`, `wasm_types.go`).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExtensionPolicy {
    api_version: String,
    metadata: Metadata,
    spec: ExtensionPolicySpec,
    kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExtensionPolicySpec {
    target_refs: Vec<TargetRef>,
    wasm: Vec<Wasm>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetRef {
    group: String,
    kind: String,
    name: String,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Wasm {
    name: Option<String>,
    #[serde(rename = "rootID")]
    root_id: Option<String>,
    code: WasmCode,
    fail_open: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WasmCode {
    #[serde(rename = "type")]
    kind: String,
    http: Option<CodeSource>,
    image: Option<CodeSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeSource {
    url: String,
    sha256: Option<String>,
}

/// The deployed DaemonSet and ConfigMap (`deploy/kubernetes/`), and the config it ships.
struct Node {
    daemonset: Value,
    config: Config,
}

fn node() -> Node {
    let find = |file: &str, kind: &str| {
        documents(&format!("deploy/kubernetes/{file}"))
            .into_iter()
            .find(|document| document["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {file}"))
    };
    let configmap = find("configmap.yaml", "ConfigMap");
    let toml_text = configmap["data"]["wasmcache.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasmcache.toml");
    std::fs::write(&path, toml_text).unwrap();
    Node {
        daemonset: find("daemonset.yaml", "DaemonSet"),
        config: Config::from_file(&path).expect("the ConfigMap's config is valid"),
    }
}

impl Node {
    fn pod(&self) -> &Value {
        &self.daemonset["spec"]["template"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["spec"]["containers"].as_array().unwrap();
        containers
            .iter()
            .find(|c| c["name"] == "wasmcache")
            .unwrap()
    }
}

/// The address of the node-local Service, after checking that it leads to the HTTP listener
/// of the daemon on the caller's own node.
fn node_local_address() -> String {
    let path = "deploy/kubernetes/examples/node-local-service.yaml";
    let service = documents(path).pop().unwrap();
    assert_eq!(service["kind"], "Service");
    let node = node();
    assert_eq!(service["spec"]["internalTrafficPolicy"], "Local");
    assert_eq!(
        service["spec"]["selector"],
        node.pod()["metadata"]["labels"],
        "the Service selects the daemons"
    );
    assert_eq!(
        service["metadata"]["namespace"],
        node.daemonset["metadata"]["namespace"]
    );
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    let target = ports[0]["targetPort"].as_str().expect("a named port");
    let container_ports = node.container()["ports"].as_array().unwrap();
    let container_port = container_ports
        .iter()
        .find(|port| port["name"] == target)
        .unwrap_or_else(|| panic!("the daemon has no port {target}"));
    let listen = node.config.http_listen.expect("http_listen");
    assert!(listen.ip().is_unspecified(), "{listen} is on the pod IP");
    assert_eq!(
        container_port["containerPort"].as_u64(),
        Some(u64::from(listen.port())),
        "the Service's target is the HTTP listener"
    );
    format!(
        "{}.{}.svc.cluster.local:{}",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap(),
        ports[0]["port"]
    )
}

/// The example registry setup (`deploy/examples/wasmcache.toml`): `hub`'s registry.
fn hub_registry() -> String {
    let config = Config::from_file(&repo().join("deploy/examples/wasmcache.toml")).unwrap();
    config.registry_aliases["hub"].host.clone()
}

/// The wasme artifact of two layers (config, module) that the examples pin: what Istio's
/// agent and Envoy Gateway read from a registry, and the OCI view serves.
fn wasme_artifact(wasm: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(
        &json!({"type": "envoy_proxy", "abiVersions": ["v0.2.1"], "config": {"rootIds": ["add"]}}),
    )
    .unwrap();
    let config_descriptor =
        json!({"mediaType": WASME_CONFIG, "digest": digest(&config), "size": config.len()});
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
        "layers": [
            config_descriptor,
            {"mediaType": WASME_LAYER, "digest": digest(wasm), "size": wasm.len()},
        ],
    }))
    .unwrap();
    (config, manifest)
}

/// Pushes the examples' artifact as `filters/add:v1`; returns the manifest's bytes.
fn push_add(registry: &Registry) -> Vec<u8> {
    let wasm = module(0, 0);
    let (config, manifest) = wasme_artifact(&wasm);
    push_raw(
        registry,
        "filters/add",
        "v1",
        &manifest,
        OCI_MANIFEST,
        vec![config, wasm],
    );
    manifest
}

/// What Istio's agent asks of a registry for `oci://<host>/<name>:<target>`, on `endpoint`.
fn view_manifest(endpoint: &Endpoint, name: &str, target: &str) -> crate::common::http::Response {
    let path = format!("/v2/{name}/manifests/{target}");
    let response = endpoint.get(&path, &[("Accept", MANIFEST_ACCEPT)]);
    assert_eq!(response.status, 200, "GET {path}: {}", response.text());
    response
}

/// Checks a manifest the way Istio's agent reads a wasme artifact (`pkg/wasm/imagefetcher.go`:
/// exactly two layers, one of them the module) and returns the module layer's digest.
fn istio_readable_module_layer(manifest: &[u8]) -> String {
    let manifest: Value = serde_json::from_slice(manifest).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(
        layers.len(),
        2,
        "Istio's agent reads wasme artifacts of two layers"
    );
    let module: Vec<&Value> = layers
        .iter()
        .filter(|layer| layer["mediaType"] == WASME_LAYER)
        .collect();
    assert_eq!(module.len(), 1, "{manifest}");
    module[0]["digest"].as_str().unwrap().to_owned()
}

/// A daemon set up like a node of the examples: the `hub` alias of `wasmcache.toml`, whose
/// registry `registry` stands in for (as its mirror), and an HTTP listener on a free port.
fn example_node(registry: &Registry) -> (Daemon, Endpoint) {
    let (addr, hub) = (registry.addr(), hub_registry());
    let port = free_port();
    let toml = format!(
        "http_listen = \"127.0.0.1:{port}\"\ninsecure_registries = [\"{addr}\"]\n\
         [registry_aliases.hub]\nhost = \"{hub}\"\n\
         [registry_mirrors]\n\"{hub}\" = [\"{addr}\"]\n"
    );
    let daemon = Daemon::start(&[], Some(&toml));
    (daemon, Endpoint::plain(format!("127.0.0.1:{port}")))
}

/// Path and query of an `http://` URL on `host`.
fn path_on<'a>(url: &'a str, scheme: &str, host: &str) -> &'a str {
    let rest = url
        .strip_prefix(&format!("{scheme}://{host}"))
        .unwrap_or_else(|| panic!("{url} is not on {scheme}://{host}"));
    assert!(rest.starts_with('/'), "{url}");
    rest
}

const ISTIO_OCI: &str = "deploy/examples/istio/wasmplugin-oci.yaml";
const ISTIO_HTTP: &str = "deploy/examples/istio/wasmplugin-http.yaml";
const ISTIO_FILE: &str = "deploy/examples/istio/wasmplugin-file.yaml";
const ENVOY_GATEWAY: &str = "deploy/examples/envoy-gateway/extension-policy.yaml";

fn plugin(path: &str) -> WasmPlugin {
    let mut plugins = typed::<WasmPlugin>(&documents(path), "WasmPlugin");
    assert_eq!(plugins.len(), 1, "{path}");
    let plugin = plugins.pop().unwrap();
    assert_eq!(plugin.api_version, "extensions.istio.io/v1alpha1");
    plugin
}

#[test]
fn examples_lint_clean_and_say_when_to_use_them() {
    for path in [ISTIO_OCI, ISTIO_HTTP, ISTIO_FILE, ENVOY_GATEWAY] {
        yamllint(&repo().join(path));
        let text = std::fs::read_to_string(repo().join(path)).unwrap();
        assert!(
            text.starts_with("# "),
            "{path} starts with its header comment"
        );
        assert!(
            text.contains("node-local-service.yaml") || path == ISTIO_FILE,
            "{path} says how it reaches the daemon"
        );
    }
    for path in [ISTIO_OCI, ISTIO_HTTP, ISTIO_FILE] {
        let text = std::fs::read_to_string(repo().join(path)).unwrap();
        assert!(text.contains("\n# When: "), "{path} says when to use it");
    }
    let policies = typed::<ExtensionPolicy>(&documents(ENVOY_GATEWAY), "EnvoyExtensionPolicy");
    for policy in &policies {
        assert_eq!(policy.api_version, "gateway.envoyproxy.io/v1alpha1");
        for target in &policy.spec.target_refs {
            assert_eq!(target.group, "gateway.networking.k8s.io");
            assert!(["Gateway", "HTTPRoute"].contains(&target.kind.as_str()));
        }
        for wasm in &policy.spec.wasm {
            // The CRD's rule: the source named by `type`, and only that one.
            let code = &wasm.code;
            match code.kind.as_str() {
                "HTTP" => assert!(code.http.is_some() && code.image.is_none()),
                "Image" => assert!(code.image.is_some() && code.http.is_none()),
                other => panic!("unknown code source type {other}"),
            }
        }
    }
}

#[test]
fn examples_reach_the_daemon_through_the_node_local_service() {
    let address = node_local_address();
    assert_eq!(
        address,
        wasmcache::wasmplugin::DEFAULT_DAEMON_ADDRESS,
        "`wasmcache wasmplugin` prints what the examples use"
    );

    // OCI: the view, with the example registry's alias.
    let oci = plugin(ISTIO_OCI);
    let rest = path_on(&oci.spec.url, "oci", &address);
    assert_eq!(rest, "/hub/filters/add:v1");
    assert!(
        hub_registry().contains(':'),
        "a registry with a port needs the alias"
    );
    // The comment's WASM_INSECURE_REGISTRIES names the same address.
    let text = std::fs::read_to_string(repo().join(ISTIO_OCI)).unwrap();
    let marker = "\"WASM_INSECURE_REGISTRIES\":\"";
    let start = text
        .find(marker)
        .expect("WASM_INSECURE_REGISTRIES is shown")
        + marker.len();
    let listed = &text[start..start + text[start..].find('"').unwrap()];
    assert_eq!(listed, address);
    // The view needs the daemon's token (tcp_reads = "token" as shipped): the pull secret the
    // plugin names is created, in the comment, for the same address.
    let secret = oci
        .spec
        .image_pull_secret
        .as_deref()
        .expect("imagePullSecret");
    let namespace = oci.metadata.namespace.as_deref().unwrap_or("default");
    assert!(
        text.contains(&format!(
            "kubectl -n {namespace} create secret docker-registry {secret}"
        )) && text.contains(&format!("--docker-server={address}")),
        "{text}"
    );

    // HTTP: the module API, for the module the file example reads too.
    let http = plugin(ISTIO_HTTP);
    let rest = path_on(&http.spec.url, "http", &address);
    let (path, query) = rest.split_once('?').unwrap();
    assert_eq!(path, format!("/v1/modules/sha256:{}", http.spec.sha256));
    let reference = query.strip_prefix("ref=").unwrap();
    assert_eq!(
        reference.replace("%3A", ":").replace("%2F", "/"),
        format!("{}/filters/add:v1", hub_registry())
    );
    let file = plugin(ISTIO_FILE);
    assert_eq!(file.spec.sha256, http.spec.sha256);

    // Envoy Gateway: the same module API URL and view reference.
    let policies = typed::<ExtensionPolicy>(&documents(ENVOY_GATEWAY), "EnvoyExtensionPolicy");
    let code: Vec<&WasmCode> = policies
        .iter()
        .flat_map(|p| p.spec.wasm.iter().map(|w| &w.code))
        .collect();
    let http_source = code.iter().find_map(|c| c.http.as_ref()).unwrap();
    assert_eq!(http_source.url, http.spec.url);
    assert_eq!(http_source.sha256.as_ref(), Some(&http.spec.sha256));
    let image = code.iter().find_map(|c| c.image.as_ref()).unwrap();
    assert_eq!(
        format!("oci://{}", image.url),
        oci.spec.url,
        "Envoy Gateway names the image without the scheme"
    );
    assert_eq!(image.sha256.as_ref(), Some(&oci.spec.sha256));
}

#[test]
fn file_example_mounts_the_cache_read_only_into_the_proxy() {
    let node = node();
    let data_dir = node.config.data_dir.to_str().unwrap().to_owned();
    let volumes = node.pod()["spec"]["volumes"].as_array().unwrap();
    let data = volumes
        .iter()
        .find(|volume| volume["hostPath"]["path"] == data_dir.as_str())
        .expect("the DaemonSet's data dir is a hostPath");
    assert_eq!(data["hostPath"]["path"], data_dir.as_str());

    let documents = documents(ISTIO_FILE);
    let plugin = typed::<WasmPlugin>(&documents, "WasmPlugin").pop().unwrap();
    let file = plugin.spec.url.strip_prefix("file://").unwrap();
    assert_eq!(
        file,
        format!("{data_dir}/blobs/sha256/{}", plugin.spec.sha256),
        "where the daemon stores the module"
    );

    let deployment = documents
        .iter()
        .find(|document| document["kind"] == "Deployment")
        .unwrap();
    let template = &deployment["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    let selector = &plugin.spec.selector.as_ref().unwrap().match_labels;
    for (key, value) in selector {
        assert_eq!(
            labels[key],
            value.as_str(),
            "the plugin selects the workload"
        );
    }
    assert_eq!(
        plugin.metadata.namespace,
        deployment["metadata"]["namespace"]
            .as_str()
            .map(str::to_owned)
    );
    let annotations = &template["metadata"]["annotations"];
    let parse = |name: &str| -> Vec<Value> {
        serde_json::from_str(annotations[name].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{name} is not a JSON list: {e}"))
    };
    let volumes = parse("sidecar.istio.io/userVolume");
    let mounts = parse("sidecar.istio.io/userVolumeMount");
    let mount = mounts
        .iter()
        .find(|mount| file.starts_with(&format!("{}/", mount["mountPath"].as_str().unwrap())))
        .expect("the module file is under a mount of the proxy");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        mount["mountPath"],
        data_dir.as_str(),
        "mounted at its host path"
    );
    let volume = volumes
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], data_dir.as_str());
    assert_eq!(volume["hostPath"]["type"], "Directory");
    let group = &node.container()["securityContext"]["runAsGroup"];
    let groups = template["spec"]["securityContext"]["supplementalGroups"]
        .as_array()
        .unwrap();
    assert!(groups.contains(group), "the pod joins the daemon's group");

    // The prefetch line it shows pins the module by digest on every node.
    let text = std::fs::read_to_string(repo().join(ISTIO_FILE)).unwrap();
    let line = text
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .find(|line| line.trim_end().ends_with(" pin"))
        .expect("a prefetch line with `pin`");
    let list = Path::new("/etc/wasmcache/prefetch/images.txt");
    let (entries, bad) = wasmcache::prefetch::parse_list(line.trim(), list);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(entries[0].pin);
    let oci = self::plugin(ISTIO_OCI);
    assert_eq!(
        entries[0].reference.digest().map(|d| d.hex().to_owned()),
        Some(oci.spec.sha256),
        "the manifest of the examples' artifact"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn example_urls_are_what_the_daemon_serves() {
    let address = node_local_address();
    let oci = plugin(ISTIO_OCI);
    let http = plugin(ISTIO_HTTP);
    let file = plugin(ISTIO_FILE);

    let registry = Registry::start();
    let manifest = push_add(&registry);
    assert_eq!(
        sha256_hex(&manifest),
        oci.spec.sha256,
        "the OCI example pins this manifest"
    );
    let (daemon, endpoint) = example_node(&registry);

    // The module API first, on a node that does not hold the module: `ref` is pulled through.
    let response = endpoint.get(path_on(&http.spec.url, "http", &address), &[]);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/wasm"));
    assert_eq!(
        sha256_hex(&response.body),
        http.spec.sha256,
        "what Istio checks"
    );

    // The OCI view: the manifest by tag with the example's digest, and the module layer.
    let rest = path_on(&oci.spec.url, "oci", &address);
    let (name, tag) = rest[1..].rsplit_once(':').unwrap();
    let response = view_manifest(&endpoint, name, tag);
    let expected = format!("sha256:{}", oci.spec.sha256);
    assert_eq!(
        response.header("docker-content-digest"),
        Some(expected.as_str())
    );
    assert_eq!(response.body, manifest);
    let layer = istio_readable_module_layer(&response.body);
    let blob = endpoint.get(&format!("/v2/{name}/blobs/{layer}"), &[]);
    assert_eq!(blob.status, 200, "{}", blob.text());
    assert!(blob.body.starts_with(b"\0asm"));
    assert_eq!(digest(&blob.body), layer);
    assert_eq!(
        sha256_hex(&blob.body),
        http.spec.sha256,
        "one module in every example"
    );

    // The file: where the daemon stores the module it fetched for the reference.
    let fetched = daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: format!("{}/filters/add:v1", hub_registry()),
            pull_policy: PullPolicy::IfNotPresent.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let node_path = file.spec.url.strip_prefix("file://").unwrap();
    let relative = Path::new(node_path)
        .strip_prefix(&node().config.data_dir)
        .unwrap();
    assert_eq!(PathBuf::from(&fetched.path), daemon.data_dir.join(relative));
    let bytes = std::fs::read(&fetched.path).unwrap();
    assert_eq!(sha256_hex(&bytes), file.spec.sha256);
    assert_eq!(fetched.digest, format!("sha256:{}", file.spec.sha256));

    // Envoy Gateway's two sources, likewise.
    let policies = typed::<ExtensionPolicy>(&documents(ENVOY_GATEWAY), "EnvoyExtensionPolicy");
    for wasm in policies.iter().flat_map(|p| &p.spec.wasm) {
        if let Some(source) = &wasm.code.http {
            let response = endpoint.get(path_on(&source.url, "http", &address), &[]);
            assert_eq!(response.status, 200, "{}", response.text());
            assert_eq!(Some(sha256_hex(&response.body)), source.sha256);
        }
        if let Some(source) = &wasm.code.image {
            let (name, tag) = path_on(&format!("oci://{}", source.url), "oci", &address)[1..]
                .rsplit_once(':')
                .map(|(name, tag)| (name.to_owned(), tag.to_owned()))
                .unwrap();
            let response = view_manifest(&endpoint, &name, &tag);
            assert_eq!(Some(sha256_hex(&response.body)), source.sha256);
        }
    }
}

/// `wasmcache wasmplugin` against `daemon`; returns stdout and stderr.
fn wasmplugin(daemon: &Daemon, args: &[&str]) -> (String, String) {
    let output = run_checked(daemon.command("wasmplugin").args(args));
    (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Lints `yaml` as an example file would be, and reads it back.
fn printed_plugin(yaml: &str) -> WasmPlugin {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wasmplugin.yaml");
    std::fs::write(&file, yaml).unwrap();
    yamllint(&file);
    let documents = parse_documents(yaml, "wasmcache wasmplugin's output");
    assert_eq!(documents.len(), 1, "{yaml}");
    let mut plugins = typed::<WasmPlugin>(&documents, "WasmPlugin");
    let plugin = plugins.pop().unwrap();
    assert_eq!(plugin.api_version, "extensions.istio.io/v1alpha1");
    assert_eq!(plugin.metadata.name, "add");
    assert_eq!(plugin.metadata.namespace.as_deref(), Some("istio-system"));
    let labels = &plugin.spec.selector.as_ref().unwrap().match_labels;
    assert_eq!(
        labels,
        &BTreeMap::from([
            ("istio".to_owned(), "ingressgateway".to_owned()),
            ("version".to_owned(), "1.0".to_owned()),
        ])
    );
    plugin
}

async fn fetch(daemon: &Daemon, reference: &str) -> FetchResponse {
    daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: reference.to_owned(),
            pull_policy: PullPolicy::IfNotPresent.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn wasmplugin_prints_what_the_daemon_holds_for_each_via() {
    let mut registry = Registry::start();
    let addr = registry.addr();
    push_add(&registry);
    let port = free_port();
    let toml = format!(
        "http_listen = \"127.0.0.1:{port}\"\n[registry_aliases.hub]\nhost = \"{addr}\"\ninsecure = true\n"
    );
    let daemon = Daemon::start(&[], Some(&toml));
    let endpoint = Endpoint::plain(format!("127.0.0.1:{port}"));
    let daemon_address = endpoint.addr.clone();
    let reference = format!("{addr}/filters/add:v1");
    let args = |via: &'static str| -> Vec<String> {
        [
            reference.as_str(),
            "--name",
            "add",
            "--namespace",
            "istio-system",
            "--selector",
            "istio=ingressgateway",
            "--selector",
            "version=1.0",
            "--via",
            via,
            "--daemon-address",
            &daemon_address,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |via: &'static str| {
        let args = args(via);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        wasmplugin(&daemon, &args)
    };

    // oci: the manifest the view serves, by digest, and its digest as `sha256`.
    let (yaml, _) = run("oci");
    let plugin = printed_plugin(&yaml);
    let fetched = fetch(&daemon, &reference).await;
    assert_eq!(
        fetched.index_digest, "",
        "a reference that names a manifest"
    );
    assert_eq!(fetched.resolved_digest, fetched.manifest_digest);
    assert_eq!(
        format!("sha256:{}", plugin.spec.sha256),
        fetched.resolved_digest
    );
    assert_eq!(
        plugin.spec.url,
        format!(
            "oci://{daemon_address}/hub/filters/add@{}",
            fetched.manifest_digest
        )
    );
    let pinned_manifest = view_manifest(&endpoint, "hub/filters/add", &fetched.manifest_digest);
    assert_eq!(
        pinned_manifest.header("docker-content-digest"),
        Some(fetched.manifest_digest.as_str())
    );
    istio_readable_module_layer(&pinned_manifest.body);

    // http: the module, named by its digest, with the reference pinned by digest.
    let (yaml, _) = run("http");
    let plugin = printed_plugin(&yaml);
    assert_eq!(format!("sha256:{}", plugin.spec.sha256), fetched.digest);
    let path = path_on(&plugin.spec.url, "http", &daemon_address).to_owned();
    let response = endpoint.get(&path, &[]);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(sha256_hex(&response.body), plugin.spec.sha256);
    // Another node's daemon, which holds nothing yet, serves the same URL by pulling `ref`.
    let other_port = free_port();
    let other = Daemon::start(
        &["--insecure-registry", &addr],
        Some(&format!("http_listen = \"127.0.0.1:{other_port}\"\n")),
    );
    let response = Endpoint::plain(format!("127.0.0.1:{other_port}")).get(&path, &[]);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(sha256_hex(&response.body), plugin.spec.sha256);
    drop(other);

    // file: the module file, pinned by its manifest's digest first.
    let (yaml, stderr) = run("file");
    let plugin = printed_plugin(&yaml);
    assert_eq!(format!("sha256:{}", plugin.spec.sha256), fetched.digest);
    assert_eq!(plugin.spec.url, format!("file://{}", fetched.path));
    assert_eq!(
        Path::new(&fetched.path),
        daemon
            .data_dir
            .join("blobs/sha256")
            .join(&plugin.spec.sha256)
    );
    let bytes = std::fs::read(&fetched.path).unwrap();
    assert_eq!(sha256_hex(&bytes), plugin.spec.sha256);
    let pinned = format!("{addr}/filters/add@{}", fetched.manifest_digest);
    assert!(stderr.contains(&format!("pinned: {pinned}")), "{stderr}");
    let mut client = daemon.client().await;
    let removed = client
        .remove(RemoveRequest {
            target: pinned.clone(),
        })
        .await;
    assert!(removed.is_err(), "a pinned reference is not removed");
    let unpinned = client
        .unpin(PinRequest {
            reference: pinned.clone(),
        })
        .await
        .expect("the reference was pinned")
        .into_inner();
    assert!(unpinned.changed);
    let tag = client
        .unpin(PinRequest {
            reference: reference.clone(),
        })
        .await;
    assert_eq!(
        tag.unwrap_err().code(),
        tonic::Code::NotFound,
        "the tag itself is left unpinned"
    );

    // With the registry gone, the pinned URLs are still served from the node.
    registry.stop();
    let response = view_manifest(&endpoint, "hub/filters/add", &fetched.manifest_digest);
    assert_eq!(response.body, pinned_manifest.body);
    let response = endpoint.get(&path, &[]);
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn wasmplugin_refuses_what_istio_cannot_load() {
    let registry = Registry::start();
    let addr = registry.addr();
    push_add(&registry);
    oras_push_cncf(&registry, "filters/cncf:v1", &module(0, 0));
    let toml = format!("[registry_aliases.hub]\nhost = \"{addr}\"\ninsecure = true\n");
    let daemon = Daemon::start(&[], Some(&toml));
    let common = ["--name", "add", "--via", "oci"];

    // A CNCF artifact: Istio's agent does not read it, through the view or anywhere.
    let cncf = format!("{addr}/filters/cncf:v1");
    let (code, stderr) = run_err(daemon.command("wasmplugin").arg(&cncf).args(common));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cncf-wasm") && stderr.contains("--via http"),
        "{stderr}"
    );
    // The module API serves it.
    let yaml = run_ok(
        daemon
            .command("wasmplugin")
            .arg(&cncf)
            .args(["--name", "add", "--via", "http"]),
    );
    assert!(yaml.contains("/v1/modules/sha256:"), "{yaml}");

    // A registry with a port and no alias: the view cannot name it.
    let bare = Daemon::start(&["--insecure-registry", &addr], None);
    let reference = format!("{addr}/filters/add:v1");
    let (_, stderr) = run_err(bare.command("wasmplugin").arg(&reference).args(common));
    assert!(stderr.contains("registry_aliases"), "{stderr}");

    // Names Kubernetes would refuse are refused before the daemon is asked.
    let (_, stderr) = run_err(
        daemon
            .command("wasmplugin")
            .arg(&reference)
            .args(["--name", "Add", "--via", "http"]),
    );
    assert!(stderr.contains("invalid name 'Add'"), "{stderr}");
    let (_, stderr) = run_err(daemon.command("wasmplugin").arg(&reference).args([
        "--name",
        "add",
        "--daemon-address",
        "http://node:9977",
    ]));
    assert!(stderr.contains("invalid daemon address"), "{stderr}");
}

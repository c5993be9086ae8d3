//! The Kubernetes deployment in `deploy/kubernetes/` and the `Dockerfile` it runs: the
//! manifests validate against the Kubernetes schemas (offline) and lint clean, the
//! kustomization deploys every one of them, the DaemonSet's mounts, ports, user and grace
//! period agree with the config it ships, the peers' Service, NetworkPolicy and token agree
//! with its `[peers]` table, and the real daemon serves its probes with that config.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use wasmcache::config::ConfigArgs;
use wasmcache::Config;

use crate::common::cli::wasmcache_in;
use crate::common::daemon::unix_request;
use crate::common::{
    free_port, isolate, require_tool, run_checked, venv_python, wait_until, ChildGuard, Endpoint,
};

/// Kubernetes versions the manifests are validated against: the oldest one they target and the
/// newest whose schemas kubernetes-validate bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.31.0", "1.37.0"];
/// The Secret the DaemonSet reads registry credentials from (named in the README).
const REGISTRY_AUTH_SECRET: &str = "wasmcache-registry-auth";
/// How long the daemon may take to bind its socket and to report ready.
const START_TIMEOUT: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// The `.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        })
        .collect();
    files.sort();
    files
}

/// What `kubectl apply -k deploy/kubernetes` may deploy: every YAML file there but the
/// kustomization itself.
fn manifest_files() -> Vec<PathBuf> {
    yaml_files(&kubernetes_dir())
        .into_iter()
        .filter(|path| path.file_name() != Some("kustomization.yaml".as_ref()))
        .collect()
}

/// Every manifest to validate: the deployed ones and the examples.
fn all_manifest_files() -> Vec<PathBuf> {
    let mut files = manifest_files();
    files.extend(yaml_files(&kubernetes_dir().join("examples")));
    files
}

/// The non-empty documents of a YAML stream.
fn parse_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_documents(&text, &path.display().to_string())
}

/// The one resource of `kind` among the deployed manifests.
fn resource(kind: &str) -> Value {
    let mut found: Vec<Value> = manifest_files()
        .iter()
        .flat_map(|path| documents(path))
        .filter(|document| document["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/kubernetes");
    found.pop().unwrap()
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

fn items<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {value}"))
}

/// The element of a named list (`volumes`, `containers`, `ports`) called `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    items(list, name)
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name} in {list}"))
}

/// The DaemonSet's daemon container.
fn daemon_container(daemonset: &Value) -> &Value {
    named(
        &daemonset["spec"]["template"]["spec"]["containers"],
        "wasmcache",
    )
}

/// The volume mounted at `mount_path` in `container`, and the mount itself.
fn mounted_at<'a>(
    pod: &'a Value,
    container: &'a Value,
    mount_path: &Path,
) -> (&'a Value, &'a Value) {
    let mount = items(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|mount| Path::new(text(&mount["mountPath"], "mountPath")) == mount_path)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", mount_path.display()));
    assert!(
        mount.get("subPath").is_none(),
        "{} uses subPath, which never sees updates",
        mount_path.display()
    );
    let volume = named(&pod["volumes"], text(&mount["name"], "volume name"));
    (volume, mount)
}

/// The ConfigMap's `wasmcache.toml` as the daemon reads it (with the `POD_IP` the DaemonSet
/// sets, which the peers' self_address defaults to), validated.
fn shipped_config(configmap: &Value) -> (String, Config) {
    let toml_text = text(&configmap["data"]["wasmcache.toml"], "wasmcache.toml").to_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("wasmcache.toml");
    fs::write(&path, &toml_text).expect("writing the config");
    Config::from_file(&path).expect("the ConfigMap's wasmcache.toml is a valid config");
    let args = ConfigArgs {
        config: Some(path),
        pod_ip: Some(std::net::IpAddr::from([10, 0, 0, 7])),
        ..ConfigArgs::default()
    };
    let config = Config::resolve(args).expect("the ConfigMap's wasmcache.toml passes validation");
    (toml_text, config)
}

/// The Secrets kustomization.yaml generates: `namespace/name` and the `secretGenerator` entry.
fn generated_secrets() -> Vec<(String, Value)> {
    let kustomization = documents(&kubernetes_dir().join("kustomization.yaml"));
    let generators = kustomization[0]["secretGenerator"].as_array().cloned();
    generators
        .unwrap_or_default()
        .into_iter()
        .map(|generator| {
            let id = format!(
                "{}/{}",
                text(&generator["namespace"], "generator namespace"),
                text(&generator["name"], "generator name")
            );
            (id, generator)
        })
        .collect()
}

/// The token in the file a Secret that kustomization.yaml generates puts at `path` in the
/// daemon's container: the Secret is mounted read-only and not optional, under the name the
/// DaemonSet gives it.
fn generated_token(daemonset: &Value, path: &Path) -> String {
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = daemon_container(daemonset);
    let (volume, mount) = mounted_at(pod, container, path.parent().unwrap());
    assert_eq!(mount["readOnly"], true);
    assert!(volume["secret"].get("optional").is_none(), "{volume}");
    let secret = format!(
        "{}/{}",
        text(&daemonset["metadata"]["namespace"], "namespace"),
        text(&volume["secret"]["secretName"], "secretName")
    );
    let (_, generator) = generated_secrets()
        .into_iter()
        .find(|(id, _)| *id == secret)
        .unwrap_or_else(|| panic!("kustomization.yaml generates no Secret {secret}"));
    assert_eq!(generator["options"]["disableNameSuffixHash"], true);
    let prefix = format!("{}=", path.file_name().unwrap().to_str().unwrap());
    let source = items(&generator["files"], "files")
        .iter()
        .find_map(|file| text(file, "file").strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{prefix}<file>` in {generator}"));
    fs::read_to_string(kubernetes_dir().join(source)).expect("the token file")
}

/// The port number behind a probe's `port` (a container port's name, or a number).
fn container_port(container: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(number) => number.as_u64().expect("a port number"),
        Value::String(name) => named(&container["ports"], name)["containerPort"]
            .as_u64()
            .expect("containerPort"),
        other => panic!("unexpected port {other}"),
    }
}

/// A command for a tool from the test venv (kubernetes-validate, yamllint, hadolint), with
/// proxies pointed at a closed port so that any attempt to download something fails loudly.
fn venv_tool(home: &Path, program: &str) -> Command {
    let bin = venv_python().parent().expect("venv bin dir").to_owned();
    let mut command = Command::new(bin.join(program));
    isolate(&mut command, home).current_dir(repo());
    for proxy in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
    ] {
        command.env(proxy, "http://127.0.0.1:9");
    }
    command
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let home = tempfile::tempdir().expect("temp home");
    let files = all_manifest_files();
    let mut command = venv_tool(home.path(), "python");
    command.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        command.args(["--kubernetes-version", version]);
    }
    command.args(&files);
    let output = run_checked(&mut command);
    let report = String::from_utf8_lossy(&output.stdout);

    // Unknown kinds or API versions are only warnings to kubernetes-validate: refuse them too,
    // and make sure every resource was really checked against every version.
    let lines: Vec<&str> = report.lines().filter(|line| !line.is_empty()).collect();
    assert!(
        lines.iter().all(|line| line.starts_with("INFO ")),
        "kubernetes-validate reported problems:\n{report}"
    );
    let mut expected = 0;
    for file in &files {
        let shown = file.display().to_string();
        for document in documents(file) {
            let resource = format!(
                "{}/{}",
                text(&document["kind"], "kind").to_lowercase(),
                text(&document["metadata"]["name"], "name")
            );
            for version in KUBERNETES_VERSIONS {
                let minor = version.rsplit_once('.').unwrap().0;
                let line =
                    format!("INFO {shown} passed for resource {resource} against version {minor}");
                assert!(report.contains(&line), "missing `{line}` in:\n{report}");
                expected += 1;
            }
        }
    }
    assert_eq!(lines.len(), expected, "{report}");
    assert!(files.len() >= 5, "the manifests were found: {files:?}");
}

#[test]
fn yaml_under_deploy_passes_yamllint() {
    let home = tempfile::tempdir().expect("temp home");
    let config = repo().join("deploy/.yamllint");
    let listed = run_checked(
        venv_tool(home.path(), "python")
            .args(["-m", "yamllint", "--list-files", "-c"])
            .arg(&config)
            .arg("deploy"),
    );
    let listed: BTreeSet<PathBuf> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|line| repo().join(line))
        .collect();
    for file in all_manifest_files()
        .into_iter()
        .chain([kubernetes_dir().join("kustomization.yaml")])
    {
        assert!(listed.contains(&file), "yamllint skips {}", file.display());
    }
    run_checked(
        venv_tool(home.path(), "python")
            .args(["-m", "yamllint", "--strict", "--format", "parsable", "-c"])
            .arg(&config)
            .arg("deploy"),
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization = documents(&kubernetes_dir().join("kustomization.yaml"));
    assert_eq!(kustomization.len(), 1);
    let kustomization = &kustomization[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    let resources: Vec<&str> = items(&kustomization["resources"], "resources")
        .iter()
        .map(|resource| text(resource, "resource"))
        .collect();
    let listed: BTreeSet<&str> = resources.iter().copied().collect();
    assert_eq!(listed.len(), resources.len(), "listed twice: {resources:?}");
    let files: Vec<PathBuf> = manifest_files();
    let on_disk: BTreeSet<String> = files
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = listed.into_iter().map(str::to_owned).collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml's resources and the manifests in deploy/kubernetes differ"
    );

    // Everything lands in the wasmcache namespace, which is deployed first.
    let kinds: Vec<Value> = resources
        .iter()
        .flat_map(|file| documents(&kubernetes_dir().join(file)))
        .collect();
    assert_eq!(kinds[0]["kind"], "Namespace", "the namespace comes first");
    let namespace = text(&kinds[0]["metadata"]["name"], "namespace");
    assert_eq!(namespace, "wasmcache");
    for resource in &kinds[1..] {
        assert_eq!(
            resource["metadata"]["namespace"], namespace,
            "{} is outside the namespace",
            resource["metadata"]["name"]
        );
    }
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "NetworkPolicy",
        "DaemonSet",
    ] {
        assert!(kinds.iter().any(|r| r["kind"] == kind), "no {kind}");
    }
}

#[test]
fn kustomize_builds_exactly_the_listed_manifests() {
    // kubectl ships kustomize; rendering is local (no cluster, no network).
    let home = tempfile::tempdir().expect("temp home");
    let mut command = Command::new(require_tool("kubectl"));
    isolate(&mut command, home.path())
        .env("KUBECONFIG", home.path().join("no-kubeconfig"))
        .current_dir(repo())
        .args(["kustomize", "deploy/kubernetes"]);
    let output = run_checked(&mut command);
    let rendered = parse_documents(&String::from_utf8_lossy(&output.stdout), "kustomize output");
    let identity = |resource: &Value| {
        format!(
            "{}/{}/{}",
            text(&resource["kind"], "kind"),
            resource["metadata"]["namespace"].as_str().unwrap_or(""),
            text(&resource["metadata"]["name"], "name")
        )
    };
    let built: BTreeSet<String> = rendered.iter().map(identity).collect();
    let mut written: BTreeSet<String> = manifest_files()
        .iter()
        .flat_map(|path| documents(path))
        .map(|resource| identity(&resource))
        .collect();
    // And the Secrets it generates, under their own names (no hash suffix).
    for (id, _) in generated_secrets() {
        written.insert(format!("Secret/{id}"));
    }
    assert_eq!(built, written);
    assert_eq!(rendered.len(), built.len());
    // The rendered DaemonSet is the one on disk (kustomize adds nothing to it).
    let daemonset = rendered.iter().find(|r| r["kind"] == "DaemonSet").unwrap();
    assert_eq!(daemonset["spec"], resource("DaemonSet")["spec"]);
}

#[test]
fn daemonset_agrees_with_the_daemon_config() {
    let daemonset = resource("DaemonSet");
    let configmap = resource("ConfigMap");
    let configmap_name = text(&configmap["metadata"]["name"], "ConfigMap name");
    let (_, config) = shipped_config(&configmap);
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = daemon_container(&daemonset);

    // `serve --config <the ConfigMap's wasmcache.toml>`.
    let args: Vec<&str> = items(&container["args"], "args")
        .iter()
        .map(|arg| text(arg, "arg"))
        .collect();
    assert_eq!(args[..2], ["serve", "--config"]);
    assert_eq!(args.len(), 3, "{args:?}");
    let config_path = Path::new(args[2]);
    let (volume, _) = mounted_at(pod, container, config_path.parent().unwrap());
    assert_eq!(volume["configMap"]["name"], configmap_name);
    assert_eq!(
        volume["configMap"]["items"],
        serde_json::json!([{"key": "wasmcache.toml", "path": config_path.file_name().unwrap().to_str().unwrap()}])
    );

    // The cache and the socket dir are host directories, mounted at their host paths so that
    // the paths the daemon hands out are the same in client pods.
    let socket = config.socket_path();
    let socket_dir = socket.parent().unwrap();
    for dir in [config.data_dir.as_path(), socket_dir] {
        let (volume, mount) = mounted_at(pod, container, dir);
        assert_eq!(
            Path::new(text(&volume["hostPath"]["path"], "hostPath")),
            dir,
            "{} is the host's",
            dir.display()
        );
        assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate");
        assert_ne!(mount["readOnly"], true, "{} is writable", dir.display());
    }
    assert_eq!(config.data_dir, Path::new("/var/lib/wasmcache"));
    assert_eq!(socket, Path::new("/run/wasmcache/wasmcache.sock"));
    assert_eq!(config.socket_mode, 0o660);

    // The examples in deploy/examples assume the same node paths and port.
    let node = Config::from_file(&repo().join("deploy/examples/wasmcache.toml")).unwrap();
    assert_eq!(node.data_dir, config.data_dir);
    assert_eq!(node.socket_path(), socket);
    assert_eq!(
        node.http_listen.map(|a| a.port()),
        config.http_listen.map(|a| a.port())
    );

    // Every probe asks the HTTP listener, on all interfaces so that the kubelet reaches it.
    let listen = config.http_listen.expect("http_listen is set");
    assert!(
        listen.ip().is_unspecified(),
        "{listen} is reachable from the kubelet"
    );
    let http = named(&container["ports"], "http");
    assert_eq!(
        http["containerPort"].as_u64(),
        Some(u64::from(listen.port()))
    );
    assert!(http.get("hostPort").is_none(), "hostPort stays opt-in");
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            u64::from(listen.port()),
            "{probe}"
        );
    }

    // The prefetch directory is the ConfigMap's images.txt alone: every file in it is read as
    // a list, so wasmcache.toml must not appear there.
    assert_eq!(
        config.prefetch_files.len(),
        1,
        "{:?}",
        config.prefetch_files
    );
    let (volume, _) = mounted_at(pod, container, &config.prefetch_files[0]);
    assert_eq!(volume["configMap"]["name"], configmap_name);
    assert_eq!(
        volume["configMap"]["items"],
        serde_json::json!([{"key": "images.txt", "path": "images.txt"}])
    );

    // Registry credentials: the optional dockerconfigjson Secret's only key.
    let auth = config
        .registry_auth_file
        .as_deref()
        .expect("registry_auth_file is set");
    assert_eq!(auth.file_name().unwrap(), ".dockerconfigjson");
    let (volume, mount) = mounted_at(pod, container, auth.parent().unwrap());
    assert_eq!(volume["secret"]["secretName"], REGISTRY_AUTH_SECRET);
    assert_eq!(volume["secret"]["optional"], true);
    assert_eq!(mount["readOnly"], true);

    // The kubelet waits longer than the daemon's own shutdown grace.
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        Duration::from_secs(termination) > config.shutdown_grace,
        "terminationGracePeriodSeconds {termination} <= shutdown_grace {:?}",
        config.shutdown_grace
    );
    assert_eq!(config.shutdown_grace, Duration::from_secs(20));

    // Non-root, read-only, no capabilities; the init container hands the host dirs to that
    // same UID/GID.
    let security = &container["securityContext"];
    let uid = security["runAsUser"].as_u64().expect("runAsUser");
    let gid = security["runAsGroup"].as_u64().expect("runAsGroup");
    assert_ne!(uid, 0);
    assert_eq!((uid, gid), (65532, 65532));
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(security["capabilities"].get("add").is_none());
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    let init = items(&pod["initContainers"], "initContainers");
    assert_eq!(init.len(), 1);
    let script = items(&init[0]["command"], "command")
        .iter()
        .map(|part| text(part, "command"))
        .collect::<Vec<_>>()
        .join(" ");
    let chown = format!(
        "chown {uid}:{gid} {} {}",
        config.data_dir.display(),
        socket_dir.display()
    );
    assert!(script.contains(&chown), "`{script}` runs `{chown}`");
    for dir in [config.data_dir.as_path(), socket_dir] {
        mounted_at(pod, &init[0], dir);
    }

    // Everywhere, always, first to stay.
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let strategy = &daemonset["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);
    assert!(
        strategy["rollingUpdate"].get("maxSurge").is_none(),
        "two daemons cannot share a data dir"
    );
    assert_eq!(
        container["env"],
        serde_json::json!([
            {"name": "WASMCACHE_LOG", "value": "info"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ])
    );
    for (kind, value) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "cpu"),
        ("limits", "memory"),
    ] {
        assert!(
            container["resources"][kind][value].is_string(),
            "resources.{kind}.{value}"
        );
    }
}

#[test]
fn peers_find_and_reach_only_each_other() {
    let daemonset = resource("DaemonSet");
    let (toml_text, config) = shipped_config(&resource("ConfigMap"));
    let table: toml::Table = toml::from_str(&toml_text).unwrap();
    let peers = table
        .get("peers")
        .and_then(toml::Value::as_table)
        .expect("a [peers] table");
    let setting = |key: &str| -> String {
        let value = peers.get(key).and_then(toml::Value::as_str);
        value
            .unwrap_or_else(|| panic!("peers.{key} is not set"))
            .to_owned()
    };
    let labels = &daemonset["spec"]["selector"]["matchLabels"];
    let container = daemon_container(&daemonset);

    // The peer listener: all interfaces, the container port `peer`, on the pod network only.
    let listen: std::net::SocketAddr = setting("listen").parse().expect("peers.listen");
    assert!(
        listen.ip().is_unspecified(),
        "{listen} is reachable from the other nodes"
    );
    let peer = named(&container["ports"], "peer");
    assert_eq!(
        peer["containerPort"].as_u64(),
        Some(u64::from(listen.port()))
    );
    assert!(peer.get("hostPort").is_none(), "peers use pod IPs");
    // self_address is left to its default: $POD_IP with the port of `listen`.
    assert!(peers.get("self_address").is_none());
    assert_eq!(
        named(&container["env"], "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );

    // `dns` names the headless Service of the ready daemons, on the peer port.
    let service = resource("Service");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], false);
    assert_eq!(&service["spec"]["selector"], labels);
    let port = named(&service["spec"]["ports"], "peer");
    assert_eq!(port["port"].as_u64(), Some(u64::from(listen.port())));
    assert_eq!(port["targetPort"], "peer");
    assert_eq!(
        setting("dns"),
        format!(
            "{}.{}.svc.cluster.local:{}",
            text(&service["metadata"]["name"], "Service name"),
            text(&service["metadata"]["namespace"], "Service namespace"),
            listen.port()
        )
    );

    // The token: a Secret kustomization.yaml generates (under its own name, as the DaemonSet
    // names it), mounted read-only and not optional where token_file points.
    let token = generated_token(&daemonset, Path::new(&setting("token_file")));
    assert!(!token.trim().is_empty());

    // The clients' token on the pod network (tcp_token_file) too; as shipped it is a
    // placeholder the daemon never accepts, and every read on TCP needs it.
    let api_token_file = config.tcp_token_file.as_ref().expect("tcp_token_file");
    let api_token = generated_token(&daemonset, api_token_file);
    assert!(
        wasmcache::api::guard::is_placeholder(api_token.trim()),
        "{api_token}"
    );
    assert_eq!(config.tcp_reads, wasmcache::config::TcpReads::Token);

    // The NetworkPolicy: the peer port admits the daemons alone, every other port the container
    // declares stays open to every source, as it was before the policy.
    let policy = resource("NetworkPolicy");
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], labels);
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let rules = items(&policy["spec"]["ingress"], "ingress");
    for declared in items(&container["ports"], "ports") {
        let number = declared["containerPort"].as_u64().expect("containerPort");
        let admitting: Vec<&Value> = rules
            .iter()
            .filter(|rule| {
                items(&rule["ports"], "rule ports")
                    .iter()
                    .any(|port| container_port(container, &port["port"]) == number)
            })
            .collect();
        assert_eq!(admitting.len(), 1, "one rule admits port {number}");
        let from = &admitting[0]["from"];
        if number == u64::from(listen.port()) {
            let daemons = serde_json::json!([{"podSelector": {"matchLabels": labels}}]);
            assert_eq!(*from, daemons, "port {number}");
        } else {
            assert!(
                from.is_null(),
                "port {number} is open to every source: {from}"
            );
        }
    }
}

#[test]
fn configmap_settings_and_prefetch_list_are_real() {
    let configmap = resource("ConfigMap");
    let (toml_text, _) = shipped_config(&configmap);

    // The settings shown commented out are real keys: uncommented, the file still parses.
    let mut uncommented = 0;
    let lines: Vec<String> = toml_text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting)
                if toml::from_str::<toml::Table>(setting).is_ok_and(|t| !t.is_empty())
                    || (setting.starts_with('[') && setting.ends_with(']')) =>
            {
                uncommented += 1;
                setting.to_owned()
            }
            _ => line.to_owned(),
        })
        .collect();
    assert!(uncommented >= 3, "{uncommented} commented settings found");
    let all = lines.join("\n");
    let config: Config = toml::from_str(&all)
        .unwrap_or_else(|e| panic!("a commented setting is not a config key: {e}\n{all}"));
    config.validate().unwrap();

    // images.txt fetches nothing, and its commented example is a valid list line.
    let list = text(&configmap["data"]["images.txt"], "images.txt");
    let file = Path::new("/etc/wasmcache/prefetch/images.txt");
    let (entries, bad) = wasmcache::prefetch::parse_list(list, file);
    assert!(entries.is_empty(), "{entries:?}");
    assert!(bad.is_empty(), "{bad:?}");
    let examples: Vec<_> = list
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .map(|line| wasmcache::prefetch::parse_list(line, file))
        .filter(|(entries, bad)| entries.len() == 1 && bad.is_empty())
        .collect();
    assert_eq!(examples.len(), 1, "one commented example line");
}

#[test]
fn sidecar_example_reaches_the_socket() {
    let daemonset = resource("DaemonSet");
    let configmap = resource("ConfigMap");
    let (_, config) = shipped_config(&configmap);
    let socket_dir = config.socket_path().parent().unwrap().to_owned();
    let group = daemon_container(&daemonset)["securityContext"]["runAsGroup"].clone();
    let host_paths: BTreeSet<String> =
        items(&daemonset["spec"]["template"]["spec"]["volumes"], "volumes")
            .iter()
            .filter_map(|volume| volume["hostPath"]["path"].as_str())
            .map(str::to_owned)
            .collect();

    let example = kubernetes_dir().join("examples/sidecar-patch.yaml");
    let workloads = documents(&example);
    assert!(!workloads.is_empty());
    let mut through_annotations = 0;
    for workload in &workloads {
        let name = text(&workload["metadata"]["name"], "name");
        let template = &workload["spec"]["template"];
        let groups = items(
            &template["spec"]["securityContext"]["supplementalGroups"],
            "supplementalGroups",
        );
        assert!(groups.contains(&group), "{name} has the daemon's group");

        // Volumes and mounts: in the pod spec, or for Istio's sidecar in its annotations.
        let mut volumes: Vec<Value> = template["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut mounts: Vec<Value> = items(&template["spec"]["containers"], "containers")
            .iter()
            .flat_map(|c| c["volumeMounts"].as_array().cloned().unwrap_or_default())
            .collect();
        let annotations = &template["metadata"]["annotations"];
        if let Some(user_volume) = annotations["sidecar.istio.io/userVolume"].as_str() {
            let parse = |json: &str| -> Vec<Value> {
                serde_json::from_str(json)
                    .unwrap_or_else(|e| panic!("{name}: annotation is not a JSON list: {e}"))
            };
            volumes.extend(parse(user_volume));
            let user_mounts = text(
                &annotations["sidecar.istio.io/userVolumeMount"],
                "userVolumeMount",
            );
            mounts.extend(parse(user_mounts));
            through_annotations += 1;
        }
        let mut reaches_socket = false;
        for mount in &mounts {
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{name}: no volume for {mount}"));
            let Some(host_path) = volume["hostPath"]["path"].as_str() else {
                continue;
            };
            assert!(host_paths.contains(host_path), "{name}: {host_path}");
            assert_eq!(
                volume["hostPath"]["type"], "Directory",
                "{name}: {host_path}"
            );
            assert_eq!(
                mount["mountPath"], host_path,
                "{name}: mounted at its host path"
            );
            if Path::new(host_path) == socket_dir {
                reaches_socket = true;
            } else {
                assert_eq!(mount["readOnly"], true, "{name}: {host_path} is read-only");
            }
        }
        assert!(reaches_socket, "{name} mounts {}", socket_dir.display());
    }
    assert!(through_annotations >= 1, "an Istio sidecar example");
}

#[test]
fn dockerfile_passes_hadolint_and_matches_the_daemonset() {
    let home = tempfile::tempdir().expect("temp home");
    run_checked(
        venv_tool(home.path(), "hadolint")
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(repo().join("Dockerfile")),
    );

    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let instruction = |keyword: &str| -> Vec<&str> {
        dockerfile
            .lines()
            .filter_map(|line| line.strip_prefix(keyword))
            .map(str::trim)
            .collect()
    };
    let container = daemon_container(&resource("DaemonSet")).clone();
    let security = &container["securityContext"];
    assert_eq!(
        instruction("USER "),
        [format!(
            "{}:{}",
            security["runAsUser"], security["runAsGroup"]
        )]
    );
    assert_eq!(
        instruction("ENTRYPOINT "),
        [r#"["/usr/local/bin/wasmcache"]"#]
    );
    assert_eq!(instruction("CMD "), [r#"["serve"]"#]);
    assert_eq!(container["args"][0], "serve");
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "the image is built from Cargo.lock"
    );
    let ignored = fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for entry in ["target/", ".git/"] {
        assert!(
            ignored.lines().any(|line| line == entry),
            ".dockerignore has {entry}"
        );
    }
}

#[test]
fn daemon_serves_probes_and_metrics_with_the_configmap_config() {
    let daemonset = resource("DaemonSet");
    let configmap = resource("ConfigMap");
    let (toml_text, config) = shipped_config(&configmap);
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = daemon_container(&daemonset);

    // The node's directories under a temp root: each absolute path in the config is re-rooted
    // there, and the listen port moved to a free one; every other key stays as shipped.
    let root = tempfile::Builder::new()
        .prefix("kubernetes-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("node root");
    let node = |path: &Path| {
        root.path()
            .join(path.strip_prefix("/").expect("absolute path"))
    };
    let mut table: toml::Table = toml::from_str(&toml_text).unwrap();
    let mut rerooted = BTreeSet::new();
    reroot(&mut table, "", &node, &mut rerooted);
    let expected: BTreeSet<String> = [
        "data_dir",
        "socket",
        "prefetch_files",
        "registry_auth_file",
        "tcp_token_file",
        "peers.token_file",
    ]
    .map(String::from)
    .into();
    assert_eq!(rerooted, expected, "the absolute paths in the config");
    let port = free_port();
    table.insert("http_listen".into(), format!("127.0.0.1:{port}").into());
    // No cluster DNS here: on a one-node cluster the Service's one record is the daemon itself,
    // so that is its one static peer, on the loopback address standing in for its pod IP.
    let peer_port = free_port();
    let peers = table
        .get_mut("peers")
        .and_then(toml::Value::as_table_mut)
        .expect("a [peers] table");
    peers.remove("dns").expect("peers.dns");
    peers.insert("listen".into(), format!("127.0.0.1:{peer_port}").into());
    peers.insert(
        "static".into(),
        vec![format!("127.0.0.1:{peer_port}")].into(),
    );
    let config_arg = text(&container["args"][2], "config path");
    let config_file = node(Path::new(config_arg));
    fs::create_dir_all(config_file.parent().unwrap()).unwrap();
    fs::write(&config_file, toml::to_string(&table).unwrap()).unwrap();

    // What the kubelet provides: the hostPath dirs, the prefetch list, the peer token; no
    // registry Secret.
    fs::create_dir_all(node(&config.data_dir)).unwrap();
    let socket = node(&config.socket_path());
    fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let prefetch = node(&config.prefetch_files[0]);
    fs::create_dir_all(&prefetch).unwrap();
    let list = text(&configmap["data"]["images.txt"], "images.txt");
    fs::write(prefetch.join("images.txt"), list).unwrap();
    let token_file = Path::new(table["peers"]["token_file"].as_str().expect("token_file"));
    fs::create_dir_all(token_file.parent().unwrap()).unwrap();
    fs::write(token_file, "test-peer-token\n").unwrap();
    let api_token_file = Path::new(table["tcp_token_file"].as_str().expect("tcp_token_file"));
    fs::create_dir_all(api_token_file.parent().unwrap()).unwrap();
    fs::write(api_token_file, "test-api-token\n").unwrap();

    // The DaemonSet's own arguments and environment.
    let log_path = root.path().join("daemon.log");
    let log = fs::File::create(&log_path).unwrap();
    let mut command = wasmcache_in(root.path());
    for arg in items(&container["args"], "args") {
        match text(arg, "arg") {
            arg if arg == config_arg => command.arg(&config_file),
            arg => command.arg(arg),
        };
    }
    for variable in items(&container["env"], "env") {
        // The downward API's pod IP: the loopback address the listeners use here.
        let value = match variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("status.podIP") => "127.0.0.1",
            _ => text(&variable["value"], "env value"),
        };
        command.env(text(&variable["name"], "env name"), value);
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut daemon = ChildGuard::spawn(&mut command);
    let read_log = || fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_until(START_TIMEOUT, || std::os::unix::net::UnixStream::connect(
            &socket
        )
        .is_ok()),
        "the daemon did not bind {}:\n{}",
        socket.display(),
        read_log()
    );
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");

    // The probes, as the kubelet sends them, on the HTTP listener.
    let endpoint = Endpoint::plain(format!("127.0.0.1:{port}"));
    let readiness = text(
        &container["readinessProbe"]["httpGet"]["path"],
        "readiness path",
    );
    assert!(
        // (The TCP listeners are bound just after the socket: a refused connection is retried.)
        wait_until(START_TIMEOUT, || endpoint
            .try_request("GET", readiness, &[], None)
            .is_ok_and(|response| response.status == 200)),
        "{readiness} never answered 200:\n{}",
        read_log()
    );
    for probe in ["startupProbe", "livenessProbe"] {
        let path = text(&container[probe]["httpGet"]["path"], "probe path");
        let response = endpoint.get(path, &[]);
        assert_eq!(response.status, 200, "{probe} {path}: {}", response.text());
    }
    let metrics = endpoint.get("/metrics", &[]);
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    let body = metrics.text();
    assert!(body.contains("wasmcache_cache_entries"), "{body}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text: {body}"
    );

    // Everything else on the pod network needs the token.
    let module = format!("/v1/modules/sha256:{}", "0".repeat(64));
    let refused = endpoint.get(&module, &[]);
    assert_eq!(refused.status, 401, "{}", refused.text());
    let allowed = endpoint.get(&module, &[("Authorization", "Bearer test-api-token")]);
    assert_eq!(allowed.status, 404, "past the guard: {}", allowed.text());

    // Client pods get the same answers over the socket.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let response = runtime.block_on(unix_request(&socket, "GET", readiness, &[], None));
    assert_eq!(response.status, 200);

    // Ready means the prefetch list was read (ready_after_prefetch); it asked for nothing, and
    // nothing in the config drew a warning.
    let started = read_log();
    assert!(!started.contains("WARN"), "warnings at start:\n{started}");
    assert!(!started.contains("ERROR"), "errors at start:\n{started}");

    // SIGTERM, as the kubelet sends it: the daemon exits 0 well within the grace period the
    // pod gives it, and removes its socket.
    let pid = daemon.id().expect("daemon running");
    let signalled = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let deadline = Instant::now() + grace;
    let status = loop {
        if let Some(status) = daemon.child_mut().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "not stopped within {grace:?}:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}:\n{}", read_log());
    assert!(!socket.exists(), "the socket is removed on exit");
}

/// Re-roots every absolute path in `table` (recursively) with `node`, recording the keys.
fn reroot(
    table: &mut toml::Table,
    prefix: &str,
    node: &dyn Fn(&Path) -> PathBuf,
    rerooted: &mut BTreeSet<String>,
) {
    let moved = |value: &str| node(Path::new(value)).to_string_lossy().into_owned();
    for (key, value) in table.iter_mut() {
        let name = format!("{prefix}{key}");
        match value {
            toml::Value::String(path) if path.starts_with('/') => {
                *path = moved(path);
                rerooted.insert(name);
            }
            toml::Value::Array(values) => {
                for value in values {
                    if let toml::Value::String(path) = value {
                        if path.starts_with('/') {
                            *path = moved(path);
                            rerooted.insert(name.clone());
                        }
                    }
                }
            }
            toml::Value::Table(inner) => reroot(inner, &format!("{name}."), node, rerooted),
            _ => {}
        }
    }
}

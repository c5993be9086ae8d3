//! `wasmcache inspect`: modules built here from WAT, inspected as files and as references
//! pushed to a real registry, read through a daemon and without one; a wasme config that
//! claims an ABI the module does not export is reported.

use std::fs;
use std::path::Path;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::common::cli::{run_err, run_ok, wasmcache};
use crate::common::fixtures::{oras_push_cncf, oras_push_wasme, push_raw, CNCF_CONFIG, CNCF_LAYER};
use crate::common::wasm::digest;
use crate::common::{Daemon, Registry};

/// A proxy-wasm filter as the SDKs build it: the ABI 0.2.1 marker, callbacks, host calls in
/// `env` and WASI in `wasi_snapshot_preview1`.
const FILTER: &str = r#"(module
    (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
    (import "env" "proxy_get_header_map_value" (func (param i32 i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "proxy_abi_version_0_2_1"))
    (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
    (func (export "proxy_on_context_create") (param i32 i32))
    (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) i32.const 0))"#;

/// A WASI command: no proxy-wasm ABI.
const WASI: &str = r#"(module
    (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
    (memory (export "memory") 1)
    (func (export "_start")))"#;

/// A filter that speaks two ABI versions.
const TWO_ABIS: &str = r#"(module
    (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
    (func (export "proxy_abi_version_0_2_1"))
    (func (export "proxy_abi_version_0_1_0"))
    (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0))"#;

fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("test WAT")
}

/// What every inspection of the [`FILTER`] module says about its bytes.
fn filter_fields(module: &[u8]) -> Value {
    json!({
        "digest": digest(module),
        "size": module.len(),
        "kind": "core",
        "imports": {
            "env": ["proxy_log", "proxy_get_header_map_value"],
            "wasi_snapshot_preview1": ["fd_write"],
        },
        "exports": [
            "memory",
            "proxy_abi_version_0_2_1",
            "proxy_on_vm_start",
            "proxy_on_context_create",
            "proxy_on_request_headers",
        ],
        "proxy_wasm_abi": ["0.2.1"],
        "unclaimed_abi": [],
        "warnings": [],
    })
}

fn wasi_fields(module: &[u8]) -> Value {
    json!({
        "digest": digest(module),
        "size": module.len(),
        "kind": "core",
        "imports": {"wasi_snapshot_preview1": ["fd_write", "proc_exit"]},
        "exports": ["memory", "_start"],
        "proxy_wasm_abi": [],
        "unclaimed_abi": [],
        "warnings": [],
    })
}

fn two_abis_fields(module: &[u8]) -> Value {
    json!({
        "digest": digest(module),
        "size": module.len(),
        "kind": "core",
        "imports": {"env": ["proxy_log"]},
        "exports": [
            "proxy_abi_version_0_2_1",
            "proxy_abi_version_0_1_0",
            "proxy_on_memory_allocate",
        ],
        "proxy_wasm_abi": ["0.1.0", "0.2.1"],
        "unclaimed_abi": [],
        "warnings": [],
    })
}

/// One line of `inspect`'s text output.
fn line(label: &str, value: &str) -> String {
    format!("{label:<17}{value}\n")
}

/// The end of `inspect`'s text output for the [`FILTER`] module, from `kind:`.
fn filter_text() -> String {
    [
        line("kind:", "core module"),
        "imports:\n".to_owned(),
        "  env: proxy_log, proxy_get_header_map_value\n".to_owned(),
        "  wasi_snapshot_preview1: fd_write\n".to_owned(),
        line(
            "exports:",
            "memory, proxy_abi_version_0_2_1, proxy_on_vm_start, proxy_on_context_create, \
             proxy_on_request_headers",
        ),
        line("proxy_wasm_abi:", "0.2.1"),
    ]
    .concat()
}

/// `fields` with `extra` merged in.
fn with(mut fields: Value, extra: Value) -> Value {
    for (key, value) in extra.as_object().expect("object") {
        fields[key] = value.clone();
    }
    fields
}

/// Runs `command` (an `inspect --json …`) and parses what it printed.
fn inspect_json(command: &mut std::process::Command) -> Value {
    let out = run_ok(command);
    assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect --json printed {out:?}: {e}"))
}

/// The same inspection without the `path`, which names where each cache keeps the file.
fn without_path(mut inspection: Value) -> Value {
    let path = inspection["path"].take();
    let path = Path::new(path.as_str().expect("path"));
    assert!(path.is_absolute(), "{inspection}");
    inspection.as_object_mut().unwrap().remove("path");
    inspection
}

#[test]
fn inspects_module_files() {
    let dir = TempDir::new().expect("temp dir");
    let cases = [
        (
            "filter.wasm",
            wat(FILTER),
            filter_fields as fn(&[u8]) -> Value,
        ),
        ("wasi.wasm", wat(WASI), wasi_fields),
        ("two-abis.wasm", wat(TWO_ABIS), two_abis_fields),
    ];
    for (name, module, fields) in &cases {
        let path = dir.path().join(name);
        fs::write(&path, module).expect("writing the module");
        let path = fs::canonicalize(&path).unwrap();
        let inspection = inspect_json(wasmcache().args(["inspect", "--json"]).arg(&path));
        let expected = with(
            fields(module),
            json!({"format": "file", "annotations": {}, "path": path}),
        );
        assert_eq!(inspection, expected, "{name}");
    }

    let path = fs::canonicalize(dir.path().join("filter.wasm")).unwrap();
    let text = run_ok(wasmcache().arg("inspect").arg(&path));
    let filter = wat(FILTER);
    let expected = [
        line("format:", "file"),
        line("digest:", &digest(&filter)),
        line("size:", &filter.len().to_string()),
        line("path:", &path.display().to_string()),
        filter_text(),
    ]
    .concat();
    assert_eq!(text, expected);
    let text = run_ok(wasmcache().arg("inspect").arg(dir.path().join("wasi.wasm")));
    assert!(text.ends_with(&line("proxy_wasm_abi:", "none")), "{text}");
}

#[test]
fn a_file_that_is_not_wasm_is_an_error() {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("notes.txt");
    fs::write(&path, "not a module").unwrap();
    let (code, stderr) = run_err(wasmcache().arg("inspect").arg(&path));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not WebAssembly"), "{stderr}");
    assert!(stderr.contains("notes.txt"), "{stderr}");
}

/// The three modules pushed to `registry`: the filter and the WASI module as CNCF artifacts,
/// the two-ABI filter as a wasme image whose config claims both, and the filter once more as
/// a CNCF artifact with manifest annotations. Returns `(reference, expected inspection)`.
fn push_modules(registry: &Registry) -> Vec<(String, Value)> {
    let addr = registry.addr();
    let mut pushed = Vec::new();
    let mut expect = |tag: &str, manifest_digest: &str, fields: Value| {
        let reference = format!("{addr}/filters/inspect:{tag}");
        let top = json!({
            "reference": reference,
            "resolved_digest": manifest_digest,
            "manifest_digest": manifest_digest,
        });
        pushed.push((reference, with(fields, top)));
    };

    let filter = wat(FILTER);
    let manifest = oras_push_cncf(registry, "filters/inspect:filter", &filter);
    let fields = json!({"format": "cncf-wasm", "annotations": {}});
    expect(
        "filter",
        &manifest.digest,
        with(filter_fields(&filter), fields),
    );

    let wasi = wat(WASI);
    let manifest = oras_push_cncf(registry, "filters/inspect:wasi", &wasi);
    let fields = json!({"format": "cncf-wasm", "annotations": {}});
    expect("wasi", &manifest.digest, with(wasi_fields(&wasi), fields));

    let two = wat(TWO_ABIS);
    let config =
        r#"{"type":"envoy_proxy","abiVersions":["v0.1.0","0.2.1"],"config":{"rootIds":["two"]}}"#;
    let manifest = oras_push_wasme(registry, "filters/inspect:two", &two, config);
    let wasme =
        json!({"type": "envoy_proxy", "abi_versions": ["v0.1.0", "0.2.1"], "root_ids": ["two"]});
    let fields = json!({"format": "wasme", "annotations": {}, "wasme": wasme});
    expect("two", &manifest.digest, with(two_abis_fields(&two), fields));

    // A manifest with annotations of its own (oras-py writes none unless asked).
    let config = json!({"architecture": "wasm", "os": "wasip1", "layerDigests": [digest(&filter)]});
    let config = config.to_string().into_bytes();
    let annotations = json!({
        "org.opencontainers.image.source": "https://example.com/filters",
        "org.opencontainers.image.version": "1.2.3",
    });
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": CNCF_CONFIG, "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": CNCF_LAYER, "digest": digest(&filter), "size": filter.len()}],
        "annotations": annotations,
    });
    let manifest = push_raw(
        registry,
        "filters/inspect",
        "annotated",
        manifest.to_string().as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
        vec![config, filter.clone()],
    );
    let fields = json!({"format": "cncf-wasm", "annotations": annotations});
    expect(
        "annotated",
        &manifest.digest,
        with(filter_fields(&filter), fields),
    );
    pushed
}

#[test]
fn inspects_pushed_modules_without_a_daemon() {
    let registry = Registry::start();
    let addr = registry.addr();
    let pushed = push_modules(&registry);
    let cache = TempDir::new().expect("cache dir");
    let inspect = |reference: &str| {
        let mut command = wasmcache();
        command.arg("--data-dir").arg(cache.path()).args([
            "--insecure-registry",
            &addr,
            "inspect",
            "--json",
            reference,
        ]);
        inspect_json(&mut command)
    };

    for (reference, expected) in &pushed {
        let inspection = inspect(reference);
        let path = inspection["path"].as_str().expect("path").to_owned();
        assert!(path.starts_with(cache.path().to_str().unwrap()), "{path}");
        assert_eq!(&without_path(inspection), expected, "{reference}");
    }

    // The second time every module is read from the cache: the registry is not asked.
    let (manifest_gets, blob_gets) = registry_gets(&registry);
    for (reference, expected) in &pushed {
        assert_eq!(&without_path(inspect(reference)), expected, "{reference}");
    }
    assert_eq!(registry_gets(&registry), (manifest_gets, blob_gets));
}

/// Manifest and blob GETs of the test repository so far.
fn registry_gets(registry: &Registry) -> (usize, usize) {
    let repository = Some("filters/inspect");
    (
        registry.manifest_gets(repository),
        registry.blob_gets(repository),
    )
}

#[test]
fn inspects_pushed_modules_through_a_daemon() {
    let registry = Registry::start();
    let addr = registry.addr();
    let pushed = push_modules(&registry);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);

    // The first time the daemon pulls each module; the second it answers from its cache.
    let mut gets = Vec::new();
    for round in 0..2 {
        for (reference, expected) in &pushed {
            let mut command = daemon.command("inspect");
            command.args(["--json", reference]);
            let inspection = inspect_json(&mut command);
            let path = inspection["path"].as_str().expect("path").to_owned();
            assert!(
                path.starts_with(daemon.data_dir.to_str().unwrap()),
                "{path}"
            );
            assert_eq!(
                &without_path(inspection),
                expected,
                "{reference}, round {round}"
            );
        }
        gets.push(registry_gets(&registry));
    }
    assert_eq!(gets[0], gets[1]);

    // Only the references inspected are cached: reading annotations added none.
    let listed: Value = serde_json::from_str(&run_ok(daemon.command("ls").arg("--json"))).unwrap();
    let mut references: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["reference"].as_str().unwrap())
        .collect();
    references.sort_unstable();
    let mut expected: Vec<&str> = pushed.iter().map(|(r, _)| r.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(references, expected);
}

#[test]
fn warns_when_the_wasme_config_claims_an_abi_the_module_lacks() {
    let registry = Registry::start();
    let addr = registry.addr();
    let filter = wat(FILTER);
    // ABI 0.1.0 is claimed but not exported; wasme's commit-named version is not compared.
    let config = r#"{"type":"envoy_proxy","abiVersions":["v0.1.0","v0-4689a30309abf31aee9ae36e73d34b1bb182685f","0.2.1"],"config":{"rootIds":["add_header"]}}"#;
    let manifest = oras_push_wasme(&registry, "filters/claims:v1", &filter, config);
    let reference = format!("{addr}/filters/claims:v1");
    let warning = "the wasme config claims proxy-wasm ABI v0.1.0, which the module does not \
                   export (it exports: 0.2.1)";
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);

    let mut command = daemon.command("inspect");
    let inspection = inspect_json(command.args(["--json", &reference]));
    let path = inspection["path"].as_str().expect("path").to_owned();
    assert!(
        path.starts_with(daemon.data_dir.to_str().unwrap())
            && path.ends_with(&digest(&filter)["sha256:".len()..]),
        "{path}"
    );
    let wasme = json!({
        "type": "envoy_proxy",
        "abi_versions": ["v0.1.0", "v0-4689a30309abf31aee9ae36e73d34b1bb182685f", "0.2.1"],
        "root_ids": ["add_header"],
    });
    let expected = with(
        filter_fields(&filter),
        json!({
            "reference": reference,
            "format": "wasme",
            "resolved_digest": manifest.digest,
            "manifest_digest": manifest.digest,
            "annotations": {},
            "wasme": wasme,
            "path": path,
            "unclaimed_abi": ["v0.1.0"],
            "warnings": [warning],
        }),
    );
    assert_eq!(inspection, expected);

    let text = run_ok(daemon.command("inspect").arg(&reference));
    let expected = [
        line("reference:", &reference),
        line("format:", "wasme"),
        line("resolved_digest:", &manifest.digest),
        line("manifest_digest:", &manifest.digest),
        line("annotations:", "none"),
        line(
            "abi_versions:",
            "v0.1.0, v0-4689a30309abf31aee9ae36e73d34b1bb182685f, 0.2.1",
        ),
        line("root_ids:", "add_header"),
        line("digest:", &digest(&filter)),
        line("size:", &filter.len().to_string()),
        line("path:", &path),
        filter_text(),
        format!("warning: {warning}\n"),
    ]
    .concat();
    assert_eq!(text, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_carries_the_abi_and_require_proxy_wasm_refuses_other_modules() {
    use wasmcache::api::proto::{FetchRequest, PullPolicy};
    let registry = Registry::start();
    let addr = registry.addr();
    let (filter, plain) = (wat(FILTER), wat(WASI));
    oras_push_cncf(&registry, "abi/filter:v1", &filter);
    oras_push_cncf(&registry, "abi/plain:v1", &plain);
    async fn fetch(
        daemon: &Daemon,
        reference: String,
    ) -> Result<tonic::Response<wasmcache::api::proto::FetchResponse>, tonic::Status> {
        let request = FetchRequest {
            reference,
            pull_policy: PullPolicy::IfNotPresent.into(),
            ..Default::default()
        };
        daemon.client().await.fetch(request).await
    }
    let at = |repository: &str| format!("{addr}/{repository}:v1");

    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let answer = fetch(&daemon, at("abi/filter")).await.unwrap().into_inner();
    assert_eq!(answer.proxy_wasm_abi, ["0.2.1"]);
    // A warm answer (from the index) says the same.
    let again = fetch(&daemon, at("abi/filter")).await.unwrap().into_inner();
    assert!(again.cache_hit);
    assert_eq!(again.proxy_wasm_abi, ["0.2.1"]);
    let answer = fetch(&daemon, at("abi/plain")).await.unwrap().into_inner();
    assert!(answer.proxy_wasm_abi.is_empty());
    drop(daemon);

    let strict = Daemon::start(
        &["--insecure-registry", &addr],
        Some("require_proxy_wasm = true\n"),
    );
    let refused = fetch(&strict, at("abi/plain")).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("require_proxy_wasm"),
        "{refused:?}"
    );
    let listed = run_ok(strict.command("ls").arg("--json"));
    assert!(!listed.contains("abi/plain"), "{listed}");
    let answer = fetch(&strict, at("abi/filter")).await.unwrap().into_inner();
    assert_eq!(answer.proxy_wasm_abi, ["0.2.1"]);
}

//! Cold pull of a 50 MiB module side by side: wasmcache (the CLI, and a daemon's first
//! `Fetch`) against curl of the raw blob, `skopeo copy` and oras-py.
//!
//! The module (the 41-byte module and a custom section of seeded random bytes) is pushed as a
//! CNCF Wasm artifact and as `plugin.wasm` in a tar+gzip OCI image layer. Each tool pulls into
//! a fresh directory; the tools run round-robin after discarded warm-up rounds, so every one
//! reads the same warm registry storage. Wall time is taken around the child process, peak RSS
//! from `/usr/bin/time -f %M` (for the daemon: its `VmHWM`). A run counts only if its output
//! hashes to the expected digest; between runs outputs are deleted and the filesystem synced,
//! outside the timing.

use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, Instant};

use wasmcache::api::proto::PullPolicy;
use wasmcache::Digest;

use crate::support::{self, Blob, Daemon, Registry};
use crate::Bench;

/// The CNCF Wasm artifact, and the OCI image with the module in a tar+gzip layer.
const ARTIFACT: &str = "bench/big:v1";
const IMAGE: &str = "bench/image:v1";

/// One measured run.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    max_rss_kib: u64,
}

/// One row: what it runs (shown), and how to run it once in a fresh scratch dir.
struct Tool<'a> {
    name: &'static str,
    shown: String,
    run: Box<dyn Fn(&Path) -> Sample + 'a>,
    samples: Vec<Sample>,
}

pub fn run(bench: &Bench) {
    support::require_tools(&["timeout", "/usr/bin/time", "curl", "skopeo", "sync"]);
    let python = support::venv_python();
    let scale = &bench.scale;
    let work = tempfile::Builder::new()
        .prefix("wasmcache-bench-pull-")
        .tempdir()
        .expect("bench dir");
    let module = support::module(scale.big_bytes, 0x5eed);
    let digest = Digest::of(&module);
    let layer = gzip_tar("plugin.wasm", &module);
    let layer_digest = Digest::of(&layer);
    let registry = Registry::start();
    let addr = registry.addr.as_str();
    bench.runtime.block_on(async {
        support::push_module(addr, ARTIFACT, &module).await;
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config = Blob {
            media_type: "application/vnd.oci.image.config.v1+json",
            bytes: config,
            title: None,
        };
        let layer = Blob {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            bytes: &layer,
            title: None,
        };
        support::push(addr, IMAGE, config, &[layer]).await;
    });
    let script = work.path().join("oras_pull.py");
    fs::write(&script, support::ORAS_PULL).expect("oras-py script");

    let artifact_blob = format!("http://{addr}/v2/bench/big/blobs/{digest}");
    let mut artifact = vec![
        wasmcache_pull(addr, ARTIFACT, &digest, ""),
        wasmcache_pull(addr, ARTIFACT, &digest, " --no-validate"),
        daemon_fetch(bench, addr, ARTIFACT, &digest),
        curl_file(&artifact_blob, &digest),
        Tool {
            name: "curl → /dev/null",
            shown: "curl -s -o /dev/null URL".to_owned(),
            run: Box::new(move |scratch| {
                let (sample, stdout) = child(
                    scratch,
                    "curl",
                    &[
                        "-sSf",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code} %{size_download}",
                        &artifact_blob,
                    ],
                );
                assert_eq!(
                    stdout.trim(),
                    format!("200 {}", module.len()),
                    "curl → /dev/null"
                );
                sample
            }),
            samples: Vec::new(),
        },
        skopeo_copy(addr, ARTIFACT, &digest),
        Tool {
            name: "oras-py pull",
            shown: "python oras_pull.py ADDR bench/big:v1 OUT (OrasClient.pull)".to_owned(),
            run: Box::new(|scratch| {
                let out = scratch.join("out");
                let script = script.to_str().expect("UTF-8 path");
                let sample = child(
                    scratch,
                    &python,
                    &[script, addr, ARTIFACT, out.to_str().expect("UTF-8")],
                )
                .0;
                support::check_file(&out.join("module.wasm"), &digest);
                sample
            }),
            samples: Vec::new(),
        },
        Tool {
            name: "Python start-up alone (part of oras-py pull)",
            shown: "python -c 'import oras.client'".to_owned(),
            run: Box::new(|scratch| child(scratch, &python, &["-c", "import oras.client"]).0),
            samples: Vec::new(),
        },
    ];
    let layer_blob = format!("http://{addr}/v2/bench/image/blobs/{layer_digest}");
    let mut image = vec![
        wasmcache_pull(addr, IMAGE, &digest, ""),
        daemon_fetch(bench, addr, IMAGE, &digest),
        curl_file(&layer_blob, &layer_digest),
        skopeo_copy(addr, IMAGE, &layer_digest),
    ];
    for round in 0..scale.warmups + scale.runs {
        eprintln!("  round {} of {}", round + 1, scale.warmups + scale.runs);
        for tools in [&mut artifact, &mut image] {
            // Rotate the order so that no tool always runs right after the same other one.
            for offset in 0..tools.len() {
                let count = tools.len();
                let tool = &mut tools[(round + offset) % count];
                let scratch = tempfile::tempdir_in(work.path()).expect("run dir");
                let sample = (tool.run)(scratch.path());
                if round >= scale.warmups {
                    tool.samples.push(sample);
                }
                make_writable(scratch.path());
                drop(scratch);
                support::sync_fs(work.path());
            }
        }
    }
    let mib = scale.big_bytes >> 20;
    print_tools(
        bench,
        &format!("Cold pull: CNCF Wasm artifact, one `application/wasm` layer of {mib} MiB"),
        &artifact,
    );
    let layer_mib = layer.len() as f64 / f64::from(1 << 20);
    print_tools(bench, &format!("Cold pull: OCI image, `plugin.wasm` ({mib} MiB) in a tar+gzip layer of {layer_mib:.2} MiB"), &image);
}

/// Runs `program args` in `scratch` under `/usr/bin/time`; panics unless it exits 0.
fn child(scratch: &Path, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> (Sample, String) {
    let rss = scratch.join("rss");
    let stdout = scratch.join("stdout");
    let mut command = support::command("/usr/bin/time", scratch);
    command
        .args(["-f", "%M", "-o"])
        .arg(&rss)
        .arg(program)
        .args(args)
        .stdout(File::create(&stdout).expect("stdout file"));
    let started = Instant::now();
    let output = support::run_ok(&mut command);
    let wall = started.elapsed();
    drop(output);
    let rss = fs::read_to_string(&rss).unwrap_or_default();
    let max_rss_kib = rss
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or_else(|| panic!("/usr/bin/time wrote {rss:?}"));
    let stdout = fs::read_to_string(&stdout).unwrap_or_default();
    (Sample { wall, max_rss_kib }, stdout)
}

/// `wasmcache pull --json` into a fresh data dir; checks what it reports and the file.
fn wasmcache_pull<'a>(
    addr: &'a str,
    reference: &'static str,
    digest: &'a Digest,
    flags: &'static str,
) -> Tool<'a> {
    Tool {
        name: if flags.is_empty() {
            "wasmcache pull"
        } else {
            "wasmcache pull --no-validate (extra)"
        },
        shown: format!(
            "wasmcache pull --json --insecure-registry ADDR{flags} --data-dir DIR ADDR/{reference}"
        ),
        run: Box::new(move |scratch| {
            let data = scratch.join("data");
            let target = format!("{addr}/{reference}");
            let mut args = vec![
                "pull",
                "--json",
                "--insecure-registry",
                addr,
                "--data-dir",
                data.to_str().expect("UTF-8"),
            ];
            args.extend(flags.split_whitespace());
            args.push(&target);
            let (sample, stdout) = child(scratch, support::wasmcache(), &args);
            let json: serde_json::Value =
                serde_json::from_str(stdout.trim()).expect("wasmcache pull prints JSON");
            assert_eq!(json["digest"], digest.to_string(), "{json}");
            assert_eq!(json["cache_hit"], false, "{json}");
            support::check_file(Path::new(json["path"].as_str().expect("path")), digest);
            sample
        }),
        samples: Vec::new(),
    }
}

/// A fresh daemon (not timed), then its first `Fetch` of `reference`, timed around the call.
fn daemon_fetch<'a>(
    bench: &'a Bench,
    addr: &'a str,
    reference: &'static str,
    digest: &'a Digest,
) -> Tool<'a> {
    Tool {
        name: "wasmcache daemon, first `Fetch`",
        shown: format!(
            "Fetch{{reference: ADDR/{reference}}} to wasmcache serve --insecure-registry ADDR"
        ),
        run: Box::new(move |scratch| {
            let mut daemon = Daemon::start(scratch, &bench.config, &["--insecure-registry", addr]);
            let target = format!("{addr}/{reference}");
            let (wall, answer) = bench.runtime.block_on(async {
                let mut client = daemon.client().await;
                let started = Instant::now();
                let answer = support::fetch(&mut client, &target, PullPolicy::IfNotPresent).await;
                (started.elapsed(), answer)
            });
            assert!(!answer.cache_hit, "{target} was cached");
            assert_eq!(answer.digest, digest.to_string(), "{target}");
            support::check_file(Path::new(&answer.path), digest);
            let max_rss_kib = support::status_kib(daemon.pid, "VmHWM");
            daemon.stop();
            Sample { wall, max_rss_kib }
        }),
        samples: Vec::new(),
    }
}

/// `curl -o FILE URL`: the floor of any puller that writes a file.
fn curl_file<'a>(url: &str, digest: &'a Digest) -> Tool<'a> {
    let url = url.to_owned();
    Tool {
        name: "curl → file",
        shown: "curl -s -o FILE http://ADDR/v2/…/blobs/sha256:…".to_owned(),
        run: Box::new(move |scratch| {
            let file = scratch.join("blob");
            let sample = child(
                scratch,
                "curl",
                &["-sSf", "-o", file.to_str().expect("UTF-8"), &url],
            )
            .0;
            support::check_file(&file, digest);
            sample
        }),
        samples: Vec::new(),
    }
}

/// `skopeo copy` into an OCI layout; `digest` is the blob it must store.
fn skopeo_copy<'a>(addr: &str, reference: &str, digest: &'a Digest) -> Tool<'a> {
    let source = format!("docker://{addr}/{reference}");
    Tool {
        name: "skopeo copy",
        shown: "skopeo copy --src-tls-verify=false docker://ADDR/… oci:DIR:v1".to_owned(),
        run: Box::new(move |scratch| {
            let layout = format!("oci:{}:v1", scratch.join("oci").display());
            let args = [
                "--insecure-policy",
                "copy",
                "--quiet",
                "--retry-times",
                "0",
                "--src-tls-verify=false",
                "--src-no-creds",
                &source,
                &layout,
            ];
            let sample = child(scratch, "skopeo", &args).0;
            support::check_file(&scratch.join("oci/blobs/sha256").join(digest.hex()), digest);
            sample
        }),
        samples: Vec::new(),
    }
}

/// A gzipped tar holding one file (fastest compression, as the test fixtures use).
fn gzip_tar(name: &str, bytes: &[u8]) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    builder
        .append_data(&mut header, name, bytes)
        .expect("tar entry");
    builder.into_inner().expect("tar").finish().expect("gzip")
}

/// wasmcache's blobs and skopeo's layout may be read-only; clear the way for removal.
pub fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => make_writable(&entry.path()),
            Ok(kind) if kind.is_file() => {
                let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644));
            }
            _ => {}
        }
    }
}

fn print_tools(bench: &Bench, heading: &str, tools: &[Tool]) {
    let median = |name: &str| {
        let tool = tools.iter().find(|tool| tool.name == name).expect("row");
        support::median(&tool.samples.iter().map(|s| s.wall).collect::<Vec<_>>())
    };
    let (curl, wasmcache) = (median("curl → file"), median("wasmcache pull"));
    let rows: Vec<Vec<String>> = tools
        .iter()
        .map(|tool| {
            let walls: Vec<Duration> = tool.samples.iter().map(|s| s.wall).collect();
            let own = support::median(&walls);
            let ratio = |base: Duration| match tool.name.starts_with("Python") {
                true => "–".to_owned(),
                false => format!("{:.2}×", own.as_secs_f64() / base.as_secs_f64()),
            };
            vec![
                tool.name.to_owned(),
                format!("`{}`", tool.shown),
                support::time(own),
                support::time(walls.iter().copied().min().unwrap_or_default()),
                support::mib(
                    tool.samples
                        .iter()
                        .map(|s| s.max_rss_kib)
                        .max()
                        .unwrap_or(0),
                ),
                ratio(curl),
                ratio(wasmcache),
            ]
        })
        .collect();
    let columns = [
        "tool",
        "command",
        "median",
        "min",
        "max RSS",
        "vs curl → file",
        "vs wasmcache pull",
    ];
    support::print_table(heading, &bench.command("pull"), &columns, &rows);
    println!(
        "\n{} measured runs per tool after {} discarded warm-up round(s).",
        bench.scale.runs, bench.scale.warmups
    );
}

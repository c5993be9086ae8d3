//! Cold pull of a 50 MiB Wasm module from a local registry, wasmcache side by side with curl,
//! skopeo and oras-py.
//!
//! Two fixtures are pushed into a CNCF distribution registry on a free loopback port: the
//! module as a CNCF Wasm artifact (pushed with oras-py) and the same module as `plugin.wasm`
//! in a tar+gzip OCI image layer (pushed with skopeo). Each tool then pulls into a fresh
//! directory, round-robin, one warm-up round discarded, so every tool reads the same warm
//! registry storage. Wall time is measured around the child process; peak RSS comes from
//! `/usr/bin/time -f %M`; every child runs under `timeout`. Every run's output is checked
//! (sha256 of the file written, or status and size for `curl → /dev/null`) before it counts.
//!
//! Environment:
//! - `WASMCACHE_BENCH_RUNS`: measured runs per tool (default 7);
//! - `WASMCACHE_BENCH_WRITE=1`: also write the tables into `BENCHMARKS.md` between
//!   `<!-- pull:begin -->` and `<!-- pull:end -->`.
//!
//! Run without `--bench` (e.g. `cargo test --benches`), it does one unwritten round as a
//! smoke test.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::cpu_model;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{self, ImageFormat, OCI_LAYER_TAR_GZIP};
use common::{cli, isolate, require_tool, venv_python, wasm, Registry};
use serde_json::Value;
use tempfile::TempDir;

/// Size of the module, exactly.
const MODULE_BYTES: usize = 50 << 20;
/// Seed of the module's padding bytes.
const MODULE_SEED: u64 = 0x5eed;
/// Bytes a 50 MiB module spends outside its padding: the 41-byte module, the custom section's
/// id, 4-byte LEB128 length and 4-byte name.
const MODULE_OVERHEAD: usize = 41 + 1 + 4 + 4;
/// The CNCF Wasm artifact.
const ARTIFACT: &str = "bench/big:v1";
/// The OCI image with `plugin.wasm` in a tar+gzip layer.
const IMAGE: &str = "bench/image:v1";
/// Measured runs per tool unless `WASMCACHE_BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 7;
/// Longest any one child may run before `timeout` kills its process group.
const CHILD_TIMEOUT_SECS: u32 = 120;
/// Markers around the generated part of `BENCHMARKS.md`.
const BEGIN_MARKER: &str = "<!-- pull:begin -->";
const END_MARKER: &str = "<!-- pull:end -->";

/// What a run must have produced to count.
enum Check {
    /// `wasmcache pull --json`: a fresh (not cached) module with this digest, and its file.
    Wasmcache {
        digest: String,
        format: &'static str,
    },
    /// A file (relative to the run's scratch dir) whose sha256 is this hex.
    File { path: String, sha256: String },
    /// `curl -w '%{http_code} %{size_download}'` printed a 200 and this size.
    Download { size: usize },
    /// Exit status 0 is all there is to check (Python start-up only).
    ExitOnly,
}

/// One row of a table: a command run in a fresh scratch dir per run.
struct Tool {
    /// The row label.
    name: &'static str,
    /// The command line as shown in the table.
    shown: String,
    /// Builds the command for one run in `scratch`.
    command: Box<dyn Fn(&Path) -> Command>,
    check: Check,
}

/// One measured run.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    max_rss_kib: u64,
}

/// A table's worth of tools and what was measured.
struct Case {
    title: String,
    /// What to keep in mind when reading the table.
    note: &'static str,
    tools: Vec<Tool>,
    samples: Vec<Vec<Sample>>,
    /// Row the "vs curl → file" column divides by.
    curl_row: usize,
    /// Row the "vs wasmcache" column divides by.
    wasmcache_row: usize,
}

fn main() {
    let bench_mode = std::env::args().any(|arg| arg == "--bench");
    let runs = if bench_mode { runs_from_env() } else { 1 };
    let warmups = usize::from(bench_mode);
    let write = bench_mode && std::env::var_os("WASMCACHE_BENCH_WRITE").is_some_and(|v| v == "1");
    for tool in ["timeout", "/usr/bin/time", "curl", "skopeo", "sync", "sh"] {
        require_tool(tool);
    }
    let python = venv_python();

    let work = tempfile::Builder::new()
        .prefix("wasmcache-bench-pull-")
        .tempdir()
        .expect("bench work dir");
    let module = wasm::module(MODULE_BYTES - MODULE_OVERHEAD, MODULE_SEED);
    assert_eq!(module.len(), MODULE_BYTES, "module size");
    let module_hex = wasm::sha256_hex(&module);
    let layer = fixtures::tar_layer(&[("plugin.wasm", &module)], true);
    let layer_hex = wasm::sha256_hex(&layer);

    eprintln!("pull bench: starting registry, pushing fixtures");
    let registry = Registry::start();
    let addr = registry.addr();
    let artifact = fixtures::oras_push_cncf(&registry, ARTIFACT, &module);
    assert_eq!(
        artifact.layer_digests(),
        [format!("sha256:{module_hex}")],
        "oras-py pushed another layer"
    );
    let image = fixtures::skopeo_push_image(
        &registry,
        IMAGE,
        vec![layer.clone()],
        OCI_LAYER_TAR_GZIP,
        ImageFormat::Oci,
    );
    assert_eq!(
        image.layer_digests(),
        [format!("sha256:{layer_hex}")],
        "skopeo pushed another layer"
    );
    let script = work.path().join("oras_pull.py");
    fs::write(&script, support::ORAS_PULL_ONE).expect("writing the oras-py script");

    let mut cases = vec![
        Case::new(
            format!(
                "CNCF Wasm artifact: one `application/wasm` layer of {} MiB",
                MODULE_BYTES >> 20
            ),
            "The oras-py row includes Python's start-up, shown alone in the last row.",
            artifact_tools(&addr, &module_hex, &python, &script),
        ),
        Case::new(
            format!(
                "OCI image: `plugin.wasm` ({} MiB) in a tar+gzip layer of {:.2} MiB",
                MODULE_BYTES >> 20,
                layer.len() as f64 / f64::from(1 << 20)
            ),
            "curl and skopeo store the compressed layer as it is; wasmcache decompresses it, \
             extracts `plugin.wasm` and stores that.",
            image_tools(&addr, &module_hex, &layer_hex),
        ),
    ];
    drop((module, layer));

    for round in 0..warmups + runs {
        let measured = round >= warmups;
        eprintln!(
            "pull bench: round {} of {}{}",
            round + 1,
            warmups + runs,
            if measured {
                ""
            } else {
                " (warm-up, discarded)"
            }
        );
        for case in &mut cases {
            // Rotate the order so no tool always runs right after the same other one.
            let count = case.tools.len();
            for offset in 0..count {
                let row = (round + offset) % count;
                let sample = run_once(&case.tools[row], work.path());
                if measured {
                    case.samples[row].push(sample);
                }
            }
        }
    }
    drop(registry);

    let mut tables = String::new();
    for case in &cases {
        tables.push_str(&case.table());
        tables.push('\n');
    }
    print!("{tables}");
    if write {
        write_benchmarks_md(&tables, runs);
        eprintln!("pull bench: wrote BENCHMARKS.md");
    }
}

/// `WASMCACHE_BENCH_RUNS`, or the default.
fn runs_from_env() -> usize {
    match std::env::var("WASMCACHE_BENCH_RUNS") {
        Ok(text) => match text.parse::<usize>() {
            Ok(runs) if runs > 0 => runs,
            _ => panic!("WASMCACHE_BENCH_RUNS must be a positive integer, got {text:?}"),
        },
        Err(_) => DEFAULT_RUNS,
    }
}

/// The rows for the CNCF artifact.
fn artifact_tools(addr: &str, module_hex: &str, python: &Path, script: &Path) -> Vec<Tool> {
    let blob_url = format!("http://{addr}/v2/bench/big/blobs/sha256:{module_hex}");
    let src = format!("docker://{addr}/{ARTIFACT}");
    vec![
        wasmcache_tool(
            "wasmcache pull",
            addr,
            ARTIFACT,
            module_hex,
            "cncf-wasm",
            false,
        ),
        wasmcache_tool(
            "wasmcache pull --no-validate (extra)",
            addr,
            ARTIFACT,
            module_hex,
            "cncf-wasm",
            true,
        ),
        curl_file_tool(&blob_url, module_hex),
        {
            let url = blob_url.clone();
            Tool {
                name: "curl → file + fsync (reference)",
                shown: "curl -s -o FILE URL && sync FILE".to_owned(),
                command: Box::new(move |scratch| {
                    let mut command = Command::new("sh");
                    isolate(&mut command, scratch).args([
                        "-c",
                        r#"curl -sSf --max-time 120 -o "$1" "$2" && sync "$1""#,
                        "sh",
                        "blob",
                        &url,
                    ]);
                    command
                }),
                check: Check::File {
                    path: "blob".to_owned(),
                    sha256: module_hex.to_owned(),
                },
            }
        },
        {
            let url = blob_url.clone();
            Tool {
                name: "curl → /dev/null",
                shown: "curl -s -o /dev/null URL".to_owned(),
                command: Box::new(move |scratch| {
                    let mut command = Command::new("curl");
                    isolate(&mut command, scratch)
                        .args(["-sSf", "--max-time", "120", "-o", "/dev/null"])
                        .args(["-w", "%{http_code} %{size_download}", &url]);
                    command
                }),
                check: Check::Download { size: MODULE_BYTES },
            }
        },
        skopeo_tool(&src, module_hex),
        {
            let (python, script) = (python.to_owned(), script.to_owned());
            let addr = addr.to_owned();
            Tool {
                name: "oras-py pull",
                shown: "python oras_pull.py (OrasClient(insecure=True).pull)".to_owned(),
                command: Box::new(move |scratch| {
                    let mut command = Command::new(&python);
                    isolate(&mut command, scratch)
                        .current_dir(scratch)
                        .arg(&script)
                        .args([addr.as_str(), ARTIFACT])
                        .arg(scratch.join("out"));
                    command
                }),
                check: Check::File {
                    path: "out/module.wasm".to_owned(),
                    sha256: module_hex.to_owned(),
                },
            }
        },
        {
            let python = python.to_owned();
            Tool {
                name: "Python start-up alone (part of oras-py pull)",
                shown: "python -c 'import oras.client'".to_owned(),
                command: Box::new(move |scratch| {
                    let mut command = Command::new(&python);
                    isolate(&mut command, scratch)
                        .current_dir(scratch)
                        .args(["-c", "import oras.client"]);
                    command
                }),
                check: Check::ExitOnly,
            }
        },
    ]
}

/// The rows for the OCI image.
fn image_tools(addr: &str, module_hex: &str, layer_hex: &str) -> Vec<Tool> {
    let blob_url = format!("http://{addr}/v2/bench/image/blobs/sha256:{layer_hex}");
    let src = format!("docker://{addr}/{IMAGE}");
    vec![
        wasmcache_tool(
            "wasmcache pull",
            addr,
            IMAGE,
            module_hex,
            "oci-image",
            false,
        ),
        wasmcache_tool(
            "wasmcache pull --no-validate (extra)",
            addr,
            IMAGE,
            module_hex,
            "oci-image",
            true,
        ),
        curl_file_tool(&blob_url, layer_hex),
        skopeo_tool(&src, layer_hex),
    ]
}

/// `wasmcache pull --json` into a fresh data dir, with a scratch home and no `WASMCACHE_*`.
fn wasmcache_tool(
    name: &'static str,
    addr: &str,
    reference: &'static str,
    module_hex: &str,
    format: &'static str,
    no_validate: bool,
) -> Tool {
    let addr = addr.to_owned();
    let suffix = if no_validate { " --no-validate" } else { "" };
    Tool {
        name,
        shown: format!(
            "wasmcache pull --json --insecure-registry ADDR{suffix} --data-dir DIR ADDR/{reference}"
        ),
        command: Box::new(move |scratch| {
            let home = scratch.join("home");
            fs::create_dir_all(&home).expect("wasmcache home");
            let mut command = cli::wasmcache_in(&home);
            command
                .args(["pull", "--json", "--insecure-registry", &addr])
                .arg("--data-dir")
                .arg(scratch.join("data"));
            if no_validate {
                command.arg("--no-validate");
            }
            command.arg(format!("{addr}/{reference}"));
            command
        }),
        check: Check::Wasmcache {
            digest: format!("sha256:{module_hex}"),
            format,
        },
    }
}

/// `curl -o FILE URL`: the floor any puller that writes a file is measured against.
fn curl_file_tool(url: &str, sha256: &str) -> Tool {
    let url = url.to_owned();
    Tool {
        name: "curl → file",
        shown: "curl -s -o FILE http://ADDR/v2/…/blobs/sha256:…".to_owned(),
        command: Box::new(move |scratch| {
            let mut command = Command::new("curl");
            isolate(&mut command, scratch)
                .args(["-sSf", "--max-time", "120", "-o"])
                .arg(scratch.join("blob"))
                .arg(&url);
            command
        }),
        check: Check::File {
            path: "blob".to_owned(),
            sha256: sha256.to_owned(),
        },
    }
}

/// `skopeo copy` into an OCI layout; the blob of interest lands under `blobs/sha256/`.
fn skopeo_tool(src: &str, blob_hex: &str) -> Tool {
    let src = src.to_owned();
    Tool {
        name: "skopeo copy",
        shown: "skopeo copy --src-tls-verify=false docker://ADDR/… oci:DIR:v1".to_owned(),
        command: Box::new(move |scratch| {
            let mut command = Command::new("skopeo");
            isolate(&mut command, scratch)
                .args(["--insecure-policy", "copy", "--quiet", "--retry-times", "0"])
                .args(["--src-tls-verify=false", "--src-no-creds", &src])
                .arg(format!("oci:{}:v1", scratch.join("oci").display()));
            command
        }),
        check: Check::File {
            path: format!("oci/blobs/sha256/{blob_hex}"),
            sha256: blob_hex.to_owned(),
        },
    }
}

/// Runs `tool` once in a fresh scratch dir under `work`, checks its output, cleans up.
fn run_once(tool: &Tool, work: &Path) -> Sample {
    let scratch = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(work)
        .expect("run scratch dir");
    let inner = (tool.command)(scratch.path());
    let logs = TempDir::new_in(work).expect("run log dir");
    let rss_file = logs.path().join("rss");
    let stdout_file = logs.path().join("stdout");
    let stderr_file = logs.path().join("stderr");
    let mut command = Command::new("timeout");
    command
        .args(["-k", "5", &CHILD_TIMEOUT_SECS.to_string()])
        .args(["/usr/bin/time", "-f", "%M", "-o"])
        .arg(&rss_file)
        .arg(inner.get_program())
        .args(inner.get_args())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_file).expect("stdout file"))
        .stderr(File::create(&stderr_file).expect("stderr file"));
    for (name, value) in inner.get_envs() {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    command.current_dir(inner.get_current_dir().unwrap_or(scratch.path()));

    let started = Instant::now();
    let status = command
        .status()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let wall = started.elapsed();

    let stdout = fs::read_to_string(&stdout_file).unwrap_or_default();
    let stderr = fs::read_to_string(&stderr_file).unwrap_or_default();
    let rss = fs::read_to_string(&rss_file).unwrap_or_default();
    assert!(
        status.success(),
        "{}: {inner:?} failed with {status} (124 = timed out after {CHILD_TIMEOUT_SECS}s)\n\
         --- stdout\n{stdout}\n--- stderr\n{stderr}\n--- time\n{rss}",
        tool.name
    );
    if let Err(problem) = check(&tool.check, scratch.path(), &stdout) {
        panic!(
            "{}: {inner:?} exited 0 but {problem}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            tool.name
        );
    }
    let max_rss_kib = rss
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: /usr/bin/time wrote {rss:?}", tool.name));

    // Flush what this run left dirty before the next tool starts, outside any timing, so no
    // run pays for another's writeback. The files go first: deleted pages need no writeback.
    make_writable(scratch.path());
    drop(scratch);
    let mut sync = Command::new("sync");
    sync.arg("-f").arg(work);
    common::run_checked(&mut sync);
    Sample { wall, max_rss_kib }
}

/// Checks one run's output.
fn check(check: &Check, scratch: &Path, stdout: &str) -> Result<(), String> {
    match check {
        Check::Wasmcache { digest, format } => {
            let json: Value = serde_json::from_str(stdout.trim())
                .map_err(|error| format!("printed no JSON object: {error}"))?;
            if json["digest"] != digest.as_str() || json["format"] != *format {
                return Err(format!("reported {json} (expected {digest}, {format})"));
            }
            if json["cache_hit"] != false || json["size"] != MODULE_BYTES {
                return Err(format!("reported a cache hit or a wrong size: {json}"));
            }
            let path = json["path"].as_str().ok_or("reported no path")?;
            if !Path::new(path).starts_with(scratch) {
                return Err(format!("stored {path} outside its data dir"));
            }
            file_has_digest(Path::new(path), digest.trim_start_matches("sha256:"))
        }
        Check::File { path, sha256 } => file_has_digest(&scratch.join(path), sha256),
        Check::Download { size } => match stdout.trim() {
            line if line == format!("200 {size}") => Ok(()),
            line => Err(format!(
                "curl reported {line:?}, expected 200 and {size} bytes"
            )),
        },
        Check::ExitOnly => Ok(()),
    }
}

fn file_has_digest(path: &Path, sha256: &str) -> Result<(), String> {
    let bytes = fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    match wasm::sha256_hex(&bytes) {
        actual if actual == sha256 => Ok(()),
        actual => Err(format!(
            "{} hashes to {actual}, expected {sha256}",
            path.display()
        )),
    }
}

/// wasmcache stores blobs read-only, and skopeo's layout may be too; clear the way for removal.
fn make_writable(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if let Ok(metadata) = fs::symlink_metadata(&path) {
            if metadata.is_dir() {
                make_writable(&path);
            } else if metadata.is_file() {
                let mut permissions = metadata.permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                permissions.set_readonly(false);
                let _ = fs::set_permissions(&path, permissions);
            }
        }
    }
}

impl Case {
    fn new(title: String, note: &'static str, tools: Vec<Tool>) -> Case {
        let find = |name: &str| {
            tools
                .iter()
                .position(|tool| tool.name == name)
                .unwrap_or_else(|| panic!("no {name} row"))
        };
        Case {
            title,
            note,
            samples: tools.iter().map(|_| Vec::new()).collect(),
            curl_row: find("curl → file"),
            wasmcache_row: find("wasmcache pull"),
            tools,
        }
    }

    /// The Markdown table of this case.
    fn table(&self) -> String {
        let medians: Vec<Duration> = self.samples.iter().map(|s| median(s)).collect();
        let mut out = format!("#### {}\n\n{}\n\n", self.title, self.note);
        out.push_str(
            "| tool | command | median | min | max RSS | vs curl → file | vs wasmcache |\n\
             |---|---|---:|---:|---:|---:|---:|\n",
        );
        for (row, tool) in self.tools.iter().enumerate() {
            let samples = &self.samples[row];
            let min = samples.iter().map(|s| s.wall).min().unwrap_or_default();
            let rss = samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
            let ratio = |base: usize| {
                if matches!(tool.check, Check::ExitOnly) {
                    "–".to_owned()
                } else {
                    format!(
                        "{:.2}×",
                        medians[row].as_secs_f64() / medians[base].as_secs_f64()
                    )
                }
            };
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} | {:.0} MiB | {} | {} |",
                tool.name,
                tool.shown,
                millis(medians[row]),
                millis(min),
                rss as f64 / 1024.0,
                ratio(self.curl_row),
                ratio(self.wasmcache_row),
            );
        }
        out
    }
}

fn median(samples: &[Sample]) -> Duration {
    let mut walls: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
    walls.sort();
    match walls.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => walls[n / 2],
        n => (walls[n / 2 - 1] + walls[n / 2]) / 2,
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

/// Replaces what lies between the markers in `BENCHMARKS.md` with `tables` and how they were
/// made.
fn write_benchmarks_md(tables: &str, runs: usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let (Some(begin), Some(end)) = (text.find(BEGIN_MARKER), text.find(END_MARKER)) else {
        panic!(
            "{} lacks the {BEGIN_MARKER} … {END_MARKER} markers",
            path.display()
        );
    };
    assert!(begin < end, "{END_MARKER} comes before {BEGIN_MARKER}");
    let runs_env = match std::env::var_os("WASMCACHE_BENCH_RUNS") {
        Some(value) => format!("WASMCACHE_BENCH_RUNS={} ", value.to_string_lossy()),
        None => String::new(),
    };
    let mut generated = format!(
        "\n<!-- Generated by benches/pull.rs; edits here are overwritten. -->\n\n\
         Command: `WASMCACHE_BENCH_WRITE=1 {runs_env}cargo bench --bench pull`, run on {date}.\n\
         Machine: nproc {cpus}, {cpu}, {kernel}. {runs} measured runs per tool after one discarded \
         warm-up round, tools interleaved round-robin; every run's output verified (sha256 of the \
         file written; status and size for `/dev/null`).\n\
         Tools: {curl}; {skopeo}; oras-py {oras}; CNCF distribution {registry}.\n\n",
        date = tool_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpus = std::thread::available_parallelism().map_or(0, usize::from),
        cpu = cpu_model(),
        kernel = tool_output("uname", &["-sr"]),
        curl = first_words(&tool_output("curl", &["--version"]), 2),
        skopeo = tool_output("skopeo", &["--version"]),
        oras = tool_output(
            venv_python().as_os_str(),
            &["-c", "import oras; print(oras.__version__)"]
        ),
        registry = tool_output("/usr/bin/docker-registry", &["--version"])
            .split_whitespace()
            .nth(2)
            .unwrap_or("?"),
    );
    generated.push_str(tables);
    let updated = format!(
        "{}{generated}{}",
        &text[..begin + BEGIN_MARKER.len()],
        &text[end..]
    );
    fs::write(&path, updated).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
}

/// The first line a short informational command prints.
fn tool_output(program: impl AsRef<OsStr>, args: &[&str]) -> String {
    let output = common::run_checked(Command::new(program).args(args));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

fn first_words(text: &str, count: usize) -> String {
    text.split_whitespace()
        .take(count)
        .collect::<Vec<_>>()
        .join(" ")
}

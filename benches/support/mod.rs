//! Helpers shared by the benchmarks: describing the machine, rewriting one marked section of
//! `BENCHMARKS.md` without touching the others, and filling a cache's index as pulls would.

#![allow(dead_code)]

pub mod h2wire;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use wasmcache::format::{Format, OCI_MANIFEST};
use wasmcache::store::{ManifestRecord, PullRecord, Store};
use wasmcache::Digest;

/// The first line a short informational command prints (`?` if it cannot run).
pub fn tool_output(program: impl AsRef<OsStr>, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .map(|line| line.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// The CPU model from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// Replaces what stands between `begin` and `end` in `path` with `generated`; appends
/// `heading` and the markers first when the file has none yet.
pub fn replace_section(path: &Path, begin: &str, end: &str, heading: &str, generated: &str) {
    let mut text = fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    if !(text.contains(begin) && text.contains(end)) {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("\n{heading}\n\n{begin}\n{end}\n"));
    }
    let from = text.find(begin).expect("begin marker") + begin.len();
    let to = text.find(end).expect("end marker");
    assert!(from <= to, "{end} comes before {begin}");
    let updated = format!("{}{generated}\n{}", &text[..from], &text[to..]);
    fs::write(path, updated).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
}

/// Records a stored module under `reference` as a pull of a CNCF artifact would leave it: the
/// module, a manifest (named by the hash of `manifest_seed`) and the reference.
pub fn index_as_pulled(
    store: &Store,
    module: &Digest,
    size: u64,
    reference: &str,
    manifest_seed: &str,
) {
    let manifest_digest = Digest::of(manifest_seed.as_bytes());
    store
        .record_pull(&PullRecord {
            reference,
            manifest_digest: &manifest_digest,
            index_digest: None,
            manifest: ManifestRecord {
                module_digest: module.clone(),
                format: Format::CncfWasm,
                layer_digest: module.to_string(),
                wasme: None,
                media_type: OCI_MANIFEST.to_owned(),
                config_digest: None,
                served: false,
            },
            module_size: size,
            image_layer: false,
            documents: Vec::new(),
        })
        .expect("recording the pull");
}

/// The `startup_ms=` the daemon logged in `log` when it began serving (waits up to 5 s for
/// the line).
pub fn logged_startup_ms(log: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(ms) = text
            .split("startup_ms=")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|digits| digits.parse().ok())
        {
            return ms;
        }
        assert!(
            Instant::now() < deadline,
            "no startup_ms in the log:\n{text}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// `n` with thousands separated by commas.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One oras-py pull, as a script for the venv's Python: `ADDR REFERENCE OUTDIR`.
pub const ORAS_PULL_ONE: &str = "\
import sys
import oras.client

addr, reference, outdir = sys.argv[1:4]
client = oras.client.OrasClient(hostname=addr, insecure=True)
client.pull(target=addr + '/' + reference, outdir=outdir)
";

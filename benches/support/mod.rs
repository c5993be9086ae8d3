//! Helpers shared by the benchmarks: describing the machine, and rewriting one marked section
//! of `BENCHMARKS.md` without touching the others.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;

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

//! Running the `wasmcache` binary in tests with an environment that never reaches the real
//! home directory, registry credentials or `WASMCACHE_*` settings of whoever runs the tests.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

use super::{isolate, run_checked, run_with_timeout, TOOL_TIMEOUT};

/// The `wasmcache` binary with a home shared by this test process (under cargo's target tmp).
pub fn wasmcache() -> Command {
    static HOME: OnceLock<TempDir> = OnceLock::new();
    let home = || TempDir::with_prefix_in("cli-home-", env!("CARGO_TARGET_TMPDIR"));
    let home = HOME.get_or_init(|| home().expect("CLI home dir"));
    wasmcache_in(home.path())
}

/// The `wasmcache` binary with `HOME` and `XDG_CACHE_HOME` inside `home`.
pub fn wasmcache_in(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmcache"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WASMCACHE_") {
            command.env_remove(name);
        }
    }
    isolate(&mut command, home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .current_dir(home);
    command
}

/// Runs `command`, panicking with its stdout and stderr unless it exits 0; returns stdout.
pub fn run_ok(command: &mut Command) -> String {
    String::from_utf8_lossy(&run_checked(command).stdout).into_owned()
}

/// Runs `command`, panicking if it succeeds; returns its exit code (-1 if killed) and stderr.
pub fn run_err(command: &mut Command) -> (i32, String) {
    let output = run_with_timeout(command, TOOL_TIMEOUT);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "{command:?} unexpectedly succeeded\n--- stdout\n{}\n--- stderr\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    (output.status.code().unwrap_or(-1), stderr)
}

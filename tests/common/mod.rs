//! Helpers shared by the integration tests: a real registry process, a token server for its
//! bearer-token auth, fixtures pushed with third-party clients, a faulty HTTP server, test
//! modules and the CLI binary. External tools (docker-registry, skopeo, htpasswd, openssl, the
//! oras-py venv) are required: a missing one panics, so no test passes by skipping its work.

// Each test uses a subset of these helpers; the rest would otherwise warn as unused.
#![allow(dead_code, unused_imports)]

pub mod cli;
pub mod daemon;
pub mod faulty;
pub mod fixtures;
pub mod http;
pub mod registry;
pub mod token;
pub mod wasm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use daemon::Daemon;
pub use faulty::{Behaviour, FaultyServer};
pub use fixtures::{ImageFormat, PushedManifest, TarEntry};
pub use http::Endpoint;
pub use registry::{free_port, LoggedRequest, Registry};
pub use token::TokenServer;

/// How long any external tool may run before the harness kills it.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Returns the path of `tool`, panicking with a hint when it is not installed.
pub fn require_tool(tool: &str) -> PathBuf {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates = std::env::split_paths(&paths).map(|dir| dir.join(tool));
    let found = match tool.contains('/') {
        true => Some(PathBuf::from(tool)).filter(|path| path.is_file()),
        false => candidates.find(|path| path.is_file()),
    };
    found.unwrap_or_else(|| {
        panic!("`{tool}` is not installed: run scripts/test-deps to install the test tools")
    })
}

/// The Python interpreter of the venv made by `scripts/test-deps` (oras-py, grpcio).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("WASMCACHE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no test venv at {}: run scripts/test-deps",
        venv.display()
    );
    python
}

/// Makes `command` independent of the user's registry credentials, proxies and home.
pub fn isolate<'a>(command: &'a mut Command, home: &Path) -> &'a mut Command {
    command
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
}

/// Runs `command` to completion, killing it (by its PID) after `timeout`; stdin is closed.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn();
    let child = child.unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let pid = child.id().to_string();
    // The output is read on a thread, so that a chatty child cannot block on a full pipe.
    let (sender, receiver) = std::sync::mpsc::channel();
    thread::spawn(move || sender.send(child.wait_with_output()));
    match receiver.recv_timeout(timeout) {
        Ok(output) => output.expect("waiting for a child process"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("{command:?} did not finish within {timeout:?}")
        }
    }
}

/// Runs `command` like [`run_with_timeout`] and panics with its output unless it succeeds.
pub fn run_checked(command: &mut Command) -> Output {
    let output = run_with_timeout(command, TOOL_TIMEOUT);
    assert!(
        output.status.success(),
        "{command:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    output
}

/// Polls `condition` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A child process that is killed (by its PID) and reaped when dropped or [`ChildGuard::kill`]ed.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Spawns `command`, panicking with the command line if it cannot start.
    pub fn spawn(command: &mut Command) -> ChildGuard {
        let child = command.spawn();
        ChildGuard(Some(child.unwrap_or_else(|error| {
            panic!("cannot start {command:?}: {error}")
        })))
    }

    /// The process id, while it has not been killed.
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already killed")
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

//! What every listener does for any client: unknown routes, slow and stalled clients, the
//! connection cap, and the CLI finding the daemon it is told about.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::cli::{run_err, run_ok, wasmcache_in};
use crate::common::fixtures::oras_push_cncf;
use crate::common::wasm::{digest, module};
use crate::common::{free_port, isolate, require_tool, run_checked, Daemon, Registry};

/// Sends `request` (raw HTTP/1.1) on a new connection and reads until the daemon closes it or
/// five seconds pass.
fn exchange(socket: &Path, request: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    String::from_utf8_lossy(&read_until_closed(&mut stream, Duration::from_secs(5)).0).into_owned()
}

/// Reads what `stream` sends until it is closed (`true`) or `limit` passes (`false`).
fn read_until_closed(stream: &mut UnixStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buffer = [0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                return (received, true)
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (received, false)
            }
            Err(error) => panic!("reading from the daemon: {error}"),
        }
    }
}

/// The daemon's metrics text.
fn metrics(daemon: &Daemon) -> String {
    exchange(
        &daemon.socket,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn unknown_routes_get_a_json_404_on_every_listener() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(&["--http-listen", &listen], None);
    let answer = exchange(
        &daemon.socket,
        "GET /anything HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        answer.contains("content-type: application/json"),
        "{answer}"
    );
    assert!(answer.contains(r#""code":"NOT_FOUND""#), "{answer}");
    assert!(answer.contains("no route for GET /anything"), "{answer}");

    let home = tempfile::tempdir().unwrap();
    let output = run_checked(
        isolate(
            &mut std::process::Command::new(require_tool("curl")),
            home.path(),
        )
        .args(["-sS", "-X", "POST", "-w", "\n%{http_code}"])
        .arg(format!("http://{listen}/v1/nothing-here")),
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.ends_with("\n404"), "{text}");
    assert!(text.contains(r#""code":"NOT_FOUND""#), "{text}");
}

#[test]
fn clients_that_send_nothing_or_half_a_request_are_dropped() {
    let daemon = Daemon::start(&[], Some("header_read_timeout = \"1s\"\n"));
    let started = Instant::now();
    // Connects and says nothing.
    let mut silent = UnixStream::connect(&daemon.socket).unwrap();
    // Sends half the headers of a request.
    let mut half = UnixStream::connect(&daemon.socket).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    // Asks once, then keeps the connection open and idle.
    let mut idle = UnixStream::connect(&daemon.socket).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    for (name, stream) in [
        ("silent", &mut silent),
        ("half", &mut half),
        ("idle", &mut idle),
    ] {
        let (received, closed) = read_until_closed(stream, Duration::from_secs(8));
        let text = String::from_utf8_lossy(&received);
        assert!(closed, "{name}: still open after 8 s: {text}");
        if name == "idle" {
            assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
        } else {
            assert!(!text.contains(" 200 "), "{name}: {text}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "dropped after {:?}",
        started.elapsed()
    );
    let text = metrics(&daemon);
    let dropped = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "wasmcache_connections_dropped_total{listener=\"unix\",reason=\"header_timeout\"} ",
            )
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped >= 2, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_dropped() {
    let registry = Registry::start();
    let addr = registry.addr();
    // Three times the socket's send buffer (4 MiB asked for, 8 MiB granted), so writes stall.
    let wasm = module(24_000_000, 21);
    oras_push_cncf(&registry, "stall/f:v1", &wasm);
    let daemon = Daemon::start(
        &["--insecure-registry", &addr],
        Some("idle_timeout = \"1s\"\n"),
    );
    let path = format!("/v1/modules/{}", digest(&wasm));
    let through = exchange(
        &daemon.socket,
        &format!("GET {path}?ref={addr}/stall/f:v1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    );
    assert!(through.starts_with("HTTP/1.1 200"), "{}", &through[..80]);

    let mut stalled = UnixStream::connect(&daemon.socket).unwrap();
    stalled
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    // Reads nothing for three idle timeouts, then everything that is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (received, closed) = read_until_closed(&mut stalled, Duration::from_secs(10));
    assert!(closed, "still open");
    assert!(
        received.len() < wasm.len(),
        "{} bytes received: the whole module went out",
        received.len()
    );
    let text = metrics(&daemon);
    assert!(
        has_line(
            &text,
            "wasmcache_connections_dropped_total{listener=\"unix\",reason=\"stalled\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn connections_past_the_cap_wait_until_one_closes() {
    let daemon = Daemon::start(
        &[],
        Some("header_read_timeout = \"30s\"\n[limits]\nmax_connections = 2\n"),
    );
    let first = UnixStream::connect(&daemon.socket).unwrap();
    let _second = UnixStream::connect(&daemon.socket).unwrap();
    let mut third = UnixStream::connect(&daemon.socket).unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (waiting, closed) = read_until_closed(&mut third, Duration::from_secs(1));
    assert!(
        waiting.is_empty() && !closed,
        "answered past the cap: {}",
        String::from_utf8_lossy(&waiting)
    );
    drop(first);
    let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(5));
    let answer = String::from_utf8_lossy(&answer);
    assert!(closed && answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_commands_ask_the_daemon_at_the_socket_they_are_given() {
    let registry = Registry::start();
    let addr = registry.addr();
    let wasm = module(500, 22);
    oras_push_cncf(&registry, "cli/f:v1", &wasm);
    let daemon = Daemon::start(&["--insecure-registry", &addr], None);
    let reference = format!("{addr}/cli/f:v1");
    // A home of its own: nothing may appear in its default cache directory.
    let home = tempfile::tempdir().unwrap();
    let default_cache = home.path().join(".cache/wasmcache");
    let socket = daemon.socket.to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut command = wasmcache_in(home.path());
        command.args(args).args(["--socket", socket]);
        command
    };

    let path = run_ok(&mut cli(&["fetch", &reference]));
    assert_eq!(std::fs::read(path.trim()).unwrap(), wasm);
    let listed: serde_json::Value =
        serde_json::from_str(&run_ok(&mut cli(&["ls", "--json"]))).unwrap();
    assert_eq!(listed[0]["reference"], reference, "{listed}");
    assert_eq!(listed[0]["digest"], digest(&wasm), "{listed}");
    let usage: serde_json::Value =
        serde_json::from_str(&run_ok(&mut cli(&["du", "--json"]))).unwrap();
    assert_eq!(usage["modules"], 1, "{usage}");
    assert!(run_ok(&mut cli(&["stat", &reference])).contains(&reference));
    assert!(run_ok(&mut cli(&["verify"])).contains("checked 1 blobs: 0 bad"));
    assert!(run_ok(&mut cli(&["pin", &reference])).starts_with("pinned"));
    assert!(run_ok(&mut cli(&["unpin", &reference])).starts_with("unpinned"));
    assert!(run_ok(&mut cli(&["gc"])).contains("modules evicted"));
    assert!(run_ok(&mut cli(&["rm", &reference])).contains("untagged"));
    let listed = run_ok(&mut cli(&["ls", "--json"]));
    assert_eq!(listed.trim(), "[]");
    assert!(!default_cache.exists(), "a local cache was created");

    // A daemon that is not there is an error that names the socket, for every command.
    let missing = home.path().join("nobody.sock");
    for args in [
        &["ls"][..],
        &["du"],
        &["gc"],
        &["verify"],
        &["rm", &reference],
    ] {
        let mut command = wasmcache_in(home.path());
        command.args(args).arg("--socket").arg(&missing);
        let (_, stderr) = run_err(&mut command);
        assert!(
            stderr.contains(missing.to_str().unwrap()),
            "{args:?}: {stderr}"
        );
    }
    // With neither a socket nor a cache, nothing is created either.
    let (_, stderr) = run_err(wasmcache_in(home.path()).arg("ls"));
    assert!(stderr.contains("no cache at"), "{stderr}");
    assert!(!default_cache.exists(), "a local cache was created");
}

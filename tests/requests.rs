//! What a cold pull costs at the registry, counted in its access log and at a counting TCP
//! proxy in front of it: an anonymous registry sees a manifest and a blob GET and nothing
//! else (no `GET /v2/` probe, from the daemon or the CLI), an image index one manifest more,
//! a token registry one 401 per daemon lifetime and one token per repository, all of a
//! daemon's requests to a registry share one connection, and a new connection to a TLS
//! registry resumes the last one's session.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use wasmcache::api::proto::{FetchRequest, PullPolicy};

use crate::common::cli::{run_ok, wasmcache};
use crate::common::fixtures::{oras_push_cncf, skopeo_push_index};
use crate::common::wasm::{digest, module};
use crate::common::{require_tool, Daemon, LoggedRequest, Registry, TokenServer};

const USER: &str = "rtt";
const PASSWORD: &str = "rtt-pw-8c1f";

/// A TCP proxy on a free loopback port to `upstream`, counting the connections it accepts;
/// it stops with the runtime of the test that started it.
struct CountingProxy {
    addr: String,
    accepted: Arc<AtomicUsize>,
}

impl CountingProxy {
    async fn start(upstream: String) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        CountingProxy { addr, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn fetch(daemon: &Daemon, reference: &str) -> String {
    let request = FetchRequest {
        reference: reference.to_owned(),
        pull_policy: PullPolicy::IfNotPresent.into(),
        ..Default::default()
    };
    let mut client = daemon.client().await;
    let answer = tokio::time::timeout(std::time::Duration::from_secs(60), client.fetch(request));
    answer
        .await
        .expect("an answer within a minute")
        .unwrap_or_else(|status| panic!("{reference}: {status:?}\n{}", daemon.log()))
        .into_inner()
        .digest
}

/// The requests `registry` logged after the first `from`, as `METHOD path status`.
fn since(registry: &Registry, from: usize) -> Vec<String> {
    let requests: Vec<LoggedRequest> = registry.requests().into_iter().skip(from).collect();
    requests
        .into_iter()
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect()
}

/// `GET <path> 200` for a manifest or blob of `repo`.
fn get(repo: &str, kind: &str, target: &str) -> String {
    format!("GET /v2/{repo}/{kind}/{target} 200")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anonymous_registry_sees_a_manifest_and_a_blob_per_cold_pull_on_one_connection() {
    let registry = Registry::start();
    let proxy = CountingProxy::start(registry.addr()).await;
    let modules: Vec<Vec<u8>> = (0..3).map(|seed| module(20_000, 600 + seed)).collect();
    for (i, bytes) in modules.iter().enumerate() {
        oras_push_cncf(&registry, &format!("rtt/m{i}:v1"), bytes);
    }

    // The CLI: no probe either.
    let home = tempfile::tempdir().unwrap();
    let start = registry.requests().len();
    let pulled = run_ok(
        wasmcache()
            .arg("--data-dir")
            .arg(home.path())
            .args(["--insecure-registry", &proxy.addr])
            .args(["pull", "--json"])
            .arg(format!("{}/rtt/m0:v1", proxy.addr)),
    );
    let pulled: serde_json::Value = serde_json::from_str(&pulled).unwrap();
    assert_eq!(pulled["digest"], digest(&modules[0]));
    assert_eq!(
        since(&registry, start),
        [
            get("rtt/m0", "manifests", "v1"),
            get("rtt/m0", "blobs", &digest(&modules[0])),
        ]
    );
    assert_eq!(
        proxy.connections(),
        1,
        "the CLI's requests share a connection"
    );

    // A daemon: its first and every later cold pull cost the same two requests, all on the
    // connection it opened first.
    let config = format!("insecure_registries = [\"{}\"]\n", proxy.addr);
    let daemon = Daemon::start(&[], Some(&config));
    let before = proxy.connections();
    for (i, bytes) in modules.iter().enumerate().skip(1) {
        let start = registry.requests().len();
        let repo = format!("rtt/m{i}");
        let got = fetch(&daemon, &format!("{}/{repo}:v1", proxy.addr)).await;
        assert_eq!(got, digest(bytes));
        assert_eq!(
            since(&registry, start),
            [
                get(&repo, "manifests", "v1"),
                get(&repo, "blobs", &digest(bytes)),
            ]
        );
    }
    assert_eq!(
        proxy.connections() - before,
        1,
        "one connection for all of a daemon's requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_index_costs_one_manifest_more() {
    let registry = Registry::start();
    let bytes = module(20_000, 610);
    skopeo_push_index(
        &registry,
        "rtt/index:v1",
        vec![("wasip1", "wasm", vec![bytes.clone()])],
    );
    let config = format!("insecure_registries = [\"{}\"]\n", registry.addr());
    let daemon = Daemon::start(&[], Some(&config));
    let start = registry.requests().len();
    let got = fetch(&daemon, &format!("{}/rtt/index:v1", registry.addr())).await;
    assert_eq!(got, digest(&bytes));
    let seen = since(&registry, start);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], get("rtt/index", "manifests", "v1"));
    assert!(
        seen[1].starts_with("GET /v2/rtt/index/manifests/sha256:"),
        "{seen:?}"
    );
    assert!(
        seen[2].starts_with("GET /v2/rtt/index/blobs/sha256:"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_registry_sees_one_401_per_daemon_and_one_token_per_repository() {
    let server = TokenServer::start(&[(USER, PASSWORD)]);
    let registry = Registry::builder().token_auth(&server).start();
    let addr = registry.addr();
    let modules: Vec<Vec<u8>> = (0..3).map(|seed| module(20_000, 620 + seed)).collect();
    oras_push_cncf(&registry, "rtt/a:v1", &modules[0]);
    oras_push_cncf(&registry, "rtt/a:v2", &modules[1]);
    oras_push_cncf(&registry, "rtt/b:v1", &modules[2]);
    let home = tempfile::tempdir().unwrap();
    let auth = home.path().join("config.json");
    let auths = json!({ "auths": { addr.clone(): {"username": USER, "password": PASSWORD} } });
    std::fs::write(&auth, auths.to_string()).unwrap();
    let config = format!(
        "insecure_registries = [\"{addr}\"]\nregistry_auth_file = \"{}\"\n",
        auth.display()
    );
    let daemon = Daemon::start(&[], Some(&config));

    // First contact: the anonymous manifest GET is answered 401 with the challenge; then one
    // token, the manifest and the blob.
    let (start, tokens) = (registry.requests().len(), server.count());
    let got = fetch(&daemon, &format!("{addr}/rtt/a:v1")).await;
    assert_eq!(got, digest(&modules[0]));
    let seen = since(&registry, start);
    assert_eq!(
        seen,
        [
            "GET /v2/rtt/a/manifests/v1 401".to_owned(),
            get("rtt/a", "manifests", "v1"),
            get("rtt/a", "blobs", &digest(&modules[0])),
        ]
    );
    assert_eq!(server.count() - tokens, 1);

    // The same repository: the token is reused, no 401.
    let (start, tokens) = (registry.requests().len(), server.count());
    let got = fetch(&daemon, &format!("{addr}/rtt/a:v2")).await;
    assert_eq!(got, digest(&modules[1]));
    assert_eq!(
        since(&registry, start),
        [
            get("rtt/a", "manifests", "v2"),
            get("rtt/a", "blobs", &digest(&modules[1])),
        ]
    );
    assert_eq!(server.count() - tokens, 0);

    // Another repository: its own token, asked for before the first request (the challenge
    // is known), so still no 401.
    let (start, tokens) = (registry.requests().len(), server.count());
    let got = fetch(&daemon, &format!("{addr}/rtt/b:v1")).await;
    assert_eq!(got, digest(&modules[2]));
    assert_eq!(
        since(&registry, start),
        [
            get("rtt/b", "manifests", "v1"),
            get("rtt/b", "blobs", &digest(&modules[2])),
        ]
    );
    let asked = server.requests();
    assert_eq!(asked.len() - tokens, 1);
    assert_eq!(
        asked.last().unwrap().scopes,
        vec!["repository:rtt/b:pull".to_owned()]
    );
}

/// A TLS-terminating proxy on a free loopback port to `upstream` (a certificate for
/// 127.0.0.1 made by openssl in `dir`, whose PEM is [`TlsProxy::ca_file`]). It closes a
/// connection once it has been idle for `idle`, so that a client must connect again, and
/// records whether each handshake was full or resumed a session.
struct TlsProxy {
    addr: String,
    ca_file: std::path::PathBuf,
    handshakes: Arc<std::sync::Mutex<Vec<tokio_rustls::rustls::HandshakeKind>>>,
}

impl TlsProxy {
    async fn start(upstream: String, dir: &std::path::Path, idle: Duration) -> TlsProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::{crypto, ServerConfig};

        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        run_ok(
            std::process::Command::new(require_tool("openssl"))
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ])
                // A server certificate, not a CA's: it is its own trust anchor here.
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .args(["-addext", "extendedKeyUsage=serverAuth"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        );
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&key).unwrap();
        let config = ServerConfig::builder_with_provider(crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handshakes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kinds = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream, kinds) =
                    (acceptor.clone(), upstream.clone(), kinds.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
                    kinds.lock().unwrap().push(kind);
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = tokio::io::split(tls);
                    let (mut from_server, mut to_server) = server.into_split();
                    let mut up = vec![0; 64 << 10];
                    let mut down = vec![0; 64 << 10];
                    // Relay both ways until either side closes or nothing moves for `idle`.
                    loop {
                        tokio::select! {
                            read = from_client.read(&mut up) => match read {
                                Ok(n) if n > 0 => {
                                    if to_server.write_all(&up[..n]).await.is_err() { break; }
                                }
                                _ => break,
                            },
                            read = from_server.read(&mut down) => match read {
                                Ok(n) if n > 0 => {
                                    if to_client.write_all(&down[..n]).await.is_err() { break; }
                                    let _ = to_client.flush().await;
                                }
                                _ => break,
                            },
                            _ = tokio::time::sleep(idle) => break,
                        }
                    }
                    let _ = to_client.shutdown().await;
                });
            }
        });
        TlsProxy {
            addr,
            ca_file: cert,
            handshakes,
        }
    }

    fn handshakes(&self) -> Vec<tokio_rustls::rustls::HandshakeKind> {
        self.handshakes.lock().unwrap().clone()
    }
}

/// Over TLS, a daemon whose connection to a registry was closed resumes its TLS session on
/// the next one instead of a full handshake (rustls' session cache, on by default).
#[tokio::test(flavor = "multi_thread")]
async fn a_new_connection_to_a_tls_registry_resumes_the_session() {
    use tokio_rustls::rustls::HandshakeKind;

    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let idle = Duration::from_millis(300);
    let proxy = TlsProxy::start(registry.addr(), dir.path(), idle).await;
    let modules: Vec<Vec<u8>> = (0..2).map(|seed| module(20_000, 700 + seed)).collect();
    for (i, bytes) in modules.iter().enumerate() {
        oras_push_cncf(&registry, &format!("tls/m{i}:v1"), bytes);
    }
    let config = format!("ca_file = \"{}\"\n", proxy.ca_file.display());
    let daemon = Daemon::start(&[], Some(&config));
    for (i, bytes) in modules.iter().enumerate() {
        let got = fetch(&daemon, &format!("{}/tls/m{i}:v1", proxy.addr)).await;
        assert_eq!(got, digest(bytes));
        if i == 0 {
            assert_eq!(
                proxy.handshakes(),
                [HandshakeKind::Full],
                "one connection so far"
            );
            // The proxy drops the idle connection; the next pull connects again.
            tokio::time::sleep(idle * 3).await;
        }
    }
    assert_eq!(
        proxy.handshakes(),
        [HandshakeKind::Full, HandshakeKind::Resumed],
        "the second connection resumed the first one's session"
    );
}

//! The registry token flow against a real registry configured with `auth.token` and a token
//! server in the test: basic credentials and `identitytoken`s exchanged for tokens, tokens
//! cached and refreshed when the registry refuses them, and realms the daemon must not talk
//! to (link-local) or must not hand credentials to (another host, unless trusted).

use serde_json::json;
use tonic::Code;
use wasmcache::api::proto::{FetchRequest, PullPolicy};

use crate::common::fixtures::oras_push_cncf;
use crate::common::token::TokenRequest;
use crate::common::wasm::{digest, module};
use crate::common::{Daemon, Registry, TokenServer};

const USER: &str = "alice";
const PASSWORD: &str = "tok-pw-51d2e8";

/// A daemon for `registry` with `auths` as its Docker config and `extra` config lines.
fn daemon_with(
    registry: &Registry,
    auths: serde_json::Value,
    extra: &str,
) -> (Daemon, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let auth = home.path().join("config.json");
    std::fs::write(&auth, json!({ "auths": auths }).to_string()).unwrap();
    let config = format!(
        "insecure_registries = [\"{}\"]\nregistry_auth_file = \"{}\"\n{extra}",
        registry.addr(),
        auth.display()
    );
    (Daemon::start(&[], Some(&config)), home)
}

async fn fetch(
    daemon: &Daemon,
    reference: &str,
    policy: PullPolicy,
) -> Result<String, tonic::Status> {
    daemon
        .client()
        .await
        .fetch(FetchRequest {
            reference: reference.to_owned(),
            pull_policy: policy.into(),
            ..Default::default()
        })
        .await
        .map(|response| response.into_inner().digest)
}

/// The token requests made since `from`.
fn since(server: &TokenServer, from: usize) -> Vec<TokenRequest> {
    server.requests().into_iter().skip(from).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_fetched_with_credentials_cached_and_refreshed_on_401() {
    let server = TokenServer::start(&[(USER, PASSWORD)]);
    let registry = Registry::builder().token_auth(&server).start();
    let addr = registry.addr();
    let a = module(500, 41);
    let b = module(500, 42);
    oras_push_cncf(&registry, "tok/a:v1", &a);
    oras_push_cncf(&registry, "tok/b:v1", &b);
    let (daemon, _home) = daemon_with(
        &registry,
        json!({ addr.clone(): {"username": USER, "password": PASSWORD} }),
        "",
    );

    // One token, asked for with the credentials, scoped to the repository.
    let start = server.count();
    let got = fetch(
        &daemon,
        &format!("{addr}/tok/a:v1"),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_eq!(got.unwrap(), digest(&a), "{}", daemon.log());
    let asked = since(&server, start);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].method, "GET");
    assert_eq!(asked[0].user.as_deref(), Some(USER));
    assert_eq!(asked[0].scopes, vec!["repository:tok/a:pull".to_owned()]);
    assert_eq!(asked[0].service.as_deref(), Some(server.service()));
    assert_eq!(asked[0].status, 200);

    // Re-resolving the tag reuses the cached token.
    let got = fetch(&daemon, &format!("{addr}/tok/a:v1"), PullPolicy::Always).await;
    assert_eq!(got.unwrap(), digest(&a));
    assert_eq!(server.count(), start + 1, "{:?}", server.requests());

    // Tokens the registry refuses (their `exp` is past, though `expires_in` says 300 s): the
    // daemon asks once more, then reports the refusal.
    server.set_issue_expired(true);
    let start = server.count();
    let refused = fetch(
        &daemon,
        &format!("{addr}/tok/b:v1"),
        PullPolicy::IfNotPresent,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains(&addr), "{refused:?}");
    assert_eq!(since(&server, start).len(), 2, "{:?}", server.requests());

    // The last (refused) token is still cached; once the server issues good ones again, the
    // registry's 401 makes the daemon replace it, and the fetch succeeds.
    server.set_issue_expired(false);
    let start = server.count();
    let got = fetch(
        &daemon,
        &format!("{addr}/tok/b:v1"),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_eq!(got.unwrap(), digest(&b), "{}", daemon.log());
    assert_eq!(since(&server, start).len(), 1, "{:?}", server.requests());

    // Nothing reached the token server without the credentials, and no password was logged.
    assert!(server
        .requests()
        .iter()
        .all(|request| request.user.as_deref() == Some(USER)));
    assert!(!daemon.log().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_tokens_and_wrong_passwords() {
    let server = TokenServer::start(&[(USER, PASSWORD)]);
    server.add_refresh_token("refresh-7f3a", USER);
    let registry = Registry::builder().token_auth(&server).start();
    let addr = registry.addr();
    let wasm = module(500, 43);
    oras_push_cncf(&registry, "tok/id:v1", &wasm);

    // An `identitytoken` is exchanged with the refresh-token grant.
    let (daemon, _home) = daemon_with(
        &registry,
        json!({ addr.clone(): {"identitytoken": "refresh-7f3a"} }),
        "",
    );
    let start = server.count();
    let got = fetch(
        &daemon,
        &format!("{addr}/tok/id:v1"),
        PullPolicy::IfNotPresent,
    )
    .await;
    assert_eq!(got.unwrap(), digest(&wasm), "{}", daemon.log());
    let asked = since(&server, start);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].method, "POST");
    assert_eq!(asked[0].grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(asked[0].refresh_token.as_deref(), Some("refresh-7f3a"));
    assert_eq!(asked[0].client_id.as_deref(), Some("wasmcache"));
    assert_eq!(asked[0].scopes, vec!["repository:tok/id:pull".to_owned()]);
    assert!(!daemon.log().contains("refresh-7f3a"));
    drop(daemon);

    // A wrong password: UNAUTHENTICATED, naming the registry and not the password.
    let (daemon, _home) = daemon_with(
        &registry,
        json!({ addr.clone(): {"username": USER, "password": "wrong-pw-0c1d"} }),
        "",
    );
    let refused = fetch(
        &daemon,
        &format!("{addr}/tok/id:v1"),
        PullPolicy::IfNotPresent,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains(&addr), "{refused:?}");
    assert!(!refused.message().contains("wrong-pw-0c1d"));
    assert!(!daemon.log().contains("wrong-pw-0c1d"));
}

#[tokio::test(flavor = "multi_thread")]
async fn realms_on_link_local_addresses_or_other_hosts_are_refused() {
    let server = TokenServer::builder()
        .user(USER, PASSWORD)
        .anonymous_pull(true)
        .start();
    let mut registry = Registry::builder().token_auth(&server).start();
    let addr = registry.addr();
    let wasm = module(500, 44);
    oras_push_cncf(&registry, "tok/r:v1", &wasm);
    let reference = format!("{addr}/tok/r:v1");
    let credentials = json!({ addr.clone(): {"username": USER, "password": PASSWORD} });

    // The same token server, named `localhost`: another host than the registry's 127.0.0.1.
    registry.set_token_realm(&server.realm_on("localhost"));
    let (daemon, _home) = daemon_with(&registry, credentials.clone(), "");
    let start = server.count();
    let refused = fetch(&daemon, &reference, PullPolicy::IfNotPresent)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    for part in [addr.as_str(), "trusted_token_realms", "localhost"] {
        assert!(refused.message().contains(part), "{part}: {refused:?}");
    }
    assert_eq!(server.count(), start, "the realm got a request");
    drop(daemon);

    // Trusted for this registry: the credentials go there.
    let trusted = format!(
        "[trusted_token_realms]\n\"{addr}\" = [\"localhost:{}\"]\n",
        server.port()
    );
    let (daemon, _home) = daemon_with(&registry, credentials.clone(), &trusted);
    let start = server.count();
    let got = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_eq!(got.unwrap(), digest(&wasm), "{}", daemon.log());
    let asked = since(&server, start);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].user.as_deref(), Some(USER));
    drop(daemon);

    // Without credentials, a realm elsewhere is fine: nothing secret goes there.
    let (daemon, _home) = daemon_with(&registry, json!({}), "");
    let start = server.count();
    let got = fetch(&daemon, &reference, PullPolicy::IfNotPresent).await;
    assert_eq!(got.unwrap(), digest(&wasm), "{}", daemon.log());
    let asked = since(&server, start);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(!asked[0].authorization, "{asked:?}");
    drop(daemon);

    // A realm on an address in blocked_cidrs (a cloud metadata service) is never asked, with
    // or without credentials.
    registry.set_token_realm("http://169.254.169.254/latest/token");
    for auths in [credentials, json!({})] {
        let (daemon, _home) = daemon_with(&registry, auths, "");
        let refused = fetch(&daemon, &reference, PullPolicy::IfNotPresent)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        for part in [addr.as_str(), "169.254.169.254", "blocked_cidrs"] {
            assert!(refused.message().contains(part), "{part}: {refused:?}");
        }
    }
}

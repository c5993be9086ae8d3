//! Registry credentials from Docker `config.json` files.
//!
//! Reads the `auths` map the way `docker login`, `skopeo login`, `oras login` and Kubernetes
//! `kubernetes.io/dockerconfigjson` Secrets write it: `auth` (base64 `user:password`),
//! separate `username`/`password` fields, or an `identitytoken` (an OAuth2 refresh token for
//! the registry's token server). Keys are a host, `host:port`, a URL such as
//! `https://index.docker.io/v1/`, or — as the kubelet reads them — a host with a repository
//! path prefix (`registry.example.com/team-a`), which wins over the bare host for the
//! repositories under it. Credentials are never logged or printed: [`Credential`]'s `Debug`
//! hides the secret.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// One registry's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name (may be empty with an identity token).
    pub username: String,
    /// The password or token.
    pub secret: Secret,
}

/// What proves a [`Credential`].
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A password or access token, sent with HTTP basic authentication.
    Password(String),
    /// A Docker `identitytoken`: a refresh token exchanged at the registry's token server.
    IdentityToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.secret {
            Secret::Password(_) => "password",
            Secret::IdentityToken(_) => "identity token",
        };
        write!(f, "Credential({}, <redacted {kind}>)", self.username)
    }
}

/// Why a credentials file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("registry credentials file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a Docker config.
    #[error("registry credentials file {path}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (never includes secrets).
        reason: String,
    },
}

/// Credentials by normalised registry host, or host and repository path prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    by_registry: HashMap<String, Credential>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl Credentials {
    /// Loads `path`; a missing file means no credentials (anonymous access).
    pub fn load(path: &Path) -> Result<Credentials, Error> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Credentials::default())
            }
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Credentials::parse(&text).map_err(|reason| Error::Malformed {
            path: path.to_owned(),
            reason,
        })
    }

    fn parse(text: &[u8]) -> Result<Credentials, String> {
        // serde_json's messages quote no input values, so no secret can leak through them.
        let config: DockerConfig =
            serde_json::from_slice(text).map_err(|error| error.to_string())?;
        let mut by_registry = HashMap::new();
        for (key, entry) in config.auths {
            let credential = match (
                entry.identitytoken,
                entry.auth,
                entry.username,
                entry.password,
            ) {
                (Some(token), _, username, _) if !token.is_empty() => Credential {
                    username: username.unwrap_or_default(),
                    secret: Secret::IdentityToken(token),
                },
                (_, Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| format!("auths.{key}.auth is not valid base64"))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| format!("auths.{key}.auth is not UTF-8"))?;
                    let (username, password) = decoded
                        .split_once(':')
                        .ok_or_else(|| format!("auths.{key}.auth is not 'user:password'"))?;
                    Credential {
                        username: username.to_owned(),
                        secret: Secret::Password(password.to_owned()),
                    }
                }
                (_, _, Some(username), Some(password)) => Credential {
                    username,
                    secret: Secret::Password(password),
                },
                _ => continue,
            };
            by_registry.insert(normalise_key(&key), credential);
        }
        Ok(Credentials { by_registry })
    }

    /// Loads and merges several files; for a registry named in more than one, the later file
    /// wins. Missing files count as empty.
    pub fn load_all(paths: &[PathBuf]) -> Result<Credentials, Error> {
        let mut merged = Credentials::default();
        for path in paths {
            merged
                .by_registry
                .extend(Credentials::load(path)?.by_registry);
        }
        Ok(merged)
    }

    /// How many registries have credentials.
    pub fn len(&self) -> usize {
        self.by_registry.len()
    }

    /// Whether no registry has credentials.
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }

    /// The credentials for `repository` on `registry` (as written in a reference): the entry
    /// with the longest path prefix of the repository, else the registry's own, if any.
    pub fn for_repository(&self, registry: &str, repository: &str) -> Option<&Credential> {
        let host = normalise_key(registry);
        let mut path = repository.trim_matches('/');
        loop {
            if path.is_empty() {
                return self.by_registry.get(&host);
            }
            if let Some(credential) = self.by_registry.get(&format!("{host}/{path}")) {
                return Some(credential);
            }
            path = path.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/` → `host:5000`;
/// `host:5000/team/` → `host:5000/team`. A URL's path is the legacy API version, not a
/// repository prefix, and is dropped.
fn normalise_key(key: &str) -> String {
    let (url_form, rest) = match key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
    {
        Some(rest) => (true, rest),
        None => (false, key),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    };
    let path = path.trim_matches('/');
    if url_form || path.is_empty() {
        host.to_owned()
    } else {
        format!("{host}/{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password(credential: &Credential) -> &str {
        match &credential.secret {
            Secret::Password(password) => password,
            Secret::IdentityToken(_) => panic!("not a password"),
        }
    }

    #[test]
    fn reads_every_field_form_and_host_spelling() {
        let credentials = Credentials::parse(
            br#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dTE6cDE="},
                "127.0.0.1:5000":{"username":"u2","password":"p2"},
                "ghcr.io":{"identitytoken":"refresh-me"},
                "quay.io":{}
            }}"#,
        )
        .unwrap();
        let hub = credentials
            .for_repository("docker.io", "library/a")
            .unwrap();
        assert_eq!((hub.username.as_str(), password(hub)), ("u1", "p1"));
        let local = credentials.for_repository("127.0.0.1:5000", "a").unwrap();
        assert_eq!(local.username, "u2");
        assert!(
            credentials.for_repository("ghcr.io", "o/r").unwrap().secret
                == Secret::IdentityToken("refresh-me".into())
        );
        assert!(credentials.for_repository("quay.io", "a").is_none());
        assert!(!format!("{local:?}").contains("p2"));
        let token = credentials.for_repository("ghcr.io", "o/r").unwrap();
        assert!(!format!("{token:?}").contains("refresh-me"));
    }

    #[test]
    fn the_longest_path_prefix_wins() {
        let credentials = Credentials::parse(
            br#"{"auths":{
                "r.example.com":{"username":"host","password":"h"},
                "r.example.com/team":{"username":"team","password":"t"},
                "r.example.com/team/secret/":{"username":"inner","password":"i"}
            }}"#,
        )
        .unwrap();
        let user = |repository: &str| {
            credentials
                .for_repository("r.example.com", repository)
                .map(|c| c.username.clone())
        };
        assert_eq!(user("team/app").as_deref(), Some("team"));
        assert_eq!(user("team/secret/app").as_deref(), Some("inner"));
        assert_eq!(user("team").as_deref(), Some("team"));
        assert_eq!(user("teammate/app").as_deref(), Some("host"));
        assert_eq!(user("other").as_deref(), Some("host"));
        assert!(credentials
            .for_repository("r2.example.com", "team/app")
            .is_none());
    }

    #[test]
    fn malformed_auth_is_named_without_the_secret() {
        let error = Credentials::parse(br#"{"auths":{"h":{"auth":"c2VjcmV0"}}}"#).unwrap_err();
        assert!(error.contains("auths.h.auth"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }
}

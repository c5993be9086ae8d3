//! Registry credentials from Docker `config.json` files.
//!
//! Reads the `auths` map the way `docker login`, `skopeo login`, `oras login` and Kubernetes
//! `kubernetes.io/dockerconfigjson` Secrets write it: `auth` (base64 `user:password`) or
//! separate `username`/`password` fields, keyed by host, `host:port`, or a URL such as
//! `https://index.docker.io/v1/`. Credentials are never logged or printed: [`Credential`]'s
//! `Debug` hides the secret.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// One registry's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
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

/// Credentials by normalised registry host.
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
            let credential = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
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
                        password: password.to_owned(),
                    }
                }
                (_, Some(username), Some(password)) => Credential { username, password },
                _ => continue,
            };
            by_registry.insert(normalise_host(&key), credential);
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

    /// The credentials for `registry` (as written in a reference), if any.
    pub fn for_registry(&self, registry: &str) -> Option<&Credential> {
        self.by_registry.get(&normalise_host(registry))
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/` → `host:5000`.
fn normalise_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_field_forms_and_host_spellings() {
        let credentials = Credentials::parse(
            br#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dTE6cDE="},
                "127.0.0.1:5000":{"username":"u2","password":"p2"},
                "ghcr.io":{"identitytoken":"x"}
            }}"#,
        )
        .unwrap();
        let hub = credentials.for_registry("docker.io").unwrap();
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("u1", "p1"));
        let local = credentials.for_registry("127.0.0.1:5000").unwrap();
        assert_eq!(local.username, "u2");
        assert!(credentials.for_registry("ghcr.io").is_none());
        assert!(!format!("{local:?}").contains("p2"));
    }

    #[test]
    fn malformed_auth_is_named_without_the_secret() {
        let error = Credentials::parse(br#"{"auths":{"h":{"auth":"c2VjcmV0"}}}"#).unwrap_err();
        assert!(error.contains("auths.h.auth"), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }
}

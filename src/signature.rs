//! Cosign signatures: which policy covers a reference, the keys it trusts, and whether a
//! signature layer signs the digest a reference resolved to.
//!
//! Cosign stores a signature of `<repository>@sha256:<hex>` as a manifest tagged
//! `sha256-<hex>.sig` in the same repository. Each of its layers of media type
//! [`SIMPLE_SIGNING`] is a JSON payload naming the signed digest
//! (`critical.image.docker-manifest-digest`) and repository
//! (`critical.identity.docker-reference`); the layer's annotation [`SIGNATURE_ANNOTATION`]
//! holds the base64 ECDSA P-256 / SHA-256 signature of the payload's bytes. This module is
//! pure: fetching the manifest and layers is the fetcher's.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

use crate::config::{SignatureMode, SignaturePolicyConfig};
use crate::digest::Digest;

/// Media type of a cosign simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// `artifactType` of a cosign signature manifest stored as an OCI 1.1 referrer.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// Annotation holding the payload's base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The tag cosign files a signature of `digest` under.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("signature key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a PEM ECDSA P-256 public key.
    #[error("signature key file {path}: not a PEM ECDSA P-256 public key ({reason})")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

/// A trusted public key, named by the sha256 of its DER form (the id shown in verdicts).
#[derive(Debug, Clone)]
pub struct Key {
    /// `sha256:<hex>` of the key's SubjectPublicKeyInfo, as `cosign` prints key ids.
    pub id: String,
    key: VerifyingKey,
}

impl Key {
    /// Reads a PEM public key (`-----BEGIN PUBLIC KEY-----`, cosign's `cosign.pub`).
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Key::from_pem(&text).map_err(|reason| KeyError::Parse {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses a PEM public key.
    pub fn from_pem(text: &str) -> Result<Key, String> {
        let key = VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| e.to_string())?;
        let der = p256::pkcs8::EncodePublicKey::to_public_key_der(&key)
            .map_err(|error| error.to_string())?;
        Ok(Key {
            id: Digest::of(der.as_bytes()).to_string(),
            key,
        })
    }
}

/// A policy with its keys loaded.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `registry[:port][/repository prefix]`.
    pub scope: String,
    /// Enforce or only warn.
    pub mode: SignatureMode,
    /// The keys a signature must verify with (one is enough).
    pub keys: Vec<Key>,
    /// Repositories (`registry/repository`) a signature may name besides the one pulled.
    pub identities: Vec<String>,
}

impl Policy {
    /// Loads the keys of `config`.
    pub fn load(config: &SignaturePolicyConfig) -> Result<Policy, KeyError> {
        let keys = config
            .keys
            .iter()
            .map(|path| Key::from_file(path))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            scope: config.scope.clone(),
            mode: config.mode,
            keys,
            identities: config.identities.clone(),
        })
    }

    /// The key set's fingerprint: a verdict holds while it is unchanged.
    pub fn key_set(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|key| key.id.as_str()).collect();
        Digest::of(ids.join(",").as_bytes()).to_string()
    }
}

/// Whether `scope` covers the repository `name` (`registry/repository`): the whole registry,
/// or a repository prefix at a path boundary.
pub fn covers(scope: &str, name: &str) -> bool {
    name == scope
        || name
            .strip_prefix(scope)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The policy for repository `name`: the one with the longest covering scope.
pub fn policy_for<'a>(policies: &'a [Policy], name: &str) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|policy| covers(&policy.scope, name))
        .max_by_key(|policy| policy.scope.len())
}

/// Why a module is not verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature manifest, or no simple-signing layer in it.
    #[error("no signature")]
    NoSignature,
    /// A signature that is not base64 DER ECDSA, or a payload that is not cosign's.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// A valid signature by none of the policy's keys.
    #[error("signed by none of the policy's keys")]
    UnknownKey,
    /// The signed payload names another digest.
    #[error("the signature is for {signed}, not {resolved}")]
    DigestMismatch {
        /// The digest in the payload.
        signed: String,
        /// The digest the reference resolved to.
        resolved: String,
    },
    /// The signed payload names another repository.
    #[error("the signature is for repository {signed}, not {name}")]
    IdentityMismatch {
        /// The repository in the payload.
        signed: String,
        /// The repository pulled.
        name: String,
    },
}

impl Refusal {
    /// The `result` label of `wasmcache_signature_checks_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Refusal::NoSignature => "no_signature",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::UnknownKey => "unknown_key",
            Refusal::DigestMismatch { .. } => "digest_mismatch",
            Refusal::IdentityMismatch { .. } => "identity_mismatch",
        }
    }

    /// Which refusal says most about a set of signatures: the one closest to passing.
    fn rank(&self) -> u8 {
        match self {
            Refusal::NoSignature => 0,
            Refusal::BadSignature(_) => 1,
            Refusal::UnknownKey => 2,
            Refusal::IdentityMismatch { .. } => 3,
            Refusal::DigestMismatch { .. } => 4,
        }
    }

    /// The more telling of two refusals.
    pub fn worst_of(self, other: Refusal) -> Refusal {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// cosign's simple-signing payload, the parts that are checked.
#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Checks one signature layer: `signature` (the annotation's base64) must be a signature of
/// `payload` by one of `policy`'s keys, and the payload must name `resolved` and the
/// repository `name` (or one of the policy's identities). Returns the key's id.
pub fn check(
    policy: &Policy,
    payload: &[u8],
    signature: &str,
    resolved: &Digest,
    name: &str,
) -> Result<String, Refusal> {
    let bad = |reason: String| Refusal::BadSignature(reason);
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|error| bad(format!("annotation is not base64: {error}")))?;
    let signature = Signature::from_der(&der)
        .map_err(|error| bad(format!("not a DER ECDSA P-256 signature: {error}")))?;
    let key = policy
        .keys
        .iter()
        .find(|key| key.key.verify(payload, &signature).is_ok())
        .ok_or(Refusal::UnknownKey)?;
    let payload: Payload = serde_json::from_slice(payload)
        .map_err(|error| bad(format!("payload is not cosign's simple signing: {error}")))?;
    let signed = payload.critical.image.docker_manifest_digest;
    if signed != resolved.to_string() {
        return Err(Refusal::DigestMismatch {
            signed,
            resolved: resolved.to_string(),
        });
    }
    let identity = payload.critical.identity.docker_reference;
    let allowed = identity == name || policy.identities.contains(&identity);
    if !allowed {
        return Err(Refusal::IdentityMismatch {
            signed: identity,
            name: name.to_owned(),
        });
    }
    Ok(key.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::EncodePublicKey as _;

    fn signing_key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn policy(keys: &[&SigningKey]) -> Policy {
        let keys = keys
            .iter()
            .map(|key| {
                let pem = key
                    .verifying_key()
                    .to_public_key_pem(p256::pkcs8::LineEnding::LF)
                    .unwrap();
                Key::from_pem(&pem).unwrap()
            })
            .collect();
        Policy {
            scope: "registry.example.com/team-a".into(),
            mode: SignatureMode::Enforce,
            keys,
            identities: vec![],
        }
    }

    fn payload(name: &str, digest: &Digest) -> Vec<u8> {
        serde_json::json!({
            "critical": {
                "identity": {"docker-reference": name},
                "image": {"docker-manifest-digest": digest.to_string()},
                "type": "cosign container image signature"
            },
            "optional": null
        })
        .to_string()
        .into_bytes()
    }

    fn sign(key: &SigningKey, payload: &[u8]) -> String {
        let signature: Signature = key.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    #[test]
    fn a_signature_by_a_policy_key_for_the_resolved_digest_verifies() {
        let key = signing_key(7);
        let policy = policy(&[&signing_key(9), &key]);
        let name = "registry.example.com/team-a/filter";
        let digest = Digest::of(b"manifest");
        let payload = payload(name, &digest);
        let id = check(&policy, &payload, &sign(&key, &payload), &digest, name).unwrap();
        assert_eq!(id, policy.keys[1].id);

        // Another key, a changed payload, another digest or repository: refused, each named.
        let other = sign(&signing_key(3), &payload);
        assert_eq!(
            check(&policy, &payload, &other, &digest, name),
            Err(Refusal::UnknownKey)
        );
        let mut tampered = payload.clone();
        tampered[10] ^= 1;
        let good = sign(&key, &payload);
        assert_eq!(
            check(&policy, &tampered, &good, &digest, name),
            Err(Refusal::UnknownKey)
        );
        let elsewhere = Digest::of(b"another manifest");
        let refused = check(&policy, &payload, &good, &elsewhere, name).unwrap_err();
        assert!(
            matches!(refused, Refusal::DigestMismatch { .. }),
            "{refused}"
        );
        let refused = check(
            &policy,
            &payload,
            &good,
            &digest,
            "registry.example.com/team-a/x",
        );
        assert!(matches!(refused, Err(Refusal::IdentityMismatch { .. })));
        let garbage = check(&policy, &payload, "not base64!", &digest, name);
        assert!(matches!(garbage, Err(Refusal::BadSignature(_))));
    }

    #[test]
    fn the_longest_covering_scope_wins() {
        let mut team = policy(&[]);
        let mut registry = team.clone();
        registry.scope = "registry.example.com".into();
        team.mode = SignatureMode::Warn;
        let policies = [registry, team];
        let found = |name| policy_for(&policies, name).map(|p| p.scope.as_str());
        assert_eq!(
            found("registry.example.com/team-a/f"),
            Some("registry.example.com/team-a")
        );
        assert_eq!(
            found("registry.example.com/team-ab/f"),
            Some("registry.example.com")
        );
        assert_eq!(found("registry.example.com:5000/team-a/f"), None);
        assert_eq!(found("other.io/team-a/f"), None);
        assert_eq!(
            signature_tag(&Digest::of(b"x")),
            format!("sha256-{}.sig", Digest::of(b"x").hex())
        );
    }
}

//! `[[signature_policies]]`: which modules must carry a cosign signature, by which keys.

use std::path::PathBuf;

use serde::Deserialize;

use super::Error;

/// What a policy does with a module whose signature does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureMode {
    /// Refuse it: nothing unverified is stored or served.
    Enforce,
    /// Serve it, with a warning in the log and a metric.
    Warn,
}

/// One signature policy; the longest `scope` covering a reference applies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignaturePolicyConfig {
    /// `registry[:port]`, optionally followed by a repository prefix
    /// (`registry.example.com/team-a`).
    pub scope: String,
    /// PEM ECDSA P-256 public keys (cosign's default); a signature by any one counts.
    pub keys: Vec<PathBuf>,
    /// `enforce` or `warn`.
    pub mode: SignatureMode,
    /// Repositories (`registry/repository`) a signature may name besides the one pulled (a
    /// module signed where it was built, then copied).
    #[serde(default)]
    pub identities: Vec<String>,
}

impl SignaturePolicyConfig {
    pub(super) fn validate(&self) -> Result<(), Error> {
        let invalid = |field, reason| {
            Err(Error::Invalid {
                field,
                value: self.scope.clone(),
                reason,
            })
        };
        let scope = &self.scope;
        if scope.is_empty() || scope.contains("://") || scope.ends_with('/') || scope.contains('@')
        {
            return invalid(
                "signature_policies.scope",
                "expected 'registry[:port]' with an optional '/repository' prefix",
            );
        }
        if self.keys.is_empty() {
            return invalid("signature_policies.keys", "a policy needs at least one key");
        }
        Ok(())
    }
}

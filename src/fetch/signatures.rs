//! Signature checks: before a module is stored or served under a reference a policy covers,
//! the digest the reference resolved to (an image index's own digest when a tag names one)
//! must carry a cosign signature by one of the policy's keys.
//!
//! The signature manifest (`sha256-<hex>.sig`) and its payload layers are fetched like any
//! manifest and blob (peers, mirrors, then the registry; every byte checked by digest). A
//! verdict is kept in the index per resolved digest and key set (and in memory in front of
//! it), so a warm hit does not verify again, after a restart either, and a changed key set
//! verifies again at the next use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use tracing::{debug, warn};

use super::error::{Error, Result};
use super::{error_chain, Fetcher};
use crate::config::SignatureMode;
use crate::digest::Digest;
use crate::format::Descriptor;
use crate::reference::Reference;
use crate::signature::{self, Policy, Refusal};
use crate::store::SignatureRecord;

/// Most verdicts kept in memory.
const MAX_VERDICTS: usize = 65_536;

/// A verified signature: the key that verified it, the policy's scope, the digest of the
/// signature manifest.
pub type Verdict = SignatureRecord;

/// The loaded policies and the verdicts reached.
#[derive(Default)]
pub(super) struct Signatures {
    policies: RwLock<Vec<Policy>>,
    /// `(resolved digest, key set)` → verdict, in front of the index.
    verdicts: Mutex<HashMap<(Digest, String), Verdict>>,
    /// Bumped when the key sets change, so answers kept in memory are checked again.
    generation: AtomicU64,
}

/// A signature layer: its descriptor, with the annotations cosign puts on it.
#[derive(serde::Deserialize)]
struct SignatureLayer {
    #[serde(flatten)]
    descriptor: Descriptor,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(serde::Deserialize)]
struct SignatureManifest {
    #[serde(default)]
    layers: Vec<SignatureLayer>,
}

impl Fetcher {
    /// Loads the configured policies' keys (again): later checks use them, and a changed
    /// key set verifies modules again at their next use.
    pub fn load_signature_policies(&self) -> std::result::Result<(), signature::KeyError> {
        let policies = self
            .config
            .signature_policies
            .iter()
            .map(Policy::load)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let key_sets = |policies: &[Policy]| -> Vec<(String, String)> {
            let sets = policies.iter().map(|p| (p.scope.clone(), p.key_set()));
            sets.collect()
        };
        let mut current = self
            .signatures
            .policies
            .write()
            .expect("signature policies poisoned");
        if key_sets(&current) != key_sets(&policies) {
            if !current.is_empty() {
                tracing::info!("signature keys changed; modules are verified again at next use");
            }
            self.signatures.generation.fetch_add(1, Ordering::AcqRel);
        }
        *current = policies;
        Ok(())
    }

    /// Changes whenever the index or the signature keys do: answers kept in memory hold
    /// while it is unchanged. Read it before looking anything up.
    pub fn answers_generation(&self) -> u64 {
        let keys = self.signatures.generation.load(Ordering::Acquire);
        self.store.generation().wrapping_add(keys)
    }

    /// The key files of every signature policy.
    pub fn signature_key_files(&self) -> Vec<std::path::PathBuf> {
        let policies = self.config.signature_policies.iter();
        policies.flat_map(|policy| policy.keys.clone()).collect()
    }

    /// The policy covering `reference`, if any.
    fn signature_policy(&self, reference: &Reference) -> Option<Policy> {
        let policies = self.signatures.policies.read();
        let policies = policies.expect("signature policies poisoned");
        if policies.is_empty() {
            return None;
        }
        signature::policy_for(&policies, &reference.name()).cloned()
    }

    /// Whether any signature policy is configured.
    fn has_signature_policies(&self) -> bool {
        let policies = self.signatures.policies.read();
        !policies.expect("signature policies poisoned").is_empty()
    }

    /// Whether `fetched`, a cached answer for `reference`, may not be given before a
    /// signature check: an enforcing policy covers it and what it resolved to has no verdict
    /// under the policy's current keys.
    pub(super) fn unverified(
        &self,
        reference: &Reference,
        fetched: &crate::store::Fetched,
    ) -> bool {
        match self.signature_policy(reference) {
            Some(policy) if policy.mode == SignatureMode::Enforce => self
                .kept_verdict(&fetched.resolved_digest, &policy.key_set())
                .is_none(),
            _ => false,
        }
    }

    /// The verdict reached for `resolved` under `key_set`: from memory, else the index.
    fn kept_verdict(&self, resolved: &Digest, key_set: &str) -> Option<Verdict> {
        let key = (resolved.clone(), key_set.to_owned());
        let mut verdicts = self.signatures.verdicts.lock().expect("verdicts poisoned");
        if let Some(verdict) = verdicts.get(&key) {
            return Some(verdict.clone());
        }
        let stored = self.store.signature(resolved, key_set).ok().flatten()?;
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(key, stored.clone());
        Some(stored)
    }

    /// The signature check behind `fetched`, when a policy covers its reference: the
    /// verdict kept for what it resolved to, or an unverified one (a `warn` policy).
    pub fn signature_status(&self, fetched: &crate::store::Fetched) -> Option<Verdict> {
        if !self.has_signature_policies() {
            return None;
        }
        let reference = fetched.reference.parse::<Reference>().ok()?;
        let policy = self.signature_policy(&reference)?;
        let kept = self.kept_verdict(&fetched.resolved_digest, &policy.key_set());
        Some(kept.unwrap_or(Verdict {
            verified: false,
            key: String::new(),
            scope: policy.scope,
            signature: String::new(),
        }))
    }

    /// Checks that `resolved`, the digest `reference` resolved to, is signed as the policy
    /// covering `reference` wants. `Ok(None)`: no policy, or a `warn` policy and no valid
    /// signature (logged and counted). Under `enforce`, no valid signature is an
    /// [`Error::Unsigned`].
    pub(super) async fn check_signature(
        &self,
        reference: &Reference,
        resolved: &Digest,
    ) -> Result<Option<Verdict>> {
        let Some(policy) = self.signature_policy(reference) else {
            return Ok(None);
        };
        let key_set = policy.key_set();
        if let Some(verdict) = self.kept_verdict(resolved, &key_set) {
            return Ok(Some(verdict));
        }
        let outcome = self.find_signature(reference, resolved, &policy).await?;
        let result = match &outcome {
            Ok(_) => "verified",
            Err(refusal) => refusal.result(),
        };
        self.metrics.signature_check(result);
        match outcome {
            Ok((key, signature)) => {
                let verdict = Verdict {
                    verified: true,
                    key,
                    scope: policy.scope.clone(),
                    signature,
                };
                debug!(reference = %reference, %resolved, key = %verdict.key, "signature verified");
                self.store
                    .record_signature(resolved, &key_set, &verdict)
                    .map_err(|source| Error::Store {
                        reference: reference.to_string(),
                        source,
                    })?;
                self.kept_verdict(resolved, &key_set);
                Ok(Some(verdict))
            }
            Err(refusal) if policy.mode == SignatureMode::Enforce => Err(Error::Unsigned {
                reference: reference.to_string(),
                scope: policy.scope.clone(),
                refusal,
            }),
            Err(refusal) => {
                warn!(reference = %reference, %resolved, scope = %policy.scope, %refusal,
                      "signature policy (warn): serving a module without a valid signature");
                self.metrics.signature_check("warned");
                Ok(None)
            }
        }
    }

    /// Fetches the signature manifest of `resolved` and checks its layers: the id of the key
    /// of the first that verifies and the signature manifest's digest, else the most telling
    /// refusal. A registry failure other
    /// than "not found" is an error (the check could not be made).
    async fn find_signature(
        &self,
        reference: &Reference,
        resolved: &Digest,
        policy: &Policy,
    ) -> Result<std::result::Result<(String, String), Refusal>> {
        if reference.url().is_some() {
            // A module served over HTTP has no registry to hold a signature.
            return Ok(Err(Refusal::NoSignature));
        }
        let tagged = reference.with_tag(&signature::signature_tag(resolved));
        let manifests = match self.manifest(&tagged, true).await {
            Ok(found) => vec![found],
            Err(error) if super::error::is_not_found(&error) => {
                self.referring_signatures(reference, resolved).await?
            }
            Err(error) => return Err(error),
        };
        let mut refusal = Refusal::NoSignature;
        for (bytes, manifest_digest) in manifests {
            match self
                .check_signature_manifest(reference, resolved, policy, &bytes)
                .await
            {
                Ok(key) => return Ok(Ok((key, manifest_digest.to_string()))),
                Err(other) => refusal = refusal.worst_of(other),
            }
        }
        Ok(Err(refusal))
    }

    /// The signature manifests that refer to `resolved` through the registry's referrers
    /// API (cosign's `--registry-referrers-mode=oci-1-1`); none when it has neither the API
    /// nor the tag schema.
    async fn referring_signatures(
        &self,
        reference: &Reference,
        resolved: &Digest,
    ) -> Result<Vec<(bytes::Bytes, Digest)>> {
        let subject = reference.with_digest(resolved.clone());
        let digests = match self
            .registry
            .referrers(&subject, signature::SIGNATURE_ARTIFACT_TYPE)
            .await
        {
            Ok(digests) => digests,
            Err(error) => {
                debug!(error = %error_chain(&error), "no referrers");
                return Ok(Vec::new());
            }
        };
        let mut manifests = Vec::new();
        for digest in digests {
            manifests.push(self.manifest(&reference.with_digest(digest), false).await?);
        }
        Ok(manifests)
    }

    /// Checks the simple-signing layers of one signature manifest: the id of the key of the
    /// first that verifies, else the most telling refusal.
    async fn check_signature_manifest(
        &self,
        reference: &Reference,
        resolved: &Digest,
        policy: &Policy,
        bytes: &[u8],
    ) -> std::result::Result<String, Refusal> {
        let manifest: SignatureManifest = match serde_json::from_slice(bytes) {
            Ok(manifest) => manifest,
            Err(error) => {
                let reason = format!("signature manifest unreadable: {error}");
                return Err(Refusal::BadSignature(reason));
            }
        };
        let name = reference.name();
        let mut refusal = Refusal::NoSignature;
        let layers = manifest.layers.iter().take(self.config.limits.max_layers);
        for layer in layers.filter(|l| l.descriptor.media_type == signature::SIMPLE_SIGNING) {
            let Some(annotation) = layer.annotations.get(signature::SIGNATURE_ANNOTATION) else {
                continue;
            };
            let payload = match self.fetch_document(reference, &layer.descriptor).await {
                Ok(payload) => payload,
                Err(error) => {
                    debug!(error = %error_chain(&error), "signature payload unreadable");
                    let reason = format!("payload {} unreadable", layer.descriptor.digest);
                    refusal = refusal.worst_of(Refusal::BadSignature(reason));
                    continue;
                }
            };
            match signature::check(policy, &payload, annotation, resolved, &name) {
                Ok(key) => return Ok(key),
                Err(other) => refusal = refusal.worst_of(other),
            }
        }
        Err(refusal)
    }
}

//! When the registry is asked: pull policy and tag TTL, warm hits from the answer memo, one
//! shared resolution per reference, and stale answers (the last known module of a tag when
//! the registry fails, or says nothing within `stale_after`). Deadlines: each resolution ends
//! within `fetch_timeout`; a caller's own deadline ends its wait, not the shared run.

use std::time::{Duration, Instant};

use tracing::{debug, instrument, warn, Span};

use super::error::{Error, Result};
use super::{error_chain, url, Fetched, Fetcher};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store;

/// When a tag is resolved at its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the cache; re-resolve a tag at most once per `tag_ttl`.
    #[default]
    IfNotPresent,
    /// Re-resolve the tag now; the module is not downloaded again if unchanged.
    Always,
    /// Only the cache.
    Never,
}

impl Fetcher {
    /// Returns `reference`'s module under `policy`, pulling it if needed.
    ///
    /// A cached digest reference never needs the registry; a tag is re-resolved when the
    /// policy says so. When the registry is unreachable, failing, or silent for
    /// `stale_after`, and the tag was resolved before, the last known module is returned
    /// with `stale` set (the resolution goes on in the background).
    pub async fn fetch(&self, reference: &Reference, policy: PullPolicy) -> Result<Fetched> {
        self.fetch_within(reference, policy, None).await
    }

    /// [`Fetcher::fetch`] for a caller that waits at most `deadline` (gRPC's
    /// `grpc-timeout`): past it the caller gets [`Error::CallerDeadline`], while the shared
    /// resolution and download go on for the others.
    pub async fn fetch_within(
        &self,
        reference: &Reference,
        policy: PullPolicy,
        deadline: Option<Duration>,
    ) -> Result<Fetched> {
        self.fetch_expecting(reference, policy, deadline, None)
            .await
    }

    /// [`Fetcher::fetch_within`] of a module that must be `expected` (`expected_sha256`: the
    /// module's digest, or the digest the reference resolved to): anything else fails with
    /// [`Error::UnexpectedDigest`] and is not recorded under the reference.
    #[instrument(level = "debug", skip_all, fields(reference = %reference, ?policy, digest, cache_hit, stale, bytes))]
    pub async fn fetch_expecting(
        &self,
        reference: &Reference,
        policy: PullPolicy,
        deadline: Option<Duration>,
        expected: Option<&Digest>,
    ) -> Result<Fetched> {
        let started = Instant::now();
        let work = self.fetch_uninstrumented(reference, policy, expected);
        let result = match deadline {
            None => work.await,
            Some(deadline) => tokio::time::timeout(deadline, work)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::CallerDeadline {
                        reference: reference.to_string(),
                        deadline,
                    })
                }),
        };
        let result = result.map(|fetched| Fetched {
            signature: self.signature_status(&fetched),
            ..fetched
        });
        if let Ok(fetched) = &result {
            // Handed out by path: protected from eviction for `path_grace`.
            self.store.touch(&fetched.digest);
        }
        let span = Span::current();
        let (outcome, format) = match &result {
            Ok(fetched) if fetched.stale => ("stale", fetched.format.as_str()),
            Ok(fetched) if fetched.cache_hit => ("hit", fetched.format.as_str()),
            Ok(fetched) => ("download", fetched.format.as_str()),
            Err(_) => ("error", "unknown"),
        };
        self.metrics
            .fetch_done(outcome, format, started.elapsed().as_secs_f64());
        match &result {
            Ok(fetched) => {
                span.record("digest", tracing::field::display(&fetched.digest));
                span.record("cache_hit", fetched.cache_hit);
                span.record("stale", fetched.stale);
                span.record("bytes", fetched.size);
                debug!(
                    duration_us = started.elapsed().as_micros() as u64,
                    "fetched"
                );
            }
            Err(error) => {
                debug!(duration_us = started.elapsed().as_micros() as u64, error = %error_chain(error), "fetch failed");
            }
        }
        result
    }

    async fn fetch_uninstrumented(
        &self,
        reference: &Reference,
        policy: PullPolicy,
        expected: Option<&Digest>,
    ) -> Result<Fetched> {
        let name = reference.to_string();
        // The node's registry policy (`allowed_registries`, `blocked_registries`) covers
        // every way in, cached answers included.
        if !self.config.registry_allowed(reference.registry()) {
            return Err(Error::Denied {
                reference: name,
                registry: reference.registry().to_owned(),
            });
        }
        let is_tag = reference.digest().is_none();
        let cached = self.cached_answer(reference, &name)?;
        if let Some(fetched) = &cached {
            // A digest reference's answer never changes: another digest is final.
            if !is_tag {
                self.check_expected(&name, fetched, expected)?;
            }
        }
        let expected_ok =
            |fetched: &Fetched| expected.is_none_or(|e| url::matches_expected(fetched, e));
        let cached = match cached {
            Some(fetched)
                if self.fresh_enough(is_tag, policy, fetched.resolved_at)
                    && expected_ok(&fetched) =>
            {
                // Under an enforcing signature policy, nothing unverified is served.
                if self.unverified(reference, &fetched) {
                    self.check_signature(reference, &fetched.resolved_digest)
                        .await?;
                }
                return Ok(fetched);
            }
            other => other,
        };
        if policy == PullPolicy::Never {
            if let Some(fetched) = &cached {
                self.check_expected(&name, fetched, expected)?;
            }
            return Err(Error::NotCached { reference: name });
        }
        let key = match expected {
            Some(expected) => format!("{name}|{policy:?}|{expected}"),
            None => format!("{name}|{policy:?}"),
        };
        let (flight, joined) = self.resolutions.run(
            key,
            || {
                let this = self.clone();
                let reference = reference.clone();
                let expected = expected.cloned();
                async move { this.resolve(&reference, policy, expected.as_ref()).await }
            },
            {
                let name = name.clone();
                move || Error::TaskFailed { reference: name }
            },
        );
        if joined {
            self.metrics.joined();
        }
        // Only a tag has a last known answer that may stand in for a slow registry, and only
        // one an enforcing signature policy has a verdict for.
        let last_known = cached.filter(|fetched| {
            is_tag && !self.unverified(reference, fetched) && expected_ok(fetched)
        });
        let Some(last_known) = last_known else {
            return flight.await.map_err(Error::from_shared);
        };
        let stale_after = self.config.stale_after;
        match tokio::time::timeout(stale_after, flight).await {
            Ok(result) => result.map_err(Error::from_shared),
            Err(_) => {
                warn!(reference = %name, ?stale_after,
                      "registry slow to answer; serving the last known module while the refresh goes on");
                Ok(Fetched {
                    stale: true,
                    ..last_known
                })
            }
        }
    }

    /// The answer the cache holds for `reference`, whatever its age: the memo's when the
    /// index is unchanged since it was kept, else the index's.
    fn cached_answer(&self, reference: &Reference, name: &str) -> Result<Option<Fetched>> {
        let generation = self.answers_generation();
        if let Some(fetched) = self.memo.get(name, generation) {
            if self.store.has_blob(&fetched.digest) {
                return Ok(Some(fetched));
            }
        }
        let found = match reference.digest() {
            Some(digest) => self.store.lookup_manifest(name, digest, None),
            None => self.store.lookup_reference(name),
        }
        .map_err(|source| Error::Store {
            reference: name.to_owned(),
            source,
        })?;
        if let Some(fetched) = &found {
            self.memo.offer(name, generation, fetched);
        }
        Ok(found)
    }

    /// The cached answer, if the policy allows one without asking the registry.
    fn fresh_answer(
        &self,
        reference: &Reference,
        name: &str,
        policy: PullPolicy,
    ) -> Result<Option<Fetched>> {
        let is_tag = reference.digest().is_none();
        if is_tag && policy == PullPolicy::Always {
            return Ok(None);
        }
        let found = self.cached_answer(reference, name)?;
        Ok(found.filter(|fetched| self.fresh_enough(is_tag, policy, fetched.resolved_at)))
    }

    /// Whether a cached answer resolved at `resolved_at` may be given under `policy` without
    /// asking the registry: always for a digest reference; for a tag, never under `ALWAYS`
    /// and under `IF_NOT_PRESENT` only within `tag_ttl`.
    pub fn fresh_enough(&self, is_tag: bool, policy: PullPolicy, resolved_at: u64) -> bool {
        if !is_tag {
            return true;
        }
        let age = store::now().saturating_sub(resolved_at);
        match policy {
            PullPolicy::Always => false,
            PullPolicy::IfNotPresent => age < self.config.tag_ttl.as_secs(),
            PullPolicy::Never => true,
        }
    }

    /// Counts a warm hit that an API answered from its own memo without calling
    /// [`Fetcher::fetch`], and protects the module as a hit by `fetch` does.
    pub fn answered_from_memory(&self, digest: &Digest, format: &'static str, started: Instant) {
        self.store.touch(digest);
        self.metrics
            .fetch_done("hit", format, started.elapsed().as_secs_f64());
    }

    /// One resolution at the registry, shared by every caller waiting for `reference`,
    /// bounded by `fetch_timeout`; a transient failure falls back to the last known answer.
    async fn resolve(
        &self,
        reference: &Reference,
        policy: PullPolicy,
        expected: Option<&Digest>,
    ) -> Result<Fetched> {
        let name = reference.to_string();
        let expected_ok =
            |fetched: &Fetched| expected.is_none_or(|e| url::matches_expected(fetched, e));
        // A run that finished just before this one may have made the answer fresh.
        if let Some(fetched) = self.fresh_answer(reference, &name, policy)? {
            if expected_ok(&fetched) {
                return Ok(fetched);
            }
        }
        let fresh = policy == PullPolicy::Always;
        match self
            .within_fetch_timeout(reference, self.pull_checked(reference, fresh, expected))
            .await
        {
            Ok(fetched) => Ok(fetched),
            Err(error) if error.is_transient() => {
                let last_known = self.store.lookup_reference(&name).ok().flatten();
                let last_known = last_known
                    .filter(|fetched| !self.unverified(reference, fetched) && expected_ok(fetched));
                match last_known {
                    Some(fetched) => {
                        warn!(reference = %name, error = %error_chain(&error),
                              "registry failing; serving the last known module");
                        Ok(Fetched {
                            stale: true,
                            ..fetched
                        })
                    }
                    None => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }
}

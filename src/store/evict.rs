//! Keeping the cache within its [`Budget`]: access times (in memory, saved every
//! `gc_interval`), leases, and eviction by age and by size (least recently handed out first),
//! never taking pinned, leased or just-handed-out modules. Index entries go before files.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::index::{now, ModuleRecord};
use super::{Result, Store};
pub use crate::config::Budget;
use crate::digest::Digest;

impl Store {
    /// Records that `module` was just handed out (kept in memory, ordered exactly even within
    /// a millisecond; see `persist_access`).
    pub fn touch(&self, module: &Digest) {
        let sequence = self.inner.touches.fetch_add(1, Ordering::Relaxed);
        let stamp = (now_millis(), sequence);
        let mut access = self.inner.access.lock().expect("poisoned");
        // Every warm hit lands here: update in place rather than clone the key again.
        match access.get_mut(module) {
            Some(entry) => *entry = stamp,
            None => {
                access.insert(module.clone(), stamp);
            }
        }
    }

    /// Writes the in-memory access times into the module records.
    pub fn persist_access(&self) -> Result<()> {
        let access: Vec<(Digest, u64)> = self
            .inner
            .access
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(d, (millis, _))| (d.clone(), *millis))
            .collect();
        for (digest, millis) in access {
            self.index().set_last_access(&digest, millis / 1000)?;
        }
        self.index().flush()
    }

    /// When `module` was last handed out: Unix milliseconds, then the hand-out sequence
    /// (0 for times known only from the index), so sorting gives exact LRU order.
    fn last_access(&self, module: &Digest, record: &ModuleRecord) -> (u64, u64) {
        let recorded = (record.last_access * 1000, 0);
        let recent = self
            .inner
            .access
            .lock()
            .expect("poisoned")
            .get(module)
            .copied();
        recent.map_or(recorded, |recent| recent.max(recorded))
    }

    /// Protects `module` from eviction for `duration`; returns the lease.
    pub fn lease(&self, module: &Digest, duration: std::time::Duration) -> Lease {
        let lease = Lease {
            id: self.inner.next_lease.fetch_add(1, Ordering::Relaxed),
            module: module.clone(),
            expires: now() + duration.as_secs().max(1),
        };
        self.inner
            .leases
            .lock()
            .expect("poisoned")
            .insert(lease.id, lease.clone());
        lease
    }

    /// Ends a lease early; `false` if it did not exist or had expired.
    pub fn release(&self, id: u64) -> bool {
        let mut leases = self.inner.leases.lock().expect("poisoned");
        let now = now();
        leases.retain(|_, lease| lease.expires > now);
        leases.remove(&id).is_some()
    }

    /// Modules no eviction may take: pinned, leased, or handed out within `path_grace`.
    fn protected(&self, path_grace: std::time::Duration) -> Result<HashSet<Digest>> {
        let index = self.index();
        let now = now();
        let mut protected: HashSet<Digest> = self
            .inner
            .leases
            .lock()
            .expect("poisoned")
            .values()
            .filter(|lease| lease.expires > now)
            .map(|lease| lease.module.clone())
            .collect();
        for (reference, _) in index.pins()? {
            let module = index
                .reference(&reference)?
                .and_then(|r| index.manifest(&r.manifest_digest).ok().flatten())
                .map(|m| m.module_digest);
            protected.extend(module);
        }
        for (key, record) in index.modules()? {
            if let Ok(digest) = key.parse::<Digest>() {
                let since = now_millis().saturating_sub(self.last_access(&digest, &record).0);
                if u128::from(since) < path_grace.as_millis() {
                    protected.insert(digest);
                }
            }
        }
        Ok(protected)
    }

    /// Makes room for `incoming` bytes under the budget's high watermark: returns at once
    /// when there is room (the common case, cheap enough to run before every download),
    /// otherwise evicts by size as [`Store::evict`] does.
    pub fn make_room(&self, budget: &Budget, incoming: u64) -> Result<Vec<Evicted>> {
        if self.inner.bytes.load(Ordering::Relaxed) + incoming <= budget.high_mark() {
            return Ok(Vec::new());
        }
        self.evict(budget, incoming)
    }

    /// Evicts modules per `budget`, making room for `incoming` more bytes: unused modules
    /// older than `max_age` go; then, when usage plus `incoming` passes the high watermark,
    /// least recently used modules go until it is under the low watermark. Pinned, leased and
    /// recently handed-out modules are never taken. Index entries go before files.
    pub fn evict(&self, budget: &Budget, incoming: u64) -> Result<Vec<Evicted>> {
        let protected = self.protected(budget.path_grace)?;
        let now = now_millis();
        let mut candidates: Vec<((u64, u64), Digest, u64)> = self
            .index()
            .modules()?
            .into_iter()
            .filter_map(|(key, record)| {
                let digest = key.parse::<Digest>().ok()?;
                let last = self.last_access(&digest, &record);
                Some((last, digest, record.size))
            })
            .collect();
        let mut total: u64 = candidates.iter().map(|(_, _, size)| size).sum();
        candidates.retain(|(_, digest, _)| !protected.contains(digest));
        candidates.sort();
        let mut evicted = Vec::new();
        let high = budget.high_mark();
        let low = budget.low_mark();
        let over = total + incoming > high;
        for (last, digest, size) in candidates {
            let reason = if u128::from(now.saturating_sub(last.0)) > budget.max_age.as_millis() {
                EvictionReason::Age
            } else if over && total + incoming > low {
                EvictionReason::Size
            } else {
                continue;
            };
            total -= size;
            evicted.push(Evicted {
                digest,
                size,
                reason,
            });
        }
        // Index entries first (one pass, one flush), then the files.
        let victims: HashSet<Digest> = evicted.iter().map(|e| e.digest.clone()).collect();
        self.purge_entries(&victims)?;
        let mut access = self.inner.access.lock().expect("poisoned");
        for module in &evicted {
            access.remove(&module.digest);
        }
        drop(access);
        for module in &evicted {
            self.delete_blob(&module.digest)?;
            tracing::info!(digest = %module.digest, size = module.size, reason = ?module.reason, "evicted");
        }
        Ok(evicted)
    }
}

/// Why a module was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvictionReason {
    /// The cache passed its high watermark.
    Size,
    /// Unused for longer than `max_age`.
    Age,
}

impl EvictionReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::Size => "size",
            EvictionReason::Age => "age",
        }
    }
}

/// One evicted module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Evicted {
    /// The module.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Why.
    pub reason: EvictionReason,
}

/// A protection of one module from eviction until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Identifier to release it with.
    pub id: u64,
    /// The module.
    pub module: Digest,
    /// Unix time (seconds) it ends.
    pub expires: u64,
}

/// Current Unix time in milliseconds.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

//! The memory that documents being read may hold at once, across every registry, mirror and
//! peer (`limits.max_manifest_bytes_in_flight`).
//!
//! Each document is bounded by `limits.max_manifest_bytes`, but many resolutions run at once,
//! so a registry answering every manifest with an endless body could hold that limit once per
//! resolution. A read takes room for each chunk as it arrives, before buffering it, and fails
//! at once when there is none (never waiting, so no read waits on another): readers that
//! trickle hold what they sent, readers that stream fast reach their own limit and let go, and
//! what all of them hold stays within the budget whatever their number.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Room for documents being read; cheap to clone (one budget shared by every clone).
#[derive(Debug, Clone)]
pub struct DocumentBudget {
    room: Arc<Semaphore>,
    total: u64,
}

/// The room one read holds; given back when dropped.
#[derive(Debug)]
pub struct Reserved {
    budget: DocumentBudget,
    held: Option<OwnedSemaphorePermit>,
}

/// No room was left for a document's next chunk.
#[derive(Debug, thiserror::Error)]
#[error("documents being read hold {total} bytes, the limit (limits.max_manifest_bytes_in_flight)")]
pub struct NoRoom {
    /// The budget.
    pub total: u64,
}

impl DocumentBudget {
    /// A budget of `total` bytes (at most `u32::MAX`; the configuration checks it).
    pub fn new(total: u64) -> DocumentBudget {
        DocumentBudget {
            room: Arc::new(Semaphore::new(total.min(u64::from(u32::MAX)) as usize)),
            total,
        }
    }

    /// A read that holds nothing yet.
    pub fn reader(&self) -> Reserved {
        Reserved {
            budget: self.clone(),
            held: None,
        }
    }
}

impl Reserved {
    /// Takes room for `bytes` more, or fails at once when the budget has none.
    pub fn grow(&mut self, bytes: usize) -> Result<(), NoRoom> {
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
        let more = (self.budget.room.clone())
            .try_acquire_many_owned(permits)
            .map_err(|_| NoRoom {
                total: self.budget.total,
            })?;
        match &mut self.held {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hold_what_they_buffered_and_give_it_back() {
        let budget = DocumentBudget::new(100);
        let mut first = budget.reader();
        first.grow(60).unwrap();
        let mut second = budget.reader();
        second.grow(40).unwrap();
        let error = second.grow(1).unwrap_err();
        assert!(
            error.to_string().contains("max_manifest_bytes_in_flight"),
            "{error}"
        );
        drop(first);
        second.grow(50).unwrap();
        drop(second);
        assert_eq!(budget.room.available_permits(), 100);
    }
}

//! Warm-hit answers kept in memory, so that a hit does not read and decode the reference,
//! manifest and module records from the index every time.
//!
//! An answer is used only while the index is unchanged since the answer was read from it:
//! every index write bumps the index's generation, and an entry of another generation is a
//! miss. The caller still checks the blob file and the tag's age on every hit, so a memoised
//! answer is exactly what reading the index would have given.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Fetched;

/// Answers kept at most; past that the memo starts again empty (hot references come back
/// on their next hit). About 0.5 KiB each.
pub const MEMO_ENTRIES: usize = 1024;

/// Normalised reference → (index generation, the answer built from it).
#[derive(Debug, Default)]
pub struct AnswerMemo {
    entries: Mutex<HashMap<String, (u64, Fetched)>>,
}

impl AnswerMemo {
    /// The answer for `name` if it was read from the index at `generation`.
    pub fn get(&self, name: &str, generation: u64) -> Option<Fetched> {
        let entries = self.entries.lock().expect("answer memo poisoned");
        match entries.get(name) {
            Some((read_at, fetched)) if *read_at == generation => Some(fetched.clone()),
            _ => None,
        }
    }

    /// Keeps `fetched`, read from the index at `generation`, as the answer for its reference.
    pub fn insert(&self, generation: u64, fetched: &Fetched) {
        let mut entries = self.entries.lock().expect("answer memo poisoned");
        if entries.len() >= MEMO_ENTRIES && !entries.contains_key(&fetched.reference) {
            entries.retain(|_, (read_at, _)| *read_at == generation);
            if entries.len() >= MEMO_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(fetched.reference.clone(), (generation, fetched.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::format::Format;

    fn answer(reference: &str) -> Fetched {
        Fetched {
            reference: reference.to_owned(),
            manifest_digest: Digest::of(b"manifest"),
            index_digest: None,
            digest: Digest::of(reference.as_bytes()),
            size: 8,
            format: Format::CncfWasm,
            path: "/cache/blobs/sha256/x".into(),
            cache_hit: true,
            stale: false,
            resolved_at: 7,
            wasme: None,
        }
    }

    #[test]
    fn an_answer_is_kept_only_for_its_generation() {
        let memo = AnswerMemo::default();
        memo.insert(3, &answer("r.example/a:v1"));
        let kept = memo.get("r.example/a:v1", 3).expect("same generation");
        assert_eq!(kept.digest, Digest::of(b"r.example/a:v1"));
        assert_eq!(kept.resolved_at, 7);
        assert!(
            memo.get("r.example/a:v1", 4).is_none(),
            "index changed since"
        );
        assert!(memo.get("r.example/b:v1", 3).is_none());
    }

    #[test]
    fn a_full_memo_drops_old_generations_first_then_starts_again() {
        let memo = AnswerMemo::default();
        for i in 0..MEMO_ENTRIES - 1 {
            memo.insert(1, &answer(&format!("r.example/old:{i}")));
        }
        memo.insert(2, &answer("r.example/new:0"));
        memo.insert(2, &answer("r.example/new:1"));
        assert!(
            memo.get("r.example/new:0", 2).is_some(),
            "current ones stay"
        );
        assert!(memo.get("r.example/new:1", 2).is_some());
        assert_eq!(memo.entries.lock().unwrap().len(), 2, "stale ones went");
        for i in 0..MEMO_ENTRIES + 1 {
            memo.insert(2, &answer(&format!("r.example/more:{i}")));
        }
        assert!(memo.entries.lock().unwrap().len() <= MEMO_ENTRIES);
    }
}

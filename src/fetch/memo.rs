//! Warm-hit answers kept in memory, so that a hit does not read and decode the reference,
//! manifest and module records from the index every time.
//!
//! An answer is used only while the index is unchanged since the answer was read from it:
//! every index write bumps the index's generation, and an entry of another generation is a
//! miss. Callers still check the blob file and the tag's age on every hit
//! ([`super::Fetcher::fresh_enough`]), so a memoised answer is exactly what reading the index
//! would have given. The fetcher keeps one by normalised reference; the gRPC API keeps its
//! encoded answers by the text clients send.
//!
//! A key gets an entry the second time it is offered (the first time only its hash is
//! noted), so that a sweep over many references that are each asked for once leaves no
//! answers behind, nor the scattered allocations that would keep the heap from shrinking.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// Answers kept at most per memo; past that a memo starts again empty (hot references come
/// back on their next hit). About 0.5 KiB each.
pub const MEMO_ENTRIES: usize = 1024;

/// Key → (index generation, the answer built from the index at that generation).
#[derive(Debug)]
pub struct AnswerMemo<T> {
    entries: Mutex<HashMap<String, (u64, T)>>,
    /// Hashes of keys offered once, not yet kept; at most [`MEMO_ENTRIES`] × 4.
    seen_once: Mutex<HashSet<u64>>,
}

impl<T> Default for AnswerMemo<T> {
    fn default() -> Self {
        AnswerMemo {
            entries: Mutex::default(),
            seen_once: Mutex::default(),
        }
    }
}

impl<T: Clone> AnswerMemo<T> {
    /// The answer for `key` if it was read from the index at `generation`.
    pub fn get(&self, key: &str, generation: u64) -> Option<T> {
        let entries = self.entries.lock().expect("answer memo poisoned");
        match entries.get(key) {
            Some((read_at, answer)) if *read_at == generation => Some(answer.clone()),
            _ => None,
        }
    }

    /// Keeps `answer`, read from the index at `generation` (read *before* the records were),
    /// as the answer for `key`, if `key` was offered before.
    pub fn offer(&self, key: &str, generation: u64, answer: &T) {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let hash = hasher.finish();
        {
            let mut seen_once = self.seen_once.lock().expect("answer memo poisoned");
            if !seen_once.remove(&hash) {
                if seen_once.len() >= 4 * MEMO_ENTRIES {
                    seen_once.clear();
                }
                seen_once.insert(hash);
                return;
            }
        }
        self.insert(key, generation, answer);
    }

    /// Keeps `answer` for `key` now (see [`AnswerMemo::offer`]).
    fn insert(&self, key: &str, generation: u64, answer: &T) {
        let mut entries = self.entries.lock().expect("answer memo poisoned");
        if entries.len() >= MEMO_ENTRIES && !entries.contains_key(key) {
            entries.retain(|_, (read_at, _)| *read_at == generation);
            if entries.len() >= MEMO_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key.to_owned(), (generation, answer.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::fetch::Fetched;
    use crate::format::Format;

    fn answer(reference: &str) -> Fetched {
        Fetched {
            signature: None,
            reference: reference.to_owned(),
            manifest_digest: Digest::of(b"manifest"),
            index_digest: None,
            resolved_digest: Digest::of(b"manifest"),
            digest: Digest::of(reference.as_bytes()),
            size: 8,
            format: Format::CncfWasm,
            path: "/cache/blobs/sha256/x".into(),
            cache_hit: true,
            stale: false,
            resolved_at: 7,
            wasme: None,
            proxy_wasm_abi: Vec::new(),
        }
    }

    #[test]
    fn an_answer_is_kept_only_for_its_generation() {
        let memo = AnswerMemo::default();
        memo.insert("r.example/a:v1", 3, &answer("r.example/a:v1"));
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
        let insert = |generation, name: &str| memo.insert(name, generation, &answer(name));
        for i in 0..MEMO_ENTRIES - 1 {
            insert(1, &format!("r.example/old:{i}"));
        }
        insert(2, "r.example/new:0");
        insert(2, "r.example/new:1");
        assert!(
            memo.get("r.example/new:0", 2).is_some(),
            "current ones stay"
        );
        assert!(memo.get("r.example/new:1", 2).is_some());
        assert_eq!(memo.entries.lock().unwrap().len(), 2, "stale ones went");
        for i in 0..MEMO_ENTRIES + 1 {
            insert(2, &format!("r.example/more:{i}"));
        }
        assert!(memo.entries.lock().unwrap().len() <= MEMO_ENTRIES);
    }

    #[test]
    fn a_key_is_kept_the_second_time_it_is_offered() {
        let memo = AnswerMemo::default();
        memo.offer("r.example/a:v1", 1, &answer("r.example/a:v1"));
        assert!(memo.get("r.example/a:v1", 1).is_none(), "offered once");
        memo.offer("r.example/a:v1", 1, &answer("r.example/a:v1"));
        assert!(memo.get("r.example/a:v1", 1).is_some(), "offered twice");
        for i in 0..10 * MEMO_ENTRIES {
            let name = format!("r.example/sweep:{i}");
            memo.offer(&name, 1, &answer(&name));
        }
        assert_eq!(
            memo.entries.lock().unwrap().len(),
            1,
            "a sweep keeps nothing"
        );
        assert!(memo.seen_once.lock().unwrap().len() <= 4 * MEMO_ENTRIES);
    }
}

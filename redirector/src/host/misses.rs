//! What was looked for on the live system and not found, and when to look
//! again.

use std::{collections::HashMap, hash::Hash};

use super::netns::Pass;

/// The longest wait between two looks, in retry passes: `2^6`, about five
/// minutes at the default five-second resync, though a full pass comes
/// sooner.
const MAX_BACKOFF_SHIFT: u32 = 6;

/// Things not found: each is looked for again at the retry passes 1, 2, 4,
/// ... passes after its last miss (a cgroup that stays empty costs less and
/// less), and at once by a full pass or once its pod changed
/// ([`Misses::forget`]). A full pass starts the backoff over: a pod
/// cgroup made later than its entry is found within seconds of the full
/// pass, not minutes.
#[derive(Debug)]
pub struct Misses<K> {
    /// The retry pass each is looked for again at, and how often it was
    /// missed in a row.
    by_key: HashMap<K, (u64, u32), crate::types::FastHash>,
    /// Retry passes so far.
    retry_passes: u64,
}

impl<K> Default for Misses<K> {
    fn default() -> Self {
        Self {
            by_key: HashMap::default(),
            retry_passes: 0,
        }
    }
}

impl<K: Hash + Eq> Misses<K> {
    pub fn begin_pass(&mut self, pass: Pass) {
        match pass {
            Pass::Full => self.by_key.clear(),
            Pass::Retry => self.retry_passes += 1,
            Pass::Cached => {}
        }
    }

    /// Whether this pass takes `key` as still missing, without looking.
    pub fn skip(&self, key: &K) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|(due, _)| *due > self.retry_passes)
    }

    /// `key` was looked for and not found.
    pub fn missed(&mut self, key: K) {
        let (due, misses) = self.by_key.entry(key).or_insert((0, 0));
        *misses += 1;
        *due = self.retry_passes + (1 << (*misses - 1).min(MAX_BACKOFF_SHIFT));
    }

    /// `key` was found, or its pod changed: looked for at once next time.
    pub fn forget(&mut self, key: &K) {
        self.by_key.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retry passes (of the next `passes`) at which `key` is looked
    /// for, missing every time.
    fn looks(misses: &mut Misses<&'static str>, passes: u64) -> Vec<u64> {
        let mut at = Vec::new();
        for n in 1..=passes {
            misses.begin_pass(Pass::Retry);
            if !misses.skip(&"cg") {
                at.push(n);
                misses.missed("cg");
            }
            // Passes a source's change starts, in between, never look.
            misses.begin_pass(Pass::Cached);
            assert!(misses.skip(&"cg"));
        }
        at
    }

    #[test]
    fn a_thing_that_stays_missing_is_looked_for_ever_less_often() {
        let mut misses = Misses::default();
        misses.missed("cg");
        assert_eq!(looks(&mut misses, 40), vec![1, 3, 7, 15, 31]);
    }

    #[test]
    fn a_full_pass_or_a_changed_pod_looks_at_once() {
        let mut misses = Misses::default();
        for _ in 0..5 {
            misses.begin_pass(Pass::Retry);
            misses.missed("cg");
        }
        misses.begin_pass(Pass::Retry);
        assert!(misses.skip(&"cg"));
        misses.forget(&"cg");
        assert!(!misses.skip(&"cg"));
        misses.missed("cg");
        misses.begin_pass(Pass::Full);
        assert!(!misses.skip(&"cg"));
    }
}

//! Map entries claimed by owners (pods, ztunnels), kept so that one owner's
//! change touches only its own keys. Two owners may claim one key (two pods
//! on one cgroup, a ztunnel on a pod's cgroup, one address in two pods): the
//! greatest [`Owner`] wins, and when it lets go the next greatest takes
//! over, whatever order the claims came in.

use std::collections::BTreeMap;

/// Who claims an entry. Ztunnels outrank pods (a ztunnel's cgroup entry
/// wins over a pod's on the same cgroup); among pods, the one seen later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// A pod, by its slot (see [`super::desired::DesiredMaps`]): slots are
    /// handed out in the order pods are first seen.
    Pod(u32),
    /// The `n`th ztunnel of the node state.
    Ztunnel(u32),
}

/// The entries of one map, each with the owners that claim it.
#[derive(Debug)]
pub struct Claims<K, V> {
    /// The winning owner of each key (its value is in the effective map the
    /// caller passes in).
    winners: BTreeMap<K, Owner>,
    /// Claims that lost to a greater owner, kept for when it lets go.
    shadowed: BTreeMap<K, Vec<(Owner, V)>>,
}

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Self {
            winners: BTreeMap::new(),
            shadowed: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy, V: Copy + PartialEq> Claims<K, V> {
    /// `owner` claims `key` with `value`; `effective` is the map of
    /// winning values. Returns whether `effective` changed.
    pub fn claim(
        &mut self,
        effective: &mut BTreeMap<K, V>,
        key: K,
        owner: Owner,
        value: V,
    ) -> bool {
        match self.winners.get(&key).copied() {
            None => {
                self.winners.insert(key, owner);
                effective.insert(key, value);
                true
            }
            Some(winner) if winner == owner => effective.insert(key, value) != Some(value),
            Some(winner) if winner < owner => {
                let lost = effective.insert(key, value).expect("a winner has a value");
                self.winners.insert(key, owner);
                self.shadow(key, winner, lost);
                lost != value
            }
            Some(_) => {
                self.shadow(key, owner, value);
                false
            }
        }
    }

    fn shadow(&mut self, key: K, owner: Owner, value: V) {
        let lost = self.shadowed.entry(key).or_default();
        lost.retain(|(o, _)| *o != owner);
        lost.push((owner, value));
    }

    /// `owner` lets go of `key`. Returns whether `effective` changed.
    pub fn release(&mut self, effective: &mut BTreeMap<K, V>, key: K, owner: Owner) -> bool {
        if self.winners.get(&key) != Some(&owner) {
            if let Some(lost) = self.shadowed.get_mut(&key) {
                lost.retain(|(o, _)| *o != owner);
                if lost.is_empty() {
                    self.shadowed.remove(&key);
                }
            }
            return false;
        }
        let was = effective.remove(&key);
        let next = self.shadowed.get_mut(&key).and_then(|lost| {
            let best = (0..lost.len()).max_by_key(|&i| lost[i].0)?;
            Some(lost.swap_remove(best))
        });
        if self.shadowed.get(&key).is_some_and(Vec::is_empty) {
            self.shadowed.remove(&key);
        }
        match next {
            Some((owner, value)) => {
                self.winners.insert(key, owner);
                effective.insert(key, value);
                was != Some(value)
            }
            None => {
                self.winners.remove(&key);
                true
            }
        }
    }
}

/// A set several owners may hold a member of: the member stays while any
/// does.
#[derive(Debug)]
pub struct Counted<K> {
    holders: BTreeMap<K, u32>,
}

impl<K> Default for Counted<K> {
    fn default() -> Self {
        Self {
            holders: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> Counted<K> {
    /// One more holder of `key`; returns whether `effective` gained it.
    pub fn hold(&mut self, effective: &mut std::collections::BTreeSet<K>, key: K) -> bool {
        *self.holders.entry(key).or_default() += 1;
        effective.insert(key)
    }

    /// One holder fewer; returns whether `effective` lost it.
    pub fn release(&mut self, effective: &mut std::collections::BTreeSet<K>, key: K) -> bool {
        let Some(n) = self.holders.get_mut(&key) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.holders.remove(&key);
        effective.remove(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_greatest_owner_wins_whatever_the_order_and_the_next_takes_over() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut claims = Claims::default();
            let mut map = BTreeMap::new();
            for i in order {
                claims.claim(&mut map, 7u32, Owner::Pod(i), i * 10);
            }
            assert_eq!(map[&7], 20);
            claims.claim(&mut map, 7, Owner::Ztunnel(0), 99);
            assert_eq!(map[&7], 99);
            assert!(claims.release(&mut map, 7, Owner::Ztunnel(0)));
            assert_eq!(map[&7], 20);
            assert!(!claims.release(&mut map, 7, Owner::Pod(0)));
            assert!(claims.release(&mut map, 7, Owner::Pod(2)));
            assert_eq!(map[&7], 10);
            assert!(claims.release(&mut map, 7, Owner::Pod(1)));
            assert!(map.is_empty());
            assert!(claims.winners.is_empty() && claims.shadowed.is_empty());
        }
    }

    #[test]
    fn a_counted_member_stays_while_any_holder_does() {
        let mut set = std::collections::BTreeSet::new();
        let mut counted = Counted::default();
        assert!(counted.hold(&mut set, 3u64));
        assert!(!counted.hold(&mut set, 3));
        assert!(!counted.release(&mut set, 3));
        assert!(counted.release(&mut set, 3));
        assert!(set.is_empty());
        assert!(!counted.release(&mut set, 3));
    }
}

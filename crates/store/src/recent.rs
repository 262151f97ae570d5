//! [`Recent`]: a map of per-instance memories (audit heads, step mirrors, transition hints)
//! bounded by entry count, which forgets the least recently written first.
//!
//! A process remembers an instance it wrote so its next transition of it skips a read; most
//! instances are then moved on by other processes and never come back, so the memory must be
//! bounded, and what it forgets should be what is least likely to come back: the oldest. The
//! maps this replaced forgot everything at once (the next commit of every instance in flight
//! read its head again) or an arbitrary quarter (a hint written a millisecond ago as likely as
//! one written a minute ago).

use std::collections::HashMap;

/// Entries keyed by instance id, each stamped when last written ([`Recent::insert`],
/// [`Recent::touch`]). Past `capacity` the least recently written are dropped until three
/// quarters remain, except those the caller pins ([`Recent::trim`]). A trim scans the map
/// once and runs at most once per quarter of the capacity of writes, so the cost per write
/// stays constant.
#[derive(Debug)]
pub struct Recent<V> {
    map: HashMap<String, (u64, V)>,
    /// Stamps handed out so far; each write takes the next.
    clock: u64,
    capacity: usize,
}

impl<V> Recent<V> {
    /// An empty map that keeps at most `capacity` entries (at least 4) once trimmed.
    pub fn new(capacity: usize) -> Recent<V> {
        Recent {
            map: HashMap::new(),
            clock: 0,
            capacity: capacity.max(4),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.map.get(key).map(|(_, v)| v)
    }

    /// The entry to change in place; it keeps its stamp (see [`Recent::touch`]).
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.map.get_mut(key).map(|(_, v)| v)
    }

    /// `key`'s entry, inserted with `make` if missing (stamped as written now, not trimmed:
    /// the caller usually pins it, then trims).
    pub fn get_or_insert_with(&mut self, key: &str, make: impl FnOnce() -> V) -> &mut V {
        let stamp = self.next_stamp();
        &mut self
            .map
            .entry(key.to_string())
            .or_insert_with(|| (stamp, make()))
            .1
    }

    /// Insert or replace `key`'s entry as the most recently written, then trim (nothing
    /// pinned).
    pub fn insert(&mut self, key: String, value: V) {
        let stamp = self.next_stamp();
        self.map.insert(key, (stamp, value));
        self.trim(|_| false);
    }

    /// Mark `key`'s entry as written now.
    pub fn touch(&mut self, key: &str) {
        let stamp = self.next_stamp();
        if let Some(entry) = self.map.get_mut(key) {
            entry.0 = stamp;
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.map.remove(key).map(|(_, v)| v)
    }

    /// Past the capacity, drop the least recently written entries `pinned` does not hold
    /// until three quarters of the capacity remain (or only pinned ones do).
    pub fn trim(&mut self, pinned: impl Fn(&V) -> bool) {
        if self.map.len() <= self.capacity {
            return;
        }
        let excess = self.map.len() - self.capacity * 3 / 4;
        let mut stamps: Vec<u64> = self
            .map
            .values()
            .filter(|(_, v)| !pinned(v))
            .map(|(stamp, _)| *stamp)
            .collect();
        if stamps.is_empty() {
            return;
        }
        // Stamps are unique: dropping every unpinned entry stamped at or below the
        // excess-th smallest drops exactly `excess` of them (or all, when fewer).
        let nth = excess.min(stamps.len()) - 1;
        let (_, cutoff, _) = stamps.select_nth_unstable(nth);
        let cutoff = *cutoff;
        self.map
            .retain(|_, (stamp, v)| *stamp > cutoff || pinned(v));
    }

    fn next_stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<V>(recent: &Recent<V>) -> Vec<String> {
        let mut keys: Vec<String> = recent.map.keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn past_capacity_the_least_recently_written_go_first() {
        let mut recent = Recent::new(8);
        for i in 0..8 {
            recent.insert(format!("i{i}"), i);
        }
        // Rewriting i0 and touching i1 makes them recent again.
        recent.insert("i0".into(), 100);
        recent.touch("i1");
        assert_eq!(recent.len(), 8, "at capacity nothing is dropped");
        recent.insert("i8".into(), 8);
        // 9 > 8: down to 6, the three oldest writes (i2, i3, i4) gone.
        assert_eq!(
            keys(&recent),
            ["i0", "i1", "i5", "i6", "i7", "i8"].map(String::from)
        );
        assert_eq!(recent.get("i0"), Some(&100));
    }

    #[test]
    fn pinned_entries_stay_however_old() {
        let mut recent = Recent::new(4);
        for i in 0..4 {
            *recent.get_or_insert_with(&format!("i{i}"), || 0) = i;
        }
        recent.get_or_insert_with("i4", || 4);
        // 5 > 4, but i0 and i1 (values 0 and 1) are pinned: the two oldest unpinned go.
        recent.trim(|v| *v <= 1);
        assert_eq!(keys(&recent), ["i0", "i1", "i4"].map(String::from));
        // Everything pinned: nothing can go, and nothing breaks.
        for i in 5..10 {
            recent.get_or_insert_with(&format!("i{i}"), || 0);
        }
        recent.trim(|_| true);
        assert_eq!(recent.len(), 8);
    }

    #[test]
    fn get_mut_and_remove_keep_the_order_of_the_rest() {
        let mut recent = Recent::new(4);
        for i in 0..4 {
            recent.insert(format!("i{i}"), i);
        }
        if let Some(v) = recent.get_mut("i0") {
            *v = 10;
        }
        assert_eq!(recent.remove("i3"), Some(3));
        assert_eq!(recent.remove("i3"), None);
        recent.insert("i4".into(), 4);
        recent.insert("i5".into(), 5);
        // 5 > 4: down to 3. A change in place is not a write: i0 is still the oldest.
        assert_eq!(keys(&recent), ["i2", "i4", "i5"].map(String::from));
    }
}

//! Keeping maps keyed by entity bounded: which entries go once a map passes its limit (the
//! least recently used of those that may go), and giving the room back afterwards. A `HashMap`
//! keeps its capacity when entries leave, so without the second a map would stay as large as
//! the most entities it ever held: after a burst of distinct entities, its empty buckets
//! (hundreds of bytes each where the value is a controller) would stay.

use std::collections::HashMap;
use std::hash::Hash;

/// Below this capacity a map is not worth shrinking.
const SMALL: usize = 64;

/// The keys to evict from a map of `len` entries held to `limit`: none within it; beyond it,
/// the least recently used of `candidates` (the entries that may go, each with when it was
/// last used), as many as the excess but at least a hundredth of the limit, so that this
/// search, a pass over every candidate, runs once per limit/100 additions rather than on each.
pub(crate) fn least_recently_used<'a, K, T>(
    len: usize,
    limit: usize,
    candidates: impl Iterator<Item = (T, &'a K)>,
) -> Vec<K>
where
    K: Clone + 'a,
    T: Ord + Copy,
{
    let limit = limit.max(1);
    if len <= limit {
        return Vec::new();
    }
    let mut candidates: Vec<(T, &K)> = candidates.collect();
    let count = (len - limit).max(limit / 100).min(candidates.len());
    if count == 0 {
        return Vec::new();
    }
    candidates.select_nth_unstable_by_key(count - 1, |(at, _)| *at);
    candidates[..count]
        .iter()
        .map(|(_, key)| (*key).clone())
        .collect()
}

/// Shrinks `map` to twice its length when it uses less than a quarter of its capacity; the
/// halfway margin keeps a map that shrinks and grows again from rehashing on every change.
pub(crate) fn shrink_when_mostly_empty<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > SMALL && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_the_limit_nothing_goes_beyond_it_the_oldest_hundredth() {
        let keys: Vec<u32> = (0..201).collect();
        let used = || keys.iter().map(|k| (1000 - *k, k));
        assert!(least_recently_used(200, 200, used()).is_empty());
        let mut gone = least_recently_used(201, 200, used());
        gone.sort_unstable();
        assert_eq!(gone, vec![199, 200], "the two used longest ago");
        // Fewer that may go than the excess: all of them, and no more.
        assert_eq!(least_recently_used(300, 10, used().take(3)).len(), 3);
    }

    #[test]
    fn a_map_emptied_to_a_tenth_gives_its_room_back_and_a_full_one_keeps_it() {
        let mut map: HashMap<u32, [u8; 512]> = (0..10_000).map(|i| (i, [0; 512])).collect();
        let full = map.capacity();
        shrink_when_mostly_empty(&mut map);
        assert_eq!(map.capacity(), full, "a full map keeps its room");
        map.retain(|k, _| *k < 1_000);
        shrink_when_mostly_empty(&mut map);
        assert!(map.capacity() <= full / 4, "{} of {full}", map.capacity());
        assert!(map.capacity() >= 2_000);
    }
}

//! A `HashMap` keeps its capacity when entries leave, so a map keyed by entity would stay as
//! large as the most entities it ever held: after a burst of distinct entities passivates,
//! its empty buckets (hundreds of bytes each where the value is a controller) would stay.
//! Giving the room back once at most a quarter of it is used bounds such a map by the entities
//! present now; the halfway margin keeps a map that shrinks and grows again from rehashing on
//! every change.

use std::collections::HashMap;
use std::hash::Hash;

/// Below this capacity a map is not worth shrinking.
const SMALL: usize = 64;

/// Shrinks `map` to twice its length when it uses less than a quarter of its capacity.
pub(crate) fn shrink_when_mostly_empty<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > SMALL && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

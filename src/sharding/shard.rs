//! Which shard an entity belongs to: a stable hash of its id, modulo the number of shards. The
//! hash (xxh3) is fixed by its specification, so every node, build and Rust version agrees;
//! `DefaultHasher` makes no such promise.

use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::ids::EntityId;

/// A group of entities that move between nodes together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The shard of `entity` among `shards` (at least 1).
pub fn shard_of(entity: &EntityId, shards: u32) -> ShardId {
    let shards = u64::from(shards.max(1));
    // The remainder is below `shards`, which fits in u32.
    ShardId((xxh3_64(entity.as_str().as_bytes()) % shards) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_id_always_lands_in_the_same_shard() {
        // Fixed values: a change here would move every entity of a running cluster.
        let shards: Vec<u32> = ["product-1", "product-2", "a", ""]
            .iter()
            .map(|id| shard_of(&EntityId::new(*id), 50).0)
            .collect();
        assert_eq!(shards, vec![25, 48, 19, 38]);
    }

    #[test]
    fn ids_spread_over_all_shards() {
        let mut counts = [0u32; 50];
        for n in 0..5000 {
            counts[shard_of(&EntityId::new(format!("product-{n}")), 50).0 as usize] += 1;
        }
        assert!(counts.iter().all(|c| (50..=150).contains(c)), "{counts:?}");
    }
}

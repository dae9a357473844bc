//! Records in this process: they survive an entity's passivation and restart on this node,
//! not the node.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use crate::entity::store::{Appended, Claim, EntityStore, StoreError};
use crate::ids::EntityId;

#[derive(Default)]
struct Records {
    epoch: u64,
    keys: HashSet<String>,
    records: Vec<Vec<u8>>,
}

/// An [`EntityStore`] in memory.
#[derive(Default)]
pub struct MemoryEntityStore {
    entities: Mutex<HashMap<EntityId, Records>>,
}

#[async_trait]
impl EntityStore for MemoryEntityStore {
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
        let mut entities = self.entities.lock().unwrap_or_else(PoisonError::into_inner);
        let records = entities.entry(entity.clone()).or_default();
        records.epoch += 1;
        Ok(Claim::new(entity.clone(), records.epoch))
    }

    async fn load(&self, entity: &EntityId) -> Result<Vec<Vec<u8>>, StoreError> {
        let entities = self.entities.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(entities
            .get(entity)
            .map(|r| r.records.clone())
            .unwrap_or_default())
    }

    async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let mut entities = self.entities.lock().unwrap_or_else(PoisonError::into_inner);
        let records = entities.entry(claim.entity().clone()).or_default();
        if records.epoch != claim.epoch() {
            return Err(StoreError::Fenced {
                entity: claim.entity().clone(),
                epoch: claim.epoch(),
            });
        }
        if !records.keys.insert(key.to_owned()) {
            return Ok(Appended::Duplicate);
        }
        records.records.push(record.to_vec());
        Ok(Appended::New)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_once_per_key_and_loads_in_order() {
        let store = MemoryEntityStore::default();
        let a = store.claim(&EntityId::new("a")).await.unwrap();
        let b = store.claim(&EntityId::new("b")).await.unwrap();
        assert_eq!(store.append(&a, "k1", b"one").await.unwrap(), Appended::New);
        assert_eq!(store.append(&a, "k2", b"two").await.unwrap(), Appended::New);
        assert_eq!(
            store.append(&a, "k1", b"again").await.unwrap(),
            Appended::Duplicate
        );
        assert_eq!(store.append(&b, "k1", b"b").await.unwrap(), Appended::New);
        assert_eq!(
            store.load(a.entity()).await.unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        assert!(store.load(&EntityId::new("c")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_stale_claim_cannot_append() {
        let store = MemoryEntityStore::default();
        let old = store.claim(&EntityId::new("a")).await.unwrap();
        let new = store.claim(&EntityId::new("a")).await.unwrap();
        assert!(new.epoch() > old.epoch());
        let refused = store.append(&old, "k1", b"stale").await.unwrap_err();
        assert!(refused.is_fenced(), "{refused}");
        assert_eq!(
            store.append(&new, "k1", b"one").await.unwrap(),
            Appended::New
        );
        assert_eq!(
            store.load(new.entity()).await.unwrap(),
            vec![b"one".to_vec()]
        );
    }
}

//! Records in this process: they survive an entity's passivation and restart on this node,
//! not the node.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use crate::entity::EntityId;
use crate::entity::store::{Appended, EntityStore, StoreError};

#[derive(Default)]
struct Records {
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
    async fn load(&self, entity: &EntityId) -> Result<Vec<Vec<u8>>, StoreError> {
        let entities = self.entities.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(entities
            .get(entity)
            .map(|r| r.records.clone())
            .unwrap_or_default())
    }

    async fn append(
        &self,
        entity: &EntityId,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let mut entities = self.entities.lock().unwrap_or_else(PoisonError::into_inner);
        let records = entities.entry(entity.clone()).or_default();
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
        let (a, b) = (EntityId::new("a"), EntityId::new("b"));
        assert_eq!(store.append(&a, "k1", b"one").await.unwrap(), Appended::New);
        assert_eq!(store.append(&a, "k2", b"two").await.unwrap(), Appended::New);
        assert_eq!(
            store.append(&a, "k1", b"again").await.unwrap(),
            Appended::Duplicate
        );
        assert_eq!(store.append(&b, "k1", b"b").await.unwrap(), Appended::New);
        assert_eq!(
            store.load(&a).await.unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
        assert!(store.load(&EntityId::new("c")).await.unwrap().is_empty());
    }
}

//! Records in this process: they survive an entity's passivation and restart on this node,
//! not the node.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use crate::entity::store::{Appended, Claim, EntityStore, Record, Snapshot, StoreError};
use crate::ids::EntityId;

#[derive(Default)]
struct Records {
    epoch: u64,
    keys: HashSet<String>,
    /// A record's seq is its index.
    records: Vec<Vec<u8>>,
    snapshot: Option<Snapshot>,
}

/// An [`EntityStore`] in memory.
#[derive(Default)]
pub struct MemoryEntityStore {
    entities: Mutex<HashMap<EntityId, Records>>,
}

#[async_trait]
impl EntityStore for MemoryEntityStore {
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
        let mut entities = self.lock();
        let records = entities.entry(entity.clone()).or_default();
        records.epoch += 1;
        Ok(Claim::new(entity.clone(), records.epoch))
    }

    async fn records(
        &self,
        entity: &EntityId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let entities = self.lock();
        let Some(stored) = entities.get(entity) else {
            return Ok(Vec::new());
        };
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        Ok(stored
            .records
            .iter()
            .enumerate()
            .skip(from)
            .take(limit)
            .map(|(seq, data)| Record {
                seq: seq as u64,
                data: data.clone(),
            })
            .collect())
    }

    async fn latest_snapshot(&self, entity: &EntityId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.lock().get(entity).and_then(|r| r.snapshot.clone()))
    }

    async fn save_snapshot(&self, claim: &Claim, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut entities = self.lock();
        let stored = owned(&mut entities, claim)?;
        if stored
            .snapshot
            .as_ref()
            .is_none_or(|s| s.seq < snapshot.seq)
        {
            stored.snapshot = Some(snapshot.clone());
        }
        Ok(())
    }

    async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let mut entities = self.lock();
        let records = owned(&mut entities, claim)?;
        if !records.keys.insert(key.to_owned()) {
            return Ok(Appended::Duplicate);
        }
        records.records.push(record.to_vec());
        Ok(Appended::New {
            seq: records.records.len() as u64 - 1,
        })
    }
}

impl MemoryEntityStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EntityId, Records>> {
        self.entities.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The claimed entity's records, while the claim is its newest.
fn owned<'a>(
    entities: &'a mut HashMap<EntityId, Records>,
    claim: &Claim,
) -> Result<&'a mut Records, StoreError> {
    let records = entities.entry(claim.entity().clone()).or_default();
    if records.epoch != claim.epoch() {
        return Err(StoreError::Fenced {
            entity: claim.entity().clone(),
            epoch: claim.epoch(),
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_store_contract() {
        crate::testkit::store_contract::check(&MemoryEntityStore::default()).await;
    }

    #[tokio::test]
    async fn entities_are_kept_apart_and_a_stale_claim_cannot_append() {
        let store = MemoryEntityStore::default();
        let old = store.claim(&EntityId::new("a")).await.unwrap();
        let b = store.claim(&EntityId::new("b")).await.unwrap();
        let new = store.claim(&EntityId::new("a")).await.unwrap();
        assert!(new.epoch() > old.epoch());
        let refused = store.append(&old, "k1", b"stale").await.unwrap_err();
        assert!(refused.is_fenced(), "{refused}");
        assert!(store.append(&new, "k1", b"one").await.unwrap().is_new());
        assert!(store.append(&b, "k1", b"b").await.unwrap().is_new());
        let records = store.records(new.entity(), 0, 10).await.unwrap();
        assert_eq!(
            records,
            vec![Record {
                seq: 0,
                data: b"one".to_vec()
            }]
        );
    }
}

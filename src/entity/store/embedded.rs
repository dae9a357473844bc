//! Records in an embedded redb file on this node's disk, `<data_dir>/entities-<kind>.redb`:
//! what a single node needs to keep its entities' state and deduplication across a crash with
//! no database server. Four tables: each entity's epoch (`owners`), its records in append
//! order (`records`, keyed by entity and sequence number), the key of every record (`keys`,
//! which makes an append idempotent) and its newest snapshot (`snapshots`). A claim, a batch
//! of appends and a snapshot are each one durable write transaction, and redb has one writer
//! at a time, so a write checks its claim's epoch in the transaction that stores it: no stale
//! incarnation can write after a newer claim. Appends are group-committed like PostgreSQL's (one transaction, one fsync, per
//! batch). The file is not shared: nodes of a cluster need `postgres://`.
//!
//! redb is blocking; every call runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::entity::store::group_commit::{
    Append, BatchStore, GroupCommitSettings, LazyGroupCommit,
};
use crate::entity::store::{Appended, Claim, EntityStore, Record, Snapshot, StoreError};
use crate::ids::EntityId;

const OWNERS: TableDefinition<&str, u64> = TableDefinition::new("owners");
const RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("records");
const KEYS: TableDefinition<(&str, &str), u64> = TableDefinition::new("keys");
const SNAPSHOTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("snapshots");

/// Memory redb keeps pages of the file in. With its default (1 GiB) a node grew with the file,
/// that is with every order ever applied: 280 MiB over 900,000 orders to 100 products, 62 MiB
/// with 64 MiB, 6 MiB with this, at the same rate (products read only their newest snapshot
/// and the records after it; pages not cached come from the kernel's page cache).
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// One batch in flight (redb has one writer anyway); appends per batch at most.
const GROUP_COMMIT: GroupCommitSettings = GroupCommitSettings {
    writers: 1,
    max_batch: 512,
};

/// Calls (claims, loads, snapshots) on tokio's blocking pool at once, at most. Each entity
/// that starts claims and loads: unbounded, a burst of new entities ran one blocking thread
/// each (140 threads seen), every thread with its own stack and allocator cache, while redb
/// writes one transaction at a time anyway.
const BLOCKING_CALLS: usize = 4;

/// An [`EntityStore`] in a redb file; appends are group-committed.
pub struct EmbeddedEntityStore {
    file: Arc<File>,
    commits: LazyGroupCommit,
    /// Held by each call until its blocking work ends (not when its caller gives up).
    calls: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone)]
struct File {
    db: Arc<Database>,
}

/// A failure of the file is waited out (a full disk may be freed), not a message's failure.
fn failed(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(format!("embedded entity store: {}", error.into()))
}

impl EmbeddedEntityStore {
    /// Opens (or creates, with its folder) the store of entities of `kind` in `data_dir`.
    pub fn open(data_dir: &Path, kind: &str) -> Result<Self, StoreError> {
        let path: PathBuf = data_dir.join(format!("entities-{kind}.redb"));
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
                // redb locks the file: a second process on the same folder would otherwise share
                // products' records without sharing their claims.
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Query(format!(
                    "{} is in use by another process: give each node its own data_dir",
                    path.display()
                )),
                e => StoreError::Unavailable(format!("{}: {e}", path.display())),
            })?;
        let txn = db.begin_write().map_err(failed)?;
        txn.open_table(OWNERS).map_err(failed)?;
        txn.open_table(RECORDS).map_err(failed)?;
        txn.open_table(KEYS).map_err(failed)?;
        txn.open_table(SNAPSHOTS).map_err(failed)?;
        txn.commit().map_err(failed)?;
        let file = Arc::new(File { db: Arc::new(db) });
        Ok(EmbeddedEntityStore {
            commits: LazyGroupCommit::new(file.clone(), GROUP_COMMIT),
            file,
            calls: Arc::new(tokio::sync::Semaphore::new(BLOCKING_CALLS)),
        })
    }

    async fn blocking<R: Send + 'static>(
        &self,
        call: impl FnOnce(&File) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let stopped = |e: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("embedded entity store: {e}"))
        };
        let calls = Arc::clone(&self.calls);
        let permit = calls.acquire_owned().await.map_err(|e| stopped(&e))?;
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            call(&file)
        })
        .await
        .map_err(|e| stopped(&e))?
    }
}

impl File {
    fn claim(&self, entity: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(failed)?;
        let epoch = {
            let mut owners = txn.open_table(OWNERS).map_err(failed)?;
            let epoch = owners.get(entity).map_err(failed)?.map_or(0, |e| e.value()) + 1;
            owners.insert(entity, epoch).map_err(failed)?;
            epoch
        };
        txn.commit().map_err(failed)?;
        Ok(epoch)
    }

    fn records(&self, entity: &str, from: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(failed)?;
        let records = txn.open_table(RECORDS).map_err(failed)?;
        let range = records
            .range((entity, from)..=(entity, u64::MAX))
            .map_err(failed)?;
        range
            .take(limit)
            .map(|row| {
                row.map(|(seq, record)| Record {
                    seq: seq.value().1,
                    data: record.value().to_vec(),
                })
                .map_err(failed)
            })
            .collect()
    }

    fn latest_snapshot(&self, entity: &str) -> Result<Option<Snapshot>, StoreError> {
        let txn = self.db.begin_read().map_err(failed)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(failed)?;
        let snapshot = snapshots.get(entity).map_err(failed)?;
        Ok(snapshot.map(|row| {
            let (seq, data) = row.value();
            Snapshot {
                seq,
                data: data.to_vec(),
            }
        }))
    }

    /// Keeps `snapshot` unless a newer one is kept, in one durable transaction that checks
    /// the claim.
    fn save_snapshot(&self, claim: &Claim, snapshot: &Snapshot) -> Result<(), StoreError> {
        let entity = claim.entity().as_str();
        let txn = self.db.begin_write().map_err(failed)?;
        {
            let owners = txn.open_table(OWNERS).map_err(failed)?;
            if owners.get(entity).map_err(failed)?.map(|e| e.value()) != Some(claim.epoch()) {
                return Err(StoreError::Fenced {
                    entity: claim.entity().clone(),
                    epoch: claim.epoch(),
                });
            }
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(failed)?;
            let kept = snapshots.get(entity).map_err(failed)?.map(|s| s.value().0);
            if kept.is_none_or(|seq| seq < snapshot.seq) {
                snapshots
                    .insert(entity, (snapshot.seq, snapshot.data.as_slice()))
                    .map_err(failed)?;
            }
        }
        txn.commit().map_err(failed)
    }

    /// Stores what is new of `batch` in one durable transaction, each append under its claim.
    fn append_batch(
        &self,
        batch: &[Append],
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        let txn = self.db.begin_write().map_err(failed)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let owners = txn.open_table(OWNERS).map_err(failed)?;
            let mut records = txn.open_table(RECORDS).map_err(failed)?;
            let mut keys = txn.open_table(KEYS).map_err(failed)?;
            for append in batch {
                let entity = append.claim.entity().as_str();
                let epoch = owners.get(entity).map_err(failed)?.map(|e| e.value());
                if epoch != Some(append.claim.epoch()) {
                    outcomes.push(Err(StoreError::Fenced {
                        entity: append.claim.entity().clone(),
                        epoch: append.claim.epoch(),
                    }));
                    continue;
                }
                if keys
                    .get((entity, append.key.as_str()))
                    .map_err(failed)?
                    .is_some()
                {
                    outcomes.push(Ok(Appended::Duplicate));
                    continue;
                }
                let last = records
                    .range((entity, 0)..=(entity, u64::MAX))
                    .map_err(failed)?
                    .next_back()
                    .transpose()
                    .map_err(failed)?
                    .map(|(seq, _)| seq.value().1);
                let seq = last.map_or(0, |s| s + 1);
                records
                    .insert((entity, seq), append.record.as_slice())
                    .map_err(failed)?;
                keys.insert((entity, append.key.as_str()), seq)
                    .map_err(failed)?;
                outcomes.push(Ok(Appended::New { seq }));
            }
        }
        txn.commit().map_err(failed)?;
        Ok(outcomes)
    }
}

#[async_trait]
impl BatchStore for File {
    async fn append_batch(
        &self,
        batch: &[Append],
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        // A redb commit blocks (it waits for the disk): on the blocking pool.
        let (file, batch) = (self.clone(), batch.to_vec());
        tokio::task::spawn_blocking(move || File::append_batch(&file, &batch))
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded entity store: {e}")))?
    }
}

#[async_trait]
impl EntityStore for EmbeddedEntityStore {
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
        let id = entity.clone();
        let epoch = self.blocking(move |file| file.claim(id.as_str())).await?;
        Ok(Claim::new(entity.clone(), epoch))
    }

    async fn records(
        &self,
        entity: &EntityId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let id = entity.clone();
        self.blocking(move |file| file.records(id.as_str(), from, limit))
            .await
    }

    async fn latest_snapshot(&self, entity: &EntityId) -> Result<Option<Snapshot>, StoreError> {
        let id = entity.clone();
        self.blocking(move |file| file.latest_snapshot(id.as_str()))
            .await
    }

    async fn save_snapshot(&self, claim: &Claim, snapshot: &Snapshot) -> Result<(), StoreError> {
        let (claim, snapshot) = (claim.clone(), snapshot.clone());
        self.blocking(move |file| file.save_snapshot(&claim, &snapshot))
            .await
    }

    async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        self.commits.append(claim, key, record).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn folder() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "warren-embedded-store-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_the_store_contract() {
        let dir = folder();
        let store = EmbeddedEntityStore::open(&dir, "product").unwrap();
        crate::testkit::store_contract::check(&store).await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn data(records: Vec<Record>) -> Vec<Vec<u8>> {
        records.into_iter().map(|r| r.data).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_epochs_snapshots_and_keys_survive_reopening() {
        let dir = folder();
        let (a, b) = (EntityId::new("a"), EntityId::new("b"));
        {
            let store = EmbeddedEntityStore::open(&dir, "product").unwrap();
            let claim = store.claim(&a).await.unwrap();
            assert!(store.append(&claim, "k1", b"one").await.unwrap().is_new());
            let Appended::New { seq } = store.append(&claim, "k2", b"two").await.unwrap() else {
                panic!("k2 is new");
            };
            let snapshot = Snapshot {
                seq,
                data: b"after two".to_vec(),
            };
            store.save_snapshot(&claim, &snapshot).await.unwrap();
            assert!(store.append(&claim, "k3", b"three").await.unwrap().is_new());
            let b_claim = store.claim(&b).await.unwrap();
            assert!(store.append(&b_claim, "k1", b"b").await.unwrap().is_new());
        }
        // The dropped store's writer lets go of the file once it sees its queue closed.
        let reopened = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match EmbeddedEntityStore::open(&dir, "product") {
                    Ok(store) => return store,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        let store = reopened.await.expect("the file reopens");
        let all = store.records(&a, 0, usize::MAX).await.unwrap();
        assert_eq!(
            data(all),
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        let recovered = store.recover(&a).await.unwrap();
        assert_eq!(
            recovered.snapshot.map(|s| s.data),
            Some(b"after two".to_vec())
        );
        assert_eq!(data(recovered.records), [b"three".to_vec()]);
        let claim = store.claim(&a).await.unwrap();
        assert_eq!(claim.epoch(), 2, "the epoch survives too");
        assert_eq!(
            store.append(&claim, "k2", b"again").await.unwrap(),
            Appended::Duplicate,
            "deduplication survives a restart"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

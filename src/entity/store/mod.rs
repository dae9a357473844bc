//! Where entities keep what must survive a restart or a move to another node: an append-only
//! list of records per entity, each under a key that makes appending it again a no-op. That is
//! what deduplication needs across nodes and crashes: an order applied on a node that died is
//! recognised by its key wherever its entity starts next.
//!
//! **Fencing.** An incarnation [`EntityStore::claim`]s its entity before it loads, which bumps
//! the entity's epoch, and every append goes through that [`Claim`]: an append whose epoch is
//! no longer the entity's newest is refused ([`StoreError::Fenced`]) in the same statement that
//! would store it. So the newest incarnation, which loaded everything stored before it
//! claimed, is the only one that can write: a stale copy left running on the far side of a
//! partition cannot add to an entity's history behind the back of its new owner.
//!
//! **Snapshots.** An entity whose history grows long may save a snapshot of its state as of
//! one of its records ([`EntityStore::save_snapshot`], fenced like an append); recovery then
//! loads the newest snapshot and only the records after it ([`EntityStore::recover`]), as
//! Akka Persistence does, instead of every record since the entity began. Records are never
//! deleted: deduplication by key still covers the whole history, and
//! [`EntityStore::records`] reads it a page at a time.
//!
//! [`MemoryEntityStore`] keeps records in this process (tests, demos);
//! [`EmbeddedEntityStore`] in a file on this node's disk (one node, no server);
//! [`PostgresEntityStore`] in a shared database (what a multi-node cluster uses);
//! [`StoreMetrics::wrap`] times and counts the calls of either.

mod embedded;
mod group_commit;
mod memory;
mod metered;
mod postgres;

use async_trait::async_trait;

pub use embedded::EmbeddedEntityStore;
pub use memory::MemoryEntityStore;
pub use metered::StoreMetrics;
pub use postgres::PostgresEntityStore;

use crate::entity::EntityError;
use crate::ids::EntityId;

/// Whether [`EntityStore::append`] stored the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored now, at `seq` in its entity's history.
    New {
        /// The record's place: greater than every earlier record's of the entity (not
        /// necessarily the next number: a shared database numbers all entities together).
        seq: u64,
    },
    /// The entity already had a record under this key; nothing changed.
    Duplicate,
}

impl Appended {
    /// True for [`Appended::New`].
    pub fn is_new(&self) -> bool {
        matches!(self, Appended::New { .. })
    }
}

/// One stored record and its place in its entity's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its place, as [`Appended::New`] said.
    pub seq: u64,
    /// What was appended.
    pub data: Vec<u8>,
}

/// An entity's state as of one of its records: recovery starts from it and applies only the
/// records after `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The last record the state includes.
    pub seq: u64,
    /// The state, in the entity's own encoding.
    pub data: Vec<u8>,
}

/// What an entity starts from: its newest snapshot, if it saved one, and every record after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The newest snapshot.
    pub snapshot: Option<Snapshot>,
    /// The records after the snapshot (all of them without one), in append order.
    pub records: Vec<Record>,
}

/// One incarnation's right to append to one entity, until a newer incarnation claims it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    entity: EntityId,
    epoch: u64,
}

impl Claim {
    /// The claim on `entity` at `epoch` (stores hand these out).
    pub fn new(entity: EntityId, epoch: u64) -> Self {
        Claim { entity, epoch }
    }

    /// The entity claimed.
    pub fn entity(&self) -> &EntityId {
        &self.entity
    }

    /// Its epoch: how many claims the entity has seen, this one included.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Why the store did not answer; nothing was half-written either way.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot serve now (connection lost, shutting down,
    /// overloaded); worth retrying for as long as it lasts.
    #[error("entity store unavailable: {0}")]
    Unavailable(String),
    /// The database refused or failed the statement itself.
    #[error("entity store query failed: {0}")]
    Query(String),
    /// A newer incarnation of the entity has claimed it since this claim: nothing was stored,
    /// and the incarnation holding this claim must stop (its state may be stale).
    #[error("entity {entity} was claimed by a newer incarnation; epoch {epoch} may not write")]
    Fenced {
        /// The entity.
        entity: EntityId,
        /// The stale claim's epoch.
        epoch: u64,
    },
}

impl StoreError {
    /// True when waiting may help.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// True for [`StoreError::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }
}

/// What a store failure means for the message being handled: a store that cannot answer now
/// is waited out, a stale claim stops this incarnation (fencing), anything else is the
/// message's failure. With it, `?` on a store call inside [`crate::entity::Entity::handle`] is
/// right by default: mapping a fence to a plain error would retry it and dead-letter a message
/// that belongs to the entity's newer incarnation.
impl From<StoreError> for EntityError {
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() {
            EntityError::unavailable(error.to_string())
        } else if error.is_fenced() {
            EntityError::fenced(error.to_string())
        } else {
            EntityError::new(error.to_string())
        }
    }
}

/// Per-entity append-only records with idempotency keys, fenced by claims.
#[async_trait]
pub trait EntityStore: Send + Sync + 'static {
    /// Claims `entity` for a new incarnation: every older claim can no longer append. Call it
    /// before [`Self::recover`] (or any read), so it sees everything older claims stored.
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError>;

    /// Up to `limit` records of `entity` from `from` on (`seq >= from`), in append order: a
    /// page of its history (the next page starts after the last `seq`).
    async fn records(
        &self,
        entity: &EntityId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;

    /// Appends `record` under `key` to the claimed entity, unless it has a record under `key`
    /// already; refused with [`StoreError::Fenced`] once a newer claim exists. Await each
    /// append of an entity before the next: `seq` follows the order appends are made in only
    /// then (PostgreSQL numbers rows as they are inserted, not as they commit).
    async fn append(&self, claim: &Claim, key: &str, record: &[u8])
    -> Result<Appended, StoreError>;

    /// The entity's newest snapshot, if it saved one.
    async fn latest_snapshot(&self, entity: &EntityId) -> Result<Option<Snapshot>, StoreError>;

    /// Keeps `snapshot` as the claimed entity's newest, unless it has a newer one already
    /// (only the newest is kept); refused with [`StoreError::Fenced`] once a newer claim
    /// exists, so a stale incarnation cannot leave its state for the next one to start from.
    async fn save_snapshot(&self, claim: &Claim, snapshot: &Snapshot) -> Result<(), StoreError>;

    /// What `entity` starts from: its newest snapshot and the records after it. Call it after
    /// [`Self::claim`], like any load: nothing can then be stored behind it.
    async fn recover(&self, entity: &EntityId) -> Result<Recovery, StoreError> {
        let snapshot = self.latest_snapshot(entity).await?;
        let from = snapshot.as_ref().map_or(0, |s| s.seq.saturating_add(1));
        let records = self.records(entity, from, usize::MAX).await?;
        Ok(Recovery { snapshot, records })
    }
}

/// Which store to use: `memory`, `embedded` or a `postgres://` URL (the `--entity-store`
/// value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// In this process.
    Memory,
    /// A file in this folder (the data directory).
    Embedded(std::path::PathBuf),
    /// A PostgreSQL database.
    Postgres(String),
}

/// The data directory unless one is set: `warren-data` in the working directory.
pub const DEFAULT_DATA_DIR: &str = "warren-data";

impl StoreLocation {
    /// Parses `memory`, `embedded` (in [`DEFAULT_DATA_DIR`] until [`Self::in_data_dir`]) or a
    /// `postgres://` / `postgresql://` URL.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "memory" {
            Ok(StoreLocation::Memory)
        } else if text == "embedded" {
            Ok(StoreLocation::Embedded(DEFAULT_DATA_DIR.into()))
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            postgres::check_url(text)?;
            Ok(StoreLocation::Postgres(text.to_owned()))
        } else {
            Err("must be \"embedded\", \"memory\" or a postgres:// URL".to_owned())
        }
    }

    /// An embedded store in `dir` instead; other locations as they are.
    pub fn in_data_dir(self, dir: &std::path::Path) -> Self {
        match self {
            StoreLocation::Embedded(_) => StoreLocation::Embedded(dir.to_owned()),
            other => other,
        }
    }

    /// True for the stores that every node of a cluster can share (only a database server).
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }

    /// Opens the store for entities of `kind` (records of other kinds are not seen).
    pub fn open(&self, kind: &str) -> Result<std::sync::Arc<dyn EntityStore>, StoreError> {
        Ok(match self {
            StoreLocation::Memory => std::sync::Arc::new(MemoryEntityStore::default()),
            StoreLocation::Embedded(dir) => {
                std::sync::Arc::new(EmbeddedEntityStore::open(dir, kind)?)
            }
            StoreLocation::Postgres(url) => {
                std::sync::Arc::new(PostgresEntityStore::new(url, kind)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_is_memory_or_a_postgres_url() {
        assert_eq!(StoreLocation::parse("memory"), Ok(StoreLocation::Memory));
        assert!(matches!(
            StoreLocation::parse("postgres://u:p@127.0.0.1:5432/db"),
            Ok(StoreLocation::Postgres(_))
        ));
        assert_eq!(
            StoreLocation::parse("embedded").map(|l| l.in_data_dir("/var/lib/w".as_ref())),
            Ok(StoreLocation::Embedded("/var/lib/w".into()))
        );
        assert!(StoreLocation::parse("redis://x").is_err());
        assert!(StoreLocation::parse("postgres://u:p@127.0.0.1:notaport/db").is_err());
    }

    #[test]
    fn a_fenced_or_unavailable_store_keeps_its_meaning_for_the_entity() {
        let fenced = StoreError::Fenced {
            entity: EntityId::new("p"),
            epoch: 3,
        };
        assert!(EntityError::from(fenced).is_fenced());
        assert!(EntityError::from(StoreError::Unavailable("down".into())).is_unavailable());
        let failed = EntityError::from(StoreError::Query("bad".into()));
        assert!(!failed.is_fenced() && !failed.is_unavailable() && !failed.is_rejected());
    }
}

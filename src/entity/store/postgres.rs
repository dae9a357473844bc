//! Records in a PostgreSQL database shared by every node: one table,
//! `warren_entity_records (kind, entity_id, key, seq, record)`, whose primary key
//! `(kind, entity_id, key)` makes an append idempotent in one statement
//! (`INSERT … ON CONFLICT DO NOTHING`), and whose `seq` keeps the append order. A second table,
//! `warren_entity_owners (kind, entity_id, epoch)`, fences appends: a claim bumps the epoch,
//! and an append stores only while its epoch is the row's, checked in the same statement under
//! a share lock on the row — so a claim waits for appends in flight and every later stale
//! append sees the new epoch. A third, `warren_entity_snapshots (kind, entity_id, seq,
//! snapshot)`, keeps each entity's newest snapshot, saved under the same fence. The tables
//! are created on first use, under an advisory lock so that nodes starting together do not
//! race.
//!
//! `seq` is one sequence for every entity, drawn when a row is inserted, so it follows an
//! entity's append order only because no two of its appends are in flight at once: its one
//! incarnation awaits each append, and a new claim waits for the old one's appends in
//! flight. Appends of one entity made without waiting could commit a later `seq` before an
//! earlier one, and a snapshot or a page ending between them would skip the earlier record.
//!
//! Appends are group-committed: the node's entities' appends that wait together go in one
//! multi-row statement, one round trip and one commit, each row still fenced and idempotent
//! on its own (see `group_commit`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::OnceCell;

use crate::entity::store::group_commit::{
    Append, BatchStore, GroupCommitSettings, LazyGroupCommit,
};
use crate::entity::store::{Appended, Claim, EntityStore, Record, Snapshot, StoreError};
use crate::ids::EntityId;
use crate::postgres::{PostgresTarget, link_failure};

/// Connections per node; entities wait for one when all are busy.
const POOL_SIZE: usize = 8;

/// Longest wait for a connection, new or pooled.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Any constant shared by every node: the key of the schema lock.
const SCHEMA_LOCK: i64 = 0x7761_7272_656e;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS warren_entity_records (
        kind text NOT NULL,
        entity_id text NOT NULL,
        key text NOT NULL,
        seq bigserial NOT NULL,
        record bytea NOT NULL,
        stored_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, entity_id, key)
    );
    CREATE INDEX IF NOT EXISTS warren_entity_records_by_seq
        ON warren_entity_records (kind, entity_id, seq);
    CREATE TABLE IF NOT EXISTS warren_entity_owners (
        kind text NOT NULL,
        entity_id text NOT NULL,
        epoch bigint NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, entity_id)
    );
    CREATE TABLE IF NOT EXISTS warren_entity_snapshots (
        kind text NOT NULL,
        entity_id text NOT NULL,
        seq bigint NOT NULL,
        snapshot bytea NOT NULL,
        saved_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, entity_id)
    );";

/// Keeps a snapshot unless a newer one is kept, only while the claim holds (checked as an
/// append checks it); answers whether it held.
const SAVE_SNAPSHOT: &str = "
    WITH owned AS (
        SELECT 1 FROM warren_entity_owners
        WHERE kind = $1 AND entity_id = $2 AND epoch = $3
        FOR SHARE
    ), saved AS (
        INSERT INTO warren_entity_snapshots (kind, entity_id, seq, snapshot)
        SELECT $1, $2, $4, $5 FROM owned
        ON CONFLICT (kind, entity_id) DO UPDATE
            SET seq = excluded.seq, snapshot = excluded.snapshot, saved_at = now()
            WHERE warren_entity_snapshots.seq < excluded.seq
    )
    SELECT EXISTS (SELECT 1 FROM owned)";

/// A new incarnation's claim: the entity's epoch, one higher than any before.
const CLAIM: &str = "
    INSERT INTO warren_entity_owners (kind, entity_id, epoch) VALUES ($1, $2, 1)
    ON CONFLICT (kind, entity_id)
    DO UPDATE SET epoch = warren_entity_owners.epoch + 1, claimed_at = now()
    RETURNING epoch";

/// Appends of many entities in one statement (group commit), each under its claim: one row per
/// append in input order (`ord`), saying whether its claim still holds and whether its record
/// is new. `FOR SHARE` makes a concurrent claim wait for this statement, and makes this
/// statement, if it comes second, re-read the owner row and see the newer epoch. Rows are
/// inserted in input order, so `seq` keeps it.
const APPEND_BATCH: &str = "
    WITH input AS (
        SELECT * FROM unnest($2::text[], $3::text[], $4::bytea[], $5::bigint[])
            WITH ORDINALITY AS i(entity_id, key, record, epoch, ord)
    ), owned AS (
        SELECT i.ord FROM input i
        JOIN warren_entity_owners o
            ON o.kind = $1 AND o.entity_id = i.entity_id AND o.epoch = i.epoch
        FOR SHARE OF o
    ), stored AS (
        INSERT INTO warren_entity_records (kind, entity_id, key, record)
        SELECT $1, i.entity_id, i.key, i.record FROM input i JOIN owned USING (ord)
        ORDER BY i.ord
        ON CONFLICT DO NOTHING
        RETURNING entity_id, key, seq
    )
    SELECT owned.ord IS NOT NULL, stored.seq
    FROM input i
    LEFT JOIN owned USING (ord)
    LEFT JOIN stored ON stored.entity_id = i.entity_id AND stored.key = i.key
    ORDER BY i.ord";

/// Group commit: one batch in flight at a time (while it commits, the next one gathers; three
/// writers split what waits into smaller batches and did no better, see the README's
/// figures), holding one pooled connection and leaving the rest to claims and loads; and
/// appends per batch at most.
const GROUP_COMMIT: GroupCommitSettings = GroupCommitSettings {
    writers: 1,
    max_batch: 512,
};

/// An [`EntityStore`] in PostgreSQL; appends are group-committed.
pub struct PostgresEntityStore {
    database: Arc<Database>,
    commits: LazyGroupCommit,
}

/// The connections, and the statements run on them.
struct Database {
    pool: Pool,
    /// The database, for errors that come before any statement (connecting, TLS).
    link: String,
    kind: String,
    schema: OnceCell<()>,
}

/// Checks that `url` is a usable connection string and its `sslrootcert` readable, without
/// connecting.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    PostgresTarget::parse(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl PostgresEntityStore {
    /// A store for entities of `kind` in the database at `url`; connects on first use.
    pub fn new(url: &str, kind: &str) -> Result<Self, StoreError> {
        let PostgresTarget {
            mut config,
            tls,
            link,
        } = PostgresTarget::parse(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("warren");
        }
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let database = Arc::new(Database {
            pool,
            link,
            kind: kind.to_owned(),
            schema: OnceCell::new(),
        });
        Ok(PostgresEntityStore {
            commits: LazyGroupCommit::new(database.clone(), GROUP_COMMIT),
            database,
        })
    }
}

impl Database {
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(link_failure(&self.link, &e)))?;
        self.schema
            .get_or_try_init(|| async {
                // Usually another node made it already; asking first keeps the server from
                // logging "already exists" notices on every start.
                let exists = client
                    .query_one(
                        "SELECT to_regclass('warren_entity_records') IS NOT NULL \
                         AND to_regclass('warren_entity_owners') IS NOT NULL \
                         AND to_regclass('warren_entity_snapshots') IS NOT NULL",
                        &[],
                    )
                    .await
                    .and_then(|row| row.try_get::<_, bool>(0))
                    .map_err(query_error)?;
                if exists {
                    return Ok(());
                }
                // A transaction, so that a failure rolls back (dropping it does) instead of
                // leaving a pooled connection inside an aborted one.
                let schema = client.transaction().await.map_err(query_error)?;
                let lock = format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK});");
                schema
                    .batch_execute(&format!("{lock} {SCHEMA}"))
                    .await
                    .map_err(query_error)?;
                schema.commit().await.map_err(query_error)
            })
            .await?;
        Ok(client)
    }
}

/// A lost connection or a server that is starting, stopping, overloaded or resolving a
/// conflict is unavailable (retry later); anything else is the statement's failure.
fn query_error(error: tokio_postgres::Error) -> StoreError {
    let transient = match error.code() {
        None => true,
        Some(state) => {
            // Classes 08 connection, 40 transaction rollback, 53 resources, 57 operator
            // intervention (shutdown, cancel).
            let class = &state.code()[..2];
            matches!(class, "08" | "40" | "53" | "57")
        }
    };
    if transient {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Query(error.to_string())
    }
}

/// A count or number as PostgreSQL's `bigint`; beyond its range, its largest (no epoch, seq or
/// page ever gets there).
fn bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl EntityStore for PostgresEntityStore {
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
        let database = &self.database;
        let client = database.client().await?;
        let statement = client.prepare_cached(CLAIM).await.map_err(query_error)?;
        let row = client
            .query_one(&statement, &[&database.kind, &entity.as_str()])
            .await
            .map_err(query_error)?;
        let epoch: i64 = row.try_get(0).map_err(query_error)?;
        Ok(Claim::new(entity.clone(), epoch.unsigned_abs()))
    }

    async fn records(
        &self,
        entity: &EntityId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let database = &self.database;
        let client = database.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT seq, record FROM warren_entity_records \
                 WHERE kind = $1 AND entity_id = $2 AND seq >= $3 ORDER BY seq LIMIT $4",
            )
            .await
            .map_err(query_error)?;
        let (from, limit) = (bigint(from), bigint(limit as u64));
        let rows = client
            .query(
                &statement,
                &[&database.kind, &entity.as_str(), &from, &limit],
            )
            .await
            .map_err(query_error)?;
        rows.iter()
            .map(|row| {
                Ok(Record {
                    seq: row
                        .try_get::<_, i64>(0)
                        .map_err(query_error)?
                        .unsigned_abs(),
                    data: row.try_get(1).map_err(query_error)?,
                })
            })
            .collect()
    }

    async fn latest_snapshot(&self, entity: &EntityId) -> Result<Option<Snapshot>, StoreError> {
        let database = &self.database;
        let client = database.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT seq, snapshot FROM warren_entity_snapshots \
                 WHERE kind = $1 AND entity_id = $2",
            )
            .await
            .map_err(query_error)?;
        let row = client
            .query_opt(&statement, &[&database.kind, &entity.as_str()])
            .await
            .map_err(query_error)?;
        row.map(|row| {
            Ok(Snapshot {
                seq: row
                    .try_get::<_, i64>(0)
                    .map_err(query_error)?
                    .unsigned_abs(),
                data: row.try_get(1).map_err(query_error)?,
            })
        })
        .transpose()
    }

    async fn save_snapshot(&self, claim: &Claim, snapshot: &Snapshot) -> Result<(), StoreError> {
        let database = &self.database;
        let client = database.client().await?;
        let statement = client
            .prepare_cached(SAVE_SNAPSHOT)
            .await
            .map_err(query_error)?;
        let (epoch, seq) = (bigint(claim.epoch()), bigint(snapshot.seq));
        let row = client
            .query_one(
                &statement,
                &[
                    &database.kind,
                    &claim.entity().as_str(),
                    &epoch,
                    &seq,
                    &snapshot.data,
                ],
            )
            .await
            .map_err(query_error)?;
        if row.try_get::<_, bool>(0).map_err(query_error)? {
            Ok(())
        } else {
            Err(StoreError::Fenced {
                entity: claim.entity().clone(),
                epoch: claim.epoch(),
            })
        }
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

#[async_trait]
impl BatchStore for Database {
    async fn append_batch(
        &self,
        batch: &[Append],
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(APPEND_BATCH)
            .await
            .map_err(query_error)?;
        let entities: Vec<&str> = batch.iter().map(|a| a.claim.entity().as_str()).collect();
        let keys: Vec<&str> = batch.iter().map(|a| a.key.as_str()).collect();
        let records: Vec<&[u8]> = batch.iter().map(|a| a.record.as_slice()).collect();
        let epochs: Vec<i64> = batch.iter().map(|a| bigint(a.claim.epoch())).collect();
        let rows = client
            .query(
                &statement,
                &[&self.kind, &entities, &keys, &records, &epochs],
            )
            .await
            .map_err(query_error)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for (append, row) in batch.iter().zip(&rows) {
            let owned: bool = row.try_get(0).map_err(query_error)?;
            let stored: Option<i64> = row.try_get(1).map_err(query_error)?;
            outcomes.push(match (owned, stored) {
                (false, _) => Err(StoreError::Fenced {
                    entity: append.claim.entity().clone(),
                    epoch: append.claim.epoch(),
                }),
                (true, Some(seq)) => Ok(Appended::New {
                    seq: seq.unsigned_abs(),
                }),
                (true, None) => Ok(Appended::Duplicate),
            });
        }
        Ok(outcomes)
    }
}

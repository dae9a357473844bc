//! Records in a PostgreSQL database shared by every node: one table,
//! `warren_entity_records (kind, entity_id, key, seq, record)`, whose primary key
//! `(kind, entity_id, key)` makes an append idempotent in one statement
//! (`INSERT … ON CONFLICT DO NOTHING`), and whose `seq` keeps the append order. A second table,
//! `warren_entity_owners (kind, entity_id, epoch)`, fences appends: a claim bumps the epoch,
//! and an append stores only while its epoch is the row's, checked in the same statement under
//! a share lock on the row — so a claim waits for appends in flight and every later stale
//! append sees the new epoch. The tables are created on first use, under an advisory lock so
//! that nodes starting together do not race.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::OnceCell;

use crate::entity::store::{Appended, Claim, EntityStore, StoreError};
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
    );";

/// A new incarnation's claim: the entity's epoch, one higher than any before.
const CLAIM: &str = "
    INSERT INTO warren_entity_owners (kind, entity_id, epoch) VALUES ($1, $2, 1)
    ON CONFLICT (kind, entity_id)
    DO UPDATE SET epoch = warren_entity_owners.epoch + 1, claimed_at = now()
    RETURNING epoch";

/// An append under a claim: whether the claim still holds, and whether the record is new.
/// `FOR SHARE` makes a concurrent claim wait for this statement, and makes this statement,
/// if it comes second, re-read the row and see the newer epoch.
const APPEND: &str = "
    WITH owner AS (
        SELECT 1 FROM warren_entity_owners
        WHERE kind = $1 AND entity_id = $2 AND epoch = $5
        FOR SHARE
    ), stored AS (
        INSERT INTO warren_entity_records (kind, entity_id, key, record)
        SELECT $1, $2, $3, $4 FROM owner
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM owner), (SELECT count(*) FROM stored)";

/// An [`EntityStore`] in PostgreSQL.
pub struct PostgresEntityStore {
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
        Ok(PostgresEntityStore {
            pool,
            link,
            kind: kind.to_owned(),
            schema: OnceCell::new(),
        })
    }

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
                         AND to_regclass('warren_entity_owners') IS NOT NULL",
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

#[async_trait]
impl EntityStore for PostgresEntityStore {
    async fn claim(&self, entity: &EntityId) -> Result<Claim, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(CLAIM).await.map_err(query_error)?;
        let row = client
            .query_one(&statement, &[&self.kind, &entity.as_str()])
            .await
            .map_err(query_error)?;
        let epoch: i64 = row.try_get(0).map_err(query_error)?;
        Ok(Claim::new(entity.clone(), epoch.unsigned_abs()))
    }

    async fn load(&self, entity: &EntityId) -> Result<Vec<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT record FROM warren_entity_records \
                 WHERE kind = $1 AND entity_id = $2 ORDER BY seq",
            )
            .await
            .map_err(query_error)?;
        let rows = client
            .query(&statement, &[&self.kind, &entity.as_str()])
            .await
            .map_err(query_error)?;
        rows.iter()
            .map(|row| row.try_get::<_, Vec<u8>>(0).map_err(query_error))
            .collect()
    }

    async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(APPEND).await.map_err(query_error)?;
        let epoch = i64::try_from(claim.epoch()).unwrap_or(i64::MAX);
        let row = client
            .query_one(
                &statement,
                &[&self.kind, &claim.entity().as_str(), &key, &record, &epoch],
            )
            .await
            .map_err(query_error)?;
        let owned: i64 = row.try_get(0).map_err(query_error)?;
        let stored: i64 = row.try_get(1).map_err(query_error)?;
        match (owned, stored) {
            (0, _) => Err(StoreError::Fenced {
                entity: claim.entity().clone(),
                epoch: claim.epoch(),
            }),
            (_, 1) => Ok(Appended::New),
            _ => Ok(Appended::Duplicate),
        }
    }
}

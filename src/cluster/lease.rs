//! The lease the `lease-majority` downing strategy asks for: one row per cluster in the shared
//! PostgreSQL database (`warren_cluster_leases`), held by one side of a partition until it
//! expires (it is never released: a side that decides late must not get it while the
//! winners count on it). Taking it is one statement: insert, or take over a row that is
//! expired or already this holder's.

use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::postgres::{PostgresTarget, link_failure};

/// Why the lease could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The database did not answer or refused; nobody got the lease from this node.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

/// A lease that one holder at a time may take.
#[async_trait]
pub trait Lease: Send + Sync + 'static {
    /// Takes the lease for `holder` for `ttl`, if it is free, expired or `holder`'s already;
    /// `Ok(false)` when another holder has it.
    async fn acquire(&self, holder: &str, ttl: Duration) -> Result<bool, LeaseError>;
}

fn unavailable(error: impl std::fmt::Display) -> LeaseError {
    LeaseError::Unavailable(error.to_string())
}

/// How long one question to the database may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Under an advisory lock: nodes of one side ask at the same moment, and two concurrent
/// `CREATE TABLE IF NOT EXISTS` can fail.
const SCHEMA: &str = "
    BEGIN;
    SELECT pg_advisory_xact_lock(131279710497388);
    CREATE TABLE IF NOT EXISTS warren_cluster_leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        expires_at timestamptz NOT NULL
    );
    COMMIT;";

const ACQUIRE: &str = "
    INSERT INTO warren_cluster_leases (name, holder, expires_at)
    VALUES ($1, $2, now() + make_interval(secs => $3))
    ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
    WHERE warren_cluster_leases.holder = EXCLUDED.holder
       OR warren_cluster_leases.expires_at < now()
    RETURNING holder";

/// A [`Lease`] in PostgreSQL, named after the cluster. Connects for each question: a lease is
/// asked for once per partition.
pub struct PostgresLease {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// The database, for errors about reaching it.
    link: String,
    name: String,
}

impl PostgresLease {
    /// The lease `name` in the database at `url`.
    pub fn new(url: &str, name: &str) -> Result<Self, LeaseError> {
        let PostgresTarget {
            mut config,
            tls,
            link,
        } = PostgresTarget::parse(url).map_err(unavailable)?;
        config.connect_timeout(TIMEOUT);
        config.application_name("warren-lease");
        Ok(PostgresLease {
            config,
            tls,
            link,
            name: name.to_owned(),
        })
    }

    async fn client(&self) -> Result<tokio_postgres::Client, LeaseError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| unavailable(link_failure(&self.link, &e)))?;
        tokio::spawn(connection);
        let exists = client
            .query_one(
                "SELECT to_regclass('warren_cluster_leases') IS NOT NULL",
                &[],
            )
            .await
            .and_then(|row| row.try_get::<_, bool>(0))
            .map_err(unavailable)?;
        if !exists {
            client.batch_execute(SCHEMA).await.map_err(unavailable)?;
        }
        Ok(client)
    }
}

#[async_trait]
impl Lease for PostgresLease {
    async fn acquire(&self, holder: &str, ttl: Duration) -> Result<bool, LeaseError> {
        let ask = async {
            let client = self.client().await?;
            let rows = client
                .query(ACQUIRE, &[&self.name, &holder, &ttl.as_secs_f64()])
                .await
                .map_err(unavailable)?;
            Ok(!rows.is_empty())
        };
        tokio::time::timeout(TIMEOUT * 2, ask)
            .await
            .map_err(|_| LeaseError::Unavailable("no answer in time".to_owned()))?
    }
}

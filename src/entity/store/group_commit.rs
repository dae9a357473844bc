//! Group commit: the appends of every entity on a node wait in one queue, and a few writers
//! each take whatever is waiting and store it in one round trip and one commit, so one fsync
//! covers many records instead of one each. An entity still hears back only once its own
//! record is durable, and since it waits for that before it appends again, its records keep
//! their order.
//!
//! A batch never holds two appends under one entity and key (the second waits for the next
//! batch, where it is a duplicate), and a batch the database refuses as a whole is stored again
//! one append at a time, so one bad record fails only its own message.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::entity::store::{Appended, Claim, StoreError};

/// One entity's append, as a writer hands it to the database.
#[derive(Clone, Debug)]
pub(super) struct Append {
    pub(super) claim: Claim,
    pub(super) key: String,
    pub(super) record: Vec<u8>,
}

/// A database that can store a batch of appends in one transaction.
#[async_trait]
pub(super) trait BatchStore: Send + Sync + 'static {
    /// Stores `batch` (no two under one entity and key) in one transaction: one outcome per
    /// append, in order, or one error for the whole batch (nothing stored).
    async fn append_batch(
        &self,
        batch: &[Append],
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError>;
}

/// How many writers, and how many appends one batch holds at most.
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupCommitSettings {
    /// Batches in flight at once (each holds a database connection while it is written).
    pub(super) writers: usize,
    /// Appends per batch at most.
    pub(super) max_batch: usize,
}

struct Job {
    append: Append,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The queue in front of the writers; they stop once it is dropped and drained.
pub(super) struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts the writers on the current tokio runtime.
    pub(super) fn start(store: Arc<dyn BatchStore>, settings: GroupCommitSettings) -> Self {
        let (queue, waiting) = mpsc::channel(settings.max_batch * settings.writers.max(1));
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..settings.writers.max(1) {
            tokio::spawn(write(store.clone(), waiting.clone(), settings.max_batch));
        }
        GroupCommit { queue }
    }

    /// Stores `append` with whatever else is waiting; returns once it is durable (or failed).
    pub(super) async fn append(&self, append: Append) -> Result<Appended, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Job { append, reply })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// A [`GroupCommit`] started by the first append: a store may be made outside the tokio
/// runtime its writers need.
pub(super) struct LazyGroupCommit {
    store: Arc<dyn BatchStore>,
    settings: GroupCommitSettings,
    started: OnceLock<GroupCommit>,
}

impl LazyGroupCommit {
    pub(super) fn new(store: Arc<dyn BatchStore>, settings: GroupCommitSettings) -> Self {
        LazyGroupCommit {
            store,
            settings,
            started: OnceLock::new(),
        }
    }

    /// [`GroupCommit::append`] of `record` under `key` for the claimed entity (what
    /// [`crate::entity::store::EntityStore::append`] is given), starting the writers first if
    /// need be.
    pub(super) async fn append(
        &self,
        claim: &Claim,
        key: &str,
        record: &[u8],
    ) -> Result<Appended, StoreError> {
        let commits = self
            .started
            .get_or_init(|| GroupCommit::start(self.store.clone(), self.settings));
        commits
            .append(Append {
                claim: claim.clone(),
                key: key.to_owned(),
                record: record.to_vec(),
            })
            .await
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store's writers stopped".to_owned())
}

/// One writer: takes what is waiting (while it does, the other writers wait for their turn, so
/// each batch is as large as the queue allows), then writes it.
async fn write(
    store: Arc<dyn BatchStore>,
    waiting: Arc<Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
) {
    loop {
        let mut jobs = {
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut jobs = vec![first];
            while jobs.len() < max_batch {
                match waiting.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        while !jobs.is_empty() {
            let (batch, later) = split_repeated_keys(jobs);
            store_batch(store.as_ref(), batch).await;
            jobs = later;
        }
    }
}

/// The jobs whose entity and key are the first of their kind, and the rest (in order).
fn split_repeated_keys(jobs: Vec<Job>) -> (Vec<Job>, Vec<Job>) {
    // Borrowed keys: no allocation per append to find the rare repeat.
    let first: Vec<bool> = {
        let mut seen = HashSet::with_capacity(jobs.len());
        jobs.iter()
            .map(|job| seen.insert((job.append.claim.entity().as_str(), job.append.key.as_str())))
            .collect()
    };
    if !first.contains(&false) {
        return (jobs, Vec::new());
    }
    let mut batch = Vec::with_capacity(jobs.len());
    let mut later = Vec::new();
    for (job, first) in jobs.into_iter().zip(first) {
        if first {
            batch.push(job);
        } else {
            later.push(job);
        }
    }
    (batch, later)
}

/// Stores `jobs` as one batch and answers each; a batch refused as a whole (not for want of
/// the database) is stored again one append at a time, so one bad record fails alone.
async fn store_batch(store: &dyn BatchStore, jobs: Vec<Job>) {
    let (appends, replies): (Vec<Append>, Vec<_>) =
        jobs.into_iter().map(|job| (job.append, job.reply)).unzip();
    match store.append_batch(&appends).await {
        Ok(outcomes) => answer(replies, outcomes),
        Err(error) if appends.len() > 1 && !error.is_unavailable() => {
            for (append, reply) in appends.into_iter().zip(replies) {
                let outcome = match store.append_batch(std::slice::from_ref(&append)).await {
                    Ok(mut outcomes) => outcomes.pop().unwrap_or_else(|| Err(missing())),
                    Err(error) => Err(error),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Sends each outcome to its append; an append the store gave no outcome for fails.
fn answer(
    replies: Vec<oneshot::Sender<Result<Appended, StoreError>>>,
    outcomes: Vec<Result<Appended, StoreError>>,
) {
    let mut outcomes = outcomes.into_iter();
    for reply in replies {
        // The entity may have gone (its message timed out); the record stays stored.
        let _ = reply.send(outcomes.next().unwrap_or_else(|| Err(missing())));
    }
}

fn missing() -> StoreError {
    StoreError::Query("the store returned fewer outcomes than appends".to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::ids::EntityId;

    /// Stores in a map; refuses a whole batch holding the key `"poison"` (as a database refuses
    /// a statement), and records every batch's size.
    #[derive(Default)]
    struct Recording {
        stored: StdMutex<BTreeMap<(String, String), usize>>,
        batches: StdMutex<Vec<usize>>,
    }

    #[async_trait]
    impl BatchStore for Recording {
        async fn append_batch(
            &self,
            batch: &[Append],
        ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
            tokio::task::yield_now().await;
            self.batches.lock().unwrap().push(batch.len());
            if batch.iter().any(|a| a.key == "poison") {
                return Err(StoreError::Query("poison".to_owned()));
            }
            let mut stored = self.stored.lock().unwrap();
            Ok(batch
                .iter()
                .map(|a| {
                    let key = (a.claim.entity().as_str().to_owned(), a.key.clone());
                    let seq = stored.len();
                    match stored.insert(key, seq) {
                        None => Ok(Appended::New { seq: seq as u64 }),
                        Some(_) => Ok(Appended::Duplicate),
                    }
                })
                .collect())
        }
    }

    fn append(entity: &str, key: &str) -> Append {
        Append {
            claim: Claim::new(EntityId::new(entity), 1),
            key: key.to_owned(),
            record: Vec::new(),
        }
    }

    fn settings() -> GroupCommitSettings {
        GroupCommitSettings {
            writers: 1,
            max_batch: 64,
        }
    }

    #[tokio::test]
    async fn appends_waiting_together_are_stored_in_one_batch() {
        let store = Arc::new(Recording::default());
        let commit = Arc::new(GroupCommit::start(store.clone(), settings()));
        let appends = (0..40).map(|i| {
            let commit = commit.clone();
            async move { commit.append(append(&format!("e{i}"), "k")).await }
        });
        let outcomes = futures::future::join_all(appends).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Ok(Appended::New { .. })))
        );
        let batches = store.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 40);
        assert!(batches.len() < 40, "no batching: {batches:?}");
    }

    #[tokio::test]
    async fn the_same_key_twice_in_one_wait_is_stored_once_then_a_duplicate() {
        let store = Arc::new(Recording::default());
        let commit = GroupCommit::start(store.clone(), settings());
        let (first, second) = tokio::join!(
            commit.append(append("e", "k")),
            commit.append(append("e", "k"))
        );
        assert!(matches!(first, Ok(Appended::New { .. })));
        assert!(matches!(second, Ok(Appended::Duplicate)));
        // Another entity's same key is its own.
        assert!(matches!(
            commit.append(append("f", "k")).await,
            Ok(Appended::New { .. })
        ));
    }

    #[tokio::test]
    async fn a_refused_batch_fails_only_the_append_that_poisoned_it() {
        let store = Arc::new(Recording::default());
        let commit = Arc::new(GroupCommit::start(store.clone(), settings()));
        let keys = ["a", "poison", "b", "c"];
        let appends = keys.iter().enumerate().map(|(i, key)| {
            let commit = commit.clone();
            async move { commit.append(append(&format!("e{i}"), key)).await }
        });
        let outcomes = futures::future::join_all(appends).await;
        for (key, outcome) in keys.iter().zip(&outcomes) {
            if *key == "poison" {
                assert!(matches!(outcome, Err(StoreError::Query(_))), "{outcome:?}");
            } else {
                assert!(
                    matches!(outcome, Ok(Appended::New { .. })),
                    "{key}: {outcome:?}"
                );
            }
        }
        assert_eq!(store.stored.lock().unwrap().len(), 3);
    }
}

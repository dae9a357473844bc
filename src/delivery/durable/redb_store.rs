//! The embedded durable producer queue: one redb file per producer. `MessageSent` is committed
//! durably before it is acknowledged; confirmations are committed write-behind (redb's
//! `Durability::None`, made durable by the next durable commit, or by [`RedbQueue::flush`]), so
//! a crash can only cause redeliveries, never loss. Deleted records free pages that later
//! writes reuse, and the file is compacted every `compact_every` writes, so it stays about as
//! large as what is unconfirmed.
//!
//! redb is blocking; every call runs on tokio's blocking pool.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::delivery::codec::Codec;
use crate::delivery::durable::{
    DurableProducerQueue, DurableState, MessageSent, Qualifier, StoreError, check_message_sent,
};
use crate::delivery::protocol::{Chunk, Payload, SeqNr};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SENT: TableDefinition<u64, &[u8]> = TableDefinition::new("sent");
const CONFIRMED: TableDefinition<&str, (u64, u64)> = TableDefinition::new("confirmed");

const CURRENT_SEQ_NR: &str = "current_seq_nr";
const HIGHEST_CONFIRMED: &str = "highest_confirmed_seq_nr";

const RECORD_VERSION: u8 = 1;
const ACK: u8 = 1;
const CHUNK: u8 = 2;
const FIRST_CHUNK: u8 = 4;
const LAST_CHUNK: u8 = 8;
const HEADER_LEN: usize = 14;

struct Inner<M> {
    db: Mutex<Database>,
    codec: Arc<dyn Codec<M>>,
    compact_every: u64,
    writes: Mutex<u64>,
}

impl<M> Drop for Inner<M> {
    /// A planned stop keeps its write-behind confirmations.
    fn drop(&mut self) {
        if let Err(error) = self.commit_durably() {
            tracing::warn!(%error, "durable queue: last confirmations not flushed");
        }
    }
}

impl<M> Inner<M> {
    /// An empty durable commit: everything committed write-behind before it becomes durable.
    fn commit_durably(&self) -> Result<(), StoreError> {
        let db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = db.begin_write().map_err(backend)?;
        txn.commit().map_err(backend)
    }

    /// Counts a write and compacts the file when it is time.
    fn after_write(&self, db: &mut Database) {
        if self.compact_every == 0 {
            return;
        }
        let mut writes = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        *writes += 1;
        if *writes >= self.compact_every {
            *writes = 0;
            if let Err(error) = db.compact() {
                tracing::debug!(%error, "durable queue compaction skipped");
            }
        }
    }
}

/// A durable producer queue in a redb file.
pub struct RedbQueue<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for RedbQueue<M> {
    fn clone(&self) -> Self {
        RedbQueue {
            inner: Arc::clone(&self.inner),
        }
    }
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl<M: Clone + Send + Sync + 'static> RedbQueue<M> {
    /// Opens (or creates) the queue in `path`; messages are stored with `codec`. The file is
    /// compacted every `compact_every` writes (0: never).
    pub fn open(
        path: impl AsRef<Path>,
        codec: Arc<dyn Codec<M>>,
        compact_every: u64,
    ) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.open_table(SENT).map_err(backend)?;
        txn.open_table(CONFIRMED).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(RedbQueue {
            inner: Arc::new(Inner {
                db: Mutex::new(db),
                codec,
                compact_every,
                writes: Mutex::new(0),
            }),
        })
    }

    async fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner<M>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(backend)?
    }
}

/// The qualifier of an encoded record, read from its header without decoding the payload.
fn record_qualifier(record: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(record.get(10..HEADER_LEN)?.try_into().ok()?) as usize;
    record.get(HEADER_LEN..HEADER_LEN + len)
}

impl<M: 'static> Inner<M> {
    fn encode(&self, sent: &MessageSent<M>) -> Result<Vec<u8>, StoreError> {
        let (mut flags, body) = match &sent.payload {
            Payload::Message(message) => (0, self.codec.encode(message).map_err(backend)?),
            Payload::Chunk(chunk) => {
                let mut flags = CHUNK;
                if chunk.first_chunk {
                    flags |= FIRST_CHUNK;
                }
                if chunk.last_chunk {
                    flags |= LAST_CHUNK;
                }
                (flags, chunk.bytes.to_vec())
            }
        };
        if sent.ack {
            flags |= ACK;
        }
        let qualifier = sent.qualifier.as_bytes();
        let qualifier_len = u32::try_from(qualifier.len()).map_err(backend)?;
        let mut record = Vec::with_capacity(HEADER_LEN + qualifier.len() + body.len());
        record.push(RECORD_VERSION);
        record.push(flags);
        record.extend_from_slice(&sent.timestamp_millis.to_le_bytes());
        record.extend_from_slice(&qualifier_len.to_le_bytes());
        record.extend_from_slice(qualifier);
        record.extend_from_slice(&body);
        Ok(record)
    }

    fn decode(&self, seq_nr: u64, record: &[u8]) -> Result<MessageSent<M>, StoreError> {
        let corrupt = || StoreError::Backend(format!("corrupt record at seq nr {seq_nr}"));
        let header = record.get(..HEADER_LEN).ok_or_else(corrupt)?;
        if header[0] != RECORD_VERSION {
            return Err(corrupt());
        }
        let flags = header[1];
        let timestamp_millis = u64::from_le_bytes(header[2..10].try_into().map_err(|_| corrupt())?);
        let qualifier = record_qualifier(record).ok_or_else(corrupt)?;
        let body = &record[HEADER_LEN + qualifier.len()..];
        let qualifier = String::from_utf8(qualifier.to_vec()).map_err(|_| corrupt())?;
        let payload = if flags & CHUNK != 0 {
            Payload::Chunk(Chunk {
                bytes: Bytes::copy_from_slice(body),
                first_chunk: flags & FIRST_CHUNK != 0,
                last_chunk: flags & LAST_CHUNK != 0,
            })
        } else {
            Payload::Message(self.codec.decode(body).map_err(backend)?)
        };
        Ok(MessageSent {
            seq_nr: SeqNr(seq_nr),
            payload,
            ack: flags & ACK != 0,
            qualifier,
            timestamp_millis,
        })
    }

    fn read_state(&self, db: &Database) -> Result<DurableState<M>, StoreError> {
        let txn = db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        let value = |key| -> Result<Option<u64>, StoreError> {
            Ok(meta.get(key).map_err(backend)?.map(|v| v.value()))
        };
        let mut state = DurableState {
            current_seq_nr: SeqNr(value(CURRENT_SEQ_NR)?.unwrap_or(1)),
            highest_confirmed_seq_nr: SeqNr(value(HIGHEST_CONFIRMED)?.unwrap_or(0)),
            confirmed: read_confirmed(&txn)?,
            unconfirmed: VecDeque::new(),
        };
        for entry in txn
            .open_table(SENT)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (seq_nr, record) = entry.map_err(backend)?;
            state
                .unconfirmed
                .push_back(self.decode(seq_nr.value(), record.value())?);
        }
        Ok(state)
    }
}

fn read_confirmed(
    txn: &redb::ReadTransaction,
) -> Result<BTreeMap<Qualifier, (SeqNr, u64)>, StoreError> {
    let mut confirmed = BTreeMap::new();
    for entry in txn
        .open_table(CONFIRMED)
        .map_err(backend)?
        .iter()
        .map_err(backend)?
    {
        let (qualifier, value) = entry.map_err(backend)?;
        let (seq_nr, timestamp) = value.value();
        confirmed.insert(qualifier.value().to_owned(), (SeqNr(seq_nr), timestamp));
    }
    Ok(confirmed)
}

/// Qualifiers unused for `unused_after` with nothing unconfirmed, read from record headers
/// only: the payloads are not decoded, so cleanup costs little and works whatever they hold.
fn stale_qualifiers(
    db: &Database,
    now_millis: u64,
    unused_after: Duration,
) -> Result<Vec<Qualifier>, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let old_enough = DurableState::<()> {
        confirmed: read_confirmed(&txn)?,
        ..DurableState::default()
    }
    .stale_qualifiers(now_millis, unused_after);
    if old_enough.is_empty() {
        return Ok(old_enough);
    }
    let mut in_use = std::collections::HashSet::new();
    for entry in txn
        .open_table(SENT)
        .map_err(backend)?
        .iter()
        .map_err(backend)?
    {
        let (_, record) = entry.map_err(backend)?;
        if let Some(qualifier) = record_qualifier(record.value()) {
            in_use.insert(qualifier.to_vec());
        }
    }
    Ok(old_enough
        .into_iter()
        .filter(|qualifier| !in_use.contains(qualifier.as_bytes()))
        .collect())
}

impl<M: Clone + Send + Sync + 'static> DurableProducerQueue<M> for RedbQueue<M> {
    async fn load_state(&self) -> Result<DurableState<M>, StoreError> {
        self.blocking(|inner| {
            let db = inner.db.lock().unwrap_or_else(PoisonError::into_inner);
            let mut state = inner.read_state(&db)?;
            let before: Vec<u64> = state.unconfirmed.iter().map(|m| m.seq_nr.0).collect();
            let current_before = state.current_seq_nr;
            state.cleanup_partial_chunked_messages();
            if state.current_seq_nr != current_before || state.unconfirmed.len() != before.len() {
                // Persist the cleanup, so the chunks are not reloaded and the next message
                // reuses their sequence numbers.
                let kept: std::collections::HashSet<u64> =
                    state.unconfirmed.iter().map(|m| m.seq_nr.0).collect();
                let txn = db.begin_write().map_err(backend)?;
                {
                    let mut sent = txn.open_table(SENT).map_err(backend)?;
                    for seq_nr in before.iter().filter(|s| !kept.contains(s)) {
                        sent.remove(*seq_nr).map_err(backend)?;
                    }
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    meta.insert(CURRENT_SEQ_NR, state.current_seq_nr.0)
                        .map_err(backend)?;
                }
                txn.commit().map_err(backend)?;
            }
            Ok(state)
        })
        .await
    }

    async fn store_message_sent(&self, sent: MessageSent<M>) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let mut db = inner.db.lock().unwrap_or_else(PoisonError::into_inner);
            let record = inner.encode(&sent)?;
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut meta = txn.open_table(META).map_err(backend)?;
                let current = meta
                    .get(CURRENT_SEQ_NR)
                    .map_err(backend)?
                    .map_or(1, |v| v.value());
                if !check_message_sent(SeqNr(current), sent.seq_nr)? {
                    return Ok(());
                }
                let mut table = txn.open_table(SENT).map_err(backend)?;
                table
                    .insert(sent.seq_nr.0, record.as_slice())
                    .map_err(backend)?;
                meta.insert(CURRENT_SEQ_NR, sent.seq_nr.0 + 1)
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            inner.after_write(&mut db);
            Ok(())
        })
        .await
    }

    async fn store_message_confirmed(
        &self,
        seq_nr: SeqNr,
        qualifier: &str,
        timestamp_millis: u64,
    ) -> Result<(), StoreError> {
        let qualifier = qualifier.to_owned();
        self.blocking(move |inner| {
            let mut db = inner.db.lock().unwrap_or_else(PoisonError::into_inner);
            let mut txn = db.begin_write().map_err(backend)?;
            // Write-behind: durable with the next durable commit.
            txn.set_durability(Durability::None).map_err(backend)?;
            {
                let mut confirmed = txn.open_table(CONFIRMED).map_err(backend)?;
                let stored = confirmed
                    .get(qualifier.as_str())
                    .map_err(backend)?
                    .map(|v| v.value().0);
                if stored.is_some_and(|s| seq_nr.0 <= s) {
                    return Ok(());
                }
                confirmed
                    .insert(qualifier.as_str(), (seq_nr.0, timestamp_millis))
                    .map_err(backend)?;
                let mut meta = txn.open_table(META).map_err(backend)?;
                let highest = meta
                    .get(HIGHEST_CONFIRMED)
                    .map_err(backend)?
                    .map_or(0, |v| v.value());
                meta.insert(HIGHEST_CONFIRMED, highest.max(seq_nr.0))
                    .map_err(backend)?;
                let mut sent = txn.open_table(SENT).map_err(backend)?;
                sent.retain_in(..=seq_nr.0, |_, record| {
                    record_qualifier(record) != Some(qualifier.as_bytes())
                })
                .map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            inner.after_write(&mut db);
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.blocking(|inner| inner.commit_durably()).await
    }

    async fn cleanup_unused(
        &self,
        now_millis: u64,
        unused_after: Duration,
    ) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let db = inner.db.lock().unwrap_or_else(PoisonError::into_inner);
            let stale = stale_qualifiers(&db, now_millis, unused_after)?;
            if stale.is_empty() {
                return Ok(());
            }
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::None).map_err(backend)?;
            {
                let mut confirmed = txn.open_table(CONFIRMED).map_err(backend)?;
                for qualifier in &stale {
                    confirmed.remove(qualifier.as_str()).map_err(backend)?;
                }
            }
            txn.commit().map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::delivery::codec::TextCodec;
    use crate::delivery::durable::conformance::{StoreLocation, run_all};

    struct File(PathBuf);

    impl StoreLocation for File {
        type Store = RedbQueue<String>;
        fn open(&self) -> RedbQueue<String> {
            RedbQueue::open(&self.0, Arc::new(TextCodec), 100).unwrap()
        }
    }

    fn fresh_file() -> File {
        let dir = std::env::temp_dir().join("warren-redb-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.redb", uuid::Uuid::new_v4()));
        File(path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_durable_queue_conformance_suite() {
        let mut files = Vec::new();
        run_all(|| {
            let file = fresh_file();
            files.push(file.0.clone());
            file
        })
        .await;
        for file in files {
            let _ = std::fs::remove_file(file);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_file_stays_small_while_messages_are_confirmed() {
        let file = fresh_file();
        let store = file.open();
        let body = "x".repeat(4096);
        for seq_nr in 1..=1_500u64 {
            let sent = MessageSent {
                seq_nr: SeqNr(seq_nr),
                payload: Payload::Message(body.clone()),
                ack: false,
                qualifier: String::new(),
                timestamp_millis: seq_nr,
            };
            store.store_message_sent(sent).await.unwrap();
            store
                .store_message_confirmed(SeqNr(seq_nr), "", seq_nr)
                .await
                .unwrap();
        }
        store.flush().await.unwrap();
        drop(store);
        let size = std::fs::metadata(&file.0).unwrap().len();
        let _ = std::fs::remove_file(&file.0);
        // 6 MiB went through; what remains must be a small, bounded file.
        assert!(size < 1024 * 1024, "file grew to {size} bytes");
    }
}

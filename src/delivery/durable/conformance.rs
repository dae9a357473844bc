//! One behavioural suite for every [`DurableProducerQueue`]: the EventSourcedProducerQueue
//! scenarios of Akka's suite (ESQ-01..06) plus idempotent retries, chunk cleanup across a
//! restart and round trips of every field. A store passes by running [`run_all`].

use std::time::Duration;

use bytes::Bytes;

use crate::delivery::durable::{DurableProducerQueue, DurableState, MessageSent, StoreError};
use crate::delivery::protocol::{Chunk, Payload, SeqNr};

/// Where a store keeps its data; opening it again is a restart.
pub trait StoreLocation {
    /// The store type.
    type Store: DurableProducerQueue<String>;
    /// Opens the store; the previous one must have been dropped.
    fn open(&self) -> Self::Store;
}

fn message(seq_nr: u64, qualifier: &str, ack: bool) -> MessageSent<String> {
    MessageSent {
        seq_nr: SeqNr(seq_nr),
        payload: Payload::Message(format!("m{seq_nr}")),
        ack,
        qualifier: qualifier.into(),
        timestamp_millis: 1_000 + seq_nr,
    }
}

fn chunk(seq_nr: u64, first_chunk: bool, last_chunk: bool) -> MessageSent<String> {
    MessageSent {
        payload: Payload::Chunk(Chunk {
            bytes: Bytes::from(format!("c{seq_nr}")),
            first_chunk,
            last_chunk,
        }),
        ..message(seq_nr, "", false)
    }
}

fn seqs(state: &DurableState<String>) -> Vec<u64> {
    state.unconfirmed.iter().map(|m| m.seq_nr.0).collect()
}

/// Runs every scenario; each gets a fresh location from `fresh`.
pub async fn run_all<L: StoreLocation>(mut fresh: impl FnMut() -> L) {
    persists_message_sent(&fresh()).await;
    acknowledges_a_retry_and_refuses_out_of_order(&fresh()).await;
    persists_confirmed(&fresh()).await;
    ignores_an_older_confirmation(&fresh()).await;
    keeps_confirmations_per_qualifier(&fresh()).await;
    cleans_up_old_qualifiers(&fresh()).await;
    drops_partly_stored_chunks_on_restart(&fresh()).await;
    round_trips_every_field(&fresh()).await;
}

/// ESQ-01
async fn persists_message_sent<L: StoreLocation>(location: &L) {
    let store = location.open();
    store
        .store_message_sent(message(1, "", false))
        .await
        .unwrap();
    store
        .store_message_sent(message(2, "", false))
        .await
        .unwrap();
    let state = store.load_state().await.unwrap();
    assert_eq!(state.current_seq_nr, SeqNr(3));
    assert_eq!(state.highest_confirmed_seq_nr, SeqNr(0));
    assert!(state.confirmed.is_empty());
    assert_eq!(seqs(&state), vec![1, 2]);
    drop(store);
    let state_after_restart = location.open().load_state().await.unwrap();
    assert_eq!(state_after_restart, state, "ESQ-01 after restart");
}

/// ESQ-02
async fn acknowledges_a_retry_and_refuses_out_of_order<L: StoreLocation>(location: &L) {
    let store = location.open();
    store
        .store_message_sent(message(1, "", false))
        .await
        .unwrap();
    store
        .store_message_sent(message(2, "", false))
        .await
        .unwrap();
    let before = store.load_state().await.unwrap();
    store
        .store_message_sent(message(2, "", false))
        .await
        .expect("a retry of the last message is acknowledged");
    assert!(matches!(
        store.store_message_sent(message(1, "", false)).await,
        Err(StoreError::OutOfOrder { .. })
    ));
    assert!(matches!(
        store.store_message_sent(message(5, "", false)).await,
        Err(StoreError::OutOfOrder { .. })
    ));
    assert_eq!(store.load_state().await.unwrap(), before, "nothing written");
}

/// ESQ-03
async fn persists_confirmed<L: StoreLocation>(location: &L) {
    let store = location.open();
    for seq_nr in 1..=3 {
        store
            .store_message_sent(message(seq_nr, "", false))
            .await
            .unwrap();
    }
    store
        .store_message_confirmed(SeqNr(2), "", 77)
        .await
        .unwrap();
    let state = store.load_state().await.unwrap();
    assert_eq!(seqs(&state), vec![3]);
    assert_eq!(state.current_seq_nr, SeqNr(4));
    assert_eq!(state.highest_confirmed_seq_nr, SeqNr(2));
    assert_eq!(state.confirmed.get(""), Some(&(SeqNr(2), 77)));
    store.flush().await.unwrap();
    drop(store);
    assert_eq!(
        location.open().load_state().await.unwrap(),
        state,
        "ESQ-03 after restart"
    );
}

/// ESQ-04
async fn ignores_an_older_confirmation<L: StoreLocation>(location: &L) {
    let store = location.open();
    for seq_nr in 1..=3 {
        store
            .store_message_sent(message(seq_nr, "", false))
            .await
            .unwrap();
    }
    store
        .store_message_confirmed(SeqNr(2), "", 10)
        .await
        .unwrap();
    let before = store.load_state().await.unwrap();
    store
        .store_message_confirmed(SeqNr(1), "", 20)
        .await
        .unwrap();
    store
        .store_message_confirmed(SeqNr(2), "", 30)
        .await
        .unwrap();
    assert_eq!(store.load_state().await.unwrap(), before);
}

/// ESQ-05
async fn keeps_confirmations_per_qualifier<L: StoreLocation>(location: &L) {
    let store = location.open();
    for (seq_nr, qualifier) in [(1, "q1"), (2, "q1"), (3, "q2"), (4, "q2"), (5, "q2")] {
        store
            .store_message_sent(message(seq_nr, qualifier, false))
            .await
            .unwrap();
    }
    store
        .store_message_confirmed(SeqNr(4), "q2", 5)
        .await
        .unwrap();
    let state = store.load_state().await.unwrap();
    assert_eq!(seqs(&state), vec![1, 2, 5]);
    assert_eq!(state.highest_confirmed_seq_nr, SeqNr(4));
    assert_eq!(state.confirmed.len(), 1);
    assert_eq!(state.confirmed.get("q2"), Some(&(SeqNr(4), 5)));
    store.flush().await.unwrap();
    drop(store);
    assert_eq!(
        location.open().load_state().await.unwrap(),
        state,
        "ESQ-05 after restart"
    );
}

/// ESQ-06
async fn cleans_up_old_qualifiers<L: StoreLocation>(location: &L) {
    let store = location.open();
    let unused = Duration::from_millis(100);
    for (seq_nr, qualifier) in [(1, "q1"), (2, "q1"), (3, "q2")] {
        store
            .store_message_sent(message(seq_nr, qualifier, false))
            .await
            .unwrap();
    }
    store
        .store_message_confirmed(SeqNr(1), "q1", 0)
        .await
        .unwrap();
    store.cleanup_unused(10_000, unused).await.unwrap();
    let state = store.load_state().await.unwrap();
    assert!(
        state.confirmed.contains_key("q1"),
        "q1 still has seq nr 2 unconfirmed"
    );

    store
        .store_message_confirmed(SeqNr(2), "q1", 0)
        .await
        .unwrap();
    store
        .store_message_confirmed(SeqNr(3), "q2", 9_990)
        .await
        .unwrap();
    store.cleanup_unused(10_000, unused).await.unwrap();
    let state = store.load_state().await.unwrap();
    assert_eq!(state.confirmed.keys().collect::<Vec<_>>(), vec!["q2"]);
    assert!(state.unconfirmed.is_empty());
}

/// DPQ-03 through a store, and D-12: a restart after a partly stored chunked message reloads
/// without it, and the next message reuses its sequence numbers.
async fn drops_partly_stored_chunks_on_restart<L: StoreLocation>(location: &L) {
    let store = location.open();
    store
        .store_message_sent(message(1, "", false))
        .await
        .unwrap();
    store
        .store_message_sent(chunk(2, true, false))
        .await
        .unwrap();
    store
        .store_message_sent(chunk(3, false, false))
        .await
        .unwrap();
    drop(store);
    let store = location.open();
    let state = store.load_state().await.unwrap();
    assert_eq!(seqs(&state), vec![1]);
    assert_eq!(state.current_seq_nr, SeqNr(2));
    store
        .store_message_sent(chunk(2, true, true))
        .await
        .expect("the cleaned-up sequence number is free again");
    assert_eq!(seqs(&store.load_state().await.unwrap()), vec![1, 2]);
}

async fn round_trips_every_field<L: StoreLocation>(location: &L) {
    let store = location.open();
    let sent = vec![
        message(1, "entity-7", true),
        chunk(2, true, false),
        chunk(3, false, true),
    ];
    for m in &sent {
        store.store_message_sent(m.clone()).await.unwrap();
    }
    drop(store);
    let state = location.open().load_state().await.unwrap();
    assert_eq!(Vec::from(state.unconfirmed), sent);
}

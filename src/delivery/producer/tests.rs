//! ProducerController scenarios (docs/protocol.md, Test scenarios: PC-*, DPC-*, NET-*, D-*), each
//! named by its id.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::delivery::codec::TextCodec;
use crate::delivery::durable::{accept_confirmed, accept_message_sent};
use crate::delivery::protocol::{Chunk, Payload};
use crate::testkit::{Clock, request};

type Pc = ProducerController<String, u32>;

fn settings() -> ProducerSettings {
    ProducerSettings::default()
}

fn chunked(size: u32) -> ProducerSettings {
    ProducerSettings {
        chunk_large_messages: Some(size),
        ..ProducerSettings::default()
    }
}

fn active(now: Instant) -> Pc {
    active_with(settings(), now)
}

fn active_with(settings: ProducerSettings, now: Instant) -> Pc {
    let mut pc = Pc::new(ProducerId::new("p"), 1, settings).with_codec(Arc::new(TextCodec));
    pc.start(now);
    pc.register_consumer(now);
    pc
}

fn msg(text: &str) -> String {
    text.to_owned()
}

fn transmitted(pc: &mut Pc) -> Vec<(u64, bool)> {
    std::iter::from_fn(|| pc.poll_transmit())
        .map(|m| (m.seq_nr.0, m.first))
        .collect()
}

fn events(pc: &mut Pc) -> Vec<ProducerEvent<u32>> {
    std::iter::from_fn(|| pc.poll_event()).collect()
}

fn replies(pc: &mut Pc) -> Vec<u64> {
    events(pc)
        .into_iter()
        .filter_map(|e| match e {
            ProducerEvent::Confirmed { seq_nr, .. } => Some(seq_nr.0),
            ProducerEvent::RequestNext { .. } => None,
        })
        .collect()
}

fn request_next(current: u64, confirmed: u64) -> ProducerEvent<u32> {
    ProducerEvent::RequestNext {
        current_seq_nr: SeqNr(current),
        confirmed_seq_nr: SeqNr(confirmed),
    }
}

/// Plays the durable queue: applies every pending store request to `store` and answers.
fn run_store(pc: &mut Pc, store: &mut DurableState<String>, now: Instant) {
    while let Some(request) = pc.poll_store() {
        match request {
            StoreRequest::LoadState { .. } => pc.handle_state_loaded(store.clone(), now),
            StoreRequest::StoreMessageSent { sent, attempt } => {
                let seq_nr = sent.seq_nr;
                match accept_message_sent(store, sent) {
                    Ok(_) => pc.handle_message_stored(seq_nr, now),
                    Err(_) => pc.handle_store_failed(seq_nr, attempt),
                }
            }
            StoreRequest::StoreMessageConfirmed { seq_nr, qualifier } => {
                accept_confirmed(store, seq_nr, &qualifier, 0);
            }
        }
    }
}

fn durable(store: &mut DurableState<String>, settings: ProducerSettings, now: Instant) -> Pc {
    let mut pc =
        Pc::with_durable_queue(ProducerId::new("p"), 2, settings).with_codec(Arc::new(TextCodec));
    run_store(&mut pc, store, now);
    pc.start(now);
    pc.register_consumer(now);
    pc
}

fn stored(seq_nr: u64, text: &str) -> MessageSent<String> {
    MessageSent {
        seq_nr: SeqNr(seq_nr),
        payload: Payload::Message(text.to_owned()),
        ack: false,
        qualifier: NO_QUALIFIER.to_owned(),
        timestamp_millis: 0,
    }
}

fn unconfirmed_seqs(store: &DurableState<String>) -> Vec<u64> {
    store.unconfirmed.iter().map(|m| m.seq_nr.0).collect()
}

#[test]
fn requests_the_first_message_once_producer_and_consumer_are_known() {
    let now = Instant::now();
    let mut pc = Pc::new(ProducerId::new("p"), 1, settings());
    pc.start(now);
    assert!(events(&mut pc).is_empty());
    pc.register_consumer(now);
    assert_eq!(events(&mut pc), vec![request_next(1, 0)]);
}

#[test]
fn pushes_the_first_message_before_any_request_then_waits_for_demand() {
    let now = Instant::now();
    let mut pc = active(now);
    events(&mut pc);
    assert_eq!(pc.send(msg("a"), now), Ok(SeqNr(1)));
    assert_eq!(transmitted(&mut pc), vec![(1, true)]);
    assert!(events(&mut pc).is_empty());
    assert!(!pc.has_demand());
    pc.handle_frame(request(0, 3), now).unwrap();
    assert_eq!(events(&mut pc), vec![request_next(2, 0)]);
}

// PC-01
#[test]
fn resends_the_first_message_every_interval_until_it_is_confirmed() {
    let mut clock = Clock::new();
    let start = clock.now();
    let mut pc = active(start);
    pc.send(msg("a"), start).unwrap();
    transmitted(&mut pc);
    assert_eq!(pc.poll_timeout(), Some(start + Duration::from_secs(1)));
    clock.advance(Duration::from_secs(1));
    pc.handle_timeout(clock.now());
    assert_eq!(transmitted(&mut pc), vec![(1, true)]);
    assert_eq!(pc.poll_timeout(), Some(start + Duration::from_secs(2)));
    pc.handle_frame(request(1, 10), clock.now()).unwrap();
    assert_eq!(pc.poll_timeout(), None);
    clock.advance(Duration::from_millis(1100));
    pc.handle_timeout(clock.now());
    assert!(transmitted(&mut pc).is_empty());
}

// PC-02
#[test]
fn resends_from_the_requested_seq_nr_on_resend() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    pc.handle_frame(request(0, 10), now).unwrap();
    for m in ["2", "3", "4"] {
        pc.send(msg(m), now).unwrap();
    }
    transmitted(&mut pc);
    pc.handle_frame(ConsumerFrame::Resend { from: SeqNr(3) }, now)
        .unwrap();
    assert_eq!(transmitted(&mut pc), vec![(3, false), (4, false)]);
    assert_eq!(pc.send(msg("5"), now), Ok(SeqNr(5)));
}

// PC-03
#[test]
fn resends_the_lost_tail_on_a_request_via_timeout() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    pc.handle_frame(request(1, 10), now).unwrap();
    for m in ["2", "3", "4"] {
        pc.send(msg(m), now).unwrap();
    }
    transmitted(&mut pc);
    let via_timeout = ConsumerFrame::Request {
        confirmed: SeqNr(2),
        request_up_to: SeqNr(10),
        support_resend: true,
        via_timeout: true,
    };
    pc.handle_frame(via_timeout, now).unwrap();
    assert_eq!(transmitted(&mut pc), vec![(3, false), (4, false)]);
    assert_eq!(pc.send(msg("5"), now), Ok(SeqNr(5)));
    assert_eq!(transmitted(&mut pc), vec![(5, false)]);
}

// PC-04
#[test]
fn a_new_consumer_gets_the_first_unconfirmed_marked_first_then_the_rest() {
    let mut clock = Clock::new();
    let now = clock.now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    pc.handle_frame(request(1, 10), now).unwrap();
    pc.send(msg("2"), now).unwrap();
    pc.send(msg("3"), now).unwrap();
    transmitted(&mut pc);
    pc.register_consumer(now);
    assert_eq!(transmitted(&mut pc), vec![(2, true)]);
    clock.advance(Duration::from_secs(1));
    pc.handle_timeout(clock.now());
    assert_eq!(transmitted(&mut pc), vec![(2, true)]);
    pc.handle_frame(request(2, 10), clock.now()).unwrap();
    assert_eq!(transmitted(&mut pc), vec![(3, false)]);
    assert_eq!(pc.send(msg("4"), clock.now()), Ok(SeqNr(4)));
}

// PC-05
#[test]
fn confirms_in_order_including_messages_whose_ack_was_lost() {
    let now = Instant::now();
    let mut pc = active(now);
    events(&mut pc);
    pc.send_with_confirmation(msg("1"), 10, now).unwrap();
    assert!(replies(&mut pc).is_empty());
    pc.handle_frame(request(1, 10), now).unwrap();
    assert_eq!(replies(&mut pc), vec![1]);
    pc.send_with_confirmation(msg("2"), 20, now).unwrap();
    pc.handle_frame(
        ConsumerFrame::Ack {
            confirmed: SeqNr(2),
        },
        now,
    )
    .unwrap();
    assert_eq!(replies(&mut pc), vec![2]);
    pc.send_with_confirmation(msg("3"), 30, now).unwrap();
    pc.send_with_confirmation(msg("4"), 40, now).unwrap();
    // Ack(3) is lost; Ack(4) confirms 3 and 4 in order.
    pc.handle_frame(
        ConsumerFrame::Ack {
            confirmed: SeqNr(4),
        },
        now,
    )
    .unwrap();
    assert_eq!(replies(&mut pc), vec![3, 4]);
    pc.send_with_confirmation(msg("5"), 50, now).unwrap();
    pc.handle_frame(request(5, 15), now).unwrap();
    assert_eq!(replies(&mut pc), vec![5]);
    assert_eq!(pc.unconfirmed_len(), 0);
}

// PC-06
#[test]
fn a_restarted_producer_takes_over_the_pending_demand() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    pc.handle_frame(request(1, 10), now).unwrap();
    pc.send(msg("2"), now).unwrap();
    events(&mut pc);
    pc.start(now);
    assert_eq!(events(&mut pc), vec![request_next(3, 1)]);
    assert_eq!(pc.send(msg("3"), now), Ok(SeqNr(3)));
    assert_eq!(pc.send(msg("4"), now), Ok(SeqNr(4)));
}

// PC-07
#[test]
fn chunks_a_large_message_on_consecutive_seq_nrs_within_the_window() {
    let now = Instant::now();
    let mut pc = active_with(chunked(1), now);
    events(&mut pc);
    pc.send(msg("abc"), now).unwrap();
    let first: Vec<SequencedMessage<String>> = std::iter::from_fn(|| pc.poll_transmit()).collect();
    assert_eq!(first.len(), 1, "nothing more until the consumer's Request");
    assert!(first[0].payload.is_first_chunk() && !first[0].payload.is_last_chunk());
    assert!(events(&mut pc).is_empty());
    pc.handle_frame(request(0, 10), now).unwrap();
    let rest: Vec<SequencedMessage<String>> = std::iter::from_fn(|| pc.poll_transmit()).collect();
    assert_eq!(
        rest.iter().map(|m| m.seq_nr.0).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(!rest[0].payload.is_first_chunk() && !rest[0].payload.is_last_chunk());
    assert!(rest[1].payload.is_last_chunk());
    assert_eq!(events(&mut pc), vec![request_next(4, 0)]);
    pc.send(msg("d"), now).unwrap();
    let d = pc.poll_transmit().unwrap();
    assert_eq!(d.seq_nr, SeqNr(4));
    assert!(d.payload.is_first_chunk() && d.payload.is_last_chunk());
}

// PC-08
#[test]
fn without_resend_support_nothing_is_buffered_or_resent() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    let no_resend = |confirmed, up_to, via_timeout| ConsumerFrame::Request {
        confirmed: SeqNr(confirmed),
        request_up_to: SeqNr(up_to),
        support_resend: false,
        via_timeout,
    };
    pc.handle_frame(no_resend(1, 10, false), now).unwrap();
    for m in ["2", "3", "4"] {
        pc.send(msg(m), now).unwrap();
    }
    transmitted(&mut pc);
    pc.handle_frame(no_resend(2, 10, true), now).unwrap();
    assert!(transmitted(&mut pc).is_empty());
    assert_eq!(pc.unconfirmed_len(), 0);
    assert_eq!(pc.send(msg("5"), now), Ok(SeqNr(5)));
}

// PC-09
#[test]
fn without_resend_support_replies_still_come_for_lost_messages() {
    let now = Instant::now();
    let mut pc = active(now);
    let no_resend = |confirmed, up_to| ConsumerFrame::Request {
        confirmed: SeqNr(confirmed),
        request_up_to: SeqNr(up_to),
        support_resend: false,
        via_timeout: false,
    };
    pc.send_with_confirmation(msg("1"), 1, now).unwrap();
    pc.handle_frame(no_resend(1, 10), now).unwrap();
    assert_eq!(replies(&mut pc), vec![1]);
    pc.send_with_confirmation(msg("2"), 2, now).unwrap();
    pc.handle_frame(
        ConsumerFrame::Ack {
            confirmed: SeqNr(2),
        },
        now,
    )
    .unwrap();
    assert_eq!(replies(&mut pc), vec![2]);
    pc.send_with_confirmation(msg("3"), 3, now).unwrap();
    pc.send_with_confirmation(msg("4"), 4, now).unwrap();
    pc.handle_frame(
        ConsumerFrame::Ack {
            confirmed: SeqNr(4),
        },
        now,
    )
    .unwrap();
    assert_eq!(replies(&mut pc), vec![3, 4]);
    pc.send_with_confirmation(msg("5"), 5, now).unwrap();
    pc.handle_frame(no_resend(5, 15), now).unwrap();
    assert_eq!(replies(&mut pc), vec![5]);
}

// NET-01
#[test]
fn the_reply_to_a_chunked_message_carries_its_last_chunk() {
    let now = Instant::now();
    let mut pc = active_with(chunked(1), now);
    assert_eq!(pc.send_with_confirmation(msg("abc"), 9, now), Ok(SeqNr(3)));
    pc.handle_frame(request(0, 10), now).unwrap();
    pc.handle_frame(request(1, 10), now).unwrap();
    assert!(replies(&mut pc).is_empty());
    pc.handle_frame(request(3, 10), now).unwrap();
    assert_eq!(replies(&mut pc), vec![3]);
    // Chunks 2 and 3 after Request(0,10), and again when the first is confirmed (Akka resends
    // the tail then, in case it was lost).
    let seqs: Vec<u64> = transmitted(&mut pc).into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, vec![1, 2, 3, 2, 3]);
}

// NET-02
#[test]
fn a_last_chunk_shorter_than_the_chunk_size_is_fine() {
    let now = Instant::now();
    let mut pc = active_with(chunked(1024), now);
    let text = "x".repeat(10_000);
    pc.send(text, now).unwrap();
    let first = pc.poll_transmit().unwrap();
    assert_eq!(first.seq_nr, SeqNr(1));
    pc.handle_frame(request(0, 20), now).unwrap();
    let rest: Vec<SequencedMessage<String>> = std::iter::from_fn(|| pc.poll_transmit()).collect();
    assert_eq!(rest.len(), 9);
    let Payload::Chunk(last) = &rest[8].payload else {
        panic!("a chunk")
    };
    assert_eq!(last.bytes.len(), 10_000 - 9 * 1024);
    assert!(last.last_chunk);
}

// NET-03
#[test]
fn an_empty_message_travels_as_one_empty_chunk() {
    let now = Instant::now();
    let mut pc = active_with(chunked(8), now);
    pc.send(String::new(), now).unwrap();
    let only = pc.poll_transmit().unwrap();
    let Payload::Chunk(chunk) = &only.payload else {
        panic!("a chunk")
    };
    assert!(chunk.bytes.is_empty() && chunk.first_chunk && chunk.last_chunk);
    assert!(pc.poll_transmit().is_none());
}

// D-01
#[test]
fn sending_without_demand_fails_the_controller() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    let err = pc.send(msg("2"), now).unwrap_err();
    assert_eq!(
        err,
        ProducerError::NoDemand {
            current: SeqNr(2),
            requested_up_to: SeqNr(1)
        }
    );
    assert_eq!(pc.failure(), Some(&err));
    assert_eq!(pc.handle_frame(request(1, 5), now), Err(err));
}

// D-01, chunked: a second message while chunks are still pending.
#[test]
fn sending_while_chunks_are_pending_fails_the_controller() {
    let now = Instant::now();
    let mut pc = active_with(chunked(1), now);
    pc.send(msg("abc"), now).unwrap();
    assert!(matches!(
        pc.send(msg("d"), now),
        Err(ProducerError::NoDemand { .. })
    ));
}

// D-02
#[test]
fn an_inconsistent_request_fails_the_controller() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    let err = pc.handle_frame(request(5, 3), now).unwrap_err();
    assert!(matches!(err, ProducerError::InconsistentRequest { .. }));
    assert!(pc.failure().is_some());
    assert_eq!(pc.poll_timeout(), None);
}

// A misbehaving consumer is not trusted: a confirmation of what was never sent, or a window
// wider than any consumer can be configured with, ends the controller with a typed error
// (the owner drops that consumer) instead of dropping unconfirmed messages or overflowing.
#[test]
fn a_consumer_cannot_confirm_what_was_never_sent_or_open_an_endless_window() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    let err = pc.handle_frame(request(5, 20), now).unwrap_err();
    assert_eq!(
        err,
        ProducerError::ConfirmedUnsent {
            confirmed: SeqNr(5),
            current: SeqNr(2)
        }
    );

    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    let err = pc
        .handle_frame(
            ConsumerFrame::Ack {
                confirmed: SeqNr(2),
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, ProducerError::ConfirmedUnsent { .. }));

    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    let err = pc.handle_frame(request(0, u64::MAX), now).unwrap_err();
    assert!(matches!(err, ProducerError::InconsistentRequest { .. }));
    assert_eq!(
        pc.poll_timeout(),
        None,
        "a failed controller keeps no timers"
    );

    // The widest legal window is accepted.
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    pc.handle_frame(request(1, 1 + u64::from(u32::MAX)), now)
        .unwrap();
    assert!(pc.has_demand());
}

// D-07
#[test]
fn resend_from_zero_resends_everything_with_the_head_marked_first() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send(msg("1"), now).unwrap();
    pc.handle_frame(request(1, 10), now).unwrap();
    pc.send(msg("2"), now).unwrap();
    pc.send(msg("3"), now).unwrap();
    transmitted(&mut pc);
    pc.handle_frame(ConsumerFrame::Resend { from: SeqNr(0) }, now)
        .unwrap();
    assert_eq!(transmitted(&mut pc), vec![(2, true), (3, false)]);
}

// D-09
#[test]
fn an_ack_of_the_first_message_stops_resending_it() {
    let now = Instant::now();
    let mut pc = active(now);
    pc.send_with_confirmation(msg("1"), 1, now).unwrap();
    assert!(pc.poll_timeout().is_some());
    pc.handle_frame(
        ConsumerFrame::Ack {
            confirmed: SeqNr(1),
        },
        now,
    )
    .unwrap();
    assert_eq!(pc.poll_timeout(), None);
}

// DPC-01
#[test]
fn a_durable_controller_resumes_by_resending_what_was_unconfirmed() {
    let now = Instant::now();
    let mut store = DurableState {
        current_seq_nr: SeqNr(5),
        highest_confirmed_seq_nr: SeqNr(2),
        ..DurableState::default()
    };
    store.unconfirmed.extend([stored(3, "m3"), stored(4, "m4")]);
    let mut pc = durable(&mut store, settings(), now);
    assert!(
        events(&mut pc).is_empty(),
        "no RequestNext before the old ones are through"
    );
    assert_eq!(transmitted(&mut pc), vec![(3, true)]);
    pc.handle_frame(request(3, 13), now).unwrap();
    assert_eq!(transmitted(&mut pc), vec![(4, false)]);
    assert_eq!(events(&mut pc), vec![request_next(5, 3)]);
    assert_eq!(pc.send(msg("m5"), now), Ok(SeqNr(5)));
    run_store(&mut pc, &mut store, now);
    assert_eq!(transmitted(&mut pc), vec![(5, false)]);
}

// While a message is being stored the producer has no demand and is not settled, and a
// producer that registers again gets no RequestNext until the store has answered.
#[test]
fn a_message_being_stored_holds_the_producer_back_until_it_is_stored() {
    let now = Instant::now();
    let mut store = DurableState::default();
    let mut pc = durable(&mut store, settings(), now);
    pc.handle_frame(request(0, 10), now).unwrap();
    let _ = events(&mut pc);
    assert_eq!(pc.send(msg("m1"), now), Ok(SeqNr(1)));
    assert!(!pc.has_demand());
    assert!(!pc.is_settled());
    assert_eq!(
        pc.unsent_chunks_len(),
        1,
        "the message being stored is not sent yet"
    );
    pc.start(now);
    assert!(
        events(&mut pc).is_empty(),
        "no RequestNext while m1 is being stored"
    );
    run_store(&mut pc, &mut store, now);
    assert_eq!(transmitted(&mut pc), vec![(1, true)]);
    assert_eq!(pc.unsent_chunks_len(), 0);
    assert!(pc.has_demand());
}

// DPC-02
#[test]
fn a_durable_controller_stores_messages_then_confirmations() {
    let now = Instant::now();
    let mut store = DurableState::default();
    let mut pc = durable(&mut store, settings(), now);
    pc.send(msg("1"), now).unwrap();
    run_store(&mut pc, &mut store, now);
    assert_eq!(
        (store.current_seq_nr, store.highest_confirmed_seq_nr),
        (SeqNr(2), SeqNr(0))
    );
    assert_eq!(unconfirmed_seqs(&store), vec![1]);
    pc.handle_frame(request(1, 10), now).unwrap();
    run_store(&mut pc, &mut store, now);
    assert_eq!(
        (store.current_seq_nr, store.highest_confirmed_seq_nr),
        (SeqNr(2), SeqNr(1))
    );
    assert!(store.unconfirmed.is_empty());
    for (m, token) in [("2", 2), ("3", 3), ("4", 4)] {
        pc.send_with_confirmation(msg(m), token, now).unwrap();
        run_store(&mut pc, &mut store, now);
    }
    pc.handle_frame(
        ConsumerFrame::Ack {
            confirmed: SeqNr(3),
        },
        now,
    )
    .unwrap();
    run_store(&mut pc, &mut store, now);
    assert_eq!(
        (store.current_seq_nr, store.highest_confirmed_seq_nr),
        (SeqNr(5), SeqNr(3))
    );
    assert_eq!(unconfirmed_seqs(&store), vec![4]);
    assert!(store.unconfirmed[0].ack);
}

// DPC-03
#[test]
fn with_a_durable_queue_the_reply_comes_after_storage() {
    let now = Instant::now();
    let mut store = DurableState::default();
    let mut pc = durable(&mut store, settings(), now);
    events(&mut pc);
    pc.send_with_confirmation(msg("1"), 1, now).unwrap();
    assert!(replies(&mut pc).is_empty(), "not before it is stored");
    run_store(&mut pc, &mut store, now);
    assert_eq!(
        replies(&mut pc),
        vec![1],
        "before the consumer confirmed anything"
    );
    pc.handle_frame(request(1, 10), now).unwrap();
    pc.send_with_confirmation(msg("2"), 2, now).unwrap();
    run_store(&mut pc, &mut store, now);
    assert_eq!(replies(&mut pc), vec![2]);
    pc.handle_frame(request(2, 10), now).unwrap();
    assert!(
        replies(&mut pc).is_empty(),
        "no second reply on confirmation"
    );
}

// DPC-04
#[test]
fn a_durable_controller_stores_each_chunk_before_sending_it() {
    let now = Instant::now();
    let mut store = DurableState::default();
    let mut pc = durable(&mut store, chunked(1), now);
    pc.send(msg("abc"), now).unwrap();
    run_store(&mut pc, &mut store, now);
    assert_eq!(store.current_seq_nr, SeqNr(2));
    assert_eq!(unconfirmed_seqs(&store), vec![1]);
    assert!(matches!(store.unconfirmed[0].payload, Payload::Chunk(_)));
    assert_eq!(transmitted(&mut pc).len(), 1);
    pc.handle_frame(request(0, 10), now).unwrap();
    run_store(&mut pc, &mut store, now);
    assert_eq!(transmitted(&mut pc), vec![(2, false), (3, false)]);
    assert_eq!(store.current_seq_nr, SeqNr(4));
    assert_eq!(unconfirmed_seqs(&store), vec![1, 2, 3]);
}

// DPC-05
#[test]
fn a_partly_stored_chunked_message_is_not_resent_after_a_restart() {
    let now = Instant::now();
    let chunk = |seq_nr: u64, first_chunk, last_chunk| MessageSent {
        payload: Payload::Chunk(Chunk {
            bytes: Bytes::from_static(b"x"),
            first_chunk,
            last_chunk,
        }),
        ..stored(seq_nr, "")
    };
    let mut store = DurableState {
        current_seq_nr: SeqNr(6),
        highest_confirmed_seq_nr: SeqNr(2),
        ..DurableState::default()
    };
    store.unconfirmed.extend([
        chunk(3, true, true),
        chunk(4, true, false),
        chunk(5, false, false),
    ]);
    // The queue cleans up on load, as every store does.
    store.cleanup_partial_chunked_messages();
    let mut pc = durable(&mut store, chunked(1), now);
    assert_eq!(transmitted(&mut pc), vec![(3, true)]);
    pc.handle_frame(request(3, 10), now).unwrap();
    assert!(transmitted(&mut pc).is_empty());
    assert_eq!(
        pc.current_seq_nr(),
        SeqNr(4),
        "the next message reuses seq nr 4"
    );
}

// DPC-06 and D-13 (pekko #2760)
#[test]
fn a_restart_with_nothing_unconfirmed_resumes_at_the_stored_seq_nr() {
    let now = Instant::now();
    let mut store = DurableState {
        current_seq_nr: SeqNr(5),
        highest_confirmed_seq_nr: SeqNr(4),
        ..DurableState::default()
    };
    let mut pc = durable(&mut store, settings(), now);
    assert_eq!(events(&mut pc), vec![request_next(5, 4)]);
    assert_eq!(pc.send(msg("m5"), now), Ok(SeqNr(5)));
    run_store(&mut pc, &mut store, now);
    assert_eq!(transmitted(&mut pc), vec![(5, true)]);
}

// D-03
#[test]
fn a_durable_queue_that_never_answers_fails_the_controller() {
    let now = Instant::now();
    let attempts = ProducerSettings {
        durable_queue: crate::delivery::settings::DurableQueueSettings {
            retry_attempts: 3,
            ..Default::default()
        },
        ..ProducerSettings::default()
    };
    let mut pc = Pc::with_durable_queue(ProducerId::new("p"), 1, attempts.clone());
    for expected in 1..=3 {
        assert_eq!(
            pc.poll_store(),
            Some(StoreRequest::LoadState { attempt: expected })
        );
        pc.handle_load_failed(expected);
    }
    assert_eq!(
        pc.failure(),
        Some(&ProducerError::Durable(DurableError::LoadFailed {
            attempts: 3
        }))
    );

    let mut store = DurableState::default();
    let mut pc = durable(&mut store, attempts, now);
    pc.send(msg("1"), now).unwrap();
    for expected in 1..=3 {
        let Some(StoreRequest::StoreMessageSent { sent, attempt }) = pc.poll_store() else {
            panic!("a store request")
        };
        assert_eq!((sent.seq_nr, attempt), (SeqNr(1), expected));
        pc.handle_store_failed(sent.seq_nr, attempt);
    }
    assert_eq!(
        pc.failure(),
        Some(&ProducerError::Durable(DurableError::StoreFailed {
            seq_nr: SeqNr(1),
            attempts: 3
        }))
    );
    assert!(transmitted(&mut pc).is_empty(), "nothing unstored is sent");
}

// A chunk's store fails: once before it was written, once after it was written (a timeout
// while the write went through). Each time the chunk itself is stored again, and the store
// ends up with every chunk exactly once.
#[test]
fn a_failed_store_of_a_later_chunk_retries_that_chunk() {
    let now = Instant::now();
    let mut store = DurableState::default();
    let mut pc = durable(&mut store, chunked(1), now);
    pc.handle_frame(request(0, 10), now).unwrap_or(());
    pc.send(msg("abc"), now).unwrap();
    let next_store = |pc: &mut Pc| match pc.poll_store() {
        Some(StoreRequest::StoreMessageSent { sent, attempt }) => (sent, attempt),
        other => panic!("a store request, got {other:?}"),
    };
    let (sent, _) = next_store(&mut pc);
    accept_message_sent(&mut store, sent).unwrap();
    pc.handle_message_stored(SeqNr(1), now);

    // Chunk 2 fails before it is written.
    let (sent, attempt) = next_store(&mut pc);
    assert_eq!((sent.seq_nr, attempt), (SeqNr(2), 1));
    pc.handle_store_failed(SeqNr(2), attempt);
    let (sent, attempt) = next_store(&mut pc);
    assert_eq!((sent.seq_nr, attempt), (SeqNr(2), 2), "the chunk itself");
    accept_message_sent(&mut store, sent).unwrap();
    pc.handle_message_stored(SeqNr(2), now);

    // Chunk 3 is written, but its answer times out.
    let (sent, attempt) = next_store(&mut pc);
    assert_eq!((sent.seq_nr, attempt), (SeqNr(3), 1));
    accept_message_sent(&mut store, sent).unwrap();
    pc.handle_store_failed(SeqNr(3), attempt);
    let (sent, attempt) = next_store(&mut pc);
    assert_eq!((sent.seq_nr, attempt), (SeqNr(3), 2));
    assert_eq!(accept_message_sent(&mut store, sent), Ok(false), "a no-op");
    pc.handle_message_stored(SeqNr(3), now);

    assert!(pc.failure().is_none());
    assert_eq!(unconfirmed_seqs(&store), vec![1, 2, 3]);
    assert_eq!(
        transmitted(&mut pc),
        vec![(1, true), (2, false), (3, false)]
    );
}

//! ConsumerController scenarios (docs/protocol.md, Test scenarios: CC-*, NET-*, D-*), each named by
//! its id.
use super::*;
use crate::testkit::Clock;

fn settings(window: u32) -> ConsumerSettings {
    ConsumerSettings {
        flow_control_window: window,
        resend_interval_min: Duration::from_secs(1),
        resend_interval_max: Duration::from_secs(2),
        only_flow_control: false,
    }
}

fn pc(incarnation: u64) -> ProducerRef {
    ProducerRef {
        id: ProducerId::new("p"),
        incarnation,
    }
}

fn msg(producer: &ProducerRef, seq_nr: u64, first: bool) -> SequencedMessage<u64> {
    SequencedMessage {
        producer: producer.clone(),
        seq_nr: SeqNr(seq_nr),
        payload: Payload::Message(seq_nr),
        first,
        ack: false,
    }
}

fn request(confirmed: u64, up_to: u64, via_timeout: bool) -> ConsumerFrame {
    ConsumerFrame::Request {
        confirmed: SeqNr(confirmed),
        request_up_to: SeqNr(up_to),
        support_resend: true,
        via_timeout,
    }
}

fn frames(cc: &mut ConsumerController<u64>) -> Vec<ConsumerFrame> {
    std::iter::from_fn(|| cc.poll_transmit())
        .map(|(_, f)| f)
        .collect()
}

fn delivered(cc: &mut ConsumerController<u64>) -> Vec<u64> {
    std::iter::from_fn(|| cc.poll_event())
        .filter_map(|e| match e {
            ConsumerEvent::Deliver(d) => Some(d.message),
            ConsumerEvent::Stopped => None,
        })
        .collect()
}

fn started(window: u32, now: Instant) -> ConsumerController<u64> {
    let mut cc = ConsumerController::new(settings(window), now);
    cc.start(now);
    cc
}

// CC-03
#[test]
fn sends_the_initial_request_and_retries_it_when_idle() {
    let mut clock = Clock::new();
    let p = pc(1);
    let mut cc = ConsumerController::new(settings(20), clock.now());
    cc.handle_message(msg(&p, 1, true), clock.now());
    assert!(frames(&mut cc).is_empty(), "stashed until Start");
    cc.start(clock.now());
    assert_eq!(frames(&mut cc), vec![request(0, 20, false)]);
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(clock.now()).unwrap();
    assert_eq!(frames(&mut cc), vec![request(1, 20, false)]);

    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    assert_eq!(frames(&mut cc), vec![request(1, 20, true)]);
}

// CC-04
#[test]
fn requests_more_after_half_the_window_is_confirmed() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    for n in 1..=9 {
        cc.handle_message(msg(&p, n, n == 1), now);
        cc.confirm(now).unwrap();
    }
    assert_eq!(
        frames(&mut cc),
        vec![request(0, 20, false), request(1, 20, false)]
    );
    cc.handle_message(msg(&p, 10, false), now);
    assert!(frames(&mut cc).is_empty());
    cc.confirm(now).unwrap();
    assert_eq!(frames(&mut cc), vec![request(10, 30, false)]);
}

// CC-05
#[test]
fn detects_a_gap_and_delivers_in_order_after_the_resend() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    for n in 1..=2 {
        cc.handle_message(msg(&p, n, n == 1), now);
        cc.confirm(now).unwrap();
    }
    frames(&mut cc);
    delivered(&mut cc);
    cc.handle_message(msg(&p, 5, false), now);
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(3) }]
    );
    for n in 3..=5 {
        cc.handle_message(msg(&p, n, false), now);
        cc.confirm(now).unwrap();
    }
    assert_eq!(delivered(&mut cc), vec![3, 4, 5]);
}

// CC-06 and D-05
#[test]
fn backs_off_request_retries_and_snaps_back_on_traffic() {
    let mut clock = Clock::new();
    let p = pc(1);
    let mut cc = started(20, clock.now());
    for n in 1..=2 {
        cc.handle_message(msg(&p, n, n == 1), clock.now());
        cc.confirm(clock.now()).unwrap();
    }
    frames(&mut cc);
    let t0 = clock.now();
    let mut retries = Vec::new();
    for _ in 0..4 {
        let at = cc.poll_timeout().unwrap();
        clock.advance(at - clock.now());
        cc.handle_timeout(clock.now());
        retries.push((clock.now() - t0, frames(&mut cc)));
    }
    let offsets: Vec<Duration> = retries.iter().map(|(d, _)| *d).collect();
    assert_eq!(
        offsets,
        vec![
            Duration::from_secs(1),
            Duration::from_millis(2500),
            Duration::from_millis(4500),
            Duration::from_millis(6500)
        ]
    );
    assert!(
        retries
            .iter()
            .all(|(_, f)| f == &vec![request(2, 20, true)])
    );

    cc.handle_message(msg(&p, 3, false), clock.now());
    cc.confirm(clock.now()).unwrap();
    assert_eq!(
        cc.poll_timeout(),
        Some(clock.now() + Duration::from_secs(1))
    );
}

// CC-07
#[test]
fn stashes_while_waiting_for_confirmation_and_drops_duplicates() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    cc.handle_message(msg(&p, 1, true), now);
    cc.confirm(now).unwrap();
    cc.handle_message(msg(&p, 2, false), now);
    cc.handle_message(msg(&p, 3, false), now);
    cc.handle_message(msg(&p, 4, false), now);
    assert_eq!(delivered(&mut cc), vec![1, 2]);
    cc.confirm(now).unwrap();
    assert_eq!(delivered(&mut cc), vec![3]);
    cc.confirm(now).unwrap();
    assert_eq!(delivered(&mut cc), vec![4]);
    cc.confirm(now).unwrap();
    for n in [5, 6, 7, 5, 6, 7, 8] {
        cc.handle_message(msg(&p, n, false), now);
    }
    let mut all = delivered(&mut cc);
    while cc.confirm(now).is_ok() {
        all.extend(delivered(&mut cc));
    }
    assert_eq!(all, vec![5, 6, 7, 8]);
}

// CC-09
#[test]
fn a_restarted_consumer_gets_the_outstanding_delivery_again() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    cc.handle_message(msg(&p, 1, true), now);
    cc.handle_message(msg(&p, 2, false), now);
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.start(now);
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(now).unwrap();
    assert_eq!(delivered(&mut cc), vec![2]);
}

// CC-12
#[test]
fn a_resent_first_message_is_delivered_once_but_a_new_producer_is_accepted() {
    let now = Instant::now();
    let p1 = pc(1);
    let mut cc = started(20, now);
    cc.handle_message(msg(&p1, 1, true), now);
    cc.handle_message(msg(&p1, 1, true), now);
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(now).unwrap();
    cc.handle_message(msg(&p1, 1, true), now);
    assert!(delivered(&mut cc).is_empty());
    frames(&mut cc);

    let p2 = pc(2);
    cc.handle_message(msg(&p2, 1, true), now);
    assert_eq!(delivered(&mut cc), vec![1]);
    let to_p2: Vec<ProducerRef> = std::iter::from_fn(|| cc.poll_transmit())
        .map(|(to, _)| to)
        .collect();
    assert_eq!(to_p2, vec![p2]);
}

// CC-13
#[test]
fn the_window_starts_at_the_first_message_of_each_producer() {
    let now = Instant::now();
    let mut cc = started(20, now);
    cc.handle_message(msg(&pc(1), 1, true), now);
    cc.confirm(now).unwrap();
    cc.handle_message(msg(&pc(2), 23, true), now);
    cc.confirm(now).unwrap();
    cc.handle_message(msg(&pc(3), 7, true), now);
    let requests: Vec<ConsumerFrame> = frames(&mut cc)
        .into_iter()
        .filter(|f| matches!(f, ConsumerFrame::Request { confirmed, .. } if *confirmed == SeqNr(0)))
        .collect();
    assert_eq!(
        requests,
        vec![
            request(0, 20, false),
            request(0, 42, false),
            request(0, 26, false)
        ]
    );
    assert_eq!(delivered(&mut cc), vec![1, 23, 7]);
}

// CC-14
#[test]
fn a_fresh_consumer_asks_for_everything_when_joining_mid_stream() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = ConsumerController::new(settings(20), now);
    cc.handle_message(msg(&p, 44, false), now);
    cc.handle_message(msg(&p, 41, true), now);
    cc.handle_message(msg(&p, 45, false), now);
    cc.start(now);
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
    assert!(delivered(&mut cc).is_empty());
    for n in 41..=46 {
        cc.handle_message(msg(&p, n, n == 41), now);
    }
    assert_eq!(frames(&mut cc), vec![request(0, 60, false)]);
    assert_eq!(delivered(&mut cc), vec![41]);
    cc.confirm(now).unwrap();
    assert_eq!(frames(&mut cc), vec![request(41, 60, false)]);
    let mut rest = delivered(&mut cc);
    while cc.confirm(now).is_ok() {
        rest.extend(delivered(&mut cc));
    }
    assert_eq!(rest, vec![42, 43, 44, 45, 46]);
}

/// A woken entity's fresh controller gets every message its producer had out: one Resend
/// asks for all of them; another per message would have the producer resend all again each time.
#[test]
fn a_fresh_consumer_asks_once_for_everything_while_the_rest_arrives() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    for n in 5..=7 {
        cc.handle_message(msg(&p, n, false), now);
    }
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
    cc.handle_message(msg(&p, 5, true), now);
    assert_eq!(delivered(&mut cc), vec![5]);
}

#[test]
fn a_fresh_consumer_repeats_its_lost_resend_from_zero() {
    let mut clock = Clock::new();
    let p = pc(1);
    let mut cc = started(20, clock.now());
    cc.handle_message(msg(&p, 5, false), clock.now());
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
}

// CC-16
#[test]
fn deliver_then_stop_delivers_everything_received_then_stops() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    cc.handle_message(msg(&p, 1, true), now);
    cc.confirm(now).unwrap();
    cc.handle_message(msg(&p, 2, false), now);
    cc.handle_message(msg(&p, 3, false), now);
    cc.handle_message(msg(&p, 4, false), now);
    cc.deliver_then_stop();
    cc.handle_message(msg(&p, 5, false), now);
    let mut all = delivered(&mut cc);
    frames(&mut cc);
    while cc.confirm(now).is_ok() {
        all.extend(delivered(&mut cc));
    }
    assert_eq!(all, vec![1, 2, 3, 4, 5]);
    assert!(cc.is_stopped());
    assert_eq!(
        frames(&mut cc).last(),
        Some(&ConsumerFrame::Ack {
            confirmed: SeqNr(5)
        })
    );
    assert_eq!(cc.poll_timeout(), None);
}

// CC-19
#[test]
fn only_flow_control_delivers_across_gaps() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = ConsumerController::new(
        ConsumerSettings {
            only_flow_control: true,
            ..settings(20)
        },
        now,
    );
    cc.start(now);
    for n in [1, 3, 4, 35] {
        cc.handle_message(msg(&p, n, n == 1), now);
        cc.confirm(now).unwrap();
    }
    assert_eq!(delivered(&mut cc), vec![1, 3, 4, 35]);
    assert!(frames(&mut cc).iter().all(|f| matches!(
        f,
        ConsumerFrame::Request {
            support_resend: false,
            ..
        } | ConsumerFrame::Ack { .. }
    )));
}

#[test]
fn confirming_with_nothing_outstanding_is_an_error_that_changes_nothing() {
    let now = Instant::now();
    let mut cc = started(20, now);
    assert_eq!(cc.confirm(now), Err(ConsumerError::NothingToConfirm));
    assert!(!cc.is_stopped());
}

// D-06
#[test]
fn an_odd_window_requests_after_integer_half() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(5, now);
    cc.handle_message(msg(&p, 1, true), now);
    cc.confirm(now).unwrap();
    frames(&mut cc);
    cc.handle_message(msg(&p, 2, false), now);
    cc.confirm(now).unwrap();
    assert!(frames(&mut cc).is_empty());
    cc.handle_message(msg(&p, 3, false), now);
    cc.confirm(now).unwrap();
    assert_eq!(frames(&mut cc), vec![request(3, 7, false)]);
}

fn chunk_msg(
    producer: &ProducerRef,
    seq_nr: u64,
    bytes: &'static [u8],
    first_chunk: bool,
    last_chunk: bool,
) -> SequencedMessage<u64> {
    SequencedMessage {
        producer: producer.clone(),
        seq_nr: SeqNr(seq_nr),
        payload: Payload::Chunk(crate::delivery::protocol::Chunk {
            bytes: Bytes::from_static(bytes),
            first_chunk,
            last_chunk,
        }),
        first: seq_nr == 1,
        ack: false,
    }
}

fn started_with_codec(window: u32, now: Instant) -> ConsumerController<u64> {
    let mut cc = ConsumerController::new(settings(window), now)
        .with_codec(Arc::new(crate::delivery::codec::JsonCodec));
    cc.start(now);
    cc
}

// CC-17
#[test]
fn collects_chunks_and_delivers_the_assembled_message() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started_with_codec(20, now);
    cc.handle_message(chunk_msg(&p, 1, b"1", true, false), now);
    assert_eq!(frames(&mut cc), vec![request(0, 20, false)]);
    cc.handle_message(chunk_msg(&p, 2, b"2", false, false), now);
    assert!(delivered(&mut cc).is_empty());
    cc.handle_message(chunk_msg(&p, 3, b"3", false, true), now);
    assert_eq!(delivered(&mut cc), vec![123]);
    cc.confirm(now).unwrap();
    assert_eq!(frames(&mut cc), vec![request(3, 22, false)]);
    let mut last = chunk_msg(&p, 5, b"5", false, true);
    last.ack = true;
    cc.handle_message(chunk_msg(&p, 4, b"4", true, false), now);
    cc.handle_message(last, now);
    assert_eq!(delivered(&mut cc), vec![45]);
    cc.confirm(now).unwrap();
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Ack {
            confirmed: SeqNr(5)
        }]
    );
}

// CC-18
#[test]
fn many_chunks_of_one_message_keep_the_window_open() {
    let mut clock = Clock::new();
    let p = pc(1);
    let mut cc = started_with_codec(20, clock.now());
    // 25 one-byte chunks: JSON whitespace, then the number 7.
    let bytes: &'static [u8] = b"                        7";
    let piece = |n: u64| &bytes[(n - 1) as usize..n as usize];
    let mut requests = Vec::new();
    for n in 1..=20u64 {
        cc.handle_message(chunk_msg(&p, n, piece(n), n == 1, false), clock.now());
        requests.extend(frames(&mut cc).into_iter().map(|f| (n, f)));
    }
    assert_eq!(
        requests,
        vec![
            (1, request(0, 20, false)),
            (10, request(0, 30, false)),
            (20, request(0, 40, false))
        ]
    );
    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    assert_eq!(frames(&mut cc), vec![request(0, 40, true)]);
    assert!(delivered(&mut cc).is_empty());
    for n in 21..=25u64 {
        cc.handle_message(chunk_msg(&p, n, piece(n), false, n == 25), clock.now());
    }
    assert_eq!(delivered(&mut cc), vec![7]);
}

#[test]
fn an_undecodable_chunked_message_stops_the_controller_with_a_reason() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started_with_codec(20, now);
    cc.handle_message(chunk_msg(&p, 1, b"not json", true, true), now);
    assert!(cc.is_stopped());
    assert!(matches!(
        cc.failure(),
        Some(ConsumerError::Undecodable {
            seq_nr: SeqNr(1),
            ..
        })
    ));
}

// Only flow control skips a lost message; when that is a first chunk, the rest of its
// message is discarded instead of being glued into garbage, and the next message is whole.
#[test]
fn chunks_without_the_start_of_their_message_are_discarded() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = ConsumerController::new(
        ConsumerSettings {
            only_flow_control: true,
            ..settings(20)
        },
        now,
    )
    .with_codec(Arc::new(crate::delivery::codec::JsonCodec));
    cc.start(now);
    cc.handle_message(chunk_msg(&p, 1, b"1", true, true), now);
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(now).unwrap();
    // 2 (first chunk of "23") is lost: 3 is its last chunk and must not become a message.
    cc.handle_message(chunk_msg(&p, 3, b"3", false, true), now);
    cc.handle_message(chunk_msg(&p, 4, b"4", true, false), now);
    cc.handle_message(chunk_msg(&p, 5, b"5", false, true), now);
    assert_eq!(delivered(&mut cc), vec![45]);
    assert!(cc.failure().is_none());
}

// A producer that never ends its chunked message cannot make the consumer grow without bound.
#[test]
fn an_endless_chunked_message_stops_the_controller() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started_with_codec(20, now);
    let piece = Bytes::from(vec![b' '; 1 << 20]);
    let limit = MAX_REASSEMBLED_BYTES as u64 >> 20;
    for n in 1..=limit + 1 {
        cc.handle_message(
            SequencedMessage {
                producer: p.clone(),
                seq_nr: SeqNr(n),
                payload: Payload::Chunk(crate::delivery::protocol::Chunk {
                    bytes: piece.clone(),
                    first_chunk: n == 1,
                    last_chunk: false,
                }),
                first: n == 1,
                ack: false,
            },
            now,
        );
    }
    assert!(cc.is_stopped());
    assert_eq!(
        cc.failure(),
        Some(&ConsumerError::TooLarge {
            seq_nr: SeqNr(limit + 1)
        })
    );
}

fn to(cc: &mut ConsumerController<u64>) -> Vec<(ProducerRef, ConsumerFrame)> {
    std::iter::from_fn(|| cc.poll_transmit()).collect()
}

// CC-01
#[test]
fn register_consumer_is_retried_before_start() {
    let mut clock = Clock::new();
    let p = pc(1);
    let mut cc = ConsumerController::new(settings(20), clock.now());
    cc.register_to_producer(p.clone(), clock.now());
    assert_eq!(
        to(&mut cc),
        vec![(p.clone(), ConsumerFrame::RegisterConsumer)]
    );
    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    assert_eq!(to(&mut cc), vec![(p, ConsumerFrame::RegisterConsumer)]);
}

// CC-02 and D-08
#[test]
fn registering_to_another_producer_retries_until_its_first_message_and_ignores_the_old() {
    let mut clock = Clock::new();
    let (p1, p2) = (pc(1), pc(2));
    let mut cc = started(20, clock.now());
    cc.handle_message(msg(&p1, 1, true), clock.now());
    to(&mut cc);
    cc.register_to_producer(p2.clone(), clock.now());
    assert_eq!(
        to(&mut cc),
        vec![(p2.clone(), ConsumerFrame::RegisterConsumer)]
    );
    cc.confirm(clock.now()).unwrap();
    to(&mut cc);
    // The old producer's next message is discarded while registering.
    cc.handle_message(msg(&p1, 2, false), clock.now());
    assert_eq!(delivered(&mut cc), vec![1]);
    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    assert_eq!(
        to(&mut cc),
        vec![(p2.clone(), ConsumerFrame::RegisterConsumer)]
    );
    // p2's first message ends the registering: no more RegisterConsumer.
    cc.handle_message(msg(&p2, 1, true), clock.now());
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(clock.now()).unwrap();
    to(&mut cc);
    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    assert!(
        to(&mut cc)
            .iter()
            .all(|(target, f)| *target == p2 && *f != ConsumerFrame::RegisterConsumer)
    );
}

// CC-08
#[test]
fn messages_that_ask_for_an_ack_get_one_on_confirmation() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    let with_ack = |n, ack| SequencedMessage {
        ack,
        ..msg(&p, n, n == 1)
    };
    cc.handle_message(with_ack(1, true), now);
    cc.confirm(now).unwrap();
    assert_eq!(
        frames(&mut cc),
        vec![request(0, 20, false), request(1, 20, false)]
    );
    for (n, ack) in [(2, true), (3, true), (4, false), (5, true)] {
        cc.handle_message(with_ack(n, ack), now);
        cc.confirm(now).unwrap();
        let expected = if ack {
            vec![ConsumerFrame::Ack {
                confirmed: SeqNr(n),
            }]
        } else {
            vec![]
        };
        assert_eq!(frames(&mut cc), expected, "seq {n}");
    }
}

// CC-10 and CC-15
#[test]
fn stopping_acks_what_was_confirmed_and_ends_the_controller() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = started(20, now);
    for n in 1..=2 {
        cc.handle_message(msg(&p, n, n == 1), now);
        cc.confirm(now).unwrap();
    }
    cc.handle_message(msg(&p, 3, false), now);
    frames(&mut cc);
    assert_eq!(delivered(&mut cc), vec![1, 2, 3]);
    cc.stop();
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Ack {
            confirmed: SeqNr(2)
        }]
    );
    assert!(cc.is_stopped());
    assert_eq!(cc.poll_event(), Some(ConsumerEvent::Stopped));
    cc.handle_message(msg(&p, 4, false), now);
    assert!(
        cc.poll_event().is_none(),
        "a stopped controller ignores input"
    );
}

// CC-11
#[test]
fn stopping_before_any_message_ends_the_controller_quietly() {
    let now = Instant::now();
    let mut cc = started(20, now);
    cc.stop();
    assert!(cc.is_stopped());
    assert!(frames(&mut cc).is_empty(), "no producer to ack");
    assert_eq!(cc.poll_event(), Some(ConsumerEvent::Stopped));
}

// D-04
#[test]
fn a_full_stash_drops_and_the_retry_timer_asks_for_the_rest() {
    let mut clock = Clock::new();
    let p = pc(1);
    let mut cc = started(3, clock.now());
    cc.handle_message(msg(&p, 1, true), clock.now());
    for n in 2..=5 {
        cc.handle_message(msg(&p, n, false), clock.now());
    }
    let mut seen = delivered(&mut cc);
    while cc.confirm(clock.now()).is_ok() {
        seen.extend(delivered(&mut cc));
    }
    assert_eq!(seen, vec![1, 2, 3, 4], "5 did not fit the stash of 3");
    frames(&mut cc);
    clock.advance(Duration::from_secs(1));
    cc.handle_timeout(clock.now());
    // A Request via timeout makes the producer resend its unconfirmed tail (PC-03).
    assert!(matches!(
        frames(&mut cc).as_slice(),
        [ConsumerFrame::Request {
            confirmed: SeqNr(4),
            via_timeout: true,
            ..
        }]
    ));
}

// Settings built in code skip config validation: a window below the minimum is raised to it
// (smaller ones stall) and a zero retry interval still leaves time between retries.
#[test]
fn settings_from_code_are_bounded_to_values_that_keep_delivery_moving() {
    let now = Instant::now();
    let p = pc(1);
    let mut cc = ConsumerController::new(
        ConsumerSettings {
            resend_interval_min: Duration::ZERO,
            resend_interval_max: Duration::ZERO,
            ..settings(1)
        },
        now,
    );
    cc.start(now);
    cc.handle_message(msg(&p, 1, true), now);
    assert_eq!(
        frames(&mut cc),
        vec![request(0, u64::from(MIN_FLOW_CONTROL_WINDOW), false)]
    );
    assert!(cc.poll_timeout().is_some_and(|at| at > now));
}

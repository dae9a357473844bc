//! ConsumerController scenarios (docs/protocol.md, Test scenarios: CC-*, NET-*, D-*), each named by
//! its id.
use super::*;

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

fn started(window: u32) -> ConsumerController<u64> {
    let mut cc = ConsumerController::new(settings(window), Instant::now());
    cc.start(Instant::now());
    cc
}

// CC-03
#[tokio::test(start_paused = true)]
async fn sends_the_initial_request_and_retries_it_when_idle() {
    let p = pc(1);
    let mut cc = ConsumerController::new(settings(20), Instant::now());
    cc.handle_message(msg(&p, 1, true), Instant::now());
    assert!(frames(&mut cc).is_empty(), "stashed until Start");
    cc.start(Instant::now());
    assert_eq!(frames(&mut cc), vec![request(0, 20, false)]);
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(frames(&mut cc), vec![request(1, 20, false)]);

    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
    assert_eq!(frames(&mut cc), vec![request(1, 20, true)]);
}

// CC-04
#[tokio::test(start_paused = true)]
async fn requests_more_after_half_the_window_is_confirmed() {
    let p = pc(1);
    let mut cc = started(20);
    for n in 1..=9 {
        cc.handle_message(msg(&p, n, n == 1), Instant::now());
        cc.confirm(Instant::now()).unwrap();
    }
    assert_eq!(
        frames(&mut cc),
        vec![request(0, 20, false), request(1, 20, false)]
    );
    cc.handle_message(msg(&p, 10, false), Instant::now());
    assert!(frames(&mut cc).is_empty());
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(frames(&mut cc), vec![request(10, 30, false)]);
}

// CC-05
#[tokio::test(start_paused = true)]
async fn detects_a_gap_and_delivers_in_order_after_the_resend() {
    let p = pc(1);
    let mut cc = started(20);
    for n in 1..=2 {
        cc.handle_message(msg(&p, n, n == 1), Instant::now());
        cc.confirm(Instant::now()).unwrap();
    }
    frames(&mut cc);
    delivered(&mut cc);
    cc.handle_message(msg(&p, 5, false), Instant::now());
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(3) }]
    );
    for n in 3..=5 {
        cc.handle_message(msg(&p, n, false), Instant::now());
        cc.confirm(Instant::now()).unwrap();
    }
    assert_eq!(delivered(&mut cc), vec![3, 4, 5]);
}

// CC-06 and D-05
#[tokio::test(start_paused = true)]
async fn backs_off_request_retries_and_snaps_back_on_traffic() {
    let p = pc(1);
    let mut cc = started(20);
    for n in 1..=2 {
        cc.handle_message(msg(&p, n, n == 1), Instant::now());
        cc.confirm(Instant::now()).unwrap();
    }
    frames(&mut cc);
    let t0 = Instant::now();
    let mut retries = Vec::new();
    for _ in 0..4 {
        let at = cc.poll_timeout().unwrap();
        tokio::time::advance(at - Instant::now()).await;
        cc.handle_timeout(Instant::now());
        retries.push((Instant::now() - t0, frames(&mut cc)));
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

    cc.handle_message(msg(&p, 3, false), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(
        cc.poll_timeout(),
        Some(Instant::now() + Duration::from_secs(1))
    );
}

// CC-07
#[tokio::test(start_paused = true)]
async fn stashes_while_waiting_for_confirmation_and_drops_duplicates() {
    let p = pc(1);
    let mut cc = started(20);
    cc.handle_message(msg(&p, 1, true), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    cc.handle_message(msg(&p, 2, false), Instant::now());
    cc.handle_message(msg(&p, 3, false), Instant::now());
    cc.handle_message(msg(&p, 4, false), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1, 2]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(delivered(&mut cc), vec![3]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(delivered(&mut cc), vec![4]);
    cc.confirm(Instant::now()).unwrap();
    for n in [5, 6, 7, 5, 6, 7, 8] {
        cc.handle_message(msg(&p, n, false), Instant::now());
    }
    let mut all = delivered(&mut cc);
    while cc.confirm(Instant::now()).is_ok() {
        all.extend(delivered(&mut cc));
    }
    assert_eq!(all, vec![5, 6, 7, 8]);
}

// CC-09
#[tokio::test(start_paused = true)]
async fn a_restarted_consumer_gets_the_outstanding_delivery_again() {
    let p = pc(1);
    let mut cc = started(20);
    cc.handle_message(msg(&p, 1, true), Instant::now());
    cc.handle_message(msg(&p, 2, false), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.start(Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(delivered(&mut cc), vec![2]);
}

// CC-12
#[tokio::test(start_paused = true)]
async fn a_resent_first_message_is_delivered_once_but_a_new_producer_is_accepted() {
    let p1 = pc(1);
    let mut cc = started(20);
    cc.handle_message(msg(&p1, 1, true), Instant::now());
    cc.handle_message(msg(&p1, 1, true), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(Instant::now()).unwrap();
    cc.handle_message(msg(&p1, 1, true), Instant::now());
    assert!(delivered(&mut cc).is_empty());
    frames(&mut cc);

    let p2 = pc(2);
    cc.handle_message(msg(&p2, 1, true), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    let to_p2: Vec<ProducerRef> = std::iter::from_fn(|| cc.poll_transmit())
        .map(|(to, _)| to)
        .collect();
    assert_eq!(to_p2, vec![p2]);
}

// CC-13
#[tokio::test(start_paused = true)]
async fn the_window_starts_at_the_first_message_of_each_producer() {
    let mut cc = started(20);
    cc.handle_message(msg(&pc(1), 1, true), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    cc.handle_message(msg(&pc(2), 23, true), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    cc.handle_message(msg(&pc(3), 7, true), Instant::now());
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
#[tokio::test(start_paused = true)]
async fn a_fresh_consumer_asks_for_everything_when_joining_mid_stream() {
    let p = pc(1);
    let mut cc = ConsumerController::new(settings(20), Instant::now());
    cc.handle_message(msg(&p, 44, false), Instant::now());
    cc.handle_message(msg(&p, 41, true), Instant::now());
    cc.handle_message(msg(&p, 45, false), Instant::now());
    cc.start(Instant::now());
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
    assert!(delivered(&mut cc).is_empty());
    for n in 41..=46 {
        cc.handle_message(msg(&p, n, n == 41), Instant::now());
    }
    assert_eq!(frames(&mut cc), vec![request(0, 60, false)]);
    assert_eq!(delivered(&mut cc), vec![41]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(frames(&mut cc), vec![request(41, 60, false)]);
    let mut rest = delivered(&mut cc);
    while cc.confirm(Instant::now()).is_ok() {
        rest.extend(delivered(&mut cc));
    }
    assert_eq!(rest, vec![42, 43, 44, 45, 46]);
}

#[tokio::test(start_paused = true)]
async fn a_fresh_consumer_repeats_its_lost_resend_from_zero() {
    let p = pc(1);
    let mut cc = started(20);
    cc.handle_message(msg(&p, 5, false), Instant::now());
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Resend { from: SeqNr(0) }]
    );
}

// CC-16
#[tokio::test(start_paused = true)]
async fn deliver_then_stop_delivers_everything_received_then_stops() {
    let p = pc(1);
    let mut cc = started(20);
    cc.handle_message(msg(&p, 1, true), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    cc.handle_message(msg(&p, 2, false), Instant::now());
    cc.handle_message(msg(&p, 3, false), Instant::now());
    cc.handle_message(msg(&p, 4, false), Instant::now());
    cc.deliver_then_stop();
    cc.handle_message(msg(&p, 5, false), Instant::now());
    let mut all = delivered(&mut cc);
    frames(&mut cc);
    while cc.confirm(Instant::now()).is_ok() {
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
#[tokio::test(start_paused = true)]
async fn only_flow_control_delivers_across_gaps() {
    let p = pc(1);
    let mut cc = ConsumerController::new(
        ConsumerSettings {
            only_flow_control: true,
            ..settings(20)
        },
        Instant::now(),
    );
    cc.start(Instant::now());
    for n in [1, 3, 4, 35] {
        cc.handle_message(msg(&p, n, n == 1), Instant::now());
        cc.confirm(Instant::now()).unwrap();
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

#[tokio::test(start_paused = true)]
async fn confirming_with_nothing_outstanding_is_an_error_that_changes_nothing() {
    let mut cc = started(20);
    assert_eq!(
        cc.confirm(Instant::now()),
        Err(ConsumerError::NothingToConfirm)
    );
    assert!(!cc.is_stopped());
}

// D-06
#[tokio::test(start_paused = true)]
async fn an_odd_window_requests_after_integer_half() {
    let p = pc(1);
    let mut cc = started(5);
    cc.handle_message(msg(&p, 1, true), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    frames(&mut cc);
    cc.handle_message(msg(&p, 2, false), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    assert!(frames(&mut cc).is_empty());
    cc.handle_message(msg(&p, 3, false), Instant::now());
    cc.confirm(Instant::now()).unwrap();
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

fn started_with_codec(window: u32) -> ConsumerController<u64> {
    let mut cc = ConsumerController::new(settings(window), Instant::now())
        .with_codec(Arc::new(crate::delivery::codec::JsonCodec));
    cc.start(Instant::now());
    cc
}

// CC-17
#[tokio::test(start_paused = true)]
async fn collects_chunks_and_delivers_the_assembled_message() {
    let p = pc(1);
    let mut cc = started_with_codec(20);
    cc.handle_message(chunk_msg(&p, 1, b"1", true, false), Instant::now());
    assert_eq!(frames(&mut cc), vec![request(0, 20, false)]);
    cc.handle_message(chunk_msg(&p, 2, b"2", false, false), Instant::now());
    assert!(delivered(&mut cc).is_empty());
    cc.handle_message(chunk_msg(&p, 3, b"3", false, true), Instant::now());
    assert_eq!(delivered(&mut cc), vec![123]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(frames(&mut cc), vec![request(3, 22, false)]);
    let mut last = chunk_msg(&p, 5, b"5", false, true);
    last.ack = true;
    cc.handle_message(chunk_msg(&p, 4, b"4", true, false), Instant::now());
    cc.handle_message(last, Instant::now());
    assert_eq!(delivered(&mut cc), vec![45]);
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(
        frames(&mut cc),
        vec![ConsumerFrame::Ack {
            confirmed: SeqNr(5)
        }]
    );
}

// CC-18
#[tokio::test(start_paused = true)]
async fn many_chunks_of_one_message_keep_the_window_open() {
    let p = pc(1);
    let mut cc = started_with_codec(20);
    // 25 one-byte chunks: JSON whitespace, then the number 7.
    let bytes: &'static [u8] = b"                        7";
    let piece = |n: u64| &bytes[(n - 1) as usize..n as usize];
    let mut requests = Vec::new();
    for n in 1..=20u64 {
        cc.handle_message(chunk_msg(&p, n, piece(n), n == 1, false), Instant::now());
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
    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
    assert_eq!(frames(&mut cc), vec![request(0, 40, true)]);
    assert!(delivered(&mut cc).is_empty());
    for n in 21..=25u64 {
        cc.handle_message(chunk_msg(&p, n, piece(n), false, n == 25), Instant::now());
    }
    assert_eq!(delivered(&mut cc), vec![7]);
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_chunked_message_stops_the_controller_with_a_reason() {
    let p = pc(1);
    let mut cc = started_with_codec(20);
    cc.handle_message(chunk_msg(&p, 1, b"not json", true, true), Instant::now());
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
#[tokio::test(start_paused = true)]
async fn chunks_without_the_start_of_their_message_are_discarded() {
    let p = pc(1);
    let mut cc = ConsumerController::new(
        ConsumerSettings {
            only_flow_control: true,
            ..settings(20)
        },
        Instant::now(),
    )
    .with_codec(Arc::new(crate::delivery::codec::JsonCodec));
    cc.start(Instant::now());
    cc.handle_message(chunk_msg(&p, 1, b"1", true, true), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(Instant::now()).unwrap();
    // 2 (first chunk of "23") is lost: 3 is its last chunk and must not become a message.
    cc.handle_message(chunk_msg(&p, 3, b"3", false, true), Instant::now());
    cc.handle_message(chunk_msg(&p, 4, b"4", true, false), Instant::now());
    cc.handle_message(chunk_msg(&p, 5, b"5", false, true), Instant::now());
    assert_eq!(delivered(&mut cc), vec![45]);
    assert!(cc.failure().is_none());
}

// A producer that never ends its chunked message cannot make the consumer grow without bound.
#[tokio::test(start_paused = true)]
async fn an_endless_chunked_message_stops_the_controller() {
    let p = pc(1);
    let mut cc = started_with_codec(20);
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
            Instant::now(),
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
#[tokio::test(start_paused = true)]
async fn register_consumer_is_retried_before_start() {
    let p = pc(1);
    let mut cc = ConsumerController::new(settings(20), Instant::now());
    cc.register_to_producer(p.clone(), Instant::now());
    assert_eq!(
        to(&mut cc),
        vec![(p.clone(), ConsumerFrame::RegisterConsumer)]
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
    assert_eq!(to(&mut cc), vec![(p, ConsumerFrame::RegisterConsumer)]);
}

// CC-02 and D-08
#[tokio::test(start_paused = true)]
async fn registering_to_another_producer_retries_until_its_first_message_and_ignores_the_old() {
    let (p1, p2) = (pc(1), pc(2));
    let mut cc = started(20);
    cc.handle_message(msg(&p1, 1, true), Instant::now());
    to(&mut cc);
    cc.register_to_producer(p2.clone(), Instant::now());
    assert_eq!(
        to(&mut cc),
        vec![(p2.clone(), ConsumerFrame::RegisterConsumer)]
    );
    cc.confirm(Instant::now()).unwrap();
    to(&mut cc);
    // The old producer's next message is discarded while registering.
    cc.handle_message(msg(&p1, 2, false), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
    assert_eq!(
        to(&mut cc),
        vec![(p2.clone(), ConsumerFrame::RegisterConsumer)]
    );
    // p2's first message ends the registering: no more RegisterConsumer.
    cc.handle_message(msg(&p2, 1, true), Instant::now());
    assert_eq!(delivered(&mut cc), vec![1]);
    cc.confirm(Instant::now()).unwrap();
    to(&mut cc);
    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
    assert!(
        to(&mut cc)
            .iter()
            .all(|(target, f)| *target == p2 && *f != ConsumerFrame::RegisterConsumer)
    );
}

// CC-08
#[tokio::test(start_paused = true)]
async fn messages_that_ask_for_an_ack_get_one_on_confirmation() {
    let p = pc(1);
    let mut cc = started(20);
    let with_ack = |n, ack| SequencedMessage {
        ack,
        ..msg(&p, n, n == 1)
    };
    cc.handle_message(with_ack(1, true), Instant::now());
    cc.confirm(Instant::now()).unwrap();
    assert_eq!(
        frames(&mut cc),
        vec![request(0, 20, false), request(1, 20, false)]
    );
    for (n, ack) in [(2, true), (3, true), (4, false), (5, true)] {
        cc.handle_message(with_ack(n, ack), Instant::now());
        cc.confirm(Instant::now()).unwrap();
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
#[tokio::test(start_paused = true)]
async fn stopping_acks_what_was_confirmed_and_ends_the_controller() {
    let p = pc(1);
    let mut cc = started(20);
    for n in 1..=2 {
        cc.handle_message(msg(&p, n, n == 1), Instant::now());
        cc.confirm(Instant::now()).unwrap();
    }
    cc.handle_message(msg(&p, 3, false), Instant::now());
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
    cc.handle_message(msg(&p, 4, false), Instant::now());
    assert!(
        cc.poll_event().is_none(),
        "a stopped controller ignores input"
    );
}

// CC-11
#[tokio::test(start_paused = true)]
async fn stopping_before_any_message_ends_the_controller_quietly() {
    let mut cc = started(20);
    cc.stop();
    assert!(cc.is_stopped());
    assert!(frames(&mut cc).is_empty(), "no producer to ack");
    assert_eq!(cc.poll_event(), Some(ConsumerEvent::Stopped));
}

// D-04
#[tokio::test(start_paused = true)]
async fn a_full_stash_drops_and_the_retry_timer_asks_for_the_rest() {
    let p = pc(1);
    let mut cc = started(3);
    cc.handle_message(msg(&p, 1, true), Instant::now());
    for n in 2..=5 {
        cc.handle_message(msg(&p, n, false), Instant::now());
    }
    let mut seen = delivered(&mut cc);
    while cc.confirm(Instant::now()).is_ok() {
        seen.extend(delivered(&mut cc));
    }
    assert_eq!(seen, vec![1, 2, 3, 4], "5 did not fit the stash of 3");
    frames(&mut cc);
    tokio::time::advance(Duration::from_secs(1)).await;
    cc.handle_timeout(Instant::now());
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
#[tokio::test(start_paused = true)]
async fn settings_from_code_are_bounded_to_values_that_keep_delivery_moving() {
    let p = pc(1);
    let mut cc = ConsumerController::new(
        ConsumerSettings {
            resend_interval_min: Duration::ZERO,
            resend_interval_max: Duration::ZERO,
            ..settings(1)
        },
        Instant::now(),
    );
    cc.start(Instant::now());
    cc.handle_message(msg(&p, 1, true), Instant::now());
    assert_eq!(
        frames(&mut cc),
        vec![request(0, u64::from(MIN_FLOW_CONTROL_WINDOW), false)]
    );
    assert!(cc.poll_timeout().is_some_and(|at| at > Instant::now()));
}

//! Dead-letter redrive: list what the bridge dead-lettered, each with its reason, and replay
//! chosen dead letters the way a producer publishes them.
//!
//! A walk takes the dead-letter queue's messages one by one with `basic.get` and holds each
//! unacked, so it sees every message once; it ends after the messages that were ready when it
//! began (a replayed message dead-lettered again meanwhile waits for the next walk instead of
//! being replayed in a loop). Whatever it does not replay is requeued when it ends (RabbitMQ
//! puts requeued messages back in their places). A
//! replayed dead letter is acked, which removes it, only after the broker confirmed its copy: a
//! crash in between leaves the message in both queues, never in neither, and its entity
//! recognises the second copy by its order id.
//!
//! [`Judge`] decides about each dead letter without I/O; [`Redrive`] is the walk.

use std::marker::PhantomData;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::dead_letter::{SOURCE_QUEUE_HEADER, copy_properties};
use crate::amqp::headers;
use crate::amqp::publisher::publish_confirmed;
use crate::amqp::topology::dead_letter_queue;
use crate::amqp::{AmqpError, AmqpSettings, ERROR_HEADER};
use crate::bridge::settings::BridgeSettings;
use crate::entity::EntityMessage;

/// Header that counts how often a message was replayed from the dead-letter queue.
pub const REPLAYS_HEADER: &str = "x-warren-replays";

/// Header that keeps, on a replayed message, the reason it had been dead-lettered for.
pub const REPLAYED_ERROR_HEADER: &str = "x-warren-replayed-error";

/// Headers the broker adds when it dead-letters a message itself (a quorum queue's delivery
/// limit); a replay drops them with Warren's own, so the copy starts afresh.
const BROKER_DEATH_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Longest wait for the broker to confirm a replayed copy.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Characters of a body shown when dead letters are listed.
const PREVIEW_CHARS: usize = 120;

/// One dead letter, as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Its `message_id` property, if the publisher set one.
    pub message_id: Option<String>,
    /// Why it was dead-lettered: Warren's `x-warren-error`, or the broker's own reason.
    pub reason: String,
    /// The queue it was consumed from, if known.
    pub source_queue: Option<String>,
    /// How often it was replayed before.
    pub replays: u32,
    /// Its body's size.
    pub body_bytes: usize,
    /// The start of its body, escaped, for a human to recognise it.
    pub body_preview: String,
}

impl DeadLetter {
    /// Reads what Warren (or the broker) recorded on a dead letter.
    pub fn read(body: &[u8], properties: &BasicProperties) -> Self {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty).inner();
        let death = headers.get("x-death").and_then(first_death);
        let reason = headers
            .get(ERROR_HEADER)
            .and_then(text)
            .or_else(|| {
                let reason = death.and_then(|d| d.inner().get("reason")).and_then(text)?;
                Some(format!("dead-lettered by the broker: {reason}"))
            })
            .unwrap_or_else(|| "no reason recorded".to_owned());
        let source_queue = headers
            .get(SOURCE_QUEUE_HEADER)
            .and_then(text)
            .or_else(|| death.and_then(|d| d.inner().get("queue")).and_then(text));
        let preview: String = String::from_utf8_lossy(body)
            .chars()
            .take(PREVIEW_CHARS)
            .flat_map(char::escape_debug)
            .collect();
        DeadLetter {
            message_id: properties.message_id().as_ref().map(|id| id.to_string()),
            reason,
            source_queue,
            replays: headers.get(REPLAYS_HEADER).and_then(count).unwrap_or(0),
            body_bytes: body.len(),
            body_preview: preview,
        }
    }

    /// The reason without its particulars (the text before the first `": "`), to group by.
    pub fn reason_kind(&self) -> &str {
        self.reason
            .split_once(": ")
            .map_or(self.reason.as_str(), |(kind, _)| kind)
    }
}

fn first_death(value: &AMQPValue) -> Option<&FieldTable> {
    match value {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|death| match death {
            AMQPValue::FieldTable(table) => Some(table),
            _ => None,
        }),
        _ => None,
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    headers::text(value).map(str::to_owned)
}

fn count(value: &AMQPValue) -> Option<u32> {
    match value {
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// Which dead letters a replay takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only those whose reason contains this text.
    pub reason: Option<String>,
    /// At most this many.
    pub count: Option<usize>,
    /// Replay those that would fail decoding again, too (a fixed consumer may take them).
    pub force: bool,
}

/// Where a replayed copy is published: an exchange and a routing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The exchange (`""`: the default exchange, routing by queue name).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

/// What a replay does with one dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Publish a copy there, then remove the dead letter.
    Replay(Route),
    /// Outside the selection: it stays.
    NotSelected,
    /// Selected, but it stays, for this reason.
    Refused(String),
}

/// Decides, without I/O, which dead letters a replay takes and where each goes.
pub struct Judge<'a, M> {
    selection: Selection,
    amqp: &'a AmqpSettings,
    bridge: &'a BridgeSettings,
    replays: usize,
    message: PhantomData<fn() -> M>,
}

impl<'a, M: EntityMessage> Judge<'a, M> {
    /// A judge for `selection` on the topology of `amqp`, decoding as the bridge of `bridge`.
    pub fn new(selection: Selection, amqp: &'a AmqpSettings, bridge: &'a BridgeSettings) -> Self {
        Judge {
            selection,
            amqp,
            bridge,
            replays: 0,
            message: PhantomData,
        }
    }

    /// Whether the selection's count is used up: nothing more will be replayed.
    pub fn is_done(&self) -> bool {
        self.selection
            .count
            .is_some_and(|count| self.replays >= count)
    }

    /// The verdict on one dead letter. A message that decodes goes where a producer would
    /// publish it (its entity's partition); one the bridge would dead-letter again for the
    /// same decode failure is refused unless forced, and then goes back to its source queue.
    pub fn judge(&mut self, letter: &DeadLetter, body: &[u8]) -> Verdict {
        let wanted = self
            .selection
            .reason
            .as_ref()
            .is_none_or(|text| letter.reason.contains(text.as_str()));
        if !wanted || self.is_done() {
            return Verdict::NotSelected;
        }
        let route = match self.bridge.decode::<M>(body) {
            Ok(message) => {
                let entity = message.entity_id();
                let (exchange, routing_key) = self.amqp.publish_target(entity.as_str());
                Route {
                    exchange,
                    routing_key: routing_key.to_owned(),
                }
            }
            Err(invalid) if !self.selection.force => {
                return Verdict::Refused(format!(
                    "would be dead-lettered again ({invalid}); --force replays it anyway"
                ));
            }
            Err(_) => match &letter.source_queue {
                Some(queue) if self.amqp.source_queues().contains(queue) => Route {
                    exchange: String::new(),
                    routing_key: queue.clone(),
                },
                other => {
                    return Verdict::Refused(format!(
                        "it does not decode and its source queue ({}) is not one of this topology's",
                        other.as_deref().unwrap_or("unknown")
                    ));
                }
            },
        };
        self.replays += 1;
        Verdict::Replay(route)
    }
}

/// A replayed copy's properties: the dead letter's, with the dead-lettering headers replaced
/// by a replay count and the reason it had been dead-lettered for.
pub fn replay_properties(original: &BasicProperties, letter: &DeadLetter) -> BasicProperties {
    let mut headers = FieldTable::default();
    let original_headers = original.headers().as_ref().map(FieldTable::inner);
    for (name, value) in original_headers.into_iter().flatten() {
        let name_str = name.as_str();
        if name_str != ERROR_HEADER
            && name_str != SOURCE_QUEUE_HEADER
            && !BROKER_DEATH_HEADERS.contains(&name_str)
        {
            headers.insert(name.clone(), value.clone());
        }
    }
    headers.insert(
        REPLAYS_HEADER.into(),
        AMQPValue::LongUInt(letter.replays.saturating_add(1)),
    );
    headers.insert(
        REPLAYED_ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(letter.reason.as_str())),
    );
    copy_properties(original).with_headers(headers)
}

/// What a listing found.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The dead letters looked at, oldest first.
    pub letters: Vec<DeadLetter>,
    /// Dead letters left unlisted beyond the limit.
    pub unlisted: u32,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters replayed (copy confirmed, then removed).
    pub replayed: usize,
    /// Dead letters looked at but outside the selection, left in place (a replay whose count
    /// is used up does not look at the rest).
    pub not_selected: usize,
    /// Selected dead letters left in place, each with why.
    pub refused: Vec<(DeadLetter, String)>,
}

/// How many of the messages ready when a walk began it has yet to take.
#[derive(Default)]
struct Walk {
    left: Option<u32>,
}

/// A walk over one queue's dead letters, on a confirm-mode channel of its own.
pub struct Redrive {
    channel: Channel,
    dead_letter_queue: ShortString,
}

impl Redrive {
    /// Opens the channel on the existing dead-letter queue of `amqp`'s queue: a passive
    /// declare, so a mistyped queue name fails (the broker says NOT_FOUND) instead of creating
    /// a topology, and the queue's type and arguments need not be repeated.
    pub async fn open(connection: &Connection, amqp: &AmqpSettings) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        let dead_letter_queue = ShortString::from(dead_letter_queue(&amqp.queue).as_str());
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(dead_letter_queue.clone(), passive, FieldTable::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Redrive {
            channel,
            dead_letter_queue,
        })
    }

    /// Lists up to `limit` dead letters, oldest first, and leaves all of them in place.
    pub async fn list(&self, limit: usize) -> Result<Listing, AmqpError> {
        let mut listing = Listing::default();
        let mut last_tag = None;
        let mut walk = Walk::default();
        while listing.letters.len() < limit {
            let Some(message) = self.take(&mut walk).await? else {
                break;
            };
            let delivery = message.delivery;
            last_tag = Some(delivery.delivery_tag);
            listing.unlisted = message.message_count;
            let letter = DeadLetter::read(&delivery.data, &delivery.properties);
            listing.letters.push(letter);
        }
        self.put_back(last_tag).await?;
        Ok(listing)
    }

    /// Replays what `judge` selects: each copy is published with a mandatory flag and
    /// confirmed before its dead letter is removed. Stops at the first failure, leaving the
    /// dead letter at hand in place.
    pub async fn replay<M: EntityMessage>(
        &self,
        judge: &mut Judge<'_, M>,
    ) -> Result<ReplayReport, AmqpError> {
        let mut report = ReplayReport::default();
        let mut last_held = None;
        let mut walk = Walk::default();
        while !judge.is_done() {
            let Some(message) = self.take(&mut walk).await? else {
                break;
            };
            let delivery = message.delivery;
            let letter = DeadLetter::read(&delivery.data, &delivery.properties);
            match judge.judge(&letter, &delivery.data) {
                Verdict::Replay(route) => {
                    let properties = replay_properties(&delivery.properties, &letter);
                    if let Err(error) = self.publish(&route, &delivery.data, properties).await {
                        last_held = Some(delivery.delivery_tag);
                        self.put_back(last_held).await?;
                        return Err(error);
                    }
                    self.channel
                        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                        .await?;
                    report.replayed += 1;
                }
                Verdict::NotSelected => {
                    last_held = Some(delivery.delivery_tag);
                    report.not_selected += 1;
                }
                Verdict::Refused(why) => {
                    last_held = Some(delivery.delivery_tag);
                    report.refused.push((letter, why));
                }
            }
        }
        self.put_back(last_held).await?;
        Ok(report)
    }

    /// The next ready dead letter of `walk`, held unacked; `None` once the messages ready when
    /// it began are taken.
    async fn take(
        &self,
        walk: &mut Walk,
    ) -> Result<Option<lapin::message::BasicGetMessage>, AmqpError> {
        if walk.left == Some(0) {
            return Ok(None);
        }
        let message = self
            .channel
            .basic_get(
                self.dead_letter_queue.clone(),
                BasicGetOptions { no_ack: false },
            )
            .await?;
        if let Some(message) = &message {
            // The first answer says how many more were ready then; later arrivals queue
            // behind them.
            let left = walk.left.unwrap_or(message.message_count.saturating_add(1));
            walk.left = Some(left.saturating_sub(1));
        }
        Ok(message)
    }

    /// Requeues every dead letter still held, up to the delivery tag `last` (one nack with
    /// `multiple`: the acked ones are settled already).
    async fn put_back(&self, last: Option<u64>) -> Result<(), AmqpError> {
        if let Some(tag) = last {
            let options = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            self.channel.basic_nack(tag, options).await?;
        }
        Ok(())
    }

    /// Publishes one replayed copy and waits (up to [`CONFIRM_TIMEOUT`]) for its confirm.
    async fn publish(
        &self,
        route: &Route,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let publish = publish_confirmed(
            &self.channel,
            ShortString::from(route.exchange.as_str()),
            ShortString::from(route.routing_key.as_str()),
            body,
            properties,
        );
        tokio::time::timeout(CONFIRM_TIMEOUT, publish)
            .await
            .unwrap_or(Err(AmqpError::Timeout(CONFIRM_TIMEOUT)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::{EntityId, InvalidMessage};
    use lapin::types::FieldArray;

    /// A message whose body is its entity id; an empty body does not decode.
    struct ById(EntityId);

    impl EntityMessage for ById {
        fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
            match std::str::from_utf8(body) {
                Ok(id) if !id.is_empty() => Ok(ById(EntityId::new(id))),
                _ => Err(InvalidMessage::Malformed("empty".to_owned())),
            }
        }
        fn entity_id(&self) -> EntityId {
            self.0.clone()
        }
    }

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in pairs {
            table.insert((*name).into(), value.clone());
        }
        BasicProperties::default().with_headers(table)
    }

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    fn letter(reason: &str, source: &str) -> DeadLetter {
        DeadLetter::read(
            b"p1",
            &with_headers(&[
                (ERROR_HEADER, long(reason)),
                (SOURCE_QUEUE_HEADER, long(source)),
            ]),
        )
    }

    #[test]
    fn a_warren_dead_letter_shows_its_reason_source_and_replays() {
        let properties = with_headers(&[
            (ERROR_HEADER, long("malformed message: expected value")),
            (SOURCE_QUEUE_HEADER, long("orders.p2")),
            (REPLAYS_HEADER, AMQPValue::LongUInt(2)),
        ])
        .with_message_id("m-7".into());
        let letter = DeadLetter::read(b"{\"oops\n", &properties);
        assert_eq!(letter.reason, "malformed message: expected value");
        assert_eq!(letter.reason_kind(), "malformed message");
        assert_eq!(letter.source_queue.as_deref(), Some("orders.p2"));
        assert_eq!(letter.replays, 2);
        assert_eq!(letter.message_id.as_deref(), Some("m-7"));
        assert_eq!(letter.body_preview, "{\\\"oops\\n");
    }

    #[test]
    fn a_broker_dead_letter_shows_the_reason_and_queue_of_its_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), long("delivery_limit"));
        death.insert("queue".into(), long("orders"));
        let deaths = FieldArray::from(vec![AMQPValue::FieldTable(death)]);
        let letter = DeadLetter::read(
            b"x",
            &with_headers(&[("x-death", AMQPValue::FieldArray(deaths))]),
        );
        assert_eq!(letter.reason, "dead-lettered by the broker: delivery_limit");
        assert_eq!(letter.source_queue.as_deref(), Some("orders"));
    }

    #[test]
    fn decodable_letters_go_where_a_producer_publishes_and_undecodable_ones_are_refused() {
        let amqp = AmqpSettings {
            queue: "orders".to_owned(),
            partitions: 3,
            ..AmqpSettings::default()
        };
        let bridge = BridgeSettings::default();
        let mut judge = Judge::<ById>::new(Selection::default(), &amqp, &bridge);
        let good = letter("processing failed after 5 attempts: boom", "orders.p1");
        assert_eq!(
            judge.judge(&good, b"p1"),
            Verdict::Replay(Route {
                exchange: "orders.partitions".to_owned(),
                routing_key: "p1".to_owned()
            })
        );
        let bad = letter("malformed message: empty", "orders.p1");
        assert!(
            matches!(judge.judge(&bad, b""), Verdict::Refused(why) if why.contains("malformed message"))
        );
    }

    #[test]
    fn forced_undecodable_letters_return_to_their_source_queue_if_it_is_still_one() {
        let amqp = AmqpSettings {
            queue: "orders".to_owned(),
            ..AmqpSettings::default()
        };
        let bridge = BridgeSettings::default();
        let selection = Selection {
            force: true,
            ..Selection::default()
        };
        let mut judge = Judge::<ById>::new(selection, &amqp, &bridge);
        assert_eq!(
            judge.judge(&letter("malformed message: x", "orders"), b""),
            Verdict::Replay(Route {
                exchange: String::new(),
                routing_key: "orders".to_owned()
            })
        );
        assert!(matches!(
            judge.judge(&letter("malformed message: x", "orders.p4"), b""),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn the_selection_filters_by_reason_and_stops_at_its_count() {
        let amqp = AmqpSettings::default();
        let bridge = BridgeSettings::default();
        let selection = Selection {
            reason: Some("processing failed".to_owned()),
            count: Some(2),
            force: false,
        };
        let mut judge = Judge::<ById>::new(selection, &amqp, &bridge);
        let failed = letter("processing failed after 1 attempts: boom", "orders");
        let rejected = letter("rejected: insufficient funds", "orders");
        assert_eq!(judge.judge(&rejected, b"p1"), Verdict::NotSelected);
        assert!(matches!(judge.judge(&failed, b"p1"), Verdict::Replay(_)));
        assert!(!judge.is_done());
        assert!(matches!(judge.judge(&failed, b"p1"), Verdict::Replay(_)));
        assert!(judge.is_done());
        assert_eq!(judge.judge(&failed, b"p1"), Verdict::NotSelected);
    }

    #[test]
    fn a_replayed_copy_counts_the_replay_and_drops_the_dead_lettering_headers() {
        let original = with_headers(&[
            (
                ERROR_HEADER,
                long("processing failed after 5 attempts: boom"),
            ),
            (SOURCE_QUEUE_HEADER, long("orders")),
            ("x-first-death-reason", long("rejected")),
            (REPLAYS_HEADER, AMQPValue::LongUInt(1)),
            ("traceparent", long("00-abc-def-01")),
        ])
        .with_expiration("1000".into());
        let letter = DeadLetter::read(b"p1", &original);
        let copy = replay_properties(&original, &letter);
        let headers = copy.headers().clone().unwrap_or_default();
        let headers = headers.inner();
        assert!(!headers.contains_key(ERROR_HEADER));
        assert!(!headers.contains_key(SOURCE_QUEUE_HEADER));
        assert!(!headers.contains_key("x-first-death-reason"));
        assert_eq!(headers.get(REPLAYS_HEADER), Some(&AMQPValue::LongUInt(2)));
        assert_eq!(
            headers.get(REPLAYED_ERROR_HEADER),
            Some(&long("processing failed after 5 attempts: boom"))
        );
        assert_eq!(headers.get("traceparent"), Some(&long("00-abc-def-01")));
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.delivery_mode(), &Some(2));
    }
}

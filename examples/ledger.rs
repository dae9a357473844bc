//! Your own entity type on a Warren cluster, fed by a RabbitMQ queue: a bank ledger.
//!
//! Each account is an entity keeping a balance. A deposit adds to it; a withdrawal larger than
//! the balance is refused, and the bridge dead-letters that one message with the reason (to
//! `<queue>.dlq`, header `x-warren-error`) while the others flow on. The example publishes 100
//! transactions over 10 accounts to its own queue, waits until each is settled, prints the
//! balances and refusals (checked against a local replay of the same rule) and deletes its
//! queues; it exits 0 only if all agree.
//!
//! ```text
//! cargo run --example ledger                      # RabbitMQ at 127.0.0.1:5672, guest/guest
//! WARREN_AMQP__URI=amqp://u:p@host:5672/%2f cargo run --example ledger
//! ```

use std::collections::{BTreeMap, HashSet};
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use warren::amqp::settings::partition_exchange;
use warren::amqp::topology::{dead_letter_exchange, dead_letter_queue};
use warren::amqp::{ConfirmedPublisher, ERROR_HEADER, OutgoingMessage, PublisherSettings};
use warren::entity::store::{Claim, EntityStore, MemoryEntityStore};
use warren::{AmqpSettings, BridgeSettings, ClusterNode, ClusterSettings, DeliverySettings};
use warren::{Entity, EntityError, EntityFactory, EntityId, EntityMessage, InvalidMessage};
use warren::{Metrics, bridge_singletons};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

const QUEUE: &str = "warren-example-ledger";
/// Longest the publishing and processing may take before the example fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// One transaction, as JSON: `{"id":"tx-007","account":"acct-7","op":{"deposit":89}}`. Also
/// Serialize/Deserialize (not only `decode`d): nodes pass messages to each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Transaction {
    /// Unique per transaction: an account recognises a redelivered one by it.
    id: String,
    /// The entity that processes it.
    account: String,
    op: Op,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Deposit(u64),
    Withdraw(u64),
}

impl EntityMessage for Transaction {
    /// A body no account could use is dead-lettered here, before it reaches one.
    fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let tx: Transaction =
            serde_json::from_slice(body).map_err(|e| InvalidMessage::Malformed(e.to_string()))?;
        if tx.account.trim().is_empty() {
            return Err(InvalidMessage::MissingEntityId("account"));
        }
        Ok(tx)
    }

    fn entity_id(&self) -> EntityId {
        EntityId::new(self.account.as_str())
    }
}

/// The ledger's one rule, used by the accounts and by the local replay that checks them.
fn apply(balance: u64, op: Op) -> Result<u64, String> {
    match op {
        Op::Deposit(amount) => balance.checked_add(amount).ok_or("overflow".into()),
        Op::Withdraw(amount) => balance.checked_sub(amount).ok_or(format!(
            "insufficient funds: balance {balance}, withdrawal {amount}"
        )),
    }
}

/// One account. Each applied transaction goes to the entity store, so the account survives a
/// restart or a move to another node (MemoryEntityStore serves one node; a cluster shares a
/// PostgresEntityStore).
struct Account {
    id: EntityId,
    store: Arc<dyn EntityStore>,
    /// This incarnation's right to write, taken in `recover`.
    claim: Option<Claim>,
    balance: u64,
    applied: HashSet<String>,
}

impl Entity for Account {
    type Message = Transaction;
    /// What a query returns (as JSON).
    type Snapshot = u64;

    async fn handle(&mut self, tx: &Transaction) -> Result<(), EntityError> {
        // Delivery is at-least-once: a redelivered transaction is already in the balance.
        if self.applied.contains(&tx.id) {
            return Ok(());
        }
        // A refusal is final: not retried, dead-lettered at once with this text. (A plain
        // `EntityError::new` would be retried up to `max_attempts` first.)
        let balance = apply(self.balance, tx.op).map_err(EntityError::rejected)?;
        let Some(claim) = &self.claim else {
            return Err(EntityError::unavailable("not recovered yet"));
        };
        // Stored before it is confirmed, under its id: a second append of it is a no-op (an
        // earlier attempt whose answer was lost), so applying it in memory now is still once.
        let record = serde_json::to_vec(tx).map_err(|e| EntityError::new(e.to_string()))?;
        let stored = self.store.append(claim, &tx.id, &record).await;
        stored?;
        self.applied.insert(tx.id.clone());
        self.balance = balance;
        Ok(())
    }

    fn snapshot(&self) -> u64 {
        self.balance
    }

    /// Before the first message: claim the account (fencing off older copies), then replay.
    async fn recover(&mut self) -> Result<(), EntityError> {
        self.claim = Some(self.store.claim(&self.id).await?);
        // The ledger saves no snapshots, so recovery is every record since the account began.
        for record in self.store.recover(&self.id).await?.records {
            let tx: Transaction = serde_json::from_slice(&record.data)
                .map_err(|e| EntityError::new(e.to_string()))?;
            self.balance = apply(self.balance, tx.op).map_err(EntityError::new)?;
            self.applied.insert(tx.id);
        }
        Ok(())
    }
}

/// Makes an account on its first message, on the node that owns its shard.
struct Accounts(Arc<dyn EntityStore>);

impl EntityFactory for Accounts {
    type Entity = Account;

    fn create(&self, id: &EntityId) -> Account {
        Account {
            id: id.clone(),
            store: Arc::clone(&self.0),
            claim: None,
            balance: 0,
            applied: HashSet::new(),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    warren::telemetry::init(false); // RUST_LOG filters; the cluster's story goes to stderr
    let defaults = AmqpSettings::default();
    let uri = std::env::var("WARREN_AMQP__URI").unwrap_or(defaults.uri.clone());
    let amqp = AmqpSettings {
        uri,
        queue: QUEUE.into(),
        ..defaults
    };
    amqp.validate("amqp")?;
    let connection = amqp.connect("warren-example-ledger-admin").await?;
    let admin = connection.create_channel().await?;
    delete_queues(&admin).await?; // an interrupted run's leftovers would skew the balances
    let outcome = run(&amqp, &admin).await;
    let deleted = delete_queues(&admin).await;
    connection.close(200, "done".into()).await?;
    outcome.and(deleted)
}

async fn run(amqp: &AmqpSettings, admin: &Channel) -> Result<()> {
    let started = Instant::now();
    let metrics = Metrics::new()?;
    // No seeds: a cluster of one. For more nodes, give each its own `node_id`, a `listen`
    // address the others reach, and the same `seeds` (e.g. ["10.0.0.1:7350"]) and `secret`.
    let cluster = ClusterSettings {
        node_id: "ledger-1".into(),
        ..Default::default()
    };
    let delivery = DeliverySettings::default();
    let bridge = BridgeSettings::default();
    // How often an account retries a message before the bridge dead-letters it.
    let runner = bridge.runner(delivery.consumer_controller.clone());
    // The queue's one consumer is a singleton: it runs on the oldest node with the bridge role
    // (another takes over when that one leaves) and sends through that node's producer.
    // Cancelled if this node can no longer deliver; a real service would then leave.
    let producer_stopped = CancellationToken::new();
    let bridge_metrics = metrics.bridge.clone();
    let singletons = |producer| {
        bridge_singletons(
            bridge,
            amqp.clone(),
            "warren-example-ledger".into(),
            producer,
            bridge_metrics,
            producer_stopped.clone(),
        )
    };
    let accounts = Arc::new(Accounts(Arc::new(MemoryEntityStore::default())));
    let node = ClusterNode::start_with_singletons(
        &cluster, &delivery, runner, accounts, &metrics, singletons,
    )
    .await?;
    let outcome = publish_and_check(amqp, admin, &node, &metrics).await;
    node.leave().await; // hands shards and the bridge to other nodes (here: none), then stops
    println!("took {:.1?}", started.elapsed());
    outcome
}

async fn publish_and_check(
    amqp: &AmqpSettings,
    admin: &Channel,
    node: &ClusterNode<Transaction>,
    metrics: &Metrics,
) -> Result<()> {
    // 100 transactions over 10 accounts; every third is a withdrawal, some of them too large.
    let transactions: Vec<Transaction> = (0..100u64)
        .map(|i| Transaction {
            id: format!("tx-{i:03}"),
            account: format!("acct-{}", i % 10),
            op: match (i % 3, 10 + (i * 37) % 90) {
                (0, amount) => Op::Withdraw(amount),
                (_, amount) => Op::Deposit(amount),
            },
        })
        .collect();
    let mut publisher = ConfirmedPublisher::new(PublisherSettings {
        amqp: amqp.clone(),
        max_outstanding: 50,
        connection_name: "warren-example-ledger-publisher".into(),
    });
    // Settled: applied and acked, or refused and dead-lettered with the reason.
    let bridge = metrics.bridge.partition(0);
    let (outcomes, total) = (&bridge.deliveries, transactions.len() as u64);
    let settled = || outcomes.acked.get() + outcomes.dead_lettered.get();
    let publish_and_wait = async {
        for tx in &transactions {
            let (body, message_id) = (serde_json::to_vec(tx)?, Some(tx.id.clone()));
            publisher
                .publish(OutgoingMessage {
                    body,
                    message_id,
                    partition_key: tx.account.clone(),
                    traceparent: None,
                })
                .await;
        }
        publisher.flush().await;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while settled() < total {
            tick.tick().await;
        }
        Ok::<_, Box<dyn Error>>(())
    };
    let waited = tokio::time::timeout(DEADLINE, publish_and_wait).await;
    waited.map_err(|_| format!("{} of {total} settled in {DEADLINE:?}", settled()))??;
    publisher.close().await;

    // What the ledger should say: the same rule, replayed here in publish order.
    let (mut expected, mut refused) = (BTreeMap::<String, u64>::new(), BTreeMap::new());
    for tx in &transactions {
        let balance = expected.entry(tx.account.clone()).or_default();
        match apply(*balance, tx.op) {
            Ok(next) => *balance = next,
            Err(why) => _ = refused.insert(tx.id.clone(), format!("rejected: {why}")),
        }
    }
    let mut wrong = Vec::new();
    for (account, want) in &expected {
        let answer = node.query(EntityId::new(account.as_str()), Duration::from_secs(5));
        let balance: u64 = serde_json::from_value(answer.await?)?;
        println!("{account}: {balance:>4}");
        if balance != *want {
            wrong.push(format!("{account} has {balance}, expected {want}"));
        }
    }
    let letters = dead_letters(admin).await?;
    for (id, reason) in &letters {
        println!("refused {id}: {reason}");
    }
    // A refusal is final: dead-lettered with its reason, never retried.
    let retries = metrics.entities.retries.get();
    if !wrong.is_empty() || letters != refused || retries != 0 {
        let expected = format!("refusals {refused:?} and no retries, got {retries}");
        return Err(format!("wrong balances {wrong:?}, or not the {expected}").into());
    }
    println!("ok: {total} transactions, {} refused", refused.len());
    Ok(())
}

/// Takes every message off the dead-letter queue: its id and why it was dead-lettered.
async fn dead_letters(admin: &Channel) -> Result<BTreeMap<String, String>> {
    let (dlq, mut letters) = (dead_letter_queue(QUEUE), BTreeMap::new());
    let options = BasicGetOptions { no_ack: true };
    while let Some(got) = admin.basic_get(dlq.as_str().into(), options).await? {
        let properties = got.delivery.properties;
        let headers = properties.headers().as_ref();
        let reason = match headers.and_then(|h| h.inner().get(ERROR_HEADER)) {
            Some(AMQPValue::LongString(text)) => text.to_string(),
            other => format!("{other:?}"),
        };
        let id = properties.message_id().as_ref().map(ToString::to_string);
        letters.insert(id.unwrap_or_default(), reason);
    }
    Ok(letters)
}

/// Deletes the example's queue, dead-letter queue and exchanges (missing ones are no error).
async fn delete_queues(admin: &Channel) -> Result<()> {
    for queue in [QUEUE.to_owned(), dead_letter_queue(QUEUE)] {
        let options = QueueDeleteOptions::default();
        admin.queue_delete(queue.as_str().into(), options).await?;
    }
    for exchange in [dead_letter_exchange(QUEUE), partition_exchange(QUEUE)] {
        admin
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}

//! The PostgreSQL entity store against the real server: appends are idempotent per key and
//! load in order, across store instances (as across nodes), and fenced by claims; a consumer
//! whose database goes away mid-run waits for it instead of dead-lettering, losing nothing; and
//! the downing strategy's lease goes to one holder at a time.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use support::{Consumer, Orders, TestDb, TestQueue, eventually, message_count};
use warren::entity::EntityId;
use warren::entity::store::{Appended, EntityStore, PostgresEntityStore, StoreError};

const DRAIN: Duration = Duration::from_secs(120);

/// Every record of `entity`'s, in order.
async fn load(store: &dyn EntityStore, entity: &EntityId) -> Result<Vec<Vec<u8>>, StoreError> {
    let records = store.records(entity, 0, usize::MAX).await?;
    Ok(records.into_iter().map(|r| r.data).collect())
}

#[tokio::test]
async fn postgres_keeps_the_store_contract() {
    let db = TestDb::create("contract").await;
    let store = PostgresEntityStore::new(&db.url(), "product").unwrap();
    warren::testkit::store_contract::check(&store).await;
}

#[tokio::test]
async fn postgres_appends_once_per_key_and_loads_in_order_for_every_store_instance() {
    let db = TestDb::create("store").await;
    let first = PostgresEntityStore::new(&db.url(), "product").unwrap();
    let second = PostgresEntityStore::new(&db.url(), "product").unwrap();
    let other_kind = PostgresEntityStore::new(&db.url(), "account").unwrap();
    let (a, b) = (EntityId::new("a"), EntityId::new("b"));
    let a_here = first.claim(&a).await.unwrap();
    assert!(first.append(&a_here, "k1", b"one").await.unwrap().is_new());
    // The entity moves to another node, which claims it.
    let a_there = second.claim(&a).await.unwrap();
    assert_eq!(a_there.epoch(), a_here.epoch() + 1);
    assert!(
        second
            .append(&a_there, "k2", b"two")
            .await
            .unwrap()
            .is_new()
    );
    // The first node stored it already: a no-op there too.
    assert_eq!(
        second.append(&a_there, "k1", b"again").await.unwrap(),
        Appended::Duplicate
    );
    let b_here = first.claim(&b).await.unwrap();
    assert!(first.append(&b_here, "k1", b"b").await.unwrap().is_new());
    let a_other_kind = other_kind.claim(&a).await.unwrap();
    assert_eq!(a_other_kind.epoch(), 1, "kinds are claimed apart");
    assert!(
        other_kind
            .append(&a_other_kind, "k1", b"x")
            .await
            .unwrap()
            .is_new()
    );
    assert_eq!(
        load(&first, &a).await.unwrap(),
        vec![b"one".to_vec(), b"two".to_vec()]
    );
    assert_eq!(load(&other_kind, &a).await.unwrap(), vec![b"x".to_vec()]);
    assert!(load(&first, &EntityId::new("c")).await.unwrap().is_empty());
}

#[tokio::test]
async fn postgres_lets_no_stale_append_land_after_a_new_claim_even_one_in_flight() {
    let db = TestDb::create("fencing").await;
    let old_node = Arc::new(PostgresEntityStore::new(&db.url(), "product").unwrap());
    let new_node = Arc::new(PostgresEntityStore::new(&db.url(), "product").unwrap());
    let entity = EntityId::new("p");
    let stale = old_node.claim(&entity).await.unwrap();
    assert!(
        old_node
            .append(&stale, "before", b"before")
            .await
            .unwrap()
            .is_new()
    );
    // A transaction of the test's holds the key the old incarnation appends next, so that
    // append is in flight (waiting) when the new owner claims.
    let (blocker, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Another session watches: statistics views read in a transaction stay as first read.
    let (watcher, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    blocker
        .batch_execute(
            "BEGIN; INSERT INTO warren_entity_records (kind, entity_id, key, record) \
             VALUES ('product', 'p', 'in-flight', 'x')",
        )
        .await
        .unwrap();
    let in_flight = {
        let (store, claim) = (Arc::clone(&old_node), stale.clone());
        tokio::spawn(async move { store.append(&claim, "in-flight", b"in-flight").await })
    };
    eventually("the old incarnation's append to wait", DRAIN, || async {
        (waiting_locks(&watcher).await >= 1).then_some(())
    })
    .await;
    let claimed = {
        let (store, entity) = (Arc::clone(&new_node), entity.clone());
        tokio::spawn(async move {
            let claim = store.claim(&entity).await.unwrap();
            let loaded = load(&*store, &entity).await.unwrap();
            (claim, loaded)
        })
    };
    // Either the claim waits behind the append in flight (what fencing needs) or it went
    // ahead; then the blocker goes and the append finishes.
    eventually("the claim to wait or to finish", DRAIN, || async {
        (claimed.is_finished() || waiting_locks(&watcher).await >= 2).then_some(())
    })
    .await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let appended = in_flight.await.unwrap();
    let (newer, loaded) = claimed.await.unwrap();
    // Whatever the old incarnation was told it stored, the new owner loaded.
    if let Ok(Appended::New { .. }) = appended {
        assert!(
            loaded.contains(&b"in-flight".to_vec()),
            "an append under the old claim landed after the new owner loaded: {loaded:?}"
        );
    }
    let late = old_node.append(&stale, "late", b"late").await.unwrap_err();
    assert!(late.is_fenced(), "{late}");
    assert!(
        new_node
            .append(&newer, "after", b"after")
            .await
            .unwrap()
            .is_new()
    );
    assert_eq!(
        load(&*new_node, &entity).await.unwrap().len(),
        loaded.len() + 1,
        "nothing but the new owner's append came after its load"
    );
}

/// Group commit: appends of many entities waiting together are stored in few transactions
/// (rows of one transaction share its `xmin`), yet each keeps its own outcome: new, duplicate
/// (also a repeat in the same wait), or fenced; and a record the database refuses (a key with
/// a NUL, which `text` cannot hold) fails only its own append.
#[tokio::test]
async fn postgres_group_commits_waiting_appends_and_answers_each_on_its_own() {
    let db = TestDb::create("group_commit").await;
    let store = Arc::new(PostgresEntityStore::new(&db.url(), "product").unwrap());
    let newer_node = PostgresEntityStore::new(&db.url(), "product").unwrap();
    let entities: Vec<EntityId> = (0..200).map(|i| EntityId::new(format!("e{i}"))).collect();
    let mut claims = Vec::new();
    for entity in &entities {
        claims.push(store.claim(entity).await.unwrap());
    }
    let stale = store.claim(&EntityId::new("moved")).await.unwrap();
    newer_node.claim(&EntityId::new("moved")).await.unwrap();

    let append = |claim: warren::entity::store::Claim, key: &'static str| {
        let store = Arc::clone(&store);
        async move { store.append(&claim, key, key.as_bytes()).await }
    };
    let together: Vec<_> = claims.iter().map(|c| append(c.clone(), "k")).collect();
    let (outcomes, repeat, fenced) = tokio::join!(
        futures::future::join_all(together),
        append(claims[0].clone(), "k"),
        append(stale, "k"),
    );
    let new = outcomes.iter().chain([&repeat]);
    let new = new
        .filter(|o| matches!(o, Ok(Appended::New { .. })))
        .count();
    assert_eq!(new, 200, "{outcomes:?} {repeat:?}");
    assert!(
        outcomes.iter().chain([&repeat]).all(|o| o.is_ok()),
        "{outcomes:?} {repeat:?}"
    );
    assert!(fenced.unwrap_err().is_fenced());
    let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let transactions: i64 = client
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM warren_entity_records",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        transactions <= 10,
        "200 appends waiting together took {transactions} transactions"
    );

    // A record the database refuses, waiting with others: only its own append fails.
    let mut together: Vec<_> = claims[..20]
        .iter()
        .map(|c| append(c.clone(), "k2"))
        .collect();
    together.push(append(claims[20].clone(), "bad\0key"));
    let outcomes = futures::future::join_all(together).await;
    let (bad, good) = outcomes.split_last().unwrap();
    assert!(
        good.iter().all(|o| matches!(o, Ok(Appended::New { .. }))),
        "{good:?}"
    );
    let bad = bad.as_ref().unwrap_err();
    assert!(!bad.is_unavailable() && !bad.is_fenced(), "{bad}");
    for entity in &entities[..20] {
        assert_eq!(
            load(&*store, entity).await.unwrap(),
            vec![b"k".to_vec(), b"k2".to_vec()]
        );
    }
}

#[tokio::test]
async fn the_cluster_lease_goes_to_one_holder_until_it_expires() {
    use warren::cluster::lease::{Lease, PostgresLease};
    let db = TestDb::create("lease").await;
    let side_a = PostgresLease::new(&db.url(), "cluster").unwrap();
    let side_b = PostgresLease::new(&db.url(), "cluster").unwrap();
    let other_cluster = PostgresLease::new(&db.url(), "another").unwrap();
    let (short, long) = (Duration::from_secs(3), Duration::from_secs(60));
    assert!(side_a.acquire("n1#1", short).await.unwrap());
    // The other side of the partition asks: refused; the same holder again (another node of
    // side a): granted; another cluster's lease is its own.
    assert!(!side_b.acquire("n2#1", long).await.unwrap());
    assert!(side_b.acquire("n1#1", short).await.unwrap());
    assert!(other_cluster.acquire("n2#1", long).await.unwrap());
    // Expired: free for the next split, which takes it in turn.
    eventually("the short lease to expire", DRAIN, || async {
        side_b.acquire("n2#1", long).await.unwrap().then_some(())
    })
    .await;
    assert!(!side_a.acquire("n1#1", long).await.unwrap());
}

/// Sessions of this test's database waiting for a lock.
async fn waiting_locks(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_unreachable_store_is_an_error_not_a_hang() {
    // Nothing listens there.
    let url = format!("postgres://warren:warren@{}/x", closed_port().await);
    let store = PostgresEntityStore::new(&url, "product").unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), load(&store, &EntityId::new("a")))
        .await
        .expect("answers within the connect timeout");
    assert!(outcome.is_err());
}

#[tokio::test]
async fn a_database_outage_mid_run_holds_orders_back_instead_of_dead_lettering_them() {
    let db = TestDb::create("outage").await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = format!("postgres://warren:warren@{}/{}", proxy.addr, db.name);
    let queue = TestQueue::new("store-outage");
    queue.declare().await;
    let consumer = Consumer::start(
        &queue,
        &[
            "--entity-store",
            &url,
            "--processing-delay-ms",
            "2",
            "--max-attempts",
            "2",
        ],
    )
    .await;
    let mut orders = Orders::new(&queue, 20);
    orders.publish(4_000).await;
    eventually("some orders to be acked", DRAIN, || async {
        let acked = consumer
            .metric("warren_deliveries_total{outcome=\"acked\"}")
            .await;
        (acked >= 300.0).then_some(())
    })
    .await;

    proxy.cut();
    let retries_before = consumer.metric("warren_entity_retries_total").await;
    let acked_at_cut = consumer
        .metric("warren_deliveries_total{outcome=\"acked\"}")
        .await;
    // While the database is away, products retry without giving up (with 2 attempts allowed
    // they would otherwise dead-letter at once), and nothing more is acked.
    eventually(
        "products to retry against the missing database",
        DRAIN,
        || async {
            let retries = consumer.metric("warren_entity_retries_total").await;
            (retries >= retries_before + 20.0).then_some(())
        },
    )
    .await;
    let acked_during = consumer
        .metric("warren_deliveries_total{outcome=\"acked\"}")
        .await;
    assert!(
        acked_during - acked_at_cut <= 100.0,
        "{acked_at_cut} acked at the cut, {acked_during} during the outage"
    );
    assert!(acked_during < 4_000.0, "the outage must come mid-run");

    proxy.restore();
    queue.wait_drained(DRAIN).await;
    assert_eq!(
        message_count(&queue.dlq()).await,
        0,
        "nothing dead-lettered"
    );
    orders.assert_applied_exactly_once(&consumer).await;
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A TCP forwarder to PostgreSQL that the test can cut (every connection dropped, new ones
/// refused) and restore: an outage of the database without touching the shared server.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<Mutex<Option<CancellationToken>>>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let stop = CancellationToken::new();
        let (state, stopping) = (Arc::clone(&cut), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopping.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let Some(live) = state.lock().unwrap().clone() else {
                    continue; // cut: refused
                };
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = live.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { addr, cut, stop }
    }

    fn cut(&self) {
        if let Some(live) = self.cut.lock().unwrap().take() {
            live.cancel();
        }
    }

    fn restore(&self) {
        *self.cut.lock().unwrap() = Some(CancellationToken::new());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}

//! How long a product with a long history takes to recover, with and without a snapshot. Two
//! entities each get `BENCH_RECORDS` stored orders (default 1,000,000), as the ProductActor
//! stores them; one also gets a snapshot `BENCH_AFTER_SNAPSHOT` records (default 50, half of
//! the default `snapshot_every`) before its end. A recovery is what the ProductActor does
//! when it starts: `EntityStore::recover`, then decoding and applying every record returned
//! (and the snapshot). Rounds alternate the two (`BENCH_ROUNDS`, default 5); medians.
//!
//! The embedded store (a fresh folder) always; PostgreSQL too with `BENCH_STORE=postgres://…`
//! (under an entity kind of this run's own, deleted afterwards). Run
//! `cargo bench --bench recovery`.

mod support;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use support::{env_or, median};
use uuid::Uuid;
use warren::entity::EntityId;
use warren::entity::store::{EntityStore, Snapshot, StoreLocation};
use warren::order::OrderId;

// The ProductActor's record, state and apply (consumer-app/src/product.rs), which a benchmark
// of the library cannot import from a binary: keep them alike.

/// What the ProductActor stores per order.
#[derive(Serialize, Deserialize)]
struct AppliedOrder {
    order_id: OrderId,
    quantity: u32,
}

/// What its snapshot holds.
#[derive(Default, Serialize, Deserialize)]
struct ProductState {
    total_quantity: u64,
    order_count: u64,
    recent_orders: VecDeque<OrderId>,
}

/// warren-consumer's allocator. (With glibc's, a recovery right after one of a million
/// records took 15 ms instead of 0.3: the first allocations after a million frees tidy up.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The ProductActor's default `recent_orders`.
const RECENT: usize = 20;
/// Appends waiting at once while filling: enough for full group-commit batches.
const FILL_CONCURRENCY: usize = 4096;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let records = env_or("BENCH_RECORDS", 1_000_000);
    let after = env_or("BENCH_AFTER_SNAPSHOT", 50).min(records);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let folder = tempfile::tempdir().expect("a data folder");
    let mut stores = vec![(
        "embedded",
        StoreLocation::Embedded(folder.path().to_owned()),
    )];
    if let Ok(url) = std::env::var("BENCH_STORE") {
        stores.push(("postgres", StoreLocation::Postgres(url)));
    }
    println!("recovery of one product with {records} stored orders; {rounds} rounds, medians");
    for (name, location) in stores {
        let kind = format!("bench_recovery_{}", Uuid::new_v4().simple());
        let store = location.open(&kind).expect("the store opens");
        let (plain, snapshotted) = (EntityId::new("plain"), EntityId::new("snapshotted"));
        let started = Instant::now();
        fill(&store, &plain, records, None).await;
        fill(&store, &snapshotted, records, Some(after)).await;
        println!("{name}: filled in {:.0?}", started.elapsed());
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Each goes first every other round, in case the first leaves work for the second.
            if round % 2 == 0 {
                without.push(recover(&store, &plain, records).await);
                with.push(recover(&store, &snapshotted, records).await);
            } else {
                with.push(recover(&store, &snapshotted, records).await);
                without.push(recover(&store, &plain, records).await);
            }
        }
        let (without, with) = (median(&mut without), median(&mut with));
        println!(
            "{name}: without a snapshot {:.3} s, with one {:.4} s ({} records after it): {:.0}× faster",
            without,
            with,
            after,
            without / with
        );
        if let StoreLocation::Postgres(url) = &location {
            forget(url, &kind).await;
        }
    }
}

/// Stores `records` orders for `entity`; with `snapshot_before_end`, a snapshot that many
/// records before the last. Many appends wait at once, to fill fast (an entity awaits each
/// of its own): the stores' one group-commit writer still commits them in `seq` order.
async fn fill(
    store: &Arc<dyn EntityStore>,
    entity: &EntityId,
    records: usize,
    snapshot_before_end: Option<usize>,
) {
    let claim = store.claim(entity).await.expect("claim");
    let mut state = ProductState::default();
    let mut snapshot = None;
    let mut stored = 0;
    while stored < records {
        let chunk: Vec<AppliedOrder> = (stored..records.min(stored + FILL_CONCURRENCY))
            .map(|i| AppliedOrder {
                order_id: Uuid::new_v4().into(),
                quantity: (i % 10 + 1) as u32,
            })
            .collect();
        let appends = chunk.iter().map(|order| {
            let record = serde_json::to_vec(order).expect("an order serializes");
            let key = order.order_id.to_string();
            let (store, claim) = (Arc::clone(store), claim.clone());
            async move { store.append(&claim, &key, &record).await }
        });
        let outcomes = join_all(appends).await;
        let mut appended: Vec<(u64, AppliedOrder)> = chunk
            .into_iter()
            .zip(outcomes)
            .map(|(order, outcome)| match outcome.expect("append") {
                warren::entity::store::Appended::New { seq } => (seq, order),
                duplicate => panic!("a fresh order id was {duplicate:?}"),
            })
            .collect();
        // Appends waiting together may be stored in any order; the state follows the store's.
        appended.sort_by_key(|(seq, _)| *seq);
        for (seq, order) in appended {
            apply(&mut state, order);
            stored += 1;
            if snapshot_before_end.is_some_and(|n| stored == records - n) {
                let data = serde_json::to_vec(&state).expect("state serializes");
                snapshot = Some(Snapshot { seq, data });
            }
        }
    }
    if let Some(snapshot) = snapshot {
        store.save_snapshot(&claim, &snapshot).await.expect("save");
    }
}

fn apply(state: &mut ProductState, order: AppliedOrder) {
    state.total_quantity += u64::from(order.quantity);
    state.order_count += 1;
    state.recent_orders.push_back(order.order_id);
    while state.recent_orders.len() > RECENT {
        state.recent_orders.pop_front();
    }
}

/// Seconds to recover `entity` as the ProductActor does; checks it saw every order.
async fn recover(store: &Arc<dyn EntityStore>, entity: &EntityId, records: usize) -> f64 {
    let started = Instant::now();
    let recovery = store.recover(entity).await.expect("recover");
    let mut state: ProductState = match &recovery.snapshot {
        Some(snapshot) => serde_json::from_slice(&snapshot.data).expect("a snapshot"),
        None => ProductState::default(),
    };
    for record in &recovery.records {
        apply(
            &mut state,
            serde_json::from_slice(&record.data).expect("an order"),
        );
    }
    let took = started.elapsed().as_secs_f64();
    assert_eq!(
        state.order_count, records as u64,
        "{entity} recovered wrong"
    );
    took
}

/// Deletes this run's rows.
async fn forget(url: &str, kind: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to delete the run's rows");
    tokio::spawn(connection);
    for table in [
        "warren_entity_records",
        "warren_entity_owners",
        "warren_entity_snapshots",
    ] {
        client
            .execute(&format!("DELETE FROM {table} WHERE kind = $1"), &[&kind])
            .await
            .expect("delete");
    }
}

//! Work pulling across nodes wired through the in-memory network, on paused time: workers on
//! every node get work, and the work a lost node held goes to the others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cluster::member::{Member, MemberStatus, NodeId};
use crate::cluster::transport::Inbound;
use crate::delivery::driver::{Faults, WorkPullingBuilder};
use crate::testkit::network::SimNetwork;

fn addr(id: &str) -> NodeAddr {
    NodeAddr {
        id: NodeId::new(id),
        generation: 1,
    }
}

fn view(me: &str, members: &[(&str, MemberStatus)]) -> ClusterView {
    ClusterView {
        self_addr: addr(me),
        members: members
            .iter()
            .enumerate()
            .map(|(age, (id, status))| {
                let member = Member {
                    addr: addr(id),
                    rpc_addr: "127.0.0.1:1".parse().unwrap(),
                    roles: Default::default(),
                    status: *status,
                    started_at_ms: age as u64,
                };
                (NodeId::new(*id), member)
            })
            .collect(),
        unreachable: Default::default(),
    }
}

type Received = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

struct Node {
    workers: ClusterWorkers<u64>,
    view: watch::Sender<ClusterView>,
    registrations: Vec<ClusterWorkerRegistration<u64>>,
}

fn node(net: &SimNetwork<WorkMsg<u64>>, id: &str, members: &[(&str, MemberStatus)]) -> Node {
    let (mut inbox, outbox) = net.join(&addr(id), 1024);
    let (view_tx, view_rx) = watch::channel(view(id, members));
    let workers = ClusterWorkers::start(
        addr(id),
        outbox,
        view_rx,
        Duration::from_millis(200),
        CancellationToken::new(),
    );
    let router = workers.clone();
    tokio::spawn(async move {
        while let Some(Inbound { from, message }) = inbox.recv().await {
            router.handle(from, message);
        }
    });
    Node {
        workers,
        view: view_tx,
        registrations: Vec::new(),
    }
}

/// A worker that records what it took (`name/taken`) and what it processed (`name`), taking
/// `pause` for each message.
fn worker(node: &mut Node, name: &str, pause: Duration, received: &Received) {
    let (mut handle, registration) = node.workers.spawn_worker(
        "jobs",
        crate::delivery::driver::consumer::ConsumerBuilder::default(),
    );
    node.registrations.push(registration);
    let received = Arc::clone(received);
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Some(delivery) = handle.next().await {
            received
                .lock()
                .unwrap()
                .entry(format!("{name}/taken"))
                .or_default()
                .push(delivery.message);
            tokio::time::sleep(pause).await;
            received
                .lock()
                .unwrap()
                .entry(name.clone())
                .or_default()
                .push(delivery.message);
            handle.confirm();
        }
    });
}

#[tokio::test(start_paused = true)]
async fn workers_on_every_node_get_work_and_a_lost_node_s_work_goes_to_the_others() {
    scenario(Faults::default(), 7).await;
}

#[tokio::test(start_paused = true)]
async fn the_same_over_a_network_that_drops_duplicates_and_reorders() {
    let faults = Faults {
        drop: 0.1,
        duplicate: 0.1,
        delay: 0.1,
        max_delay: Duration::from_millis(50),
    };
    for seed in 0..10 {
        scenario(faults, seed).await;
    }
}

async fn scenario(faults: Faults, seed: u64) {
    let net = SimNetwork::new(faults, seed);
    let both = [("a", MemberStatus::Up), ("b", MemberStatus::Up)];
    let mut a = node(&net, "a", &both);
    let mut b = node(&net, "b", &both);
    let received = Received::default();
    worker(&mut a, "a1", Duration::from_millis(10), &received);
    worker(&mut b, "b1", Duration::from_millis(10), &received);
    worker(&mut b, "b2", Duration::from_millis(10), &received);

    let mut producer = WorkPullingBuilder::new(ProducerId::new("p"))
        .spawn(
            a.workers.producer_inbox("jobs"),
            &a.workers.registry("jobs"),
        )
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), producer.wait_for_workers(3))
        .await
        .expect("b's workers announced to a")
        .unwrap();

    let asks: Vec<_> = (0..60)
        .map(|n| {
            let producer = producer.clone();
            tokio::spawn(async move { producer.ask(n).await })
        })
        .collect();
    for ask in asks {
        tokio::time::timeout(Duration::from_secs(30), ask)
            .await
            .expect("confirmed in time")
            .unwrap()
            .unwrap();
    }
    {
        let received = received.lock().unwrap();
        let all: BTreeSet<u64> = ["a1", "b1", "b2"]
            .iter()
            .filter_map(|name| received.get(*name))
            .flatten()
            .copied()
            .collect();
        assert_eq!(all, (0..60).collect());
        for name in ["a1", "b1", "b2"] {
            assert!(
                received.get(name).is_some_and(|m| !m.is_empty()),
                "{name}: {received:?}"
            );
        }
    }

    // b's workers become slow, take messages, and b dies holding them unconfirmed.
    received.lock().unwrap().clear();
    drop(b.registrations.drain(..));
    worker(&mut b, "b3", Duration::from_secs(3600), &received);
    tokio::time::timeout(Duration::from_secs(5), producer.wait_for_workers(2))
        .await
        .unwrap()
        .unwrap();
    // Keep asking until b3 holds something (random routing may favour a1 for a while).
    let mut asks = Vec::new();
    let held_by_b = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(taken) = received.lock().unwrap().get("b3/taken").cloned() {
                return taken;
            }
            let (producer, n) = (producer.clone(), 100 + asks.len() as u64);
            asks.push(tokio::spawn(async move { producer.ask(n).await }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("b3 holds work when b dies");
    let asked = 100..100 + asks.len() as u64;
    net.crash(&addr("b"));
    a.view.send_replace(view(
        "a",
        &[("a", MemberStatus::Up), ("b", MemberStatus::Down)],
    ));
    for ask in asks {
        tokio::time::timeout(Duration::from_secs(30), ask)
            .await
            .expect("rerouted and confirmed in time")
            .unwrap()
            .unwrap();
    }
    let received = received.lock().unwrap();
    let on_a: BTreeSet<u64> = received.get("a1").into_iter().flatten().copied().collect();
    assert_eq!(on_a, asked.collect(), "{received:?}");
    assert!(
        received.get("b3").is_none(),
        "b3 never finished one: {received:?}"
    );
    // What b held went to a (and was processed there).
    assert!(held_by_b.iter().all(|n| on_a.contains(n)));
}

//! The cluster as separate processes on loopback: `warren-cluster-node` nodes form a cluster,
//! survive SIGKILLs of the singleton holder and of a shard host (sharded delivery still
//! completes), refuse a node with the wrong secret (which forms no cluster of its own), and
//! shrug off garbage on their port.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Stdio;
use std::time::Duration;

use rand::RngCore;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use support::{binary, die_with_the_test, eventually, free_port, up_members};
use warren::node::COORDINATOR;

const SECRET: &str = "warren-test-secret-0123456789";

struct Node {
    name: String,
    cluster: SocketAddr,
    http: String,
    child: Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

struct NodeOptions<'a> {
    seeds: Vec<SocketAddr>,
    secret: &'a str,
    extra: Vec<String>,
}

impl Node {
    async fn start(name: &str, ip: [u8; 4], options: NodeOptions<'_>) -> Node {
        let cluster = free_port(ip);
        let seeds: Vec<String> = options.seeds.iter().map(ToString::to_string).collect();
        let mut command = Command::new(binary("warren-cluster-node"));
        command
            .args(["--node-id", name, "--listen", &cluster.to_string()])
            .args(["--down-after-ms", "1500"])
            .env("WARREN_CLUSTER__SECRET", options.secret)
            .env("RUST_LOG", "warn,warren=info")
            .args(&options.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if !seeds.is_empty() {
            command.args(["--seeds", &seeds.join(",")]);
        }
        die_with_the_test(command.as_std_mut());
        let mut child = command.spawn().expect("start warren-cluster-node");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("node announces its HTTP address")
            .unwrap()
            .expect("a first line");
        let http = line
            .split_whitespace()
            .last()
            .expect("address on the line")
            .to_owned();
        Node {
            name: name.to_owned(),
            cluster,
            http,
            child,
            stdout: lines,
        }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let response = reqwest::get(format!("{}{path}", self.http)).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    async fn status(&self) -> Option<Value> {
        self.get("/cluster").await
    }

    async fn metrics(&self) -> String {
        let response = reqwest::get(format!("{}/metrics", self.http))
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
    }
}

fn runs_coordinator(status: &Value) -> bool {
    status["singletons_here"]
        .as_array()
        .is_some_and(|s| s.iter().any(|n| n == COORDINATOR))
}

fn shards(status: &Value) -> BTreeSet<u64> {
    status["shards_here"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect()
}

/// Flags that make a node produce `messages` over `counters` once `members` are Up, with
/// counters that take a millisecond per message.
fn producing(messages: u64, counters: u64, members: usize) -> Vec<String> {
    producing_at(messages, counters, members, 1)
}

/// Like [`producing`], with counters that take `delay_ms` per message.
fn producing_at(messages: u64, counters: u64, members: usize, delay_ms: u64) -> Vec<String> {
    [
        "--produce",
        &messages.to_string(),
        "--entities",
        &counters.to_string(),
        "--wait-members",
        &members.to_string(),
        "--delay-ms",
        &delay_ms.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Every counter's state, asked through `node` (wherever the counter lives).
async fn counters(node: &Node, count: u64) -> Vec<(String, Value)> {
    let mut states = Vec::new();
    for i in 0..count {
        let id = format!("counter-{i}");
        let state = eventually(
            &format!("{id} answers"),
            Duration::from_secs(20),
            || async { node.get(&format!("/entities/{id}")).await },
        )
        .await;
        states.push((id, state));
    }
    states
}

/// Waits until every node sees exactly `names` Up.
async fn converged(nodes: &[&Node], names: &[&str]) {
    let want: BTreeSet<String> = names.iter().map(|n| (*n).to_owned()).collect();
    for node in nodes {
        eventually(
            &format!("{} to see {want:?} up", node.name),
            Duration::from_secs(20),
            || async {
                let status = node.status().await?;
                (up_members(&status) == want).then_some(())
            },
        )
        .await;
    }
}

async fn three_nodes(first_extra: Vec<String>) -> (Node, Node, Node) {
    let options = |seeds: Vec<SocketAddr>, extra: Vec<String>| NodeOptions {
        seeds,
        secret: SECRET,
        extra,
    };
    let a = Node::start("a", [127, 0, 0, 1], options(vec![], first_extra)).await;
    let b = Node::start("b", [127, 0, 0, 1], options(vec![a.cluster], vec![])).await;
    let c = Node::start("c", [127, 0, 0, 1], options(vec![a.cluster], vec![])).await;
    converged(&[&a, &b, &c], &["a", "b", "c"]).await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_and_the_singleton_survives_a_sigkill_of_its_holder() {
    let (mut a, b, c) = three_nodes(vec![]).await;
    // The oldest node runs the coordinator, and only it.
    assert!(runs_coordinator(&a.status().await.unwrap()));
    for node in [&b, &c] {
        let status = node.status().await.unwrap();
        assert!(!runs_coordinator(&status), "{status}");
        assert_eq!(status["coordinator"], "a");
    }

    a.kill();
    let killed_at = Instant::now();
    let holder = eventually(
        "another node to run the coordinator",
        // The majority downs the killed node after it has been unreachable for stable_after
        // (5 s) and the removal margin (3 s): about 11 s in all.
        Duration::from_secs(60),
        || async {
            for node in [&b, &c] {
                if runs_coordinator(&node.status().await?) {
                    return Some(node.name.clone());
                }
            }
            None
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("singleton takeover after SIGKILL: {takeover:?} (now on {holder})");
    // The next oldest (b started before c) takes over, and only it runs the coordinator.
    assert_eq!(holder, "b");
    assert!(!runs_coordinator(&c.status().await.unwrap()));
    converged(&[&b, &c], &["b", "c"]).await;
    // The new coordinator hands out shards: an entity never seen before gets a home.
    let counter = eventually("a query answered", Duration::from_secs(20), || async {
        c.get("/entities/fresh-counter").await
    })
    .await;
    assert_eq!(counter["applied"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_shard_host_loses_its_shards_and_sharded_delivery_still_completes() {
    const MESSAGES: u64 = 6000;
    const COUNTERS: u64 = 60;
    let producing = producing(MESSAGES, COUNTERS, 3);
    let (a, b, mut c) = three_nodes(producing).await;
    let c_shards = eventually(
        "a third of the messages confirmed, with shards on c",
        Duration::from_secs(60),
        || async {
            let progress = a.get("/progress").await?;
            let shards = shards(&c.status().await?);
            (progress["confirmed"].as_u64()? >= MESSAGES / 3 && !shards.is_empty())
                .then_some(shards)
        },
    )
    .await;

    c.kill();
    let killed_at = Instant::now();
    let progress = eventually(
        "every message confirmed",
        Duration::from_secs(90),
        || async {
            let progress = a.get("/progress").await?;
            (progress["done"] == true).then_some(progress)
        },
    )
    .await;
    eprintln!(
        "delivery completed {:?} after the SIGKILL of a shard host",
        killed_at.elapsed()
    );
    assert_eq!(progress["confirmed"], MESSAGES, "{progress}");
    assert_eq!(progress["rejected"], 0, "{progress}");
    let metrics = a.metrics().await;
    let resends = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warren_delivery_resends_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        resends.is_some_and(|n| n >= 1.0),
        "what c held was resent: {resends:?}"
    );

    // c's shards now live on a or b, each on exactly one.
    let (on_a, on_b) = (
        shards(&a.status().await.unwrap()),
        shards(&b.status().await.unwrap()),
    );
    assert!(on_a.is_disjoint(&on_b), "{on_a:?} {on_b:?}");
    let survivors: BTreeSet<u64> = on_a.union(&on_b).copied().collect();
    assert!(
        c_shards.is_subset(&survivors),
        "{c_shards:?} not in {survivors:?}"
    );

    // Every counter, asked through b wherever it lives, saw its numbers in order: whatever
    // a restarted counter got first, nothing after it was skipped.
    let mut last_seen = BTreeMap::new();
    for (id, state) in counters(&b, COUNTERS).await {
        assert_eq!(state["gaps"], 0, "{id}: {state}");
        last_seen.insert(id, state["last"]["a"].as_u64().unwrap_or(0));
    }
    // The last message of every counter was applied by its current incarnation.
    let expected_last = MESSAGES / COUNTERS;
    assert!(
        last_seen.values().all(|&n| n == expected_last),
        "{last_seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_secret_is_refused_and_garbage_does_not_harm_a_node() {
    let options = |seeds: Vec<SocketAddr>, secret| NodeOptions {
        seeds,
        secret,
        extra: vec![],
    };
    let mut a = Node::start("a", [127, 0, 0, 1], options(vec![], SECRET)).await;
    let b = Node::start("b", [127, 0, 0, 1], options(vec![a.cluster], SECRET)).await;
    converged(&[&a, &b], &["a", "b"]).await;

    // A node that knows the seed but not the secret is refused, says so, and never forms a
    // cluster of its own (it is not the first of its seeds).
    let intruder = Node::start(
        "intruder",
        [127, 0, 0, 1],
        options(vec![a.cluster], "some-other-secret-0123456789"),
    )
    .await;
    let blocker = eventually(
        "the intruder to know it was refused",
        Duration::from_secs(20),
        || async {
            let status = intruder.status().await?;
            let blocker = status["join_blocker"].as_str()?.to_owned();
            blocker.contains("refused").then_some((status, blocker))
        },
    )
    .await;
    assert!(blocker.1.contains("cluster.secret"), "{}", blocker.0);
    assert_eq!(blocker.0["join"], "joining", "{}", blocker.0);
    assert!(up_members(&blocker.0).is_empty(), "{}", blocker.0);
    assert!(!runs_coordinator(&blocker.0), "{}", blocker.0);
    for node in [&a, &b] {
        let status = node.status().await.unwrap();
        let names: BTreeSet<String> = status["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["node"].as_str().map(str::to_owned))
            .collect();
        assert!(!names.contains("intruder"), "{status}");
    }
    // Its probes of a count as refused handshakes there: stop them before counting garbage.
    intruder_stays_out(intruder).await;
    let refused_before = refused_links(&a).await;

    // Garbage on both halves of the cluster port: random bytes, a frame claiming 4 GiB, a
    // Hello-sized frame of noise, and random datagrams.
    let mut rng = rand::rng();
    let mut noise = vec![0_u8; 64 * 1024];
    rng.fill_bytes(&mut noise);
    let payloads: [&[u8]; 3] = [&noise, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], &noise[..200]];
    for payload in payloads {
        let mut stream = TcpStream::connect(a.cluster).unwrap();
        let _ = stream.write_all(payload);
    }
    let mut framed = (u32::try_from(noise.len()).unwrap()).to_be_bytes().to_vec();
    framed.extend_from_slice(&noise);
    let mut stream = TcpStream::connect(a.cluster).unwrap();
    let _ = stream.write_all(&framed);
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for chunk in noise.chunks(1200).take(40) {
        udp.send_to(chunk, a.cluster).unwrap();
    }

    eventually(
        "a to count the refused links",
        Duration::from_secs(20),
        || async { (refused_links(&a).await >= refused_before + 3.0).then_some(()) },
    )
    .await;
    // Every random datagram counted (and logged once per 10 s, not once each).
    eventually(
        "a to count the random datagrams",
        Duration::from_secs(20),
        || async {
            let counted: f64 = a
                .metrics()
                .await
                .lines()
                .filter(|l| l.starts_with("warren_gossip_invalid_datagrams_total"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum();
            (counted >= 40.0).then_some(())
        },
    )
    .await;
    assert!(a.child.try_wait().unwrap().is_none(), "a crashed");
    converged(&[&a, &b], &["a", "b"]).await;
    // And it still works: b's query reaches an entity wherever it lives.
    let state = eventually("a query answered", Duration::from_secs(20), || async {
        b.get("/entities/after-garbage").await
    })
    .await;
    assert_eq!(state["applied"], 0);
    a.kill();
}

/// Links `node` refused or closed, for any reason but a join probe.
async fn refused_links(node: &Node) -> f64 {
    node.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("warren_transport_refused_total"))
        .filter(|l| !l.contains("reason=\"probe\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Checks that a refused node is still joining, well past its join timeout, then kills it.
async fn intruder_stays_out(mut intruder: Node) {
    let joined_at = Instant::now();
    // The default join timeout is 3 s: a node that formed its own cluster would be Up by now.
    while joined_at.elapsed() < Duration::from_secs(5) {
        let status = intruder.status().await.expect("the intruder answers");
        assert_eq!(status["join"], "joining", "{status}");
        assert!(up_members(&status).is_empty(), "{status}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    intruder.kill();
    let _ = intruder.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_takes_its_share_of_shards_while_delivery_goes_on() {
    const MESSAGES: u64 = 60_000;
    const COUNTERS: u64 = 200;
    // Passed to every node. Few enough that c's share (5) moves in two rebalance rounds.
    const SHARDS: u64 = 15;
    // At most IN_FLIGHT messages are processed at once, each for DELAY_MS: delivery runs at
    // 6,400 a second at most, so the three quarters or more left at the join take over 7 s,
    // longer than the shards take to settle (about 5 s), however fast the machine.
    const IN_FLIGHT: u64 = 32;
    const DELAY_MS: u64 = 5;
    let with_shards = |mut extra: Vec<String>| {
        extra.extend(["--shards".to_owned(), SHARDS.to_string()]);
        extra
    };
    let mut producing = with_shards(producing_at(MESSAGES, COUNTERS, 2, DELAY_MS));
    producing.extend(["--in-flight".to_owned(), IN_FLIGHT.to_string()]);
    let options = |seeds: Vec<SocketAddr>, extra: Vec<String>| NodeOptions {
        seeds,
        secret: SECRET,
        extra,
    };
    let a = Node::start("a", [127, 0, 0, 1], options(vec![], producing)).await;
    let b = Node::start(
        "b",
        [127, 0, 0, 1],
        options(vec![a.cluster], with_shards(vec![])),
    )
    .await;
    converged(&[&a, &b], &["a", "b"]).await;
    let before = eventually(
        "every shard placed, some messages confirmed",
        Duration::from_secs(60),
        || async {
            let progress = a.get("/progress").await?;
            let placed: BTreeSet<u64> = shards(&a.status().await?)
                .union(&shards(&b.status().await?))
                .copied()
                .collect();
            (progress["confirmed"].as_u64()? >= 2000 && placed.len() as u64 == SHARDS)
                .then_some(placed)
        },
    )
    .await;

    let c = Node::start(
        "c",
        [127, 0, 0, 1],
        options(vec![a.cluster], with_shards(vec![])),
    )
    .await;
    let joined_at = Instant::now();
    let at_join = a.get("/progress").await.expect("a answers");
    assert!(
        at_join["sent"].as_u64().expect("sent") <= MESSAGES / 4,
        "c must join while delivery goes on: {at_join}"
    );
    let counts = eventually(
        "shards to spread over three nodes",
        Duration::from_secs(90),
        || async {
            let mut counts = Vec::new();
            let mut placed = BTreeSet::new();
            for node in [&a, &b, &c] {
                let here = shards(&node.status().await?);
                counts.push(here.len());
                placed.extend(here);
            }
            let spread = counts.iter().max()? - counts.iter().min()?;
            (spread <= 1 && placed == before).then_some(counts)
        },
    )
    .await;
    // Delivery went on through the whole move: after the shards settled, every counter still
    // had messages to come (they go round-robin), so each counter's current incarnation, wherever
    // it lives now, has applied messages of its own, its last one included.
    let settled = a.get("/progress").await.expect("a answers");
    eprintln!(
        "shards settled {:?} after the join: {counts:?}; progress then: {settled}",
        joined_at.elapsed()
    );
    assert!(
        settled["sent"].as_u64().expect("sent") + COUNTERS <= MESSAGES,
        "delivery must go on after the shards settled: {settled}"
    );

    let progress = eventually(
        "every message confirmed",
        Duration::from_secs(120),
        || async {
            let progress = a.get("/progress").await?;
            (progress["done"] == true).then_some(progress)
        },
    )
    .await;
    assert_eq!(progress["confirmed"], MESSAGES, "{progress}");
    assert_eq!(progress["rejected"], 0, "{progress}");
    // Hand-offs stopped each counter before it started elsewhere: no counter saw a message
    // twice or skipped one, and each applied its last message.
    for (id, state) in counters(&c, COUNTERS).await {
        assert_eq!(state["gaps"], 0, "{id}: {state}");
        assert_eq!(state["duplicates"], 0, "{id}: {state}");
        assert_eq!(state["last"]["a"], MESSAGES / COUNTERS, "{id}: {state}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_hands_its_shards_over_and_nothing_is_lost() {
    const MESSAGES: u64 = 40_000;
    const COUNTERS: u64 = 100;
    let producing = producing(MESSAGES, COUNTERS, 3);
    let (a, mut b, c) = three_nodes(producing).await;
    let b_shards = eventually(
        "some messages confirmed, with shards on b",
        Duration::from_secs(60),
        || async {
            let progress = a.get("/progress").await?;
            let shards = shards(&b.status().await?);
            (progress["confirmed"].as_u64()? >= 2000 && !shards.is_empty()).then_some(shards)
        },
    )
    .await;

    let pid = b.child.id().expect("b runs");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let asked_at = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(40), b.child.wait())
        .await
        .expect("b leaves within its leave timeout")
        .unwrap();
    eprintln!("graceful leave took {:?}", asked_at.elapsed());
    assert!(exit.success(), "{exit:?}");
    let mut last = String::new();
    while let Some(line) = b.stdout.next_line().await.unwrap() {
        last = line;
    }
    // It waited until its shards had moved, rather than vanishing with them.
    assert!(
        last.starts_with("left the cluster:") && last.contains("handed over: true"),
        "{last}"
    );
    converged(&[&a, &c], &["a", "c"]).await;

    let progress = eventually(
        "every message confirmed",
        Duration::from_secs(120),
        || async {
            let progress = a.get("/progress").await?;
            (progress["done"] == true).then_some(progress)
        },
    )
    .await;
    assert_eq!(progress["confirmed"], MESSAGES, "{progress}");
    let survivors: BTreeSet<u64> = shards(&a.status().await.unwrap())
        .union(&shards(&c.status().await.unwrap()))
        .copied()
        .collect();
    assert!(
        b_shards.is_subset(&survivors),
        "{b_shards:?} not in {survivors:?}"
    );
    // b's counters stopped after finishing what they held and started again elsewhere:
    // nothing skipped, nothing applied twice by one incarnation.
    for (id, state) in counters(&a, COUNTERS).await {
        assert_eq!(state["gaps"], 0, "{id}: {state}");
        assert_eq!(state["duplicates"], 0, "{id}: {state}");
    }
}

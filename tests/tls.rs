//! TLS on every link, against real servers that accept nothing else: a private RabbitMQ node
//! with only a TLS listener, a private PostgreSQL server with `ssl = on`, and three
//! `warren-consumer` nodes whose links need a certificate of the cluster CA. Certificates come
//! from CAs the test makes; the refusals must name the link.

mod support;

use std::time::Duration;

use support::certs::TestCa;
use support::cluster::{
    Cluster, MID_RUN_DELAY_MS, NODES, SECRET, node_ip, sigkill_the_singleton_holder_mid_run,
};
use support::private_postgres::{PrivatePostgres, Stop};
use support::private_rabbitmq::{BrokerTls, PrivateRabbitMq};
use support::{Consumer, Orders, TestQueue, binary, eventually, free_port, path, up_members};
use warren::EntityId;
use warren::entity::store::{EntityStore, PostgresEntityStore};
use warren::postgres::PostgresTarget;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_and_a_consumer_drain_2000_orders_over_amqps_to_a_tls_only_broker() {
    let ca = TestCa::new("amqps");
    let server = ca.server("broker", &["127.0.0.1"]);
    let client = ca.client("consumer", "warren-tls-consumer");
    let broker = PrivateRabbitMq::start_tls(BrokerTls {
        server: &server,
        client_ca: &ca.cert,
        plain_too: false,
    });
    // The consumer logs in as its certificate's common name (EXTERNAL): no password at all.
    broker.ctl(&["add_user", "warren-tls-consumer", "never-used"]);
    broker.ctl(&["clear_password", "warren-tls-consumer"]);
    broker.ctl(&["set_permissions", "warren-tls-consumer", ".*", ".*", ".*"]);
    let mut queue = TestQueue::on("amqps", &broker);
    queue.broker = Some((
        format!(
            "amqps://127.0.0.1:{}/%2f?auth_mechanism=external",
            broker.port()
        ),
        broker.node.clone(),
    ));
    let consumer = Consumer::start(
        &queue,
        &[
            "--amqp-ca-file",
            path(&ca.cert),
            "--amqp-cert-file",
            path(&client.cert),
            "--amqp-key-file",
            path(&client.key),
        ],
    )
    .await;

    // The producer logs in with a password, over TLS trusting the same private CA.
    let producer = tokio::process::Command::new(binary("warren-producer"))
        .args(["--uri", &broker.uri(), "--queue", &queue.name])
        .args(["--count", "2000", "--rate", "0", "--products", "50"])
        .args(["--amqp-ca-file", path(&ca.cert)])
        .env("RUST_LOG", "warn")
        .status()
        .await
        .expect("warren-producer runs");
    assert!(producer.success(), "the producer failed over amqps://");
    queue.wait_drained(WAIT).await;
    assert_eq!(
        consumer
            .metric("warren_deliveries_total{outcome=\"acked\"}")
            .await,
        2000.0
    );

    // What the broker saw: the consumer's connections are TLS and logged in by certificate.
    let connections = broker.ctl(&["list_connections", "user", "ssl", "auth_mechanism"]);
    let consumers: Vec<&str> = connections
        .lines()
        .filter(|line| line.starts_with("warren-tls-consumer"))
        .collect();
    assert!(
        !consumers.is_empty(),
        "no consumer connection: {connections}"
    );
    for line in consumers {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields,
            ["warren-tls-consumer", "true", "EXTERNAL"],
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_certificate_that_does_not_verify_is_refused_naming_the_link() {
    let ca = TestCa::new("amqps-trusted");
    let stranger = TestCa::new("amqps-stranger");
    let server = ca.server("broker", &["127.0.0.1"]);
    let broker = PrivateRabbitMq::start_tls(BrokerTls {
        server: &server,
        client_ca: &ca.cert,
        plain_too: false,
    });
    let mut queue = TestQueue::on("amqps-refused", &broker);
    let link = format!(
        "cannot connect to the broker at amqps://127.0.0.1:{}",
        broker.port()
    );

    // Signed by a CA the consumer does not trust.
    let untrusting = Consumer::launch(&queue, &["--amqp-ca-file", path(&stranger.cert)], &[]).await;
    logged(&untrusting, &[&link, "UnknownIssuer"]).await;

    // Trusted, but not issued for the name the consumer dialled.
    queue.broker = Some((
        format!("amqps://guest:guest@localhost:{}/%2f", broker.port()),
        broker.node.clone(),
    ));
    let misnamed = Consumer::launch(&queue, &["--amqp-ca-file", path(&ca.cert)], &[]).await;
    let link = format!(
        "cannot connect to the broker at amqps://localhost:{}",
        broker.port()
    );
    logged(
        &misnamed,
        &[&link, "certificate not valid for name \"localhost\""],
    )
    .await;

    // Neither got in, and neither gave up: both are still running, retrying.
    assert_eq!(broker.ctl(&["list_connections", "user"]).trim(), "");
    for consumer in [&untrusting, &misnamed] {
        assert!(
            consumer.get("/livez").await.is_some(),
            "{}",
            consumer.log_tail()
        );
    }
    drop((untrusting, misnamed));

    // The trusted CA's certificate for the right name, but past its validity.
    let expired = ca.expired_server("expired", &["127.0.0.1"]);
    broker.present(BrokerTls {
        server: &expired,
        client_ca: &ca.cert,
        plain_too: false,
    });
    queue.broker = Some((broker.uri(), broker.node.clone()));
    let late = Consumer::launch(&queue, &["--amqp-ca-file", path(&ca.cert)], &[]).await;
    let link = format!(
        "cannot connect to the broker at amqps://127.0.0.1:{}",
        broker.port()
    );
    logged(&late, &[&link, "certificate expired"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_keeps_its_products_in_postgres_over_verify_full_tls() {
    let ca = TestCa::new("pg");
    let postgres = PrivatePostgres::start_tls(&ca.server("postgres", &["127.0.0.1"]));
    let url = format!(
        "postgres://warren@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        postgres.port(),
        path(&ca.cert)
    );
    let queue = TestQueue::new("pg-tls");
    let mut orders = Orders::new(&queue, 20);
    let consumer = Consumer::start(&queue, &["--entity-store", &url]).await;
    orders.publish(500).await;
    queue.wait_drained(WAIT).await;
    orders.assert_applied_exactly_once(&consumer).await;

    // The server saw the consumer's connections encrypted (and refuses any that are not).
    let target = PostgresTarget::parse(&url).unwrap();
    let (client, connection) = target.config.connect(target.tls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'warren'",
            &[],
        )
        .await
        .unwrap();
    let (encrypted, clear): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        encrypted >= 1 && clear == 0,
        "{encrypted} encrypted, {clear} clear"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_certificate_that_does_not_verify_is_refused_naming_the_link() {
    let ca = TestCa::new("pg-trusted");
    let stranger = TestCa::new("pg-stranger");
    let postgres = PrivatePostgres::start_tls(&ca.server("postgres", &["127.0.0.1"]));
    let port = postgres.port();
    let url = |host: &str, mode: &str, root: &TestCa| {
        format!(
            "postgres://warren@{host}:{port}/postgres?sslmode={mode}&sslrootcert={}",
            path(&root.cert)
        )
    };
    let link =
        |host: &str, mode: &str| format!("postgres://{host}:{port}/postgres (sslmode={mode})");

    let unknown = refusal(&url("127.0.0.1", "verify-full", &stranger)).await;
    assert!(
        unknown.contains(&link("127.0.0.1", "verify-full")) && unknown.contains("UnknownIssuer"),
        "{unknown}"
    );
    let misnamed = refusal(&url("localhost", "verify-full", &ca)).await;
    assert!(
        misnamed.contains(&link("localhost", "verify-full"))
            && misnamed.contains("not valid for name"),
        "{misnamed}"
    );
    // verify-ca checks the chain only: the same name is fine.
    claim(&url("localhost", "verify-ca", &ca)).await.unwrap();
    let clear = refusal(&format!(
        "postgres://warren@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .await;
    assert!(
        clear.contains(&link("127.0.0.1", "disable")) && clear.contains("no encryption"),
        "{clear}"
    );

    // The same server presenting an expired certificate of the trusted CA.
    postgres.stop(Stop::Fast);
    postgres.replace_certificate(&ca.expired_server("expired", &["127.0.0.1"]));
    postgres.start_again();
    let expired = refusal(&url("127.0.0.1", "verify-full", &ca)).await;
    assert!(
        expired.contains(&link("127.0.0.1", "verify-full"))
            && expired.contains("certificate expired"),
        "{expired}"
    );
}

async fn claim(url: &str) -> Result<(), String> {
    let store = PostgresEntityStore::new(url, "tls-test").map_err(|e| e.to_string())?;
    store
        .claim(&EntityId::new("p1"))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn refusal(url: &str) -> String {
    claim(url)
        .await
        .expect_err("the store link must be refused")
}

/// `--cluster-*-file` flags for a node certificate of `ca` valid on every test node's address.
fn cluster_tls(ca: &TestCa) -> Vec<String> {
    let names: Vec<String> = (0..=NODES.len())
        .map(|i| std::net::IpAddr::from(node_ip(i)).to_string())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let node = ca.peer("node", &names);
    node_flags(&ca.cert, &node.cert, &node.key)
}

/// `--cluster-*-file` flags for what `scripts/cluster-certs` makes in `dir`: what the README
/// tells an operator to use (one node certificate without names, for every node).
fn cluster_certs_script(dir: &std::path::Path) -> Vec<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster-certs");
    support::run(path(&script), &[path(dir), "1"]);
    node_flags(
        &dir.join("ca.pem"),
        &dir.join("node.pem"),
        &dir.join("node.key"),
    )
}

fn node_flags(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Vec<String> {
    [
        ("--cluster-ca-file", ca),
        ("--cluster-cert-file", cert),
        ("--cluster-key-file", key),
    ]
    .into_iter()
    .flat_map(|(flag, file)| [flag.to_owned(), path(file).to_owned()])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_mutual_tls_lose_nothing_when_the_singleton_holder_is_sigkilled() {
    // Certificates as an operator makes them; the refusal test below uses the test's own CA.
    let folder = TestCa::new("cluster");
    let mut extra = cluster_certs_script(&folder.dir.join("operator"));
    extra.extend([
        "--processing-delay-ms".to_owned(),
        MID_RUN_DELAY_MS.to_owned(),
    ]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let cluster = Cluster::start("tls-kill", &extra).await;
    sigkill_the_singleton_holder_mid_run(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_certificate_of_the_cluster_ca_is_refused_naming_the_link() {
    let ca = TestCa::new("cluster-trusted");
    let stranger = TestCa::new("cluster-stranger");
    let trusted = cluster_tls(&ca);
    let cluster = Cluster::start(
        "tls-refused",
        &trusted.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let seed = cluster.listen[0].to_string();
    let intruder = |name: &'static str, tls: Vec<String>| {
        let queue = &cluster.queue;
        let store = cluster.store.clone();
        let seed = seed.clone();
        async move {
            let listen = free_port(node_ip(3)).to_string();
            let mut args = vec![
                "--node-id".to_owned(),
                name.to_owned(),
                "--listen".to_owned(),
                listen,
                "--seeds".to_owned(),
                seed,
                "--cluster-secret".to_owned(),
                SECRET.to_owned(),
                "--entity-store".to_owned(),
                store,
            ];
            args.extend(tls);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Consumer::launch(queue, &args, &[]).await
        }
    };
    // Holds the secret, but its certificate and CA are another cluster's: it cannot verify
    // the seed, nor the seed it.
    let foreign = intruder("foreign", cluster_tls(&stranger)).await;
    let blocker = join_blocker(&foreign, "invalid peer certificate: UnknownIssuer").await;
    assert!(
        blocker.contains("TLS handshake on the cluster link to"),
        "{blocker}"
    );
    // Holds the secret and speaks no TLS at all.
    let plain = intruder("plain", Vec::new()).await;
    let blocker = join_blocker(&plain, "refused").await;
    assert!(blocker.contains(&seed), "{blocker}");

    // Neither got in, nor formed a cluster of its own, and the cluster never saw them.
    for outsider in [&foreign, &plain] {
        let status = outsider
            .get("/cluster")
            .await
            .expect("the outsider answers");
        assert_eq!(status["join"], "joining", "{status}");
        assert!(up_members(&status).is_empty(), "{status}");
    }
    for node in cluster.running() {
        let status = node.get("/cluster").await.expect("a member answers");
        let members = status["members"].to_string();
        assert!(
            !members.contains("foreign") && !members.contains("plain"),
            "{status}"
        );
    }
    cluster.converged(&NODES).await;
    drop((foreign, plain));

    // Trusts the cluster CA and holds the secret, but its own certificate is another CA's:
    // the seed must refuse it (the client-certificate check), though the intruder trusts the
    // seed. Its gossip may still show it for a while (gossip trusts the secret, see the
    // README); no link to it ever carries anything.
    let refusals = "warren_transport_refused_total{reason=\"handshake\"}";
    let before = cluster.node(0).metric(refusals).await;
    let names: Vec<String> = (0..=NODES.len())
        .map(|i| std::net::IpAddr::from(node_ip(i)).to_string())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let forged = stranger.peer("forged", &names);
    let _forged = intruder("forged", node_flags(&ca.cert, &forged.cert, &forged.key)).await;
    eventually(
        "the seed to refuse the forged certificate",
        WAIT,
        || async { (cluster.node(0).metric(refusals).await > before).then_some(()) },
    )
    .await;
}

/// Waits until `node`'s `/cluster` page says its join is blocked for a reason with `part`;
/// returns that reason.
async fn join_blocker(node: &Consumer, part: &str) -> String {
    eventually(&format!("a join blocker with {part:?}"), WAIT, || async {
        let status = node.get("/cluster").await?;
        let blocker = status["join_blocker"].as_str()?.to_owned();
        blocker.contains(part).then_some(blocker)
    })
    .await
}

/// Waits until `consumer`'s log has a line with every one of `parts`.
async fn logged(consumer: &Consumer, parts: &[&str]) {
    eventually(&format!("a log line with {parts:?}"), WAIT, || async {
        let log = std::fs::read_to_string(&consumer.log).unwrap_or_default();
        log.lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
            .then_some(())
    })
    .await;
}

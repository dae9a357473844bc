//! The shipped monitoring, proven against a real Prometheus: it scrapes a 3-node cluster, the
//! producer and the broker's Prometheus plugin while orders flow, and every expression of the
//! Grafana dashboard and of the alert rules is evaluated through its HTTP API. Dashboard
//! expressions must return a number; every alert expression must evaluate, the alerts the run
//! provokes (dead letters) must fire, and no other may fire.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use support::cluster::Cluster;
use support::{Orders, TestQueue, binary, eventually, free_port, path};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/images/grafana/dashboards/warren.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/images/prometheus/alerts.yml");

/// What Grafana's `$__rate_interval` becomes here: four scrape intervals and then some.
const RATE_INTERVAL: &str = "15s";

/// Alerts the run provokes on purpose (it publishes undecodable messages).
const MUST_FIRE: [&str; 2] = ["WarrenDeadLettering", "WarrenDeadLetterQueueNotEmpty"];

const WAIT: Duration = Duration::from_secs(90);

/// A Prometheus of our own: its config, its data and its port, gone with it.
struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    base: String,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Stopped before its data goes, so it writes nothing into a deleted folder.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts Prometheus scraping every second (rules evaluated as often) with `config`'s
    /// scrape jobs and `rules` as its rule file.
    async fn start(scrape_configs: &str, rules: &str) -> Prometheus {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("warren-test-prometheus-{}", &suffix[..8]));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let rules_file = dir.join("alerts.yml");
        std::fs::write(&rules_file, rules).expect("rules written");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{}\"]\nscrape_configs:\n{scrape_configs}",
            path(&rules_file)
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("config written");
        let listen = free_port([127, 0, 0, 1]);
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", path(&config_file)))
            .arg(format!("--storage.tsdb.path={}", path(&dir.join("data"))))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus runs (scripts/test installs it)");
        let prometheus = Prometheus {
            child,
            dir,
            base: format!("http://{listen}"),
            http: reqwest::Client::new(),
        };
        eventually("Prometheus to be ready", WAIT, || async {
            let ready = prometheus
                .http
                .get(format!("{}/-/ready", prometheus.base))
                .send()
                .await;
            ready.ok().filter(|r| r.status().is_success()).map(drop)
        })
        .await;
        prometheus
    }

    /// A page of Prometheus' HTTP API, as JSON.
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.base), query)
            .expect("an API URL");
        self.http
            .get(url)
            .send()
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// Evaluates `expr` now; panics if Prometheus refuses it (a syntax or type error).
    async fn query(&self, expr: &str) -> Vec<f64> {
        let answer = self.get("/api/v1/query", &[("query", expr)]).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{expr}: not a vector: {answer}"))
            .iter()
            .filter_map(|sample| sample["value"][1].as_str()?.parse().ok())
            .collect()
    }

    /// The alert rules Prometheus loaded: each one's name, expression and health.
    async fn rules(&self) -> Vec<(String, String, String)> {
        let answer = self.get("/api/v1/rules", &[]).await;
        let text =
            |rule: &serde_json::Value, key: &str| rule[key].as_str().unwrap_or("").to_owned();
        answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .map(|rule| {
                (
                    text(rule, "name"),
                    text(rule, "query"),
                    text(rule, "health"),
                )
            })
            .collect()
    }

    /// Every alert pending or firing now: its name and state (`pending`, `firing`).
    async fn alert_states(&self) -> Vec<(String, String)> {
        let answer = self.get("/api/v1/alerts", &[]).await;
        answer["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|alert| {
                let text = |value: &serde_json::Value| value.as_str().unwrap_or("").to_owned();
                (text(&alert["labels"]["alertname"]), text(&alert["state"]))
            })
            .collect()
    }

    /// Waits until `expr` returns at least one finite number.
    async fn has_data(&self, what: &str, expr: &str) {
        eventually(&format!("data for {what}: {expr}"), WAIT, || async {
            let values = self.query(expr).await;
            values.iter().any(|v| v.is_finite()).then_some(())
        })
        .await;
    }
}

/// The Grafana dashboard's JSON.
fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every expression of the dashboard, with its panel's title, as Prometheus gets it.
fn dashboard_expressions(queue: &str) -> Vec<(String, String)> {
    let dashboard = dashboard();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            let expr = expr
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$queue", queue);
            exprs.push((panel["title"].as_str().unwrap_or("?").to_owned(), expr));
        }
    }
    exprs
}

/// The alert rules, for the queue `queue` instead of the demo's `orders`.
fn alert_rules(queue: &str) -> String {
    let rules = std::fs::read_to_string(ALERTS).expect("the alert rules");
    rules
        .replace("queue=~\"orders(", &format!("queue=~\"{queue}("))
        .replace("queue=\"orders.dlq\"", &format!("queue=\"{queue}.dlq\""))
}

/// A scrape job for `targets` (host:port), at `metrics_path`.
fn job(name: &str, targets: &[String], metrics_path: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "  - job_name: {name}\n    metrics_path: {metrics_path}\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    )
}

fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// `warren-producer` publishing orders until dropped; returns it and its metrics address.
async fn producer(queue: &TestQueue) -> (Child, String) {
    let mut producer = Command::new(binary("warren-producer"))
        .args(["--uri", &queue.amqp().uri, "--queue", &queue.name])
        .args(["--rate", "100", "--products", "50"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("warren-producer runs");
    let stdout = producer.stdout.take().expect("stdout");
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .expect("stdout readable")
        .expect("the producer printed its address");
    let base = line.rsplit(' ').next().unwrap_or_default().to_owned();
    (producer, host_port(&base))
}

/// `docs/dashboard.md`: the dashboard described panel by panel, from its own titles,
/// descriptions and queries, so the description cannot drift from the dashboard.
const DASHBOARD_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/dashboard.md");

fn describe_dashboard() -> String {
    let dashboard = dashboard();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    let at = |panel: &serde_json::Value, key: &str| panel["gridPos"][key].as_u64().unwrap_or(0);
    panels.sort_by_key(|panel| (at(panel, "y"), at(panel, "x")));
    let mut doc = String::from(
        "# The Grafana dashboard, described\n\n\
         `images/grafana/dashboards/warren.json` (provisioned as \"Warren\" by \
         `docker-compose.yml`), panel by panel, top left to bottom right: what each shows and \
         the queries behind it. `$queue` is the queue's name (default `orders`). \
         `tests/monitoring.rs` evaluates every query against a real Prometheus scraping a running \
         cluster, and writes this page from the dashboard (`WARREN_WRITE_DOCS=1`), failing when \
         it is out of date.\n",
    );
    for panel in panels {
        let text = |key: &str| panel[key].as_str().unwrap_or_default().to_owned();
        doc.push_str(&format!(
            "\n## {}\n\n{}\n\n",
            text("title"),
            text("description")
        ));
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            match target["legendFormat"].as_str() {
                Some(legend) => doc.push_str(&format!("- `{expr}`: {legend}\n")),
                None => doc.push_str(&format!("- `{expr}`\n")),
            }
        }
    }
    doc
}

#[test]
fn the_dashboard_description_is_the_dashboards() {
    written_or_checked(DASHBOARD_DOC, &describe_dashboard());
}

/// The alert rules as a Kubernetes ConfigMap, for a Prometheus running in the cluster.
const ALERTS_CONFIG_MAP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/warren-alerts.yaml"
);

fn alerts_config_map() -> String {
    let rules = std::fs::read_to_string(ALERTS).expect("the alert rules");
    let mut map = String::from(
        "# Warren's alert rules (images/prometheus/alerts.yml, verbatim) for a Prometheus in\n\
         # Kubernetes: mount the key alerts.yml and list it under rule_files. Replace `orders` in\n\
         # the queue matchers with your queue. tests/monitoring.rs writes this file from the rules\n\
         # (WARREN_WRITE_DOCS=1) and fails when it is out of date.\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  name: warren-alerts\n  labels:\n    app.kubernetes.io/name: warren\n    \
         app.kubernetes.io/component: monitoring\n\
         data:\n  alerts.yml: |\n",
    );
    for line in rules.lines() {
        if line.is_empty() {
            map.push('\n');
        } else {
            map.push_str(&format!("    {line}\n"));
        }
    }
    map
}

#[test]
fn the_kubernetes_alert_rules_are_the_alert_rules() {
    written_or_checked(ALERTS_CONFIG_MAP, &alerts_config_map());
}

/// A file generated from another: written from `wanted` with `WARREN_WRITE_DOCS=1`, and
/// otherwise required to be exactly that.
fn written_or_checked(path: &str, wanted: &str) {
    if std::env::var_os("WARREN_WRITE_DOCS").is_some() {
        std::fs::write(path, wanted).expect("the generated file written");
    }
    let found = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        found == wanted,
        "{path} is out of date: run WARREN_WRITE_DOCS=1 cargo test --test monitoring"
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    support::run("promtool", &["check", "rules", ALERTS]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_expression_evaluates_against_a_real_prometheus() {
    let cluster = Cluster::start("monitoring", &[]).await;
    let queue = &cluster.queue.name;
    let (_producer, producer_target) = producer(&cluster.queue).await;

    let nodes: Vec<String> = cluster.running().map(|n| host_port(&n.base)).collect();
    let scrape = [
        job("warren-consumer", &nodes, "/metrics"),
        job("warren-producer", &[producer_target], "/metrics"),
        job(
            "rabbitmq",
            &["127.0.0.1:15692".to_owned()],
            "/metrics/per-object",
        ),
    ]
    .concat();
    let rules = alert_rules(queue);
    let prometheus = Prometheus::start(&scrape, &rules).await;
    eventually("every target to be scraped", WAIT, || async {
        let up = prometheus.query("up == 1").await;
        (up.len() == 5).then_some(())
    })
    .await;
    // Dead letters after the first scrape, so their counter's increase is seen.
    let mut bad = Orders::new(&cluster.queue, 1);
    for i in 0..3 {
        bad.raw(format!("not an order {i}").into_bytes()).await;
    }
    bad.flush().await;

    for (title, expr) in dashboard_expressions(queue) {
        prometheus
            .has_data(&format!("panel \"{title}\""), &expr)
            .await;
    }
    // Once every rule was evaluated, none of them failed to.
    let alerts = eventually("every rule to be evaluated", WAIT, || async {
        let rules = prometheus.rules().await;
        rules
            .iter()
            .all(|(_, _, health)| health == "ok")
            .then_some(rules)
    })
    .await;
    assert_eq!(alerts.len(), 10, "{alerts:?}");
    // Each expression evaluates (`query` asserts it); the provoked alerts fire, and nothing else
    // fires. (Pending is allowed: a momentary value, such as a member unreachable for one slow
    // heartbeat on a loaded machine, is what `for:` is there to ride out.)
    for (_, expr, _) in &alerts {
        prometheus.query(expr).await;
    }
    for name in MUST_FIRE {
        let firing = format!("ALERTS{{alertname=\"{name}\",alertstate=\"firing\"}}");
        prometheus.has_data(name, &firing).await;
    }
    let raised = prometheus.alert_states().await;
    let unexpected: Vec<&(String, String)> = raised
        .iter()
        .filter(|(name, state)| state == "firing" && !MUST_FIRE.contains(&name.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "alerts in a healthy cluster: {unexpected:?}"
    );
    drop(cluster);
}

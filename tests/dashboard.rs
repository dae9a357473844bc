//! The Grafana dashboard only queries series that exist: every metric name in its expressions
//! appears in a real scrape of `warren-consumer`, `warren-producer` or the broker.

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;

use support::{Consumer, TestQueue, binary};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Metric names in PromQL text: identifiers with one of our prefixes.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["warren_", "rabbitmq_", "process_"] {
        let mut rest = expr;
        while let Some(at) = rest.find(prefix) {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

fn series_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

async fn scrape(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/grafana/dashboards/warren.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(wanted.iter().any(|n| n.starts_with("warren_producer_")));

    let queue = TestQueue::new("dashboard");
    let consumer = Consumer::start(&queue, &[]).await;
    let mut producer = tokio::process::Command::new(binary("warren-producer"))
        .args([
            "--queue",
            &queue.name,
            "--rate",
            "50",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = BufReader::new(producer.stdout.take().unwrap())
        .lines()
        .next_line()
        .await
        .unwrap()
        .unwrap();
    let producer_base = line.rsplit(' ').next().unwrap().to_owned();

    let mut exported = series_names(&scrape(&format!("{}/metrics", consumer.base)).await);
    exported.extend(series_names(
        &scrape(&format!("{producer_base}/metrics")).await,
    ));
    exported.extend(series_names(
        &scrape("http://127.0.0.1:15692/metrics").await,
    ));
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series nobody exports: {missing:?}"
    );
}

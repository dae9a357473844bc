//! A message's journey as one trace: `warren-producer` injects a `traceparent` header, the
//! consuming node continues that trace and sends it over the cluster link, and the node hosting
//! the product joins it (link, handling, store). A real OTLP/HTTP receiver here decodes the
//! protobuf the processes export.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use support::cluster::SECRET;
use support::{Consumer, TestDb, TestQueue, binary, eventually, free_port, up_members};

const WAIT: Duration = Duration::from_secs(120);

/// One exported span, as much of it as the test looks at.
#[derive(Clone, Debug)]
struct Exported {
    service: String,
    instance: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
}

type Received = Arc<Mutex<Vec<Exported>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(request: &opentelemetry_proto::tonic::resource::v1::Resource, key: &str) -> String {
    request
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(text) => Some(text.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn as_str(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

async fn receive(State(received): State<Received>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut spans = received.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.unwrap_or_default();
        let service = attribute(&resource, "service.name");
        let instance = attribute(&resource, "service.instance.id");
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            spans.push(Exported {
                service: service.clone(),
                instance: instance.clone(),
                name: span.name,
                trace: hex(&span.trace_id),
                span: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
            });
        }
    }
    StatusCode::OK
}

/// An OTLP/HTTP receiver on a free port; returns its base URL and what it received.
async fn otlp_receiver() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_one_trace_from_the_producer_through_both_nodes() {
    let (endpoint, received) = otlp_receiver().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Export every 100 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let queue = TestQueue::new("tracing");
    queue.declare().await;
    let db = TestDb::create("tracing").await;
    let store = db.url();
    let (a, b) = (free_port([127, 0, 0, 1]), free_port([127, 0, 0, 1]));
    let (a, b) = (a.to_string(), b.to_string());
    let node = |id: &'static str, listen: &str, seeds: &[&str]| {
        let mut args = vec![
            "--node-id".to_owned(),
            id.to_owned(),
            "--listen".to_owned(),
            listen.to_owned(),
            "--cluster-secret".to_owned(),
            SECRET.to_owned(),
            "--entity-store".to_owned(),
            store.clone(),
        ];
        if !seeds.is_empty() {
            args.extend(["--seeds".to_owned(), seeds.join(",")]);
        }
        args
    };
    let args1 = node("n1", &a, &[]);
    let args2 = node("n2", &b, &[&a]);
    let n1 = Consumer::launch(&queue, &as_str(&args1), &env).await;
    let n2 = Consumer::launch(&queue, &as_str(&args2), &env).await;
    for node in [&n1, &n2] {
        eventually("both nodes Up", WAIT, || async {
            let status = node.get("/cluster").await?;
            (up_members(&status).len() == 2).then_some(())
        })
        .await;
    }

    let producer = tokio::process::Command::new(binary("warren-producer"))
        .args(["--uri", &queue.amqp().uri, "--queue", &queue.name])
        .args(["--count", "200", "--rate", "400", "--products", "20"])
        .envs(env)
        .env("RUST_LOG", "warn")
        .status()
        .await
        .expect("warren-producer runs");
    assert!(producer.success());
    queue.wait_drained(WAIT).await;

    // A trace the producer started, continued by n1's delivery span and joined on n2 by the
    // product's handling and storing.
    let joined = eventually(
        "a trace through the producer and both nodes",
        WAIT,
        || async {
            let spans = received.lock().unwrap().clone();
            let mut by_trace: BTreeMap<&str, Vec<&Exported>> = BTreeMap::new();
            for span in &spans {
                by_trace.entry(span.trace.as_str()).or_default().push(span);
            }
            by_trace.into_values().find_map(|trace| {
                let publish = trace
                    .iter()
                    .find(|s| s.service == "warren-producer" && s.name == "warren.publish")?;
                let delivery = trace.iter().find(|s| {
                    s.instance == "n1" && s.name == "warren.delivery" && s.parent == publish.span
                })?;
                let submit = trace.iter().find(|s| {
                    s.instance == "n1" && s.name == "warren.submit" && s.parent == delivery.span
                })?;
                let handle = trace.iter().find(|s| {
                    s.instance == "n2"
                        && s.name == "warren.entity.handle"
                        && s.parent == submit.span
                })?;
                // Sent over the link by n1, received from it by n2.
                for (node, name) in [("n1", "warren.link.send"), ("n2", "warren.link.receive")] {
                    trace.iter().find(|s| {
                        s.instance == node && s.name == name && s.parent == submit.span
                    })?;
                }
                // Stored inside the handling.
                trace.iter().find(|s| {
                    s.instance == "n2" && s.name == "warren.store.append" && s.parent == handle.span
                })?;
                let steps: BTreeSet<String> = trace
                    .iter()
                    .filter(|s| s.instance == "n1" && s.parent == delivery.span)
                    .map(|s| s.name.clone())
                    .collect();
                Some(steps)
            })
        },
    )
    .await;
    for step in ["warren.decode", "warren.ack"] {
        assert!(joined.contains(step), "{step} missing from {joined:?}");
    }
    drop((n1, n2, db));
}

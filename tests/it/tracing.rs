//! OpenTelemetry end to end: `halosync publish` starts a trace and puts
//! `traceparent` on the message; the worker's `message` span continues it,
//! with child spans for Redis and each HaloPSA request; a retried message
//! keeps the trace. The spans are received over OTLP/HTTP by a collector
//! running in this test process.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use axum::Router;
use halo_sim::{Faults, SimConfig};
use halosync_shared::contract::Family;
use halosync_tests::{account_event, binary_path, EnvOptions, TestEnv, SECRET_ENV};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
}

type Spans = Arc<Mutex<Vec<Span>>>;

/// A minimal OTLP/HTTP (protobuf) trace receiver.
async fn collector() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let store = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = store.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Span {
                                service: service.clone(),
                                name: s.name,
                                trace_id: s.trace_id,
                                span_id: s.span_id,
                                parent: s.parent_span_id,
                            });
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

/// Runs `halosync publish` on one event with traces exported to `endpoint`.
fn publish_traced(
    env: &TestEnv,
    event: &serde_json::Value,
    endpoint: &str,
) -> std::process::Output {
    let file = env.dir.join("events.jsonl");
    std::fs::write(&file, serde_json::to_string(event).unwrap()).unwrap();
    Command::new(binary_path("halosync"))
        .arg("publish")
        .arg(&file)
        .env("HALOSYNC_CONFIG", &env.config_path)
        .env(SECRET_ENV, "sim-secret")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .output()
        .expect("run halosync publish")
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_to_worker_to_halopsa_is_one_trace_even_across_a_retry() {
    let (endpoint, spans) = collector().await;
    let mut env = TestEnv::with(
        "trace",
        EnvOptions {
            sim: SimConfig {
                // The first HaloPSA request fails: the message is retried
                // through a delay queue and must stay in the same trace.
                faults: Faults {
                    fail_next: 1,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let w = env.spawn_worker_with(
        "halosync-account",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let out = publish_traced(
        &env,
        &account_event("evt_trace_1", "acc_1", "Traced Ltd", true, 1),
        &endpoint,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait_for("customer created", Duration::from_secs(30), || {
        env.clients().len() == 1
    })
    .await;
    env.wait_drained(Family::Account, Duration::from_secs(30))
        .await;
    // SIGTERM flushes the worker's spans.
    assert!(env.stop_worker(w).success());
    env.wait_for("spans exported", Duration::from_secs(15), || {
        let s = spans.lock().unwrap();
        s.iter().any(|s| s.name == "publish")
            && s.iter().filter(|s| s.name == "message").count() >= 2
    })
    .await;

    let all = spans.lock().unwrap().clone();
    let by_id: HashMap<Vec<u8>, &Span> = all.iter().map(|s| (s.span_id.clone(), s)).collect();
    let publish = all.iter().find(|s| s.name == "publish").unwrap();
    assert!(publish.parent.is_empty(), "publish starts the trace");
    assert!(publish.service.contains("halosync"), "{publish:?}");
    let messages: Vec<&Span> = all.iter().filter(|s| s.name == "message").collect();
    assert_eq!(
        messages.len(),
        2,
        "one attempt failed, the retry succeeded: {all:#?}"
    );
    for m in &messages {
        assert_eq!(
            m.trace_id, publish.trace_id,
            "the worker continues the trace"
        );
        assert_eq!(m.parent, publish.span_id, "message is a child of publish");
        assert!(m.service.contains("halosync-account"), "{m:?}");
    }
    // HaloPSA and Redis spans hang under a message span of this trace.
    let under_message = |name_prefix: &str| {
        all.iter()
            .filter(|s| s.name.starts_with(name_prefix))
            .filter(|s| s.trace_id == publish.trace_id)
            .filter(|s| {
                // walk up to a `message` span
                let mut cur = by_id.get(&s.parent).copied();
                while let Some(p) = cur {
                    if p.name == "message" {
                        return true;
                    }
                    cur = by_id.get(&p.parent).copied();
                }
                false
            })
            .count()
    };
    assert!(under_message("halo.request") >= 3, "{all:#?}");
    assert!(under_message("redis.") >= 3, "{all:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_dead_letter_keeps_its_trace() {
    let (endpoint, spans) = collector().await;
    let mut env = TestEnv::with(
        "trace-replay",
        EnvOptions::faults(Faults {
            deny: vec!["customers:write".into()],
            ..Default::default()
        }),
    )
    .await;
    let w = env.spawn_worker_with(
        "halosync-account",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let publish = publish_traced(
        &env,
        &account_event("evt_trace_2", "acc_2", "Replayed Ltd", true, 1),
        &endpoint,
    );
    assert!(publish.status.success());
    let dead = env.topology.dead_queue(Family::Account);
    for _ in 0..100 {
        if env.depth(&dead).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.depth(&dead).await, 1, "{}", env.logs());
    // The operator fixes the permission and replays.
    env.sim.set_faults(Faults::default());
    let (ok, out) = env.run_halosync(&["dlq", "replay", "--class", "rejected"]);
    assert!(ok, "{out}");
    env.wait_for("applied after replay", Duration::from_secs(30), || {
        env.clients().len() == 1
    })
    .await;
    assert!(env.stop_worker(w).success());
    env.wait_for("spans exported", Duration::from_secs(15), || {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == "message")
            .count()
            >= 2
    })
    .await;
    let all = spans.lock().unwrap().clone();
    let root = all.iter().find(|s| s.name == "publish").unwrap();
    let messages: Vec<&Span> = all.iter().filter(|s| s.name == "message").collect();
    assert_eq!(
        messages.len(),
        2,
        "the rejected attempt and the replayed one"
    );
    for m in messages {
        assert_eq!(
            m.trace_id, root.trace_id,
            "the replay continues the publisher's trace"
        );
        assert_eq!(m.parent, root.span_id);
    }
}

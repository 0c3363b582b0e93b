//! Traces through the broker: a message published inside a span is handled inside a span of the
//! same trace whose parent is the publish span (or, for a batch, that links to it), with the
//! messaging attributes; a retry is an event on the failed attempt's span.
//!
//! The suite installs one OpenTelemetry layer for its process; its span processor keeps only
//! the spans of topics a case watches, in memory (nothing is exported over a network).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use polybus::opentelemetry::trace::{SpanId, TracerProvider as _};
use polybus::opentelemetry::{Context, Value};
use polybus::opentelemetry_sdk::error::OTelSdkResult;
use polybus::opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanProcessor};
use polybus::{ConsumeOptions, HandlerError, Message};
use tokio::time::Instant;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::fixture::{ACK_DEADLINE, Ctx, ENV, OrFail, WAIT, within};

/// The spans of watched topics, by topic, in the order they ended.
#[derive(Debug, Default)]
struct Watched {
    topics: Mutex<HashMap<String, Vec<SpanData>>>,
}

/// The span processor of the suite's tracer: hands ended spans to [`Watched`].
#[derive(Debug)]
struct Keep(Arc<Watched>);

impl SpanProcessor for Keep {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let Some(topic) = attribute(&span, "messaging.destination.name") else { return };
        let mut topics = self.0.topics.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(spans) = topics.get_mut(&topic) {
            spans.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

static WATCHED: OnceLock<Arc<Watched>> = OnceLock::new();

/// Installs the process's tracing subscriber: the OpenTelemetry layer (polybus's spans only)
/// and, when `RUST_LOG` is set, log lines on stderr.
pub(crate) fn install() {
    let watched = WATCHED.get_or_init(Arc::default).clone();
    let provider = SdkTracerProvider::builder().with_span_processor(Keep(watched)).build();
    // A publish span is traced (and so writes `traceparent` into the message) only inside a
    // case's own span: the other cases compare headers exactly and must see none of it.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("polybus-conformance"))
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, cx| {
            meta.target().starts_with("polybus")
                && (meta.name() != "publish" || cx.lookup_current().is_some())
        }));
    let logs = std::env::var_os("RUST_LOG").is_some().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(EnvFilter::from_default_env())
    });
    let _ = tracing_subscriber::registry().with(traces).with(logs).try_init();
}

fn watch(topic: &str) {
    if let Some(watched) = WATCHED.get() {
        let mut topics = watched.topics.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        topics.insert(topic.to_owned(), Vec::new());
    }
}

fn ended(topic: &str) -> Vec<SpanData> {
    let watched = WATCHED.get().expect("the suite installed its tracing layer");
    let topics = watched.topics.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    topics.get(topic).cloned().unwrap_or_default()
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| match &kv.value {
        Value::String(s) => s.as_str().to_owned(),
        other => other.to_string(),
    })
}

/// Waits until the watched `topic` has ended spans that `done` accepts; returns them.
async fn spans_until(topic: &str, what: &str, done: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
    let started = Instant::now();
    loop {
        let spans = ended(topic);
        if done(&spans) {
            return spans;
        }
        let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
        assert!(
            started.elapsed() < WAIT * 2,
            "{what}: not within {:?}; spans ended so far: {names:?}",
            WAIT * 2
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str, id: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| s.name == name && attribute(s, "messaging.message.id").as_deref() == Some(id))
        .collect()
}

pub(crate) async fn a_handler_span_continues_the_publishers_trace(ctx: Ctx) {
    watch(&ctx.event);
    let group = ctx.group("traced");
    let (broker_type, _) = ctx.bus.topic_spec(ENV, &ctx.event).await.or_fail("reading the topic");
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let handler = move |_message: Message| {
        let call = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            // The handler runs inside the process span: a span it opens is that span's child.
            let _inner = tracing::info_span!(target: "polybus_conformance", "handler work").entered();
            if call == 1 { Err::<(), HandlerError>("first attempt fails".into()) } else { Ok(()) }
        }
    };
    let options = ConsumeOptions::new(group.clone())
        .concurrency(1)
        .retry(Duration::from_millis(50), Duration::from_millis(200))
        .ack_deadline(ACK_DEADLINE);
    let what = "starting the consume loop";
    let consumer = within(WAIT, what, ctx.bus.consume(ENV, &ctx.event, options, handler)).await.or_fail(what);

    let checkout = tracing::info_span!(target: "polybus_conformance", "checkout");
    let publishing = ctx.bus.publish(ENV, &ctx.event, Message::text("traced order"));
    let id = within(WAIT, "publishing", publishing.instrument(checkout)).await.or_fail("publishing");

    let process = format!("process {}", ctx.event);
    let spans = spans_until(&ctx.event, "two process spans (a failed attempt and a retry)", |spans| {
        named(spans, &process, &id).len() >= 2
    })
    .await;
    within(WAIT, "shutting down", consumer.shutdown()).await.or_fail("shutting down");

    let publish = named(&spans, &format!("publish {}", ctx.event), &id);
    let [publish] = publish.as_slice() else { panic!("one publish span for {id}, got {}", publish.len()) };
    assert_ne!(publish.parent_span_id, SpanId::INVALID, "the publish span is a child of the caller's span");
    assert_eq!(attribute(publish, "messaging.system"), Some(broker_type.to_string()));
    assert_eq!(attribute(publish, "messaging.operation").as_deref(), Some("publish"));
    for (n, handled) in named(&spans, &process, &id).into_iter().enumerate() {
        let attempt = n + 1;
        assert_eq!(
            handled.span_context.trace_id(),
            publish.span_context.trace_id(),
            "attempt {attempt} is in the publisher's trace"
        );
        assert_eq!(
            handled.parent_span_id,
            publish.span_context.span_id(),
            "attempt {attempt}'s span is a child of the publish span"
        );
        assert_eq!(attribute(handled, "messaging.consumer.group.name"), Some(group.clone()));
        assert_eq!(attribute(handled, "messaging.destination.name"), Some(ctx.event.clone()));
        assert_eq!(attribute(handled, "messaging.operation").as_deref(), Some("process"));
        if attempt == 1 {
            let retried = handled.events.iter().any(|e| e.name.contains("will retry"));
            assert!(retried, "the failed attempt's span records the retry as an event: {:?}", handled.events);
        }
    }
}

pub(crate) async fn a_batch_span_links_to_each_publisher(ctx: Ctx) {
    watch(&ctx.event);
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |messages: Vec<Message>| {
        let _ = tx.send(messages.len());
        async { Ok::<(), polybus::BatchError>(()) }
    };
    let options = ConsumeOptions::new(ctx.group("batches"))
        .batch(10, Duration::from_millis(500))
        .ack_deadline(ACK_DEADLINE);
    let what = "starting the batch consume loop";
    let consumer =
        within(WAIT, what, ctx.bus.consume_batch(ENV, &ctx.event, options, handler)).await.or_fail(what);
    let mut published = Vec::new();
    for n in 0..3 {
        let span = tracing::info_span!(target: "polybus_conformance", "order", n);
        let publishing = ctx.bus.publish(ENV, &ctx.event, Message::text(format!("order {n}")));
        published.push(within(WAIT, "publishing", publishing.instrument(span)).await.or_fail("publishing"));
    }
    let mut seen = 0;
    while seen < published.len() {
        seen += within(WAIT, "a batch", handled.recv()).await.expect("batches");
    }
    let publish = format!("publish {}", ctx.event);
    let process = format!("process {}", ctx.event);
    let spans = spans_until(&ctx.event, "publish and batch spans", |spans| {
        published.iter().all(|id| named(spans, &publish, id).len() == 1)
            && spans.iter().filter(|s| s.name == process).map(|s| s.links.len()).sum::<usize>()
                >= published.len()
    })
    .await;
    within(WAIT, "shutting down", consumer.shutdown()).await.or_fail("shutting down");
    for id in &published {
        let producer = named(&spans, &publish, id)[0];
        let linked = spans.iter().filter(|s| s.name == process).any(|s| {
            s.links.iter().any(|link| link.span_context.span_id() == producer.span_context.span_id())
        });
        assert!(linked, "a batch span links to the publish span of {id}");
    }
}

//! Traces through brokers: a producer span per publish whose W3C trace context travels in the
//! message's `traceparent` / `tracestate` headers, and a consumer span per delivery (or per
//! batch, linked to each message's producer) that continues it, with the OpenTelemetry
//! messaging attributes.
//!
//! Spans are `tracing` spans; they reach OpenTelemetry when the application installs a
//! `tracing_opentelemetry` layer (`polybus serve --otlp-endpoint` does). Without one nothing is
//! injected and headers a publisher set itself (the server copies an HTTP request's) are kept.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use polybus_core::Message;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Where deliveries come from, for the attributes of consumer spans.
#[derive(Debug, Clone)]
pub(crate) struct Destination {
    /// `messaging.system`: the broker type.
    pub system: String,
    /// `messaging.destination.name`: the event.
    pub event: String,
    /// `messaging.consumer.group.name`.
    pub group: String,
}

struct Headers<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct ReadHeaders<'a>(&'a BTreeMap<String, String>);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Makes `span` a child of the remote span a W3C `traceparent` (and `tracestate`) names, e.g.
/// an HTTP request's; does nothing when `traceparent` is absent or malformed.
pub fn continue_trace(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let mut headers = BTreeMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if let Some(state) = tracestate {
        headers.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&ReadHeaders(&headers));
    if context.span().span_context().is_valid()
        && let Err(e) = span.set_parent(context)
    {
        tracing::debug!(error = %e, "a span could not join its caller's trace");
    }
}

/// The producer span of one publish (or of a batch of `count` messages).
pub(crate) fn publish_span(system: &str, event: &str, count: usize) -> Span {
    tracing::info_span!(
        "publish",
        otel.name = format!("publish {event}"),
        otel.kind = "producer",
        messaging.system = system,
        messaging.destination.name = event,
        messaging.operation = "publish",
        messaging.batch.message_count = count,
        messaging.message.id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.message = tracing::field::Empty,
    )
}

/// Marks `span` failed when `result` is an error (the error's text is already scrubbed).
pub(crate) fn outcome<T, E: std::fmt::Display>(span: &Span, result: &Result<T, E>) {
    if let Err(e) = result {
        span.record("otel.status_code", "ERROR");
        span.record("error.message", tracing::field::display(e));
    }
}

/// Writes `span`'s trace context into `message`'s headers, when it has one.
pub(crate) fn inject(span: &Span, message: &mut Message) {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&context, &mut Headers(&mut message.headers));
}

/// The producer's span context carried by `message`, when it carries a valid one.
fn producer(message: &Message) -> Option<opentelemetry::Context> {
    let context = TraceContextPropagator::new().extract(&ReadHeaders(&message.headers));
    context.span().span_context().is_valid().then_some(context)
}

/// A consumer span with the attributes of `destination`; the rest are recorded by the callers.
fn consumer_span(destination: &Destination) -> Span {
    tracing::info_span!(
        "process",
        otel.name = format!("process {}", destination.event),
        otel.kind = "consumer",
        messaging.system = %destination.system,
        messaging.destination.name = %destination.event,
        messaging.operation = "process",
        messaging.consumer.group.name = %destination.group,
        messaging.message.id = tracing::field::Empty,
        messaging.message.attempt = tracing::field::Empty,
        messaging.batch.message_count = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.message = tracing::field::Empty,
    )
}

/// The consumer span of one delivery, a child of its producer's span.
pub(crate) fn process_span(destination: &Destination, message: &Message) -> Span {
    let span = consumer_span(destination);
    span.record("messaging.message.id", message.id.as_str());
    span.record("messaging.message.attempt", message.attempt);
    if let Some(parent) = producer(message)
        && let Err(e) = span.set_parent(parent)
    {
        tracing::debug!(error = %e, "a consumer span could not take its producer as parent");
    }
    span
}

/// The consumer span of a batch, linked to each message's producer span.
pub(crate) fn process_batch_span(destination: &Destination, messages: &[Message]) -> Span {
    let span = consumer_span(destination);
    span.record("messaging.batch.message_count", messages.len());
    for message in messages {
        if let Some(context) = producer(message) {
            span.add_link(context.span().span_context().clone());
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_read_back_and_a_bad_one_ignored() {
        let good = Message::text("x")
            .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let context = producer(&good).expect("a producer context");
        assert_eq!(context.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(producer(&Message::text("x").header("traceparent", "00-abc-01")).is_none());
        assert!(producer(&Message::text("x")).is_none());
    }

    #[test]
    fn without_an_opentelemetry_layer_headers_are_left_alone() {
        let mut message = Message::text("x")
            .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let before = message.headers.clone();
        inject(&publish_span("embedded", "bus:orders", 1), &mut message);
        assert_eq!(message.headers, before);
    }
}

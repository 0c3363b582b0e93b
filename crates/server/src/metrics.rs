//! The server's metrics: its own series (traffic through it, connections, HTTP requests,
//! leases, group gauges) in a Prometheus recorder of its own, and the series every `Bus` of the
//! process emits (see [`polybus::metrics`]) in the process-wide recorder this module installs;
//! `/metrics` writes both with metrics-exporter-prometheus. The same traffic counts are kept as
//! JSON for `/v1/stats` (what the console polls).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use metrics::{Label, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::Serialize;
use utoipa::ToSchema;

/// Upper bounds of the publish latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Which topic in which env a counter is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicLabels {
    /// Broker tag.
    pub broker: String,
    /// Env slug.
    pub env: String,
    /// Topic tag (within the broker).
    pub topic: String,
}

impl TopicLabels {
    /// Labels for `event` (`broker:topic`) in `env`; `None` when `event` is not an event.
    pub fn of(env: &str, event: &str) -> Option<Self> {
        let event: polybus::EventRef = event.parse().ok()?;
        Some(TopicLabels { broker: event.broker, env: env.to_owned(), topic: event.topic })
    }
}

#[derive(Debug, Clone, Default)]
struct Latency {
    count: u64,
    sum: f64,
}

#[derive(Debug, Clone, Default)]
struct TopicCounters {
    published: u64,
    publish_errors: u64,
    delivered: u64,
    acked: u64,
    nacked: u64,
    dead_lettered: u64,
    latency: Latency,
    /// When anything last happened on the topic.
    active: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Connection {
    up: bool,
    since: DateTime<Utc>,
    error: Option<String>,
}

#[derive(Default)]
struct Counters {
    topics: BTreeMap<TopicLabels, TopicCounters>,
    connections: BTreeMap<(String, String), Connection>,
    leases: usize,
}

/// The server's counters.
pub struct Metrics {
    started: Instant,
    counters: Mutex<Counters>,
    groups: crate::lag::GroupGauges,
    /// This server's own series.
    recorder: PrometheusRecorder,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = recorder();
        metrics::with_local_recorder(&recorder, describe_server_series);
        Metrics {
            started: Instant::now(),
            counters: Mutex::new(Counters::default()),
            groups: Default::default(),
            recorder,
        }
    }
}

/// A Prometheus recorder whose latency series are histograms with [`LATENCY_BUCKETS`].
fn recorder() -> PrometheusRecorder {
    let builder = PrometheusBuilder::new();
    match builder.set_buckets(&LATENCY_BUCKETS) {
        Ok(builder) => builder.build_recorder(),
        // Only an empty bucket list is refused; the buckets are constant.
        Err(e) => unreachable!("constant histogram buckets refused: {e}"),
    }
}

/// The counters every topic with traffic through this server has.
const TOPIC_COUNTERS: [&str; 6] = [
    "polybus_messages_published_total",
    "polybus_publish_errors_total",
    "polybus_messages_delivered_total",
    "polybus_messages_acked_total",
    "polybus_messages_nacked_total",
    "polybus_messages_dead_lettered_total",
];

static LIBRARY: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder every `Bus` of this process emits its series into, once
/// (unless the application installed a recorder of its own first); `/metrics` writes them.
/// Call it before opening a `Bus`: a bus opened earlier keeps silent handles.
pub fn install_library_recorder() {
    LIBRARY.get_or_init(|| {
        let recorder = recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => {
                polybus::metrics::describe();
                Some(handle)
            }
            Err(_) => {
                tracing::info!(
                    "a metrics recorder was installed already; /metrics shows the server's series only"
                );
                None
            }
        }
    });
}

fn describe_server_series() {
    describe_counter!("polybus_messages_published_total", "Messages published through this server.");
    describe_counter!("polybus_publish_errors_total", "Publish requests that failed.");
    describe_counter!("polybus_messages_delivered_total", "Messages handed to consumers.");
    describe_counter!("polybus_messages_acked_total", "Deliveries acked.");
    describe_counter!("polybus_messages_nacked_total", "Deliveries nacked or whose lease expired.");
    describe_counter!(
        "polybus_messages_dead_lettered_total",
        "Deliveries sent to the dead-letter destination."
    );
    describe_histogram!(
        "polybus_publish_duration_seconds",
        metrics::Unit::Seconds,
        "Time to publish one request's messages to the broker."
    );
    describe_gauge!(
        "polybus_connection_up",
        "1 when the last operation on a broker env reached the broker, else 0."
    );
    describe_gauge!("polybus_open_leases", "Deliveries leased to HTTP consumers and not settled yet.");
    describe_counter!("polybus_http_requests_total", "HTTP requests answered, by route and status.");
    describe_gauge!("polybus_uptime_seconds", "Seconds since the server started.");
    crate::lag::describe();
}

/// Counters of one topic in one env, for `/v1/stats`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    /// Broker tag.
    pub broker: String,
    /// Env slug.
    pub env: String,
    /// The event, `broker:topic`.
    pub event: String,
    /// Messages published through this server.
    pub published: u64,
    /// Publish requests that failed.
    pub publish_errors: u64,
    /// Messages handed to consumers (SSE and pull), redeliveries included.
    pub delivered: u64,
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries nacked, by request or because their lease expired.
    pub nacked: u64,
    /// Deliveries sent to the dead-letter destination.
    pub dead_lettered: u64,
    /// Mean publish latency in milliseconds.
    pub publish_latency_ms: f64,
}

/// What this server last saw of a broker env.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStats {
    /// Broker tag.
    pub broker: String,
    /// Env slug.
    pub env: String,
    /// Whether the last operation on it (publish, subscribe, connection test) reached the broker.
    pub up: bool,
    /// Since when.
    pub since: DateTime<Utc>,
    /// The last failure, when down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Seconds since the server started.
    pub uptime_seconds: f64,
    /// Deliveries leased to consumers and not settled yet.
    pub open_leases: usize,
    /// One entry per topic and env with traffic through this server.
    pub topics: Vec<TopicStats>,
    /// One entry per broker env this server used.
    pub connections: Vec<ConnectionStats>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        let mut counters = self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut counters)
    }

    fn topic(&self, labels: &TopicLabels, f: impl FnOnce(&mut TopicCounters)) {
        let first = self.with(|c| {
            let first = !c.topics.contains_key(labels);
            let counters = c.topics.entry(labels.clone()).or_default();
            counters.active = Some(Instant::now());
            f(counters);
            first
        });
        if first {
            // Every counter of a topic shows from its first traffic on, at 0 until it counts.
            self.record(|| {
                for name in TOPIC_COUNTERS {
                    counter!(name, labels.labels()).absolute(0);
                }
            });
        }
    }

    /// Runs `f` with this server's recorder as the one the `metrics` macros write to.
    fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    fn count(&self, name: &'static str, labels: &TopicLabels, n: u64) {
        self.record(|| counter!(name, labels.labels()).increment(n));
    }

    /// Reads the groups of the topics with recent traffic again, for the group gauges.
    pub async fn refresh_groups(&self, bus: &polybus::Bus) {
        let mut active: Vec<(Instant, TopicLabels)> = self.with(|c| {
            c.topics
                .iter()
                .filter_map(|(labels, t)| {
                    t.active.filter(|at| at.elapsed() < crate::lag::RECENT).map(|at| (at, labels.clone()))
                })
                .collect()
        });
        active.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
        let topics = active.into_iter().take(crate::lag::MAX_TOPICS).map(|(_, labels)| labels).collect();
        self.groups.refresh(bus, topics).await;
    }

    /// `n` messages published in `took`.
    pub fn published(&self, labels: &TopicLabels, n: usize, took: Duration) {
        self.topic(labels, |t| {
            t.published += n as u64;
            t.latency.count += 1;
            t.latency.sum += took.as_secs_f64();
        });
        self.count("polybus_messages_published_total", labels, n as u64);
        self.record(|| {
            histogram!("polybus_publish_duration_seconds", labels.labels()).record(took.as_secs_f64())
        });
    }

    /// A publish request failed.
    pub fn publish_failed(&self, labels: &TopicLabels) {
        self.topic(labels, |t| t.publish_errors += 1);
        self.count("polybus_publish_errors_total", labels, 1);
    }

    /// A message was handed to a consumer.
    pub fn delivered(&self, labels: &TopicLabels) {
        self.topic(labels, |t| t.delivered += 1);
        self.count("polybus_messages_delivered_total", labels, 1);
    }

    /// A delivery was acked.
    pub fn acked(&self, labels: &TopicLabels) {
        self.topic(labels, |t| t.acked += 1);
        self.count("polybus_messages_acked_total", labels, 1);
    }

    /// A delivery was nacked.
    pub fn nacked(&self, labels: &TopicLabels) {
        self.topic(labels, |t| t.nacked += 1);
        self.count("polybus_messages_nacked_total", labels, 1);
    }

    /// A delivery was dead-lettered.
    pub fn dead_lettered(&self, labels: &TopicLabels) {
        self.topic(labels, |t| t.dead_lettered += 1);
        self.count("polybus_messages_dead_lettered_total", labels, 1);
    }

    /// Records whether an operation on `broker`'s `env` reached the broker.
    pub fn connection(&self, broker: &str, env: &str, outcome: Result<(), &polybus::Error>) {
        let (up, error) = match outcome {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        self.with(|c| {
            let entry = c
                .connections
                .entry((broker.to_owned(), env.to_owned()))
                .or_insert_with(|| Connection { up, since: Utc::now(), error: None });
            if entry.up != up {
                entry.since = Utc::now();
            }
            entry.up = up;
            entry.error = error;
        });
        let labels = [Label::new("broker", broker.to_owned()), Label::new("env", env.to_owned())];
        self.record(|| gauge!("polybus_connection_up", labels.to_vec()).set(f64::from(u8::from(up))));
    }

    /// Records the outcome of an operation when it says something about the broker connection.
    pub fn connection_outcome<T>(&self, broker: &str, env: &str, result: &polybus::Result<T>) {
        match result {
            Ok(_) => self.connection(broker, env, Ok(())),
            Err(e) => self.connection_error(broker, env, e),
        }
    }

    /// Records a failure when it means the broker could not be reached.
    pub fn connection_error(&self, broker: &str, env: &str, error: &polybus::Error) {
        if matches!(
            error,
            polybus::Error::Transport { .. }
                | polybus::Error::MissingSecret { .. }
                | polybus::Error::Secret(_)
        ) {
            self.connection(broker, env, Err(error));
        }
    }

    /// An HTTP request was answered.
    pub fn http_request(&self, method: &str, route: &str, status: u16) {
        let labels = [
            Label::new("method", method.to_owned()),
            Label::new("route", route.to_owned()),
            Label::new("status", status.to_string()),
        ];
        self.record(|| counter!("polybus_http_requests_total", labels.to_vec()).increment(1));
    }

    /// The number of open leases.
    pub fn set_leases(&self, open: usize) {
        self.with(|c| c.leases = open);
        self.record(|| gauge!("polybus_open_leases").set(open as f64));
    }

    /// The published count of every topic in every env, keyed by `(env, event)`.
    pub fn published_by_topic(&self) -> BTreeMap<(String, String), u64> {
        self.with(|c| {
            c.topics
                .iter()
                .map(|(l, t)| ((l.env.clone(), format!("{}:{}", l.broker, l.topic)), t.published))
                .collect()
        })
    }

    /// A snapshot for `/v1/stats`.
    pub fn stats(&self) -> Stats {
        self.with(|c| Stats {
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            open_leases: c.leases,
            topics: c
                .topics
                .iter()
                .map(|(l, t)| TopicStats {
                    broker: l.broker.clone(),
                    env: l.env.clone(),
                    event: format!("{}:{}", l.broker, l.topic),
                    published: t.published,
                    publish_errors: t.publish_errors,
                    delivered: t.delivered,
                    acked: t.acked,
                    nacked: t.nacked,
                    dead_lettered: t.dead_lettered,
                    publish_latency_ms: if t.latency.count == 0 {
                        0.0
                    } else {
                        t.latency.sum * 1000.0 / t.latency.count as f64
                    },
                })
                .collect(),
            connections: c
                .connections
                .iter()
                .map(|((broker, env), conn)| ConnectionStats {
                    broker: broker.clone(),
                    env: env.clone(),
                    up: conn.up,
                    since: conn.since,
                    error: conn.error.clone(),
                })
                .collect(),
        })
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        self.record(|| {
            gauge!("polybus_uptime_seconds").set(self.started.elapsed().as_secs_f64());
            self.groups.record();
        });
        let mut out = self.recorder.handle().render();
        if let Some(Some(library)) = LIBRARY.get() {
            out.push_str(&library.render());
        }
        out
    }
}

impl TopicLabels {
    /// The labels of this topic's series.
    pub fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("broker", self.broker.clone()),
            Label::new("env", self.env.clone()),
            Label::new("topic", self.topic.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histogram_are_exposed_per_topic() {
        let metrics = Metrics::default();
        let labels = TopicLabels::of("dev", "bus:orders").expect("event");
        metrics.published(&labels, 3, Duration::from_millis(2));
        metrics.delivered(&labels);
        metrics.acked(&labels);
        let text = metrics.render();
        let l = r#"broker="bus",env="dev",topic="orders""#;
        assert!(text.contains(&format!("polybus_messages_published_total{{{l}}} 3\n")), "{text}");
        assert!(text.contains(&format!("polybus_messages_acked_total{{{l}}} 1\n")), "{text}");
        assert!(text.contains(&format!("polybus_publish_duration_seconds_bucket{{{l},le=\"0.001\"}} 0\n")));
        assert!(text.contains(&format!("polybus_publish_duration_seconds_bucket{{{l},le=\"0.0025\"}} 1\n")));
        assert!(text.contains(&format!("polybus_publish_duration_seconds_count{{{l}}} 1\n")));
        assert!(
            text.contains("# HELP polybus_messages_published_total Messages published through this server.")
        );
        assert_eq!(metrics.stats().topics[0].event, "bus:orders");
    }

    #[test]
    fn label_values_are_escaped_by_the_exporter() {
        let metrics = Metrics::default();
        let labels = TopicLabels { broker: "b".into(), env: "dev".into(), topic: "a\"b\\c\nd".into() };
        metrics.acked(&labels);
        let text = metrics.render();
        assert!(text.contains(r#"topic="a\"b\\c\nd""#), "{text}");
    }
}

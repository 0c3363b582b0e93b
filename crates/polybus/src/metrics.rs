//! Metrics every `Bus` emits through the `metrics` facade, so an application using the library
//! directly gets them from any recorder it installs (Prometheus, OpenTelemetry, statsd); the
//! server installs a Prometheus one for `/metrics`. Without a recorder they cost nothing.
//!
//! Install the recorder before opening the `Bus`: handles taken before it stay silent.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `polybus_published_total` | counter | system, env, event |
//! | `polybus_publish_failed_total` | counter | system, env, event |
//! | `polybus_publish_seconds` | histogram | system, env, event |
//! | `polybus_delivered_total` | counter | system, env, event, group |
//! | `polybus_acked_total` | counter | system, env, event, group |
//! | `polybus_retried_total` | counter | system, env, event, group |
//! | `polybus_dead_lettered_total` | counter | system, env, event, group |
//! | `polybus_handler_seconds` | histogram | system, env, event, group |
//! | `polybus_handlers_in_flight` | gauge | system, env, event, group |

use metrics::{
    Counter, Gauge, Histogram, Label, counter, describe_counter, describe_gauge, describe_histogram,
};

/// Names of the series, for recorders and tests.
pub mod names {
    /// Messages published.
    pub const PUBLISHED: &str = "polybus_published_total";
    /// Publish calls that failed.
    pub const PUBLISH_FAILED: &str = "polybus_publish_failed_total";
    /// Time of one publish call.
    pub const PUBLISH_SECONDS: &str = "polybus_publish_seconds";
    /// Deliveries handed to a subscriber.
    pub const DELIVERED: &str = "polybus_delivered_total";
    /// Deliveries acked.
    pub const ACKED: &str = "polybus_acked_total";
    /// Deliveries given back for another attempt.
    pub const RETRIED: &str = "polybus_retried_total";
    /// Deliveries sent to the dead-letter destination.
    pub const DEAD_LETTERED: &str = "polybus_dead_lettered_total";
    /// Time a `consume` handler took.
    pub const HANDLER_SECONDS: &str = "polybus_handler_seconds";
    /// `consume` handlers running now.
    pub const HANDLERS_IN_FLIGHT: &str = "polybus_handlers_in_flight";
    /// Job runs finished, by `outcome` (`succeeded`, `failed`).
    pub const JOB_RUNS: &str = "polybus_job_runs_total";
    /// How late a job run's first attempt started after its scheduled time.
    pub const JOB_LAG_SECONDS: &str = "polybus_job_schedule_lag_seconds";
}

/// Describes the series to the installed recorder (help texts and units); call once after
/// installing it.
pub fn describe() {
    use names::*;
    describe_counter!(PUBLISHED, "Messages published.");
    describe_counter!(PUBLISH_FAILED, "Publish calls that failed.");
    describe_histogram!(PUBLISH_SECONDS, metrics::Unit::Seconds, "Time of one publish call.");
    describe_counter!(DELIVERED, "Deliveries handed to a subscriber.");
    describe_counter!(ACKED, "Deliveries acked.");
    describe_counter!(RETRIED, "Deliveries given back for another attempt.");
    describe_counter!(DEAD_LETTERED, "Deliveries sent to the dead-letter destination.");
    describe_histogram!(HANDLER_SECONDS, metrics::Unit::Seconds, "Time a consume handler took.");
    describe_gauge!(HANDLERS_IN_FLIGHT, "Consume handlers running now.");
    describe_counter!(JOB_RUNS, "Job runs finished, by outcome.");
    describe_histogram!(
        JOB_LAG_SECONDS,
        metrics::Unit::Seconds,
        "How late a job run started after its scheduled time."
    );
}

fn labels(system: &str, env: &str, event: &str, group: Option<&str>) -> Vec<Label> {
    let mut labels = vec![
        Label::new("system", system.to_owned()),
        Label::new("env", env.to_owned()),
        Label::new("event", event.to_owned()),
    ];
    if let Some(group) = group {
        labels.push(Label::new("group", group.to_owned()));
    }
    labels
}

/// The publish series of one route.
#[derive(Clone)]
pub(crate) struct PublishMetrics {
    pub published: Counter,
    pub failed: Counter,
    pub seconds: Histogram,
}

impl PublishMetrics {
    pub(crate) fn new(system: &str, env: &str, event: &str) -> Self {
        let labels = labels(system, env, event, None);
        PublishMetrics {
            published: counter!(names::PUBLISHED, labels.clone()),
            failed: counter!(names::PUBLISH_FAILED, labels.clone()),
            seconds: metrics::histogram!(names::PUBLISH_SECONDS, labels),
        }
    }

    /// Counts a publish call of `count` messages that began at `started`.
    pub(crate) fn observe<T, E>(&self, result: &Result<T, E>, count: usize, started: std::time::Instant) {
        self.seconds.record(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => self.published.increment(count as u64),
            Err(_) => self.failed.increment(1),
        }
    }
}

/// The consumer series of one subscriber.
pub(crate) struct ConsumerMetrics {
    pub delivered: Counter,
    pub acked: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    pub handler_seconds: Histogram,
    pub in_flight: Gauge,
}

impl ConsumerMetrics {
    pub(crate) fn new(system: &str, env: &str, event: &str, group: &str) -> Self {
        let labels = labels(system, env, event, Some(group));
        ConsumerMetrics {
            delivered: counter!(names::DELIVERED, labels.clone()),
            acked: counter!(names::ACKED, labels.clone()),
            retried: counter!(names::RETRIED, labels.clone()),
            dead_lettered: counter!(names::DEAD_LETTERED, labels.clone()),
            handler_seconds: metrics::histogram!(names::HANDLER_SECONDS, labels.clone()),
            in_flight: metrics::gauge!(names::HANDLERS_IN_FLIGHT, labels),
        }
    }
}

//! Results: min / median / max per adapter, size and way; ratios; markdown.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::latency::Latency;
use crate::memory::Memory;
use crate::way::{Kind, Rates};

/// Targets from issue 7 (polybus / raw client), relaxed per broker by issue 14 where noted.
const RAW_TARGET: f64 = 0.95;
/// Issue 14: Kafka consume against the raw client.
const KAFKA_CONSUME_TARGET: f64 = 0.5;
/// Issue 14: MQTT consume against the raw client.
const MQTT_CONSUME_TARGET: f64 = 0.8;
/// Issue 14: one by one, polybus against the raw client's awaited publish.
const ONE_BY_ONE_TARGET: f64 = 0.7;
/// Issue 14: Kafka (noida-db) publish one by one and in batches, messages per second.
const KAFKA_ONE_TARGET: f64 = 5_000.0;
const KAFKA_BATCHED_TARGET: f64 = 150_000.0;
const OMNIQUEUE_TARGET: f64 = 1.5;
const EMBEDDED_PUBLISH_TARGET: f64 = 100_000.0;
const EMBEDDED_CONSUME_TARGET: f64 = 50_000.0;
const EMBEDDED_P99_TARGET_US: u64 = 5_000;
const RSS_TARGET_KIB: u64 = 64 * 1024;

/// Everything one benchmark run measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Results {
    /// Rates of every run, by (adapter, payload size, way).
    pub runs: BTreeMap<String, Vec<Rates>>,
    /// Messages per run, by (adapter, payload size).
    pub messages: BTreeMap<String, usize>,
    /// Runs that failed.
    pub failures: Vec<String>,
    /// Adapters not run, and why.
    pub skipped: Vec<String>,
    /// The embedded broker's latency at a fixed rate.
    pub embedded_latency: Option<Latency>,
    /// Memory of consumers started far behind.
    pub memory: Vec<Memory>,
    /// One-by-one runs (256 B, one publisher awaiting every publish), by (adapter, way).
    pub one_by_one: BTreeMap<String, Vec<Rates>>,
    /// Messages per one-by-one run, by adapter.
    pub one_messages: BTreeMap<String, usize>,
    /// Runs whose consumer joined after the publish (256 B), by (adapter, way).
    pub backlog: BTreeMap<String, Vec<Rates>>,
    /// Messages per backlog run, by adapter.
    pub backlog_messages: BTreeMap<String, usize>,
}

/// The target of polybus / raw for `adapter` in one direction.
fn raw_target(adapter: &str, publish: bool) -> f64 {
    match (adapter, publish) {
        ("kafka", false) => KAFKA_CONSUME_TARGET,
        ("mqtt", false) => MQTT_CONSUME_TARGET,
        _ => RAW_TARGET,
    }
}

fn way_key(adapter: &str, kind: Kind) -> String {
    format!("{adapter}|{}", kind.name())
}

/// "met" or "**missed**".
fn verdict(value: f64, target: f64) -> &'static str {
    if value >= target { "met" } else { "**missed**" }
}

/// **median** [min – max] of `values`, or "–".
fn spread_cell(mut values: Vec<f64>) -> String {
    spread(&mut values).map_or("–".to_owned(), |(lo, mid, hi)| {
        format!("**{}** [{} – {}]", human(mid), human(lo), human(hi))
    })
}

/// The ratio `polybus / other` with its verdict, or "–" when either is missing.
fn ratio_cell(polybus: Option<f64>, other: Option<f64>, target: f64, suffix: &str) -> String {
    match (polybus, other) {
        (Some(p), Some(o)) => format!("{:.2} {}{suffix}", p / o, verdict(p / o, target)),
        _ => "–".to_owned(),
    }
}

/// The median of one field over runs.
fn median_of(runs: Option<&Vec<Rates>>, field: impl Fn(&Rates) -> f64) -> Option<f64> {
    let mut values: Vec<f64> = runs?.iter().map(field).collect();
    spread(&mut values).map(|(_, median, _)| median)
}

fn key(adapter: &str, size: usize, kind: Kind) -> String {
    format!("{adapter}|{size:08}|{}", kind.name())
}

/// min, median, max.
fn spread(values: &mut [f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some((values[0], values[values.len() / 2], values[values.len() - 1]))
}

fn human(rate: f64) -> String {
    if rate >= 10_000.0 { format!("{:.0}k", rate / 1000.0) } else { format!("{rate:.0}") }
}

fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

impl Results {
    /// Records one run.
    pub fn record(
        &mut self,
        adapter: &str,
        size: usize,
        messages: usize,
        kind: Kind,
        outcome: anyhow::Result<Rates>,
    ) {
        self.messages.insert(format!("{adapter}|{size:08}"), messages);
        match outcome {
            Ok(rates) => self.runs.entry(key(adapter, size, kind)).or_default().push(rates),
            Err(e) => self.failures.push(format!("{adapter} {} {}: {e:#}", size_name(size), kind.name())),
        }
    }

    /// Records one one-by-one run.
    pub fn record_one(&mut self, adapter: &str, messages: usize, kind: Kind, outcome: anyhow::Result<Rates>) {
        self.one_messages.insert(adapter.to_owned(), messages);
        match outcome {
            Ok(rates) => self.one_by_one.entry(way_key(adapter, kind)).or_default().push(rates),
            Err(e) => self.failures.push(format!("{adapter} one by one {}: {e:#}", kind.name())),
        }
    }

    /// Records one run whose consumer joined after the publish.
    pub fn record_backlog(
        &mut self,
        adapter: &str,
        messages: usize,
        kind: Kind,
        outcome: anyhow::Result<Rates>,
    ) {
        self.backlog_messages.insert(adapter.to_owned(), messages);
        match outcome {
            Ok(rates) => self.backlog.entry(way_key(adapter, kind)).or_default().push(rates),
            Err(e) => self.failures.push(format!("{adapter} from a backlog {}: {e:#}", kind.name())),
        }
    }

    fn median(&self, adapter: &str, size: usize, kind: Kind, publish: bool) -> Option<f64> {
        let mut values: Vec<f64> = self
            .runs
            .get(&key(adapter, size, kind))?
            .iter()
            .map(|r| if publish { r.publish } else { r.consume })
            .collect();
        spread(&mut values).map(|(_, median, _)| median)
    }

    /// (adapter, size) pairs measured, in order.
    fn workloads(&self) -> Vec<(String, usize)> {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for k in self.messages.keys() {
            if let Some((adapter, size)) = k.split_once('|') {
                seen.push((adapter.to_owned(), size.parse().unwrap_or(0)));
            }
        }
        seen
    }

    /// The ratio polybus / `other` of medians.
    fn ratio(&self, adapter: &str, size: usize, other: Kind, publish: bool) -> Option<f64> {
        Some(
            self.median(adapter, size, Kind::Polybus, publish)?
                / self.median(adapter, size, other, publish)?,
        )
    }

    /// The results as markdown, ending with one summary line per adapter and direction.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### Throughput\n");
        let _ = writeln!(
            out,
            "Messages per second; median of the repetitions, [min – max]. Publish: batches, each message \
             confirmed by the broker. Consume: receive + ack every message.\n"
        );
        let _ = writeln!(out, "| adapter | payload | messages | way | reps | publish/s | consume+ack/s |");
        let _ = writeln!(out, "|---|---|---:|---|---:|---|---|");
        for (adapter, size) in self.workloads() {
            let messages = self.messages.get(&format!("{adapter}|{size:08}")).copied().unwrap_or(0);
            for kind in [Kind::Polybus, Kind::Raw, Kind::Omniqueue] {
                let Some(runs) = self.runs.get(&key(&adapter, size, kind)) else { continue };
                let cell = |publish: bool| {
                    spread_cell(runs.iter().map(|r| if publish { r.publish } else { r.consume }).collect())
                };
                let _ = writeln!(
                    out,
                    "| {adapter} | {} | {messages} | {} | {} | {} | {} |",
                    size_name(size),
                    kind.name(),
                    runs.len(),
                    cell(true),
                    cell(false)
                );
            }
        }

        let _ = writeln!(out, "\n### Ratios (of medians)\n");
        let _ = writeln!(
            out,
            "| adapter | payload | direction | polybus/raw (target ≥ {RAW_TARGET} unless stated) | polybus/omniqueue (target ≥ {OMNIQUEUE_TARGET}) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for (adapter, size) in self.workloads() {
            for (direction, publish) in [("publish", true), ("consume", false)] {
                let cell = |other: Kind, target: f64| {
                    let stated = if other == Kind::Raw && target != RAW_TARGET {
                        format!(" (≥ {target})")
                    } else {
                        String::new()
                    };
                    ratio_cell(
                        self.median(&adapter, size, Kind::Polybus, publish),
                        self.median(&adapter, size, other, publish),
                        target,
                        &stated,
                    )
                };
                let _ = writeln!(
                    out,
                    "| {adapter} | {} | {direction} | {} | {} |",
                    size_name(size),
                    cell(Kind::Raw, raw_target(&adapter, publish)),
                    cell(Kind::Omniqueue, OMNIQUEUE_TARGET)
                );
            }
        }

        if !self.one_by_one.is_empty() {
            let _ = writeln!(out, "\n### One by one\n");
            let _ = writeln!(
                out,
                "One publisher awaiting every publish (256 B), what an application without batches gets; the \
                 raw client's awaited publish is the broker's own round trip through the same script. \
                 Medians of the repetitions; p50/p99 of one awaited publish in ms.\n"
            );
            let _ = writeln!(
                out,
                "| adapter | messages | polybus/s | polybus p50 / p99 | raw/s | raw p50 / p99 | polybus/raw (target ≥ {ONE_BY_ONE_TARGET}) |"
            );
            let _ = writeln!(out, "|---|---:|---:|---|---:|---|---|");
            for (adapter, messages) in &self.one_messages {
                let runs = |kind| self.one_by_one.get(&way_key(adapter, kind));
                let rate = |kind| median_of(runs(kind), |r| r.publish);
                let calls = |kind| match (
                    median_of(runs(kind), |r| r.publish_call.p50_us as f64),
                    median_of(runs(kind), |r| r.publish_call.p99_us as f64),
                ) {
                    (Some(p50), Some(p99)) => format!("{:.3} / {:.3}", p50 / 1000.0, p99 / 1000.0),
                    _ => "–".to_owned(),
                };
                let ratio = ratio_cell(rate(Kind::Polybus), rate(Kind::Raw), ONE_BY_ONE_TARGET, "");
                let _ = writeln!(
                    out,
                    "| {adapter} | {messages} | {} | {} | {} | {} | {ratio} |",
                    rate(Kind::Polybus).map_or("–".to_owned(), human),
                    calls(Kind::Polybus),
                    rate(Kind::Raw).map_or("–".to_owned(), human),
                    calls(Kind::Raw),
                );
            }
        }

        if !self.backlog.is_empty() {
            let _ = writeln!(out, "\n### Consume from a backlog\n");
            let _ = writeln!(
                out,
                "Both consumers join only once everything is published (256 B, batches of 100), so neither \
                 holds a message when its consume clock starts: each reads the backlog from the broker. \
                 Medians, [min – max].\n"
            );
            let _ = writeln!(
                out,
                "| adapter | messages | polybus consume+ack/s | raw consume+ack/s | polybus/raw |"
            );
            let _ = writeln!(out, "|---|---:|---|---|---|");
            for (adapter, messages) in &self.backlog_messages {
                let runs = |kind| self.backlog.get(&way_key(adapter, kind));
                let cell = |kind| {
                    spread_cell(runs(kind).map_or(Vec::new(), |r| r.iter().map(|r| r.consume).collect()))
                };
                let median = |kind| median_of(runs(kind), |r| r.consume);
                let target = raw_target(adapter, false);
                let ratio =
                    ratio_cell(median(Kind::Polybus), median(Kind::Raw), target, &format!(" (≥ {target})"));
                let _ = writeln!(
                    out,
                    "| {adapter} | {messages} | {} | {} | {ratio} |",
                    cell(Kind::Polybus),
                    cell(Kind::Raw)
                );
            }
        }

        if self.messages.keys().any(|k| k.starts_with("kafka|")) {
            let _ = writeln!(out, "\n### Kafka publishing (issue 14)\n");
            let met = verdict;
            if let Some(one) = median_of(self.one_by_one.get(&way_key("kafka", Kind::Polybus)), |r| r.publish)
            {
                let _ = writeln!(
                    out,
                    "- one by one (256 B): {} msg/s (target ≥ 5k: {})",
                    human(one),
                    met(one, KAFKA_ONE_TARGET)
                );
            }
            if let Some((_, size)) = self.workloads().into_iter().find(|(a, _)| a == "kafka")
                && let Some(batched) = self.median("kafka", size, Kind::Polybus, true)
            {
                let _ = writeln!(
                    out,
                    "- in batches of 100 ({}): {} msg/s (target ≥ 150k: {})",
                    size_name(size),
                    human(batched),
                    met(batched, KAFKA_BATCHED_TARGET)
                );
            }
        }

        let _ = writeln!(out, "\n### Embedded broker\n");
        if let Some((_, size)) = self.workloads().into_iter().find(|(a, _)| a == "embedded") {
            let met = verdict;
            if let Some(p) = self.median("embedded", size, Kind::Polybus, true) {
                let _ = writeln!(
                    out,
                    "- batched publish ({}): {} msg/s (target ≥ 100k: {})",
                    size_name(size),
                    human(p),
                    met(p, EMBEDDED_PUBLISH_TARGET)
                );
            }
            if let Some(c) = self.median("embedded", size, Kind::Polybus, false) {
                let _ = writeln!(
                    out,
                    "- consume+ack ({}): {} msg/s (target ≥ 50k: {})",
                    size_name(size),
                    human(c),
                    met(c, EMBEDDED_CONSUME_TARGET)
                );
            }
        }
        if let Some(l) = &self.embedded_latency {
            let _ = writeln!(
                out,
                "- latency at {} msg/s over {} messages: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 5 ms: {})",
                l.rate,
                l.messages,
                l.p50_us as f64 / 1000.0,
                l.p99_us as f64 / 1000.0,
                l.max_us as f64 / 1000.0,
                if l.p99_us < EMBEDDED_P99_TARGET_US { "met" } else { "**missed**" }
            );
        }

        if !self.memory.is_empty() {
            let _ = writeln!(out, "\n### Memory of a consumer started behind\n");
            let _ = writeln!(
                out,
                "| adapter | behind | RSS before subscribing | peak RSS | catch-up consume+ack/s | target < 64 MiB |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
            for m in &self.memory {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} MiB | {:.1} MiB | {} | {} |",
                    m.adapter,
                    m.behind,
                    m.baseline_kib as f64 / 1024.0,
                    m.peak_kib as f64 / 1024.0,
                    human(m.consume_rate),
                    if m.peak_kib < RSS_TARGET_KIB { "met" } else { "**missed**" }
                );
            }
        }
        if !self.skipped.is_empty() || !self.failures.is_empty() {
            let _ = writeln!(out, "\n### Skipped and failed\n");
            for s in &self.skipped {
                let _ = writeln!(out, "- skipped {s}");
            }
            for f in &self.failures {
                let _ = writeln!(out, "- failed {f}");
            }
        }

        // The plain summary scripts read: the smallest payload measured per adapter.
        let _ = writeln!(out, "\n### Summary\n\n```");
        let mut done = Vec::new();
        for (adapter, size) in self.workloads() {
            if done.contains(&adapter) {
                continue;
            }
            done.push(adapter.clone());
            for other in [Kind::Raw, Kind::Omniqueue] {
                for (direction, publish) in [("publish", true), ("consume", false)] {
                    if let Some(r) = self.ratio(&adapter, size, other, publish) {
                        let _ = writeln!(out, "polybus/{} {adapter} {direction} {r:.2}", other.name());
                    }
                }
            }
        }
        let _ = writeln!(out, "```");
        out
    }
}

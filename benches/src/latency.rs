//! Publish→deliver latency at a fixed publish rate, from a timestamp in the payload.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use polybus::{Bus, Message, SubscribeOptions};

use crate::polybus_way::fresh_topic;
use crate::way::unique;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    /// Messages measured.
    pub messages: usize,
    /// Publish rate, messages per second.
    pub rate: u32,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// A payload of `size` bytes (at least 8) starting with the current time.
pub fn stamped(size: usize) -> Bytes {
    let mut payload = vec![b'x'; size.max(8)];
    payload[..8].copy_from_slice(&now_ns().to_le_bytes());
    Bytes::from(payload)
}

/// How long ago a payload made by [`stamped`] was made.
pub fn age(payload: &[u8]) -> Option<Duration> {
    let stamp = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(Duration::from_nanos(now_ns().saturating_sub(stamp)))
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// p50 / p99 / max of `samples` (microseconds); sorts them.
pub fn percentiles(samples: &mut [u64], rate: u32) -> Latency {
    samples.sort_unstable();
    let at = |q: usize| samples.get((samples.len() * q / 100).min(samples.len().saturating_sub(1))).copied();
    Latency {
        messages: samples.len(),
        rate,
        p50_us: at(50).unwrap_or(0),
        p99_us: at(99).unwrap_or(0),
        max_us: samples.last().copied().unwrap_or(0),
    }
}

/// Publishes one message every `1/rate` s for `duration` to a fresh topic of `env` while one
/// member consumes and acks; measures each message's publish→deliver time.
pub async fn fixed_rate(bus: &Bus, env: &str, rate: u32, duration: Duration) -> Result<Latency> {
    let event = fresh_topic(bus.registry()).await?;
    let mut subscriber = bus.subscribe(env, &event, SubscribeOptions::new(unique("g"))).await?;
    let total = (duration.as_secs_f64() * f64::from(rate)) as usize;
    let consumer = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(total);
        crate::polybus_way::consume(&mut subscriber, total, 32, |d| {
            if let Some(age) = age(&d.payload) {
                samples.push(age.as_micros() as u64);
            }
        })
        .await?;
        subscriber.close().await?;
        anyhow::Ok(samples)
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    for _ in 0..total {
        tick.tick().await;
        bus.publish(env, &event, Message::new(stamped(256))).await?;
    }
    let mut samples = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .context("the consumer did not get every message within 60 s")???;
    bus.registry().delete_topic(&event).await?;
    Ok(percentiles(&mut samples, rate))
}

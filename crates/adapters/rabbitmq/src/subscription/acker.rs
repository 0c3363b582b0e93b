//! Settling a delivery: ack, reject with requeue, or a delayed copy through a TTL queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use polybus_core::{Acker, Error, Op, Result};

use super::Shared;
use crate::codec;
use crate::link::failed;
use crate::transport::{self, DELAY_EXCHANGE, Outgoing};

/// Settles one delivery: basic.ack, basic.reject with requeue, or a delayed copy.
pub(super) struct RabbitmqAcker {
    pub(super) shared: Arc<Shared>,
    pub(super) seq: u64,
    /// The channel the delivery came on, counted by `Shared::epoch`.
    pub(super) epoch: u64,
    pub(super) id: String,
    pub(super) attempt: u32,
    pub(super) props: BasicProperties,
    pub(super) payload: Bytes,
}

impl RabbitmqAcker {
    /// Takes the delivery out of the outstanding set: whoever does settles it.
    fn take(&self) -> Result<lapin::Acker> {
        let acker = self.shared.lock().outstanding.take(&self.seq);
        self.shared.wake_worker.notify_one();
        acker.ok_or_else(|| Error::LeaseLost(self.id.clone()))
    }

    fn fail(&self, op: Op, e: lapin::Error) -> Error {
        failed(&self.shared.inner.settings, op, &self.shared.target, e)
    }

    /// Waits for a settlement `sent` on the delivery's channel, or until that channel is lost:
    /// lapin may never answer a settlement sent as its connection dies, and the broker requeues
    /// the delivery of a lost channel itself.
    async fn done(&self, op: Op, sent: impl Future<Output = lapin::Result<bool>>) -> Result<()> {
        let mut epoch = self.shared.epoch.subscribe();
        let result = tokio::select! {
            result = sent => result,
            _ = epoch.wait_for(|e| *e != self.epoch) => return Err(Error::LeaseLost(self.id.clone())),
        };
        match result {
            Ok(true) => Ok(()),
            // The channel died meanwhile: the broker requeues the message.
            Ok(false) => Err(Error::LeaseLost(self.id.clone())),
            Err(e) => Err(self.fail(op, e)),
        }
    }
}

#[async_trait]
impl Acker for RabbitmqAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let acker = self.take()?;
        self.done(Op::Ack, acker.ack(BasicAckOptions::default())).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let acker = self.take()?;
        let Some(delay) = delay.filter(|d| !d.is_zero()) else {
            return self.done(Op::Nack, acker.reject(BasicRejectOptions { requeue: true })).await;
        };
        // No plugin needed: a copy waits in a TTL queue that dead-letters it back to the
        // group's queue through the default exchange; then the original is acked.
        let ms = transport::delay_ms(delay);
        let copy = Outgoing {
            exchange: DELAY_EXCHANGE.to_owned(),
            routing_key: self.shared.queue.clone(),
            props: codec::republished(&self.props, self.attempt.saturating_add(1), ms, ""),
            payload: self.payload.clone(),
            delay: Some((ms, String::new())),
            target: self.shared.target.clone(),
        };
        if let Err(e) = self.shared.inner.deliver(&copy).await {
            let _ = self.done(Op::Nack, acker.reject(BasicRejectOptions { requeue: true })).await;
            return Err(e);
        }
        self.done(Op::Nack, acker.ack(BasicAckOptions::default())).await
    }
}

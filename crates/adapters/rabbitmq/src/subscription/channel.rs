//! The worker that owns a member's channel: sets the consumer up, feeds the buffer, sweeps
//! deadlines and reconnects after the channel drops.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, ErrorKind};
use polybus_core::{Error, Op, Result};

use super::{Held, Shared};
use crate::codec;
use crate::link::{failed, reconnect_backoff};
use crate::transport;

impl Shared {
    fn setup_error(&self, e: lapin::Error) -> SetupError {
        // Channel-level refusals (access, missing or inequivalent objects) will not heal by retrying.
        let transient = !e.is_amqp_soft_error();
        SetupError { transient, error: failed(&self.inner.settings, Op::Subscribe, &self.target, e) }
    }

    /// Opens a channel, declares the exchange and the group's queue, binds it and consumes.
    pub(super) async fn establish(&self) -> Result<(Channel, Consumer), SetupError> {
        let conn = self.inner.consumers.connection().await.map_err(|e| SetupError {
            transient: e.is_transient(),
            error: e.into_error(&self.inner.settings, Op::Subscribe, &self.target),
        })?;
        let channel = conn.create_channel().await.map_err(|e| self.setup_error(e))?;
        transport::declare_exchange(&channel, &self.exchange).await.map_err(|e| self.setup_error(e))?;
        let mut args = FieldTable::default();
        // Quorum queues count deliveries (`x-delivery-count`), which gives each message its attempt.
        args.insert("x-queue-type".into(), codec::long("quorum"));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let channel = match channel.queue_declare(self.queue.as_str().into(), durable, args).await {
            Ok(_) => channel,
            Err(e) if precondition_failed(&e) => {
                // The queue exists with other arguments (made by another tool): use it as it is.
                tracing::warn!(queue = %self.queue, error = %self.scrub(e),
                    "group queue exists with other arguments; using it as it is");
                let channel = conn.create_channel().await.map_err(|e| self.setup_error(e))?;
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                channel
                    .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .map_err(|e| self.setup_error(e))?;
                channel
            }
            Err(e) => return Err(self.setup_error(e)),
        };
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.setup_error(e))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| self.setup_error(e))?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.setup_error(e))?;
        Ok((channel, consumer))
    }
}

/// Why a consumer could not be set up.
#[derive(Debug)]
pub(super) struct SetupError {
    /// What the subscriber hears when no try succeeded.
    pub(super) error: Error,
    /// Another try (on a new connection) may succeed.
    pub(super) transient: bool,
}

fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(err)
        if err.kind() == &AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

/// The next delivery of `consumer`; pending forever once there is none.
async fn next_of(consumer: &mut Option<Consumer>) -> Option<lapin::Result<lapin::message::Delivery>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// Runs until the subscription is closed and settled, or the transport closes.
pub(super) async fn worker(shared: Arc<Shared>, channel: Channel, consumer: Consumer) {
    let (mut channel, mut consumer) = (channel, Some(consumer));
    let mut cancelled = false;
    let period = (shared.ack_deadline / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (closing, settled) = {
            let state = shared.lock();
            (state.closing, state.outstanding.is_empty())
        };
        if closing && !cancelled {
            cancelled = true;
            if consumer.is_some() && channel.status().connected() {
                let tag = shared.consumer_tag.as_str().into();
                if let Err(e) = channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                    tracing::debug!(queue = %shared.queue, error = %shared.scrub(e), "cancelling consumer");
                }
            }
            let buffered: Vec<Held> = shared.lock().buffer.drain();
            for held in buffered {
                shared.give_back(&held.acker).await;
            }
            shared.cancelled.send_replace(true);
        }
        if closing && settled {
            if channel.status().connected() {
                let _ = channel.close(200, "OK".into()).await;
            }
            shared.end();
            return;
        }
        let lost = tokio::select! {
            delivery = next_of(&mut consumer) => match delivery {
                Some(Ok(delivery)) => {
                    shared.receive(delivery).await;
                    None
                }
                Some(Err(e)) => Some(shared.scrub(e)),
                None if closing => {
                    consumer = None;
                    None
                }
                None => Some("the broker cancelled the consumer".to_owned()),
            },
            _ = tick.tick() => {
                shared.sweep().await;
                (!channel.status().connected()).then(|| "the channel closed".to_owned())
            }
            _ = shared.wake_worker.notified() => None,
        };
        let Some(reason) = lost else { continue };
        shared.forget_all();
        // A channel that outlived its consumer gives back whatever it still holds.
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        if closing || shared.inner.consumers.is_closed() {
            shared.end();
            return;
        }
        tracing::warn!(queue = %shared.queue, %reason, "rabbitmq consumer lost; reconnecting");
        let mut delays = reconnect_backoff().build();
        loop {
            if shared.lock().closing || shared.inner.consumers.is_closed() {
                shared.end();
                return;
            }
            match shared.establish().await {
                Ok((ch, c)) => {
                    tracing::info!(queue = %shared.queue, "rabbitmq consumer resumed");
                    (channel, consumer) = (ch, Some(c));
                    break;
                }
                Err(e) => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(queue = %shared.queue, error = %e.error, retry_in = ?wait, "rabbitmq consumer reconnect failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shared.wake_worker.notified() => {}
                    }
                }
            }
        }
    }
}

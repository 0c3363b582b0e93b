//! Settles one delivery through the member's [`Settler`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::kit::gate::Slot;
use polybus_core::{Acker, Delivery, Error, Op, Result};

use super::Fetched;
use crate::settle::{Settle, Settler};

impl Settler {
    pub(super) fn delivery(self: &Arc<Self>, fetched: Fetched) -> Delivery {
        let Fetched { id, count, message, slot, .. } = fetched;
        let acker =
            RedisAcker { settler: self.clone(), entry: id, count, message_id: message.id.clone(), slot };
        Delivery::new(message, Box::new(acker))
    }
}

/// Settles one delivery; holds its prefetch slot until that is answered.
struct RedisAcker {
    settler: Arc<Settler>,
    entry: String,
    count: u32,
    message_id: String,
    slot: Slot,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        (*self).settle(Op::Ack, Settle::Ack).await
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let delay_ms = delay.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let how = Settle::Release { delay_ms, leave_count: self.count };
        (*self).settle(Op::Nack, how).await
    }
}

impl RedisAcker {
    /// Settles through the member's queue; the prefetch slot is freed once it is answered.
    async fn settle(self, op: Op, how: Settle) -> Result<()> {
        let RedisAcker { settler, entry, count, message_id, slot } = self;
        if settler.settle(op, entry, count, how, Some(slot)).await? {
            Ok(())
        } else {
            Err(Error::LeaseLost(message_id))
        }
    }
}

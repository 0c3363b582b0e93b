//! Settles one delivery of a member: ack, or nack by redelivery to the group.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use polybus_core::{Acker, Error, Op, Result};

use super::member::Member;

/// Settles one delivery of a member.
pub(super) struct MqttAcker {
    pub(super) member: Arc<Member>,
    pub(super) key: u64,
    pub(super) lease: u64,
    pub(super) id: String,
    pub(super) attempt: u32,
}

#[async_trait]
impl Acker for MqttAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        if !self.member.claim(self.key, self.lease) {
            return Err(Error::LeaseLost(self.id));
        }
        self.member.settle(self.key).await.map_err(|e| Error::transport(Op::Ack, &self.member.label, e))
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        if !self.member.claim(self.key, self.lease) {
            return Err(Error::LeaseLost(self.id));
        }
        let MqttAcker { member, key, attempt, .. } = *self;
        let attempt = attempt.saturating_add(1);
        match delay {
            None => member.redeliver(key, attempt).await.map_err(|e| {
                member.recover(key);
                Error::transport(Op::Nack, &member.label, e)
            }),
            Some(delay) => {
                // The original stays unacked (and in the session) until the copy is published.
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = member.redeliver(key, attempt).await {
                        tracing::warn!(topic = %member.label, error = %e, "redelivering a nacked message");
                        member.recover(key);
                    }
                });
                Ok(())
            }
        }
    }
}

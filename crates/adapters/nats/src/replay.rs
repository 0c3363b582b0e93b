//! Replay and message query on the topic's stream, which keeps every message (limits
//! retention) whether acked or not.
//!
//! A durable consumer's start cannot be changed, so a replay deletes the group's consumer
//! and creates it again with the same settings and the new start (`DeliverPolicy::All` or
//! `ByStartTime`). Whatever the group had pending is forgotten with the old consumer. A
//! member connected during a replay loses its pull requests, makes the consumer again with
//! the new start and goes on; subscribing later keeps the start too (see [`keep_start`]).
//! A query reads the stream with an ordered consumer of its own, starting at `since`.

use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{DeliverPolicy, FromConsumer, pull};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use futures::StreamExt;
use polybus_core::{
    FailureKind, MessageQuery, Op, ReplayFrom, Result, StoredMessage, SubscribeOptions, TopicSpec,
};

use crate::codec::{self, Delivered};
use crate::names::{self, TopicNames};
use crate::transport::{NatsTransport, Shared, consumer_config};

/// Longest wait for the next stored message of a query.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most messages one query reads while filtering by id or key; narrow it with since and until.
const SCAN_MAX: usize = 100_000;

fn not_found(e: &ConsumerError) -> bool {
    matches!(e.kind(), ConsumerErrorKind::JetStream(ref js) if js.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}

/// The group consumer's config as it exists on the server, when it does.
async fn existing(
    shared: &Shared,
    stream: &str,
    durable: &str,
) -> std::result::Result<Option<pull::Config>, ConsumerError> {
    match shared.js.get_consumer_from_stream::<pull::Config, _, _>(durable, stream).await {
        Ok(consumer) => {
            Ok(pull::Config::try_from_consumer_config(consumer.cached_info().config.clone()).ok())
        }
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Gives `config` the start of the group's existing consumer (which a replay may have moved),
/// so that making the consumer again updates it instead of failing on a changed start. On
/// error `config` is left as it is: making the consumer reports the problem.
pub(crate) async fn keep_start(shared: &Shared, stream: &str, config: &mut pull::Config) {
    let Some(durable) = config.durable_name.clone() else { return };
    if let Ok(Some(current)) = existing(shared, stream, &durable).await {
        config.deliver_policy = current.deliver_policy;
    }
}

impl NatsTransport {
    /// Makes the consumer of `group` on `topic` again, starting at `from`.
    pub(crate) async fn replay_group(&self, topic: &TopicSpec, group: &str, from: ReplayFrom) -> Result<()> {
        let names = TopicNames::of(&topic.native_name);
        self.ensure_once(topic, &names).await?;
        let shared = self.shared();
        let durable = names::consumer(&topic.native_name, group);
        let fail = |e: ConsumerError| {
            let kind = if not_found(&e) { FailureKind::NotFound } else { FailureKind::Unknown };
            self.failed(Op::Subscribe, &names, kind, e)
        };
        let mut config = existing(shared, &names.stream, &durable)
            .await
            .map_err(fail)?
            .unwrap_or_else(|| consumer_config(&topic.native_name, &names, &SubscribeOptions::new(group)));
        config.deliver_policy = match from {
            ReplayFrom::Beginning => DeliverPolicy::All,
            ReplayFrom::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
        };
        match shared.js.delete_consumer_from_stream(&durable, &names.stream).await {
            Err(e) if !not_found(&e) => return Err(fail(e)),
            _ => {}
        }
        shared.js.create_consumer_on_stream(config, names.stream.clone()).await.map_err(fail)?;
        Ok(())
    }

    /// Reads the stored messages of `topic` that `query` selects, oldest first.
    pub(crate) async fn stored_messages(
        &self,
        topic: &TopicSpec,
        query: &MessageQuery,
    ) -> Result<Vec<StoredMessage>> {
        let names = TopicNames::of(&topic.native_name);
        self.ensure_once(topic, &names).await?;
        let read_error = |e: &dyn std::fmt::Display| self.error(Op::Receive, &names, e);
        let stream = self.shared().js.get_stream(&names.stream).await.map_err(|e| read_error(&e))?;
        let deliver_policy = match query.since {
            Some(start_time) => DeliverPolicy::ByStartTime { start_time },
            None => DeliverPolicy::All,
        };
        let config = pull::OrderedConfig {
            filter_subject: names.subject.clone(),
            deliver_policy,
            description: Some("polybus message query".to_owned()),
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(|e| read_error(&e))?;
        let mut found = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(found);
        }
        let mut messages = consumer.messages().await.map_err(|e| read_error(&e))?;
        let mut scanned = 0;
        while found.len() < query.limit && scanned < SCAN_MAX {
            let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
                Err(_) => {
                    return Err(read_error(&format!("no stored message within {READ_TIMEOUT:?}"))
                        .with_kind(FailureKind::Timeout));
                }
                Ok(None) => break,
                Ok(Some(next)) => next.map_err(|e| read_error(&e))?,
            };
            scanned += 1;
            let info = message.info().map_err(|e| read_error(&e))?;
            if query.until.is_some_and(|until| info.published >= until) {
                break;
            }
            let (sequence, last) = (info.stream_sequence, info.pending == 0);
            let delivered =
                Delivered { stream: &names.stream, sequence, stored_at: info.published, attempt: 0 };
            let decoded = codec::decode(message.headers.as_ref(), message.payload.clone(), delivered);
            let id_matches = query.id.as_ref().is_none_or(|id| *id == decoded.id);
            if id_matches && (query.key.is_none() || query.key == decoded.key) {
                found.push(StoredMessage { message: decoded, position: Some(sequence.to_string()) });
            }
            if last {
                break;
            }
        }
        Ok(found)
    }
}

//! Delayed delivery, emulated: nats-server 2.9 cannot schedule a message, so a delayed
//! message waits on the topic's delayed stream. A mover (one durable consumer, shared by
//! every process using the topic) takes each one, naks it with the time it still has to
//! wait, and once it is due publishes it to the topic's subject and acks it. The copy keeps
//! the message's `Nats-Msg-Id`, so a mover stopped between publish and ack cannot store it twice.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use chrono::Utc;

use crate::codec::{self, DELIVER_AT};
use crate::names::{MOVER_CONSUMER, TopicNames};
use crate::puller::{self, PullError, Puller};
use crate::transport::Shared;

/// Delayed messages asked for at once.
const BATCH: usize = 64;
/// A taken message not settled within this is given to another mover.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest nak delay; a message due later is looked at again after this.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Pause before a failed move is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Moves due messages from `names`' delayed stream to its topic until the transport closes
/// or the delayed stream is deleted.
pub async fn run(shared: Shared, names: TopicNames) {
    let mut closed = shared.closed.clone();
    tokio::select! {
        () = puller::closed(&mut closed) => {}
        () = move_forever(&shared, &names) => {}
    }
}

fn consumer_config(names: &TopicNames) -> pull::Config {
    pull::Config {
        durable_name: Some(MOVER_CONSUMER.to_owned()),
        description: Some("polybus: moves due delayed messages to their topic".to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        // Waiting messages stay pending: no limit, or later ones would wait behind them.
        max_ack_pending: -1,
        filter_subject: names.delayed_subject.clone(),
        ..Default::default()
    }
}

async fn move_forever(shared: &Shared, names: &TopicNames) {
    let mut puller = Puller::new(shared.clone(), names.delayed_stream.clone(), consumer_config(names), None);
    loop {
        let mut batch = match puller.batch(BATCH).await {
            Ok(batch) => batch,
            Err(PullError::StreamGone(_)) => {
                tracing::debug!(stream = names.delayed_stream, "delayed stream is gone; mover stops");
                return;
            }
            Err(PullError::Failed(e)) => {
                let pause = puller.failed();
                tracing::warn!(stream = names.delayed_stream, error = e, "nats mover: pull failed; retrying");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        while let Some(item) = batch.next().await {
            match item {
                Ok(message) => {
                    puller.succeeded();
                    move_one(shared, names, message).await;
                }
                Err(e) => {
                    let pause = puller.failed();
                    tracing::warn!(
                        stream = names.delayed_stream,
                        error = e,
                        "nats mover: pull failed; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    break;
                }
            }
        }
    }
}

async fn move_one(shared: &Shared, names: &TopicNames, message: jetstream::Message) {
    let Some(reply) = message.reply.clone() else { return };
    let wait = codec::deliver_at(message.headers.as_ref())
        .and_then(|due| (due - Utc::now()).to_std().ok())
        .unwrap_or_default();
    let settled = if wait > Duration::ZERO {
        puller::settle(shared, &reply, AckKind::Nak(Some(wait.min(MAX_WAIT)))).await
    } else {
        let headers: HeaderMap = message
            .headers
            .iter()
            .flat_map(HeaderMap::iter)
            .filter(|(name, _)| AsRef::<str>::as_ref(*name) != DELIVER_AT)
            .flat_map(|(name, values)| values.iter().map(move |v| (name.clone(), v.clone())))
            .collect();
        let publish = PublishMessage::build().payload(message.payload.clone()).headers(headers);
        let published = match shared.js.send_publish(names.subject.clone(), publish).await {
            Ok(ack) => ack.await.map(drop),
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => puller::settle(shared, &reply, AckKind::Ack).await,
            Err(e) => {
                tracing::warn!(stream = names.stream, error = %shared.secrets.scrub(e), "nats mover: moving a due message failed; retrying");
                puller::settle(shared, &reply, AckKind::Nak(Some(RETRY_AFTER))).await
            }
        }
    };
    if let Err(e) = settled {
        tracing::debug!(
            stream = names.delayed_stream,
            error = e,
            "nats mover: settling failed; the message comes back"
        );
    }
}

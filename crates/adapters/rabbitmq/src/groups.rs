//! A topic's groups with their lag: each group is a queue `<native>--<group>`, whose passive
//! declaration tells its ready messages and its consumers.
//!
//! AMQP cannot list queues or bindings (only the management plugin can, and it is not part of
//! the broker's protocol), so the groups reported are those joined through this transport. Lag
//! is the queue's ready messages (retries waiting out a delay sit in a delay queue and are not
//! counted); members its consumers. AMQP does not tell a queue's unacknowledged messages nor
//! their age, so pending and the oldest unacked stay unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use lapin::ErrorKind;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use polybus_core::{GroupInfo, Op, Result, TopicSpec};

use crate::link::failed;
use crate::subscription::queue_name;
use crate::transport::Inner;

/// The groups joined through one transport, per topic native name.
#[derive(Debug, Default)]
pub(crate) struct Joined(Mutex<BTreeMap<String, BTreeSet<String>>>);

impl Joined {
    /// Records that `group` joined `topic`.
    pub fn add(&self, topic: &TopicSpec, group: &str) {
        let mut joined = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        joined.entry(topic.native_name.clone()).or_default().insert(group.to_owned());
    }

    fn of(&self, topic: &TopicSpec) -> Vec<String> {
        let joined = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        joined.get(&topic.native_name).map(|groups| groups.iter().cloned().collect()).unwrap_or_default()
    }

    fn forget(&self, topic: &TopicSpec, group: &str) {
        let mut joined = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(groups) = joined.get_mut(&topic.native_name) {
            groups.remove(group);
        }
    }
}

/// The groups of `topic` joined through this transport whose queues still exist.
pub(crate) async fn of_topic(inner: &Inner, topic: &TopicSpec) -> Result<Vec<GroupInfo>> {
    let settings = &inner.settings;
    let target = format!("rabbitmq {}", topic.native_name);
    let conn =
        inner.consumers.connection().await.map_err(|e| e.into_error(settings, Op::Receive, &target))?;
    let mut infos = Vec::new();
    for group in inner.joined.of(topic) {
        let queue = queue_name(topic, &group);
        // A passive declaration of a missing queue closes its channel: one channel each.
        let channel = conn.create_channel().await.map_err(|e| failed(settings, Op::Receive, &target, e))?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        match channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
            Ok(declared) => {
                infos.push(GroupInfo {
                    members: Some(u64::from(declared.consumer_count())),
                    lag: Some(u64::from(declared.message_count())),
                    ..GroupInfo::named(group)
                });
                let _ = channel.close(200, "groups read".into()).await;
            }
            Err(e) if not_found(&e) => inner.joined.forget(topic, &group),
            Err(e) => return Err(failed(settings, Op::Receive, format!("rabbitmq queue {queue}"), e)),
        }
    }
    Ok(infos)
}

fn not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(err) if err.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

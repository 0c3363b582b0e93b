//! A topic's groups: the subscriptions of its Pub/Sub topic named `<topic id>--<group>`.
//!
//! Pub/Sub publishes backlog and unacked counts only as Cloud Monitoring metrics, which are
//! not part of its API (nor of the emulator), so members, pending and lag stay unknown.

use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::paginator::ItemPaginator;
use polybus_core::{GroupInfo, Op, Result};

use crate::names::topic_id;
use crate::transport::{Shared, client_error, has_code};

/// Most subscriptions of one topic read.
const MAX_GROUPS: usize = 1000;

/// The groups of topic `native`; none when the topic does not exist yet.
pub(crate) async fn of_topic(shared: &Shared, native: &str) -> Result<Vec<GroupInfo>> {
    let prefix = shared.names.subscription(native, "");
    let mut items = shared.topics.list_topic_subscriptions().set_topic(shared.names.topic(native)).by_item();
    let mut infos = Vec::new();
    let mut seen = 0;
    while let Some(item) = items.next().await {
        let path = match item {
            Ok(path) => path,
            Err(e) if has_code(&e, Code::NotFound) => return Ok(Vec::new()),
            Err(e) => return Err(client_error(Op::Receive, format!("pubsub {}", topic_id(native)), e)),
        };
        if let Some(group) = path.strip_prefix(&prefix).filter(|group| !group.is_empty()) {
            infos.push(GroupInfo::named(group));
        }
        seen += 1;
        if seen == MAX_GROUPS {
            break;
        }
    }
    Ok(infos)
}

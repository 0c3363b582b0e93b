//! A topic's groups with their lag, from each group queue's approximate counts.
//!
//! Lag is `ApproximateNumberOfMessages` plus `ApproximateNumberOfMessagesDelayed` (not yet
//! received, or given back), pending `ApproximateNumberOfMessagesNotVisible` (received and not
//! deleted). SQS reports these as estimates and knows neither receivers nor message ages.

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use futures::future::try_join_all;
use polybus_core::{GroupInfo, Op, Result};

use crate::fail;
use crate::groups::{Directory, GROUP_TAG};
use crate::names::{TopicQueues, queue_name};

/// The groups of the topic with `queues`, each from its own queue, by name.
pub(crate) async fn of_topic(
    client: &Client,
    directory: &Directory,
    queues: &TopicQueues,
) -> Result<Vec<GroupInfo>> {
    let urls = directory.group_queues(queues).await?;
    let infos = try_join_all(urls.iter().map(|url| async move {
        let group = group_of(client, url).await?;
        counted(client, url, group).await
    }))
    .await?;
    Ok(infos.into_iter().flatten().collect())
}

/// The one queue every group of a topic competes on, reported as a group named after it.
pub(crate) async fn of_queue(client: &Client, url: &str) -> Result<Vec<GroupInfo>> {
    Ok(counted(client, url, Some(queue_name(url).to_owned())).await?.into_iter().collect())
}

/// The `polybus-group` tag of a group queue; `None` once it is gone.
async fn group_of(client: &Client, url: &str) -> Result<Option<String>> {
    match client.list_queue_tags().queue_url(url).send().await {
        Ok(out) => Ok(out.tags().and_then(|tags| tags.get(GROUP_TAG)).cloned()),
        Err(e) if fail::is_missing_queue(&e) => Ok(None),
        Err(e) => Err(fail::sqs(Op::Receive, queue_name(url), e)),
    }
}

/// `group` with the counts of its queue at `url`; `None` when the queue or the tag is gone.
async fn counted(client: &Client, url: &str, group: Option<String>) -> Result<Option<GroupInfo>> {
    let Some(group) = group else { return Ok(None) };
    let out = match client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e) if fail::is_missing_queue(&e) => return Ok(None),
        Err(e) => return Err(fail::sqs(Op::Receive, queue_name(url), e)),
    };
    let number = |name: QueueAttributeName| -> Option<u64> {
        out.attributes().and_then(|attributes| attributes.get(&name)).and_then(|value| value.parse().ok())
    };
    let visible = number(QueueAttributeName::ApproximateNumberOfMessages);
    let delayed = number(QueueAttributeName::ApproximateNumberOfMessagesDelayed);
    Ok(Some(GroupInfo {
        pending: number(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        lag: visible.map(|visible| visible + delayed.unwrap_or(0)),
        ..GroupInfo::named(group)
    }))
}

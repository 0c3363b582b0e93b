//! Which group queues a topic has, so a publish reaches every group.
//!
//! Group queues are found by listing the queues whose names start with the topic's group
//! prefix and keeping those tagged `polybus-topic: <base queue>` (a prefix alone would also
//! match the queues of a topic named `<native>--x`). A listing is trusted for [`LIST_TTL`]:
//! a group created through this transport gets the next publish at once, one created by another
//! process from the next listing on, at most [`LIST_TTL`] later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::Client;
use futures::future::join_all;
use polybus_core::{Op, Result};
use tokio::time::Instant;

use crate::fail;
use crate::names::{TopicQueues, queue_name};

/// Tag naming the base queue of the topic a group queue belongs to.
pub const TOPIC_TAG: &str = "polybus-topic";
/// Tag naming the group a group queue belongs to.
pub const GROUP_TAG: &str = "polybus-group";
/// How long a listing of a topic's group queues is used before listing again.
pub const LIST_TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Listing {
    urls: Vec<String>,
    listed: Option<Instant>,
}

/// The group queues of every topic this transport published to, listed on demand.
pub struct Directory {
    client: Client,
    topics: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Listing>>>>,
    /// Queue URL → the `polybus-topic` tag it carries (`None`: untagged).
    owners: Mutex<HashMap<String, Option<String>>>,
}

impl Directory {
    /// An empty directory.
    pub fn new(client: Client) -> Self {
        Directory { client, topics: Mutex::default(), owners: Mutex::default() }
    }

    /// The URLs of the group queues of `queues`' topic.
    pub async fn group_queues(&self, queues: &TopicQueues) -> Result<Vec<String>> {
        let entry = self.entry(&queues.base());
        // One listing at a time per topic: concurrent publishes wait for it instead of listing too.
        let mut listing = entry.lock().await;
        if let Some(listed) = listing.listed
            && listed.elapsed() < LIST_TTL
        {
            return Ok(listing.urls.clone());
        }
        let started = Instant::now();
        let urls = self.list(queues).await?;
        *listing = Listing { urls: urls.clone(), listed: Some(started) };
        Ok(urls)
    }

    /// Records a group queue this transport just made or found.
    pub async fn add(&self, queues: &TopicQueues, url: &str) {
        let base = queues.base();
        self.remember(url, Some(base.clone()));
        let entry = self.entry(&base);
        let mut listing = entry.lock().await;
        if !listing.urls.iter().any(|u| u == url) {
            listing.urls.push(url.to_owned());
        }
    }

    /// Forgets a group queue that no longer exists.
    pub async fn forget(&self, queues: &TopicQueues, url: &str) {
        let entry = self.entry(&queues.base());
        entry.lock().await.urls.retain(|u| u != url);
        self.lock_owners().remove(url);
    }

    fn entry(&self, base: &str) -> Arc<tokio::sync::Mutex<Listing>> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics.entry(base.to_owned()).or_default().clone()
    }

    fn lock_owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, url: &str, owner: Option<String>) {
        self.lock_owners().insert(url.to_owned(), owner);
    }

    async fn list(&self, queues: &TopicQueues) -> Result<Vec<String>> {
        let prefix = queues.group_prefix();
        let candidates: Vec<String> = self
            .client
            .list_queues()
            .queue_name_prefix(&prefix)
            .max_results(1000)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| fail::sqs(Op::Publish, &format!("{prefix}*"), e))?;
        let base = queues.base();
        let candidates = candidates.into_iter().filter(|url| {
            let name = queue_name(url);
            name.starts_with(&prefix) && name.ends_with(".fifo") == queues.fifo()
        });
        let checked = join_all(candidates.map(|url| async {
            let owner = self.owner(&url).await?;
            Ok::<_, polybus_core::Error>((owner.as_deref() == Some(base.as_str())).then_some(url))
        }))
        .await;
        let mut urls = Vec::new();
        for result in checked {
            if let Some(url) = result? {
                urls.push(url);
            }
        }
        Ok(urls)
    }

    /// The `polybus-topic` tag of a queue (asked once per queue: tags are set at creation).
    pub async fn owner(&self, url: &str) -> Result<Option<String>> {
        if let Some(owner) = self.lock_owners().get(url) {
            return Ok(owner.clone());
        }
        match self.client.list_queue_tags().queue_url(url).send().await {
            Ok(out) => {
                let owner = out.tags().and_then(|tags| tags.get(TOPIC_TAG)).cloned();
                self.remember(url, owner.clone());
                Ok(owner)
            }
            // Deleted since the listing: not a group of anything.
            Err(e) if fail::is_missing_queue(&e) => Ok(None),
            Err(e) => Err(fail::sqs(Op::Publish, queue_name(url), e)),
        }
    }
}

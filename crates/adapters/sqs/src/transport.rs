//! The SQS transport: publish fans out to the topic's group queues, subscribe reads one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use futures::future::join_all;
use polybus_core::kit::coalesce::{Coalescer, Config, Flush};
use polybus_core::{
    Capabilities, Error, GroupInfo, Message, Op, Result, SubscribeOptions, Subscription, Support, TopicSpec,
    Transport,
};
use tokio::sync::watch;

use crate::MAX_ENTRIES;
use crate::codec::{self, Encoded, MAX_MESSAGE_BYTES};
use crate::fail;
use crate::groups::{Directory, GROUP_TAG, TOPIC_TAG};
use crate::names::{TopicQueues, fifo_id, is_fifo_url, queue_name};
use crate::settle::{Settler, refused};
use crate::subscription::{Receiving, SqsSubscription, visibility_seconds};

/// Longest `DelaySeconds` SQS allows (15 minutes).
const MAX_DELAY_SECONDS: u64 = 900;
const BROKER_TYPE: &str = "aws_sqs";
/// Send calls under way at once per queue: publishes arriving meanwhile go out together.
const SEND_IN_FLIGHT: usize = 4;

/// Where a topic's messages go.
enum Route {
    /// The topic's own queue URL: one queue, every group competes on it.
    Single(String),
    /// A queue per group, each getting every message.
    Groups(TopicQueues),
}

impl Route {
    fn fifo(&self) -> bool {
        match self {
            Route::Single(url) => is_fifo_url(url),
            Route::Groups(queues) => queues.fifo(),
        }
    }
}

/// A message encoded once, with the FIFO fields and delay every queue gets.
struct Outgoing {
    encoded: Encoded,
    delay_seconds: i32,
    fifo: Option<(String, String)>,
}

/// A connection to SQS in one region and account.
pub struct SqsTransport {
    client: Client,
    /// The broker env's `queueUrl`: the queue of the topic whose native name is its name.
    broker_queue: Option<String>,
    directory: Directory,
    /// Queue name → URL, for queues this transport created or looked up.
    urls: Mutex<HashMap<String, String>>,
    /// Queue URL → settler of the messages received from it.
    settlers: Mutex<HashMap<String, Settler>>,
    /// Queue URL → sender coalescing the single publishes to it.
    senders: Mutex<HashMap<String, Sender>>,
    stop: watch::Sender<bool>,
    closed: AtomicBool,
}

impl SqsTransport {
    /// A transport over `client`; `broker_queue` is the broker env's `queueUrl`, if any.
    pub fn new(client: Client, broker_queue: Option<String>) -> Self {
        SqsTransport {
            directory: Directory::new(client.clone()),
            client,
            broker_queue,
            urls: Mutex::default(),
            settlers: Mutex::default(),
            senders: Mutex::default(),
            stop: watch::Sender::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// The SQS client, for what polybus does not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn route(&self, spec: &TopicSpec) -> Route {
        if let Some(url) = crate::kind::queue_url_of(spec) {
            return Route::Single(url.to_owned());
        }
        let queues = TopicQueues::new(&spec.native_name, crate::kind::fifo_of(spec));
        match &self.broker_queue {
            Some(url) if queue_name(url) == queues.base() => Route::Single(url.clone()),
            _ => Route::Groups(queues),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("sqs transport".into()));
        }
        Ok(())
    }

    fn known_url(&self, name: &str) -> Option<String> {
        self.urls.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    fn remember_url(&self, name: &str, url: &str) {
        self.urls.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), url.to_owned());
    }

    fn settler(&self, url: &str) -> Settler {
        let mut settlers = self.settlers.lock().unwrap_or_else(|e| e.into_inner());
        settlers
            .entry(url.to_owned())
            .or_insert_with(|| Settler::spawn(self.client.clone(), url.to_owned()))
            .clone()
    }

    /// Creates queue `name` (idempotent when it exists with the same attributes).
    async fn create_queue(&self, name: &str, fifo: bool, tags: &[(&str, &str)], op: Op) -> Result<String> {
        let mut request = self.client.create_queue().queue_name(name);
        if fifo {
            request = request.attributes(QueueAttributeName::FifoQueue, "true");
        }
        for (key, value) in tags {
            request = request.tags(*key, *value);
        }
        let out = request.send().await.map_err(|e| fail::sqs(op, name, e))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::transport(op, format!("sqs {name}"), "CreateQueue returned no URL"))?;
        self.remember_url(name, url);
        Ok(url.to_owned())
    }

    /// The queue of `group`, created (tagged, so publishers find it) when it does not exist.
    async fn group_queue(&self, queues: &TopicQueues, group: &str) -> Result<String> {
        let name = queues.group(group);
        if let Some(url) = self.known_url(&name) {
            return Ok(url);
        }
        let base = queues.base();
        let tags = [(TOPIC_TAG, base.as_str()), (GROUP_TAG, group)];
        let url = match self.client.get_queue_url().queue_name(&name).send().await {
            Ok(out) => match out.queue_url() {
                Some(url) => {
                    // Made by another client: tag it so publishers find it.
                    let untagged = self.directory.owner(url).await? != Some(base.clone());
                    if untagged {
                        let mut request = self.client.tag_queue().queue_url(url);
                        for (key, value) in tags {
                            request = request.tags(key, value);
                        }
                        request.send().await.map_err(|e| fail::sqs(Op::Subscribe, &name, e))?;
                    }
                    url.to_owned()
                }
                None => self.create_queue(&name, queues.fifo(), &tags, Op::Subscribe).await?,
            },
            Err(e) if fail::is_missing_queue(&e) => {
                self.create_queue(&name, queues.fifo(), &tags, Op::Subscribe).await?
            }
            Err(e) => return Err(fail::sqs(Op::Subscribe, &name, e)),
        };
        self.directory.add(queues, &url).await;
        self.remember_url(&name, &url);
        Ok(url)
    }

    /// Encodes `message` for `route`, refusing what SQS cannot take.
    fn outgoing(&self, route: &Route, message: &Message) -> Result<Outgoing> {
        let fifo = route.fifo();
        let delay_seconds = match message.delay {
            None => 0,
            Some(_) if fifo => {
                return Err(unsupported("per-message delays on FIFO queues (DelaySeconds)".into()));
            }
            Some(delay) => {
                let seconds = visibility_seconds(delay) as u64;
                if seconds > MAX_DELAY_SECONDS {
                    return Err(unsupported(format!("delays over 15 minutes (asked for {delay:?})")));
                }
                seconds as i32
            }
        };
        let encoded = codec::encode(message)
            .map_err(|why| Error::transport(Op::Publish, format!("sqs message {}", message.id), why))?;
        let size = encoded.size();
        if size > MAX_MESSAGE_BYTES {
            return Err(unsupported(format!(
                "messages over 256 KiB (message {} is {size} bytes with its attributes{})",
                message.id,
                if encoded.attributes.iter().any(|(n, v)| n == codec::ENCODING && v == "base64") {
                    ", its binary payload base64-encoded"
                } else {
                    ""
                }
            )));
        }
        let fifo =
            fifo.then(|| (fifo_id(message.key.as_deref().unwrap_or(&message.id)), fifo_id(&message.id)));
        Ok(Outgoing { encoded, delay_seconds, fifo })
    }

    /// The queues a publish to `route` goes to.
    async fn targets(&self, route: &Route) -> Result<Vec<String>> {
        match route {
            Route::Single(url) => Ok(vec![url.clone()]),
            Route::Groups(queues) => self.directory.group_queues(queues).await,
        }
    }

    /// Sends `outgoing` to every target, in order per queue; a group queue that vanished is skipped.
    async fn send_all(&self, route: &Route, outgoing: Vec<Outgoing>) -> Result<()> {
        let urls = self.targets(route).await?;
        if urls.is_empty() {
            tracing::debug!(messages = outgoing.len(), "topic has no groups yet: nothing to deliver to");
        }
        let outgoing: Vec<Arc<Outgoing>> = outgoing.into_iter().map(Arc::new).collect();
        let results = join_all(urls.iter().map(|url| self.send_to(url, &outgoing))).await;
        let mut first_error = None;
        for (url, result) in urls.iter().zip(results) {
            match (result, route) {
                (Ok(()), _) => {}
                (Err(Missing), Route::Groups(queues)) => {
                    tracing::debug!(queue = queue_name(url), "group queue is gone; forgetting it");
                    self.directory.forget(queues, url).await;
                    self.urls.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, known| known != url);
                }
                (Err(Missing), Route::Single(_)) => {
                    first_error.get_or_insert(Error::transport(
                        Op::Publish,
                        format!("sqs {}", queue_name(url)),
                        "the queue does not exist",
                    ));
                }
                (Err(Failed(e)), _) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// One message goes through the queue's sender, batched with concurrent publishes; a
    /// batch is sent in calls of at most 10 messages and 256 KiB, one after the other.
    async fn send_to(&self, url: &str, outgoing: &[Arc<Outgoing>]) -> Result<(), SendError> {
        if let [one] = outgoing {
            let closed = || Failed(Error::Closed(format!("sqs {}: sending stopped", queue_name(url))));
            return self.sender(url).call(one.clone()).await.unwrap_or_else(|_| Err(closed()));
        }
        for batch in batches(outgoing) {
            let refused = send_entries(&self.client, url, batch).await?;
            if let Some(why) = (0..batch.len()).find_map(|i| refused.get(&i)) {
                return Err(Failed(Error::transport(
                    Op::Publish,
                    format!("sqs {}", queue_name(url)),
                    format!("{} of {} messages refused; the first: {why}", refused.len(), batch.len()),
                )));
            }
        }
        Ok(())
    }

    fn sender(&self, url: &str) -> Sender {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        match senders.get(url) {
            // A sender whose runtime ended (the transport outlived it) is replaced, not reused.
            Some(sender) if !sender.is_closed() => sender.clone(),
            _ => {
                let config = Config::new(MAX_ENTRIES).in_flight(SEND_IN_FLIGHT).max_weight(MAX_MESSAGE_BYTES);
                let sender =
                    Coalescer::start(config, Publishes { client: self.client.clone(), url: url.to_owned() });
                senders.insert(url.to_owned(), sender.clone());
                sender
            }
        }
    }
}

/// Coalesces the single publishes to one queue.
type Sender = Coalescer<Arc<Outgoing>, Result<(), SendError>>;

/// Why sending to one queue failed.
enum SendError {
    /// The queue does not exist.
    Missing,
    /// Anything else.
    Failed(Error),
}
use SendError::{Failed, Missing};

/// Sends the publishes a queue's sender gathered, as one call.
struct Publishes {
    client: Client,
    url: String,
}

impl Flush<Arc<Outgoing>> for Publishes {
    type Output = Result<(), SendError>;

    async fn flush(&self, outgoing: Vec<Arc<Outgoing>>) -> Vec<Result<(), SendError>> {
        let (client, url) = (&self.client, self.url.as_str());
        let queue = queue_name(url);
        let answer = if let [one] = outgoing.as_slice() {
            send_one(client, url, one).await.map(|()| HashMap::new())
        } else {
            send_entries(client, url, &outgoing).await
        };
        (0..outgoing.len())
            .map(|i| match &answer {
                Ok(refused) => match refused.get(&i) {
                    Some(why) => Err(Failed(Error::transport(Op::Publish, format!("sqs {queue}"), why))),
                    None => Ok(()),
                },
                Err(Missing) => Err(Missing),
                Err(Failed(e)) => {
                    Err(Failed(Error::transport(Op::Publish, format!("sqs {queue}"), e.to_string())))
                }
            })
            .collect()
    }

    /// A message's share of the 256 KiB a call may carry.
    fn weight(&self, out: &Arc<Outgoing>) -> usize {
        out.encoded.size()
    }
}

async fn send_one(client: &Client, url: &str, out: &Outgoing) -> Result<(), SendError> {
    let mut request = client
        .send_message()
        .queue_url(url)
        .message_body(&out.encoded.body)
        .set_message_attributes(Some(out.encoded.sdk_attributes()));
    if out.delay_seconds > 0 {
        request = request.delay_seconds(out.delay_seconds);
    }
    if let Some((group, dedup)) = &out.fifo {
        request = request.message_group_id(group).message_deduplication_id(dedup);
    }
    match request.send().await {
        Ok(_) => Ok(()),
        Err(e) if fail::is_missing_queue(&e) => Err(Missing),
        Err(e) => Err(Failed(fail::sqs(Op::Publish, queue_name(url), e))),
    }
}

/// One `SendMessageBatch`; returns the index → reason of each message SQS refused.
async fn send_entries(
    client: &Client,
    url: &str,
    batch: &[Arc<Outgoing>],
) -> Result<HashMap<usize, String>, SendError> {
    let queue = queue_name(url);
    let entries = batch
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(&out.encoded.body)
                .set_message_attributes(Some(out.encoded.sdk_attributes()));
            if out.delay_seconds > 0 {
                entry = entry.delay_seconds(out.delay_seconds);
            }
            if let Some((group, dedup)) = &out.fifo {
                entry = entry.message_group_id(group).message_deduplication_id(dedup);
            }
            entry.build()
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failed(fail::unbuilt(Op::Publish, queue, e)))?;
    match client.send_message_batch().queue_url(url).set_entries(Some(entries)).send().await {
        Ok(out) => Ok(refused(out.failed())
            .into_iter()
            .filter_map(|(id, why)| Some((id.parse().ok()?, why)))
            .collect()),
        Err(e) if fail::is_missing_queue(&e) => Err(Missing),
        Err(e) => Err(Failed(fail::sqs(Op::Publish, queue, e))),
    }
}

/// Consecutive runs of at most 10 messages and 256 KiB each.
fn batches(outgoing: &[Arc<Outgoing>]) -> Vec<&[Arc<Outgoing>]> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, out) in outgoing.iter().enumerate() {
        let size = out.encoded.size();
        if i > start && (i - start == MAX_ENTRIES || bytes + size > MAX_MESSAGE_BYTES) {
            batches.push(&outgoing[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < outgoing.len() {
        batches.push(&outgoing[start..]);
    }
    batches
}

fn unsupported(what: String) -> Error {
    Error::Unsupported { broker_type: BROKER_TYPE.into(), what }
}

#[async_trait]
impl Transport for SqsTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            at_least_once: true,
            // Only FIFO queues keep order, and only per message group.
            ordering_per_key: false,
            delayed_delivery: Support::Native,
            nack_delay: Support::Native,
            fan_out: Support::Emulated,
            replay: false,
            counts_attempts: true,
            max_payload_bytes: Some(codec::MAX_PAYLOAD_BYTES),
        }
    }

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
        self.check_open()?;
        match self.route(spec) {
            Route::Single(url) => {
                self.client
                    .get_queue_attributes()
                    .queue_url(&url)
                    .attribute_names(QueueAttributeName::QueueArn)
                    .send()
                    .await
                    .map_err(|e| fail::sqs(Op::EnsureTopic, &url, e))?;
            }
            Route::Groups(queues) => {
                let base = queues.base();
                if self.known_url(&base).is_none() {
                    self.create_queue(&base, queues.fifo(), &[], Op::EnsureTopic).await?;
                }
            }
        }
        Ok(())
    }

    async fn publish(&self, spec: &TopicSpec, message: Message) -> Result<()> {
        self.check_open()?;
        let route = self.route(spec);
        let outgoing = self.outgoing(&route, &message)?;
        self.send_all(&route, vec![outgoing]).await
    }

    async fn publish_batch(&self, spec: &TopicSpec, messages: Vec<Message>) -> Result<()> {
        self.check_open()?;
        let route = self.route(spec);
        let outgoing = messages.iter().map(|m| self.outgoing(&route, m)).collect::<Result<Vec<_>>>()?;
        if outgoing.is_empty() {
            return Ok(());
        }
        self.send_all(&route, outgoing).await
    }

    async fn subscribe(&self, spec: &TopicSpec, options: &SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.check_open()?;
        let url = match self.route(spec) {
            Route::Single(url) => url,
            Route::Groups(queues) => self.group_queue(&queues, &options.group).await?,
        };
        Ok(Box::new(SqsSubscription::new(Receiving {
            client: self.client.clone(),
            settler: self.settler(&url),
            url,
            prefetch: options.prefetch,
            visibility: visibility_seconds(options.ack_deadline).max(1),
            stop: self.stop.subscribe(),
        })))
    }

    async fn groups(&self, spec: &TopicSpec) -> Result<Vec<GroupInfo>> {
        self.check_open()?;
        match self.route(spec) {
            Route::Single(url) => crate::lag::of_queue(&self.client, &url).await,
            Route::Groups(queues) => crate::lag::of_topic(&self.client, &self.directory, &queues).await,
        }
    }

    async fn ping(&self) -> Result<()> {
        self.client.list_queues().max_results(1).send().await.map(drop).map_err(|e| {
            let kind = fail::failure_kind(&e);
            Error::transport(Op::Ping, "sqs", fail::context(&e)).with_kind(kind).with_cause(e)
        })
    }

    async fn close(&self) -> Result<()> {
        // Publishes wait for SQS's answer, so none is pending; subscriptions stop receiving.
        self.closed.store(true, Ordering::Release);
        self.stop.send_replace(true);
        self.settlers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.senders.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(body_len: usize) -> Arc<Outgoing> {
        Arc::new(Outgoing {
            encoded: Encoded { body: "x".repeat(body_len), attributes: Vec::new() },
            delay_seconds: 0,
            fifo: None,
        })
    }

    #[test]
    fn batches_hold_ten_messages_and_256_kib_at_most() {
        let small: Vec<_> = (0..25).map(|_| outgoing(10)).collect();
        assert_eq!(batches(&small).iter().map(|b| b.len()).collect::<Vec<_>>(), [10, 10, 5]);
        let big: Vec<_> = (0..3).map(|_| outgoing(100_000)).collect();
        assert_eq!(batches(&big).iter().map(|b| b.len()).collect::<Vec<_>>(), [2, 1]);
        assert!(batches(&[]).is_empty());
    }
}

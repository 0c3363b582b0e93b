//! Raw `rumqttc` (MQTT 5): QoS 1 publishes awaiting their PUBACKs, a shared subscription with
//! manual acks and a receive maximum of the prefetch, as polybus's adapter does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::way::{Way, Workload, unique};

/// One raw MQTT run.
pub struct RawMqtt {
    host: String,
    port: u16,
    topic: String,
    publisher: Option<(AsyncClient, Arc<Acked>, JoinHandle<()>)>,
    subscriber: Option<(AsyncClient, mpsc::UnboundedReceiver<Publish>, JoinHandle<()>)>,
    /// Messages published so far (PUBACKs are counted against it).
    sent: usize,
}

/// PUBACKs counted by the publisher's event loop.
#[derive(Default)]
struct Acked {
    count: AtomicUsize,
    changed: Notify,
}

impl RawMqtt {
    /// A run against `host:port`.
    pub fn new(host: &str, port: u16) -> Self {
        RawMqtt {
            host: host.to_owned(),
            port,
            topic: unique("raw"),
            publisher: None,
            subscriber: None,
            sent: 0,
        }
    }

    fn options(&self, id: &str, receive_maximum: u16) -> MqttOptions {
        let mut options = MqttOptions::new(format!("{id}-{}", self.topic), &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_receive_maximum(Some(receive_maximum));
        options.set_max_packet_size(Some(16 * 1024 * 1024));
        options
    }
}

/// Polls an event loop until it fails, handing each event to `on`.
fn drive(mut events: EventLoop, mut on: impl FnMut(Event) + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            on(event);
        }
    })
}

#[async_trait]
impl Way for RawMqtt {
    async fn prepare(&mut self, work: &Workload) -> Result<()> {
        let prefetch = work.prefetch.min(u16::MAX as usize) as u16;
        let mut options = self.options("sub", prefetch);
        options.set_manual_acks(true);
        let (client, events) = AsyncClient::new(options, work.prefetch * 2);
        // Unbounded: the event loop must never drop a delivery (the broker may push more than the
        // receive maximum's worth while the benchmark is still publishing).
        let (deliveries, received) = mpsc::unbounded_channel();
        let subscribed = Arc::new(Notify::new());
        let on_suback = subscribed.clone();
        let task = drive(events, move |event| match event {
            Event::Incoming(Packet::Publish(publish)) => {
                let _ = deliveries.send(publish);
            }
            Event::Incoming(Packet::SubAck(_)) => on_suback.notify_one(),
            _ => {}
        });
        client.subscribe(format!("$share/g/{}", self.topic), QoS::AtLeastOnce).await?;
        if tokio::time::timeout(Duration::from_secs(10), subscribed.notified()).await.is_err() {
            bail!("no SUBACK within 10 s");
        }
        self.subscriber = Some((client, received, task));

        let (client, events) = AsyncClient::new(self.options("pub", u16::MAX), work.batch * 2);
        let acked = Arc::new(Acked::default());
        let counter = acked.clone();
        let task = drive(events, move |event| {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                counter.count.fetch_add(1, Ordering::Release);
                counter.changed.notify_one();
            }
        });
        self.publisher = Some((client, acked, task));
        Ok(())
    }

    async fn publish_batch(&mut self, work: &Workload, n: usize) -> Result<()> {
        let Some((client, acked, _)) = self.publisher.as_ref() else { bail!("not prepared") };
        for _ in 0..n {
            client.publish(self.topic.as_str(), QoS::AtLeastOnce, false, work.payload.clone()).await?;
        }
        self.sent += n;
        while acked.count.load(Ordering::Acquire) < self.sent {
            if tokio::time::timeout(Duration::from_secs(30), acked.changed.notified()).await.is_err() {
                bail!("PUBACKs stopped coming");
            }
        }
        Ok(())
    }

    async fn consume(&mut self, work: &Workload) -> Result<()> {
        let Some((client, received, _)) = self.subscriber.as_mut() else { bail!("not prepared") };
        for _ in 0..work.messages {
            let Some(publish) = received.recv().await else { bail!("the subscriber's connection ended") };
            client.ack(&publish).await?;
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        for (client, task) in
            [self.publisher.take().map(|(c, _, t)| (c, t)), self.subscriber.take().map(|(c, _, t)| (c, t))]
                .into_iter()
                .flatten()
        {
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        Ok(())
    }
}

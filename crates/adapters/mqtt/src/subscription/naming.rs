//! How a member and its group are named on the broker: topics, filters and client ids.

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::{AsyncClient, EventLoop};

use crate::codec;
use crate::config::Settings;
use crate::orphan::{self, Adopter, NEVER_EXPIRES};
use crate::publisher::Publisher;

/// Requests (acks, subscribes) queued towards the client's event loop, beyond prefetch.
const REQUEST_HEADROOM: usize = 16;
/// First topic level of each group's redeliveries.
pub(crate) const RETRY_PREFIX: &str = "polybus-retry";

/// The topic a group's redeliveries of `topic` are published to.
pub(crate) fn retry_topic(group: &str, topic: &str) -> String {
    format!("{RETRY_PREFIX}/{group}/{topic}")
}

/// The shared-subscription filter of `group` on `topic`.
fn shared_filter(group: &str, topic: &str) -> String {
    format!("$share/{group}/{topic}")
}

/// The client id of one incarnation of member `consumer` of `group` on `topic`.
fn member_client_id(prefix: &str, group: &str, consumer: &str, topic: &str, incarnation: &str) -> String {
    format!("{prefix}-{group}-{consumer}-{:08x}-{incarnation}", codec::stable_hash(topic) as u32)
}

/// One connection of a member, under a client id of its own.
pub(super) struct Incarnation {
    /// The last part of the client id and of the member's record topic.
    pub(super) id: String,
    pub(super) client_id: String,
    pub(super) client: AsyncClient,
    pub(super) connected: bool,
}

/// What names a member and its group on the broker.
pub(super) struct Names {
    pub(super) settings: Settings,
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) consumer: String,
    pub(super) prefetch: usize,
    pub(super) orphan_level: String,
    pub(super) retry_topic: String,
}

impl Names {
    /// The topic and the group's retry topic (shared), and the group's orphan records.
    pub(super) fn filters(&self) -> Vec<Filter> {
        let mut filters: Vec<Filter> =
            self.shared_filters().into_iter().map(|f| Filter::new(f, QoS::AtLeastOnce)).collect();
        // QoS 0: records are retained, so a session that missed one gets it when it subscribes.
        filters.push(Filter::new(format!("{}/+", self.orphan_level), QoS::AtMostOnce));
        filters
    }

    fn shared_filters(&self) -> Vec<String> {
        vec![shared_filter(&self.group, &self.topic), shared_filter(&self.group, &self.retry_topic)]
    }

    pub(super) fn record_topic(&self, incarnation: &str) -> String {
        format!("{}/{incarnation}", self.orphan_level)
    }

    /// A new client id, with its will, and the client to connect it.
    pub(super) fn incarnation(&self) -> (Incarnation, EventLoop) {
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let client_id =
            member_client_id(&self.settings.client_id, &self.group, &self.consumer, &self.topic, &id);
        let mut mqtt = self.settings.options(client_id.clone());
        mqtt.set_clean_start(true)
            .set_session_expiry_interval(Some(NEVER_EXPIRES))
            .set_manual_acks(true)
            .set_receive_maximum(Some(self.prefetch as u16))
            .set_outgoing_inflight_upper_limit(16)
            .set_last_will(orphan::will(&self.record_topic(&id), &client_id));
        let (client, eventloop) = AsyncClient::new(mqtt, self.prefetch + REQUEST_HEADROOM);
        (Incarnation { id, client_id, client, connected: false }, eventloop)
    }

    pub(super) fn adopter(&self, publisher: &Publisher) -> Adopter {
        let mut filters = self.shared_filters();
        filters.push(format!("{}/+", self.orphan_level));
        Adopter {
            settings: self.settings.clone(),
            publisher: publisher.clone(),
            retry_topic: self.retry_topic.clone(),
            filters,
        }
    }
}

//! Acknowledgements of one member, sent together: acks that arrive while one Acknowledge call
//! is under way go out in the next call, as one request for many ack ids (see
//! [`polybus_core::kit::coalesce`]).

use gcloud_gax::grpc::{Code, Status};
use gcloud_pubsub::subscription::Subscription as PullSubscription;
use polybus_core::kit::coalesce::{CallError, Coalescer, Config};

/// Most ack ids in one Acknowledge request (Pub/Sub caps a request at 512 KB; ack ids are a few
/// hundred bytes).
const MAX_IDS: usize = 1000;

/// The sending side of a member's ack queue; cheap to clone, one per delivery.
#[derive(Clone)]
pub(crate) struct AckQueue {
    acks: Coalescer<String, Result<(), Status>>,
}

impl AckQueue {
    /// Starts the task that sends the acks of `subscription`; it ends when every queue is dropped.
    pub fn start(subscription: PullSubscription) -> AckQueue {
        let flush = move |ids: Vec<String>| {
            let subscription = subscription.clone();
            async move {
                let count = ids.len();
                // One request for all: its outcome is every ack's.
                let outcome = subscription.ack(ids).await;
                vec![outcome; count]
            }
        };
        AckQueue { acks: Coalescer::start(Config::new(MAX_IDS), flush) }
    }

    /// Acknowledges `ack_id`; resolves once the request carrying it is answered.
    pub async fn ack(&self, ack_id: String) -> Result<(), Status> {
        match self.acks.call(ack_id).await {
            Ok(outcome) => outcome,
            Err(CallError::Closed) => Err(Status::new(Code::Cancelled, "the member's ack queue is gone")),
            Err(CallError::Unanswered(_)) => Err(Status::new(Code::Cancelled, "the ack was dropped")),
        }
    }
}

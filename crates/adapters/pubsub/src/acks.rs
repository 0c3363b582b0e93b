//! Acknowledgements of one member, sent together: acks that arrive while one Acknowledge call
//! is under way go out in the next call, as one request for many ack ids.

use gcloud_gax::grpc::Status;
use gcloud_pubsub::subscription::Subscription as PullSubscription;
use tokio::sync::{mpsc, oneshot};

/// Most ack ids in one Acknowledge request (Pub/Sub caps a request at 512 KB; ack ids are a few
/// hundred bytes).
const MAX_IDS: usize = 1000;

/// One ack waiting to be sent, and where its outcome goes.
type Queued = (String, oneshot::Sender<Result<(), Status>>);

/// The sending side of a member's ack queue; cheap to clone, one per delivery.
#[derive(Clone)]
pub(crate) struct AckQueue {
    tx: mpsc::UnboundedSender<Queued>,
}

impl AckQueue {
    /// Starts the task that sends the acks of `subscription`; it ends when every queue is dropped.
    pub fn start(subscription: PullSubscription) -> AckQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(flush(subscription, rx));
        AckQueue { tx }
    }

    /// Acknowledges `ack_id`; resolves once the request carrying it is answered.
    pub async fn ack(&self, ack_id: String) -> Result<(), Status> {
        let (done, outcome) = oneshot::channel();
        if self.tx.send((ack_id, done)).is_err() {
            return Err(Status::new(gcloud_gax::grpc::Code::Cancelled, "the member's ack queue is gone"));
        }
        outcome
            .await
            .unwrap_or_else(|_| Err(Status::new(gcloud_gax::grpc::Code::Cancelled, "the ack was dropped")))
    }
}

/// Sends whatever is queued as one request, waits for its answer, and repeats.
async fn flush(subscription: PullSubscription, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_IDS);
    while rx.recv_many(&mut batch, MAX_IDS).await > 0 {
        let (ids, waiters): (Vec<String>, Vec<_>) = batch.drain(..).unzip();
        let outcome = subscription.ack(ids).await;
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

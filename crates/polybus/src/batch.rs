//! Batch: several deliveries taken together ([`Subscriber::next_batch`](crate::Subscriber::next_batch))
//! and settled together.

use std::ops::Deref;

use polybus_core::{Message, Result};

use crate::delivery::Delivery;

/// Deliveries taken in one go; read them as a slice, settle them together with
/// [`ack_all`](Batch::ack_all) or one by one (`into_iter`).
#[derive(Debug, Default)]
pub struct Batch {
    deliveries: Vec<Delivery>,
}

impl Batch {
    /// The messages, in the order they were received.
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.deliveries.iter().map(Delivery::message)
    }

    /// The deliveries, to settle one by one.
    pub fn into_deliveries(self) -> Vec<Delivery> {
        self.deliveries
    }

    /// Acks every delivery at once. The acks run concurrently, so that adapters which
    /// coalesce settlements send them in few broker calls. Every ack is tried; the first
    /// failure is returned (its message, and any other whose ack failed, is redelivered).
    pub async fn ack_all(self) -> Result<()> {
        first_error(self.ack_each().await)
    }

    /// Acks every delivery at once, as [`ack_all`](Batch::ack_all) does, and returns each
    /// one's outcome, in the batch's order.
    pub async fn ack_each(self) -> Vec<Result<()>> {
        futures::future::join_all(self.deliveries.into_iter().map(Delivery::ack)).await
    }

    /// Nacks every delivery at once (each is redelivered, or dead-lettered on its last
    /// attempt, as [`Delivery::nack`] does); every nack is tried, the first failure returned.
    pub async fn nack_all(self) -> Result<()> {
        first_error(futures::future::join_all(self.deliveries.into_iter().map(Delivery::nack)).await)
    }
}

fn first_error(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

impl Deref for Batch {
    type Target = [Delivery];

    fn deref(&self) -> &[Delivery] {
        &self.deliveries
    }
}

impl From<Vec<Delivery>> for Batch {
    fn from(deliveries: Vec<Delivery>) -> Self {
        Batch { deliveries }
    }
}

impl IntoIterator for Batch {
    type Item = Delivery;
    type IntoIter = std::vec::IntoIter<Delivery>;

    fn into_iter(self) -> Self::IntoIter {
        self.deliveries.into_iter()
    }
}

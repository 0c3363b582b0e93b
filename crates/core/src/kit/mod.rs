//! The adapter kit: the concurrency pieces adapters share, generic over the broker so each
//! adapter supplies only its broker calls: batching settlements (`coalesce`), ack deadlines
//! and pushed-but-unclaimed deliveries (`leases`), and the prefetch gate between a fetch task
//! and its subscription (`gate`).

pub mod coalesce;
pub mod gate;
pub mod leases;

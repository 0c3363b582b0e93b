//! The adapter kit: the concurrency pieces adapters share, generic over the broker so each
//! adapter supplies only its broker calls: batching settlements (`coalesce`), ack deadlines
//! and pushed-but-unclaimed deliveries (`leases`).

pub mod coalesce;
pub mod leases;

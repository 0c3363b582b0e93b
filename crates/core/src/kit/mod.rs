//! The adapter kit: the concurrency pieces adapters share (batching settlements, and the
//! like), generic over the broker so each adapter supplies only its broker calls.

pub mod coalesce;

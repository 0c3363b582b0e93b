//! The concurrency pieces adapters share.

pub mod leases;

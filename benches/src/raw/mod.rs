//! The workload with each broker's own Rust client, doing what the polybus adapter does.

pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod pubsub;
pub mod rabbitmq;
pub mod redis;
pub mod sqs;

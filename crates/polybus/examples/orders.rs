//! The same application code on every broker: publish orders, consume them with the consume
//! loop. Which broker runs underneath is decided only by the env's config in the registry.
//!
//! `cargo run -p polybus --example orders -- polybus.db local quickstart:greetings`

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus::{Bus, ConsumeOptions, Message, Registry};

/// Publishes `count` orders to `event` in `env`, consumes them as group `billing`, returns how many arrived.
pub async fn run(bus: &Bus, env: &str, event: &str, count: usize) -> polybus::Result<usize> {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let options = ConsumeOptions::new("billing").concurrency(4).ack_deadline(Duration::from_secs(5));
    let consumer = bus
        .consume(env, event, options, {
            let seen = seen.clone();
            move |message: Message| {
                let (seen, done_tx) = (seen.clone(), done_tx.clone());
                async move {
                    let order: serde_json::Value = message.payload_json()?;
                    let fresh = seen.lock().map_err(|_| "lock poisoned")?.insert(order["id"].to_string());
                    if fresh {
                        let _ = done_tx.send(());
                    }
                    Ok::<(), polybus::HandlerError>(())
                }
            }
        })
        .await?;
    for id in 0..count {
        let order =
            serde_json::json!({ "id": id, "customer": format!("customer-{}", id % 3), "total": 10 * id });
        let message = Message::json(&order).map_err(|e| polybus::Error::Closed(e.to_string()))?;
        bus.publish(
            env,
            event,
            message.key(format!("customer-{}", id % 3)).header("source", "orders-example"),
        )
        .await?;
    }
    let mut arrived = 0;
    while arrived < count {
        match tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await {
            Ok(Some(())) => arrived += 1,
            _ => break,
        }
    }
    consumer.shutdown().await?;
    Ok(arrived)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(registry), Some(env), Some(event)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: orders REGISTRY ENV EVENT".into());
    };
    let bus = Bus::open(Registry::open(&registry).await?).await?;
    let arrived = run(&bus, &env, &event, 20).await?;
    println!("{arrived} of 20 orders published and consumed on env `{env}`");
    bus.close().await?;
    Ok(())
}

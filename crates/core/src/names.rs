//! Native names, checked against the rules of the broker type they are used on, so that no
//! topic can address another through a wildcard or a name the broker treats specially.
//!
//! A topic's native name (its tag, `nativeName` or `topicName`), its dead-letter destination
//! (`deadLetter`, default `<native>-dlq`), an SQS `queueUrl`, and the names a group derives
//! (`<native>--<group>`) must each be a plain name on the env's broker:
//!
//! | broker | rule |
//! |---|---|
//! | every broker | 1 to 255 bytes, no spaces or control characters |
//! | Kafka | `[A-Za-z0-9._-]`, at most 249 characters, not `.` or `..`; a group's retry topic `<native>--<group>.retry` too |
//! | RabbitMQ | no `#` or `*` (binding wildcards), not starting with `amq.`; a group's queue `<native>--<group>` at most 255 bytes |
//! | NATS | no `*` or `>` (subject wildcards), no empty subject token (leading, trailing or doubled `.`) |
//! | MQTT | no `#` or `+` (topic filter wildcards), not starting with `$`, not under `polybus-retry/`, `polybus-parked/`, `polybus-drain/` |
//! | AWS SQS | `[A-Za-z0-9_-]` with an optional `.fifo` end, at most 80 characters; `queueUrl` an `http(s)://` URL whose last segment is such a name |
//! | Google Pub/Sub | a topic id: starts with a letter, 3 to 255 of `[A-Za-z0-9-_.~+%]`, not starting with `goog`; or `projects/<project>/topics/<id>`; a group's subscription `<id>--<group>` follows the same rule |
//! | Redis, embedded | the rule for every broker |
//!
//! Where an adapter shortens or hashes a derived name itself (SQS group queues, NATS stream and
//! consumer names) the derived name is not checked again here.

use crate::broker::BrokerType;
use crate::limits::quote;

/// Longest native name on any broker.
pub const MAX_NATIVE_BYTES: usize = 255;
/// Longest Kafka topic name.
pub const MAX_KAFKA_CHARS: usize = 249;
/// Longest SQS queue name, `.fifo` included.
pub const MAX_SQS_CHARS: usize = 80;
/// What separates a topic's native name from a group's in the names groups derive.
pub const GROUP_SEPARATOR: &str = "--";
/// Topic levels the MQTT adapter keeps for itself.
const MQTT_RESERVED_LEVELS: [&str; 3] = ["polybus-retry", "polybus-parked", "polybus-drain"];

/// Checks `name` as a topic's native name or dead-letter destination on `broker_type`; the error
/// names the rule broken.
pub fn check_native(broker_type: &BrokerType, name: &str) -> Result<(), String> {
    check_plain(name)?;
    match broker_type.as_str() {
        "kafka" => check_kafka(name),
        "rabbitmq" => check_rabbitmq(name),
        "nats" => check_nats(name),
        "mqtt" => check_mqtt(name),
        "aws_sqs" => check_sqs(name),
        "google_pubsub" => check_pubsub_topic(name),
        _ => Ok(()),
    }
}

/// Checks the names group `group` derives on the topic `native` (already a legal native name).
pub fn check_group(broker_type: &BrokerType, native: &str, group: &str) -> Result<(), String> {
    match broker_type.as_str() {
        "kafka" => {
            let retry = format!("{native}{GROUP_SEPARATOR}{group}.retry");
            check_kafka(&retry).map_err(|e| format!("the group's retry topic: {e}"))
        }
        "rabbitmq" => {
            let queue = format!("{native}{GROUP_SEPARATOR}{group}");
            within(&queue, MAX_NATIVE_BYTES).map_err(|e| format!("the group's queue: {e}"))
        }
        "google_pubsub" => {
            let id = native.rsplit('/').next().unwrap_or(native);
            check_pubsub_id(&format!("{id}{GROUP_SEPARATOR}{group}"))
                .map_err(|e| format!("the group's subscription: {e}"))
        }
        _ => Ok(()),
    }
}

/// Checks an SQS queue URL: `http(s)://host/…/<queue name>`, without credentials.
pub fn check_queue_url(url: &str) -> Result<(), String> {
    check_plain(url)?;
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{} is not an http:// or https:// URL", quote(url)))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{} must name a host, without credentials", quote(url)));
    }
    if url.contains(['?', '#']) {
        return Err(format!("{} must not have a query or fragment", quote(url)));
    }
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    check_sqs(name).map_err(|e| format!("its queue name: {e}"))
}

/// Checks the rule every broker shares: 1 to 255 bytes, no spaces or control characters.
pub fn check_plain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    within(name, MAX_NATIVE_BYTES)?;
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{} must not contain spaces or control characters", quote(name)));
    }
    Ok(())
}

fn within(name: &str, max: usize) -> Result<(), String> {
    if name.len() > max {
        return Err(format!("{} is {} bytes long; at most {max} are allowed", quote(name), name.len()));
    }
    Ok(())
}

fn check_kafka(name: &str) -> Result<(), String> {
    if name == "." || name == ".." {
        return Err(format!("{} is not a Kafka topic name", quote(name)));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{} contains `{c}`; Kafka topic names are `[A-Za-z0-9._-]`", quote(name)));
    }
    if name.chars().count() > MAX_KAFKA_CHARS {
        return Err(format!("{} is longer than Kafka's {MAX_KAFKA_CHARS} characters", quote(name)));
    }
    Ok(())
}

fn check_rabbitmq(name: &str) -> Result<(), String> {
    if let Some(c) = name.chars().find(|c| matches!(c, '#' | '*')) {
        return Err(format!(
            "{} contains `{c}`, a wildcard in RabbitMQ binding keys: the topic would receive other topics' messages",
            quote(name)
        ));
    }
    if name.starts_with("amq.") {
        return Err(format!("{} starts with `amq.`, which RabbitMQ reserves", quote(name)));
    }
    Ok(())
}

fn check_nats(name: &str) -> Result<(), String> {
    if let Some(c) = name.chars().find(|c| matches!(c, '*' | '>')) {
        return Err(format!(
            "{} contains `{c}`, a wildcard in NATS subjects: the topic would receive other topics' messages",
            quote(name)
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "{} has an empty subject token: no leading, trailing or doubled `.` in NATS",
            quote(name)
        ));
    }
    Ok(())
}

fn check_mqtt(name: &str) -> Result<(), String> {
    if let Some(c) = name.chars().find(|c| matches!(c, '#' | '+')) {
        return Err(format!(
            "{} contains `{c}`, a wildcard in MQTT topic filters: the topic would receive other topics' messages",
            quote(name)
        ));
    }
    if name.starts_with('$') {
        return Err(format!("{} starts with `$`, which MQTT reserves for the broker", quote(name)));
    }
    let first = name.split('/').next().unwrap_or_default();
    if MQTT_RESERVED_LEVELS.contains(&first) {
        return Err(format!("{} is under `{first}/`, a topic level polybus keeps for itself", quote(name)));
    }
    Ok(())
}

fn check_sqs(name: &str) -> Result<(), String> {
    let stem = name.strip_suffix(".fifo").unwrap_or(name);
    if stem.is_empty() {
        return Err(format!("{} is not an SQS queue name", quote(name)));
    }
    if let Some(c) = stem.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))) {
        return Err(format!(
            "{} contains `{c}`; SQS queue names are `[A-Za-z0-9_-]` with an optional `.fifo` end",
            quote(name)
        ));
    }
    if name.len() > MAX_SQS_CHARS {
        return Err(format!("{} is longer than SQS's {MAX_SQS_CHARS} characters", quote(name)));
    }
    Ok(())
}

fn check_pubsub_topic(name: &str) -> Result<(), String> {
    if let Some(path) = name.strip_prefix("projects/") {
        let Some((project, id)) = path.split_once("/topics/") else {
            return Err(format!(
                "{} is neither a topic id nor `projects/<project>/topics/<id>`",
                quote(name)
            ));
        };
        let project_ok = !project.is_empty()
            && project
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | ':'));
        if !project_ok {
            return Err(format!("{} names no valid project", quote(name)));
        }
        return check_pubsub_id(id);
    }
    check_pubsub_id(name)
}

/// Pub/Sub's rule for topic and subscription ids.
fn check_pubsub_id(id: &str) -> Result<(), String> {
    let first_is_letter = id.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_is_letter || !(3..=255).contains(&id.len()) {
        return Err(format!(
            "{} is not a Pub/Sub name: it starts with a letter and has 3 to 255 characters",
            quote(id)
        ));
    }
    if let Some(c) =
        id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '%')))
    {
        return Err(format!("{} contains `{c}`; Pub/Sub names are `[A-Za-z0-9-_.~+%]`", quote(id)));
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return Err(format!("{} starts with `goog`, which Pub/Sub reserves", quote(id)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    const KAFKA: BrokerType = BrokerType::from_static("kafka");
    const RABBITMQ: BrokerType = BrokerType::from_static("rabbitmq");
    const NATS: BrokerType = BrokerType::from_static("nats");
    const MQTT: BrokerType = BrokerType::from_static("mqtt");
    const REDIS: BrokerType = BrokerType::from_static("redis");
    const SQS: BrokerType = BrokerType::from_static("aws_sqs");
    const PUBSUB: BrokerType = BrokerType::from_static("google_pubsub");
    const ALL: [BrokerType; 8] =
        [KAFKA, REDIS, RABBITMQ, PUBSUB, SQS, NATS, MQTT, BrokerType::from_static("embedded")];

    #[track_caller]
    fn refused(broker_type: &BrokerType, name: &str, says: &str) {
        let err = check_native(broker_type, name).expect_err(name);
        assert!(err.contains(says), "{broker_type} {name:?}: {err}");
    }

    #[test]
    fn plain_names_are_legal_everywhere() {
        for t in &ALL {
            for name in ["orders", "orders-v1", "orders_eu", "orders-dlq"] {
                check_native(t, name).unwrap_or_else(|e| panic!("{t} {name}: {e}"));
            }
            check_group(t, "orders", "billing").unwrap_or_else(|e| panic!("{t}: {e}"));
        }
    }

    #[test]
    fn wildcards_are_refused_where_they_are_wildcards() {
        for name in ["#", "*", "a.*", "a.#.b"] {
            refused(&RABBITMQ, name, "wildcard in RabbitMQ");
        }
        refused(&RABBITMQ, "amq.orders", "reserves");
        for name in ["*", ">", "a.*", "a.>"] {
            refused(&NATS, name, "wildcard in NATS");
        }
        for name in [".a", "a.", "a..b"] {
            refused(&NATS, name, "empty subject token");
        }
        for name in ["#", "+", "a/+/b", "a/#"] {
            refused(&MQTT, name, "wildcard in MQTT");
        }
        refused(&MQTT, "$SYS/broker", "reserves");
        refused(&MQTT, "polybus-retry/x", "keeps for itself");
        // What is a wildcard on one broker is a plain character on another.
        check_native(&REDIS, "a.*").unwrap();
        check_native(&MQTT, "a.*").unwrap();
        check_native(&RABBITMQ, "a/+").unwrap();
    }

    #[test]
    fn spaces_control_characters_and_length_are_refused_everywhere() {
        for t in &ALL {
            refused(t, "with space", "spaces or control");
            refused(t, "nul\0", "spaces or control");
            refused(t, "", "empty");
            refused(t, &"a".repeat(256), "at most 255");
        }
    }

    #[test]
    fn kafka_sqs_and_pubsub_have_their_character_sets_and_lengths() {
        check_native(&KAFKA, &"k".repeat(249)).unwrap();
        refused(&KAFKA, &"k".repeat(250), "249");
        refused(&KAFKA, "..", "not a Kafka topic name");
        refused(&KAFKA, "a/b", "[A-Za-z0-9._-]");
        check_native(&SQS, "orders.fifo").unwrap();
        refused(&SQS, "orders.eu", "[A-Za-z0-9_-]");
        refused(&SQS, &"q".repeat(81), "80");
        refused(&PUBSUB, "1orders", "starts with a letter");
        refused(&PUBSUB, "ab", "3 to 255");
        refused(&PUBSUB, "google-orders", "goog");
        refused(&PUBSUB, "a/b", "`/`");
        check_native(&PUBSUB, "orders.v1~+%").unwrap();
        check_native(&PUBSUB, "projects/other-project/topics/orders").unwrap();
        refused(&PUBSUB, "projects/x/subscriptions/y", "neither");
    }

    #[test]
    fn derived_group_names_must_stay_legal() {
        let long = "k".repeat(240);
        assert!(check_group(&KAFKA, &long, "billing").unwrap_err().contains("retry topic"));
        let long = "r".repeat(250);
        assert!(check_group(&RABBITMQ, &long, "billing").unwrap_err().contains("queue"));
        let long = "p".repeat(250);
        assert!(check_group(&PUBSUB, &long, "billing").unwrap_err().contains("subscription"));
        check_group(&PUBSUB, "projects/p/topics/orders", "billing").unwrap();
    }

    #[test]
    fn queue_urls_are_http_urls_of_a_queue() {
        check_queue_url("http://127.0.0.1:4566/000000000000/orders").unwrap();
        check_queue_url("https://sqs.eu-west-1.amazonaws.com/1/orders.fifo").unwrap();
        assert!(check_queue_url("file:///etc/passwd").unwrap_err().contains("http"));
        assert!(check_queue_url("http://u:p@h/1/q").unwrap_err().contains("credentials"));
        assert!(check_queue_url("http://h/1/q?x=1").unwrap_err().contains("query"));
        assert!(check_queue_url("http://h/1/a.b").unwrap_err().contains("queue name"));
    }
}

//! librdkafka properties from a `kafka` broker env's config.
//!
//! Order of precedence: polybus's defaults, then the env's `properties` (librdkafka names, for
//! experts), then the few settings the transport contract depends on, which cannot be changed.

use std::collections::BTreeMap;

use crate::kind::{KafkaConfig, SaslMechanism};
use polybus_core::{Error, FailureKind, Op, ValidationError};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Partitions of a topic created on demand, unless the topic or the env says otherwise.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Replication factor of a topic created on demand, unless the env says otherwise.
pub const DEFAULT_REPLICATION_FACTOR: i32 = 1;
/// Largest record polybus produces and asks for on the topics it creates (16 MiB).
pub const MAX_MESSAGE_BYTES: &str = "16777216";

/// Defaults for producers, overridable through `properties`.
const PRODUCER_DEFAULTS: [(&str, &str); 6] = [
    ("enable.idempotence", "true"),
    ("message.timeout.ms", "30000"),
    ("message.max.bytes", MAX_MESSAGE_BYTES),
    // An awaited publish goes out at once instead of waiting for a batching timer (librdkafka's
    // default is 5 ms: 200 msg/s for a publisher awaiting each one); records enqueued while a
    // request is in flight still travel together, and a batch is enqueued whole before it is awaited.
    ("linger.ms", "0"),
    // Small requests are not held back by Nagle's algorithm waiting for the previous one's ACK.
    ("socket.nagle.disable", "true"),
    // The Java client's partitioner: a key lands on the same partition whichever client publishes it.
    ("partitioner", "murmur2_random"),
];

/// Producer settings the contract depends on.
const PRODUCER_FIXED: [(&str, &str); 1] = [("acks", "all")];

/// Defaults for consumers, overridable through `properties`.
const CONSUMER_DEFAULTS: [(&str, &str); 5] = [
    ("session.timeout.ms", "10000"),
    // Members notice a rebalance within half a second, so a group settles quickly.
    ("heartbeat.interval.ms", "500"),
    // Bounds what librdkafka prefetches besides what the subscription buffers itself…
    ("queued.min.messages", "1000"),
    ("queued.max.messages.kbytes", "16384"),
    // …and fetches again soon once there is room (the default waits a whole second).
    ("fetch.queue.backoff.ms", "50"),
];

/// Consumer settings the contract depends on: polybus commits, in order, itself; a new group
/// starts at the beginning; the classic group protocol (KIP-848 is not everywhere yet).
const CONSUMER_FIXED: [(&str, &str); 5] = [
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("group.protocol", "classic"),
    ("enable.partition.eof", "false"),
];

/// Everything a transport needs to make its clients.
#[derive(Clone)]
pub(crate) struct Settings {
    common: BTreeMap<String, String>,
    /// Partitions for topics created on demand.
    pub partitions: i32,
    /// Replication factor for topics created on demand.
    pub replication_factor: i32,
    /// The bootstrap servers, for messages (no credentials).
    pub servers: String,
    /// Values to keep out of error messages.
    secrets: Vec<String>,
}

impl Settings {
    /// Reads a parsed config; `env` names the env in validation errors.
    pub fn from_config(config: &KafkaConfig, env: &str) -> Result<Settings, Error> {
        if config.brokers.is_empty() {
            return Err(ValidationError::in_env(
                env,
                "config.brokers",
                "at least one `host:port` is required",
            )
            .into());
        }
        for (field, value) in
            [("partitions", config.partitions), ("replicationFactor", config.replication_factor)]
        {
            if value.is_some_and(|v| v < 1) {
                return Err(
                    ValidationError::in_env(env, format!("config.{field}"), "must be at least 1").into()
                );
            }
        }
        let servers = config.brokers.join(",");
        let mut common = BTreeMap::new();
        common.insert("bootstrap.servers".to_owned(), servers.clone());
        common
            .insert("client.id".to_owned(), config.client_id.clone().unwrap_or_else(|| "polybus".to_owned()));
        let in_env = |(field, message): (String, String)| ValidationError::in_env(env, field, message);
        let tls = crate::kind::tls_of(config).map_err(in_env)?;
        crate::kind::check_sasl(config).map_err(in_env)?;
        let pem = tls.map(|block| block.load()).transpose().map_err(|e| e.in_env(env))?;
        let protocol = match (pem.is_some(), config.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        common.insert("security.protocol".to_owned(), protocol.to_owned());
        let mut secrets = Vec::new();
        if let Some(pem) = pem {
            // Inline PEM: librdkafka reads no file, so a server needs no paths of its own.
            match pem.ca {
                Some(ca) => common.insert("ssl.ca.pem".to_owned(), ca),
                // The system's roots: librdkafka looks for them in the usual places, since the
                // OpenSSL it is built with (vendored) does not know the distribution's directory.
                None => common.insert("ssl.ca.location".to_owned(), "probe".to_owned()),
            };
            if let Some((cert, key)) = pem.identity {
                common.insert("ssl.certificate.pem".to_owned(), cert);
                common.insert("ssl.key.pem".to_owned(), key.clone());
                secrets.push(key);
            }
            if pem.insecure {
                common.insert("enable.ssl.certificate.verification".to_owned(), "false".to_owned());
                common.insert("ssl.endpoint.identification.algorithm".to_owned(), "none".to_owned());
            }
        }
        if let Some(sasl) = &config.sasl {
            let mechanism = match sasl.mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            };
            common.insert("sasl.mechanism".to_owned(), mechanism.to_owned());
            common.insert("sasl.username".to_owned(), sasl.username.clone());
            common.insert("sasl.password".to_owned(), sasl.password.clone());
            secrets.push(sasl.password.clone());
            if protocol == "sasl_plaintext" && sasl.mechanism == SaslMechanism::Plain {
                tracing::warn!(env, %servers, "SASL PLAIN without TLS: the password travels unencrypted; turn on `tls`");
            }
        }
        for (name, value) in config.properties.iter().flatten() {
            if polybus_core::secret::is_secret_field(name)
                || name.contains("password")
                || name.contains("secret")
            {
                secrets.push(value.clone());
            }
            common.insert(name.clone(), value.clone());
        }
        secrets.retain(|s| !s.is_empty());
        Ok(Settings {
            common,
            partitions: config.partitions.unwrap_or(DEFAULT_PARTITIONS),
            replication_factor: config.replication_factor.unwrap_or(DEFAULT_REPLICATION_FACTOR),
            servers,
            secrets,
        })
    }

    /// Properties for the admin client.
    pub fn admin(&self) -> ClientConfig {
        self.build(&[], &[])
    }

    /// Properties for the producer.
    pub fn producer(&self) -> ClientConfig {
        self.build(&PRODUCER_DEFAULTS, &PRODUCER_FIXED)
    }

    /// Properties for a member of `group`.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.build(&CONSUMER_DEFAULTS, &CONSUMER_FIXED);
        config.set("group.id", group);
        config
    }

    fn build(&self, defaults: &[(&str, &str)], fixed: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (name, value) in defaults {
            config.set(*name, *value);
        }
        for (name, value) in &self.common {
            config.set(name, value);
        }
        for (name, value) in fixed {
            config.set(*name, *value);
        }
        config
    }

    /// A transport error whose message cannot contain a configured secret.
    pub fn error(&self, op: Op, target: &str, cause: impl std::fmt::Display) -> Error {
        Error::transport(op, format!("kafka {target}"), self.scrub(cause.to_string()))
    }

    /// A transport error keeping librdkafka's error and the kind its code says, with no
    /// configured secret in its texts.
    pub fn failed(&self, op: Op, target: &str, cause: impl Coded) -> Error {
        let kind = cause.code().map_or(FailureKind::Unknown, failure_kind);
        Error::transport_from(op, format!("kafka {target}"), kind, cause).map_text(|text| self.scrub(text))
    }

    fn scrub(&self, mut text: String) -> String {
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), polybus_core::secret::REDACTED);
        }
        text
    }
}

/// A librdkafka failure, with its error code when it has one.
pub(crate) trait Coded: std::error::Error + Send + Sync + 'static {
    /// The code.
    fn code(&self) -> Option<RDKafkaErrorCode>;
}

impl Coded for KafkaError {
    fn code(&self) -> Option<RDKafkaErrorCode> {
        self.rdkafka_error_code()
    }
}

impl Coded for RDKafkaErrorCode {
    fn code(&self) -> Option<RDKafkaErrorCode> {
        Some(*self)
    }
}

/// What kind of failure a librdkafka error code is.
pub(crate) fn failure_kind(code: RDKafkaErrorCode) -> FailureKind {
    use RDKafkaErrorCode as C;
    match code {
        C::SaslAuthenticationFailed
        | C::Authentication
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        // A TLS handshake refused: an untrusted certificate, a port that does not speak TLS.
        | C::SSL => FailureKind::Auth,
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NetworkException
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::CoordinatorLoadInProgress
        | C::NotEnoughReplicas
        | C::QueueFull => FailureKind::Unavailable,
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut => FailureKind::Timeout,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => FailureKind::NotFound,
        C::MessageSizeTooLarge | C::InvalidMessageSize => FailureKind::TooLarge,
        C::InvalidTopic
        | C::InvalidConfig
        | C::InvalidArgument
        | C::InvalidRequest
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::PolicyViolation => FailureKind::Invalid,
        _ => FailureKind::Unknown,
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(value: serde_json::Value) -> Settings {
        let config: KafkaConfig = polybus_core::config::parse(&value).expect("valid config");
        Settings::from_config(&config, "dev").expect("settings")
    }

    #[test]
    fn seed_fields_become_librdkafka_properties() {
        let s = settings(json!({"brokers": ["a:9092", "b:9092"], "clientId": "shop", "ssl": true,
            "sasl": {"mechanism": "scram-sha-512", "username": "u", "password": "hunter2"},
            "properties": {"linger.ms": "20", "enable.auto.commit": "true"}}));
        let producer = s.producer();
        assert_eq!(producer.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(producer.get("client.id"), Some("shop"));
        assert_eq!(producer.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(producer.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(producer.get("linger.ms"), Some("20"), "properties override defaults");
        assert_eq!(producer.get("acks"), Some("all"));
        let consumer = s.consumer("billing");
        assert_eq!(consumer.get("group.id"), Some("billing"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"), "the contract's settings win");
        assert_eq!((s.partitions, s.replication_factor), (DEFAULT_PARTITIONS, DEFAULT_REPLICATION_FACTOR));
    }

    #[test]
    fn errors_never_carry_the_password() {
        let s = settings(json!({"brokers": ["a:9092"],
            "sasl": {"mechanism": "plain", "username": "u", "password": "hunter2"}}));
        let err = s.error(Op::Connect, "a:9092", "auth failed for u with hunter2");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err}");
        let failure = KafkaError::ClientCreation("sasl.password=hunter2 rejected".into());
        let err = s.failed(Op::Connect, "a:9092", failure);
        let cause = std::error::Error::source(&err).map(ToString::to_string).unwrap_or_default();
        assert!(!format!("{err} {err:?} {cause}").contains("hunter2"), "{err:?}");
        assert!(
            err.cause().and_then(|c| c.downcast_ref::<KafkaError>()).is_some(),
            "keeps the client's error"
        );
    }

    /// PEM-shaped text: the TLS block checks PEM framing, librdkafka is not asked here.
    fn pem(label: &str, body: &str) -> String {
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
    }

    #[test]
    fn the_tls_block_becomes_inline_pem_and_the_protocol() {
        let key = pem("PRIVATE KEY", "c2VjcmV0LWtleQ==");
        let s = settings(json!({"brokers": ["a:9093"], "tls": {"ca": pem("CERTIFICATE", "Q0E="),
            "cert": pem("CERTIFICATE", "Q0VSVA=="), "key": key}}));
        let p = s.producer();
        assert_eq!(p.get("security.protocol"), Some("ssl"));
        assert_eq!(p.get("ssl.ca.pem"), Some(pem("CERTIFICATE", "Q0E=").as_str()));
        assert_eq!(p.get("ssl.certificate.pem"), Some(pem("CERTIFICATE", "Q0VSVA==").as_str()));
        assert_eq!(p.get("ssl.key.pem"), Some(key.as_str()));
        assert_eq!(p.get("ssl.ca.location"), None);
        assert_eq!(p.get("enable.ssl.certificate.verification"), None, "verified unless told otherwise");
        let err = s.error(Op::Connect, "a:9093", format!("rejected {key}"));
        assert!(!err.to_string().contains("c2VjcmV0LWtleQ"), "{err}");

        let c = settings(json!({"brokers": ["a:9093"], "ssl": true,
            "sasl": {"mechanism": "PLAIN", "username": "key", "password": "secret"}}))
        .consumer("g");
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(
            c.get("ssl.ca.location"),
            Some("probe"),
            "system roots, wherever the distribution keeps them"
        );
        let c = settings(json!({"brokers": ["a:9093"], "tls": {"insecureSkipVerify": true}})).admin();
        assert_eq!(c.get("enable.ssl.certificate.verification"), Some("false"));
        let c = settings(json!({"brokers": ["a:9092"], "tls": false,
            "sasl": {"mechanism": "plain", "username": "u", "password": "p"}}))
        .admin();
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.get("ssl.ca.location"), None);
    }

    #[test]
    fn unreadable_or_unusable_tls_settings_name_env_and_field() {
        let cases = [
            (json!({"caFile": "/nonexistent/ca.pem"}), "config.tls.caFile"),
            (
                json!({"ca": pem("CERTIFICATE", "Q0E="), "serverName": "kafka.internal"}),
                "config.tls.serverName",
            ),
            (json!({"cert": pem("CERTIFICATE", "Q0E=")}), "config.tls.key"),
            (json!({"key": "hunter2"}), "config.tls.cert"),
        ];
        for (tls, field) in cases {
            let config: KafkaConfig =
                polybus_core::config::parse(&json!({"brokers": ["a:9093"], "tls": tls})).expect("parses");
            let Err(Error::Validation(err)) = Settings::from_config(&config, "prod") else {
                panic!("expected a validation error for {tls}")
            };
            assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("prod"), field), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn nonsense_counts_are_refused_with_the_field() {
        let config: KafkaConfig =
            polybus_core::config::parse(&json!({"brokers": ["a:9092"], "partitions": 0})).expect("parses");
        let Err(Error::Validation(err)) = Settings::from_config(&config, "dev") else {
            panic!("expected an error")
        };
        assert_eq!((err.env.as_deref(), err.field.as_str()), (Some("dev"), "config.partitions"));
    }
}

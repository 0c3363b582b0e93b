//! Fuzzing of the Kafka config (issue 13): no panic; a refused config names the env and field;
//! a client error that quotes a password or secret property is scrubbed.

#[path = "../../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use crate::kind::KafkaConfig;
use fuzzing::*;
use polybus_core::{Error, Op};
use proptest::prelude::*;

use super::Settings;

#[test]
fn kafka_configs_never_panic_nor_show_a_secret() {
    let configs =
        prop_oneof![3 => config_for("kafka"), 2 => mutated(config_for("kafka")).prop_map(|(c, _)| c)];
    fuzz("kafka configs", configs, |config| {
        let Ok(parsed) = polybus_core::config::parse::<KafkaConfig>(&config) else { return Ok(()) };
        let secrets = secrets_in(&config);
        match Settings::from_config(&parsed, "dev") {
            Ok(settings) => {
                let _ = (settings.admin(), settings.producer(), settings.consumer("g"));
                let error =
                    settings.error(Op::Connect, &settings.servers, format!("auth failed: {secrets:?}"));
                check(leaked(&error.to_string(), &secrets).is_none(), || format!("shows a secret: {error}"))
            }
            Err(Error::Validation(e)) => {
                check(e.env.as_deref() == Some("dev") && e.field.starts_with("config"), || format!("{e:?}"))?;
                check(leaked(&e.to_string(), &secrets).is_none(), || {
                    format!("the error quotes a secret: {e}")
                })
            }
            Err(other) => {
                Err(proptest::test_runner::TestCaseError::fail(format!("not a validation error: {other}")))
            }
        }
    });
}

//! Fuzzing of the RabbitMQ config and URL parsing (issue 13): no panic; a refused config is a
//! validation error naming the env and field; nothing shown (errors, endpoint, `Debug`, scrubbed
//! client messages) quotes a secret.

#[path = "../../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use fuzzing::*;
use polybus_core::{ConnectTarget, Error};
use proptest::prelude::*;

use super::Settings;

#[test]
fn rabbitmq_configs_and_urls_never_panic_nor_show_a_secret() {
    let configs =
        prop_oneof![3 => config_for("rabbitmq"), 2 => mutated(config_for("rabbitmq")).prop_map(|(c, _)| c)];
    fuzz("rabbitmq configs", configs, |config| {
        let secrets = secrets_in(&config);
        let target =
            ConnectTarget { broker: "b".into(), env: "dev".into(), broker_type: crate::BROKER_TYPE, config };
        match Settings::from_target(&target) {
            Ok(settings) => {
                let shown = format!("{} {settings:?}", settings.endpoint);
                check(leaked(&shown, &secrets).is_none(), || format!("shows a secret: {shown}"))?;
                let password = settings.uri.authority.userinfo.password.clone();
                let scrubbed = settings.scrub(format!("login refused for {password}"));
                check(password.len() < 3 || !scrubbed.contains(&password), || scrubbed.clone())
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

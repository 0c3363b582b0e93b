//! Fuzzing of the Redis config and URL parsing (issue 13): no panic; a refused config is a
//! validation error naming the env and field; nothing shown (errors, the address) quotes a secret.

#[path = "../../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use crate::kind::RedisConfig;
use fuzzing::*;
use polybus_core::Error;
use proptest::prelude::*;

use super::Settings;

#[test]
fn redis_configs_and_urls_never_panic_nor_show_a_secret() {
    let configs =
        prop_oneof![3 => config_for("redis"), 2 => mutated(config_for("redis")).prop_map(|(c, _)| c)];
    fuzz("redis configs", configs, |config| {
        let Ok(parsed) = polybus_core::config::parse::<RedisConfig>(&config) else { return Ok(()) };
        let secrets = secrets_in(&config);
        match Settings::from_config(&parsed, "dev") {
            Ok(settings) => check(leaked(&settings.address, &secrets).is_none(), || {
                format!("address {}", settings.address)
            }),
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

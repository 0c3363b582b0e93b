//! Fuzzing of the MQTT config and URL parsing (issue 13): no panic; a refused config names the
//! env and field (or is `UNSUPPORTED` for version 3); nothing shown quotes a secret.

#[path = "../../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use fuzzing::*;
use polybus_core::{ConnectTarget, Error};
use proptest::prelude::*;

use super::Settings;

#[test]
fn mqtt_configs_and_urls_never_panic_nor_show_a_secret() {
    let configs = prop_oneof![3 => config_for("mqtt"), 2 => mutated(config_for("mqtt")).prop_map(|(c, _)| c)];
    fuzz("mqtt configs", configs, |config| {
        let secrets = secrets_in(&config);
        let target =
            ConnectTarget { broker: "b".into(), env: "dev".into(), broker_type: crate::BROKER_TYPE, config };
        let shown = match Settings::from_target(&target) {
            Ok(settings) => format!("{} {settings:?}", settings.endpoint()),
            Err(Error::Validation(e)) => {
                check(e.env.as_deref() == Some("dev") && e.field.starts_with("config"), || format!("{e:?}"))?;
                e.to_string()
            }
            // Version 3, or TLS on a machine without root certificates.
            Err(e @ (Error::Unsupported { .. } | Error::Transport { .. })) => e.to_string(),
            Err(other) => return Err(proptest::test_runner::TestCaseError::fail(format!("{other}"))),
        };
        check(leaked(&shown, &secrets).is_none(), || format!("shows a secret: {shown}"))
    });
}

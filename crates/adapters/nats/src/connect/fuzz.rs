//! Fuzzing of what a NATS connection keeps out of its messages (issue 13): every password and
//! token of a config, in `pass`, `token` or a server URL, is blanked out of a client error.

#[path = "../../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use crate::kind::NatsConfig;
use fuzzing::*;
use proptest::prelude::*;

use super::Secrets;

#[test]
fn nats_secrets_are_blanked_out_of_client_errors() {
    let configs = prop_oneof![3 => config_for("nats"), 2 => mutated(config_for("nats")).prop_map(|(c, _)| c)];
    fuzz("nats configs", configs, |config| {
        let Ok(parsed) = polybus_core::config::parse::<NatsConfig>(&config) else { return Ok(()) };
        let secrets = secrets_in(&config);
        // A client error may quote the URL it could not reach, or the credentials it sent.
        let text = format!(
            "cannot connect to {:?} as {:?}/{:?}",
            parsed.servers.to_vec(),
            parsed.pass,
            parsed.token
        );
        let scrubbed = Secrets::of(&parsed).scrub(&text);
        check(leaked(&scrubbed, &secrets).is_none(), || format!("shows a secret: {scrubbed}"))
    });
}

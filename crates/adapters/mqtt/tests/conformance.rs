//! The behaviour suite against a real Mosquitto.
//!
//! By default the suite starts a Mosquitto of its own (the `mosquitto` binary that
//! `scripts/services mosquitto` installs) on a free loopback port with persistence in a
//! temporary directory. `MQTT_HOST` / `MQTT_PORT` point the suite at a running broker
//! instead (127.0.0.1:1883 when `mosquitto` is not installed); that one is shared, so it is
//! never restarted.
//!
//! The suite runs the reconnect and broker-restart cases alone, so restarting the private
//! broker is safe. Its SIGKILL case is skipped: Mosquitto saves its persistence file only at
//! exit and every `autosave_interval`.

use std::process::ExitCode;
use std::sync::Arc;

use polybus_conformance::private::{Launch, Stop, find_program};
use polybus_conformance::{PrivateBroker, Target};
use polybus_mqtt::MqttConnector;

fn main() -> ExitCode {
    if let Some(code) = polybus_conformance::member_process(&[Arc::new(MqttConnector)]) {
        return code;
    }
    let explicit = std::env::var("MQTT_HOST").is_ok() || std::env::var("MQTT_PORT").is_ok();
    let private = (!explicit).then(|| Arc::new(private_broker()));
    let started = private.as_ref().map(|broker| broker.config().map(|config| (broker.clone(), config)));
    let target = match started {
        Some(Ok((broker, config))) => {
            let restarting = broker.clone();
            Target::new("mqtt (private mosquitto)", polybus_mqtt::BROKER_TYPE, config)
                .restart(move || {
                    let broker = restarting.clone();
                    Box::pin(async move {
                        tokio::task::spawn_blocking(move || broker.restart(Stop::Graceful))
                            .await
                            .expect("restarting mosquitto")
                            .expect("restarting mosquitto");
                    })
                })
                .private(broker)
        }
        not_private => {
            let why = match not_private {
                Some(Err(e)) => format!("no private mosquitto: {e}"),
                _ => "MQTT_HOST / MQTT_PORT name a shared broker".to_owned(),
            };
            eprintln!("conformance[mqtt]: {why}; using a shared broker without restarts");
            let host = std::env::var("MQTT_HOST").unwrap_or_else(|_| "127.0.0.1".into());
            let port = std::env::var("MQTT_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(1883);
            Target::new("mqtt (shared broker)", polybus_mqtt::BROKER_TYPE, config(&host, port))
                .no_private(why)
        }
    };
    // A shared subscription's members and queued messages are the broker's own: MQTT has no
    // request to read them, so the adapter answers `groups` with UNSUPPORTED (see its README).
    let target = target.known_defect(
        "groups_show_lag_and_pending_until_the_group_catches_up",
        "MQTT cannot list a topic's groups or their backlog (UNSUPPORTED)",
    );
    polybus_conformance::run(target.connector(Arc::new(MqttConnector)))
}

/// A Mosquitto this test binary owns: its own port, config and persistence directory.
fn private_broker() -> PrivateBroker {
    PrivateBroker::new("mosquitto", |dir, port| {
        let program = find_program("mosquitto").ok_or("no mosquitto binary (Debian: mosquitto)")?;
        let conf = dir.join("mosquitto.conf");
        let data = dir.display();
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {data}/\nlog_dest file {data}/mosquitto.log\n"
        );
        std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let conf = conf.display().to_string();
        Ok(Launch::new(program, &["-c", &conf], config("127.0.0.1", port)))
    })
    .not_crash_safe(
        "Mosquitto writes its persistence file only when it exits and every autosave_interval \
         (30 min by default): a SIGKILL loses what it acknowledged since",
    )
}

fn config(host: &str, port: u16) -> serde_json::Value {
    serde_json::json!({ "host": host, "port": port, "clientId": "conformance" })
}

//! Fuzzing of service-account keys as the Pub/Sub adapter reads them (issue 13): any bytes are
//! accepted as a key or refused with a reason that never quotes the key.

#[path = "../../../../core/tests/support/fuzzing.rs"]
mod fuzzing;

use fuzzing::*;
use proptest::prelude::*;
use serde_json::json;

use super::service_account_key;

#[test]
fn service_account_keys_are_refused_without_quoting_them() {
    let key = (secret_value(), secret_value(), any::<bool>()).prop_map(|(private_key, id, typed)| {
        let mut key = json!({"client_email": "a@b.iam", "private_key_id": id, "private_key": private_key, "project_id": "p"});
        if typed {
            key["type"] = json!("service_account");
        }
        key
    });
    let bytes = prop_oneof![
        3 => mutated(key.boxed()).prop_map(|(k, _)| k.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => nasty_string().prop_map(|s| format!("{{\"private_key\": \"{SECRET_MARK}{s}")).prop_map(String::into_bytes),
    ];
    fuzz("service-account keys", bytes, |bytes| {
        if let Err(why) = service_account_key(&bytes) {
            check(!why.contains(SECRET_MARK), || format!("the reason quotes the key: {why}"))?;
        }
        Ok(())
    });
}

//! Fuzzing of the definition parsers (issue 13): brokers, topics and their patches, each broker
//! type's config, `${VAR}` / `$Secret{name}` references, the scrubber and redaction.
//!
//! Properties: no panic; an error names its field (and the env of a config field) and never
//! quotes a secret; a valid definition round-trips; redaction leaves no literal secret.
//! `POLYBUS_FUZZ_CASES=N` sets the cases per property.

#[path = "support/fuzzing.rs"]
mod fuzzing;

use fuzzing::*;
use polybus_core::secret::{self, Reference, Scrubber};
use polybus_core::{Broker, BrokerPatch, Kinds, Topic, TopicPatch, ValidationError};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

/// What every validation error must do, whatever the input.
/// Parses and validates a broker through the built-in kinds.
fn checked(doc: Value) -> Result<Broker, ValidationError> {
    let broker = Broker::from_value(doc)?;
    broker.validate(&Kinds::unchecked())?;
    Ok(broker)
}

fn check_error(error: &ValidationError, doc: &Value) -> Result<(), TestCaseError> {
    let shown = format!("{error} {:?}", error.env);
    // A field may be named ` ` or `\n`: a key is whatever the document says.
    check(!error.field.is_empty(), || format!("no field in `{error:?}`"))?;
    check(!error.message.trim().is_empty(), || format!("no message in `{error:?}`"))?;
    // A key named `` or `.` is named by the object it is in (`document`, `config.`).
    let nameless = ["unknown field ``", "unknown field `.`"].iter().any(|m| error.message.starts_with(m));
    check(error.field != "document" || !doc.is_object() || nameless, || {
        format!("an object's error names no field: `{error}`")
    })?;
    // `config.…` is an env's config, unless the document has a `config` of its own.
    let own_config = doc.get("config").is_some() || error.message.contains("unknown field `config`");
    check(!error.field.starts_with("config") || error.env.is_some() || own_config, || {
        format!("a config error names no env: `{error}`")
    })?;
    let secrets = secrets_in(doc);
    check(leaked(&shown, &secrets).is_none(), || format!("the error quotes a secret: `{shown}`"))
}

/// What a redacted copy must be: no marked literal left, references kept, still valid.
fn check_redacted(broker: &Broker) -> Result<(), TestCaseError> {
    let redacted = broker.redacted();
    let text = serde_json::to_string(&redacted).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let secrets = secrets_in(&serde_json::to_value(broker).expect("a broker serializes"));
    check(leaked(&text, &secrets).is_none(), || format!("a literal secret survives redaction: {text}"))?;
    let again = Broker::from_value(serde_json::to_value(&redacted).expect("a broker serializes"));
    check(again.is_ok(), || format!("redaction made a valid broker invalid: {again:?}"))
}

fn round_trips(broker: &Broker) -> Result<(), TestCaseError> {
    let value = serde_json::to_value(broker).expect("a broker serializes");
    let again = Broker::from_value(value.clone());
    check(again.as_ref() == Ok(broker), || format!("{value:#} parsed back as {again:?}"))
}

/// Documents: mutated valid ones, any JSON, and deeply nested ones.
fn documents(valid: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![
        6 => mutated(valid).prop_map(|(doc, _)| doc),
        2 => json_value(),
        1 => (1usize..140, any::<bool>()).prop_map(|(depth, objects)| deep_value(depth, objects)),
        1 => (1usize..140, any::<bool>()).prop_map(|(depth, objects)| {
            json!({"name": "n", "tag": "t", "envs": [{"slug": "dev", "type": "redis",
                "config": {"host": deep_value(depth, objects)}}]})
        }),
    ]
    .boxed()
}

#[test]
fn valid_brokers_parse_round_trip_and_redact() {
    fuzz("valid broker documents", broker_doc(), |doc| {
        let broker = checked(doc.clone());
        check(broker.is_ok(), || format!("a valid broker is refused: {broker:?}\n{doc:#}"))?;
        let broker = broker.expect("checked");
        round_trips(&broker)?;
        check_redacted(&broker)
    });
}

#[test]
fn broker_documents_never_panic_and_name_the_field() {
    fuzz("broker documents", documents(broker_doc()), |doc| match checked(doc.clone()) {
        Ok(broker) => {
            round_trips(&broker)?;
            check_redacted(&broker)
        }
        Err(error) => check_error(&error, &doc),
    });
}

/// A patch built from a broker document: some of its fields, envs to replace or add, envs to remove.
fn patch_doc() -> BoxedStrategy<(Value, Value)> {
    (broker_doc(), broker_doc(), any::<(bool, bool, bool)>(), prop::collection::vec(tag(), 0..3))
        .prop_map(|(base, other, (name, description, keep_tag), remove)| {
            let mut patch = json!({"envs": other["envs"]});
            if name {
                patch["name"] = other["name"].clone();
            }
            if description {
                patch["description"] = json!("new");
            }
            if keep_tag {
                patch["tag"] = base["tag"].clone();
            }
            let mut remove: Vec<Value> = remove.into_iter().map(Value::String).collect();
            remove.extend(base["envs"].as_array().into_iter().flatten().take(1).map(|e| e["slug"].clone()));
            patch["removeEnvs"] = Value::Array(remove);
            (base, patch)
        })
        .boxed()
}

#[test]
fn broker_patches_never_panic_and_name_the_field() {
    let cases = prop_oneof![
        3 => patch_doc().prop_flat_map(|(base, patch)| {
            (Just(base), mutated(Just(patch).boxed()).prop_map(|(p, _)| p))
        }),
        1 => patch_doc(),
        1 => (broker_doc(), json_value()),
    ];
    fuzz("broker patches", cases, |(base, patch)| {
        let base = Broker::from_value(base).expect("a generated broker is valid");
        let parsed = match BrokerPatch::from_value(patch.clone()) {
            Ok(parsed) => parsed,
            Err(error) => return check_error(&error, &patch),
        };
        match parsed.apply(&base, &Kinds::unchecked()) {
            Ok(next) => {
                round_trips(&next)?;
                check(next.tag == base.tag && next.version == base.version, || {
                    "tag or version changed".into()
                })
            }
            Err(error) => check_error(&error, &patch),
        }
    });
}

/// A valid broker and a topic document for it.
fn broker_and_topic() -> BoxedStrategy<(Broker, Value)> {
    broker_doc()
        .prop_flat_map(|doc| {
            let broker = Broker::from_value(doc).expect("a generated broker is valid");
            let slugs = broker.envs.iter().map(|e| e.slug.clone()).collect();
            let topic = topic_doc(broker.tag.clone(), slugs);
            (Just(broker), topic)
        })
        .boxed()
}

fn check_topic(topic: &Topic, broker: &Broker) -> Result<(), TestCaseError> {
    let value = serde_json::to_value(topic).expect("a topic serializes");
    let again = Topic::from_value(value.clone());
    check(again.as_ref() == Ok(topic), || format!("{value:#} parsed back as {again:?}"))?;
    for env in &broker.envs {
        let spec = topic.spec(&env.slug);
        check(spec.is_ok(), || format!("a valid topic has no spec in `{}`: {spec:?}", env.slug))?;
    }
    Ok(())
}

#[test]
fn valid_topics_validate_and_round_trip() {
    fuzz("valid topic documents", broker_and_topic(), |(broker, doc)| {
        let topic = Topic::from_value(doc.clone());
        check(topic.is_ok(), || format!("a valid topic is refused: {topic:?}\n{doc:#}"))?;
        let topic = topic.expect("checked");
        let valid = topic.validate(&broker, &Kinds::unchecked());
        check(valid.is_ok(), || format!("a valid topic is refused: {valid:?}\n{doc:#}"))?;
        check_topic(&topic, &broker)
    });
}

#[test]
fn topic_documents_never_panic_and_name_the_field() {
    let cases =
        broker_and_topic().prop_flat_map(|(broker, doc)| (Just(broker), documents(Just(doc).boxed())));
    fuzz("topic documents", cases, |(broker, doc)| {
        let topic = match Topic::from_value(doc.clone()) {
            Ok(topic) => topic,
            Err(error) => return check_error(&error, &doc),
        };
        match topic.validate(&broker, &Kinds::unchecked()) {
            Ok(()) => check_topic(&topic, &broker),
            Err(error) => check_error(&error, &doc),
        }
    });
}

#[test]
fn topic_patches_never_panic_and_name_the_field() {
    let cases = broker_and_topic().prop_flat_map(|(broker, doc)| {
        let slugs = broker.envs.iter().map(|e| e.slug.clone()).collect();
        let patch = topic_doc(broker.tag.clone(), slugs).prop_map(|mut p| {
            if let Some(map) = p.as_object_mut() {
                map.remove("tag");
                map.insert("removeEnvs".into(), json!(["dev", "prd"]));
            }
            p
        });
        (Just(broker), Just(doc), documents(patch.boxed()))
    });
    fuzz("topic patches", cases, |(broker, doc, patch)| {
        let topic = Topic::from_value(doc).expect("a generated topic is valid");
        let parsed = match TopicPatch::from_value(patch.clone()) {
            Ok(parsed) => parsed,
            Err(error) => return check_error(&error, &patch),
        };
        match parsed.apply(&topic, &broker, &Kinds::unchecked()) {
            Ok(next) => check_topic(&next, &broker),
            Err(error) => check_error(&error, &patch),
        }
    });
}

/// Any JSON with marked literal secrets at secret keys and in URL passwords, anywhere.
fn with_secrets() -> BoxedStrategy<Value> {
    let secret = prop_oneof![
        3 => secret_value().prop_map(Value::String),
        1 => url().prop_map(Value::String),
        1 => secret_value().prop_map(|s| json!([s, {"x": s}])),
        1 => secret_value().prop_map(|s| json!({"nested": s})),
        1 => (any::<i64>()).prop_map(Value::from),
    ];
    let key = prop_oneof![
        prop::sample::select(SECRET_KEYS.to_vec()).prop_map(str::to_owned),
        prop::sample::select(vec!["PASSWORD", "Token", "sasl.password", "ssl.key.password", "APIKEY"])
            .prop_map(str::to_owned),
    ];
    (json_value(), prop::collection::vec((any::<usize>(), key, secret, url()), 1..4))
        .prop_map(|(mut doc, secrets)| {
            for (selector, key, value, url) in secrets {
                let objects: Vec<_> =
                    paths(&doc).into_iter().filter(|p| get(&doc, p).is_some_and(Value::is_object)).collect();
                let at = objects.get(selector % objects.len().max(1)).cloned();
                if let Some(Value::Object(map)) = at.and_then(|p| get_mut(&mut doc, &p)) {
                    map.insert(key, value);
                    map.insert("url".into(), Value::String(url));
                } else {
                    let mut map = serde_json::Map::new();
                    map.insert(key, value);
                    map.insert("url".into(), Value::String(url));
                    map.insert("rest".into(), doc);
                    doc = Value::Object(map);
                }
            }
            doc
        })
        .boxed()
}

/// The whole-string references redaction must keep: all but those inside a secret key's
/// array or object (a secret that is not a string is hidden whole).
fn kept_references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(s) if secret::is_reference(s) => found.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| kept_references(v, found)),
        Value::Object(map) => {
            for (key, v) in map {
                if !secret::is_secret_field(key) || v.is_string() {
                    kept_references(v, found);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn redaction_leaves_no_literal_secret() {
    fuzz("redaction", with_secrets(), |mut doc| {
        let mut before = Vec::new();
        kept_references(&doc, &mut before);
        secret::redact(&mut doc);
        let text = doc.to_string();
        check(!text.contains(SECRET_MARK), || format!("a literal secret survives redaction: {text}"))?;
        // Redaction hides values, not where they come from.
        let mut after = Vec::new();
        kept_references(&doc, &mut after);
        check(before == after, || format!("references {before:?} became {after:?}: {text}"))
    });
}

#[test]
fn redacting_urls_never_panics_and_hides_the_password() {
    fuzz("URL redaction", prop_oneof![url(), nasty_string()], |url| {
        if let Some(shown) = secret::redact_url(&url) {
            check(!shown.contains(SECRET_MARK), || format!("`{url}` → `{shown}`"))?;
        } else {
            check(!url.contains(SECRET_MARK), || format!("`{url}` is left as it is"))?;
        }
        Ok(())
    });
}

#[test]
fn references_resolve_exactly_and_scrub_back() {
    let text = prop_oneof![
        nasty_string(),
        prop::collection::vec(
            prop_oneof![
                nasty_string(),
                "[A-Z_]{1,6}".prop_map(|n| format!("${{{n}}}")),
                "[a-z-]{1,6}".prop_map(|n| format!("$Secret{{{n}}}")),
            ],
            0..5
        )
        .prop_map(|parts| parts.concat()),
    ];
    let cases = (text, prop::collection::vec("[a-z0-9]{3,9}", 1..4), any::<bool>());
    fuzz("references", cases, |(text, values, whole_objects)| {
        let config = if whole_objects { json!({"a": [text.clone()], "b": {"c": text}}) } else { json!(text) };
        // Resolving each reference to its own text gives the config back: nothing is lost or added.
        let same = secret::resolve(&config, &mut |r, _| Ok(r.to_string()));
        check(same.as_ref().is_ok_and(|s| s.config == config), || format!("{config} resolved as {same:?}"))?;
        let found = secret::references(&config);
        let _ = secret::is_reference(&text);
        for (field, reference) in &found {
            check(field.starts_with("config"), || format!("field `{field}`"))?;
            let name = match reference {
                Reference::Env(n) | Reference::Stored(n) => n,
            };
            check(text.contains(&reference.to_string()), || format!("`{name}` is not in `{text}`"))?;
        }
        // Each reference to a value, then the scrubber turns every value back.
        let mut used: Vec<String> = Vec::new();
        let resolved = secret::resolve(&config, &mut |_, _| {
            let value = values[used.len() % values.len()].clone();
            used.push(value.clone());
            Ok(value)
        });
        let resolved = resolved.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let scrubbed = resolved.scrubber.scrub_str(&resolved.config.to_string());
        let mut bare = scrubbed.to_ascii_lowercase();
        for (_, reference) in &found {
            bare = bare.replace(&reference.to_string().to_ascii_lowercase(), "\u{1}");
        }
        for value in &used {
            if found.iter().any(|(_, r)| r.to_string().to_ascii_lowercase().contains(value.as_str())) {
                continue;
            }
            check(!bare.contains(value.as_str()), || format!("`{value}` survives scrubbing: {scrubbed}"))?;
        }
        Ok(())
    });
}

#[test]
fn the_scrubber_never_panics_and_replaces_every_form() {
    let cases = (nasty_string(), "[a-zA-Z0-9 ./:@-]{1,12}", nasty_string(), nasty_string());
    fuzz("scrubber", cases, |(noise, value, odd_value, more)| {
        let mut scrubber = Scrubber::default();
        scrubber.add(&value, "${R}");
        scrubber.add(&odd_value, "$Secret{odd}");
        let text = format!("{noise}{value}{more}{}{odd_value}", value.to_ascii_uppercase());
        let scrubbed = scrubber.scrub_str(&text);
        let _ = scrubber.scrub(polybus_core::Error::Closed(text.clone()));
        let lower = value.to_ascii_lowercase();
        if !"${r}$secret{odd}".contains(&lower) && !odd_value.to_ascii_lowercase().contains(&lower) {
            let bare =
                scrubbed.to_ascii_lowercase().replace("${r}", "\u{1}").replace("$secret{odd}", "\u{1}");
            check(!bare.contains(&lower), || format!("`{value}` survives: {scrubbed}"))?;
        }
        Ok(())
    });
}

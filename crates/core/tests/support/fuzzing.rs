//! What the parser fuzz tests of every crate share (issue 13): the runner with its case count,
//! hostile strings and JSON, valid-shaped definitions and the mutations that break them.
//!
//! Included with `#[path]` by each crate's fuzz test, so proptest stays a dev-dependency.
//! `POLYBUS_FUZZ_CASES` sets the cases per property (default [`DEFAULT_CASES`]).

#![allow(dead_code)]

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

/// Cases per property in a plain `cargo test`.
pub const DEFAULT_CASES: u32 = 200;

/// Marks every literal secret the generators write, so a leak is found by a substring search.
pub const SECRET_MARK: &str = "S3cr3tV";

/// Config keys whose values are secrets (as `polybus_core::secret` knows them).
pub const SECRET_KEYS: [&str; 6] = ["password", "pass", "token", "secretAccessKey", "credentials", "apiKey"];

/// Cases per property: `POLYBUS_FUZZ_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    std::env::var("POLYBUS_FUZZ_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_CASES)
}

/// Runs `test` on [`cases`] inputs of `strategy` and prints how many ran in how long; a failure
/// panics with the smallest failing input proptest found.
pub fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    fuzz_scaled(name, 1, strategy, test)
}

/// Like [`fuzz`] with `cases() / divisor` cases, for properties that cost far more per input.
pub fn fuzz_scaled<S>(
    name: &str,
    divisor: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let config = Config {
        cases: (cases() / divisor.max(1)).max(1),
        failure_persistence: None,
        // Each shrink step reruns the test; some properties wait on a broker.
        max_shrink_iters: std::env::var("POLYBUS_FUZZ_SHRINK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let count = AtomicU64::new(0);
    let started = Instant::now();
    let result = runner.run(&strategy, |input| {
        count.fetch_add(1, Ordering::Relaxed);
        test(input)
    });
    // Counted by the README's fuzzing figures: `grep '^fuzz ' | awk`.
    eprintln!(
        "fuzz {name}: {} inputs in {:.1} s",
        count.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if let Err(error) = result {
        panic!("fuzz {name} failed: {error}");
    }
}

/// Fails the case with `message` unless `ok`.
pub fn check(ok: bool, message: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if ok { Ok(()) } else { Err(TestCaseError::fail(message())) }
}

/// Strings a user may type or an attacker may send: tags, unicode, control characters, NUL,
/// references, URLs, JSON and YAML punctuation, and huge ones.
pub fn nasty_string() -> BoxedStrategy<String> {
    let specials = prop::sample::select(vec![
        '\0', '\n', '\r', '\t', '\u{7f}', '\u{1b}', '\u{202e}', '\u{feff}', '\u{fffd}', 'é', 'ß', '𝄞', '👍',
        '$', '{', '}', '[', ']', '@', ':', '/', '%', '"', '\'', '\\', '`', '#', '&', '*', '!', '|', '>', '-',
        '_', '.', ',', ' ', 'a', 'Z', '0',
    ]);
    prop_oneof![
        4 => "[a-z0-9][a-z0-9_-]{0,12}",
        3 => any::<String>(),
        3 => vec(specials, 0..24).prop_map(|c| c.into_iter().collect()),
        1 => Just(String::new()),
        1 => "[A-Za-z0-9_]{0,8}".prop_map(|n| format!("${{{n}}}")),
        1 => "[A-Za-z0-9_-]{0,8}".prop_map(|n| format!("$Secret{{{n}}}")),
        1 => "[a-z]{1,5}".prop_map(|n| format!("x${{{n}")),
        1 => url_with(prop::option::of("[a-z0-9%/:]{0,8}").boxed()),
        1 => (prop::sample::select(vec!["a", "é", "\0", "${", "9"]), 1000usize..20_000)
            .prop_map(|(s, n)| s.repeat(n)),
    ]
    .boxed()
}

/// A literal secret value: marked, with characters that need escaping in URLs and JSON.
pub fn secret_value() -> BoxedStrategy<String> {
    "[A-Za-z0-9]{2,8}([/:?#%\" ]?[A-Za-z0-9é]{1,4})?".prop_map(|s| format!("{SECRET_MARK}{s}")).boxed()
}

/// A secret as a config holds it: a literal, or a `${VAR}` / `$Secret{name}` reference.
pub fn secret_or_reference() -> BoxedStrategy<String> {
    prop_oneof![
        3 => secret_value(),
        1 => "[A-Z][A-Z0-9_]{0,10}".prop_map(|n| format!("${{{n}}}")),
        1 => "[a-z][a-z0-9_-]{0,10}".prop_map(|n| format!("$Secret{{{n}}}")),
    ]
    .boxed()
}

/// `scheme://[user[:password]@]host[:port][/path]`, the password a marked literal or a reference.
pub fn url() -> BoxedStrategy<String> {
    url_with(prop::option::of(secret_or_reference()).boxed())
}

/// A URL with passwords from `password`.
pub fn url_with(password: BoxedStrategy<Option<String>>) -> BoxedStrategy<String> {
    (
        prop::sample::select(vec![
            "redis", "rediss", "amqp", "amqps", "mqtt", "mqtts", "nats", "tls", "http", "https", "ssl", "x",
        ]),
        prop::option::of(("[a-z%0-9]{0,6}", password)),
        prop_oneof!["[a-z][a-z0-9.-]{0,12}", Just("127.0.0.1".to_owned()), Just("[::1]".to_owned())],
        prop::option::of(prop_oneof![any::<u16>().prop_map(|p| p.to_string()), "[a-z0-9]{0,6}"]),
        "(/[a-z0-9%@:]{0,8}){0,2}",
    )
        .prop_map(|(scheme, userinfo, host, port, path)| {
            let userinfo = match userinfo {
                None => String::new(),
                Some((user, None)) => format!("{user}@"),
                Some((user, Some(password))) => format!("{user}:{password}@"),
            };
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}://{userinfo}{host}{port}{path}")
        })
        .boxed()
}

/// Any JSON value, nested a few levels.
pub fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![Just(0), Just(1), Just(3), Just(5), Just(65_535), Just(65_536), Just(-1)]
            .prop_map(Value::from),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(field_name(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A value nested `depth` times in arrays or objects (parsers must refuse or survive it).
pub fn deep_value(depth: usize, objects: bool) -> Value {
    let mut value = json!("bottom");
    for _ in 0..depth {
        value = if objects { json!({ "a": value }) } else { json!([value]) };
    }
    value
}

/// Field names: the ones polybus knows (right and wrong case), secrets, and random ones.
pub fn field_name() -> BoxedStrategy<String> {
    prop_oneof![
        2 => prop::sample::select(vec![
            "name", "tag", "envs", "slug", "type", "config", "description", "version", "removeEnvs",
            "url", "host", "port", "username", "password", "brokers", "servers", "sasl", "properties",
            "projectId", "region", "token", "pass", "user", "credentials", "secretAccessKey", "apiKey",
            "nativeName", "queueUrl", "maxAttempts", "deadLetter", "sample", "payload", "headers",
            "messages", "leaseIds", "delayMs", "max", "waitMs", "ackDeadlineMs", "Password", "PASS",
            "sasl.password", "ssl.key.password", "encoding", "id", "key", "contentType", "nack",
        ])
        .prop_map(str::to_owned),
        1 => nasty_string(),
    ]
    .boxed()
}

/// A tag or env slug as the rules allow it.
pub fn tag() -> BoxedStrategy<String> {
    "[a-z0-9][a-z0-9_-]{0,20}".boxed()
}

/// A display name or description: anything with a visible character.
pub fn display_text() -> BoxedStrategy<String> {
    prop_oneof!["[A-Za-z0-9][A-Za-z0-9 ._-]{0,30}", "\\PC{0,10}[a-zé👍]\\PC{0,10}"].boxed()
}

fn opt(key: &str, value: Option<Value>, map: &mut Map<String, Value>) {
    if let Some(value) = value {
        map.insert(key.to_owned(), value);
    }
}

fn host() -> BoxedStrategy<String> {
    prop_oneof!["[a-z][a-z0-9.-]{0,20}", Just("127.0.0.1".to_owned()), Just("::1".to_owned())].boxed()
}

fn text() -> BoxedStrategy<String> {
    "[A-Za-z0-9._/-]{1,16}".boxed()
}

/// A valid config for `broker_type` (its stored name).
pub fn config_for(broker_type: &'static str) -> BoxedStrategy<Value> {
    let s = || prop::option::of(text().prop_map(Value::String));
    let secret = || prop::option::of(secret_or_reference().prop_map(Value::String));
    let flag = || prop::option::of(any::<bool>().prop_map(Value::Bool));
    let port = || prop::option::of(any::<u16>().prop_map(Value::from));
    match broker_type {
        "kafka" => (
            vec((host(), any::<u16>()).prop_map(|(h, p)| format!("{h}:{p}")), 1..3),
            (s(), s(), flag()),
            prop::option::of((
                prop::sample::select(vec!["plain", "PLAIN", "scram-sha-256", "SCRAM-SHA-512"]),
                text(),
                secret_or_reference(),
            )),
            (prop::option::of(1i32..100), prop::option::of(1i32..5)),
            prop::option::of(prop_oneof![
                btree_map(
                    prop::sample::select(vec!["sasl.password", "ssl.key.password"]),
                    secret_or_reference(),
                    0..3
                ),
                btree_map(prop::sample::select(vec!["linger.ms", "client.rack"]), text(), 0..3),
            ]),
        )
            .prop_map(|(brokers, (client, _group, ssl), sasl, (partitions, rf), properties)| {
                let mut m = Map::new();
                m.insert("brokers".into(), json!(brokers));
                opt("clientId", client, &mut m);
                opt("ssl", ssl, &mut m);
                opt(
                    "sasl",
                    sasl.map(|(mechanism, username, password)| {
                        json!({"mechanism": mechanism, "username": username, "password": password})
                    }),
                    &mut m,
                );
                opt("partitions", partitions.map(Value::from), &mut m);
                opt("replicationFactor", rf.map(Value::from), &mut m);
                opt("properties", properties.map(|p| json!(p)), &mut m);
                Value::Object(m)
            })
            .boxed(),
        "redis" | "rabbitmq" | "mqtt" => (
            prop_oneof![url().prop_map(|u| ("url", u)), host().prop_map(|h| ("host", h)),],
            (port(), s(), secret(), flag()),
            (s(), s(), prop::option::of(0i64..16)),
            prop::option::of(prop::sample::select(vec![3u8, 5])),
        )
            .prop_map(move |((address_key, address), (port, user, password, tls), (a, b, db), version)| {
                let mut m = Map::new();
                m.insert(address_key.into(), Value::String(address));
                opt("port", port, &mut m);
                opt("username", user, &mut m);
                opt("password", password, &mut m);
                opt("tls", tls, &mut m);
                match broker_type {
                    "redis" => {
                        opt("db", db.map(Value::from), &mut m);
                        opt("mode", b.map(|_| json!("streams")), &mut m);
                    }
                    "rabbitmq" => {
                        opt("vhost", a, &mut m);
                        opt("exchange", b, &mut m);
                    }
                    _ => {
                        opt("clientId", a, &mut m);
                        opt("version", version.map(Value::from), &mut m);
                    }
                }
                Value::Object(m)
            })
            .boxed(),
        "google_pubsub" => (
            prop_oneof!["[a-z][a-z0-9-]{2,20}", "[A-Z]{1,6}".prop_map(|v| format!("${{{v}}}"))],
            (s(), s(), s(), secret(), s()),
        )
            .prop_map(|(project, (_topic, _sub, key_file, credentials, endpoint))| {
                let mut m = Map::new();
                m.insert("projectId".into(), Value::String(project));
                opt("keyFilename", key_file, &mut m);
                opt("credentials", credentials, &mut m);
                opt("endpoint", endpoint, &mut m);
                Value::Object(m)
            })
            .boxed(),
        "aws_sqs" => ("[a-z]{2}-[a-z]{4,9}-[1-3]", s(), s(), secret(), s())
            .prop_map(|(region, queue, id, secret, endpoint)| {
                let mut m = Map::new();
                m.insert("region".into(), Value::String(region));
                opt("queueUrl", queue, &mut m);
                opt("accessKeyId", id, &mut m);
                opt("secretAccessKey", secret, &mut m);
                opt("endpointUrl", endpoint, &mut m);
                Value::Object(m)
            })
            .boxed(),
        "nats" => (
            prop_oneof![url().prop_map(Value::String), vec(url(), 1..3).prop_map(|v| json!(v)),],
            (s(), secret(), secret(), s()),
            (prop::option::of(any::<i64>()), prop::option::of(any::<u64>())),
        )
            .prop_map(|(servers, (user, pass, token, name), (attempts, wait))| {
                let mut m = Map::new();
                m.insert("servers".into(), servers);
                opt("user", user, &mut m);
                opt("pass", pass, &mut m);
                opt("token", token, &mut m);
                opt("name", name, &mut m);
                opt("maxReconnectAttempts", attempts.map(Value::from), &mut m);
                opt("reconnectTimeWait", wait.map(Value::from), &mut m);
                Value::Object(m)
            })
            .boxed(),
        _ => (s(), prop::option::of((prop::option::of(any::<u64>()), prop::option::of(any::<u64>()))))
            .prop_map(|(path, retention)| {
                let mut m = Map::new();
                opt("path", path, &mut m);
                opt(
                    "retention",
                    retention.map(|(age, n)| {
                        let mut r = Map::new();
                        opt("maxAgeSeconds", age.map(Value::from), &mut r);
                        opt("maxMessages", n.map(Value::from), &mut r);
                        Value::Object(r)
                    }),
                    &mut m,
                );
                Value::Object(m)
            })
            .boxed(),
    }
}

/// Broker type names as stored (`ALL` order).
pub const BROKER_TYPES: [&str; 8] =
    ["kafka", "redis", "rabbitmq", "google_pubsub", "aws_sqs", "nats", "mqtt", "embedded"];

/// One env: `{slug, type, config}` with a valid config; the type sometimes in upper case.
pub fn env_doc(slug: String) -> BoxedStrategy<Value> {
    (prop::sample::select(BROKER_TYPES.to_vec()), any::<bool>())
        .prop_flat_map(move |(broker_type, upper)| {
            let slug = slug.clone();
            config_for(broker_type).prop_map(move |config| {
                let shown = if upper { broker_type.to_ascii_uppercase() } else { broker_type.to_owned() };
                json!({"slug": slug, "type": shown, "config": config})
            })
        })
        .boxed()
}

/// A valid broker document with 1 to 3 envs.
pub fn broker_doc() -> BoxedStrategy<Value> {
    (display_text(), tag(), prop::option::of(display_text()), prop::collection::hash_set(tag(), 1..4))
        .prop_flat_map(|(name, tag, description, slugs)| {
            let envs: Vec<_> = slugs.into_iter().map(env_doc).collect();
            (Just(name), Just(tag), Just(description), envs)
        })
        .prop_map(|(name, tag, description, envs)| {
            let mut doc = json!({"name": name, "tag": tag, "envs": envs});
            if let Some(description) = description {
                doc["description"] = json!(description);
            }
            doc
        })
        .boxed()
}

/// A valid topic document for broker `broker` with envs `slugs`.
pub fn topic_doc(broker: String, slugs: Vec<String>) -> BoxedStrategy<Value> {
    let env = |slug: String| {
        (
            // Legal on every broker type (Pub/Sub's start-with-a-letter, 3+ and no `goog` included).
            prop::option::of("[a-fh-z][a-z0-9_-]{2,39}"),
            prop::option::of("https?://[a-z]{1,10}(:[0-9]{2,4})?/[A-Za-z0-9_-]{1,30}"),
            prop::option::of(any::<bool>()),
            prop::option::of(1i32..64),
        )
            .prop_map(move |(native, queue, fifo, partitions)| {
                let mut m = Map::new();
                m.insert("slug".into(), json!(slug));
                opt("nativeName", native.map(Value::String), &mut m);
                opt("queueUrl", queue.map(Value::String), &mut m);
                opt("fifo", fifo.map(Value::Bool), &mut m);
                opt("partitions", partitions.map(Value::from), &mut m);
                Value::Object(m)
            })
    };
    let envs = prop::sample::subsequence(slugs.clone(), 0..=slugs.len())
        .prop_flat_map(move |chosen| chosen.into_iter().map(env).collect::<Vec<_>>());
    (
        // The tag is every env's default native name, so it is legal on every broker type too.
        "[a-fh-z][a-z0-9_-]{2,40}",
        prop::option::of(display_text()),
        prop::option::of(1u32..50),
        prop::option::of("[a-fh-z][a-z0-9-]{2,29}"),
        envs,
        prop::option::of(json_value()),
    )
        .prop_map(move |(topic, name, max_attempts, dead_letter, envs, sample)| {
            let mut m = Map::new();
            m.insert("tag".into(), json!(format!("{broker}:{topic}")));
            opt("name", name.map(Value::String), &mut m);
            opt("maxAttempts", max_attempts.map(Value::from), &mut m);
            opt("deadLetter", dead_letter.map(Value::String), &mut m);
            if !envs.is_empty() {
                m.insert("envs".into(), Value::Array(envs));
            }
            opt("sample", sample, &mut m);
            Value::Object(m)
        })
        .boxed()
}

/// One step of a path into a JSON document.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// An object's field.
    Key(String),
    /// An array's element.
    Index(usize),
}

/// Every path in `value`, the root first.
pub fn paths(value: &Value) -> Vec<Vec<Step>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < out.len() {
        let path = out[i].clone();
        match get(value, &path) {
            Some(Value::Object(map)) => {
                out.extend(map.keys().map(|k| [path.clone(), vec![Step::Key(k.clone())]].concat()))
            }
            Some(Value::Array(items)) => {
                out.extend((0..items.len()).map(|n| [path.clone(), vec![Step::Index(n)]].concat()))
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The value at `path`.
pub fn get<'a>(value: &'a Value, path: &[Step]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, step| match step {
        Step::Key(k) => v.get(k),
        Step::Index(n) => v.get(n),
    })
}

/// The value at `path`, to change.
pub fn get_mut<'a>(value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, step| match step {
        Step::Key(k) => v.get_mut(k),
        Step::Index(n) => v.get_mut(n),
    })
}

/// A path as serde_path_to_error prints it: `envs[0].config.port`.
pub fn path_text(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(n) => out.push_str(&format!("[{n}]")),
        }
    }
    out
}

/// What a mutation does at the path it picks.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Replaces the value (wrong types, hostile strings, huge numbers, nesting).
    Replace(Value),
    /// Removes it from its object or array.
    Remove,
    /// Adds a field to the object there (or to its parent).
    AddField(String, Value),
    /// Wraps the value in an array (an array where an object or a string is expected).
    WrapInArray,
    /// Turns an object into the array of its values.
    ObjectToArray,
    /// Nests the value `n` levels deep.
    Nest(usize),
    /// Duplicates an array's element (duplicate envs, slugs).
    DuplicateElement,
}

/// A mutation and which path it applies to (`selector % number of paths`).
pub fn mutation() -> BoxedStrategy<(usize, Mutation)> {
    let what = prop_oneof![
        5 => json_value().prop_map(Mutation::Replace),
        2 => Just(Mutation::Remove),
        2 => (field_name(), json_value()).prop_map(|(k, v)| Mutation::AddField(k, v)),
        1 => Just(Mutation::WrapInArray),
        1 => Just(Mutation::ObjectToArray),
        1 => (1usize..40).prop_map(Mutation::Nest),
        1 => Just(Mutation::DuplicateElement),
    ];
    (any::<usize>(), what).boxed()
}

/// Applies `mutation` to `doc`; returns the path it changed.
pub fn apply(doc: &mut Value, (selector, mutation): &(usize, Mutation)) -> Vec<Step> {
    let all = paths(doc);
    let path = all[selector % all.len()].clone();
    match mutation {
        Mutation::Replace(v) => {
            if let Some(at) = get_mut(doc, &path) {
                *at = v.clone();
            }
        }
        Mutation::Remove => {
            if let Some((last, parent)) = path.split_last() {
                match (get_mut(doc, parent), last) {
                    (Some(Value::Object(map)), Step::Key(k)) => {
                        map.remove(k);
                    }
                    (Some(Value::Array(items)), Step::Index(n)) if *n < items.len() => {
                        items.remove(*n);
                    }
                    _ => {}
                }
            }
        }
        Mutation::AddField(key, value) => {
            if let Some(Value::Object(map)) = get_mut(doc, &path) {
                map.insert(key.clone(), value.clone());
                return [path, vec![Step::Key(key.clone())]].concat();
            }
        }
        Mutation::WrapInArray => {
            if let Some(at) = get_mut(doc, &path) {
                *at = Value::Array(vec![at.take()]);
            }
        }
        Mutation::ObjectToArray => {
            if let Some(at) = get_mut(doc, &path)
                && let Value::Object(map) = at
            {
                *at = Value::Array(std::mem::take(map).into_iter().map(|(_, v)| v).collect());
            }
        }
        Mutation::Nest(n) => {
            if let Some(at) = get_mut(doc, &path) {
                let mut v = at.take();
                for _ in 0..*n {
                    v = json!({ "a": v });
                }
                *at = v;
            }
        }
        Mutation::DuplicateElement => {
            if let Some(Value::Array(items)) = get_mut(doc, &path)
                && let Some(first) = items.first().cloned()
            {
                items.push(first);
            }
        }
    }
    path
}

/// `doc` with 1 to 3 mutations, and the paths they changed.
pub fn mutated(doc: BoxedStrategy<Value>) -> BoxedStrategy<(Value, Vec<Vec<Step>>)> {
    (doc, vec(mutation(), 1..4))
        .prop_map(|(mut doc, mutations)| {
            let changed = mutations.iter().map(|m| apply(&mut doc, m)).collect();
            (doc, changed)
        })
        .boxed()
}

/// Every marked literal secret in `value` that is still a secret field's value: a string at a
/// secret key, or the password of a URL at `url` or `servers`. (A mutation that moves a marked
/// string elsewhere, say by turning `sasl` into an array, makes it an ordinary value.)
pub fn secrets_in(value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    collect_secrets(value, None, &mut found);
    found
}

fn collect_secrets(value: &Value, key: Option<&str>, found: &mut Vec<String>) {
    let secret_key = key.is_some_and(|k| {
        let last = k.rsplit('.').next().unwrap_or(k);
        SECRET_KEYS.iter().any(|s| s.eq_ignore_ascii_case(last))
    });
    match value {
        Value::String(s) if secret_key && s.contains(SECRET_MARK) => found.push(s.clone()),
        Value::String(s) if matches!(key, Some("url" | "servers")) => {
            if let Some(at) = s.find(SECRET_MARK) {
                let tail = &s[at..];
                found.push(tail[..tail.rfind('@').unwrap_or(tail.len())].to_owned());
            }
        }
        Value::Array(items) if key == Some("servers") => {
            items.iter().for_each(|v| collect_secrets(v, key, found))
        }
        Value::Object(map) => map.iter().for_each(|(k, v)| collect_secrets(v, Some(k), found)),
        _ => {}
    }
}

/// The first of `secrets` that `text` shows.
pub fn leaked<'a>(text: &str, secrets: &'a [String]) -> Option<&'a String> {
    secrets.iter().find(|s| text.contains(s.as_str()))
}

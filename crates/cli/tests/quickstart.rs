//! `polybus quickstart` through the real binary.

mod common;

use common::Sandbox;

#[test]
fn quickstart_twice_in_a_fresh_directory_succeeds() {
    let sandbox = Sandbox::new();
    // Without `--registry`: the default `./polybus.db` in the directory it runs in.
    let quickstart = || sandbox.run_default_registry(&["quickstart"]);

    let first = quickstart();
    let out = first.ok();
    assert_eq!(first.stderr, "");
    let broker_file =
        sandbox.path().canonicalize().expect("dir").join("polybus-data").join("polybus-broker.db");
    assert!(
        out.contains(&format!(
            "broker     `quickstart` (created): env `local` on the embedded broker in {}\n",
            broker_file.display()
        )),
        "{out}"
    );
    assert!(out.contains("topic      `quickstart:greetings` (created)\n"), "{out}");
    assert!(
        out.contains("published  10 messages in one batch to `quickstart:greetings` in env `local`\n"),
        "{out}"
    );
    assert!(out.contains("consumed   10 messages as group `quickstart`, each acked\n"), "{out}");
    assert!(out.contains("\nNext, try:\n  polybus broker get quickstart\n"), "{out}");
    assert!(out.contains("  polybus publish --env local quickstart:greetings --data hi\n"), "{out}");
    assert!(
        out.contains("  polybus consume --env local quickstart:greetings --group me --count 1\n"),
        "{out}"
    );
    assert!(sandbox.path().join("polybus.db").exists());
    assert!(broker_file.exists());

    let second = quickstart();
    let out = second.ok();
    assert!(out.contains("`quickstart` (already there, reused)"), "{out}");
    assert!(out.contains("`quickstart:greetings` (already there, reused)"), "{out}");
    assert!(out.contains("consumed   10 messages as group `quickstart`, each acked\n"), "{out}");
}

#[test]
fn quickstart_next_commands_work_as_printed() {
    let sandbox = Sandbox::new();
    let out = sandbox.run(&["quickstart"]).ok().to_owned();
    assert!(out.contains("  polybus --registry registry.db broker get quickstart\n"), "{out}");
    let published = sandbox.run(&["publish", "--env", "local", "quickstart:greetings", "--data", "hi"]);
    let id = published.ok().trim_end().to_owned();
    let consumed = sandbox.run(&[
        "consume",
        "--env",
        "local",
        "quickstart:greetings",
        "--group",
        "me",
        "--count",
        "1",
        "--timeout",
        "10s",
        "--output",
        "json",
    ]);
    let message: serde_json::Value = serde_json::from_str(consumed.ok()).expect("json");
    // A new group starts at the oldest message the broker still keeps: `hi`, or a greeting
    // of the quickstart when it has not been compacted away yet.
    let payload = message["payload"].as_str().expect("text payload");
    if payload == "hi" {
        assert_eq!(message["id"].as_str(), Some(id.as_str()));
    } else {
        assert!(payload.starts_with("hello #"), "{message}");
    }
}

//! `polybus key …` and `polybus serve`, through the real binary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::Sandbox;
use serde_json::Value;

#[test]
fn keys_are_created_once_listed_without_their_secret_and_revoked() {
    let sandbox = Sandbox::new();
    let created = sandbox.run(&["key", "create", "--name", "ci", "--read-only"]);
    let secret = created.ok().trim().to_owned();
    assert!(secret.starts_with("pbk_") && secret.len() > 40, "{created:?}");
    assert!(created.stderr.contains("shown only this once"), "{created:?}");
    let failed = sandbox.run(&["key", "create", "--name", "ci"]);
    assert!(failed.failed(1).starts_with("error: ALREADY_EXISTS: an API key named `ci` exists already"));
    let failed = sandbox.run(&["key", "create", "--name", "Not A Name"]);
    assert!(failed.failed(1).starts_with("error: VALIDATION_FAILED: field `name`"));

    let listed = sandbox.run(&["key", "list"]);
    let text = listed.ok();
    assert!(text.starts_with("NAME  PREFIX"), "{text}");
    assert!(text.contains(&format!("ci    {}…  read-only", &secret[..12])), "{text}");
    assert!(!text.contains(&secret));
    let json = sandbox.run(&["key", "list", "--output", "json"]).json();
    assert_eq!((json[0]["name"].as_str(), json[0]["readOnly"].as_bool()), (Some("ci"), Some(true)));

    assert_eq!(sandbox.run(&["key", "revoke", "ci"]).ok(), "revoked API key `ci`\n");
    let failed = sandbox.run(&["key", "revoke", "ci"]);
    assert_eq!(failed.failed(1), "error: KEY_NOT_FOUND: no API key named `ci` (see `polybus key list`)");
    let empty = sandbox.run(&["key", "list"]);
    assert_eq!(empty.ok(), "NAME  PREFIX  ACCESS  CREATED\n");
}

/// `GET path` with a Bearer key over plain HTTP/1.1; returns the status line and body.
fn get(address: &str, path: &str, key: &str) -> (String, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the server");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

#[test]
fn serve_creates_a_first_key_answers_with_it_and_stops_on_sigterm() {
    let sandbox = Sandbox::new();
    let mut server = sandbox.spawn(&["serve", "--listen", "127.0.0.1:0", "--output", "json"]);
    let mut stdout = BufReader::new(server.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("first line");
    let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let url = started["url"].as_str().expect("url");
    let address = url.strip_prefix("http://").expect("http URL").to_owned();
    let key = started["createdKey"]["key"].as_str().expect("a first key").to_owned();
    assert_eq!(started["createdKey"]["name"], "admin");
    let data_dir = sandbox.path().canonicalize().expect("sandbox").join("polybus-data");
    assert_eq!(started["dataDir"].as_str(), data_dir.to_str(), "the data folder sits beside the registry");
    assert!(data_dir.is_dir(), "and is created at start");

    let (status, body) = get(&address, "/v1/brokers", &key);
    assert!(status.contains("200"), "{status}: {body}");
    assert!(body.contains("[]"), "{body}");
    let (status, _) = get(&address, "/v1/brokers", "pbk_wrong");
    assert!(status.contains("401"), "{status}");

    let stopped = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().expect("kill");
    assert!(stopped.success());
    let status = server.wait().expect("server exits");
    assert_eq!(status.code(), Some(0), "stops cleanly on SIGTERM");

    let listed = sandbox.run(&["key", "list"]);
    assert!(listed.ok().contains("admin"), "{listed:?}");
    let mut again = sandbox.spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let mut stdout = BufReader::new(again.stdout.take().expect("stdout"));
    let mut banner = String::new();
    for _ in 0..9 {
        stdout.read_line(&mut banner).expect("banner");
    }
    assert!(banner.contains("data folder  "), "{banner}");
    assert!(banner.starts_with("polybus server listening on http://127.0.0.1:"), "{banner}");
    assert!(banner.contains("polybus key create --name NAME"), "no second key is created: {banner}");
    let stopped = Command::new("kill").args(["-TERM", &again.id().to_string()]).status().expect("kill");
    assert!(stopped.success());
    assert_eq!(again.wait().expect("server exits").code(), Some(0));
}

#[test]
fn serve_on_a_taken_address_fails_in_one_line() {
    let sandbox = Sandbox::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let failed = sandbox.run(&["serve", "--listen", &address]);
    assert!(
        failed.failed(1).starts_with(&format!("error: LISTEN_FAILED: cannot listen on {address}")),
        "{failed:?}"
    );
}

/// Writes a CA and a certificate it signed for 127.0.0.1 into the sandbox with `openssl`;
/// returns (CA, certificate, key) file names.
fn certificates(sandbox: &Sandbox, prefix: &str) -> (String, String, String) {
    let dir = sandbox.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (ca, ca_key) = (format!("{prefix}-ca.pem"), format!("{prefix}-ca.key"));
    let (cert, key, csr) =
        (format!("{prefix}-cert.pem"), format!("{prefix}-key.pem"), format!("{prefix}.csr"));
    let subject = format!("/CN={prefix} test CA");
    openssl(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject, "-keyout", &ca_key,
        "-out", &ca,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    sandbox.write("san.ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        &cert,
    ]);
    (ca, cert, key)
}

#[test]
fn serve_speaks_https_with_tls_cert_and_key_and_the_cli_trusts_its_ca() {
    let sandbox = Sandbox::new();
    let (ca, cert, key) = certificates(&sandbox, "https-ok");
    let (other_ca, _, _) = certificates(&sandbox, "https-other");
    let args =
        ["serve", "--listen", "127.0.0.1:0", "--output", "json", "--tls-cert", &cert, "--tls-key", &key];
    let mut server = sandbox.spawn(&args);
    let mut stdout = BufReader::new(server.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("first line");
    let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let url = started["url"].as_str().expect("url").to_owned();
    let address = url.strip_prefix("https://").unwrap_or_else(|| panic!("an https URL: {url}")).to_owned();
    let api_key = started["createdKey"]["key"].as_str().expect("a first key").to_owned();

    // Plain HTTP to the HTTPS port gets no HTTP answer, and does not stop the server.
    let mut plain = TcpStream::connect(&address).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(plain, "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "plain HTTP must not be served");

    let listed =
        sandbox.run(&["--server", &url, "--server-ca", &ca, "--api-key", &api_key, "broker", "list"]);
    listed.ok();
    let untrusted =
        sandbox.run(&["--server", &url, "--server-ca", &other_ca, "--api-key", &api_key, "broker", "list"]);
    assert_ne!(untrusted.code, Some(0), "another CA must not be trusted: {untrusted:?}");
    assert!(untrusted.stderr.to_lowercase().contains("certificate"), "says why: {untrusted:?}");
    let not_pem = sandbox.write("not-a-ca.pem", "hello");
    let bad_ca = sandbox.run(&["--server", &url, "--server-ca", &not_pem, "broker", "list"]);
    assert!(bad_ca.stderr.contains("INVALID_SERVER_CA"), "{bad_ca:?}");

    let stopped = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().expect("kill");
    assert!(stopped.success());
    assert_eq!(server.wait().expect("server exits").code(), Some(0));
}

#[test]
fn serve_refuses_a_key_that_is_not_a_key_before_opening_anything() {
    let sandbox = Sandbox::new();
    let (_, cert, _) = certificates(&sandbox, "https-bad");
    let key = sandbox.write("wrong-key.pem", "-----BEGIN NOTHING-----\nAAAA\n-----END NOTHING-----\n");
    let run = sandbox.run(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &key]);
    let failed = run.failed(1);
    assert!(failed.starts_with("error: TLS_FAILED: --tls-key wrong-key.pem"), "{failed}");
    assert!(!sandbox.path().join("registry.db").exists(), "nothing is opened on a bad certificate");
    let lone = sandbox.run(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", &cert]);
    assert_ne!(lone.code, Some(0), "--tls-cert needs --tls-key: {lone:?}");
}

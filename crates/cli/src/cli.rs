//! The command line: global options, commands and their arguments.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where the registry lives when `--registry` is not given.
pub const DEFAULT_REGISTRY: &str = "./polybus.db";
/// Where `polybus serve` listens when `--listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// polybus: one interface for every message broker, chosen per environment.
#[derive(Debug, Parser)]
#[command(name = "polybus", version, propagate_version = true)]
pub struct Cli {
    /// Registry to use: a file path or `sqlite://PATH`.
    #[arg(long, global = true, env = "POLYBUS_REGISTRY", default_value = DEFAULT_REGISTRY)]
    pub registry: String,
    /// Data folder: relative file paths in definitions (the embedded broker's `path`, Pub/Sub's
    /// `keyFilename`) and the default broker file resolve against it, never the working directory;
    /// `serve` keeps every file a definition names inside it [default: `polybus-data` beside the
    /// registry]
    #[arg(long, global = true, env = "POLYBUS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Work through a polybus server's HTTP API at this URL (e.g. `http://127.0.0.1:8080`)
    /// instead of a local registry.
    #[arg(long, global = true, env = "POLYBUS_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// PEM file of the CA certificates to trust for an `https://` `--server` instead of the
    /// system's roots (a server with a private or self-signed certificate).
    #[arg(long, global = true, env = "POLYBUS_SERVER_CA", value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    /// API key for `--server` (better given as `POLYBUS_API_KEY`, which other users cannot see).
    #[arg(long, global = true, env = "POLYBUS_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<crate::remote::ApiKey>,
    /// Key file of the registry's `$Secret{name}` store (default: `polybus-secrets.key` beside a
    /// SQLite registry; a PostgreSQL registry needs one, shared by every server replica).
    #[arg(long, global = true, env = "POLYBUS_SECRETS_KEY_FILE", value_name = "FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage broker definitions.
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// Manage topics (`broker-tag:topic-tag`).
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Publish a message (or several copies) to a topic in an env.
    Publish(PublishArgs),
    /// Consume messages of a topic in an env as a member of a group, acking each once printed.
    Consume(ConsumeArgs),
    /// Dead letters of a topic in an env: list, show, send back (redrive) or delete (purge).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Consumer groups of a topic in an env: members, pending, lag and oldest unacked age.
    Groups(GroupsArgs),
    /// Idempotency keys of a topic in an env: which message a key was published as.
    #[command(subcommand)]
    Idempotency(IdempotencyCommand),
    /// Move a consumer group back to the beginning or to a time (brokers that retain messages).
    Replay(crate::commands::replay::ReplayArgs),
    /// Read stored messages by id, key and time, oldest first (brokers that retain messages).
    Messages(crate::commands::replay::MessagesArgs),
    /// Scheduled publishing: jobs that publish at a time, every interval or on a cron schedule.
    #[command(subcommand)]
    Job(crate::commands::job::JobCommand),
    /// Set up a local broker and topic, publish and consume a few messages, show what to try next.
    Quickstart,
    /// Run the HTTP server: API, metrics, OpenAPI document and dashboard, over `--registry`;
    /// definitions sent to it may name files only inside `--data-dir`.
    Serve(ServeArgs),
    /// Manage the server's API keys (stored hashed in the registry).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage secrets for `$Secret{name}` references: stored encrypted, never shown again.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Measure publish and consume+ack throughput and publish→deliver latency on a topic.
    Bench(crate::commands::bench::BenchArgs),
    /// Print the JSON Schema of broker or topic definitions, for editors that validate YAML
    /// (each env's `config` as its broker type's connector describes it).
    Schema {
        /// Which definitions.
        #[arg(value_enum)]
        of: SchemaOf,
    },
}

/// The definitions `polybus schema` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemaOf {
    /// Broker definitions (`broker.yaml`).
    Broker,
    /// Topic definitions (`topic.yaml`).
    Topic,
}

impl Command {
    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Broker(_) => "broker",
            Command::Topic(_) => "topic",
            Command::Publish(_) => "publish",
            Command::Consume(_) => "consume",
            Command::Dlq(_) => "dlq",
            Command::Groups(_) => "groups",
            Command::Idempotency(_) => "idempotency",
            Command::Replay(_) => "replay",
            Command::Messages(_) => "messages",
            Command::Job(_) => "job",
            Command::Quickstart => "quickstart",
            Command::Serve(_) => "serve",
            Command::Key(_) => "key",
            Command::Secret(_) => "secret",
            Command::Bench(_) => "bench",
            Command::Schema { .. } => "schema",
        }
    }

    /// Log level when `RUST_LOG` is not set: a server logs its requests.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

/// `polybus serve …`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "POLYBUS_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// How long a job run this server claimed is held: if the server dies, another replica on
    /// the same registry takes the run over after this.
    #[arg(long, env = "POLYBUS_JOB_LEASE", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub job_lease: std::time::Duration,
    /// Only `${VAR}` references whose name starts with this resolve in broker configs; repeat
    /// for several (comma-separated in the variable). An empty prefix lets anyone who can write
    /// a definition read every variable of the server: do not.
    #[arg(
        long = "secret-env-prefix",
        env = "POLYBUS_SECRET_ENV_PREFIX",
        value_name = "PREFIX",
        value_delimiter = ',',
        default_value = polybus::DEFAULT_ENV_PREFIX
    )]
    pub secret_env_prefixes: Vec<String>,
    /// Serve HTTPS with this PEM certificate chain (with `--tls-key`).
    #[arg(long, env = "POLYBUS_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "POLYBUS_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log lines as text, or as one JSON object per line with fields kept apart.
    #[arg(long, env = "POLYBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP (HTTP/protobuf) to this collector, e.g. `http://127.0.0.1:4318`
    /// (`/v1/traces` is added); off when not given.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// How `serve` writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

/// `polybus secret …`
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret (create or replace); the value is read from stdin, or asked for without echo
    /// on a terminal, never from the command line. Use it in configs as `$Secret{NAME}`.
    Set {
        /// The name: 1 to 64 of `A-Z a-z 0-9 _ -`.
        name: String,
    },
    /// List the secrets: names and times, never values.
    List,
    /// Delete a secret; definitions that refer to it fail to connect from then on.
    Delete {
        /// The name.
        name: String,
    },
}

/// `polybus key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key and print it on stdout; it is shown only this once.
    Create {
        /// Unique name, e.g. `ci` or `dashboard`.
        #[arg(long)]
        name: String,
        /// The key may read (and test connections) but not create, change, delete, publish,
        /// consume or ack.
        #[arg(long)]
        read_only: bool,
    },
    /// List the API keys: name, prefix, access, creation time.
    List,
    /// Revoke an API key; servers refuse it within a second.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// `polybus broker …`
#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Create a broker from a YAML or JSON file.
    Create(FileArg),
    /// Update a broker with a patch file (`name`, `description`, `envs`, `removeEnvs`, `version`).
    Update {
        /// The broker's tag.
        tag: String,
        /// The patch.
        #[command(flatten)]
        file: FileArg,
    },
    /// Show a broker, secrets redacted.
    Get {
        /// The broker's tag.
        tag: String,
    },
    /// List the brokers.
    List,
    /// Delete a broker.
    Delete {
        /// The broker's tag.
        tag: String,
        /// Also delete the broker's topics.
        #[arg(long)]
        force: bool,
    },
    /// Connect to a broker env and ping it.
    Test {
        /// The broker's tag.
        tag: String,
        /// The env to test.
        #[arg(long)]
        env: String,
    },
}

/// `polybus topic …`
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic from a YAML or JSON file.
    Create(FileArg),
    /// Show a topic and the native names it maps to in each env.
    Get {
        /// The event, `broker-tag:topic-tag`.
        event: String,
    },
    /// List the topics, of every broker or of one.
    List {
        /// Only the topics of this broker.
        broker: Option<String>,
    },
    /// Update a topic with a patch file.
    Update {
        /// The event, `broker-tag:topic-tag`.
        event: String,
        /// The patch.
        #[command(flatten)]
        file: FileArg,
    },
    /// Delete a topic.
    Delete {
        /// The event, `broker-tag:topic-tag`.
        event: String,
    },
}

/// A definition file argument.
#[derive(Debug, Args)]
pub struct FileArg {
    /// YAML or JSON file; `-` reads stdin.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
}

/// `polybus publish …`
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The env to publish in.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// The payload as text (default: read from stdin).
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Read the payload from this file.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Ordering / partition key.
    #[arg(long)]
    pub key: Option<String>,
    /// A header, `NAME=VALUE`; repeat for several.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Content type of the payload, e.g. `application/json`.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Deliver no earlier than this long after publishing, e.g. `30s`.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Publish this many copies, each with its own id.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Publish at most once with this key within the topic's `idempotencyWindow` (default
    /// 24h): a later publish with it is not sent and prints the first message's id.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// `polybus idempotency …`
#[derive(Debug, Subcommand)]
pub enum IdempotencyCommand {
    /// Show which message an idempotency key was published as (pending or published, since
    /// and until when), or that it is free.
    Check {
        /// The env.
        #[arg(long)]
        env: String,
        /// The event, `broker-tag:topic-tag`.
        event: String,
        /// The idempotency key.
        key: String,
    },
}

/// `polybus groups …`
#[derive(Debug, Args)]
pub struct GroupsArgs {
    /// The env.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
}

/// Which dead letters a `polybus dlq` command acts on.
#[derive(Debug, Args)]
pub struct DlqTarget {
    /// The env.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// Only those the consumer group of this name gave up on.
    #[arg(long)]
    pub group: Option<String>,
    /// Only those whose reason contains this text.
    #[arg(long)]
    pub reason: Option<String>,
}

/// `polybus dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters with their reason, attempts, group and time; they stay where they are.
    List {
        /// The topic and filters.
        #[command(flatten)]
        target: DlqTarget,
        /// List at most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
        limit: u64,
    },
    /// Show one dead letter whole.
    Show {
        /// The env.
        #[arg(long)]
        env: String,
        /// The event, `broker-tag:topic-tag`.
        event: String,
        /// The message id.
        id: String,
    },
    /// Publish dead letters back to their topic (same id, payload, key and headers), removing
    /// each once the broker confirmed its copy: all of them, or those the options select.
    Redrive {
        /// The topic and filters.
        #[command(flatten)]
        target: DlqTarget,
        /// Only these message ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ids: Vec<String>,
    },
    /// Delete dead letters: all of them, or those the options select.
    Purge {
        /// The topic and filters.
        #[command(flatten)]
        target: DlqTarget,
        /// Only these message ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ids: Vec<String>,
    },
}

/// `polybus consume …`
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The env to consume in.
    #[arg(long)]
    pub env: String,
    /// The event, `broker-tag:topic-tag`.
    pub event: String,
    /// Consumer group; members of a group share its messages.
    #[arg(long)]
    pub group: String,
    /// Stop after this many messages (default: run until Ctrl-C).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop after this long, e.g. `10s`; with `--count`, exit code 3 when fewer arrived by then.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

pub(crate) fn parse_header(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{value}` is not a header: expected NAME=VALUE")),
    }
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("`{value}` is not a duration like `10s` or `1m`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_split_on_the_first_equals_sign() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }

    #[test]
    fn secret_env_prefixes_default_repeat_and_split() {
        let prefixes = |args: &[&str]| match Cli::try_parse_from([&["polybus", "serve"], args].concat()) {
            Ok(Cli { command: Command::Serve(serve), .. }) => serve.secret_env_prefixes,
            other => panic!("{other:?}"),
        };
        assert_eq!(prefixes(&[]), ["POLYBUS_BROKER_"]);
        assert_eq!(
            prefixes(&["--secret-env-prefix", "A_,B_", "--secret-env-prefix", "C_"]),
            ["A_", "B_", "C_"]
        );
        assert_eq!(prefixes(&["--secret-env-prefix", ""]), [""]);
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

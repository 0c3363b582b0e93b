//! One module per command; each prints its result and returns a [`CliResult`].

pub mod bench;
mod broker;
mod consume;
mod dlq;
mod groups;
pub mod job;
pub use dlq::Act as DlqAct;
mod idempotency;
mod key;
mod publish;
mod quickstart;
pub mod replay;
mod secret;
mod serve;
mod topic;

use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use polybus::{Bus, FilePolicy, Registry, SecretPolicy};

use crate::cli::{Cli, Command, Format, SchemaOf};
use crate::failure::{CliResult, Failure};
use crate::output;
use crate::remote::Client;

/// What every command needs: where the registry is (or the server, with `--server`) and how
/// to print.
pub struct Context {
    /// The registry URL, as given.
    pub registry_url: String,
    /// The data folder: `--data-dir`, or `polybus-data` beside the registry.
    pub data_dir: PathBuf,
    /// `--data-dir` as given, to repeat it in the commands shown to the user.
    pub data_dir_given: bool,
    /// Output format.
    pub format: Format,
    /// The server to work through, with `--server`; `None` works on the local registry.
    pub remote: Option<Client>,
    /// `--secrets-key-file`, when given.
    pub secrets_key_file: Option<PathBuf>,
}

/// Where a command's data comes from: the local registry and brokers, or a server.
pub enum Source<'a> {
    /// The registry at `--registry`, and the brokers reached from this process.
    Local,
    /// The server at `--server`.
    Remote(&'a Client),
}

impl Context {
    /// Where this command's data comes from.
    pub fn source(&self) -> Source<'_> {
        match &self.remote {
            Some(client) => Source::Remote(client),
            None => Source::Local,
        }
    }

    /// Opens the registry, validating definitions through the connectors of this build.
    pub async fn registry(&self) -> CliResult<Registry> {
        Ok(Registry::open(&self.registry_url).await?.with_kinds(polybus::default_kinds()))
    }

    /// Opens the registry and a bus over it: every `${VAR}` of this process resolves, and
    /// `$Secret{..}` when the registry's key file exists.
    pub async fn bus(&self) -> CliResult<Bus> {
        Ok(self.bus_over(self.registry().await?))
    }

    /// A bus over `registry`: files anywhere (relative ones in the data folder), every `${VAR}`
    /// of this process, and `$Secret{..}` when the registry's key file exists.
    pub fn bus_over(&self, registry: Registry) -> Bus {
        let policy = SecretPolicy::any_env().with_store(secret::bus_store(self, &registry));
        Bus::builder(registry).secrets(policy).files(FilePolicy::local(&self.data_dir)).build()
    }

    /// True for JSON output.
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }
}

/// Runs the command the user asked for.
pub async fn run(cli: Cli) -> CliResult {
    let remote = match &cli.server {
        Some(server) if !server.trim().is_empty() => {
            if matches!(
                cli.command,
                Command::Quickstart | Command::Serve(_) | Command::Key(_) | Command::Bench(_)
            ) {
                let name = cli.command.name();
                return Err(Failure::new(
                    "REMOTE_UNSUPPORTED",
                    format!(
                        "`polybus {name}` works on a local registry only, not through a server: \
                         unset --server / POLYBUS_SERVER to run it"
                    ),
                ));
            }
            Some(Client::new(server, cli.api_key.as_ref(), cli.server_ca.as_deref())?)
        }
        _ => None,
    };
    let data_dir_given = cli.data_dir.is_some();
    let data_dir = cli.data_dir.unwrap_or_else(|| polybus::files::data_dir_beside(&cli.registry));
    let ctx = Context {
        registry_url: cli.registry,
        data_dir,
        data_dir_given,
        format: cli.output,
        remote,
        secrets_key_file: cli.secrets_key_file,
    };
    match cli.command {
        Command::Broker(command) => broker::run(&ctx, command).await,
        Command::Topic(command) => topic::run(&ctx, command).await,
        Command::Publish(args) => publish::run(&ctx, args).await,
        Command::Consume(args) => consume::run(&ctx, args).await,
        Command::Dlq(command) => dlq::run(&ctx, command).await,
        Command::Groups(args) => groups::run(&ctx, args).await,
        Command::Idempotency(command) => idempotency::run(&ctx, command).await,
        Command::Job(command) => job::run(&ctx, command).await,
        Command::Quickstart => quickstart::run(&ctx).await,
        Command::Serve(args) => serve::run(&ctx, args).await,
        Command::Key(command) => key::run(&ctx, command).await,
        Command::Secret(command) => secret::run(&ctx, command).await,
        Command::Bench(args) => bench::run(&ctx, args).await,
        Command::Replay(args) => replay::replay(&ctx, args).await,
        Command::Messages(args) => replay::messages(&ctx, args).await,
        Command::Schema { of } => output::json(&match of {
            SchemaOf::Broker => polybus::broker_schema(),
            SchemaOf::Topic => polybus::topic_schema(),
        }),
    }
}

/// A progress bar of `total` steps on stderr, hidden unless stderr is a terminal.
pub fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(total, target);
    let template = if total.is_some() {
        "{msg} {wide_bar} {human_pos}/{human_len} ({eta} left)"
    } else {
        "{spinner} {msg}: {human_pos} messages ({elapsed})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}

/// Closes the bus, flushing what is still to be published.
pub async fn close(bus: &Bus) -> CliResult {
    Ok(bus.close().await?)
}

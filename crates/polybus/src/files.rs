//! The files a broker definition names (the embedded broker's `path`, Pub/Sub's `keyFilename`,
//! Kafka's file properties) and where they may be.
//!
//! Every relative path resolves against one folder, the *data folder*, never the process's working
//! directory. A server confines definitions to it: only relative paths inside it, no `..`, no
//! symlink leading out, no file polybus did not create, no Kafka property naming a file, library
//! or command. The local CLI and the library keep the freedom to name any path.

use std::path::{Component, Path, PathBuf};

use polybus_core::{Broker, BrokerEnv, Error, Result, ValidationError};
use serde_json::Value;

/// Name of the data folder placed beside a SQLite registry (or in the working directory for
/// PostgreSQL).
pub const DATA_DIR_NAME: &str = "polybus-data";

#[cfg(feature = "embedded")]
use polybus_embedded::DEFAULT_PATH as DEFAULT_BROKER_FILE;
/// The embedded broker's file when an env names none.
#[cfg(not(feature = "embedded"))]
const DEFAULT_BROKER_FILE: &str = "polybus-broker.db";

/// Endings a confined broker file may have, so that `path` cannot probe or clobber other files.
// The broker types whose config names files (the names definitions use; their adapters may not
// be compiled in).
const EMBEDDED: &str = "embedded";
const GOOGLE_PUBSUB: &str = "google_pubsub";
const KAFKA: &str = "kafka";

/// The TLS block's fields that name files, on every broker type.
const TLS_FILE_FIELDS: [&str; 3] = ["caFile", "certFile", "keyFile"];

const BROKER_FILE_EXTENSIONS: [&str; 3] = ["db", "sqlite", "sqlite3"];

/// Kafka (librdkafka) properties that load a library or run a command.
const KAFKA_CODE_PROPERTIES: [&str; 5] = [
    "plugin.library.paths",
    "sasl.kerberos.kinit.cmd",
    "ssl.engine.location",
    "ssl.engine.id",
    "ssl.providers",
];

/// The data folder beside the registry a URL names: `polybus-data` in a SQLite registry's
/// folder, `./polybus-data` for PostgreSQL.
pub fn data_dir_beside(registry_url: &str) -> PathBuf {
    if registry_url.starts_with("postgres://") || registry_url.starts_with("postgresql://") {
        return PathBuf::from(".").join(DATA_DIR_NAME);
    }
    let file = Path::new(registry_url.strip_prefix("sqlite://").unwrap_or(registry_url));
    let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    folder.join(DATA_DIR_NAME)
}

/// Where the files a broker definition names may be: resolved against `base`, and with
/// `confined`, only inside it. Give it to [`crate::BusBuilder::files`].
#[derive(Debug, Clone)]
pub struct FilePolicy {
    base: PathBuf,
    confined: bool,
}

impl Default for FilePolicy {
    /// Relative paths against the working directory, any path allowed (what a library user
    /// who says nothing gets).
    fn default() -> Self {
        FilePolicy::local(".")
    }
}

/// How a file is used, which decides what is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// The embedded broker's SQLite file: created when missing, opened only when polybus made it.
    BrokerFile,
    /// A key read at connect time; through a server, every problem with it reads the same.
    KeyFile,
}

/// When a check runs: on a definition being written, or on connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Write,
    Connect,
}

impl FilePolicy {
    /// Any path allowed; relative ones resolve against `base` (the local CLI, the library).
    pub fn local(base: impl Into<PathBuf>) -> Self {
        FilePolicy { base: base.into(), confined: false }
    }

    /// Only relative paths inside `data_dir`, to files polybus created (a server).
    pub fn confined(data_dir: impl Into<PathBuf>) -> Self {
        FilePolicy { base: data_dir.into(), confined: true }
    }

    /// The folder relative paths resolve against.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// True when definitions may name only files inside [`FilePolicy::base`].
    pub fn is_confined(&self) -> bool {
        self.confined
    }

    /// Checks the files `broker` names before it is stored, so a definition a server would
    /// refuse at connect time is refused when written (`VALIDATION_FAILED` naming env and field).
    pub async fn check_broker(&self, broker: &Broker) -> Result<()> {
        self.check_envs(&broker.envs).await
    }

    /// Checks the files the given envs name, as [`FilePolicy::check_broker`] does.
    pub async fn check_envs(&self, envs: &[BrokerEnv]) -> Result<()> {
        if !self.confined {
            return Ok(());
        }
        let policy = self.clone();
        let envs = envs.to_vec();
        blocking(move || {
            envs.iter().try_for_each(|env| policy.place_all(env, env.config.clone(), Stage::Write).map(drop))
        })
        .await
    }

    /// The config to connect `env` with: `resolved` (its config with secrets resolved) with every
    /// file it names made absolute, after the policy's checks.
    pub(crate) async fn connect_config(&self, env: &BrokerEnv, resolved: Value) -> Result<Value> {
        let policy = self.clone();
        let env = env.clone();
        blocking(move || policy.place_all(&env, resolved, Stage::Connect)).await
    }

    /// Through a server, a key file that cannot be used gives one answer whatever the reason,
    /// so that a key holder cannot learn which files exist.
    pub(crate) fn conceal(&self, env: &BrokerEnv, error: Error) -> Error {
        match error {
            Error::Validation(invalid)
                if self.confined
                    && env.broker_type.as_str() == GOOGLE_PUBSUB
                    && invalid.field == "config.keyFilename" =>
            {
                let written = env.config.get("keyFilename").and_then(Value::as_str).unwrap_or_default();
                unusable_key_file(&env.slug, written).into()
            }
            Error::Validation(invalid)
                if self.confined
                    && TLS_FILE_FIELDS.iter().any(|name| invalid.field == format!("config.tls.{name}")) =>
            {
                let name = invalid.field.trim_start_matches("config.tls.");
                let written = env.config.get("tls").and_then(|t| t.get(name)).and_then(Value::as_str);
                unusable_file(&env.slug, &invalid.field, written.unwrap_or_default()).into()
            }
            other => other,
        }
    }

    fn place_all(&self, env: &BrokerEnv, mut config: Value, stage: Stage) -> Result<Value> {
        match env.broker_type.as_str() {
            EMBEDDED => {
                if !config.is_object() {
                    config = Value::Object(Default::default());
                }
                let written = env.config.get("path").and_then(Value::as_str);
                let value = config.get("path").and_then(Value::as_str).filter(|p| !p.trim().is_empty());
                let (written, value) = match value {
                    Some(value) => (written.unwrap_or(value), value),
                    None => (DEFAULT_BROKER_FILE, DEFAULT_BROKER_FILE),
                };
                let placed = self.place(&env.slug, "path", written, value, Use::BrokerFile, stage)?;
                config["path"] = Value::String(placed.to_string_lossy().into_owned());
            }
            GOOGLE_PUBSUB => {
                let written = env.config.get("keyFilename").and_then(Value::as_str);
                if let Some(value) = config.get("keyFilename").and_then(Value::as_str) {
                    let written = written.unwrap_or(value);
                    let placed = self.place(&env.slug, "keyFilename", written, value, Use::KeyFile, stage)?;
                    config["keyFilename"] = Value::String(placed.to_string_lossy().into_owned());
                }
            }
            KAFKA => self.place_kafka_properties(&env.slug, &mut config)?,
            _ => {}
        }
        self.place_tls_files(env, &mut config, stage)?;
        Ok(config)
    }

    /// The files of the TLS block every broker type has (`tls.caFile`, `tls.certFile`,
    /// `tls.keyFile`): read at connect time, so checked as key files are.
    fn place_tls_files(&self, env: &BrokerEnv, config: &mut Value, stage: Stage) -> Result<()> {
        for name in TLS_FILE_FIELDS {
            let written = env.config.get("tls").and_then(|t| t.get(name)).and_then(Value::as_str);
            let Some(value) = config.get("tls").and_then(|t| t.get(name)).and_then(Value::as_str) else {
                continue;
            };
            let written = written.unwrap_or(value);
            let field = format!("tls.{name}");
            let placed = self.place(&env.slug, &field, written, value, Use::KeyFile, stage)?;
            config["tls"][name] = Value::String(placed.to_string_lossy().into_owned());
        }
        Ok(())
    }

    /// Kafka properties: through a server none may name a file, library or command (the
    /// certificates go inline, `ssl.ca.pem`…); locally, relative file paths resolve against the base.
    fn place_kafka_properties(&self, env: &str, config: &mut Value) -> Result<()> {
        let Some(properties) = config.get_mut("properties").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        for (name, value) in properties.iter_mut() {
            let normalized = name.to_ascii_lowercase().replace('_', ".");
            let names_file = normalized.ends_with(".location")
                || normalized.ends_with(".file")
                || normalized == "sasl.kerberos.keytab";
            let field = format!("config.properties.{name}");
            if self.confined && KAFKA_CODE_PROPERTIES.contains(&normalized.as_str()) {
                return Err(ValidationError::in_env(
                    env,
                    field,
                    "loads a library or runs a command on the server; a definition sent to a server may not set it",
                )
                .into());
            }
            if self.confined && names_file {
                return Err(ValidationError::in_env(
                    env,
                    field,
                    "names a file on the server, which a definition sent to a server may not do; give \
                     certificates and keys inline with the matching `.pem` property (e.g. `ssl.ca.pem`)",
                )
                .into());
            }
            if let Value::String(path) = value
                && names_file
                && path != "probe"
                && Path::new(path.as_str()).is_relative()
            {
                *path = absolute(&self.base.join(path.as_str())).to_string_lossy().into_owned();
            }
        }
        Ok(())
    }

    /// Where the file `value` (written as `written`) of field `config.NAME` is, after the checks.
    fn place(
        &self,
        env: &str,
        name: &str,
        written: &str,
        value: &str,
        used: Use,
        stage: Stage,
    ) -> Result<PathBuf, ValidationError> {
        if !self.confined {
            let placed = absolute(&self.base.join(value));
            if used == Use::BrokerFile && stage == Stage::Connect {
                warn_if_left_behind(value, &placed);
            }
            return Ok(placed);
        }
        // A reference is known only when connecting; it is checked then.
        if stage == Stage::Write && written.contains("${") {
            return Ok(PathBuf::from(value));
        }
        let field = format!("config.{name}");
        let relative = relative_inside(value, used).map_err(|why| {
            ValidationError::in_env(
                env,
                &field,
                format!("`{written}` {why} (the data folder is the server's `--data-dir`)"),
            )
        })?;
        if used == Use::KeyFile && stage == Stage::Write {
            // Whether a key file exists is told only when connecting, in one indistinguishable answer.
            return Ok(relative);
        }
        let checked = self.inside(&relative, used, stage);
        match (checked, used) {
            (Ok(path), Use::BrokerFile) if stage == Stage::Connect => {
                warn_if_left_behind(value, &path);
                Ok(path)
            }
            (Ok(path), _) => Ok(path),
            (Err(_), Use::KeyFile) => Err(unusable_file(env, &field, written)),
            (Err(why), Use::BrokerFile) => {
                Err(ValidationError::in_env(env, field, format!("`{written}` {why}")))
            }
        }
    }

    /// The absolute path of `relative` inside the data folder, refusing symlinks that lead out,
    /// what is not a regular file, and (for broker files) files polybus did not create.
    fn inside(&self, relative: &Path, used: Use, stage: Stage) -> std::result::Result<PathBuf, String> {
        std::fs::create_dir_all(&self.base)
            .map_err(|e| format!("cannot be placed: the data folder cannot be created ({})", e.kind()))?;
        let base = self
            .base
            .canonicalize()
            .map_err(|e| format!("cannot be placed: the data folder cannot be resolved ({})", e.kind()))?;
        let joined = base.join(relative);
        // The nearest part of the path that exists decides where it really leads.
        let Some(existing) = joined.ancestors().find(|p| p.symlink_metadata().is_ok()) else {
            return Ok(joined);
        };
        let real = existing.canonicalize().map_err(|_| "is a symlink that leads nowhere".to_owned())?;
        if !real.starts_with(&base) {
            return Err("leads outside the data folder through a symlink".into());
        }
        if existing != joined {
            return Ok(joined);
        }
        let metadata = real.metadata().map_err(|e| format!("cannot be read ({})", e.kind()))?;
        if !metadata.is_file() {
            return Err("is not a regular file".into());
        }
        if used == Use::BrokerFile {
            if metadata.len() == 0 {
                return Err(
                    "is an existing empty file polybus did not create; delete it or name a new file".into()
                );
            }
            if stage == Stage::Write {
                check_broker_file(&real)?;
            }
        }
        Ok(real)
    }
}

/// `value` as a relative path that stays inside the folder it is joined to.
fn relative_inside(value: &str, used: Use) -> std::result::Result<PathBuf, &'static str> {
    if value.trim().is_empty() {
        return Err("must name a file");
    }
    if value.contains('\0') {
        return Err("must not contain a NUL character");
    }
    let path = Path::new(value);
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("must not climb out of the data folder with `..`"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("must be a path relative to the data folder, not an absolute path");
            }
        }
    }
    if relative.as_os_str().is_empty() || value.ends_with('/') {
        return Err("must name a file");
    }
    if used == Use::BrokerFile
        && !relative
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| BROKER_FILE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
    {
        return Err("must end in `.db`, `.sqlite` or `.sqlite3`");
    }
    Ok(relative)
}

/// Before the data folder, a relative broker file was opened in the working directory: when the
/// file is new in the data folder but one is there, say so rather than start an empty log silently.
fn warn_if_left_behind(value: &str, placed: &Path) {
    if Path::new(value).is_absolute() || placed.exists() {
        return;
    }
    let Ok(cwd) = std::env::current_dir() else { return };
    let old = cwd.join(value);
    if old.is_file() && absolute(&old) != placed {
        tracing::warn!(
            old = %old.display(),
            new = %placed.display(),
            "a broker file is no longer looked for in the working directory but in the data folder; \
             move the old file there to keep its messages"
        );
    }
}

/// The one answer for a key file that cannot be used, through a server.
/// The one answer a server gives about a file read at connect time (`config.keyFilename`,
/// `config.tls.caFile`…), whatever is wrong with it.
fn unusable_file(env: &str, field: &str, written: &str) -> ValidationError {
    let Some(name) = field.strip_prefix("config.tls.") else {
        return unusable_key_file(env, written);
    };
    let inline = name.trim_end_matches("File");
    ValidationError::in_env(
        env,
        field,
        format!(
            "`{written}` is not a usable PEM file in the data folder (missing, unreadable, or not PEM); put \
             it in the server's `--data-dir` or give it inline as `tls.{inline}`"
        ),
    )
}

fn unusable_key_file(env: &str, written: &str) -> ValidationError {
    ValidationError::in_env(
        env,
        "config.keyFilename",
        format!(
            "`{written}` is not a usable service-account key file in the data folder (missing, unreadable, \
             or not a key in JSON); put the key file in the server's `--data-dir` or give it inline as `credentials`"
        ),
    )
}

#[cfg(feature = "embedded")]
fn check_broker_file(path: &Path) -> std::result::Result<(), String> {
    match polybus_embedded::check_file(path) {
        Ok(()) => Ok(()),
        Err(Error::Validation(invalid)) => Err(invalid.message),
        Err(other) => Err(format!("cannot be checked: {other}")),
    }
}

#[cfg(not(feature = "embedded"))]
fn check_broker_file(_path: &Path) -> std::result::Result<(), String> {
    Ok(())
}

/// `path` made absolute against the working directory (as it is when that cannot be read).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Closed(format!("checking the files a definition names: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::BrokerType;

    #[test]
    fn the_data_folder_sits_beside_a_sqlite_registry() {
        assert_eq!(data_dir_beside("app/reg.db"), Path::new("app/polybus-data"));
        assert_eq!(data_dir_beside("sqlite:///srv/p/reg.db"), Path::new("/srv/p/polybus-data"));
        assert_eq!(data_dir_beside("polybus.db"), Path::new("./polybus-data"));
        assert_eq!(data_dir_beside("postgres://u@h/db"), Path::new("./polybus-data"));
    }

    #[test]
    fn only_relative_paths_that_stay_inside_pass() {
        assert_eq!(relative_inside("./a/b.db", Use::BrokerFile), Ok(PathBuf::from("a/b.db")));
        assert_eq!(relative_inside("k.json", Use::KeyFile), Ok(PathBuf::from("k.json")));
        for bad in ["/etc/x.db", "../x.db", "a/../../x.db", "", ".", "a/", "x.json", "x.db-wal"] {
            assert!(relative_inside(bad, Use::BrokerFile).is_err(), "{bad:?}");
        }
    }

    fn env(broker_type: BrokerType, config: Value) -> BrokerEnv {
        BrokerEnv { slug: "dev".into(), broker_type, config }
    }

    #[tokio::test]
    async fn locally_relative_paths_and_the_default_file_land_in_the_base() {
        let policy = FilePolicy::local("/srv/app/polybus-data");
        let embedded = env(BrokerType::from_static(EMBEDDED), serde_json::json!({}));
        let config = policy.connect_config(&embedded, serde_json::json!({})).await.expect("config");
        assert_eq!(config["path"], "/srv/app/polybus-data/polybus-broker.db");
        let elsewhere = serde_json::json!({"path": "/var/lib/b.db"});
        let config = policy.connect_config(&embedded, elsewhere).await.expect("config");
        assert_eq!(config["path"], "/var/lib/b.db", "the local CLI may name any path");

        let properties = serde_json::json!({"brokers": ["k:9092"], "properties":
            {"ssl.ca.location": "certs/ca.pem", "ssl.key.location": "/etc/k.pem", "https.ca.location": "probe",
             "linger.ms": "5"}});
        let kafka = env(BrokerType::from_static(KAFKA), properties.clone());
        let config = policy.connect_config(&kafka, properties).await.expect("config");
        let placed = &config["properties"];
        assert_eq!(placed["ssl.ca.location"], "/srv/app/polybus-data/certs/ca.pem");
        assert_eq!(placed["ssl.key.location"], "/etc/k.pem");
        assert_eq!(placed["https.ca.location"], "probe");
        assert_eq!(placed["linger.ms"], "5");
    }

    #[test]
    fn through_a_server_every_key_file_problem_reads_the_same() {
        let pubsub = env(
            BrokerType::from_static(GOOGLE_PUBSUB),
            serde_json::json!({"projectId": "p", "keyFilename": "k.json"}),
        );
        let not_found =
            Error::from(ValidationError::in_env("dev", "config.keyFilename", "cannot read: not found"));
        let confined = FilePolicy::confined("/srv/data").conceal(&pubsub, not_found);
        assert_eq!(confined.to_string(), Error::from(unusable_key_file("dev", "k.json")).to_string());
        let not_found =
            Error::from(ValidationError::in_env("dev", "config.keyFilename", "cannot read: not found"));
        let local = FilePolicy::local("/srv/data").conceal(&pubsub, not_found);
        assert!(local.to_string().contains("not found"), "the local CLI says what is wrong: {local}");
    }

    #[tokio::test]
    async fn tls_files_are_confined_on_every_broker_type_and_placed_locally() {
        let config =
            serde_json::json!({"host": "r", "tls": {"caFile": "certs/ca.pem", "keyFile": "/etc/k.pem"}});
        let redis = env(BrokerType::from_static("redis"), config.clone());
        let local =
            FilePolicy::local("/srv/app/polybus-data").connect_config(&redis, config).await.expect("config");
        assert_eq!(local["tls"]["caFile"], "/srv/app/polybus-data/certs/ca.pem");
        assert_eq!(local["tls"]["keyFile"], "/etc/k.pem", "the local CLI may name any path");

        let server = FilePolicy::confined("/srv/data");
        for (field, bad) in
            [("keyFile", "/etc/ssl/private/k.pem"), ("caFile", "../ca.pem"), ("certFile", "a/../../c.pem")]
        {
            let config = serde_json::json!({"host": "r", "tls": {field: bad}});
            let nats = env(BrokerType::from_static("nats"), config);
            let e = server.check_envs(std::slice::from_ref(&nats)).await.expect_err(bad);
            match e {
                Error::Validation(v) => assert_eq!(v.field, format!("config.tls.{field}"), "{v}"),
                other => panic!("{bad}: {other}"),
            }
        }
        let inside = env(BrokerType::from_static("nats"), serde_json::json!({"tls": {"caFile": "ca.pem"}}));
        server
            .check_envs(std::slice::from_ref(&inside))
            .await
            .expect("a relative file inside the data folder");

        let bad_pem =
            Error::from(ValidationError::in_env("dev", "config.tls.caFile", "holds no PEM certificate"));
        let concealed = server.conceal(&inside, bad_pem).to_string();
        assert!(concealed.contains("not a usable PEM file") && concealed.contains("tls.ca`"), "{concealed}");
    }
}

//! From a `PubsubConfig` to what the clients are built with: project, endpoint, credentials.

use std::sync::Arc;

use crate::kind::PubsubConfig;
use async_trait::async_trait;
use gcloud_gax::conn::Environment;
use gcloud_pubsub::client::ClientConfig;
use google_cloud_auth::credentials::{self, CacheableResource, Credentials, anonymous, service_account};
use polybus_core::{Error, Op, Result, ValidationError};
use token_source::{TokenSource, TokenSourceProvider};
use tokio::io::AsyncReadExt;

/// The emulator's address (`host:port`), as Google's own tools read it.
pub const EMULATOR_HOST: &str = "PUBSUB_EMULATOR_HOST";

/// Where and how to connect.
pub struct Settings {
    /// GCP project id.
    pub project: String,
    /// Endpoint override (`http://…` for an emulator); `None` is Google's service.
    pub endpoint: Option<String>,
    /// Credentials to use; `None` is the client's default (application default credentials).
    pub credentials: Option<Credentials>,
}

impl Settings {
    /// Resolves `config` for `env`: the endpoint from `endpoint` or `PUBSUB_EMULATOR_HOST`;
    /// service-account credentials from `credentials` (inline JSON) or `keyFilename`;
    /// anonymous credentials for a plaintext (emulator) endpoint without a key.
    pub async fn resolve(config: &PubsubConfig, env: &str) -> Result<Settings> {
        if config.project_id.trim().is_empty() {
            return Err(ValidationError::in_env(env, "config.projectId", "a project id is required").into());
        }
        let endpoint = config
            .endpoint
            .clone()
            .filter(|e| !e.trim().is_empty())
            .or_else(|| std::env::var(EMULATOR_HOST).ok().filter(|h| !h.trim().is_empty()))
            .map(|e| endpoint_url(e.trim()));
        let key = match (&config.credentials, &config.key_filename) {
            (Some(inline), _) => Some((
                service_account_key(inline.as_bytes()).map_err(|why| {
                    invalid(env, "config.credentials", format!("not a service-account key: {why}"))
                })?,
                "config.credentials",
            )),
            (None, Some(path)) => Some((read_key_file(path, env).await?, "config.keyFilename")),
            (None, None) => None,
        };
        let credentials = match key {
            // The builder's own message may quote the key; the shape was checked above.
            Some((key, field)) => Some(service_account::Builder::new(key).build().map_err(|_| {
                invalid(env, field, "the service-account key was refused by Google's client library")
            })?),
            None if endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) => {
                Some(anonymous::Builder::new().build())
            }
            None => None,
        };
        Ok(Settings { project: config.project_id.clone(), endpoint, credentials })
    }

    /// The emulator's `host:port` when the endpoint is plaintext.
    fn emulator_host(&self) -> Option<&str> {
        let host = self.endpoint.as_deref()?.strip_prefix("http://")?;
        Some(host.trim_end_matches('/'))
    }

    /// The config of the client that pulls: the emulator, or Google's service (or the
    /// endpoint's host) with the same credentials the other clients use.
    pub fn pull_config(&self) -> Result<ClientConfig> {
        let environment = match self.emulator_host() {
            Some(host) => Environment::Emulator(host.to_owned()),
            None => {
                let credentials = match &self.credentials {
                    Some(c) => c.clone(),
                    None => credentials::Builder::default()
                        .build()
                        .map_err(|e| Error::transport(Op::Connect, "pubsub credentials", e))?,
                };
                Environment::GoogleCloud(Box::new(BearerTokens(Arc::new(Bearer(credentials)))))
            }
        };
        let mut config = ClientConfig {
            project_id: Some(self.project.clone()),
            environment,
            pool_size: 1,
            ..ClientConfig::default()
        };
        if let Some(host) = self.endpoint.as_deref().and_then(|e| e.strip_prefix("https://")) {
            config.endpoint = host.split('/').next().unwrap_or(host).to_owned();
        }
        Ok(config)
    }
}

/// Google's credentials as the `Authorization` header value the pull client asks for.
struct Bearer(Credentials);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(..)")
    }
}

#[async_trait]
impl TokenSource for Bearer {
    async fn token(&self) -> std::result::Result<String, Box<dyn std::error::Error + Send + Sync>> {
        match self.0.headers(http::Extensions::new()).await? {
            CacheableResource::New { data, .. } => data
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| "the credentials gave no authorization header".into()),
            CacheableResource::NotModified => Err("the credentials gave no token".into()),
        }
    }
}

#[derive(Debug)]
struct BearerTokens(Arc<Bearer>);

impl TokenSourceProvider for BearerTokens {
    fn token_source(&self) -> Arc<dyn TokenSource> {
        self.0.clone()
    }
}

/// `host:port` becomes `http://host:port` (an emulator speaks plaintext); URLs stay as they are.
fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") }
}

/// Largest key file read; a service-account key is about 2.4 KB.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Fields a service-account key has, each a string.
const KEY_FIELDS: [&str; 4] = ["client_email", "private_key_id", "private_key", "project_id"];

async fn read_key_file(path: &str, env: &str) -> Result<serde_json::Value> {
    let field = "config.keyFilename";
    let mut bytes = Vec::new();
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| invalid(env, field, format!("cannot read `{path}`: {}", e.kind())))?;
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| invalid(env, field, format!("cannot read `{path}`: {}", e.kind())))?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(invalid(env, field, format!("`{path}` is larger than a key file (64 KiB)")));
    }
    service_account_key(&bytes)
        .map_err(|why| invalid(env, field, format!("`{path}` is not a service-account key file: {why}")))
}

/// Parses a service-account key; the error says what is wrong with it, never what it holds.
fn service_account_key(bytes: &[u8]) -> std::result::Result<serde_json::Value, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("it is not JSON (syntax error at line {}, column {})", e.line(), e.column()))?;
    let object = value.as_object().ok_or("expected a JSON object")?;
    if object.get("type").is_some_and(|t| t != "service_account") {
        return Err("its `type` is not `service_account`".into());
    }
    if let Some(missing) =
        KEY_FIELDS.iter().find(|f| !object.get(**f).is_some_and(serde_json::Value::is_string))
    {
        return Err(format!("`{missing}` is missing or not a string"));
    }
    Ok(value)
}

fn invalid(env: &str, field: &str, message: impl Into<String>) -> Error {
    ValidationError::in_env(env, field, message).into()
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> PubsubConfig {
        polybus_core::config::parse(&json).expect("valid config")
    }

    #[tokio::test]
    async fn a_plaintext_endpoint_gets_anonymous_credentials() {
        let s = Settings::resolve(
            &config(serde_json::json!({"projectId": "p-1", "endpoint": "127.0.0.1:8085"})),
            "dev",
        )
        .await
        .expect("settings");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:8085"));
        assert!(s.credentials.is_some());
        let pull = s.pull_config().expect("pull config");
        assert!(matches!(pull.environment, Environment::Emulator(ref h) if h == "127.0.0.1:8085"));
    }

    #[tokio::test]
    async fn bad_inline_credentials_are_named_without_their_text() {
        let secret = "{not json but secret-material";
        let err =
            Settings::resolve(&config(serde_json::json!({"projectId": "p-1", "credentials": secret})), "dev")
                .await
                .err()
                .expect("an error");
        let text = err.to_string();
        assert!(text.contains("config.credentials"), "{text}");
        assert!(!text.contains("secret-material"), "{text}");
    }

    #[tokio::test]
    async fn a_missing_key_file_is_named() {
        let err = Settings::resolve(
            &config(serde_json::json!({"projectId": "p-1", "keyFilename": "/nonexistent/key.json"})),
            "prd",
        )
        .await
        .err()
        .expect("an error");
        let shown = err.to_string();
        assert!(shown.contains("/nonexistent/key.json"), "names the file: {err}");
    }

    #[tokio::test]
    async fn no_error_quotes_what_a_key_holds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cases = [
            "\"s3cret-string\"",
            "s3cret-text, not JSON",
            "[\"s3cret-item\"]",
            r#"{"type": "service_account", "client_email": ["s3cret-email"], "private_key": "s3cret-key"}"#,
            r#"{"type": "s3cret-type"}"#,
        ];
        for (i, content) in cases.iter().enumerate() {
            let path = dir.path().join(format!("key{i}.json"));
            std::fs::write(&path, content).expect("key file");
            for (field, config) in [
                ("config.keyFilename", serde_json::json!({"projectId": "p-1", "keyFilename": path})),
                ("config.credentials", serde_json::json!({"projectId": "p-1", "credentials": content})),
            ] {
                let err = Settings::resolve(&self::config(config), "dev").await.err().expect("an error");
                let Error::Validation(validation) = &err else { panic!("{content}: {err}") };
                assert_eq!(validation.field, field, "{err}");
                assert!(!format!("{err} {err:?}").contains("s3cret"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn a_key_shaped_file_gives_credentials() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.json");
        let key = serde_json::json!({"type": "service_account", "project_id": "p-1", "private_key_id": "k1",
            "private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
            "client_email": "sa@p-1.iam.gserviceaccount.com"});
        std::fs::write(&path, key.to_string()).expect("key file");
        let settings =
            Settings::resolve(&config(serde_json::json!({"projectId": "p-1", "keyFilename": path})), "dev")
                .await
                .expect("settings");
        assert!(settings.credentials.is_some());
    }
}

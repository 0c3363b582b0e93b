//! An SQS client from a broker env's config.

use crate::kind::SqsConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::{Credentials, Region};
use polybus_core::{Error, Result, ValidationError};

/// Builds a client: static credentials when the config has them, else the default AWS chain
/// (environment, profile, web identity, container and instance metadata).
pub async fn client(config: &SqsConfig, env: &str) -> Result<aws_sdk_sqs::Client> {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(config.region.clone()));
    match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => {
            loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "polybus-config"));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(missing(env, "secretAccessKey", "is required with accessKeyId"));
        }
        (None, Some(_)) => {
            return Err(missing(env, "accessKeyId", "is required with secretAccessKey"));
        }
    }
    if let Some(endpoint) = &config.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    Ok(aws_sdk_sqs::Client::new(&loader.load().await))
}

fn missing(env: &str, field: &str, message: &str) -> Error {
    Error::Validation(ValidationError::in_env(env, format!("config.{field}"), message))
}

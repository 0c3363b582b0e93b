//! SDK errors as polybus errors.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use polybus_core::{Error, Op};

/// A transport error for `op` on `queue` (a name or URL), with the SDK's whole error chain.
pub fn sqs(op: Op, queue: &str, e: impl std::error::Error) -> Error {
    Error::transport(op, format!("sqs {queue}"), DisplayErrorContext(e))
}

/// The SDK's whole error chain as text.
pub fn context(e: impl std::error::Error) -> String {
    DisplayErrorContext(e).to_string()
}

/// True when SQS answered that the queue does not exist.
pub fn is_missing_queue<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error()
        .and_then(ProvideErrorMetadata::code)
        .is_some_and(|code| code == "QueueDoesNotExist" || code.ends_with("NonExistentQueue"))
}

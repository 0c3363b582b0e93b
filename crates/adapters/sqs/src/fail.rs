//! SDK errors as polybus errors.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use polybus_core::{Error, FailureKind, Op};

/// A transport error for `op` on `queue` (a name or URL), with the SDK's whole error chain as
/// its message, the SDK's error as its cause and the kind its code or failure says.
pub fn sqs<E, R>(op: Op, queue: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let kind = failure_kind(&e);
    Error::transport(op, format!("sqs {queue}"), DisplayErrorContext(&e)).with_kind(kind).with_cause(e)
}

/// A request that could not be built (an SDK-side check of its fields) as an invalid one.
pub fn unbuilt(op: Op, queue: &str, e: aws_sdk_sqs::error::BuildError) -> Error {
    Error::transport(op, format!("sqs {queue}"), DisplayErrorContext(&e))
        .with_kind(FailureKind::Invalid)
        .with_cause(e)
}

/// The SDK's whole error chain as text.
pub fn context(e: impl std::error::Error) -> String {
    DisplayErrorContext(e).to_string()
}

/// True when SQS answered that the queue does not exist.
pub fn is_missing_queue<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(ProvideErrorMetadata::code).is_some_and(is_missing_queue_code)
}

fn is_missing_queue_code(code: &str) -> bool {
    code == "QueueDoesNotExist" || code.ends_with("NonExistentQueue")
}

/// What kind of failure `e` is: from how the request failed, or from SQS's error code.
pub fn failure_kind<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> FailureKind {
    match e {
        SdkError::TimeoutError(_) => FailureKind::Timeout,
        SdkError::DispatchFailure(failure) if failure.is_timeout() => FailureKind::Timeout,
        SdkError::DispatchFailure(failure) if failure.is_user() => FailureKind::Invalid,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => FailureKind::Unavailable,
        SdkError::ConstructionFailure(_) => FailureKind::Invalid,
        SdkError::ServiceError(service) => service.err().code().map_or(FailureKind::Unknown, code_kind),
        _ => FailureKind::Unknown,
    }
}

/// The kind of an SQS (or AWS-wide) error code.
fn code_kind(code: &str) -> FailureKind {
    match code {
        code if is_missing_queue_code(code) => FailureKind::NotFound,
        "AccessDenied"
        | "AccessDeniedException"
        | "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "InvalidSecurity"
        | "MissingAuthenticationToken"
        | "ExpiredToken"
        | "KmsAccessDenied" => FailureKind::Auth,
        "RequestThrottled"
        | "ThrottlingException"
        | "ServiceUnavailable"
        | "InternalError"
        | "InternalFailure"
        | "KmsThrottled"
        | "OverLimit"
        | "QueueDeletedRecently" => FailureKind::Unavailable,
        "BatchRequestTooLong" => FailureKind::TooLarge,
        "InvalidParameterValue"
        | "InvalidAttributeName"
        | "InvalidAttributeValue"
        | "InvalidMessageContents"
        | "InvalidBatchEntryId"
        | "BatchEntryIdsNotDistinct"
        | "TooManyEntriesInBatchRequest"
        | "EmptyBatchRequest"
        | "MissingParameter"
        | "UnsupportedOperation"
        | "QueueNameExists"
        | "QueueAlreadyExists"
        | "InvalidAddress"
        | "ReceiptHandleIsInvalid" => FailureKind::Invalid,
        _ => FailureKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(code_kind("AWS.SimpleQueueService.NonExistentQueue"), FailureKind::NotFound);
        assert_eq!(code_kind("QueueDoesNotExist"), FailureKind::NotFound);
        assert_eq!(code_kind("InvalidClientTokenId"), FailureKind::Auth);
        assert_eq!(code_kind("RequestThrottled"), FailureKind::Unavailable);
        assert_eq!(code_kind("BatchRequestTooLong"), FailureKind::TooLarge);
        assert_eq!(code_kind("InvalidParameterValue"), FailureKind::Invalid);
        assert_eq!(code_kind("SomethingNew"), FailureKind::Unknown);
    }
}

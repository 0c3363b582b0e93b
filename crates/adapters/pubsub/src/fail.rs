//! Client errors as polybus failure kinds, from their gRPC status code.

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::error::PublishError;
use polybus_core::FailureKind;

/// What kind of failure an error of the admin or publisher clients is.
pub(crate) fn failure_kind(e: &google_cloud_pubsub::Error) -> FailureKind {
    if let Some(status) = e.status() {
        code_kind(status.code)
    } else if let Some(http) = e.http_status_code() {
        http_kind(http)
    } else if e.is_timeout() {
        FailureKind::Timeout
    } else if e.is_authentication() {
        FailureKind::Auth
    } else if e.is_connect() || e.is_io() || e.is_transport() || e.is_exhausted() {
        FailureKind::Unavailable
    } else if e.is_binding() || e.is_serialization() {
        FailureKind::Invalid
    } else {
        FailureKind::Unknown
    }
}

/// What kind of failure an HTTP status of the REST admin clients is.
fn http_kind(status: u16) -> FailureKind {
    match status {
        401 | 403 => FailureKind::Auth,
        404 => FailureKind::NotFound,
        413 => FailureKind::TooLarge,
        408 | 504 => FailureKind::Timeout,
        429 | 502 | 503 => FailureKind::Unavailable,
        400..=499 => FailureKind::Invalid,
        _ => FailureKind::Unknown,
    }
}

/// What kind of failure a failed publish is.
pub(crate) fn publish_kind(e: &PublishError) -> FailureKind {
    match e {
        PublishError::Rpc(e) => failure_kind(e),
        _ => FailureKind::Unknown,
    }
}

/// What kind of failure a status of the pulling client (gRPC's own code type) is.
pub(crate) fn grpc_kind(code: gcloud_gax::grpc::Code) -> FailureKind {
    code_kind(Code::from(code as i32))
}

/// What kind of failure a gRPC status code is.
pub(crate) fn code_kind(code: Code) -> FailureKind {
    match code {
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => FailureKind::Unavailable,
        Code::DeadlineExceeded => FailureKind::Timeout,
        Code::Unauthenticated | Code::PermissionDenied => FailureKind::Auth,
        Code::NotFound => FailureKind::NotFound,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::Unimplemented => FailureKind::Invalid,
        _ => FailureKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_get_the_kind_of_their_status_or_failure() {
        use google_cloud_gax::error::rpc::Status;
        use google_cloud_pubsub::Error;
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        // What a ping of a closed port gives once the client's retries are spent.
        assert_eq!(failure_kind(&Error::exhausted(Error::connect(refused()))), FailureKind::Unavailable);
        assert_eq!(failure_kind(&Error::timeout(refused())), FailureKind::Timeout);
        let denied = Status::default().set_code(Code::PermissionDenied).set_message("no");
        assert_eq!(failure_kind(&Error::service(denied)), FailureKind::Auth);
        let missing = Error::http(404, Default::default(), bytes::Bytes::new());
        assert_eq!(failure_kind(&missing), FailureKind::NotFound);
        let paused = PublishError::OrderingKeyPaused;
        assert_eq!(publish_kind(&paused), FailureKind::Unknown);
    }

    #[test]
    fn both_clients_codes_give_the_same_kind() {
        use gcloud_gax::grpc::Code as Grpc;
        for (grpc, code) in [
            (Grpc::Unavailable, Code::Unavailable),
            (Grpc::DeadlineExceeded, Code::DeadlineExceeded),
            (Grpc::PermissionDenied, Code::PermissionDenied),
            (Grpc::NotFound, Code::NotFound),
            (Grpc::InvalidArgument, Code::InvalidArgument),
            (Grpc::Internal, Code::Internal),
        ] {
            assert_eq!(grpc_kind(grpc), code_kind(code), "{grpc:?}");
        }
        assert_eq!(grpc_kind(Grpc::Unauthenticated), FailureKind::Auth);
        assert_eq!(grpc_kind(Grpc::Internal), FailureKind::Unknown);
    }
}

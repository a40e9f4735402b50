//! API errors, classified by the body's `error.type` (so snapshot-required is told apart from
//! out-of-range), always carrying the server's `message` and `uuid`.

use std::time::Duration;

use super::types::ErrorBody;

/// What kind of failure the server reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerErrorKind {
    Validation,
    NotFound,
    OutOfRange,
    SnapshotRequired,
    Processing,
    RequestTypeForbidden,
    Other(String),
}

impl ServerErrorKind {
    fn from_type(t: &str) -> ServerErrorKind {
        match t {
            "ValidationError" => Self::Validation,
            "NotFoundError" => Self::NotFound,
            "OutOfRangeError" => Self::OutOfRange,
            "SnapshotRequiredError" => Self::SnapshotRequired,
            "ProcessingError" => Self::Processing,
            "RequestTypeForbidden" => Self::RequestTypeForbidden,
            other => Self::Other(other.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no DAP credentials: run `dap configure` once, or set DAP_CLIENT_ID and DAP_CLIENT_SECRET (or DAP_CLIENT_SECRET_FILE; --client-id and --client-secret also work)"
    )]
    MissingCredentials,
    #[error("authentication failed: {message} (uuid {uuid}); check DAP_CLIENT_ID and DAP_CLIENT_SECRET")]
    Authentication { message: String, uuid: String },
    #[error("the account cannot use DAP ({kind}): {message} (uuid {uuid})")]
    Account { kind: String, message: String, uuid: String },
    #[error("{message} (HTTP {status}, {kind:?}, uuid {uuid})")]
    Server { status: u16, kind: ServerErrorKind, message: String, uuid: String },
    #[error("unexpected HTTP {status} from {url}: {snippet}")]
    Unexpected { status: u16, url: String, snippet: String },
    #[error("request to {url} failed after {attempts} attempts: {detail}")]
    Transport { url: String, attempts: u32, detail: String },
    #[error("malformed response from {url}: {detail}")]
    Malformed { url: String, detail: String },
    /// The job ran and failed on DAP's side (`ProcessingError` and the like, usually transient),
    /// `attempts` times in a row.
    #[error(
        "job {id} failed on DAP's side (attempt {attempts}): {kind}: {message} (uuid {uuid}); such failures are usually transient: run the command again later"
    )]
    JobFailed { id: String, kind: String, message: String, uuid: String, attempts: u32 },
    #[error("job {id} did not finish within {waited:?}; it may still complete, rerun the command later to pick it up")]
    JobTimeout { id: String, waited: Duration },
}

impl crate::error::Classify for ApiError {
    /// The client itself retries what a retry may mend (429, 5xx, resets, failed jobs): what
    /// reaches its caller would fail the same way at once, except a job that timed out.
    fn retry(&self) -> crate::error::Retry {
        match self {
            ApiError::JobTimeout { .. } => crate::error::Retry::MayHelp,
            _ => crate::error::Retry::Useless,
        }
    }

    /// Errors that stop a multi-table run: nothing else can succeed with these credentials.
    fn is_fatal(&self) -> bool {
        matches!(self, ApiError::MissingCredentials | ApiError::Authentication { .. } | ApiError::Account { .. })
    }
}

impl ApiError {
    /// Builds the error for an error status with a JSON `error` body.
    pub fn from_body(status: u16, body: ErrorBody) -> ApiError {
        let kind = body.kind.unwrap_or_default();
        let message = body.message.unwrap_or_else(|| "no message".into());
        let uuid = body.uuid.unwrap_or_else(|| "none".into());
        match (status, kind.as_str()) {
            (401, _) | (_, "AuthenticationError") => ApiError::Authentication { message, uuid },
            (_, "AccountDisabled" | "AccountNotOnboarded" | "AccountUnderMaintenance") => {
                ApiError::Account { kind, message, uuid }
            }
            _ => ApiError::Server { status, kind: ServerErrorKind::from_type(&kind), message, uuid },
        }
    }

    pub fn server_kind(&self) -> Option<&ServerErrorKind> {
        match self {
            ApiError::Server { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// Why an exchange with a server failed, said by its root cause with what to check (reqwest's own
/// message is only "error sending request"), and whether trying again can help.
pub fn transport_failure(e: &reqwest::Error) -> (String, Retryable) {
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let cause = root.to_string();
    let lower = cause.to_lowercase();
    let io_kind = root.downcast_ref::<std::io::Error>().map(|io| io.kind());
    if e.is_timeout() {
        ("no answer in time (timed out); check the network and any proxy".into(), Retryable::Yes)
    } else if e.is_builder() {
        (format!("the URL cannot be used ({cause}); check --base-url / DAP_API_URL"), Retryable::No)
    } else if lower.contains("dns") || lower.contains("lookup address") || lower.contains("name or service") {
        (format!("the host name does not resolve ({cause}); check the URL and the network's DNS"), Retryable::Briefly)
    } else if io_kind == Some(std::io::ErrorKind::ConnectionRefused) {
        (
            format!("connection refused ({cause}): nothing listens at that address; check the URL's host and port"),
            Retryable::Briefly,
        )
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
    {
        (
            format!(
                "the TLS handshake failed ({cause}); check that the URL's scheme and port are the server's (https), the system clock, and any proxy that intercepts TLS"
            ),
            Retryable::No,
        )
    } else if e.is_connect() {
        (format!("cannot connect ({cause}); check the URL and the network"), Retryable::Yes)
    } else {
        (cause, Retryable::Yes)
    }
}

/// Whether a failed exchange is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retryable {
    Yes,
    /// Once more after a short pause, then give up: a name that does not resolve or a port
    /// where nothing listens is almost always a wrong URL, rarely a server restarting.
    Briefly,
    No,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Classify;

    fn body(kind: &str) -> ErrorBody {
        ErrorBody { kind: Some(kind.into()), uuid: Some("u-1".into()), message: Some("boom".into()) }
    }

    #[test]
    fn classifies_by_type_not_shape() {
        let e = ApiError::from_body(400, body("SnapshotRequiredError"));
        assert_eq!(e.server_kind(), Some(&ServerErrorKind::SnapshotRequired));
        assert_eq!(ApiError::from_body(400, body("OutOfRangeError")).server_kind(), Some(&ServerErrorKind::OutOfRange));
        assert!(ApiError::from_body(403, body("AccountDisabled")).is_fatal());
        assert!(ApiError::from_body(401, body("AuthenticationError")).is_fatal());
        assert!(!ApiError::from_body(404, body("NotFoundError")).is_fatal());
        let shown = ApiError::from_body(500, body("ProcessingError")).to_string();
        assert!(shown.contains("boom") && shown.contains("u-1"), "{shown}");
    }
}

//! The DAP Query API client: authentication with early refresh, retries with backoff and
//! `Retry-After`, job-creation pacing, job polling with backoff and a deadline, object URLs.

mod client;
mod error;
mod pacer;
pub mod types;

pub use client::{Client, ClientConfig, CompleteJob, JobStage, RetryPolicy, redact_url};
pub use error::{ApiError, Retryable, ServerErrorKind, transport_failure};

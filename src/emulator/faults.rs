//! Injected faults: the next N matching requests misbehave the way the real API and its object
//! store do.

use serde::{Deserialize, Serialize};

/// The API endpoints, as the rate limits and fault matching see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Login,
    TableList,
    Schema,
    /// `POST /dap/query/{ns}/table/{t}/data`
    Query,
    Job,
    ObjectUrl,
    /// The pre-signed object download.
    Object,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 with `Retry-After`.
    TooManyRequests,
    /// 500 with a JSON error body.
    ServerError,
    /// 502 with an HTML body, as a gateway sends it.
    BadGateway,
    /// 504 with a JSON `GatewayTimeoutError` body.
    GatewayTimeout,
    /// The connection drops halfway through the response body.
    Reset,
    /// The response is delayed by `delay_ms`.
    Slow,
    /// 403 with an account error (`error_type`: AccountDisabled, AccountNotOnboarded, …).
    AccountError,
    /// The next query's job fails with a ProcessingError.
    FailedJob,
    /// The next query is refused with OutOfRangeError.
    OutOfRange,
    /// The next query is refused with SnapshotRequiredError.
    SnapshotRequired,
    /// The object is served without its last bytes (a broken gzip stream).
    TruncatedGzip,
    /// The object URL is refused as expired (403 from the object store).
    ExpiredUrl,
    /// The object's first record has a key that does not parse (text formats only).
    CorruptRecord,
    /// An error (`status`, default 500) whose body quotes the whole request back: its URL with
    /// the query, and every header including `Authorization`, as careless proxies do. A client
    /// must not repeat it anywhere.
    EchoRequest,
}

impl FaultKind {
    /// Faults the HTTP layer applies before the handler runs (the others are applied by the
    /// query and object handlers).
    pub fn is_transport(self) -> bool {
        matches!(
            self,
            Self::TooManyRequests
                | Self::ServerError
                | Self::BadGateway
                | Self::GatewayTimeout
                | Self::Reset
                | Self::Slow
                | Self::AccountError
                | Self::EchoRequest
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// How many matching requests it affects.
    #[serde(default = "one")]
    pub count: u32,
    /// Only requests to this endpoint (any when absent).
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// Only requests about this table (any when absent).
    #[serde(default)]
    pub table: Option<String>,
    /// `Retry-After` value for 429 (seconds or an HTTP date); default "1".
    #[serde(default)]
    pub retry_after: Option<String>,
    /// Delay for `slow`; default 2000.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Error type for `account_error`; default AccountDisabled.
    #[serde(default)]
    pub error_type: Option<String>,
    /// HTTP status for `echo_request`; default 500.
    #[serde(default)]
    pub status: Option<u16>,
    /// How many matching requests pass untouched before the fault applies (a fault in the middle
    /// of a transfer, such as its second object).
    #[serde(default)]
    pub skip: u32,
}

fn one() -> u32 {
    1
}

impl FaultSpec {
    pub fn new(kind: FaultKind, count: u32) -> FaultSpec {
        FaultSpec {
            kind,
            count,
            endpoint: None,
            table: None,
            retry_after: None,
            delay_ms: None,
            error_type: None,
            status: None,
            skip: 0,
        }
    }

    /// Lets the first `n` matching requests through first.
    pub fn after(mut self, n: u32) -> FaultSpec {
        self.skip = n;
        self
    }

    pub fn on(mut self, endpoint: Endpoint) -> FaultSpec {
        self.endpoint = Some(endpoint);
        self
    }

    pub fn for_table(mut self, table: &str) -> FaultSpec {
        self.table = Some(table.to_string());
        self
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    pending: Vec<FaultSpec>,
}

impl Faults {
    pub fn add(&mut self, f: FaultSpec) {
        if f.count > 0 {
            self.pending.push(f);
        }
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// Takes one use of the first pending fault that matches and that `accept` allows.
    pub fn take(
        &mut self,
        endpoint: Endpoint,
        table: Option<&str>,
        accept: impl Fn(FaultKind) -> bool,
    ) -> Option<FaultSpec> {
        let i = self.pending.iter().position(|f| {
            accept(f.kind)
                && f.endpoint.is_none_or(|e| e == endpoint)
                && f.table.as_deref().is_none_or(|t| Some(t) == table)
        })?;
        let f = &mut self.pending[i];
        if f.skip > 0 {
            f.skip -= 1;
            return None;
        }
        f.count -= 1;
        let taken = f.clone();
        if f.count == 0 {
            self.pending.remove(i);
        }
        Some(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_match_by_endpoint_and_table_and_run_out() {
        let mut f = Faults::default();
        f.add(FaultSpec::new(FaultKind::ServerError, 2).on(Endpoint::Job));
        f.add(FaultSpec::new(FaultKind::FailedJob, 1).for_table("users"));
        assert!(f.take(Endpoint::Query, Some("users"), FaultKind::is_transport).is_none());
        assert_eq!(f.take(Endpoint::Query, Some("users"), |k| !k.is_transport()).unwrap().kind, FaultKind::FailedJob);
        assert!(f.take(Endpoint::Query, Some("users"), |k| !k.is_transport()).is_none());
        assert!(f.take(Endpoint::Job, None, FaultKind::is_transport).is_some());
        assert!(f.take(Endpoint::Job, None, FaultKind::is_transport).is_some());
        assert!(f.take(Endpoint::Job, None, FaultKind::is_transport).is_none());
    }

    #[test]
    fn a_fault_after_n_lets_the_first_n_through() {
        let mut f = Faults::default();
        f.add(FaultSpec::new(FaultKind::Slow, 1).on(Endpoint::Object).after(2));
        assert!(f.take(Endpoint::Object, None, FaultKind::is_transport).is_none());
        assert!(f.take(Endpoint::Object, None, FaultKind::is_transport).is_none());
        assert_eq!(f.take(Endpoint::Object, None, FaultKind::is_transport).unwrap().kind, FaultKind::Slow);
        assert!(f.take(Endpoint::Object, None, FaultKind::is_transport).is_none());
    }
}

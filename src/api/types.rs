//! The Query API's wire objects. Parsing is lenient (unknown fields are ignored) so that additive
//! server changes never break us, unlike the official client's strict parsing.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Output format of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Tsv,
    Csv,
    Jsonl,
    Parquet,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "tsv" => Format::Tsv,
            "csv" => Format::Csv,
            "jsonl" => Format::Jsonl,
            "parquet" => Format::Parquet,
            _ => return None,
        })
    }

    /// The object file extension; TSV must end in `.tsv.gz` for the official client's DB path.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Tsv => "tsv.gz",
            Format::Csv => "csv.gz",
            Format::Jsonl => "json.gz",
            Format::Parquet => "parquet",
        }
    }

    /// Text formats are gzip-compressed objects.
    pub fn is_gzip(self) -> bool {
        self != Format::Parquet
    }
}

/// How nested objects are laid out in tabular formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One column per nested field (`value.settings.a`).
    Expanded,
    /// One JSON column per nested object (`value.settings`).
    Condensed,
}

/// The body of `POST /dap/query/{ns}/table/{t}/data`: a snapshot without `since`, an
/// incremental with it. Absent fields are omitted, in the official client's key order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Query {
    pub format: Format,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableList {
    pub tables: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Waiting,
    Running,
    Complete,
    Failed,
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Complete | JobStatus::Failed)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ObjectRef {
    pub id: String,
}

/// Any of the job variants (waiting/running, complete snapshot or incremental, failed).
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: JobStatus,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub objects: Option<Vec<ObjectRef>>,
    #[serde(default)]
    pub schema_version: Option<u32>,
    #[serde(default)]
    pub at: Option<String>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UrlEntry {
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResourceUrls {
    pub urls: HashMap<String, UrlEntry>,
}

/// The `error` object of an error response.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_bodies_match_the_official_client() {
        let snap = Query { format: Format::Jsonl, mode: None, since: None, until: None };
        assert_eq!(serde_json::to_string(&snap).unwrap(), r#"{"format":"jsonl"}"#);
        let inc = Query {
            format: Format::Tsv,
            mode: Some(Mode::Condensed),
            since: Some("2024-05-01T12:00:00.123456Z".into()),
            until: None,
        };
        assert_eq!(
            serde_json::to_string(&inc).unwrap(),
            r#"{"format":"tsv","mode":"condensed","since":"2024-05-01T12:00:00.123456Z"}"#
        );
    }

    #[test]
    fn jobs_parse_leniently() {
        let j: Job = serde_json::from_str(r#"{"id":"a","status":"complete","objects":[{"id":"a/p"}],"schema_version":2,"at":"2024-01-01T00:00:00Z","extra":1}"#).unwrap();
        assert_eq!(j.status, JobStatus::Complete);
        let j: Job = serde_json::from_str(r#"{"id":"a","status":"queued"}"#).unwrap();
        assert_eq!(j.status, JobStatus::Unknown);
    }
}

//! Decoders: object files (TSV, condensed mode, as the database path requests) into typed records.

pub mod tsv;

use crate::time::Micros;
use crate::value::Value;

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `meta.ts`, the commit time.
    pub ts: Option<Micros>,
    /// `meta.action` (`U` or `D`) in incrementals.
    pub action: Option<char>,
    pub key: Value,
    /// The value columns in the table definition's order; NULL where the file has no column.
    pub values: Vec<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown column {label:?} in the header; the file does not match schema version {version}")]
    UnknownColumn { label: String, version: u32 },
    #[error("the header has no key column key.{key}")]
    MissingKey { key: String },
    #[error("line {line}: expected {expected} fields, found {found}")]
    FieldCount { line: u64, expected: usize, found: usize },
    #[error("line {line}, column {column}: {detail}")]
    Value { line: u64, column: String, detail: String },
}

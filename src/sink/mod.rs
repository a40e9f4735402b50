//! Replication targets: one trait, one small adapter per database. `sync.rs` drives every target
//! through it; what differs between dialects (DDL, types, bulk paths) lives in the adapter.

pub mod sqlite;

use crate::decode::Record;
use crate::schema::TableDef;
use crate::time::Micros;

/// The bookkeeping row of one replicated table (the official client's `table_sync`).
#[derive(Debug, Clone, PartialEq)]
pub struct Bookkeeping {
    pub namespace: String,
    pub table: String,
    /// The snapshot's `at` after initdb, the incremental's `until` after syncdb.
    pub watermark: Micros,
    pub schema_version: u32,
    /// The table's schema as compact JSON, without `meta`.
    pub schema_description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{target}: {detail}")]
    Database { target: String, detail: String },
    #[error("{table} is not initialised; run initdb first")]
    NotInitialised { table: String },
}

/// A database that holds replicated tables.
pub trait Sink: Send {
    /// The bookkeeping row of a table, if it is initialised.
    fn bookkeeping(&mut self, namespace: &str, table: &str) -> Result<Option<Bookkeeping>, SinkError>;
    /// The namespace that owns a table of this name in this database, if any.
    fn owner(&mut self, table: &str) -> Result<Option<String>, SinkError>;
    /// Every bookkeeping row of a namespace.
    fn all_bookkeeping(&mut self, namespace: &str) -> Result<Vec<Bookkeeping>, SinkError>;
    fn row_count(&mut self, namespace: &str, table: &str) -> Result<u64, SinkError>;

    /// initdb, step 1: a staging table for `def` loading `job` (the live table is untouched).
    /// Returns the objects an interrupted run of the same job already loaded, so that they are
    /// skipped; for any other job staging starts empty.
    fn stage(&mut self, def: &TableDef, job: &str) -> Result<Vec<String>, SinkError>;
    /// initdb, step 2a: opens the transaction that loads one object.
    fn begin_object(&mut self) -> Result<(), SinkError>;
    /// initdb, step 2b: loads snapshot rows into staging (a repeated key replaces the earlier row).
    fn stage_rows(&mut self, def: &TableDef, rows: &[Record]) -> Result<(), SinkError>;
    /// initdb, step 2c: records `object` as loaded and commits it with its rows (the checkpoint).
    fn finish_object(&mut self, def: &TableDef, job: &str, object: &str) -> Result<(), SinkError>;
    /// initdb, step 3: swaps staging in and writes its bookkeeping row, in one transaction.
    fn publish(&mut self, def: &TableDef, bookkeeping: &Bookkeeping) -> Result<(), SinkError>;

    /// syncdb, step 1: opens the transaction and applies additive schema changes.
    fn begin_changes(&mut self, def: &TableDef) -> Result<(), SinkError>;
    /// syncdb, step 2: upserts (`U`, whole rows) and deletes (`D`).
    fn apply(&mut self, def: &TableDef, rows: &[Record]) -> Result<(), SinkError>;
    /// syncdb, step 3: writes the new watermark and commits the changes with it.
    fn commit_changes(&mut self, bookkeeping: &Bookkeeping) -> Result<(), SinkError>;
    /// Abandons an open transaction; the previous consistent state stays.
    fn abort(&mut self);

    /// Drops a table and its bookkeeping row; false when it was not initialised.
    fn drop_table(&mut self, namespace: &str, table: &str) -> Result<bool, SinkError>;
}

//! dap-replica: a fast, safe replacement for Instructure's `dap` client for Canvas Data 2.
//!
//! A run joins a source and a target ([`run`], [`sync`]): a [`source::Source`] (DAP, or the
//! local [`mirror`] for outward replication) yields schemas and feeds of typed records
//! ([`feed`]); a [`sink::Sink`] (the mirror, PostgreSQL, MySQL/MariaDB, SQL Server; opened by
//! scheme through [`target`]) applies them through one load protocol. [`schema`] turns DAP table
//! schemas into typed table definitions, [`value`] holds typed values, and [`emulator`] is a
//! faithful local DAP server for offline work and every test.

pub mod api;
pub mod archive;
pub mod as_of;
pub mod cli;
pub mod config;
pub mod cron;
pub mod decode;
pub mod download;
pub mod emulator;
pub mod error;
pub mod export;
pub mod feed;
pub mod fetch;
pub mod history_choice;
pub mod interrupt;
pub mod metrics;
pub mod mirror;
pub mod pack;
pub mod parquet_columns;
pub mod per_table;
pub mod privacy;
pub mod progress;
pub mod pyjson;
pub mod query;
pub mod run;
pub mod schema;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod spool;
pub mod sql_names;
pub mod status;
pub mod sync;
pub mod target;
pub mod term;
pub mod time;
pub mod value;
pub mod watch;

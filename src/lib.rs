//! dap-replica: a fast, safe replacement for Instructure's `dap` client for Canvas Data 2.
//!
//! The data flow reads from the modules: [`schema`] turns DAP table schemas into typed table
//! definitions, [`value`] holds typed column values, and [`emulator`] is a faithful local DAP
//! server used for offline work and every test.

pub mod api;
pub mod cli;
pub mod config;
pub mod decode;
pub mod emulator;
pub mod export;
pub mod fetch;
pub mod interrupt;
pub mod pack;
pub mod parquet_columns;
pub mod privacy;
pub mod progress;
pub mod pyjson;
pub mod query;
pub mod schema;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod spool;
pub mod state;
pub mod sync;
pub mod table_export;
pub mod tables;
pub mod term;
pub mod time;
pub mod value;

//! The integration suite as one test binary: each module is one area (a target, a command, a
//! promise), `common` is what they share (the emulator set-up, the targets, the independent
//! truth, the SQL Server stand-in). One binary rather than one per file: the shared code is
//! compiled and linked once, which was a fifth of a clean CI build. cargo-nextest still runs every
//! test in a process of its own and in parallel (`.config/nextest.toml`); a module's tests are
//! selected with a filter such as `scripts/test -E 'test(/^crash::/)'`.

mod common;

mod analyst;
mod cli_output;
mod client_cli;
mod concurrency;
mod crash;
mod demo;
mod emulator_api;
mod formats;
mod history;
mod locations;
mod log_archive;
mod mirror_sqlite;
mod mssql;
mod mysql;
mod mysql_without_local_files;
mod official_client;
mod postgres;
mod privacy;
mod progress;
mod provisioning;
mod readme;
mod replicate;
mod safety;
mod scale;
mod schema_changes;
mod sink_contract;
mod tds_server;
mod unattended;
mod values;

//! What dap-replica's integration suite (`tests/suite`) uses to check its results: fresh
//! databases of every backend behind one interface ([`targets`]), their rows read back by column
//! type, and row-by-row comparison with the emulator's ground truth ([`truth`]). A crate of its
//! own so that it is built optimised (see the workspace's `Cargo.toml`): the suite runs it over
//! every table of every target, many times per test.

pub use tds_test_server as tds;

pub mod mssql;
pub mod servers;
pub mod targets;
pub mod truth;

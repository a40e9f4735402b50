//! The local SQLite mirror, in one home: its file format ([`format`]), its writer (the `Sink`
//! every `sqlite:` location and the default mirror open, [`writer`]), its history of row versions ([`history`]), its reader (the `Source`
//! of outward replication, [`reader`]), and its folder ([`folder`]: default location, namespace
//! files, writer locks, `state.json`), the bounded mirror of archived logs ([`retention`]), the
//! indexes kept on log tables ([`indexes`]) and the record of every run ([`runs`]).
//! Query, export and pack read through [`format`].

pub mod folder;
pub mod format;
pub mod history;
pub mod indexes;
pub mod load_file;
pub mod reader;
pub mod retention;
pub mod runs;
pub mod seal;
pub mod writer;

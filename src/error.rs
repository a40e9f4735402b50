//! The one classification every error of a run answers: may trying the same work again help,
//! and does the failure doom every other table of the run too. API, source, sink and sync errors
//! implement it; the retry loop of `sync.rs` and the multi-table runner of `per_table.rs` ask
//! nothing else.

/// Whether trying again can help after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A lost connection, a serialization failure, a deadlock, a corrupt download: the same work
    /// may succeed.
    MayHelp,
    /// A constraint, a permission, bad data, a refusal: the same work fails the same way.
    Useless,
}

/// What a failure means for the work around it.
pub trait Classify {
    /// Whether the same work may succeed when tried again at once.
    fn retry(&self) -> Retry;
    /// Whether no other table can succeed after this (authentication, account): the run stops.
    fn is_fatal(&self) -> bool {
        false
    }
    /// Why the work was not needed, when this error only says so (a table initialised already):
    /// the table is then skipped with this reason, not failed.
    fn skip_reason(&self) -> Option<String> {
        None
    }
}

/// A boxed cause, kept as the source of an error rather than as prose.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

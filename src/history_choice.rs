//! The command line's history choice (`--keep-history`, `--no-history`, `--drop-history`,
//! `--history-days`), carried in the sink options to the mirror's writer, which applies it to
//! each table it writes (`mirror::history`).

/// Tables named on the command line for a history choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Selection {
    #[default]
    Nothing,
    /// `all`: every table of the run.
    All,
    Named(Vec<String>),
}

impl Selection {
    /// `all`, or a comma-separated list of tables.
    pub fn parse(spec: &str) -> Selection {
        if spec.trim() == "all" {
            return Selection::All;
        }
        Selection::Named(spec.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect())
    }

    pub fn selects(&self, table: &str) -> bool {
        match self {
            Selection::Nothing => false,
            Selection::All => true,
            Selection::Named(tables) => tables.iter().any(|t| t == table),
        }
    }

    pub fn is_nothing(&self) -> bool {
        matches!(self, Selection::Nothing) || matches!(self, Selection::Named(t) if t.is_empty())
    }
}

/// What `--no-history` does with what was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recorded {
    /// The history table stays (queryable, no longer written).
    #[default]
    Keep,
    /// `--drop-history`: the history table goes too.
    Drop,
}

/// A run's history choice, from the command line: applied to each table it writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choice {
    /// `--keep-history`: these tables keep history from this run on.
    pub keep: Selection,
    /// `--no-history`: these tables stop keeping it.
    pub stop: Selection,
    pub recorded: Recorded,
    /// `--history-days`: versions that ended more than this many days before the watermark are
    /// pruned (remembered per table).
    pub days: Option<u32>,
}

impl Choice {
    /// Whether the choice changes anything at all (else nothing of history is created).
    pub fn is_empty(&self) -> bool {
        self.keep.is_nothing() && self.stop.is_nothing() && self.days.is_none()
    }
}

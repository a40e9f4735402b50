//! The change history of one table: what a snapshot at `at` and an incremental over
//! `[since, until)` contain.
//!
//! Rows are identified by an index (1-based). The base rows `1..=base_rows` were each inserted at a
//! pseudo-random time before the anchor and are never stored; commits are stored per index, so
//! memory grows with the number of changes, not with the table.

use std::collections::BTreeMap;

use super::rng::{Rng, mix};
use crate::time::{MICROS_PER_DAY, MICROS_PER_SECOND, Micros};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// An insert or update.
    Upsert,
    /// An update that marks the row deleted (`workflow_state`), still an upsert on the wire.
    SoftDelete,
    /// The row is gone: a `D` record in incrementals, absent from snapshots.
    HardDelete,
}

/// One version of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub ts: Micros,
    pub kind: ChangeKind,
    /// Which generated version of the row's values (0 for the base/insert version).
    pub revision: u32,
    /// The table's schema version when the change was committed.
    pub schema_version: u32,
}

/// What a commit does, by row index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitPlan {
    pub inserts: Vec<u64>,
    pub updates: Vec<u64>,
    pub soft_deletes: Vec<u64>,
    pub hard_deletes: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct History {
    seed: u64,
    base_rows: u64,
    base_version: u32,
    anchor: Micros,
    /// Base rows were inserted within this span before the anchor.
    base_span: Micros,
    next_idx: u64,
    head: Micros,
    changes: BTreeMap<u64, Vec<Change>>,
    /// The time of every commit, for the earliest change in a window.
    commits: std::collections::BTreeSet<Micros>,
}

impl History {
    pub fn new(seed: u64, base_rows: u64, anchor: Micros, base_version: u32) -> History {
        History {
            seed,
            base_rows,
            base_version,
            anchor,
            base_span: 365 * MICROS_PER_DAY,
            next_idx: base_rows + 1,
            head: anchor,
            changes: BTreeMap::new(),
            commits: Default::default(),
        }
    }

    /// Base rows inserted within `span` before the anchor (a log's recent requests), not a year.
    pub fn with_base_span(mut self, span: Micros) -> History {
        self.base_span = span.max(1);
        self
    }

    /// The time of the latest commit (the anchor before any commit).
    pub fn head(&self) -> Micros {
        self.head
    }

    /// The highest row index ever used.
    pub fn key_space(&self) -> u64 {
        self.next_idx - 1
    }

    /// The insert of a base row, within the base span (a year) before the anchor.
    fn base_change(&self, idx: u64) -> Option<Change> {
        if idx == 0 || idx > self.base_rows {
            return None;
        }
        let mut rng = Rng::new(mix(&[self.seed, idx, 0xba5e]));
        let mut ts = self.anchor - 1 - rng.below(self.base_span as u64) as i64;
        if rng.chance(0.5) {
            ts -= ts.rem_euclid(MICROS_PER_SECOND);
        }
        Some(Change { ts, kind: ChangeKind::Upsert, revision: 0, schema_version: self.base_version })
    }

    /// Every version of row `idx`, oldest first.
    fn versions(&self, idx: u64) -> impl Iterator<Item = Change> + '_ {
        self.base_change(idx).into_iter().chain(self.changes.get(&idx).into_iter().flatten().copied())
    }

    /// When row `idx` was first inserted.
    pub fn inserted_at(&self, idx: u64) -> Option<Micros> {
        self.versions(idx).next().map(|c| c.ts)
    }

    /// The latest version of row `idx` at time `at`, if the row exists then.
    pub fn state_at(&self, idx: u64, at: Micros) -> Option<Change> {
        self.versions(idx).take_while(|c| c.ts <= at).last().filter(|c| c.kind != ChangeKind::HardDelete)
    }

    /// The latest version of row `idx` committed in `[since, until)` (no upper bound when `until`
    /// is `None`): the consolidated change an incremental query reports.
    pub fn change_in(&self, idx: u64, since: Micros, until: Option<Micros>) -> Option<Change> {
        self.versions(idx).filter(|c| c.ts >= since && until.is_none_or(|u| c.ts < u)).last()
    }

    /// The row indexes of `range` an incremental from `since` has to look at: when `since` is at
    /// or after the anchor, only rows some commit changed (base rows were inserted before it),
    /// so a sync of a large table costs its changes, not its size.
    pub fn candidates(&self, since: Micros, range: std::ops::Range<u64>) -> Box<dyn Iterator<Item = u64> + '_> {
        if since >= self.anchor { Box::new(self.changes.range(range).map(|(idx, _)| *idx)) } else { Box::new(range) }
    }

    /// The latest commit time in `[since, …)`, used as `until` when a query gives none.
    pub fn latest_change_since(&self, since: Micros) -> Option<Micros> {
        if self.head >= since && !self.changes.is_empty() {
            return Some(self.head);
        }
        if since >= self.anchor {
            return None;
        }
        // Only base rows can fall in the window.
        (1..=self.base_rows).filter_map(|i| self.base_change(i)).map(|c| c.ts).filter(|ts| *ts >= since).max()
    }

    /// The earliest change at or after `since`: two incrementals whose `since` differ but have
    /// the same earliest change select the same records (a client's `since` jitter).
    pub fn earliest_change_since(&self, since: Micros) -> Option<Micros> {
        let committed = self.commits.range(since..).next().copied();
        if since >= self.anchor {
            return committed;
        }
        // Base rows inserted in the window come before any commit (all are before the anchor).
        let base =
            (1..=self.base_rows).filter_map(|i| self.base_change(i)).map(|c| c.ts).filter(|ts| *ts >= since).min();
        base.or(committed)
    }

    /// Whether row `idx` exists now.
    pub fn is_live(&self, idx: u64) -> bool {
        self.state_at(idx, Micros::MAX).is_some()
    }

    /// Picks up to `n` distinct live rows, deterministically from `rng`, skipping `exclude`.
    pub fn pick_live(&self, rng: &mut Rng, n: usize, exclude: &[u64]) -> Vec<u64> {
        let mut picked = Vec::new();
        let space = self.key_space();
        let mut attempts = 0;
        while picked.len() < n && space > 0 && attempts < n * 50 + 100 {
            attempts += 1;
            let idx = 1 + rng.below(space);
            if self.is_live(idx) && !picked.contains(&idx) && !exclude.contains(&idx) {
                picked.push(idx);
            }
        }
        picked
    }

    /// Allocates `n` new row indexes for inserts.
    pub fn allocate(&mut self, n: u64) -> Vec<u64> {
        let first = self.next_idx;
        self.next_idx += n;
        (first..self.next_idx).collect()
    }

    /// Applies a commit at `ts`, which must be later than every earlier commit.
    pub fn commit(&mut self, ts: Micros, plan: &CommitPlan, schema_version: u32) {
        assert!(ts > self.head, "commits must move forward in time");
        let mut push = |idx: u64, kind: ChangeKind| {
            let revision = self.versions_len(idx);
            self.changes.entry(idx).or_default().push(Change { ts, kind, revision, schema_version });
        };
        for &i in &plan.inserts {
            push(i, ChangeKind::Upsert);
        }
        for &i in &plan.updates {
            push(i, ChangeKind::Upsert);
        }
        for &i in &plan.soft_deletes {
            push(i, ChangeKind::SoftDelete);
        }
        for &i in &plan.hard_deletes {
            push(i, ChangeKind::HardDelete);
        }
        self.head = ts;
        self.commits.insert(ts);
    }

    fn versions_len(&self, idx: u64) -> u32 {
        (self.base_change(idx).is_some() as usize + self.changes.get(&idx).map_or(0, Vec::len)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANCHOR: Micros = 1_000 * MICROS_PER_DAY;

    fn history() -> History {
        History::new(9, 10, ANCHOR, 1)
    }

    #[test]
    fn base_rows_exist_before_the_anchor() {
        let h = history();
        assert_eq!(h.key_space(), 10);
        for idx in 1..=10 {
            let c = h.state_at(idx, ANCHOR).unwrap();
            assert!(c.ts < ANCHOR && c.revision == 0);
        }
        assert!(h.state_at(11, ANCHOR).is_none());
        assert!(h.state_at(0, ANCHOR).is_none());
    }

    #[test]
    fn snapshot_sees_the_latest_version_at_or_before_at() {
        let mut h = history();
        let t1 = ANCHOR + 10;
        let t2 = ANCHOR + 20;
        let new = h.allocate(1)[0];
        h.commit(t1, &CommitPlan { inserts: vec![new], updates: vec![1], ..Default::default() }, 1);
        h.commit(t2, &CommitPlan { updates: vec![1], hard_deletes: vec![2], ..Default::default() }, 2);
        assert_eq!(h.state_at(1, t1).unwrap().revision, 1);
        assert_eq!(h.state_at(1, t2).unwrap().revision, 2);
        assert_eq!(h.state_at(1, t2).unwrap().schema_version, 2);
        assert_eq!(h.state_at(1, t2 - 1).unwrap().revision, 1, "until the next commit");
        assert!(h.state_at(new, t1 - 1).is_none(), "not inserted yet");
        assert!(h.state_at(new, t1).is_some());
        assert!(h.state_at(2, t1).is_some());
        assert!(h.state_at(2, t2).is_none(), "hard-deleted");
    }

    #[test]
    fn incremental_consolidates_to_the_latest_change_per_key() {
        let mut h = history();
        let (t1, t2, t3) = (ANCHOR + 10, ANCHOR + 20, ANCHOR + 30);
        h.commit(t1, &CommitPlan { updates: vec![3], ..Default::default() }, 1);
        h.commit(t2, &CommitPlan { updates: vec![3], soft_deletes: vec![4], ..Default::default() }, 1);
        h.commit(t3, &CommitPlan { hard_deletes: vec![3], ..Default::default() }, 1);
        // Only the last change inside the window is reported.
        assert_eq!(h.change_in(3, t1, None).unwrap().kind, ChangeKind::HardDelete);
        assert_eq!(h.change_in(3, t1, Some(t3)).unwrap().revision, 2);
        assert_eq!(h.change_in(4, t1, None).unwrap().kind, ChangeKind::SoftDelete);
        assert!(h.change_in(5, t1, None).is_none(), "untouched rows are not reported");
    }

    #[test]
    fn an_incremental_after_the_anchor_looks_only_at_changed_rows() {
        let mut h = History::new(7, 1000, 1_000_000_000, 1);
        let t1 = 1_000_000_000 + 10;
        h.commit(t1, &CommitPlan { updates: vec![5, 700], ..CommitPlan::default() }, 1);
        assert_eq!(h.candidates(1_000_000_000, 1..1001).collect::<Vec<_>>(), [5, 700]);
        assert_eq!(h.candidates(1_000_000_000, 6..1001).collect::<Vec<_>>(), [700]);
        assert_eq!(h.candidates(999_999_999, 1..1001).count(), 1000, "base rows may fall in an earlier window");
        // Whatever the shortcut skips has no change in the window.
        for idx in 1..1001 {
            if ![5, 700].contains(&idx) {
                assert!(h.change_in(idx, 1_000_000_000, None).is_none());
            }
        }
    }

    #[test]
    fn window_is_closed_at_since_and_open_at_until() {
        let mut h = history();
        let (t1, t2) = (ANCHOR + 10, ANCHOR + 20);
        h.commit(t1, &CommitPlan { updates: vec![1], ..Default::default() }, 1);
        h.commit(t2, &CommitPlan { updates: vec![2], ..Default::default() }, 1);
        assert!(h.change_in(1, t1, Some(t2)).is_some(), "since is inclusive");
        assert!(h.change_in(2, t1, Some(t2)).is_none(), "until is exclusive");
        assert!(h.change_in(2, t2, Some(t2 + 1)).is_some());
        assert!(h.change_in(1, t1 + 1, None).is_none());
        assert_eq!(h.latest_change_since(t1), Some(t2));
        assert_eq!(h.latest_change_since(t2 + 1), None);
    }

    #[test]
    fn insert_then_hard_delete_reports_a_delete_for_an_unseen_key() {
        let mut h = history();
        let new = h.allocate(1)[0];
        h.commit(ANCHOR + 1, &CommitPlan { inserts: vec![new], ..Default::default() }, 1);
        h.commit(ANCHOR + 2, &CommitPlan { hard_deletes: vec![new], ..Default::default() }, 1);
        assert_eq!(h.change_in(new, ANCHOR, None).unwrap().kind, ChangeKind::HardDelete);
        assert!(h.state_at(new, ANCHOR + 2).is_none());
    }

    #[test]
    fn base_inserts_fall_in_old_windows() {
        let h = history();
        let all = (1..=10).filter(|i| h.change_in(*i, 0, None).is_some()).count();
        assert_eq!(all, 10, "an incremental since the epoch returns every row as an upsert");
        assert!((1..=10).all(|i| h.change_in(i, ANCHOR, None).is_none()));
    }

    #[test]
    fn pick_live_skips_deleted_rows() {
        let mut h = history();
        h.commit(ANCHOR + 1, &CommitPlan { hard_deletes: vec![1, 2, 3, 4, 5], ..Default::default() }, 1);
        let picked = h.pick_live(&mut Rng::new(1), 5, &[6]);
        assert_eq!(picked.len(), 4);
        assert!(picked.iter().all(|i| *i > 6));
    }
}

//! The indexes the mirror keeps on log tables for the questions analysts ask of them: one
//! course's page views on one day, one user's last 30 days, everything in one hour. A large
//! school's `web_logs` holds 10^8 rows and more; without these each question is a scan of all
//! of them, with them an index lookup. They are built once after a snapshot loads (a sort, far
//! cheaper than keeping them up to date row by row during the load), kept up to date by each
//! sync, and carried over when a table is swapped or rebuilt like the user's own indexes. A
//! mirror made before they existed gets them in its next sync. What each costs (load time, file
//! size) is measured by `bench/run scale` and written in the README.

use rusqlite::Connection;

use super::format::quote;

/// One index of a log table: `<table>__<suffix>` on `columns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogIndex {
    pub suffix: &'static str,
    pub columns: &'static [&'static str],
}

/// `canvas_logs.web_logs`: by time, by user then time, by course then time.
const WEB_LOGS: &[LogIndex] = &[
    LogIndex { suffix: "by_time", columns: &["timestamp"] },
    LogIndex { suffix: "by_user", columns: &["user_id", "timestamp"] },
    LogIndex { suffix: "by_course", columns: &["course_id", "timestamp"] },
];

/// The indexes the mirror keeps on `namespace.table` (none for most tables: their primary key
/// is what they are asked by).
pub fn of(namespace: &str, table: &str) -> &'static [LogIndex] {
    match (namespace, table) {
        ("canvas_logs", "web_logs") => WEB_LOGS,
        _ => &[],
    }
}

impl LogIndex {
    /// The index's name on `table`.
    pub fn name(&self, table: &str) -> String {
        format!("{table}__{}", self.suffix)
    }

    fn create_sql(&self, table: &str) -> String {
        let columns: Vec<String> = self.columns.iter().map(|c| quote(c)).collect();
        format!("CREATE INDEX IF NOT EXISTS {} ON {} ({})", quote(&self.name(table)), quote(table), columns.join(", "))
    }
}

/// Creates the indexes of `namespace.table` that it does not have yet, inside the caller's
/// transaction. An index whose columns the table lacks (a schema DAP changed) is left out.
pub fn ensure(conn: &Connection, namespace: &str, table: &str) -> rusqlite::Result<()> {
    let wanted = of(namespace, table);
    if wanted.is_empty() {
        return Ok(());
    }
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info(?1)")?
        .query_map([table], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for index in wanted.iter().filter(|i| i.columns.iter().all(|c| columns.iter().any(|have| have == c))) {
        conn.execute_batch(&index.create_sql(table))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
        rows.collect::<Result<Vec<_>, _>>().unwrap().join("; ")
    }

    #[test]
    fn the_analysts_questions_of_web_logs_use_an_index_not_a_scan() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE web_logs (id TEXT PRIMARY KEY, timestamp TEXT, user_id INTEGER, course_id INTEGER, url TEXT)",
        )
        .unwrap();
        let day = "SELECT count(*) FROM web_logs WHERE course_id = 7 AND timestamp >= '2026-01-05' AND timestamp < '2026-01-06'";
        let user = "SELECT * FROM web_logs WHERE user_id = 9 AND timestamp >= '2025-12-06' ORDER BY timestamp";
        let hour = "SELECT count(*) FROM web_logs WHERE timestamp >= '2026-01-05T10' AND timestamp < '2026-01-05T11'";
        assert!(plan_of(&conn, day).contains("SCAN"), "the control: without the indexes, a scan");
        ensure(&conn, "canvas_logs", "web_logs").unwrap();
        ensure(&conn, "canvas_logs", "web_logs").unwrap();
        assert!(plan_of(&conn, day).contains("USING COVERING INDEX web_logs__by_course"), "{}", plan_of(&conn, day));
        assert!(plan_of(&conn, user).contains("USING INDEX web_logs__by_user"), "{}", plan_of(&conn, user));
        assert!(!plan_of(&conn, user).contains("TEMP B-TREE"), "ordered by the index: {}", plan_of(&conn, user));
        assert!(plan_of(&conn, hour).contains("web_logs__by_time"), "{}", plan_of(&conn, hour));
        // Other tables get none; a table without the columns gets only what it can have.
        assert!(of("canvas", "users").is_empty());
        conn.execute_batch("DROP TABLE web_logs; CREATE TABLE web_logs (id TEXT, timestamp TEXT)").unwrap();
        ensure(&conn, "canvas_logs", "web_logs").unwrap();
        let names: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'web_logs'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(names, ["web_logs__by_time"]);
    }
}

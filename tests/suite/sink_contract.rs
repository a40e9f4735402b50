//! The target contract, one body per promise, one test per (promise, backend) (`each_backend!`:
//! `promise::sqlite`, `::postgres`, `::mariadb`, `::mssql`): a table is never visible half-initialised, an
//! interrupted initdb resumes the same job and restarts another, an aborted sync leaves rows and
//! watermark as they were, schema deltas apply in place, repeated keys keep the later row, and
//! the user's indexes and views survive syncs and re-snapshots.

use crate::common;

use common::targets::{Backend, TestTarget};
use common::truth::value_json;
use dap_replica::decode::Record;
use dap_replica::emulator::dataset::envelope_def;
use dap_replica::feed::{Feed, Piece};
use dap_replica::schema::TableDef;
use dap_replica::schema::delta::SchemaDelta;
use dap_replica::sink::{Bookkeeping, Sink, SinkError};
use dap_replica::value::Value;
use serde_json::{Map, Value as Json, json};

const NS: &str = "canvas";
const TABLE: &str = "contract_items";

/// The flat schema at version 1; version 2 adds a column, widens the text, adds an enum value
/// and makes `name` optional; version 3 makes the new column required.
fn flat(version: u32) -> Json {
    let mut props = json!({
        "id": {"type": "integer", "format": "int64", "description": "Key."},
        "name": {"type": "string", "maxLength": 8, "description": "A name."},
        "state": {"type": "string", "enum": ["__dap_unspecified__", "active", "deleted"]},
        "score": {"type": "number", "format": "float64"},
    });
    let mut required = vec!["id", "name"];
    if version >= 2 {
        props["name"]["maxLength"] = json!(64);
        props["state"]["enum"].as_array_mut().unwrap().push(json!("archived"));
        props["added"] = json!({"type": "integer", "format": "int32", "description": "Added in v2."});
        required = vec!["id"];
    }
    if version >= 3 {
        required.push("added");
    }
    json!({"type": "object", "properties": props, "required": required, "title": "Contract table."})
}

fn def(version: u32) -> TableDef {
    envelope_def(NS, TABLE, version, &flat(version)).unwrap()
}

fn row(def: &TableDef, id: i64, name: &str, state: &str, action: char) -> Record {
    let mut values = vec![Value::Str(name.into()), Value::Str(state.into()), Value::Float(id as f64 / 4.0)];
    if def.version >= 2 {
        values.push(Value::Int(id * 10));
    }
    Record { ts: None, action: Some(action), key: Value::Int(id), values }
}

fn delete(def: &TableDef, id: i64) -> Record {
    Record { ts: None, action: Some('D'), key: Value::Int(id), values: vec![Value::Null; def.values.len()] }
}

/// The truth rows for records (later records of a key replace earlier ones; deletes remove).
fn truth(def: &TableDef, records: &[&Record]) -> Vec<Map<String, Json>> {
    let mut rows: std::collections::BTreeMap<i64, Map<String, Json>> = Default::default();
    for r in records {
        let Value::Int(id) = r.key else { unreachable!() };
        if r.action == Some('D') {
            rows.remove(&id);
            continue;
        }
        let mut m = Map::new();
        m.insert(def.key.name.clone(), value_json(&r.key));
        for (c, v) in def.values.iter().zip(&r.values) {
            m.insert(c.name.clone(), value_json(v));
        }
        rows.insert(id, m);
    }
    rows.into_values().collect()
}

/// A feed of parts; the last part is cut off (no `End`, no `Done`) unless `complete`.
fn feed(parts: Vec<(&str, Vec<Record>)>, complete: bool) -> Feed {
    let (tx, feed) = Feed::channel(4);
    let parts: Vec<(String, Vec<Record>)> = parts.into_iter().map(|(p, r)| (p.to_string(), r)).collect();
    tokio::spawn(async move {
        let n = parts.len();
        for (i, (part, rows)) in parts.into_iter().enumerate() {
            tx.send(Piece::Begin(part.clone())).await.unwrap();
            tx.send(Piece::Rows(rows)).await.unwrap();
            if !complete && i + 1 == n {
                return; // the source died here
            }
            tx.send(Piece::End(part)).await.unwrap();
        }
        tx.send(Piece::Done).await.unwrap();
    });
    feed
}

/// A watermark of whole seconds (what every target keeps; MySQL keeps nothing finer).
fn secs(n: i64) -> i64 {
    n * 1_000_000
}

fn bookkeeping(def: &TableDef, watermark: i64) -> Bookkeeping {
    // What initdb stores: the served schema without `meta`.
    let mut schema = dap_replica::emulator::dataset::envelope(&flat(def.version), def.version)["schema"].clone();
    schema["properties"].as_object_mut().unwrap().shift_remove("meta");
    Bookkeeping {
        namespace: NS.into(),
        table: TABLE.into(),
        watermark,
        schema_version: def.version,
        schema_description: schema.to_string(),
    }
}

/// Initialises the table with `records` in one part.
async fn init(sink: &dyn Sink, def: &TableDef, records: Vec<Record>, watermark: i64) {
    assert!(sink.stage(def, "job-init").await.unwrap().is_empty());
    sink.load(def, "job-init", feed(vec![("part-0", records)], true)).await.unwrap();
    sink.publish(def, &SchemaDelta::default(), &bookkeeping(def, watermark)).await.unwrap();
}

async fn a_table_is_published_whole_and_an_interrupted_initdb_resumes_its_job(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_resume").await;
    let sink = t.open(NS).await;
    let d = def(1);
    let (a, b, c) = (row(&d, 1, "a", "active", 'U'), row(&d, 2, "b", "active", 'U'), row(&d, 3, "c", "deleted", 'U'));

    assert!(sink.stage(&d, "job-a").await.unwrap().is_empty());
    let cut = sink.load(&d, "job-a", feed(vec![("part-0", vec![a.clone()]), ("part-1", vec![b.clone()])], false)).await;
    assert!(matches!(cut, Err(SinkError::FeedAborted)), "{backend:?}: the cut-off feed fails");
    assert!(sink.bookkeeping(NS, TABLE).await.unwrap().is_none(), "{backend:?}: nothing published");
    assert!(!t.has_table(NS, TABLE).await, "{backend:?}: the table is not visible half-loaded");

    assert_eq!(sink.stage(&d, "job-a").await.unwrap(), ["part-0"], "{backend:?}: the same job resumes");
    sink.load(&d, "job-a", feed(vec![("part-1", vec![b.clone(), c.clone()])], true)).await.unwrap();
    sink.publish(&d, &SchemaDelta::default(), &bookkeeping(&d, secs(1_000))).await.unwrap();
    t.assert_rows(&d, &truth(&d, &[&a, &b, &c]), &format!("{backend:?}: after resuming")).await;
    let stored = sink.bookkeeping(NS, TABLE).await.unwrap().unwrap();
    assert_eq!((stored.watermark, stored.schema_version), (secs(1_000), 1));
    assert_eq!(sink.row_count(NS, TABLE).await.unwrap(), 3);
}

async fn an_interrupted_initdb_of_another_job_starts_over(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_restart").await;
    let sink = t.open(NS).await;
    let d = def(1);
    let old = row(&d, 1, "old", "active", 'U');
    sink.stage(&d, "job-a").await.unwrap();
    let cut = sink.load(&d, "job-a", feed(vec![("part-0", vec![old]), ("part-1", vec![])], false)).await;
    assert!(cut.is_err(), "{backend:?}: a feed cut off is an error, not a load");
    assert_eq!(sink.stage(&d, "job-a").await.unwrap(), ["part-0"], "{backend:?}: job-a holds its first part");
    assert!(sink.stage(&d, "job-b").await.unwrap().is_empty(), "{backend:?}: another job starts empty");
    let new = row(&d, 2, "new", "active", 'U');
    sink.load(&d, "job-b", feed(vec![("part-0", vec![new.clone()])], true)).await.unwrap();
    sink.publish(&d, &SchemaDelta::default(), &bookkeeping(&d, secs(5))).await.unwrap();
    t.assert_rows(&d, &truth(&d, &[&new]), &format!("{backend:?}: only job-b's rows")).await;
}

async fn an_aborted_sync_keeps_rows_and_watermark_and_a_complete_one_moves_both(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_abort").await;
    let sink = t.open(NS).await;
    let d = def(1);
    let base: Vec<Record> = (1..=5).map(|i| row(&d, i, &format!("r{i}"), "active", 'U')).collect();
    init(sink.as_ref(), &d, base.clone(), secs(100)).await;
    let changes = vec![row(&d, 2, "changed", "deleted", 'U'), delete(&d, 3), row(&d, 9, "new", "active", 'U')];

    let cut = sink
        .apply_changes(
            &d,
            &SchemaDelta::default(),
            feed(vec![("p0", changes.clone())], false),
            &bookkeeping(&d, secs(200)),
        )
        .await;
    assert!(cut.is_err(), "{backend:?}");
    let before: Vec<&Record> = base.iter().collect();
    t.assert_rows(&d, &truth(&d, &before), &format!("{backend:?}: after an aborted sync")).await;
    assert_eq!(sink.bookkeeping(NS, TABLE).await.unwrap().unwrap().watermark, secs(100), "{backend:?}: watermark kept");

    let applied = sink
        .apply_changes(
            &d,
            &SchemaDelta::default(),
            feed(vec![("p0", changes.clone())], true),
            &bookkeeping(&d, secs(200)),
        )
        .await
        .unwrap();
    assert_eq!(applied, 3);
    let all: Vec<&Record> = base.iter().chain(&changes).collect();
    t.assert_rows(&d, &truth(&d, &all), &format!("{backend:?}: after the sync")).await;
    assert_eq!(sink.bookkeeping(NS, TABLE).await.unwrap().unwrap().watermark, secs(200));

    // Re-applying the same changes (the overlap of the next sync) changes nothing; a delete
    // of a key never seen is no error.
    let again = vec![changes[0].clone(), delete(&d, 12345)];
    sink.apply_changes(&d, &SchemaDelta::default(), feed(vec![("p0", again)], true), &bookkeeping(&d, secs(300)))
        .await
        .unwrap();
    t.assert_rows(&d, &truth(&d, &all), &format!("{backend:?}: after the overlap")).await;
}

async fn schema_deltas_apply_in_place_and_user_indexes_and_views_survive(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_delta").await;
    let sink = t.open(NS).await;
    let (v1, v2) = (def(1), def(2));
    let base: Vec<Record> = (1..=4).map(|i| row(&v1, i, &format!("r{i}"), "active", 'U')).collect();
    init(sink.as_ref(), &v1, base.clone(), secs(100)).await;
    let table = t.table(NS, TABLE);
    t.exec(&format!(
        "CREATE INDEX user_contract_idx ON {table} (state); CREATE VIEW user_contract_view AS SELECT id, name FROM {table}"
    ))
    .await;

    let delta = SchemaDelta::between(&v1, &v2).unwrap();
    let changes = vec![
        row(&v2, 2, "a name longer than eight", "archived", 'U'),
        Record {
            ts: None,
            action: Some('U'),
            key: Value::Int(7),
            values: vec![Value::Null, Value::Str("active".into()), Value::Null, Value::Int(7)],
        },
    ];
    sink.apply_changes(&v2, &delta, feed(vec![("p0", changes.clone())], true), &bookkeeping(&v2, secs(200)))
        .await
        .unwrap();
    // Rows written before the new column hold NULL there.
    let expected: Vec<Map<String, Json>> = truth(&v1, &base.iter().collect::<Vec<_>>())
        .into_iter()
        .map(|mut m| {
            m.insert("added".into(), Json::Null);
            m
        })
        .collect();
    let mut expected: std::collections::BTreeMap<String, Map<String, Json>> =
        expected.into_iter().map(|m| (m["id"].to_string(), m)).collect();
    for m in truth(&v2, &changes.iter().collect::<Vec<_>>()) {
        expected.insert(m["id"].to_string(), m);
    }
    let expected: Vec<_> = expected.into_values().collect();
    t.assert_rows(&v2, &expected, &format!("{backend:?}: after the schema change")).await;
    assert_eq!(sink.bookkeeping(NS, TABLE).await.unwrap().unwrap().schema_version, 2);
    assert!(t.has_index("user_contract_idx").await, "{backend:?}: the user's index survives the sync");
    assert_eq!(t.column("SELECT count(*) FROM user_contract_view").await[0].as_deref(), Some("5"));

    // A re-snapshot keeps them too.
    let fresh: Vec<Record> = (20..=22).map(|i| row(&v2, i, "snap", "archived", 'U')).collect();
    sink.stage(&v2, "job-replace").await.unwrap();
    sink.load(&v2, "job-replace", feed(vec![("part-0", fresh.clone())], true)).await.unwrap();
    let stored = sink.bookkeeping(NS, TABLE).await.unwrap().unwrap().table_def().unwrap();
    sink.publish(&v2, &SchemaDelta::for_reload(&stored, &v2), &bookkeeping(&v2, secs(300))).await.unwrap();
    t.assert_rows(&v2, &truth(&v2, &fresh.iter().collect::<Vec<_>>()), &format!("{backend:?}: after the re-snapshot"))
        .await;
    assert!(t.has_index("user_contract_idx").await, "{backend:?}: the user's index survives the re-snapshot");
    assert_eq!(t.column("SELECT count(*) FROM user_contract_view").await[0].as_deref(), Some("3"));
}

async fn a_column_that_becomes_required_over_nulls_is_refused_and_nothing_changes(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_require").await;
    let sink = t.open(NS).await;
    let (v2, v3) = (def(2), def(3));
    let rows = vec![
        row(&v2, 1, "a", "active", 'U'),
        Record {
            ts: None,
            action: Some('U'),
            key: Value::Int(2),
            values: vec![Value::Null, Value::Null, Value::Null, Value::Null],
        },
    ];
    init(sink.as_ref(), &v2, rows.clone(), secs(100)).await;
    let delta = SchemaDelta::between(&v2, &v3).unwrap();
    let e = sink
        .apply_changes(
            &v3,
            &delta,
            feed(vec![("p0", vec![row(&v3, 3, "c", "active", 'U')])], true),
            &bookkeeping(&v3, secs(200)),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("became required") && e.contains("initdb --replace"), "{backend:?}: {e}");
    t.assert_rows(&v2, &truth(&v2, &rows.iter().collect::<Vec<_>>()), &format!("{backend:?}: unchanged")).await;
    let stored = sink.bookkeeping(NS, TABLE).await.unwrap().unwrap();
    assert_eq!((stored.watermark, stored.schema_version), (secs(100), 2), "{backend:?}");
}

async fn repeated_keys_keep_the_later_row_and_drop_removes_table_and_bookkeeping(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_repeat").await;
    let sink = t.open(NS).await;
    let d = def(1);
    let (first, later) = (row(&d, 1, "first", "active", 'U'), row(&d, 1, "later", "deleted", 'U'));
    let other = row(&d, 2, "other", "active", 'U');
    sink.stage(&d, "job").await.unwrap();
    sink.load(&d, "job", feed(vec![("p0", vec![first.clone(), other.clone()]), ("p1", vec![later.clone()])], true))
        .await
        .unwrap();
    sink.publish(&d, &SchemaDelta::default(), &bookkeeping(&d, secs(1))).await.unwrap();
    t.assert_rows(&d, &truth(&d, &[&first, &other, &later]), &format!("{backend:?}: initdb")).await;

    let (again, gone) = (row(&d, 2, "again", "active", 'U'), delete(&d, 2));
    sink.apply_changes(
        &d,
        &SchemaDelta::default(),
        feed(vec![("p0", vec![again.clone(), gone.clone()])], true),
        &bookkeeping(&d, secs(2)),
    )
    .await
    .unwrap();
    t.assert_rows(&d, &truth(&d, &[&later, &other, &again, &gone]), &format!("{backend:?}: syncdb")).await;

    assert!(sink.drop_table(NS, TABLE).await.unwrap());
    assert!(!t.has_table(NS, TABLE).await && sink.bookkeeping(NS, TABLE).await.unwrap().is_none());
    assert!(!sink.drop_table(NS, TABLE).await.unwrap(), "{backend:?}: a second drop finds nothing");
    if backend == Backend::Sqlite {
        assert!(t.file().exists());
    }
}

/// A table keyed by text (web_logs' UUIDs; the mirror stages such a snapshot unkeyed and keys
/// it when publishing): a key repeated within a part and across parts keeps its last record,
/// through a cut-off load resumed, and a re-snapshot replaces the rows whole.
async fn text_keys_keep_the_later_row_through_a_resumed_load_and_a_resnapshot(backend: Backend) {
    let t = TestTarget::fresh(backend, "contract_text_keys").await;
    let sink = t.open(NS).await;
    let mut schema = flat(1);
    schema["properties"]["id"] = json!({"type": "string", "format": "uuid", "description": "Key."});
    let d = envelope_def(NS, TABLE, 1, &schema).unwrap();
    let row = |id: &str, name: &str| Record {
        ts: None,
        action: Some('U'),
        key: Value::Uuid(u128::from_str_radix(&id.replace('-', ""), 16).unwrap()),
        values: vec![Value::Str(name.into()), Value::Str("active".into()), Value::Float(1.5)],
    };
    let expect = |rows: &[&Record]| -> Vec<Map<String, Json>> {
        let mut latest: std::collections::BTreeMap<String, Map<String, Json>> = Default::default();
        for r in rows {
            let mut m = Map::new();
            m.insert(d.key.name.clone(), value_json(&r.key));
            for (c, v) in d.values.iter().zip(&r.values) {
                m.insert(c.name.clone(), value_json(v));
            }
            latest.insert(r.key.to_text().unwrap(), m);
        }
        latest.into_values().collect()
    };
    let (b1, a1, b2, c1, a2, a3) = (
        row("00000000-0000-4000-8000-000000000002", "b1"),
        row("00000000-0000-4000-8000-000000000001", "a1"),
        row("00000000-0000-4000-8000-000000000002", "b2"),
        row("00000000-0000-4000-8000-000000000003", "c1"),
        row("00000000-0000-4000-8000-000000000001", "a2"),
        row("00000000-0000-4000-8000-000000000001", "a3"),
    );
    sink.stage(&d, "job-text").await.unwrap();
    let parts = || vec![("p0", vec![b1.clone(), a1.clone(), b2.clone()]), ("p1", vec![c1.clone(), a2.clone()])];
    let cut = sink.load(&d, "job-text", feed(parts(), false)).await;
    assert!(matches!(cut, Err(SinkError::FeedAborted)), "{backend:?}: the cut-off feed fails: {cut:?}");
    let done = sink.stage(&d, "job-text").await.unwrap();
    assert_eq!(done, vec!["p0".to_string()], "{backend:?}: the first part stays loaded");
    sink.load(&d, "job-text", feed(vec![("p1", vec![c1.clone(), a2.clone()]), ("p2", vec![a3.clone()])], true))
        .await
        .unwrap();
    sink.publish(&d, &SchemaDelta::default(), &bookkeeping(&d, secs(1))).await.unwrap();
    t.assert_rows(&d, &expect(&[&b1, &a1, &b2, &c1, &a2, &a3]), &format!("{backend:?}: initdb")).await;

    let (c2, d1) =
        (row("00000000-0000-4000-8000-000000000003", "c2"), row("00000000-0000-4000-8000-000000000004", "d1"));
    sink.stage(&d, "job-again").await.unwrap();
    sink.load(&d, "job-again", feed(vec![("p0", vec![c2.clone(), d1.clone(), c2.clone()])], true)).await.unwrap();
    sink.publish(&d, &SchemaDelta::default(), &bookkeeping(&d, secs(2))).await.unwrap();
    t.assert_rows(&d, &expect(&[&c2, &d1]), &format!("{backend:?}: re-snapshot")).await;
}

crate::each_backend!(
    text_keys_keep_the_later_row_through_a_resumed_load_and_a_resnapshot,
    a_table_is_published_whole_and_an_interrupted_initdb_resumes_its_job,
    an_interrupted_initdb_of_another_job_starts_over,
    an_aborted_sync_keeps_rows_and_watermark_and_a_complete_one_moves_both,
    schema_deltas_apply_in_place_and_user_indexes_and_views_survive,
    a_column_that_becomes_required_over_nulls_is_refused_and_nothing_changes,
    repeated_keys_keep_the_later_row_and_drop_removes_table_and_bookkeeping,
);

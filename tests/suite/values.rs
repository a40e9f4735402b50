//! Every value of every column type survives the whole path: written as DAP writes TSV (the
//! emulator's encoder), decoded, stored by every target, read back, and compared exactly with
//! what was written. Random values come from the whole domain of each type (proptest), and the
//! domain's edges are checked on every run besides.

use crate::common;

use std::sync::Arc;

use common::targets::{TestTarget, backends};
use common::truth::{assert_same_rows_within, canonical, value_json};
use dap_replica::decode::tsv::TsvDecoder;
use dap_replica::emulator::dataset::{Record as Emitted, envelope_def};
use dap_replica::emulator::generate::Generator;
use dap_replica::emulator::output::{CsvNull, Format, Mode, PartSpec, write_part};
use dap_replica::feed::{Feed, Piece};
use dap_replica::schema::delta::SchemaDelta;
use dap_replica::schema::{ColumnType, TableDef};
use dap_replica::sink::{Bookkeeping, Sink};
use dap_replica::time::MICROS_PER_DAY;
use dap_replica::value::{Decimal, Value};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Value as Json, json};

const NS: &str = "canvas";
const TABLE: &str = "every_type";
const FIRST_DAY: i64 = -719_162;
const LAST_DAY: i64 = 2_932_896;

/// A table with one column of each type the schemas use (and a few they may).
fn flat() -> Json {
    json!({
        "type": "object",
        "required": ["id", "required_text"],
        "definitions": {"V4": {"type": "string", "format": "ipv4"}, "V6": {"type": "string", "format": "ipv6"}},
        "properties": {
            "id": {"type": "integer", "format": "int64"},
            "required_text": {"type": "string", "maxLength": 255},
            "i16": {"type": "integer", "format": "int16"},
            "i32": {"type": "integer", "format": "int32"},
            "i64": {"type": "integer", "format": "int64"},
            "status": {"type": "integer", "enum": [200, 404, 500]},
            "f32": {"type": "number", "format": "float32"},
            "f64": {"type": "number", "format": "float64"},
            "money": {"type": "number", "multipleOf": 0.01, "exclusiveMinimum": -1000, "exclusiveMaximum": 1000},
            "wide": {"type": "number", "multipleOf": 1e-10, "exclusiveMinimum": -1e28, "exclusiveMaximum": 1e28},
            "flag": {"type": "boolean"},
            "short": {"type": "string", "maxLength": 5},
            "long": {"type": "string"},
            "body": {"oneOf": [{"type": "string", "const": "__dap_oversized_truncated__"}, {"type": "string"}]},
            "state": {"type": "string", "enum": ["__dap_unspecified__", "active", "deleted"]},
            "at": {"type": "string", "format": "date-time"},
            "day": {"type": "string", "format": "date"},
            "clock": {"type": "string", "format": "time"},
            "uuid": {"type": "string", "format": "uuid"},
            "v4": {"type": "string", "format": "ipv4"},
            "v6": {"type": "string", "format": "ipv6"},
            "ip": {"oneOf": [{"$ref": "#/definitions/V4"}, {"$ref": "#/definitions/V6"}]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 255}},
            "numbers": {"type": "array", "items": {"type": "integer", "format": "int32"}},
            "kinds": {"type": "array", "items": {"type": "string", "enum": ["__dap_unspecified__", "a", "b c"]}},
            "settings": {"type": "object", "additionalProperties": false, "properties": {
                "a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}}},
        }
    })
}

fn def() -> TableDef {
    envelope_def(NS, TABLE, 1, &flat()).unwrap()
}

/// Text without NUL (DAP's source is PostgreSQL, whose text cannot hold it), at most `max` chars:
/// any characters, with the ones every format has to escape (tab, newline, carriage return,
/// backslash, quotes, every other control character, line separators) drawn often.
fn text(max: usize) -> impl Strategy<Value = String> {
    let awkward = proptest::sample::select(vec![
        '\t', '\n', '\r', '\\', '"', '\'', ',', '\u{1}', '\u{1b}', '\u{7f}', '\u{85}', '\u{2028}', 'é', '😀', ' ',
    ]);
    // Every C0 and C1 control character (but NUL), each as likely as any other.
    let control = prop_oneof![proptest::char::range('\u{1}', '\u{1f}'), proptest::char::range('\u{7f}', '\u{9f}')];
    let character = prop_oneof![2 => any::<char>(), 1 => awkward, 1 => control];
    proptest::collection::vec(character, 0..64)
        .prop_map(move |chars| chars.into_iter().filter(|c| *c != '\0').take(max).collect())
}

/// Any JSON document: scalars, and arrays and objects of them up to three levels deep (finite
/// numbers only: JSON has no other; no negative zero, which PostgreSQL's jsonb keeps as 0).
fn json_document() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| Json::from(if f == 0.0 { 0.0 } else { f })),
        text(40).prop_map(Json::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            proptest::collection::btree_map(text(12), inner, 0..4).prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// Any value of a type, from its whole domain.
fn value(ty: &ColumnType) -> BoxedStrategy<Value> {
    use ColumnType as T;
    match ty.clone() {
        T::Int(16) => any::<i16>().prop_map(|v| Value::Int(v.into())).boxed(),
        T::Int(32) => any::<i32>().prop_map(|v| Value::Int(v.into())).boxed(),
        T::Int(_) => any::<i64>().prop_map(Value::Int).boxed(),
        T::IntEnum(values) => proptest::sample::select(values).prop_map(Value::Int).boxed(),
        T::Float(32) => any::<f32>().prop_map(|f| Value::Float(f.into())).boxed(),
        T::Float(_) => any::<f64>().prop_map(Value::Float).boxed(),
        T::Decimal { precision, scale } => {
            let max = 10i128.pow(precision.into()) - 1;
            (-max..=max).prop_map(move |mantissa| Value::Decimal(Decimal { mantissa, scale })).boxed()
        }
        T::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        T::Str { max_length, .. } => text(max_length.unwrap_or(3000) as usize).prop_map(Value::Str).boxed(),
        T::Enum(values) => proptest::sample::select(values).prop_map(Value::Str).boxed(),
        T::Timestamp => (FIRST_DAY * MICROS_PER_DAY..(LAST_DAY + 1) * MICROS_PER_DAY, 0u32..=6)
            .prop_map(|(us, digits)| {
                let unit = 10i64.pow(6 - digits);
                Value::Timestamp(us - us.rem_euclid(unit))
            })
            .boxed(),
        T::Date => (FIRST_DAY..=LAST_DAY).prop_map(|d| Value::Date(d as i32)).boxed(),
        T::Time => (0..MICROS_PER_DAY).prop_map(Value::Time).boxed(),
        T::Uuid => any::<u128>().prop_map(Value::Uuid).boxed(),
        T::Ipv4 => any::<u32>().prop_map(|v| Value::Ip(std::net::Ipv4Addr::from(v).into())).boxed(),
        T::Ipv6 => prop_oneof![
            any::<u128>().prop_map(|v| Value::Ip(std::net::Ipv6Addr::from(v).into())),
            any::<u32>().prop_map(|v| Value::Ip(std::net::Ipv4Addr::from(v).to_ipv6_mapped().into())),
        ]
        .boxed(),
        T::Ip => prop_oneof![value(&T::Ipv4), value(&T::Ipv6)].boxed(),
        T::Array(item) => proptest::collection::vec(value(&item), 0..4)
            .prop_map(|items| Value::Json(Json::Array(items.iter().map(value_json).collect())))
            .boxed(),
        T::Object(fields) => {
            let members: Vec<BoxedStrategy<Option<(String, Json)>>> = fields
                .iter()
                .map(|f| {
                    let name = f.name.clone();
                    proptest::option::of(value(&f.ty).prop_map(move |v| (name.clone(), value_json(&v)))).boxed()
                })
                .collect();
            members
                .prop_map(|set| {
                    let map: Map<String, Json> = set.into_iter().flatten().collect();
                    // Condensed mode sends an object whose members are all NULL as NULL.
                    if map.is_empty() { Value::Null } else { Value::Json(Json::Object(map)) }
                })
                .boxed()
        }
        T::Json => json_document().prop_map(Value::Json).boxed(),
    }
}

fn row(def: &TableDef) -> BoxedStrategy<Vec<Value>> {
    let columns: Vec<BoxedStrategy<Value>> = def
        .values
        .iter()
        .map(|c| if c.required { value(&c.ty) } else { prop_oneof![1 => Just(Value::Null), 4 => value(&c.ty)].boxed() })
        .collect();
    columns.boxed()
}

/// The rows as the emulator writes them in a TSV part, decoded back; asserts the decoder gives
/// back exactly what was written.
fn through_tsv(def: &TableDef, rows: &[(i64, Vec<Value>)]) -> Vec<dap_replica::decode::Record> {
    let emitted: Vec<Emitted> = rows
        .iter()
        .map(|(id, values)| Emitted { ts: 0, action: Some('U'), key: Value::Int(*id), values: Some(values.clone()) })
        .collect();
    let spec =
        PartSpec { def, format: Format::Tsv, mode: Mode::Condensed, incremental: true, csv_null: CsvNull::Literal };
    let mut gz = Vec::new();
    write_part(&spec, emitted.into_iter(), &mut gz).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    let mut lines = text.split('\n').filter(|l| !l.is_empty());
    let decoder = TsvDecoder::new(lines.next().unwrap(), def).unwrap();
    let decoded: Vec<_> = lines.enumerate().map(|(i, l)| decoder.decode(l, i as u64 + 2).unwrap()).collect();
    assert_eq!(decoded.len(), rows.len());
    assert_same_rows_within(def, &typed(def, &decoded), &truth(def, rows), "decoded TSV", &[]);
    decoded
}

fn truth(def: &TableDef, rows: &[(i64, Vec<Value>)]) -> Vec<Map<String, Json>> {
    rows.iter()
        .map(|(id, values)| {
            let mut m = Map::new();
            m.insert(def.key.name.clone(), json!(id));
            for (c, v) in def.values.iter().zip(values) {
                m.insert(c.name.clone(), value_json(v));
            }
            m
        })
        .collect()
}

fn typed(def: &TableDef, records: &[dap_replica::decode::Record]) -> Vec<Map<String, Json>> {
    records
        .iter()
        .map(|r| {
            let mut m = Map::new();
            m.insert(def.key.name.clone(), value_json(&r.key));
            for (c, v) in def.values.iter().zip(&r.values) {
                m.insert(c.name.clone(), value_json(v));
            }
            m
        })
        .collect()
}

fn one_part(records: Vec<dap_replica::decode::Record>) -> Feed {
    let (tx, feed) = Feed::channel(4);
    tokio::spawn(async move {
        for p in [Piece::Begin("part".into()), Piece::Rows(records), Piece::End("part".into()), Piece::Done] {
            tx.send(p).await.unwrap();
        }
    });
    feed
}

fn bookkeeping(def: &TableDef) -> Bookkeeping {
    let mut schema = dap_replica::emulator::dataset::envelope(&flat(), 1)["schema"].clone();
    schema["properties"].as_object_mut().unwrap().shift_remove("meta");
    Bookkeeping {
        namespace: def.namespace.clone(),
        table: def.name.clone(),
        watermark: 0,
        schema_version: 1,
        schema_description: schema.to_string(),
    }
}

/// Every backend, with the table initialised (empty).
async fn targets(def: &TableDef) -> Vec<(TestTarget, Arc<dyn Sink>)> {
    let mut out = Vec::new();
    for backend in backends() {
        let t = TestTarget::fresh(backend, "values").await;
        let sink = t.open(NS).await; // NaN and infinity as NULL on MySQL; refusing them has its own test
        sink.stage(def, "init").await.unwrap();
        sink.load(def, "init", one_part(Vec::new())).await.unwrap();
        sink.publish(def, &SchemaDelta::default(), &bookkeeping(def)).await.unwrap();
        out.push((t, sink));
    }
    out
}

/// Stores `rows` in every target both ways, and compares them, read back, with what was written:
/// as a snapshot (stage, load, publish) of a table of their own, and as upserts of new keys
/// (a sync) into the table.
async fn store_and_compare(targets: &[(TestTarget, Arc<dyn Sink>)], def: &TableDef, rows: &[(i64, Vec<Value>)]) {
    let decoded = through_tsv(def, rows);
    let keys: Vec<Json> = rows.iter().map(|(id, _)| json!(id)).collect();
    let snapshot = TableDef { name: format!("{TABLE}_snapshot"), ..def.clone() };
    let job = format!("job-{}", rows[0].0);
    for (t, sink) in targets {
        sink.stage(&snapshot, &job).await.unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
        sink.load(&snapshot, &job, one_part(decoded.clone())).await.unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
        sink.publish(&snapshot, &SchemaDelta::default(), &bookkeeping(&snapshot))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
        assert_same_rows_within(
            &snapshot,
            &t.rows(&snapshot).await,
            &truth(def, rows),
            &format!("{:?}: loaded as a snapshot and read back", t.backend),
            t.limits(),
        );
    }
    for (t, sink) in targets {
        sink.apply_changes(def, &SchemaDelta::default(), one_part(decoded.clone()), &bookkeeping(def))
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", t.backend));
        let stored: Vec<Map<String, Json>> =
            t.rows(def).await.into_iter().filter(|r| keys.contains(&canonical(&def.key.ty, &r["id"]))).collect();
        assert_same_rows_within(
            def,
            &stored,
            &truth(def, rows),
            &format!("{:?}: stored and read back", t.backend),
            t.limits(),
        );
    }
}

#[test]
fn every_value_of_every_type_round_trips_through_tsv_and_every_target() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let def = def();
    let targets = rt.block_on(targets(&def));

    // The edges of every domain, always.
    let generator = Generator { seed: 1, anchor: 0, special_floats: true, edge_rows: true, id_space: 0 };
    let edges: Vec<Vec<Value>> = def.values.iter().map(|c| generator.edges(&c.ty, true)).collect();
    let widest = edges.iter().map(Vec::len).max().unwrap();
    let edge_rows: Vec<(i64, Vec<Value>)> =
        (0..widest).map(|k| (k as i64 + 1, edges.iter().map(|e| e[k % e.len()].clone()).collect())).collect();
    rt.block_on(store_and_compare(&targets, &def, &edge_rows));

    // Random values from the whole domain; every case stores new keys. The seed is printed, and
    // DAP_PROPTEST_SEED runs the same cases again; a seed that failed is written to SEEDS, and
    // every later run replays the seeds there before a new one.
    let fresh: u64 =
        std::env::var("DAP_PROPTEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    let next_key = std::sync::atomic::AtomicI64::new(1_000);
    for seed in persisted_seeds().into_iter().chain([fresh]) {
        eprintln!("values: random cases from seed {seed} (DAP_PROPTEST_SEED={seed} repeats them)");
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
        let config = Config { cases: 40, failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new_with_rng(config, rng);
        let outcome = runner.run(&proptest::collection::vec(row(&def), 1..6), |rows| {
            let rows: Vec<(i64, Vec<Value>)> =
                rows.into_iter().map(|r| (next_key.fetch_add(1, std::sync::atomic::Ordering::SeqCst), r)).collect();
            rt.block_on(store_and_compare(&targets, &def, &rows));
            Ok(())
        });
        if let Err(e) = outcome {
            persist_seed(seed);
            panic!("{e}\nseed {seed}: DAP_PROPTEST_SEED={seed} repeats these cases; it is kept in {SEEDS} (commit it)");
        }
    }
}

/// Seeds whose cases once failed, one per line (`#` starts a comment): replayed by every run.
const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/suite/values.seeds");

fn persisted_seeds() -> Vec<u64> {
    std::fs::read_to_string(SEEDS)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('#').next().unwrap_or("").trim().parse().ok())
        .collect()
}

fn persist_seed(seed: u64) {
    if !persisted_seeds().contains(&seed) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(SEEDS).unwrap();
        writeln!(file, "{seed} # failed on {}", chrono::Utc::now().format("%Y-%m-%d")).unwrap();
    }
}

//! Row-by-row comparison of a replica with the emulator's ground truth, as typed values: both
//! sides are brought to one canonical JSON form per column type before comparing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use dap_replica::schema::{ColumnType, TableDef};
use dap_replica::time;
use serde_json::{Map, Value as Json};

/// The canonical form of a value of type `ty`, from any of the forms a replica returns.
pub fn canonical(ty: &ColumnType, v: &Json) -> Json {
    if v.is_null() {
        return Json::Null;
    }
    match ty {
        ColumnType::Timestamp => {
            let s = v.as_str().expect("timestamp as text");
            let s = s.replace(' ', "T");
            let with_zone = if s.ends_with('Z') || s.contains('+') { s } else { format!("{s}Z") };
            Json::String(time::format_wire(time::parse_rfc3339(&with_zone).unwrap_or_else(|e| panic!("{e}"))))
        }
        ColumnType::Float(_) => match v {
            Json::String(s) => Json::String(s.clone()),
            n => serde_json::json!(n.as_f64().expect("float")),
        },
        ColumnType::Decimal { scale, .. } => {
            let f = match v {
                Json::String(s) => s.parse::<f64>().expect("decimal text"),
                n => n.as_f64().expect("decimal number"),
            };
            Json::String(format!("{f:.*}", *scale as usize))
        }
        ColumnType::Ip | ColumnType::Ipv4 | ColumnType::Ipv6 => {
            let s = v.as_str().expect("ip as text");
            let ip: IpAddr = s.split('/').next().unwrap().parse().expect("ip");
            Json::String(ip.to_string())
        }
        ColumnType::Uuid => Json::String(v.as_str().expect("uuid as text").to_lowercase()),
        ColumnType::Bool => match v {
            Json::Number(n) => Json::Bool(n.as_i64() != Some(0)),
            b => b.clone(),
        },
        _ => v.clone(),
    }
}

fn key_text(def: &TableDef, row: &Map<String, Json>) -> String {
    canonical(&def.key.ty, &row[&def.key.name]).to_string()
}

/// Asserts that `actual` holds exactly the rows of `truth`, comparing every column as a typed
/// value; reports up to 10 differences naming table, key and column.
pub fn assert_same_rows(def: &TableDef, actual: &[Map<String, Json>], truth: &[Map<String, Json>], what: &str) {
    let index = |rows: &[Map<String, Json>]| -> BTreeMap<String, Map<String, Json>> {
        rows.iter().map(|r| (key_text(def, r), r.clone())).collect()
    };
    let (a, t) = (index(actual), index(truth));
    let mut problems = Vec::new();
    if actual.len() != a.len() {
        problems.push(format!("{} duplicate keys in the replica", actual.len() - a.len()));
    }
    for k in t.keys().filter(|k| !a.contains_key(*k)).take(5) {
        problems.push(format!("key {k} missing from the replica"));
    }
    for k in a.keys().filter(|k| !t.contains_key(*k)).take(5) {
        problems.push(format!("key {k} is in the replica but not in the truth"));
    }
    'rows: for (k, trow) in &t {
        let Some(arow) = a.get(k) else { continue };
        for c in def.columns() {
            let expected = canonical(&c.ty, trow.get(&c.name).unwrap_or(&Json::Null));
            let got = canonical(&c.ty, arow.get(&c.name).unwrap_or(&Json::Null));
            if expected != got {
                problems.push(format!("key {k} column {}: expected {expected}, replica has {got}", c.name));
                if problems.len() >= 10 {
                    break 'rows;
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: {}.{} differs from the emulator's truth ({} truth rows, {} replica rows):\n  {}",
        def.namespace,
        def.name,
        truth.len(),
        actual.len(),
        problems.join("\n  ")
    );
}

/// Every row of a PostgreSQL table as JSON objects (`row_to_json`).
pub async fn postgres_rows(client: &tokio_postgres::Client, ns: &str, table: &str) -> Vec<Map<String, Json>> {
    let rows = client
        .query(&format!("SELECT row_to_json(t)::text FROM \"{ns}\".\"{table}\" t"), &[])
        .await
        .unwrap_or_else(|e| panic!("reading {ns}.{table}: {e}"));
    rows.iter().map(|r| serde_json::from_str(r.get::<_, &str>(0)).expect("row_to_json gives JSON")).collect()
}

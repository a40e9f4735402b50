//! Row-by-row comparison of a replica with the emulator's ground truth, as typed values: both
//! sides are brought to one canonical JSON form per column type before comparing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use dap_replica::schema::{ColumnType, TableDef};
use serde_json::{Map, Value as Json};

/// The canonical form of a value of type `ty`, from any of the forms a replica returns. Exact:
/// floats keep their sign of zero and every bit (compared as their shortest text), decimals
/// every digit.
pub fn canonical(ty: &ColumnType, v: &Json) -> Json {
    if v.is_null() {
        return Json::Null;
    }
    let text = || match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    match ty {
        ColumnType::Timestamp | ColumnType::Date if matches!(text().as_str(), "infinity" | "-infinity") => v.clone(),
        // Dates and times are read and written with chrono, never with the code under test.
        ColumnType::Timestamp => {
            let s = text().replace(' ', "T");
            let with_zone = if s.ends_with('Z') || s.contains('+') { s } else { format!("{s}Z") };
            let t = chrono::DateTime::parse_from_rfc3339(&with_zone).unwrap_or_else(|e| panic!("{with_zone:?}: {e}"));
            Json::String(t.with_timezone(&chrono::Utc).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        }
        ColumnType::Date => {
            let s = text();
            let d = chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d").unwrap_or_else(|e| panic!("{s:?}: {e}"));
            Json::String(d.format("%Y-%m-%d").to_string())
        }
        ColumnType::Time => {
            let s = text();
            let t = chrono::NaiveTime::parse_from_str(s.trim_end_matches('Z'), "%H:%M:%S%.f")
                .unwrap_or_else(|e| panic!("{s:?}: {e}"));
            Json::String(t.format("%H:%M:%S%.6f").to_string())
        }
        ColumnType::Float(bits) => {
            let f = match v {
                Json::Number(n) => n.as_f64().expect("float"),
                Json::String(s) => parse_float(s),
                other => panic!("{other} is not a float"),
            };
            Json::String(if *bits == 32 { float_text(f as f32 as f64) } else { float_text(f) })
        }
        ColumnType::Decimal { scale, .. } => Json::String(match v {
            Json::String(s) => exact_decimal(s, *scale),
            n => format!("{:.*}", *scale as usize, n.as_f64().expect("decimal number")),
        }),
        ColumnType::Ip | ColumnType::Ipv4 | ColumnType::Ipv6 => {
            // A host's own prefix (/32, /128) is how some drivers print an address; any other
            // prefix is a different value and is kept, so that it cannot compare equal.
            let s = text();
            let (address, prefix) = s.split_once('/').map_or((s.as_str(), None), |(a, p)| (a, Some(p)));
            let ip: IpAddr = address.parse().unwrap_or_else(|e| panic!("{s:?} is not an address: {e}"));
            let host = if ip.is_ipv4() { "32" } else { "128" };
            match prefix {
                None => Json::String(ip.to_string()),
                Some(p) if p == host => Json::String(ip.to_string()),
                Some(p) => Json::String(format!("{ip}/{p}")),
            }
        }
        ColumnType::Uuid => Json::String(text().to_lowercase()),
        // Strict: a replica's boolean is one of the forms below, anything else is a finding.
        ColumnType::Bool => match v {
            Json::Number(n) => match n.as_i64() {
                Some(0) => Json::Bool(false),
                Some(1) => Json::Bool(true),
                _ => panic!("{n} is not a boolean"),
            },
            Json::String(s) => match s.as_str() {
                "t" | "true" | "1" => Json::Bool(true),
                "f" | "false" | "0" => Json::Bool(false),
                other => panic!("{other:?} is not a boolean"),
            },
            Json::Bool(_) => v.clone(),
            other => panic!("{other} is not a boolean"),
        },
        ColumnType::Int(_) | ColumnType::IntEnum(_) => match v {
            Json::String(s) => Json::from(s.parse::<i64>().expect("integer text")),
            n => n.clone(),
        },
        _ => v.clone(),
    }
}

/// A float's text in the truth: `NaN`, `Infinity`, `-Infinity`, else Rust's shortest
/// round-tripping form. Written here, not borrowed from the code under test, so that a change
/// there cannot move both sides of a comparison at once.
pub fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{f:?}")
    }
}

/// A UUID's text in the truth (lowercase, hyphenated), by the uuid crate rather than the code
/// under test.
pub fn uuid_text(u: u128) -> String {
    uuid::Uuid::from_u128(u).hyphenated().to_string()
}

/// A value of the code's own type as the truth writes it, formatted here (chrono, the uuid crate,
/// the standard library) and never by the code under test (`Value::to_typed_json`), so that a
/// formatting bug there cannot move both sides of a comparison at once.
pub fn value_json(v: &dap_replica::value::Value) -> Json {
    use dap_replica::value::Value as V;
    let text = |s: String| Json::String(s);
    match v {
        V::Null => Json::Null,
        V::Bool(b) => Json::Bool(*b),
        V::Int(i) => Json::from(*i),
        V::Float(f) if f.is_finite() => Json::from(*f),
        V::Float(f) => text(float_text(*f)),
        V::Decimal(d) => {
            let (sign, digits) = (if d.mantissa < 0 { "-" } else { "" }, d.mantissa.unsigned_abs().to_string());
            let scale = usize::from(d.scale);
            let digits = format!("{digits:0>width$}", width = scale + 1);
            let (int, frac) = digits.split_at(digits.len() - scale);
            text(if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") })
        }
        V::Str(s) => text(s.clone()),
        V::Timestamp(us) => text(
            chrono::DateTime::from_timestamp_micros(*us)
                .unwrap_or_else(|| panic!("timestamp {us} µs out of chrono's range"))
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string(),
        ),
        V::Date(days) => text(
            (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(i64::from(*days)))
                .format("%Y-%m-%d")
                .to_string(),
        ),
        V::Time(us) => {
            text((chrono::NaiveTime::MIN + chrono::Duration::microseconds(*us)).format("%H:%M:%S%.6f").to_string())
        }
        V::Uuid(u) => text(uuid_text(*u)),
        V::Ip(ip) => text(ip.to_string()),
        V::Json(j) => j.clone(),
    }
}

/// A float from the texts replicas use: `NaN`, `Infinity`, `inf`, `-0`, `1e300`, …
pub fn parse_float(s: &str) -> f64 {
    match s {
        "NaN" | "nan" => f64::NAN,
        "Infinity" | "inf" | "infinity" => f64::INFINITY,
        "-Infinity" | "-inf" | "-infinity" => f64::NEG_INFINITY,
        s => s.parse().unwrap_or_else(|_| panic!("{s:?} is not a float")),
    }
}

/// `-12.3` at scale 2 is `-12.30`: the same digits, padded to the scale (never rounded).
pub fn exact_decimal(s: &str, scale: u8) -> String {
    let (neg, digits) = s.strip_prefix('-').map_or((false, s), |d| (true, d));
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    assert!(frac.len() <= scale as usize, "{s:?} has more fraction digits than scale {scale}");
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.is_empty();
    let sign = if neg && !zero { "-" } else { "" };
    if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac:0<width$}", width = scale as usize) }
}

fn key_text(def: &TableDef, row: &Map<String, Json>) -> String {
    canonical(&def.key.ty, &row[&def.key.name]).to_string()
}

/// A value a target documents that it cannot keep exactly; the truth is compared in the form the
/// target keeps instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// SQLite's REAL has no negative zero: -0.0 is stored as 0.0.
    NoNegativeZero,
    /// The official client's PostgreSQL driver (asyncpg) writes the first and last date and
    /// timestamp Python has (0001-01-01, 9999-12-31T23:59:59.999999) as -infinity and infinity.
    InfinityAtTheEnds,
    /// MySQL's `datetime` and `time` (no precision, as the official layout has them) keep whole
    /// seconds: the fraction is cut.
    WholeSeconds,
    /// NaN and ±infinity are stored as NULL (MySQL with `--non-finite null`).
    NonFiniteAsNull,
    /// An IPv4 address in MySQL's `binary(16)` column of IPv4-or-IPv6 is four bytes padded with
    /// twelve zero bytes, which read back as the IPv6 address of those sixteen bytes.
    PaddedIpv4,
}

/// A value in the form both sides share under the target's limits: applied to the truth and to
/// the replica, so that either form of a value the target may hold compares equal.
fn within_limits(ty: &ColumnType, v: Json, limits: &[Limit]) -> Json {
    let Json::String(s) = &v else { return v };
    let same = |text: &str| Json::String(text.into());
    match ty {
        ColumnType::Float(_)
            if limits.contains(&Limit::NonFiniteAsNull) && matches!(s.as_str(), "NaN" | "Infinity" | "-Infinity") =>
        {
            Json::Null
        }
        ColumnType::Float(_) if s == "-0.0" && limits.contains(&Limit::NoNegativeZero) => same("0.0"),
        ColumnType::Timestamp if limits.contains(&Limit::InfinityAtTheEnds) => match s.as_str() {
            "-infinity" => same("0001-01-01T00:00:00.000000Z"),
            "infinity" => same("9999-12-31T23:59:59.999999Z"),
            _ => v,
        },
        ColumnType::Date if limits.contains(&Limit::InfinityAtTheEnds) => match s.as_str() {
            "-infinity" => same("0001-01-01"),
            "infinity" => same("9999-12-31"),
            _ => v,
        },
        ColumnType::Timestamp | ColumnType::Time if limits.contains(&Limit::WholeSeconds) => match s.split_once('.') {
            Some((whole, fraction)) => {
                let digits = fraction.chars().take_while(char::is_ascii_digit).count();
                same(&format!("{whole}.{}{}", "0".repeat(digits), &fraction[digits..]))
            }
            None => v,
        },
        ColumnType::Ip if limits.contains(&Limit::PaddedIpv4) => match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                let mut bytes = [0u8; 16];
                bytes[..4].copy_from_slice(&a.octets());
                same(&std::net::Ipv6Addr::from(bytes).to_string())
            }
            _ => v,
        },
        _ => v,
    }
}

/// Every row as one line, its key then every column in the form both sides share under `limits`,
/// in key order: whole tables compared by equality, every column of every row.
pub fn row_lines(def: &TableDef, rows: &[Map<String, Json>], limits: &[Limit]) -> Vec<String> {
    let mut lines: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            let cells: Vec<String> = def
                .columns()
                .map(|c| {
                    sorted_keys(within_limits(&c.ty, canonical(&c.ty, r.get(&c.name).unwrap_or(&Json::Null)), limits))
                        .to_string()
                })
                .collect();
            (key_text(def, r), cells.join("\t"))
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(key, cells)| format!("{key}\t{cells}")).collect()
}

/// A JSON value with every object's members in name order: equal values print the same (a
/// target such as PostgreSQL's jsonb keeps its own member order).
fn sorted_keys(v: Json) -> Json {
    match v {
        Json::Object(m) => {
            let mut members: Vec<(String, Json)> = m.into_iter().map(|(k, v)| (k, sorted_keys(v))).collect();
            members.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(members.into_iter().collect())
        }
        Json::Array(a) => Json::Array(a.into_iter().map(sorted_keys).collect()),
        other => other,
    }
}

/// Asserts that `actual` holds exactly the rows of `truth`, comparing every column as a typed
/// value; reports up to 10 differences naming table, key and column.
pub fn assert_same_rows(def: &TableDef, actual: &[Map<String, Json>], truth: &[Map<String, Json>], what: &str) {
    assert_same_rows_within(def, actual, truth, what, &[])
}

/// [`assert_same_rows`] for a target with documented limits.
pub fn assert_same_rows_within(
    def: &TableDef,
    actual: &[Map<String, Json>],
    truth: &[Map<String, Json>],
    what: &str,
    limits: &[Limit],
) {
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
            let expected = within_limits(&c.ty, canonical(&c.ty, trow.get(&c.name).unwrap_or(&Json::Null)), limits);
            let got = within_limits(&c.ty, canonical(&c.ty, arow.get(&c.name).unwrap_or(&Json::Null)), limits);
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

/// [`assert_same_rows_within`] for a table two clients wrote: `limits` (one client's) apply to
/// the rows whose key `limited` selects, every other row compares exactly, so that a limit of
/// one writer cannot hide a fault of the other.
pub fn assert_same_rows_where(
    def: &TableDef,
    actual: &[Map<String, Json>],
    truth: &[Map<String, Json>],
    what: &str,
    limits: &[Limit],
    limited: impl Fn(&Json) -> bool,
) {
    let key = |r: &Map<String, Json>| canonical(&def.key.ty, r.get(&def.key.name).unwrap_or(&Json::Null));
    type Rows = Vec<Map<String, Json>>;
    let split = |rows: &[Map<String, Json>]| -> (Rows, Rows) { rows.iter().cloned().partition(|r| limited(&key(r))) };
    let ((actual_limited, actual_exact), (truth_limited, truth_exact)) = (split(actual), split(truth));
    assert!(!truth_exact.is_empty(), "{what}: some rows of {}.{} compare exactly", def.namespace, def.name);
    assert_same_rows_within(def, &actual_limited, &truth_limited, &format!("{what} (rows under {limits:?})"), limits);
    assert_same_rows_within(def, &actual_exact, &truth_exact, &format!("{what} (rows compared exactly)"), &[]);
}

/// Every row of a PostgreSQL table as JSON objects, each column read as its text (floats and
/// decimals exactly, arrays and JSON as JSON).
pub async fn postgres_rows(client: &tokio_postgres::Client, def: &TableDef) -> Vec<Map<String, Json>> {
    let columns: Vec<&dap_replica::schema::Column> = def.columns().collect();
    let select: Vec<String> = columns
        .iter()
        .map(|c| match c.ty {
            ColumnType::Array(_) => format!("array_to_json(\"{}\")::text", c.name),
            _ => format!("\"{}\"::text", c.name),
        })
        .collect();
    let sql = format!("SELECT {} FROM \"{}\".\"{}\"", select.join(", "), def.namespace, def.name);
    let rows = client.query(&sql, &[]).await.unwrap_or_else(|e| panic!("reading {}.{}: {e}", def.namespace, def.name));
    rows.iter()
        .map(|r| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let text: Option<&str> = r.get(i);
                    let v = match (text, &c.ty) {
                        (None, _) => Json::Null,
                        (Some(t), ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json) => {
                            serde_json::from_str(t).expect("JSON text")
                        }
                        (Some(t), _) => Json::String(t.to_string()),
                    };
                    (c.name.clone(), v)
                })
                .collect()
        })
        .collect()
}

/// Every row of a table in a SQLite file as JSON objects, read back by column type.
pub fn sqlite_rows(db: &std::path::Path, def: &TableDef) -> Vec<Map<String, Json>> {
    use rusqlite::types::ValueRef;
    let conn = rusqlite::Connection::open(db).unwrap();
    let columns: Vec<_> = def.columns().cloned().collect();
    let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
    let mut stmt = conn
        .prepare(&format!("SELECT {} FROM \"{}\"", names.join(", "), def.name))
        .unwrap_or_else(|e| panic!("{}.{}: {e}", def.namespace, def.name));
    let rows = stmt
        .query_map([], |row| {
            let mut m = Map::new();
            for (i, c) in columns.iter().enumerate() {
                let v = match row.get_ref(i)? {
                    ValueRef::Null => Json::Null,
                    ValueRef::Integer(n) => Json::from(n),
                    ValueRef::Real(f) => Json::String(float_text(f)),
                    ValueRef::Text(t) => {
                        let s = String::from_utf8(t.to_vec()).unwrap();
                        match c.ty {
                            ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => {
                                serde_json::from_str(&s).unwrap()
                            }
                            _ => Json::String(s),
                        }
                    }
                    ValueRef::Blob(_) => panic!("no blobs in the mirror"),
                };
                m.insert(c.name.clone(), v);
            }
            Ok(m)
        })
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// Every row of a MariaDB/MySQL table (`"ns__table"`) as JSON objects: binary columns (UUIDs,
/// packed IPs) read as hex and turned back into text, the rest as the server's text.
pub async fn mysql_rows(pool: &mysql_async::Pool, def: &TableDef) -> Vec<Map<String, Json>> {
    use mysql_async::prelude::Queryable;
    let columns: Vec<&dap_replica::schema::Column> = def.columns().collect();
    let binary =
        |ty: &ColumnType| matches!(ty, ColumnType::Uuid | ColumnType::Ip | ColumnType::Ipv4 | ColumnType::Ipv6);
    let select: Vec<String> = columns
        .iter()
        .map(|c| if binary(&c.ty) { format!("HEX(`{}`)", c.name) } else { format!("`{}`", c.name) })
        .collect();
    let sql = format!("SELECT {} FROM `{}__{}`", select.join(", "), def.namespace, def.name);
    let mut conn = pool.get_conn().await.unwrap();
    let rows: Vec<mysql_async::Row> = conn.query(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter()
        .map(|row| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let text = match row.as_ref(i) {
                        Some(mysql_async::Value::Bytes(b)) => Some(String::from_utf8(b.clone()).expect("UTF-8 text")),
                        Some(mysql_async::Value::NULL) | None => None,
                        Some(other) => Some(other.as_sql(true)),
                    };
                    let v = match (text, &c.ty) {
                        (None, _) => Json::Null,
                        (Some(t), ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json) => {
                            serde_json::from_str(&t).expect("JSON text")
                        }
                        (Some(t), ColumnType::Uuid) => {
                            let u = u128::from_str_radix(&t, 16).expect("hex");
                            Json::String(uuid_text(u))
                        }
                        (Some(t), ColumnType::Ip | ColumnType::Ipv4 | ColumnType::Ipv6) => {
                            let bytes: Vec<u8> = (0..t.len())
                                .step_by(2)
                                .map(|k| u8::from_str_radix(&t[k..k + 2], 16).unwrap())
                                .collect();
                            let ip: IpAddr = match bytes.len() {
                                4 => <[u8; 4]>::try_from(bytes).unwrap().into(),
                                16 => <[u8; 16]>::try_from(bytes).unwrap().into(),
                                n => panic!("{n} bytes are no IP address"),
                            };
                            Json::String(ip.to_string())
                        }
                        (Some(t), _) => Json::String(t),
                    };
                    (c.name.clone(), v)
                })
                .collect()
        })
        .collect()
}

/// Every row of a SQL Server table (`"ns"."table"`) as JSON objects, read through `tiberius`:
/// enum ids mapped back through their lookup tables, text read as NVARCHAR, binary columns
/// (UUIDs, packed IPs) turned back into text, dates and times formatted with chrono.
pub async fn mssql_rows(url: &str, def: &TableDef) -> Vec<Map<String, Json>> {
    use tiberius::ColumnData;
    let columns: Vec<&dap_replica::schema::Column> = def.columns().collect();
    let mut select = Vec::new();
    let mut joins = String::new();
    for (i, c) in columns.iter().enumerate() {
        select.push(match &c.ty {
            ColumnType::Enum(_) => {
                joins.push_str(&format!(
                    " LEFT JOIN \"{ns}\".\"{t}__{c}\" AS l{i} ON l{i}.\"id\" = t.\"{c}\"",
                    ns = def.namespace,
                    t = def.name,
                    c = c.name
                ));
                format!("CAST(l{i}.\"value\" AS nvarchar(256))")
            }
            ColumnType::Str { .. } | ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => {
                format!("CAST(t.\"{}\" AS nvarchar(max))", c.name)
            }
            _ => format!("t.\"{}\"", c.name),
        });
    }
    let sql = format!("SELECT {} FROM \"{}\".\"{}\" AS t{joins}", select.join(", "), def.namespace, def.name);
    let mut client = crate::mssql::connect(url).await;
    let rows = client
        .simple_query(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_first_result()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let day_zero = chrono::NaiveDate::from_ymd_opt(1, 1, 1).unwrap();
    let time_of = |t: tiberius::time::Time| {
        let nanos = t.increments() * 10u64.pow(9 - t.scale() as u32);
        chrono::NaiveTime::from_num_seconds_from_midnight_opt(
            (nanos / 1_000_000_000) as u32,
            (nanos % 1_000_000_000) as u32,
        )
        .unwrap()
    };
    rows.into_iter()
        .map(|row| {
            columns
                .iter()
                .zip(row)
                .map(|(c, cell)| {
                    let v = match cell {
                        ColumnData::U8(v) => v.map(Json::from),
                        ColumnData::I16(v) => v.map(Json::from),
                        ColumnData::I32(v) => v.map(Json::from),
                        ColumnData::I64(v) => v.map(Json::from),
                        ColumnData::F32(v) => v.map(|f| Json::String((f as f64).to_string())),
                        ColumnData::F64(v) => v.map(|f| Json::String(f.to_string())),
                        ColumnData::Bit(v) => v.map(Json::Bool),
                        ColumnData::Numeric(v) => v.map(|n| Json::String(n.to_string())),
                        ColumnData::String(v) => v.map(|s| match c.ty {
                            ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => {
                                serde_json::from_str(&s).expect("JSON text")
                            }
                            _ => Json::String(s.into_owned()),
                        }),
                        ColumnData::Binary(v) => v.map(|b| match c.ty {
                            ColumnType::Uuid => {
                                Json::String(uuid_text(u128::from_be_bytes(b.as_ref().try_into().expect("16 bytes"))))
                            }
                            _ => Json::String(match b.len() {
                                4 => IpAddr::from(<[u8; 4]>::try_from(b.as_ref()).unwrap()).to_string(),
                                16 => IpAddr::from(<[u8; 16]>::try_from(b.as_ref()).unwrap()).to_string(),
                                n => panic!("{n} bytes are no IP address"),
                            }),
                        }),
                        ColumnData::DateTime2(v) => v.map(|d| {
                            let date = day_zero + chrono::Duration::days(d.date().days() as i64);
                            Json::String(format!(
                                "{}T{}Z",
                                date.format("%Y-%m-%d"),
                                time_of(d.time()).format("%H:%M:%S%.f")
                            ))
                        }),
                        ColumnData::Date(v) => v.map(|d| {
                            Json::String(
                                (day_zero + chrono::Duration::days(d.days() as i64)).format("%Y-%m-%d").to_string(),
                            )
                        }),
                        ColumnData::Time(v) => v.map(|t| Json::String(time_of(t).format("%H:%M:%S%.f").to_string())),
                        other => panic!("{}.{}: no reading of {other:?}", def.name, c.name),
                    };
                    (c.name.clone(), v.unwrap_or(Json::Null))
                })
                .collect()
        })
        .collect()
}

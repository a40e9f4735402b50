//! Deterministic synthetic rows from a table schema: every type and format, enums including
//! `__dap_unspecified__`, NULLs in optional columns, awkward text (tabs, newlines, quotes,
//! backslashes, non-ASCII), the oversized placeholder, nested objects and arrays, timestamps with
//! and without fractions, large integers and (optionally) non-finite floats.
//!
//! A value depends only on (seed, table, key index, revision, column name), so rows never need
//! to be stored and adding a column leaves the other columns unchanged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value as Json};

use super::rng::{Rng, hash_str, mix};
use crate::schema::{Column, ColumnType, OVERSIZED_PLACEHOLDER, TableDef};
use crate::time::{MICROS_PER_DAY, Micros};
use crate::value::{Decimal, Value};

/// Canvas ids are shard-prefixed: large numbers that a float would not hold exactly.
const SHARD_OFFSET: i64 = 10_000_000_000_000;

const TEXT: &[&str] = &[
    "Introduction to Biology",
    "week",
    "Ünïcödé café",
    "日本語のテキスト",
    "🎓 graduation",
    "tab\there",
    "line one\nline two",
    "windows\r\nline",
    "say \"hello\"",
    "back\\slash",
    "comma, separated",
    "NULL",
    "\\N",
    "it's",
    "<p>html &amp; more</p>",
    " padded ",
    "=SUM(A1)",
    "{\"looks\": \"like json\"}",
];

#[derive(Debug, Clone, Copy)]
pub struct Generator {
    pub seed: u64,
    /// The export time of the base data; generated timestamps lie in the three years before it.
    pub anchor: Micros,
    /// Emit NaN and ±infinity now and then in top-level float columns.
    pub special_floats: bool,
    /// Whether base rows `1..=EDGE_ROWS` carry the domain edges.
    pub edge_rows: bool,
    /// How many base rows int64-keyed tables have: `*_id` columns point at keys in this range
    /// (0: they hold random integers).
    pub id_space: u64,
}

/// How often a reference (`user_id`, `course_id`, …) points at no row, as real exports have a few.
const DANGLING: f64 = 0.03;

/// What a column holds beyond its type, read from its name (and its table's): references, scores,
/// people's and courses' names, recent log times. Real Canvas data has these shapes, and analysts'
/// joins and averages depend on them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Meaning {
    /// `*_id` (int64): the key of another table's row, mostly one that exists.
    Reference,
    /// A score (float): 0 to 100 in quarter points, never special.
    Score,
    PersonName,
    CourseName,
    /// `web_logs.timestamp`: requests of the last two weeks.
    RecentTime,
    Plain,
}

fn meaning(def: &TableDef, c: &Column) -> Meaning {
    let name = c.name.as_str();
    match (&c.ty, def.name.as_str()) {
        (ColumnType::Int(64), _) if name.ends_with("_id") => Meaning::Reference,
        (ColumnType::Float(_), _) if name.contains("score") => Meaning::Score,
        (ColumnType::Str { .. }, "users") if matches!(name, "name" | "sortable_name" | "short_name") => {
            Meaning::PersonName
        }
        (ColumnType::Str { .. }, "courses") if name == "name" => Meaning::CourseName,
        (ColumnType::Timestamp, "web_logs") if name == "timestamp" => Meaning::RecentTime,
        _ => Meaning::Plain,
    }
}

const GIVEN_NAMES: &[&str] = &[
    "Ada", "Amara", "Ben", "Chen", "Diego", "Elif", "Fatima", "Hana", "Ivan", "Jonas", "Lena", "Mateo", "Noah",
    "Priya", "Sofia", "Zoë",
];
const FAMILY_NAMES: &[&str] = &[
    "Okafor", "García", "Nguyen", "Müller", "Kowalski", "Tanaka", "Smith", "Haddad", "Ivanova", "O'Brien", "Rossi",
    "Singh",
];
const SUBJECTS: &[&str] = &[
    "Biology",
    "Chemistry",
    "Calculus",
    "Statistics",
    "World History",
    "Philosophy",
    "Economics",
    "Computer Science",
    "Linear Algebra",
    "Organic Chemistry",
    "English Literature",
    "Psychology",
];
const LEVELS: &[&str] = &["Introduction to", "Foundations of", "Advanced", "Seminar in", "Topics in"];

impl Generator {
    pub fn table_seed(&self, def: &TableDef) -> u64 {
        mix(&[self.seed, hash_str(&def.namespace), hash_str(&def.name)])
    }

    /// The primary key of the row with index `idx` (1-based): shard-prefixed integers increasing
    /// with `idx`, or v4 UUIDs.
    pub fn key(&self, def: &TableDef, idx: u64) -> Value {
        match def.key.ty {
            ColumnType::Int(64) => Value::Int(SHARD_OFFSET + idx as i64),
            ColumnType::Int(_) => Value::Int(idx as i64),
            ColumnType::Uuid => {
                // idx in the low bits keeps keys unique (and ordered by idx within the high bits).
                let hi = mix(&[self.table_seed(def), idx]) as u128;
                Value::Uuid(uuid_v4((hi << 64) | idx as u128))
            }
            _ => Value::Str(format!("key-{idx:012}")),
        }
    }

    /// The value columns of a row version, in `def.values` order. The first [`EDGE_ROWS`] base
    /// rows hold the edges of every column's domain (see [`edges`]); other rows are random.
    pub fn row(&self, def: &TableDef, idx: u64, revision: u32) -> Vec<Value> {
        let row_seed = mix(&[self.table_seed(def), idx, revision as u64]);
        def.values
            .iter()
            .map(|c| {
                let mut rng = Rng::new(mix(&[row_seed, hash_str(&c.name)]));
                let meaning = meaning(def, c);
                if self.edge_rows && revision == 0 && (1..=EDGE_ROWS).contains(&idx) {
                    let edges = match meaning {
                        Meaning::Score => [0.0, 100.0, 0.25, 99.75, 50.5].map(Value::Float).to_vec(),
                        _ => self.edges(&c.ty, true),
                    };
                    return edges[(idx as usize - 1) % edges.len()].clone();
                }
                // Names are there (a nameless course or person is rare enough to leave out).
                let named = matches!(meaning, Meaning::PersonName | Meaning::CourseName);
                if !c.required && !named && rng.chance(0.15) {
                    return Value::Null;
                }
                match meaning {
                    Meaning::Reference if self.id_space > 0 && !rng.chance(DANGLING) => {
                        Value::Int(SHARD_OFFSET + rng.between(1, self.id_space as i64))
                    }
                    Meaning::Score => Value::Float(rng.below(401) as f64 / 4.0),
                    Meaning::PersonName => {
                        let (given, family) = (rng.pick(GIVEN_NAMES), rng.pick(FAMILY_NAMES));
                        Value::Str(if c.name == "sortable_name" {
                            format!("{family}, {given}")
                        } else {
                            format!("{given} {family}")
                        })
                    }
                    Meaning::CourseName => Value::Str(format!("{} {}", rng.pick(LEVELS), rng.pick(SUBJECTS))),
                    Meaning::RecentTime => {
                        Value::Timestamp(self.anchor - 1 - rng.below(14 * MICROS_PER_DAY as u64) as i64)
                    }
                    _ => self.value(&mut rng, &c.ty, true),
                }
            })
            .collect()
    }

    fn column(&self, rng: &mut Rng, c: &Column, top_level: bool) -> Value {
        if !c.required && rng.chance(0.15) {
            return Value::Null;
        }
        self.value(rng, &c.ty, top_level)
    }

    fn value(&self, rng: &mut Rng, ty: &ColumnType, top_level: bool) -> Value {
        match ty {
            ColumnType::Int(bits) => Value::Int(int(rng, *bits)),
            ColumnType::IntEnum(values) => Value::Int(*rng.pick(values)),
            ColumnType::Float(bits) => Value::Float(self.float(rng, *bits, top_level)),
            ColumnType::Decimal { precision, scale } => {
                let digits = (*precision as u32).min(38);
                let limit = 10u128.pow(digits) - 1;
                let small = 10u128.pow((*scale as u32 + 3).min(digits));
                let span = if rng.chance(0.9) { small } else { limit };
                let m = (((rng.next_u64() as u128) << 64 | rng.next_u64() as u128) % (span + 1)) as i128;
                Value::Decimal(Decimal { mantissa: if rng.chance(0.2) { -m } else { m }, scale: *scale })
            }
            ColumnType::Bool => Value::Bool(rng.chance(0.5)),
            ColumnType::Str { max_length, truncatable } => {
                if *truncatable && rng.chance(0.04) {
                    return Value::Str(OVERSIZED_PLACEHOLDER.into());
                }
                Value::Str(text(rng, max_length.unwrap_or(200)))
            }
            ColumnType::Enum(values) => Value::Str(rng.pick(values).clone()),
            ColumnType::Timestamp => Value::Timestamp(self.timestamp(rng)),
            ColumnType::Date => Value::Date(match rng.below(20) {
                0 => rng.between(FIRST_DAY.into(), LAST_DAY.into()) as i32,
                1 | 2 => rng.between(YEAR_1900_DAY.into(), YEAR_2100_DAY.into()) as i32,
                _ => ((self.anchor / MICROS_PER_DAY) - rng.below(12_000) as i64) as i32,
            }),
            ColumnType::Time => {
                let us = rng.below(MICROS_PER_DAY as u64) as i64;
                Value::Time(with_fraction_digits(rng, us))
            }
            ColumnType::Uuid => Value::Uuid(uuid_v4((rng.next_u64() as u128) << 64 | rng.next_u64() as u128)),
            ColumnType::Ipv4 => Value::Ip(ipv4(rng)),
            ColumnType::Ipv6 => Value::Ip(ipv6(rng)),
            ColumnType::Ip => Value::Ip(if rng.chance(0.8) { ipv4(rng) } else { ipv6(rng) }),
            ColumnType::Array(item) => {
                let n = rng.below(4);
                Value::Json(Json::Array((0..n).map(|_| self.value(rng, item, false).to_typed_json()).collect()))
            }
            ColumnType::Object(fields) => {
                let mut map = Map::new();
                for f in fields {
                    let v = self.column(rng, f, false);
                    if v != Value::Null {
                        map.insert(f.name.clone(), v.to_typed_json());
                    }
                }
                // Condensed mode sends an all-NULL object as NULL, not `{}`.
                if map.is_empty() { Value::Null } else { Value::Json(Json::Object(map)) }
            }
            ColumnType::Json => Value::Json(serde_json::json!({"n": rng.below(100), "s": text(rng, 20)})),
        }
    }

    /// The edges of a type's domain: extremes, zero and its sign, the smallest and largest
    /// magnitudes, the longest text the schema allows (also in multi-byte characters), dates
    /// and times at both ends of 0001..9999 and around 1970, every fraction length, every enum
    /// member. Non-finite floats only with `special_floats` and outside nested JSON (which has
    /// no form for them).
    pub fn edges(&self, ty: &ColumnType, top_level: bool) -> Vec<Value> {
        let specials = self.special_floats && top_level;
        match ty {
            ColumnType::Int(16) => [i16::MIN.into(), i16::MAX.into(), 0, -1, 1].map(Value::Int).to_vec(),
            ColumnType::Int(32) => [i32::MIN.into(), i32::MAX.into(), 0, -1, 1].map(Value::Int).to_vec(),
            ColumnType::Int(_) => [i64::MIN, i64::MAX, 0, -1, (1 << 53) + 1].map(Value::Int).to_vec(),
            ColumnType::IntEnum(values) => values.iter().map(|v| Value::Int(*v)).collect(),
            ColumnType::Float(bits) => {
                let mut v: Vec<f64> = if *bits == 32 {
                    [-0.0f32, 0.0, f32::from_bits(1), f32::MIN_POSITIVE, f32::MAX, f32::MIN, 0.1, -1e-30]
                        .map(f64::from)
                        .to_vec()
                } else {
                    vec![-0.0, 0.0, f64::from_bits(1), f64::MIN_POSITIVE, 1e300, -1e-300, f64::MAX, f64::MIN, 0.1]
                };
                if specials {
                    v.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
                }
                v.into_iter().map(Value::Float).collect()
            }
            ColumnType::Decimal { precision, scale } => {
                let max = 10i128.pow((*precision as u32).min(38)) - 1;
                [max, -max, 0, 1, -1, 10i128.pow(*scale as u32) * 7]
                    .map(|mantissa| Value::Decimal(Decimal { mantissa, scale: *scale }))
                    .to_vec()
            }
            ColumnType::Bool => vec![Value::Bool(true), Value::Bool(false)],
            ColumnType::Str { max_length, truncatable } => {
                let n = max_length.unwrap_or(UNBOUNDED_TEXT_CHARS) as usize;
                let mut v = vec![
                    String::new(),
                    "x".repeat(n),
                    MULTIBYTE.chars().cycle().take(n).collect(),
                    TEXT[5..].join(" ").chars().take(n).collect(),
                    "NULL".chars().take(n).collect(),
                    "\\N".chars().take(n).collect(),
                ];
                if *truncatable {
                    v.push(OVERSIZED_PLACEHOLDER.into());
                }
                v.into_iter().map(Value::Str).collect()
            }
            ColumnType::Enum(values) => values.iter().map(|v| Value::Str(v.clone())).collect(),
            ColumnType::Timestamp => [
                FIRST_DAY as i64 * MICROS_PER_DAY,
                (LAST_DAY as i64 + 1) * MICROS_PER_DAY - 1,
                -1,
                0,
                YEAR_1900_DAY as i64 * MICROS_PER_DAY,
                951_827_696_700_000,
                951_827_696_120_000,
                951_827_696_123_000,
                951_827_696_123_400,
                951_827_696_123_450,
                951_827_696_123_456,
            ]
            .map(Value::Timestamp)
            .to_vec(),
            ColumnType::Date => [FIRST_DAY, LAST_DAY, YEAR_1900_DAY, -1, 0, 11_016].map(Value::Date).to_vec(),
            ColumnType::Time => [0, MICROS_PER_DAY - 1, 43_200_500_000, 1].map(Value::Time).to_vec(),
            ColumnType::Uuid => {
                [0, u128::MAX, uuid_v4(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)].map(Value::Uuid).to_vec()
            }
            ColumnType::Ipv4 => IPV4_EDGES.iter().map(|s| Value::Ip(s.parse().expect("valid IP"))).collect(),
            ColumnType::Ipv6 => IPV6_EDGES.iter().map(|s| Value::Ip(s.parse().expect("valid IP"))).collect(),
            ColumnType::Ip => {
                IPV4_EDGES.iter().chain(IPV6_EDGES).map(|s| Value::Ip(s.parse().expect("valid IP"))).collect()
            }
            ColumnType::Array(item) => {
                let items: Vec<Json> = self.edges(item, false).iter().map(Value::to_typed_json).collect();
                vec![
                    Value::Json(Json::Array(Vec::new())),
                    Value::Json(Json::Array(items.clone())),
                    Value::Json(Json::Array(items.into_iter().rev().take(1).collect())),
                ]
            }
            ColumnType::Object(fields) => {
                // All members NULL is NULL in condensed mode; then objects of each member's edges.
                let member_edges: Vec<Vec<Value>> = fields.iter().map(|f| self.edges(&f.ty, false)).collect();
                let widest = member_edges.iter().map(Vec::len).max().unwrap_or(0).min(4);
                let mut v = vec![Value::Null];
                v.extend((0..widest).map(|k| {
                    let map: Map<String, Json> = fields
                        .iter()
                        .zip(&member_edges)
                        .map(|(f, e)| (f.name.clone(), e[k % e.len()].to_typed_json()))
                        .filter(|(_, j)| !j.is_null())
                        .collect();
                    Value::Json(Json::Object(map))
                }));
                v
            }
            ColumnType::Json => vec![
                Value::Json(serde_json::json!({})),
                Value::Json(serde_json::json!([])),
                Value::Json(serde_json::json!({"a": {"b": [1, "two", null, true]}, "é": "\"q\""})),
            ],
        }
    }

    fn float(&self, rng: &mut Rng, bits: u8, top_level: bool) -> f64 {
        if self.special_floats && top_level && rng.chance(0.03) {
            return *rng.pick(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        }
        let f = match rng.below(6) {
            0 => 0.0,
            1 => rng.below(1000) as f64 / 4.0,
            2 => (rng.below(1_000_000) as f64) / 100.0,
            3 => (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64,
            4 => f64::from_bits(rng.next_u64() & !(0x7ff << 52) | (rng.below(2046) + 1) << 52),
            _ => ((rng.next_u64() >> 11) as f64 - (1u64 << 52) as f64) * 1e-3,
        };
        if bits == 32 { f as f32 as f64 } else { f }
    }

    /// A commit-like time: mostly in the three years before the anchor, now and then anywhere
    /// in 1900..2100 or in the whole 0001..9999 range; with 0 to 6 fraction digits.
    pub fn timestamp(&self, rng: &mut Rng) -> Micros {
        let us = match rng.below(20) {
            0 => rng.between(FIRST_DAY as i64 * MICROS_PER_DAY, (LAST_DAY as i64 + 1) * MICROS_PER_DAY - 1),
            1 | 2 => rng.between(YEAR_1900_DAY as i64 * MICROS_PER_DAY, YEAR_2100_DAY as i64 * MICROS_PER_DAY),
            _ => self.anchor - 1 - rng.below(3 * 365 * MICROS_PER_DAY as u64) as i64,
        };
        with_fraction_digits(rng, us)
    }
}

/// Base rows `1..=EDGE_ROWS` carry the domain edges, so any table of this many rows holds them all.
pub const EDGE_ROWS: u64 = 24;
/// Characters of the longest unbounded text edge.
const UNBOUNDED_TEXT_CHARS: u32 = 10_000;
/// Two-, three- and four-byte UTF-8 characters.
const MULTIBYTE: &str = "é日🎓ß語😀";
const IPV4_EDGES: &[&str] = &["0.0.0.0", "255.255.255.255", "127.0.0.1", "10.0.0.1"];
const IPV6_EDGES: &[&str] =
    &["::", "::1", "::ffff:192.0.2.1", "2001:db8::1", "fe80::1:2:3:4", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"];
/// 0001-01-01, 9999-12-31, 1900-01-01 and 2100-01-01 as days since 1970-01-01.
const FIRST_DAY: i32 = -719_162;
const LAST_DAY: i32 = 2_932_896;
const YEAR_1900_DAY: i32 = -25_567;
const YEAR_2100_DAY: i32 = 47_482;

/// `us` truncated to 0 to 6 fraction digits, chosen at random.
fn with_fraction_digits(rng: &mut Rng, us: Micros) -> Micros {
    let unit = 10i64.pow(6 - rng.below(7) as u32);
    us - us.rem_euclid(unit)
}

/// Sets the version (4) and variant (10) bits of a random 128-bit number.
fn uuid_v4(raw: u128) -> u128 {
    (raw & !(0xf << 76) | (0x4 << 76)) & !(0xc << 60) | (0x8 << 60)
}

fn int(rng: &mut Rng, bits: u8) -> i64 {
    let max: i64 = match bits {
        16 => i16::MAX as i64,
        32 => i32::MAX as i64,
        _ => i64::MAX,
    };
    let v = match rng.below(10) {
        0..=5 => rng.below(1000) as i64,
        6..=7 => rng.below(max.min(1_000_000_000) as u64) as i64,
        8 => (rng.next_u64() >> 1) as i64 % max,
        _ => -(rng.below(max.min(100_000) as u64) as i64),
    };
    v.clamp(-max, max)
}

fn text(rng: &mut Rng, max_chars: u32) -> String {
    if rng.chance(0.03) {
        return String::new();
    }
    let parts = 1 + rng.below(3);
    let mut s = (0..parts).map(|_| *rng.pick(TEXT)).collect::<Vec<_>>().join(" ");
    s.push_str(&format!(" {}", rng.below(100_000)));
    s.chars().take(max_chars as usize).collect()
}

fn ipv4(rng: &mut Rng) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from((rng.next_u64() as u32) | 0x0100_0000))
}

fn ipv6(rng: &mut Rng) -> IpAddr {
    let mut segs = [0u16; 8];
    segs[0] = 0x2001;
    segs[1] = 0x0db8;
    for s in segs.iter_mut().skip(2) {
        *s = if rng.chance(0.3) { 0 } else { rng.next_u64() as u16 };
    }
    IpAddr::V6(Ipv6Addr::from(segs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::bundled;

    fn def(ns: &str, name: &str) -> TableDef {
        let flat: Json = serde_json::from_str(bundled::tables(ns).find(|t| t.0 == name).unwrap().1).unwrap();
        crate::emulator::dataset::envelope_def(ns, name, 1, &flat).unwrap()
    }

    #[test]
    fn rows_are_deterministic_and_respect_the_schema() {
        let g =
            Generator { seed: 3, anchor: 1_767_225_600_000_000, special_floats: true, edge_rows: true, id_space: 0 };
        let d = def("canvas", "submissions");
        for idx in 1..300 {
            let row = g.row(&d, idx, 0);
            let typed = |r: &[Value]| r.iter().map(Value::to_typed_json).collect::<Vec<_>>();
            assert_eq!(typed(&row), typed(&g.row(&d, idx, 0)));
            for (c, v) in d.values.iter().zip(&row) {
                if c.required {
                    assert_ne!(*v, Value::Null, "{} is required", c.name);
                }
                if let (ColumnType::Str { max_length: Some(n), .. }, Value::Str(s)) = (&c.ty, v) {
                    assert!(s.chars().count() <= *n as usize, "{} too long", c.name);
                }
                if let (ColumnType::Enum(values), Value::Str(s)) = (&c.ty, v) {
                    assert!(values.contains(s));
                }
            }
        }
        assert_ne!(
            format!("{:?}", g.row(&d, 1, 0)),
            format!("{:?}", g.row(&d, 1, 1)),
            "a new revision changes the row"
        );
        assert!(matches!(g.key(&d, 2), Value::Int(k) if k == SHARD_OFFSET + 2));
    }

    #[test]
    fn web_logs_keys_are_unique_v4_uuids() {
        let g = Generator { seed: 1, anchor: 0, special_floats: false, edge_rows: true, id_space: 0 };
        let d = def("canvas_logs", "web_logs");
        let keys: std::collections::HashSet<String> = (1..2000).map(|i| g.key(&d, i).to_text().unwrap()).collect();
        assert_eq!(keys.len(), 1999);
        assert!(keys.iter().all(|k| k.as_bytes()[14] == b'4'));
    }
}

//! TSV in PostgreSQL `COPY` text form: `\N` is NULL, `\t \n \r \b \f \v \0 \\` are escapes, JSON
//! columns are JSON text escaped once more. The header may order and omit columns freely.

use std::borrow::Cow;
use std::net::IpAddr;

use super::{DecodeError, Record};
use crate::schema::{ColumnType, TableDef};
use crate::time;
use crate::value::{Decimal, Value};

enum Slot {
    Ts,
    Action,
    Key,
    Value(usize),
}

/// Decodes the lines of one TSV object against a table definition.
pub struct TsvDecoder<'a> {
    def: &'a TableDef,
    slots: Vec<Slot>,
}

impl<'a> TsvDecoder<'a> {
    /// Maps the header labels (`meta.ts`, `meta.action`, `key.<k>`, `value.<c>`) to columns.
    pub fn new(header: &str, def: &'a TableDef) -> Result<TsvDecoder<'a>, DecodeError> {
        let slots = header
            .trim_end_matches('\n')
            .split('\t')
            .map(|label| match label {
                "meta.ts" => Ok(Slot::Ts),
                "meta.action" => Ok(Slot::Action),
                l if l.strip_prefix("key.") == Some(def.key.name.as_str()) => Ok(Slot::Key),
                l => l
                    .strip_prefix("value.")
                    .and_then(|c| def.values.iter().position(|v| v.name == c))
                    .map(Slot::Value)
                    .ok_or_else(|| DecodeError::UnknownColumn { label: l.to_string(), version: def.version }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !slots.iter().any(|s| matches!(s, Slot::Key)) {
            return Err(DecodeError::MissingKey { key: def.key.name.clone() });
        }
        Ok(TsvDecoder { def, slots })
    }

    /// The `meta.ts` of a line, read without decoding the rest (to leave out records a sync
    /// applied already); `None` when the file has no such column or the field is no timestamp
    /// (the full decode then says what is wrong).
    pub fn ts_of(&self, text: &str) -> Option<crate::time::Micros> {
        let at = self.slots.iter().position(|s| matches!(s, Slot::Ts))?;
        crate::time::parse_rfc3339(text.split('\t').nth(at)?).ok()
    }

    /// Decodes one line (without its newline); `line` numbers errors.
    pub fn decode(&self, text: &str, line: u64) -> Result<Record, DecodeError> {
        let mut record =
            Record { ts: None, action: None, key: Value::Null, values: vec![Value::Null; self.def.values.len()] };
        let mut found = 0;
        for (field, slot) in text.split('\t').zip(self.slots.iter().chain(std::iter::repeat(&Slot::Ts))) {
            found += 1;
            if found > self.slots.len() {
                continue;
            }
            let fail = |column: &str, detail: String| DecodeError::Value { line, column: column.to_string(), detail };
            if field == "\\N" {
                continue;
            }
            let raw = unescape(field).map_err(|d| fail(label(self.def, slot).as_str(), d))?;
            match slot {
                Slot::Ts => record.ts = Some(time::parse_rfc3339(&raw).map_err(|e| fail("meta.ts", e.to_string()))?),
                Slot::Action => record.action = raw.chars().next(),
                Slot::Key => record.key = parse(&raw, &self.def.key.ty).map_err(|d| fail(&self.def.key.name, d))?,
                Slot::Value(i) => {
                    let c = &self.def.values[*i];
                    record.values[*i] = parse(&raw, &c.ty).map_err(|d| fail(&c.name, d))?;
                }
            }
        }
        if found != self.slots.len() {
            return Err(DecodeError::FieldCount { line, expected: self.slots.len(), found });
        }
        if record.key == Value::Null {
            return Err(DecodeError::Value {
                line,
                column: self.def.key.name.clone(),
                detail: "the key is NULL".into(),
            });
        }
        Ok(record)
    }
}

fn label(def: &TableDef, slot: &Slot) -> String {
    match slot {
        Slot::Ts => "meta.ts".into(),
        Slot::Action => "meta.action".into(),
        Slot::Key => def.key.name.clone(),
        Slot::Value(i) => def.values[*i].name.clone(),
    }
}

/// Undoes the TSV escapes.
fn unescape(field: &str) -> Result<Cow<'_, str>, String> {
    if !field.contains('\\') {
        return Ok(Cow::Borrowed(field));
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('t') => '\t',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('b') => '\u{8}',
            Some('f') => '\u{c}',
            Some('v') => '\u{b}',
            Some('0') => '\0',
            Some('\\') => '\\',
            other => return Err(format!("invalid escape \\{}", other.map(String::from).unwrap_or_default())),
        });
    }
    Ok(Cow::Owned(out))
}

/// Parses the (unescaped) text of a value of type `ty`.
pub fn parse(text: &str, ty: &ColumnType) -> Result<Value, String> {
    let bad = |what: &str| format!("{text:?} is not {what}");
    Ok(match ty {
        ColumnType::Int(_) | ColumnType::IntEnum(_) => Value::Int(text.trim().parse().map_err(|_| bad("an integer"))?),
        ColumnType::Float(_) => Value::Float(match text {
            "NaN" | "nan" => f64::NAN,
            "Infinity" | "inf" | "infinity" => f64::INFINITY,
            "-Infinity" | "-inf" | "-infinity" => f64::NEG_INFINITY,
            t => t.parse().map_err(|_| bad("a number"))?,
        }),
        ColumnType::Decimal { scale, .. } => {
            Value::Decimal(parse_decimal(text, *scale).ok_or_else(|| bad("a decimal"))?)
        }
        ColumnType::Bool => Value::Bool(match text {
            "true" => true,
            "false" => false,
            _ => return Err(bad("true or false")),
        }),
        ColumnType::Str { .. } | ColumnType::Enum(_) => Value::Str(text.to_string()),
        ColumnType::Timestamp => Value::Timestamp(time::parse_rfc3339(text).map_err(|_| bad("a timestamp"))?),
        ColumnType::Date => {
            Value::Date(time::parse_date(text).ok_or_else(|| bad("a date (0001-01-01 to 9999-12-31)"))?)
        }
        ColumnType::Time => Value::Time(time::parse_time_of_day(text).ok_or_else(|| bad("a time of day"))?),
        ColumnType::Uuid => {
            let hex: String = text.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 {
                return Err(bad("a UUID"));
            }
            Value::Uuid(u128::from_str_radix(&hex, 16).map_err(|_| bad("a UUID"))?)
        }
        ColumnType::Ipv4 | ColumnType::Ipv6 | ColumnType::Ip => {
            Value::Ip(text.parse::<IpAddr>().map_err(|_| bad("an IP address"))?)
        }
        ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => {
            Value::Json(serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?)
        }
    })
}

/// `-12.3` at scale 2 → mantissa -1230.
fn parse_decimal(text: &str, scale: u8) -> Option<Decimal> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
        || frac.len() > scale as usize
    {
        return None;
    }
    let padded = format!("{int}{frac:0<width$}", width = scale as usize);
    let mantissa: i128 = padded.parse().ok()?;
    Some(Decimal { mantissa: if neg { -mantissa } else { mantissa }, scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::dataset::{Dataset, Selection};
    use crate::emulator::generate::Generator;
    use crate::emulator::output::{CsvNull, Format, Mode, PartSpec, write_part};
    use std::io::Read;

    #[test]
    fn unescapes_and_parses_every_type() {
        assert_eq!(unescape("a\\tb\\nc\\\\d").unwrap(), "a\tb\nc\\d");
        assert!(unescape("bad\\q").is_err());
        assert_eq!(parse_decimal("-12.3", 2), Some(Decimal { mantissa: -1230, scale: 2 }));
        assert_eq!(parse_decimal("7", 2), Some(Decimal { mantissa: 700, scale: 2 }));
        assert_eq!(parse_decimal("1.234", 2), None);
        assert_eq!(parse("Infinity", &ColumnType::Float(64)).unwrap(), Value::Float(f64::INFINITY));
        assert_eq!(parse("2024-05-01", &ColumnType::Date).unwrap(), Value::Date(19844));
        assert!(parse("maybe", &ColumnType::Bool).is_err());
    }

    /// Everything the emulator writes decodes back to the same typed values.
    #[test]
    fn round_trips_the_emulators_tsv_for_every_bundled_table() {
        let d = Dataset::bundled(
            Generator { seed: 11, anchor: 1_767_225_600_000_000, special_floats: true, edge_rows: true, id_space: 0 },
            |_, _| 40,
        )
        .unwrap();
        for (ns, tables) in &d.tables {
            for (name, state) in tables {
                let def = &state.current().def;
                let selection = Selection::Snapshot { at: state.history.head(), oldest: None };
                let spec = PartSpec {
                    def,
                    format: Format::Tsv,
                    mode: Mode::Condensed,
                    incremental: false,
                    csv_null: CsvNull::Literal,
                };
                let mut gz = Vec::new();
                write_part(&spec, d.records(state, selection, 1, 1..41), &mut gz).unwrap();
                let mut text = String::new();
                flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text).unwrap();
                let mut lines = text.lines();
                let decoder = TsvDecoder::new(lines.next().unwrap(), def).unwrap();
                let expected: Vec<_> = d.records(state, selection, 1, 1..41).collect();
                let got: Vec<Record> =
                    lines.enumerate().map(|(i, l)| decoder.decode(l, i as u64 + 2).unwrap()).collect();
                assert_eq!(got.len(), expected.len(), "{ns}.{name}");
                for (g, e) in got.iter().zip(&expected) {
                    let typed = |v: &[Value]| v.iter().map(Value::to_typed_json).collect::<Vec<_>>();
                    assert_eq!(g.key.to_typed_json(), e.key.to_typed_json());
                    assert_eq!(typed(&g.values), typed(e.values.as_ref().unwrap()), "{ns}.{name} key {:?}", e.key);
                    assert_eq!(g.ts, Some(e.ts));
                }
            }
        }
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let d = Dataset::bundled(
            Generator { seed: 1, anchor: 0, special_floats: false, edge_rows: true, id_space: 0 },
            |_, _| 1,
        )
        .unwrap();
        let def = &d.table("canvas", "accounts").unwrap().current().def;
        let dec = TsvDecoder::new("meta.ts\tkey.id\tvalue.storage_quota", def).unwrap();
        let e = dec.decode("2024-01-01T00:00:00Z\t1\tlots", 7).unwrap_err().to_string();
        assert!(e.contains("line 7") && e.contains("storage_quota"), "{e}");
        assert!(dec.decode("2024-01-01T00:00:00Z\t1", 3).unwrap_err().to_string().contains("expected 3 fields"));
        assert!(TsvDecoder::new("meta.ts\tkey.id\tvalue.nope", def).err().unwrap().to_string().contains("value.nope"));
        assert!(TsvDecoder::new("meta.ts\tvalue.name", def).is_err(), "no key column");
    }
}

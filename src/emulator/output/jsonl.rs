//! JSON Lines: `{"meta":…,"key":…,"value":…}` per record, NULL properties omitted, no `value` for
//! deletes. Non-finite floats are the strings `NaN`, `Infinity`, `-Infinity` (as Spark writes them).

use std::io::{self, Write};

use serde_json::{Map, Value as Json};

use super::PartSpec;
use crate::emulator::dataset::Record;
use crate::time;
use crate::value::Value;

pub fn write(spec: &PartSpec, records: impl Iterator<Item = Record>, out: &mut impl Write) -> io::Result<()> {
    let mut line = Vec::with_capacity(4096);
    for r in records {
        let mut meta = Map::new();
        meta.insert("ts".into(), Json::String(time::format_trimmed(r.ts)));
        if let Some(a) = r.action {
            meta.insert("action".into(), Json::String(a.to_string()));
        }
        let mut key = Map::new();
        key.insert(spec.def.key.name.clone(), r.key.to_typed_json());
        line.clear();
        line.extend_from_slice(b"{\"meta\":");
        serde_json::to_writer(&mut line, &meta)?;
        line.extend_from_slice(b",\"key\":");
        serde_json::to_writer(&mut line, &key)?;
        if let Some(values) = &r.values {
            line.extend_from_slice(b",\"value\":{");
            let set = spec.def.values.iter().zip(values).filter(|(_, v)| **v != Value::Null);
            for (i, (c, v)) in set.enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                serde_json::to_writer(&mut line, &c.name)?;
                line.push(b':');
                match v {
                    // Decimals are JSON numbers with every digit (as Spark writes them), not floats.
                    Value::Decimal(d) => line.extend_from_slice(d.to_string().as_bytes()),
                    other => serde_json::to_writer(&mut line, &other.to_typed_json())?,
                }
            }
            line.push(b'}');
        }
        line.extend_from_slice(b"}\n");
        out.write_all(&line)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gunzip, render};
    use super::super::{Format, Mode};
    use serde_json::{Value, json};

    #[test]
    fn records_omit_nulls_and_deletes_have_no_value() {
        let text = gunzip(&render(Format::Jsonl, Mode::Condensed, true));
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["meta"], json!({"ts": "2024-05-01T12:00:00Z", "action": "U"}));
        assert_eq!(lines[0]["value"]["settings"], json!({"a": 1, "b": "x\ny"}));
        assert_eq!(lines[1], json!({"meta": {"ts": "2024-05-01T12:00:01.5Z", "action": "D"}, "key": {"id": 2}}));
        assert_eq!(lines[2]["value"], json!({"name": "", "ratio": "NaN"}));
    }
}

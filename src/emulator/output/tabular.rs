//! TSV (PostgreSQL `COPY` text dialect) and CSV (RFC 4180): the same header and cells, two
//! escaping dialects.

use std::borrow::Cow;
use std::io::{self, Write};

use serde_json::Value as Json;

use super::{CsvNull, Format, Mode, PartSpec};
use crate::emulator::dataset::Record;
use crate::schema::{Column, ColumnType};
use crate::time;
use crate::value::Value;

/// Where a header column takes its cell from.
enum Source<'a> {
    Ts,
    Action,
    Key,
    /// Value column `index`, then a path into its nested object (expanded mode).
    Value {
        index: usize,
        path: Vec<&'a str>,
    },
}

fn layout<'a>(spec: &'a PartSpec) -> Vec<(String, Source<'a>)> {
    let mut cols = vec![("meta.ts".to_string(), Source::Ts)];
    if spec.incremental {
        cols.push(("meta.action".into(), Source::Action));
    }
    cols.push((format!("key.{}", spec.def.key.name), Source::Key));
    for (index, c) in spec.def.values.iter().enumerate() {
        expand(spec.mode, c, format!("value.{}", c.name), index, Vec::new(), &mut cols);
    }
    cols
}

fn expand<'a>(
    mode: Mode,
    c: &'a Column,
    label: String,
    index: usize,
    path: Vec<&'a str>,
    cols: &mut Vec<(String, Source<'a>)>,
) {
    match (&c.ty, mode) {
        (ColumnType::Object(fields), Mode::Expanded) => {
            for f in fields {
                let mut p = path.clone();
                p.push(&f.name);
                expand(mode, f, format!("{label}.{}", f.name), index, p, cols);
            }
        }
        _ => cols.push((label, Source::Value { index, path })),
    }
}

/// The text of one cell, `None` for NULL.
fn cell<'r>(source: &Source, r: &'r Record) -> Option<Cow<'r, str>> {
    match source {
        Source::Ts => Some(time::format_trimmed(r.ts).into()),
        Source::Action => r.action.map(|a| a.to_string().into()),
        Source::Key => r.key.to_text().map(Cow::Owned),
        Source::Value { index, path } => {
            let v = r.values.as_ref()?.get(*index)?;
            if path.is_empty() {
                return match v {
                    Value::Str(s) => Some(Cow::Borrowed(s.as_str())),
                    other => other.to_text().map(Cow::Owned),
                };
            }
            let Value::Json(obj) = v else { return None };
            match path.iter().try_fold(obj, |j, p| j.get(p))? {
                Json::Null => None,
                Json::String(s) => Some(Cow::Borrowed(s.as_str())),
                other => Some(Cow::Owned(other.to_string())),
            }
        }
    }
}

pub fn write(spec: &PartSpec, records: impl Iterator<Item = Record>, out: &mut impl Write) -> io::Result<()> {
    let cols = layout(spec);
    let tsv = spec.format == Format::Tsv;
    let sep = if tsv { b'\t' } else { b',' };
    let mut line = Vec::with_capacity(4096);
    for (i, (label, _)) in cols.iter().enumerate() {
        if i > 0 {
            line.push(sep);
        }
        line.extend_from_slice(label.as_bytes());
    }
    line.push(b'\n');
    out.write_all(&line)?;
    for r in records {
        line.clear();
        for (i, (_, source)) in cols.iter().enumerate() {
            if i > 0 {
                line.push(sep);
            }
            match (cell(source, &r), tsv) {
                (None, true) => line.extend_from_slice(b"\\N"),
                (None, false) => line.extend_from_slice(if spec.csv_null == CsvNull::Literal { b"NULL" } else { b"" }),
                (Some(text), true) => tsv_escape(&text, &mut line),
                (Some(text), false) => csv_quote(&text, spec.csv_null, &mut line),
            }
        }
        line.push(b'\n');
        out.write_all(&line)?;
    }
    Ok(())
}

fn tsv_escape(s: &str, out: &mut Vec<u8>) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0b => out.extend_from_slice(b"\\v"),
            _ => out.push(b),
        }
    }
}

/// Quotes when the text holds a separator, quote or line break, is empty, or would read as NULL.
fn csv_quote(s: &str, null: CsvNull, out: &mut Vec<u8>) {
    let special = s.is_empty()
        || (null == CsvNull::Literal && s == "NULL")
        || s.bytes().any(|b| matches!(b, b'"' | b',' | b'\n' | b'\r' | b'\t'))
        || s.starts_with(' ')
        || s.ends_with(' ');
    if !special {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gunzip, render};
    use super::super::{Format, Mode};

    #[test]
    fn tsv_condensed_incremental_matches_the_documented_form() {
        let text = gunzip(&render(Format::Tsv, Mode::Condensed, true));
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(
            lines[0],
            "meta.ts\tmeta.action\tkey.id\tvalue.name\tvalue.ratio\tvalue.tags\tvalue.settings\tvalue.created_at"
        );
        assert_eq!(
            lines[1],
            "2024-05-01T12:00:00Z\tU\t1\tRoot\\tAccount\\nline2 \\\\ back, \"q\"\t1.5\t[\"a\",\"b\\\\\"q\"]\t{\"a\":1,\"b\":\"x\\\\ny\"}\t2020-01-01T00:00:00Z"
        );
        assert_eq!(lines[2], "2024-05-01T12:00:01.5Z\tD\t2\t\\N\t\\N\t\\N\t\\N\t\\N");
        assert_eq!(lines[3], "2024-05-01T12:00:02Z\tU\t3\t\tNaN\t\\N\t\\N\t\\N");
        assert_eq!(lines[4], "", "LF-terminated, no blank lines");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn snapshot_tsv_has_no_action_and_expanded_splits_objects() {
        let text = gunzip(&render(Format::Tsv, Mode::Expanded, false));
        let header = text.lines().next().unwrap();
        assert_eq!(
            header,
            "meta.ts\tkey.id\tvalue.name\tvalue.ratio\tvalue.tags\tvalue.settings.a\tvalue.settings.b\tvalue.created_at"
        );
        assert!(text.lines().nth(1).unwrap().contains("\t1\tx\\ny\t"), "{text}");
    }

    #[test]
    fn csv_quotes_and_nulls() {
        let text = gunzip(&render(Format::Csv, Mode::Condensed, true));
        let mut lines = text.split('\n');
        assert_eq!(
            lines.next().unwrap(),
            "meta.ts,meta.action,key.id,value.name,value.ratio,value.tags,value.settings,value.created_at"
        );
        let first: String = lines.by_ref().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(
            first,
            "2024-05-01T12:00:00Z,U,1,\"Root\tAccount\nline2 \\ back, \"\"q\"\"\",1.5,\"[\"\"a\"\",\"\"b\\\"\"q\"\"]\",\"{\"\"a\"\":1,\"\"b\"\":\"\"x\\ny\"\"}\",2020-01-01T00:00:00Z"
        );
        assert_eq!(lines.next().unwrap(), "2024-05-01T12:00:01.5Z,D,2,NULL,NULL,NULL,NULL,NULL");
        assert_eq!(lines.next().unwrap(), "2024-05-01T12:00:02Z,U,3,\"\",NaN,NULL,NULL,NULL");
    }
}

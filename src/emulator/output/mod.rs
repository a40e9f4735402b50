//! Encoders for the four DAP formats. An object is one part file: text formats are written as a
//! single gzip member (the official client decodes only the first one), Parquet as a plain file.

mod jsonl;
mod parquet;
mod tabular;

use std::io::{self, Write};

use flate2::Compression;
use flate2::write::GzEncoder;

use super::dataset::Record;
use crate::schema::TableDef;

pub use crate::api::types::{Format, Mode};

/// How CSV writes NULL: the client's docstring says the unquoted literal `NULL`, the public data
/// format page says an empty field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CsvNull {
    Literal,
    Empty,
}

/// What one part file holds.
pub struct PartSpec<'a> {
    pub def: &'a TableDef,
    pub format: Format,
    pub mode: Mode,
    /// Incremental output carries `meta.action`.
    pub incremental: bool,
    pub csv_null: CsvNull,
}

/// Writes `records` as one part file into `out`.
pub fn write_part<W: Write + Send>(spec: &PartSpec, records: impl Iterator<Item = Record>, out: W) -> io::Result<()> {
    match spec.format {
        Format::Parquet => parquet::write(spec, records, out),
        text => {
            // A fixed header (no mtime) keeps objects byte-identical for identical content.
            let mut gz = GzEncoder::new(out, Compression::fast());
            match text {
                Format::Jsonl => jsonl::write(spec, records, &mut gz)?,
                _ => tabular::write(spec, records, &mut gz)?,
            }
            gz.finish()?.flush()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::emulator::dataset::envelope_def;
    use crate::value::Value;
    use flate2::read::GzDecoder;
    use io::Read;
    use serde_json::json;

    /// A small table with the awkward cases: nested object, array, text with escapes.
    pub fn sample_def() -> TableDef {
        let flat = json!({"type": "object", "additionalProperties": false, "required": ["id", "name"], "properties": {
            "id": {"type": "integer", "format": "int64"},
            "name": {"type": "string"},
            "ratio": {"type": "number", "format": "float64"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "settings": {"type": "object", "additionalProperties": false, "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
            "created_at": {"type": "string", "format": "date-time"},
        }});
        envelope_def("canvas", "sample", 1, &flat).unwrap()
    }

    pub fn sample_records() -> Vec<Record> {
        vec![
            Record {
                ts: 1_714_564_800_000_000,
                action: Some('U'),
                key: Value::Int(1),
                values: Some(vec![
                    Value::Str("Root\tAccount\nline2 \\ back, \"q\"".into()),
                    Value::Float(1.5),
                    Value::Json(json!(["a", "b\"q"])),
                    Value::Json(json!({"a": 1, "b": "x\ny"})),
                    Value::Timestamp(1_577_836_800_000_000),
                ]),
            },
            Record { ts: 1_714_564_801_500_000, action: Some('D'), key: Value::Int(2), values: None },
            Record {
                ts: 1_714_564_802_000_000,
                action: Some('U'),
                key: Value::Int(3),
                values: Some(vec![
                    Value::Str(String::new()),
                    Value::Float(f64::NAN),
                    Value::Null,
                    Value::Null,
                    Value::Null,
                ]),
            },
        ]
    }

    pub fn render(format: Format, mode: Mode, incremental: bool) -> Vec<u8> {
        let def = sample_def();
        let spec = PartSpec { def: &def, format, mode, incremental, csv_null: CsvNull::Literal };
        let mut out = Vec::new();
        write_part(&spec, sample_records().into_iter(), &mut out).unwrap();
        out
    }

    pub fn gunzip(bytes: &[u8]) -> String {
        let mut s = String::new();
        GzDecoder::new(bytes).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn text_formats_are_single_member_gzip() {
        let gz = render(Format::Tsv, Mode::Condensed, true);
        let mut d = flate2::bufread::GzDecoder::new(&gz[..]);
        io::copy(&mut d, &mut io::sink()).unwrap();
        let mut rest = Vec::new();
        d.into_inner().read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "exactly one gzip member");
    }
}

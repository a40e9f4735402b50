//! Parquet parts: groups `meta` (`ts`, `action`), `key` and an optional `value` (absent for
//! deletes), like Spark's struct layout. Nested objects and arrays are JSON text columns; UUIDs and
//! IPs are text, timestamps `TIMESTAMP(MICROS, UTC)`, decimals up to 18 digits `DECIMAL` on INT64.

use std::io::{self, Write};
use std::sync::Arc;

use parquet::basic::{Compression, Repetition};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{Type, TypePtr};

use super::PartSpec;
use crate::emulator::dataset::Record;
use crate::parquet_columns::{Buf, leaf_type};
use crate::schema::ColumnType;
use crate::value::Value;

const ROW_GROUP_ROWS: usize = 65_536;

#[derive(Clone, Copy)]
enum Source {
    Ts,
    Action,
    Key,
    Value(usize),
}

struct Leaf {
    source: Source,
    buf: Buf,
    /// Definition levels, for `value` leaves only (0 = no value group, 1 = NULL, 2 = set).
    defs: Vec<i16>,
}

fn err(e: ParquetError) -> io::Error {
    io::Error::other(e)
}

fn group(name: &str, repetition: Repetition, fields: Vec<TypePtr>) -> Result<TypePtr, ParquetError> {
    Ok(Arc::new(Type::group_type_builder(name).with_repetition(repetition).with_fields(fields).build()?))
}

fn schema(spec: &PartSpec) -> Result<(TypePtr, Vec<Leaf>), ParquetError> {
    let mut leaves = Vec::new();
    let mut leaf = |name: &str, ty: &ColumnType, rep: Repetition, source: Source| -> Result<TypePtr, ParquetError> {
        let (t, buf) = leaf_type(name, ty, rep)?;
        leaves.push(Leaf { source, buf, defs: Vec::new() });
        Ok(Arc::new(t))
    };
    let mut meta = vec![leaf("ts", &ColumnType::Timestamp, Repetition::REQUIRED, Source::Ts)?];
    if spec.incremental {
        meta.push(leaf(
            "action",
            &ColumnType::Str { max_length: None, truncatable: false },
            Repetition::REQUIRED,
            Source::Action,
        )?);
    }
    let key = vec![leaf(&spec.def.key.name, &spec.def.key.ty, Repetition::REQUIRED, Source::Key)?];
    let value = spec
        .def
        .values
        .iter()
        .enumerate()
        .map(|(i, c)| leaf(&c.name, &c.ty, Repetition::OPTIONAL, Source::Value(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let root = Type::group_type_builder("spark_schema")
        .with_fields(vec![
            group("meta", Repetition::REQUIRED, meta)?,
            group("key", Repetition::REQUIRED, key)?,
            group("value", Repetition::OPTIONAL, value)?,
        ])
        .build()?;
    Ok((Arc::new(root), leaves))
}

impl Leaf {
    fn add(&mut self, r: &Record) {
        match self.source {
            Source::Ts => self.buf.push(&Value::Timestamp(r.ts)),
            Source::Action => self.buf.push(&Value::Str(r.action.unwrap_or('U').to_string())),
            Source::Key => self.buf.push(&r.key),
            Source::Value(i) => match r.values.as_ref().map(|v| &v[i]) {
                None => self.defs.push(0),
                Some(Value::Null) => self.defs.push(1),
                Some(v) => {
                    self.defs.push(2);
                    self.buf.push(v);
                }
            },
        }
    }
}

fn flush<W: Write + Send>(writer: &mut SerializedFileWriter<W>, leaves: &mut [Leaf]) -> Result<(), ParquetError> {
    let mut rg = writer.next_row_group()?;
    for leaf in leaves.iter_mut() {
        let mut col = rg.next_column()?.expect("one column writer per leaf");
        let defs = matches!(leaf.source, Source::Value(_)).then_some(leaf.defs.as_slice());
        leaf.buf.write_to(&mut col, defs)?;
        col.close()?;
        leaf.defs.clear();
    }
    rg.close()?;
    Ok(())
}

pub fn write<W: Write + Send>(spec: &PartSpec, records: impl Iterator<Item = Record>, out: W) -> io::Result<()> {
    let (root, mut leaves) = schema(spec).map_err(err)?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut writer = SerializedFileWriter::new(out, root, Arc::new(props)).map_err(err)?;
    let mut rows = 0;
    for r in records {
        leaves.iter_mut().for_each(|l| l.add(&r));
        rows += 1;
        if rows == ROW_GROUP_ROWS {
            flush(&mut writer, &mut leaves).map_err(err)?;
            rows = 0;
        }
    }
    if rows > 0 {
        flush(&mut writer, &mut leaves).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::render;
    use super::super::{Format, Mode};
    use bytes::Bytes;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    #[test]
    fn a_parquet_reader_opens_the_part() {
        let bytes = render(Format::Parquet, Mode::Condensed, true);
        assert_eq!(&bytes[..4], b"PAR1");
        let reader = SerializedFileReader::new(Bytes::from(bytes)).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 3);
        let rows: Vec<String> = reader.get_row_iter(None).unwrap().map(|r| r.unwrap().to_string()).collect();
        assert!(rows[0].contains("action: \"U\"") && rows[0].contains("id: 1"), "{}", rows[0]);
        assert!(rows[1].contains("value: null"), "a delete has no value group: {}", rows[1]);
        assert!(rows[2].contains("ratio: NaN"), "{}", rows[2]);
    }
}

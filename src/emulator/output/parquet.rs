//! Parquet parts: groups `meta` (`ts`, `action`), `key` and an optional `value` (absent for
//! deletes), like Spark's struct layout. Nested objects and arrays are JSON text columns; UUIDs and
//! IPs are text, timestamps `TIMESTAMP(MICROS, UTC)`, decimals up to 18 digits `DECIMAL` on INT64.

use std::io::{self, Write};
use std::sync::Arc;

use parquet::basic::{Compression, LogicalType, Repetition, TimeUnit, Type as Physical};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{Type, TypePtr};

use super::PartSpec;
use crate::emulator::dataset::Record;
use crate::schema::ColumnType;
use crate::value::Value;

const ROW_GROUP_ROWS: usize = 65_536;

/// One leaf column's buffered values for the current row group.
enum Buf {
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Bytes(Vec<ByteArray>),
}

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

/// The Parquet type and empty buffer for a column type.
fn leaf_type(name: &str, ty: &ColumnType, repetition: Repetition) -> Result<(Type, Buf), ParquetError> {
    let (physical, logical, buf) = match ty {
        ColumnType::Int(16) => (Physical::INT32, Some(LogicalType::integer(16, true)), Buf::I32(Vec::new())),
        ColumnType::Int(32) => (Physical::INT32, None, Buf::I32(Vec::new())),
        ColumnType::Int(_) | ColumnType::IntEnum(_) => (Physical::INT64, None, Buf::I64(Vec::new())),
        ColumnType::Float(32) => (Physical::FLOAT, None, Buf::F32(Vec::new())),
        ColumnType::Float(_) => (Physical::DOUBLE, None, Buf::F64(Vec::new())),
        ColumnType::Decimal { precision, scale } if *precision <= 18 => {
            let t = Type::primitive_type_builder(name, Physical::INT64)
                .with_repetition(repetition)
                .with_logical_type(Some(LogicalType::decimal(*scale as i32, *precision as i32)))
                .with_precision(*precision as i32)
                .with_scale(*scale as i32)
                .build()?;
            return Ok((t, Buf::I64(Vec::new())));
        }
        ColumnType::Bool => (Physical::BOOLEAN, None, Buf::Bool(Vec::new())),
        ColumnType::Timestamp => {
            (Physical::INT64, Some(LogicalType::timestamp(true, TimeUnit::MICROS)), Buf::I64(Vec::new()))
        }
        ColumnType::Date => (Physical::INT32, Some(LogicalType::Date), Buf::I32(Vec::new())),
        ColumnType::Time => (Physical::INT64, Some(LogicalType::time(true, TimeUnit::MICROS)), Buf::I64(Vec::new())),
        _ => (Physical::BYTE_ARRAY, Some(LogicalType::String), Buf::Bytes(Vec::new())),
    };
    let t =
        Type::primitive_type_builder(name, physical).with_repetition(repetition).with_logical_type(logical).build()?;
    Ok((t, buf))
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

fn push(buf: &mut Buf, v: &Value) {
    match (buf, v) {
        (Buf::I32(b), Value::Int(i)) => b.push(*i as i32),
        (Buf::I32(b), Value::Date(d)) => b.push(*d),
        (Buf::I64(b), Value::Int(i) | Value::Timestamp(i) | Value::Time(i)) => b.push(*i),
        (Buf::I64(b), Value::Decimal(d)) => b.push(d.mantissa as i64),
        (Buf::F32(b), Value::Float(f)) => b.push(*f as f32),
        (Buf::F64(b), Value::Float(f)) => b.push(*f),
        (Buf::Bool(b), Value::Bool(x)) => b.push(*x),
        (Buf::Bytes(b), Value::Str(s)) => b.push(ByteArray::from(s.as_str())),
        (Buf::Bytes(b), other) => b.push(ByteArray::from(other.to_text().unwrap_or_default().into_bytes())),
        (_, other) => unreachable!("value {other:?} does not match its Parquet column"),
    }
}

impl Leaf {
    fn add(&mut self, r: &Record) {
        match self.source {
            Source::Ts => push(&mut self.buf, &Value::Timestamp(r.ts)),
            Source::Action => push(&mut self.buf, &Value::Str(r.action.unwrap_or('U').to_string())),
            Source::Key => push(&mut self.buf, &r.key),
            Source::Value(i) => match r.values.as_ref().map(|v| &v[i]) {
                None => self.defs.push(0),
                Some(Value::Null) => self.defs.push(1),
                Some(v) => {
                    self.defs.push(2);
                    push(&mut self.buf, v);
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
        match &mut leaf.buf {
            Buf::I32(b) => col.typed::<Int32Type>().write_batch(b, defs, None)?,
            Buf::I64(b) => col.typed::<Int64Type>().write_batch(b, defs, None)?,
            Buf::F32(b) => col.typed::<FloatType>().write_batch(b, defs, None)?,
            Buf::F64(b) => col.typed::<DoubleType>().write_batch(b, defs, None)?,
            Buf::Bool(b) => col.typed::<BoolType>().write_batch(b, defs, None)?,
            Buf::Bytes(b) => col.typed::<ByteArrayType>().write_batch(b, defs, None)?,
        };
        col.close()?;
        leaf.defs.clear();
        match &mut leaf.buf {
            Buf::I32(b) => b.clear(),
            Buf::I64(b) => b.clear(),
            Buf::F32(b) => b.clear(),
            Buf::F64(b) => b.clear(),
            Buf::Bool(b) => b.clear(),
            Buf::Bytes(b) => b.clear(),
        }
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

//! Typed Parquet column buffers shared by the emulator's DAP parts and `dap export`: the Parquet
//! type of each DAP column type (timestamps `TIMESTAMP(MICROS, UTC)`, dates `DATE`, decimals up to
//! 18 digits `DECIMAL` on INT64, everything else that has no Parquet type as UTF-8 text), and a
//! buffer per column that a row group is written from.

use parquet::basic::{LogicalType, Repetition, TimeUnit, Type as Physical};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::writer::SerializedColumnWriter;
use parquet::schema::types::Type;

use crate::schema::ColumnType;
use crate::value::Value;

/// One leaf column's buffered values for the current row group.
pub enum Buf {
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Bytes(Vec<ByteArray>),
}

/// The Parquet type and empty buffer for a column type.
pub fn leaf_type(name: &str, ty: &ColumnType, repetition: Repetition) -> Result<(Type, Buf), ParquetError> {
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

impl Buf {
    /// Appends a non-NULL value of the column's type.
    pub fn push(&mut self, v: &Value) {
        match (self, v) {
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

    /// Writes the buffered values (with `defs`, the definition levels of an optional column) as
    /// this row group's column, and empties the buffer.
    pub fn write_to(&mut self, col: &mut SerializedColumnWriter<'_>, defs: Option<&[i16]>) -> Result<(), ParquetError> {
        match self {
            Buf::I32(b) => col.typed::<Int32Type>().write_batch(b, defs, None)?,
            Buf::I64(b) => col.typed::<Int64Type>().write_batch(b, defs, None)?,
            Buf::F32(b) => col.typed::<FloatType>().write_batch(b, defs, None)?,
            Buf::F64(b) => col.typed::<DoubleType>().write_batch(b, defs, None)?,
            Buf::Bool(b) => col.typed::<BoolType>().write_batch(b, defs, None)?,
            Buf::Bytes(b) => col.typed::<ByteArrayType>().write_batch(b, defs, None)?,
        };
        match self {
            Buf::I32(b) => b.clear(),
            Buf::I64(b) => b.clear(),
            Buf::F32(b) => b.clear(),
            Buf::F64(b) => b.clear(),
            Buf::Bool(b) => b.clear(),
            Buf::Bytes(b) => b.clear(),
        }
        Ok(())
    }
}

//! The database behind the TDS test server: a catalog built from the CREATE TABLE statements it
//! receives, rows typed and checked as SQL Server checks them (NOT NULL, lengths in bytes for
//! `varchar`, UTF-16 units for `nvarchar`, integer ranges, `binary(n)` padding, primary keys,
//! UNIQUE and FOREIGN KEY constraints, IDENTITY), and an interpreter of the T-SQL the adapter
//! and the tests send (SELECT with joins and GROUP BY, INSERT, UPDATE, DELETE with joins, MERGE,
//! DDL, IF … EXEC, transactions). Statements are parsed with sqlparser's MsSql dialect; what it
//! cannot execute is recorded in [`Db::unexecuted`] and answered with an error, never ignored.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use sqlparser::ast::{
    self, AlterTableOperation, AssignmentTarget, BinaryOperator, CharacterLength, ColumnOption, DataType,
    ExactNumberInfo, Expr, FromTable, FunctionArg, FunctionArgExpr, FunctionArguments, JoinConstraint, JoinOperator,
    MergeAction, MergeClauseKind, MergeInsertKind, MergeUpdateKind, ObjectName, ObjectType, Query, SelectItem, SetExpr,
    Statement, TableConstraint, TableFactor, TableObject, UnaryOperator,
};
use sqlparser::dialect::MsSqlDialect;
use sqlparser::parser::Parser;

/// A stored or computed value.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    /// Mantissa and scale.
    Decimal(i128, u8),
    Bit(bool),
    Text(String),
    Binary(Vec<u8>),
    /// Days since 0001-01-01 and 100-nanosecond ticks since midnight.
    DateTime2(i64, u64),
    /// Days since 0001-01-01.
    Date(i64),
    /// 100-nanosecond ticks since midnight.
    Time(u64),
}

/// A column type of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlType {
    TinyInt,
    SmallInt,
    Int,
    BigInt,
    Bit,
    Real,
    Float,
    Decimal(u8, u8),
    /// Bytes (`None`: max).
    VarChar(Option<u32>),
    /// UTF-16 code units (`None`: max).
    NVarChar(Option<u32>),
    /// The deprecated unbounded Unicode text type (what bulk loads of long text use).
    NText,
    Binary(u32),
    VarBinary(Option<u32>),
    DateTime2(u8),
    Date,
    Time(u8),
}

impl SqlType {
    /// The type as T-SQL writes it.
    pub fn sql(&self) -> String {
        let n = |n: &Option<u32>| n.map_or("max".to_string(), |n| n.to_string());
        match self {
            SqlType::TinyInt => "tinyint".into(),
            SqlType::SmallInt => "smallint".into(),
            SqlType::Int => "int".into(),
            SqlType::BigInt => "bigint".into(),
            SqlType::Bit => "bit".into(),
            SqlType::Real => "real".into(),
            SqlType::Float => "float".into(),
            SqlType::Decimal(p, s) => format!("decimal({p}, {s})"),
            SqlType::VarChar(l) => format!("varchar({})", n(l)),
            SqlType::NVarChar(l) => format!("nvarchar({})", n(l)),
            SqlType::NText => "ntext".into(),
            SqlType::Binary(l) => format!("binary({l})"),
            SqlType::VarBinary(l) => format!("varbinary({})", n(l)),
            SqlType::DateTime2(s) => format!("datetime2({s})"),
            SqlType::Date => "date".into(),
            SqlType::Time(s) => format!("time({s})"),
        }
    }
}

impl Cell {
    pub fn as_i64(&self) -> i64 {
        match self {
            Cell::Int(i) => *i,
            Cell::Bit(b) => *b as i64,
            Cell::Float(f) => *f as i64,
            Cell::Decimal(m, s) => (*m / 10i128.pow(*s as u32)) as i64,
            other => panic!("{other:?} is not a number"),
        }
    }

    pub fn as_f64(&self) -> f64 {
        match self {
            Cell::Float(f) => *f,
            Cell::Int(i) => *i as f64,
            Cell::Decimal(m, s) => *m as f64 / 10f64.powi(*s as i32),
            other => panic!("{other:?} is not a number"),
        }
    }

    /// The mantissa at `scale` digits.
    pub fn as_decimal(&self, scale: u8) -> i128 {
        match self {
            Cell::Decimal(m, s) if *s <= scale => m * 10i128.pow((scale - s) as u32),
            Cell::Decimal(m, s) => m / 10i128.pow((s - scale) as u32),
            Cell::Int(i) => *i as i128 * 10i128.pow(scale as u32),
            other => panic!("{other:?} is not a decimal"),
        }
    }

    pub fn as_text(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(f) => f.to_string(),
            Cell::Bit(b) => (*b as u8).to_string(),
            Cell::Decimal(m, s) => decimal_text(*m, *s),
            Cell::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            Cell::DateTime2(d, t) => format!("{}T{}", date_text(*d), time_text(*t)),
            Cell::Date(d) => date_text(*d),
            Cell::Time(t) => time_text(*t),
            Cell::Null => String::new(),
        }
    }

    pub fn as_bytes(&self) -> Vec<u8> {
        match self {
            Cell::Binary(b) => b.clone(),
            Cell::Text(s) => s.as_bytes().to_vec(),
            other => panic!("{other:?} is not binary"),
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }
}

fn decimal_text(m: i128, s: u8) -> String {
    if s == 0 {
        return m.to_string();
    }
    let pow = 10i128.pow(s as u32);
    let sign = if m < 0 { "-" } else { "" };
    format!("{sign}{}.{:0width$}", (m / pow).unsigned_abs(), (m % pow).unsigned_abs(), width = s as usize)
}

/// Days since 0001-01-01 as `YYYY-MM-DD`.
pub fn date_text(days: i64) -> String {
    let d = chrono::NaiveDate::from_ymd_opt(1, 1, 1).unwrap() + chrono::Duration::days(days);
    d.format("%Y-%m-%d").to_string()
}

fn time_text(ticks: u64) -> String {
    let secs = ticks / 10_000_000;
    format!("{:02}:{:02}:{:02}.{:07}", secs / 3600, secs / 60 % 60, secs % 60, ticks % 10_000_000)
}

/// An error as SQL Server reports it: its number and message.
#[derive(Debug, Clone)]
pub struct SqlError {
    pub number: u32,
    pub message: String,
}

fn fail<T>(number: u32, message: impl Into<String>) -> Result<T, SqlError> {
    Err(SqlError { number, message: message.into() })
}

type Res<T> = Result<T, SqlError>;

/// A table's name: schema and name, both lowercase (the catalog is case-insensitive).
pub type TableKey = (String, String);

#[derive(Debug, Clone)]
pub struct ColumnDef {
    pub name: String,
    pub ty: SqlType,
    pub nullable: bool,
    pub identity: bool,
}

/// A value of a key, hashable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyCell {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    Other(String),
}

fn key_cell(c: &Cell) -> KeyCell {
    match c {
        Cell::Null => KeyCell::Null,
        Cell::Int(i) => KeyCell::Int(*i),
        Cell::Bit(b) => KeyCell::Int(*b as i64),
        // Comparisons ignore trailing spaces, as SQL Server's do.
        Cell::Text(s) => KeyCell::Text(s.trim_end_matches(' ').to_string()),
        Cell::Binary(b) => KeyCell::Bytes(b.clone()),
        Cell::Decimal(m, s) => {
            let (mut m, mut s) = (*m, *s);
            while s > 0 && m % 10 == 0 {
                m /= 10;
                s -= 1;
            }
            if s == 0 && i64::try_from(m).is_ok() { KeyCell::Int(m as i64) } else { KeyCell::Other(decimal_text(m, s)) }
        }
        Cell::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => KeyCell::Int(*f as i64),
        other => KeyCell::Other(format!("{other:?}")),
    }
}

#[derive(Debug, Clone)]
pub struct KeyConstraint {
    pub name: String,
    pub columns: Vec<usize>,
    index: HashMap<Vec<KeyCell>, usize>,
}

#[derive(Debug, Clone)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<usize>,
    pub references: TableKey,
    pub referred: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub object_id: i64,
    pub columns: Vec<ColumnDef>,
    /// Rows by row id; deleted rows are `None`.
    pub rows: Vec<Option<Vec<Cell>>>,
    pub primary_key: Option<KeyConstraint>,
    pub uniques: Vec<KeyConstraint>,
    pub foreign_keys: Vec<ForeignKey>,
    next_identity: i64,
    identity_insert: bool,
}

impl Table {
    pub fn live_rows(&self) -> impl Iterator<Item = &Vec<Cell>> {
        self.rows.iter().flatten()
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name.eq_ignore_ascii_case(name))
    }

    fn keys_mut(&mut self) -> impl Iterator<Item = &mut KeyConstraint> {
        self.primary_key.iter_mut().chain(self.uniques.iter_mut())
    }

    fn key_of(row: &[Cell], k: &KeyConstraint) -> Vec<KeyCell> {
        k.columns.iter().map(|&i| key_cell(&row[i])).collect()
    }

    fn check_keys(&self, row: &[Cell], except: Option<usize>) -> Res<()> {
        for k in self.primary_key.iter().chain(&self.uniques) {
            let key = Table::key_of(row, k);
            if let Some(&other) = k.index.get(&key)
                && Some(other) != except
            {
                let kind = if self.primary_key.as_ref().map(|p| p.name == k.name) == Some(true) {
                    "PRIMARY KEY"
                } else {
                    "UNIQUE KEY"
                };
                let shown: Vec<String> = k.columns.iter().map(|&i| row[i].as_text()).collect();
                return fail(
                    2627,
                    format!(
                        "Violation of {kind} constraint '{}'. Cannot insert duplicate key in object '{}.{}'. The duplicate key value is ({}).",
                        k.name,
                        self.schema,
                        self.name,
                        shown.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    fn index_row(&mut self, rowid: usize) {
        let row = self.rows[rowid].as_ref().expect("a live row");
        for k in self.primary_key.iter_mut().chain(self.uniques.iter_mut()) {
            k.index.insert(Table::key_of(row, k), rowid);
        }
    }

    fn unindex_row(&mut self, rowid: usize) {
        let row = self.rows[rowid].as_ref().expect("a live row");
        for k in self.primary_key.iter_mut().chain(self.uniques.iter_mut()) {
            let key = Table::key_of(row, k);
            if k.index.get(&key) == Some(&rowid) {
                k.index.remove(&key);
            }
        }
    }

    fn rebuild_indexes(&mut self) -> Res<()> {
        let rows: Vec<(usize, Vec<Cell>)> =
            self.rows.iter().enumerate().filter_map(|(i, r)| r.clone().map(|r| (i, r))).collect();
        let schema = self.schema.clone();
        let name = self.name.clone();
        for k in self.keys_mut() {
            k.index.clear();
            for (i, row) in &rows {
                let key = Table::key_of(row, k);
                if k.index.insert(key, *i).is_some() {
                    return fail(
                        1505,
                        format!(
                            "The CREATE UNIQUE INDEX statement terminated because a duplicate key was found for the object name '{schema}.{name}' and the index name '{}'.",
                            k.name
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// What undoes one change, kept until the transaction (or the statement) ends.
#[derive(Debug)]
enum Undo {
    Inserted(TableKey, usize),
    Deleted(TableKey, usize, Vec<Cell>),
    Updated(TableKey, usize, Vec<Cell>),
    Created(TableKey),
    /// The whole table as it was (dropped or altered).
    Replaced(TableKey, Box<Table>),
    SchemaCreated(String),
    ViewCreated(TableKey),
    IndexCreated(String),
    Identity(TableKey, i64),
}

/// A connection's state: its parameters and its open transaction.
#[derive(Default)]
pub struct Session {
    undo: Vec<Undo>,
    pub in_transaction: bool,
    /// The table an `INSERT BULK` named, for the bulk-load message that follows.
    pub bulk_target: Option<TableKey>,
}

/// A result set.
#[derive(Debug, Clone, Default)]
pub struct ResultSet {
    pub columns: Vec<(String, SqlType, Meta)>,
    pub rows: Vec<Vec<Cell>>,
}

/// What one statement produced.
#[derive(Debug)]
pub enum Outcome {
    Rows(ResultSet),
    Count(u64),
    Done,
    Begin,
    Commit,
    Rollback,
}

/// The whole database.
pub struct Db {
    pub name: String,
    pub collation: String,
    pub schemas: Vec<String>,
    pub tables: BTreeMap<TableKey, Table>,
    pub views: BTreeMap<TableKey, Query>,
    pub indexes: BTreeMap<String, TableKey>,
    next_object_id: i64,
    /// Statements this server could not execute (answered with an error).
    pub unexecuted: Vec<String>,
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn ident_parts(name: &ObjectName) -> Vec<String> {
    name.0.iter().map(|p| p.as_ident().map(|i| i.value.clone()).unwrap_or_else(|| p.to_string())).collect()
}

/// The key of a table named `a.b`, `b`, `"a"."b"` or `[a].[b]` (default schema `dbo`).
pub fn parse_table_name(text: &str) -> TableKey {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for ch in text.trim().chars() {
        match (quote, ch) {
            (None, '"') => quote = Some('"'),
            (None, '[') => quote = Some(']'),
            (Some(q), c) if c == q => quote = None,
            (None, '.') => parts.push(std::mem::take(&mut cur)),
            (_, c) => cur.push(c),
        }
    }
    parts.push(cur);
    let name = parts.pop().unwrap_or_default();
    let schema = parts.pop().unwrap_or_else(|| "dbo".into());
    (lower(&schema), lower(&name))
}

fn table_key(name: &ObjectName) -> TableKey {
    let parts = ident_parts(name);
    let n = parts.len();
    let table = parts.last().cloned().unwrap_or_default();
    let schema = if n >= 2 { parts[n - 2].clone() } else { "dbo".into() };
    (lower(&schema), lower(&table))
}

/// Converts a type of the AST.
fn sql_type(dt: &DataType) -> Res<SqlType> {
    let chars = |l: &Option<CharacterLength>, unit_max: u32| -> Option<u32> {
        match l {
            Some(CharacterLength::IntegerLength { length, .. }) => Some(*length as u32),
            Some(CharacterLength::Max) => None,
            None => Some(1.min(unit_max)),
        }
    };
    Ok(match dt {
        DataType::TinyInt(_) => SqlType::TinyInt,
        DataType::SmallInt(_) => SqlType::SmallInt,
        DataType::Int(_) | DataType::Integer(_) => SqlType::Int,
        DataType::BigInt(_) => SqlType::BigInt,
        DataType::Bit(_) => SqlType::Bit,
        DataType::Real => SqlType::Real,
        DataType::Float(_) | DataType::Double(_) | DataType::DoublePrecision => SqlType::Float,
        DataType::Decimal(info) | DataType::Numeric(info) => match info {
            ExactNumberInfo::None => SqlType::Decimal(18, 0),
            ExactNumberInfo::Precision(p) => SqlType::Decimal(*p as u8, 0),
            ExactNumberInfo::PrecisionAndScale(p, s) => SqlType::Decimal(*p as u8, *s as u8),
        },
        DataType::Varchar(l) | DataType::Char(l) | DataType::Character(l) => SqlType::VarChar(chars(l, 8000)),
        DataType::Nvarchar(l) => SqlType::NVarChar(chars(l, 4000)),
        DataType::Binary(l) => SqlType::Binary(l.unwrap_or(1) as u32),
        DataType::Varbinary(l) => SqlType::VarBinary(match l {
            Some(ast::BinaryLength::IntegerLength { length }) => Some(*length as u32),
            Some(ast::BinaryLength::Max) => None,
            None => Some(1),
        }),
        DataType::Date => SqlType::Date,
        DataType::Time(p, _) => SqlType::Time(p.unwrap_or(7) as u8),
        DataType::Custom(name, modifiers) => {
            let n = lower(&ident_parts(name).join("."));
            let arg = modifiers.first().and_then(|m| m.to_string().parse::<u8>().ok());
            match n.as_str() {
                "datetime2" => SqlType::DateTime2(arg.unwrap_or(7)),
                "nvarchar" => SqlType::NVarChar(modifiers.first().and_then(|m| m.to_string().parse().ok())),
                "sysname" => SqlType::NVarChar(Some(128)),
                "nchar" => SqlType::NVarChar(Some(arg.unwrap_or(1) as u32)),
                "ntext" => SqlType::NText,
                _ => return fail(2715, format!("Column, parameter, or variable: Cannot find data type {n}.")),
            }
        }
        other => return fail(2715, format!("Cannot find data type {other}.")),
    })
}

/// Parses the type text of `ALTER COLUMN` (which sqlparser does not parse).
fn parse_type_text(text: &str) -> Res<SqlType> {
    let sql = format!("CREATE TABLE t (c {text})");
    let parsed =
        Parser::parse_sql(&MsSqlDialect {}, &sql).map_err(|e| SqlError { number: 102, message: e.to_string() })?;
    match parsed.first() {
        Some(Statement::CreateTable(ct)) if ct.columns.len() == 1 => sql_type(&ct.columns[0].data_type),
        _ => fail(102, format!("Incorrect syntax near '{text}'.")),
    }
}

const TICKS_PER_DAY: u64 = 864_000_000_000;

/// Days from 0001-01-01 to 1970-01-01.
pub const UNIX_EPOCH_DAYS: i64 = 719_162;

/// Converts a value for storage in a column of `ty`, as an assignment does.
pub fn convert(c: Cell, ty: &SqlType, column: &str) -> Res<Cell> {
    if c.is_null() {
        return Ok(Cell::Null);
    }
    let overflow =
        |what: &str| fail(8115, format!("Arithmetic overflow error converting {what} to data type {}.", ty.sql()));
    let truncated = || {
        fail(
            2628,
            format!(
                "String or binary data would be truncated in column '{column}'. The value does not fit {}.",
                ty.sql()
            ),
        )
    };
    Ok(match ty {
        SqlType::TinyInt | SqlType::SmallInt | SqlType::Int | SqlType::BigInt => {
            let v: i128 = match &c {
                Cell::Int(i) => *i as i128,
                Cell::Bit(b) => *b as i128,
                Cell::Decimal(m, s) => *m / 10i128.pow(*s as u32),
                Cell::Float(f) => *f as i128,
                Cell::Text(t) => match t.trim().parse::<i128>() {
                    Ok(v) => v,
                    Err(_) => {
                        return fail(
                            245,
                            format!("Conversion failed when converting the varchar value '{t}' to data type int."),
                        );
                    }
                },
                other => {
                    return fail(529, format!("Explicit conversion from {other:?} to {} is not allowed.", ty.sql()));
                }
            };
            let (lo, hi): (i128, i128) = match ty {
                SqlType::TinyInt => (0, 255),
                SqlType::SmallInt => (i16::MIN as i128, i16::MAX as i128),
                SqlType::Int => (i32::MIN as i128, i32::MAX as i128),
                _ => (i64::MIN as i128, i64::MAX as i128),
            };
            if v < lo || v > hi {
                return overflow("expression");
            }
            Cell::Int(v as i64)
        }
        SqlType::Bit => Cell::Bit(match &c {
            Cell::Bit(b) => *b,
            Cell::Int(i) => *i != 0,
            Cell::Text(t) if t.eq_ignore_ascii_case("true") => true,
            Cell::Text(t) if t.eq_ignore_ascii_case("false") => false,
            Cell::Text(t) => t.trim().parse::<i64>().map(|v| v != 0).unwrap_or(false),
            other => other.as_i64() != 0,
        }),
        SqlType::Real => Cell::Float(c.as_f64() as f32 as f64),
        SqlType::Float => Cell::Float(match &c {
            Cell::Text(t) => t.parse().unwrap_or(0.0),
            other => other.as_f64(),
        }),
        SqlType::Decimal(p, s) => {
            let m = match &c {
                Cell::Float(f) => (f * 10f64.powi(*s as i32)).round() as i128,
                Cell::Text(t) => match parse_decimal(t) {
                    Some(d) => d.as_decimal(*s),
                    None => return fail(8114, format!("Error converting data type varchar to {}.", ty.sql())),
                },
                other => {
                    // Rounded half away from zero when the scale shrinks, as SQL Server rounds.
                    if let Cell::Decimal(m, from) = other
                        && from > s
                    {
                        let f = 10i128.pow((from - s) as u32);
                        (m + m.signum() * f / 2) / f
                    } else {
                        other.as_decimal(*s)
                    }
                }
            };
            if m.unsigned_abs() >= 10u128.pow(*p as u32) {
                return overflow("numeric");
            }
            Cell::Decimal(m, *s)
        }
        SqlType::VarChar(n) => {
            let t = match c {
                Cell::Text(t) => t,
                other => other.as_text(),
            };
            if n.is_some_and(|n| t.len() > n as usize) {
                return truncated();
            }
            Cell::Text(t)
        }
        SqlType::NText => Cell::Text(match c {
            Cell::Text(t) => t,
            other => other.as_text(),
        }),
        SqlType::NVarChar(n) => {
            let t = match c {
                Cell::Text(t) => t,
                other => other.as_text(),
            };
            if n.is_some_and(|n| t.encode_utf16().count() > n as usize) {
                return truncated();
            }
            Cell::Text(t)
        }
        SqlType::Binary(n) => {
            let mut b = c.as_bytes();
            if b.len() > *n as usize {
                return truncated();
            }
            b.resize(*n as usize, 0); // binary(n) pads with zero bytes
            Cell::Binary(b)
        }
        SqlType::VarBinary(n) => {
            let b = c.as_bytes();
            if n.is_some_and(|n| b.len() > n as usize) {
                return truncated();
            }
            Cell::Binary(b)
        }
        SqlType::DateTime2(scale) => match c {
            Cell::DateTime2(d, t) => Cell::DateTime2(d, round_ticks(t, *scale)),
            Cell::Date(d) => Cell::DateTime2(d, 0),
            Cell::Text(t) => parse_datetime(&t).ok_or(()).or_else(|_| {
                fail(241, format!("Conversion failed when converting date and/or time from character string '{t}'."))
            })?,
            other => return fail(529, format!("Explicit conversion from {other:?} to datetime2 is not allowed.")),
        },
        SqlType::Date => match c {
            Cell::Date(d) | Cell::DateTime2(d, _) => Cell::Date(d),
            Cell::Text(t) => match parse_datetime(&t) {
                Some(Cell::DateTime2(d, _)) => Cell::Date(d),
                _ => return fail(241, format!("Conversion failed when converting date from character string '{t}'.")),
            },
            other => return fail(529, format!("Explicit conversion from {other:?} to date is not allowed.")),
        },
        SqlType::Time(scale) => match c {
            Cell::Time(t) | Cell::DateTime2(_, t) => Cell::Time(round_ticks(t, *scale)),
            other => return fail(529, format!("Explicit conversion from {other:?} to time is not allowed.")),
        },
    })
}

fn round_ticks(ticks: u64, scale: u8) -> u64 {
    let unit = 10u64.pow(7 - scale.min(7) as u32);
    ticks / unit * unit
}

fn parse_decimal(t: &str) -> Option<Cell> {
    let t = t.trim();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let m: i128 = format!("{int}{frac}").parse().ok()?;
    Some(Cell::Decimal(if neg { -m } else { m }, frac.len() as u8))
}

fn parse_datetime(t: &str) -> Option<Cell> {
    let t = t.trim().trim_end_matches('Z');
    let (date, time) = t.split_once(['T', ' ']).unwrap_or((t, "00:00:00"));
    let d = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let days = (d - chrono::NaiveDate::from_ymd_opt(1, 1, 1)?).num_days();
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut it = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (it.next()??, it.next()??, it.next().flatten().unwrap_or(0));
    let mut f = frac.to_string();
    f.truncate(7);
    while f.len() < 7 {
        f.push('0');
    }
    let ticks = ((h * 60 + m) * 60 + s) * 10_000_000 + f.parse::<u64>().ok()?;
    (ticks < TICKS_PER_DAY).then_some(Cell::DateTime2(days, ticks))
}

/// SQL comparison: `None` when either side is NULL.
fn compare(a: &Cell, b: &Cell) -> Option<Ordering> {
    use Cell::*;
    match (a, b) {
        (Null, _) | (_, Null) => None,
        (Text(x), Text(y)) => Some(x.trim_end_matches(' ').cmp(y.trim_end_matches(' '))),
        (Binary(x), Binary(y)) => Some(x.cmp(y)),
        (Int(x), Int(y)) => Some(x.cmp(y)),
        (Bit(x), Bit(y)) => Some(x.cmp(y)),
        (DateTime2(d1, t1), DateTime2(d2, t2)) => Some((d1, t1).cmp(&(d2, t2))),
        (Date(x), Date(y)) => Some(x.cmp(y)),
        (Time(x), Time(y)) => Some(x.cmp(y)),
        (Decimal(..), _) | (_, Decimal(..)) if !matches!(a, Float(_)) && !matches!(b, Float(_)) => {
            let s = 18;
            Some(a.as_decimal(s).cmp(&b.as_decimal(s)))
        }
        (Text(t), other) | (other, Text(t)) if matches!(other, Int(_) | Bit(_)) => {
            let n = t.trim().parse::<i64>().ok()?;
            let o = other.as_i64();
            Some(if matches!(a, Text(_)) { n.cmp(&o) } else { o.cmp(&n) })
        }
        (Text(t), DateTime2(..)) => compare(&parse_datetime(t)?, b),
        (DateTime2(..), Text(t)) => compare(a, &parse_datetime(t)?),
        _ => a.as_f64().partial_cmp(&b.as_f64()),
    }
}

/// What a result column reports besides its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub nullable: bool,
    /// An IDENTITY column (reported read-only: bulk loads leave it to the server).
    pub identity: bool,
}

impl Meta {
    const NULLABLE: Meta = Meta { nullable: true, identity: false };
    const REQUIRED: Meta = Meta { nullable: false, identity: false };
}

/// The columns of a row set: qualifier (alias or table), name, type.
#[derive(Debug, Clone, Default)]
struct Scope {
    columns: Vec<(String, String, SqlType, Meta)>,
}

impl Scope {
    fn find(&self, qualifier: Option<&str>, name: &str) -> Res<usize> {
        let found: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, (q, n, _, _))| {
                n.eq_ignore_ascii_case(name) && qualifier.is_none_or(|w| q.eq_ignore_ascii_case(w))
            })
            .map(|(i, _)| i)
            .collect();
        match found.as_slice() {
            [i] => Ok(*i),
            [] => {
                let shown = qualifier.map_or(name.to_string(), |q| format!("{q}.{name}"));
                fail(207, format!("Invalid column name '{shown}'."))
            }
            _ => fail(209, format!("Ambiguous column name '{name}'.")),
        }
    }
}

/// A row set with its scope; `rowids` pairs each row with the row id of a DML target's table.
#[derive(Debug, Clone, Default)]
struct Relation {
    scope: Scope,
    rows: Vec<Vec<Cell>>,
}

/// The name of the hidden column that carries a DML target's row ids.
const ROWID: &str = "%rowid";

/// Parameters of the RPC being executed, by name (`@P1`).
pub type Params = HashMap<String, Cell>;

struct Ctx<'a> {
    params: &'a Params,
}

impl Db {
    pub fn new(name: &str, collation: &str) -> Db {
        Db {
            name: name.into(),
            collation: collation.into(),
            schemas: vec!["dbo".into(), "sys".into(), "INFORMATION_SCHEMA".into()],
            tables: BTreeMap::new(),
            views: BTreeMap::new(),
            indexes: BTreeMap::new(),
            next_object_id: 1000,
            unexecuted: Vec::new(),
        }
    }

    pub fn table(&self, schema: &str, name: &str) -> Option<&Table> {
        self.tables.get(&(lower(schema), lower(name)))
    }

    fn table_mut(&mut self, key: &TableKey) -> Res<&mut Table> {
        match self.tables.get_mut(key) {
            Some(t) => Ok(t),
            None => fail(208, format!("Invalid object name '{}.{}'.", key.0, key.1)),
        }
    }

    fn has_schema(&self, name: &str) -> bool {
        self.schemas.iter().any(|s| s.eq_ignore_ascii_case(name))
    }

    /// Rolls a session's changes back to `mark`.
    fn undo_to(&mut self, session: &mut Session, mark: usize) {
        while session.undo.len() > mark {
            let u = session.undo.pop().expect("an undo entry");
            match u {
                Undo::Inserted(k, rowid) => {
                    if let Some(t) = self.tables.get_mut(&k)
                        && t.rows.get(rowid).is_some_and(Option::is_some)
                    {
                        t.unindex_row(rowid);
                        t.rows[rowid] = None;
                    }
                }
                Undo::Deleted(k, rowid, row) => {
                    if let Some(t) = self.tables.get_mut(&k) {
                        t.rows[rowid] = Some(row);
                        t.index_row(rowid);
                    }
                }
                Undo::Updated(k, rowid, old) => {
                    if let Some(t) = self.tables.get_mut(&k) {
                        t.unindex_row(rowid);
                        t.rows[rowid] = Some(old);
                        t.index_row(rowid);
                    }
                }
                Undo::Created(k) => {
                    self.tables.remove(&k);
                }
                Undo::Replaced(k, table) => {
                    self.tables.insert(k, *table);
                }
                Undo::SchemaCreated(s) => self.schemas.retain(|x| x != &s),
                Undo::ViewCreated(k) => {
                    self.views.remove(&k);
                }
                Undo::IndexCreated(n) => {
                    self.indexes.remove(&n);
                }
                Undo::Identity(k, next) => {
                    if let Some(t) = self.tables.get_mut(&k) {
                        t.next_identity = next;
                    }
                }
            }
        }
    }

    /// Ends the session's transaction, keeping or undoing its changes.
    pub fn end_transaction(&mut self, session: &mut Session, commit: bool) {
        if !commit {
            self.undo_to(session, 0);
        }
        session.undo.clear();
        session.in_transaction = false;
    }

    /// Executes a batch: its statements in order. An error rolls back the failing statement,
    /// and the whole transaction when one is open (as with `SET XACT_ABORT ON`).
    pub fn execute_batch(
        &mut self,
        session: &mut Session,
        sql: &str,
        params: &Params,
    ) -> (Vec<Outcome>, Option<SqlError>) {
        let mut outcomes = Vec::new();
        let statements = match self.split(sql) {
            Ok(s) => s,
            Err(e) => return (outcomes, Some(e)),
        };
        for statement in statements {
            let mark = session.undo.len();
            match self.execute(session, &statement, params) {
                Ok(o) => {
                    outcomes.push(o);
                    if !session.in_transaction {
                        session.undo.clear();
                    }
                }
                Err(e) => {
                    if session.in_transaction {
                        self.end_transaction(session, false);
                        outcomes.push(Outcome::Rollback);
                    } else {
                        self.undo_to(session, mark);
                        session.undo.clear();
                    }
                    return (outcomes, Some(e));
                }
            }
        }
        (outcomes, None)
    }

    /// The statements of a batch: those sqlparser reads, plus the forms it does not
    /// (`INSERT BULK`, `ALTER TABLE … ALTER COLUMN`), kept as text.
    fn split(&mut self, sql: &str) -> Res<Vec<Parsed>> {
        let trimmed = sql.trim().trim_end_matches(';').trim();
        let upper = trimmed.to_ascii_uppercase();
        if upper.starts_with("INSERT BULK ") {
            return Ok(vec![Parsed::InsertBulk(trimmed.to_string())]);
        }
        if upper.starts_with("ALTER TABLE ") && upper.contains(" ALTER COLUMN ") && !trimmed.contains(';') {
            return Ok(vec![Parsed::AlterColumn(trimmed.to_string())]);
        }
        match Parser::parse_sql(&MsSqlDialect {}, sql) {
            Ok(statements) => Ok(statements.into_iter().map(|s| Parsed::Ast(Box::new(s))).collect()),
            Err(e) => {
                self.unexecuted.push(sql.to_string());
                fail(102, format!("The test server cannot parse this batch: {e}"))
            }
        }
    }

    fn execute(&mut self, session: &mut Session, statement: &Parsed, params: &Params) -> Res<Outcome> {
        let ctx = Ctx { params };
        match statement {
            Parsed::InsertBulk(text) => {
                let rest = &text["INSERT BULK ".len()..];
                let name = rest.split('(').next().unwrap_or(rest).trim();
                let key = parse_table_name(name);
                self.table_mut(&key)?;
                session.bulk_target = Some(key);
                Ok(Outcome::Done)
            }
            Parsed::AlterColumn(text) => self.alter_column(session, text),
            Parsed::Ast(s) => self.statement(session, s, &ctx),
        }
    }

    fn unsupported<T>(&mut self, what: &str, statement: &dyn std::fmt::Display) -> Res<T> {
        self.unexecuted.push(statement.to_string());
        fail(40000, format!("The test server cannot execute {what}: {statement}"))
    }

    fn statement(&mut self, session: &mut Session, s: &Statement, ctx: &Ctx) -> Res<Outcome> {
        match s {
            Statement::Query(q) => {
                let (rel, names) = self.query(q, ctx, None)?;
                Ok(Outcome::Rows(result_set(rel, names)))
            }
            Statement::StartTransaction { .. } => {
                session.in_transaction = true;
                Ok(Outcome::Begin)
            }
            Statement::Commit { .. } => {
                if !session.in_transaction {
                    return fail(3902, "The COMMIT TRANSACTION request has no corresponding BEGIN TRANSACTION.");
                }
                self.end_transaction(session, true);
                Ok(Outcome::Commit)
            }
            Statement::Rollback { .. } => {
                if !session.in_transaction {
                    return fail(3903, "The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION.");
                }
                self.end_transaction(session, false);
                Ok(Outcome::Rollback)
            }
            Statement::Set(set) => {
                if let ast::Set::SetSessionParam(ast::SetSessionParamKind::IdentityInsert(p)) = set {
                    let key = table_key(&p.obj);
                    let on = matches!(p.value, ast::SessionParamValue::On);
                    self.table_mut(&key)?.identity_insert = on;
                }
                // Other session settings (XACT_ABORT, NOCOUNT, …) hold as this server behaves.
                Ok(Outcome::Done)
            }
            Statement::If(stmt) => {
                let block = &stmt.if_block;
                let cond = match &block.condition {
                    Some(c) => truthy(&self.eval(c, &Scope::default(), &[], ctx)?),
                    None => true,
                };
                let body = if cond {
                    Some(&block.conditional_statements)
                } else {
                    stmt.else_block.as_ref().map(|b| &b.conditional_statements)
                };
                let mut last = Outcome::Done;
                if let Some(body) = body {
                    for inner in body.statements() {
                        last = self.statement(session, inner, ctx)?;
                    }
                }
                Ok(last)
            }
            Statement::Execute { name: None, parameters, .. } => {
                let text = match parameters.first().map(|p| self.eval(p, &Scope::default(), &[], ctx)).transpose()? {
                    Some(Cell::Text(t)) => t,
                    _ => return self.unsupported("this EXEC", s),
                };
                let (_, error) = self.execute_batch(session, &text, ctx.params);
                match error {
                    Some(e) => Err(e),
                    None => Ok(Outcome::Done),
                }
            }
            Statement::CreateSchema { schema_name: ast::SchemaName::Simple(name), .. } => {
                let n = ident_parts(name).join(".");
                if self.has_schema(&n) {
                    return fail(2714, format!("There is already an object named '{n}' in the database."));
                }
                self.schemas.push(n.clone());
                session.undo.push(Undo::SchemaCreated(n));
                Ok(Outcome::Done)
            }
            Statement::CreateTable(ct) => self.create_table(session, ct),
            Statement::CreateView(v) => {
                let key = table_key(&v.name);
                if self.views.contains_key(&key) || self.tables.contains_key(&key) {
                    return fail(2714, format!("There is already an object named '{}' in the database.", key.1));
                }
                self.query(&v.query, ctx, None)?; // it must be valid now
                self.views.insert(key.clone(), (*v.query).clone());
                session.undo.push(Undo::ViewCreated(key));
                Ok(Outcome::Done)
            }
            Statement::CreateIndex(ci) => {
                let key = table_key(&ci.table_name);
                let t = self.table_mut(&key)?;
                for c in &ci.columns {
                    let col = expr_name(&c.column.expr).unwrap_or_default();
                    if t.column_index(&col).is_none() {
                        return fail(1911, format!("Column name '{col}' does not exist in the target table or view."));
                    }
                }
                let name = ci.name.as_ref().map(|n| ident_parts(n).join(".")).unwrap_or_default();
                self.indexes.insert(name.clone(), key);
                session.undo.push(Undo::IndexCreated(name));
                Ok(Outcome::Done)
            }
            Statement::Drop { object_type, if_exists, names, .. } => {
                for name in names {
                    let key = table_key(name);
                    match object_type {
                        ObjectType::Table => match self.tables.remove(&key) {
                            Some(t) => {
                                self.indexes.retain(|_, k| k != &key);
                                session.undo.push(Undo::Replaced(key, Box::new(t)));
                            }
                            None if *if_exists => {}
                            None => {
                                return fail(
                                    3701,
                                    format!(
                                        "Cannot drop the table '{}.{}', because it does not exist or you do not have permission.",
                                        key.0, key.1
                                    ),
                                );
                            }
                        },
                        ObjectType::View => {
                            if self.views.remove(&key).is_none() && !*if_exists {
                                return fail(3701, format!("Cannot drop the view '{}'.", key.1));
                            }
                        }
                        _ => return self.unsupported("this DROP", s),
                    }
                }
                Ok(Outcome::Done)
            }
            Statement::AlterTable(at) => {
                let key = table_key(&at.name);
                for op in &at.operations {
                    self.alter_table(session, &key, op, ctx)?;
                }
                Ok(Outcome::Done)
            }
            Statement::Insert(ins) => self.insert(session, ins, ctx),
            Statement::Update(u) => self.update(session, u, ctx),
            Statement::Delete(d) => self.delete(session, d, ctx),
            Statement::Merge(m) => self.merge(session, m, ctx),
            other => self.unsupported("this statement", other),
        }
    }

    fn create_table(&mut self, session: &mut Session, ct: &ast::CreateTable) -> Res<Outcome> {
        let key = table_key(&ct.name);
        if !self.has_schema(&key.0) {
            return fail(
                2760,
                format!(
                    "The specified schema name \"{}\" either does not exist or you do not have permission to use it.",
                    key.0
                ),
            );
        }
        if self.tables.contains_key(&key) {
            if ct.if_not_exists {
                return Ok(Outcome::Done);
            }
            return fail(2714, format!("There is already an object named '{}' in the database.", key.1));
        }
        let parts = ident_parts(&ct.name);
        let mut columns = Vec::new();
        let mut primary_key = None;
        for c in &ct.columns {
            let mut def =
                ColumnDef { name: c.name.value.clone(), ty: sql_type(&c.data_type)?, nullable: true, identity: false };
            for o in &c.options {
                match &o.option {
                    ColumnOption::NotNull => def.nullable = false,
                    ColumnOption::Null => def.nullable = true,
                    ColumnOption::Identity(_) => {
                        def.identity = true;
                        def.nullable = false;
                    }
                    ColumnOption::PrimaryKey(_) => {
                        def.nullable = false;
                        primary_key = Some(KeyConstraint {
                            name: o.name.as_ref().map(|n| n.value.clone()).unwrap_or_else(|| format!("PK__{}", key.1)),
                            columns: vec![columns.len()],
                            index: HashMap::new(),
                        });
                    }
                    _ => {}
                }
            }
            columns.push(def);
        }
        self.next_object_id += 1;
        let mut table = Table {
            schema: parts.get(parts.len().wrapping_sub(2)).cloned().unwrap_or_else(|| "dbo".into()),
            name: parts.last().cloned().unwrap_or_default(),
            object_id: self.next_object_id,
            columns,
            rows: Vec::new(),
            primary_key,
            uniques: Vec::new(),
            foreign_keys: Vec::new(),
            next_identity: 1,
            identity_insert: false,
        };
        for c in &ct.constraints {
            add_constraint(self, &mut table, c)?;
        }
        self.tables.insert(key.clone(), table);
        session.undo.push(Undo::Created(key));
        Ok(Outcome::Done)
    }

    fn alter_table(&mut self, session: &mut Session, key: &TableKey, op: &AlterTableOperation, ctx: &Ctx) -> Res<()> {
        let before = self.table_mut(key)?.clone();
        let result = (|| -> Res<()> {
            match op {
                AlterTableOperation::AddConstraint { constraint, .. } => {
                    let mut t = self.tables.remove(key).expect("the table");
                    let r = add_constraint(self, &mut t, constraint).and_then(|_| t.rebuild_indexes());
                    self.tables.insert(key.clone(), t);
                    r
                }
                AlterTableOperation::AddColumn { column_def, .. } => {
                    let t = self.table_mut(key)?;
                    if t.column_index(&column_def.name.value).is_some() {
                        return fail(
                            2705,
                            format!(
                                "Column names in each table must be unique. Column name '{}' in table '{}' is specified more than once.",
                                column_def.name.value, t.name
                            ),
                        );
                    }
                    let mut def = ColumnDef {
                        name: column_def.name.value.clone(),
                        ty: sql_type(&column_def.data_type)?,
                        nullable: true,
                        identity: false,
                    };
                    if column_def.options.iter().any(|o| matches!(o.option, ColumnOption::NotNull)) {
                        if t.live_rows().next().is_some() {
                            return fail(
                                4901,
                                format!(
                                    "ALTER TABLE only allows columns to be added that can contain nulls, or have a DEFAULT definition specified. Column '{}' cannot be added to non-empty table '{}'.",
                                    def.name, t.name
                                ),
                            );
                        }
                        def.nullable = false;
                    }
                    t.columns.push(def);
                    for row in t.rows.iter_mut().flatten() {
                        row.push(Cell::Null);
                    }
                    Ok(())
                }
                AlterTableOperation::DropConstraint { name, .. } => {
                    let t = self.table_mut(key)?;
                    let n = name.value.clone();
                    t.uniques.retain(|u| u.name != n);
                    t.foreign_keys.retain(|f| f.name != n);
                    if t.primary_key.as_ref().is_some_and(|p| p.name == n) {
                        t.primary_key = None;
                    }
                    Ok(())
                }
                other => {
                    let _ = ctx;
                    self.unsupported("this ALTER TABLE", other)
                }
            }
        })();
        match result {
            Ok(()) => {
                session.undo.push(Undo::Replaced(key.clone(), Box::new(before)));
                Ok(())
            }
            Err(e) => {
                self.tables.insert(key.clone(), before);
                Err(e)
            }
        }
    }

    /// `ALTER TABLE t ALTER COLUMN c type [NOT] NULL`: every stored value is converted.
    fn alter_column(&mut self, session: &mut Session, text: &str) -> Res<Outcome> {
        let upper = text.to_ascii_uppercase();
        let at = upper.find(" ALTER COLUMN ").expect("an ALTER COLUMN");
        let key = parse_table_name(&text["ALTER TABLE ".len()..at]);
        let rest = text[at + " ALTER COLUMN ".len()..].trim();
        let (name, spec) = if let Some(stripped) = rest.strip_prefix('"') {
            let end = stripped.find('"').unwrap_or(stripped.len());
            (stripped[..end].to_string(), stripped[end + 1..].trim().to_string())
        } else {
            let (n, s) = rest.split_once(' ').unwrap_or((rest, ""));
            (n.trim_matches(['[', ']']).to_string(), s.trim().to_string())
        };
        let spec_upper = spec.to_ascii_uppercase();
        let (ty_text, nullable) = if let Some(t) = spec_upper.strip_suffix(" NOT NULL") {
            (&spec[..t.len()], false)
        } else if let Some(t) = spec_upper.strip_suffix(" NULL") {
            (&spec[..t.len()], true)
        } else {
            (spec.as_str(), true)
        };
        let ty = parse_type_text(ty_text)?;
        let t = self.table_mut(&key)?;
        let Some(i) = t.column_index(&name) else {
            return fail(
                4924,
                format!(
                    "ALTER TABLE ALTER COLUMN failed because column '{name}' does not exist in table '{}'.",
                    t.name
                ),
            );
        };
        let before = t.clone();
        let column = t.columns[i].name.clone();
        for row in t.rows.iter_mut().flatten() {
            let v = std::mem::replace(&mut row[i], Cell::Null);
            if !nullable && v.is_null() {
                let t_name = before.name.clone();
                self.tables.insert(key, before);
                return fail(
                    515,
                    format!(
                        "Cannot insert the value NULL into column '{column}', table '{t_name}'; column does not allow nulls. UPDATE fails."
                    ),
                );
            }
            match convert(v, &ty, &column) {
                Ok(c) => row[i] = c,
                Err(e) => {
                    self.tables.insert(key, before);
                    return Err(e);
                }
            }
        }
        t.columns[i].ty = ty;
        t.columns[i].nullable = nullable;
        session.undo.push(Undo::Replaced(key, Box::new(before)));
        Ok(Outcome::Done)
    }

    /// Inserts a row given by column (all others NULL or IDENTITY), checking every constraint.
    pub fn insert_row(&mut self, session: &mut Session, key: &TableKey, given: Vec<(usize, Cell)>) -> Res<()> {
        let t = self.tables.get(key).expect("the table");
        let mut row = vec![Cell::Null; t.columns.len()];
        let mut explicit_identity = false;
        for (i, v) in given {
            let c = &t.columns[i];
            if c.identity && !t.identity_insert {
                return fail(
                    544,
                    format!(
                        "Cannot insert explicit value for identity column in table '{}' when IDENTITY_INSERT is set to OFF.",
                        t.name
                    ),
                );
            }
            explicit_identity |= c.identity;
            row[i] = convert(v, &c.ty, &c.name)?;
        }
        let mut next = None;
        for (i, c) in t.columns.iter().enumerate() {
            if c.identity && !explicit_identity {
                row[i] = Cell::Int(t.next_identity);
                next = Some(t.next_identity + 1);
            } else if c.identity && explicit_identity {
                let v = row[i].as_i64();
                if v >= t.next_identity {
                    next = Some(v + 1);
                }
            }
            if !c.nullable && row[i].is_null() {
                return fail(
                    515,
                    format!(
                        "Cannot insert the value NULL into column '{}', table '{}.{}'; column does not allow nulls. INSERT fails.",
                        c.name, t.schema, t.name
                    ),
                );
            }
        }
        t.check_keys(&row, None)?;
        self.check_references(t, &row)?;
        let t = self.tables.get_mut(key).expect("the table");
        if let Some(n) = next {
            session.undo.push(Undo::Identity(key.clone(), t.next_identity));
            t.next_identity = n;
        }
        t.rows.push(Some(row));
        let rowid = t.rows.len() - 1;
        t.index_row(rowid);
        session.undo.push(Undo::Inserted(key.clone(), rowid));
        Ok(())
    }

    /// The table columns a bulk load's columns fill, by name.
    pub fn bulk_targets(&self, key: &TableKey, names: &[String]) -> Res<Vec<usize>> {
        let t = self
            .tables
            .get(key)
            .ok_or(SqlError { number: 208, message: format!("Invalid object name '{}.{}'.", key.0, key.1) })?;
        names
            .iter()
            .map(|n| {
                t.column_index(n).ok_or(SqlError {
                    number: 4819,
                    message: format!(
                        "Cannot bulk load. The bulk data stream names column {n}, which the table has not."
                    ),
                })
            })
            .collect()
    }

    /// Stores one row of a bulk load.
    pub fn bulk_row(&mut self, session: &mut Session, key: &TableKey, targets: &[usize], row: Vec<Cell>) -> Res<()> {
        self.insert_row(session, key, targets.iter().copied().zip(row).collect())
    }

    /// Marks the start of a statement run outside [`Db::execute_batch`] (a bulk load).
    pub fn statement_mark(&self, session: &Session) -> usize {
        session.undo.len()
    }

    /// Ends a statement run outside [`Db::execute_batch`]: kept, or rolled back (with the whole
    /// transaction, as under XACT_ABORT). Returns whether a transaction was rolled back.
    pub fn finish_statement(&mut self, session: &mut Session, mark: usize, ok: bool) -> bool {
        if ok {
            if !session.in_transaction {
                session.undo.clear();
            }
            return false;
        }
        if session.in_transaction {
            self.end_transaction(session, false);
            return true;
        }
        self.undo_to(session, mark);
        session.undo.clear();
        false
    }

    fn check_references(&self, t: &Table, row: &[Cell]) -> Res<()> {
        for fk in &t.foreign_keys {
            let values: Vec<&Cell> = fk.columns.iter().map(|&i| &row[i]).collect();
            if values.iter().any(|v| v.is_null()) {
                continue;
            }
            let Some(target) = self.tables.get(&fk.references) else { continue };
            let found = target.primary_key.iter().chain(&target.uniques).find(|k| {
                k.columns.len() == fk.referred.len()
                    && k.columns.iter().zip(&fk.referred).all(|(&i, n)| target.columns[i].name.eq_ignore_ascii_case(n))
            });
            let present = match found {
                Some(k) => k.index.contains_key(&values.iter().map(|v| key_cell(v)).collect::<Vec<_>>()),
                None => false,
            };
            if !present {
                return fail(
                    547,
                    format!(
                        "The INSERT statement conflicted with the FOREIGN KEY constraint \"{}\". The conflict occurred in database \"{}\", table \"{}.{}\".",
                        fk.name, self.name, target.schema, target.name
                    ),
                );
            }
        }
        Ok(())
    }

    fn delete_row(&mut self, session: &mut Session, key: &TableKey, rowid: usize) {
        let t = self.tables.get_mut(key).expect("the table");
        if t.rows[rowid].is_none() {
            return;
        }
        t.unindex_row(rowid);
        let row = t.rows[rowid].take().expect("a live row");
        session.undo.push(Undo::Deleted(key.clone(), rowid, row));
    }

    fn update_row(&mut self, session: &mut Session, key: &TableKey, rowid: usize, set: Vec<(usize, Cell)>) -> Res<()> {
        let t = self.tables.get(key).expect("the table");
        let old = t.rows[rowid].clone().expect("a live row");
        let mut new = old.clone();
        for (i, v) in set {
            let c = &t.columns[i];
            if c.identity {
                return fail(8102, format!("Cannot update identity column '{}'.", c.name));
            }
            let v = convert(v, &c.ty, &c.name)?;
            if !c.nullable && v.is_null() {
                return fail(
                    515,
                    format!(
                        "Cannot insert the value NULL into column '{}', table '{}.{}'; column does not allow nulls. UPDATE fails.",
                        c.name, t.schema, t.name
                    ),
                );
            }
            new[i] = v;
        }
        t.check_keys(&new, Some(rowid))?;
        self.check_references(t, &new)?;
        let t = self.tables.get_mut(key).expect("the table");
        t.unindex_row(rowid);
        t.rows[rowid] = Some(new);
        t.index_row(rowid);
        session.undo.push(Undo::Updated(key.clone(), rowid, old));
        Ok(())
    }

    fn insert(&mut self, session: &mut Session, ins: &ast::Insert, ctx: &Ctx) -> Res<Outcome> {
        let TableObject::TableName(name) = &ins.table else { return self.unsupported("this INSERT", &ins.table) };
        let key = table_key(name);
        let t = self.table_mut(&key)?;
        let targets: Vec<usize> = if ins.columns.is_empty() {
            (0..t.columns.len()).filter(|&i| !t.columns[i].identity || t.identity_insert).collect()
        } else {
            ins.columns
                .iter()
                .map(|c| {
                    let n = ident_parts(c).pop().unwrap_or_default();
                    t.column_index(&n).ok_or(SqlError { number: 207, message: format!("Invalid column name '{n}'.") })
                })
                .collect::<Res<_>>()?
        };
        let Some(source) = &ins.source else { return self.unsupported("an INSERT without a source", &ins.table) };
        let (rel, _) = self.query(source, ctx, None)?;
        if rel.scope.columns.len() != targets.len() {
            return fail(
                120,
                "The select list for the INSERT statement contains fewer or more items than the insert list.",
            );
        }
        let n = rel.rows.len() as u64;
        for row in rel.rows {
            self.insert_row(session, &key, targets.iter().copied().zip(row).collect())?;
        }
        Ok(Outcome::Count(n))
    }

    /// The rows of a DML target (with their row ids) joined with `from`, filtered by `selection`.
    fn target_rows(
        &self,
        key: &TableKey,
        alias: &str,
        joins: &[ast::Join],
        extra_from: &[ast::TableWithJoins],
        selection: Option<&Expr>,
        ctx: &Ctx,
    ) -> Res<Relation> {
        let mut rel = self.table_relation(key, alias, true)?;
        for j in joins {
            rel = self.join(rel, j, ctx)?;
        }
        for twj in extra_from {
            let mut other = self.factor(&twj.relation, ctx)?;
            for j in &twj.joins {
                other = self.join(other, j, ctx)?;
            }
            rel = cross(rel, other);
        }
        if let Some(w) = selection {
            let scope = rel.scope.clone();
            let mut kept = Vec::new();
            for row in rel.rows {
                if truthy(&self.eval(w, &scope, &row, ctx)?) {
                    kept.push(row);
                }
            }
            rel.rows = kept;
        }
        Ok(rel)
    }

    fn update(&mut self, session: &mut Session, u: &ast::Update, ctx: &Ctx) -> Res<Outcome> {
        let TableFactor::Table { name, alias, .. } = &u.table.relation else {
            return self.unsupported("this UPDATE", &u.table);
        };
        let key = table_key(name);
        let alias = alias.as_ref().map_or(key.1.clone(), |a| a.name.value.clone());
        let rel = self.target_rows(&key, &alias, &u.table.joins, &[], u.selection.as_ref(), ctx)?;
        let rowid_at = rel.scope.find(Some(&alias), ROWID)?;
        let t = self.table_mut(&key)?;
        let assignments: Vec<(usize, &Expr)> = u
            .assignments
            .iter()
            .map(|a| {
                let AssignmentTarget::ColumnName(c) = &a.target else {
                    return fail(102, "a tuple assignment");
                };
                let n = ident_parts(c).pop().unwrap_or_default();
                Ok((
                    t.column_index(&n)
                        .ok_or(SqlError { number: 207, message: format!("Invalid column name '{n}'.") })?,
                    &a.value,
                ))
            })
            .collect::<Res<_>>()?;
        let n = rel.rows.len() as u64;
        for row in &rel.rows {
            let set = assignments
                .iter()
                .map(|(i, e)| Ok((*i, self.eval(e, &rel.scope, row, ctx)?)))
                .collect::<Res<Vec<_>>>()?;
            self.update_row(session, &key, row[rowid_at].as_i64() as usize, set)?;
        }
        Ok(Outcome::Count(n))
    }

    fn delete(&mut self, session: &mut Session, d: &ast::Delete, ctx: &Ctx) -> Res<Outcome> {
        let from = match &d.from {
            FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f) => f,
        };
        let Some(first) = from.first() else {
            return self
                .unsupported("this DELETE", &d.selection.clone().unwrap_or(Expr::Value(ast::Value::Null.into())));
        };
        // `DELETE x FROM t AS x JOIN …` deletes from the table aliased `x`.
        let (key, alias) = match &first.relation {
            TableFactor::Table { name, alias, .. } => {
                (table_key(name), alias.as_ref().map_or_else(|| table_key(name).1, |a| a.name.value.clone()))
            }
            other => return self.unsupported("this DELETE", other),
        };
        if let Some(named) = d.tables.first() {
            let n = ident_parts(named).pop().unwrap_or_default();
            if !n.eq_ignore_ascii_case(&alias) && table_key(named) != key {
                return self.unsupported("a DELETE of a joined table", named);
            }
        }
        let rel = self.target_rows(&key, &alias, &first.joins, &from[1..], d.selection.as_ref(), ctx)?;
        let rowid_at = rel.scope.find(Some(&alias), ROWID)?;
        let mut rowids: Vec<usize> = rel.rows.iter().map(|r| r[rowid_at].as_i64() as usize).collect();
        rowids.sort_unstable();
        rowids.dedup();
        for &r in &rowids {
            self.delete_row(session, &key, r);
        }
        Ok(Outcome::Count(rowids.len() as u64))
    }

    fn merge(&mut self, session: &mut Session, m: &ast::Merge, ctx: &Ctx) -> Res<Outcome> {
        let TableFactor::Table { name, alias, .. } = &m.table else { return self.unsupported("this MERGE", &m.table) };
        let key = table_key(name);
        let alias = alias.as_ref().map_or(key.1.clone(), |a| a.name.value.clone());
        let target = self.table_relation(&key, &alias, true)?;
        let source = self.factor(&m.source, ctx)?;
        // Each source row matches at most one target row (else SQL Server refuses the MERGE).
        let scope = Scope { columns: target.scope.columns.iter().chain(&source.scope.columns).cloned().collect() };
        let width = target.scope.columns.len();
        let matches = self.match_rows(&target, &source, &m.on, ctx)?;
        let rowid_at = target.scope.find(Some(&alias), ROWID)?;
        let t = TableColumns(self.table_mut(&key)?.columns.clone());
        let mut seen = std::collections::HashSet::new();
        let mut count = 0;
        for (si, srow) in source.rows.iter().enumerate() {
            let matched = &matches[si];
            if matched.len() > 1 {
                return fail(
                    8672,
                    "The MERGE statement attempted to UPDATE or DELETE the same row more than once. A target row matched more than one source row.",
                );
            }
            let combined: Vec<Cell> = match matched.first() {
                Some(&ti) => target.rows[ti].iter().cloned().chain(srow.iter().cloned()).collect(),
                None => std::iter::repeat_n(Cell::Null, width).chain(srow.iter().cloned()).collect(),
            };
            for clause in &m.clauses {
                let applies = matches!(
                    (clause.clause_kind, matched.is_empty()),
                    (MergeClauseKind::Matched, false)
                        | (MergeClauseKind::NotMatched | MergeClauseKind::NotMatchedByTarget, true)
                );
                if !applies {
                    continue;
                }
                if let Some(p) = &clause.predicate
                    && !truthy(&self.eval(p, &scope, &combined, ctx)?)
                {
                    continue;
                }
                match &clause.action {
                    MergeAction::Update(u) => {
                        let MergeUpdateKind::Set(assignments) = &u.kind else {
                            return self.unsupported("UPDATE *", &m.table);
                        };
                        let rowid = combined[rowid_at].as_i64() as usize;
                        if !seen.insert(rowid) {
                            return fail(
                                8672,
                                "The MERGE statement attempted to UPDATE or DELETE the same row more than once.",
                            );
                        }
                        let set = assignments
                            .iter()
                            .map(|a| {
                                let AssignmentTarget::ColumnName(c) = &a.target else {
                                    return fail(102, "a tuple assignment");
                                };
                                let n = ident_parts(c).pop().unwrap_or_default();
                                let i = t
                                    .column_index(&n)
                                    .ok_or(SqlError { number: 207, message: format!("Invalid column name '{n}'.") })?;
                                Ok((i, self.eval(&a.value, &scope, &combined, ctx)?))
                            })
                            .collect::<Res<Vec<_>>>()?;
                        self.update_row(session, &key, rowid, set)?;
                    }
                    MergeAction::Delete { .. } => {
                        self.delete_row(session, &key, combined[rowid_at].as_i64() as usize);
                    }
                    MergeAction::Insert(i) => {
                        let MergeInsertKind::Values(values) = &i.kind else {
                            return self.unsupported("INSERT ROW", &m.table);
                        };
                        let exprs = &values.rows[0].content;
                        let given = i
                            .columns
                            .iter()
                            .zip(exprs)
                            .map(|(c, e)| {
                                let n = ident_parts(c).pop().unwrap_or_default();
                                let idx = t
                                    .column_index(&n)
                                    .ok_or(SqlError { number: 207, message: format!("Invalid column name '{n}'.") })?;
                                Ok((idx, self.eval(e, &scope, &combined, ctx)?))
                            })
                            .collect::<Res<Vec<_>>>()?;
                        self.insert_row(session, &key, given)?;
                    }
                    MergeAction::DoNothing { .. } => {}
                }
                count += 1;
                break;
            }
        }
        Ok(Outcome::Count(count))
    }

    /// For each source row, the target rows the ON condition matches (hashed on its equalities).
    fn match_rows(&self, target: &Relation, source: &Relation, on: &Expr, ctx: &Ctx) -> Res<Vec<Vec<usize>>> {
        let scope = Scope { columns: target.scope.columns.iter().chain(&source.scope.columns).cloned().collect() };
        let width = target.scope.columns.len();
        let pairs = equalities(on, &scope, width);
        let mut out = vec![Vec::new(); source.rows.len()];
        if !pairs.is_empty() {
            let mut hash: HashMap<Vec<KeyCell>, Vec<usize>> = HashMap::new();
            for (i, row) in target.rows.iter().enumerate() {
                let k: Vec<KeyCell> = pairs.iter().map(|(l, _)| key_cell(&row[*l])).collect();
                if !k.contains(&KeyCell::Null) {
                    hash.entry(k).or_default().push(i);
                }
            }
            for (si, srow) in source.rows.iter().enumerate() {
                let k: Vec<KeyCell> = pairs.iter().map(|(_, r)| key_cell(&srow[*r - width])).collect();
                if let Some(candidates) = hash.get(&k) {
                    for &ti in candidates {
                        let combined: Vec<Cell> = target.rows[ti].iter().chain(srow).cloned().collect();
                        if truthy(&self.eval(on, &scope, &combined, ctx)?) {
                            out[si].push(ti);
                        }
                    }
                }
            }
        } else {
            for (si, srow) in source.rows.iter().enumerate() {
                for (ti, trow) in target.rows.iter().enumerate() {
                    let combined: Vec<Cell> = trow.iter().chain(srow).cloned().collect();
                    if truthy(&self.eval(on, &scope, &combined, ctx)?) {
                        out[si].push(ti);
                    }
                }
            }
        }
        Ok(out)
    }

    /// A stored table (or a system view) as a relation; with its row ids for a DML target.
    fn table_relation(&self, key: &TableKey, alias: &str, with_rowids: bool) -> Res<Relation> {
        let col = |n: &str, ty: SqlType| (alias.to_string(), n.to_string(), ty, Meta::NULLABLE);
        if key.0 == "sys" {
            let rows: Vec<Vec<Cell>> = match key.1.as_str() {
                "schemas" => self.schemas.iter().map(|s| vec![Cell::Text(s.clone())]).collect(),
                "tables" => self.tables.values().map(|t| vec![Cell::Text(t.name.clone())]).collect(),
                "indexes" => self.indexes.keys().map(|n| vec![Cell::Text(n.clone())]).collect(),
                "views" => self.views.keys().map(|k| vec![Cell::Text(k.1.clone())]).collect(),
                _ => return fail(208, format!("Invalid object name 'sys.{}'.", key.1)),
            };
            return Ok(Relation { scope: Scope { columns: vec![col("name", SqlType::NVarChar(Some(128)))] }, rows });
        }
        if let Some(view) = self.views.get(key) {
            let params = Params::new();
            let (rel, names) = self.query(view, &Ctx { params: &params }, None)?;
            let columns =
                rel.scope.columns.iter().zip(names).map(|(c, n)| (alias.to_string(), n, c.2.clone(), c.3)).collect();
            return Ok(Relation { scope: Scope { columns }, rows: rel.rows });
        }
        let Some(t) = self.tables.get(key) else {
            return fail(208, format!("Invalid object name '{}.{}'.", key.0, key.1));
        };
        let mut columns: Vec<_> = t
            .columns
            .iter()
            .map(|c| {
                (alias.to_string(), c.name.clone(), c.ty.clone(), Meta { nullable: c.nullable, identity: c.identity })
            })
            .collect();
        if with_rowids {
            columns.push(col(ROWID, SqlType::BigInt));
        }
        let rows = t
            .rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.as_ref().map(|r| {
                    let mut r = r.clone();
                    if with_rowids {
                        r.push(Cell::Int(i as i64));
                    }
                    r
                })
            })
            .collect();
        Ok(Relation { scope: Scope { columns }, rows })
    }

    fn factor(&self, f: &TableFactor, ctx: &Ctx) -> Res<Relation> {
        match f {
            TableFactor::Table { name, alias, .. } => {
                let key = table_key(name);
                let a = alias.as_ref().map_or(key.1.clone(), |a| a.name.value.clone());
                self.table_relation(&key, &a, false)
            }
            TableFactor::Derived { subquery, alias, .. } => {
                let (mut rel, names) = self.query(subquery, ctx, None)?;
                let a = alias.as_ref().map(|a| a.name.value.clone()).unwrap_or_default();
                let renamed: Vec<String> = match alias {
                    Some(al) if !al.columns.is_empty() => al.columns.iter().map(|c| c.name.value.clone()).collect(),
                    _ => names,
                };
                for (c, n) in rel.scope.columns.iter_mut().zip(renamed) {
                    c.0 = a.clone();
                    c.1 = n;
                }
                Ok(rel)
            }
            other => fail(40000, format!("The test server cannot read from {other}")),
        }
    }

    fn join(&self, left: Relation, j: &ast::Join, ctx: &Ctx) -> Res<Relation> {
        let right = self.factor(&j.relation, ctx)?;
        let (on, outer) = match &j.join_operator {
            JoinOperator::Join(JoinConstraint::On(e)) | JoinOperator::Inner(JoinConstraint::On(e)) => (Some(e), false),
            JoinOperator::Left(JoinConstraint::On(e)) | JoinOperator::LeftOuter(JoinConstraint::On(e)) => {
                (Some(e), true)
            }
            JoinOperator::CrossJoin(_) => (None, false),
            other => return fail(40000, format!("The test server cannot join with {other:?}")),
        };
        let Some(on) = on else { return Ok(cross(left, right)) };
        // The right side hashed on the equalities of ON: for each left row, its right matches.
        let matches = self.match_rows(&right, &left, on, ctx)?;
        let scope = Scope { columns: left.scope.columns.iter().chain(&right.scope.columns).cloned().collect() };
        let mut rows = Vec::new();
        let right_width = right.scope.columns.len();
        for (li, l) in left.rows.into_iter().enumerate() {
            if matches[li].is_empty() {
                if outer {
                    rows.push(l.into_iter().chain(std::iter::repeat_n(Cell::Null, right_width)).collect());
                }
                continue;
            }
            for &ri in &matches[li] {
                rows.push(l.iter().chain(&right.rows[ri]).cloned().collect());
            }
        }
        Ok(Relation { scope, rows })
    }

    /// Evaluates a query: its relation and its column names.
    fn query(&self, q: &Query, ctx: &Ctx, outer: Option<(&Scope, &[Cell])>) -> Res<(Relation, Vec<String>)> {
        let order: &[ast::OrderByExpr] = match q.order_by.as_ref().map(|o| &o.kind) {
            Some(ast::OrderByKind::Expressions(exprs)) => exprs,
            _ => &[],
        };
        let (rel, names) = match q.body.as_ref() {
            SetExpr::Select(s) => self.select(s, order, ctx, outer)?,
            SetExpr::Values(v) => {
                let empty = Scope::default();
                let rows = v
                    .rows
                    .iter()
                    .map(|r| r.content.iter().map(|e| self.eval(e, &empty, &[], ctx)).collect::<Res<Vec<_>>>())
                    .collect::<Res<Vec<_>>>()?;
                let width = rows.first().map_or(0, Vec::len);
                let columns = (0..width)
                    .map(|i| {
                        (
                            String::new(),
                            format!("column{}", i + 1),
                            cell_type(rows.iter().map(|r| &r[i])),
                            Meta::NULLABLE,
                        )
                    })
                    .collect();
                let names = (0..width).map(|i| format!("column{}", i + 1)).collect();
                (Relation { scope: Scope { columns }, rows }, names)
            }
            SetExpr::Query(inner) => self.query(inner, ctx, outer)?,
            other => return fail(40000, format!("The test server cannot evaluate {other}")),
        };
        Ok((rel, names))
    }

    fn select(
        &self,
        s: &ast::Select,
        order: &[ast::OrderByExpr],
        ctx: &Ctx,
        outer: Option<(&Scope, &[Cell])>,
    ) -> Res<(Relation, Vec<String>)> {
        let mut rel = Relation::default();
        rel.rows.push(Vec::new());
        let mut first = true;
        for twj in &s.from {
            let mut r = self.factor(&twj.relation, ctx)?;
            for j in &twj.joins {
                r = self.join(r, j, ctx)?;
            }
            rel = if first { r } else { cross(rel, r) };
            first = false;
        }
        // A correlated subquery sees the outer row's columns after its own.
        let (scope, base_rows) = match outer {
            Some((os, orow)) => {
                let scope = Scope { columns: rel.scope.columns.iter().chain(&os.columns).cloned().collect() };
                let rows = rel.rows.into_iter().map(|r| r.into_iter().chain(orow.iter().cloned()).collect()).collect();
                (scope, rows)
            }
            None => (rel.scope, rel.rows),
        };
        let mut rows = Vec::new();
        for row in base_rows {
            if let Some(w) = &s.selection
                && !truthy(&self.eval(w, &scope, &row, ctx)?)
            {
                continue;
            }
            rows.push(row);
        }
        // The output columns.
        let mut items: Vec<(Expr, String)> = Vec::new();
        for item in &s.projection {
            match item {
                SelectItem::UnnamedExpr(e) => items.push((e.clone(), expr_name(e).unwrap_or_default())),
                SelectItem::ExprWithAlias { expr, alias } => items.push((expr.clone(), alias.value.clone())),
                SelectItem::Wildcard(_) => {
                    for (q, n, _, _) in &scope.columns {
                        if n != ROWID && outer.is_none_or(|(os, _)| !os.columns.iter().any(|c| &c.0 == q && &c.1 == n))
                        {
                            items.push((column_expr(q, n), n.clone()));
                        }
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => {
                    let q = kind.to_string();
                    for (cq, n, _, _) in &scope.columns {
                        if n != ROWID && cq.eq_ignore_ascii_case(&q) {
                            items.push((column_expr(cq, n), n.clone()));
                        }
                    }
                }
                other => return fail(40000, format!("The test server cannot select {other}")),
            }
        }
        let group_by: Vec<Expr> = match &s.group_by {
            ast::GroupByExpr::Expressions(e, _) => e.clone(),
            ast::GroupByExpr::All(_) => return fail(40000, "GROUP BY ALL"),
        };
        let aggregate = !group_by.is_empty() || items.iter().any(|(e, _)| has_aggregate(e));
        let mut out_rows: Vec<Vec<Cell>> = Vec::new();
        if aggregate {
            let mut groups: Vec<(Vec<KeyCell>, Vec<usize>)> = Vec::new();
            let mut index: HashMap<Vec<KeyCell>, usize> = HashMap::new();
            for (i, row) in rows.iter().enumerate() {
                let k = group_by
                    .iter()
                    .map(|g| self.eval(g, &scope, row, ctx).map(|c| key_cell(&c)))
                    .collect::<Res<Vec<_>>>()?;
                match index.get(&k) {
                    Some(&g) => groups[g].1.push(i),
                    None => {
                        index.insert(k.clone(), groups.len());
                        groups.push((k, vec![i]));
                    }
                }
            }
            if groups.is_empty() && group_by.is_empty() {
                groups.push((Vec::new(), Vec::new()));
            }
            for (_, members) in &groups {
                let group: Vec<&Vec<Cell>> = members.iter().map(|&i| &rows[i]).collect();
                let out =
                    items.iter().map(|(e, _)| self.eval_aggregate(e, &scope, &group, ctx)).collect::<Res<Vec<_>>>()?;
                out_rows.push(out);
            }
        } else {
            for row in &rows {
                out_rows.push(items.iter().map(|(e, _)| self.eval(e, &scope, row, ctx)).collect::<Res<Vec<_>>>()?);
            }
        }
        if !order.is_empty() {
            // ORDER BY names an output column (or alias), or a column of the source rows.
            let out_scope = Scope {
                columns: items.iter().map(|(_, n)| (String::new(), n.clone(), SqlType::Int, Meta::NULLABLE)).collect(),
            };
            let mut keyed: Vec<(Vec<Cell>, Vec<Cell>)> = Vec::with_capacity(out_rows.len());
            for (i, out) in std::mem::take(&mut out_rows).into_iter().enumerate() {
                let mut k = Vec::with_capacity(order.len());
                for o in order {
                    let by_output = self.eval(&o.expr, &out_scope, &out, ctx);
                    k.push(match by_output {
                        Ok(v) => v,
                        Err(_) if !aggregate => self.eval(&o.expr, &scope, &rows[i], ctx)?,
                        Err(e) => return Err(e),
                    });
                }
                keyed.push((k, out));
            }
            keyed.sort_by(|(a, _), (b, _)| {
                for (i, o) in order.iter().enumerate() {
                    let ord = match (a[i].is_null(), b[i].is_null()) {
                        (true, true) => Ordering::Equal,
                        (true, false) => Ordering::Less,
                        (false, true) => Ordering::Greater,
                        _ => compare(&a[i], &b[i]).unwrap_or(Ordering::Equal),
                    };
                    let ord = if matches!(o.options.sort, Some(ast::OrderBySort::Desc)) { ord.reverse() } else { ord };
                    if ord != Ordering::Equal {
                        return ord;
                    }
                }
                Ordering::Equal
            });
            out_rows = keyed.into_iter().map(|(_, r)| r).collect();
        }
        if matches!(s.distinct, Some(ast::Distinct::Distinct)) {
            let mut seen = std::collections::HashSet::new();
            out_rows.retain(|r| seen.insert(r.iter().map(key_cell).collect::<Vec<_>>()));
        }
        if let Some(top) = &s.top {
            let n = match &top.quantity {
                Some(ast::TopQuantity::Constant(n)) => *n as usize,
                Some(ast::TopQuantity::Expr(e)) => self.eval(e, &Scope::default(), &[], ctx)?.as_i64() as usize,
                None => usize::MAX,
            };
            out_rows.truncate(n);
        }
        let columns = items
            .iter()
            .enumerate()
            .map(|(i, (e, n))| {
                let (ty, meta) = self
                    .expr_type(e, &scope)
                    .unwrap_or_else(|| (cell_type(out_rows.iter().map(|r| &r[i])), Meta::NULLABLE));
                (String::new(), n.clone(), ty, meta)
            })
            .collect();
        let names = items.into_iter().map(|(_, n)| n).collect();
        Ok((Relation { scope: Scope { columns }, rows: out_rows }, names))
    }

    /// The static type of an expression, where it has one.
    fn expr_type(&self, e: &Expr, scope: &Scope) -> Option<(SqlType, Meta)> {
        match e {
            Expr::Identifier(i) if !i.value.starts_with('@') => {
                scope.find(None, &i.value).ok().map(|k| (scope.columns[k].2.clone(), scope.columns[k].3))
            }
            Expr::CompoundIdentifier(parts) => {
                let n = parts.len();
                scope
                    .find(Some(&parts[n - 2].value), &parts[n - 1].value)
                    .ok()
                    .map(|k| (scope.columns[k].2.clone(), scope.columns[k].3))
            }
            Expr::Cast { data_type, .. } => sql_type(data_type).ok().map(|t| (t, Meta::NULLABLE)),
            Expr::Convert { data_type: Some(d), .. } => sql_type(d).ok().map(|t| (t, Meta::NULLABLE)),
            Expr::Nested(inner) => self.expr_type(inner, scope),
            Expr::Function(f) => {
                let name = lower(&ident_parts(&f.name).join("."));
                match name.as_str() {
                    "count" => Some((SqlType::Int, Meta::REQUIRED)),
                    "count_big" => Some((SqlType::BigInt, Meta::REQUIRED)),
                    "max" | "min" => match &f.args {
                        FunctionArguments::List(l) => match l.args.first() {
                            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(a))) => {
                                self.expr_type(a, scope).map(|(t, _)| (t, Meta::NULLABLE))
                            }
                            _ => None,
                        },
                        _ => None,
                    },
                    "object_id" | "col_length" => Some((SqlType::Int, Meta::NULLABLE)),
                    "db_name" => Some((SqlType::NVarChar(Some(128)), Meta::NULLABLE)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn eval_aggregate(&self, e: &Expr, scope: &Scope, group: &[&Vec<Cell>], ctx: &Ctx) -> Res<Cell> {
        if let Expr::Function(f) = e {
            let name = lower(&ident_parts(&f.name).join("."));
            if matches!(name.as_str(), "count" | "count_big" | "max" | "min" | "sum") {
                let (arg, distinct) = match &f.args {
                    FunctionArguments::List(l) => (
                        l.args.first().cloned(),
                        matches!(l.duplicate_treatment, Some(ast::DuplicateTreatment::Distinct)),
                    ),
                    _ => (None, false),
                };
                let values: Vec<Cell> = match &arg {
                    Some(FunctionArg::Unnamed(FunctionArgExpr::Wildcard)) | None => {
                        group.iter().map(|_| Cell::Int(1)).collect()
                    }
                    Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(a))) => group
                        .iter()
                        .map(|r| self.eval(a, scope, r, ctx))
                        .collect::<Res<Vec<_>>>()?
                        .into_iter()
                        .filter(|c| !c.is_null())
                        .collect(),
                    Some(other) => return fail(40000, format!("The test server cannot aggregate {other}")),
                };
                let values = if distinct {
                    let mut seen = std::collections::HashSet::new();
                    values.into_iter().filter(|v| seen.insert(key_cell(v))).collect()
                } else {
                    values
                };
                return Ok(match name.as_str() {
                    "count" | "count_big" => Cell::Int(values.len() as i64),
                    "sum" => values.iter().fold(Cell::Null, |acc, v| match acc {
                        Cell::Null => v.clone(),
                        a => Cell::Int(a.as_i64() + v.as_i64()),
                    }),
                    _ => {
                        let want = if name == "max" { Ordering::Greater } else { Ordering::Less };
                        values.into_iter().fold(Cell::Null, |acc, v| {
                            if acc.is_null() || compare(&v, &acc) == Some(want) { v } else { acc }
                        })
                    }
                });
            }
        }
        match group.first() {
            Some(row) => self.eval(e, scope, row, ctx),
            None => self.eval(e, scope, &vec![Cell::Null; scope.columns.len()], ctx),
        }
    }

    fn eval(&self, e: &Expr, scope: &Scope, row: &[Cell], ctx: &Ctx) -> Res<Cell> {
        Ok(match e {
            Expr::Identifier(i) if i.value.starts_with('@') => match ctx.params.get(&lower(&i.value)) {
                Some(v) => v.clone(),
                None => return fail(137, format!("Must declare the scalar variable \"{}\".", i.value)),
            },
            Expr::Identifier(i) => row[scope.find(None, &i.value)?].clone(),
            Expr::CompoundIdentifier(parts) => {
                let n = parts.len();
                row[scope.find(Some(&parts[n - 2].value), &parts[n - 1].value)?].clone()
            }
            Expr::Value(v) => match &v.value {
                ast::Value::Number(n, _) => {
                    if let Ok(i) = n.parse::<i64>() {
                        Cell::Int(i)
                    } else {
                        parse_decimal(n).unwrap_or(Cell::Float(n.parse().unwrap_or(0.0)))
                    }
                }
                ast::Value::SingleQuotedString(s) | ast::Value::NationalStringLiteral(s) => Cell::Text(s.clone()),
                ast::Value::Boolean(b) => Cell::Bit(*b),
                ast::Value::Null => Cell::Null,
                ast::Value::HexStringLiteral(h) => Cell::Binary(hex_bytes(h)),
                other => return fail(40000, format!("The test server cannot read the literal {other}")),
            },
            Expr::Nested(inner) => self.eval(inner, scope, row, ctx)?,
            Expr::IsNull(inner) => Cell::Bit(self.eval(inner, scope, row, ctx)?.is_null()),
            Expr::IsNotNull(inner) => Cell::Bit(!self.eval(inner, scope, row, ctx)?.is_null()),
            Expr::UnaryOp { op: UnaryOperator::Not, expr } => match self.eval(expr, scope, row, ctx)? {
                Cell::Null => Cell::Null,
                c => Cell::Bit(!truthy(&c)),
            },
            Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match self.eval(expr, scope, row, ctx)? {
                Cell::Int(i) => Cell::Int(-i),
                Cell::Float(f) => Cell::Float(-f),
                Cell::Decimal(m, s) => Cell::Decimal(-m, s),
                c => c,
            },
            Expr::BinaryOp { left, op, right } => {
                let a = self.eval(left, scope, row, ctx)?;
                match op {
                    BinaryOperator::And => {
                        if !a.is_null() && !truthy(&a) {
                            return Ok(Cell::Bit(false));
                        }
                        let b = self.eval(right, scope, row, ctx)?;
                        match (a.is_null(), b.is_null()) {
                            (_, false) if !truthy(&b) => Cell::Bit(false),
                            (false, false) => Cell::Bit(true),
                            _ => Cell::Null,
                        }
                    }
                    BinaryOperator::Or => {
                        if truthy(&a) {
                            return Ok(Cell::Bit(true));
                        }
                        let b = self.eval(right, scope, row, ctx)?;
                        if truthy(&b) {
                            Cell::Bit(true)
                        } else if a.is_null() || b.is_null() {
                            Cell::Null
                        } else {
                            Cell::Bit(false)
                        }
                    }
                    _ => {
                        let b = self.eval(right, scope, row, ctx)?;
                        let cmp = compare(&a, &b);
                        match op {
                            BinaryOperator::Eq => cmp.map_or(Cell::Null, |o| Cell::Bit(o == Ordering::Equal)),
                            BinaryOperator::NotEq => cmp.map_or(Cell::Null, |o| Cell::Bit(o != Ordering::Equal)),
                            BinaryOperator::Lt => cmp.map_or(Cell::Null, |o| Cell::Bit(o == Ordering::Less)),
                            BinaryOperator::LtEq => cmp.map_or(Cell::Null, |o| Cell::Bit(o != Ordering::Greater)),
                            BinaryOperator::Gt => cmp.map_or(Cell::Null, |o| Cell::Bit(o == Ordering::Greater)),
                            BinaryOperator::GtEq => cmp.map_or(Cell::Null, |o| Cell::Bit(o != Ordering::Less)),
                            BinaryOperator::Plus | BinaryOperator::Minus if !a.is_null() && !b.is_null() => {
                                let sign = if matches!(op, BinaryOperator::Plus) { 1 } else { -1 };
                                match (&a, &b) {
                                    (Cell::Text(x), Cell::Text(y)) if sign == 1 => Cell::Text(format!("{x}{y}")),
                                    (Cell::Int(x), Cell::Int(y)) => Cell::Int(x + sign * y),
                                    _ => Cell::Float(a.as_f64() + sign as f64 * b.as_f64()),
                                }
                            }
                            BinaryOperator::Plus | BinaryOperator::Minus => Cell::Null,
                            other => {
                                return fail(40000, format!("The test server cannot evaluate the operator {other}"));
                            }
                        }
                    }
                }
            }
            Expr::Exists { subquery, negated } => {
                let (rel, _) = self.query(subquery, ctx, Some((scope, row)))?;
                Cell::Bit(rel.rows.is_empty() == *negated)
            }
            Expr::In { expr, target: ast::InTarget::Subquery(subquery), negated, .. } => {
                // SQL's three values: NULL when nothing matched and a NULL was on either side.
                let v = self.eval(expr, scope, row, ctx)?;
                let (rel, _) = self.query(subquery, ctx, Some((scope, row)))?;
                let cells: Vec<Cell> = rel.rows.into_iter().filter_map(|r| r.into_iter().next()).collect();
                if cells.iter().any(|c| !v.is_null() && compare(&v, c) == Some(Ordering::Equal)) {
                    Cell::Bit(!*negated)
                } else if v.is_null() || cells.iter().any(Cell::is_null) {
                    Cell::Null
                } else {
                    Cell::Bit(*negated)
                }
            }
            Expr::Subquery(q) => {
                let (rel, _) = self.query(q, ctx, Some((scope, row)))?;
                if rel.rows.len() > 1 {
                    return fail(512, "Subquery returned more than 1 value.");
                }
                rel.rows.into_iter().next().and_then(|r| r.into_iter().next()).unwrap_or(Cell::Null)
            }
            Expr::Cast { expr, data_type, .. } | Expr::Convert { expr, data_type: Some(data_type), .. } => {
                let v = self.eval(expr, scope, row, ctx)?;
                let ty = sql_type(data_type)?;
                match (&v, &ty) {
                    // A conversion to text writes the value as SQL Server's style 126 would.
                    (Cell::DateTime2(d, t), SqlType::VarChar(_) | SqlType::NVarChar(_)) => {
                        Cell::Text(format!("{}T{}", date_text(*d), time_text(*t)))
                    }
                    (Cell::Binary(_), SqlType::VarChar(_) | SqlType::NVarChar(_)) => v,
                    (Cell::Float(f), SqlType::VarChar(_) | SqlType::NVarChar(_)) => Cell::Text(format!("{f:?}")),
                    _ => convert(v, &ty, "CAST")?,
                }
            }
            Expr::Case { operand: None, conditions, else_result, .. } => {
                for w in conditions {
                    if truthy(&self.eval(&w.condition, scope, row, ctx)?) {
                        return self.eval(&w.result, scope, row, ctx);
                    }
                }
                match else_result {
                    Some(e) => self.eval(e, scope, row, ctx)?,
                    None => Cell::Null,
                }
            }
            Expr::Function(f) => self.function(f, scope, row, ctx)?,
            other => return fail(40000, format!("The test server cannot evaluate {other}")),
        })
    }

    fn function(&self, f: &ast::Function, scope: &Scope, row: &[Cell], ctx: &Ctx) -> Res<Cell> {
        let name = lower(&ident_parts(&f.name).join("."));
        let args: Vec<Cell> = match &f.args {
            FunctionArguments::List(l) => l
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => self.eval(e, scope, row, ctx),
                    other => fail(40000, format!("The test server cannot pass {other}")),
                })
                .collect::<Res<_>>()?,
            _ => Vec::new(),
        };
        Ok(match name.as_str() {
            "object_id" => {
                let key = parse_table_name(&args.first().map(Cell::as_text).unwrap_or_default());
                match self.tables.get(&key) {
                    Some(t) => Cell::Int(t.object_id),
                    None if self.views.contains_key(&key) => Cell::Int(1),
                    None => Cell::Null,
                }
            }
            "col_length" => {
                let key = parse_table_name(&args.first().map(Cell::as_text).unwrap_or_default());
                let column = args.get(1).map(Cell::as_text).unwrap_or_default();
                match self.tables.get(&key).and_then(|t| t.column_index(&column)) {
                    Some(_) => Cell::Int(1),
                    None => Cell::Null,
                }
            }
            "db_name" => Cell::Text(self.name.clone()),
            "databasepropertyex" => {
                match args.get(1).map(Cell::as_text).unwrap_or_default().to_ascii_lowercase().as_str() {
                    "collation" => Cell::Text(self.collation.clone()),
                    _ => Cell::Null,
                }
            }
            "isnull" | "coalesce" => args.into_iter().find(|c| !c.is_null()).unwrap_or(Cell::Null),
            "len" => match args.first() {
                Some(Cell::Null) | None => Cell::Null,
                Some(c) => Cell::Int(c.as_text().trim_end_matches(' ').chars().count() as i64),
            },
            "datalength" => match args.first() {
                Some(Cell::Binary(b)) => Cell::Int(b.len() as i64),
                Some(Cell::Text(t)) => Cell::Int(t.len() as i64),
                _ => Cell::Null,
            },
            "serverproperty" => Cell::Text("15.0.2000.5".into()),
            _ => return fail(195, format!("'{name}' is not a recognized built-in function name.")),
        })
    }
}

/// A table's columns, for name lookups while the table itself is being changed.
struct TableColumns(Vec<ColumnDef>);

impl TableColumns {
    fn column_index(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|c| c.name.eq_ignore_ascii_case(name))
    }
}

/// A statement of a batch.
enum Parsed {
    Ast(Box<Statement>),
    InsertBulk(String),
    AlterColumn(String),
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len() / 2).map(|i| u8::from_str_radix(&h[i * 2..i * 2 + 2], 16).unwrap_or(0)).collect()
}

fn truthy(c: &Cell) -> bool {
    match c {
        Cell::Bit(b) => *b,
        Cell::Int(i) => *i != 0,
        _ => false,
    }
}

fn cross(left: Relation, right: Relation) -> Relation {
    let scope = Scope { columns: left.scope.columns.iter().chain(&right.scope.columns).cloned().collect() };
    let mut rows = Vec::new();
    for l in &left.rows {
        for r in &right.rows {
            rows.push(l.iter().chain(r).cloned().collect());
        }
    }
    Relation { scope, rows }
}

/// The `left = right` column pairs of an ON condition's conjunction, as (target column, source
/// column) positions in the combined scope; empty when there are none to hash on.
fn equalities(on: &Expr, scope: &Scope, width: usize) -> Vec<(usize, usize)> {
    fn column(e: &Expr, scope: &Scope) -> Option<usize> {
        match e {
            Expr::Identifier(i) => scope.find(None, &i.value).ok(),
            Expr::CompoundIdentifier(p) => scope.find(Some(&p[p.len() - 2].value), &p[p.len() - 1].value).ok(),
            Expr::Nested(inner) => column(inner, scope),
            _ => None,
        }
    }
    match on {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            let mut v = equalities(left, scope, width);
            v.extend(equalities(right, scope, width));
            v
        }
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => match (column(left, scope), column(right, scope)) {
            (Some(a), Some(b)) if a < width && b >= width => vec![(a, b)],
            (Some(a), Some(b)) if b < width && a >= width => vec![(b, a)],
            _ => Vec::new(),
        },
        Expr::Nested(inner) => equalities(inner, scope, width),
        _ => Vec::new(),
    }
}

fn column_expr(q: &str, n: &str) -> Expr {
    let ident = |s: &str| ast::Ident::with_quote('"', s);
    if q.is_empty() { Expr::Identifier(ident(n)) } else { Expr::CompoundIdentifier(vec![ident(q), ident(n)]) }
}

fn expr_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(i.value.clone()),
        Expr::CompoundIdentifier(p) => p.last().map(|i| i.value.clone()),
        _ => None,
    }
}

fn has_aggregate(e: &Expr) -> bool {
    match e {
        Expr::Function(f) => {
            matches!(lower(&ident_parts(&f.name).join(".")).as_str(), "count" | "count_big" | "max" | "min" | "sum")
        }
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } | Expr::Convert { expr: inner, .. } => {
            has_aggregate(inner)
        }
        Expr::BinaryOp { left, right, .. } => has_aggregate(left) || has_aggregate(right),
        _ => false,
    }
}

/// The type of computed values: from the first that is not NULL.
fn cell_type<'a>(cells: impl Iterator<Item = &'a Cell>) -> SqlType {
    for c in cells {
        return match c {
            Cell::Null => continue,
            Cell::Int(_) => SqlType::BigInt,
            Cell::Float(_) => SqlType::Float,
            Cell::Decimal(_, s) => SqlType::Decimal(38, *s),
            Cell::Bit(_) => SqlType::Bit,
            Cell::Text(_) => SqlType::NVarChar(None),
            Cell::Binary(_) => SqlType::VarBinary(None),
            Cell::DateTime2(..) => SqlType::DateTime2(7),
            Cell::Date(_) => SqlType::Date,
            Cell::Time(_) => SqlType::Time(7),
        };
    }
    SqlType::Int
}

fn result_set(rel: Relation, names: Vec<String>) -> ResultSet {
    ResultSet {
        columns: rel.scope.columns.into_iter().zip(names).map(|((_, _, ty, meta), n)| (n, ty, meta)).collect(),
        rows: rel.rows,
    }
}

fn add_constraint(db: &Db, t: &mut Table, c: &TableConstraint) -> Res<()> {
    let columns = |names: &mut dyn Iterator<Item = String>| -> Res<Vec<usize>> {
        names
            .map(|n| {
                t.column_index(&n).ok_or(SqlError {
                    number: 1911,
                    message: format!("Column name '{n}' does not exist in the target table or view."),
                })
            })
            .collect()
    };
    let taken = |name: &str| {
        db.tables.values().chain(std::iter::once(&*t)).any(|x| {
            x.primary_key.iter().chain(&x.uniques).any(|k| k.name.eq_ignore_ascii_case(name))
                || x.foreign_keys.iter().any(|f| f.name.eq_ignore_ascii_case(name))
        })
    };
    match c {
        TableConstraint::PrimaryKey(pk) => {
            let name = pk.name.as_ref().map(|n| n.value.clone()).unwrap_or_else(|| format!("PK__{}", t.name));
            if taken(&name) {
                return fail(2714, format!("There is already an object named '{name}' in the database."));
            }
            let cols = columns(&mut pk.columns.iter().map(|c| expr_name(&c.column.expr).unwrap_or_default()))?;
            for &i in &cols {
                t.columns[i].nullable = false;
            }
            t.primary_key = Some(KeyConstraint { name, columns: cols, index: HashMap::new() });
        }
        TableConstraint::Unique(u) => {
            let name = u.name.as_ref().map(|n| n.value.clone()).unwrap_or_else(|| format!("UQ__{}", t.name));
            if taken(&name) {
                return fail(2714, format!("There is already an object named '{name}' in the database."));
            }
            let cols = columns(&mut u.columns.iter().map(|c| expr_name(&c.column.expr).unwrap_or_default()))?;
            t.uniques.push(KeyConstraint { name, columns: cols, index: HashMap::new() });
        }
        TableConstraint::ForeignKey(fk) => {
            let name = fk.name.as_ref().map(|n| n.value.clone()).unwrap_or_else(|| format!("FK__{}", t.name));
            if taken(&name) {
                return fail(2714, format!("There is already an object named '{name}' in the database."));
            }
            let references = table_key(&fk.foreign_table);
            if !db.tables.contains_key(&references) && references != (lower(&t.schema), lower(&t.name)) {
                return fail(
                    1767,
                    format!("Foreign key '{name}' references invalid table '{}.{}'.", references.0, references.1),
                );
            }
            let cols = columns(&mut fk.columns.iter().map(|c| c.value.clone()))?;
            t.foreign_keys.push(ForeignKey {
                name,
                columns: cols,
                references,
                referred: fk.referred_columns.iter().map(|c| c.value.clone()).collect(),
            });
        }
        other => return fail(40000, format!("The test server cannot add the constraint {other}")),
    }
    Ok(())
}

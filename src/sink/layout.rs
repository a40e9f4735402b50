//! The official client's database layout, shared by every server dialect: the bookkeeping tables
//! (`table_sync`, `database_version`) with their comments, and the naming of enum types or lookup
//! tables. Each adapter renders these in its own DDL; none restates them.

use crate::schema::{Column, ColumnType, TableDef};

/// The schema (PostgreSQL, SQL Server) or table prefix (MySQL) of the bookkeeping tables.
pub const BOOKKEEPING_SCHEMA: &str = "instructure_dap";
/// Our own bookkeeping (initdb checkpoints, staging, replication positions) lives apart from the
/// official client's, so it never sees anything it does not know.
pub const OUR_SCHEMA: &str = "dap_replica";
/// The only database version the official client 2.3.1 accepts without migrating.
pub const DATABASE_VERSION: i64 = 1;

/// What a database's `database_version` rows mean for dap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredVersion {
    /// The single row `1`: a database of the official client 2.3.
    Current,
    /// No row. With an empty `table_sync` it was provisioned without its version row (an older
    /// `dap ddl`, or by hand): the row is added, as the official client would. With watermarks,
    /// the official client would take it for a pre-1.0 database and empty `table_sync`.
    Missing,
    /// Anything else: made by another version of the official client.
    Other(Vec<i64>),
}

impl StoredVersion {
    pub fn of(versions: &[i64]) -> StoredVersion {
        match versions {
            [DATABASE_VERSION] => StoredVersion::Current,
            [] => StoredVersion::Missing,
            other => StoredVersion::Other(other.to_vec()),
        }
    }

    /// Why a database with these rows is refused (`watermarks`: the rows of `table_sync`), and
    /// what to do; `None` when dap may go on (adding the version row when it is missing).
    pub fn refusal(&self, version_table: &str, sync_table: &str, watermarks: u64) -> Option<String> {
        match self {
            StoredVersion::Current => None,
            StoredVersion::Missing if watermarks == 0 => None,
            StoredVersion::Missing => Some(format!(
                "{version_table} has no row while {sync_table} holds {watermarks} watermarks: the tool that made it left the version out, and the official client would take this database for a pre-1.0 one and empty {sync_table}. \
                 Add the row (INSERT INTO {version_table} (version) VALUES ({DATABASE_VERSION})), then run again"
            )),
            StoredVersion::Other(versions) => Some(format!(
                "{version_table} holds {versions:?}, not [{DATABASE_VERSION}]: this database was made by another version of the official client. \
                 dap writes only version {DATABASE_VERSION} databases; migrate it with the official client 2.3 (`dap syncdb`) first"
            )),
        }
    }
}

pub const DATABASE_VERSION_COMMENT: &str = "Table for storing meta-information about the database schema version.";
pub const VERSION_COLUMN_COMMENT: &str = "The version of the database schema.";
pub const TABLE_SYNC_COMMENT: &str = "Table for storing meta-information about tables managed by the client library.";

/// A column of `table_sync`.
pub struct SyncColumn {
    pub name: &'static str,
    pub kind: SyncColumnKind,
    pub required: bool,
    pub comment: &'static str,
}

/// The kinds of `table_sync` columns, which each dialect maps to its own types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncColumnKind {
    /// `bigint` identity primary key.
    Identity,
    /// `varchar(64)` (SQL Server: `varchar(256)`).
    Name,
    Timestamp,
    BigInt,
    /// Unbounded text.
    Text,
}

pub const TABLE_SYNC_COLUMNS: &[SyncColumn] = &[
    SyncColumn { name: "id", kind: SyncColumnKind::Identity, required: true, comment: "" },
    SyncColumn {
        name: "source_namespace",
        kind: SyncColumnKind::Name,
        required: true,
        comment: "The namespace of the source table exposed by DAP API (e.g. `canvas`).",
    },
    SyncColumn {
        name: "source_table",
        kind: SyncColumnKind::Name,
        required: true,
        comment: "The name of the source table exposed by DAP API (e.g. `accounts`).",
    },
    SyncColumn {
        name: "timestamp",
        kind: SyncColumnKind::Timestamp,
        required: true,
        comment: "The timestamp of the source table that can be used by the client library in incremental queries during subsequent `syncdb` command executions.",
    },
    SyncColumn {
        name: "schema_version",
        kind: SyncColumnKind::BigInt,
        required: true,
        comment: "The latest schema version of the source table at the time point when it was last initialized or synchronized with the DAP API.",
    },
    SyncColumn {
        name: "target_schema",
        kind: SyncColumnKind::Name,
        required: false,
        comment: "The name of the target schema in the local database if applicable (e.g. in case of a PostgreSQL database the tables can be grouped into schemas).",
    },
    SyncColumn {
        name: "target_table",
        kind: SyncColumnKind::Name,
        required: true,
        comment: "The name of the target table in the local database. In might differ from the name of the source table. For example in case of a MySQL database, the tables cannot be grouped in schemas. In this case, the implementor can use a prefix that reflects the namespace of the source table. For example, the qualified name `canvas.accounts` would become `canvas__accounts`.",
    },
    SyncColumn {
        name: "schema_description_format",
        kind: SyncColumnKind::Name,
        required: true,
        comment: "The format of the schema descriptor (e.g. `json`).",
    },
    SyncColumn {
        name: "schema_description",
        kind: SyncColumnKind::Text,
        required: true,
        comment: "The latest schema descriptor of the source table at the time point when it was initialized or last synchronized.",
    },
];

/// An enum of the table, with the name the official client gives its type or lookup table:
/// `<table>__<column>`, `<table>__<column>__<member>` inside nested objects.
#[derive(Debug, Clone, PartialEq)]
pub struct EnumType {
    pub name: String,
    pub values: Vec<String>,
    /// Whether a column of the table uses it (enums inside nested objects are created but unused).
    pub used: bool,
}

/// Every enum a table's schema declares, in column order: column enums, arrays of enums, and
/// enums inside nested objects (which the official client creates though JSON columns never use
/// them).
pub fn enum_types(def: &TableDef) -> Vec<EnumType> {
    fn walk(prefix: &str, c: &Column, used: bool, out: &mut Vec<EnumType>) {
        let name = format!("{prefix}__{}", c.name);
        match &c.ty {
            ColumnType::Enum(values) => out.push(EnumType { name, values: values.clone(), used }),
            ColumnType::Array(item) => {
                if let ColumnType::Enum(values) = item.as_ref() {
                    out.push(EnumType { name, values: values.clone(), used });
                }
            }
            ColumnType::Object(fields) => {
                for f in fields {
                    walk(&name, f, false, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for c in &def.values {
        walk(&def.name, c, true, &mut out);
    }
    out
}

/// The enum type a column uses (directly or as the item of an array), if any.
pub fn column_enum(def: &TableDef, column: &Column) -> Option<String> {
    match &column.ty {
        ColumnType::Enum(_) => Some(format!("{}__{}", def.name, column.name)),
        ColumnType::Array(item) if matches!(item.as_ref(), ColumnType::Enum(_)) => {
            Some(format!("{}__{}", def.name, column.name))
        }
        _ => None,
    }
}

/// The narrowest integer of 16, 32 or 64 bits holding every listed value (integer enums).
pub fn int_enum_bits(values: &[i64]) -> u8 {
    if values.iter().all(|v| i16::try_from(*v).is_ok()) {
        16
    } else if values.iter().all(|v| i32::try_from(*v).is_ok()) {
        32
    } else {
        64
    }
}

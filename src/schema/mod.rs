//! DAP table schemas: the versioned JSON Schema envelope (`meta`/`key`/`value`) turned into a
//! [`TableDef`], the one place where JSON Schema types become column types.
//!
//! The vocabulary is the one of the DAP API (spec §4.2); unknown annotation keywords are ignored
//! rather than rejected, so additive server changes do not break us.

pub mod bundled;
pub mod delta;
pub mod versions;

use serde_json::{Map, Value as Json};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema of {table}: {what}")]
    Invalid { table: String, what: String },
}

/// A table as DAP describes it: the primary key and the value columns, in schema order.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDef {
    pub namespace: String,
    pub name: String,
    pub version: u32,
    pub key: Column,
    pub values: Vec<Column>,
    /// The table's title and description (a database comment), as DAP documents the table.
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// NOT NULL (listed in the schema's `required`).
    pub required: bool,
    /// The property's `title`, else its `description` (a database comment).
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ColumnType {
    /// Integer of 16, 32 or 64 bits.
    Int(u8),
    /// Integer restricted to listed values (e.g. `web_logs.http_status`).
    IntEnum(Vec<i64>),
    /// Float of 32 or 64 bits.
    Float(u8),
    Decimal {
        precision: u8,
        scale: u8,
    },
    Bool,
    /// Text, optionally bounded; `truncatable` when the server may send the
    /// `__dap_oversized_truncated__` placeholder instead.
    Str {
        max_length: Option<u32>,
        truncatable: bool,
    },
    Enum(Vec<String>),
    Timestamp,
    Date,
    Time,
    Uuid,
    Ipv4,
    Ipv6,
    /// IPv4 or IPv6.
    Ip,
    Array(Box<ColumnType>),
    /// A nested object with fixed fields (sent as one JSON column in condensed mode).
    Object(Vec<Column>),
    /// A free-form JSON value.
    Json,
}

/// The placeholder DAP sends for text too large to export.
pub const OVERSIZED_PLACEHOLDER: &str = "__dap_oversized_truncated__";

/// How many days of an append-only table DAP keeps ("logs older than 30 days are no longer
/// available"): its snapshot holds this window, not the table.
pub const APPEND_ONLY_WINDOW_DAYS: i64 = 30;

/// The column an append-only table's rows are timed by (the request time of a log).
pub const APPEND_ONLY_TIME_COLUMN: &str = "timestamp";

/// Whether the tables of `namespace` are logs DAP keeps for its window only (`canvas_logs`).
pub fn is_append_only_namespace(namespace: &str) -> bool {
    namespace == "canvas_logs"
}

impl TableDef {
    /// Whether DAP serves this table as a log: rows are only ever added upstream and kept for
    /// [`APPEND_ONLY_WINDOW_DAYS`] (the `canvas_logs` namespace: `web_logs`). A new snapshot of
    /// such a table holds the window only, so it replaces the rows it holds and keeps the others.
    pub fn is_append_only(&self) -> bool {
        is_append_only_namespace(&self.namespace)
    }

    /// Parses a `{"schema": …, "version": N}` envelope as the Query API returns it.
    pub fn from_versioned(namespace: &str, name: &str, envelope: &Json) -> Result<TableDef, SchemaError> {
        let err = |what: &str| SchemaError::Invalid { table: format!("{namespace}.{name}"), what: what.to_string() };
        let version = envelope.get("version").and_then(Json::as_u64).ok_or_else(|| err("missing integer `version`"))?;
        let schema = envelope.get("schema").ok_or_else(|| err("missing `schema`"))?;
        let parser = Parser {
            definitions: schema.get("definitions").and_then(Json::as_object),
            table: format!("{namespace}.{name}"),
        };
        let props = schema.get("properties").and_then(Json::as_object).ok_or_else(|| err("missing `properties`"))?;
        let key_obj = props.get("key").ok_or_else(|| err("missing `properties.key`"))?;
        let mut keys = parser.object_columns(key_obj)?;
        if keys.len() != 1 {
            return Err(err(&format!("expected exactly one key column, found {}", keys.len())));
        }
        let mut key = keys.remove(0);
        key.required = true;
        let values = match props.get("value") {
            Some(v) => parser.object_columns(v)?,
            None => Vec::new(),
        };
        let text = |k: &str| schema.get(k).and_then(Json::as_str).filter(|s| !s.is_empty());
        let comment = match (text("title"), text("description")) {
            (Some(t), Some(d)) => Some(format!("{t}\n\n{d}")),
            (t, d) => t.or(d).map(String::from),
        };
        Ok(TableDef { namespace: namespace.into(), name: name.into(), version: version as u32, key, values, comment })
    }

    /// The definition a bookkeeping row describes: its `schema_description` (the schema without
    /// `meta`, as stored by initdb/syncdb) at `version`.
    pub fn from_description(
        namespace: &str,
        name: &str,
        version: u32,
        description: &str,
    ) -> Result<TableDef, SchemaError> {
        let schema: Json = serde_json::from_str(description).map_err(|e| SchemaError::Invalid {
            table: format!("{namespace}.{name}"),
            what: format!("the stored schema description is not JSON: {e}"),
        })?;
        TableDef::from_versioned(namespace, name, &serde_json::json!({"schema": schema, "version": version}))
    }

    /// The key column followed by the value columns.
    pub fn columns(&self) -> impl Iterator<Item = &Column> {
        std::iter::once(&self.key).chain(self.values.iter())
    }

    pub fn value_column(&self, name: &str) -> Option<&Column> {
        self.values.iter().find(|c| c.name == name)
    }
}

struct Parser<'a> {
    definitions: Option<&'a Map<String, Json>>,
    table: String,
}

impl Parser<'_> {
    fn err(&self, what: String) -> SchemaError {
        SchemaError::Invalid { table: self.table.clone(), what }
    }

    fn object_columns(&self, node: &Json) -> Result<Vec<Column>, SchemaError> {
        let required: Vec<&str> = node
            .get("required")
            .and_then(Json::as_array)
            .map(|r| r.iter().filter_map(Json::as_str).collect())
            .unwrap_or_default();
        let props = node
            .get("properties")
            .and_then(Json::as_object)
            .ok_or_else(|| self.err("object without `properties`".into()))?;
        props
            .iter()
            .map(|(name, child)| {
                let text = |k: &str| child.get(k).and_then(Json::as_str).map(String::from);
                Ok(Column {
                    name: name.clone(),
                    ty: self.column_type(child).map_err(|e| self.err(format!("column {name}: {e}")))?,
                    required: required.contains(&name.as_str()),
                    comment: text("title").or_else(|| text("description")),
                })
            })
            .collect()
    }

    fn column_type(&self, node: &Json) -> Result<ColumnType, String> {
        if let Some(r) = node.get("$ref").and_then(Json::as_str) {
            let name = r.strip_prefix("#/definitions/").ok_or(format!("unsupported $ref {r}"))?;
            let target = self.definitions.and_then(|d| d.get(name)).ok_or(format!("undefined $ref {r}"))?;
            return self.column_type(target);
        }
        if let Some(members) = node.get("oneOf").and_then(Json::as_array) {
            return self.one_of(members);
        }
        let format = node.get("format").and_then(Json::as_str);
        match node.get("type").and_then(Json::as_str) {
            Some("integer") => Ok(match node.get("enum").and_then(Json::as_array) {
                Some(values) => ColumnType::IntEnum(values.iter().filter_map(Json::as_i64).collect()),
                None => ColumnType::Int(match format {
                    Some("int16") => 16,
                    Some("int32") => 32,
                    _ => 64,
                }),
            }),
            Some("number") => {
                Ok(decimal_type(node).unwrap_or(ColumnType::Float(if format == Some("float32") { 32 } else { 64 })))
            }
            Some("boolean") => Ok(ColumnType::Bool),
            Some("string") => Ok(if let Some(values) = node.get("enum").and_then(Json::as_array) {
                ColumnType::Enum(values.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            } else {
                match format {
                    Some("date-time") => ColumnType::Timestamp,
                    Some("date") => ColumnType::Date,
                    Some("time") => ColumnType::Time,
                    Some("uuid") => ColumnType::Uuid,
                    Some("ipv4") => ColumnType::Ipv4,
                    Some("ipv6") => ColumnType::Ipv6,
                    _ => ColumnType::Str {
                        max_length: node.get("maxLength").and_then(Json::as_u64).map(|n| n as u32),
                        truncatable: false,
                    },
                }
            }),
            Some("array") => {
                let items = node.get("items").ok_or("array without `items`")?;
                Ok(ColumnType::Array(Box::new(self.column_type(items)?)))
            }
            Some("object") => match node.get("properties") {
                Some(_) => Ok(ColumnType::Object(self.object_columns(node).map_err(|e| e.to_string())?)),
                None => Ok(ColumnType::Json),
            },
            other => Err(format!("unsupported type {other:?}")),
        }
    }

    fn one_of(&self, members: &[Json]) -> Result<ColumnType, String> {
        let types: Vec<ColumnType> = members
            .iter()
            .filter(|m| m.get("const").and_then(Json::as_str) != Some(OVERSIZED_PLACEHOLDER))
            .map(|m| self.column_type(m))
            .collect::<Result<_, _>>()?;
        let truncatable = types.len() < members.len();
        match types.as_slice() {
            [ColumnType::Str { max_length, .. }] => Ok(ColumnType::Str { max_length: *max_length, truncatable }),
            [a, b] if matches!((a, b), (ColumnType::Ipv4, ColumnType::Ipv6) | (ColumnType::Ipv6, ColumnType::Ipv4)) => {
                Ok(ColumnType::Ip)
            }
            [single] => Ok(single.clone()),
            _ => Ok(ColumnType::Json),
        }
    }
}

/// `exclusiveMinimum == -exclusiveMaximum` plus `multipleOf` marks a decimal (spec §4.5):
/// scale = -log10(multipleOf), precision = log10(exclusiveMaximum) + scale.
fn decimal_type(node: &Json) -> Option<ColumnType> {
    let step = node.get("multipleOf")?.as_f64()?;
    let max = node.get("exclusiveMaximum")?.as_f64()?;
    let min = node.get("exclusiveMinimum")?.as_f64()?;
    if min != -max || step <= 0.0 || max <= 0.0 {
        return None;
    }
    let scale = (-step.log10()).round() as i32;
    let precision = max.log10().round() as i32 + scale;
    Some(ColumnType::Decimal { precision: precision.clamp(1, 38) as u8, scale: scale.clamp(0, 38) as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(value: Json) -> Json {
        json!({"schema": {"$schema": "x", "type": "object", "properties": {
            "meta": {"type": "object", "properties": {"ts": {"type": "string", "format": "date-time"}}, "additionalProperties": false},
            "key": {"type": "object", "properties": {"id": {"type": "integer", "format": "int64"}}, "additionalProperties": false, "required": ["id"]},
            "value": value,
        }, "definitions": {"V4": {"type": "string", "format": "ipv4"}, "V6": {"type": "string", "format": "ipv6"}}}, "version": 3})
    }

    #[test]
    fn maps_every_schema_construct() {
        let t = TableDef::from_versioned("canvas", "t", &envelope(json!({
            "type": "object", "additionalProperties": false, "required": ["name"],
            "properties": {
                "name": {"type": "string", "maxLength": 255},
                "state": {"type": "string", "enum": ["__dap_unspecified__", "active"]},
                "money": {"type": "number", "exclusiveMinimum": -1000000, "exclusiveMaximum": 1000000, "multipleOf": 0.01},
                "ratio": {"type": "number", "format": "float64"},
                "body": {"oneOf": [{"type": "string", "const": "__dap_oversized_truncated__"}, {"type": "string"}]},
                "ip": {"oneOf": [{"$ref": "#/definitions/V4"}, {"$ref": "#/definitions/V6"}]},
                "tags": {"type": "array", "items": {"type": "integer", "format": "int32"}},
                "settings": {"type": "object", "additionalProperties": false, "properties": {"a": {"type": "boolean"}}},
                "status": {"type": "integer", "enum": [200, 404]},
            }
        }))).unwrap();
        assert_eq!(t.version, 3);
        assert_eq!(t.key.name, "id");
        assert_eq!(t.key.ty, ColumnType::Int(64));
        let ty = |n: &str| t.value_column(n).unwrap().ty.clone();
        assert!(t.value_column("name").unwrap().required);
        assert!(!t.value_column("state").unwrap().required);
        assert_eq!(ty("name"), ColumnType::Str { max_length: Some(255), truncatable: false });
        assert_eq!(ty("money"), ColumnType::Decimal { precision: 8, scale: 2 });
        assert_eq!(ty("ratio"), ColumnType::Float(64));
        assert_eq!(ty("body"), ColumnType::Str { max_length: None, truncatable: true });
        assert_eq!(ty("ip"), ColumnType::Ip);
        assert_eq!(ty("tags"), ColumnType::Array(Box::new(ColumnType::Int(32))));
        assert!(matches!(ty("settings"), ColumnType::Object(ref f) if f.len() == 1));
        assert_eq!(ty("status"), ColumnType::IntEnum(vec![200, 404]));
    }

    #[test]
    fn rejects_a_schema_without_key() {
        let bad = json!({"schema": {"properties": {}}, "version": 1});
        let e = TableDef::from_versioned("canvas", "t", &bad).unwrap_err();
        assert!(e.to_string().contains("canvas.t"), "{e}");
    }
}

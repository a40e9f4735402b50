//! Every table the emulator serves: its schema versions, its change history and the records a
//! query selects. Schema evolution (version bumps) lives here too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};

use super::generate::Generator;
use super::history::{Change, ChangeKind, CommitPlan, History};
use super::rng::{Rng, mix};
use crate::schema::{ColumnType, SchemaError, TableDef, bundled};
use crate::time::Micros;
use crate::value::Value;

/// One version of a table's schema.
#[derive(Debug, Clone)]
pub struct SchemaVersion {
    /// The flat schema (first property = key), as bundled plus any bumps.
    pub flat: Json,
    /// The `{"schema": …, "version": N}` envelope the API serves.
    pub envelope: Json,
    pub def: TableDef,
}

#[derive(Debug)]
pub struct TableState {
    pub versions: Vec<SchemaVersion>,
    pub history: History,
}

impl TableState {
    pub fn current(&self) -> &SchemaVersion {
        self.versions.last().expect("a table has at least one schema version")
    }

    pub fn version(&self, v: u32) -> &SchemaVersion {
        self.versions.iter().find(|s| s.def.version == v).unwrap_or_else(|| self.current())
    }
}

/// Which rows a query selects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// The rows at `at`; of an append-only table only those inserted at or after `oldest`
    /// (DAP's window), every row when `None`.
    Snapshot {
        at: Micros,
        oldest: Option<Micros>,
    },
    Incremental {
        since: Micros,
        until: Option<Micros>,
    },
}

/// One output record in the layout of a given schema version.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub ts: Micros,
    /// `None` in snapshots; `Some('U' | 'D')` in incrementals.
    pub action: Option<char>,
    pub key: Value,
    /// The value columns in the output schema's order; `None` for deletes.
    pub values: Option<Vec<Value>>,
}

/// The schema changes DAP ships or documents (each bumps the table's version; rows written
/// before it keep their values), and two it must never ship, for the refusal tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SchemaChange {
    /// A new nullable column at the end.
    AddColumn,
    /// A wider `maxLength` on the narrowest bounded text column.
    WidenMaxLength,
    /// A new member of the first string enum.
    AddEnumValue,
    /// The first required value column becomes optional (DAP did this to 40 columns on
    /// 2026-04-27); later rows hold NULL there.
    MakeOptional,
    /// A new member inside the first nested object (e.g. a settings object).
    AddNestedMember,
    /// The first int16 or int32 column becomes int64.
    WidenInteger,
    /// The first decimal gets two more integer digits.
    WidenDecimal,
    /// Unsafe, never shipped: the first optional column becomes required.
    MakeRequired,
    /// Unsafe, never shipped: the widest bounded text column gets a quarter of its `maxLength`.
    NarrowMaxLength,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("unknown namespace {0}")]
    UnknownNamespace(String),
    #[error("unknown table {namespace}.{table}")]
    UnknownTable { namespace: String, table: String },
    #[error("table {table} has no column that a {change:?} change applies to")]
    NotApplicable { table: String, change: SchemaChange },
    #[error("table {namespace}.{table} exists already")]
    TableExists { namespace: String, table: String },
    #[error("a commit at {at} is not after the table's latest one ({head}): commits move forward in time")]
    NotAfterHead { at: String, head: String },
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

pub struct Dataset {
    pub generator: Generator,
    /// namespace → table → state
    pub tables: BTreeMap<String, BTreeMap<String, TableState>>,
    /// Snapshots of `web_logs` repeat this share of rows (its source delivers at least once).
    pub web_logs_duplicate_rate: f64,
    /// How long append-only tables (web_logs) are served: snapshots hold this window and older
    /// incrementals are out of range. `None` serves them whole.
    pub log_retention: Option<Micros>,
}

/// The span before the anchor in which a log table's base rows were requested (its `timestamp`
/// is "requests of the last two weeks").
const LOG_BASE_SPAN: Micros = 14 * crate::time::MICROS_PER_DAY;

/// The envelope of a flat schema: first property → `key`, the rest → `value`, plus `meta`.
pub fn envelope(flat: &Json, version: u32) -> Json {
    let props = flat["properties"].as_object().cloned().unwrap_or_default();
    let required: Vec<Json> = flat["required"].as_array().cloned().unwrap_or_default();
    let mut iter = props.into_iter();
    let (key_name, key_node) = iter.next().expect("a table schema has at least one property");
    let value_props: Map<String, Json> = iter.collect();
    let value_required: Vec<&Json> = required.iter().filter(|r| r.as_str() != Some(key_name.as_str())).collect();
    let mut schema = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "meta": {
                "type": "object",
                "properties": {
                    "ts": {"type": "string", "format": "date-time", "description": "Commit time of the record."},
                    "action": {"type": "string", "enum": ["U", "D"], "description": "U for upsert, D for delete."}
                },
                "additionalProperties": false,
                "required": ["ts"]
            },
            "key": {"type": "object", "properties": {key_name.clone(): key_node}, "additionalProperties": false, "required": [key_name]},
            "value": {"type": "object", "properties": value_props, "additionalProperties": false, "required": value_required}
        },
        "additionalProperties": false,
        "required": ["key", "meta"]
    });
    for k in ["title", "description", "definitions"] {
        if let Some(v) = flat.get(k) {
            schema[k] = v.clone();
        }
    }
    json!({"schema": schema, "version": version})
}

/// Parses a flat schema into the [`TableDef`] of its envelope.
pub fn envelope_def(namespace: &str, table: &str, version: u32, flat: &Json) -> Result<TableDef, SchemaError> {
    TableDef::from_versioned(namespace, table, &envelope(flat, version))
}

fn schema_version(namespace: &str, table: &str, version: u32, flat: Json) -> Result<SchemaVersion, SchemaError> {
    let envelope = envelope(&flat, version);
    let def = TableDef::from_versioned(namespace, table, &envelope)?;
    Ok(SchemaVersion { flat, envelope, def })
}

impl Dataset {
    /// Every bundled table, with `rows(namespace, table)` base rows each.
    pub fn bundled(generator: Generator, rows: impl Fn(&str, &str) -> u64) -> Result<Dataset, DatasetError> {
        let mut tables: BTreeMap<String, BTreeMap<String, TableState>> = BTreeMap::new();
        for ns in bundled::namespaces() {
            for (table, text) in bundled::tables(ns) {
                let flat: Json = serde_json::from_str(text)
                    .map_err(|e| SchemaError::Invalid { table: format!("{ns}.{table}"), what: e.to_string() })?;
                let first = schema_version(ns, table, 1, flat)?;
                let mut history = History::new(generator.table_seed(&first.def), rows(ns, table), generator.anchor, 1);
                if first.def.is_append_only() {
                    history = history.with_base_span(LOG_BASE_SPAN);
                }
                tables
                    .entry(ns.to_string())
                    .or_default()
                    .insert(table.to_string(), TableState { versions: vec![first], history });
            }
        }
        Ok(Dataset { generator, tables, web_logs_duplicate_rate: 0.01, log_retention: None })
    }

    /// The latest commit of any table (the anchor before any).
    pub fn latest_commit(&self) -> Micros {
        self.tables
            .values()
            .flat_map(|t| t.values())
            .map(|t| t.history.head())
            .max()
            .unwrap_or(0)
            .max(self.generator.anchor)
    }

    /// The oldest insert time DAP still serves of `def` at `now`: `Some` for an append-only table
    /// when a retention is set.
    pub fn retained_from(&self, def: &TableDef, now: Micros) -> Option<Micros> {
        self.log_retention.filter(|_| def.is_append_only()).map(|r| now - r)
    }

    pub fn namespace(&self, ns: &str) -> Result<&BTreeMap<String, TableState>, DatasetError> {
        self.tables.get(ns).ok_or_else(|| DatasetError::UnknownNamespace(ns.to_string()))
    }

    pub fn table(&self, ns: &str, table: &str) -> Result<&TableState, DatasetError> {
        self.namespace(ns)?
            .get(table)
            .ok_or_else(|| DatasetError::UnknownTable { namespace: ns.into(), table: table.into() })
    }

    fn table_mut(&mut self, ns: &str, table: &str) -> Result<&mut TableState, DatasetError> {
        self.table(ns, table)?;
        Ok(self.tables.get_mut(ns).and_then(|t| t.get_mut(table)).expect("checked above"))
    }

    /// Applies a random commit: `inserts` new rows, then updates, soft and hard deletes of
    /// distinct existing rows. Returns the plan (row indexes) that was applied.
    pub fn commit(
        &mut self,
        ns: &str,
        table: &str,
        ts: Micros,
        counts: [usize; 4],
    ) -> Result<CommitPlan, DatasetError> {
        let seed = self.generator.seed;
        let state = self.table_mut(ns, table)?;
        let version = state.current().def.version;
        let mut rng = Rng::new(mix(&[seed, ts as u64, state.history.key_space()]));
        let [inserts, updates, soft, hard] = counts;
        let inserts = state.history.allocate(inserts as u64);
        let mut taken = inserts.clone();
        let history = &state.history;
        let mut pick = |n: usize| {
            let picked = history.pick_live(&mut rng, n, &taken);
            taken.extend(&picked);
            picked
        };
        let (updates, soft_deletes, hard_deletes) = (pick(updates), pick(soft), pick(hard));
        let plan = CommitPlan { inserts, updates, soft_deletes, hard_deletes };
        state.history.commit(ts, &plan, version);
        Ok(plan)
    }

    /// Bumps a table's schema version with an additive change; returns the new version and the
    /// column it touched.
    pub fn evolve(&mut self, ns: &str, table: &str, change: SchemaChange) -> Result<(u32, String), DatasetError> {
        let state = self.table_mut(ns, table)?;
        let current = state.current();
        let version = current.def.version + 1;
        let mut flat = current.flat.clone();
        let mut props_owned = flat["properties"].as_object().cloned().expect("flat schema has properties");
        let props = &mut props_owned;
        let not_applicable = || DatasetError::NotApplicable { table: format!("{ns}.{table}"), change };
        let column = match change {
            SchemaChange::AddColumn => {
                let name = format!("added_in_v{version}");
                let node = match version % 3 {
                    0 => {
                        json!({"type": "integer", "format": "int64", "description": "A column added by a schema change."})
                    }
                    1 => {
                        json!({"type": "string", "format": "date-time", "description": "A column added by a schema change."})
                    }
                    _ => {
                        json!({"type": "string", "maxLength": 255, "description": "A column added by a schema change."})
                    }
                };
                props.insert(name.clone(), node);
                name
            }
            SchemaChange::WidenMaxLength => {
                let (name, node) = props
                    .iter_mut()
                    .skip(1)
                    .filter(|(_, n)| n.get("maxLength").is_some())
                    .min_by_key(|(_, n)| n["maxLength"].as_u64())
                    .ok_or_else(not_applicable)?;
                let wider = node["maxLength"].as_u64().unwrap_or(255) * 4;
                node["maxLength"] = json!(wider);
                name.clone()
            }
            SchemaChange::AddEnumValue => {
                let (name, node) = props
                    .iter_mut()
                    .skip(1)
                    .find(|(_, n)| {
                        n.get("enum").is_some_and(|e| e.as_array().is_some_and(|a| a.iter().all(Json::is_string)))
                    })
                    .ok_or_else(not_applicable)?;
                node["enum"].as_array_mut().expect("checked").push(json!(format!("added_in_v{version}")));
                name.clone()
            }
            SchemaChange::MakeOptional | SchemaChange::MakeRequired => {
                let key = props.keys().next().cloned().unwrap_or_default();
                let required: Vec<String> = flat["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                let to_required = change == SchemaChange::MakeRequired;
                let name = props
                    .keys()
                    .skip(1)
                    .find(|n| required.contains(n) != to_required)
                    .cloned()
                    .ok_or_else(not_applicable)?;
                let mut now: Vec<String> = required.into_iter().filter(|r| *r != name).collect();
                if to_required {
                    now.push(name.clone());
                }
                if !now.contains(&key) {
                    now.insert(0, key);
                }
                flat["required"] = json!(now);
                name
            }
            SchemaChange::AddNestedMember => {
                let (name, node) = props
                    .iter_mut()
                    .skip(1)
                    .find(|(_, n)| {
                        n.get("type").and_then(Json::as_str) == Some("object") && n.get("properties").is_some()
                    })
                    .ok_or_else(not_applicable)?;
                node["properties"].as_object_mut().expect("checked").insert(
                    format!("added_in_v{version}"),
                    json!({"type": "string", "description": "A member added by a schema change."}),
                );
                name.clone()
            }
            SchemaChange::WidenInteger => {
                let (name, node) = props
                    .iter_mut()
                    .skip(1)
                    .find(|(_, n)| {
                        n.get("type").and_then(Json::as_str) == Some("integer")
                            && matches!(n.get("format").and_then(Json::as_str), Some("int16" | "int32"))
                            && n.get("enum").is_none()
                    })
                    .ok_or_else(not_applicable)?;
                node["format"] = json!("int64");
                name.clone()
            }
            SchemaChange::WidenDecimal => {
                let (name, node) = props
                    .iter_mut()
                    .skip(1)
                    .find(|(_, n)| n.get("multipleOf").is_some() && n.get("exclusiveMaximum").is_some())
                    .ok_or_else(not_applicable)?;
                let max = node["exclusiveMaximum"].as_f64().unwrap_or(1000.0) * 100.0;
                node["exclusiveMaximum"] = json!(max);
                node["exclusiveMinimum"] = json!(-max);
                name.clone()
            }
            SchemaChange::NarrowMaxLength => {
                let (name, node) = props
                    .iter_mut()
                    .skip(1)
                    .filter(|(_, n)| n.get("maxLength").is_some())
                    .max_by_key(|(_, n)| n["maxLength"].as_u64())
                    .ok_or_else(not_applicable)?;
                node["maxLength"] = json!((node["maxLength"].as_u64().unwrap_or(16) / 4).max(1));
                name.clone()
            }
        };
        flat["properties"] = Json::Object(props_owned);
        let next = schema_version(ns, table, version, flat)?;
        state.versions.push(next);
        Ok((version, column))
    }

    /// Adds a table to a namespace's list (DAP adds tables now and then), with `rows` base rows
    /// inserted now: a small table of an id, a name, a state and a time.
    pub fn add_table(&mut self, ns: &str, table: &str, rows: u64, now: Micros) -> Result<(), DatasetError> {
        if self.namespace(ns)?.contains_key(table) {
            return Err(DatasetError::TableExists { namespace: ns.into(), table: table.into() });
        }
        let flat = json!({
            "type": "object",
            "title": "A table added to the namespace after the others.",
            "required": ["id", "name"],
            "additionalProperties": false,
            "properties": {
                "id": {"type": "integer", "format": "int64", "description": "The ID of the row."},
                "name": {"type": "string", "maxLength": 255, "description": "Its name."},
                "workflow_state": {"type": "string", "enum": ["__dap_unspecified__", "active", "deleted"], "description": "Its state."},
                "created_at": {"type": "string", "format": "date-time", "description": "When it was created."},
            }
        });
        let first = schema_version(ns, table, 1, flat)?;
        let history = History::new(self.generator.table_seed(&first.def), rows, now, 1);
        self.tables
            .get_mut(ns)
            .expect("checked above")
            .insert(table.to_string(), TableState { versions: vec![first], history });
        Ok(())
    }

    /// The records of `selection` over row indexes `range`, in the layout of schema `version`.
    pub fn records<'a>(
        &'a self,
        state: &'a TableState,
        selection: Selection,
        version: u32,
        range: std::ops::Range<u64>,
    ) -> impl Iterator<Item = Record> + 'a {
        let out = &state.version(version).def;
        let duplicates = if out.namespace == "canvas_logs"
            && out.name == "web_logs"
            && matches!(selection, Selection::Snapshot { .. })
        {
            self.web_logs_duplicate_rate
        } else {
            0.0
        };
        let seed = self.generator.seed;
        let indices = match selection {
            Selection::Incremental { since, .. } => state.history.candidates(since, range),
            Selection::Snapshot { oldest: None, .. } => Box::new(range),
            Selection::Snapshot { oldest: Some(oldest), .. } => {
                Box::new(range.filter(move |idx| state.history.inserted_at(*idx).is_some_and(|t| t >= oldest)))
            }
        };
        indices.flat_map(move |idx| {
            let change = match selection {
                Selection::Snapshot { at, .. } => state.history.state_at(idx, at),
                Selection::Incremental { since, until } => state.history.change_in(idx, since, until),
            };
            let record = change.map(|c| self.record(state, out, idx, c, selection));
            let repeat = duplicates > 0.0 && Rng::new(mix(&[seed, idx, 0xd0b1e])).chance(duplicates);
            let copies = if repeat { 2 } else { 1 };
            record.into_iter().flat_map(move |r| std::iter::repeat_n(r, copies))
        })
    }

    fn record(&self, state: &TableState, out: &TableDef, idx: u64, change: Change, selection: Selection) -> Record {
        let incremental = matches!(selection, Selection::Incremental { .. });
        let key = self.generator.key(out, idx);
        if change.kind == ChangeKind::HardDelete {
            return Record { ts: change.ts, action: Some('D'), key, values: None };
        }
        Record {
            ts: change.ts,
            action: incremental.then_some('U'),
            key,
            values: Some(self.row_values(state, out, idx, change)),
        }
    }

    /// A row version's values, generated under the schema it was written with and laid out in
    /// `out` (columns added later are NULL).
    pub fn row_values(&self, state: &TableState, out: &TableDef, idx: u64, change: Change) -> Vec<Value> {
        let written = &state.version(change.schema_version).def;
        let mut generated = self.generator.row(written, idx, change.revision);
        if change.schema_version > 1 && idx.is_multiple_of(2) {
            use_schema_changes(&state.versions[0].def, written, idx, &mut generated);
        }
        if change.kind == ChangeKind::SoftDelete {
            soft_delete(written, &mut generated);
        }
        if written.is_append_only() && !(self.generator.edge_rows && idx <= super::generate::EDGE_ROWS) {
            // A log is timed by its request, which is when it was committed.
            if let (Some(i), Some(at)) = (
                written.values.iter().position(|c| c.name == crate::schema::APPEND_ONLY_TIME_COLUMN),
                state.history.inserted_at(idx),
            ) {
                generated[i] = Value::Timestamp(at);
            }
        }
        out.values
            .iter()
            .map(|c| written.values.iter().position(|w| w.name == c.name).map_or(Value::Null, |i| generated[i].clone()))
            .collect()
    }

    /// The current rows of a table (ground truth), as typed JSON objects in key order.
    pub fn truth(&self, ns: &str, table: &str) -> Result<impl Iterator<Item = Map<String, Json>> + '_, DatasetError> {
        self.truth_at(ns, table, None)
    }

    /// The rows of a table as they were at `at` (every commit up to and including it; the
    /// current rows when `None`), in the table's current schema (a column added since is NULL).
    pub fn truth_at(
        &self,
        ns: &str,
        table: &str,
        at: Option<Micros>,
    ) -> Result<impl Iterator<Item = Map<String, Json>> + '_, DatasetError> {
        let state = self.table(ns, table)?;
        let def = &state.current().def;
        let at = at.unwrap_or_else(|| state.history.head());
        Ok(self
            .records(state, Selection::Snapshot { at, oldest: None }, def.version, 1..state.history.key_space() + 1)
            .scan(None, move |last_key: &mut Option<Value>, r| {
                // web_logs duplicates are a delivery artefact, not rows.
                let dup = last_key.as_ref() == Some(&r.key);
                *last_key = Some(r.key.clone());
                Some((!dup).then(|| typed_row(def, &r)))
            })
            .flatten())
    }
}

/// Makes a row written under `written` use what changed since `first`, so that a sync after a
/// schema change certainly sees it: NULL in a column that became optional, a value of a new
/// column, the newest enum member, text longer than the old `maxLength`, a number beyond the
/// old range, the new member of a nested object.
fn use_schema_changes(first: &TableDef, written: &TableDef, idx: u64, values: &mut [Value]) {
    use crate::schema::delta::{Change as D, SchemaDelta};
    let delta = SchemaDelta::for_reload(first, written);
    for change in &delta.changes {
        let (name, value) = match change {
            D::DropNotNull(name) => (name, Value::Null),
            D::Widen { column, from } => match (&column.ty, from) {
                (ColumnType::Str { max_length: Some(n), .. }, _) => (&column.name, Value::Str("w".repeat(*n as usize))),
                (ColumnType::Enum(v), _) => (&column.name, Value::Str(v.last().cloned().unwrap_or_default())),
                (ColumnType::Int(_), ColumnType::Int(16)) => {
                    (&column.name, Value::Int(i64::from(i16::MAX) + idx as i64))
                }
                (ColumnType::Int(_), _) => (&column.name, Value::Int(i64::from(i32::MAX) + idx as i64)),
                (ColumnType::Decimal { precision, scale }, _) => {
                    let mantissa = 10i128.pow(u32::from(*precision)) - 1;
                    (&column.name, Value::Decimal(crate::value::Decimal { mantissa, scale: *scale }))
                }
                (ColumnType::Object(fields), _) => {
                    let members: Map<String, Json> = fields
                        .iter()
                        .filter(|f| matches!(f.ty, ColumnType::Str { max_length: None, .. }))
                        .map(|f| (f.name.clone(), json!(format!("{} of row {idx}", f.name))))
                        .collect();
                    (&column.name, Value::Json(Json::Object(members)))
                }
                _ => continue,
            },
            _ => continue,
        };
        if let Some(i) = written.values.iter().position(|c| &c.name == name) {
            values[i] = value;
        }
    }
}

/// Marks a row deleted the way Canvas does: `workflow_state = 'deleted'`.
fn soft_delete(def: &TableDef, values: &mut [Value]) {
    if let Some(i) = def.values.iter().position(|c| c.name == "workflow_state") {
        let allowed = match &def.values[i].ty {
            ColumnType::Enum(values) => values.iter().any(|v| v == "deleted"),
            ColumnType::Str { .. } => true,
            _ => false,
        };
        if allowed {
            values[i] = Value::Str("deleted".into());
        }
    }
}

/// A record as a typed JSON object: the key column, then every value column (NULLs included).
pub fn typed_row(def: &TableDef, r: &Record) -> Map<String, Json> {
    let mut row = Map::new();
    row.insert(def.key.name.clone(), r.key.to_typed_json());
    for (c, v) in def.values.iter().zip(r.values.iter().flatten()) {
        row.insert(c.name.clone(), v.to_typed_json());
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset() -> Dataset {
        Dataset::bundled(
            Generator { seed: 5, anchor: 1_767_225_600_000_000, special_floats: true, edge_rows: true, id_space: 0 },
            |_, _| 20,
        )
        .unwrap()
    }

    #[test]
    fn bundles_every_table_with_a_valid_envelope() {
        let d = dataset();
        assert_eq!(d.namespace("canvas").unwrap().len(), 91);
        let accounts = d.table("canvas", "accounts").unwrap().current();
        assert_eq!(accounts.envelope["version"], 1);
        assert_eq!(accounts.envelope["schema"]["properties"]["key"]["required"], json!(["id"]));
        assert!(accounts.envelope["schema"]["properties"]["value"]["properties"].get("id").is_none());
        let web = d.table("canvas_logs", "web_logs").unwrap().current();
        assert_eq!(web.def.value_column("remote_ip").unwrap().ty, ColumnType::Ip);
        assert!(web.def.value_column("user_agent").is_some());
        assert!(web.def.value_column("user_agent_id").is_none());
    }

    #[test]
    fn schema_changes_are_additive_and_versions_grow() {
        let mut d = dataset();
        let (v2, col) = d.evolve("canvas", "accounts", SchemaChange::AddColumn).unwrap();
        assert_eq!(v2, 2);
        let state = d.table("canvas", "accounts").unwrap();
        assert!(!state.current().def.value_column(&col).unwrap().required);
        let (v3, widened) = d.evolve("canvas", "accounts", SchemaChange::WidenMaxLength).unwrap();
        let before = d.table("canvas", "accounts").unwrap().version(2).def.value_column(&widened).unwrap().ty.clone();
        let after = d.table("canvas", "accounts").unwrap().version(3).def.value_column(&widened).unwrap().ty.clone();
        assert!(
            matches!((before, after), (ColumnType::Str { max_length: Some(a), .. }, ColumnType::Str { max_length: Some(b), .. }) if b > a)
        );
        let (v4, e) = d.evolve("canvas", "accounts", SchemaChange::AddEnumValue).unwrap();
        assert_eq!((v3, v4), (3, 4));
        let ColumnType::Enum(values) =
            &d.table("canvas", "accounts").unwrap().current().def.value_column(&e).unwrap().ty
        else {
            panic!()
        };
        assert_eq!(values.last().unwrap(), "added_in_v4");
        assert!(matches!(
            d.evolve("canvas", "assignment_override_students", SchemaChange::WidenMaxLength),
            Err(DatasetError::NotApplicable { .. })
        ));
    }

    #[test]
    fn rows_written_before_a_new_column_have_null_there() {
        let mut d = dataset();
        let (_, col) = d.evolve("canvas", "accounts", SchemaChange::AddColumn).unwrap();
        let plan = d.commit("canvas", "accounts", d.generator.anchor + 1, [1, 0, 0, 0]).unwrap();
        let truth: Vec<_> = d.truth("canvas", "accounts").unwrap().collect();
        assert_eq!(truth.len(), 21);
        assert!(truth[..20].iter().all(|r| r[&col].is_null()));
        let inserted = &truth[20];
        assert_eq!(plan.inserts, vec![21]);
        assert!(inserted.contains_key(&col));
    }

    #[test]
    fn truth_follows_commits() {
        let mut d = dataset();
        let plan = d.commit("canvas", "accounts", d.generator.anchor + 5, [2, 3, 1, 2]).unwrap();
        assert_eq!(
            (plan.inserts.len(), plan.updates.len(), plan.soft_deletes.len(), plan.hard_deletes.len()),
            (2, 3, 1, 2)
        );
        let truth: Vec<_> = d.truth("canvas", "accounts").unwrap().collect();
        assert_eq!(truth.len(), 20);
        let soft = d
            .generator
            .key(&d.table("canvas", "accounts").unwrap().current().def, plan.soft_deletes[0])
            .to_typed_json();
        let row = truth.iter().find(|r| r["id"] == soft).unwrap();
        assert_eq!(row["workflow_state"], "deleted");
    }

    #[test]
    fn web_logs_snapshots_repeat_some_keys_but_truth_does_not() {
        let mut d = Dataset::bundled(
            Generator { seed: 5, anchor: 1_767_225_600_000_000, special_floats: true, edge_rows: true, id_space: 0 },
            |_, _| 2000,
        )
        .unwrap();
        d.web_logs_duplicate_rate = 0.05;
        let state = d.table("canvas_logs", "web_logs").unwrap();
        let n = d.records(state, Selection::Snapshot { at: state.history.head(), oldest: None }, 1, 1..2001).count();
        assert!(n > 2000 + 50, "{n}");
        assert_eq!(d.truth("canvas_logs", "web_logs").unwrap().count(), 2000);
    }

    #[test]
    fn a_log_snapshot_holds_its_window_and_logs_are_timed_by_their_commit() {
        // More base rows than edge rows, so that the new logs are ordinary rows.
        let mut d = Dataset::bundled(
            Generator { seed: 5, anchor: 1_767_225_600_000_000, special_floats: true, edge_rows: true, id_space: 0 },
            |_, _| 30,
        )
        .unwrap();
        let anchor = d.generator.anchor;
        let day = crate::time::MICROS_PER_DAY;
        d.log_retention = Some(30 * day);
        let plan = d.commit("canvas_logs", "web_logs", anchor + 40 * day, [3, 0, 0, 0]).unwrap();
        let state = d.table("canvas_logs", "web_logs").unwrap();
        let def = &state.current().def;
        let oldest = d.retained_from(def, anchor + 40 * day);
        assert_eq!(oldest, Some(anchor + 10 * day));
        let window: Vec<Record> =
            d.records(state, Selection::Snapshot { at: anchor + 40 * day, oldest }, 1, 1..34).collect();
        assert_eq!(window.len(), 3, "the base logs (before the anchor) left the window; the new ones are in it");
        let at = def.values.iter().position(|c| c.name == "timestamp").unwrap();
        for r in &window {
            assert_eq!(r.values.as_ref().unwrap()[at], Value::Timestamp(anchor + 40 * day));
        }
        assert_eq!(plan.inserts.len(), 3);
        assert_eq!(d.truth("canvas_logs", "web_logs").unwrap().count(), 33, "the truth keeps every log");
        assert_eq!(d.retained_from(&d.table("canvas", "accounts").unwrap().current().def, anchor), None);
    }
}

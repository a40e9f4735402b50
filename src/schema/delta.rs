//! Schema changes between the schema a table was replicated with (its bookkeeping row's
//! description) and the one DAP serves now, computed once here; every target replays the same
//! delta in its own DDL.
//!
//! DAP promises backward-compatible changes: new columns, required columns becoming optional,
//! wider types (a longer `maxLength`, more integer or decimal digits, new enum members, new members
//! of a nested object). Those are applied. A change that could lose data (a narrower type, a
//! different kind of value) is refused, naming the column and the command that fixes it; an
//! optional column becoming required is applied only where no NULL stands in the way.

use super::{Column, ColumnType, TableDef};

/// What changed in one column.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new column; the rows already replicated hold NULL there.
    Add(Column),
    /// The column is required no more (or the schema no longer names it): `DROP NOT NULL`.
    DropNotNull(String),
    /// An optional column became required: `SET NOT NULL`, refused by the target while a NULL
    /// is stored there.
    SetNotNull(String),
    /// The column's type grew to hold more values; `column` carries the new type.
    Widen { column: Column, from: ColumnType },
    /// The column's type changed in a way its values may not survive: only in a reload (a
    /// re-snapshot replaces every row, so no old value needs converting).
    Retype { column: Column, from: ColumnType },
}

/// The changes from one schema version to the next, in column order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchemaDelta {
    pub changes: Vec<Change>,
}

/// A change no target applies without risking data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{namespace}.{name}: column {column} changed {change}, which could not hold every value already replicated; \
     nothing was changed. Re-snapshot the table with `{}` (or syncdb --auto-reinit)",
    crate::term::command(&["initdb", "--replace", "--namespace", namespace, "--table", name])
)]
pub struct Refused {
    pub namespace: String,
    pub name: String,
    pub column: String,
    /// `from varchar(64) to varchar(16)`.
    pub change: String,
}

impl SchemaDelta {
    /// The delta from `old` to `new`, or the first change that cannot be applied safely.
    pub fn between(old: &TableDef, new: &TableDef) -> Result<SchemaDelta, Refused> {
        Self::compute(old, new, Purpose::KeepRows)
    }

    /// The delta for a table whose rows are all about to be replaced (a re-snapshot): any type
    /// change is fine, since no old value is kept.
    pub fn for_reload(old: &TableDef, new: &TableDef) -> SchemaDelta {
        Self::compute(old, new, Purpose::ReplaceRows).expect("a reload accepts every change")
    }

    fn compute(old: &TableDef, new: &TableDef, purpose: Purpose) -> Result<SchemaDelta, Refused> {
        let refuse = |column: &str, from: &ColumnType, to: &ColumnType| Refused {
            namespace: new.namespace.clone(),
            name: new.name.clone(),
            column: column.to_string(),
            change: format!("from {} to {}", from.describe(), to.describe()),
        };
        if purpose == Purpose::KeepRows && (old.key.name != new.key.name || old.key.ty != new.key.ty) {
            return Err(refuse(&new.key.name, &old.key.ty, &new.key.ty));
        }
        let mut changes = Vec::new();
        for c in &new.values {
            let Some(before) = old.value_column(&c.name) else {
                changes.push(Change::Add(Column { required: false, ..c.clone() }));
                continue;
            };
            if before.ty != c.ty {
                match (before.ty.fits_in(&c.ty), purpose) {
                    (true, _) => changes.push(Change::Widen { column: c.clone(), from: before.ty.clone() }),
                    (false, Purpose::ReplaceRows) => {
                        changes.push(Change::Retype { column: c.clone(), from: before.ty.clone() })
                    }
                    (false, Purpose::KeepRows) => return Err(refuse(&c.name, &before.ty, &c.ty)),
                }
            }
            match (before.required, c.required) {
                (true, false) => changes.push(Change::DropNotNull(c.name.clone())),
                (false, true) => changes.push(Change::SetNotNull(c.name.clone())),
                _ => {}
            }
        }
        // A column the schema no longer names stays (it may hold data); it must take NULL now.
        for gone in old.values.iter().filter(|c| c.required && new.value_column(&c.name).is_none()) {
            changes.push(Change::DropNotNull(gone.name.clone()));
        }
        Ok(SchemaDelta { changes })
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Whether the table keeps its rows across the change (a sync) or gets all new ones (a reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    KeepRows,
    ReplaceRows,
}

/// Decimal digits an integer of `bits` needs.
fn int_digits(bits: u8) -> u8 {
    match bits {
        16 => 5,
        32 => 10,
        _ => 19,
    }
}

impl ColumnType {
    /// Whether every value of `self` is also a value of `other` (so a column can change from
    /// `self` to `other` without losing anything).
    pub fn fits_in(&self, other: &ColumnType) -> bool {
        use ColumnType as T;
        match (self, other) {
            (a, b) if a == b => true,
            (T::Int(a), T::Int(b)) => a <= b,
            (T::Int(a), T::Decimal { precision, scale }) => precision - scale >= int_digits(*a),
            (T::Int(a), T::Float(64)) => *a <= 32,
            (T::IntEnum(values), T::Int(bits)) => values.iter().all(|v| int_digits_of(*v) <= int_digits(*bits)),
            (T::IntEnum(a), T::IntEnum(b)) => a.iter().all(|v| b.contains(v)),
            (T::Float(a), T::Float(b)) => a <= b,
            (T::Decimal { precision: p1, scale: s1 }, T::Decimal { precision: p2, scale: s2 }) => {
                s2 >= s1 && p2 - s2 >= p1 - s1
            }
            (T::Str { max_length: a, .. }, T::Str { max_length: b, .. }) => match (a, b) {
                (_, None) => true,
                (Some(a), Some(b)) => a <= b,
                (None, Some(_)) => false,
            },
            (T::Enum(a), T::Enum(b)) => a.iter().all(|v| b.contains(v)),
            (T::Enum(values), T::Str { max_length, .. }) => {
                max_length.is_none_or(|n| values.iter().all(|v| v.chars().count() <= n as usize))
            }
            (T::Ipv4 | T::Ipv6, T::Ip) => true,
            (T::Array(a), T::Array(b)) => a.fits_in(b),
            (T::Object(a), T::Object(b)) => a.iter().all(|f| b.iter().any(|g| g.name == f.name && f.ty.fits_in(&g.ty))),
            (T::Object(_) | T::Array(_), T::Json) => true,
            _ => false,
        }
    }

    /// A short description for messages: `varchar(255)`, `int32`, `decimal(5,2)`, …
    pub fn describe(&self) -> String {
        use ColumnType as T;
        match self {
            T::Int(bits) => format!("int{bits}"),
            T::IntEnum(v) => format!("integer enum of {} values", v.len()),
            T::Float(bits) => format!("float{bits}"),
            T::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            T::Bool => "boolean".into(),
            T::Str { max_length: Some(n), .. } => format!("text of at most {n} characters"),
            T::Str { max_length: None, .. } => "text".into(),
            T::Enum(v) => format!("enum of {} values", v.len()),
            T::Timestamp => "timestamp".into(),
            T::Date => "date".into(),
            T::Time => "time".into(),
            T::Uuid => "uuid".into(),
            T::Ipv4 => "ipv4".into(),
            T::Ipv6 => "ipv6".into(),
            T::Ip => "ip address".into(),
            T::Array(item) => format!("array of {}", item.describe()),
            T::Object(fields) => format!("object of {} members", fields.len()),
            T::Json => "json".into(),
        }
    }
}

fn int_digits_of(v: i64) -> u8 {
    if i16::try_from(v).is_ok() {
        5
    } else if i32::try_from(v).is_ok() {
        10
    } else {
        19
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::dataset::envelope_def;
    use serde_json::{Value as Json, json};

    fn def(props: Json, required: &[&str]) -> TableDef {
        let mut all = json!({"id": {"type": "integer", "format": "int64"}});
        all.as_object_mut().unwrap().extend(props.as_object().unwrap().clone());
        envelope_def("canvas", "t", 1, &json!({"type": "object", "properties": all, "required": required})).unwrap()
    }

    #[test]
    fn additive_and_relaxing_changes_are_applied() {
        let old = def(
            json!({"a": {"type": "string", "maxLength": 16}, "b": {"type": "integer", "format": "int32"},
                   "c": {"type": "string", "enum": ["x", "y"]}, "d": {"type": "string", "format": "date-time"},
                   "o": {"type": "object", "properties": {"p": {"type": "integer"}}}}),
            &["id", "d"],
        );
        let new = def(
            json!({"a": {"type": "string", "maxLength": 64}, "b": {"type": "integer", "format": "int64"},
                   "c": {"type": "string", "enum": ["x", "y", "z"]}, "d": {"type": "string", "format": "date-time"},
                   "o": {"type": "object", "properties": {"p": {"type": "integer"}, "q": {"type": "string"}}},
                   "e": {"type": "boolean"}}),
            &["id", "e"],
        );
        let delta = SchemaDelta::between(&old, &new).unwrap();
        let kinds: Vec<String> = delta
            .changes
            .iter()
            .map(|c| match c {
                Change::Add(col) => format!("add {} required={}", col.name, col.required),
                Change::DropNotNull(n) => format!("relax {n}"),
                Change::SetNotNull(n) => format!("require {n}"),
                Change::Widen { column, .. } => format!("widen {}", column.name),
                Change::Retype { column, .. } => format!("retype {}", column.name),
            })
            .collect();
        assert_eq!(kinds, ["widen a", "widen b", "widen c", "relax d", "widen o", "add e required=false"]);
        assert!(SchemaDelta::between(&new, &new).unwrap().is_empty());
    }

    #[test]
    fn narrowing_is_refused_with_the_fix() {
        let old = def(json!({"a": {"type": "string", "maxLength": 64}}), &["id"]);
        let new = def(json!({"a": {"type": "string", "maxLength": 16}}), &["id"]);
        let e = SchemaDelta::between(&old, &new).unwrap_err().to_string();
        assert!(e.contains("column a") && e.contains("initdb --replace --namespace canvas --table t"), "{e}");
        let text = def(json!({"a": {"type": "string"}}), &["id"]);
        let int = def(json!({"a": {"type": "integer"}}), &["id"]);
        assert!(SchemaDelta::between(&text, &int).is_err(), "text to integer");
        let optional = def(json!({"a": {"type": "string"}}), &["id"]);
        let required = def(json!({"a": {"type": "string"}}), &["id", "a"]);
        assert_eq!(SchemaDelta::between(&optional, &required).unwrap().changes, [Change::SetNotNull("a".into())]);
    }

    #[test]
    fn widening_rules() {
        use ColumnType as T;
        assert!(T::Int(32).fits_in(&T::Int(64)));
        assert!(!T::Int(64).fits_in(&T::Int(32)));
        assert!(T::Int(32).fits_in(&T::Decimal { precision: 12, scale: 2 }));
        assert!(!T::Int(64).fits_in(&T::Decimal { precision: 12, scale: 2 }));
        assert!(T::Decimal { precision: 5, scale: 2 }.fits_in(&T::Decimal { precision: 7, scale: 3 }));
        assert!(!T::Decimal { precision: 5, scale: 2 }.fits_in(&T::Decimal { precision: 5, scale: 3 }));
        let s = |n| T::Str { max_length: n, truncatable: false };
        assert!(s(Some(5)).fits_in(&s(None)) && !s(None).fits_in(&s(Some(5))));
        assert!(T::Ipv4.fits_in(&T::Ip));
    }
}

//! The shape of a table's history, wherever it is kept: the table's columns plus three, as the
//! mirror's `<table>__history` shows them and as `replicate --with-history` carries them to a
//! server target (a plain table beside the replicated one).

use super::{Column, ColumnType, TableDef};

/// The three columns a history adds to the table's own.
pub const VALID_FROM: &str = "dap_valid_from";
pub const VALID_TO: &str = "dap_valid_to";
pub const DELETED: &str = "dap_deleted";

/// The history of `table`, as a table's name (`users__history`).
pub fn history_name(table: &str) -> String {
    format!("{table}__history")
}

/// The definition of `def`'s versions, for the targets that carry them: the key, then every
/// value column made optional (a column added later is NULL in older versions), with enum
/// labels as text and text unbounded (an older version may hold a label the current schema no
/// longer lists; a schema that widens a text column keeps the history table's columns), then
/// `dap_valid_from`, `dap_valid_to` (NULL while current) and `dap_deleted`. It keeps the
/// table's namespace and name: a target names the history table itself.
pub fn versions_def(def: &TableDef) -> TableDef {
    let mut values: Vec<Column> = def
        .values
        .iter()
        .map(|c| Column {
            ty: match &c.ty {
                ColumnType::Enum(_) | ColumnType::Str { .. } => {
                    ColumnType::Str { max_length: None, truncatable: false }
                }
                ty => ty.clone(),
            },
            required: false,
            ..c.clone()
        })
        .collect();
    let column = |name: &str, ty: ColumnType, required: bool| Column { name: name.into(), ty, required, comment: None };
    values.push(column(VALID_FROM, ColumnType::Timestamp, true));
    values.push(column(VALID_TO, ColumnType::Timestamp, false));
    values.push(column(DELETED, ColumnType::Bool, true));
    TableDef { values, comment: None, ..def.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_the_columns_optional_with_labels_and_text_unbounded_then_three() {
        let column =
            |name: &str, ty: ColumnType, required: bool| Column { name: name.into(), ty, required, comment: None };
        let def = TableDef {
            namespace: "canvas".into(),
            name: "users".into(),
            version: 1,
            key: column("id", ColumnType::Int(64), true),
            values: vec![
                column("state", ColumnType::Enum(vec!["a".into()]), true),
                column("name", ColumnType::Str { max_length: Some(5), truncatable: false }, false),
            ],
            comment: Some("users".into()),
        };
        let v = versions_def(&def);
        let names: Vec<&str> = v.columns().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "state", "name", VALID_FROM, VALID_TO, DELETED]);
        assert!(
            v.key.required
                && !v.values[0].required
                && v.values[2].required
                && !v.values[3].required
                && v.values[4].required
        );
        assert_eq!(v.values[0].ty, ColumnType::Str { max_length: None, truncatable: false });
        assert_eq!(v.values[1].ty, ColumnType::Str { max_length: None, truncatable: false }, "text unbounded");
        assert_eq!((v.namespace.as_str(), v.name.as_str()), ("canvas", "users"));
        assert_eq!(history_name("users"), "users__history");
    }
}

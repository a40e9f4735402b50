//! Schema changes DAP really ships, on every target: each kind on its own table, then commits that
//! use it (NULLs in a relaxed column, values in new columns and members, the new enum value, the
//! longer text, the larger number), two syncs; every table equals the truth and the user's
//! indexes and views survive. A table new in the server's list is picked up by
//! `--init-missing`. Changes no target can apply safely stop their table with the fix and
//! change nothing.

use crate::common;

use common::targets::{Backend, TestTarget};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};

/// Each kind of change on a table where it applies.
const CHANGES: &[(&str, SchemaChange)] = &[
    ("accounts", SchemaChange::MakeOptional),
    ("users", SchemaChange::AddColumn),
    ("assignments", SchemaChange::AddNestedMember),
    ("enrollments", SchemaChange::AddEnumValue),
    ("courses", SchemaChange::WidenMaxLength),
    ("learning_outcomes", SchemaChange::WidenInteger),
    ("late_policies", SchemaChange::WidenDecimal),
];

async fn dap(
    emu: &Emulator,
    dir: &std::path::Path,
    command: &str,
    tables: &str,
    t: &TestTarget,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![command, "--namespace", "canvas", "--table", tables, "--connection-string", &t.url];
    args.extend(extra);
    args.extend(t.dap_options());
    run_ours(emu, dir, &args).await
}

async fn every_shipped_change_is_applied_and_user_objects_survive(backend: Backend) {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let t = TestTarget::fresh(backend, "schema_changes").await;
    let tables: Vec<&str> = CHANGES.iter().map(|(t, _)| *t).collect();
    let out = dap(&emu, dir.path(), "initdb", &tables.join(","), &t, &[]).await;
    assert!(out.status.success(), "{backend:?}: {}", String::from_utf8_lossy(&out.stderr));
    for table in &tables {
        let name = t.table("canvas", table);
        t.exec(&format!(
            "CREATE INDEX user_{table}_idx ON {name} (id); CREATE VIEW user_{table}_view AS SELECT * FROM {name}"
        ))
        .await;
    }
    for (table, change) in CHANGES {
        let (version, column) = emu.evolve("canvas", table, *change).unwrap();
        assert_eq!(version, 2, "{table}: {change:?} on {column}");
    }
    for round in 1..=2 {
        for table in &tables {
            emu.commit("canvas", table, ChangeCounts { inserts: 4, updates: 4, soft_deletes: 1, hard_deletes: 1 })
                .unwrap();
        }
        let out = dap(&emu, dir.path(), "syncdb", &tables.join(","), &t, &[]).await;
        assert!(out.status.success(), "{backend:?} round {round}: {}", String::from_utf8_lossy(&out.stderr));
        for table in &tables {
            let def = emu.table_def("canvas", table).unwrap();
            t.assert_rows(&def, &emu.truth("canvas", table).unwrap(), &format!("{backend:?}: sync {round}")).await;
        }
    }
    for table in &tables {
        assert!(t.has_index(&format!("user_{table}_idx")).await, "{backend:?}: the index on {table} survives");
        let through_view = t.column(&format!("SELECT count(*) FROM user_{table}_view")).await;
        let truth = emu.truth("canvas", table).unwrap().len().to_string();
        assert_eq!(through_view[0].as_deref(), Some(truth.as_str()), "{backend:?}: the view on {table} survives");
    }
    // The relaxed column really holds NULLs now, as the truth says.
    let nulls =
        t.column(&format!("SELECT count(*) FROM {} WHERE created_at IS NULL", t.table("canvas", "accounts"))).await;
    assert_ne!(nulls[0].as_deref(), Some("0"), "{backend:?}: rows with NULL in the relaxed column arrived");

    // A table new in the server's list.
    emu.add_table("canvas", "added_items", 12).unwrap();
    let out =
        dap(&emu, dir.path(), "syncdb", &format!("{},added_items", tables.join(",")), &t, &["--init-missing"]).await;
    assert!(out.status.success(), "{backend:?}: {}", String::from_utf8_lossy(&out.stderr));
    let def = emu.table_def("canvas", "added_items").unwrap();
    t.assert_rows(&def, &emu.truth("canvas", "added_items").unwrap(), &format!("{backend:?}: new table")).await;
}

async fn unsafe_changes_stop_their_table_with_the_fix_and_change_nothing(backend: Backend) {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let t = TestTarget::fresh(backend, "schema_refusals").await;
    let out = dap(&emu, dir.path(), "initdb", "wikis,pseudonyms,users", &t, &[]).await;
    assert!(out.status.success(), "{backend:?}: {}", String::from_utf8_lossy(&out.stderr));
    let defs: Vec<_> = ["wikis", "pseudonyms"].iter().map(|n| emu.table_def("canvas", n).unwrap()).collect();
    let before: Vec<_> = defs.iter().map(|d| emu.truth("canvas", &d.name).unwrap()).collect();

    let (_, required) = emu.evolve("canvas", "wikis", SchemaChange::MakeRequired).unwrap();
    assert!(before[0].iter().any(|r| r[&required].is_null()), "wikis.{required} holds NULLs to refuse over");
    let (_, narrowed) = emu.evolve("canvas", "pseudonyms", SchemaChange::NarrowMaxLength).unwrap();
    for table in ["wikis", "pseudonyms", "users"] {
        emu.commit("canvas", table, ChangeCounts { inserts: 2, updates: 2, ..Default::default() }).unwrap();
    }
    let out = dap(&emu, dir.path(), "syncdb", "wikis,pseudonyms,users", &t, &[]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{backend:?}: {err}");
    assert!(err.contains(&format!("column {required}")) && err.contains("became required"), "{backend:?}: {err}");
    assert!(err.contains(&format!("column {narrowed}")) && err.contains("could not hold"), "{backend:?}: {err}");
    assert!(err.contains("initdb --replace --namespace canvas --table wikis"), "{backend:?}: {err}");
    assert!(err.contains("initdb --replace --namespace canvas --table pseudonyms"), "{backend:?}: {err}");
    for (def, rows) in defs.iter().zip(&before) {
        t.assert_rows(def, rows, &format!("{backend:?}: {} unchanged", def.name)).await;
    }
    let users = emu.table_def("canvas", "users").unwrap();
    t.assert_rows(&users, &emu.truth("canvas", "users").unwrap(), &format!("{backend:?}: other tables sync")).await;
}

crate::each_backend!(
    every_shipped_change_is_applied_and_user_objects_survive,
    unsafe_changes_stop_their_table_with_the_fix_and_change_nothing,
);

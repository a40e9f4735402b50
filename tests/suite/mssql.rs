//! SQL Server in the official client's layout, against the TDS test server (or a real server
//! named by `TEST_MSSQL_URL`, where a test does not need the test server's insides): tables
//! covering every column type follow the truth through initdb, three rounds of syncs and a schema
//! round; what the bulk loads carried is checked bit for bit; the T-SQL the adapter sends is
//! compared with checked-in golden text, and parses; `dap ddl` equals the official generator's
//! DDL for every table; bad input is refused clearly and commits nothing.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use common::targets::{Backend, MSSQL_LIMITS, TestTarget};
use common::tds::engine::{Cell, UNIX_EPOCH_DAYS};
use common::tds::{Faults, ServerOptions, TdsServer};
use common::truth::{self, assert_same_rows_within};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use dap_replica::schema::{ColumnType, TableDef};
use serde_json::{Map, Value as Json};

fn config(rows: u64) -> EmulatorConfig {
    EmulatorConfig { rows, part_rows: 20, ..EmulatorConfig::default() }
}

/// The kind of a column type, for coverage: every kind must be replicated somewhere.
fn kind(ty: &ColumnType) -> String {
    match ty {
        ColumnType::Int(b) => format!("int{b}"),
        ColumnType::IntEnum(_) => "integer enum".into(),
        ColumnType::Float(b) => format!("float{b}"),
        ColumnType::Decimal { .. } => "decimal".into(),
        ColumnType::Bool => "bool".into(),
        ColumnType::Str { max_length: Some(n), .. } if *n * 4 > 8000 => "long varchar".into(),
        ColumnType::Str { max_length: Some(_), .. } => "varchar".into(),
        ColumnType::Str { max_length: None, .. } => "text".into(),
        ColumnType::Enum(_) => "enum".into(),
        ColumnType::Timestamp => "timestamp".into(),
        ColumnType::Date => "date".into(),
        ColumnType::Time => "time".into(),
        ColumnType::Uuid => "uuid".into(),
        ColumnType::Ipv4 => "ipv4".into(),
        ColumnType::Ipv6 => "ipv6".into(),
        ColumnType::Ip => "ip".into(),
        ColumnType::Array(_) => "array".into(),
        ColumnType::Object(_) => "object".into(),
        ColumnType::Json => "json".into(),
    }
}

/// At least 15 canvas tables that together hold every kind of column any canvas table has.
fn covering_tables(emu: &Emulator) -> Vec<String> {
    let all = emu.tables("canvas").unwrap();
    let kinds_of =
        |t: &str| -> BTreeSet<String> { emu.table_def("canvas", t).unwrap().columns().map(|c| kind(&c.ty)).collect() };
    let wanted: BTreeSet<String> = all.iter().flat_map(|t| kinds_of(t)).collect();
    let mut chosen: Vec<String> = ["accounts", "courses", "submissions"].map(String::from).to_vec();
    let mut covered: BTreeSet<String> = chosen.iter().flat_map(|t| kinds_of(t)).collect();
    for t in &all {
        let new: BTreeSet<String> = kinds_of(t).difference(&covered).cloned().collect();
        if !new.is_empty() {
            covered.extend(new);
            chosen.push(t.clone());
        }
    }
    for t in &all {
        if chosen.len() >= 15 {
            break;
        }
        if !chosen.contains(t) {
            chosen.push(t.clone());
        }
    }
    assert_eq!(covered, wanted, "the chosen tables cover every kind of column");
    chosen
}

async fn dap_on(emu: &Emulator, dir: &Path, t: &TestTarget, args: &[&str]) {
    let mut a = args.to_vec();
    a.extend(["--connection-string", &t.url]);
    a.extend(t.dap_options());
    ours_ok(emu, dir, &a).await;
}

async fn assert_truth(emu: &Emulator, t: &TestTarget, tables: &[(&str, String)], step: &str) {
    for (ns, table) in tables {
        let def = emu.table_def(ns, table).unwrap();
        assert_same_rows_within(
            &def,
            &t.rows(&def).await,
            &emu.truth(ns, table).unwrap(),
            &format!("{step}: {table}"),
            MSSQL_LIMITS,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_every_column_type_follow_the_truth_through_syncs_and_a_schema_round() {
    let emu = emulator(config(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let t = TestTarget::fresh(Backend::Mssql, "ms_all").await;
    let chosen = covering_tables(&emu);
    assert!(chosen.len() >= 15);
    let mut tables: Vec<(&str, String)> = chosen.iter().map(|c| ("canvas", c.clone())).collect();
    tables.push(("canvas_logs", "web_logs".into()));
    dap_on(&emu, dir, &t, &["initdb", "--namespace", "canvas", "--table", &chosen.join(",")]).await;
    dap_on(&emu, dir, &t, &["initdb", "--namespace", "canvas_logs", "--table", "web_logs"]).await;
    assert_truth(&emu, &t, &tables, "after initdb").await;

    let changes: [(&str, SchemaChange); 4] = [
        ("accounts", SchemaChange::AddColumn),
        ("courses", SchemaChange::WidenMaxLength),
        ("submissions", SchemaChange::AddEnumValue),
        ("accounts", SchemaChange::MakeOptional),
    ];
    for round in 1..=4 {
        if round == 4 {
            for (table, change) in changes {
                emu.evolve("canvas", table, change).unwrap();
            }
        }
        for (ns, table) in &tables {
            let counts = if *ns == "canvas_logs" {
                ChangeCounts { inserts: 15, ..Default::default() }
            } else {
                ChangeCounts { inserts: 4, updates: 4, soft_deletes: 1, hard_deletes: 2 }
            };
            emu.commit(ns, table, counts).unwrap();
        }
        dap_on(&emu, dir, &t, &["syncdb", "--namespace", "canvas", "--table", &chosen.join(",")]).await;
        dap_on(&emu, dir, &t, &["syncdb", "--namespace", "canvas_logs", "--table", "web_logs"]).await;
        let step = if round == 4 { "after the schema round".to_string() } else { format!("after sync {round}") };
        assert_truth(&emu, &t, &tables, &step).await;
    }

    let Some(server) = &t.tds else { return }; // a real server: the rest looks at the test server's insides
    let db = server.db().await;
    assert!(db.unexecuted.is_empty(), "statements the test server could not execute: {:#?}", db.unexecuted);
    // Enum columns hold ids of their lookup tables, which map back to the truth's labels: read
    // from the stored rows directly, not through a join of the test server's.
    for (ns, table) in &tables {
        let def = emu.table_def(ns, table).unwrap();
        let stored = db.table(ns, table).unwrap();
        let key_of = |v: &Json| format!("{:?}", expected_cell(&def.key.ty, v));
        let truth: HashMap<String, Map<String, Json>> =
            emu.truth(ns, table).unwrap().into_iter().map(|r| (key_of(&r[&def.key.name]), r)).collect();
        for (i, c) in def.columns().enumerate() {
            let ColumnType::Enum(_) = c.ty else { continue };
            let lookup = db.table(ns, &format!("{table}__{}", c.name)).expect("the lookup table");
            let labels: HashMap<i64, String> = lookup.live_rows().map(|r| (r[0].as_i64(), r[1].as_text())).collect();
            assert!(stored.foreign_keys.iter().any(|f| f.name == format!("fk_{ns}_{table}_{}", c.name)));
            for row in stored.live_rows() {
                let key = format!("{:?}", row[0]);
                let want = &truth[&key][&c.name];
                let got = match &row[i] {
                    Cell::Null => Json::Null,
                    id => Json::String(labels[&id.as_i64()].clone()),
                };
                assert_eq!(&got, want, "{table}.{} of key {key}", c.name);
            }
        }
    }
    // Set-based: the number of statements does not grow with the rows.
    let statements = server.statements();
    let per_row = statements
        .iter()
        .filter(|s| {
            s.contains("VALUES (@P1")
                && !s.contains("table_sync")
                && !s.contains("checkpoints")
                && !s.contains("\"dap_replica\".\"locks\"")
        })
        .count();
    assert_eq!(per_row, 0, "no row-at-a-time INSERT");
}

/// The value a truth value must arrive as in a decoded bulk row, computed with chrono and the
/// standard library only.
fn expected_cell(ty: &ColumnType, v: &Json) -> Cell {
    let text = || v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let day_number =
        |d: chrono::NaiveDate| (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() + UNIX_EPOCH_DAYS;
    match (ty, v) {
        (_, Json::Null) => Cell::Null,
        (ColumnType::Int(_) | ColumnType::IntEnum(_), v) => Cell::Int(v.as_i64().unwrap()),
        (ColumnType::Bool, v) => Cell::Bit(v.as_bool().unwrap()),
        (ColumnType::Float(_), Json::String(s)) => match s.as_str() {
            "NaN" | "Infinity" | "-Infinity" => Cell::Null, // --non-finite null
            s => Cell::Float(s.parse().unwrap()),
        },
        (ColumnType::Float(_), v) => Cell::Float(v.as_f64().unwrap()),
        (ColumnType::Decimal { scale, .. }, _) => {
            let s = text();
            let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
            let mut frac = frac.to_string();
            while frac.len() < *scale as usize {
                frac.push('0');
            }
            let m: i128 = format!("{}{frac}", int.trim_start_matches('-')).parse().unwrap();
            Cell::Decimal(if s.starts_with('-') { -m } else { m }, *scale)
        }
        (ColumnType::Timestamp, _) => {
            let t = chrono::DateTime::parse_from_rfc3339(&text()).unwrap().naive_utc();
            let ticks = t.time().num_seconds_from_midnight() as u64 * 10_000_000 + t.time().nanosecond() as u64 / 100;
            Cell::DateTime2(day_number(t.date()), ticks)
        }
        (ColumnType::Date, _) => {
            Cell::Date(day_number(chrono::NaiveDate::parse_from_str(&text(), "%Y-%m-%d").unwrap()))
        }
        (ColumnType::Time, _) => {
            let t = chrono::NaiveTime::parse_from_str(&text(), "%H:%M:%S%.f").unwrap();
            Cell::Time(t.num_seconds_from_midnight() as u64 * 10_000_000 + t.nanosecond() as u64 / 100)
        }
        (ColumnType::Uuid, _) => Cell::Binary(uuid::Uuid::parse_str(&text()).unwrap().as_bytes().to_vec()),
        (ColumnType::Ip | ColumnType::Ipv4 | ColumnType::Ipv6, _) => {
            Cell::Binary(match text().parse::<std::net::IpAddr>().unwrap() {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            })
        }
        (ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json, v) => Cell::Text(v.to_string()),
        (_, v) => Cell::Text(v.as_str().unwrap().to_string()),
    }
}

use chrono::Timelike;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_loads_carry_every_value_bit_for_bit() {
    let emu = emulator(config(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TdsServer::start(ServerOptions { keep_bulk_rows: true, ..ServerOptions::default() }).await;
    let tables = covering_tables(&emu);
    let url = server.url();
    let mut args = vec!["initdb", "--namespace", "canvas", "--table"];
    let list = tables.join(",");
    args.extend([list.as_str(), "--connection-string", &url, "--non-finite", "null"]);
    ours_ok(&emu, dir.path(), &args).await;
    let loads = server.bulk_loads();
    let mut seen = BTreeMap::<&str, usize>::new();
    let mut texts = Vec::new();
    for table in &tables {
        let def: TableDef = emu.table_def("canvas", table).unwrap();
        let staged = format!("canvas__{table}");
        let truth: HashMap<String, Map<String, Json>> =
            emu.truth("canvas", table).unwrap().into_iter().map(|r| (r[&def.key.name].to_string(), r)).collect();
        let mut rows = 0;
        for load in loads.iter().filter(|l| l.table == ("dap_replica".to_string(), staged.clone())) {
            for row in &load.rows {
                let by_name: HashMap<&str, &Cell> = load.columns.iter().map(|(n, _)| n.as_str()).zip(row).collect();
                let key = match by_name[def.key.name.as_str()] {
                    Cell::Int(k) => k.to_string(),
                    other => serde_json::to_string(&other.as_text()).unwrap(),
                };
                let want = &truth[&key];
                for c in def.columns() {
                    let got = by_name[c.name.as_str()];
                    let expected = expected_cell(&c.ty, &want[&c.name]);
                    let same = match (got, &expected) {
                        (Cell::Float(a), Cell::Float(b)) if matches!(c.ty, ColumnType::Float(32)) => {
                            (*a as f32).to_bits() == (*b as f32).to_bits()
                        }
                        (Cell::Float(a), Cell::Float(b)) => a.to_bits() == b.to_bits(),
                        (a, b) => a == b,
                    };
                    assert!(
                        same,
                        "{table}.{} of key {key}: the bulk load carried {got:?}, the truth is {expected:?}",
                        c.name
                    );
                    match got {
                        Cell::Null => *seen.entry("NULL").or_default() += 1,
                        Cell::Text(t) => texts.push(t.clone()),
                        Cell::DateTime2(_, ticks) if ticks % 10_000_000 != 0 => {
                            *seen.entry("fractional datetime2").or_default() += 1
                        }
                        Cell::Decimal(..) => *seen.entry("decimal").or_default() += 1,
                        Cell::Binary(b) if b.len() == 16 && matches!(c.ty, ColumnType::Uuid) => {
                            *seen.entry("uuid").or_default() += 1
                        }
                        Cell::Binary(b) if b.len() == 4 => *seen.entry("packed IPv4").or_default() += 1,
                        Cell::Binary(_) => *seen.entry("packed IPv6").or_default() += 1,
                        _ => {}
                    }
                }
                rows += 1;
            }
        }
        assert_eq!(rows, truth.len(), "{table}: every row went through a bulk load");
    }
    // The data is as wide as the real world: the checks above met each of these.
    for what in ["NULL", "fractional datetime2", "decimal", "uuid"] {
        assert!(seen.get(what).is_some_and(|n| *n > 0), "no {what} was checked: {seen:?}");
    }
    for (what, found) in [
        ("an emoji", texts.iter().any(|t| t.chars().any(|c| c as u32 >= 0x1F300))),
        ("CJK", texts.iter().any(|t| t.chars().any(|c| ('\u{4E00}'..='\u{9FFF}').contains(&c)))),
        ("an accent", texts.iter().any(|t| t.chars().any(|c| ('\u{C0}'..='\u{17F}').contains(&c)))),
        ("an empty string", texts.iter().any(String::is_empty)),
    ] {
        assert!(found, "no text with {what} was checked");
    }
    // IP addresses travel as 4 or 16 bytes, before binary(16) pads them.
    let emu_logs = emulator(config(40)).await;
    let server = TdsServer::start(ServerOptions { keep_bulk_rows: true, ..ServerOptions::default() }).await;
    ours_ok(
        &emu_logs,
        dir.path(),
        &["initdb", "--namespace", "canvas_logs", "--table", "web_logs", "--connection-string", &server.url()],
    )
    .await;
    let def = emu_logs.table_def("canvas_logs", "web_logs").unwrap();
    let ip = def.columns().position(|c| matches!(c.ty, ColumnType::Ip)).expect("web_logs has an IP column");
    let lens: BTreeSet<usize> = server
        .bulk_loads()
        .iter()
        .flat_map(|l| l.rows.iter().map(move |r| r[ip].clone()))
        .filter_map(|c| match c {
            Cell::Binary(b) => Some(b.len()),
            _ => None,
        })
        .collect();
    assert_eq!(lens, BTreeSet::from([4, 16]), "IPv4 as 4 bytes, IPv6 as 16");
}

/// Statements the adapter sent for initdb then syncdb of one table, one table at a time so that
/// the order is fixed: the statements, and the text of the golden file.
async fn statements_for(table: (&str, &str)) -> (Vec<String>, String) {
    let emu = emulator(config(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TdsServer::start(ServerOptions::default()).await;
    let url = server.url();
    let (ns, t) = table;
    let mut all = Vec::new();
    let mut text = String::new();
    for command in ["initdb", "syncdb"] {
        if command == "syncdb" {
            emu.commit(ns, t, ChangeCounts { inserts: 3, updates: 3, soft_deletes: 1, hard_deletes: 1 }).unwrap();
        }
        server.clear_log();
        let args = [command, "--namespace", ns, "--table", t, "--connection-string", &url, "--non-finite", "null"];
        ours_ok(&emu, dir.path(), &args).await;
        text.push_str(&format!("-- dap {command} --namespace {ns} --table {t}\n"));
        for s in server.statements() {
            text.push_str(s.trim().trim_end_matches(';'));
            text.push_str(";\n");
            all.push(s);
        }
    }
    (all, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tsql_sent_equals_the_golden_files_and_parses() {
    use sqlparser::dialect::MsSqlDialect;
    use sqlparser::parser::Parser;
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mssql");
    for table in [("canvas", "accounts"), ("canvas", "courses"), ("canvas", "submissions"), ("canvas_logs", "web_logs")]
    {
        let (statements, sent) = statements_for(table).await;
        // Every statement parses as T-SQL, except tiberius' own `INSERT BULK` (the bulk load's
        // metadata), which names a staging table of ours and its columns with their types.
        let staged = format!("INSERT BULK [dap_replica].[{}__{}", table.0, table.1);
        let mut bulk = 0;
        for statement in &statements {
            // The table lock: `EXEC @result = …` is T-SQL the parser does not know.
            if statement.starts_with("DECLARE @result int; EXEC @result = sp_getapplock @Resource = @P1, ") {
                continue;
            }
            if statement.starts_with("INSERT BULK ") {
                assert!(statement.starts_with(&staged) && statement.contains("] bigint"), "{statement}");
                bulk += 1;
                continue;
            }
            Parser::parse_sql(&MsSqlDialect {}, statement).unwrap_or_else(|e| panic!("{table:?}: {e}\n{statement}"));
        }
        assert!(bulk >= 2, "{table:?}: the snapshot and the changes went by bulk load");
        let file = golden.join(format!("{}.{}.sql", table.0, table.1));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&file, &sent).unwrap();
        }
        let expected = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", file.display()));
        if sent != expected {
            let (a, b): (Vec<&str>, Vec<&str>) = (sent.lines().collect(), expected.lines().collect());
            let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
            panic!(
                "{table:?}: the T-SQL sent differs from {} at line {}:\n  sent:     {}\n  expected: {}\n(UPDATE_GOLDEN=1 rewrites it after a deliberate change)",
                file.display(),
                first + 1,
                a.get(first).unwrap_or(&"<end>"),
                b.get(first).unwrap_or(&"<end>")
            );
        }
    }
}

/// A table's structure as parsed T-SQL: columns (type, nullability, identity), the primary key,
/// foreign keys and UNIQUE constraints with their names.
fn structure(sql: &str) -> BTreeSet<String> {
    use sqlparser::ast::{AlterTableOperation, ColumnOption, Statement, TableConstraint};
    use sqlparser::dialect::MsSqlDialect;
    use sqlparser::parser::Parser;
    // The official generator adds several constraints with one ALTER TABLE … ADD, which
    // sqlparser does not read: one statement per constraint.
    let mut split = String::new();
    for statement in sql.split(";\n") {
        let statement = statement.trim();
        match statement.split_once(" ADD\nCONSTRAINT ") {
            Some((head, rest)) => {
                for c in rest.split(",\nCONSTRAINT ") {
                    split.push_str(&format!("{head} ADD CONSTRAINT {c};\n"));
                }
            }
            None if !statement.is_empty() => split.push_str(&format!("{statement};\n")),
            None => {}
        }
    }
    let name = |o: &sqlparser::ast::ObjectName| o.to_string().replace('"', "");
    let ty = |t: &sqlparser::ast::DataType| {
        t.to_string().to_lowercase().replace("integer", "int").replace("double precision", "double")
    };
    let mut out = BTreeSet::new();
    for s in Parser::parse_sql(&MsSqlDialect {}, &split).unwrap_or_else(|e| panic!("{e}")) {
        match s {
            Statement::CreateTable(ct) => {
                let t = name(&ct.name);
                out.insert(format!("table {t}"));
                for c in &ct.columns {
                    let required = c.options.iter().any(|o| matches!(o.option, ColumnOption::NotNull));
                    let identity = c.options.iter().any(|o| matches!(o.option, ColumnOption::Identity(_)));
                    out.insert(format!(
                        "column {t}.{} {} {} {}",
                        c.name.value,
                        ty(&c.data_type),
                        if required { "NOT NULL" } else { "NULL" },
                        if identity { "IDENTITY" } else { "" }
                    ));
                }
                for c in &ct.constraints {
                    out.insert(format!("constraint {t} {c}").replace('"', ""));
                }
            }
            Statement::AlterTable(at) => {
                for op in &at.operations {
                    if let AlterTableOperation::AddConstraint { constraint, .. } = op {
                        let kind = match constraint {
                            TableConstraint::ForeignKey(_)
                            | TableConstraint::Unique(_)
                            | TableConstraint::PrimaryKey(_) => "",
                            other => panic!("an unexpected constraint {other}"),
                        };
                        out.insert(format!("constraint {} {kind}{constraint}", name(&at.name)).replace('"', ""));
                    }
                }
            }
            Statement::If(_) => {
                out.insert(format!("schema {s}"));
            }
            // The session settings and the version row of `dap ddl` shape no table.
            Statement::Insert(_) => {}
            other if other.to_string().starts_with("SET ") => {}
            other => panic!("an unexpected statement {other}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_for_every_table_equals_the_official_generators() {
    let emu = emulator(config(5)).await;
    let dir = tempfile::tempdir().unwrap();
    for ns in ["canvas", "canvas_logs"] {
        let ours = ours_ok(&emu, dir.path(), &["ddl", "--dialect", "mssql", "--namespace", ns, "--table", "all"]).await;
        let schemas = dir.path().join(format!("schemas-{ns}"));
        ours_ok(
            &emu,
            dir.path(),
            &["schema", "--namespace", ns, "--table", "all", "--output-directory", schemas.to_str().unwrap()],
        )
        .await;
        let mut files: Vec<String> =
            files_under(&schemas).into_iter().map(|f| schemas.join(f).display().to_string()).collect();
        files.sort();
        if ns == "canvas" {
            assert!(files.len() >= 90, "the canvas schemas: {}", files.len());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/mssql_ddl.py");
        let out =
            tokio::process::Command::new(official_python()).arg(&script).arg(ns).args(&files).output().await.unwrap();
        assert!(out.status.success(), "the official generator failed: {}", String::from_utf8_lossy(&out.stderr));
        let theirs = String::from_utf8(out.stdout).unwrap();
        let (a, b) = (structure(&ours), structure(&theirs));
        assert!(a.len() > 50 * files.len().min(2), "{ns}: the structure has content");
        let only_ours: Vec<&String> = a.difference(&b).take(10).collect();
        let only_theirs: Vec<&String> = b.difference(&a).take(10).collect();
        assert!(
            a == b,
            "{ns}: dap ddl differs from the official generator\nonly ours: {only_ours:#?}\nonly theirs: {only_theirs:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_commits_nothing() {
    let emu = emulator(config(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cr3t-Pass";
    let server = TdsServer::start(ServerOptions { password: secret.into(), ..ServerOptions::default() }).await;
    let port = server.port;
    let run = |url: String, command: &'static str| {
        let (emu, dir) = (&emu, dir.path().to_path_buf());
        async move {
            run_ours(
                emu,
                &dir,
                &[
                    command,
                    "--namespace",
                    "canvas",
                    "--table",
                    "accounts",
                    "--connection-string",
                    &url,
                    "--non-finite",
                    "null",
                ],
            )
            .await
        }
    };
    let expect = |out: std::process::Output, needles: &[&str]| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "expected a failure");
        for n in needles {
            assert!(err.contains(n), "expected {n:?} in: {err}");
        }
        assert!(!err.contains(secret) && !err.contains("wrong-one"), "a password leaked: {err}");
    };
    expect(
        run(format!("mssql://sa:wrong-one@127.0.0.1:{port}/dap?ssl=disable"), "initdb").await,
        &["refused the login of user sa", "check the user and password"],
    );
    expect(
        run(format!("mssql://sa:{secret}@127.0.0.1:{port}/other?ssl=disable"), "initdb").await,
        &["database other does not exist"],
    );
    expect(
        run(format!("mssql://sa:{secret}@127.0.0.1:1/dap?ssl=disable"), "initdb").await,
        &["cannot reach the server"],
    );
    expect(
        run(format!("mssql://sa:{secret}@127.0.0.1:{port}/dap?ssl=often"), "initdb").await,
        &["invalid connection string", "ssl=often"],
    );
    expect(
        run(format!("mssql://sa:{secret}@127.0.0.1:99999/dap"), "initdb").await,
        &["invalid connection string", "port"],
    );
    // The default encrypts, and this server offers no TLS.
    expect(run(format!("mssql://sa:{secret}@127.0.0.1:{port}/dap"), "initdb").await, &["TLS"]);
    assert!(server.db().await.tables.is_empty(), "nothing was created by refused connections");

    // An error token in the middle of a bulk load: nothing of the table is published.
    let url = format!("mssql://sa:{secret}@127.0.0.1:{port}/dap?ssl=disable");
    server.set_faults(Faults { bulk_error_after_rows: Some(7), ..Faults::default() });
    expect(run(url.clone(), "initdb").await, &["invalid column length", "loading rows"]);
    {
        let db = server.db().await;
        assert!(db.table("canvas", "accounts").is_none(), "no half-loaded table");
        let sync = db.table("instructure_dap", "table_sync").unwrap();
        assert_eq!(sync.live_rows().count(), 0, "no bookkeeping row");
    }
    let ok = run(url.clone(), "initdb").await;
    assert!(ok.status.success(), "a rerun succeeds: {}", String::from_utf8_lossy(&ok.stderr));
    let def = emu.table_def("canvas", "accounts").unwrap();
    let rows = |db: &common::tds::engine::Db| db.table("canvas", "accounts").unwrap().live_rows().count();
    assert_eq!(rows(&*server.db().await), emu.truth("canvas", "accounts").unwrap().len());

    // A sync whose MERGE fails keeps the rows and the watermark; the rerun converges.
    emu.commit("canvas", "accounts", ChangeCounts { inserts: 5, updates: 5, soft_deletes: 1, hard_deletes: 2 })
        .unwrap();
    let watermark = |db: &common::tds::engine::Db| {
        db.table("instructure_dap", "table_sync").unwrap().live_rows().next().unwrap()[3].clone()
    };
    let before_mark = watermark(&*server.db().await);
    // Every column of every row, not a count: a failed MERGE that changed values in place would
    // keep the count.
    let before_rows = truth::row_lines(&def, &truth::mssql_rows(&url, &def).await, &[]);
    server.set_faults(Faults {
        statement_error_on: Some("MERGE INTO \"canvas\".\"accounts\"".into()),
        ..Faults::default()
    });
    expect(run(url.clone(), "syncdb").await, &["injected fault", "applying the changes to accounts"]);
    assert_eq!(watermark(&*server.db().await), before_mark, "the failed sync kept the watermark");
    assert!(
        truth::row_lines(&def, &truth::mssql_rows(&url, &def).await, &[]) == before_rows,
        "the failed sync changed no value of any row"
    );
    let ok = run(url.clone(), "syncdb").await;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let target_rows = truth::mssql_rows(&url, &def).await;
    assert_same_rows_within(
        &def,
        &target_rows,
        &emu.truth("canvas", "accounts").unwrap(),
        "after the rerun",
        MSSQL_LIMITS,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_is_refused_naming_the_row_or_stored_as_null() {
    let emu = emulator(config(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TdsServer::start(ServerOptions::default()).await;
    let url = server.url();
    // assignments.points_possible is a float column, and the emulator's edge rows put NaN and
    // infinity there (scores never: they are plausible by design).
    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "assignments", "--connection-string", &url],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("which SQL Server cannot store") && err.contains("--non-finite null") && err.contains("key "),
        "{err}"
    );
    assert!(server.db().await.table("canvas", "assignments").is_none(), "nothing was published");
    ours_ok(
        &emu,
        dir.path(),
        &[
            "initdb",
            "--namespace",
            "canvas",
            "--table",
            "assignments",
            "--connection-string",
            &url,
            "--non-finite",
            "null",
        ],
    )
    .await;
    let def = emu.table_def("canvas", "assignments").unwrap();
    assert_same_rows_within(
        &def,
        &truth::mssql_rows(&url, &def).await,
        &emu.truth("canvas", "assignments").unwrap(),
        "NaN as NULL",
        MSSQL_LIMITS,
    );
    // A required float column: NULL cannot stand in there; refused with the reason, and the
    // staging table is gone.
    let table = "outcome_proficiency_ratings";
    let args =
        ["initdb", "--namespace", "canvas", "--table", table, "--connection-string", &url, "--non-finite", "null"];
    let out = run_ours(&emu, dir.path(), &args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("points is required (NOT NULL)"), "{err}");
    let db = server.db().await;
    assert!(db.table("canvas", table).is_none(), "nothing was published");
    assert!(db.table("dap_replica", &format!("canvas__{table}")).is_none(), "no staging is left");
}

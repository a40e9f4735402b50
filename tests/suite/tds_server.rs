//! The TDS test server checked on its own: the real tiberius client logs in, runs batches and
//! RPCs, bulk-loads rows; an independent client (python-tds) does the same.

use crate::common;

use common::tds::{ServerOptions, TdsServer};
use tokio_util::compat::TokioAsyncWriteCompatExt;

async fn client(server: &TdsServer) -> tiberius::Client<tokio_util::compat::Compat<tokio::net::TcpStream>> {
    let mut config = tiberius::Config::new();
    config.host("127.0.0.1");
    config.port(server.port);
    config.database("dap");
    config.authentication(tiberius::AuthMethod::sql_server("sa", "Test-Passw0rd"));
    config.encryption(tiberius::EncryptionLevel::NotSupported);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    tiberius::Client::connect(config, tcp.compat_write()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiberius_logs_in_creates_inserts_bulk_loads_and_reads() {
    let server = TdsServer::start(ServerOptions::default()).await;
    let mut c = client(&server).await;
    c.simple_query("IF NOT EXISTS (SELECT * FROM sys.schemas WHERE name = N'ns') EXEC('CREATE SCHEMA \"ns\"')")
        .await
        .unwrap()
        .into_results()
        .await
        .unwrap();
    c.simple_query("CREATE TABLE \"ns\".\"t\" (\"id\" bigint NOT NULL, \"name\" nvarchar(max), \"at\" datetime2, \"b\" binary(16), CONSTRAINT \"pk_ns_t\" PRIMARY KEY (\"id\"))").await.unwrap().into_results().await.unwrap();
    c.execute("INSERT INTO \"ns\".\"t\" (\"id\", \"name\") VALUES (@P1, @P2)", &[&1i64, &"héllo 😀"]).await.unwrap();
    let mut bulk = c.bulk_insert("[ns].[t]").await.unwrap();
    for i in 2..5i64 {
        let mut row = tiberius::TokenRow::new();
        row.push(tiberius::ColumnData::I64(Some(i)));
        row.push(tiberius::ColumnData::String(Some(format!("r{i}").into())));
        row.push(tiberius::ColumnData::DateTime2(None));
        row.push(tiberius::ColumnData::Binary(Some(vec![1, 2, 3, 4].into())));
        bulk.send(row).await.unwrap();
    }
    bulk.finalize().await.unwrap();
    let rows = c
        .query("SELECT \"id\", \"name\", \"b\" FROM \"ns\".\"t\" ORDER BY \"id\"", &[])
        .await
        .unwrap()
        .into_first_result()
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].get::<&str, _>(1), Some("héllo 😀"));
    assert_eq!(rows[3].get::<i64, _>(0), Some(4));
    assert_eq!(rows[3].get::<&[u8], _>(2).map(|b| b.len()), Some(16), "binary(16) pads");
    let dup = c.execute("INSERT INTO \"ns\".\"t\" (\"id\") VALUES (@P1)", &[&2i64]).await;
    assert!(dup.unwrap_err().to_string().contains("Violation of PRIMARY KEY constraint 'pk_ns_t'"));
}

/// python-tds (an independent implementation of TDS) logs in, creates a table, inserts with
/// parameters, bulk-copies rows and reads them back; the server's stored rows agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_client_python_tds_agrees_with_the_server() {
    let server = TdsServer::start(ServerOptions::default()).await;
    let script = r#"
import sys, io, pytds
port = int(sys.argv[1])
with pytds.connect(server="127.0.0.1", port=port, database="dap", user="sa", password="Test-Passw0rd", autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute('CREATE TABLE "dbo"."people" ("id" bigint NOT NULL, "name" nvarchar(100), "score" float, CONSTRAINT "pk_people" PRIMARY KEY ("id"))')
    cur.execute('INSERT INTO "dbo"."people" ("id", "name", "score") VALUES (%s, %s, %s)', (1, "Zoë 日本", 2.5))
    cur.copy_to(io.StringIO("2\tbulk one\t1.25\n3\tbulk two\t-0.5\n"), "people", columns=["id", "name", "score"])
    cur.execute('SELECT "id", "name", "score" FROM "dbo"."people" ORDER BY "id"')
    for row in cur.fetchall():
        print("|".join(str(v) for v in row))
    try:
        cur.execute('INSERT INTO "dbo"."people" ("id") VALUES (%s)', (1,))
    except pytds.tds_base.IntegrityError as e:
        print("refused:", e)
try:
    pytds.connect(server="127.0.0.1", port=port, database="dap", user="sa", password="wrong", autocommit=True)
except Exception as e:
    print("login:", e)
"#;
    let out = tokio::process::Command::new(common::official_python())
        .arg("-c")
        .arg(script)
        .arg(server.port.to_string())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python-tds failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(&lines[..3], ["1|Zoë 日本|2.5", "2|bulk one|1.25", "3|bulk two|-0.5"], "{stdout}");
    assert!(lines[3].starts_with("refused:") && lines[3].contains("pk_people"), "{stdout}");
    assert!(lines[4].starts_with("login:") && lines[4].contains("Login failed for user 'sa'"), "{stdout}");
    let db = server.db().await;
    let t = db.table("dbo", "people").unwrap();
    let stored: Vec<String> = t.live_rows().map(|r| format!("{}|{}", r[0].as_i64(), r[1].as_text())).collect();
    assert_eq!(stored, ["1|Zoë 日本", "2|bulk one", "3|bulk two"]);
}

//! The floor for loading into SQL Server (the benchmark's `mssql` scenario): the same snapshot
//! objects decoded as `initdb` decodes them, encoded into the same bulk-load packets by the same
//! encoder and `tiberius`, and written to /dev/null by a TDS server in this process over an
//! in-memory pipe. No HTTP, no job, no TCP, no server-side work: what `initdb` must at least
//! do to send the rows, so its send rate can be compared with it.
//!
//!     cargo run --release --example mssql_floor -- SCHEMA.json NAMESPACE TABLE FILE.tsv.gz...
//!
//! SCHEMA.json is the table's schema as `dap schema` writes it. Prints rows and bytes sent.

use tds_test_server as tds;

use std::io::BufRead;
use std::sync::atomic::Ordering;

use dap_replica::decode::tsv::TsvDecoder;
use dap_replica::schema::TableDef;
use dap_replica::sink::NonFinite;
use dap_replica::sink::mssql::{BulkEncoder, Span, create_scratch_sql};
use tokio_util::compat::TokioAsyncReadCompatExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [schema, ns, table, files @ ..] = args.as_slice() else {
        return Err("usage: mssql_floor SCHEMA.json NAMESPACE TABLE FILE.tsv.gz...".into());
    };
    let def = TableDef::from_versioned(ns, table, &serde_json::from_str(&std::fs::read_to_string(schema)?)?)?;
    let server =
        tds::TdsServer::start(tds::ServerOptions { discard_bulk: true, ..tds::ServerOptions::default() }).await;
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    server.serve(theirs);
    let mut config = tiberius::Config::new();
    config.authentication(tiberius::AuthMethod::sql_server("sa", "Test-Passw0rd"));
    config.database("dap");
    config.encryption(tiberius::EncryptionLevel::NotSupported);
    config.packet_size(32_767);
    let mut client = tiberius::Client::connect(config, ours.compat()).await?;
    let staging = format!("{ns}__{table}");
    client
        .simple_query(format!("IF NOT EXISTS ( SELECT * FROM sys.schemas WHERE name = N'dap_replica' ) EXEC('CREATE SCHEMA \"dap_replica\"'); {}", create_scratch_sql(&def, &staging, Span::Part)))
        .await?
        .into_results()
        .await?;
    let encoder = BulkEncoder::new(&def, Span::Part, NonFinite::Null);
    let target = format!("[dap_replica].[{staging}]");
    let mut rows = 0u64;
    for f in files {
        let reader =
            std::io::BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(std::fs::File::open(f)?));
        let mut lines = reader.lines();
        let Some(header) = lines.next().transpose()? else { continue };
        let decoder = TsvDecoder::new(&header, &def)?;
        let mut request = client.bulk_insert(&target).await?;
        for (n, line) in lines.enumerate() {
            let record = decoder.decode(&line?, n as u64 + 2)?;
            let row = encoder.row(record).map_err(|e| format!("{e:?}"))?;
            request.send(row).await?;
            rows += 1;
        }
        request.finalize().await?;
    }
    println!("{rows} {}", server.shared.bulk_bytes_received.load(Ordering::Relaxed));
    Ok(())
}

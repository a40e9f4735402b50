//! The TDS test server of the test suite as a process, for the SQL Server benchmark: `dap`
//! loads into it over TCP. With `--discard-bulk` it writes bulk-load packets to /dev/null
//! instead of decoding them, and counts their bytes.
//!
//!     cargo run --release --example tds_server -- PORT STATS_FILE [--discard-bulk]
//!
//! It writes `bulk_bytes ROWS_DECODED` to STATS_FILE every 100 ms, and runs until killed.

use tds_test_server as tds;

use std::sync::atomic::Ordering;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tds_server PORT STATS_FILE [--discard-bulk]";
    let port: u16 = args.first().ok_or(usage)?.parse()?;
    let stats = args.get(1).ok_or(usage)?.clone();
    let options = tds::ServerOptions {
        database: "bench".into(),
        discard_bulk: args.iter().any(|a| a == "--discard-bulk"),
        ..tds::ServerOptions::default()
    };
    let server = tds::TdsServer::start_on(port, options).await?;
    loop {
        let s = &server.shared;
        let line = format!(
            "{} {}\n",
            s.bulk_bytes_received.load(Ordering::Relaxed),
            s.bulk_rows_received.load(Ordering::Relaxed)
        );
        std::fs::write(&stats, line)?;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

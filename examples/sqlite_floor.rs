//! The floor for loading into SQLite (benchmark scenario 5): gunzip, split lines and fields,
//! one prepared INSERT of every field as text, all in one transaction. No types, no escapes, no
//! checks: what any loader must at least do, so `initdb` can be compared with it.
//!
//!     cargo run --release --example sqlite_floor -- OUT.db FILE.tsv.gz...

use std::io::BufRead;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let db = args.next().ok_or("usage: sqlite_floor OUT.db FILE.tsv.gz...")?;
    let files: Vec<String> = args.collect();
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    let tx = conn.unchecked_transaction()?;
    let mut rows = 0u64;
    let mut insert: Option<rusqlite::Statement> = None;
    for f in &files {
        let reader =
            std::io::BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(std::fs::File::open(f)?));
        let mut lines = reader.lines();
        let Some(header) = lines.next().transpose()? else { continue };
        let columns = header.split('\t').count();
        if insert.is_none() {
            let cols: Vec<String> = (0..columns).map(|i| format!("c{i}")).collect();
            conn.execute_batch(&format!("CREATE TABLE floor ({}, PRIMARY KEY (c{}))", cols.join(", "), 1))?;
            let marks = vec!["?"; columns].join(", ");
            insert = Some(conn.prepare(&format!("INSERT OR REPLACE INTO floor VALUES ({marks})"))?);
        }
        let stmt = insert.as_mut().expect("prepared");
        for line in lines {
            let line = line?;
            stmt.execute(rusqlite::params_from_iter(line.split('\t')))?;
            rows += 1;
        }
    }
    drop(insert);
    tx.commit()?;
    println!("{rows}");
    Ok(())
}

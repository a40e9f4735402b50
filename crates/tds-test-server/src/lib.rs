//! A SQL Server stand-in for the tests: a TDS server (tokio) that the real `tiberius` client in
//! `dap` logs into and talks to. It answers PRELOGIN (no encryption) and LOGIN7 (checking the
//! user, password and database), runs SQL batches and `sp_executesql` RPCs against [`engine`],
//! and decodes BULK LOAD rows into stored rows as they stream in. It logs every statement it
//! receives (for the golden T-SQL tests), keeps the decoded bulk rows when asked (to check what
//! arrived bit for bit), and injects faults: an error token in the middle of a bulk load, or in
//! answer to a statement. A connection with an open transaction holds the database until it
//! commits, rolls back or disconnects (which rolls back), so transactions are serializable.

pub mod engine;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::OwnedMutexGuard;

use engine::{Cell, Db, Outcome, Params, Session, SqlError, SqlType, TableKey};
use wire::{BulkDecoder, BulkToken, Tokens};

/// Who may log in, and to what.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub user: String,
    pub password: String,
    pub database: String,
    pub collation: String,
    /// Keep a copy of every decoded bulk row (see [`TdsServer::bulk_loads`]).
    pub keep_bulk_rows: bool,
    /// Write bulk-load packets to /dev/null instead of decoding them (the benchmark's floor and
    /// send-rate runs): the tables stay empty, and only [`Shared::bulk_bytes_received`] counts.
    pub discard_bulk: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            user: "sa".into(),
            password: "Test-Passw0rd".into(),
            database: "dap".into(),
            collation: "Latin1_General_100_CI_AS_SC_UTF8".into(),
            keep_bulk_rows: false,
            discard_bulk: false,
        }
    }
}

/// Faults the next requests meet.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A bulk load fails with an error token after this many rows (once).
    pub bulk_error_after_rows: Option<u64>,
    /// A batch or RPC whose text contains this fails (once).
    pub statement_error_on: Option<String>,
}

/// One bulk load as the server decoded it.
#[derive(Debug, Clone)]
pub struct BulkLoad {
    pub table: TableKey,
    pub columns: Vec<(String, SqlType)>,
    pub rows: Vec<Vec<Cell>>,
}

pub struct Shared {
    pub options: ServerOptions,
    pub db: Arc<tokio::sync::Mutex<Db>>,
    /// Every statement received, in order (batch text, or the statement of an RPC).
    pub log: Mutex<Vec<String>>,
    pub bulk_loads: Mutex<Vec<BulkLoad>>,
    pub faults: Mutex<Faults>,
    /// Bulk rows received, over all loads.
    pub bulk_rows_received: std::sync::atomic::AtomicU64,
    /// Bytes of bulk-load packets received (headers included), over all loads.
    pub bulk_bytes_received: std::sync::atomic::AtomicU64,
    /// `sp_getapplock` locks held with `@LockOwner = 'Session'`: resource → connection number.
    /// A connection's locks go with it, as on SQL Server.
    pub applocks: Mutex<HashMap<String, u64>>,
    /// The number the next connection gets.
    pub next_connection: std::sync::atomic::AtomicU64,
}

pub struct TdsServer {
    pub port: u16,
    pub shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TdsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TdsServer {
    pub async fn start(options: ServerOptions) -> TdsServer {
        TdsServer::start_on(0, options).await.expect("the test server listens")
    }

    /// A server on a port of 127.0.0.1 (0 picks a free one).
    pub async fn start_on(port: u16, options: ServerOptions) -> std::io::Result<TdsServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            db: Arc::new(tokio::sync::Mutex::new(Db::new(&options.database, &options.collation))),
            options,
            log: Mutex::new(Vec::new()),
            bulk_loads: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
            bulk_rows_received: Default::default(),
            bulk_bytes_received: Default::default(),
            applocks: Mutex::new(HashMap::new()),
            next_connection: Default::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, s).await;
                });
            }
        });
        Ok(TdsServer { port, shared, task })
    }

    /// The connection string of this server for `dap` (no TLS: the server speaks plain TDS).
    pub fn url(&self) -> String {
        let o = &self.shared.options;
        format!("mssql://{}:{}@127.0.0.1:{}/{}?ssl=disable", o.user, o.password, self.port, o.database)
    }

    pub fn statements(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
        self.shared.bulk_loads.lock().unwrap().clear();
    }

    pub fn bulk_loads(&self) -> Vec<BulkLoad> {
        self.shared.bulk_loads.lock().unwrap().clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap() = faults;
    }

    pub async fn db(&self) -> tokio::sync::MutexGuard<'_, Db> {
        self.shared.db.lock().await
    }

    /// Serves one connection over any stream (an in-memory pipe, in the benchmark's floor).
    pub fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(&self, stream: S) {
        let s = self.shared.clone();
        tokio::spawn(async move {
            let _ = serve(stream, s).await;
        });
    }
}

/// A connection: its session, and the database while it holds a transaction open.
struct Connection {
    id: u64,
    shared: Arc<Shared>,
    session: Session,
    held: Option<OwnedMutexGuard<Db>>,
    descriptor: u64,
}

impl Connection {
    async fn db(&mut self) -> OwnedMutexGuard<Db> {
        match self.held.take() {
            Some(g) => g,
            None => self.shared.db.clone().lock_owned().await,
        }
    }

    /// Keeps the database while the session's transaction is open.
    fn release(&mut self, db: OwnedMutexGuard<Db>) {
        if self.session.in_transaction {
            self.held = Some(db);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.applocks.lock().unwrap().retain(|_, owner| *owner != self.id);
        // A connection that goes away with its transaction open rolls it back.
        if let Some(mut db) = self.held.take() {
            db.end_transaction(&mut self.session, false);
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, shared: Arc<Shared>) -> std::io::Result<()> {
    // PRELOGIN, then LOGIN7.
    let first = wire::read_packet(&mut stream).await?;
    if first.kind != wire::PRELOGIN {
        return Ok(());
    }
    wire::read_rest(&mut stream, first).await?;
    wire::write_message(&mut stream, wire::REPLY, &wire::prelogin_response()).await?;
    let login = wire::read_packet(&mut stream).await?;
    if login.kind != wire::LOGIN7 {
        return Ok(());
    }
    let login = wire::parse_login(&wire::read_rest(&mut stream, login).await?);
    let o = &shared.options;
    let mut t = Tokens::default();
    if login.user != o.user || login.password != o.password {
        t.error(18456, &format!("Login failed for user '{}'.", login.user));
        t.done(0xFD, false, true, None);
        return wire::write_message(&mut stream, wire::REPLY, &t.0).await;
    }
    if !login.database.is_empty() && !login.database.eq_ignore_ascii_case(&o.database) {
        t.error(
            4060,
            &format!("Cannot open database \"{}\" requested by the login. The login failed.", login.database),
        );
        t.done(0xFD, false, true, None);
        return wire::write_message(&mut stream, wire::REPLY, &t.0).await;
    }
    t.env_change(1, &o.database, "master");
    t.collation();
    t.login_ack();
    t.done(0xFD, false, false, None);
    wire::write_message(&mut stream, wire::REPLY, &t.0).await?;

    let id = shared.next_connection.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut conn = Connection { id, shared: shared.clone(), session: Session::default(), held: None, descriptor: 0 };
    loop {
        let packet = match wire::read_packet(&mut stream).await {
            Ok(p) => p,
            Err(_) => return Ok(()), // disconnected: Drop rolls back an open transaction
        };
        match packet.kind {
            wire::BATCH => {
                let payload = wire::read_rest(&mut stream, packet).await?;
                let text = wire::batch_text(&payload);
                let reply = run(&mut conn, &text, &Params::new()).await;
                wire::write_message(&mut stream, wire::REPLY, &reply).await?;
            }
            wire::RPC => {
                let payload = wire::read_rest(&mut stream, packet).await?;
                let reply = match wire::parse_rpc(&payload) {
                    Ok((statement, params)) => {
                        let params: Params = params.into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
                        let mut reply = run(&mut conn, &statement, &params).await;
                        // An RPC ends with DONEPROC.
                        if let Some(at) = last_done(&reply) {
                            reply[at] = 0xFE;
                        }
                        reply
                    }
                    Err(e) => error_reply(&SqlError { number: 8009, message: e.to_string() }),
                };
                wire::write_message(&mut stream, wire::REPLY, &reply).await?;
            }
            wire::BULK_LOAD if shared.options.discard_bulk => {
                let reply = discard_bulk(&mut conn, &mut stream, packet).await?;
                wire::write_message(&mut stream, wire::REPLY, &reply).await?;
            }
            wire::BULK_LOAD => {
                let reply = bulk(&mut conn, &mut stream, packet).await?;
                wire::write_message(&mut stream, wire::REPLY, &reply).await?;
            }
            wire::ATTENTION => {
                let mut t = Tokens::default();
                t.0.push(0xFD);
                t.0.extend_from_slice(&0x0020u16.to_le_bytes()); // DONE_ATTN
                t.0.extend_from_slice(&[0; 10]);
                wire::write_message(&mut stream, wire::REPLY, &t.0).await?;
            }
            _ => {
                wire::read_rest(&mut stream, packet).await?;
                let reply = error_reply(&SqlError { number: 8009, message: "this request type is not served".into() });
                wire::write_message(&mut stream, wire::REPLY, &reply).await?;
            }
        }
    }
}

/// The offset of the last DONE token of a reply (to mark it as the end of a procedure).
/// Statements about the session rather than data, answered here: `SET LOCK_TIMEOUT` (accepted;
/// the engine never waits for a lock) and `sp_getapplock` with a session owner and no wait, the
/// way the adapter takes a table's lock (`SELECT @result`: 0 granted, -1 held elsewhere).
fn session_statement(conn: &mut Connection, text: &str, params: &Params) -> Option<Vec<u8>> {
    let mut t = Tokens::default();
    if text.trim_start().to_ascii_uppercase().starts_with("SET LOCK_TIMEOUT") {
        t.done(0xFD, false, false, None);
        return Some(t.0);
    }
    if !text.contains("sp_getapplock") {
        return None;
    }
    let resource = match params.get("@p1") {
        Some(Cell::Text(r)) => r.clone(),
        other => panic!("the test server takes sp_getapplock with the resource as @P1, got {other:?}"),
    };
    let granted = {
        let mut locks = conn.shared.applocks.lock().unwrap();
        let owner = *locks.entry(resource).or_insert(conn.id);
        owner == conn.id
    };
    let meta = engine::Meta { nullable: true, identity: false };
    t.col_metadata(&[(String::new(), SqlType::Int, meta)]);
    t.row(&[SqlType::Int], &[Cell::Int(if granted { 0 } else { -1 })]);
    t.done(0xFD, false, false, Some(1));
    Some(t.0)
}

fn last_done(reply: &[u8]) -> Option<usize> {
    (reply.len() >= 13).then(|| reply.len() - 13).filter(|&at| reply[at] == 0xFD)
}

fn error_reply(e: &SqlError) -> Vec<u8> {
    let mut t = Tokens::default();
    t.error(e.number, &e.message);
    t.done(0xFD, false, true, None);
    t.0
}

/// Runs a batch (or an RPC's statement) and writes its reply tokens.
async fn run(conn: &mut Connection, text: &str, params: &Params) -> Vec<u8> {
    conn.shared.log.lock().unwrap().push(text.to_string());
    if let Some(reply) = session_statement(conn, text, params) {
        return reply;
    }
    let injected = {
        let mut f = conn.shared.faults.lock().unwrap();
        match &f.statement_error_on {
            Some(s) if text.contains(s.as_str()) => {
                f.statement_error_on = None;
                true
            }
            _ => false,
        }
    };
    let mut db = conn.db().await;
    let (outcomes, error) = if injected {
        let rolled_back = conn.session.in_transaction;
        if rolled_back {
            db.end_transaction(&mut conn.session, false);
        }
        (
            if rolled_back { vec![Outcome::Rollback] } else { Vec::new() },
            Some(SqlError { number: 50000, message: "injected fault: the test server fails this statement".into() }),
        )
    } else {
        db.execute_batch(&mut conn.session, text, params)
    };
    conn.release(db);
    let mut t = Tokens::default();
    let n = outcomes.len();
    for (i, o) in outcomes.into_iter().enumerate() {
        let more = i + 1 < n || error.is_some();
        match o {
            Outcome::Rows(rs) => {
                t.col_metadata(&rs.columns);
                let types: Vec<SqlType> = rs.columns.iter().map(|c| c.1.clone()).collect();
                for row in &rs.rows {
                    t.row(&types, row);
                }
                t.done(0xFD, more, false, Some(rs.rows.len() as u64));
            }
            Outcome::Count(c) => t.done(0xFD, more, false, Some(c)),
            Outcome::Done => t.done(0xFD, more, false, None),
            Outcome::Begin => {
                conn.descriptor += 1;
                t.transaction(8, conn.descriptor);
                t.done(0xFD, more, false, None);
            }
            Outcome::Commit => {
                t.transaction(9, conn.descriptor);
                t.done(0xFD, more, false, None);
            }
            Outcome::Rollback => {
                t.transaction(10, conn.descriptor);
                t.done(0xFD, more, false, None);
            }
        }
    }
    if let Some(e) = error {
        t.error(e.number, &e.message);
        t.done(0xFD, false, true, None);
    }
    if t.0.is_empty() {
        t.done(0xFD, false, false, None);
    }
    t.0
}

/// Receives a bulk load and writes its packets, headers included, to /dev/null.
async fn discard_bulk<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection,
    stream: &mut S,
    first: wire::Packet,
) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    conn.session.bulk_target = None;
    let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let mut packet = first;
    loop {
        null.write_all(&packet.header)?;
        null.write_all(&packet.payload)?;
        conn.shared
            .bulk_bytes_received
            .fetch_add(packet.payload.len() as u64 + 8, std::sync::atomic::Ordering::Relaxed);
        if packet.last {
            break;
        }
        packet = wire::read_packet(stream).await?;
    }
    let mut t = Tokens::default();
    t.done(0xFD, false, false, Some(0));
    Ok(t.0)
}

/// Receives a bulk load into the table the preceding `INSERT BULK` named, decoding and storing
/// its rows as packets arrive. An error (a constraint, a conversion, an injected fault) drains
/// the rest of the load and rolls it back.
async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection,
    stream: &mut S,
    first: wire::Packet,
) -> std::io::Result<Vec<u8>> {
    let Some(key) = conn.session.bulk_target.take() else {
        wire::read_rest(stream, first).await?;
        return Ok(error_reply(&SqlError { number: 4804, message: "a bulk load without INSERT BULK".into() }));
    };
    let fail_after = conn.shared.faults.lock().unwrap().bulk_error_after_rows.take();
    let keep = conn.shared.options.keep_bulk_rows;
    let mut db = conn.db().await;
    let mark = db.statement_mark(&conn.session);
    let mut decoder = BulkDecoder::default();
    let mut record = BulkLoad { table: key.clone(), columns: Vec::new(), rows: Vec::new() };
    let mut targets = Vec::new();
    let mut error: Option<SqlError> = None;
    let mut rows = 0u64;
    let mut packet = first;
    loop {
        if error.is_none() {
            decoder.push(&packet.payload);
            loop {
                match decoder.next_token() {
                    Ok(None) | Ok(Some(BulkToken::Done)) => break,
                    Ok(Some(BulkToken::Columns(c))) => {
                        let names: Vec<String> = c.iter().map(|(n, _)| n.clone()).collect();
                        match db.bulk_targets(&key, &names) {
                            Ok(t) => targets = t,
                            Err(e) => {
                                error = Some(e);
                                break;
                            }
                        }
                        record.columns = c;
                    }
                    Ok(Some(BulkToken::Row(row))) => {
                        if fail_after == Some(rows) {
                            error = Some(SqlError {
                                number: 4815,
                                message: "Received an invalid column length from the bcp client (injected fault)."
                                    .into(),
                            });
                            break;
                        }
                        rows += 1;
                        if keep {
                            record.rows.push(row.clone());
                        }
                        if let Err(e) = db.bulk_row(&mut conn.session, &key, &targets, row) {
                            error = Some(e);
                            break;
                        }
                    }
                    Err(e) => {
                        error = Some(SqlError { number: 4815, message: format!("a malformed bulk load: {e}") });
                        break;
                    }
                }
            }
        }
        if packet.last {
            break;
        }
        packet = wire::read_packet(stream).await?;
    }
    conn.shared.bulk_rows_received.fetch_add(rows, std::sync::atomic::Ordering::Relaxed);
    let rolled_back = db.finish_statement(&mut conn.session, mark, error.is_none());
    conn.release(db);
    if keep {
        conn.shared.bulk_loads.lock().unwrap().push(record);
    }
    let mut t = Tokens::default();
    match error {
        None => t.done(0xFD, false, false, Some(rows)),
        Some(e) => {
            if rolled_back {
                t.transaction(10, conn.descriptor);
            }
            t.error(e.number, &e.message);
            t.done(0xFD, false, true, None);
        }
    }
    Ok(t.0)
}

//! Ctrl-C for commands that work on a thread of their own (query, export, pack, unpack): `main`
//! raises the flag; their loops see it at the next row, chunk or step and stop with
//! [`Interrupted`], so that their temporary output is removed as they unwind; a SQLite statement
//! still running is interrupted through the handles registered here. `main` waits a moment for
//! that, then exits 130.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static RAISED: AtomicBool = AtomicBool::new(false);
static HANDLES: Mutex<Vec<rusqlite::InterruptHandle>> = Mutex::new(Vec::new());

/// The command was interrupted (Ctrl-C); what it had written was removed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("interrupted (Ctrl-C); the unfinished output was removed")]
pub struct Interrupted;

/// Resolves on SIGTERM (never on systems without it): a service manager stopping us.
pub async fn terminated() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}

/// Called by `main` on SIGINT: every loop stops, every registered statement is interrupted.
pub fn raise() {
    RAISED.store(true, Ordering::SeqCst);
    for handle in HANDLES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        handle.interrupt();
    }
}

pub fn is_raised() -> bool {
    RAISED.load(Ordering::Relaxed)
}

/// `Err(Interrupted)` once Ctrl-C was pressed.
pub fn check() -> Result<(), Interrupted> {
    if is_raised() { Err(Interrupted) } else { Ok(()) }
}

/// Lets Ctrl-C interrupt the statements of `conn` (a long query, a backup step).
pub fn watch(conn: &rusqlite::Connection) {
    let mut handles = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    handles.push(conn.get_interrupt_handle());
    if is_raised() {
        conn.get_interrupt_handle().interrupt();
    }
}

/// Whether `e` is SQLite's "interrupted" after Ctrl-C.
pub fn is_sqlite_interrupt(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted)
}

//! A real application holding vssd freezes: SQLite in WAL mode, writing all the time.
//!
//! It writes records continuously, one transaction each, numbered from 1 (or on from the last
//! record already in the database), and prints `ack N` on stdout after each commit. At FREEZE
//! it checkpoints the WAL into the main database (`PRAGMA wal_checkpoint(TRUNCATE)`: the WAL
//! is then empty), takes SQLite's write lock (`BEGIN IMMEDIATE`, kept open: no other process
//! can write either), answers held, and prints `held FREEZE_ID last_ack=N`. At the end of the
//! hold (THAW, `max_hold_ms`, vssd gone) it ends the transaction, prints
//! `thaw FREEZE_ID RELEASE`, and writes on. A snapshot taken while it holds has every acked
//! record in the main database file and an empty WAL.
//!
//! ```sh
//! cargo run -p appvss --example sqlite_writer -- /srv/db/orders.db [--socket PATH] [--interval-ms 2]
//! # a static binary for a guest initramfs:
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --example sqlite_writer -p appvss
//! ```
//!
//! Exit codes: 0 stopped after `--count` records, 1 a database error, 2 bad usage.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appvss::blocking::Client;
use appvss::{Event, Options};
use clap::Parser;
use rusqlite::Connection;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// SQLite in WAL mode writing continuously, holding vssd freezes (checkpoint + write lock).
#[derive(Parser, Debug)]
struct Args {
    /// The database file (created if missing).
    db: PathBuf,
    /// The name in vssd's reports.
    #[arg(long, default_value = "sqlite-writer")]
    name: String,
    /// vssd's app socket.
    #[arg(long, env = "APPVSS_SOCKET", default_value = appvss::proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Pause between two records.
    #[arg(long, default_value_t = 2)]
    interval_ms: u64,
    /// Bytes of payload per record.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Stop after this many records (default: never).
    #[arg(long)]
    count: Option<u64>,
}

struct Db {
    conn: Mutex<Connection>,
    /// Set while a FREEZE waits for the connection: the writer steps aside.
    freeze_waiting: AtomicBool,
    last_ack: AtomicU64,
}

fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if mode != "wal" {
        return Err(rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}, not wal")));
    }
    // FULL: a commit is on disk when `ack` is printed.
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE IF NOT EXISTS records (n INTEGER PRIMARY KEY, written_ms INTEGER NOT NULL, payload BLOB NOT NULL);",
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| "appvss=info".parse().expect("a valid filter"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(filter)
        .init();
    let conn = match open(&args.db) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sqlite_writer: cannot open {}: {e}", args.db.display());
            return std::process::ExitCode::from(1);
        }
    };
    let first: u64 = conn.query_row("SELECT COALESCE(MAX(n), 0) FROM records", [], |r| r.get(0)).unwrap_or(0);
    let db = Arc::new(Db {
        conn: Mutex::new(conn),
        freeze_waiting: AtomicBool::new(false),
        last_ack: AtomicU64::new(first),
    });

    let options = Options::new(args.name.clone()).socket(&args.socket);
    let client = match Client::connect(options) {
        Ok(c) => c,
        Err(e) => {
            // `{:#}` prints the error with its sources, each once.
            eprintln!("sqlite_writer: {:#}", anyhow::Error::from(e));
            return std::process::ExitCode::from(2);
        }
    };
    let d = db.clone();
    std::thread::spawn(move || serve_vssd(client, &d));

    match write_forever(&db, &args, first) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sqlite_writer: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn write_forever(db: &Db, args: &Args, first: u64) -> rusqlite::Result<()> {
    let payload: Vec<u8> = (0..args.payload_bytes).map(|i| (i * 31 % 251) as u8).collect();
    let mut n = first;
    let stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|c| n >= first + c) {
            return Ok(());
        }
        while db.freeze_waiting.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let mut conn = db.conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn.transaction()?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            tx.execute(
                "INSERT INTO records (n, written_ms, payload) VALUES (?1, ?2, ?3)",
                rusqlite::params![(n + 1) as i64, now_ms, payload],
            )?;
            tx.commit()?;
            n += 1;
            db.last_ack.store(n, Ordering::Release);
            // Printed under the lock: every `ack` before a `held` line was committed first.
            let mut out = stdout.lock();
            let _ = writeln!(out, "ack {n}");
            let _ = out.flush();
        }
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
}

/// Flush for a freeze: move the WAL into the database and empty it, then take the write lock.
fn checkpoint_and_lock(conn: &Connection) -> rusqlite::Result<()> {
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    if busy != 0 {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "checkpoint blocked by another connection ({done} of {log} frames copied)"
        )));
    }
    conn.execute_batch("BEGIN IMMEDIATE")
}

fn serve_vssd(mut client: Client, db: &Db) {
    loop {
        let ev = match client.next_event() {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("sqlite_writer: appvss client stopped: {:#}", anyhow::Error::from(e));
                return;
            }
        };
        match ev {
            Event::Connected { app_id, .. } => eprintln!("sqlite_writer: registered with vssd (app {app_id})"),
            Event::Disconnected(e) => eprintln!("sqlite_writer: vssd went away: {:#}", anyhow::Error::from(e)),
            Event::Prepare(req) => req.ready(),
            Event::Freeze(req) => {
                let freeze_id = req.freeze_id();
                db.freeze_waiting.store(true, Ordering::Release);
                let conn = db.conn.lock().unwrap_or_else(|p| p.into_inner());
                db.freeze_waiting.store(false, Ordering::Release);
                // The writer is now between two transactions, and stays there while `conn`
                // is locked.
                if let Err(e) = checkpoint_and_lock(&conn) {
                    eprintln!("sqlite_writer: freeze {freeze_id}: {e}");
                    req.failed(format!("SQLite checkpoint failed: {e}"));
                    continue;
                }
                let hold = req.held();
                {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "held {freeze_id} last_ack={}", db.last_ack.load(Ordering::Acquire));
                    let _ = out.flush();
                }
                let why = hold.wait();
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    eprintln!("sqlite_writer: ending the lock transaction: {e}");
                }
                drop(conn);
                drop(hold);
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "thaw {freeze_id} {why}");
                let _ = out.flush();
            }
            Event::Thaw(_) => {}
            _ => {}
        }
    }
}

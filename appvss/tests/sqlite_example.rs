//! `examples/sqlite_writer.rs` against a scripted vssd: while it holds, the WAL is empty,
//! every acked record is in the main database, and nobody can write.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{Server, WAIT};

/// Builds the example (cargo builds examples for `cargo test`, but not for `--test NAME`).
fn example() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "appvss", "--example", "sqlite_writer"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "cannot build the sqlite_writer example");
    PathBuf::from(env!("CARGO_BIN_EXE_appvss")).parent().unwrap().join("examples/sqlite_writer")
}

/// Lines of the writer's stdout, read on a thread.
fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines until one starts with `prefix`; returns it and the highest `ack` seen before.
fn until(rx: &mpsc::Receiver<String>, prefix: &str, last_ack: &mut u64) -> String {
    loop {
        let l = rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no {prefix:?} line from sqlite_writer"));
        if let Some(n) = l.strip_prefix("ack ") {
            *last_ack = n.parse().unwrap();
        }
        if l.starts_with(prefix) {
            return l;
        }
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sqlite_writer_checkpoints_and_holds_the_write_lock_until_thaw() {
    let exe = example();
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orders.db");
    let mut child = Kill(
        Command::new(exe)
            .arg(&db)
            .args(["--interval-ms", "1", "--socket"])
            .arg(server.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = lines(child.0.stdout.take().unwrap());
    let (mut conn, hello) = server.register(1);
    assert_eq!(hello["name"], "sqlite-writer");
    let mut acked = 0;
    until(&rx, "ack 50", &mut acked);
    conn.prepare_and_freeze(7, 60000);
    let held = until(&rx, "held 7", &mut acked);
    assert_eq!(held, format!("held 7 last_ack={acked}"));

    // While held: the WAL is empty, every acked record is in the database, nothing more.
    let wal = std::fs::metadata(dir.path().join("orders.db-wal")).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal, 0, "the WAL is not empty while held");
    let reader = rusqlite::Connection::open(&db).unwrap();
    reader.busy_timeout(Duration::from_millis(0)).unwrap();
    let (count, max): (u64, u64) =
        reader.query_row("SELECT COUNT(*), MAX(n) FROM records", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((count, max), (acked, acked));
    // And the write lock is held: another writer is refused.
    let busy = reader.execute_batch("BEGIN IMMEDIATE");
    assert!(busy.is_err(), "another connection could take the write lock while held");
    std::thread::sleep(Duration::from_millis(100));
    assert!(rx.try_recv().is_err(), "the writer wrote while held");
    drop(reader);

    conn.thaw(3, 7, "completed");
    conn.expect("thawed");
    assert_eq!(until(&rx, "thaw 7", &mut acked), "thaw 7 completed");
    let after = acked;
    until(&rx, &format!("ack {}", after + 20), &mut acked);
}

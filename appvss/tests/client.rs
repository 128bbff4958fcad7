//! The Rust clients (async and blocking) against a scripted vssd: each test's main thread plays
//! vssd line by line; the app runs on a thread of its own.

mod support;

use std::future::Future;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use appvss::client::{Client, Error, Event, Options, Release};
use appvss::proto::ErrorCode;
use support::{json, Server, WAIT};

/// Runs an async app on its own thread and runtime.
fn app<F, Fut, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    thread::spawn(move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f()))
}

fn opts(server: &Server, name: &str) -> Options {
    Options::new(name).socket(server.path()).backoff(Duration::from_millis(20), Duration::from_millis(100))
}

async fn next(c: &mut Client) -> Event {
    tokio::time::timeout(WAIT, c.next_event()).await.expect("no event in time").expect("client stopped")
}

#[test]
fn a_freeze_goes_prepare_ready_freeze_held_thaw_thawed() {
    let server = Server::new();
    let o = opts(&server, "orders-db");
    let (tx, rx) = mpsc::channel();
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        assert!(matches!(next(&mut c).await, Event::Connected { app_id: 4, version: 1 }));
        let Event::Prepare(p) = next(&mut c).await else { panic!("expected prepare") };
        assert_eq!(p.freeze_id(), 17);
        assert_eq!(p.deadline_ms(), 5000);
        p.ready();
        let Event::Freeze(f) = next(&mut c).await else { panic!("expected freeze") };
        assert_eq!((f.freeze_id(), f.max_hold_ms()), (17, 60000));
        let hold = f.held();
        tx.send("holding").unwrap();
        let why = hold.released().await;
        tx.send("released").unwrap();
        drop(hold);
        let Event::Thaw(t) = next(&mut c).await else { panic!("expected thaw") };
        assert_eq!((t.freeze_id, t.release), (17, Release::Completed));
        c.close().await;
        why
    });
    let (mut conn, hello) = server.register(4);
    assert_eq!(hello, json!({"type": "hello", "id": 1, "name": "orders-db", "min_version": 1, "max_version": 1}));
    conn.prepare_and_freeze(17, 60000);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "holding");
    // The hold lasts until THAW.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "released before THAW");
    conn.thaw(3, 17, "completed");
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), "released");
    assert_eq!(conn.expect("thawed")["re"], 3);
    assert_eq!(a.join().unwrap(), Release::Completed);
}

#[test]
fn requests_dropped_unanswered_veto_and_fail_with_a_reason() {
    let server = Server::new();
    let o = opts(&server, "careless");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        next(&mut c).await; // connected
        let ev = next(&mut c).await;
        drop(ev); // the PREPARE, unanswered
        let ev = next(&mut c).await;
        drop(ev); // the FREEZE, unanswered
        let Event::Thaw(t) = next(&mut c).await else { panic!("expected thaw") };
        t
    });
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 5, 5000);
    let v = conn.expect("veto");
    assert_eq!(v["re"], 1);
    assert!(v["reason"].as_str().unwrap().contains("without answering"), "{v}");
    conn.freeze(2, 5, 5000, 60000);
    let f = conn.expect("failed");
    assert_eq!(f["re"], 2);
    assert!(f["reason"].as_str().unwrap().contains("without answering"), "{f}");
    conn.thaw(3, 5, "aborted");
    assert_eq!(conn.expect("thawed")["re"], 3);
    assert_eq!(a.join().unwrap().release, Release::Aborted);
}

#[test]
fn a_veto_carries_its_reason_cut_to_4_kib() {
    let server = Server::new();
    let o = opts(&server, "migrating");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        next(&mut c).await;
        let Event::Prepare(p) = next(&mut c).await else { panic!() };
        p.veto("x".repeat(10_000));
        let Event::Thaw(_) = next(&mut c).await else { panic!() };
    });
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 9, 5000);
    let v = conn.expect("veto");
    assert_eq!(v["reason"].as_str().unwrap().len(), appvss::client::MAX_REASON_BYTES);
    conn.thaw(2, 9, "aborted");
    conn.expect("thawed");
    a.join().unwrap();
}

#[test]
fn the_hold_ends_when_vssd_disconnects_and_the_client_registers_again() {
    let server = Server::new();
    let o = opts(&server, "reconnecting");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        assert!(matches!(next(&mut c).await, Event::Connected { app_id: 1, .. }));
        next(&mut c).await.into_prepare().ready();
        let hold = next(&mut c).await.into_freeze().held();
        let why = tokio::time::timeout(WAIT, hold.released()).await.expect("hold did not end");
        assert_eq!(why, Release::Disconnected);
        let Event::Thaw(t) = next(&mut c).await else { panic!("expected thaw") };
        assert_eq!((t.freeze_id, t.release), (3, Release::Disconnected));
        assert!(matches!(next(&mut c).await, Event::Disconnected(Error::Closed)));
        assert!(matches!(next(&mut c).await, Event::Connected { app_id: 2, .. }));
    });
    let (mut conn, _) = server.register(1);
    conn.prepare_and_freeze(3, 60000);
    drop(conn); // vssd crashes
    let (_conn2, hello) = server.register(2);
    assert_eq!(hello["type"], "hello");
    a.join().unwrap();
}

#[test]
fn the_hold_ends_at_max_hold_and_the_late_thaw_makes_no_second_event() {
    let server = Server::new();
    let o = opts(&server, "patient");
    let (tx, rx) = mpsc::channel();
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        next(&mut c).await;
        next(&mut c).await.into_prepare().ready();
        let hold = next(&mut c).await.into_freeze().held();
        let t0 = Instant::now();
        let why = hold.released().await;
        let waited = t0.elapsed();
        let Event::Thaw(t) = next(&mut c).await else { panic!("expected thaw") };
        assert_eq!(t.release, Release::MaxHoldElapsed);
        drop(hold);
        tx.send(()).unwrap();
        // vssd's own THAW comes later: acknowledged, but no second event.
        let more = tokio::time::timeout(Duration::from_millis(300), c.next_event()).await;
        assert!(more.is_err(), "a second event: {more:?}");
        (why, waited)
    });
    let (mut conn, _) = server.register(1);
    conn.prepare_and_freeze(8, 300);
    rx.recv_timeout(WAIT).unwrap();
    conn.thaw(3, 8, "timeout");
    assert_eq!(conn.expect("thawed")["re"], 3);
    let (why, waited) = a.join().unwrap();
    assert_eq!(why, Release::MaxHoldElapsed);
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
}

#[test]
fn the_client_waits_for_vssd_to_appear() {
    let mut server = Server::unbound();
    let o = opts(&server, "early-bird");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        matches!(next(&mut c).await, Event::Connected { .. })
    });
    thread::sleep(Duration::from_millis(300));
    server.bind();
    let (_conn, _) = server.register(1);
    assert!(a.join().unwrap());
}

#[test]
fn bad_lines_from_vssd_drop_the_connection_with_a_clear_error_and_it_reconnects() {
    let server = Server::new();
    let o = opts(&server, "strict");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        let mut errors = Vec::new();
        for _ in 0..3 {
            assert!(matches!(next(&mut c).await, Event::Connected { .. }));
            match next(&mut c).await {
                Event::Disconnected(e) => errors.push(e),
                other => panic!("expected disconnected, got {other:?}"),
            }
        }
        assert!(matches!(next(&mut c).await, Event::Connected { .. }));
        errors
    });
    let (mut conn, _) = server.register(1);
    conn.send_raw(b"this is not json\n");
    let (mut conn, _) = server.register(2);
    conn.send(json!({"type": "prepare", "id": 1, "freeze_id": 1, "deadline_ms": 5, "surprise": true}));
    let (mut conn, _) = server.register(3);
    let mut big = vec![b' '; 70_000];
    big.push(b'\n');
    conn.send_raw(&big);
    let (_conn, _) = server.register(4);
    let errors = a.join().unwrap();
    assert!(matches!(&errors[0], Error::BadMessage { excerpt, .. } if excerpt.contains("not json")), "{:?}", errors[0]);
    assert!(errors[1].to_string().contains("surprise"), "{}", errors[1]);
    assert!(matches!(errors[2], Error::TooLarge), "{:?}", errors[2]);
}

#[test]
fn no_common_version_stops_the_client_for_good() {
    let server = Server::new();
    let o = opts(&server, "old");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        let first = c.next_event().await;
        let second = c.next_event().await;
        (first.err(), second.err())
    });
    let mut conn = server.accept();
    conn.expect("hello");
    conn.send(json!({"type": "error", "code": "version-unsupported", "message": "vssd speaks 2..2", "fatal": true}));
    let (first, second) = a.join().unwrap();
    let first = first.expect("an error");
    assert!(matches!(first, Error::Refused { code: ErrorCode::VersionUnsupported, .. }), "{first:?}");
    assert!(first.to_string().contains("version-unsupported") && first.to_string().contains("vssd speaks 2..2"));
    assert!(matches!(second, Some(Error::Stopped)));
    assert!(server.try_accept(Duration::from_millis(300)).is_none(), "it tried again");
}

#[test]
fn without_reconnect_a_missing_vssd_is_an_error_at_once() {
    let server = Server::unbound();
    let o = opts(&server, "impatient").reconnect(false);
    let e = app(move || async move { Client::connect(o).unwrap().next_event().await.err() }).join().unwrap();
    let e = e.expect("an error");
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("appvss.sock"), "{e}");
}

#[test]
fn too_many_registrations_is_retried() {
    let server = Server::new();
    let o = opts(&server, "crowded");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        matches!(next(&mut c).await, Event::Connected { app_id: 7, .. })
    });
    let mut conn = server.accept();
    conn.expect("hello");
    conn.send(json!({"type": "error", "code": "too-many-registrations", "message": "uid 1000 has 64", "fatal": true}));
    drop(conn);
    let (_conn, _) = server.register(7);
    assert!(a.join().unwrap());
}

#[test]
fn an_answer_to_a_freeze_already_over_is_not_sent() {
    let server = Server::new();
    let o = opts(&server, "slow");
    let (tx, rx) = mpsc::channel();
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        next(&mut c).await;
        let p = next(&mut c).await.into_prepare();
        tx.send(()).unwrap();
        let Event::Thaw(t) = next(&mut c).await else { panic!() };
        assert_eq!(t.release, Release::Aborted);
        p.ready(); // too late
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 4, 5000);
    rx.recv_timeout(WAIT).unwrap();
    conn.thaw(2, 4, "aborted");
    assert_eq!(conn.expect("thawed")["re"], 2);
    conn.expect_silence(Duration::from_millis(300));
    a.join().unwrap();
}

#[test]
fn a_non_fatal_error_from_vssd_keeps_the_connection() {
    let server = Server::new();
    let o = opts(&server, "tolerant");
    let a = app(move || async move {
        let mut c = Client::connect(o).unwrap();
        next(&mut c).await;
        next(&mut c).await.into_prepare().ready();
        c.close().await;
    });
    let (mut conn, _) = server.register(1);
    conn.send(
        json!({"type": "error", "re": 9, "code": "unexpected-reply", "message": "no question 9", "fatal": false}),
    );
    conn.prepare(1, 1, 5000);
    conn.expect("ready");
    a.join().unwrap();
}

#[test]
fn socket_from_the_environment() {
    let server = Server::new();
    // Only this test reads the default socket; the others all set theirs.
    std::env::set_var(appvss::client::SOCKET_ENV, server.path());
    let o = Options::new("from-env");
    std::env::remove_var(appvss::client::SOCKET_ENV);
    assert_eq!(o.socket_path(), server.path());
    assert_eq!(Options::new("x").socket_path(), std::path::Path::new(appvss::proto::DEFAULT_SOCKET));
}

#[test]
fn connect_outside_a_runtime_is_an_error_not_a_panic() {
    assert!(matches!(Client::connect(Options::new("x")), Err(Error::NoRuntime)));
    assert!(matches!(Client::connect(Options::new("")), Err(Error::InvalidName(_))));
}

// ---------------------------------------------------------------------------------------
// blocking

#[test]
fn blocking_client_holds_until_thaw_and_closes_on_drop() {
    let server = Server::new();
    let o = opts(&server, "blocking");
    let (tx, rx) = mpsc::channel();
    let a = thread::spawn(move || {
        let mut c = appvss::blocking::Client::connect(o).unwrap();
        let mut hold = None;
        let mut seen = Vec::new();
        while seen.last() != Some(&"thaw") {
            let ev = c.next_event_timeout(WAIT).unwrap().expect("an event");
            match ev {
                Event::Connected { .. } => seen.push("connected"),
                Event::Prepare(p) => {
                    seen.push("prepare");
                    p.ready()
                }
                Event::Freeze(f) => {
                    seen.push("freeze");
                    let h = f.held();
                    assert!(h.wait_timeout(Duration::from_millis(100)).is_none());
                    tx.send(()).unwrap();
                    assert_eq!(h.wait(), Release::Completed);
                    hold = Some(h);
                }
                Event::Thaw(t) => {
                    assert_eq!(t.release, Release::Completed);
                    seen.push("thaw")
                }
                other => panic!("{other:?}"),
            }
        }
        drop(hold);
        c.close();
        seen
    });
    let (mut conn, _) = server.register(1);
    conn.prepare_and_freeze(2, 60000);
    rx.recv_timeout(WAIT).unwrap();
    conn.thaw(3, 2, "completed");
    conn.expect("thawed");
    conn.expect_closed();
    assert_eq!(a.join().unwrap(), ["connected", "prepare", "freeze", "thaw"]);
}

#[test]
fn blocking_hold_ends_when_vssd_goes_away_even_while_the_app_is_busy() {
    let server = Server::new();
    let o = opts(&server, "busy");
    let (tx, rx) = mpsc::channel();
    let a = thread::spawn(move || {
        let mut c = appvss::blocking::Client::connect(o).unwrap();
        c.next_event().unwrap();
        c.next_event().unwrap().into_prepare().ready();
        let h = c.next_event().unwrap().into_freeze().held();
        tx.send(()).unwrap();
        // The app does not read events; the client's own thread still ends the hold.
        h.wait_timeout(WAIT)
    });
    let (mut conn, _) = server.register(1);
    conn.prepare_and_freeze(6, 60000);
    rx.recv_timeout(WAIT).unwrap();
    drop(conn);
    assert_eq!(a.join().unwrap(), Some(Release::Disconnected));
}

/// Test helpers for matching.
trait EventExt {
    fn into_prepare(self) -> appvss::PrepareRequest;
    fn into_freeze(self) -> appvss::FreezeRequest;
}

impl EventExt for Event {
    fn into_prepare(self) -> appvss::PrepareRequest {
        match self {
            Event::Prepare(p) => p,
            other => panic!("expected prepare, got {other:?}"),
        }
    }
    fn into_freeze(self) -> appvss::FreezeRequest {
        match self {
            Event::Freeze(f) => f,
            other => panic!("expected freeze, got {other:?}"),
        }
    }
}

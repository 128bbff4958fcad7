//! The QGA wire protocol under abuse: every bad input gets an error reply and the connection
//! keeps serving. No filesystem is frozen here, but vssd still runs in a sandbox with a scope.

use std::thread;
use std::time::Duration;

use tests::*;

/// Sends `bytes`, then a guest-sync; returns the replies that came before the sync's.
fn replies_to(c: &mut QgaClient, bytes: &[u8]) -> Vec<Value> {
    c.send_raw(bytes).unwrap();
    c.resync()
}

fn assert_one_error(replies: &[Value], class: &str, what: &str) {
    assert_eq!(replies.len(), 1, "{what}: expected exactly one error reply, got {replies:?}");
    expect_error(&replies[0], class, what);
}

fn assert_still_serves(c: &mut QgaClient, what: &str) {
    let r = c.call("guest-ping", None);
    assert_eq!(r, json!({"return": {}}), "{what}: guest-ping afterwards");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn malformed_json_gets_an_error_and_the_connection_keeps_serving() {
    require_root!();
    let sb = Sandbox::new("malformed");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    for bad in [
        &b"{\"execute\": guest-ping}\n"[..],
        b"{\"execute\":\"guest-ping\",}\n",
        b"}\n",
        b"{\"execute\":\"guest-ping\" \"x\"}\n",
    ] {
        let what = String::from_utf8_lossy(bad).trim().to_string();
        let replies = replies_to(&mut c, bad);
        assert!(!replies.is_empty(), "{what}: no error reply");
        for r in &replies {
            expect_error(r, "GenericError", &what);
        }
        assert_still_serves(&mut c, &what);
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn non_object_requests_get_one_error_each() {
    require_root!();
    let sb = Sandbox::new("non_object");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    for bad in
        [&b"[1,2,3]\n"[..], b"42\n", b"\"guest-ping\"\n", b"null\n", b"{\"arguments\":{}}\n", b"{\"execute\":42}\n"]
    {
        let what = String::from_utf8_lossy(bad).trim().to_string();
        assert_one_error(&replies_to(&mut c, bad), "GenericError", &what);
        assert_still_serves(&mut c, &what);
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn unknown_command_is_command_not_found_and_bad_arguments_are_generic_errors() {
    require_root!();
    let sb = Sandbox::new("unknown_cmd");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    let r = c.call("guest-no-such-command", None);
    let desc = expect_error(&r, "CommandNotFound", "unknown command");
    assert!(desc.contains("guest-no-such-command"), "{desc}");
    assert_still_serves(&mut c, "unknown command");
    let r = c.call("guest-sync", None);
    expect_error(&r, "GenericError", "guest-sync without id");
    let r = c.call("guest-ping", Some(json!({"unexpected": 1})));
    expect_error(&r, "GenericError", "guest-ping with an unexpected argument");
    let r = c.call("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": "not-a-list"})));
    expect_error(&r, "GenericError", "freeze-list with a string");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_still_serves(&mut c, "bad arguments");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn oversized_message_gets_an_error_and_the_connection_keeps_serving() {
    require_root!();
    let sb = Sandbox::new("oversized");
    let vssd = Vssd::builder(&sb).arg("--max-message-bytes").arg("4096").start();
    let mut c = vssd.client();
    // Under the limit: an ordinary request.
    let small = format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":1}},\"pad\":\"{}\"}}\n", "y".repeat(1000));
    c.send_raw(small.as_bytes()).unwrap();
    let r = c.read_reply().unwrap().value;
    assert!(r.get("return").is_some() || r.get("error").is_some(), "{r}");
    // Over it.
    let big = format!("{{\"execute\":\"guest-ping\",\"arguments\":{{\"pad\":\"{}\"}}}}\n", "x".repeat(64 << 10));
    let replies = replies_to(&mut c, big.as_bytes());
    assert_one_error(&replies, "GenericError", "64 KiB message with a 4 KiB limit");
    assert_still_serves(&mut c, "oversized");
    // An oversized message split over several writes.
    let (a, b) = big.as_bytes().split_at(big.len() / 2);
    c.send_raw(a).unwrap();
    thread::sleep(Duration::from_millis(200));
    let replies = replies_to(&mut c, b);
    assert_one_error(&replies, "GenericError", "64 KiB message in two writes");
    assert_still_serves(&mut c, "oversized in two writes");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn message_over_the_default_one_mib_limit_gets_an_error() {
    require_root!();
    let sb = Sandbox::new("oversized_default");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    // Half a MiB is allowed (the argument is then refused as unexpected, like qemu-ga does).
    let half = format!("{{\"execute\":\"guest-ping\",\"arguments\":{{\"pad\":\"{}\"}}}}\n", "x".repeat(512 << 10));
    let replies = replies_to(&mut c, half.as_bytes());
    assert_one_error(&replies, "GenericError", "512 KiB message");
    let two = format!("{{\"execute\":\"guest-ping\",\"arguments\":{{\"pad\":\"{}\"}}}}\n", "x".repeat(2 << 20));
    // A 2 MiB write blocks until vssd has read it all: vssd must keep reading and discard.
    let replies = replies_to(&mut c, two.as_bytes());
    assert_one_error(&replies, "GenericError", "2 MiB message with the default limit");
    assert_still_serves(&mut c, "2 MiB message");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn byte_0xff_mid_message_drops_the_partial_message_and_the_next_one_is_served() {
    require_root!();
    let sb = Sandbox::new("ff_mid");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    c.send_raw(b"{\"execute\":\"guest-fsfreeze-").unwrap();
    thread::sleep(Duration::from_millis(200));
    c.send_raw(b"\xff").unwrap();
    let replies = replies_to(&mut c, b"");
    assert_one_error(&replies, "GenericError", "0xFF in the middle of a message");
    // In one write, as a client that resets mid-stream would send it.
    let replies = replies_to(&mut c, b"{\"execute\":\"guest-\xff");
    assert_one_error(&replies, "GenericError", "0xFF in the middle of a message (one write)");
    assert_still_serves(&mut c, "0xFF mid-message");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"), "the partial freeze command ran");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn guest_sync_delimited_reply_is_prefixed_with_0xff() {
    require_root!();
    let sb = Sandbox::new("delimited");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    c.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": 123456}})).unwrap();
    let line = c.read_line_raw().unwrap();
    assert_eq!(line[0], 0xff, "reply {:?}", String::from_utf8_lossy(&line));
    let v: Value = serde_json::from_slice(&line[1..]).expect("JSON after the 0xFF");
    assert_eq!(v, json!({"return": 123456}));
    // A plain guest-sync reply is not prefixed.
    c.send(&json!({"execute": "guest-sync", "arguments": {"id": 7}})).unwrap();
    let line = c.read_line_raw().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&line).expect("plain JSON line"), json!({"return": 7}));
    // libvirt's reset: a leading 0xFF, then guest-sync-delimited; whatever comes first, the
    // 0xFF-marked reply carries the id.
    c.send_raw(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":99}}\n").unwrap();
    let mut seen = Vec::new();
    loop {
        let r = c.read_reply().unwrap();
        if r.delimited {
            assert_eq!(r.value, json!({"return": 99}), "after {seen:?}");
            break;
        }
        seen.push(r.value);
        assert!(seen.len() < 3, "no delimited reply: {seen:?}");
    }
    assert_still_serves(&mut c, "after the reset");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn input_is_a_json_stream_not_lines() {
    require_root!();
    let sb = Sandbox::new("stream");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    // One request split over writes with pauses.
    c.send_raw(b"{\"execute\":\"guest-sy").unwrap();
    thread::sleep(Duration::from_millis(300));
    c.send_raw(b"nc\",\"argu").unwrap();
    thread::sleep(Duration::from_millis(300));
    c.send_raw(b"ments\":{\"id\":5}}\n").unwrap();
    assert_eq!(c.read_reply().unwrap().value, json!({"return": 5}));
    // Two requests in one write, without a newline between them.
    c.send_raw(
        b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":6}}{\"execute\":\"guest-sync\",\"arguments\":{\"id\":8}}\n",
    )
    .unwrap();
    assert_eq!(c.read_reply().unwrap().value, json!({"return": 6}));
    assert_eq!(c.read_reply().unwrap().value, json!({"return": 8}));
    // A request spread over lines.
    c.send_raw(b"{\n \"execute\":\n \"guest-ping\"\n}\n").unwrap();
    assert_eq!(c.read_reply().unwrap().value, json!({"return": {}}));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn several_connections_are_served_at_once() {
    require_root!();
    let sb = Sandbox::new("many_conns");
    let vssd = Vssd::start(&sb);
    let mut a = vssd.client();
    let mut b = vssd.client();
    // a has half a request pending; b must still be answered.
    a.send_raw(b"{\"execute\":").unwrap();
    assert_eq!(b.ok("guest-sync", Some(json!({"id": 2}))), json!(2));
    a.send_raw(b"\"guest-sync\",\"arguments\":{\"id\":1}}\n").unwrap();
    assert_eq!(a.read_reply().unwrap().value, json!({"return": 1}));
    let info = b.ok("guest-info", None);
    assert!(info["version"].is_string(), "{info}");
    assert!(info["supported_commands"].is_array(), "{info}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn two_channels_share_one_freeze_state() {
    require_root!();
    let sb = Sandbox::new("two_channels");
    let e = sb.ext4("e");
    let second = sb.root().join("qga2.sock");
    let vssd = Vssd::builder(&sb).arg("--channel").arg(format!("unix:{}", second.display())).start();
    let mut a = vssd.client();
    let mut b = QgaClient::connect(&second).expect("second channel");
    assert_eq!(a.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_eq!(b.ok("guest-fsfreeze-status", None), json!("frozen"));
    let r = b.call("guest-fsfreeze-freeze", None);
    assert!(r.get("error").is_some(), "a freeze through the other channel while frozen: {r}");
    let mut p = assert_frozen(&e, BLOCKED, "frozen through channel a");
    assert_eq!(b.ok("guest-fsfreeze-thaw", None), json!(1));
    p.assert_completes(THAWED, "thawed through channel b");
    assert_eq!(a.ok("guest-fsfreeze-status", None), json!("thawed"));
}

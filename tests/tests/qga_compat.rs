//! vssd against the real qemu-ga (Debian's qemu-guest-agent 7.2) on the same filesystems:
//! the same requests must get the same kinds of replies and the same values.
//!
//! qemu-ga runs in a mount namespace of its own that sees only its sandbox's mounts (see
//! `QemuGa::start`), is started with `guest-fsfreeze-freeze` and the commands that act on the machine blocked, and is only ever given
//! `guest-fsfreeze-freeze-list` with the sandbox's mountpoints.

use std::path::Path;

use tests::*;

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn qemu_ga_fixture_sees_only_its_sandbox_and_freezes_what_it_is_told() {
    require_root!();
    let other = Sandbox::new("qga_other");
    let o = other.ext4("o");
    let sb = Sandbox::new("qga_fixture");
    let e = sb.ext4("e");
    let qga = QemuGa::start(&sb);

    let seen: Vec<_> = qga.mounts().into_iter().map(|m| m.mount_point).collect();
    assert!(seen.iter().any(|m| m == &e), "qemu-ga does not see {}: {seen:?}", e.display());
    assert!(!seen.iter().any(|m| m == &o), "qemu-ga sees another sandbox: {seen:?}");
    assert!(!seen.iter().any(|m| m == Path::new("/tmp") || m.starts_with("/work")), "{seen:?}");

    // A filesystem frozen elsewhere is not thawed by qemu-ga's thaw-everything.
    kmod_shim::freeze::freeze_path(&o).unwrap();
    let mut c = qga.client();
    assert_eq!(c.ok("guest-ping", None), json!({}));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(0));
    assert!(frozen_by_someone(&o), "qemu-ga thawed a filesystem outside its sandbox");
    kmod_shim::freeze::thaw_path(&o).unwrap();

    sb.dirty(&e);
    assert_eq!(c.ok("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": [p2s(&e)]}))), json!(1));
    let mut p = assert_frozen(&e, BLOCKED, "frozen by qemu-ga");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("frozen"));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    p.assert_completes(THAWED, "thawed by qemu-ga");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn qemu_ga_client_refuses_a_freeze_outside_the_sandbox() {
    // Not `should_panic`: that would pass on any panic, e.g. a missing prerequisite. Only the
    // guard's own refusal counts.
    require_root!();
    let sb = Sandbox::new("qga_guard");
    let qga = QemuGa::start(&sb);
    let mut c = qga.client();
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.call("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": ["/"]})));
    }));
    let payload = refused.expect_err("the client sent qemu-ga a freeze of / (outside the sandbox)");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.starts_with("guard: / is not inside"), "the client failed, but not by its guard: {msg}");
    // qemu-ga got nothing: it still answers, and nothing is frozen.
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
}

/// What a reply is, for comparing two agents: `return <value>` or `error <class>`.
fn kind(reply: &Value) -> String {
    if let Some(r) = reply.get("return") {
        format!("return {r}")
    } else if let Some(c) = error_class(reply) {
        format!("error {c}")
    } else {
        format!("neither return nor error: {reply}")
    }
}

/// Runs the sequence of the compat test against one agent; returns one line per step with
/// the step's name and the kinds of every reply it produced.
fn sequence(c: &mut QgaClient, mountpoints: &[&Path]) -> Vec<String> {
    let list: Vec<Value> = mountpoints.iter().map(|m| p2s(m)).collect();
    let mut steps = Vec::new();
    fn step_into(steps: &mut Vec<String>, name: &str, replies: Vec<Value>) {
        let kinds: Vec<String> = replies.iter().map(kind).collect();
        steps.push(format!("{name}: {}", kinds.join(" | ")));
    }
    macro_rules! step {
        ($name:expr, $replies:expr $(,)?) => {{
            let r = $replies;
            step_into(&mut steps, &$name, r)
        }};
    }
    step!("ping", vec![c.call("guest-ping", None)]);
    step!("sync", vec![c.call("guest-sync", Some(json!({"id": 987654321})))]);
    c.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": 424242}})).unwrap();
    let r = c.read_reply().unwrap();
    step!(&format!("sync-delimited (0xFF prefix: {})", r.delimited), vec![r.value]);
    c.send(&json!({"execute": "guest-sync-delimited"})).unwrap();
    let r = c.read_reply().unwrap();
    step!(&format!("sync-delimited without id (0xFF prefix: {})", r.delimited), vec![r.value]);
    step!("status", vec![c.call("guest-fsfreeze-status", None)]);
    step!("thaw while thawed", vec![c.call("guest-fsfreeze-thaw", None)]);
    step!("freeze-list []", vec![c.call("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": []})))]);
    step!("status after freezing nothing", vec![c.call("guest-fsfreeze-status", None)]);
    let nope = mountpoints[0].parent().unwrap().join("no-such-mount");
    step!(
        "freeze-list [a path that is no mount]",
        vec![c.call("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": [p2s(&nope)]})))],
    );
    step!("status after freezing no mount", vec![c.call("guest-fsfreeze-status", None)]);
    step!("freeze-list", vec![c.call("guest-fsfreeze-freeze-list", Some(json!({ "mountpoints": list })))]);
    step!("status while frozen", vec![c.call("guest-fsfreeze-status", None)]);
    step!("ping while frozen", vec![c.call("guest-ping", None)]);
    let info = c.call("guest-info", None);
    let info_kind =
        if info.get("return").is_some_and(Value::is_object) { "return {...}".to_string() } else { kind(&info) };
    steps.push(format!("guest-info while frozen: {info_kind}"));
    step!(
        "freeze-list again while frozen",
        vec![c.call("guest-fsfreeze-freeze-list", Some(json!({ "mountpoints": list })))],
    );
    step!("status after the refused freeze", vec![c.call("guest-fsfreeze-status", None)]);
    step!("unknown command while frozen", vec![c.call("vssd-test-no-such-command", None)]);
    step!("thaw", vec![c.call("guest-fsfreeze-thaw", None)]);
    step!("status after thaw", vec![c.call("guest-fsfreeze-status", None)]);
    step!("thaw again", vec![c.call("guest-fsfreeze-thaw", None)]);
    step!("unknown command", vec![c.call("vssd-test-no-such-command", None)]);
    // A malformed object that qemu-ga answers with exactly one parse error.
    c.send_raw(b"{\"execute\":\"guest-ping\",}\n").unwrap();
    step!("malformed JSON", c.resync());
    c.send_raw(b"[1,2,3]\n").unwrap();
    step!("non-object", c.resync());
    c.send_raw(b"{\"arguments\":{}}\n").unwrap();
    step!("no execute", c.resync());
    c.send_raw(b"{}\n").unwrap();
    step!("empty object", c.resync());
    c.send_raw(b"{\"execute\":\"guest-ping\",\"arguments\":[]}\n").unwrap();
    step!("arguments not an object", c.resync());
    c.send_raw(b"{\"execute\":\"guest-ping\",\"extra\":1}\n").unwrap();
    step!("unexpected top-level member", c.resync());
    step!("sync without id", vec![c.call("guest-sync", None)]);
    step!("ping after all that", vec![c.call("guest-ping", None)]);
    steps
}

/// Where vssd answers differently on purpose: (qemu-ga's step line, vssd's step line, why).
/// Anything else that differs fails the test.
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[(
    "freeze-list [a path that is no mount]: return 0",
    "freeze-list [a path that is no mount]: error GenericError",
    "qemu-ga silently freezes nothing for a path that is not a mount point, and a host then \
     believes it quiesced; vssd refuses with an error naming the path (agent/src/plan.rs)",
)];

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_answers_the_libvirt_sequence_like_qemu_ga() {
    require_root!();
    let sb = Sandbox::new("qga_compat");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let mps = [e.as_path(), x.as_path()];

    let from_qga = {
        let qga = QemuGa::start(&sb);
        let mut c = qga.client();
        sb.dirty(&e);
        sequence(&mut c, &mps)
    };
    assert_writable(&e, THAWED, "after qemu-ga");
    assert_writable(&x, THAWED, "after qemu-ga");
    let from_vssd = {
        let vssd = Vssd::start(&sb);
        let mut c = vssd.client();
        sb.dirty(&e);
        sequence(&mut c, &mps)
    };
    assert_writable(&e, THAWED, "after vssd");
    assert_writable(&x, THAWED, "after vssd");

    eprintln!("qemu-ga:\n  {}\nvssd:\n  {}", from_qga.join("\n  "), from_vssd.join("\n  "));
    let mut diffs = Vec::new();
    for (q, v) in from_qga.iter().zip(&from_vssd) {
        let known = KNOWN_DIFFERENCES.iter().any(|(kq, kv, _)| kq == q && kv == v);
        if q != v && !known {
            diffs.push(format!("  qemu-ga: {q}\n  vssd:    {v}"));
        }
    }
    assert_eq!(from_qga.len(), from_vssd.len());
    assert!(
        diffs.is_empty(),
        "vssd differs from qemu-ga:\n{}\n(full qemu-ga sequence:\n  {})",
        diffs.join("\n"),
        from_qga.join("\n  ")
    );
    // And the values qemu-ga gives are the ones the tests expect of an agent.
    assert!(from_qga.contains(&"freeze-list: return 2".to_string()), "{from_qga:?}");
    assert!(from_qga.contains(&"thaw: return 2".to_string()));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_echoes_a_request_id_like_qemu_ga() {
    require_root!();
    let sb = Sandbox::new("qga_id");
    let req = json!({"execute": "guest-ping", "id": "req-17"});
    let from_qga = {
        let qga = QemuGa::start(&sb);
        qga.client().request(&req).unwrap()
    };
    let from_vssd = {
        let vssd = Vssd::start(&sb);
        vssd.client().request(&req).unwrap()
    };
    assert_eq!(from_qga, json!({"return": {}, "id": "req-17"}));
    assert_eq!(from_vssd, from_qga);
}

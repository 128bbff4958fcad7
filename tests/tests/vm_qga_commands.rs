//! VM tier: vssd's platform commands against a real qemu-ga 7.2 in the same guest.
//!
//! The guest runs vssd on org.qemu.guest_agent.0 and qemu-ga on org.qemu.guest_agent.1
//! (`VmOpts::qemu_ga_port`), with a NIC, a host name, a time zone, a login and Debian's
//! os-release (tests/guest/init). Both agents are asked the same read-only commands; their
//! replies must have the same keys and JSON types, and the same values wherever the guest is
//! the same for both (what changes between two calls, such as counters, only its type). A
//! failure lists every difference as a path into the reply (tests/src/compare.rs), for every
//! command at once. Then what a host relies on besides: guest-fstrim and guest-shutdown
//! respect a freeze, trim the data disks, power the guest off, and bad arguments get
//! qemu-ga's errors.
//!
//! Two boots: one guest for the comparisons (it stays up), one that is shut down.

use std::time::{Duration, Instant};

use tests::compare::{Check, Compare};
use tests::vm::{TestVm, VmOpts, GUEST_IPV4, GUEST_MAC};
use tests::*;

/// One command asked of both agents, and how their replies compare.
struct Case {
    command: &'static str,
    rules: Compare,
}

fn case(command: &'static str, rules: Compare) -> Case {
    Case { command, rules }
}

/// The read-only commands vssd implements itself, with what may differ between two calls.
fn read_only_cases() -> Vec<Case> {
    vec![
        // The two calls are a few hundred milliseconds apart at most under TCG.
        case("guest-get-time", Compare::default().check("", Check::Near(3e9))),
        case("guest-get-timezone", Compare::default()),
        case("guest-get-osinfo", Compare::default()),
        case("guest-get-host-name", Compare::default()),
        case("guest-get-users", Compare::default().key("", "user").check("[].login-time", Check::Near(1e-3))),
        case("guest-get-vcpus", Compare::default().key("", "logical-id")),
        case("guest-get-memory-blocks", Compare::default().key("", "phys-index")),
        case("guest-get-memory-block-info", Compare::default()),
        case(
            "guest-network-get-interfaces",
            Compare::default()
                .key("", "name")
                .key("[].ip-addresses", "ip-address")
                // Counters move with every packet (the agents' own traffic is not on the NIC,
                // but QEMU's user network may send router advertisements).
                .check("[].statistics", Check::Shape),
        ),
        // The writers are off: nothing writes to the data disks, so the used space is the same.
        case("guest-get-fsinfo", Compare::default().key("", "mountpoint").key("[].disk", "dev")),
        case("guest-get-disks", Compare::default().key("", "name")),
    ]
}

/// The commands guest-info must list alike (name, enabled, success-response): the native ones.
const NATIVE: &[&str] = &[
    "guest-get-time",
    "guest-set-time",
    "guest-get-timezone",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-users",
    "guest-get-vcpus",
    "guest-get-memory-blocks",
    "guest-get-memory-block-info",
    "guest-network-get-interfaces",
    "guest-get-fsinfo",
    "guest-get-disks",
    "guest-fstrim",
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-info",
    "guest-ping",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
];

/// The differences between two replies: of their `return` members when both succeeded (the
/// rules' paths start there), else of the whole replies (an error where the other returned).
fn diff_replies(rules: &Compare, vssd: &Value, qemu_ga: &Value) -> Vec<String> {
    match (vssd.get("return"), qemu_ga.get("return")) {
        (Some(a), Some(b)) => rules.diff(a, b),
        _ => rules.diff(vssd, qemu_ga),
    }
}

/// Resynchronises, then sends `cmd` and returns the whole reply (`return` or `error`).
fn ask(c: &mut QgaClient, cmd: &str, args: Option<Value>) -> Value {
    c.sync().unwrap_or_else(|e| panic!("sync before {cmd}: {}", chain(&e)));
    c.call(cmd, args)
}

/// What qemu-ga's guest-info says of `names`, or vssd's: `{name: {enabled, success-response}}`.
fn listed(info: &Value, names: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for n in names {
        let entry = info["supported_commands"].as_array().and_then(|a| a.iter().find(|c| c["name"] == *n));
        let mut e = entry.cloned().unwrap_or(json!("(not listed)"));
        if let Some(o) = e.as_object_mut() {
            o.remove("name");
        }
        m.insert(n.to_string(), e);
    }
    Value::Object(m)
}

/// The frozen-state refusal of qemu-ga 7.2 (docs/qga-wire.md section 4).
fn frozen_refusal(cmd: &str) -> Value {
    json!({"error": {"class": "CommandNotFound", "desc": format!("Command {cmd} has been disabled: the agent is in frozen state")}})
}

/// Checks of the fixture itself, on qemu-ga's replies: the guest is what the comparison needs
/// (a failure here is the test guest's, not vssd's).
fn check_guest(cmd: &str, q: &Value) {
    let r = &q["return"];
    match cmd {
        "guest-get-host-name" => assert_eq!(r["host-name"], "vmtest", "{q}"),
        "guest-get-timezone" => {
            assert!(r["zone"].as_str().is_some_and(|z| z.starts_with("CE")), "Europe/Berlin: {q}");
            assert!(r["offset"] == 3600 || r["offset"] == 7200, "{q}");
        }
        "guest-get-osinfo" => assert_eq!(r["id"], "debian", "{q}"),
        "guest-get-users" => assert!(r.as_array().is_some_and(|a| a.iter().any(|u| u["user"] == "vmtest")), "{q}"),
        "guest-get-vcpus" => assert_eq!(r.as_array().map(Vec::len), Some(2), "{q}"),
        "guest-network-get-interfaces" => {
            let eth0 = r.as_array().and_then(|a| a.iter().find(|i| i["name"] == "eth0")).expect("eth0");
            assert_eq!(eth0["hardware-address"], GUEST_MAC, "{q}");
            let ips = eth0["ip-addresses"].as_array().expect("eth0 has addresses");
            assert!(ips.iter().any(|a| a["ip-address"] == GUEST_IPV4 && a["prefix"] == 24), "{q}");
            assert!(ips.iter().any(|a| a["ip-address-type"] == "ipv6"), "a link-local IPv6 address: {q}");
        }
        "guest-get-fsinfo" => {
            let mps: Vec<&str> = r.as_array().unwrap().iter().filter_map(|f| f["mountpoint"].as_str()).collect();
            for m in ["/data/db", "/data/logs", "/data/e3", "/data/e4", "/data/efi"] {
                assert!(mps.contains(&m), "{m} in {q}");
            }
            let serials: Vec<&str> =
                r.as_array().unwrap().iter().filter_map(|f| f["disk"][0]["serial"].as_str()).collect();
            assert!(serials.contains(&"vmtest-data") && serials.contains(&"vmtest-data2"), "the disks' serials: {q}");
        }
        _ => {}
    }
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssds_platform_commands_answer_as_qemu_ga_does_in_the_same_guest() {
    require_vm!();
    let vm = TestVm::boot(
        "qgacmp",
        VmOpts { nic: true, qemu_ga_port: true, serials: true, writers: false, ..VmOpts::default() },
    );
    let mut v = vm.agent();
    let mut q = vm.qemu_ga();
    let mut diffs: Vec<String> = Vec::new();
    let mut replies = String::new();

    for c in read_only_cases() {
        let rq = ask(&mut q, c.command, None);
        let rv = ask(&mut v, c.command, None);
        assert!(rq.get("return").is_some(), "qemu-ga in the guest refused {}: {rq}", c.command);
        check_guest(c.command, &rq);
        replies.push_str(&format!("{}:\n  qemu-ga {rq}\n  vssd    {rv}\n", c.command));
        diffs.extend(diff_replies(&c.rules, &rv, &rq).into_iter().map(|d| format!("{}: {d}", c.command)));
    }

    // guest-info: the same entries for the commands both implement; vssd may list more.
    let iq = ask(&mut q, "guest-info", None);
    let iv = ask(&mut v, "guest-info", None);
    let d = Compare::default().diff(&listed(&iv["return"], NATIVE), &listed(&iq["return"], NATIVE));
    diffs.extend(d.into_iter().map(|d| format!("guest-info: {d}")));
    assert!(iv["return"]["version"].is_string(), "{iv}");

    // While frozen, each agent by its own freeze (qemu-ga one filesystem, vssd all it can):
    // guest-info shows the same commands disabled, and guest-fstrim is refused alike...
    let f = ask(&mut q, "guest-fsfreeze-freeze-list", Some(json!({"mountpoints": ["/data/e3"]})));
    assert_eq!(f["return"], 1, "qemu-ga froze /data/e3: {f}");
    let q_info = ask(&mut q, "guest-info", None);
    let q_trim = ask(&mut q, "guest-fstrim", None);
    let thaw = ask(&mut q, "guest-fsfreeze-thaw", None);
    assert_eq!(thaw["return"], 1, "{thaw}");
    assert_eq!(q_trim, frozen_refusal("guest-fstrim"), "qemu-ga's guest-fstrim while frozen");
    let f = ask(&mut v, "vssd-freeze", Some(json!({"deadline": 20})));
    assert_eq!(f["return"]["frozen"], 4, "{f}");
    let v_info = ask(&mut v, "guest-info", None);
    let v_trim = ask(&mut v, "guest-fstrim", None);
    let thaw = ask(&mut v, "guest-fsfreeze-thaw", None);
    assert_eq!(thaw["return"], 4, "{thaw}");
    if v_trim != q_trim {
        diffs.push(format!("guest-fstrim while frozen: vssd {v_trim}, qemu-ga {q_trim}"));
    }
    let d = Compare::default().diff(&listed(&v_info["return"], NATIVE), &listed(&q_info["return"], NATIVE));
    diffs.extend(d.into_iter().map(|d| format!("guest-info while frozen: {d}")));
    // ...and otherwise trims what qemu-ga trims, with the same report (how much each trim
    // freed depends on what the one before freed).
    let rq = ask(&mut q, "guest-fstrim", None);
    let rv = ask(&mut v, "guest-fstrim", None);
    replies.push_str(&format!("guest-fstrim:\n  qemu-ga {rq}\n  vssd    {rv}\n"));
    let trim_rules = Compare::default().key("paths", "path").check("paths[].trimmed", Check::Shape);
    diffs.extend(diff_replies(&trim_rules, &rv, &rq).into_iter().map(|d| format!("guest-fstrim: {d}")));
    let trimmed: Vec<&str> = rv["return"]["paths"]
        .as_array()
        .map(|a| a.iter().filter(|p| p.get("error").is_none()).filter_map(|p| p["path"].as_str()).collect())
        .unwrap_or_default();
    for m in ["/data/db", "/data/logs", "/data/e3", "/data/e4"] {
        if !trimmed.contains(&m) {
            diffs.push(format!("guest-fstrim: vssd did not trim {m}"));
        }
    }

    // Bad arguments: the same error class and text from both (nothing runs: last, in case).
    for (cmd, args) in [
        ("guest-get-time", json!({"when": 1})),
        ("guest-set-time", json!({"time": "now"})),
        ("guest-fstrim", json!({"minimum": "1M"})),
        ("guest-get-memory-blocks", json!({"x": true})),
        ("guest-shutdown", json!({"mode": 5})),
        ("guest-shutdown", json!({"mode": "sleep"})),
    ] {
        let rq = ask(&mut q, cmd, Some(args.clone()));
        let rv = ask(&mut v, cmd, Some(args.clone()));
        assert!(rq.get("error").is_some(), "qemu-ga accepted {cmd} {args}: {rq}");
        if rv != rq {
            diffs.push(format!("{cmd} {args}: vssd {rv}, qemu-ga {rq}"));
        }
    }
    assert!(vm.pid().is_some(), "the guest is still up after the bad shutdown modes");

    if !diffs.is_empty() {
        panic!(
            "vssd's replies differ from qemu-ga's in the same guest ({} differences):\n  {}\n\nthe replies:\n{replies}",
            diffs.len(),
            diffs.join("\n  ")
        );
    }
    eprintln!("{replies}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn guest_shutdown_is_refused_while_frozen_and_then_powers_the_guest_off() {
    require_vm!();
    let vm = TestVm::boot("qgashut", VmOpts::default());
    let mut g = vm.agent();

    // Frozen: refused, and the freeze stays (shutdown thaws nothing by itself).
    let f = ask(&mut g, "vssd-freeze", Some(json!({"deadline": 20})));
    assert_eq!(f["return"]["frozen"], 4, "{f}");
    assert_eq!(ask(&mut g, "guest-shutdown", None), frozen_refusal("guest-shutdown"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(vm.pid().is_some(), "the guest went down while frozen");
    assert_eq!(ask(&mut g, "guest-fsfreeze-status", None)["return"], "frozen");
    assert_eq!(ask(&mut g, "guest-fsfreeze-thaw", None)["return"], 4);

    // Thawed: no reply (success-response false), and QEMU exits: the guest powered off.
    g.sync().unwrap();
    g.send(&json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})).unwrap();
    let t0 = Instant::now();
    g.set_timeout(Duration::from_secs(3));
    match g.read_reply() {
        Err(ClientError::NoReply { .. } | ClientError::Closed | ClientError::Io(_)) => {}
        other => panic!("guest-shutdown replied (qemu-ga never does on success): {other:?}"),
    }
    let limit = Duration::from_secs(60);
    while vm.pid().is_some() {
        assert!(t0.elapsed() < limit, "QEMU still runs {limit:?} after guest-shutdown; console:\n{}", vm.console());
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.reap();
    eprintln!("[vm] powered off {:.1} s after guest-shutdown", t0.elapsed().as_secs_f64());
}

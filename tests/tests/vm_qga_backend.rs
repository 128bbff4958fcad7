//! VM tier: vssd with a qemu-ga behind it (`qga-backend`) in a real guest. The guest's init
//! (`vmtest.qga-backend=1`) starts qemu-ga on /run/qga-backend.sock with its freeze commands
//! blocked, and vssd on the agent port with `--qga-backend /run/qga-backend.sock`. Needs root
//! and QEMU; `tests/run-all.sh` runs it with `--include-ignored`.

use std::time::{Duration, Instant};

use hostsim::qga::{Qga, QgaError};
use tests::vm::{TestVm, VmOpts};
use tests::*;

const T: Duration = Duration::from_secs(30);

/// Runs `sh -c script` in the guest through `guest-exec` and returns its exit code and
/// standard output, read back with `guest-exec-status`.
fn guest_exec(g: &mut Qga, script: &str) -> (i64, String) {
    let r = g
        .execute("guest-exec", Some(json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true})), T)
        .expect("guest-exec through vssd");
    let pid = r["pid"].as_i64().unwrap_or_else(|| panic!("guest-exec returned no pid: {r}"));
    let deadline = Instant::now() + T;
    loop {
        let st = g.execute("guest-exec-status", Some(json!({"pid": pid})), T).expect("guest-exec-status");
        if st["exited"] == true {
            let out = st["out-data"].as_str().map(base64_decode).unwrap_or_default();
            return (st["exitcode"].as_i64().unwrap_or(-1), out);
        }
        assert!(Instant::now() < deadline, "guest-exec of {script:?} did not end: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Standard base64 (what qemu-ga's `out-data` is), without a crate for it.
fn base64_decode(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = A.iter().position(|&a| a == c).unwrap_or_else(|| panic!("not base64: {s:?}")) as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    String::from_utf8(out).unwrap()
}

fn command_error(r: Result<Value, QgaError>) -> (String, String) {
    match r {
        Err(QgaError::Command { class, desc, .. }) => (class, desc),
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssd_forwards_guest_exec_to_the_qemu_ga_behind_it_and_survives_its_death() {
    require_vm!();
    let vm = TestVm::boot(
        "qgabackend",
        VmOpts { writers: false, append: "vmtest.qga-backend=1".into(), ..Default::default() },
    );
    let mut g = Qga::connect(&vm.agent_path()).expect("agent channel");

    // One agent with the union of both: vssd's commands first, then qemu-ga's others.
    let info = g.execute("guest-info", None, T).unwrap();
    let cmds = info["supported_commands"].as_array().unwrap();
    let names: Vec<&str> = cmds.iter().map(|c| c["name"].as_str().unwrap()).collect();
    let at = |n: &str| names.iter().position(|&m| m == n).unwrap_or_else(|| panic!("{n} is not listed: {names:?}"));
    assert_eq!(names[0], "guest-sync-delimited", "{names:?}");
    assert!(at("vssd-freeze") < at("guest-exec"), "vssd's own commands come first: {names:?}");
    for n in ["guest-exec", "guest-exec-status", "guest-file-open", "guest-file-read", "guest-set-user-password"] {
        assert_eq!(cmds[at(n)]["enabled"], true, "{n}: {info}");
    }
    // Each name once; the freeze commands are vssd's (enabled), not the backend's (blocked).
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "a command is listed twice: {names:?}");
    assert_eq!(cmds[at("guest-fsfreeze-freeze")]["enabled"], true, "{info}");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"), "{info}");

    // guest-exec runs in the guest, through vssd, and its output comes back.
    let (code, out) = guest_exec(&mut g, "echo hello from $(hostname -s 2>/dev/null || echo guest); exit 3");
    assert_eq!(code, 3);
    assert!(out.starts_with("hello from "), "{out:?}");
    // Bad arguments get qemu-ga's own answer, class and wording.
    let (class, desc) = command_error(g.execute("guest-exec-status", Some(json!({"pid": "x"})), T));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("GenericError", "Invalid parameter type for 'pid', expected: integer")
    );

    // While vssd has frozen the guest, nothing is forwarded.
    let n = g.execute("guest-fsfreeze-freeze", None, T).unwrap();
    assert_eq!(n, json!(4), "db, logs, e3, e4");
    let (class, desc) = command_error(g.execute(
        "guest-exec",
        Some(json!({"path": "/bin/touch", "arg": ["/data/e3/while-frozen"]})),
        T,
    ));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("CommandNotFound", "Command guest-exec has been disabled: the agent is in frozen state")
    );
    let info = g.execute("guest-info", None, T).unwrap();
    let exec = info["supported_commands"].as_array().unwrap().iter().find(|c| c["name"] == "guest-exec").cloned();
    assert_eq!(exec.map(|c| c["enabled"].clone()), Some(json!(false)), "{info}");
    assert_eq!(g.execute("guest-fsfreeze-thaw", None, T).unwrap(), json!(4));
    let ls = vm.sh("ls /data/e3/while-frozen 2>&1 || true");
    assert!(ls.contains("No such file"), "guest-exec ran while frozen: {ls}");

    // The backend dies: the host gets a clear error at once, naming the socket; freezing and
    // thawing go on.
    vm.sh("kill -9 $(cat /run/qga-backend/pid)");
    let t = Instant::now();
    let (class, desc) = command_error(g.execute("guest-exec", Some(json!({"path": "/bin/true"})), T));
    assert!(t.elapsed() < Duration::from_secs(10), "the error took {:?} (qga-backend-timeout is 10 s)", t.elapsed());
    assert_eq!(class, "GenericError", "{desc}");
    assert!(desc.contains("/run/qga-backend.sock") && desc.contains("vssd-qga-backend.service"), "{desc}");
    let info = g.execute("guest-info", None, T).unwrap();
    let listed = info["supported_commands"].as_array().unwrap();
    assert!(listed.iter().all(|c| c["name"] != "guest-exec"), "a dead backend's commands are not listed: {info}");
    assert_eq!(g.execute("guest-fsfreeze-freeze", None, T).unwrap(), json!(4));
    assert_eq!(g.execute("guest-fsfreeze-status", None, T).unwrap(), json!("frozen"));
    assert_eq!(g.execute("guest-fsfreeze-thaw", None, T).unwrap(), json!(4));

    // A new backend on the same socket (it replaces the dead one's socket file) serves the
    // next command without restarting vssd. /proc/net/unix lists a socket once it listens.
    vm.sh("qemu-ga -m unix-listen -p /run/qga-backend.sock -t /run/qga-backend \
         --block-rpcs=guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw \
         </dev/null >>/run/qga-backend.log 2>&1 & echo $! >/run/qga-backend/pid; \
         i=0; while ! grep -q /run/qga-backend.sock /proc/net/unix && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         grep -q /run/qga-backend.sock /proc/net/unix");
    let (code, out) = guest_exec(&mut g, "echo back");
    assert_eq!((code, out.as_str()), (0, "back\n"));
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_hung_backend_costs_the_host_its_timeout_and_never_holds_up_a_thaw() {
    require_vm!();
    let vm =
        TestVm::boot("qgahung", VmOpts { writers: false, append: "vmtest.qga-backend=1".into(), ..Default::default() });
    let mut g = Qga::connect(&vm.agent_path()).expect("agent channel");
    let r = g.execute("guest-exec", Some(json!({"path": "/bin/true"})), T).unwrap();
    assert!(r["pid"].is_i64(), "{r}");
    assert_eq!(g.execute("guest-fsfreeze-freeze", None, T).unwrap(), json!(4));
    // The backend stops answering (SIGSTOP) while the guest is frozen...
    vm.sh("kill -STOP $(cat /run/qga-backend/pid)");
    // ... which costs a thaw nothing: it is vssd's own.
    let t = Instant::now();
    assert_eq!(g.execute("guest-fsfreeze-thaw", None, T).unwrap(), json!(4));
    assert!(t.elapsed() < Duration::from_secs(5), "thaw took {:?}", t.elapsed());
    // A forwarded command gets the clear error after qga-backend-timeout (10 s), not never.
    let t = Instant::now();
    let (class, desc) = command_error(g.execute("guest-exec-status", Some(json!({"pid": 1})), T));
    let took = t.elapsed();
    assert_eq!(class, "GenericError", "{desc}");
    assert!(desc.contains("did not answer `guest-exec-status` within 10 s"), "{desc}");
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(20), "{took:?}");
    // The backend comes back: its late reply is dropped, and the next command gets its own.
    vm.sh("kill -CONT $(cat /run/qga-backend/pid)");
    let (code, out) = guest_exec(&mut g, "echo after");
    assert_eq!((code, out.as_str()), (0, "after\n"));
}

//! vssd on D-Bus, on a private dbus-daemon that includes the packaged policy
//! (`packaging/dbus/org.vssd.Agent.conf`): the properties, PropertiesChanged and the Frozen,
//! Thawed and AutoThawed signals through real freezes of loop filesystems, the methods from
//! root, the policy refusing them to anyone else, and a bus that hangs or dies costing a
//! freeze nothing.
//!
//! The clients are the tools an admin would use: `busctl` (properties, calls, `monitor` for
//! the signals, as root) and `dbus-send` (its error shows who refused: the bus's policy says
//! "Rejected send message").

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::*;

const DEST: &str = "org.vssd.Agent";
const PATH: &str = "/org/vssd/Agent";
const IFACE: &str = "org.vssd.Agent1";

/// A dbus-daemon of the test's own, with the system bus's default policy and vssd's policy
/// file included; killed in Drop.
struct PrivateBus {
    dir: PathBuf,
    child: Option<Child>,
    address: String,
}

impl PrivateBus {
    fn start() -> PrivateBus {
        for prog in ["dbus-daemon", "busctl", "dbus-send", "setpriv"] {
            let found = Command::new("sh").arg("-c").arg(format!("command -v {prog}")).output().unwrap();
            assert!(
                found.status.success(),
                "{prog} is missing: apt-get install dbus-daemon dbus-bin systemd util-linux (tests/setup.sh)"
            );
        }
        Self::start_in(Self::dir())
    }

    /// Its own directory, readable by all, so that `nobody` can reach the socket `bus` in it.
    fn dir() -> PathBuf {
        let dir = tempfile::Builder::new().prefix("vssd-test-bus-").tempdir_in("/tmp").unwrap().keep();
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        dir
    }

    fn start_in(dir: PathBuf) -> PrivateBus {
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/dbus/org.vssd.Agent.conf");
        let policy = policy.canonicalize().expect("packaging/dbus/org.vssd.Agent.conf exists");
        let conf = dir.join("bus.conf");
        fs::write(&conf, bus_config(&dir.join("bus"), &policy)).unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--print-address", "--nofork"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("dbus-daemon prints its address");
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon's address: {address:?}");
        PrivateBus { dir, child: Some(child), address }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), s).unwrap();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The system bus's default policy (Debian's system.conf, in short) plus vssd's file.
fn bus_config(socket: &Path, policy: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{}</include>
</busconfig>
"#,
        socket.display(),
        policy.display()
    )
}

/// `busctl --address=ADDR --json=short ARGS` as root (10 s limit).
fn busctl(bus: &PrivateBus, args: &[&str]) -> Output {
    let mut c = Command::new("busctl");
    c.arg(format!("--address={}", bus.address)).arg("--json=short").args(args);
    run_with_limit(c, Duration::from_secs(10))
}

/// A property's value (busctl's `data`).
fn prop(bus: &PrivateBus, name: &str) -> Value {
    let o = busctl(bus, &["get-property", DEST, PATH, IFACE, name]);
    o.expect_code(0, &format!("get-property {name}"));
    let v: Value = serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("busctl said {:?}: {e}", o.stdout));
    v["data"].clone()
}

/// A method call as root; the JSON string it returns, parsed.
fn call(bus: &PrivateBus, args: &[&str]) -> Value {
    let mut a = vec!["call", DEST, PATH, IFACE];
    a.extend_from_slice(args);
    let o = busctl(bus, &a);
    o.expect_code(0, &format!("call {args:?}"));
    let v: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    serde_json::from_str(v["data"][0].as_str().expect("a string")).expect("the method returns JSON")
}

/// Waits until vssd owns its name on `bus`.
fn wait_for_name(bus: &PrivateBus, vssd: &Vssd) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if busctl(bus, &["get-property", DEST, PATH, IFACE, "State"]).code == Some(0) {
            return;
        }
        assert!(Instant::now() < until, "vssd did not appear on the bus in 15 s; its log:\n{}", vssd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `busctl monitor org.vssd.Agent`: every message from or to vssd, one JSON object a line.
struct Monitor {
    child: Child,
    out: PathBuf,
}

impl Monitor {
    fn start(bus: &PrivateBus) -> Monitor {
        let out = bus.dir.join(format!("monitor-{}.json", std::process::id()));
        let f = fs::File::create(&out).unwrap();
        let child = Command::new("busctl")
            .arg(format!("--address={}", bus.address))
            .args(["--json=short", "monitor", DEST])
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .expect("busctl monitor");
        std::thread::sleep(Duration::from_millis(500));
        Monitor { child, out }
    }

    /// The signals seen so far: (member, payload data).
    fn signals(&self) -> Vec<(String, Value)> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["type"] == "signal")
            .map(|m| (m["member"].as_str().unwrap_or("").to_string(), m["payload"]["data"].clone()))
            .collect()
    }

    /// The data of the first signal that `pick` accepts (waits for it).
    fn wait_for(&self, what: &str, timeout: Duration, pick: impl Fn(&str, &Value) -> bool) -> Value {
        let until = Instant::now() + timeout;
        loop {
            if let Some((_, d)) = self.signals().into_iter().find(|(m, d)| pick(m, d)) {
                return d;
            }
            assert!(Instant::now() < until, "no {what} signal within {timeout:?}; seen: {:#?}", self.signals());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The values State took, in order, from PropertiesChanged.
    fn states(&self) -> Vec<String> {
        self.changed("State").into_iter().filter_map(|v| v.as_str().map(String::from)).collect()
    }

    /// Every value PropertiesChanged announced for `name`.
    fn changed(&self, name: &str) -> Vec<Value> {
        self.signals()
            .into_iter()
            .filter(|(m, _)| m == "PropertiesChanged")
            .filter_map(|(_, d)| d[1].get(name).map(|v| v["data"].clone()))
            .collect()
    }

    /// The payload of a signal (its one string argument), parsed as JSON.
    fn report(&self, member: &str, timeout: Duration) -> Value {
        let d = self.wait_for(member, timeout, |m, _| m == member);
        serde_json::from_str(d[0].as_str().unwrap()).unwrap()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vssd<'a>(sb: &'a Sandbox, bus: &PrivateBus, deadline: u64) -> Vssd<'a> {
    let v = Vssd::builder(sb).deadline(deadline).arg("--dbus-address").arg(&bus.address).start();
    wait_for_name(bus, &v);
    v
}

/// Waits (5 s) until property `name` is `want`.
fn wait_prop(bus: &PrivateBus, name: &str, want: Value) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let v = prop(bus, name);
        if v == want {
            return;
        }
        assert!(Instant::now() < until, "{name} is {v}, not {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An application registered on vssd's app socket (the appvss hello), until dropped.
fn register_app(socket: &Path, name: &str) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = json!({"type": "hello", "id": 1, "name": name, "min_version": 1, "max_version": 1});
    s.write_all(format!("{hello}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("welcome"), "vssd's answer to hello: {line}");
    s
}

fn strings(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    s.sort();
    s
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn properties_and_signals_follow_freezes_thaws_and_an_auto_thaw() {
    require_root!();
    let sb = Sandbox::new("dbus");
    let mps = [sb.ext4("e"), sb.xfs("x")];
    let mut want: Vec<String> = mps.iter().map(|m| m.display().to_string()).collect();
    want.sort();
    let bus = PrivateBus::start();
    let vssd = start_vssd(&sb, &bus, 10);
    assert_eq!(prop(&bus, "State"), json!("thawed"));
    assert_eq!(prop(&bus, "FrozenFilesystems"), json!([]));
    assert_eq!(prop(&bus, "SecondsUntilAutoThaw"), json!(0.0));
    assert_eq!(prop(&bus, "LastFreezeReport"), json!(""));
    assert_eq!(prop(&bus, "RegisteredApps"), json!([]));
    let mon = Monitor::start(&bus);

    // The host freezes over QGA: the bus sees it.
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    let report = mon.report("Frozen", Duration::from_secs(5));
    assert_eq!(report["frozen"], json!(2), "{report}");
    assert_eq!(prop(&bus, "State"), json!("frozen"));
    assert_eq!(strings(&prop(&bus, "FrozenFilesystems")), want);
    let left = prop(&bus, "SecondsUntilAutoThaw").as_f64().unwrap();
    assert!(left > 5.0 && left <= 10.0, "seconds until the auto-thaw: {left}");
    let last: Value = serde_json::from_str(prop(&bus, "LastFreezeReport").as_str().unwrap()).unwrap();
    assert_eq!(last["frozen"], json!(2));
    assert_eq!(last["deadline-ms"], json!(10000));
    let mut probe = assert_frozen(&mps[0], BLOCKED, "frozen over QGA");
    c.ok("guest-fsfreeze-thaw", None);
    probe.assert_completes(Duration::from_secs(10), "after the thaw");
    let thawed = mon.report("Thawed", Duration::from_secs(5));
    assert_eq!(thawed["thawed"], json!(2), "{thawed}");
    mon.wait_for("PropertiesChanged State=thawed", Duration::from_secs(5), |m, d| {
        m == "PropertiesChanged" && d[1]["State"]["data"] == "thawed"
    });
    assert_eq!(mon.states(), ["freezing", "frozen", "thawing", "thawed"], "State's changes, in order");
    let frozen_lists: Vec<Vec<String>> = mon.changed("FrozenFilesystems").iter().map(strings).collect();
    assert_eq!(frozen_lists, [want.clone(), vec![]], "FrozenFilesystems' changes");
    assert_eq!(mon.changed("LastFreezeReport").len(), 1);
    assert_eq!(prop(&bus, "SecondsUntilAutoThaw"), json!(0.0));

    // Root freezes and thaws through the methods.
    let r = call(&bus, &["Freeze", "asd", "0", "0"]);
    assert_eq!(r["frozen"], json!(2), "{r}");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("frozen"), "the QGA side sees the D-Bus freeze");
    let mut probe = assert_frozen(&mps[1], BLOCKED, "frozen over D-Bus");
    let r = call(&bus, &["Thaw"]);
    assert_eq!(r["thawed"], json!(2), "{r}");
    probe.assert_completes(Duration::from_secs(10), "after the D-Bus thaw");

    // A short deadline: vssd thaws by itself and says why.
    let only = mps[0].display().to_string();
    let r = call(&bus, &["Freeze", "asd", "1", &only, "1.5"]);
    assert_eq!(r["frozen"], json!(1), "{r}");
    assert_eq!(r["deadline-ms"], json!(1500), "{r}");
    assert_eq!(prop(&bus, "FrozenFilesystems"), json!([only]));
    let reason = mon.wait_for("AutoThawed", Duration::from_secs(6), |m, _| m == "AutoThawed");
    assert_eq!(reason, json!(["deadline"]));
    assert_eq!(prop(&bus, "State"), json!("thawed"));
    assert_eq!(prop(&bus, "FrozenFilesystems"), json!([]));
    assert_writable(&mps[0], Duration::from_secs(10), "after the auto-thaw");
    assert!(vssd.log_text().contains("serving on D-Bus"));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn the_policy_lets_only_root_call_the_methods_and_everyone_read_the_properties() {
    require_root!();
    let sb = Sandbox::new("dbuspolicy");
    let m = sb.ext4("e");
    let bus = PrivateBus::start();
    let vssd = start_vssd(&sb, &bus, 10);
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]).args(args);
        run_with_limit(c, Duration::from_secs(10))
    };
    let addr = format!("--address={}", bus.address);
    let o = as_nobody(&["busctl", &addr, "get-property", DEST, PATH, IFACE, "State"]);
    o.expect_code(0, "nobody reads State");
    assert_eq!(o.stdout.trim(), "s \"thawed\"");
    as_nobody(&["busctl", &addr, "introspect", DEST, PATH]).expect_code(0, "nobody introspects");
    let bus_arg = format!("--bus={}", bus.address);
    for method in ["Thaw", "Plan array:string:", "Freeze array:string: double:1"] {
        let mut args = vec!["dbus-send", &bus_arg, "--print-reply", "--dest=org.vssd.Agent", PATH];
        let mut words = method.split(' ');
        let member = format!("{IFACE}.{}", words.next().unwrap());
        args.push(&member);
        args.extend(words);
        let o = as_nobody(&args);
        assert_ne!(o.code, Some(0), "nobody called {method}: {}", o.stdout);
        assert!(
            o.stderr.contains("AccessDenied") && o.stderr.contains("Rejected send message"),
            "the bus's policy must refuse {method} to nobody: {}",
            o.stderr
        );
    }
    assert_eq!(prop(&bus, "State"), json!("thawed"), "nothing was frozen");
    assert_writable(&m, Duration::from_secs(5), "after nobody's calls");
    // An app registers (appvss hello): RegisteredApps shows it, to anyone, and announces it.
    let mon = Monitor::start(&bus);
    let app = register_app(&sb.app_socket(), "dbus-test-app");
    wait_prop(&bus, "RegisteredApps", json!(["dbus-test-app"]));
    let o = as_nobody(&["busctl", &addr, "get-property", DEST, PATH, IFACE, "RegisteredApps"]);
    assert_eq!(o.stdout.trim(), "as 1 \"dbus-test-app\"", "nobody reads RegisteredApps");
    drop(app);
    wait_prop(&bus, "RegisteredApps", json!([]));
    assert_eq!(mon.changed("RegisteredApps"), [json!(["dbus-test-app"]), json!([])]);
    // Root may.
    let plan = call(&bus, &["Plan", "as", "0"]);
    let mp = m.display().to_string();
    assert!(
        plan["mounts"].as_array().unwrap().iter().any(|x| x["mountpoint"] == mp.as_str() && x["outcome"] == "freeze"),
        "{plan}"
    );
    drop(vssd);
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_hung_or_dead_bus_costs_a_freeze_nothing() {
    require_root!();
    let sb = Sandbox::new("dbushung");
    let mps = [sb.ext4("a"), sb.ext4("b")];
    let mut bus = PrivateBus::start();
    let vssd = start_vssd(&sb, &bus, 10);
    let mut c = vssd.client();
    let cycle = |c: &mut QgaClient, what: &str| {
        let t = Instant::now();
        assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2), "{what}");
        c.ok("guest-fsfreeze-thaw", None);
        t.elapsed()
    };
    let normal = cycle(&mut c, "with the bus");
    bus.signal(nix::sys::signal::Signal::SIGSTOP);
    // Many cycles, so that vssd's side of the socket fills and its D-Bus thread is stuck.
    let mut worst = Duration::ZERO;
    for i in 0..40 {
        worst = worst.max(cycle(&mut c, &format!("hung bus, cycle {i}")));
    }
    assert!(
        worst < normal * 5 + Duration::from_secs(1),
        "a freeze+thaw with the bus stopped took {worst:?}, with it running {normal:?}"
    );
    // The bus comes back: the properties are right again.
    bus.signal(nix::sys::signal::Signal::SIGCONT);
    let until = Instant::now() + Duration::from_secs(10);
    while prop(&bus, "State") != json!("thawed") {
        assert!(Instant::now() < until, "State did not come back to thawed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Dead: freezes go on; vssd says once that it lost the bus.
    bus.kill();
    for i in 0..3 {
        cycle(&mut c, &format!("dead bus, cycle {i}"));
    }
    assert_writable(&mps[1], Duration::from_secs(5), "after the cycles");
    let until = Instant::now() + Duration::from_secs(5);
    while !vssd.log_text().contains("D-Bus connection lost") {
        assert!(Instant::now() < until, "vssd did not log the lost bus:\n{}", vssd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_bus_missing_at_start_is_logged_once_and_joined_when_it_appears() {
    require_root!();
    let sb = Sandbox::new("dbuslate");
    let m = sb.ext4("e");
    let dir = PrivateBus::dir();
    let address = format!("unix:path={}", dir.join("bus").display());
    let vssd = Vssd::builder(&sb).arg("--dbus-address").arg(&address).start();
    // No bus: vssd serves the host all the same.
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    c.ok("guest-fsfreeze-thaw", None);
    assert_writable(&m, Duration::from_secs(5), "after a freeze without a bus");
    let bus = PrivateBus::start_in(dir);
    // vssd tries again every 10 s.
    let until = Instant::now() + Duration::from_secs(20);
    while busctl(&bus, &["get-property", DEST, PATH, IFACE, "State"]).code != Some(0) {
        assert!(Instant::now() < until, "vssd did not join the bus within 20 s:\n{}", vssd.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = vssd.log_text();
    assert_eq!(log.matches("no D-Bus;").count(), 1, "logged once:\n{log}");
    assert!(log.contains("serving on D-Bus"), "{log}");
    // And the state it shows is right: a freeze before the bus left a report.
    let last: Value = serde_json::from_str(prop(&bus, "LastFreezeReport").as_str().unwrap()).unwrap();
    assert_eq!(last["frozen"], json!(1));
}

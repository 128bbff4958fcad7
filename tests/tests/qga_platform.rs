//! vssd's platform commands (guest-get-osinfo, -users, -vcpus, -network-get-interfaces, ...)
//! against the host's real qemu-ga 7.2 on the same machine: the same keys and JSON types,
//! and the same values wherever two agents on one machine must agree.
//!
//! Each agent runs in a mount and UTS namespace of its own that the test sets up the same
//! way: a host name, a utmp with logins (a tmpfs on /run), a tricky os-release and a
//! non-UTC /etc/localtime, so that the comparison covers more than this machine's defaults.
//! qemu-ga gets every command that changes anything blocked (`--block-rpcs`, the list of
//! docs/qga-wire.md), and nothing here asks either agent to freeze, set or shut down
//! anything.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tests::compare::{Check, Compare};
use tests::*;

/// Everything qemu-ga could change the machine with, blocked.
const QEMU_GA_BLOCKED: &str = "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,guest-shutdown,\
guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,guest-fstrim,guest-set-time,guest-set-vcpus,\
guest-set-memory-blocks,guest-set-user-password,guest-ssh-add-authorized-keys,guest-ssh-remove-authorized-keys,\
guest-exec,guest-file-open";

const HOST_NAME: &str = "vssd-platform-cmp";

/// The namespace both agents run in: its own host name, utmp and os-release, and (unless
/// `$TZ` is set) Asia/Kolkata (+05:30, no daylight saving time) as /etc/localtime.
const SETUP: &str = r#"set -e
fix="$1"; shift
echo "$HOSTNAME_FOR_TEST" > /proc/sys/kernel/hostname
mount -t tmpfs tmpfs /run
cp "$fix/utmp" /run/utmp
mount --bind "$fix/os-release" /etc/os-release
# Mounted over what /etc/localtime points to (Etc/UTC here), so only when asked.
if [ -n "$LOCALTIME_FOR_TEST" ]; then mount --bind "$LOCALTIME_FOR_TEST" /etc/localtime; fi
exec "$@"
"#;

/// glibc's utmp record on this machine (x86_64's layout; other layouts are checked by
/// the unit tests of agent/src/guest/users.rs).
fn utmp_record(ut_type: i16, user: &str, sec: i32, usec: i32) -> Vec<u8> {
    assert_eq!(std::env::consts::ARCH, "x86_64", "this fixture writes x86_64's utmp layout");
    let mut r = vec![0u8; 384];
    r[0..2].copy_from_slice(&ut_type.to_ne_bytes());
    r[8..8 + 5].copy_from_slice(b"pts/0");
    r[44..44 + user.len()].copy_from_slice(user.as_bytes());
    r[340..344].copy_from_slice(&sec.to_ne_bytes());
    r[344..348].copy_from_slice(&usec.to_ne_bytes());
    r
}

fn fixtures(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let mut utmp = Vec::new();
    utmp.extend(utmp_record(2, "reboot", 1_700_000_000, 0)); // BOOT_TIME
    utmp.extend(utmp_record(7, "alice", 1_700_000_100, 500_000)); // USER_PROCESS
    utmp.extend(utmp_record(6, "LOGIN", 1_700_000_000, 0)); // LOGIN_PROCESS
    utmp.extend(utmp_record(7, "bob", 1_700_000_200, 0));
    utmp.extend(utmp_record(7, "alice", 1_700_000_050, 250_000)); // earlier: this one counts
    utmp.extend(utmp_record(8, "carol", 1_700_000_000, 0)); // DEAD_PROCESS
    fs::write(dir.join("utmp"), utmp).unwrap();
    // qemu-ga's unquoting, quirks included: single quotes are not quotes, an unquoted value
    // ends at a space or semicolon, escapes in double quotes.
    fs::write(
        dir.join("os-release"),
        "# a comment\n\
         PRETTY_NAME=\"Test \\\"Linux\\\" 1.0 \\$X\"\n\
         NAME='Test Linux'\n\
         VERSION_ID=1.0;beta\n\
         VERSION=\"1.0 (Test)\"\n\
         ID=testlinux\n\
           VARIANT = \"Server Edition\"\n\
         VARIANT_ID=server x\n",
    )
    .unwrap();
}

/// One agent in its namespace, killed in Drop.
struct Agent {
    name: &'static str,
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(name: &'static str, dir: &Path, fix: &Path, program: &Path, args: &[String], tz: Option<&str>) -> Agent {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let logf = fs::File::create(&log).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--uts", "--propagation", "private", "sh", "-c", SETUP, "sh"])
            .arg(fix)
            .arg(program)
            .args(args.iter().map(|a| a.replace("{socket}", &socket.display().to_string())))
            .env("HOSTNAME_FOR_TEST", HOST_NAME)
            .env_remove("TZ")
            .env_remove("QGA_OS_RELEASE")
            .envs(tz.map(|tz| ("TZ", tz)))
            // The /etc/localtime fixture, unless the test sets $TZ (whose "UTC" would then
            // read the fixture: glibc opens zoneinfo/UTC, GLib knows UTC without a file).
            .env("LOCALTIME_FOR_TEST", if tz.is_some() { "" } else { "/usr/share/zoneinfo/Asia/Kolkata" })
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{name} exited ({st}) before listening:\n{}", fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "{name} did not listen within 30 s");
            thread::sleep(Duration::from_millis(25));
        }
        // qemu-ga serves one client at a time: let it see the probe connection go.
        thread::sleep(Duration::from_millis(200));
        Agent { name, child, socket, log }
    }

    fn client(&self) -> QgaClient {
        QgaClient::connect(&self.socket).unwrap_or_else(|e| panic!("connect to {}: {}", self.name, chain(&e)))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- {} log:\n{}", self.name, fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// How the two agents' replies to a read-only platform command are compared: the same keys
/// and JSON types everywhere (numbers being one type: QEMU prints an integral double, such as
/// a login time, as an integer; a client reads numbers), and the same values except where they
/// move between the calls.
fn comparison(cmd: &str) -> Compare {
    let c = Compare::new("qemu-ga", "vssd").numbers_alike();
    match cmd {
        // The clock moves between the two calls.
        "guest-get-time" => c.check("", Check::Shape),
        // Counters move; names, MACs, addresses and prefixes must agree.
        "guest-network-get-interfaces" => c.check("return[].statistics", Check::Shape),
        _ => c,
    }
}

const COMMANDS: &[&str] = &[
    "guest-get-time",
    "guest-get-timezone",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-users",
    "guest-get-vcpus",
    "guest-get-memory-blocks",
    "guest-get-memory-block-info",
    "guest-network-get-interfaces",
];

/// Requests whose error replies must be the same (class and text).
fn bad_requests() -> Vec<(&'static str, Value)> {
    vec![
        ("guest-get-time", json!({"x": 1})),
        ("guest-get-osinfo", json!({"all": true})),
        ("guest-network-get-interfaces", json!({"name": "lo"})),
        ("guest-get-users", json!({"": null})),
    ]
}

/// The two agents' start arguments, for a sandbox directory.
fn agents(dir: &Path) -> [(&'static str, PathBuf, Vec<String>); 2] {
    let p = |s: &str| dir.join(s).display().to_string();
    for d in ["qemu-ga-state", "vssd-state", "vssd-scope", "vssd-hooks"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    [
        (
            "qemu-ga",
            PathBuf::from("/usr/sbin/qemu-ga"),
            [
                "-m",
                "unix-listen",
                "-p",
                "{socket}",
                "-t",
                &p("qemu-ga-state"),
                &format!("--block-rpcs={QEMU_GA_BLOCKED}"),
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "vssd",
            bin("vssd"),
            [
                "--channel",
                "unix:{socket}",
                "--scope",
                &p("vssd-scope"),
                "--state-dir",
                &p("vssd-state"),
                "--hooks-dir",
                &p("vssd-hooks"),
                "--freeze-deadline",
                "10",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ]
}

/// `$TZ` as both agents read it: zone names, a POSIX rule, a fixed offset. GLib and glibc
/// must agree on each (the zone abbreviation and the offset now).
#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn the_time_zone_from_tz_agrees_with_qemu_ga() {
    require_root!();
    assert!(Path::new("/usr/sbin/qemu-ga").is_file(), "qemu-ga is missing: run tests/setup.sh");
    assert!(Path::new("/usr/share/zoneinfo/America/New_York").is_file(), "tzdata is missing: apt-get install tzdata");
    let dir = tempfile::Builder::new().prefix("vssd-test-qga_tz-").tempdir_in("/tmp").unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let fix = dir.join("fixtures");
    fixtures(&fix);
    let mut diffs = Vec::new();
    for tz in ["America/New_York", "Europe/Paris", "EST5EDT,M3.2.0,M11.1.0", "<+0330>-3:30", "UTC"] {
        let got: Vec<Value> = agents(&dir)
            .iter()
            .map(|(name, prog, args)| {
                let a = Agent::start(name, &dir, &fix, prog, args, Some(tz));
                a.client().call("guest-get-timezone", None)
            })
            .collect();
        eprintln!("TZ={tz}: qemu-ga {}, vssd {}", got[0], got[1]);
        assert!(got[0].get("return").is_some(), "TZ={tz}: qemu-ga answered {}", got[0]);
        if got[0] != got[1] {
            diffs.push(format!("TZ={tz}: qemu-ga {}, vssd {}", got[0], got[1]));
        }
    }
    assert!(diffs.is_empty(), "vssd's time zone differs from qemu-ga's:\n{}", diffs.join("\n"));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_answers_the_platform_commands_like_qemu_ga() {
    require_root!();
    assert!(
        Path::new("/usr/sbin/qemu-ga").is_file(),
        "qemu-ga is missing: run tests/setup.sh (it installs qemu-guest-agent, never as a service)"
    );
    assert!(
        Path::new("/usr/share/zoneinfo/Asia/Kolkata").is_file(),
        "tzdata is missing (/usr/share/zoneinfo/Asia/Kolkata): apt-get install tzdata"
    );
    let dir = tempfile::Builder::new().prefix("vssd-test-qga_platform-").tempdir_in("/tmp").unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let fix = dir.join("fixtures");
    fixtures(&fix);
    let replies = |agent: &Agent| -> (Vec<Value>, Vec<Value>, Value) {
        let mut c = agent.client();
        let ok: Vec<Value> = COMMANDS.iter().map(|cmd| c.call(cmd, None)).collect();
        let bad: Vec<Value> = bad_requests().into_iter().map(|(cmd, a)| c.call(cmd, Some(a))).collect();
        let info = c.call("guest-info", None);
        (ok, bad, info)
    };
    let [from_qga, from_vssd] =
        agents(&dir).map(|(name, prog, args)| replies(&Agent::start(name, &dir, &fix, &prog, &args, None)));

    let mut diffs = Vec::new();
    for (i, cmd) in COMMANDS.iter().enumerate() {
        let (q, v) = (&from_qga.0[i], &from_vssd.0[i]);
        let short = |x: &Value| x.to_string().chars().take(700).collect::<String>();
        eprintln!("{cmd}:\n  qemu-ga: {}\n  vssd:    {}", short(q), short(v));
        assert!(q.get("return").is_some(), "{cmd}: qemu-ga answered {q}");
        diffs.extend(comparison(cmd).diff(q, v).into_iter().map(|d| format!("{cmd}: {d}")));
    }
    for (i, (cmd, args)) in bad_requests().iter().enumerate() {
        let (q, v) = (&from_qga.1[i], &from_vssd.1[i]);
        if q != v {
            diffs.push(format!("{cmd} {args}:\n  qemu-ga: {q}\n  vssd:    {v}"));
        }
    }
    // guest-info: each platform command is listed, enabled, with qemu-ga's success-response.
    let listed = |info: &Value, name: &str| -> Option<Value> {
        info["return"]["supported_commands"].as_array()?.iter().find(|c| c["name"] == name).cloned()
    };
    for name in COMMANDS.iter().copied().chain([
        "guest-set-time",
        "guest-shutdown",
        "guest-suspend-disk",
        "guest-suspend-ram",
        "guest-suspend-hybrid",
    ]) {
        let (q, v) = (listed(&from_qga.2, name), listed(&from_vssd.2, name));
        let (Some(q), Some(v)) = (q, v) else {
            diffs.push(format!(
                "guest-info {name}: qemu-ga lists {:?}, vssd {:?}",
                listed(&from_qga.2, name),
                listed(&from_vssd.2, name)
            ));
            continue;
        };
        if q["success-response"] != v["success-response"] {
            diffs.push(format!("guest-info {name}: qemu-ga {q}, vssd {v}"));
        }
        // qemu-ga reports its blocked commands as disabled; vssd runs them all.
        assert_eq!(v["enabled"], json!(true), "{v}");
    }
    assert!(diffs.is_empty(), "vssd differs from qemu-ga:\n{}", diffs.join("\n"));

    // And the fixtures were seen, so the agreement is about them, not about defaults.
    let ret = |i: usize| from_vssd.0[i]["return"].clone();
    assert_eq!(ret(3), json!({"host-name": HOST_NAME}));
    assert_eq!(ret(1), json!({"zone": "IST", "offset": 19800}));
    assert_eq!(
        ret(4),
        json!([{"user": "alice", "login-time": 1_700_000_050.25}, {"user": "bob", "login-time": 1_700_000_200}])
    );
    assert_eq!(ret(2)["name"], "'Test");
    assert_eq!(ret(2)["pretty-name"], "Test \"Linux\" 1.0 $X");
    assert!(ret(8)
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "lo" && i["hardware-address"] == "00:00:00:00:00:00"));
}

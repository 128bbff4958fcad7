//! VM tier, libvirt: the `virsh` commands an admin runs against a guest agent (`domfsinfo`,
//! `domifaddr --source agent`, `guestinfo`, `domtime`, `shutdown --mode agent`) succeed with
//! vssd as the agent and show what they show with qemu-ga, in a real libvirtd (Debian 12's
//! libvirt 9.0) running a TCG domain of the test guest. Two boots of the same domain
//! definition: one with qemu-ga, one with vssd.
//!
//! What libvirtd needed here (a Debian 12 container, root, no systemd as PID 1, no AppArmor):
//! - the packages libvirt-daemon-system and libvirt-clients (tests/setup.sh; the QEMU driver,
//!   libvirt-daemon-driver-qemu, comes as a dependency even with --no-install-recommends);
//!   their services are not started by the package without systemd;
//! - virtlogd started by hand before libvirtd (nothing socket-activates it): the QEMU driver
//!   writes the domain's log and its file chardevs (console, acks port) through it;
//! - libvirtd started by hand, Debian's default configuration: no dbus-daemon (libvirtd runs
//!   without a system bus: it registers no machine with systemd-machined when systemd is not
//!   PID 1, and the default network, which needs firewalld or iptables, is not started), no
//!   private config (the security drivers found are `none` and `dac`: no AppArmor here);
//! - /dev/kvm given to the group kvm, mode 0660 (tests/setup.sh; udev does it elsewhere): it
//!   was root's alone, so libvirtd found KVM "enabled when probed, not available now" for its
//!   QEMU user and probed QEMU again for nearly every command (a `virsh define` took 30 s);
//! - the domain's files in a 0755 directory of their own: QEMU runs as libvirt-qemu and
//!   dynamic_ownership (the default) chowns the images, kernel and initrd to it and back;
//! - `<domain type='qemu'>` (TCG) with direct kernel boot, `<interface type='user'>`: no
//!   bridge, no dnsmasq.
//!
//! Where libvirtd already runs as a service, the test uses it and starts nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tests::libvirt::{parse_fields, parse_table, virsh, virsh_with_limit, Domain, DomainOpts, Libvirtd};
use tests::require_libvirt;

/// How far the guest's clock (as `virsh domtime` reads it) may be from the host's.
const TIME_TOLERANCE_S: i64 = 5;

/// How long `virsh shutdown --mode agent` may take to bring the domain to "shut off".
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(60);

/// The guestinfo categories, each also asked alone: `virsh guestinfo` without flags silently
/// skips a category whose command the agent does not have; with a flag it fails instead.
const CATEGORIES: [&str; 7] = ["--user", "--os", "--timezone", "--hostname", "--filesystem", "--disk", "--interface"];

/// What virsh showed with one agent.
struct Observed {
    agent: &'static str,
    /// `domfsinfo`: its rows, sorted.
    fsinfo: Result<Vec<Vec<String>>, String>,
    /// `domifaddr --source agent --full`: its rows, sorted.
    ifaddr: Result<Vec<Vec<String>>, String>,
    /// `guestinfo`: its fields, with the numbered entries in a canonical order.
    guestinfo: Result<BTreeMap<String, String>, String>,
    /// `guestinfo FLAG` for each category: ok or the error.
    categories: Vec<(&'static str, Result<(), String>)>,
    /// `domtime`: guest time minus host time, seconds.
    time_offset: Result<i64, String>,
    /// `shutdown --mode agent`: how long until "shut off".
    shutdown: Result<Duration, String>,
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = virsh(args);
    if out.code == Some(0) {
        eprintln!("[virsh {}]\n{}", args.join(" "), out.stdout.trim_end());
        Ok(out.stdout)
    } else {
        eprintln!("[virsh {}] failed ({:?}): {}", args.join(" "), out.code, out.stderr.trim());
        Err(format!("exit {:?}: {}", out.code, out.stderr.trim()))
    }
}

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Waits (at most 30 s) until eth0 has its SLAAC address from QEMU's user network (fec0::/64),
/// which comes with a router advertisement some time after the link is up: both boots must be
/// compared with the same addresses. Asks the agent under test; if it never shows one, the
/// comparison says so.
fn wait_for_slaac(d: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = virsh(&["domifaddr", d, "--source", "agent", "--full"]);
        if out.code != Some(0) {
            return;
        }
        let slaac = parse_table(&out.stdout)
            .iter()
            .any(|r| r.first().map(String::as_str) == Some("eth0") && r.get(3).is_some_and(|a| a.starts_with("fec0:")));
        if slaac {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("[{d}] no SLAAC address on eth0 within 30 s");
}

/// Replaces each `user.N.login-time` (ms) by a mark when it falls within this boot (the guest's
/// init writes the login record while it boots, so it differs between boots); leaves it, for
/// the comparison to show, when it does not.
fn login_times_checked(fields: Vec<(String, String)>, (start, ready): (i64, i64)) -> Vec<(String, String)> {
    let slack = 1000 * TIME_TOLERANCE_S;
    fields
        .into_iter()
        .map(|(k, v)| match v.parse::<i64>() {
            Ok(t)
                if k.starts_with("user.")
                    && k.ends_with(".login-time")
                    && (start - slack..=ready + slack).contains(&t) =>
            {
                (k, "(during this boot)".to_string())
            }
            _ => (k, v),
        })
        .collect()
}

fn sorted(mut rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.sort();
    rows
}

/// Boots the guest under libvirt with `agent`, runs the virsh commands, shuts it down.
fn observe(lv: &Libvirtd, agent: &'static str) -> Observed {
    let dom = Domain::define(lv, agent, &DomainOpts { agent, ..Default::default() });
    let boot_start_ms = now_ms();
    dom.start(Duration::from_secs(180));
    let boot = (boot_start_ms, now_ms());
    let d = dom.name.as_str();
    eprintln!("=== {agent}");
    wait_for_slaac(d);

    let fsinfo = run(&["domfsinfo", d]).map(|o| sorted(parse_table(&o)));
    let ifaddr = run(&["domifaddr", d, "--source", "agent", "--full"]).map(|o| sorted(parse_table(&o)));
    let guestinfo = run(&["guestinfo", d]).map(|o| canonical(&login_times_checked(parse_fields(&o), boot)));
    // Quiet on success: the plain guestinfo above printed the same fields.
    let categories = CATEGORIES
        .iter()
        .map(|c| {
            let out = virsh(&["guestinfo", d, c]);
            let r =
                if out.code == Some(0) { Ok(()) } else { Err(format!("exit {:?}: {}", out.code, out.stderr.trim())) };
            (*c, r)
        })
        .collect();
    let before = now_s();
    let time_offset = run(&["domtime", d]).and_then(|o| {
        let after = now_s();
        let t: i64 = parse_fields(&o)
            .iter()
            .find(|(k, _)| k == "Time")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| format!("no `Time: N` in {o:?}"))?;
        // The host's time at the middle of the call.
        Ok(t - (before + after) / 2)
    });

    let t0 = Instant::now();
    let shutdown = match virsh_with_limit(&["shutdown", d, "--mode", "agent"], Duration::from_secs(90)) {
        out if out.code != Some(0) => Err(format!("exit {:?}: {}", out.code, out.stderr.trim())),
        _ if dom.wait_state("shut off", SHUTDOWN_LIMIT) => Ok(t0.elapsed()),
        _ => Err(format!("accepted, but the domain is still `{}` after {SHUTDOWN_LIMIT:?}", dom.state())),
    };
    eprintln!("[virsh shutdown {d} --mode agent] {shutdown:?}");
    if shutdown.is_err() {
        eprintln!("--- console of {d}:\n{}--- end", dom.console());
    }
    Observed { agent, fsinfo, ifaddr, guestinfo, categories, time_offset, shutdown }
}

/// guestinfo's fields with every numbered list (`fs.N.*`, `fs.N.disk.M.*`, `if.N.addr.M.*`,
/// `user.N.*`, `disk.N.*`) sorted by its entries' contents and renumbered: the two agents may
/// list mounts, users or addresses in another order, and nobody relies on that order.
fn canonical(fields: &[(String, String)]) -> BTreeMap<String, String> {
    #[derive(Default)]
    struct Node {
        value: Option<String>,
        named: BTreeMap<String, Node>,
        numbered: BTreeMap<u64, Node>,
    }
    fn insert(node: &mut Node, path: &[&str], v: &str) {
        match path.split_first() {
            None => node.value = Some(v.to_string()),
            Some((first, rest)) => {
                let child = match first.parse::<u64>() {
                    Ok(i) => node.numbered.entry(i).or_default(),
                    Err(_) => node.named.entry(first.to_string()).or_default(),
                };
                insert(child, rest, v)
            }
        }
    }
    // Flattens `node` under `prefix`, numbered children in the order of their flattened text.
    fn flatten(node: &Node, prefix: &str, out: &mut Vec<(String, String)>) {
        let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
        if let Some(v) = &node.value {
            out.push((prefix.to_string(), v.clone()));
        }
        for (k, child) in &node.named {
            flatten(child, &join(k), out);
        }
        let mut entries: Vec<Vec<(String, String)>> = node
            .numbered
            .values()
            .map(|child| {
                let mut e = Vec::new();
                flatten(child, "", &mut e);
                e
            })
            .collect();
        entries.sort();
        for (i, e) in entries.into_iter().enumerate() {
            for (k, v) in e {
                let key = if k.is_empty() { join(&i.to_string()) } else { join(&format!("{i}.{k}")) };
                out.push((key, v));
            }
        }
    }
    let mut root = Node::default();
    for (k, v) in fields {
        insert(&mut root, &k.split('.').collect::<Vec<_>>(), v);
    }
    let mut out = Vec::new();
    flatten(&root, "", &mut out);
    out.into_iter().collect()
}

/// The differences between two sets of rows, one line each.
fn row_diffs(what: &str, ours: &[Vec<String>], theirs: &[Vec<String>]) -> Vec<String> {
    let mut d = Vec::new();
    for r in ours.iter().filter(|r| !theirs.contains(r)) {
        d.push(format!("{what}: only with vssd:    {}", r.join("  ")));
    }
    for r in theirs.iter().filter(|r| !ours.contains(r)) {
        d.push(format!("{what}: only with qemu-ga: {}", r.join("  ")));
    }
    d
}

/// The differences between two guestinfo field maps, one line each; a category (`fs`, `if`,
/// ...) that one side lacks altogether is one line.
fn field_diffs(ours: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>) -> Vec<String> {
    let category = |k: &str| k.split('.').next().unwrap_or_default().to_string();
    let has = |m: &BTreeMap<String, String>, c: &str| m.keys().any(|k| category(k) == c);
    let mut d = Vec::new();
    let mut whole = std::collections::BTreeSet::new();
    for (side, m, other) in [("vssd", ours, theirs), ("qemu-ga", theirs, ours)] {
        for c in m.keys().map(|k| category(k)) {
            if !has(other, &c) && whole.insert(c.clone()) {
                let n = m.keys().filter(|k| category(k) == c).count();
                d.push(format!("guestinfo: {c}.*: only with {side} ({n} fields)"));
            }
        }
    }
    for (k, v) in ours.iter().filter(|(k, _)| !whole.contains(&category(k))) {
        match theirs.get(k) {
            None => d.push(format!("guestinfo: {k}: only with vssd ({v})")),
            Some(t) if t != v => d.push(format!("guestinfo: {k}: vssd {v:?}, qemu-ga {t:?}")),
            Some(_) => {}
        }
    }
    for (k, t) in theirs.iter().filter(|(k, _)| !whole.contains(&category(k)) && !ours.contains_key(*k)) {
        d.push(format!("guestinfo: {k}: only with qemu-ga ({t})"));
    }
    d
}

/// Every way the vssd boot differs from the qemu-ga boot, or fails where it must succeed.
fn compare(ours: &Observed, theirs: &Observed) -> Vec<String> {
    let mut d = Vec::new();
    let pair = |what: &str, o: &Result<Vec<Vec<String>>, String>, t: &Result<Vec<Vec<String>>, String>| match (o, t) {
        (Ok(o), Ok(t)) => row_diffs(what, o, t),
        (Err(e), _) => vec![format!("{what} failed with vssd: {e}")],
        (_, Err(e)) => vec![format!("{what} failed with qemu-ga (the reference): {e}")],
    };
    d.extend(pair("domfsinfo", &ours.fsinfo, &theirs.fsinfo));
    d.extend(pair("domifaddr --source agent", &ours.ifaddr, &theirs.ifaddr));
    match (&ours.guestinfo, &theirs.guestinfo) {
        (Ok(o), Ok(t)) => d.extend(field_diffs(o, t)),
        (Err(e), _) => d.push(format!("guestinfo failed with vssd: {e}")),
        (_, Err(e)) => d.push(format!("guestinfo failed with qemu-ga (the reference): {e}")),
    }
    for (obs, who) in [(ours, "vssd"), (theirs, "qemu-ga")] {
        for (flag, r) in &obs.categories {
            if let Err(e) = r {
                d.push(format!("guestinfo {flag} failed with {who}: {e}"));
            }
        }
        match &obs.time_offset {
            Ok(off) if off.abs() > TIME_TOLERANCE_S => d.push(format!(
                "domtime with {who}: the guest is {off} s off the host (tolerance {TIME_TOLERANCE_S} s)"
            )),
            Ok(_) => {}
            Err(e) => d.push(format!("domtime failed with {who}: {e}")),
        }
        if let Err(e) = &obs.shutdown {
            d.push(format!("shutdown --mode agent with {who}: {e}"));
        }
    }
    d
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn virsh_agent_commands_show_the_same_with_vssd_as_with_qemu_ga() {
    require_libvirt!();
    let lv = Libvirtd::ensure();
    let theirs = observe(&lv, "qemu-ga");
    let ours = observe(&lv, "vssd");
    assert_eq!((ours.agent, theirs.agent), ("vssd", "qemu-ga"));
    for o in [&theirs, &ours] {
        eprintln!(
            "[{}] domtime offset {:?} s, shutdown --mode agent {:?}",
            o.agent,
            o.time_offset,
            o.shutdown.as_ref().map(|t| format!("{:.1} s", t.as_secs_f64()))
        );
    }
    let diffs = compare(&ours, &theirs);
    for l in &diffs {
        eprintln!("DIFF {l}");
    }
    assert!(
        diffs.is_empty(),
        "virsh shows vssd differently from qemu-ga ({} differences):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn canonical_guestinfo_ignores_the_order_of_numbered_entries() {
    let a = fields(&[
        ("fs.count", "2"),
        ("fs.0.name", "vdb1"),
        ("fs.0.disk.0.alias", "vdb"),
        ("fs.1.name", "vda1"),
        ("fs.1.disk.0.alias", "vda"),
    ]);
    let b = fields(&[
        ("fs.count", "2"),
        ("fs.0.name", "vda1"),
        ("fs.0.disk.0.alias", "vda"),
        ("fs.1.name", "vdb1"),
        ("fs.1.disk.0.alias", "vdb"),
    ]);
    assert_eq!(canonical(&a), canonical(&b));
    assert_eq!(canonical(&a).get("fs.0.disk.0.alias").map(String::as_str), Some("vda"));
    let c = fields(&[("fs.count", "2"), ("fs.0.name", "vda1"), ("fs.1.name", "vdb2")]);
    assert_ne!(canonical(&a), canonical(&c));
}

#[test]
fn field_diffs_name_each_differing_field_and_a_missing_category_once() {
    let ours = canonical(&fields(&[("hostname", "vmtest"), ("os.id", "debian")]));
    let theirs =
        canonical(&fields(&[("hostname", "other"), ("os.id", "debian"), ("fs.count", "1"), ("fs.0.name", "vda1")]));
    assert_eq!(
        field_diffs(&ours, &theirs),
        ["guestinfo: fs.*: only with qemu-ga (2 fields)", "guestinfo: hostname: vssd \"vmtest\", qemu-ga \"other\""]
    );
}

#[test]
fn a_login_time_counts_as_the_same_only_within_its_boot() {
    let f = fields(&[("user.0.login-time", "1000000"), ("user.1.login-time", "9000000"), ("user.0.name", "vmtest")]);
    let checked = login_times_checked(f, (990_000, 1_010_000));
    assert_eq!(checked[0].1, "(during this boot)");
    assert_eq!(checked[1].1, "9000000");
    assert_eq!(checked[2].1, "vmtest");
}

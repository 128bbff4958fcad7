//! The Debian packages `packaging/build-debs.sh` makes: what each one installs (`dpkg-deb -c`),
//! its control data (`dpkg-deb -I`), that a C program builds with the pkg-config files of
//! libappvss-dev against the shared library of libappvss0 (its SONAME, shlibs and ldconfig
//! trigger) and against the static one, that `lintian` finds no error in any of them, and that the upgrade's wait
//! (`vssd-wait-thawed`, run by the maintainer scripts) holds a restart until vssd has thawed.
//!
//! Nothing here installs a package: its postinst would start an agent on this machine.
//! Installing, upgrading and purging are tested in the systemd guest (vm_systemd).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tests::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// The packages, by name, built once per test process (a release build: minutes the first time).
fn debs() -> &'static BTreeMap<String, PathBuf> {
    static DEBS: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    DEBS.get_or_init(|| {
        let script = workspace().join("packaging/build-debs.sh");
        let started = Instant::now();
        let out = run_with_limit(Command::new(&script), Duration::from_secs(40 * 60));
        out.expect_code(0, "packaging/build-debs.sh");
        eprintln!("build-debs.sh took {:.0} s; its log:\n{}", started.elapsed().as_secs_f64(), out.stderr);
        let mut debs = BTreeMap::new();
        for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
            let p = workspace().join(line.trim());
            assert!(p.is_file(), "build-debs.sh printed {line:?}, which is no file");
            let name = field(&p, "Package");
            debs.insert(name, p);
        }
        debs
    })
}

fn deb(name: &str) -> &'static Path {
    debs().get(name).unwrap_or_else(|| panic!("build-debs.sh made no {name} package; it made {:?}", debs().keys()))
}

/// `dpkg-deb -c`: the paths the package installs, as `/usr/sbin/vssd`, with their modes.
fn contents(deb: &Path) -> BTreeMap<String, String> {
    run("dpkg-deb", &[OsStr::new("-c"), deb.as_os_str()])
        .lines()
        .filter_map(|l| {
            let mode = l.split_whitespace().next()?.to_string();
            let path = l.split_whitespace().nth(5)?;
            Some((path.trim_start_matches('.').trim_end_matches('/').to_string(), mode))
        })
        .collect()
}

/// A control field (`dpkg-deb -f`).
fn field(deb: &Path, name: &str) -> String {
    run("dpkg-deb", &[OsStr::new("--field"), deb.as_os_str(), OsStr::new(name)]).trim().to_string()
}

/// A control member (`dpkg-deb -I DEB NAME`: conffiles, postinst, ...).
fn control_file(deb: &Path, name: &str) -> String {
    run("dpkg-deb", &[OsStr::new("--info"), deb.as_os_str(), OsStr::new(name)])
}

/// The package's files under a new temporary directory (`dpkg-deb -x`).
fn extract(deb: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    run("dpkg-deb", &[OsStr::new("-x"), deb.as_os_str(), d.path().as_os_str()]);
    d
}

fn assert_ships(files: &BTreeMap<String, String>, deb: &Path, want: &[(&str, &str)]) {
    for (path, mode) in want {
        match files.get(*path) {
            Some(m) => assert_eq!(m, mode, "{} installs {path} with mode {m}, not {mode}", deb.display()),
            None => panic!(
                "{} does not install {path}; it installs:\n{}",
                deb.display(),
                files.keys().cloned().collect::<Vec<_>>().join("\n")
            ),
        }
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_package_installs_the_agent_its_units_rules_and_man_pages() {
    require_root!();
    let d = deb("vssd");
    let files = contents(d);
    let (x, r) = ("-rwxr-xr-x", "-rw-r--r--");
    assert_ships(
        &files,
        d,
        &[
            ("/usr/sbin/vssd", x),
            ("/usr/sbin/vssctl", x),
            ("/usr/bin/appvss", x),
            ("/usr/lib/vssd/vssd-wait-thawed", x),
            ("/etc/vssd/vssd.toml", r),
            ("/etc/vssd/hooks.d/README", r),
            ("/lib/systemd/system/vssd.service", r),
            ("/lib/systemd/system/vssd-qga-backend.service", r),
            ("/lib/udev/rules.d/60-vssd.rules", r),
            ("/usr/lib/tmpfiles.d/vssd.conf", r),
            ("/usr/lib/sysusers.d/vssd.conf", r),
            ("/usr/share/dbus-1/system.d/org.vssd.Agent.conf", r),
            ("/usr/share/man/man8/vssd.8.gz", r),
            ("/usr/share/man/man8/vssctl.8.gz", r),
            ("/usr/share/man/man1/appvss.1.gz", r),
            ("/usr/share/man/man5/vssd.toml.5.gz", r),
            ("/usr/share/doc/vssd/copyright", r),
            ("/usr/share/doc/vssd/changelog.Debian.gz", r),
        ],
    );
    assert_eq!(field(d, "Package"), "vssd");
    assert_eq!(field(d, "Architecture"), "amd64");
    assert!(field(d, "Depends").contains("libc6"), "Depends: {}", field(d, "Depends"));
    // The admin's configuration survives upgrades: dpkg asks before replacing it.
    let conffiles = control_file(d, "conffiles");
    for c in ["/etc/vssd/vssd.toml", "/etc/vssd/hooks.d/README"] {
        assert!(conffiles.lines().any(|l| l == c), "{c} is not a conffile: {conffiles}");
    }
    // An upgrade waits for the thaw before it restarts vssd; a removal before it stops it.
    let postinst = control_file(d, "postinst");
    let wait = postinst.find("vssd-wait-thawed").expect("postinst waits for the thaw");
    let restart = postinst.find("deb-systemd-invoke restart vssd.service").expect("postinst restarts vssd on upgrade");
    assert!(wait < restart, "postinst restarts vssd before it waited for the thaw:\n{postinst}");
    let prerm = control_file(d, "prerm");
    let wait = prerm.find("vssd-wait-thawed").expect("prerm waits for the thaw");
    let stop = prerm.find("deb-systemd-invoke stop").expect("prerm stops vssd on removal");
    assert!(wait < stop, "prerm stops vssd before it waited for the thaw:\n{prerm}");
    // On upgrade the old vssd keeps serving: only a removal stops it.
    assert!(prerm.contains("if [ \"$1\" = remove ]"), "prerm must stop vssd only on removal:\n{prerm}");
    control_file(d, "postrm");

    // The package ships the tree's units and rules, and binaries that run.
    let t = extract(d);
    for (inside, source) in [
        ("lib/systemd/system/vssd.service", "packaging/vssd.service"),
        ("lib/udev/rules.d/60-vssd.rules", "packaging/60-vssd.rules"),
        ("etc/vssd/vssd.toml", "packaging/vssd.toml"),
    ] {
        assert_eq!(
            std::fs::read(t.path().join(inside)).unwrap(),
            std::fs::read(workspace().join(source)).unwrap(),
            "{inside} differs from {source}"
        );
    }
    // The D-Bus policy is the D-Bus interface's own once it exists (a placeholder before).
    let policy = workspace().join("packaging/dbus/org.vssd.Agent.conf");
    if policy.is_file() {
        assert_eq!(
            std::fs::read(t.path().join("usr/share/dbus-1/system.d/org.vssd.Agent.conf")).unwrap(),
            std::fs::read(&policy).unwrap(),
            "the packaged D-Bus policy is not packaging/dbus/org.vssd.Agent.conf"
        );
    }
    // udev starts vssd for each of its channels. For the guest-agent port it assigns
    // SYSTEMD_WANTS, in a file that sorts after qemu-guest-agent's rule for the same port, so
    // that only vssd is started for it.
    let rules = std::fs::read_to_string(t.path().join("lib/udev/rules.d/60-vssd.rules")).unwrap();
    let rules = rules.replace("\\\n", "");
    for device in
        ["ATTR{name}==\"org.vssd.agent.0\"", "ENV{MODALIAS}==\"virtio:d00000013v*\"", "KERNEL==\"vmbus/hv_vss\""]
    {
        assert!(
            rules.lines().any(|l| l.contains(device) && l.contains("ENV{SYSTEMD_WANTS}+=\"vssd.service\"")),
            "60-vssd.rules does not start vssd for {device}:\n{rules}"
        );
    }
    assert!(
        rules.lines().any(|l| l.contains("ATTR{name}==\"org.qemu.guest_agent.0\"")
            && l.contains("ENV{SYSTEMD_WANTS}=\"vssd.service\"")),
        "60-vssd.rules does not take the guest-agent port for vssd alone:\n{rules}"
    );
    // Debian's qemu-guest-agent (tests/setup.sh installs it) wants its own unit for the same
    // port; udev reads that rule first, so vssd's assignment is the one that holds.
    let qga_rule = Path::new("/lib/udev/rules.d/60-qemu-guest-agent.rules");
    let qga = std::fs::read_to_string(qga_rule)
        .unwrap_or_else(|e| panic!("{}: {e}: install qemu-guest-agent (tests/setup.sh)", qga_rule.display()));
    assert!(qga.contains("org.qemu.guest_agent.0") && qga.contains("SYSTEMD_WANTS"), "{qga}");
    assert!(qga_rule.file_name().unwrap() < OsStr::new("60-vssd.rules"));
    let v = run(t.path().join("usr/sbin/vssd").to_str().unwrap(), &["--version"]);
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "vssd --version: {v}");
    // vssd reads the packaged configuration as it is.
    let cfg = t.path().join("etc/vssd/vssd.toml");
    run(
        t.path().join("usr/sbin/vssd").to_str().unwrap(),
        &[OsStr::new("--config"), cfg.as_os_str(), OsStr::new("--print-config")],
    );
    // The man pages render without a warning from man (groff).
    for page in ["man8/vssd.8.gz", "man8/vssctl.8.gz", "man1/appvss.1.gz", "man5/vssd.toml.5.gz"] {
        let p = t.path().join("usr/share/man").join(page);
        let mut cmd = Command::new("man");
        cmd.arg("--warnings").arg("-l").arg(&p).env("MANWIDTH", "80").env("MAN_KEEP_STDERR", "1");
        let o = run_with_limit(cmd, Duration::from_secs(60));
        o.expect_code(0, page);
        // As lintian does, typesetting notes that depend on the width are not errors.
        let warnings: Vec<&str> = o
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("adjust line") && !l.contains("break line"))
            .collect();
        assert!(warnings.is_empty(), "man warns about {page}:\n{}", warnings.join("\n"));
        assert!(o.stdout.contains("NAME"), "{page} has no NAME section:\n{}", o.stdout);
    }
}

/// `readelf -d`'s dynamic section of an ELF file.
fn dynamic(elf: &Path) -> String {
    run("readelf", &[OsStr::new("-d"), elf.as_os_str()])
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn libappvss_dev_builds_a_c_program_through_pkg_config_shared_and_static() {
    require_root!();
    let d = deb("libappvss-dev");
    let files = contents(d);
    let tuple = files
        .keys()
        .find_map(|p| p.strip_prefix("/usr/lib/")?.strip_suffix("/libappvss.a").map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no /usr/lib/<tuple>/libappvss.a: {files:?}", d.display()));
    let r = "-rw-r--r--";
    let pc = format!("/usr/lib/{tuple}/pkgconfig/appvss.pc");
    let pc_static = format!("/usr/lib/{tuple}/pkgconfig/appvss-static.pc");
    let so_link = format!("/usr/lib/{tuple}/libappvss.so");
    assert_ships(
        &files,
        d,
        &[
            ("/usr/include/appvss.h", r),
            (pc.as_str(), r),
            (pc_static.as_str(), r),
            ("/usr/share/doc/libappvss-dev/copyright", r),
        ],
    );
    assert!(
        files.get(&so_link).is_some_and(|m| m.starts_with('l')),
        "{} has no symlink {so_link}: {files:?}",
        d.display()
    );
    assert_eq!(field(d, "Section"), "libdevel");
    assert_eq!(field(d, "Multi-Arch"), "same");
    let version = field(d, "Version");
    assert!(
        field(d, "Depends").contains(&format!("libappvss0 (= {version})")),
        "libappvss-dev must depend on its exact libappvss0: Depends: {}",
        field(d, "Depends")
    );

    // libappvss0: the shared library under its SONAME, its shlibs file and ldconfig trigger.
    let l = deb("libappvss0");
    let lib_files = contents(l);
    let so = format!("/usr/lib/{tuple}/libappvss.so.0");
    assert_ships(&lib_files, l, &[(so.as_str(), r), ("/usr/share/doc/libappvss0/copyright", r)]);
    assert_eq!(field(l, "Section"), "libs");
    assert_eq!(field(l, "Multi-Arch"), "same");
    assert_eq!(field(l, "Version"), version);
    assert!(field(l, "Depends").contains("libc6"), "Depends: {}", field(l, "Depends"));
    assert!(control_file(l, "shlibs").lines().any(|x| x.starts_with("libappvss 0 libappvss0")));
    assert!(control_file(l, "triggers").contains("activate-noawait ldconfig"));

    // Both packages in one tree, as installed; pkg-config reads the packaged files (the
    // sysroot standing in for /).
    let t = extract(d);
    run("dpkg-deb", &[OsStr::new("-x"), l.as_os_str(), t.path().as_os_str()]);
    assert_eq!(
        std::fs::read(t.path().join("usr/include/appvss.h")).unwrap(),
        std::fs::read(workspace().join("appvss/include/appvss.h")).unwrap(),
        "the packaged header is not appvss/include/appvss.h"
    );
    let libdir = t.path().join(format!("usr/lib/{tuple}"));
    assert!(
        dynamic(&libdir.join("libappvss.so.0")).contains("Library soname: [libappvss.so.0]"),
        "libappvss.so.0 has no SONAME libappvss.so.0:\n{}",
        dynamic(&libdir.join("libappvss.so.0"))
    );
    assert!(libdir.join("libappvss.so").exists(), "the -dev symlink libappvss.so points nowhere");
    let pkg_config = |name: &str, what: &str| {
        let mut cmd = Command::new("pkg-config");
        cmd.arg(what)
            .arg(name)
            .env("PKG_CONFIG_PATH", libdir.join("pkgconfig"))
            .env("PKG_CONFIG_SYSROOT_DIR", t.path());
        let o = run_with_limit(cmd, Duration::from_secs(30));
        o.expect_code(0, &format!("pkg-config {what} {name}"));
        o.stdout
    };
    for name in ["appvss", "appvss-static"] {
        assert_eq!(pkg_config(name, "--modversion").trim(), env!("CARGO_PKG_VERSION"));
    }
    let include = format!("-I{}", t.path().join("usr/include").display());
    let build = |name: &str| {
        let flags = format!("{} {}", pkg_config(name, "--cflags"), pkg_config(name, "--libs"));
        let flags: Vec<String> = flags.split_whitespace().map(String::from).collect();
        assert!(flags.contains(&include), "pkg-config {name} gave no {include}: {flags:?}");
        let exe = t.path().join(format!("hold-{name}"));
        let mut cc = Command::new("cc");
        cc.arg("-o").arg(&exe).arg(workspace().join("appvss/examples/c/hold.c")).args(&flags);
        run_with_limit(cc, Duration::from_secs(120))
            .expect_code(0, &format!("cc hold.c $(pkg-config --cflags --libs {name})"));
        (exe, flags)
    };
    // Shared: the program needs libappvss.so.0, which the loader finds in the package's tree.
    let (exe, flags) = build("appvss");
    assert!(flags.iter().any(|f| f == "-lappvss"), "{flags:?}");
    assert!(dynamic(&exe).contains("Shared library: [libappvss.so.0]"), "{}", dynamic(&exe));
    let mut ldd = Command::new("ldd");
    ldd.arg(&exe).env("LD_LIBRARY_PATH", &libdir);
    let o = run_with_limit(ldd, Duration::from_secs(30));
    o.expect_code(0, "ldd hold-appvss");
    let line = o.stdout.lines().find(|l| l.contains("libappvss.so.0")).unwrap_or_default().to_string();
    assert!(line.contains(&*libdir.to_string_lossy()), "ldd: libappvss.so.0 is not the package's: {}", o.stdout);
    // Static: nothing of appvss is loaded at run time.
    let (exe, _) = build("appvss-static");
    assert!(!dynamic(&exe).contains("libappvss"), "the static build needs libappvss at run time:\n{}", dynamic(&exe));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vmctl_package_installs_vmctl_and_its_man_page() {
    require_root!();
    let d = deb("vmctl");
    let files = contents(d);
    assert_ships(
        &files,
        d,
        &[
            ("/usr/bin/vmctl", "-rwxr-xr-x"),
            ("/usr/share/man/man1/vmctl.1.gz", "-rw-r--r--"),
            ("/usr/share/doc/vmctl/copyright", "-rw-r--r--"),
        ],
    );
    assert!(field(d, "Depends").contains("qemu-utils"), "Depends: {}", field(d, "Depends"));
    assert!(!files.keys().any(|p| p.contains("vssd")), "the host package ships guest files: {files:?}");
    let t = extract(d);
    let v = run(t.path().join("usr/bin/vmctl").to_str().unwrap(), &["--version"]);
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "vmctl --version: {v}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn lintian_finds_no_errors_in_the_packages() {
    require_root!();
    let paths: Vec<&Path> = debs().values().map(PathBuf::as_path).collect();
    assert_eq!(paths.len(), 4, "{:?}", debs());
    let mut cmd = Command::new("lintian");
    cmd.args(["--tag-display-limit", "0"]).args(&paths);
    let o = run_with_limit(cmd, Duration::from_secs(600));
    // Its warnings and notes are in the test log (--nocapture), for the report.
    eprintln!("lintian:\n{}{}", o.stdout, o.stderr);
    let errors: Vec<&str> = o.stdout.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian reports errors:\n{}", errors.join("\n"));
    // lintian exits 2 when it could not check a package at all.
    assert!(matches!(o.code, Some(0) | Some(1)), "lintian failed: {o:?}");
}

/// The upgrade's wait: while vssd holds a freeze, `vssd-wait-thawed` (which postinst runs before
/// `restart`, prerm before `stop`) returns only once vssd has thawed, and at once when it is thawed.
#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn upgrade_wait_returns_only_after_vssd_thawed() {
    require_root!();
    let sb = Sandbox::new("pkg_wait");
    let e = sb.ext4("e");
    let vssd = Vssd::builder(&sb).deadline(10).grace(1).start();
    let script = workspace().join("packaging/vssd-wait-thawed");
    let wait = || {
        let mut cmd = Command::new(&script);
        cmd.arg("restarting vssd for the test").env("VSSCTL", bin("vssctl")).env("VSSD_SOCKET", sb.control_socket());
        let t = Instant::now();
        (run_with_limit(cmd, Duration::from_secs(60)), t.elapsed())
    };

    let (o, took) = wait();
    o.expect_code(0, "vssd-wait-thawed while thawed");
    assert!(took < Duration::from_secs(3) && o.stderr.is_empty(), "thawed: no wait, no message: {took:?} {o:?}");

    vssd.vssctl(&["freeze", "--deadline", "10"]).expect_code(0, "vssctl freeze");
    assert!(frozen_by_someone(&e), "{} not frozen", e.display());
    let socket = sb.control_socket();
    let thawer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        vssctl(&socket, &["thaw"])
    });
    let (o, took) = wait();
    let thawed = thawer.join().expect("thaw thread");
    thawed.expect_code(0, "vssctl thaw");
    o.expect_code(0, "vssd-wait-thawed while frozen");
    assert!(took >= Duration::from_secs(3), "returned after {took:?}, while vssd was still frozen: {o:?}");
    assert!(took < Duration::from_secs(10), "returned {took:?} after a thaw at 3 s: {o:?}");
    assert!(o.stderr.contains("vssd holds a freeze: waiting"), "{o:?}");
    assert!(o.stderr.contains("vssd thawed after"), "{o:?}");
    assert!(!frozen_by_someone(&e));
}

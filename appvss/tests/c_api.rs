//! The C ABI from C: the committed header is what cbindgen makes of `src/capi.rs` (so it
//! cannot drift), and `examples/c/hold.c`, compiled with `cc` against the header and the
//! static library (which the test builds first), holds a freeze of a scripted vssd.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use support::{Server, WAIT};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generated_header() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/capi.rs"))
        .generate()
        .expect("cbindgen cannot read src/capi.rs");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn header_is_what_cbindgen_generates() {
    let path = crate_dir().join("include/appvss.h");
    let fresh = generated_header();
    if std::env::var_os("APPVSS_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is not what cbindgen makes of src/capi.rs: regenerate it with\n  \
         APPVSS_BLESS=1 cargo test -p appvss --test c_api header\nand commit it.\n--- generated:\n{fresh}",
        path.display()
    );
}

/// `target/<profile>`, where cargo puts libappvss.a next to the binaries.
fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_appvss")).parent().unwrap().to_path_buf()
}

/// The static library, built by this test: `cargo test` builds the crate as a Rust library
/// only, so a libappvss.a lying in the profile directory would be one an earlier
/// `cargo build` left, perhaps of older code. The build runs once per test process, with the
/// cargo, target directory and profile of this test; it is quick when nothing changed.
fn static_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let profile_dir = profile_dir();
        let target_dir = profile_dir.parent().expect("the profile directory is inside the target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(p) => p,
            None => panic!("no profile in {}", profile_dir.display()),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(&cargo)
            .args(["build", "--quiet", "-p", "appvss", "--lib", "--profile", profile, "--manifest-path"])
            .arg(crate_dir().join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", target_dir)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
        assert!(status.success(), "cargo build -p appvss --lib failed");
        let lib = profile_dir.join("libappvss.a");
        assert!(lib.is_file(), "cargo build -p appvss --lib made no {}", lib.display());
        lib
    })
}

/// Compiles a C file against the header and the static library.
fn compile_c(source: &Path, out: &Path) {
    let lib = static_lib();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(source)
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc} (a C compiler is needed for this test): {e}"));
    assert!(status.success(), "{cc} failed on {}", source.display());
}

#[test]
fn c_example_registers_holds_and_releases_at_thaw() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hold");
    compile_c(&crate_dir().join("examples/c/hold.c"), &exe);
    let child = Command::new(&exe)
        .args(["--name", "c-example", "--socket"])
        .arg(server.path())
        .arg("--once")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, hello) = server.register(11);
    assert_eq!(hello["name"], "c-example");
    conn.prepare(1, 42, 5000);
    assert_eq!(conn.expect("ready")["re"], 1);
    conn.freeze(2, 42, 10000, 60000);
    assert_eq!(conn.expect("held")["re"], 2);
    conn.expect_silence(Duration::from_millis(200));
    conn.thaw(3, 42, "completed");
    assert_eq!(conn.expect("thawed")["re"], 3);
    conn.expect_closed();
    let out = wait_output(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hold.c failed: {out:?}");
    for want in
        ["connected app_id=11", "prepare freeze_id=42", "held freeze_id=42", "thaw freeze_id=42 release=completed"]
    {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
}

#[test]
fn c_example_vetoes_with_its_reason() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("hold");
    compile_c(&crate_dir().join("examples/c/hold.c"), &exe);
    let child = Command::new(&exe)
        .args(["--name", "vetoer", "--veto", "nightly batch running", "--once", "--socket"])
        .arg(server.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 5, 5000);
    let v = conn.expect("veto");
    assert_eq!(v["reason"], "nightly batch running");
    conn.thaw(2, 5, "aborted");
    conn.expect("thawed");
    let out = wait_output(child);
    assert!(out.status.success(), "{out:?}");
}

fn wait_output(child: std::process::Child) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(WAIT) {
        Ok(r) => r.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the C example did not exit");
        }
    }
}

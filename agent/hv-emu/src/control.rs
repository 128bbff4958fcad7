//! The control socket: how a test (or `hv-host`) plays the Hyper-V host of an emulated device.
//!
//! JSON lines, one request and one answer per line, on a unix socket in the guest and on a
//! virtio-serial port the host reaches:
//!
//! ```text
//! {"op":"freeze"}                       → {"error":0,"flags":0,"ms":12.5,"dropped":false}
//! {"op":"hot-backup"} / "thaw" / "get-dm-info" / "create" / "delete" / "bu-complete" /
//! "auto-recover" / a raw number {"op":5}, optional "flags":N   → the same shape
//! {"op":"fake-thaw"}                    → {"ok":true}
//! {"op":"timeouts","freeze_ms":N,"other_ms":N}  (either optional) → {"freeze_ms":N,"other_ms":N}
//! {"op":"state"}                        → {"state":"ready","open":true,"registered":129}
//! {"op":"wait-ready","ms":N}            → {"ready":true}
//! {"op":"destroy"}                      → {"ok":true}
//! {"op":"inject","bytes":[1,2,3]}       → {"ok":true} or {"err":"..."}
//! anything else                         → {"err":"..."}
//! ```
//!
//! A host request's line is answered when the kernel answers the host: the daemon's reply,
//! the kernel's own answer, or HV_E_FAIL at the kernel's timeout.

use std::io::{self, BufRead, BufReader, Write};
use std::time::Duration;

use kmod_shim::hv::Op;
use serde_json::{json, Value};

use crate::{Emulator, Timeouts};

/// The operation named by `v` (a name of the control protocol or a number).
pub fn op_of(v: &Value) -> Option<u8> {
    if let Some(n) = v.as_u64() {
        return u8::try_from(n).ok();
    }
    Some(match v.as_str()? {
        "create" => Op::Create as u8,
        "delete" => Op::Delete as u8,
        "hot-backup" => Op::HotBackup as u8,
        "get-dm-info" => Op::GetDmInfo as u8,
        "bu-complete" => Op::BuComplete as u8,
        "freeze" => Op::Freeze as u8,
        "thaw" => Op::Thaw as u8,
        "auto-recover" => Op::AutoRecover as u8,
        _ => return None,
    })
}

/// Answers one request line.
pub fn handle(emu: &Emulator, line: &str) -> Value {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return json!({"err": "not a JSON object"});
    };
    let opv = &v["op"];
    if let Some(op) = op_of(opv) {
        let flags = v["flags"].as_u64().unwrap_or(0) as u32;
        let a = emu.request_raw(op, flags);
        return json!({
            "error": a.error,
            "flags": a.flags,
            "ms": a.elapsed.as_secs_f64() * 1000.0,
            "dropped": a.dropped,
        });
    }
    match opv.as_str() {
        Some("fake-thaw") => {
            emu.fake_thaw();
            json!({"ok": true})
        }
        Some("timeouts") => {
            let mut t = emu.timeouts();
            if let Some(ms) = v["freeze_ms"].as_u64() {
                t.freeze = Duration::from_millis(ms);
            }
            if let Some(ms) = v["other_ms"].as_u64() {
                t.other = Duration::from_millis(ms);
            }
            emu.set_timeouts(t);
            timeouts_json(emu.timeouts())
        }
        Some("state") => json!({
            "state": emu.state().name(),
            "open": emu.is_open(),
            "registered": emu.registered(),
        }),
        Some("wait-ready") => {
            let ms = v["ms"].as_u64().unwrap_or(10_000);
            json!({"ready": emu.wait_ready(Duration::from_millis(ms))})
        }
        Some("destroy") => {
            emu.destroy();
            json!({"ok": true})
        }
        Some("inject") => {
            let bytes: Vec<u8> = v["bytes"]
                .as_array()
                .map(|a| a.iter().filter_map(|b| b.as_u64()).map(|b| b as u8).collect())
                .unwrap_or_default();
            match emu.inject(&bytes) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"err": e.to_string()}),
            }
        }
        _ => json!({"err": format!("unknown op {opv}")}),
    }
}

fn timeouts_json(t: Timeouts) -> Value {
    json!({"freeze_ms": t.freeze.as_millis() as u64, "other_ms": t.other.as_millis() as u64})
}

/// Serves one stream until it ends: reads lines, writes answers. Returns Ok at EOF.
pub fn serve_stream<R: io::Read, W: Write>(emu: &Emulator, r: R, mut w: W) -> io::Result<()> {
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut out = handle(emu, line.trim()).to_string();
        out.push('\n');
        w.write_all(out.as_bytes())?;
        w.flush()?;
    }
}

/// Serves a unix socket, a thread per connection, forever.
pub fn serve_unix(emu: Emulator, path: &std::path::Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)?;
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let emu = emu.clone();
        std::thread::spawn(move || {
            if let Ok(w) = conn.try_clone() {
                let _ = serve_stream(&emu, conn, w);
            }
        });
    }
    Ok(())
}

/// Serves a virtio-serial port (the guest's end of the host's chardev) forever. A port whose
/// host side is not connected reads as EOF at once: wait and read again.
pub fn serve_port(emu: Emulator, path: &std::path::Path) -> io::Result<()> {
    loop {
        let f = std::fs::File::options().read(true).write(true).open(path)?;
        let w = f.try_clone()?;
        if let Err(e) = serve_stream(&emu, f, w) {
            eprintln!("hv-emu: control port {}: {e}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(op_of(&json!("freeze")), Some(5));
        assert_eq!(op_of(&json!("hot-backup")), Some(2));
        assert_eq!(op_of(&json!(200)), Some(200));
        assert_eq!(op_of(&json!(300)), None);
        assert_eq!(op_of(&json!("fake-thaw")), None);
    }

    #[test]
    fn lines_are_answered() {
        let emu = Emulator::default();
        let a = handle(&emu, r#"{"op":"get-dm-info","flags":9}"#);
        assert_eq!((a["error"].as_u64(), a["flags"].as_u64()), (Some(0), Some(0)));
        let a = handle(&emu, r#"{"op":"freeze"}"#);
        assert_eq!(a["error"].as_u64(), Some(0x80004005), "nobody is listening");
        let t = handle(&emu, r#"{"op":"timeouts","freeze_ms":1500}"#);
        assert_eq!((t["freeze_ms"].as_u64(), t["other_ms"].as_u64()), (Some(1500), Some(30000)));
        assert_eq!(handle(&emu, r#"{"op":"state"}"#)["state"], "ready");
        assert!(handle(&emu, "nope")["err"].is_string());
        let mut out = Vec::new();
        serve_stream(&emu, &b"{\"op\":\"create\"}\n\n{\"op\":\"fake-thaw\"}\n"[..], &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.lines().count(), 2, "{s}");
    }
}

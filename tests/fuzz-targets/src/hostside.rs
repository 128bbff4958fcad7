//! vmctl's decoders: QMP replies and events, backup and checkpoint manifests (and their
//! envelope: magic, versions, checksum).

use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use hostsim::backup::manifest as backup;
use hostsim::checkpoint::manifest as checkpoint;
use hostsim::qmp::Qmp;

/// The input as what QEMU sends on QMP: the greeting, then replies and events. The handshake
/// and a few commands end (a value, an error) and never hang: the stream ends with the input.
pub fn qmp(data: &[u8]) {
    let Ok(mut q) = Qmp::handshake(Cursor::new(data.to_vec()), std::io::sink(), Duration::from_millis(500)) else {
        return;
    };
    let _ = (q.version(), q.greeting().is_object());
    let _ = q.execute("query-status", None);
    let _ = q.execute_within("query-block-jobs", None, Duration::from_millis(100));
    let _ = q.take_events();
    let _ = q.wait_event(Duration::from_millis(10), |e| e.name == "BLOCK_JOB_COMPLETED");
}

/// The input as a backup manifest: refused with a reason or read; what is read writes out
/// bytes that read again.
pub fn backup_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = backup::FORMAT.parse::<backup::Manifest>(text) {
        let bytes = m.to_bytes();
        let again = std::str::from_utf8(&bytes).expect("a manifest is UTF-8");
        if let Err(e) = backup::FORMAT.parse::<backup::Manifest>(again) {
            panic!("a manifest vmctl wrote does not read back: {e}\n{again}");
        }
    }
}

/// The input as a checkpoint manifest, the same way.
pub fn checkpoint_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = checkpoint::Manifest::parse(text, Path::new("fuzz/manifest.json")) {
        let bytes = m.to_bytes();
        let again = std::str::from_utf8(&bytes).expect("a manifest is UTF-8");
        if let Err(e) = checkpoint::Manifest::parse(again, Path::new("again")) {
            panic!("a manifest vmctl wrote does not read back: {e}\n{again}");
        }
    }
}

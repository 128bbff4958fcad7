//! Small helpers: atomic writes, UTC timestamps without a date crate, sizes, an error's chain
//! as one line, and the test-only fault points.

use std::io::{self, Write};
use std::path::Path;

/// Writes `data` to `path` atomically: a temporary name in the same directory, fsync,
/// rename over the target, fsync of the directory. A reader sees the old file or the new
/// one, never half of it, also after a crash.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// fsync of a directory (makes renames and new entries durable).
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (RFC 3339 UTC with milliseconds, compact id form `YYYYMMDD-HHMMSS-mmm`) for a time.
pub fn timestamps(t: std::time::SystemTime) -> (String, String) {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ms = d.subsec_millis();
    let (y, mo, da) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let (h, mi, se) = (s / 3600, (s / 60) % 60, s % 60);
    (
        format!("{y:04}-{mo:02}-{da:02}T{h:02}:{mi:02}:{se:02}.{ms:03}Z"),
        format!("{y:04}{mo:02}{da:02}-{h:02}{mi:02}{se:02}-{ms:03}"),
    )
}

/// Bytes for people: "1.5 GiB".
pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Milliseconds of a duration, rounded to 0.01.
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// An error and its causes as one line, each said once (`outer: cause: root cause`), the way
/// anyhow's alternate Display prints a chain. Every message vmctl prints or records comes
/// through here, so a cause is never dropped and never repeated (an error's own Display never
/// repeats the source it returns).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    anyhow::Chain::new(e).map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

/// The environment variable that names a test-only fault point.
pub const TEST_FAULT_ENV: &str = "VMCTL_TEST_FAULT";

/// **Test only**: true when `VMCTL_TEST_FAULT` names `point`. The VM-tier tests set it to make
/// a step fail that real QEMU never fails on cue (e.g. `cont-after-migration`), so the
/// clean-up after that failure is tested for real. Nothing else sets it; unset, it costs one
/// environment lookup at the few places that ask.
pub fn test_fault(point: &str) -> bool {
    std::env::var(TEST_FAULT_ENV).is_ok_and(|v| v.split(',').any(|p| p.trim() == point))
}

/// **Test only**: when `VMCTL_TEST_FAULT` names `halt-at-POINT`, vmctl prints
/// `vmctl: halted at POINT` on stderr and stops there for good, so that a VM-tier test can
/// SIGKILL it at exactly that step of a backup (`halt-at-targets`, `halt-at-frozen`,
/// `halt-at-transaction`, `halt-at-finish`). Nothing else sets it.
pub fn test_halt(point: &str) {
    if test_fault(&format!("halt-at-{point}")) {
        eprintln!("vmctl: halted at {point} ({TEST_FAULT_ENV})");
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let (rfc, id) = timestamps(t);
        assert_eq!(rfc, "2023-11-14T22:13:20.123Z");
        assert_eq!(id, "20231114-221320-123");
        let (leap, _) = timestamps(std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400));
        assert_eq!(leap, "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot write the manifest")]
        struct Outer(#[source] io::Error);
        let e = Outer(io::Error::other("disk full"));
        assert_eq!(error_chain(&e), "cannot write the manifest: disk full");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
    }
}

//! vm-writer: the plain writer of the VM tier's guest. Built by `build.sh` with rustc alone
//! (std only, statically linked) and started at boot by the guest's init.
//!
//! It appends numbered records to `DIR/records.log`, makes each durable with fdatasync, and
//! only then acknowledges it on stdout (the init points stdout at the virtio-serial port
//! `org.vssd.acks.0`, which the host captures to a file):
//!
//! ```text
//! ack NAME N LAT_US DONE_US
//! ```
//!
//! `LAT_US` is how long the write + fdatasync of record N took (a write blocked by a freeze
//! shows here), `DONE_US` the guest's monotonic clock when it completed. Every acknowledged
//! record must be in any consistent backup taken after the ack; records are `rec N PAYLOAD`
//! lines whose payload is derived from N, so a torn or stale line is detectable.
//!
//! Usage: `vm-writer NAME DIR [INTERVAL_MS]` (default 5 ms between records).

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

/// The payload of record `n`: 32 hex digits derived from n (splitmix64), so that the host can
/// check every line without knowing anything else.
fn payload(n: u64) -> String {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let a = z ^ (z >> 31);
    format!("{a:016x}{:016x}", a.rotate_left(17) ^ n)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: vm-writer NAME DIR [INTERVAL_MS]");
        std::process::exit(2);
    }
    let name = &args[1];
    let dir = std::path::Path::new(&args[2]);
    let interval = Duration::from_millis(args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5));
    let path = dir.join("records.log");
    let epoch = Instant::now();
    // Continue after the last whole record if the file exists (a guest restarted on a restored
    // disk goes on numbering where the backup ended).
    let mut n: u64 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.lines().rev().find_map(|l| l.split(' ').nth(1).and_then(|x| x.parse().ok())))
        .unwrap_or(0);
    let mut f = match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vm-writer {name}: cannot open {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    loop {
        n += 1;
        let line = format!("rec {n} {}\n", payload(n));
        let t0 = Instant::now();
        let r = f.write_all(line.as_bytes()).and_then(|_| f.sync_data());
        let lat = t0.elapsed();
        match r {
            Ok(()) => {
                let done = epoch.elapsed();
                let _ = writeln!(out, "ack {name} {n} {} {}", lat.as_micros(), done.as_micros());
                let _ = out.flush();
            }
            Err(e) => {
                let _ = writeln!(out, "err {name} {n} {e}");
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(500));
                std::process::exit(1);
            }
        }
        std::thread::sleep(interval);
    }
}

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
//!
//! A second mode, `vm-writer --utmp FILE USER LINE HOST`, appends one login record (glibc's
//! `struct utmp` of x86_64, `USER_PROCESS`, logged in now) to FILE: the guest has no login
//! program, and the agents' `guest-get-users` reads `/var/run/utmp`.

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

/// glibc's `struct utmp` on x86_64: 384 bytes (see <utmp.h>, <bits/utmp.h>).
const UTMP_SIZE: usize = 384;
/// `ut_type` of a logged-in user.
const USER_PROCESS: i16 = 7;

/// One `USER_PROCESS` record: `user` on `line` from `host`, process `pid`, logged in at
/// `secs`.`usecs` (Unix time).
fn utmp_record(user: &str, line: &str, host: &str, pid: i32, secs: i32, usecs: i32) -> Vec<u8> {
    let mut r = vec![0u8; UTMP_SIZE];
    let mut put =
        |off: usize, len: usize, s: &[u8]| r[off..off + s.len().min(len)].copy_from_slice(&s[..s.len().min(len)]);
    put(0, 2, &USER_PROCESS.to_ne_bytes()); // ut_type (+ 2 bytes of padding)
    put(4, 4, &pid.to_ne_bytes()); // ut_pid
    put(8, 32, line.as_bytes()); // ut_line
                                 // ut_id: the line's last 4 characters, as login does.
    put(40, 4, line.as_bytes()[line.len().saturating_sub(4)..].as_ref());
    put(44, 32, user.as_bytes()); // ut_user
    put(76, 256, host.as_bytes()); // ut_host
                                   // 332 ut_exit (2 x i16), 336 ut_session (i32): zero.
    put(340, 4, &secs.to_ne_bytes()); // ut_tv.tv_sec (i32 on x86_64, for 32-bit compatibility)
    put(344, 4, &usecs.to_ne_bytes()); // ut_tv.tv_usec
                                       // 348 ut_addr_v6 (4 x i32), 364 reserved (20 bytes): zero.
    r
}

fn write_utmp(args: &[String]) {
    let [file, user, line, host] = args else {
        eprintln!("usage: vm-writer --utmp FILE USER LINE HOST");
        std::process::exit(2);
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let rec = utmp_record(user, line, host, 1, now.as_secs() as i32, now.subsec_micros() as i32);
    let r = OpenOptions::new().create(true).append(true).open(file).and_then(|mut f| f.write_all(&rec));
    if let Err(e) = r {
        eprintln!("vm-writer --utmp: {file}: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--utmp") {
        write_utmp(&args[2..]);
        return;
    }
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

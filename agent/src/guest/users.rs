//! `guest-get-users`: who is logged in, from utmp (`/var/run/utmp`), read here rather than
//! through the C library's `getutxent`.
//!
//! As qemu-ga: only `USER_PROCESS` records count; each user is listed once, in the order of
//! their first record, with the earliest login time (seconds since the epoch, a double);
//! no `domain` on Linux. A missing or unreadable file is no users, not an error; a partial
//! record at the end is ignored, as glibc ignores it.

use qga_wire::QgaError;
use serde::Serialize;
use serde_json::Value;

use super::{qemu_double, Host};

/// glibc's `struct utmp` / `struct utmpx` on this machine: its size and where the fields
/// `guest-get-users` reads are.
struct Layout {
    size: usize,
    ut_type: usize,
    ut_user: usize,
    tv_sec: usize,
    tv_usec: usize,
    /// Whether `ut_tv` holds 64-bit fields (aarch64 and the like) or 32-bit ones (x86_64).
    tv_64: bool,
}

const UT_NAMESIZE: usize = 32;
const USER_PROCESS: i16 = 7;

#[cfg(any(target_arch = "aarch64", target_arch = "s390x", target_arch = "loongarch64"))]
const LAYOUT: Layout = Layout { size: 400, ut_type: 0, ut_user: 44, tv_sec: 344, tv_usec: 352, tv_64: true };
#[cfg(not(any(target_arch = "aarch64", target_arch = "s390x", target_arch = "loongarch64")))]
const LAYOUT: Layout = Layout { size: 384, ut_type: 0, ut_user: 44, tv_sec: 340, tv_usec: 344, tv_64: false };

// The layout above is the C library's, or the build fails here.
#[cfg(target_env = "gnu")]
const _: () = assert!(std::mem::size_of::<libc::utmpx>() == LAYOUT.size);

/// One user of `guest-get-users`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub user: String,
    #[serde(rename = "login-time", serialize_with = "as_qemu_double")]
    pub login_time: f64,
}

fn as_qemu_double<S: serde::Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    <Value as Serialize>::serialize(&qemu_double(*x), s)
}

/// `guest-get-users`.
pub fn users(host: &Host) -> Result<Vec<User>, QgaError> {
    Ok(std::fs::read(host.under_root("var/run/utmp")).map(|b| parse(&b)).unwrap_or_default())
}

/// The users of a utmp file's bytes.
pub fn parse(bytes: &[u8]) -> Vec<User> {
    let l = &LAYOUT;
    let mut out: Vec<User> = Vec::new();
    for rec in bytes.chunks_exact(l.size) {
        let ut_type = i16::from_ne_bytes([rec[l.ut_type], rec[l.ut_type + 1]]);
        if ut_type != USER_PROCESS {
            continue;
        }
        let name = &rec[l.ut_user..l.ut_user + UT_NAMESIZE];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(UT_NAMESIZE)];
        let int = |at: usize| -> f64 {
            if l.tv_64 {
                i64::from_ne_bytes(rec[at..at + 8].try_into().unwrap()) as f64
            } else {
                f64::from(i32::from_ne_bytes(rec[at..at + 4].try_into().unwrap()))
            }
        };
        let login_time = int(l.tv_sec) + int(l.tv_usec) / 1_000_000.0;
        let user = String::from_utf8_lossy(name).into_owned();
        match out.iter_mut().find(|u| u.user == user) {
            Some(u) => u.login_time = u.login_time.min(login_time),
            None => out.push(User { user, login_time }),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::testing::{host, write};
    use super::*;
    use serde_json::json;

    /// One utmp record in this machine's layout.
    pub(crate) fn record(ut_type: i16, user: &str, sec: i64, usec: i64) -> Vec<u8> {
        let l = &LAYOUT;
        let mut r = vec![0u8; l.size];
        r[l.ut_type..l.ut_type + 2].copy_from_slice(&ut_type.to_ne_bytes());
        r[l.ut_user..l.ut_user + user.len()].copy_from_slice(user.as_bytes());
        if l.tv_64 {
            r[l.tv_sec..l.tv_sec + 8].copy_from_slice(&sec.to_ne_bytes());
            r[l.tv_usec..l.tv_usec + 8].copy_from_slice(&usec.to_ne_bytes());
        } else {
            r[l.tv_sec..l.tv_sec + 4].copy_from_slice(&(sec as i32).to_ne_bytes());
            r[l.tv_usec..l.tv_usec + 4].copy_from_slice(&(usec as i32).to_ne_bytes());
        }
        r
    }

    #[test]
    fn users_are_listed_once_with_their_earliest_login() {
        let mut b = Vec::new();
        b.extend(record(2, "reboot", 1_600_000_000, 0)); // BOOT_TIME
        b.extend(record(USER_PROCESS, "alice", 1_700_000_100, 500_000));
        b.extend(record(6, "LOGIN", 1_700_000_000, 0)); // LOGIN_PROCESS
        b.extend(record(USER_PROCESS, "bob", 1_700_000_200, 0));
        b.extend(record(USER_PROCESS, "alice", 1_700_000_050, 250_000));
        b.extend(record(8, "carol", 1_700_000_000, 0)); // DEAD_PROCESS
        b.extend(record(USER_PROCESS, "alice", 1_700_000_300, 0));
        b.extend(record(USER_PROCESS, &"x".repeat(32), 1_700_000_400, 1));
        b.extend(&record(USER_PROCESS, "partial", 1, 0)[..100]);
        let v = serde_json::to_value(parse(&b)).unwrap();
        assert_eq!(
            v,
            json!([
                {"user": "alice", "login-time": 1_700_000_050.25},
                {"user": "bob", "login-time": 1_700_000_200},
                {"user": "x".repeat(32), "login-time": 1_700_000_400.000001},
            ])
        );
        // An integral time goes out without a fraction, as QEMU prints doubles.
        assert_eq!(
            serde_json::to_string(&parse(&record(USER_PROCESS, "bob", 5, 0))).unwrap(),
            r#"[{"user":"bob","login-time":5}]"#
        );
    }

    #[test]
    fn no_utmp_is_no_users() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        assert_eq!(users(&h).unwrap(), []);
        write(d.path(), "root/var/run/utmp", record(USER_PROCESS, "root", 1, 0));
        assert_eq!(users(&h).unwrap(), [User { user: "root".into(), login_time: 1.0 }]);
    }
}

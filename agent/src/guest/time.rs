//! `guest-get-time`, `guest-set-time`, `guest-get-timezone`.
//!
//! qemu-ga 7.2: the time is `g_get_real_time() * 1000` (nanoseconds, microsecond
//! resolution). Setting it needs an executable `/sbin/hwclock` (else "not currently
//! supported"); a given time must fall in local years 1970–2069 ("Invalid time"); it is set
//! with microsecond resolution, then `hwclock -w` writes it to the RTC. Without a time,
//! `hwclock -s` sets the clock from the RTC. The zone is the local zone's abbreviation now
//! (left out when empty) and its offset from UTC in seconds.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::unistd::{access, AccessFlags};
use qga_wire::QgaError;
use serde::Serialize;
use tracing::info;

use super::{os_error, run_detached, Host};

/// qemu-ga's `QERR_UNSUPPORTED`.
pub const UNSUPPORTED: &str = "this feature or command is not currently supported";

/// `guest-get-time`: nanoseconds since the epoch, in whole microseconds.
pub fn get_time() -> i64 {
    let micros = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    };
    micros * 1000
}

/// `guest-get-timezone`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timezone {
    /// The abbreviation, e.g. `CET`; absent when the zone has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Seconds east of UTC.
    pub offset: i64,
}

/// `guest-get-timezone`.
pub fn timezone() -> Result<Timezone, QgaError> {
    let now = get_time() / 1_000_000_000;
    let lt = kmod_shim::clock::local_time(now)
        .ok_or_else(|| QgaError::generic("Guest agent command failed, error was 'Couldn't retrieve local timezone'"))?;
    Ok(Timezone { zone: (!lt.zone.is_empty()).then_some(lt.zone), offset: lt.utc_offset })
}

/// `guest-set-time`.
pub fn set_time(host: &Host, time_ns: Option<i64>) -> Result<(), QgaError> {
    let hwclock = host.under_root("sbin/hwclock");
    if access(&hwclock, AccessFlags::X_OK).is_err() {
        return Err(QgaError::generic(UNSUPPORTED));
    }
    if let Some(ns) = time_ns {
        // As qemu-ga: C division, so both parts truncate toward zero; a 64-bit time_t takes
        // every i64 number of seconds.
        let secs = ns / 1_000_000_000;
        let micros = (ns % 1_000_000_000) / 1000;
        // qemu-ga takes the local year (GLib's g_date_set_time_t); a time the C library
        // cannot place gets the same answer as one outside the range.
        let year = kmod_shim::clock::local_time(secs).map_or(0, |lt| lt.year);
        if !(1970..2070).contains(&year) {
            return Err(QgaError::generic("Invalid time"));
        }
        info!(secs, micros, "guest-set-time: setting the clock");
        host.clock.set(secs, micros * 1000).map_err(|e| os_error("Failed to set time to guest", e))?;
    }
    let flag = if time_ns.is_some() { "-w" } else { "-s" };
    match run_detached(&hwclock, &[flag]) {
        // qemu-ga forks and then execs: an exec that fails is a child exiting 1.
        Err(_) => Err(QgaError::generic("hwclock failed to set hardware clock to system time")),
        Ok(st) if st.code().is_none() => Err(QgaError::generic("child process has terminated abnormally")),
        Ok(st) if st.code() != Some(0) => Err(QgaError::generic("hwclock failed to set hardware clock to system time")),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{host, script, FakeClock};
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_time_is_nanoseconds_in_whole_microseconds() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
        let t = get_time();
        assert_eq!(t % 1000, 0);
        assert!(t >= before / 1000 * 1000 && t - before < 5_000_000_000, "{t} vs {before}");
    }

    #[test]
    fn the_timezone_agrees_with_the_c_library() {
        let tz = timezone().unwrap();
        let lt = kmod_shim::clock::local_time(get_time() / 1_000_000_000).unwrap();
        assert_eq!(tz, Timezone { zone: Some(lt.zone), offset: lt.utc_offset });
        let v = serde_json::to_value(Timezone { zone: None, offset: 3600 }).unwrap();
        assert_eq!(v, serde_json::json!({"offset": 3600}));
    }

    #[test]
    fn without_an_executable_hwclock_set_time_is_unsupported_and_touches_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut h = host(d.path());
        let clock = Arc::new(FakeClock::default());
        h.clock = clock.clone();
        let e = set_time(&h, Some(1_700_000_000_000_000_000)).unwrap_err();
        assert_eq!(e.desc, UNSUPPORTED);
        super::super::testing::write(d.path(), "root/sbin/hwclock", "not executable");
        assert_eq!(set_time(&h, None).unwrap_err().desc, UNSUPPORTED);
        assert!(clock.set_to.lock().unwrap().is_empty());
    }

    #[test]
    fn a_time_sets_the_clock_in_microseconds_then_hwclock_w_writes_the_rtc() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("hwclock.log");
        script(d.path(), "root/sbin/hwclock", &format!("echo \"$@\" >> {}", log.display()));
        let mut h = host(d.path());
        let clock = Arc::new(FakeClock::default());
        h.clock = clock.clone();
        set_time(&h, Some(1_700_000_000_123_456_789)).unwrap();
        assert_eq!(*clock.set_to.lock().unwrap(), [(1_700_000_000, 123_456_000)]);
        set_time(&h, None).unwrap();
        assert_eq!(clock.set_to.lock().unwrap().len(), 1, "no time: the clock is not set by us");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "-w\n-s\n");
    }

    #[test]
    fn times_outside_1970_to_2069_are_refused_before_the_clock_is_touched() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "root/sbin/hwclock", "exit 0");
        let mut h = host(d.path());
        let clock = Arc::new(FakeClock::default());
        h.clock = clock.clone();
        // 2070-06-01 and 1969-06-01 (away from new year, whatever the local zone), and the
        // extremes of i64 nanoseconds (years 1677 and 2262).
        for ns in [3_168_288_000_000_000_000, -18_316_800_000_000_000, i64::MIN, i64::MAX] {
            assert_eq!(set_time(&h, Some(ns)).unwrap_err().desc, "Invalid time", "{ns}");
        }
        assert!(clock.set_to.lock().unwrap().is_empty());
    }

    #[test]
    fn clock_and_hwclock_failures_have_qemu_gas_words() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "root/sbin/hwclock", "exit 3");
        let mut h = host(d.path());
        h.clock = Arc::new(FakeClock { fail: Some(nix::errno::Errno::EPERM), ..Default::default() });
        assert_eq!(
            set_time(&h, Some(1_700_000_000_000_000_000)).unwrap_err().desc,
            "Failed to set time to guest: Operation not permitted"
        );
        assert_eq!(set_time(&h, None).unwrap_err().desc, "hwclock failed to set hardware clock to system time");
        script(d.path(), "root/sbin/hwclock", "kill -9 $$");
        assert_eq!(set_time(&h, None).unwrap_err().desc, "child process has terminated abnormally");
    }
}

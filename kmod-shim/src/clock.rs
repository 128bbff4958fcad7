//! The wall clock and the local time zone, as the C library sees them.
//!
//! `localtime_r` gives the zone's abbreviation and UTC offset at an instant (what
//! `guest-get-timezone` reports) and the local calendar year (what `guest-set-time` checks);
//! `tzset` first, so that a changed `/etc/localtime` or `$TZ` is seen without a restart.
//! `clock_settime(CLOCK_REALTIME)` sets the clock (needs `CAP_SYS_TIME`).

use std::ffi::CStr;

use nix::errno::Errno;

extern "C" {
    // POSIX <time.h>; the libc crate does not declare it for glibc.
    fn tzset();
}

/// The local time at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTime {
    /// The calendar year, local time.
    pub year: i64,
    /// Seconds east of UTC (`tm_gmtoff`).
    pub utc_offset: i64,
    /// The zone's abbreviation (`tm_zone`), e.g. `CET`; empty when the C library has none.
    pub zone: String,
}

/// The local time at `secs` seconds after the epoch; `None` when the C library cannot
/// represent it (a year beyond `int`).
pub fn local_time(secs: i64) -> Option<LocalTime> {
    let t: libc::time_t = secs;
    // SAFETY: `tm` is plain old data, valid when zeroed (null `tm_zone` included).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: tzset takes no arguments and only updates the C library's own zone state.
    unsafe { tzset() };
    // SAFETY: both pointers are to live locals of the right types for the whole call;
    // localtime_r writes only `tm` and returns null on failure.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return None;
    }
    let zone = if tm.tm_zone.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null `tm_zone` set by localtime_r points to a NUL-terminated string
        // in the C library's zone tables, which live as long as the process (tzset does not
        // free abbreviations it has handed out). We copy it at once.
        unsafe { CStr::from_ptr(tm.tm_zone) }.to_string_lossy().into_owned()
    };
    Some(LocalTime { year: i64::from(tm.tm_year) + 1900, utc_offset: tm.tm_gmtoff, zone })
}

/// Sets the system's wall clock to `secs` seconds and `nanos` nanoseconds after the epoch.
pub fn set_wall_clock(secs: i64, nanos: i64) -> Result<(), Errno> {
    let ts = libc::timespec { tv_sec: secs, tv_nsec: nanos };
    // SAFETY: `ts` is a live, initialised timespec the kernel only reads.
    let r = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_time_gives_a_year_an_offset_and_a_zone() {
        let lt = local_time(1_700_000_000).expect("2023 is representable");
        // Whatever the zone, 2023-11-14T22:13:20Z is in 2023 somewhere within a day of UTC.
        assert_eq!(lt.year, 2023);
        assert!(lt.utc_offset.abs() <= 14 * 3600, "{lt:?}");
        assert!(!lt.zone.is_empty(), "{lt:?}");
        assert_eq!(local_time(0).unwrap().year + i64::from(local_time(0).unwrap().utc_offset < 0), 1970);
    }
}

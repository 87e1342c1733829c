//! Kernel timestamps are CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
//! They are mapped to wall-clock time once, at start.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; these clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now, on the kernel's event clock.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Fixed offset between the event clock and wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let mono = monotonic_ns() as i128;
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        WallClock { offset_ns: real - mono }
    }

    /// Wall clock for a recording: its stored offset.
    pub fn from_offset(offset_ns: i64) -> Self {
        WallClock {
            offset_ns: offset_ns as i128,
        }
    }

    pub fn offset_ns(self) -> i64 {
        self.offset_ns as i64
    }

    pub fn to_system(self, ktime_ns: u64) -> SystemTime {
        // A recording's offset is data: clamp, never wrap.
        let ns = (ktime_ns as i128 + self.offset_ns).clamp(0, i128::from(u64::MAX)) as u64;
        UNIX_EPOCH + Duration::from_nanos(ns)
    }

    /// RFC 3339 with milliseconds, UTC.
    pub fn format(self, ktime_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.to_system(ktime_ns)).to_string()
    }
}

//! Small system helpers: the destination addresses, errno, and raising
//! RLIMIT_NOFILE.

use std::ffi::c_int;
use std::io;
use std::mem;
use std::net::Ipv4Addr;

/// Most destination addresses: 127.0.0.1 to 127.0.255.254.
pub const MAX_ADDRS: usize = 254 * 256;

/// The i-th destination: 127.0.0.1, …, 127.0.0.254, 127.0.1.1, … (always
/// inside 127.0.0.0/8, never .0 or .255 in the last byte).
pub fn dest_addr(i: usize) -> Ipv4Addr {
    let i = i % MAX_ADDRS;
    Ipv4Addr::new(127, 0, (i / 254) as u8, (i % 254 + 1) as u8)
}

pub fn errno() -> io::Error {
    io::Error::last_os_error()
}

pub fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Raises RLIMIT_NOFILE towards `need`: the soft limit, and the hard one
/// too when allowed (CAP_SYS_RESOURCE; containers often lack it). Returns
/// the soft limit now in force, which may be less than `need`.
pub fn raise_nofile(need: usize) -> usize {
    let need = need as libc::rlim_t;
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur >= need {
            return lim.rlim_cur as usize;
        }
        if need > lim.rlim_max {
            // Never above fs.nr_open, which bounds the hard limit.
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
                .unwrap_or(need);
            let want = need.min(nr_open);
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return want as usize;
            }
        }
        let soft = libc::rlimit {
            rlim_cur: need.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return soft.rlim_cur as usize;
        }
        lim.rlim_cur as usize
    }
}

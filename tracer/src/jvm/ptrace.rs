//! Test-only: stop one thread of another process with ptrace and walk its
//! frame-pointer chain, standing in for the kernel side (which reads the
//! same words: return address, saved fp and the two interpreter slots).

use std::io;

use super::memory::{Memory, MemoryExt as _};

/// One frame as the kernel side would hand it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub pc: u64,
    pub fp: u64,
    /// [fp-24]: an interpreter frame's Method*.
    pub method_slot: u64,
    /// [fp-64]: an interpreter frame's bcp.
    pub bcp_slot: u64,
}

const MAX_FRAMES: usize = 64;

/// Seizes `tid`, stops it, runs `f` on its (rip, rbp) and detaches again,
/// whatever `f` does. Needs root (or ptrace rights over the target).
pub fn with_stopped<R>(tid: i32, f: impl FnOnce(u64, u64) -> R) -> io::Result<R> {
    // SAFETY: plain ptrace requests on a thread id; no pointers but `regs`,
    // which is a valid out-parameter for PTRACE_GETREGS.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut status = 0;
            if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
                return Err(io::Error::last_os_error());
            }
            let mut regs: libc::user_regs_struct = std::mem::zeroed();
            if libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f(regs.rip, regs.rbp))
        })();
        libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0);
        result
    }
}

/// The frame-pointer chain from (rip, rbp): frame 0 is (rip, rbp), then
/// pc = [fp+8], fp = [fp] while fp grows and is readable.
pub fn walk(mem: &dyn Memory, rip: u64, rbp: u64) -> Vec<RawFrame> {
    let slot = |a: u64| mem.u64(a).unwrap_or(0);
    let mut frames = Vec::new();
    let (mut pc, mut fp) = (rip, rbp);
    while frames.len() < MAX_FRAMES && fp != 0 && fp.is_multiple_of(8) {
        frames.push(RawFrame {
            pc,
            fp,
            method_slot: slot(fp.wrapping_sub(24)),
            bcp_slot: slot(fp.wrapping_sub(64)),
        });
        let (Ok(next_pc), Ok(next_fp)) = (mem.u64(fp.wrapping_add(8)), mem.u64(fp)) else {
            break;
        };
        if next_fp <= fp {
            break;
        }
        (pc, fp) = (next_pc, next_fp);
    }
    frames
}

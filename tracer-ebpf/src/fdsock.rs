//! fd -> `struct sock` for the current task, by walking
//! `task->files->fdt->fd[fd]->private_data->sk` with field offsets the agent
//! took from the kernel's BTF.

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{bpf_get_current_task, bpf_get_current_task_btf},
};
use tracer_common::{event::AF_INET, event::AF_INET6, stats, tcp::IPPROTO_TCP, COMPAT_NO_TASK_BTF};

use crate::{
    config::{self, off},
    maps,
    maps::Counters,
};

/// A read fault while walking kernel memory.
pub struct Fault;

#[inline(always)]
pub unsafe fn read<T>(base: u64, offset: u32) -> Result<T, Fault> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(|_| Fault)
}

/// Counts a fault as an unresolved fd instead of dropping it silently.
#[inline(always)]
fn counted<T>(r: Result<Option<T>, Fault>) -> Option<T> {
    r.unwrap_or_else(|Fault| {
        maps::count(Counters::Syscall, stats::FD_UNRESOLVED);
        None
    })
}

/// The current task's open-file array and its length.
#[inline(always)]
pub fn fd_table() -> Option<(u64, u32)> {
    counted(unsafe { fd_table_inner() })
}

/// `task->files->fdt` is walked with plain loads from the BTF-typed task
/// pointer: the verifier checks each offset against the kernel's BTF, and
/// the JIT makes each load fault-tolerant (a fault reads 0), at a fraction
/// of a `bpf_probe_read_kernel` call each. The fd array itself is a
/// pointer to pointers, which BTF does not type: it is read by helper.
#[inline(always)]
unsafe fn fd_table_inner() -> Result<Option<(u64, u32)>, Fault> {
    if config::lacks(COMPAT_NO_TASK_BTF) {
        return unsafe { fd_table_probed() };
    }
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let files: *const u8 = load(task, off!(task_files));
        if files.is_null() {
            return Ok(None); // exiting task
        }
        let fdt: *const u8 = load(files, off!(files_fdt));
        if fdt.is_null() {
            return Err(Fault);
        }
        let max: u32 = load(fdt, off!(fdt_max_fds));
        let fds: u64 = load(fdt, off!(fdt_fd));
        Ok(Some((fds, max)))
    }
}

/// `fd_table_inner` before Linux 5.11 (no `bpf_get_current_task_btf`): the
/// same walk, by probe reads from the untyped task pointer.
#[inline(always)]
unsafe fn fd_table_probed() -> Result<Option<(u64, u32)>, Fault> {
    unsafe {
        let task = bpf_get_current_task();
        let files: u64 = read(task, off!(task_files))?;
        if files == 0 {
            return Ok(None); // exiting task
        }
        let fdt: u64 = read(files, off!(files_fdt))?;
        if fdt == 0 {
            return Err(Fault);
        }
        let max: u32 = read(fdt, off!(fdt_max_fds))?;
        let fds: u64 = read(fdt, off!(fdt_fd))?;
        Ok(Some((fds, max)))
    }
}

/// A field of a BTF-typed kernel pointer, by a plain load (see
/// `fd_table_inner`).
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) }
}

/// The TCP `struct sock` behind `fd`, if `fd` is an IPv4/IPv6 TCP socket.
#[inline(always)]
pub fn tcp_sock(fds: u64, max: u32, fd: u32) -> Option<u64> {
    if fd >= max {
        return None;
    }
    counted(unsafe { tcp_sock_inner(fds, fd) })
}

#[inline(always)]
unsafe fn tcp_sock_inner(fds: u64, fd: u32) -> Result<Option<u64>, Fault> {
    unsafe {
        let file: u64 = read(fds, fd * 8)?;
        if file == 0 {
            return Ok(None);
        }
        let sfops = off!(socket_file_ops);
        if sfops != 0 {
            let fop: u64 = read(file, off!(file_f_op))?;
            if fop != sfops {
                return Ok(None);
            }
        }
        let sock: u64 = read(file, off!(file_private_data))?;
        if sock == 0 {
            return Ok(None);
        }
        if sfops == 0 {
            // No kallsyms address: accept the file only if the socket
            // points back at it.
            let back: u64 = read(sock, off!(socket_file))?;
            if back != file {
                return Ok(None);
            }
        }
        let sk: u64 = read(sock, off!(socket_sk))?;
        if sk == 0 {
            return Ok(None);
        }
        let family: u16 = read(sk, off!(skc_family))?;
        let proto: u16 = read(sk, off!(sk_protocol))?;
        let is_tcp = proto == IPPROTO_TCP && (family == AF_INET || family == AF_INET6);
        Ok(is_tcp.then_some(sk))
    }
}

/// Whether `fd`'s file has other references (dup, fork): closing this fd
/// will not release the socket.
#[inline(always)]
pub fn file_shared(fds: u64, fd: u32) -> bool {
    let r = unsafe { read::<u64>(fds, fd * 8).and_then(|file| read::<i64>(file, off!(file_ref))) };
    r.is_ok_and(|refs| refs > i64::from(off!(file_ref_one)))
}

/// The cookie the kernel already assigned to `sk`, or 0 if none yet. Every
/// socket that changed state while we were attached has one (the state hook
/// asks for it; before 5.12 see `ids`), so 0 only happens for sockets older
/// than the tracer; the agent then matches by `skaddr`.
#[inline(always)]
pub fn held_cookie(sk: u64) -> u64 {
    unsafe { read::<u64>(sk, off!(skc_cookie)) }.unwrap_or(0)
}

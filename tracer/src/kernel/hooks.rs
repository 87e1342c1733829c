//! The table of kernel hooks: which program attaches where, and whether the
//! tracer can run without it. Optional hooks that fail to attach degrade
//! the evidence (said in the `start` output), not the tracing.

use tracer_common::COMPAT_NO_LOOP;

#[derive(Clone, Copy, Debug)]
pub enum Attach {
    /// `tp_btf/<name>`: BTF-typed raw tracepoint.
    BtfTracepoint(&'static str),
    /// Classic tracepoint `<category>:<name>` (needs tracefs for its id).
    Tracepoint(&'static str, &'static str),
}

#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// The hook's name, as the `start` output shows it.
    pub name: &'static str,
    /// Program (function) name in the eBPF object. One program may serve
    /// several hooks: it is loaded (and verified) once.
    pub program: &'static str,
    pub attach: Attach,
    /// Without a required hook there is nothing to trace.
    pub required: bool,
    /// What is lost without it.
    pub purpose: &'static str,
    /// `COMPAT_*` bits under which it is not attached: its program needs
    /// what those kernels lack.
    pub unless: u32,
}

pub const HOOKS: &[Hook] = &[
    Hook {
        name: "inet_sock_set_state",
        program: "inet_sock_set_state",
        attach: Attach::BtfTracepoint("inet_sock_set_state"),
        required: true,
        purpose: "TCP state changes",
        unless: 0,
    },
    Hook {
        name: "sys_exit_accept4",
        program: "sys_exit_accept4",
        attach: Attach::Tracepoint("syscalls", "sys_exit_accept4"),
        required: false,
        purpose: "owner of accepted sockets",
        unless: 0,
    },
    Hook {
        name: "sys_exit_accept",
        // The same record layout as accept4's exit (`long ret`).
        program: "sys_exit_accept4",
        attach: Attach::Tracepoint("syscalls", "sys_exit_accept"),
        required: false,
        purpose: "owner of accepted sockets",
        unless: 0,
    },
    Hook {
        name: "sys_enter_close",
        program: "sys_enter_close",
        attach: Attach::Tracepoint("syscalls", "sys_enter_close"),
        required: false,
        purpose: "which thread and fd closed a socket",
        unless: 0,
    },
    Hook {
        name: "sys_enter_close_range",
        program: "sys_enter_close_range",
        attach: Attach::Tracepoint("syscalls", "sys_enter_close_range"),
        required: false,
        purpose: "which thread and fd closed a socket",
        unless: COMPAT_NO_LOOP,
    },
];

impl Hook {
    pub fn target(&self) -> String {
        match self.attach {
            Attach::BtfTracepoint(n) => format!("tp_btf/{n}"),
            Attach::Tracepoint(c, n) => format!("tracepoint/{c}/{n}"),
        }
    }
}

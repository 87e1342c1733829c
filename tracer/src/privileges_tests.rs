//! Tests of privileges.rs: the capability check, and the refusal lines.

use super::*;

fn caps(list: &[Cap]) -> Caps {
    Caps(list.iter().fold(0, |m, c| m | 1 << c.0))
}

#[test]
fn parses_cap_eff() {
    let status = "Name:\ttracer\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\nCapBnd:\t0\n";
    let c = parse_cap_eff(status).expect("CapEff");
    assert!(c.has(CAP_BPF) && c.has(CAP_PERFMON) && c.has(CAP_CHECKPOINT_RESTORE));
    assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
}

#[test]
fn refuses_without_bpf_or_perfmon_naming_the_set() {
    let e = assess(caps(&[CAP_PERFMON, CAP_SYS_PTRACE]), false).unwrap_err();
    assert_eq!(
        e,
        "tracer needs CAP_BPF and CAP_PERFMON to load its eBPF programs and lacks CAP_BPF: run it as root, \
         or grant CAP_BPF,CAP_PERFMON,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH,CAP_CHECKPOINT_RESTORE \
         (see README, Requirements)"
    );
    let e = assess(caps(&[]), false).unwrap_err();
    assert!(e.contains("lacks CAP_BPF and CAP_PERFMON:"), "{e}");
    assert!(!e.contains('\n'));
    let e = assess(caps(&[CAP_BPF]), false).unwrap_err();
    assert!(e.contains("lacks CAP_PERFMON:"), "{e}");
}

#[test]
fn sys_admin_stands_for_bpf_perfmon_and_checkpoint_restore() {
    let m = assess(caps(&[CAP_SYS_ADMIN]), false).expect("accepted");
    assert_eq!(m.0, vec![Optional::DacReadSearch, Optional::SysPtrace]);
}

#[test]
fn the_full_set_misses_nothing() {
    let full = caps(&[
        CAP_BPF,
        CAP_PERFMON,
        CAP_SYS_PTRACE,
        CAP_DAC_READ_SEARCH,
        CAP_CHECKPOINT_RESTORE,
    ]);
    assert_eq!(assess(full, false), Ok(Missing::default()));
    // CAP_SYSLOG only matters where kallsyms hides addresses.
    assert_eq!(assess(full, true), Ok(Missing(vec![Optional::Syslog])));
    let names: Vec<&str> = FULL_SET.split(',').collect();
    for c in [
        CAP_BPF,
        CAP_PERFMON,
        CAP_SYS_PTRACE,
        CAP_DAC_READ_SEARCH,
        CAP_CHECKPOINT_RESTORE,
    ] {
        assert!(names.contains(&c.1), "{} not in FULL_SET", c.1);
    }
}

#[test]
fn optional_ones_are_listed_with_their_cost() {
    let m = assess(caps(&[CAP_BPF, CAP_PERFMON, CAP_DAC_OVERRIDE]), true).expect("accepted");
    assert_eq!(
        m.0,
        vec![Optional::SysPtrace, Optional::CheckpointRestore, Optional::Syslog]
    );
    let line = m.to_string();
    assert!(
        line.starts_with("without CAP_SYS_PTRACE: loses other users' holders"),
        "{line}"
    );
    assert!(!line.contains('\n'));
}

#[test]
fn denied_line_names_only_what_is_missing() {
    let line = denied_line(Denied::Fds, 3, Some(caps(&[CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH])));
    assert_eq!(
        line,
        "cannot read /proc/PID/fd of 3 processes (permission denied): leaks of sockets they hold come \
         without holders or the owner's fd; grant CAP_SYS_PTRACE (see README, Requirements); further \
         refusals are not reported"
    );
    let line = denied_line(Denied::Mem, 1, Some(caps(&[CAP_BPF, CAP_PERFMON])));
    assert!(
        line.contains("/proc/PID/mem of 1 process ") && line.contains("grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"),
        "{line}"
    );
    let line = denied_line(Denied::MapFiles, 1, Some(caps(&[CAP_SYS_PTRACE, CAP_DAC_OVERRIDE])));
    assert!(line.contains("; grant CAP_CHECKPOINT_RESTORE (see README"), "{line}");
    // Own processes need CAP_CHECKPOINT_RESTORE alone.
    let line = denied_line(Denied::MapFiles, 1, Some(caps(&[CAP_BPF, CAP_PERFMON])));
    assert!(
        line.contains(
            "; grant CAP_CHECKPOINT_RESTORE (and, for other users' processes, CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH) (see README"
        ),
        "{line}"
    );
    let line = denied_line(Denied::MapFiles, 1, Some(caps(&[CAP_SYS_ADMIN])));
    assert!(
        line.contains("; grant CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (see README"),
        "{line}"
    );
    let line = denied_line(Denied::Fds, 2, Some(caps(&[CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH])));
    assert!(
        line.contains("hidepid, a security module or a user namespace"),
        "{line}"
    );
    let line = denied_line(Denied::Names, 2, None);
    assert!(
        line.contains("; run tracer as root, or grant CAP_SYS_PTRACE (see README"),
        "{line}"
    );
    let line = denied_line(Denied::MapFiles, 2, None);
    assert!(
        line.contains("or grant CAP_CHECKPOINT_RESTORE, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (see"),
        "{line}"
    );
}

#[test]
fn network_namespace_refusals_name_their_capability() {
    // The full set, without CAP_SYS_ADMIN: setns is refused.
    let full = caps(&[
        CAP_BPF,
        CAP_PERFMON,
        CAP_SYS_PTRACE,
        CAP_DAC_READ_SEARCH,
        CAP_CHECKPOINT_RESTORE,
    ]);
    assert_eq!(
        denied_line(Denied::Setns, 2, Some(full)),
        "cannot enter 2 network namespaces (permission denied): their sockets are missing from the start-up \
         snapshot, and leaks in them come without unread bytes, fd or holders; grant CAP_SYS_ADMIN (see \
         README, Requirements); further refusals are not reported"
    );
    let line = denied_line(Denied::Setns, 1, Some(caps(&[CAP_SYS_ADMIN])));
    assert!(
        line.starts_with("cannot enter 1 network namespace (permission denied)")
            && line.contains("a user namespace refuses"),
        "{line}"
    );
    let line = denied_line(Denied::NetnsLinks, 3, Some(caps(&[CAP_BPF, CAP_PERFMON])));
    assert!(
        line.starts_with("cannot read /proc/PID/ns/net of 3 processes (permission denied): if their network")
            && line.contains("; grant CAP_SYS_PTRACE (see README"),
        "{line}"
    );
}

#[test]
fn denied_warns_once_and_counts_every_refusal() {
    assert!(!warned(Denied::Maps));
    denied(Denied::Maps, 0);
    assert!(!warned(Denied::Maps), "nothing refused, nothing to warn about");
    denied(Denied::Maps, 2);
    assert!(warned(Denied::Maps));
    denied(Denied::Maps, 1);
    assert_eq!(DENIED[Denied::Maps.index()].load(Ordering::Relaxed), 3);
}

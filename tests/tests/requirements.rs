//! What a user of a kernel that lacks a requirement gets: one line on
//! stderr that says what is missing and what tracer needs, a non-zero
//! exit, nothing on stdout.
//!
//! A kernel built without `CONFIG_DEBUG_INFO_BTF` has no
//! `/sys/kernel/btf`: here it is hidden under an empty tmpfs in a private
//! mount namespace (`unshare --mount`), which is what tracer then sees.
//! Kernels older than 5.10 cannot be booted here (Debian's archive has
//! none left); the line for a verifier that lacks what has no fallback is
//! tested from the verifier's words (tracer/src/kernel/verifier.rs), and
//! 5.10's fallbacks in a guest (xtask/src/kernels.rs).

use std::process::{Command, Stdio};

use tracer_tests::{require_privileges, tracer_bin};

#[test]
fn without_btf_it_refuses_in_one_line() {
    if !require_privileges() {
        return;
    }
    let tracer = tracer_bin();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /sys/kernel/btf && exec \"$0\" live --duration 5s")
        .arg(&tracer)
        .stdin(Stdio::null())
        .output()
        .expect("running unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("exit: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(!out.status.success(), "{ctx}");
    assert!(stdout.is_empty(), "nothing on stdout\n{ctx}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "error: this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing); tracer needs Linux 5.10 or newer \
          built with CONFIG_DEBUG_INFO_BTF=y (see README, Requirements)"
        ],
        "{ctx}"
    );
}

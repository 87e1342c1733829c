//! Whether the privileged tests can run: root, or skip (locally) / fail (CI).

/// The running test's name, for skip and failure messages.
pub(crate) fn current_test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_string()
}

/// Returns true when running as root. Otherwise panics when the `CI`
/// environment variable is set (in CI these tests must fail, never skip), or
/// prints a skip notice and returns false so the test can return early.
pub fn require_privileges() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = current_test_name();
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{test} needs root to load eBPF programs, and CI is set: refusing to skip. \
             Run the tests as root (e.g. `cargo xtask test`)."
        );
    }
    eprintln!("skipping: {test} needs root to load eBPF programs (run as root or via `cargo xtask test`)");
    false
}

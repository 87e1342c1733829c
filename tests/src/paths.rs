//! Where the binaries under test are: `tracer` and `tcp-fixture`.

use std::path::PathBuf;

/// `target/<profile>/` of the running test binary (`target/<profile>/deps/x`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    // Integration and unit test binaries live in target/<profile>/deps.
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The `tracer` binary: `$TRACER_BIN`, else `target/<profile>/tracer` next
/// to the test binary's `deps/` directory.
pub fn tracer_bin() -> PathBuf {
    let path = match std::env::var_os("TRACER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_profile_dir().join("tracer"),
    };
    assert!(
        path.is_file(),
        "tracer binary not found at {}: build it first: cargo build -p tracer, \
         or run `cargo xtask test` (or point TRACER_BIN at it)",
        path.display()
    );
    path
}

/// The `tcp-fixture` binary of this package. Cargo exposes
/// `CARGO_BIN_EXE_tcp-fixture` to integration tests (at compile time, and at
/// run time under `cargo test`); this library is compiled without it, so it
/// reads the run-time variable and falls back to `target/<profile>/`.
pub fn fixture_bin() -> PathBuf {
    let path = match std::env::var_os("CARGO_BIN_EXE_tcp-fixture") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_profile_dir().join("tcp-fixture"),
    };
    assert!(
        path.is_file(),
        "tcp-fixture binary not found at {}: build it first: cargo build -p tracer-tests",
        path.display()
    );
    path
}

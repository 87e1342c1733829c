//! `cargo xtask test`'s run on other kernels: the integration tests that
//! cover live tracing, `--pid`, pre-existing sockets, evidence and record,
//! built here and run inside each of Debian's kernels under qemu (see
//! vm.rs), with the tracer under test.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::setup::Prepared;
use crate::util;
use crate::vm::{self, Guest};

/// The kernels CI boots, each the newest of its Debian series: Debian 12's
/// (6.1), its backports' (6.12), and Debian 11's (5.10, the minimum).
pub const DEFAULT: &[&str] = &["6.1", "6.12", "5.10"];

/// What the tracer's `start` line must say each kernel lacks (its
/// `fallbacks`): 5.10 takes every fallback, the others none.
const FALLBACKS: &[(&str, &[&str])] = &[
    (
        "5.10",
        &[
            "bpf_get_socket_cookie",
            "compare-and-exchange",
            "bpf_get_current_task_btf",
            "bpf_task_pt_regs",
            "bpf_loop",
        ],
    ),
    ("6.1", &[]),
    ("6.12", &[]),
];

/// The integration tests run in a guest, by test binary: live host-wide,
/// `--pid`, pre-existing sockets, evidence (stacks, fd, holders, unread
/// bytes), and record/report. Each checks its findings against `ss` and
/// /proc both ways. A subset, as every test starts the tracer, which takes
/// ~30 s under emulation: all four binaries took 14 minutes per kernel.
const SUBSET: &[(&str, &[&str])] = &[
    (
        "live",
        &[
            "leaking_and_closing_clients_host_wide",
            "pid_filter_one_of_two",
            "preexisting_leak_is_found",
            "server_side_leak_attributed_to_server",
        ],
    ),
    (
        "pid_watch",
        &["preexisting_leaks_of_the_watched_process_end_with_its_exit"],
    ),
    (
        "evidence",
        &[
            "open_stack_names_the_opening_function",
            "fd_matches_proc",
            "forked_child_is_a_holder",
            "unread_bytes_match_recv_q",
        ],
    ),
    ("recording_live", &["report_matches_live_and_ss"]),
];

/// How much longer the tests wait for anything in a guest: software
/// emulation runs programs 10–15 times slower (a debug tracer starts in
/// ~25 s instead of ~2 s).
const SLOWDOWN: u32 = 15;

/// Guest memory: enough for the tracer, its fixtures and the tests.
const MEMORY: &str = "2G";

pub fn run(env: &Prepared, tracer: &Path, versions: &[String]) -> Result<()> {
    let tests = build_tests(env)?;
    let fixture = util::target_dir(env.cargo())?.join("debug").join("tcp-fixture");
    anyhow::ensure!(fixture.is_file(), "step 'build' did not produce {}", fixture.display());
    let mut failed = Vec::new();
    for version in versions {
        let guest = Guest::prepare(env, version, MEMORY)?;
        let started = std::time::Instant::now();
        let cmd = tests_script(tracer, &fixture, &tests, &fallbacks_check(version));
        // A guest that leaves no exit code fails; the next kernels still run.
        let code = guest.run(&cmd).unwrap_or_else(|e| {
            eprintln!("==> kernel {version}: {e:#}");
            -1
        });
        eprintln!(
            "==> kernel {version}: exit code {code} after {}s",
            started.elapsed().as_secs()
        );
        if code != 0 {
            failed.push(version.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("step 'kernels' failed: the guest run failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Builds the subset's test binaries; their paths.
fn build_tests(env: &Prepared) -> Result<Vec<(PathBuf, &'static [&'static str])>> {
    let mut cmd = env.cargo();
    cmd.args(["test", "-p", "tracer-tests", "--no-run", "--message-format=json"]);
    for (t, _) in SUBSET {
        cmd.args(["--test", t]);
    }
    eprintln!("==> {}", util::display(&cmd));
    let out = cmd
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .output()
        .context("running cargo test --no-run")?;
    anyhow::ensure!(out.status.success(), "step 'build tests' failed: {}", out.status);
    let mut bins: Vec<(PathBuf, &[&str])> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let tests = SUBSET.iter().find(|(t, _)| *t == name).map(|(_, tests)| *tests);
        if let (Some(exe), Some(tests)) = (msg["executable"].as_str(), tests) {
            bins.push((PathBuf::from(exe), tests));
        }
    }
    anyhow::ensure!(
        bins.len() == SUBSET.len(),
        "cargo built {} of the {} test binaries of {SUBSET:?}",
        bins.len(),
        SUBSET.len()
    );
    Ok(bins)
}

/// The environment every guest command gets: CI (a missing prerequisite
/// fails), the tracer under test (the tests find tcp-fixture next to their
/// own binaries, in target/debug), and the kernel's module loader pointed
/// at the host's modprobe (the guest has no udev, and sock_diag's modules
/// load on first use).
fn preamble(tracer: &Path) -> String {
    format!(
        "uname -r; export CI=true TRACER_BIN={} TRACER_TEST_SLOWDOWN={SLOWDOWN} RUST_BACKTRACE=1; cd /tmp; {MODPROBE}",
        quote(tracer)
    )
}

const MODPROBE: &str = "m=$(command -v modprobe) && echo $m > /proc/sys/kernel/modprobe; ";

/// Each test binary's tests of the subset, one test at a time (the guest
/// has 2 emulated CPUs, and the tests trace host-wide); the count of
/// failed binaries.
///
/// First, before sock_diag's modules are loaded, the same with module
/// loading refused: the tracer must say so in its `start` line, and still
/// find new leaks (degrade, don't die); the start line must also name the
/// fallbacks taken, `check_fallbacks` (a shell condition).
fn tests_script(tracer: &Path, fixture: &Path, tests: &[(PathBuf, &[&str])], check_fallbacks: &str) -> String {
    let mut s = format!(
        "uname -r; cd /tmp; echo /bin/false > /proc/sys/kernel/modprobe; echo '== without sock_diag modules'; \
         if {}; then failed=0; else failed=1; fi; ",
        vm::leak_scenario(
            tracer,
            fixture,
            &format!("head -1 /tmp/out.jsonl | grep -q '\"snapshot_error\":\"[^\"]*sock_diag' && {check_fallbacks}")
        )
    );
    s.push_str(&preamble(tracer));
    for (bin, names) in tests {
        s.push_str(&format!(
            "echo \"== {name}\"; {bin} --test-threads=1 --exact {names} || failed=$((failed+1)); ",
            name = bin.file_name().unwrap_or_default().to_string_lossy(),
            bin = quote(bin),
            names = names.join(" ")
        ));
    }
    s.push_str("echo \"== $failed failed\"; test $failed = 0");
    s
}

/// A shell condition on the start line (/tmp/out.jsonl's first) that holds
/// when it names exactly the fallbacks expected on kernel `version`.
fn fallbacks_check(version: &str) -> String {
    let expected = FALLBACKS
        .iter()
        .find(|(v, _)| *v == version)
        .map_or(&[][..], |(_, f)| *f);
    let start = "head -1 /tmp/out.jsonl";
    if expected.is_empty() {
        return format!("! {start} | grep -q '\"fallbacks\"'");
    }
    let mut checks = vec![format!(
        "test $({start} | grep -o '\"lacks\"' | wc -l) = {}",
        expected.len()
    )];
    checks.extend(
        expected
            .iter()
            .map(|f| format!("{start} | grep -q '\"lacks\":\"[^\"]*{f}'")),
    );
    checks.join(" && ")
}

fn quote(p: &Path) -> String {
    vm::shell_join(&[p.display().to_string()])
}

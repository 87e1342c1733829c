//! Tests against a real JVM (`java` and `javac` on PATH; under CI their
//! absence fails the test). A thread of the test program is stopped with
//! ptrace and its frame-pointer chain walked, as the kernel side would.
//!
//! `capture_fixtures` (ignored; run by hand as root) records every byte the
//! naming reads into `testdata/*.mem` plus `*.json`, which the replay tests
//! use:
//! `cargo test -p tracer jvm::live_tests::capture_fixtures -- --ignored`

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use super::{
    codecache::Lookup,
    fixture::{check_chain, compiled_chains, hex, interpreted_chains, testdata, Fixture, FixtureFrame, Want},
    memory::{ProcMem, Recorder},
    nmethod,
    ptrace::{self, RawFrame},
    symbols, JavaFrameKind, Jvm, JvmPc,
};

/// A running test JVM, killed and reaped on drop.
struct JavaProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for JavaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `java` can run; without it the test is skipped, except under CI.
fn java_or_skip() -> bool {
    let ok = Command::new("java")
        .arg("-version")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "`java` is not runnable, and CI needs this test"
        );
        eprintln!("skipped: `java` is not on PATH");
    }
    ok
}

/// Compiles testdata/Spin.java and runs it with `jvm_args`; returns once it
/// printed "ready".
fn start_spin(jvm_args: &[&str]) -> JavaProcess {
    let dir = std::env::temp_dir().join(format!("tracer-jvm-test-{}-{}", std::process::id(), jvm_args.len()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let status = Command::new("javac")
        .arg("-d")
        .arg(&dir)
        .arg(testdata().join("Spin.java"))
        .status()
        .expect("running javac");
    assert!(status.success(), "javac failed");
    let mut child = Command::new("java")
        .args(jvm_args)
        .arg("-cp")
        .arg(&dir)
        .arg("jvmtest.Spin")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting java");
    let stdout = child.stdout.take().expect("stdout");
    let proc = JavaProcess { child, dir };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if line.as_deref().is_ok_and(|l| l.trim() == "ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the test JVM did not print \"ready\" within 120 s");
    proc
}

fn find_thread(pid: u32, name: &str) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| t.file_name().to_str()?.parse().ok())?
    })
}

type Walk = Vec<(RawFrame, JvmPc)>;

/// Stops `thread` up to `attempts` times until `accept` likes the named
/// walk; returns that walk (named while the thread is stopped), or the
/// last one seen.
fn sample(
    jvm: &mut Jvm,
    pid: u32,
    thread: &str,
    attempts: usize,
    accept: impl Fn(&[(RawFrame, JvmPc)]) -> bool,
) -> Result<Walk, Walk> {
    // A thread names itself once it runs, maybe after "ready" was printed.
    let tid = (0..250)
        .find_map(|_| {
            let tid = find_thread(pid, thread);
            if tid.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            tid
        })
        .unwrap_or_else(|| panic!("no thread named {thread}"));
    let mem = ProcMem::open(pid).expect("open /proc/PID/mem");
    let mut last = Vec::new();
    for _ in 0..attempts {
        let walk = ptrace::with_stopped(tid, |rip, rbp| {
            ptrace::walk(&mem, rip, rbp)
                .into_iter()
                .map(|f| (f, jvm.name_pc(f.pc, f.method_slot, f.bcp_slot)))
                .collect::<Vec<_>>()
        })
        .expect("ptrace (needs root)");
        if accept(&walk) {
            return Ok(walk);
        }
        last = walk;
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last)
}

fn named(walk: &[(RawFrame, JvmPc)]) -> Vec<JvmPc> {
    walk.iter().map(|(_, n)| n.clone()).collect()
}

/// Samples each thread until its expected chain of frames shows up.
fn sample_chains(
    jvm: &mut Jvm,
    pid: u32,
    attempts: usize,
    chains: &[(&'static str, Vec<Want>)],
) -> Vec<(String, Walk)> {
    chains
        .iter()
        .map(|(thread, want)| {
            let walk = sample(jvm, pid, thread, attempts, |w| check_chain(&named(w), want).is_ok())
                .unwrap_or_else(|last| panic!("{thread}: never found {want:#?}\nlast walk: {last:#?}"));
            (thread.to_string(), walk)
        })
        .collect()
}

/// The live path end to end: attach to a real interpreted JVM by pid and
/// name the frames of stopped threads.
#[test]
fn names_frames_of_a_live_interpreted_jvm() {
    if !java_or_skip() {
        return;
    }
    // Default (tiered) mode has the segmented code cache, which -Xint (as in
    // the interpreted fixture) has not; the test's methods are kept in the
    // interpreter by excluding them from compilation.
    let java = start_spin(&[
        "-XX:CompileCommand=quiet",
        "-XX:CompileCommand=exclude,jvmtest.*::*",
        "-XX:CompileCommand=exclude,java.lang.Thread::*",
    ]);
    let pid = java.child.id();
    let mut jvm = Jvm::attach(pid).expect("attach").expect("the JVM maps libjvm.so");
    assert!(!jvm.preserves_frame_pointer());
    for (thread, walk) in sample_chains(&mut jvm, pid, 200, &interpreted_chains()) {
        // Libjvm's own frames (the thread start) are left to the native
        // symbolizer, and the call stub into Java is a stub.
        let named = named(&walk);
        assert!(named.contains(&JvmPc::Native), "{thread}: {walk:#?}");
        assert!(
            named.contains(&JvmPc::Stub("StubRoutines (1)".into())),
            "{thread}: {walk:#?}"
        );
    }
    assert_eq!(jvm.code_cache.heap_count(), 3, "a segmented code cache");
    // Not a JVM: no libjvm.so mapped.
    assert!(Jvm::attach(std::process::id()).unwrap().is_none());
}

fn java_version() -> String {
    let out = Command::new("java").arg("-version").output().expect("java -version");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Records the memory read while naming one accepted walk per thread,
/// plus synthetic pc-1 inputs for compiled frames (never a call site).
fn capture(name: &str, jvm_args: &[&str], chains: &[(&'static str, Vec<Want>)]) {
    let java = start_spin(jvm_args);
    let pid = java.child.id();
    let lib = symbols::find_libjvm(pid).unwrap().expect("libjvm.so mapped");
    let syms = symbols::resolve(&lib).unwrap();
    let (rec, log) = Recorder::new(ProcMem::open(pid).unwrap());
    let mut jvm = Jvm::from_memory(Box::new(rec), &syms).unwrap();
    let mut frames = Vec::new();
    for (thread, walk) in sample_chains(&mut jvm, pid, 1000, chains) {
        for (f, n) in &walk {
            frames.push(FixtureFrame::new(&thread, f, n, None));
            let compiled = matches!(n, JvmPc::Java(j) if j[0].kind != JavaFrameKind::Interpreted);
            if compiled {
                // Code blobs stay put while the program runs: no need to stop it.
                let g = RawFrame { pc: f.pc - 1, ..*f };
                let off = jvm.name_pc(g.pc, g.method_slot, g.bcp_slot);
                frames.push(FixtureFrame::new(&thread, &g, &off, Some("pc-1")));
                // As if the frame were being deoptimized.
                // (Native wrappers are never deoptimized like this.)
                if let Lookup::Blob(b) = jvm.code_cache.find(&*jvm.mem, &jvm.layout, f.pc) {
                    let handler = nmethod::deopt_handler(&*jvm.mem, &jvm.layout, &b).filter(|_| b.name == "nmethod");
                    if let Some(pc) = handler {
                        let d = RawFrame { pc, ..*f };
                        let named = jvm.name_pc(d.pc, d.method_slot, d.bcp_slot);
                        frames.push(FixtureFrame::new(&thread, &d, &named, Some("deopt")));
                    }
                }
            }
        }
    }
    let fixture = Fixture {
        about: "recorded by jvm::live_tests::capture_fixtures from testdata/Spin.java".into(),
        java_version: java_version(),
        jvm_args: jvm_args.iter().map(|s| s.to_string()).collect(),
        symbols: syms.iter().map(|(k, v)| (k.clone(), hex(*v))).collect(),
        preserve_frame_pointer: jvm.preserves_frame_pointer(),
        frames,
    };
    let json = serde_json::to_string_pretty(&fixture).unwrap();
    std::fs::write(testdata().join(format!("{name}.json")), json + "\n").unwrap();
    std::fs::write(testdata().join(format!("{name}.mem")), log.serialize()).unwrap();
}

/// The flags of the compiled capture; the CompileCommands pin down which
/// calls are inlined so the expected chains hold.
/// Default tiered mode, so the code cache is segmented (three heaps).
pub const COMPILED_ARGS: &[&str] = &[
    "-XX:+PreserveFramePointer",
    "-XX:CompileCommand=quiet",
    "-XX:CompileCommand=inline,jvmtest.Spin::middle",
    "-XX:CompileCommand=dontinline,jvmtest.Spin::outer",
    "-XX:CompileCommand=dontinline,jvmtest.Spin::inner",
    "-XX:CompileCommand=dontinline,jvmtest.Spin::pause",
    "-XX:CompileCommand=dontinline,jvmtest.Spin$Task::run",
];

#[test]
#[ignore = "captures fixtures from a live JVM; run by hand"]
fn capture_fixtures() {
    assert!(java_or_skip(), "capturing needs java");
    capture("interpreted", &["-Xint"], &interpreted_chains());
    capture("compiled", COMPILED_ARGS, &compiled_chains());
}

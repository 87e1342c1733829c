//! Test-only: the fixture files recorded from real JVMs (see
//! live_tests.rs) and the frames expected of testdata/Spin.java. The
//! expectations come from Spin.java itself (its "@" markers), not from
//! what the code produced when recording.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{memory::Replay, ptrace::RawFrame, JavaFrame, JavaFrameKind, JvmPc};

pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/jvm/testdata")
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Fixture {
    pub about: String,
    pub java_version: String,
    pub jvm_args: Vec<String>,
    /// libjvm.so symbol -> run-time address (hex).
    pub symbols: BTreeMap<String, String>,
    pub preserve_frame_pointer: bool,
    pub frames: Vec<FixtureFrame>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FixtureFrame {
    /// Which thread of Spin.java this frame was on.
    pub thread: String,
    pub pc: String,
    pub fp: String,
    pub method_slot: String,
    pub bcp_slot: String,
    /// Set for inputs made up from a real frame (e.g. "pc-1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<String>,
    /// What the live run named it (Debug form), to catch replay drift.
    pub named: String,
}

impl FixtureFrame {
    pub fn new(thread: &str, f: &RawFrame, named: &JvmPc, synthetic: Option<&str>) -> Self {
        FixtureFrame {
            thread: thread.to_string(),
            pc: hex(f.pc),
            fp: hex(f.fp),
            method_slot: hex(f.method_slot),
            bcp_slot: hex(f.bcp_slot),
            synthetic: synthetic.map(str::to_string),
            named: format!("{named:?}"),
        }
    }
}

pub fn hex(v: u64) -> String {
    format!("{v:#x}")
}

pub fn unhex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex number")
}

/// The line an expected frame must have.
#[derive(Clone, Copy, Debug)]
pub enum Line {
    Exact(u32),
    /// Some line (of a JDK class, whose source is not here).
    Known,
    /// No bci and so no line: a native method.
    Absent,
}

/// An expected Java frame.
#[derive(Debug)]
pub struct Want {
    symbol: &'static str,
    file: &'static str,
    line: Line,
    kind: JavaFrameKind,
}

/// The line of Spin.java that carries `marker`.
pub fn marker_line(marker: &str) -> u32 {
    let src = std::fs::read_to_string(testdata().join("Spin.java")).expect("Spin.java");
    let idx = src
        .lines()
        .position(|l| l.trim_end().ends_with(marker))
        .unwrap_or_else(|| panic!("no {marker} in Spin.java"));
    idx as u32 + 1
}

fn want(symbol: &'static str, line: Line, kind: JavaFrameKind) -> Want {
    let file = if symbol.starts_with("java.") {
        "Thread.java"
    } else {
        "Spin.java"
    };
    Want {
        symbol,
        file,
        line,
        kind,
    }
}

/// The "spinner" thread: inner() called from middle() from outer()...
fn spinner(kinds: [JavaFrameKind; 4]) -> Vec<Want> {
    let m = |s| Line::Exact(marker_line(s));
    vec![
        want("jvmtest.Spin.middle(String, int[])", m("@middle-call"), kinds[0]),
        want("jvmtest.Spin.outer(String, int[])", m("@outer-call"), kinds[1]),
        want("jvmtest.Spin$Task.run()", m("@run-call"), kinds[2]),
        want("java.lang.Thread.run()", Line::Known, kinds[3]),
    ]
}

/// The "yielder" thread: in the native Thread.sleep(long).
fn yielder(kinds: [JavaFrameKind; 4]) -> Vec<Want> {
    let m = |s| Line::Exact(marker_line(s));
    vec![
        want("java.lang.Thread.sleep(long)", Line::Absent, kinds[0]),
        want("jvmtest.Spin.pause()", m("@pause-call"), kinds[1]),
        want("jvmtest.Spin$Yielder.run()", m("@yield-call"), kinds[2]),
        want("java.lang.Thread.run()", Line::Known, kinds[3]),
    ]
}

/// With -Xint every frame is interpreted, the native one included.
pub fn interpreted_chains() -> Vec<(&'static str, Vec<Want>)> {
    use JavaFrameKind::Interpreted;
    vec![
        ("spinner", spinner([Interpreted; 4])),
        ("yielder", yielder([Interpreted; 4])),
    ]
}

/// Once hot (see the CompileCommands): middle() is inlined into outer()'s
/// nmethod; the endless loops of the run() methods are OSR-compiled;
/// Thread.run(), called once, stays interpreted; Thread.sleep has a native
/// wrapper nmethod.
pub fn compiled_chains() -> Vec<(&'static str, Vec<Want>)> {
    use JavaFrameKind::{Compiled, Inlined, Interpreted, NativeMethod};
    vec![
        ("spinner", spinner([Inlined, Compiled, Compiled, Interpreted])),
        ("yielder", yielder([NativeMethod, Compiled, Compiled, Interpreted])),
    ]
}

fn matches(f: &JavaFrame, w: &Want) -> bool {
    let (class, method) = w
        .symbol
        .split_once('(')
        .and_then(|(cm, _)| cm.rsplit_once('.'))
        .unwrap_or(("", ""));
    let line_ok = match w.line {
        Line::Exact(l) => f.line == Some(l) && f.bci.is_some(),
        Line::Known => f.line.is_some() && f.bci.is_some(),
        Line::Absent => f.line.is_none() && f.bci.is_none(),
    };
    f.symbol == w.symbol
        && f.class == class
        && f.method == method
        && f.signature.starts_with('(')
        && f.file.as_deref() == Some(w.file)
        && f.kind == w.kind
        && line_ok
}

/// `want` must appear as consecutive Java frames of the named walk.
pub fn check_chain(named: &[JvmPc], want: &[Want]) -> Result<(), String> {
    let frames: Vec<&JavaFrame> = named
        .iter()
        .flat_map(|n| match n {
            JvmPc::Java(f) => f.iter().collect(),
            _ => Vec::new(),
        })
        .collect();
    let found = frames
        .windows(want.len())
        .any(|w| w.iter().zip(want).all(|(f, w)| matches(f, w)));
    found
        .then_some(())
        .ok_or_else(|| format!("{want:#?} not in {frames:#?}"))
}

pub fn load(name: &str) -> (Fixture, Replay) {
    let json = std::fs::read_to_string(testdata().join(format!("{name}.json"))).expect("fixture json");
    let mem = std::fs::read(testdata().join(format!("{name}.mem"))).expect("fixture memory");
    (
        serde_json::from_str(&json).expect("fixture json parses"),
        Replay::parse(&mem).expect("fixture memory parses"),
    )
}

pub fn symbols(f: &Fixture) -> super::symbols::Symbols {
    f.symbols.iter().map(|(k, v)| (k.clone(), unhex(v))).collect()
}

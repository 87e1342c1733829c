//! Version 1 and version 2 side by side: a version-1 recording made by
//! the tracer before version 2 (a fixture) still reports, and the same
//! inputs written as version 2 read back record for record.

use std::io::Read;

use super::{
    codec, format,
    reader::{Item, Reader},
    synth,
    writer::{Header, Recorder},
};
use crate::input::Input;

/// Every record of a recording: (kind, payload), damage as a panic.
fn records<R: Read>(mut r: Reader<R>) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(item) = r.next().expect("reads") {
        match item {
            Item::Record(rec) => out.push((rec.kind.map_or(0, |k| k as u16), rec.payload.to_vec())),
            Item::Damage(d) => panic!("damage in {}: {d:?}", r.path),
        }
    }
    out
}

/// The inputs of a recording, in order.
fn inputs<R: Read>(mut r: Reader<R>) -> (Header, Vec<Input>) {
    let header: Header = serde_json::from_value(r.header.clone()).expect("a header");
    let mut out = Vec::new();
    while let Some(item) = r.next().expect("reads") {
        let Item::Record(rec) = item else {
            panic!("damage: {item:?}")
        };
        let Some(kind) = rec.kind else { continue };
        out.push(codec::decode(kind, &rec.payload).expect("decodes").0);
    }
    (header, out)
}

/// `inputs` written as version 2, flushed at every tick as the agent does.
fn write_v2(header: &Header, inputs: &[Input]) -> Vec<u8> {
    let mut w = Recorder::new(Vec::new(), header).expect("in memory");
    for i in inputs {
        w.write(i).expect("in memory");
        if matches!(i, Input::Tick(_)) {
            w.flush().expect("in memory");
        }
    }
    w.into_inner()
}

/// CPU time of this thread, in ns (a busy machine does not count).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A recording of a loopback churn made with the version-1 writer, given
/// by `TRACER_V1_RECORDING` (with `TRACER_V1_CONNECTIONS`, its number of
/// connections): rewritten as version 2, the same records, and its size
/// per connection. `cargo test -p tracer v1_recording_as_v2 -- --ignored
/// --nocapture`.
#[test]
#[ignore = "needs a real recording: TRACER_V1_RECORDING"]
fn v1_recording_as_v2() {
    let path = std::env::var("TRACER_V1_RECORDING").expect("TRACER_V1_RECORDING");
    let conns: f64 = std::env::var("TRACER_V1_CONNECTIONS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1.0);
    let v1_size = std::fs::metadata(&path).expect("the file").len();
    let (header, ins) = inputs(Reader::open(path.as_ref()).expect("opens"));
    // The field coding alone, the writer's hot path.
    let wires: Vec<Vec<u8>> = ins
        .iter()
        .filter(|i| matches!(i, Input::Kernel(_)))
        .map(|i| {
            let mut v = Vec::new();
            codec::payloads(i, 1, |_, p| v = p.to_vec());
            v
        })
        .collect();
    let mut ctx = super::events::Context::default();
    let mut out = Vec::with_capacity(wires.len() * 32);
    let t = thread_cpu_ns();
    for w in &wires {
        ctx.encode(w, &mut out);
    }
    let per_event = (thread_cpu_ns() - t) as f64 / wires.len().max(1) as f64;
    println!(
        "kernel events field-encoded: {} bytes, {per_event:.0} ns (CPU) an event",
        out.len()
    );
    let t = thread_cpu_ns();
    let v2 = write_v2(&header, &ins);
    let took = std::time::Duration::from_nanos(thread_cpu_ns() - t);
    let t = std::time::Instant::now();
    let back = records(Reader::new("v2".into(), &v2[..]).expect("opens"));
    let read_took = t.elapsed();
    let orig = records(Reader::open(path.as_ref()).expect("opens"));
    assert_eq!(back.len(), orig.len());
    let events = |r: &[(u16, Vec<u8>)]| r.iter().filter(|(k, _)| *k == 1).cloned().collect::<Vec<_>>();
    assert!(events(&back) == events(&orig), "the kernel events differ");
    println!(
        "v1 {v1_size} bytes ({:.1}/connection), v2 {} bytes ({:.1}/connection), written in {took:?} of CPU, read in {read_took:?}",
        v1_size as f64 / conns,
        v2.len(),
        v2.len() as f64 / conns
    );
}

/// `tracer record --pid` of a client leaking 3 connections (26 bytes
/// unread each), made by the version-1 writer (before version 2).
const V1_FIXTURE: &[u8] = include_bytes!("testdata/v1-leaky-client.trc");

fn v1_fixture() -> Reader<&'static [u8]> {
    Reader::new("v1-leaky-client.trc".into(), V1_FIXTURE).expect("opens")
}

/// `report --json` of a recording, with the file names out.
fn report_of(file: &[u8]) -> Vec<serde_json::Value> {
    let mut out = synth::report(&[file], None).expect("reports");
    for o in &mut out {
        if let Some(files) = o.pointer_mut("/recording/files") {
            *files = serde_json::Value::Null;
        }
    }
    out
}

#[test]
fn a_version_1_recording_still_reports() {
    let r = v1_fixture();
    assert_eq!(r.version, 1);
    let out = report_of(V1_FIXTURE);
    assert_eq!(synth::damage(&out), Vec::<String>::new());
    let s = synth::summary(&out);
    assert_eq!(s["recording"]["records"], 46);
    let leaks = s["leaks"].as_array().expect("leaks");
    assert_eq!(leaks.len(), 3, "{s}");
    for l in leaks {
        assert_eq!((&l["pid"], &l["unread_bytes"]), (&32193.into(), &26.into()), "{l}");
        let frames: Vec<&str> = l["open_stack"]
            .as_array()
            .expect("a stack")
            .iter()
            .filter_map(|f| f["symbol"].as_str())
            .collect();
        assert!(frames.iter().any(|f| f.ends_with("open_connection")), "{frames:?}");
    }
    // And every export reads it.
    assert!(
        !super::super::export::folded(synth::replay(&[V1_FIXTURE]).expect("opens"))
            .expect("folded")
            .is_empty()
    );
}

#[test]
fn version_2_of_a_version_1_recording_reports_the_same() {
    let (header, ins) = inputs(v1_fixture());
    let v2 = write_v2(&header, &ins);
    let r = Reader::new("v2".into(), &v2[..]).expect("opens");
    assert_eq!(r.version, format::VERSION);
    // The same records; kernel events byte for byte (the JSON ones are
    // written again, with the fields this tracer's types have now).
    let (a, b) = (records(r), records(v1_fixture()));
    assert_eq!(a.len(), b.len());
    let kinds = |r: &[(u16, Vec<u8>)]| r.iter().map(|(k, _)| *k).collect::<Vec<_>>();
    assert_eq!(kinds(&a), kinds(&b));
    let events = |r: &[(u16, Vec<u8>)]| r.iter().filter(|(k, _)| *k == 1).cloned().collect::<Vec<_>>();
    assert!(events(&a) == events(&b), "the kernel events differ");
    assert_eq!(report_of(&v2), report_of(V1_FIXTURE));
    assert!(
        v2.len() < V1_FIXTURE.len(),
        "{} bytes, {} as version 1",
        v2.len(),
        V1_FIXTURE.len()
    );
    // Read together, in either order: one recording after the other.
    for files in [[V1_FIXTURE, &v2[..]], [&v2[..], V1_FIXTURE]] {
        let out = synth::report(&files, None).expect("reports");
        assert_eq!(synth::summary(&out)["recording"]["records"], 92);
    }
}

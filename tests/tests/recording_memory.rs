//! `tracer report` streams its input: its peak memory follows what the
//! analysis keeps, not the size of the recording. A reader that loads the
//! file (or collects its inputs) peaks above the file's size.

use std::fs::File;
use std::io::BufWriter;
use std::time::Duration;

use tracer_tests::recording::synth::{self, Writer, SEC, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT};
use tracer_tests::{run_tracer_cmd, TempFile};

/// The recording: ~200 MiB.
const BLOCKS: u64 = 500;
/// Sockets per block, each opened and closed (4 events).
const SOCKETS: u64 = 250;
/// Each block also names a process with a command line this long (8 pids
/// in turn: the analysis keeps 8 at most).
const CMDLINE: usize = 256 << 10;

#[test]
fn report_memory_stays_far_below_the_file_size() {
    let file = TempFile::new("big.trc");
    let out = BufWriter::new(File::create(file.path()).expect("create"));
    let mut w = Writer::new(out, &synth::header(1000)).expect("write");
    let comm = b"client";
    // Framed once, written many times: the test's own (debug) checksum
    // would take longer than the report.
    let cmdline = "x".repeat(CMDLINE);
    let names: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            let p = serde_json::json!({"pid": 100 + i, "comm": "client", "cmdline": cmdline});
            synth::frame(synth::kind::PROCESS, p.to_string().as_bytes())
        })
        .collect();
    let mut records = 0u64;
    for b in 0..BLOCKS {
        let pid = 100 + (b % 8) as u32;
        w.framed(&names[(b % 8) as usize]).expect("write");
        let t = (b + 1) * SEC;
        for s in 0..SOCKETS {
            let cookie = b * SOCKETS + s + 1;
            for (old, new) in [
                (TCP_CLOSE, TCP_SYN_SENT),
                (TCP_SYN_SENT, TCP_ESTABLISHED),
                (TCP_ESTABLISHED, 4),
                (4, TCP_CLOSE),
            ] {
                w.event(&synth::state_event(t + s, pid, comm, cookie, old, new, synth::NO_STACK))
                    .expect("write");
            }
        }
        w.tick(t + SOCKETS).expect("write");
        records += 2 + 4 * SOCKETS;
    }
    w.end((BLOCKS + 1) * SEC).expect("write");
    records += 1;
    let size = w.written;
    w.finish().expect("flush");
    assert!(size > 180 << 20, "the recording should be large: {size} bytes");

    let ran = run_tracer_cmd(&["report", "--json", file.arg()], Duration::from_secs(300));
    ran.assert_no_crash();
    ran.assert_success();
    let lines = ran.json_lines().unwrap_or_else(|e| panic!("{e}\n{}", ran.describe()));
    let summary = lines.last().expect("a summary");
    assert_eq!(summary["recording"]["records"], records, "{}", ran.describe());
    assert_eq!(summary["stats"]["agent"]["events"], BLOCKS * SOCKETS * 4);

    // The reader holds at most one record (16 MiB) and a read ahead; the
    // analysis 8 command lines. A quarter of the file is far above both,
    // and far below a reader that holds the file.
    let peak = ran.peak_rss_kib << 10;
    eprintln!("report of a {} MiB recording: peak RSS {} MiB", size >> 20, peak >> 20);
    assert!(peak > 0, "no peak RSS measured");
    assert!(
        peak < size / 4,
        "report's peak RSS ({} MiB) grows with the file ({} MiB)",
        peak >> 20,
        size >> 20
    );
}

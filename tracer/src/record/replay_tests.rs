//! Recordings written by the real writer and replayed: big snapshots,
//! several files, crafted values, structural damage.

use tracer_common::tcp;

use super::{
    format::{encode_record, Kind, MAX_RECORD, RECORD_HEADER},
    synth::*,
};
use crate::input::Input;

/// The sockets of a big host: 200k, every 200th leaked in CLOSE_WAIT
/// since 10 s before the snapshot.
fn big_host(n: u64) -> Vec<crate::correlate::SnapshotSocket> {
    (1..=n)
        .map(|cookie| {
            if cookie % 200 == 0 {
                socket(cookie, tcp::CLOSE_WAIT, 42, Some(10 * SEC))
            } else {
                socket(cookie, tcp::ESTABLISHED, 42, None)
            }
        })
        .collect()
}

#[test]
fn a_200k_socket_snapshot_replays_whole() {
    const N: u64 = 200_000;
    let t0 = 1000 * SEC;
    let inputs = vec![
        process(42, "server"),
        snapshot(t0, big_host(N)),
        Input::Tick(t0 + SEC),
        end(t0 + SEC),
    ];
    let v1 = write_v1(&header(5000), &inputs, super::codec::SNAPSHOT_PART);
    // Whole, the snapshot would be one record over the limit (and dropped
    // as corrupt): the test is about that size.
    assert!(v1.len() > MAX_RECORD as usize, "only {} bytes", v1.len());
    let v2 = write(&header(5000), &inputs, super::codec::SNAPSHOT_PART);
    for file in [v1, v2] {
        a_200k_socket_report(&file, N);
    }
}

fn a_200k_socket_report(file: &[u8], n: u64) {
    let out = report(&[file], None).unwrap();
    let start = &of_type(&out, "start")[0];
    assert_eq!(start["preexisting_sockets"], n, "{start}");
    assert_eq!(damage(&out), Vec::<String>::new());
    let s = summary(&out);
    assert_eq!(s["stats"]["agent"]["sockets_tracked"], n);
    let leaks = s["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), (n / 200) as usize);
    assert!(leaks
        .iter()
        .all(|l| l["close_wait_estimated"] == true && l["pid"] == 42));
    // 200k sockets in parts of SNAPSHOT_PART: 25 records, plus the others.
    assert_eq!(s["recording"]["records"], 25 + 3);
}

#[test]
fn counters_of_several_files_are_summed_never_subtracted() {
    // Each recording counts from zero: the second file's 5 drops come
    // after the first's 100, they do not undo them.
    let a = write(
        &header(1000),
        &[stats(SEC, &[("ringbuf_drops", 100), ("generated", 1000)]), end(2 * SEC)],
        4,
    );
    let b = write(
        &header(1000),
        &[
            stats(3 * SEC, &[("ringbuf_drops", 5), ("stack_errors", 1), ("generated", 10)]),
            // Crafted: a counter going down within a file stays where it was.
            stats(4 * SEC, &[("ringbuf_drops", 3), ("stack_errors", 2), ("generated", 20)]),
            stats(5 * SEC, &[("ringbuf_drops", 7), ("stack_errors", 2), ("generated", 30)]),
            end(6 * SEC),
        ],
        4,
    );
    let out = report(&[&a, &b], None).unwrap();
    let losses: Vec<(u64, u64)> = of_type(&out, "loss")
        .iter()
        .map(|l| {
            (
                l["kernel"]["ringbuf_drops"].as_u64().unwrap(),
                l["new_ringbuf_drops"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(losses, vec![(100, 100), (105, 5), (105, 0), (107, 2)]);
    let k = &summary(&out)["stats"]["kernel"];
    assert_eq!(
        (&k["ringbuf_drops"], &k["stack_errors"], &k["generated"]),
        (&107.into(), &2.into(), &1030.into()),
        "{k}"
    );
    assert_eq!(damage(&out), Vec::<String>::new());
}

#[test]
fn crafted_extremes_neither_overflow_nor_wrap() {
    // A threshold whose nanoseconds pass u64, and times at the clock's end.
    let mut h = header(u64::MAX);
    h.boot_to_wall_offset_ns = i64::MAX;
    let max = u64::MAX;
    let mut inputs = connect_then_fin(max - 20, max - 10, 7, 1);
    inputs.extend([Input::Tick(max - 1), end(max - 1)]);
    let file = write(&h, &inputs, 4);
    let out = report(&[&file], None).unwrap();
    assert_eq!(of_type(&out, "start")[0]["leak_after_ms"], u64::MAX / MS);
    assert!(summary(&out)["leaks"].as_array().unwrap().is_empty());

    // A leak found at the clock's end and closed right then: its late
    // close comes after since + threshold, which is past u64.
    let mut inputs = connect_then_fin(max - 20, max - 10, 7, 1);
    inputs.extend([
        Input::Tick(max),
        state(max, 7, 1, tcp::CLOSE_WAIT, tcp::LAST_ACK),
        end(max),
    ]);
    let file = write(&header(1000), &inputs, 4);
    let out = report(&[&file], None).unwrap();
    assert_eq!(of_type(&out, "leak").len(), 1);
    let late = of_type(&out, "late_close");
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["closed_after_ms"], 0, "{}", late[0]);
}

/// `(offset, length)` of each version-1 record after the file header.
fn records(file: &[u8], body: usize) -> Vec<(usize, usize)> {
    let mut at = body;
    let mut out = Vec::new();
    while at < file.len() {
        let len = u32::from_le_bytes(file[at..at + 4].try_into().unwrap()) as usize;
        out.push((at, RECORD_HEADER + len));
        at += RECORD_HEADER + len;
    }
    out
}

fn body_start() -> usize {
    write_v1(&header(1000), &[], 4).len()
}

/// A version-1 file's records, or a version-2 file's blocks (of one
/// record each): where a record is, and where its payload is.
fn units(file: &[u8], v2: bool) -> Vec<(usize, usize)> {
    if v2 {
        blocks(file)
    } else {
        records(file, body_start())
    }
}

#[test]
fn lost_or_repeated_snapshot_parts_are_reported() {
    let t0 = 10 * SEC;
    let sockets: Vec<_> = (1..=5).map(|c| socket(c, tcp::CLOSE_WAIT, 42, Some(0))).collect();
    let inputs = vec![snapshot(t0, sockets), Input::Tick(t0 + 2 * SEC), end(t0 + 2 * SEC)];
    for v2 in [false, true] {
        let file = if v2 {
            write_blocks(&header(1000), &inputs, 2)
        } else {
            write_v1(&header(1000), &inputs, 2)
        };
        let recs = units(&file, v2);
        assert_eq!(recs.len(), 3 + 2, "three parts of 2, 2 and 1 sockets");

        // Part 0 damaged: the other parts are used, and their total known.
        let mut damaged = file.clone();
        damaged[recs[0].0 + recs[0].1 - 3] ^= 0x20;
        let out = report(&[&damaged], None).unwrap();
        assert_eq!(of_type(&out, "start")[0]["preexisting_sockets"], 5);
        assert_eq!(summary(&out)["leaks"].as_array().unwrap().len(), 3);
        let d = damage(&out);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("corrupt data at byte"), "{d:?}");
        assert!(
            d[1].contains("1 of the 3 parts of the start-up snapshot are missing"),
            "{d:?}"
        );

        // Part 1 twice: the copy is skipped and said so.
        let (at, len) = recs[1];
        let mut twice = file[..at + len].to_vec();
        twice.extend_from_slice(&file[at..]);
        let out = report(&[&twice], None).unwrap();
        assert_eq!(summary(&out)["leaks"].as_array().unwrap().len(), 5);
        let d = damage(&out);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("repeats a part of the start-up snapshot"), "{d:?}");
    }
}

#[test]
fn records_after_the_end_are_reported() {
    let inputs = vec![Input::Tick(SEC), end(2 * SEC)];
    for v2 in [false, true] {
        let file = if v2 {
            write_blocks(&header(1000), &inputs, 4)
        } else {
            write_v1(&header(1000), &inputs, 4)
        };
        let recs = units(&file, v2);
        let mut joined = file.clone();
        joined.extend_from_slice(&file[recs[0].0..]);
        let out = report(&[&joined], None).unwrap();
        let d = damage(&out);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("follows the end record"), "{d:?}");
        assert_eq!(summary(&out)["recording"]["ended_early"], false);
    }
}

#[test]
fn one_record_snapshots_of_earlier_recordings_still_read() {
    let t0 = 10 * SEC;
    let mut file = write_v1(&header(1000), &[], 4);
    let sockets: Vec<_> = (1..=3).map(|c| socket(c, tcp::CLOSE_WAIT, 42, Some(0))).collect();
    let old = serde_json::to_vec(&serde_json::json!({"ns": t0, "sockets": sockets})).unwrap();
    encode_record(&mut file, Kind::Snapshot, &old);
    let mut rest = Vec::new();
    super::codec::encode(&Input::Tick(t0 + 2 * SEC), &mut rest, 4);
    super::codec::encode(&end(t0 + 2 * SEC), &mut rest, 4);
    file.extend_from_slice(&rest);
    let out = report(&[&file], None).unwrap();
    assert_eq!(of_type(&out, "start")[0]["preexisting_sockets"], 3);
    assert_eq!(summary(&out)["leaks"].as_array().unwrap().len(), 3);
    assert_eq!(damage(&out), Vec::<String>::new());
}

#[test]
fn a_leak_closed_by_its_owner_is_a_late_close() {
    // The ordinary path through the writer, the reader and the engine.
    let mut inputs = vec![process(7, "leaky")];
    inputs.extend(connect_then_fin(SEC, 2 * SEC, 7, 1));
    inputs.extend([
        Input::Tick(4 * SEC),
        close(5 * SEC, 7, 1, 3),
        state(5 * SEC, 7, 1, tcp::CLOSE_WAIT, tcp::LAST_ACK),
        end(6 * SEC),
    ]);
    let out = report(&[&write(&header(1000), &inputs, 4)], None).unwrap();
    assert_eq!(of_type(&out, "leak").len(), 1);
    let late = of_type(&out, "late_close");
    assert_eq!(late.len(), 1);
    assert_eq!(
        (&late[0]["cmdline"], &late[0]["closed_after_ms"]),
        (&"leaky --serve".into(), &2000.into())
    );
    assert!(summary(&out)["leaks"].as_array().unwrap().is_empty());
}

/// A socket of `pid` whose connect carries user stack `ustack` and kernel
/// stack `kstack`, in CLOSE_WAIT from `fin_ns`.
fn leak_with_stacks(ns: u64, fin_ns: u64, pid: u32, cookie: u64, ustack: i32, kstack: i32) -> Vec<Input> {
    let mut inputs = connect_then_fin(ns, fin_ns, pid, cookie);
    if let Input::Kernel(crate::decode::Event::State(s)) = &mut inputs[0] {
        s.header.ustack = ustack;
        s.header.kstack = kstack;
    }
    inputs
}

fn named_stack(pid: u32, id: i32, symbol: &str) -> Input {
    let kernel = pid == 0;
    Input::Stack(
        serde_json::from_value(serde_json::json!({
            "key": {"pid": pid, "id": id},
            "frames": {"Ok": [{
                "ip": "0x1000", "symbol": symbol, "module": null, "offset": null, "file": null,
                "line": null, "kernel": kernel, "kind": if kernel { "kernel" } else { "native" }
            }]},
        }))
        .expect("a stack input"),
    )
}

#[test]
fn stack_ids_of_several_files_never_mix() {
    // Both recordings number their stacks from 1: the same ids, other
    // stacks. The first file's leak is still open when the second is read.
    let mut a = vec![named_stack(7, 1, "a_user"), named_stack(0, 2, "a_kernel")];
    a.extend(leak_with_stacks(SEC, SEC, 7, 1, 1, 2));
    a.push(end(3 * SEC));
    let mut b = vec![named_stack(8, 1, "b_user"), named_stack(0, 2, "b_kernel")];
    b.extend(leak_with_stacks(10 * SEC, 10 * SEC, 8, 2, 1, 2));
    b.push(end(12 * SEC));
    let (a, b) = (write(&header(1000), &a, 4), write(&header(1000), &b, 4));
    let out = report(&[&a, &b], None).unwrap();
    let leaks = summary(&out)["leaks"].as_array().cloned().unwrap_or_default();
    let symbols = |cookie: u64| -> Vec<String> {
        let leak = leaks
            .iter()
            .find(|l| l["cookie"].as_u64() == Some(cookie))
            .unwrap_or_else(|| panic!("no leak {cookie}: {leaks:?}"));
        leak["open_stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["symbol"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    assert_eq!(symbols(1), ["a_user", "a_kernel"]);
    assert_eq!(symbols(2), ["b_user", "b_kernel"]);
}

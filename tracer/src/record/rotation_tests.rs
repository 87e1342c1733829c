//! `--max-size` with and without `--rotate`, on files in memory: the
//! files kept, their sizes, each one read alone, and their union read as
//! the recording unrotated.

use std::{cell::RefCell, io::Write, rc::Rc};

use serde_json::Value;
use tracer_common::tcp;

use super::{
    format::Kind,
    reader::Reader,
    synth::*,
    writer::{Header, Recorder, Written},
};
use crate::input::Input;

/// Files of a rotated recording in memory: `None` once removed.
type Files = Rc<RefCell<Vec<Option<Vec<u8>>>>>;

struct MemFile {
    files: Files,
    index: usize,
}

impl Write for MemFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut files = self.files.borrow_mut();
        files[self.index]
            .as_mut()
            .expect("written only while kept")
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rotating(header: &Header, keep: u32) -> (Recorder<MemFile>, Files) {
    let files: Files = Rc::default();
    let (f1, f2) = (files.clone(), files.clone());
    let open = move |index: u64| {
        let mut v = f1.borrow_mut();
        assert_eq!(index as usize, v.len(), "files are opened in sequence");
        v.push(Some(Vec::new()));
        Ok(MemFile {
            files: f1.clone(),
            index: index as usize,
        })
    };
    let remove = move |index: u64| {
        let mut v = f2.borrow_mut();
        assert!(v[index as usize].is_some(), "file {index} removed twice");
        v[index as usize] = None;
    };
    let r = Recorder::rotating(header, keep, Box::new(open), Box::new(remove)).expect("in memory");
    (r, files)
}

fn header_max(max_size: u64) -> Header {
    let mut h = header(1000);
    h.options.max_size = Some(max_size);
    h
}

/// Connections from pid 9 opened and closed (2 state changes and a close
/// each, no leak), at 1 ms each from `t`.
fn churn(t: u64, first_cookie: u64, n: u64) -> Vec<Input> {
    let mut v = Vec::new();
    for i in 0..n {
        let (c, ns) = (first_cookie + i, t + i * MS);
        v.push(state(ns, 9, c, tcp::CLOSE, tcp::SYN_SENT));
        v.push(state(ns, 9, c, tcp::SYN_SENT, tcp::ESTABLISHED));
        v.push(close(ns, 9, c, 3));
        v.push(state(ns, 9, c, tcp::ESTABLISHED, tcp::FIN_WAIT1));
        if i % 100 == 99 {
            v.push(Input::Tick(ns));
        }
    }
    v
}

fn named_stack(pid: u32, id: i32, symbol: &str) -> Input {
    Input::Stack(
        serde_json::from_value(serde_json::json!({
            "key": {"pid": pid, "id": id},
            "frames": {"Ok": [{
                "ip": "0x1000", "symbol": symbol, "module": null, "offset": null, "file": null,
                "line": null, "kernel": false, "kind": "native"
            }]},
        }))
        .expect("a stack input"),
    )
}

/// A recording whose only leak is opened (with stack 5, named at the
/// start) near its end, after a long churn; and counters that grow.
fn long_recording() -> Vec<Input> {
    let mut v = vec![
        process(7, "leaky"),
        named_stack(7, 5, "open_leaky"),
        snapshot(0, vec![]),
    ];
    v.push(stats(SEC, &[("ringbuf_drops", 10), ("generated", 100)]));
    v.extend(churn(SEC, 1000, 3000));
    v.push(stats(5 * SEC, &[("ringbuf_drops", 15), ("generated", 200)]));
    v.extend(churn(5 * SEC, 10_000, 3000));
    let mut leak = connect_then_fin(9 * SEC, 9 * SEC, 7, 1);
    if let Input::Kernel(crate::decode::Event::State(s)) = &mut leak[0] {
        s.header.ustack = 5;
    }
    v.extend(leak);
    v.extend([
        stats(11 * SEC, &[("ringbuf_drops", 16), ("generated", 300)]),
        Input::Tick(11 * SEC),
        end(11 * SEC),
    ]);
    v
}

/// Every input written to a recording of files of at most `max` bytes,
/// `keep` of them kept: those files, by index.
fn record_all(inputs: &[Input], max: u64, keep: u32) -> Vec<(usize, Vec<u8>)> {
    let (mut r, files) = rotating(&header_max(max), keep);
    for i in inputs {
        r.write(i).unwrap();
    }
    drop(r);
    kept(&files)
}

fn kept(files: &Files) -> Vec<(usize, Vec<u8>)> {
    files
        .borrow()
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.clone().map(|f| (i, f)))
        .collect()
}

fn leaks(out: &[Value]) -> Vec<(u64, String, String)> {
    summary(out)["leaks"]
        .as_array()
        .expect("leaks")
        .iter()
        .map(|l| {
            let sym = l["open_stack"][0]["symbol"].as_str().unwrap_or("").to_string();
            (
                l["cookie"].as_u64().expect("cookie"),
                l["cmdline"].as_str().unwrap_or("").to_string(),
                sym,
            )
        })
        .collect()
}

#[test]
fn rotated_files_each_stand_alone_and_together_are_the_recording() {
    const MAX: u64 = 2560;
    let inputs = long_recording();
    let whole = write(&header(1000), &inputs, 4);
    let whole_out = report(&[&whole], None).unwrap();
    assert_eq!(
        leaks(&whole_out),
        vec![(1, "leaky --serve".into(), "open_leaky".into())]
    );

    let (mut r, files) = rotating(&header_max(MAX), 1000);
    for i in &inputs {
        assert!(matches!(r.write(i).unwrap(), Written::Ok), "rotating never fills up");
        if matches!(i, Input::Tick(_)) {
            r.flush().unwrap();
        }
    }
    r.flush().unwrap();
    drop(r);
    let all = kept(&files);
    assert!(all.len() >= 5, "only {} files for {} bytes", all.len(), whole.len());
    assert!(all.len() < 200, "{} files", all.len());
    for (i, f) in &all {
        assert!(f.len() as u64 <= MAX, "file {i}: {} bytes", f.len());
        // Each file stands alone: its header says which it is, it reads
        // without damage, and it ends cleanly (rotated, or the end).
        let reader = Reader::new(format!("f{i}"), &f[..]).unwrap();
        assert_eq!(reader.header["segment"]["index"], *i, "{}", reader.header);
        assert_eq!(reader.header["segment"]["rotate"], 1000);
        let out = report(&[f], None).unwrap();
        assert_eq!(damage(&out), Vec::<String>::new(), "file {i}");
        let reason = summary(&out)["reason"].clone();
        if *i + 1 < all.len() {
            assert_eq!(reason, "rotated", "file {i}: the recording goes on in the next");
        } else {
            assert_eq!(reason, "duration", "the last file");
        }
    }
    // Together: the recording, with the same leaks and counters.
    let set: Vec<&[u8]> = all.iter().map(|(_, f)| &f[..]).collect();
    let out = report(&set, None).unwrap();
    assert_eq!(damage(&out), Vec::<String>::new());
    assert_eq!(leaks(&out), leaks(&whole_out));
    let kernel = |o: &[Value]| summary(o)["stats"]["kernel"].clone();
    assert_eq!(kernel(&out), kernel(&whole_out));
    assert_eq!(kernel(&out)["ringbuf_drops"], 16);
    assert_eq!(summary(&out)["reason"], "duration");
    let tracked = |o: &[Value]| summary(o)["stats"]["agent"]["sockets_seen"].clone();
    assert_eq!(tracked(&out), tracked(&whole_out));
    let losses = |o: &[Value]| {
        of_type(o, "loss")
            .iter()
            .map(|l| l["kernel"]["ringbuf_drops"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&out), losses(&whole_out));
}

#[test]
fn only_the_last_n_files_are_kept_and_still_name_their_leaks() {
    const MAX: u64 = 2560;
    let inputs = long_recording();
    let (mut r, files) = rotating(&header_max(MAX), 3);
    for i in &inputs {
        r.write(i).unwrap();
        if matches!(i, Input::Tick(_)) {
            r.flush().unwrap();
        }
    }
    drop(r);
    let all = files.borrow().len();
    let kept = kept(&files);
    assert!(all > 5, "{all} files");
    assert_eq!(
        kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![all - 3, all - 2, all - 1],
        "the last 3"
    );
    // The name and stack of the leak were recorded in the first file,
    // long removed: the kept files repeat them.
    let set: Vec<&[u8]> = kept.iter().map(|(_, f)| &f[..]).collect();
    let out = report(&set, None).unwrap();
    assert_eq!(damage(&out), Vec::<String>::new());
    assert_eq!(leaks(&out), vec![(1, "leaky --serve".into(), "open_leaky".into())]);
    // The counters of the kept files are what happened in them.
    let drops = summary(&out)["stats"]["kernel"]["ringbuf_drops"].as_u64().unwrap();
    assert!(drops < 16, "{drops}");
}

#[test]
fn forgotten_names_and_stacks_are_not_repeated() {
    const MAX: u64 = 2560;
    let mut inputs = vec![
        process(7, "leaky"),
        named_stack(7, 5, "open_leaky"),
        snapshot(0, vec![]),
    ];
    inputs.push(Input::Forget(crate::input::ForgetInput {
        ns: SEC,
        pids: vec![7],
        stacks: vec![crate::input::StackKey { pid: 7, id: 5 }],
    }));
    inputs.extend(churn(SEC, 1000, 2000));
    inputs.push(end(3 * SEC));
    let kept = record_all(&inputs, MAX, 100);
    assert!(kept.len() > 2);
    for (i, f) in kept.iter().skip(1) {
        let mut r = Reader::new(format!("f{i}"), &f[..]).unwrap();
        while let Some(item) = r.next().unwrap() {
            let super::reader::Item::Record(rec) = item else {
                panic!("{item:?}")
            };
            assert!(
                !matches!(rec.kind, Some(Kind::Process | Kind::Stack)),
                "file {i} repeats a forgotten {:?}",
                rec.kind
            );
        }
    }
}

#[test]
fn without_rotate_max_size_stops_the_recording_with_a_clean_end() {
    const MAX: u64 = 64 << 10;
    let mut h = header(1000);
    h.options.max_size = Some(MAX);
    let mut r = Recorder::new(Vec::new(), &h).unwrap();
    let mut full_at = None;
    for (n, i) in churn(SEC, 1, 100_000).iter().enumerate() {
        match r.write(i).unwrap() {
            Written::Ok => {}
            Written::Full => {
                full_at = Some(n);
                break;
            }
        }
    }
    let n = full_at.expect("the size limit is reached");
    // The final counters and End go in, in the room kept for them.
    for i in [stats(2 * SEC, &[("generated", 5)]), end(2 * SEC)] {
        assert!(matches!(r.write(&i).unwrap(), Written::Ok));
    }
    let file = r.into_inner();
    assert!(file.len() as u64 <= MAX, "{} bytes", file.len());
    // Compressed blocks: it gets close to the limit, not a fraction of it.
    assert!(file.len() as u64 > MAX - 4096, "{} bytes", file.len());
    let out = report(&[&file], None).unwrap();
    assert_eq!(damage(&out), Vec::<String>::new());
    let s = summary(&out);
    assert_eq!(s["recording"]["records"], n as u64 + 2);
    assert_eq!(s["stats"]["kernel"]["generated"], 5);
}

#[test]
fn counters_add_up_when_they_fill_a_file() {
    const MAX: u64 = 2560;
    // Counters between every few events: some of them are what passes a
    // file's size, and go in the next file, relative to it.
    let mut inputs = vec![snapshot(0, vec![])];
    let churn = churn(SEC, 1, 4000);
    for (i, chunk) in churn.chunks(40).enumerate() {
        inputs.extend(chunk.iter().cloned());
        let n = i as u64 + 1;
        inputs.push(stats(SEC + n * MS, &[("generated", 40 * n), ("ringbuf_drops", n / 7)]));
    }
    let last = (churn.len() as u64).div_ceil(40);
    inputs.push(end(10 * SEC));
    let all = record_all(&inputs, MAX, 1000);
    assert!(all.len() > 3, "{} files", all.len());
    for (i, f) in &all {
        assert!(f.len() as u64 <= MAX, "file {i}: {} bytes", f.len());
    }
    let set: Vec<&[u8]> = all.iter().map(|(_, f)| &f[..]).collect();
    let out = report(&set, None).unwrap();
    assert_eq!(damage(&out), Vec::<String>::new());
    let k = &summary(&out)["stats"]["kernel"];
    assert_eq!(
        (&k["generated"], &k["ringbuf_drops"]),
        (&(40 * last).into(), &(last / 7).into()),
        "{k}"
    );
}

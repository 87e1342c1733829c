//! Checking `tracer export` output: jsonl facts about sockets, the
//! chrome-trace document, folded lines.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::Ran;
use crate::tracer::TracerOutput;

/// The `cat:"socket"` spans of a chrome-trace document, checked: complete
/// events with a numeric `args.cookie`, at most one per cookie.
pub fn socket_spans<'a>(doc: &'a Value, ctx: &str) -> BTreeMap<u64, &'a Value> {
    let events = doc
        .get("traceEvents")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no traceEvents array\n{ctx}"));
    let mut spans = BTreeMap::new();
    for e in events {
        if e.get("cat").and_then(Value::as_str) != Some("socket") {
            continue;
        }
        assert_eq!(
            e.get("ph").and_then(Value::as_str),
            Some("X"),
            "socket span: {e}\n{ctx}"
        );
        let cookie = e
            .get("args")
            .and_then(|a| a.get("cookie"))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("socket span without args.cookie: {e}\n{ctx}"));
        if let Some(first) = spans.insert(cookie, e) {
            panic!("two socket spans for cookie {cookie}:\n  {first}\n  {e}\n{ctx}");
        }
    }
    spans
}

/// What a jsonl export says about sockets.
pub struct JsonlFacts {
    pub records: Vec<Value>,
    /// Cookies of every event and of the start-up snapshot's sockets.
    pub seen: BTreeSet<u64>,
    /// Cookies with a state event into CLOSE_WAIT.
    pub entered_close_wait: BTreeSet<u64>,
    /// Cookies with a state event out of CLOSE_WAIT, or into CLOSE.
    pub left_close_wait: BTreeSet<u64>,
}

/// Parses a clean recording's jsonl export: every line an object with a
/// `"type"`, a header first, one end; events with a cookie and a kind.
pub fn jsonl_facts(jsonl: &Ran) -> JsonlFacts {
    let records = jsonl
        .json_lines()
        .unwrap_or_else(|e| panic!("{e}\n{}", jsonl.describe()));
    let ty = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        records.first().map(ty).as_deref(),
        Some("header"),
        "first record\n{}",
        jsonl.describe()
    );
    let count = |t: &str| records.iter().filter(|r| ty(r) == t).count();
    assert_eq!(
        (count("header"), count("end")),
        (1, 1),
        "one header, one end\n{}",
        jsonl.describe()
    );
    let mut seen = BTreeSet::new();
    let mut entered_close_wait = BTreeSet::new();
    let mut left_close_wait = BTreeSet::new();
    for r in &records {
        match ty(r).as_str() {
            "event" => {
                let cookie = r
                    .get("cookie")
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| panic!("event without a cookie: {r}"));
                let kind = r.get("kind").and_then(Value::as_str);
                assert!(matches!(kind, Some("state" | "accept" | "close")), "event kind: {r}");
                if kind == Some("state") {
                    for f in ["old_state", "new_state"] {
                        assert!(r.get(f).is_some_and(Value::is_string), "{f}: {r}");
                    }
                    if r["new_state"] == "CLOSE_WAIT" {
                        entered_close_wait.insert(cookie);
                    }
                    if r["old_state"] == "CLOSE_WAIT" || r["new_state"] == "CLOSE" {
                        left_close_wait.insert(cookie);
                    }
                }
                // 0: an fd event for a socket the kernel had not given a
                // cookie yet (it predates the tracer and changed no state
                // since); not an identity, so no span of its own.
                if cookie != 0 || kind == Some("state") {
                    seen.insert(cookie);
                }
            }
            "snapshot" => {
                let sockets = r
                    .pointer("/snapshot/sockets")
                    .and_then(Value::as_array)
                    .unwrap_or_else(|| panic!("snapshot without sockets: {r}"));
                for s in sockets {
                    seen.insert(
                        s.get("cookie")
                            .and_then(Value::as_u64)
                            .unwrap_or_else(|| panic!("snapshot socket without a cookie: {s}")),
                    );
                }
            }
            _ => {}
        }
    }
    JsonlFacts {
        records,
        seen,
        entered_close_wait,
        left_close_wait,
    }
}

/// The report's leaks at the end are sockets of the recording, none of
/// which the recording shows leaving CLOSE_WAIT (closed, or reset): cookies
/// are unique per boot, so nothing can bring such a socket back.
pub fn check_no_closed_leaks(report: &TracerOutput, facts: &JsonlFacts) {
    for leak in report.leaks() {
        let cookie = leak["cookie"].as_u64().unwrap_or_default();
        assert!(
            facts.seen.contains(&cookie),
            "the report's leak is in no event nor the snapshot: {leak}"
        );
        assert!(
            !facts.left_close_wait.contains(&cookie),
            "the report calls a socket leaked that the recording shows closed: {leak}\n  its state events:{}",
            facts
                .records
                .iter()
                .filter(|r| r["type"] == "event" && r["kind"] == "state" && r["cookie"] == cookie)
                .map(|r| format!("\n    {r}"))
                .collect::<String>()
        );
    }
}

/// Checks a chrome-trace export against the cookies the recording holds
/// (`seen`): exactly one socket span per cookie, a process_name for every
/// track, state spans inside their socket's span. Returns the socket spans
/// by cookie and the process names by pid.
pub fn check_chrome_trace(chrome: &Ran, seen: &BTreeSet<u64>) -> (BTreeMap<u64, Value>, BTreeMap<u64, String>) {
    let doc: Value =
        serde_json::from_slice(&chrome.stdout).unwrap_or_else(|e| panic!("not JSON: {e}\n{}", chrome.describe()));
    let ctx = chrome.describe();
    let spans = socket_spans(&doc, &ctx);
    let span_cookies: BTreeSet<u64> = spans.keys().copied().collect();
    let only_spans: Vec<&u64> = span_cookies.difference(seen).collect();
    let only_jsonl: Vec<&u64> = seen.difference(&span_cookies).collect();
    assert!(
        only_spans.is_empty() && only_jsonl.is_empty(),
        "socket spans vs cookies of jsonl events and snapshot: only in spans {only_spans:?}, \
         only in jsonl {only_jsonl:?}"
    );
    let events = doc["traceEvents"].as_array().expect("checked");
    let names: BTreeMap<u64, String> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .filter_map(|e| Some((e.get("pid")?.as_u64()?, e.pointer("/args/name")?.as_str()?.to_string())))
        .collect();
    let mut tracks: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for span in spans.values() {
        let pid = span
            .get("pid")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("span pid: {span}"));
        assert!(
            names.contains_key(&pid),
            "no process_name metadata for pid {pid} of {span}\n{ctx}"
        );
        tracks
            .entry((span["pid"].to_string(), span["tid"].to_string()))
            .or_default()
            .push(span);
    }
    // State spans sit inside their socket's span, on its track.
    let mut state_spans = 0;
    for st in events.iter().filter(|e| e["cat"] == "state") {
        assert_eq!(st["ph"], "X", "state span: {st}");
        let (ts, end) = (num(st, "ts"), num(st, "ts") + num(st, "dur"));
        let track = tracks
            .get(&(st["pid"].to_string(), st["tid"].to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let inside = track
            .iter()
            .any(|s| num(s, "ts") - 0.01 <= ts && end <= num(s, "ts") + num(s, "dur") + 0.01);
        assert!(
            inside,
            "state span outside its socket's span (pid, tid): {st}\n  socket spans on that track: {track:?}"
        );
        state_spans += 1;
    }
    assert!(state_spans >= spans.len(), "fewer state spans than sockets\n{ctx}");
    let spans = spans.into_iter().map(|(c, v)| (c, v.clone())).collect();
    (spans, names)
}

pub fn num(v: &Value, name: &str) -> f64 {
    v.get(name)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{name:?} is not a number: {v}"))
}

/// Parses `N` from a folded line `frames N`.
pub fn folded_count(line: &str) -> Option<u64> {
    let (stack, count) = line.rsplit_once(' ')?;
    let first = stack.chars().next()?;
    if first.is_whitespace() || count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    count.parse().ok()
}

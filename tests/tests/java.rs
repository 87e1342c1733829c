//! A real HotSpot JVM leaking sockets the way the motivating bug does: an
//! `HttpURLConnection` client (tests/java/MetaClient.java) gets HTTP 404
//! from a separate server JVM (MetaServer.java), never reads nor closes the
//! error stream, and its sockets sit in CLOSE_WAIT. The tracer, given the
//! client's pid, must find exactly the sockets `ss` shows (both ways), and
//! name the Java code that opened them: `MetaClient.fetchMetadata(String)`
//! at the line marked `// CONNECT-LINE`, under the JDK's HttpURLConnection
//! frames, called from `MetaClient.main(String[])`, with libc's `connect`
//! innermost. Interpreted (no flags), compiled with frame pointers
//! (`-Xcomp -XX:+PreserveFramePointer`), compiled without (where a walk
//! that cannot be trusted must be cut and say so), and replayed from a
//! recording after the JVM is gone.
//!
//! Root, and a JDK 17+ (`cargo xtask setup` installs
//! openjdk-17-jdk-headless): without them these tests skip locally and fail
//! under CI. They run one at a time ([`serial`]): -Xcomp start-up alone
//! takes seconds of both cores.

use std::collections::BTreeSet;

use tracer_tests::java::{
    describe_leak, marked_line, open_stack, record_and_report, require_jdk, serial, split_java_symbol, trace_live,
    JFrame, JavaRun, Jdk,
};
use tracer_tests::{assert_same_cookies, require_privileges, Evidence, Value};

/// Requests the client makes, each leaking one connection.
const COUNT: usize = 3;

const USER_METHOD: &str = "MetaClient.fetchMetadata(";
const USER_FILE: &str = "MetaClient.java";
const MAIN: &str = "MetaClient.main(String[])";
/// The JDK's HTTP client, between the user's method and the socket.
const JDK_HTTP: &str = "sun.net.www.protocol.http.HttpURLConnection.";
/// The JDK's native code that calls connect() (libnio.so, JDK 17).
const NIO_CONNECT: &str = "Java_sun_nio_ch_Net_connect0";
/// Packages a Java frame may be in, besides the fixture's own class.
const JDK_PACKAGES: [&str; 4] = ["java.", "javax.", "sun.", "jdk."];

fn prerequisites() -> Option<&'static Jdk> {
    if !require_privileges() {
        return None;
    }
    require_jdk()
}

/// Where the fixture's lines are (found by their markers).
struct Lines {
    /// `conn.getResponseCode()` in fetchMetadata.
    connect: u64,
    /// main's call of fetchMetadata.
    fetch_call: u64,
}

fn lines() -> Lines {
    Lines {
        connect: marked_line("CONNECT-LINE"),
        fetch_call: marked_line("FETCH-CALL-LINE"),
    }
}

/// A short header for stack failures: the run, and the tracer's stderr.
fn header(run: &JavaRun) -> String {
    format!(
        "=== java {} MetaClient (pid {}); tracer stderr:\n{}",
        run.flags.join(" "),
        run.client_pid,
        run.out.stderr
    )
}

/// The tracer's leaks against the kernel's view, both ways: the summary's
/// leaks and the `leak` events are exactly the client's sockets that ss
/// shows in CLOSE_WAIT (same cookies, same local and remote addresses),
/// [`COUNT`] of them, owned by the client, each with ss's unread bytes
/// (Recv-Q minus the FIN). Returns the summary's leaks.
fn check_against_ss(run: &JavaRun) -> Vec<Evidence> {
    let ctx = run.context();
    run.out.assert_success();
    assert_eq!(
        run.truth.len(),
        COUNT,
        "fixture sanity: ss should show the client's {COUNT} leaked sockets in CLOSE_WAIT\n{ctx}"
    );
    let leaks: Vec<Evidence> = run.out.leaks().iter().map(Evidence::from_json).collect();
    let events: Vec<Evidence> = run.out.of_type("leak").into_iter().map(Evidence::from_json).collect();
    let truth: Vec<u64> = run.truth.iter().map(|s| s.cookie).collect();
    let cookies = |v: &[Evidence]| v.iter().map(|e| e.leak.cookie).collect::<Vec<_>>();
    assert_same_cookies(&cookies(&leaks), &truth, &format!("summary.leaks vs ss\n{ctx}"));
    assert_same_cookies(&cookies(&events), &truth, &format!("leak events vs ss\n{ctx}"));
    let addrs = |v: &[Evidence]| -> BTreeSet<(String, String)> {
        v.iter()
            .map(|e| (e.leak.local.clone(), e.leak.remote.clone()))
            .collect()
    };
    let ss_addrs: BTreeSet<(String, String)> = run.truth.iter().map(|s| (s.local.clone(), s.remote.clone())).collect();
    assert_eq!(addrs(&leaks), ss_addrs, "summary.leaks' (local, remote) vs ss\n{ctx}");
    assert_eq!(addrs(&events), ss_addrs, "leak events' (local, remote) vs ss\n{ctx}");
    assert_eq!(leaks.len(), COUNT, "one leak per request\n{ctx}");
    for e in &leaks {
        assert_eq!(e.leak.pid, run.client_pid, "owner of {}\n{ctx}", e.leak.json);
        let s = run
            .truth
            .iter()
            .find(|s| s.cookie == e.leak.cookie)
            .expect("same cookies");
        assert_eq!(
            e.unread_bytes,
            s.recv_q.saturating_sub(1),
            "unread bytes vs ss Recv-Q minus the FIN ({}): {}\n{ctx}",
            s.line,
            e.leak.json
        );
    }
    leaks
}

/// Fails with the leak's stack (one frame per line, then pretty JSON).
fn fail(what: &str, leak: &Value, run: &JavaRun) -> ! {
    panic!("{what}\n{}\n{}", describe_leak(leak), header(run))
}

/// A frame with neither a `symbol` nor a `reason` saying why not.
fn unnamed_frame(stack: &[JFrame]) -> Option<String> {
    let blank = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
    let i = stack.iter().position(|f| blank(&f.symbol) && blank(&f.reason))?;
    Some(format!("frame #{i} has neither a symbol nor a reason"))
}

/// A Java frame that is not a real one: every Java frame's symbol must be
/// `pkg.Class.method(Params)` with the class the fixture's or the JDK's,
/// and where the fixture's methods appear their lines must be the right
/// ones. (A Java frame without a symbol has a reason: [`unnamed_frame`].)
fn unreal_java_frame(stack: &[JFrame], lines: &Lines) -> Option<String> {
    for (i, f) in stack.iter().enumerate().filter(|(_, f)| f.is_java()) {
        let Some(symbol) = f.symbol.as_deref() else {
            continue;
        };
        let Some((class, method)) = split_java_symbol(symbol) else {
            return Some(format!("Java frame #{i}: {symbol:?} is not `pkg.Class.method(Params)`"));
        };
        let ours = class == "MetaClient" || class.starts_with("MetaClient$");
        if !ours && !JDK_PACKAGES.iter().any(|p| class.starts_with(p)) {
            return Some(format!(
                "Java frame #{i}: class {class:?} is neither the fixture's nor the JDK's: a garbage frame"
            ));
        }
        let want_line = match (class, method) {
            ("MetaClient", "fetchMetadata") => Some(lines.connect),
            ("MetaClient", "main") => Some(lines.fetch_call),
            _ => None,
        };
        if let Some(want) = want_line {
            if f.line != Some(want) || f.file.as_deref() != Some(USER_FILE) {
                return Some(format!(
                    "Java frame #{i} {symbol}: want {USER_FILE}:{want}, got {:?}:{:?}",
                    f.file, f.line
                ));
            }
        }
    }
    None
}

/// What is wrong with a stack that should name the user's code: libc's
/// `connect` innermost (a native frame); further out the JDK's
/// HttpURLConnection; then `MetaClient.fetchMetadata(String)` at the
/// CONNECT-LINE with a `kind` in `user_kinds`; and the outermost Java
/// frame `MetaClient.main(String[])` (at its call of fetchMetadata). Every
/// frame named or saying why not, every Java frame real.
fn user_stack_problem(stack: &[JFrame], user_kinds: &[&str], lines: &Lines) -> Option<String> {
    let Some(first) = stack.first() else {
        return Some("no open_stack".into());
    };
    if let Some(p) = unnamed_frame(stack).or_else(|| unreal_java_frame(stack, lines)) {
        return Some(p);
    }
    if !(first.kind_is("native")
        && first.kernel == Some(false)
        && first.symbol.as_deref().is_some_and(|s| s.contains("connect"))
        && first.module.as_deref().is_some_and(|m| m.contains("libc")))
    {
        return Some("the innermost frame should be libc's connect, of kind \"native\"".into());
    }
    let Some(u) = stack.iter().position(|f| f.symbol_starts(USER_METHOD)) else {
        return Some(format!("no frame {USER_METHOD}String)"));
    };
    let user = &stack[u];
    if user.file.as_deref() != Some(USER_FILE) || user.line != Some(lines.connect) {
        return Some(format!(
            "frame #{u} {USER_METHOD}...: want {USER_FILE}:{} (the CONNECT-LINE), got {:?}:{:?}",
            lines.connect, user.file, user.line
        ));
    }
    if !user.kind.as_deref().is_some_and(|k| user_kinds.contains(&k)) {
        return Some(format!(
            "frame #{u} {USER_METHOD}...: kind {:?}, want one of {user_kinds:?}",
            user.kind
        ));
    }
    if !stack[..u].iter().any(|f| f.symbol_starts(JDK_HTTP)) {
        return Some(format!(
            "no {JDK_HTTP}* frame inside (innermost to) frame #{u} {USER_METHOD}..."
        ));
    }
    match stack.iter().rposition(JFrame::is_java) {
        Some(m) if m > u && stack[m].symbol.as_deref() == Some(MAIN) => None,
        Some(m) => Some(format!(
            "the outermost Java frame is #{m} {:?}, want {MAIN} (outside frame #{u})",
            stack[m].symbol
        )),
        None => Some("no Java frame".into()),
    }
}

/// [`user_stack_problem`] for every leak, failing on the first problem.
fn check_user_stacks(leaks: &[Evidence], user_kinds: &[&str], lines: &Lines, run: &JavaRun) {
    for e in leaks {
        let leak = &e.leak.json;
        if let Some(p) = user_stack_problem(&open_stack(leak), user_kinds, lines) {
            fail(&p, leak, run);
        }
    }
}

#[test]
fn java_interpreted_leak_names_user_code() {
    let Some(jdk) = prerequisites() else { return };
    let _one_at_a_time = serial();
    let lines = lines();
    let run = trace_live(jdk, &[], COUNT);
    let leaks = check_against_ss(&run);
    check_user_stacks(&leaks, &["interpreted"], &lines, &run);
    // The caller of libc's frameless connect() wrapper, which a plain
    // frame-pointer walk skips, is recovered from the stack.
    for e in &leaks {
        let stack = open_stack(&e.leak.json);
        if stack.get(1).and_then(|f| f.symbol.as_deref()) != Some(NIO_CONNECT) {
            fail(
                &format!("frame #1 should be {NIO_CONNECT}, connect()'s caller"),
                &e.leak.json,
                &run,
            );
        }
    }
}

/// The Java frames of a stack, as a Java stack trace would list them
/// (method, file, line), whatever ran them.
fn java_trace(stack: &[JFrame]) -> Vec<(Option<String>, Option<String>, Option<u64>)> {
    stack
        .iter()
        .filter(|f| f.is_java())
        .map(|f| (f.symbol.clone(), f.file.clone(), f.line))
        .collect()
}

/// With every method compiled (and frame pointers kept), the stacks must
/// name the same Java code, line for line, as the interpreter's stacks of
/// the same calls: compiled frames are named from the nmethod's debug info
/// at the return address, inlined ones expanded. -Xcomp still interprets a
/// method whose compiled code was thrown away (an uncommon trap) until it
/// is compiled again, so the user's own frame may be of either kind; each
/// stack must have compiled frames.
#[test]
fn java_compiled_leak_names_user_code() {
    let Some(jdk) = prerequisites() else { return };
    let _one_at_a_time = serial();
    let lines = lines();
    let reference = trace_live(jdk, &[], COUNT);
    let reference_leaks = check_against_ss(&reference);
    let want = java_trace(&open_stack(&reference_leaks[0].leak.json));
    let run = trace_live(jdk, &["-Xcomp", "-XX:+PreserveFramePointer"], COUNT);
    let leaks = check_against_ss(&run);
    check_user_stacks(&leaks, &["interpreted", "compiled", "inlined"], &lines, &run);
    for e in &leaks {
        let stack = open_stack(&e.leak.json);
        if !stack.iter().any(|f| f.kind_is("compiled")) {
            fail("-Xcomp: no frame of kind \"compiled\"", &e.leak.json, &run);
        }
        let got = java_trace(&stack);
        if got != want {
            fail(
                &format!(
                    "-Xcomp: the Java frames differ from the interpreter's for the same call\nwant {want:#?}\ngot {got:#?}"
                ),
                &e.leak.json,
                &run,
            );
        }
    }
}

/// Without frame pointers (HotSpot's default, made explicit) compiled code
/// uses the frame-pointer register for data, so a frame-pointer walk
/// through it cannot be trusted. Every leak's stack must then be cut where
/// it stops being trustworthy and say so (`open_stack_truncated`, naming
/// `-XX:+PreserveFramePointer`), with only real Java frames before the
/// cut and every frame named or saying why not. A stack that is not cut
/// must be the whole right one, as with frame pointers: an unwinder that
/// gets there without them is no fault, one that skips frames silently is.
#[test]
fn java_compiled_without_frame_pointers_says_truncated() {
    let Some(jdk) = prerequisites() else { return };
    let _one_at_a_time = serial();
    let lines = lines();
    let run = trace_live(jdk, &["-Xcomp", "-XX:-PreserveFramePointer"], COUNT);
    let leaks = check_against_ss(&run);
    let mut whole = 0;
    for e in &leaks {
        let leak = &e.leak.json;
        let stack = open_stack(leak);
        if let Some(p) = unnamed_frame(&stack).or_else(|| unreal_java_frame(&stack, &lines)) {
            fail(&p, leak, &run);
        }
        match leak.get("open_stack_truncated") {
            Some(Value::String(why)) if why.contains("PreserveFramePointer") => {}
            Some(Value::String(why)) => fail(
                &format!("open_stack_truncated does not say what to do (-XX:+PreserveFramePointer): {why:?}"),
                leak,
                &run,
            ),
            None | Some(Value::Null) => {
                if let Some(p) = user_stack_problem(&stack, &["compiled", "inlined"], &lines) {
                    fail(
                        &format!(
                            "no open_stack_truncated, so this stack (walked without frame pointers) must be the \
                             whole right one, but: {p}"
                        ),
                        leak,
                        &run,
                    );
                }
                whole += 1;
            }
            Some(other) => fail(&format!("open_stack_truncated is not a string: {other}"), leak, &run),
        }
    }
    eprintln!(
        "-XX:-PreserveFramePointer: {} of {} stacks cut (open_stack_truncated), {whole} whole",
        leaks.len() - whole,
        leaks.len()
    );
}

/// Java names come from the live JVM: a recording must carry them, so that
/// `tracer report` names the same code after the JVM is gone.
#[test]
fn java_names_survive_replay() {
    let Some(jdk) = prerequisites() else { return };
    let _one_at_a_time = serial();
    let lines = lines();
    let run = record_and_report(jdk, &[], COUNT);
    let leaks = check_against_ss(&run);
    check_user_stacks(&leaks, &["interpreted"], &lines, &run);
    // The folded stacks (and so the flame graph) carry the Java names, with
    // the line of each Java frame: all three leaks on one line.
    let folded = run.folded.as_deref().unwrap_or_default();
    let user = format!("{USER_METHOD}String):{}", lines.connect);
    let line = folded.lines().find(|l| l.contains(&user));
    assert!(
        line.is_some_and(|l| l.contains(JDK_HTTP) && l.ends_with(&format!(" {COUNT}"))),
        "folded export has no line with {user:?}, {JDK_HTTP}* and the count {COUNT}:\n{folded}\n{}",
        header(&run)
    );
}

/// The stack checks themselves, on made-up stacks (no root, no JDK): the
/// right stack passes, and each way of being wrong is caught.
#[test]
fn stack_checks_accept_the_right_stack_and_reject_wrong_ones() {
    let lines = lines();
    let frame = |kind: &str, symbol: Option<&str>, file: Option<&str>, line: Option<u64>| {
        let module = match kind {
            "native" => Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            _ => None,
        };
        serde_json::json!({
            "ip": "0x7f0000001000", "symbol": symbol, "module": module, "offset": null,
            "file": file, "line": line, "kernel": false, "kind": kind,
            "reason": if symbol.is_none() { Some("unknown code") } else { None },
        })
    };
    let right = vec![
        frame("native", Some("__libc_connect"), None, None),
        frame("native", None, None, None),
        frame(
            "interpreted",
            Some("sun.nio.ch.Net.connect0(boolean, FileDescriptor, InetAddress, int)"),
            Some("Net.java"),
            Some(579),
        ),
        frame(
            "interpreted",
            Some("sun.net.www.protocol.http.HttpURLConnection.getInputStream0()"),
            Some("HttpURLConnection.java"),
            Some(1702),
        ),
        frame(
            "interpreted",
            Some("java.net.HttpURLConnection.getResponseCode()"),
            Some("HttpURLConnection.java"),
            Some(529),
        ),
        frame(
            "interpreted",
            Some("MetaClient.fetchMetadata(String)"),
            Some(USER_FILE),
            Some(lines.connect),
        ),
        frame("interpreted", Some(MAIN), Some(USER_FILE), Some(lines.fetch_call)),
        frame(
            "native",
            Some("JavaCalls::call_helper(JavaValue*, methodHandle const&, JavaCallArguments*, JavaThread*)"),
            None,
            None,
        ),
        frame("native", Some("start_thread"), None, None),
    ];
    let parse = |frames: &[Value]| frames.iter().map(JFrame::from_json).collect::<Vec<_>>();
    let problem = |frames: &[Value], kinds: &[&str]| user_stack_problem(&parse(frames), kinds, &lines);
    assert_eq!(problem(&right, &["interpreted"]), None);

    let with = |i: usize, field: &str, v: Value| {
        let mut s = right.clone();
        s[i][field] = v;
        s
    };
    let without = |i: usize| {
        let mut s = right.clone();
        s.remove(i);
        s
    };
    let wrong: Vec<(&str, Vec<Value>, &[&str])> = vec![
        ("compiled expected", right.clone(), &["compiled", "inlined"]),
        (
            "wrong connect line",
            with(5, "line", (lines.connect + 1).into()),
            &["interpreted"],
        ),
        ("wrong file", with(5, "file", "Other.java".into()), &["interpreted"]),
        (
            "wrong main line",
            with(6, "line", (lines.fetch_call + 1).into()),
            &["interpreted"],
        ),
        (
            "innermost not native",
            with(0, "kind", "interpreted".into()),
            &["interpreted"],
        ),
        (
            "innermost not connect",
            with(0, "symbol", "read".into()),
            &["interpreted"],
        ),
        ("no HttpURLConnection", without(3), &["interpreted"]),
        ("no user frame", without(5), &["interpreted"]),
        ("no main", without(6), &["interpreted"]),
        (
            "garbage class",
            with(4, "symbol", "Xq7.zz(int)".into()),
            &["interpreted"],
        ),
        (
            "not a Java symbol",
            with(4, "symbol", "0x7f00".into()),
            &["interpreted"],
        ),
        (
            "neither symbol nor reason",
            with(1, "reason", Value::Null),
            &["interpreted"],
        ),
        (
            "main not outermost",
            {
                let mut s = right.clone();
                s.insert(
                    7,
                    frame(
                        "interpreted",
                        Some("java.lang.Thread.run()"),
                        Some("Thread.java"),
                        Some(833),
                    ),
                );
                s
            },
            &["interpreted"],
        ),
        ("empty", vec![], &["interpreted"]),
    ];
    for (what, frames, kinds) in wrong {
        assert!(
            problem(&frames, kinds).is_some(),
            "{what}: not caught\n{}",
            tracer_tests::java::format_frames(&parse(&frames))
        );
    }
    // Cut stacks (no frame pointers): real Java frames only.
    let cut = right[..4].to_vec();
    assert_eq!(unreal_java_frame(&parse(&cut), &lines), None);
    assert!(unreal_java_frame(&parse(&with(5, "line", 1.into())), &lines).is_some());
    assert!(unreal_java_frame(&parse(&with(2, "symbol", "com.evil.X.y()".into())), &lines).is_some());
}

//! Root-cause evidence in the tracer's leak objects (issue 3), parsed and
//! checked against the contract: unread bytes, holders, opening and closing
//! stacks, the close that released an fd without ending the socket, and the
//! summary's groups.
//!
//! Kept apart from [`Leak`], whose contract the older tests check, so that
//! those keep passing whether or not a tracer prints the evidence.

use std::fmt::Write as _;

use serde_json::Value;

use crate::addr::normalize_addr;
use crate::tracer::{Leak, TracerOutput};

/// One stack frame: `{"ip","symbol","module","offset","file","line","kernel"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub ip: u64,
    /// Demangled, e.g. `tcp_fixture::open_connection`.
    pub symbol: Option<String>,
    /// The file mapped at `ip` (user frames), e.g. the fixture's path.
    pub module: Option<String>,
    /// `ip`'s offset in `module`.
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u64>,
    pub kernel: bool,
}

/// `0x1f` (lower or upper case digits) as a number.
pub fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x")?;
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

fn opt_string(v: &Value, name: &str, ctx: &str) -> Option<String> {
    match v.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) => None,
        Some(_) => panic!("{name:?} is neither a string nor null: {ctx}"),
        None => panic!("no {name:?}: {ctx}"),
    }
}

fn opt_u64(v: &Value, name: &str, ctx: &str) -> Option<u64> {
    match v.get(name) {
        Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .unwrap_or_else(|| panic!("{name:?} is neither an unsigned integer nor null: {ctx}")),
        ),
        None => panic!("no {name:?}: {ctx}"),
    }
}

fn req_u64(v: &Value, name: &str, ctx: &str) -> u64 {
    v.get(name)
        .unwrap_or_else(|| panic!("no {name:?}: {ctx}"))
        .as_u64()
        .unwrap_or_else(|| panic!("{name:?} is not an unsigned integer: {ctx}"))
}

fn req_u32(v: &Value, name: &str, ctx: &str) -> u32 {
    u32::try_from(req_u64(v, name, ctx)).unwrap_or_else(|_| panic!("{name:?} is too big: {ctx}"))
}

fn req_fd(v: &Value, name: &str, ctx: &str) -> i32 {
    i32::try_from(req_u64(v, name, ctx)).unwrap_or_else(|_| panic!("{name:?} is not an fd: {ctx}"))
}

fn req_string(v: &Value, name: &str, ctx: &str) -> String {
    v.get(name)
        .unwrap_or_else(|| panic!("no {name:?}: {ctx}"))
        .as_str()
        .unwrap_or_else(|| panic!("{name:?} is not a string: {ctx}"))
        .to_string()
}

impl Frame {
    /// Parses one frame; `ctx` (the whole leak object) is for messages.
    pub fn from_json(f: &Value, ctx: &str) -> Frame {
        let ctx = format!("frame {f} in {ctx}");
        assert!(f.is_object(), "a frame is not an object: {ctx}");
        let ip = req_string(f, "ip", &ctx);
        let offset = opt_string(f, "offset", &ctx);
        Frame {
            ip: parse_hex(&ip).unwrap_or_else(|| panic!("\"ip\" is not 0x-prefixed hex: {ctx}")),
            symbol: opt_string(f, "symbol", &ctx),
            module: opt_string(f, "module", &ctx),
            offset: offset.map(|o| parse_hex(&o).unwrap_or_else(|| panic!("\"offset\" is not 0x-prefixed hex: {ctx}"))),
            file: opt_string(f, "file", &ctx),
            line: opt_u64(f, "line", &ctx),
            kernel: f
                .get("kernel")
                .unwrap_or_else(|| panic!("no \"kernel\": {ctx}"))
                .as_bool()
                .unwrap_or_else(|| panic!("\"kernel\" is not a bool: {ctx}")),
        }
    }

    /// A user-space frame whose symbol contains `symbol_part`, in a module
    /// whose path ends with `module_suffix`.
    pub fn is_user_fn(&self, symbol_part: &str, module_suffix: &str) -> bool {
        !self.kernel
            && self.symbol.as_deref().is_some_and(|s| s.contains(symbol_part))
            && self.module.as_deref().is_some_and(|m| m.ends_with(module_suffix))
    }
}

/// Parses a stack (an array of frames) and checks its order: user-space
/// frames first, then kernel frames.
pub fn parse_stack(v: &Value, ctx: &str) -> Vec<Frame> {
    let frames: Vec<Frame> = v
        .as_array()
        .unwrap_or_else(|| panic!("a stack is not an array: {v} in {ctx}"))
        .iter()
        .map(|f| Frame::from_json(f, ctx))
        .collect();
    if let Some(first_kernel) = frames.iter().position(|f| f.kernel) {
        assert!(
            frames[first_kernel..].iter().all(|f| f.kernel),
            "user-space frame after a kernel frame (user frames must come first): {v} in {ctx}"
        );
    }
    frames
}

/// Does any user frame of `stack` match (see [`Frame::is_user_fn`])?
pub fn stack_has(stack: &[Frame], symbol_part: &str, module_suffix: &str) -> bool {
    stack.iter().any(|f| f.is_user_fn(symbol_part, module_suffix))
}

/// One frame per line, for assertion messages.
pub fn format_stack(stack: &[Frame]) -> String {
    let mut out = String::new();
    for f in stack {
        let _ = writeln!(
            out,
            "    {:#x} {}{} in {}{}",
            f.ip,
            if f.kernel { "[k] " } else { "" },
            f.symbol.as_deref().unwrap_or("?"),
            f.module.as_deref().unwrap_or("?"),
            f.offset.map(|o| format!("+{o:#x}")).unwrap_or_default(),
        );
    }
    out
}

/// A process holding the socket at report time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    pub fd: i32,
}

/// A close() that released an fd to the socket without ending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedBy {
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
}

/// A leak object with its evidence, every field of the contract checked for
/// presence (where required) and type.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// The fields of the base contract (pid, addresses, cookie, fd, ...).
    pub leak: Leak,
    /// Bytes received and never read, FIN excluded, as of the report.
    pub unread_bytes: u64,
    /// The same as of the moment the FIN arrived, when it was seen.
    pub unread_bytes_at_fin: Option<u64>,
    pub holders: Vec<Holder>,
    pub open_stack: Vec<Frame>,
    pub open_stack_error: Option<String>,
    /// `None` when no close was seen (`close_stack` null or absent).
    pub close_stack: Option<Vec<Frame>>,
    pub close_stack_error: Option<String>,
    pub fd_closed_by: Option<ClosedBy>,
}

impl Evidence {
    pub fn from_json(v: &Value) -> Evidence {
        let leak = Leak::from_json(v);
        let ctx = format!("leak object {v}");
        let holders = v
            .get("holders")
            .unwrap_or_else(|| panic!("no \"holders\": {ctx}"))
            .as_array()
            .unwrap_or_else(|| panic!("\"holders\" is not an array: {ctx}"))
            .iter()
            .map(|h| {
                let hctx = format!("holder {h} in {ctx}");
                Holder {
                    pid: req_u32(h, "pid", &hctx),
                    comm: req_string(h, "comm", &hctx),
                    fd: req_fd(h, "fd", &hctx),
                }
            })
            .collect();
        let open_stack = parse_stack(
            v.get("open_stack")
                .unwrap_or_else(|| panic!("no \"open_stack\": {ctx}")),
            &ctx,
        );
        let open_stack_error = opt_string(v, "open_stack_error", &ctx);
        assert!(
            !open_stack.is_empty() || open_stack_error.as_deref().is_some_and(|e| !e.is_empty()),
            "empty \"open_stack\" without an \"open_stack_error\" saying why: {ctx}"
        );
        let close_stack = match v.get("close_stack") {
            None | Some(Value::Null) => None,
            Some(s) => Some(parse_stack(s, &ctx)),
        };
        let close_stack_error = match v.get("close_stack_error") {
            None => None,
            Some(_) => opt_string(v, "close_stack_error", &ctx),
        };
        if close_stack.as_ref().is_some_and(Vec::is_empty) {
            assert!(
                close_stack_error.as_deref().is_some_and(|e| !e.is_empty()),
                "empty \"close_stack\" without a \"close_stack_error\" saying why: {ctx}"
            );
        }
        let fd_closed_by = match v.get("fd_closed_by") {
            None | Some(Value::Null) => None,
            Some(c) => {
                let cctx = format!("fd_closed_by in {ctx}");
                assert!(c.is_object(), "\"fd_closed_by\" is not an object: {ctx}");
                Some(ClosedBy {
                    pid: req_u32(c, "pid", &cctx),
                    tid: req_u32(c, "tid", &cctx),
                    fd: req_fd(c, "fd", &cctx),
                })
            }
        };
        Evidence {
            unread_bytes: req_u64(v, "unread_bytes", &ctx),
            unread_bytes_at_fin: opt_u64(v, "unread_bytes_at_fin", &ctx),
            holders,
            open_stack,
            open_stack_error,
            close_stack,
            close_stack_error,
            fd_closed_by,
            leak,
        }
    }

    /// `(pid, fd)` of every holder, sorted.
    pub fn holder_fds(&self) -> Vec<(u32, i32)> {
        let mut v: Vec<(u32, i32)> = self.holders.iter().map(|h| (h.pid, h.fd)).collect();
        v.sort_unstable();
        v
    }
}

/// One entry of `summary.groups`: leaks of one process, opened from one
/// stack, to one remote endpoint.
#[derive(Clone, Debug)]
pub struct Group {
    pub pid: u32,
    pub comm: String,
    /// Normalised with [`normalize_addr`].
    pub remote: String,
    pub count: u64,
    pub oldest_close_wait_ms: u64,
    pub open_stack: Vec<Frame>,
    pub json: Value,
}

impl Group {
    pub fn from_json(v: &Value) -> Group {
        let ctx = format!("group {v}");
        Group {
            pid: req_u32(v, "pid", &ctx),
            comm: req_string(v, "comm", &ctx),
            remote: normalize_addr(&req_string(v, "remote", &ctx)),
            count: req_u64(v, "count", &ctx),
            oldest_close_wait_ms: req_u64(v, "oldest_close_wait_ms", &ctx),
            open_stack: parse_stack(
                v.get("open_stack")
                    .unwrap_or_else(|| panic!("no \"open_stack\": {ctx}")),
                &ctx,
            ),
            json: v.clone(),
        }
    }
}

impl TracerOutput {
    /// `summary["leaks"]` with their evidence.
    pub fn summary_evidence(&self) -> Vec<Evidence> {
        self.leaks().iter().map(Evidence::from_json).collect()
    }

    /// All events of type `ty` (`leak`, `late_close`) with their evidence.
    pub fn evidence_events(&self, ty: &str) -> Vec<Evidence> {
        self.of_type(ty).into_iter().map(Evidence::from_json).collect()
    }

    /// `summary["groups"]`, parsed.
    pub fn summary_groups(&self) -> Vec<Group> {
        self.summary()
            .get("groups")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("summary has no \"groups\" array\n{}", self.dump()))
            .iter()
            .map(Group::from_json)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak_json(extra: Value) -> Value {
        let mut v = serde_json::json!({
            "type": "leak", "pid": 10, "comm": "tcp-fixture", "cmdline": "tcp-fixture client",
            "local": "127.0.0.1:1", "remote": "127.0.0.1:2", "cookie": 7, "close_wait_ms": 1000,
            "close_wait_estimated": false, "fd": 3, "owner_source": "connect",
            "unread_bytes": 26, "unread_bytes_at_fin": 26,
            "holders": [{"pid": 10, "comm": "tcp-fixture", "fd": 3}],
            "open_stack": [
                {"ip": "0x7f00", "symbol": "connect", "module": "/lib/libc.so.6", "offset": "0x10",
                 "file": null, "line": null, "kernel": false},
                {"ip": "0x5500", "symbol": "tcp_fixture::open_connection", "module": "/t/tcp-fixture",
                 "offset": "0x1A", "file": "src/bin/tcp-fixture.rs", "line": 400, "kernel": false},
                {"ip": "0xffffffff81000000", "symbol": "tcp_v4_connect", "module": null, "offset": null,
                 "file": null, "line": null, "kernel": true}
            ],
            "open_stack_error": null
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    }

    #[test]
    fn parses_evidence() {
        let e = Evidence::from_json(&leak_json(serde_json::json!({})));
        assert_eq!(e.unread_bytes, 26);
        assert_eq!(e.unread_bytes_at_fin, Some(26));
        assert_eq!(e.holder_fds(), vec![(10, 3)]);
        assert_eq!(e.open_stack.len(), 3);
        assert_eq!(e.open_stack[1].offset, Some(0x1a));
        assert_eq!(e.open_stack[1].line, Some(400));
        assert!(stack_has(&e.open_stack, "open_connection", "tcp-fixture"));
        assert!(
            !stack_has(&e.open_stack, "tcp_v4_connect", ""),
            "kernel frames are not user functions"
        );
        assert!(e.close_stack.is_none() && e.fd_closed_by.is_none());
        assert!(format_stack(&e.open_stack).contains("tcp_fixture::open_connection in /t/tcp-fixture+0x1a"));

        let e = Evidence::from_json(&leak_json(serde_json::json!({
            "unread_bytes_at_fin": null, "open_stack": [], "open_stack_error": "opened before tracing",
            "close_stack": [], "close_stack_error": "stack map full",
            "fd_closed_by": {"pid": 10, "tid": 11, "fd": 3}
        })));
        assert_eq!(e.unread_bytes_at_fin, None);
        assert_eq!(e.close_stack, Some(vec![]));
        assert_eq!(
            e.fd_closed_by,
            Some(ClosedBy {
                pid: 10,
                tid: 11,
                fd: 3
            })
        );
    }

    #[test]
    fn rejects_broken_evidence() {
        let bad = [
            serde_json::json!({"unread_bytes": null}),
            serde_json::json!({"holders": [{"pid": 1, "fd": 3}]}),
            serde_json::json!({"open_stack": [], "open_stack_error": null}),
            serde_json::json!({"open_stack": [{"ip": "7f00", "symbol": null, "module": null, "offset": null,
                                "file": null, "line": null, "kernel": false}]}),
            // A user frame after a kernel frame.
            serde_json::json!({"open_stack": [
                {"ip": "0x1", "symbol": null, "module": null, "offset": null, "file": null, "line": null, "kernel": true},
                {"ip": "0x2", "symbol": null, "module": null, "offset": null, "file": null, "line": null, "kernel": false}
            ]}),
            serde_json::json!({"fd_closed_by": {"pid": 1, "fd": 3}}),
        ];
        for extra in bad {
            let v = leak_json(extra.clone());
            assert!(
                std::panic::catch_unwind(|| Evidence::from_json(&v)).is_err(),
                "accepted {extra}"
            );
        }
        let mut v = leak_json(serde_json::json!({}));
        v.as_object_mut().unwrap().remove("unread_bytes_at_fin");
        assert!(std::panic::catch_unwind(|| Evidence::from_json(&v)).is_err());
    }

    #[test]
    fn hex() {
        assert_eq!(parse_hex("0x1f"), Some(31));
        assert_eq!(parse_hex("0xFFFFFFFF81000000"), Some(0xffff_ffff_8100_0000));
        assert_eq!(parse_hex("1f"), None);
        assert_eq!(parse_hex("0x"), None);
    }

    #[test]
    fn parses_group() {
        let g = Group::from_json(&serde_json::json!({
            "pid": 10, "comm": "tcp-fixture", "remote": "[0:0:0:0:0:0:0:1]:80", "count": 3,
            "oldest_close_wait_ms": 2500, "unread_bytes": 0,
            "open_stack": [{"ip": "0x5500", "symbol": "tcp_fixture::open_connection", "module": "/t/tcp-fixture",
                            "offset": "0x1a", "file": null, "line": null, "kernel": false}]
        }));
        assert_eq!((g.pid, g.count, g.oldest_close_wait_ms), (10, 3, 2500));
        assert_eq!(g.remote, "[::1]:80");
        assert!(stack_has(&g.open_stack, "open_connection", "tcp-fixture"));
    }
}

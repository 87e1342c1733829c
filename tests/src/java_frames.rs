//! The Java frames of a tracer leak's `open_stack` as the tests read them
//! ([`JFrame`]), and their formatting for failure messages.

use std::fmt::Write as _;

use serde_json::Value;

/// The `kind`s of Java frames.
pub const JAVA_KINDS: [&str; 3] = ["interpreted", "compiled", "inlined"];

/// One frame of `open_stack` with the fields the JVM support adds: `kind`
/// (`native`, `kernel`, `interpreted`, `compiled`, `inlined`) and `reason`
/// (why it has no symbol). Lenient: absent or mistyped fields read as
/// `None`, so a test can say which assertion failed instead of failing on
/// the parse.
#[derive(Clone, Debug)]
pub struct JFrame {
    pub symbol: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u64>,
    pub kernel: Option<bool>,
    pub kind: Option<String>,
    pub reason: Option<String>,
    pub json: Value,
}

impl JFrame {
    pub fn from_json(v: &Value) -> JFrame {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        JFrame {
            symbol: s("symbol"),
            module: s("module"),
            file: s("file"),
            line: v.get("line").and_then(Value::as_u64),
            kernel: v.get("kernel").and_then(Value::as_bool),
            kind: s("kind"),
            reason: s("reason"),
            json: v.clone(),
        }
    }

    pub fn is_java(&self) -> bool {
        self.kind.as_deref().is_some_and(|k| JAVA_KINDS.contains(&k))
    }

    pub fn kind_is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }

    pub fn symbol_starts(&self, prefix: &str) -> bool {
        self.symbol.as_deref().is_some_and(|s| s.starts_with(prefix))
    }
}

/// A leak object's `open_stack`, innermost first (empty when absent).
pub fn open_stack(leak: &Value) -> Vec<JFrame> {
    leak.get("open_stack")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(JFrame::from_json).collect())
        .unwrap_or_default()
}

/// `Class` and `method` of a Java frame symbol `pkg.Class.method(Params)`
/// (the class fully qualified, dotted). `None` when it does not have that
/// shape.
pub fn split_java_symbol(symbol: &str) -> Option<(&str, &str)> {
    let open = symbol.find('(')?;
    if !symbol.ends_with(')') {
        return None;
    }
    let (class, method) = symbol[..open].rsplit_once('.')?;
    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || "_$<>".contains(c));
    (class.split('.').all(ident) && ident(method)).then_some((class, method))
}

/// One line per frame (index, kind, symbol, file:line, module, reason),
/// for failure messages.
pub fn format_frames(frames: &[JFrame]) -> String {
    let mut out = String::new();
    for (i, f) in frames.iter().enumerate() {
        let _ = writeln!(
            out,
            "  #{i:<2} {:<11} {} ({}:{}) in {}{}",
            f.kind.as_deref().unwrap_or("?kind"),
            f.symbol.as_deref().unwrap_or("?"),
            f.file.as_deref().unwrap_or("?"),
            f.line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
            f.module.as_deref().unwrap_or("?"),
            f.reason
                .as_deref()
                .map(|r| format!("  [reason: {r}]"))
                .unwrap_or_default(),
        );
    }
    out
}

/// A leak for a failure message: its frames one per line, then the whole
/// object as pretty JSON.
pub fn describe_leak(leak: &Value) -> String {
    format!(
        "--- open_stack ({} frames, innermost first; open_stack_truncated: {}; open_stack_error: {}):\n{}\
         --- leak object:\n{}",
        leak.get("open_stack").and_then(Value::as_array).map_or(0, Vec::len),
        leak.get("open_stack_truncated").unwrap_or(&Value::Null),
        leak.get("open_stack_error").unwrap_or(&Value::Null),
        format_frames(&open_stack(leak)),
        serde_json::to_string_pretty(leak).unwrap_or_else(|_| leak.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_symbols() {
        assert_eq!(
            split_java_symbol("MetaClient.fetchMetadata(String)"),
            Some(("MetaClient", "fetchMetadata"))
        );
        assert_eq!(
            split_java_symbol("sun.net.www.protocol.http.HttpURLConnection.getInputStream0()"),
            Some(("sun.net.www.protocol.http.HttpURLConnection", "getInputStream0"))
        );
        assert_eq!(
            split_java_symbol("java.net.Socket.<init>(Proxy)"),
            Some(("java.net.Socket", "<init>"))
        );
        assert_eq!(
            split_java_symbol("sun.nio.ch.NioSocketImpl$1.run(int, byte[])"),
            Some(("sun.nio.ch.NioSocketImpl$1", "run"))
        );
        assert_eq!(split_java_symbol("__libc_connect"), None);
        assert_eq!(split_java_symbol("main(String[])"), None);
        assert_eq!(split_java_symbol("a b.c()"), None);
    }
}

//! JVM method descriptors to the parameter list people read:
//! `(Ljava/lang/String;[I)V` -> `String, int[]`.

/// Parameter types of a method descriptor as simple Java names (package
/// stripped, `$` of nested classes kept). `None` for a malformed descriptor.
pub fn simple_params(descriptor: &str) -> Option<Vec<String>> {
    let inner = descriptor.strip_prefix('(')?;
    let (params, _ret) = inner.split_once(')')?;
    let mut out = Vec::new();
    let mut rest = params;
    // Every iteration consumes at least one byte.
    while !rest.is_empty() {
        let dims = rest.len() - rest.trim_start_matches('[').len();
        rest = &rest[dims..];
        let (base, tail) = match rest.as_bytes().first()? {
            b'L' => {
                let end = rest.find(';')?;
                let class = &rest[1..end];
                (class.rsplit('/').next()?.to_string(), &rest[end + 1..])
            }
            c => (primitive(*c)?.to_string(), &rest[1..]),
        };
        out.push(format!("{base}{}", "[]".repeat(dims)));
        rest = tail;
    }
    Some(out)
}

fn primitive(c: u8) -> Option<&'static str> {
    Some(match c {
        b'B' => "byte",
        b'C' => "char",
        b'D' => "double",
        b'F' => "float",
        b'I' => "int",
        b'J' => "long",
        b'S' => "short",
        b'Z' => "boolean",
        _ => return None,
    })
}

/// `Class.method(Params)`; the raw descriptor stands in for the parameter
/// list if it cannot be parsed.
pub fn symbol(class: &str, method: &str, descriptor: &str) -> String {
    match simple_params(descriptor) {
        Some(p) => format!("{class}.{method}({})", p.join(", ")),
        None => format!("{class}.{method}{descriptor}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parameters() {
        assert_eq!(symbol("Meta", "get", "(Ljava/lang/String;)V"), "Meta.get(String)");
        assert_eq!(symbol("a.b.C", "m", "(I[B)J"), "a.b.C.m(int, byte[])");
        assert_eq!(symbol("a.C", "<init>", "()V"), "a.C.<init>()");
        assert_eq!(
            simple_params("([[Ljava/util/Map$Entry;ZDLx;[[[S)V").unwrap(),
            ["Map$Entry[][]", "boolean", "double", "x", "short[][][]"]
        );
        // Malformed: no ')' / unterminated class / unknown letter / dangling '['.
        for bad in ["(I", "(Ljava/lang/String)V", "(Q)V", "([)V", "I)V"] {
            assert_eq!(simple_params(bad), None, "{bad}");
        }
        assert_eq!(symbol("C", "m", "(Q)V"), "C.m(Q)V");
    }
}

//! The contract test: `docs/json.md` documents exactly the fields the
//! golden sessions' output has ([`super::golden_tests`]), with their JSON
//! types and whether they can be null or absent.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use serde_json::{Map, Value};

use super::golden_tests::sessions;

// ---- docs/json.md: its format, as the contract test reads it ----
//
// A section is a heading whose text starts with a code span: the name of
// a line type (`leak`) or of a nested object (`frame`). Each field table
// in it has the columns `field`, `type` and `null / absent` (others are
// for readers). In a row:
// - `field`: a code span with the field's name; a dotted path for a field
//   of a nested object that has no section of its own (`stats.kernel`), with
//   `[]` for the elements of an array (`list[].name`); or `...name`: every
//   field of section `name` belongs here too;
// - `type`: starts with the JSON type (string, integer, boolean, object,
//   array); a code span in it names the section that describes the object,
//   or each element of the array (array of [`frame`](#frame));
// - `null / absent`: "never", or says when the field is null and/or when it
//   is absent, with those words.
// Cells never contain `|`.

#[derive(Debug)]
struct FieldDoc {
    ty: String,
    object: Option<String>,
    null: bool,
    absent: bool,
}

#[derive(Debug, Default)]
struct Section {
    fields: BTreeMap<String, FieldDoc>,
    includes: Vec<String>,
}

type Doc = BTreeMap<String, Section>;

fn code_spans(s: &str) -> impl Iterator<Item = &str> {
    s.split('`').skip(1).step_by(2)
}

fn parse_doc(text: &str) -> Result<Doc, String> {
    let mut doc = Doc::new();
    let mut section: Option<String> = None;
    // Column indices of the table being read: (field, type, null / absent).
    let mut table: Option<Option<(usize, usize, usize)>> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |msg: &str| format!("docs/json.md line {}: {msg}", n + 1);
        let line = line.trim();
        if line.starts_with('#') {
            let heading = line.trim_start_matches('#').trim_start();
            section = heading
                .starts_with('`')
                .then(|| code_spans(heading).next().map(str::to_string))
                .flatten();
            if let Some(s) = &section {
                if doc.insert(s.clone(), Section::default()).is_some() {
                    return Err(at(&format!("section `{s}` appears twice")));
                }
            }
            continue;
        }
        if !line.starts_with('|') {
            table = None;
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Some(cols) = table else {
            let col = |name: &str| cells.iter().position(|c| c.eq_ignore_ascii_case(name));
            table = Some(match (col("field"), col("type"), col("null / absent")) {
                (Some(f), Some(t), Some(n)) => Some((f, t, n)),
                (Some(_), ..) => return Err(at("a field table needs the columns `type` and `null / absent`")),
                _ => None,
            });
            continue;
        };
        let Some((fc, tc, nc)) = cols else { continue };
        if cells.iter().all(|c| c.chars().all(|ch| matches!(ch, '-' | ':' | ' '))) {
            continue;
        }
        let Some(name) = &section else {
            return Err(at("a field table outside a section named by a code span"));
        };
        let cell = |i: usize| cells.get(i).copied().unwrap_or("");
        let field = code_spans(cell(fc))
            .next()
            .ok_or_else(|| at("the field cell has no code span"))?;
        let sec = doc.get_mut(name).expect("inserted at its heading");
        if let Some(other) = field.strip_prefix("...") {
            sec.includes.push(other.to_string());
            continue;
        }
        let ty: String = cell(tc)
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect::<String>()
            .to_lowercase();
        if !["string", "integer", "boolean", "object", "array"].contains(&ty.as_str()) {
            return Err(at(&format!("`{field}`: the type cell must start with a JSON type")));
        }
        let when = cell(nc).to_lowercase();
        let fd = FieldDoc {
            ty,
            object: code_spans(cell(tc)).next().map(str::to_string),
            null: when.contains("null"),
            absent: when.contains("absent"),
        };
        if when.starts_with("never") == (fd.null || fd.absent) {
            return Err(at(&format!(
                "`{field}`: `null / absent` is either \"never\" or says when it is null or absent"
            )));
        }
        if sec.fields.insert(field.to_string(), fd).is_some() {
            return Err(at(&format!("`{field}` is documented twice in `{name}`")));
        }
    }
    for (name, sec) in &doc {
        for target in sec
            .includes
            .iter()
            .chain(sec.fields.values().filter_map(|f| f.object.as_ref()))
        {
            if !doc.contains_key(target) {
                return Err(format!(
                    "docs/json.md: `{name}` refers to section `{target}`, which does not exist"
                ));
            }
        }
    }
    Ok(doc)
}

/// How a documented field was seen in the output.
#[derive(Debug, Default)]
struct Seen {
    value: bool,
    null: bool,
    absent: bool,
}

struct Checker<'a> {
    doc: &'a Doc,
    /// (section that documents it, field path) -> how it was seen.
    seen: BTreeMap<(String, String), Seen>,
    /// Each disagreement once, with where it was first seen.
    errors: BTreeMap<String, String>,
}

impl Checker<'_> {
    fn error(&mut self, msg: String, at: &str) {
        self.errors.entry(msg).or_insert_with(|| at.to_string());
    }

    /// The field and the section that documents it: `section` itself or
    /// one it includes.
    fn lookup(&self, section: &str, path: &str) -> Option<(String, &FieldDoc)> {
        let sec = self.doc.get(section)?;
        if let Some(f) = sec.fields.get(path) {
            return Some((section.to_string(), f));
        }
        sec.includes.iter().find_map(|s| self.lookup(s, path))
    }

    /// Every field of `section`, its includes' too: (documenting section, path).
    fn all_fields(&self, section: &str) -> Vec<(String, String)> {
        let Some(sec) = self.doc.get(section) else {
            return Vec::new();
        };
        let mut v: Vec<_> = sec.fields.keys().map(|p| (section.to_string(), p.clone())).collect();
        for s in &sec.includes {
            v.extend(self.all_fields(s));
        }
        v
    }

    /// Checks one JSON object described by `section`, its fields' paths
    /// starting with `prefix` (for dotted paths into nested objects).
    fn object(&mut self, section: &str, prefix: &str, obj: &Map<String, Value>, line: &str) {
        for (key, value) in obj {
            let path = format!("{prefix}{key}");
            let documented = self
                .lookup(section, &path)
                .map(|(s, f)| (s, f.ty.clone(), f.object.clone()));
            let Some((owner, ty, object)) = documented else {
                self.error(
                    format!("`{section}` field `{path}` is in the output but not in docs/json.md"),
                    line,
                );
                self.descend(section, &path, None, value, line);
                continue;
            };
            let seen = self.seen.entry((owner.clone(), path.clone())).or_default();
            if value.is_null() {
                seen.null = true;
            } else {
                seen.value = true;
                if json_type(value) != ty {
                    let msg = format!(
                        "`{owner}` field `{path}` is documented as {ty} but is {}",
                        json_type(value)
                    );
                    self.error(msg, line);
                }
            }
            self.descend(section, &path, object.as_deref(), value, line);
        }
        for (owner, path) in self.all_fields(section) {
            let direct = path.strip_prefix(prefix).is_some_and(|rest| !rest.contains(['.', '[']));
            if direct && !obj.contains_key(&path[prefix.len()..]) {
                self.seen.entry((owner, path)).or_default().absent = true;
            }
        }
    }

    fn descend(&mut self, section: &str, path: &str, object: Option<&str>, value: &Value, line: &str) {
        let (target, prefix) = match object {
            Some(s) => (s.to_string(), String::new()),
            None => (
                section.to_string(),
                format!("{path}{}", if value.is_array() { "[]." } else { "." }),
            ),
        };
        let items: Vec<&Value> = match value {
            Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        for item in items {
            if let Some(o) = item.as_object() {
                self.object(&target, &prefix, o, line);
            }
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[test]
fn json_docs_match_the_output() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/json.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let doc = parse_doc(&text).unwrap_or_else(|e| panic!("{e}"));
    let mut checker = Checker {
        doc: &doc,
        seen: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    let mut sections_used = BTreeSet::new();
    for (file, output) in sessions() {
        for (n, line) in output.lines().enumerate() {
            let at = format!("{file} line {}", n + 1);
            let mut obj = match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(o)) => o,
                other => panic!("{at}: not a JSON object: {other:?}"),
            };
            // The sink's promise: "type" first, so a reader can dispatch
            // before parsing the rest of the line.
            assert_eq!(obj.keys().next().map(String::as_str), Some("type"), "{at}");
            let Some(Value::String(kind)) = obj.shift_remove("type") else {
                panic!("{at}: \"type\" is not a string");
            };
            if !doc.contains_key(&kind) {
                checker.error(format!("line type `{kind}` has no section in docs/json.md"), &at);
                continue;
            }
            sections_used.insert(kind.clone());
            checker.object(&kind, "", &obj, &at);
        }
    }
    let mut problems: Vec<String> = checker
        .errors
        .iter()
        .map(|(msg, at)| format!("{msg} (e.g. {at})"))
        .collect();
    for (name, sec) in &doc {
        for (field, f) in &sec.fields {
            let say = |what: &str| format!("`{name}` field `{field}` {what}");
            let seen = checker.seen.get(&(name.clone(), field.clone()));
            let Some(seen) = seen.filter(|s| s.value) else {
                problems.push(say(
                    "is documented but never has a value in the output: removed or renamed, or a case the scenario in golden_tests.rs does not reach",
                ));
                continue;
            };
            for (documented, happened, word) in [(f.null, seen.null, "null"), (f.absent, seen.absent, "absent")] {
                if documented && !happened {
                    problems.push(say(&format!(
                        "is documented as sometimes {word}, but never is in the output: make the scenario in golden_tests.rs reach that case, or fix the doc"
                    )));
                }
                if happened && !documented {
                    problems.push(say(&format!(
                        "is sometimes {word} in the output, but its `null / absent` cell does not say when"
                    )));
                }
            }
        }
        let referenced = doc
            .values()
            .any(|s| s.includes.contains(name) || s.fields.values().any(|f| f.object.as_ref() == Some(name)));
        if !sections_used.contains(name) && !referenced {
            problems.push(format!(
                "section `{name}` is neither a line type in the output nor an object another section refers to"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/json.md and the JSON output (tracer/src/sink/golden_tests.rs) disagree:\n- {}",
        problems.join("\n- ")
    );
}

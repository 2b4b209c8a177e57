//! A spanned document tree shared by the TOML and JSON front ends, and a reader over it that
//! collects every problem instead of stopping at the first.
//!
//! Workflow and tools files are read through this tree rather than straight into serde structs
//! because serde stops at the first error and forgets where values were; users want every problem
//! at once, each with its line and column.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Nesting deeper than this is refused before parsing: parsers recurse, and a file of a million
/// `[` must be an error, not a stack overflow. No real workflow nests anywhere near this deep.
const MAX_NESTING: usize = 64;

/// One problem found in a file, with where it is when there is a where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file it is in.
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place.
    pub position: Option<(usize, usize)>,
    /// What is wrong, in words.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.position {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Problems listed per file at most: enough to fix a file by, and a file of five million bad
/// lines makes a report of a hundred lines, not of half a gigabyte.
pub const MAX_PROBLEMS: usize = 100;

/// The largest workflow or tools file read: far above any hand-written file (a 100,000-step
/// workflow is about 5 MiB), and a bound on what one dropped file can make the daemon parse.
pub const MAX_FILE: u64 = 8 << 20;

/// Every problem found in one or more files; the error type of loading a workflow or tools file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems {
    /// The problems listed, at most [`MAX_PROBLEMS`] per file.
    pub list: Vec<Problem>,
    /// How many more were found and not listed.
    pub unlisted: usize,
}

impl Problems {
    /// These problems, all listed.
    pub fn new(list: Vec<Problem>) -> Problems {
        Problems { list, unlisted: 0 }
    }

    /// One problem of a whole file.
    pub fn of_file(file: &Path, message: impl Into<String>) -> Problems {
        Problems::new(vec![Problem {
            file: file.to_path_buf(),
            position: None,
            message: message.into(),
        }])
    }

    /// How many problems were found, listed or not.
    pub fn count(&self) -> usize {
        self.list.len() + self.unlisted
    }

    /// Adds another file's problems.
    pub fn extend(&mut self, other: Problems) {
        self.list.extend(other.list);
        self.unlisted += other.unlisted;
    }
}

impl Problems {
    /// The line that ends a report of these problems, as every command that refuses a file
    /// prints it.
    pub fn nothing_run(&self) -> String {
        let n = self.count();
        format!(
            "uet: {n} problem{}; nothing was run",
            if n == 1 { "" } else { "s" }
        )
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        if self.unlisted > 0 {
            write!(
                f,
                "\n… and {} more problems, not listed (the first {MAX_PROBLEMS} of a file are)",
                self.unlisted
            )?;
        }
        Ok(())
    }
}

/// Reads a workflow or tools file of at most `limit` bytes, never more: a larger file (or one
/// that grows while read) is a problem of the file, whose message says `what` it was to be. It
/// is opened without waiting on a FIFO, and only a plain file is read.
pub fn read_file(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, Problems> {
    let (file, _) = open_plain(path, what)?;
    read_opened(path, file, limit, what)
}

/// Opens a file to read only when it is a plain file: what the path names is looked at first
/// through an `O_PATH` descriptor, which opens nothing (a device's open can do things: a
/// watchdog's arms it), and only a plain file is then opened, as that very descriptor's file.
/// A FIFO is never waited on. Returns the file and what it is.
pub fn open_plain(path: &Path, what: &str) -> Result<(std::fs::File, std::fs::Metadata), Problems> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| Problems::of_file(path, format!("cannot read {what}: {e}"));
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(cannot)?;
    let meta = handle.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(Problems::of_file(
            path,
            format!("is not a plain file, so it is not read as {what}"),
        ));
    }
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(cannot)?;
    Ok((file, meta))
}

/// Reads at most `limit` bytes of an opened file.
pub fn read_opened(
    path: &Path,
    file: std::fs::File,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, Problems> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Problems::of_file(path, format!("cannot read {what}: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(path, limit, what));
    }
    Ok(bytes)
}

/// The problem of a file over its size limit.
pub fn too_large(path: &Path, limit: u64, what: &str) -> Problems {
    Problems::of_file(
        path,
        format!(
            "is larger than {}, the most read of {what}",
            show_bytes(limit)
        ),
    )
}

impl std::error::Error for Problems {}

/// The text of a file, or a problem at the first byte that is not UTF-8 (binary garbage).
pub fn decode_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, Problems> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let text = std::str::from_utf8(valid).unwrap_or_default();
        let src = Source::new(path, text);
        Problems::new(vec![Problem {
            file: path.to_path_buf(),
            position: Some(src.position(text.len())),
            message: "not UTF-8 text (is this a binary file?)".into(),
        }])
    })
}

/// `step `id`` when the table has a string `id`, else `steps[3]`, for messages.
pub fn label_of(node: &Node, kind: &str, index: usize) -> String {
    let key = if kind == "step" { "id" } else { "name" };
    if let Value::Table(entries) = &node.value
        && let Some(Value::String(name)) =
            entries.iter().find(|e| e.key == key).map(|e| &e.node.value)
    {
        return format!("{kind} `{name}`");
    }
    format!("{kind}s[{index}]")
}

/// A value with the byte range it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Byte range in the source text.
    pub span: Range<usize>,
    /// The value.
    pub value: Value,
}

/// The values both formats share.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A table (TOML) or object (JSON), keys in source order where the parser keeps it.
    Table(Vec<Entry>),
    /// An array.
    Array(Vec<Node>),
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// JSON `null`.
    Null,
    /// A TOML date/time, kept as its text.
    Datetime(String),
}

/// One key of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Where the key is written.
    pub key_span: Range<usize>,
    /// Its value.
    pub node: Node,
}

impl Value {
    /// What kind of value this is, in words, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Table(_) => "a table",
            Value::Array(_) => "an array",
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Null => "null",
            Value::Datetime(_) => "a date",
        }
    }
}

impl Node {
    /// The value as JSON (the form step inputs take).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Table(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.node.to_json()))
                    .collect(),
            ),
            Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(Node::to_json).collect())
            }
            Value::String(s) | Value::Datetime(s) => serde_json::Value::String(s.clone()),
            Value::Integer(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Null => serde_json::Value::Null,
        }
    }
}

/// A source file being read: its path and text, and the problems found so far.
pub struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Byte offset of the start of every line, for turning spans into line:col.
    line_starts: Vec<usize>,
    problems: Vec<Problem>,
    /// Problems found past [`MAX_PROBLEMS`], counted only.
    unlisted: usize,
}

impl<'a> Source<'a> {
    /// Starts reading `text`, which came from `path`.
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            path,
            text,
            line_starts,
            problems: Vec::new(),
            unlisted: 0,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.path
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts[line - 1];
        let col = self
            .text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(offset - start)
            + 1;
        (line, col)
    }

    /// Records a problem at a byte offset.
    pub fn error_at(&mut self, offset: usize, message: impl Into<String>) {
        if self.problems.len() >= MAX_PROBLEMS {
            self.unlisted += 1;
            return;
        }
        let position = Some(self.position(offset));
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            position,
            message: message.into(),
        });
    }

    /// Records a problem at a span's start.
    pub fn error(&mut self, span: &Range<usize>, message: impl Into<String>) {
        self.error_at(span.start, message);
    }

    /// Records a problem of the whole file.
    pub fn error_file(&mut self, message: impl Into<String>) {
        if self.problems.len() >= MAX_PROBLEMS {
            self.unlisted += 1;
            return;
        }
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            position: None,
            message: message.into(),
        });
    }

    /// True when any problem has been recorded.
    pub fn has_problems(&self) -> bool {
        !self.problems.is_empty()
    }

    /// The problems found, in the order of their place in the file.
    pub fn into_problems(mut self) -> Problems {
        // stable: problems at one place keep the order they were found in
        self.problems.sort_by_key(|p| p.position.unwrap_or((0, 0)));
        Problems {
            list: self.problems,
            unlisted: self.unlisted,
        }
    }

    /// Parses the text as TOML or JSON (by the file's extension; TOML unless it ends in
    /// `.json`). Returns `None` when the text is not a document at all; syntax problems are
    /// recorded.
    pub fn parse(&mut self) -> Option<Node> {
        let is_json = self
            .path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if let Some(offset) = too_deep(self.text, is_json) {
            self.error_at(
                offset,
                format!("nested more than {MAX_NESTING} levels deep"),
            );
            return None;
        }
        if is_json {
            self.parse_json()
        } else {
            self.parse_toml()
        }
    }

    fn parse_toml(&mut self) -> Option<Node> {
        // the strict parse keeps its first error only; the errors are then listed apart
        let Ok(doc) = toml::de::DeTable::parse(self.text) else {
            self.toml_syntax_errors();
            return None;
        };
        let span = doc.span();
        Some(Node {
            span,
            value: Value::Table(toml_table(doc.into_inner())),
        })
    }

    /// Records every TOML syntax error. The recovering parser makes an error of each bad
    /// line at once (a file of a million bad lines took gigabytes), so the text is parsed a
    /// window of whole lines at a time, each window's errors recorded (or, past the limit, only
    /// counted) and dropped before the next. A window starts afresh, so a construct cut in two
    /// by a window's end may add an error there: only ever in a file that has one already.
    fn toml_syntax_errors(&mut self) {
        const WINDOW: usize = 64 << 10;
        let text = self.text;
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + WINDOW).min(text.len());
            if end < text.len() {
                // whole lines; a line longer than the window is cut, at a character's edge
                let bytes = &text.as_bytes()[start..end];
                end = match bytes.iter().rposition(|&b| b == b'\n') {
                    Some(i) => start + i + 1,
                    None => {
                        while !text.is_char_boundary(end) {
                            end -= 1;
                        }
                        end
                    }
                };
            }
            let (_, errors) = toml::de::DeTable::parse_recoverable(&text[start..end]);
            for e in errors {
                let at = e.span().map(|s| s.start).unwrap_or(0);
                // a window's end is not the file's: what the parser says of it is not so
                if at >= end - start && end < text.len() {
                    continue;
                }
                self.error_at(start + at, format!("TOML syntax: {}", e.message()));
            }
            start = end;
        }
    }

    fn parse_json(&mut self) -> Option<Node> {
        let options = jsonc_parser::ParseOptions {
            allow_comments: false,
            allow_loose_object_property_names: false,
            allow_trailing_commas: false,
            allow_missing_commas: false,
            allow_single_quoted_strings: false,
            allow_hexadecimal_numbers: false,
            allow_unary_plus_numbers: false,
            allow_bare_decimal_point_numbers: false,
            allow_extended_string_escapes: false,
            allow_non_finite_numbers: false,
        };
        match jsonc_parser::parse_to_ast(self.text, &Default::default(), &options) {
            Ok(result) => match result.value {
                Some(value) => Some(json_node(value)),
                None => {
                    self.error_file("empty JSON document");
                    None
                }
            },
            Err(e) => {
                self.error_at(e.range().start, format!("JSON syntax: {}", e.kind()));
                None
            }
        }
    }
}

/// The offset where nesting first exceeds [`MAX_NESTING`], counting brackets outside strings.
/// Conservative for TOML (brackets in table headers count too), which is harmless at this depth.
fn too_deep(text: &str, is_json: bool) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string: Option<u8> = None;
    let mut escaped = false;
    for (i, b) in text.bytes().enumerate() {
        if let Some(quote) = in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' && quote == b'"' {
                escaped = true;
            } else if b == quote || (b == b'\n' && !is_json) {
                in_string = None;
            }
            continue;
        }
        match b {
            b'"' => in_string = Some(b'"'),
            b'\'' if !is_json => in_string = Some(b'\''),
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

fn toml_table(table: toml::de::DeTable<'_>) -> Vec<Entry> {
    let mut entries: Vec<Entry> = table
        .into_iter()
        .map(|(k, v)| Entry {
            key_span: k.span(),
            key: k.into_inner().into_owned(),
            node: toml_node(v),
        })
        .collect();
    // the map is sorted by key; source order reads better in messages and outputs
    entries.sort_by_key(|e| e.key_span.start);
    entries
}

fn toml_node(v: toml::Spanned<toml::de::DeValue<'_>>) -> Node {
    use toml::de::DeValue;
    let span = v.span();
    let value = match v.into_inner() {
        DeValue::String(s) => Value::String(s.into_owned()),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Value::Integer(n),
            // beyond i64: keep the digits rather than lose the value
            Err(_) => Value::String(i.to_string()),
        },
        DeValue::Float(f) => Value::Float(f.as_str().replace('_', "").parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Value::Bool(b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::Array(items.into_iter().map(toml_node).collect()),
        DeValue::Table(t) => Value::Table(toml_table(t)),
    };
    Node { span, value }
}

fn json_node(v: jsonc_parser::ast::Value<'_>) -> Node {
    use jsonc_parser::ast::Value as J;
    let (range, value) = match v {
        J::StringLit(s) => (s.range, Value::String(s.value.into_owned())),
        J::NumberLit(n) => (
            n.range,
            match n.value.parse::<i64>() {
                Ok(i) => Value::Integer(i),
                Err(_) => Value::Float(n.value.parse().unwrap_or(f64::NAN)),
            },
        ),
        J::BooleanLit(b) => (b.range, Value::Bool(b.value)),
        J::NullKeyword(n) => (n.range, Value::Null),
        J::Array(a) => (
            a.range,
            Value::Array(a.elements.into_iter().map(json_node).collect()),
        ),
        J::Object(o) => (
            o.range,
            Value::Table(
                o.properties
                    .into_iter()
                    .map(|p| {
                        let key_range = match &p.name {
                            jsonc_parser::ast::ObjectPropName::String(s) => s.range,
                            jsonc_parser::ast::ObjectPropName::Word(w) => w.range,
                        };
                        Entry {
                            key: p.name.into_string(),
                            key_span: key_range.start..key_range.end,
                            node: json_node(p.value),
                        }
                    })
                    .collect(),
            ),
        ),
    };
    Node {
        span: range.start..range.end,
        value,
    }
}

/// Reads the keys of one table, records a problem for each key nobody asked for.
///
/// Every getter records a problem and returns `None` when the value has the wrong type, so the
/// caller goes on and finds the next problem too.
pub struct Fields<'n> {
    /// Whose keys these are, for messages: `workflow`, ``step `lint` ``.
    owner: String,
    /// The keys leading here, for nested tables: `limits.`.
    prefix: String,
    entries: &'n [Entry],
    used: Vec<bool>,
}

impl<'n> Fields<'n> {
    /// Reads `node` as the table of `owner` (for messages); records a problem if it is not one.
    pub fn new(src: &mut Source<'_>, node: &'n Node, owner: impl Into<String>) -> Option<Self> {
        Self::nested(src, node, owner.into(), String::new())
    }

    /// Reads `node`, the value of `key` in `owner`'s table.
    pub fn nested_in(src: &mut Source<'_>, node: &'n Node, owner: &str, key: &str) -> Option<Self> {
        Self::nested(src, node, owner.to_string(), format!("{key}."))
    }

    fn nested(src: &mut Source<'_>, node: &'n Node, owner: String, prefix: String) -> Option<Self> {
        match &node.value {
            Value::Table(entries) => {
                let mut seen: Vec<&str> = Vec::new();
                for e in entries {
                    // JSON allows a key twice; a silent last-wins would hide a mistake
                    if seen.contains(&e.key.as_str()) {
                        src.error(
                            &e.key_span,
                            format!("{owner}: key `{prefix}{}` appears twice", e.key),
                        );
                    }
                    seen.push(&e.key);
                }
                Some(Fields {
                    owner,
                    prefix,
                    used: vec![false; entries.len()],
                    entries,
                })
            }
            other => {
                let place = match prefix.strip_suffix('.') {
                    Some(key) => format!("`{key}` "),
                    None => String::new(),
                };
                src.error(
                    &node.span,
                    format!("{owner}: {place}must be a table, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// The raw node of a key, marking it as known.
    pub fn node(&mut self, key: &str) -> Option<&'n Node> {
        let i = self.entries.iter().position(|e| e.key == key)?;
        self.used[i] = true;
        Some(&self.entries[i].node)
    }

    /// Marks a key as known without reading it.
    pub fn ignore(&mut self, key: &str) {
        self.node(key);
    }

    /// A string value.
    pub fn string(&mut self, src: &mut Source<'_>, key: &str) -> Option<(String, Range<usize>)> {
        let node = self.node(key)?;
        match &node.value {
            Value::String(s) => Some((s.clone(), node.span.clone())),
            other => {
                self.wrong(src, node, key, "a string", other);
                None
            }
        }
    }

    /// A whole number in `min..=max`.
    pub fn integer(&mut self, src: &mut Source<'_>, key: &str, min: i64, max: i64) -> Option<i64> {
        let node = self.node(key)?;
        match &node.value {
            Value::Integer(i) if (min..=max).contains(i) => Some(*i),
            Value::Integer(i) => {
                src.error(
                    &node.span,
                    format!(
                        "{} must be between {min} and {max}, found {i}",
                        self.name(key)
                    ),
                );
                None
            }
            other => {
                self.wrong(src, node, key, "an integer", other);
                None
            }
        }
    }

    /// A boolean.
    pub fn boolean(&mut self, src: &mut Source<'_>, key: &str) -> Option<bool> {
        let node = self.node(key)?;
        match &node.value {
            Value::Bool(b) => Some(*b),
            other => {
                self.wrong(src, node, key, "true or false", other);
                None
            }
        }
    }

    /// A duration written as text (`"200ms"`, `"1m 30s"`).
    pub fn duration(&mut self, src: &mut Source<'_>, key: &str) -> Option<Duration> {
        let (text, span) = self.string(src, key)?;
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                src.error(
                    &span,
                    format!(
                        "{}: bad duration {text:?} ({e}); write e.g. \"500ms\", \"30s\", \"10m\"",
                        self.name(key)
                    ),
                );
                None
            }
        }
    }

    /// A byte size written as text (`"64MiB"`, `"512KiB"`) or a plain number of bytes.
    pub fn bytes(&mut self, src: &mut Source<'_>, key: &str) -> Option<u64> {
        let node = self.node(key)?;
        match &node.value {
            Value::Integer(i) if *i > 0 => Some(*i as u64),
            Value::String(s) => match parse_bytes(s) {
                Some(n) => Some(n),
                None => {
                    src.error(
                        &node.span,
                        format!(
                            "{}: bad size {s:?}; write e.g. \"64MiB\", \"512KiB\", \"1GiB\"",
                            self.name(key)
                        ),
                    );
                    None
                }
            },
            other => {
                self.wrong(src, node, key, "a size such as \"64MiB\"", other);
                None
            }
        }
    }

    /// A list of strings, each with its span.
    pub fn strings(
        &mut self,
        src: &mut Source<'_>,
        key: &str,
    ) -> Option<Vec<(String, Range<usize>)>> {
        let node = self.node(key)?;
        let Value::Array(items) = &node.value else {
            self.wrong(src, node, key, "a list of strings", &node.value);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match &item.value {
                Value::String(s) => out.push((s.clone(), item.span.clone())),
                other => src.error(
                    &item.span,
                    format!(
                        "{}: each item must be a string, found {}",
                        self.name(key),
                        other.kind()
                    ),
                ),
            }
        }
        Some(out)
    }

    /// A sub-table.
    pub fn table(&mut self, src: &mut Source<'_>, key: &str) -> Option<Fields<'n>> {
        let node = self.node(key)?;
        Fields::nested(
            src,
            node,
            self.owner.clone(),
            format!("{}{key}.", self.prefix),
        )
    }

    /// Records a problem for every key that no getter asked for.
    pub fn finish(self, src: &mut Source<'_>, known: &[&str]) {
        for (entry, used) in self.entries.iter().zip(&self.used) {
            if !used {
                src.error(
                    &entry.key_span,
                    format!(
                        "{}: unknown key `{}{}` (known keys: {})",
                        self.owner,
                        self.prefix,
                        entry.key,
                        known.join(", ")
                    ),
                );
            }
        }
    }

    fn wrong(&self, src: &mut Source<'_>, node: &Node, key: &str, want: &str, found: &Value) {
        src.error(
            &node.span,
            format!("{} must be {want}, found {}", self.name(key), found.kind()),
        );
    }

    /// `owner: `path.key`` for messages.
    fn name(&self, key: &str) -> String {
        format!("{}: `{}{key}`", self.owner, self.prefix)
    }
}

/// Parses `64MiB`, `512 KiB`, `1GB`, `4096`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&n| n > 0)
}

/// A size in the units [`parse_bytes`] reads: `512 B`, `64 KiB`, `1.5 MiB`.
pub fn show_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{:.1} {unit}", n as f64 / size as f64)
            };
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> (Option<Node>, Vec<Problem>) {
        let path = PathBuf::from(name);
        let mut src = Source::new(&path, text);
        let node = src.parse();
        (node, src.into_problems().list)
    }

    #[test]
    fn toml_and_json_give_the_same_tree() {
        let (t, _) = parse("a.toml", "x = 1\ny = [\"a\", true]\n[z]\nw = 2.5\n");
        let (j, _) = parse("a.json", r#"{"x": 1, "y": ["a", true], "z": {"w": 2.5}}"#);
        assert_eq!(t.unwrap().to_json(), j.unwrap().to_json());
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let (_, problems) = parse("a.toml", "x = 1\ny = = 2\n");
        assert_eq!(problems[0].position.unwrap().0, 2, "{problems:?}");
        let (_, problems) = parse("a.json", "{\n  \"x\": 1,\n  \"y\": }\n");
        assert_eq!(problems[0].position, Some((3, 8)), "{problems:?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = "[".repeat(100_000);
        let (node, problems) = parse("a.json", &text);
        assert!(node.is_none());
        assert!(problems[0].message.contains("nested"));
        let text = format!("x = {}", "[".repeat(100_000));
        let (node, problems) = parse("a.toml", &text);
        assert!(node.is_none());
        assert!(!problems.is_empty());
    }

    #[test]
    fn positions_count_characters() {
        let path = PathBuf::from("x");
        let src = Source::new(&path, "ab\néé=1\n");
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(3), (2, 1));
        assert_eq!(src.position(7), (2, 3));
    }

    #[test]
    fn syntax_errors_of_a_long_file_are_listed_and_counted_in_windows() {
        // windows of 64 KiB; multibyte text across their edges, lines longer than a window
        let mut text = String::new();
        for i in 0..4000 {
            text.push_str(&format!("ключ{i} = \"значение\"\n!\n"));
        }
        text.push_str(&"é".repeat(70_000));
        text.push('\n');
        let (node, problems) = parse("long.toml", &text);
        assert!(node.is_none());
        assert_eq!(problems.len(), MAX_PROBLEMS);
        assert!(
            problems
                .iter()
                .all(|p| p.message.starts_with("TOML syntax"))
        );
        let mut src = Source::new(Path::new("long.toml"), &text);
        src.parse();
        let all = src.into_problems();
        assert_eq!(all.list.len(), MAX_PROBLEMS);
        assert!(all.unlisted >= 3900, "{} more", all.unlisted);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("10 KB"), Some(10_000));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("0"), None);
    }
}

//! The tools file (`tools.toml`): the operator's list of tools, and the router that finds the
//! tool for a step.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::doc::{Fields, Problems, Source, Value};
use crate::spec::template::{Template, TemplateError};

/// Output an attempt may hand back when its tool does not say: outputs are kept in the state
/// and handed to later steps, and 1 MiB is far more than any JSON result a step should pass on.
pub const DEFAULT_OUTPUT: u64 = 1 << 20;

/// The largest `limits.output` a tool may set: an output lives in memory, in the journal and in
/// `uet show`'s answer, whose frames are at most 16 MiB.
pub const MAX_OUTPUT: u64 = 8 << 20;

/// The name of the tools file looked for beside a workflow.
pub const TOOLS_FILE: &str = "tools.toml";

/// Every tool of a tools file, in file order (the router prefers earlier tools).
#[derive(Debug, Clone)]
pub struct Tools {
    /// The file they came from.
    pub path: PathBuf,
    /// The tools.
    pub tools: Vec<Tool>,
}

/// One tool entry.
#[derive(Debug, Clone)]
pub struct Tool {
    /// Its name, which steps use in `tool = "..."`.
    pub name: String,
    /// Who it is among every tools file: `name@folder`, its tools file's folder resolved
    /// (see [`crate::model::tool_key`]). Two files' tools of one name are two tools: their
    /// breakers and counters are kept apart under this.
    pub key: String,
    /// What runs.
    pub kind: ToolKind,
    /// What it can do, for steps that ask by `capability`.
    pub capabilities: Vec<String>,
    /// Wall-clock limit per attempt.
    pub timeout: Option<Duration>,
    /// Memory limit (WASM tools).
    pub memory: Option<u64>,
    /// Fuel limit (WASM tools).
    pub fuel: Option<u64>,
    /// The most bytes of output an attempt may hand back (a command's stdout, a plugin's
    /// result); more fails the attempt. [`DEFAULT_OUTPUT`] when `None`.
    pub output: Option<u64>,
    /// Folders of the workstream the tool may read and write (WASM tools).
    pub sandbox: Sandbox,
    /// Extra attempts after the first, unless the workflow says otherwise.
    pub retries: Option<u32>,
    /// Delays between attempts.
    pub retry: RetryPolicy,
    /// Circuit breaker settings; a tool without a `breaker` entry has none.
    pub breaker: Option<BreakerSettings>,
    /// Exit codes that decide whether a retry can help (command tools).
    pub exit_codes: ExitCodes,
    /// Whether a `{key}` that begins an argument may be filled with a value starting with `-`
    /// (command tools): off, so a workflow cannot slip options into the operator's command.
    pub allow_options: bool,
    /// What a WASM plugin said of itself, once asked.
    pub described: Option<Description>,
    /// Its attempts may run on any node of a fleet with the same plugin (docs/FLEET.md).
    pub fleet: bool,
    /// The plugin's content, pinned: a `wasm` file with another sha256 is refused; with no
    /// `wasm`, the plugin comes from the fleet by this hash.
    pub sha256: Option<String>,
    /// The plugin comes from the fleet by its sha256, this node having no file of its own:
    /// its path is empty until the runtime names the copy it keeps in its cache.
    pub from_fleet: bool,
    /// Added to a command's environment: `env = { ... }`, then the `env_file`'s (read only
    /// when the tools file is loaded to run).
    pub env: Vec<(String, String)>,
    /// The `env_file`'s values, longest first: cut out of everything an attempt hands back
    /// (see [`Tool::redact`]).
    pub secrets: Vec<String>,
}

/// What stands in for a secret in anything uet keeps or shows.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not cut out of output: a value that short would take every
/// occurrence of some everyday word or number with it, and is no secret anyway.
pub const MIN_SECRET: usize = 4;

impl Tool {
    /// `text` with every secret value of the tool (as written, and as JSON would escape it)
    /// replaced by [`REDACTED`].
    pub fn redact(&self, text: &mut String) {
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                *text = text.replace(secret.as_str(), REDACTED);
            }
            // a JSON string always has its two quotes
            let escaped = serde_json::to_string(secret).unwrap_or_else(|_| "\"\"".into());
            let escaped = &escaped[1..escaped.len() - 1];
            if escaped != secret && text.contains(escaped) {
                *text = text.replace(escaped, REDACTED);
            }
        }
    }

    /// The most bytes of output an attempt may hand back.
    pub fn output_limit(&self) -> usize {
        self.output.unwrap_or(DEFAULT_OUTPUT) as usize
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// What it can do.
    pub capabilities: Vec<String>,
    /// A JSON schema of its input, as JSON text.
    pub input_schema: String,
}

/// What a tool runs.
#[derive(Debug, Clone)]
pub enum ToolKind {
    /// A subprocess: argv templates filled from the step's input.
    Command {
        /// The program and its arguments, `{key}` placeholders not yet filled.
        argv: Vec<Template>,
    },
    /// A WebAssembly component.
    Wasm {
        /// The component file, resolved against the tools file's folder.
        path: PathBuf,
    },
}

impl ToolKind {
    /// What it runs, as shown: the command line, or the component file.
    pub fn source(&self) -> String {
        match self {
            ToolKind::Command { argv } => argv
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            ToolKind::Wasm { path } => path.display().to_string(),
        }
    }

    /// `command` or `wasm`.
    pub fn name(&self) -> &'static str {
        match self {
            ToolKind::Command { .. } => "command",
            ToolKind::Wasm { .. } => "wasm",
        }
    }
}

/// Folders a sandboxed tool may touch, relative to the workstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// Readable folders.
    pub read: Vec<String>,
    /// Writable (and readable) folders.
    pub write: Vec<String>,
}

/// How long to wait before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The delay before the second attempt; it doubles for each attempt after.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Full jitter: pick the delay uniformly in `0..=computed`, so many clients do not retry in
    /// step against a recovering tool.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `next` (2 for the first retry), given a random source.
    pub fn delay(&self, next: u32, rng: &mut impl rand::Rng) -> Duration {
        use rand::RngExt as _;
        let exp = next.saturating_sub(2).min(31);
        let capped = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        if self.jitter && !capped.is_zero() {
            Duration::from_nanos(rng.random_range(0..=capped.as_nanos() as u64))
        } else {
            capped
        }
    }
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before one probe.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cool_down: Duration::from_secs(60),
        }
    }
}

/// Exit codes a command tool's entry lists as retryable or fatal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitCodes {
    /// A retry can help. When the list is given, it is the whole list: other codes are fatal.
    pub retryable: Vec<i32>,
    /// A retry cannot help.
    pub fatal: Vec<i32>,
}

impl ExitCodes {
    /// Whether a failure with this exit code is worth another attempt: not when it is listed
    /// as fatal; when a `retryable` list is given, only when it is on it; else yes.
    pub fn is_retryable(&self, code: i32) -> bool {
        !self.fatal.contains(&code) && (self.retryable.is_empty() || self.retryable.contains(&code))
    }
}

impl Tools {
    /// An empty set, for validating a workflow's shape without a tools file.
    pub fn empty() -> Self {
        Tools {
            path: PathBuf::new(),
            tools: Vec::new(),
        }
    }

    /// Reads and checks a tools file to run its tools, reporting every problem at once; the file
    /// must be the operator's alone (see [`trusted`]).
    pub fn load(path: &Path) -> Result<Tools, Problems> {
        Self::load_as(path, true)
    }

    /// Reads and checks a tools file to check workflows against it or list its tools: nothing
    /// of it runs but plugins' descriptions (in their sandbox), so the operator's file may be
    /// read by another user; it must still be written by its owner alone.
    pub fn load_to_read(path: &Path) -> Result<Tools, Problems> {
        Self::load_as(path, false)
    }

    fn load_as(path: &Path, to_run: bool) -> Result<Tools, Problems> {
        // relative programs and plugins resolve against this file's folder, wherever the
        // tools later run from
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let (file, meta) =
            crate::spec::doc::open_plain(path, "a tools file").map_err(|mut p| {
                if let Some(first) = p
                    .list
                    .first_mut()
                    .filter(|p| p.message.starts_with("cannot read"))
                {
                    first
                        .message
                        .push_str(" (put a tools.toml beside the workflow, or pass --tools FILE)");
                }
                p
            })?;
        if to_run {
            trusted(path, &meta)?;
        } else if std::os::unix::fs::MetadataExt::mode(&meta) & 0o022 != 0 {
            // listed or checked against, but written by others: what it says may not be the
            // operator's either
            trusted(path, &meta)?;
        }
        let bytes =
            crate::spec::doc::read_opened(path, file, crate::spec::doc::MAX_FILE, "a tools file")?;
        // the secrets only when something will run: listing or checking needs none of them
        Self::parse_as(path, &bytes, to_run)
    }

    /// Checks the text of a tools file; `env_file`s are named but not read (see
    /// [`Tools::load`]).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Tools, Problems> {
        Self::parse_as(path, bytes, false)
    }

    /// [`Tools::parse`]; with `read_secrets`, each `env_file` is read and checked too.
    fn parse_as(path: &Path, bytes: &[u8], read_secrets: bool) -> Result<Tools, Problems> {
        let text = crate::spec::doc::decode_text(path, bytes)?;
        let mut src = Source::new(path, text);
        let Some(root) = src.parse() else {
            return Err(src.into_problems());
        };
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut tools = Vec::new();
        if let Some(mut top) = Fields::new(&mut src, &root, "tools file") {
            if let Some(list) = top.node("tools") {
                match &list.value {
                    crate::spec::doc::Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if let Some(t) = read_tool(&mut src, item, i, &base, read_secrets) {
                                tools.push((t, item.span.clone()));
                            }
                        }
                    }
                    other => src.error(
                        &list.span,
                        format!(
                            "`tools` must be a list of [[tools]] tables, found {}",
                            other.kind()
                        ),
                    ),
                }
            }
            top.finish(&mut src, &["tools"]);
        }
        let mut seen = HashSet::new();
        for (t, span) in &tools {
            if !t.name.is_empty() && !seen.insert(t.name.as_str()) {
                src.error(span, format!("tool `{}` is defined twice", t.name));
            }
        }
        if src.has_problems() {
            return Err(src.into_problems());
        }
        // the folder as the file system names it, so `uet run ../w.toml` and a daemon watching
        // the folder agree on who each tool is
        let home = std::fs::canonicalize(&base).unwrap_or(base);
        for (t, _) in &mut tools {
            t.key = crate::model::tool_key(&t.name, &home.display().to_string());
        }
        Ok(Tools {
            path: path.to_path_buf(),
            tools: tools.into_iter().map(|(t, _)| t).collect(),
        })
    }

    /// The largest memory limit of any WASM tool, to size the plugin runtime's pool.
    pub fn max_memory(&self) -> u64 {
        self.tools
            .iter()
            .filter_map(|t| t.memory)
            .max()
            .unwrap_or(0)
    }

    /// True when any tool is a WASM plugin.
    pub fn has_plugins(&self) -> bool {
        self.tools
            .iter()
            .any(|t| matches!(t.kind, ToolKind::Wasm { .. }))
    }

    /// The tool with this name.
    pub fn by_name(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// The tools that have a capability, in the order the operator listed them.
    pub fn with_capability<'a, 'c>(
        &'a self,
        capability: &'c str,
    ) -> impl Iterator<Item = &'a Tool> + use<'a, 'c> {
        self.tools
            .iter()
            .filter(move |t| t.capabilities.iter().any(|c| c == capability))
    }
}

const TOOL_KEYS: &[&str] = &[
    "name",
    "command",
    "wasm",
    "capabilities",
    "limits",
    "sandbox",
    "retries",
    "retry",
    "breaker",
    "exit_codes",
    "allow_options",
    "description",
    "fleet",
    "sha256",
    "env",
    "env_file",
];

fn read_tool(
    src: &mut Source<'_>,
    node: &crate::spec::doc::Node,
    index: usize,
    base: &Path,
    read_secrets: bool,
) -> Option<Tool> {
    let mut f = Fields::new(src, node, crate::spec::doc::label_of(node, "tool", index))?;
    let name = f.string(src, "name");
    if name.is_none() && f.node("name").is_none() {
        src.error(&node.span, format!("tools[{index}]: missing `name`"));
    }
    // steps, logs and metrics labels name tools: keep names plain
    if let Some((n, span)) = &name
        && (n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        src.error(
            span,
            format!("tools[{index}]: name {n:?} must be letters, digits, `-`, `_` or `.`"),
        );
    }
    let label = crate::spec::doc::label_of(node, "tool", index);
    f.ignore("description");
    let command = f.strings(src, "command");
    let wasm = f.string(src, "wasm");
    let sha256 = f.string(src, "sha256");
    if let Some((hash, span)) = &sha256
        && (hash.len() != 64 || !hash.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
    {
        src.error(
            span,
            format!("{label}: `sha256` must be 64 lowercase hex digits"),
        );
    }
    let from_fleet = command.is_none() && wasm.is_none() && sha256.is_some();
    let kind = if from_fleet {
        Some(ToolKind::Wasm {
            path: PathBuf::new(),
        })
    } else {
        read_kind(src, node, &label, command, wasm, base)
    };
    let capabilities = f
        .strings(src, "capabilities")
        .unwrap_or_default()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let mut tool = Tool {
        name: name.map(|(n, _)| n).unwrap_or_default(),
        key: String::new(),
        kind: kind.unwrap_or(ToolKind::Command { argv: Vec::new() }),
        capabilities,
        timeout: None,
        memory: None,
        fuel: None,
        output: None,
        sandbox: Sandbox::default(),
        retries: f.integer(src, "retries", 0, 100).map(|n| n as u32),
        retry: RetryPolicy::default(),
        breaker: None,
        exit_codes: ExitCodes::default(),
        allow_options: f.boolean(src, "allow_options").unwrap_or(false),
        described: None,
        fleet: false,
        sha256: sha256.as_ref().map(|(h, _)| h.clone()),
        from_fleet,
        env: Vec::new(),
        secrets: Vec::new(),
    };
    read_env(src, &mut f, &label, base, read_secrets, &mut tool);
    let fleet_span = f.node("fleet").map(|n| n.span.clone());
    if let (Some(fleet), Some(span)) = (f.boolean(src, "fleet"), fleet_span) {
        // a command means what its machine has: only a plugin is the same wherever it runs
        if fleet && !matches!(tool.kind, ToolKind::Wasm { .. }) {
            src.error(
                &span,
                format!(
                    "{label}: `fleet = true` needs a `wasm` plugin: a command runs where its run is"
                ),
            );
        }
        tool.fleet = fleet;
    }
    if let Some((_, span)) = &sha256 {
        if !matches!(tool.kind, ToolKind::Wasm { .. }) {
            src.error(
                span,
                format!("{label}: `sha256` pins a `wasm` plugin's content"),
            );
        } else if from_fleet && !tool.fleet {
            src.error(
                span,
                format!(
                    "{label}: a plugin named only by `sha256` comes from the fleet: add `fleet = true`, or give its `wasm` file"
                ),
            );
        }
    }
    if let Some(limits) = f.table(src, "limits") {
        read_limits(src, limits, &label, &mut tool);
    }
    if let Some(sandbox) = f.table(src, "sandbox") {
        tool.sandbox = read_sandbox(src, sandbox, &label);
    }
    if let Some(retry) = f.table(src, "retry") {
        tool.retry = read_retry_policy(src, retry);
    }
    if let Some(mut breaker) = f.table(src, "breaker") {
        let mut settings = BreakerSettings::default();
        if let Some(n) = breaker.integer(src, "failures", 1, 1_000_000) {
            settings.failures = n as u32;
        }
        if let Some(d) = breaker.duration(src, "cool_down") {
            settings.cool_down = d;
        }
        breaker.finish(src, &["failures", "cool_down"]);
        tool.breaker = Some(settings);
    }
    if let Some(codes) = f.table(src, "exit_codes") {
        tool.exit_codes = read_exit_codes(src, codes, &label);
    }
    f.finish(src, TOOL_KEYS);
    Some(tool)
}

/// `env = { KEY = "value" }` and `env_file = "FILE"` (command tools): what their process is
/// given besides the inherited environment. The file's values are secrets: it must be the
/// operator's and readable by them alone, and its values are cut out of whatever an attempt
/// hands back.
fn read_env(
    src: &mut Source<'_>,
    f: &mut Fields<'_>,
    label: &str,
    base: &Path,
    read_secrets: bool,
    tool: &mut Tool,
) {
    let env_node = f.node("env");
    let env_file = f.string(src, "env_file");
    if (env_node.is_some() || env_file.is_some()) && !matches!(tool.kind, ToolKind::Command { .. })
    {
        let span = env_node
            .map(|n| n.span.clone())
            .or(env_file.as_ref().map(|(_, s)| s.clone()))
            .unwrap_or_default();
        src.error(
            &span,
            format!(
                "{label}: `env` and `env_file` are for command tools: a plugin sees no environment"
            ),
        );
        return;
    }
    if let Some(node) = env_node {
        match &node.value {
            Value::Table(entries) => {
                for e in entries {
                    if let Err(why) = env_key(&e.key) {
                        src.error(&e.key_span, format!("{label}: env: {why}"));
                    } else if let Value::String(v) = &e.node.value {
                        tool.env.push((e.key.clone(), v.clone()));
                    } else {
                        src.error(
                            &e.node.span,
                            format!(
                                "{label}: env: `{}` must be a string, found {}",
                                e.key,
                                e.node.value.kind()
                            ),
                        );
                    }
                }
            }
            other => src.error(
                &node.span,
                format!("{label}: `env` must be a table, found {}", other.kind()),
            ),
        }
    }
    let Some((file, span)) = env_file else {
        return;
    };
    if !read_secrets {
        return;
    }
    let path = base.join(&file);
    match read_secrets_file(&path) {
        Ok(pairs) => {
            for (key, value) in pairs {
                if tool.env.iter().any(|(k, _)| *k == key) {
                    src.error(
                        &span,
                        format!(
                            "{label}: `{key}` is set in both `env` and {}",
                            path.display()
                        ),
                    );
                    continue;
                }
                if value.len() >= MIN_SECRET {
                    tool.secrets.push(value.clone());
                }
                tool.env.push((key, value));
            }
            tool.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
            tool.secrets.dedup();
        }
        Err(why) => src.error(
            &span,
            format!("{label}: env_file {}: {why}", path.display()),
        ),
    }
}

/// An environment variable's name a tool may set.
fn env_key(key: &str) -> Result<(), String> {
    let mut chars = key.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain {
        Err(format!(
            "`{key}` is not a variable name (letters, digits and `_`)"
        ))
    } else if key.starts_with("UET_") {
        Err(format!("`{key}`: names starting with UET_ are uet's own"))
    } else {
        Ok(())
    }
}

/// Reads a secrets file: `KEY=VALUE` lines (`#` comments, blank lines, an optional `export `,
/// a value optionally in quotes). It must be a regular file of the operator's (or root's) that
/// no one else may read or write.
fn read_secrets_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read it ({e})"))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "belongs to uid {}, not to you (uid {me}) or root",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o}: a secrets file must be readable by its owner alone (chmod 600 {})",
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it ({e})"))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: write KEY=VALUE", i + 1));
        };
        let key = key.trim();
        env_key(key).map_err(|why| format!("line {}: {why}", i + 1))?;
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|&(a, b)| {
                value
                    .strip_prefix(a)
                    .and_then(|v| v.strip_suffix(b))
                    .filter(|_| value.len() >= 2)
            })
            .unwrap_or(value);
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// What a tool runs: `command = [...]` (the program resolved against the tools file's folder
/// when it has a slash) or `wasm = "file.wasm"`, one and only one.
fn read_kind(
    src: &mut Source<'_>,
    node: &crate::spec::doc::Node,
    label: &str,
    command: Option<Vec<(String, std::ops::Range<usize>)>>,
    wasm: Option<(String, std::ops::Range<usize>)>,
    base: &Path,
) -> Option<ToolKind> {
    match (command, wasm) {
        (Some(argv), None) if argv.is_empty() => {
            src.error(&node.span, format!("{label}: `command` is empty"));
            None
        }
        (Some(argv), None) => {
            let mut templates = Vec::new();
            for (i, (arg, span)) in argv.into_iter().enumerate() {
                let arg = if i == 0 {
                    resolve_program(&arg, base)
                } else {
                    arg
                };
                match Template::parse(&arg) {
                    Ok(t) => templates.push(t),
                    Err(TemplateError(msg)) => {
                        src.error(&span, format!("{label}: command argument: {msg}"))
                    }
                }
            }
            Some(ToolKind::Command { argv: templates })
        }
        (None, Some((path, _))) => Some(ToolKind::Wasm {
            path: base.join(path),
        }),
        (Some(_), Some(_)) => {
            src.error(
                &node.span,
                format!("{label}: give either `command` or `wasm`, not both"),
            );
            None
        }
        (None, None) => {
            src.error(
                &node.span,
                format!("{label}: needs `command = [...]` or `wasm = \"file.wasm\"`"),
            );
            None
        }
    }
}

/// `limits = { timeout, memory, fuel, output }`.
fn read_limits(src: &mut Source<'_>, mut limits: Fields<'_>, label: &str, tool: &mut Tool) {
    tool.timeout = limits.duration(src, "timeout");
    tool.memory = limits.bytes(src, "memory");
    tool.fuel = limits.integer(src, "fuel", 1, i64::MAX).map(|n| n as u64);
    tool.output = limits.bytes(src, "output");
    if let Some(n) = tool.output
        && n > MAX_OUTPUT
    {
        let span = limits.node("output").map(|n| n.span.clone());
        if let Some(span) = span {
            src.error(
                &span,
                format!("{label}: limits.output is at most 8MiB (outputs are kept in the state)"),
            );
        }
        tool.output = None;
    }
    limits.finish(src, &["timeout", "memory", "fuel", "output"]);
}

/// `sandbox = { read = [...], write = [...] }`: folders inside the workstream, never empty.
fn read_sandbox(src: &mut Source<'_>, mut sandbox: Fields<'_>, label: &str) -> Sandbox {
    let mut grants = Sandbox::default();
    for (key, list) in [("read", &mut grants.read), ("write", &mut grants.write)] {
        for (dir, span) in sandbox.strings(src, key).unwrap_or_default() {
            if dir.is_empty() {
                // an empty entry would grant the whole workstream unseen: `.` says so
                src.error(&span, format!("{label}: sandbox.{key} entry is empty (write \".\" to grant the whole workstream)"));
            } else if Path::new(&dir).is_absolute() || dir.split('/').any(|c| c == "..") {
                src.error(&span, format!("{label}: sandbox.{key} entry {dir:?} must stay inside the workstream (relative, no `..`)"));
            } else {
                list.push(dir);
            }
        }
    }
    sandbox.finish(src, &["read", "write"]);
    grants
}

/// `exit_codes = { retryable = [...], fatal = [...] }`: codes 0-255, none on both lists.
fn read_exit_codes(src: &mut Source<'_>, mut codes: Fields<'_>, label: &str) -> ExitCodes {
    let mut read = ExitCodes::default();
    for (key, list) in [
        ("retryable", &mut read.retryable),
        ("fatal", &mut read.fatal),
    ] {
        let Some(node) = codes.node(key) else {
            continue;
        };
        let crate::spec::doc::Value::Array(items) = &node.value else {
            src.error(
                &node.span,
                format!("{label}: exit_codes.{key} must be a list of exit codes"),
            );
            continue;
        };
        for item in items {
            match item.value {
                crate::spec::doc::Value::Integer(c) if (0..=255).contains(&c) => {
                    list.push(c as i32)
                }
                _ => src.error(
                    &item.span,
                    format!("{label}: exit_codes.{key} holds exit codes 0-255"),
                ),
            }
        }
    }
    // a code on both lists would mean whatever the reader guesses: say so instead
    if let Some(node) = codes.node("fatal") {
        let both: Vec<String> = read
            .fatal
            .iter()
            .filter(|c| read.retryable.contains(c))
            .map(|c| c.to_string())
            .collect();
        if !both.is_empty() {
            src.error(
                &node.span,
                format!(
                    "{label}: exit code {} is listed both as retryable and as fatal",
                    both.join(", ")
                ),
            );
        }
    }
    codes.finish(src, &["retryable", "fatal"]);
    read
}

/// Whether a tools file may be believed to run things: it decides which programs run with
/// uet's rights, so it must be the operator's (this user's, or root's), and no one else may
/// write it: not everyone, and not a group, unless the group is the owner's own (a group of
/// one, as distributions give each user). A watched folder that others may drop files into
/// must not be able to hand uet a tools file, nor a file of the operator's that droppers'
/// group can edit.
fn trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), Problems> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(Problems::of_file(
            path,
            format!(
                "belongs to uid {}, not to you (uid {me}) or root: a tools file decides which \
                 programs run, so only the operator's is used to run them (pass --tools with \
                 yours)",
                meta.uid()
            ),
        ));
    }
    let group_writable = meta.mode() & 0o020 != 0 && !own_group(meta.uid(), meta.gid());
    if meta.mode() & 0o002 != 0 || group_writable {
        let who = if meta.mode() & 0o002 != 0 {
            "anyone"
        } else {
            "its group"
        };
        return Err(Problems::of_file(
            path,
            format!(
                "can be written by {who} (mode {:o}): a tools file decides which programs run, \
                 so one that others may change is not used (chmod go-w {})",
                meta.mode() & 0o7777,
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Whether `gid` is the private group of the user `uid`: that user's primary group, with no
/// other members listed.
fn own_group(uid: u32, gid: u32) -> bool {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: passwd and group are plain data filled in by the _r calls, which write only into
    // the buffer they are given and report its use through the result pointer
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        if libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) != 0
            || found.is_null()
            || pw.pw_gid != gid
        {
            return false;
        }
        let mut gr: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        if libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) != 0
            || found.is_null()
        {
            return false;
        }
        gr.gr_mem.is_null() || (*gr.gr_mem).is_null()
    }
}

/// Reads `retry = { base, max, jitter }`; shared by tools and workflow steps.
pub(crate) fn read_retry_policy(src: &mut Source<'_>, mut f: Fields<'_>) -> RetryPolicy {
    let mut policy = RetryPolicy::default();
    if let Some(d) = f.duration(src, "base") {
        policy.base = d;
    }
    if let Some(d) = f.duration(src, "max") {
        policy.max = d;
    }
    if let Some(j) = f.boolean(src, "jitter") {
        policy.jitter = j;
    }
    f.finish(src, &["base", "max", "jitter"]);
    policy
}

/// A program written with a slash but relative (`./bin/lint`, `scripts/x.sh`) is the operator's
/// own file beside the tools file; a bare name (`python3`) is looked up on PATH as usual.
fn resolve_program(program: &str, base: &Path) -> String {
    let p = Path::new(program);
    if program.contains('/') && p.is_relative() && !program.contains('{') {
        base.join(p).to_string_lossy().into_owned()
    } else if !program.contains('/') && !program.contains('{') {
        // looked up in PATH once, here, rather than by every spawn trying each PATH folder
        // in turn (a failed exec per folder); a program not found yet stays a bare name
        search_path(program).unwrap_or_else(|| program.to_string())
    } else {
        program.to_string()
    }
}

/// The first executable file named `program` in a folder of `PATH`.
fn search_path(program: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|file| {
            std::fs::metadata(file)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|file| file.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tools, Problems> {
        Tools::parse(Path::new("/ops/tools.toml"), text.as_bytes())
    }

    #[test]
    fn reads_a_full_entry() {
        let tools = parse(
            r#"
[[tools]]
name = "lint"
command = ["bin/lint", "--json", "{path}"]
capabilities = ["lint.markdown"]
limits = { timeout = "5s" }
retries = 2
retry = { base = "10ms", max = "1s", jitter = false }
breaker = { failures = 3, cool_down = "2s" }
exit_codes = { fatal = [2] }

[[tools]]
name = "wc"
wasm = "plugins/wc.wasm"
sandbox = { read = ["."], write = ["out"] }
limits = { memory = "64MiB", fuel = 1000 }
"#,
        )
        .unwrap();
        let lint = tools.by_name("lint").unwrap();
        let ToolKind::Command { argv } = &lint.kind else {
            panic!()
        };
        assert_eq!(argv[0].to_string(), "/ops/bin/lint");
        assert_eq!(lint.timeout, Some(Duration::from_secs(5)));
        assert_eq!(lint.breaker.unwrap().failures, 3);
        assert!(!lint.exit_codes.is_retryable(2));
        assert!(lint.exit_codes.is_retryable(1));
        // a retryable list is the whole list
        let only = ExitCodes {
            retryable: vec![75],
            fatal: vec![2],
        };
        assert!(only.is_retryable(75));
        assert!(!only.is_retryable(1));
        assert!(!only.is_retryable(2));
        let wc = tools.by_name("wc").unwrap();
        assert!(
            matches!(&wc.kind, ToolKind::Wasm { path } if path == Path::new("/ops/plugins/wc.wasm"))
        );
        assert_eq!(wc.memory, Some(64 << 20));
        assert_eq!(wc.sandbox.write, vec!["out".to_string()]);
        assert_eq!(tools.with_capability("lint.markdown").count(), 1);
    }

    #[test]
    fn reports_every_problem() {
        let err = parse(
            r#"
[[tools]]
name = "a"
command = ["x"]
wasm = "y.wasm"

[[tools]]
name = "b"
command = ["x"]
colour = "red"
limits = { timeout = "soon" }
sandbox = { read = ["/etc"] }
exit_codes = { retryable = [1, 75], fatal = [1] }

[[tools]]
name = "b"
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("not both"), "{text}");
        assert!(text.contains("unknown key `colour`"), "{text}");
        assert!(text.contains("bad duration \"soon\""), "{text}");
        assert!(text.contains("must stay inside the workstream"), "{text}");
        assert!(text.contains("defined twice"), "{text}");
        assert!(
            text.contains("exit code 1 is listed both as retryable and as fatal"),
            "{text}"
        );
        assert!(
            text.contains("tools.toml:10:1: tool `b`: unknown key `colour`"),
            "{text}"
        );
    }

    #[test]
    fn tool_names_are_plain_and_not_empty() {
        // found by the tools fuzzer: an empty name was accepted
        let bad = Tools::parse(
            Path::new("tools.toml"),
            b"[[tools]]\nname = \"\"\ncommand = [\"true\"]\n[[tools]]\nname = \"a\\nb\"\ncommand = [\"true\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("tools.toml:2:8: tools[0]: name \"\" must be"),
            "{bad}"
        );
        assert!(bad.contains("tools[1]: name \"a\\nb\""), "{bad}");
        assert!(
            Tools::parse(
                Path::new("t.toml"),
                b"[[tools]]\nname = \"lint-md_2.x\"\ncommand = [\"true\"]\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_millis(350),
            jitter: false,
        };
        let mut rng = rand::rng();
        let delays: Vec<_> = (2..6).map(|n| p.delay(n, &mut rng).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
    }

    #[test]
    fn jittered_delays_stay_under_a_growing_cap_and_spread() {
        use rand::SeedableRng;
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: true,
        };
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut means = Vec::new();
        for next in 2..7u32 {
            let cap = 100u128 << (next - 2);
            let samples: Vec<u128> = (0..400)
                .map(|_| p.delay(next, &mut rng).as_millis())
                .collect();
            assert!(
                samples.iter().all(|&d| d <= cap),
                "full jitter stays in 0..=cap"
            );
            let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
            assert!(
                distinct.len() > 20,
                "jitter spreads the delays: {distinct:?}"
            );
            let mean = samples.iter().sum::<u128>() / samples.len() as u128;
            // full jitter's mean is half the cap; 400 samples land well within 20% of it
            assert!(
                mean * 10 > cap * 4 && mean * 10 < cap * 6,
                "{next}: {mean} of {cap}"
            );
            means.push(mean);
        }
        assert!(
            means.windows(2).all(|w| w[1] > w[0]),
            "delays grow: {means:?}"
        );
        // the same seed gives the same delays: the policy is a pure function of its RNG
        let mut a = rand::rngs::SmallRng::seed_from_u64(1);
        let mut b = rand::rngs::SmallRng::seed_from_u64(1);
        assert_eq!(p.delay(4, &mut a), p.delay(4, &mut b));
    }
}

//! Workflow files (TOML, or JSON of the same shape) read and checked into a [`Plan`].
//!
//! Every problem is collected before anything is reported, so a user fixes a file in one pass.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::doc::{Fields, Node, Problems, Source, Value};
use crate::spec::template;
use crate::spec::tools::{RetryPolicy, ToolKind, Tools, read_retry_policy};

/// Used when a workflow does not say: enough to overlap a few slow steps without letting a wide
/// workflow start hundreds of processes at once.
pub const DEFAULT_MAX_PARALLEL: usize = 4;

/// The debounce of a standing workflow's trigger when it does not say.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

/// A checked workflow, ready to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The workflow's name.
    pub name: String,
    /// The seed's metadata (`project`, `phase`, `workstream`, `description`), as written.
    pub meta: Vec<(String, String)>,
    /// How many steps may run at once.
    pub max_parallel: usize,
    /// The whole run's deadline.
    pub timeout: Option<Duration>,
    /// Set for a standing workflow.
    pub trigger: Option<Trigger>,
    /// Its parameters (`[params]`) with the values this run takes: the defaults, with any
    /// `--set` applied. `${params.NAME}` in a step's `with` reads them.
    #[serde(default, skip_serializing_if = "template::Params::is_empty")]
    pub params: template::Params,
    /// Who is told when a run of it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// The steps, in file order.
    pub steps: Vec<PlanStep>,
}

/// `[notify]`: a webhook and/or a command tool told the run's summary when it ends in one of
/// the states of `on`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notify {
    /// The run states that notify: `succeeded`, `failed`, `quarantined`, `canceled`.
    pub on: Vec<String>,
    /// `http://host[:port]/path`: POSTed the summary as JSON.
    pub webhook: Option<String>,
    /// A command tool of the tools file, given the summary as its input.
    pub tool: Option<String>,
    /// Extra webhook attempts after the first.
    pub retries: u32,
    /// The first wait between webhook attempts; it doubles each time (at most a minute).
    pub backoff: Duration,
}

/// The run states `[notify] on` may name.
pub const NOTIFY_ON: &[&str] = &["succeeded", "failed", "quarantined", "canceled"];

/// Values for a workflow's parameters, as given on the command line (`--set NAME=VALUE`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sets(pub Vec<(String, String)>);

impl Sets {
    /// One `NAME=VALUE`, as `--set` takes it.
    pub fn parse_one(text: &str) -> Result<(String, String), String> {
        match text.split_once('=') {
            Some((name, value)) if template::is_param_name(name) => {
                Ok((name.to_string(), value.to_string()))
            }
            Some((name, _)) => Err(format!(
                "`{name}` is not a parameter name (letters, digits, `_` and `-`)"
            )),
            None => Err(format!("`{text}`: write NAME=VALUE")),
        }
    }
}

/// What makes a standing workflow run again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// Globs, relative to the workstream.
    pub watch: Vec<String>,
    /// Quiet time after the last change before a run starts.
    pub debounce: Duration,
    /// A cron pattern: the workflow also runs at these times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The zone the schedule is read in: `UTC` (the default), `local`, or an IANA name.
    #[serde(default = "utc", skip_serializing_if = "is_utc")]
    pub timezone: String,
    /// What a daemon that was stopped over scheduled times does when it starts again.
    #[serde(default, skip_serializing_if = "CatchUp::is_none")]
    pub catch_up: CatchUp,
}

fn utc() -> String {
    "UTC".into()
}

fn is_utc(zone: &str) -> bool {
    zone == "UTC"
}

/// Scheduled times missed while no daemon ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// They pass: the next run is at the next scheduled time.
    #[default]
    None,
    /// One run at start stands for all of them, unless the workflow ran since the latest.
    One,
}

impl CatchUp {
    fn is_none(&self) -> bool {
        *self == CatchUp::None
    }
}

impl Trigger {
    /// Whether anything keeps the workflow standing: globs to watch, or a schedule.
    pub fn stands(&self) -> bool {
        !self.watch.is_empty() || self.schedule.is_some()
    }

    /// The schedule's zone (checked when the workflow was parsed).
    pub fn zone(&self) -> crate::spec::schedule::Zone {
        crate::spec::schedule::Zone::parse(&self.timezone)
            .unwrap_or(crate::spec::schedule::Zone::Utc)
    }
}

impl Trigger {
    /// The globs as one matcher over paths relative to the workstream; `*` stays within one
    /// folder, `**` crosses folders.
    pub fn matcher(&self) -> globset::GlobSet {
        let mut set = globset::GlobSetBuilder::new();
        for glob in &self.watch {
            // checked when the workflow was parsed
            if let Ok(g) = globset::GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
            {
                set.add(g);
            }
        }
        set.build().unwrap_or_else(|_| globset::GlobSet::empty())
    }
}

/// One checked step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanStep {
    /// Its id.
    pub id: String,
    /// What runs it.
    pub target: Target,
    /// Indices (into [`Plan::steps`]) of the steps it needs.
    pub needs: Vec<usize>,
    /// Its input, references not yet filled.
    pub with: serde_json::Value,
    /// Higher runs first among ready steps.
    pub priority: i64,
    /// Extra attempts after the first; `None` takes the tool's.
    pub retries: Option<u32>,
    /// Delays between attempts; `None` takes the tool's.
    pub retry: Option<RetryPolicy>,
    /// Wall-clock limit per attempt.
    pub timeout: Option<Duration>,
}

/// How a step names what runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A tool by name.
    Tool(String),
    /// Any tool with this capability.
    Capability(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tool(t) => write!(f, "tool `{t}`"),
            Target::Capability(c) => write!(f, "capability `{c}`"),
        }
    }
}

/// Steps one workflow may have. Every step is a row per attempt and events in the state and a
/// line in `uet show`: 100,000 steps make a run of about 200 MiB of state and 200 MiB of memory
/// to plan, while a million took gigabytes of both. A larger job is several workflows.
pub const MAX_STEPS: usize = 100_000;

/// Reads and checks a workflow file against the operator's tools.
pub fn load(path: &Path, tools: &Tools) -> Result<Plan, Problems> {
    load_with(path, tools, &Sets::default())
}

/// [`load`], with values for its parameters.
pub fn load_with(path: &Path, tools: &Tools, sets: &Sets) -> Result<Plan, Problems> {
    let bytes = crate::spec::doc::read_file(path, crate::spec::doc::MAX_FILE, "a workflow")?;
    parse_with(path, &bytes, tools, sets)
}

/// Checks a workflow's text. With [`Tools::empty`], tool and capability names are not checked.
pub fn parse(path: &Path, bytes: &[u8], tools: &Tools) -> Result<Plan, Problems> {
    parse_with(path, bytes, tools, &Sets::default())
}

/// [`parse`], with values for its parameters.
pub fn parse_with(path: &Path, bytes: &[u8], tools: &Tools, sets: &Sets) -> Result<Plan, Problems> {
    let text = crate::spec::doc::decode_text(path, bytes)?;
    let mut src = Source::new(path, text);
    let plan = src
        .parse()
        .and_then(|root| read_plan(&mut src, &root, tools, sets));
    match plan {
        Some(plan) if !src.has_problems() => Ok(plan),
        _ => Err(src.into_problems()),
    }
}

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "project",
    "phase",
    "workstream",
    "max_parallel",
    "timeout",
    "defaults",
    "trigger",
    "params",
    "notify",
    "steps",
];

const STEP_KEYS: &[&str] = &[
    "id",
    "name",
    "description",
    "tool",
    "capability",
    "needs",
    "with",
    "priority",
    "retries",
    "retry",
    "timeout",
];

/// A step as written, with the places needed for later checks.
struct Written<'n> {
    id: String,
    id_span: Range<usize>,
    /// Where `tool` or `capability` is written (the step's table when neither is).
    target_span: Range<usize>,
    node: &'n Node,
    needs: Vec<(String, Range<usize>)>,
    with_node: Option<&'n Node>,
    step: PlanStep,
}

fn read_plan(src: &mut Source<'_>, root: &Node, tools: &Tools, sets: &Sets) -> Option<Plan> {
    let mut top = Fields::new(src, root, "workflow")?;
    let name = top.string(src, "name");
    if name.is_none() && top.node("name").is_none() {
        src.error_at(0, "workflow: missing `name`");
    }
    let mut meta = Vec::new();
    for key in ["description", "project", "phase", "workstream"] {
        if let Some((v, _)) = top.string(src, key) {
            meta.push((key.to_string(), v));
        }
    }
    let max_parallel = top
        .integer(src, "max_parallel", 1, 100_000)
        .map(|n| n as usize)
        .unwrap_or(DEFAULT_MAX_PARALLEL);
    let timeout = top.duration(src, "timeout");

    let mut default_retries = None;
    let mut default_timeout = None;
    let mut default_retry = None;
    if let Some(mut d) = top.table(src, "defaults") {
        default_retries = d.integer(src, "retries", 0, 100).map(|n| n as u32);
        default_timeout = d.duration(src, "timeout");
        default_retry = d.table(src, "retry").map(|f| read_retry_policy(src, f));
        d.finish(src, &["retries", "timeout", "retry"]);
    }

    let trigger = top
        .table(src, "trigger")
        .map(|t| read_trigger(src, t, root));
    let params = read_params(src, top.node("params"), sets);
    let notify = top.table(src, "notify").map(|n| read_notify(src, n, root));
    let notify_tool = top
        .node("notify")
        .and_then(|n| match &n.value {
            Value::Table(entries) => entries.iter().find(|e| e.key == "tool"),
            _ => None,
        })
        .map(|e| e.node.span.clone());
    let mut written = read_steps(src, top.node("steps"));
    top.finish(src, TOP_KEYS);

    for w in &mut written {
        w.step.retries = w.step.retries.or(default_retries);
        w.step.timeout = w.step.timeout.or(default_timeout);
        w.step.retry = w.step.retry.or(default_retry);
    }
    link_steps(src, &mut written);
    check_cycles(src, &written);
    check_references(src, &written);
    check_params(src, &written, &params);
    if !tools.path.as_os_str().is_empty() {
        check_tools(src, &written, tools);
        if let (Some(name), Some(span)) = (
            notify.as_ref().and_then(|n| n.tool.as_deref()),
            &notify_tool,
        ) {
            match tools.by_name(name).map(|t| &t.kind) {
                Some(ToolKind::Command { .. }) => {}
                Some(ToolKind::Wasm { .. }) => src.error(
                    span,
                    format!("notify.tool: `{name}` is a plugin: notifying takes a command tool"),
                ),
                None => src.error(
                    span,
                    format!(
                        "notify.tool: unknown tool `{name}` (tools in {})",
                        tools.path.display()
                    ),
                ),
            }
        }
    }

    Some(Plan {
        name: name.map(|(n, _)| n).unwrap_or_default(),
        meta,
        max_parallel,
        timeout,
        trigger,
        params,
        notify,
        steps: written.into_iter().map(|w| w.step).collect(),
    })
}

/// `[notify]`: when (`on`), and whom: a `webhook` (plain `http://`: put a relay in front of
/// an HTTPS endpoint) and/or a command `tool`.
fn read_notify(src: &mut Source<'_>, mut n: Fields<'_>, root: &Node) -> Notify {
    let on = match n.strings(src, "on") {
        Some(states) => states
            .into_iter()
            .filter_map(|(state, span)| {
                if NOTIFY_ON.contains(&state.as_str()) {
                    Some(state)
                } else {
                    src.error(
                        &span,
                        format!(
                            "notify.on: `{state}` is not a run's end (write {})",
                            NOTIFY_ON.join(", ")
                        ),
                    );
                    None
                }
            })
            .collect(),
        None => vec!["failed".to_string(), "quarantined".to_string()],
    };
    let webhook = n
        .string(src, "webhook")
        .and_then(|(url, span)| match webhook_parts(&url) {
            Ok(_) => Some(url),
            Err(why) => {
                src.error(&span, format!("notify.webhook: {why}"));
                None
            }
        });
    let tool = n.string(src, "tool").map(|(t, _)| t);
    if webhook.is_none() && tool.is_none() && n.node("webhook").is_none() {
        src.error(
            &root.span,
            "notify: say whom: `webhook = \"http://...\"` and/or `tool = \"NAME\"`",
        );
    }
    let retries = n.integer(src, "retries", 0, 20).unwrap_or(3) as u32;
    let backoff = n.duration(src, "backoff").unwrap_or(Duration::from_secs(1));
    n.finish(src, &["on", "webhook", "tool", "retries", "backoff"]);
    Notify {
        on,
        webhook,
        tool,
        retries,
        backoff,
    }
}

/// A webhook address taken apart: host, port, and path with its query.
pub fn webhook_parts(url: &str) -> Result<(String, u16, String), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "{url:?}: only plain `http://` addresses (a local relay can forward to HTTPS)"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(format!("{url:?}: no user or password in the address"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port `{p}`"))?;
            (h, port)
        }
        _ => (authority, 80),
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':');
    if host.is_empty() || !host.chars().all(plain) {
        return Err(format!("{url:?}: bad host `{host}`"));
    }
    if path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("{url:?}: spaces or control characters in the path"));
    }
    Ok((host.to_string(), port, path.to_string()))
}

/// `[params]`: each parameter's default, then the values given with `--set`, each taking its
/// default's type (a number's value must be a number, and so on).
fn read_params(src: &mut Source<'_>, node: Option<&Node>, sets: &Sets) -> template::Params {
    let mut params = template::Params::new();
    let at = node.map(|n| n.span.clone()).unwrap_or(0..0);
    match node.map(|n| &n.value) {
        None => {}
        Some(Value::Table(entries)) => {
            for e in entries {
                if !template::is_param_name(&e.key) {
                    src.error(
                        &e.key_span,
                        format!(
                            "params: `{}` is not a parameter name (letters, digits, `_` and `-`)",
                            e.key
                        ),
                    );
                } else if matches!(e.node.value, Value::Null | Value::Datetime(_)) {
                    src.error(
                        &e.node.span,
                        format!(
                            "params: `{}` must default to a string, number, boolean, array or table, found {}",
                            e.key,
                            e.node.value.kind()
                        ),
                    );
                } else {
                    params.insert(e.key.clone(), e.node.to_json());
                }
            }
        }
        Some(other) => src.error(
            &at,
            format!("`params` must be a table, found {}", other.kind()),
        ),
    }
    for (name, text) in &sets.0 {
        let Some(default) = params.get(name) else {
            let declared = if params.is_empty() {
                "it declares none".to_string()
            } else {
                let names: Vec<&str> = params.keys().map(String::as_str).collect();
                format!("it declares {}", names.join(", "))
            };
            src.error(
                &at,
                format!("--set {name}: the workflow has no parameter `{name}` ({declared} under [params])"),
            );
            continue;
        };
        let value = match default {
            serde_json::Value::String(_) => Ok(serde_json::Value::String(text.clone())),
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => text
                .trim()
                .parse::<i64>()
                .map(serde_json::Value::from)
                .map_err(|_| "an integer"),
            serde_json::Value::Number(_) => text
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(serde_json::Value::Number)
                .ok_or("a number"),
            serde_json::Value::Bool(_) => match text.trim() {
                "true" => Ok(true.into()),
                "false" => Ok(false.into()),
                _ => Err("true or false"),
            },
            other => serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .filter(|v| std::mem::discriminant(v) == std::mem::discriminant(other))
                .ok_or(if other.is_array() {
                    "a JSON array"
                } else {
                    "a JSON object"
                }),
        };
        match value {
            Ok(v) => {
                params.insert(name.clone(), v);
            }
            Err(wanted) => src.error(
                &at,
                format!(
                    "--set {name}={text}: parameter `{name}` takes {wanted} (its default is {default})"
                ),
            ),
        }
    }
    params
}

/// Every `${params.NAME}` must name a parameter of `[params]`; reported at the string that
/// names it.
fn check_params(src: &mut Source<'_>, written: &[Written<'_>], params: &template::Params) {
    for w in written {
        for name in template::params_named(&w.step.with) {
            if params.contains_key(&name) {
                continue;
            }
            let needle = format!("params.{name}");
            let at = w
                .with_node
                .and_then(|n| string_with(n, &needle))
                .or(w.with_node)
                .unwrap_or(w.node);
            src.error(
                &at.span,
                format!(
                    "step `{}`: `${{params.{name}}}` names no parameter: declare it under [params] with a default",
                    w.id
                ),
            );
        }
    }
}

/// The first string under `node` that holds `needle`.
fn string_with<'n>(node: &'n Node, needle: &str) -> Option<&'n Node> {
    match &node.value {
        Value::String(s) if s.contains(needle) => Some(node),
        Value::Table(entries) => entries.iter().find_map(|e| string_with(&e.node, needle)),
        Value::Array(items) => items.iter().find_map(|i| string_with(i, needle)),
        _ => None,
    }
}

/// `[trigger]`: the globs whose changes run the workflow again, and the quiet time before.
fn read_trigger(src: &mut Source<'_>, mut t: Fields<'_>, root: &Node) -> Trigger {
    let watch: Vec<String> = t
        .strings(src, "watch")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(glob, span)| {
            match globset::GlobBuilder::new(&glob)
                .literal_separator(true)
                .build()
            {
                Ok(_) => Some(glob),
                Err(e) => {
                    src.error(&span, format!("trigger.watch: bad glob {glob:?}: {e}"));
                    None
                }
            }
        })
        .collect();
    let schedule = t.string(src, "schedule");
    if let Some((pattern, span)) = &schedule
        && let Err(why) = crate::spec::schedule::check(pattern)
    {
        src.error(span, format!("trigger.schedule: {why}"));
    }
    if watch.is_empty() && t.node("watch").is_none() && schedule.is_none() {
        src.error(
            &root.span,
            "trigger: missing `watch = [\"glob\", ...]` or `schedule = \"CRON\"`",
        );
    }
    let debounce = t.duration(src, "debounce").unwrap_or(DEFAULT_DEBOUNCE);
    let timezone = match t.string(src, "timezone") {
        Some((zone, span)) => {
            if let Err(why) = crate::spec::schedule::Zone::parse(&zone) {
                src.error(&span, format!("trigger.timezone: {why}"));
            }
            zone
        }
        None => utc(),
    };
    let catch_up = match t.string(src, "catch_up") {
        None => CatchUp::None,
        Some((word, _)) if word == "none" => CatchUp::None,
        Some((word, _)) if word == "one" => CatchUp::One,
        Some((word, span)) => {
            src.error(
                &span,
                format!("trigger.catch_up: {word:?}: write \"none\" or \"one\""),
            );
            CatchUp::None
        }
    };
    t.finish(
        src,
        &["watch", "debounce", "schedule", "timezone", "catch_up"],
    );
    Trigger {
        watch,
        debounce,
        schedule: schedule.map(|(s, _)| s),
        timezone,
        catch_up,
    }
}

/// `[[steps]]`: at least one, at most [`MAX_STEPS`].
fn read_steps<'n>(src: &mut Source<'_>, steps: Option<&'n Node>) -> Vec<Written<'n>> {
    let mut written = Vec::new();
    let Some(node) = steps else {
        src.error_at(0, "workflow: no steps (add [[steps]] tables)");
        return written;
    };
    match &node.value {
        Value::Array(items) if items.is_empty() => {
            src.error(&node.span, "workflow: `steps` is empty")
        }
        Value::Array(items) if items.len() > MAX_STEPS => src.error(
            &node.span,
            format!(
                "workflow: {} steps, over the limit of {MAX_STEPS} steps per workflow \
                 (split it into workflows of fewer steps)",
                items.len()
            ),
        ),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(w) = read_step(src, item, i) {
                    written.push(w);
                }
            }
        }
        other => src.error(
            &node.span,
            format!(
                "`steps` must be a list of [[steps]] tables, found {}",
                other.kind()
            ),
        ),
    }
    written
}

fn read_step<'n>(src: &mut Source<'_>, node: &'n Node, index: usize) -> Option<Written<'n>> {
    let mut f = Fields::new(src, node, crate::spec::doc::label_of(node, "step", index))?;
    let (id, id_span) = match f.string(src, "id") {
        Some((id, span)) => {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                src.error(
                    &span,
                    format!("step id {id:?} may use only letters, digits, `_` and `-`"),
                );
            }
            (id, span)
        }
        None => {
            if f.node("id").is_none() {
                src.error(&node.span, format!("steps[{index}]: missing `id`"));
            }
            (String::new(), node.span.clone())
        }
    };
    let label = if id.is_empty() {
        format!("steps[{index}]")
    } else {
        format!("step `{id}`")
    };
    if let Some(cmd) = f.node("command") {
        src.error(
            &cmd.span,
            format!("{label}: a step cannot carry its own `command`: name a `tool` (or a `capability`) that the operator registered in tools.toml"),
        );
    }
    f.ignore("name");
    f.ignore("description");
    let (target, target_span) = read_target(src, &mut f, node, &label);
    let needs = f.strings(src, "needs").unwrap_or_default();
    let with_node = f.node("with");
    let with = read_with(src, with_node, &label);
    let priority = f
        .integer(src, "priority", -1_000_000, 1_000_000)
        .unwrap_or(0);
    let retries = f.integer(src, "retries", 0, 100).map(|n| n as u32);
    let retry = f.table(src, "retry").map(|r| read_retry_policy(src, r));
    let timeout = f.duration(src, "timeout");
    f.finish(src, STEP_KEYS);
    Some(Written {
        id: id.clone(),
        id_span,
        target_span,
        node,
        needs,
        with_node,
        step: PlanStep {
            id,
            target,
            needs: Vec::new(),
            with,
            priority,
            retries,
            retry,
            timeout,
        },
    })
}

/// What runs a step: `tool = "..."` or `capability = "..."`, one and only one; and where it is
/// written.
fn read_target(
    src: &mut Source<'_>,
    f: &mut Fields<'_>,
    node: &Node,
    label: &str,
) -> (Target, std::ops::Range<usize>) {
    let tool = f.string(src, "tool");
    let capability = f.string(src, "capability");
    match (tool, capability) {
        (Some((t, span)), None) => (Target::Tool(t), span),
        (None, Some((c, span))) => (Target::Capability(c), span),
        (Some(_), Some(_)) => {
            src.error(
                &node.span,
                format!("{label}: give `tool` or `capability`, not both"),
            );
            (Target::Tool(String::new()), node.span.clone())
        }
        (None, None) => {
            if f.node("tool").is_none() && f.node("capability").is_none() {
                src.error(
                    &node.span,
                    format!("{label}: needs `tool = \"...\"` or `capability = \"...\"`"),
                );
            }
            (Target::Tool(String::new()), node.span.clone())
        }
    }
}

/// A step's `with`: a table, read as JSON (a key written twice, as JSON allows, is reported).
fn read_with(src: &mut Source<'_>, with: Option<&Node>, label: &str) -> serde_json::Value {
    match with {
        Some(n) if matches!(n.value, Value::Table(_)) => {
            let _ = Fields::nested_in(src, n, label, "with");
            n.to_json()
        }
        Some(n) => {
            src.error(
                &n.span,
                format!("{label}: `with` must be a table, found {}", n.value.kind()),
            );
            serde_json::Value::Object(Default::default())
        }
        None => serde_json::Value::Object(Default::default()),
    }
}

/// Duplicate ids and unknown `needs`; fills [`PlanStep::needs`] with indices.
fn link_steps(src: &mut Source<'_>, written: &mut [Written<'_>]) {
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, w) in written.iter().enumerate() {
        if w.id.is_empty() {
            continue;
        }
        if let Some(&first) = index.get(&w.id) {
            let (line, _) = src.position(written[first].id_span.start);
            src.error(
                &w.id_span,
                format!(
                    "duplicate step id `{}` (first defined on line {line})",
                    w.id
                ),
            );
        } else {
            index.insert(w.id.clone(), i);
        }
    }
    for w in written.iter_mut() {
        let mut needs = Vec::new();
        for (need, span) in &w.needs {
            match index.get(need) {
                Some(_) if need == &w.id => {
                    src.error(span, format!("step `{}` needs itself", w.id));
                }
                Some(&j) => {
                    if !needs.contains(&j) {
                        needs.push(j);
                    }
                }
                None => src.error(
                    span,
                    format!(
                        "step `{}` needs `{need}`, which is not a step of this workflow",
                        w.id
                    ),
                ),
            }
        }
        w.step.needs = needs;
    }
}

/// Names the steps of every cycle in `needs`.
fn check_cycles(src: &mut Source<'_>, written: &[Written<'_>]) {
    // iterative three-colour DFS: recursion would overflow on a long chain
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; written.len()];
    for start in 0..written.len() {
        if mark[start] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let needs = &written[node].step.needs;
            if *next < needs.len() {
                let dep = needs[*next];
                *next += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::Open;
                        stack.push((dep, 0));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        // read as "needs": a → b → a means a needs b, which needs a
                        let mut names: Vec<&str> = stack[from..]
                            .iter()
                            .map(|&(n, _)| written[n].id.as_str())
                            .collect();
                        names.push(&written[dep].id);
                        // report once, at the step of the cycle written first
                        let first = stack[from..].iter().map(|&(n, _)| n).min().unwrap_or(dep);
                        let at = written[first]
                            .needs
                            .first()
                            .map(|(_, s)| s.start)
                            .unwrap_or(written[first].id_span.start);
                        src.error_at(at, format!("cycle in `needs`: {}", names.join(" → ")));
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
}

/// `${steps.X.output...}` must name a step upstream of the one that uses it.
fn check_references(src: &mut Source<'_>, written: &[Written<'_>]) {
    let index: HashMap<&str, usize> = written
        .iter()
        .enumerate()
        .map(|(i, w)| (w.id.as_str(), i))
        .collect();
    for (i, w) in written.iter().enumerate() {
        let span = w
            .with_node
            .map(|n| n.span.clone())
            .unwrap_or(w.node.span.clone());
        let (refs, errors) = template::references(&w.step.with);
        for e in errors {
            src.error(&span, format!("step `{}`: {}", w.id, e.0));
        }
        for r in refs {
            match index.get(r.step.as_str()) {
                None => src.error(
                    &span,
                    format!("step `{}`: {r} names no step of this workflow", w.id),
                ),
                Some(&j) if !is_upstream(written, i, j) => src.error(
                    &span,
                    format!(
                        "step `{}`: {r} reads step `{}`, which is not upstream: add it to `needs`",
                        w.id, r.step
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

fn is_upstream(written: &[Written<'_>], step: usize, candidate: usize) -> bool {
    let mut seen = vec![false; written.len()];
    let mut todo = written[step].step.needs.clone();
    while let Some(n) = todo.pop() {
        if n == candidate {
            return true;
        }
        if !std::mem::replace(&mut seen[n], true) {
            todo.extend(&written[n].step.needs);
        }
    }
    false
}

fn check_tools(src: &mut Source<'_>, written: &[Written<'_>], tools: &Tools) {
    for w in written {
        let span = &w.target_span;
        match &w.step.target {
            Target::Tool(name) if name.is_empty() => {}
            Target::Tool(name) => match tools.by_name(name) {
                None => {
                    let known: Vec<&str> = tools.tools.iter().map(|t| t.name.as_str()).collect();
                    src.error(
                        span,
                        format!(
                            "step `{}`: unknown tool `{name}` (tools in {}: {})",
                            w.id,
                            tools.path.display(),
                            known.join(", ")
                        ),
                    );
                }
                Some(tool) => {
                    if let ToolKind::Command { argv } = &tool.kind {
                        let refs_free = w.step.with.as_object();
                        for key in argv.iter().flat_map(|t| t.keys()) {
                            if refs_free.is_none_or(|m| !m.contains_key(key)) {
                                src.error(
                                    span,
                                    format!(
                                        "step `{}`: tool `{name}` needs `{key}` in `with`",
                                        w.id
                                    ),
                                );
                            }
                        }
                        // a value written in the workflow is known now; one filled from an
                        // upstream output is checked when the step runs
                        for key in argv.iter().filter_map(|t| t.leading_key()) {
                            // filled as the command will be: a string as it is, a number as JSON
                            let filled = refs_free.and_then(|m| m.get(key)).map(|v| match v {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            });
                            if let Some(v) = &filled
                                && v.starts_with('-')
                                && !tool.allow_options
                            {
                                src.error(
                                    span,
                                    format!(
                                        "step `{}`: {}",
                                        w.id,
                                        crate::spec::template::option_refusal(key, v)
                                    ),
                                );
                            }
                        }
                    }
                }
            },
            Target::Capability(cap) => {
                if tools.with_capability(cap).next().is_none() {
                    src.error(
                        span,
                        format!(
                            "step `{}`: no tool in {} has capability `{cap}`",
                            w.id,
                            tools.path.display()
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tools() -> Tools {
        Tools::parse(
            Path::new("/ops/tools.toml"),
            br#"
[[tools]]
name = "echo"
command = ["cat"]
capabilities = ["text.echo"]

[[tools]]
name = "lint"
command = ["lint", "{path}"]
"#,
        )
        .unwrap()
    }

    fn check(text: &str) -> Result<Plan, String> {
        parse(&PathBuf::from("w.toml"), text.as_bytes(), &tools()).map_err(|p| p.to_string())
    }

    #[test]
    fn a_diamond_plans() {
        let plan = check(
            r#"
name = "d"
max_parallel = 2
timeout = "1m"
[defaults]
retries = 1
[[steps]]
id = "a"
tool = "echo"
[[steps]]
id = "b"
capability = "text.echo"
needs = ["a"]
with = { x = "${steps.a.output.n}" }
[[steps]]
id = "c"
tool = "echo"
needs = ["a"]
retries = 3
[[steps]]
id = "d"
tool = "echo"
needs = ["b", "c"]
with = { all = "${steps.a.output}" }
"#,
        )
        .unwrap();
        assert_eq!(plan.steps.len(), 4);
        assert_eq!(plan.steps[3].needs, vec![1, 2]);
        assert_eq!(plan.steps[1].retries, Some(1));
        assert_eq!(plan.steps[2].retries, Some(3));
        assert_eq!(plan.timeout, Some(Duration::from_secs(60)));
        assert_eq!(plan.max_parallel, 2);
    }

    #[test]
    fn every_problem_at_once() {
        let err = check(
            r#"name = "bad"
colour = "blue"
timeout = "forever"
[[steps]]
id = "a"
tool = "nope"
command = ["rm", "-rf", "/"]
[[steps]]
id = "a"
capability = "no.such"
[[steps]]
id = "b"
tool = "echo"
needs = ["ghost", "c"]
with = { v = "${steps.c.output.x}" }
[[steps]]
id = "c"
tool = "echo"
needs = ["b"]
[[steps]]
id = "e"
tool = "lint"
"#,
        )
        .unwrap_err();
        for want in [
            "w.toml:2:1: workflow: unknown key `colour`",
            "w.toml:3:11: workflow: `timeout`: bad duration",
            "unknown tool `nope`",
            "w.toml:7:11: step `a`: a step cannot carry its own `command`",
            "w.toml:9:6: duplicate step id `a` (first defined on line 5)",
            "no tool in /ops/tools.toml has capability `no.such`",
            "needs `ghost`, which is not a step",
            "cycle in `needs`: ",
            "tool `lint` needs `path` in `with`",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        assert!(err.contains("cycle in `needs`: b → c → b"), "{err}");
    }

    #[test]
    fn references_must_be_upstream() {
        let err = check(
            r#"name = "r"
[[steps]]
id = "a"
tool = "echo"
[[steps]]
id = "b"
tool = "echo"
with = { v = "${steps.a.output.x}", w = "${steps.zz.output}", q = "${nope}" }
"#,
        )
        .unwrap_err();
        assert!(
            err.contains("reads step `a`, which is not upstream"),
            "{err}"
        );
        assert!(err.contains("bad reference"), "{err}");
    }

    #[test]
    fn json_has_the_same_shape_and_positions() {
        let text = "{\n  \"name\": \"j\",\n  \"steps\": [\n    {\"id\": \"a\", \"tool\": \"echo\", \"bogus\": 1}\n  ]\n}\n";
        let err = parse(&PathBuf::from("w.json"), text.as_bytes(), &tools())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w.json:4:33: step `a`: unknown key `bogus`"),
            "{err}"
        );
        let ok = "{\"name\": \"j\", \"steps\": [{\"id\": \"a\", \"tool\": \"echo\", \"with\": {\"k\": [1, 2]}}]}";
        let plan = parse(&PathBuf::from("w.json"), ok.as_bytes(), &tools()).unwrap();
        assert_eq!(plan.steps[0].with["k"][1], 2);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let err = parse(&PathBuf::from("g.toml"), &garbage, &tools()).unwrap_err();
        assert!(!err.list.is_empty());
        for text in [
            "",
            "[[steps]]",
            "steps = 3",
            "name = 1\nsteps = [1, \"x\"]",
            "= = =",
        ] {
            assert!(check(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_long_chain_does_not_overflow() {
        let mut text = String::from("name = \"chain\"\n");
        for i in 0..20_000 {
            text.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"echo\"\n"));
            if i > 0 {
                text.push_str(&format!("needs = [\"s{}\"]\n", i - 1));
            }
        }
        assert_eq!(check(&text).unwrap().steps.len(), 20_000);
    }
}

//! The facade's answers as typed records: the same structs on both ends of the socket, in the
//! CLI's reads of the state, and in every face to come. Their JSON is what `--json` prints.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{
    AttemptRecord, EventRecord, Millis, Outcome, Progress, RunId, RunRecord, RunState, StepRecord,
    StepState,
};

/// The daemon in brief.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's uet version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// Its state folder.
    pub state: PathBuf,
    /// The folders it watches.
    pub watching: Vec<PathBuf>,
    /// Runs by state: `pending`, `running`, `succeeded`, ...
    pub runs: BTreeMap<String, u64>,
    /// Runs whose steps are being driven now.
    pub active: u64,
    /// Where the daemon serves `GET /metrics`, when it was asked to.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Where the web dashboard is served, if it is (`uet web` gives a login address).
    #[serde(default)]
    pub web: Option<String>,
    /// The fleet this daemon is part of, if any.
    #[serde(default)]
    pub fleet: Option<FleetShown>,
    /// The standing workflows it keeps: what runs them again, and when next.
    #[serde(default)]
    pub standing: Vec<StandingShown>,
    /// The latest files its watched folders refused, newest first (at most 10).
    #[serde(default)]
    pub rejected: Vec<RejectedShown>,
}

/// A dropped file the daemon refused: its report lies in the folder's `rejected/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedShown {
    /// The file's name, as kept in `rejected/`.
    pub name: String,
    /// The watched folder it was dropped into.
    pub folder: PathBuf,
    /// When it was refused (the report's time, ms since the epoch).
    pub at: Millis,
    /// The report's first problem.
    pub reason: String,
    /// The whole report.
    pub report: PathBuf,
}

/// A standing workflow, as `uet status` and `uet top` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandingShown {
    /// The workflow's name (`uet unwatch NAME` withdraws it).
    pub name: String,
    /// Its workstream.
    pub workstream: PathBuf,
    /// The file it came from.
    pub source: PathBuf,
    /// Globs whose changes run it again.
    pub watch: Vec<String>,
    /// Its cron schedule, if it has one.
    pub schedule: Option<String>,
    /// The zone the schedule is read in.
    pub timezone: Option<String>,
    /// When the schedule next runs it (ms since the epoch).
    pub next_at: Option<Millis>,
    /// Its run in progress.
    pub running: Option<RunId>,
}

impl StandingShown {
    /// A standing workflow in one line: its name and folder, what runs it again, its run going.
    pub fn line(&self) -> String {
        let s = self;
        let mut when = Vec::new();
        if !s.watch.is_empty() {
            when.push(format!("on changes to {}", s.watch.join(", ")));
        }
        if let Some(schedule) = &s.schedule {
            let next = s
                .next_at
                .map(|at| {
                    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at);
                    format!(", next {}", humantime::format_rfc3339_seconds(at))
                })
                .unwrap_or_default();
            when.push(format!(
                "at `{schedule}` ({}{next})",
                s.timezone.as_deref().unwrap_or("UTC")
            ));
        }
        let running = s
            .running
            .map(|r| format!("; run {r} going"))
            .unwrap_or_default();
        format!(
            "{} in {}: {}{running}",
            s.name,
            s.workstream.display(),
            when.join(" and ")
        )
    }
}

/// A run in a list (`uet runs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Its identifier.
    pub run_id: RunId,
    /// The workflow's name.
    pub name: String,
    /// Where it is in its lifecycle.
    pub state: RunState,
    /// Why, when that needs saying.
    pub reason: Option<String>,
    /// What started it.
    pub trigger: Option<String>,
    /// The workflow file it came from.
    pub source: String,
    /// When it was recorded.
    pub created_at: Millis,
    /// When it started running.
    pub started_at: Option<Millis>,
    /// When it ended.
    pub finished_at: Option<Millis>,
}

impl From<&RunRecord> for RunSummary {
    fn from(r: &RunRecord) -> RunSummary {
        RunSummary {
            run_id: r.id,
            name: r.name.clone(),
            state: r.state,
            reason: r.reason.clone(),
            trigger: r.trigger.clone(),
            source: r.source.clone(),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

/// A run with its steps (`uet show`, `uet run --json`): all of them, or a page of a large run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunShown {
    /// Its identifier.
    pub run_id: RunId,
    /// The workflow's name.
    pub name: String,
    /// Where it is in its lifecycle.
    pub state: RunState,
    /// Why, when that needs saying.
    pub reason: Option<String>,
    /// The workflow file it came from.
    pub source: String,
    /// The folder its steps run in.
    pub workstream: String,
    /// What started it.
    pub trigger: Option<String>,
    /// When it was recorded.
    pub created_at: Millis,
    /// When it started running.
    pub started_at: Option<Millis>,
    /// When it ended.
    pub finished_at: Option<Millis>,
    /// How long it ran, once it has ended.
    pub duration_ms: Option<u64>,
    /// How far it is, with an ETA from history (the first page's).
    pub progress: Option<Progress>,
    /// Its steps in workflow order (or this page of them).
    pub steps: Vec<StepShown>,
    /// Where the next page of steps starts, when one follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_next: Option<usize>,
}

impl RunShown {
    /// A run and the given steps of it.
    pub fn new(run: &RunRecord, steps: &[StepRecord], progress: Option<Progress>) -> RunShown {
        RunShown {
            run_id: run.id,
            name: run.name.clone(),
            state: run.state,
            reason: run.reason.clone(),
            source: run.source.clone(),
            workstream: run.workstream.clone(),
            trigger: run.trigger.clone(),
            created_at: run.created_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
            duration_ms: duration_ms(run.started_at, run.finished_at),
            progress,
            steps: steps.iter().map(StepShown::from).collect(),
            steps_next: None,
        }
    }
}

/// A step of a run shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepShown {
    /// Its id in the workflow.
    pub id: String,
    /// Where it is in its lifecycle.
    pub state: StepState,
    /// Attempts started.
    pub attempts: u32,
    /// The output of its successful attempt.
    pub output: Option<serde_json::Value>,
    /// The tool of its latest attempt.
    pub tool: Option<String>,
    /// Why it failed, was skipped or canceled.
    pub reason: Option<String>,
    /// When its first attempt started.
    pub started_at: Option<Millis>,
    /// When it ended.
    pub finished_at: Option<Millis>,
    /// How long from its first start to its end.
    pub duration_ms: Option<u64>,
    /// Each attempt in brief, first first (`uet show --json`, `uet run --json`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_summaries: Vec<AttemptSummary>,
}

/// One attempt in brief: what ran it, when, how it ended and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptSummary {
    /// 1 for the first try.
    pub number: u32,
    /// The tool that ran it.
    pub tool: String,
    /// When it started.
    pub started_at: Millis,
    /// When it ended; `None` while in flight.
    pub finished_at: Option<Millis>,
    /// How long it ran.
    pub duration_ms: Option<u64>,
    /// How it ended; `None` while in flight.
    pub outcome: Option<Outcome>,
    /// What went wrong, in words.
    pub error: Option<String>,
    /// When the next attempt was due, if one was to be made.
    pub retry_at: Option<Millis>,
}

impl From<&AttemptRecord> for AttemptSummary {
    fn from(a: &AttemptRecord) -> AttemptSummary {
        AttemptSummary {
            number: a.number,
            tool: a.tool.clone(),
            started_at: a.started_at,
            finished_at: a.finished_at,
            duration_ms: duration_ms(Some(a.started_at), a.finished_at),
            outcome: a.outcome,
            error: a.error.clone(),
            retry_at: a.retry_at,
        }
    }
}

impl From<&StepRecord> for StepShown {
    fn from(s: &StepRecord) -> StepShown {
        StepShown {
            id: s.id.clone(),
            state: s.state,
            attempts: s.attempts,
            output: s.output.clone(),
            tool: s.tool.clone(),
            reason: s.reason.clone(),
            started_at: s.started_at,
            finished_at: s.finished_at,
            duration_ms: duration_ms(s.started_at, s.finished_at),
            attempt_summaries: Vec::new(),
        }
    }
}

/// An event of a run's log (`uet events`), or a dropped file the daemon refused
/// (`drop.rejected`, in the stream of every run's events: it has no run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventShown {
    /// The run; none for a refused drop.
    pub run_id: Option<RunId>,
    /// Its place in the run's log, from 1; 0 for a refused drop, which is in no run's log.
    pub seq: u64,
    /// When it happened.
    pub at: Millis,
    /// The step it concerns, if any.
    pub step: Option<String>,
    /// What happened: `run.running`, `step.succeeded`, ...
    pub kind: String,
    /// In words.
    pub detail: String,
    /// Its link in the run's hash chain.
    pub hash: String,
}

impl EventShown {
    /// An event of `run`.
    pub fn new(run: RunId, e: &EventRecord) -> EventShown {
        EventShown {
            run_id: Some(run),
            seq: e.seq,
            at: e.at,
            step: e.step.clone(),
            kind: e.kind.clone(),
            detail: e.detail.clone(),
            hash: e.hash.clone(),
        }
    }

    /// A refused drop, as an event: the report holds the rest, and no hash chain covers it
    /// (the report in `rejected/` is the record).
    pub fn rejected(r: &RejectedShown) -> EventShown {
        EventShown {
            run_id: None,
            seq: 0,
            at: r.at,
            step: None,
            kind: "drop.rejected".into(),
            detail: format!(
                "{} in {}: {} (report: {})",
                r.name,
                r.folder.display(),
                r.reason,
                r.report.display()
            ),
            hash: String::new(),
        }
    }
}

/// A tool (`uet tools`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolShown {
    /// Its name.
    pub name: String,
    /// `command` or `wasm`.
    pub kind: String,
    /// What it can do.
    pub capabilities: Vec<String>,
    /// Its command line or component file.
    pub source: String,
    /// A plugin's version, as it says.
    pub version: Option<String>,
    /// A plugin's input schema (JSON Schema), as it describes itself; `uet validate` checks
    /// steps' `with` against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// The tools file it is defined in.
    pub tools_file: PathBuf,
    /// Its circuit breaker, when it has one.
    #[serde(default)]
    pub breaker: Option<BreakerShown>,
}

/// A tool's circuit breaker as it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerShown {
    /// `closed`, `open` or `half-open`.
    pub state: String,
    /// Failures in a row.
    pub failures: u32,
    /// Failures in a row that open it.
    pub opens_after: u32,
    /// How long it stays open.
    pub cool_down_ms: u64,
    /// When it last opened.
    pub opened_at: Option<Millis>,
    /// When an open breaker lets its probe through.
    pub probe_at: Option<Millis>,
    /// How long until then.
    pub probe_in_ms: Option<u64>,
}

impl BreakerShown {
    /// The breaker's cell in a table: `open (3 failures; probe in 20s)`.
    pub fn cell(breaker: Option<&BreakerShown>) -> String {
        let Some(b) = breaker else {
            return "-".into();
        };
        let mut out = b.state.clone();
        if let Some(ms) = b.probe_in_ms {
            let wait = std::time::Duration::from_secs(ms.div_ceil(1000));
            out.push_str(&format!(
                " ({} failures; probe in {})",
                b.failures,
                humantime::format_duration(wait)
            ));
        } else if b.failures > 0 {
            out.push_str(&format!(" ({} failures)", b.failures));
        }
        out
    }
}

/// What `uet top` draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopView {
    /// The daemon in brief; `None` when the state was read without one.
    pub status: Option<Status>,
    /// Runs not yet ended.
    pub runs: Vec<TopRun>,
    /// How many of them wait to start.
    pub queued: usize,
    /// The tools, with their breakers.
    pub tools: Vec<ToolShown>,
}

/// A run in flight in [`TopView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopRun {
    /// Its identifier.
    pub run_id: RunId,
    /// The workflow's name.
    pub name: String,
    /// `pending` or `running`.
    pub state: RunState,
    /// What started it.
    pub trigger: Option<String>,
    /// When it started running.
    pub started_at: Option<Millis>,
    /// How far it is.
    pub progress: Option<Progress>,
    /// Its steps running now.
    pub running: Vec<String>,
}

fn duration_ms(start: Option<u64>, end: Option<u64>) -> Option<u64> {
    Some(end?.saturating_sub(start?))
}

/// One step in full, for a step's panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDetail {
    /// The step as it stands, with its output.
    pub step: StepShown,
    /// What runs it: `tool NAME` or `capability NAME`.
    pub target: String,
    /// The steps it needs, by id.
    pub needs: Vec<String>,
    /// Its input, as written in the workflow (templates unexpanded).
    pub with: serde_json::Value,
    /// Every attempt, first first, with what it printed.
    pub attempts: Vec<AttemptRecord>,
    /// The step's own events, in order: its changes of state and its plugin's log lines
    /// (`plugin.log`).
    pub events: Vec<EventShown>,
}

/// One attempt on a run's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptBar {
    /// The step's id.
    pub step: String,
    /// 1 for the first try.
    pub number: u32,
    /// When it started.
    pub started_at: Millis,
    /// When it ended; `None` while it runs.
    pub finished_at: Option<Millis>,
    /// How it ended; `None` while it runs.
    pub outcome: Option<Outcome>,
    /// When the next attempt is due, if one will be.
    pub retry_at: Option<Millis>,
}

/// What `uet status` says of the fleet (docs/FLEET.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetShown {
    /// This node's name.
    pub node: String,
    /// The server it is connected to, and its version.
    pub server: String,
    /// Whether the connection is up now.
    pub connected: bool,
    /// Copies of each stream the fleet keeps (3 on a cluster, 1 on a single server).
    pub replicas: usize,
    /// What the fleet is waiting for, when JetStream does not answer (a server lost, or no
    /// majority of the cluster up): its attempts wait, they are not failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// What one attempt printed and logged (`uet logs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptLog {
    /// The step.
    pub step: String,
    /// The attempt's number, from 1.
    pub attempt: u32,
    /// The tool that ran it.
    pub tool: String,
    /// How it ended; `None` while it runs.
    pub outcome: Option<Outcome>,
    /// What went wrong, in words.
    pub error: Option<String>,
    /// A command's standard output, as kept (bounded).
    pub stdout: String,
    /// A command's (or a plugin's) standard error, as kept (bounded).
    pub stderr: String,
    /// A plugin's log lines, `level: message`.
    pub plugin: Vec<String>,
}

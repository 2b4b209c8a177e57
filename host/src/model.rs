//! The domain types every part of uet shares: run and step lifecycles, attempts and events.
//!
//! State transitions are checked here and nowhere else, so an illegal transition is caught as a
//! bug in one place instead of being silently written to the state.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A run's identifier: a number that grows with every run a state folder records.
pub type RunId = u64;

/// Where a run is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Recorded, not started (or put back by `retry`/`release`).
    Pending,
    /// Its steps are being scheduled.
    Running,
    /// Every step succeeded.
    Succeeded,
    /// A step failed, or the run's deadline passed.
    Failed,
    /// Stopped on request.
    Canceled,
    /// Held for a person; never retried automatically.
    Quarantined,
}

impl RunState {
    /// Every run state, in lifecycle order.
    pub const ALL: [RunState; 6] = [
        RunState::Pending,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Canceled,
        RunState::Quarantined,
    ];

    /// True when nothing more will happen to the run without a person asking.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Pending | RunState::Running)
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Pending, Canceled)
                | (Pending, Quarantined)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Canceled)
                | (Running, Quarantined)
                // recovery after a crash or a graceful shutdown puts a run back in the queue
                | (Running, Pending)
                // `uet retry` and `uet release`
                | (Failed, Pending)
                | (Canceled, Pending)
                | (Quarantined, Pending)
        )
    }

    /// The lowercase name users see.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Canceled => "canceled",
            RunState::Quarantined => "quarantined",
        }
    }
}

/// Where a step is in its lifecycle. A step stays `running` across its attempts and the waits
/// between them; each try has its own [`AttemptRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Waiting for its dependencies or a free slot.
    Pending,
    /// An attempt is in flight, or the next one is due.
    Running,
    /// An attempt succeeded; its output is kept.
    Succeeded,
    /// Its last attempt failed and no attempts are left.
    Failed,
    /// A step it needs did not succeed, so it never ran.
    Skipped,
    /// Stopped by a cancel or the run's deadline.
    Canceled,
}

impl StepState {
    /// True when the step will not change again in this run.
    pub fn is_terminal(self) -> bool {
        !matches!(self, StepState::Pending | StepState::Running)
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: StepState) -> bool {
        use StepState::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Pending, Skipped)
                | (Pending, Canceled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Canceled)
                // recovery re-queues a step that was in flight
                | (Running, Pending)
                // `uet retry` re-runs what did not succeed
                | (Failed, Pending)
                | (Skipped, Pending)
                | (Canceled, Pending)
        )
    }

    /// The lowercase name users see.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Canceled => "canceled",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The tool finished and reported success.
    Succeeded,
    /// The tool finished and reported failure (non-zero exit, typed error).
    Failed,
    /// The attempt ran past its time limit and was killed.
    TimedOut,
    /// The attempt was stopped by a cancel or the run's deadline.
    Canceled,
    /// The tool could not be started at all (missing program, bad input).
    Error,
    /// The daemon stopped while the attempt was in flight; it did not finish.
    Interrupted,
    /// A plugin trapped: a panic, a stack overflow, an illegal operation.
    Trapped,
    /// A plugin hit its memory or fuel limit.
    LimitExceeded,
}

/// Milliseconds since the Unix epoch, the one clock format the state uses.
pub type Millis = u64;

/// Now, in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A run as the state records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Its identifier.
    pub id: RunId,
    /// The workflow's `name`.
    pub name: String,
    /// Where it is in its lifecycle.
    pub state: RunState,
    /// Why it is in that state, when that needs saying (failure, quarantine, cancel).
    pub reason: Option<String>,
    /// The workflow file it came from.
    pub source: String,
    /// The workstream folder its steps run in.
    pub workstream: String,
    /// When it was recorded.
    pub created_at: Millis,
    /// When it first started running.
    pub started_at: Option<Millis>,
    /// When it reached a terminal state.
    pub finished_at: Option<Millis>,
    /// What started it: a drop, a submit, a trigger's change, `uet run`.
    #[serde(default)]
    pub trigger: Option<String>,
    /// Daemon starts that found it in flight after an unclean stop, since it last went back to
    /// pending; the second such start quarantines it as a suspected poison run.
    #[serde(default)]
    pub crashes: u32,
}

/// A step of a run as the state records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's id in its workflow.
    pub id: String,
    /// Where it is in its lifecycle.
    pub state: StepState,
    /// How many attempts have started.
    pub attempts: u32,
    /// The tool that ran its latest attempt.
    pub tool: Option<String>,
    /// The output of its successful attempt.
    pub output: Option<serde_json::Value>,
    /// Why it failed, was skipped or canceled.
    pub reason: Option<String>,
    /// When its first attempt started.
    pub started_at: Option<Millis>,
    /// When it reached a terminal state.
    pub finished_at: Option<Millis>,
    /// How far its running attempt is, as its plugin last reported (0.0 to 1.0).
    #[serde(default)]
    pub progress: Option<f32>,
    /// When its latest attempt started: what the running attempt has had so far is measured
    /// from here, not from the first attempt (earlier tries, backoffs and downtime are not its).
    #[serde(default)]
    pub attempt_started_at: Option<Millis>,
}

/// One try of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1 for the first try.
    pub number: u32,
    /// The tool that ran it.
    pub tool: String,
    /// The folder of that tool's tools file (empty in records older than it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub folder: String,
    /// When it started.
    pub started_at: Millis,
    /// When it ended; `None` while in flight.
    pub finished_at: Option<Millis>,
    /// How it ended; `None` while in flight.
    pub outcome: Option<Outcome>,
    /// What went wrong, in words.
    pub error: Option<String>,
    /// Captured standard output, bounded.
    pub stdout: String,
    /// Captured standard error, bounded.
    pub stderr: String,
    /// When the next attempt is due, if one will be made.
    pub retry_at: Option<Millis>,
}

/// One entry of a run's append-only audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Position in the run's log, from 1.
    pub seq: u64,
    /// When it happened.
    pub at: Millis,
    /// The step it concerns, if any.
    pub step: Option<String>,
    /// What happened: `run.running`, `step.succeeded`, `attempt.started`, ...
    pub kind: String,
    /// Details in words.
    pub detail: String,
    /// Its link in the run's hash chain (see `uet verify`).
    #[serde(default)]
    pub hash: String,
}

/// Where a tool's circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerPhase {
    /// Attempts go through.
    Closed,
    /// Attempts wait until the probe time.
    Open,
    /// One probe attempt decides.
    HalfOpen,
}

impl BreakerPhase {
    /// The name users see.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerPhase::Closed => "closed",
            BreakerPhase::Open => "open",
            BreakerPhase::HalfOpen => "half-open",
        }
    }
}

/// A breaker as the state keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerRecord {
    /// Where it is.
    pub phase: BreakerPhase,
    /// Consecutive failures (reset by a success).
    pub failures: u32,
    /// When it last opened.
    pub opened_at: Option<Millis>,
    /// When an open breaker lets its probe through.
    pub probe_at: Option<Millis>,
}

impl Default for BreakerRecord {
    fn default() -> Self {
        BreakerRecord {
            phase: BreakerPhase::Closed,
            failures: 0,
            opened_at: None,
            probe_at: None,
        }
    }
}

/// A tool's circuit breaker changed: what to write to the state, and the event that says so
/// (for a change of phase).
#[derive(Debug, Clone)]
pub struct BreakerChange {
    /// The tool, by its identity ([`tool_key`]).
    pub tool: String,
    /// Its breaker now.
    pub record: BreakerRecord,
    /// `breaker.opened`, `breaker.half_open`, `breaker.closed`, with details; `None` when only
    /// the failure count moved.
    pub event: Option<(String, String)>,
}

/// A run's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps that reached a terminal state.
    pub done: usize,
    /// All steps.
    pub total: usize,
    /// Steps running now.
    pub running: usize,
    /// Steps that failed.
    pub failed: usize,
    /// Done, counting running steps' reported fractions, as a percentage.
    pub percent: f64,
    /// Since the run started.
    pub elapsed_seconds: Option<f64>,
    /// Expected time to the end; `None` when no tool it needs has any history yet.
    pub eta_seconds: Option<f64>,
}

/// A tool's identity: its name and its tools file's folder, `name@folder`. Tool names never
/// hold `@` (see the tools file's rules), so [`split_tool_key`] takes it apart again.
pub fn tool_key(name: &str, folder: &str) -> String {
    if folder.is_empty() {
        name.to_string()
    } else {
        format!("{name}@{folder}")
    }
}

/// A tool's name and folder from its [`tool_key`]; a bare name (as older states kept) has no
/// folder.
pub fn split_tool_key(key: &str) -> (&str, &str) {
    key.split_once('@').unwrap_or((key, ""))
}

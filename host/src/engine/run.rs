//! The scheduler: runs one run's steps through the DAG to a terminal state.
//!
//! Every transition is written to the state before the engine acts on it. Transitions that
//! happen together (several attempts finishing, the steps that become ready because of them) go
//! into one write transaction, so durability costs one commit per scheduling round, not one per
//! transition.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::adapters::process::{CommandSpec, Exit, Groups, run_command};
use crate::adapters::wasm::{Grants, Limits, PluginReport, Runtime, WasmOutcome};
use crate::engine::breaker::{Admission, Breakers};
use crate::engine::relay::Relay;
use crate::model::BreakerPhase;
use crate::model::{Millis, Outcome, RunId, RunState, StepState, now_millis};
use crate::spec::template;
use crate::spec::tools::{RetryPolicy, Tool, ToolKind, Tools};
use crate::spec::workflow::{Plan, Target};
use crate::state::{Change, StateError, Store};

/// How much of an attempt's stdout/stderr the attempt record keeps; the full (bounded) stdout
/// is the step's output, so the record needs only enough to read what happened.
const RECORD_LIMIT: usize = 16 << 10;

/// Why a run could not be driven (the run itself failing is not an error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The state holds no such run.
    #[error("no run {0} in the state")]
    UnknownRun(RunId),
}

/// Everything one run needs to go.
pub struct RunSpec<'a> {
    /// The run's id in the state.
    pub run: RunId,
    /// The checked workflow.
    pub plan: &'a Plan,
    /// The folder its steps run in.
    pub workstream: &'a Path,
    /// The tools that may run its steps.
    pub tools: &'a Tools,
    /// The plugin runtime, when any tool is a WASM plugin.
    pub wasm: Option<Arc<Runtime>>,
    /// The daemon's shutdown: when it fires, no more steps start, running attempts get `grace`
    /// to finish, and the run goes back to pending to resume at the next start.
    pub pause: Option<Pause>,
    /// Everyone's circuit breakers (one set per process, shared by its runs).
    pub breakers: Arc<Breakers>,
    /// Where command steps' process groups are noted while they run (one per state).
    pub groups: Arc<Groups>,
    /// Where fleet tools' attempts go, when this daemon is in a fleet.
    pub remote: Option<Arc<dyn Remote>>,
    /// When a plugin attempt alone in flight runs on a thread of the run's own, which waits
    /// for the next one by spinning a moment (see `relay.rs`). Never in a process allowed a
    /// single CPU, where a spin would only delay what it waits for.
    pub relaying: Relaying,
}

/// See [`RunSpec::relaying`].
#[derive(Clone)]
pub enum Relaying {
    /// Every plugin attempt goes to the runtime's blocking pool.
    Never,
    /// Whenever the attempt is alone: `uet run`, whose one run has the process to itself.
    Always,
    /// While the attempt is alone and this says the run is too: a daemon's runs share its
    /// threads, and a thread spinning for each of several runs would take the CPU their work
    /// needs.
    WhileAlone(Arc<dyn Fn() -> bool + Send + Sync>),
}

impl Relaying {
    fn now(&self) -> bool {
        match self {
            Relaying::Never => false,
            Relaying::Always => true,
            Relaying::WhileAlone(alone) => alone(),
        }
    }
}

/// A stop that is not an end: see [`RunSpec::pause`].
#[derive(Clone)]
pub struct Pause {
    /// Fires when the daemon stops taking work.
    pub token: CancellationToken,
    /// How long running attempts may go on after that before they are stopped.
    pub grace: Duration,
}

/// The reason a paused run records.
const PAUSED: &str = "uet stopped; the run resumes at the next start";

/// Something for a person to see, sent as the run goes.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A step changed state.
    Step {
        /// Its id.
        id: String,
        /// Its new state.
        state: StepState,
        /// Attempts started so far.
        attempts: u32,
        /// Why, when it failed, was skipped or canceled.
        reason: Option<String>,
    },
    /// A plugin reported progress on a running step.
    Progress {
        /// The step.
        id: String,
        /// From 0.0 to 1.0.
        fraction: f32,
        /// What it is doing.
        message: String,
    },
    /// An attempt failed and another is due.
    Retry {
        /// The step.
        id: String,
        /// The attempt that failed.
        attempt: u32,
        /// What went wrong.
        error: String,
        /// The wait before the next.
        delay: Duration,
    },
}

/// How one attempt went, before it is written down.
struct AttemptEnd {
    index: usize,
    number: u32,
    outcome: Outcome,
    output: Option<serde_json::Value>,
    error: Option<String>,
    retryable: bool,
    /// The failure is the input's, not the tool's (its argv could not be built, or the tool
    /// answered that no retry can help): it says nothing about the tool's health, so its
    /// breaker does not count it.
    input_fault: bool,
    stdout: String,
    stderr: String,
    /// What to do once the end is recorded (a remote outcome: take it off its queue).
    recorded: Option<Recorded>,
}

enum Message {
    Done(AttemptEnd),
    /// A step's backoff is over.
    Due(usize),
    /// A plugin said something while it ran.
    Plugin(usize, PluginReport),
    /// Something to note in the step's log: where a remote attempt went, and where it ran.
    Note(usize, &'static str, String),
}

/// An attempt to run on another node of a fleet (docs/FLEET.md): what a worker needs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Dispatch {
    /// The run, on its owner.
    pub run: RunId,
    /// The step's id.
    pub step: String,
    /// Its attempt number.
    pub number: u32,
    /// The tool, by name; the subject it is sent on names its content too.
    pub tool: String,
    /// The step's input.
    pub input: serde_json::Value,
    /// The attempt's time limit, if any (the owner's own deadline is the authority).
    pub timeout_ms: Option<u64>,
}

/// How an attempt ended, wherever it ran.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ended {
    pub outcome: Outcome,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    pub retryable: bool,
    /// The input's fault, not the tool's: its breaker does not count it.
    pub input_fault: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Lines for a step's log, from wherever its attempt went.
pub type Notes = Box<dyn Fn(String) + Send + Sync>;

/// Called once an end is recorded: a remote outcome may leave its queue only then, so that a
/// crash before the record leaves it there to be taken again (and fenced).
pub type Recorded = Box<dyn FnOnce() + Send>;

/// A remote attempt's end as it came home.
pub struct Back {
    pub ended: Ended,
    /// The node that ran it, when it ran somewhere.
    pub node: Option<String>,
    /// Called after the commit that holds this end.
    pub recorded: Option<Recorded>,
}

/// A remote attempt's end, when it comes.
pub type Landing = std::pin::Pin<Box<dyn std::future::Future<Output = Back> + Send>>;

/// Where a fleet tool's attempts go: the engine hands them over and waits for their end. The
/// fleet implements it; the engine never imports the fleet.
pub trait Remote: Send + Sync {
    /// Sends an attempt away and resolves with its end, and the node that ran it. `notes`
    /// receives lines for the step's log (where it was sent).
    fn dispatch(
        &self,
        tool: &Tool,
        attempt: Dispatch,
        notes: Notes,
        cancel: CancellationToken,
    ) -> Landing;
}

/// Runs one plugin attempt on this node for a fleet's worker: the same adapter, limits and
/// bounds as a local attempt; the plugin's log lines go nowhere (the owner keeps the log).
pub async fn run_here(
    tool: &Tool,
    attempt: &Dispatch,
    wasm: Arc<Runtime>,
    groups: Arc<Groups>,
    workstream: &Path,
    cancel: CancellationToken,
) -> Ended {
    let (reports, _) = mpsc::unbounded_channel();
    let ctx = AttemptContext {
        run: attempt.run,
        step: attempt.step.clone(),
        number: attempt.number,
        workstream: workstream.to_path_buf(),
        timeout: attempt.timeout_ms.map(Duration::from_millis),
        wasm: Some(wasm),
        reports,
        groups,
        crowded: true,
        relay: None,
        remote: None,
        // one attempt among runs this node does not see start: a stat is nothing beside the
        // network's round trip
        check_plugin: true,
    };
    let end = run_attempt(tool, attempt.input.clone(), &ctx, 0, cancel).await;
    Ended {
        outcome: end.outcome,
        output: end.output,
        error: end.error,
        retryable: end.retryable,
        input_fault: end.input_fault,
        stdout: end.stdout,
        stderr: end.stderr,
    }
}

/// Drives a run to a terminal state and returns it. Steps already succeeded (a resumed run) keep
/// their outputs and are not run again; steps found in flight are put back in the queue.
pub async fn execute(
    store: &Store,
    spec: RunSpec<'_>,
    cancel: CancellationToken,
    notices: Option<mpsc::UnboundedSender<Notice>>,
) -> Result<RunState, EngineError> {
    let mut sched = Scheduler::new(store, &spec, notices)?;
    sched.run(cancel, spec.pause).await
}

struct Scheduler<'a> {
    store: &'a Store,
    run: RunId,
    plan: &'a Plan,
    tools: &'a Tools,
    workstream: PathBuf,
    wasm: Option<Arc<Runtime>>,
    state: Vec<StepState>,
    attempts: Vec<u32>,
    outputs: HashMap<usize, serde_json::Value>,
    /// Upstream steps not yet succeeded, per step.
    waiting_on: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    /// Ready steps: highest priority first, then file order.
    ready: BinaryHeap<(i64, Reverse<usize>)>,
    running: usize,
    backing_off: usize,
    changes: Vec<Change>,
    notices: Option<mpsc::UnboundedSender<Notice>>,
    rng: rand::rngs::SmallRng,
    breakers: Arc<Breakers>,
    groups: Arc<Groups>,
    remote: Option<Arc<dyn Remote>>,
    /// Per step: the tool its attempt in flight runs on, and whether it is a breaker's probe.
    in_flight: Vec<Option<(String, bool)>>,
    /// Ready steps whose tools' breakers all said wait, with those tools' identities.
    blocked: Vec<(usize, Vec<String>)>,
    /// When the earliest probe among the blocked steps' tools is due.
    wake_at: Option<Millis>,
    /// Set when the run should end quarantined rather than failed.
    quarantine: Option<String>,
    /// Attempts whose starts are among `changes`: they begin once the commit holding them has
    /// landed.
    queued: Vec<Launch<'a>>,
    /// What recorded ends ask done once their commit has landed.
    after_commit: Vec<Recorded>,
    /// The plugins whose files this run has checked (at its first attempt with each).
    plugins_checked: HashSet<PathBuf>,
    /// See [`RunSpec::relaying`].
    relaying: Relaying,
    /// The run's relay thread, started at its first lone plugin attempt.
    relay: Option<Arc<Relay>>,
}

/// An attempt about to begin: the step, its attempt number, and the tool, input and probe flag
/// it runs with (or why it cannot run).
type Launch<'a> = (
    usize,
    u32,
    Result<(&'a Tool, serde_json::Value, bool), String>,
);

impl<'a> Scheduler<'a> {
    fn new(
        store: &'a Store,
        spec: &RunSpec<'a>,
        notices: Option<mpsc::UnboundedSender<Notice>>,
    ) -> Result<Self, EngineError> {
        let plan = spec.plan;
        let n = plan.steps.len();
        let records = store.steps(spec.run)?;
        let mut state = vec![StepState::Pending; n];
        let mut attempts = vec![0; n];
        let mut outputs = HashMap::new();
        let by_id: HashMap<&str, usize> = plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        for rec in records {
            if let Some(&i) = by_id.get(rec.id.as_str()) {
                state[i] = rec.state;
                attempts[i] = rec.attempts;
                if let Some(out) = rec.output {
                    outputs.insert(i, out);
                }
            }
        }
        let mut dependents = vec![Vec::new(); n];
        for (i, step) in plan.steps.iter().enumerate() {
            for &d in &step.needs {
                dependents[d].push(i);
            }
        }
        Ok(Scheduler {
            store,
            run: spec.run,
            plan,
            tools: spec.tools,
            workstream: spec.workstream.to_path_buf(),
            wasm: spec.wasm.clone(),
            state,
            attempts,
            outputs,
            waiting_on: vec![0; n],
            dependents,
            ready: BinaryHeap::new(),
            running: 0,
            backing_off: 0,
            changes: Vec::new(),
            notices,
            rng: rand::make_rng(),
            breakers: spec.breakers.clone(),
            groups: spec.groups.clone(),
            remote: spec.remote.clone(),
            in_flight: vec![None; n],
            blocked: Vec::new(),
            wake_at: None,
            quarantine: None,
            queued: Vec::new(),
            after_commit: Vec::new(),
            plugins_checked: HashSet::new(),
            // spinning on a lone CPU would hold off the very thread it waits for
            relaying: if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
                spec.relaying.clone()
            } else {
                Relaying::Never
            },
            relay: None,
        })
    }

    async fn run(
        &mut self,
        cancel: CancellationToken,
        pause: Option<Pause>,
    ) -> Result<RunState, EngineError> {
        let run = self
            .store
            .run(self.run)?
            .ok_or(EngineError::UnknownRun(self.run))?;
        if run.state.is_terminal() {
            return Ok(run.state);
        }
        self.set_going(&run)?;
        let started = Instant::now();
        let stop = self.drive(&run, cancel, pause).await?;
        // a run's time is the wall clock's from its first start, as `uet show` gives it: a run
        // resumed after a restart counts the time the daemon was down too
        let took = match run.started_at {
            Some(at) => Duration::from_millis(now_millis().saturating_sub(at)),
            None => started.elapsed(),
        };
        let (state, reason) = self.outcome(stop, took);
        self.changes.push(Change::RunState {
            run: self.run,
            to: state,
            reason: Some(reason),
        });
        self.commit()?;
        Ok(state)
    }

    /// Sets the run going: running it, putting back steps its last driver left in flight,
    /// counting what each step waits on, skipping what cannot run, queueing what can.
    fn set_going(&mut self, run: &crate::model::RunRecord) -> Result<(), EngineError> {
        if run.state == RunState::Pending {
            self.changes.push(Change::RunState {
                run: self.run,
                to: RunState::Running,
                reason: None,
            });
        }
        // a step found running was in flight when its last driver stopped: it goes again
        if self.state.contains(&StepState::Running) {
            self.changes
                .extend(requeue_in_flight(self.store, self.run)?);
        }
        for state in &mut self.state {
            if *state == StepState::Running {
                *state = StepState::Pending;
            }
        }
        for i in 0..self.plan.steps.len() {
            self.waiting_on[i] = self.plan.steps[i]
                .needs
                .iter()
                .filter(|&&d| self.state[d] != StepState::Succeeded)
                .count();
        }
        for i in 0..self.plan.steps.len() {
            if self.state[i] == StepState::Pending {
                if self.plan.steps[i].needs.iter().any(|&d| {
                    matches!(
                        self.state[d],
                        StepState::Failed | StepState::Skipped | StepState::Canceled
                    )
                }) {
                    self.skip_dependents_of_ancestor(i);
                } else if self.waiting_on[i] == 0 {
                    self.ready.push((self.plan.steps[i].priority, Reverse(i)));
                }
            }
        }
        Ok(())
    }

    /// Starts steps, commits, and takes attempts' ends as they come, until nothing more can
    /// run or the run is stopped (canceled, paused, past its deadline); why it stopped, if it
    /// was.
    async fn drive(
        &mut self,
        run: &crate::model::RunRecord,
        cancel: CancellationToken,
        pause: Option<Pause>,
    ) -> Result<Option<(RunState, String)>, EngineError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let started = Instant::now();
        let deadline = self.plan.timeout.map(|t| {
            let elapsed = run
                .started_at
                .map(|s| Duration::from_millis(now_millis().saturating_sub(s)))
                .unwrap_or_default();
            tokio::time::Instant::now() + t.saturating_sub(elapsed)
        });
        let attempts_cancel = cancel.child_token();
        let mut stop: Option<(RunState, String)> = None;
        let mut breaker_changes = self.breakers.subscribe();
        let pause_token = pause.as_ref().map(|p| p.token.clone()).unwrap_or_default();
        // set when a pause begins: running attempts are stopped at this instant
        let mut grace_end: Option<tokio::time::Instant> = None;
        // for the debug log at the end: how the run's time went to commits
        let (mut commits, mut committing) = (0u32, Duration::ZERO);
        loop {
            // checked here, not only where the loop waits: a cancel also wakes the steps in
            // backoff, and a stop may come before this run got going; no step starts after
            // either
            if stop.is_none() && cancel.is_cancelled() {
                stop = Some((RunState::Canceled, "canceled on request".into()));
                attempts_cancel.cancel();
            }
            if stop.is_none() && pause_token.is_cancelled() {
                stop = Some((RunState::Pending, PAUSED.into()));
                let grace = pause.as_ref().map(|p| p.grace).unwrap_or_default();
                grace_end = Some(tokio::time::Instant::now() + grace);
            }
            if stop.is_none() {
                self.start_ready(now_millis());
            }
            if !self.changes.is_empty() {
                // at once, on the driver's thread: a commit only writes the journal (the sync
                // and writer threads group the syncs and the database's transactions, see
                // the state), so a free slot is refilled as soon as the attempt that held it
                // has ended, as `make -j` does, instead of waiting for its round
                let began = Instant::now();
                let result = self
                    .store
                    .apply_sync_behind(&std::mem::take(&mut self.changes));
                (commits, committing) = (commits + 1, committing + began.elapsed());
                if result.is_ok() {
                    self.after_commit.drain(..).for_each(|f| f());
                }
                self.landed(result, &tx, &attempts_cancel, stop.is_some())?;
                continue;
            }
            if self.running == 0
                && (stop.is_some()
                    || (self.ready.is_empty() && self.backing_off == 0 && self.blocked.is_empty()))
            {
                break;
            }
            let pausing = grace_end.is_some();
            let blocked = !self.blocked.is_empty() && stop.is_none();
            let wake = self.wake_at.map(|at| {
                tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_millis()))
            });
            let message = tokio::select! {
                m = rx.recv() => m,
                // a pause or a cancel is taken up at the top of the loop
                _ = pause_token.cancelled(), if stop.is_none() => continue,
                _ = sleep_until(grace_end), if pausing && !attempts_cancel.is_cancelled() => {
                    attempts_cancel.cancel();
                    continue;
                }
                _ = cancel.cancelled(), if stop.is_none() => continue,
                _ = sleep_until(deadline), if stop.is_none() => {
                    stop = Some(self.past_deadline());
                    attempts_cancel.cancel();
                    continue;
                }
                _ = breaker_changes.changed(), if blocked => {
                    self.unblock();
                    continue;
                }
                _ = sleep_until(wake), if blocked => {
                    self.unblock();
                    continue;
                }
            };
            let Some(first) = message else { break };
            // attempts finishing during a pause are taken as they come: a failure with no
            // attempts left still fails its step
            let stopping = stop.is_some() && !pausing;
            self.handle(first, &tx, &attempts_cancel, stopping, pausing);
            // drain what else has arrived, so it all lands in one commit
            while let Ok(m) = rx.try_recv() {
                self.handle(m, &tx, &attempts_cancel, stopping, pausing);
            }
        }
        self.log_commits(commits, committing, started);
        Ok(stop)
    }

    /// Why the run stops at its deadline: failed, or quarantined when it could not go on
    /// because a tool's circuit stayed open (a slow run is not a failing tool).
    fn past_deadline(&self) -> (RunState, String) {
        let limit = humantime::format_duration(self.plan.timeout.unwrap_or_default());
        let open = self.blocked.iter().find_map(|(_, tools)| {
            let open: Vec<&str> = tools
                .iter()
                .filter(|t| {
                    self.breakers
                        .get(t)
                        .is_some_and(|b| b.phase != BreakerPhase::Closed)
                })
                .map(|key| crate::model::split_tool_key(key).0)
                .collect();
            (!open.is_empty()).then(|| open.join("`, `"))
        });
        match open {
            // the run could not go on because a tool kept failing: hold it for a person
            // instead of calling it failed
            Some(tools) => (
                RunState::Quarantined,
                format!(
                    "the circuit breaker of `{tools}` stayed open past the run's deadline ({limit})"
                ),
            ),
            None => (RunState::Failed, format!("run timed out after {limit}")),
        }
    }

    /// The debug log's line of a run: its commits and their time, the state's syncs and the
    /// writer's transactions, and the process's own CPU time.
    fn log_commits(&self, commits: u32, committing: Duration, started: Instant) {
        let (syncs, syncing) = self.store.journal_syncs();
        let (transactions, hurried, writing) = self.store.writer_transactions();
        tracing::debug!(
            run = self.run,
            commits,
            committing = ?committing,
            elapsed = ?started.elapsed(),
            // the state's, not the run's: every run of this process counts
            journal_syncs = syncs,
            writer_transactions = transactions,
            hurried,
            writing = ?writing,
            syncing = ?syncing,
            // and the process's own CPU time, its steps' processes not counted
            cpu = ?own_cpu(),
            "run's commits"
        );
    }

    /// How the run ends: as stopped (its unfinished steps put back, or canceled), or by its
    /// steps: quarantined, succeeded or failed.
    fn outcome(&mut self, stop: Option<(RunState, String)>, took: Duration) -> (RunState, String) {
        let all_ended = self.state.iter().all(|s| s.is_terminal());
        let stop = stop.filter(|(state, _)| *state != RunState::Pending || !all_ended);
        match stop {
            Some((RunState::Pending, reason)) => {
                for i in 0..self.state.len() {
                    if self.state[i] == StepState::Running {
                        self.set_step(i, StepState::Pending, Some(reason.clone()), None);
                    }
                }
                (RunState::Pending, reason)
            }
            Some((state, reason)) => {
                for i in 0..self.state.len() {
                    if !self.state[i].is_terminal() {
                        self.set_step(i, StepState::Canceled, Some(reason.clone()), None);
                    }
                }
                (state, reason)
            }
            None => {
                let failed: Vec<&str> = (0..self.state.len())
                    .filter(|&i| self.state[i] == StepState::Failed)
                    .map(|i| self.plan.steps[i].id.as_str())
                    .collect();
                if let (false, Some(reason)) = (failed.is_empty(), self.quarantine.take()) {
                    (RunState::Quarantined, reason)
                } else if failed.is_empty() {
                    (
                        RunState::Succeeded,
                        format!("{} steps succeeded in {:.2?}", self.state.len(), took),
                    )
                } else {
                    (RunState::Failed, format!("failed: {}", failed.join(", ")))
                }
            }
        }
    }

    /// Takes ready steps up to `max_parallel` and records their starts; they begin once the
    /// commit holding those starts has landed, so every execution has its attempt record first.
    fn start_ready(&mut self, now: Millis) {
        while self.running < self.plan.max_parallel {
            let Some((_, Reverse(i))) = self.ready.pop() else {
                break;
            };
            let prepared = match self.prepare(i) {
                Err(e) => Err(e),
                Ok((tools, input)) => match self.admit(i, &tools, now) {
                    Some((tool, probe)) => Ok((tool, input, probe)),
                    // every tool it may use has its breaker open: it waits, using no attempt
                    None => continue,
                },
            };
            let step = &self.plan.steps[i];
            let number = self.attempts[i] + 1;
            let tool_name = match &prepared {
                Ok((tool, _, _)) => tool.key.clone(),
                Err(_) => String::from("-"),
            };
            if self.state[i] == StepState::Pending {
                self.set_step(i, StepState::Running, None, None);
            }
            self.attempts[i] = number;
            self.changes.push(Change::AttemptStarted {
                run: self.run,
                step: step.id.clone(),
                number,
                tool: tool_name,
            });
            self.running += 1;
            self.queued.push((i, number, prepared));
        }
    }

    /// The commit holding `queued`'s starts has ended: they begin, or, when it failed, the run
    /// stops with its error.
    fn landed<T>(
        &mut self,
        result: Result<T, StateError>,
        tx: &mpsc::UnboundedSender<Message>,
        cancel: &CancellationToken,
        stopping: bool,
    ) -> Result<(), EngineError> {
        if let Err(e) = result {
            cancel.cancel();
            self.give_back();
            return Err(e.into());
        }
        self.launch(tx, cancel, stopping);
        Ok(())
    }

    /// The commit holding these attempts' starts has landed: they begin, unless the run is
    /// stopping, when they end at once as canceled (a pause turns that into interrupted).
    fn launch(
        &mut self,
        tx: &mpsc::UnboundedSender<Message>,
        cancel: &CancellationToken,
        stopping: bool,
    ) {
        for (index, number, prepared) in std::mem::take(&mut self.queued) {
            let tx = tx.clone();
            let cancel = cancel.child_token();
            let not_run = |outcome, error: String, input_fault| AttemptEnd {
                index,
                number,
                outcome,
                output: None,
                error: Some(error),
                retryable: false,
                input_fault,
                stdout: String::new(),
                stderr: String::new(),
                recorded: None,
            };
            match prepared {
                Err(error) => {
                    let _ = tx.send(Message::Done(not_run(Outcome::Error, error, true)));
                }
                Ok((tool, _, probe)) if stopping || cancel.is_cancelled() => {
                    // the breaker lent it room: the attempt's end gives it back
                    self.in_flight[index] = Some((tool.name.clone(), probe));
                    let _ = tx.send(Message::Done(not_run(
                        Outcome::Canceled,
                        "canceled".into(),
                        false,
                    )));
                }
                Ok((tool, input, probe)) => {
                    self.in_flight[index] = Some((tool.name.clone(), probe));
                    let step = &self.plan.steps[index];
                    let timeout = match (step.timeout, tool.timeout) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let ctx = AttemptContext {
                        run: self.run,
                        step: step.id.clone(),
                        number,
                        workstream: self.workstream.clone(),
                        timeout,
                        wasm: self.wasm.clone(),
                        reports: tx.clone(),
                        groups: self.groups.clone(),
                        crowded: self.running > 1,
                        relay: match tool.kind {
                            ToolKind::Wasm { .. } if self.running == 1 && self.relaying.now() => {
                                self.relay()
                            }
                            _ => None,
                        },
                        remote: self.remote.clone(),
                        check_plugin: match &tool.kind {
                            ToolKind::Wasm { path } => {
                                !self.plugins_checked.contains(path)
                                    && self.plugins_checked.insert(path.clone())
                            }
                            ToolKind::Command { .. } => false,
                        },
                    };
                    let tool = Arc::new(tool.clone());
                    tokio::spawn(async move {
                        let end = run_attempt(&tool, input, &ctx, index, cancel).await;
                        let _ = tx.send(Message::Done(end));
                    });
                }
            }
        }
    }

    /// The run's relay thread, started now if it is not yet; none if it cannot be, and the
    /// blocking pool runs lone plugins then as it runs the others.
    fn relay(&mut self) -> Option<Arc<Relay>> {
        if self.relay.is_none() {
            match Relay::start(tokio::runtime::Handle::current()) {
                Ok(relay) => self.relay = Some(Arc::new(relay)),
                Err(e) => {
                    tracing::warn!(run = self.run, "cannot start a relay thread: {e}");
                    self.relaying = Relaying::Never;
                }
            }
        }
        self.relay.clone()
    }

    /// A commit failed and the run stops: the attempts it lent breaker room to, started or
    /// not, give it back, or the tools would stay short of room (or wait on a probe that never
    /// ends) for every other run.
    fn give_back(&mut self) {
        let now = now_millis();
        for (_, _, prepared) in self.queued.drain(..) {
            if let Ok((tool, _, probe)) = prepared {
                self.breakers.settle(tool, probe, Outcome::Interrupted, now);
            }
        }
        for (name, probe) in self.in_flight.iter_mut().filter_map(Option::take) {
            if let Some(tool) = self.tools.by_name(&name) {
                self.breakers.settle(tool, probe, Outcome::Interrupted, now);
            }
        }
    }

    /// Asks the breakers of a step's tools, in order, for one that may take an attempt now.
    /// When none may, the step joins `blocked` until a breaker changes or a probe is due.
    fn admit(&mut self, i: usize, tools: &[&'a Tool], now: Millis) -> Option<(&'a Tool, bool)> {
        let mut due: Option<Millis> = None;
        for &tool in tools {
            let (admission, transition) = self.breakers.admit(tool, now);
            if let Some(transition) = transition {
                self.changes.push(Change::Breaker {
                    run: self.run,
                    step: Some(self.plan.steps[i].id.clone()),
                    transition,
                });
            }
            match admission {
                Admission::Go { probe } => return Some((tool, probe)),
                Admission::Wait(at) => {
                    if let Some(at) = at {
                        due = Some(due.map_or(at, |d| d.min(at)));
                    }
                }
            }
        }
        self.blocked
            .push((i, tools.iter().map(|t| t.key.clone()).collect()));
        if let Some(at) = due {
            self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        }
        None
    }

    /// Finds the tools that may run a step and fills its input from upstream outputs.
    fn prepare(&self, i: usize) -> Result<(Vec<&'a Tool>, serde_json::Value), String> {
        let step = &self.plan.steps[i];
        let tool = candidates(self.tools, &step.target)?;
        let outputs = &self.outputs;
        let by_id = |id: &str| {
            self.plan
                .steps
                .iter()
                .position(|s| s.id == id)
                .and_then(|j| outputs.get(&j).cloned())
        };
        let input = template::resolve(&step.with, &by_id, &self.plan.params).map_err(|e| e.0)?;
        Ok((tool, input))
    }

    fn handle(
        &mut self,
        message: Message,
        tx: &mpsc::UnboundedSender<Message>,
        cancel: &CancellationToken,
        stopping: bool,
        pausing: bool,
    ) {
        match message {
            Message::Due(i) => {
                self.backing_off -= 1;
                if !stopping && self.state[i] == StepState::Running {
                    self.ready.push((self.plan.steps[i].priority, Reverse(i)));
                }
            }
            Message::Done(mut end) => {
                self.running -= 1;
                if pausing && end.outcome == Outcome::Canceled {
                    // stopped by the shutdown, not by anyone's wish: it runs again later
                    end.outcome = Outcome::Interrupted;
                    end.error = Some("stopped when uet shut down".into());
                    end.retryable = false;
                }
                let interrupted = pausing && end.outcome == Outcome::Interrupted;
                self.finish_attempt(end, tx, cancel, stopping || interrupted);
            }
            Message::Plugin(i, report) => {
                let id = self.plan.steps[i].id.clone();
                let (kind, detail) = match report {
                    PluginReport::Log { level, message } => {
                        ("plugin.log", format!("{level}: {message}"))
                    }
                    PluginReport::Progress { fraction, message } => {
                        self.notify(Notice::Progress {
                            id: id.clone(),
                            fraction,
                            message: message.clone(),
                        });
                        // kept on the step too, so a progress view survives a restart
                        self.changes.push(Change::StepProgress {
                            run: self.run,
                            step: id,
                            fraction,
                            message,
                        });
                        return;
                    }
                };
                self.changes.push(Change::Event {
                    run: self.run,
                    step: Some(id),
                    kind: kind.into(),
                    detail,
                });
            }
            Message::Note(i, kind, detail) => {
                self.changes.push(Change::Event {
                    run: self.run,
                    step: Some(self.plan.steps[i].id.clone()),
                    kind: kind.into(),
                    detail,
                });
            }
        }
    }

    fn finish_attempt(
        &mut self,
        mut end: AttemptEnd,
        tx: &mpsc::UnboundedSender<Message>,
        cancel: &CancellationToken,
        stopping: bool,
    ) {
        self.after_commit.extend(end.recorded.take());
        let i = end.index;
        let step = &self.plan.steps[i];
        let id = step.id.clone();
        let ran = self.in_flight[i].take();
        let tool = match &ran {
            Some((name, _)) => self.tools.by_name(name),
            None => route(self.tools, &step.target).ok(),
        };
        let retries = step.retries.or(tool.and_then(|t| t.retries)).unwrap_or(0);
        let policy: RetryPolicy = step.retry.or(tool.map(|t| t.retry)).unwrap_or_default();
        let will_retry = end.outcome != Outcome::Succeeded
            && end.outcome != Outcome::Canceled
            && end.retryable
            && !stopping
            && end.number <= retries;
        let delay = will_retry.then(|| policy.delay(end.number + 1, &mut self.rng));
        let retry_at: Option<Millis> = delay.map(|d| now_millis() + d.as_millis() as u64);
        self.changes.push(Change::AttemptFinished {
            run: self.run,
            step: id.clone(),
            number: end.number,
            outcome: end.outcome,
            error: end.error.clone(),
            stdout: end.stdout,
            stderr: end.stderr,
            retry_at,
        });
        // the attempt's end is logged first, then what it did to its tool's breaker
        // an input the tool cannot take is neither a success nor a failure of the tool
        let verdict = if end.input_fault {
            Outcome::Interrupted
        } else {
            end.outcome
        };
        if let (Some((_, probe)), Some(t)) = (&ran, tool)
            && let Some(transition) = self.breakers.settle(t, *probe, verdict, now_millis())
        {
            self.changes.push(Change::Breaker {
                run: self.run,
                step: Some(id.clone()),
                transition,
            });
        }
        match end.outcome {
            Outcome::Succeeded => {
                let output = end.output.unwrap_or(serde_json::Value::Null);
                self.succeeded(i, output);
            }
            _ if stopping => {}
            Outcome::Canceled => {}
            _ => {
                let error = end.error.unwrap_or_else(|| "attempt failed".into());
                match delay {
                    Some(delay) => self.retry_later(i, end.number, error, delay, tx, cancel),
                    None => self.failed(i, end.number, end.outcome, error),
                }
            }
        }
    }

    /// A step succeeded: its output is kept, and the steps waiting only on it are ready.
    fn succeeded(&mut self, i: usize, output: serde_json::Value) {
        self.outputs.insert(i, output.clone());
        self.set_step(i, StepState::Succeeded, None, Some(output));
        for k in 0..self.dependents[i].len() {
            let d = self.dependents[i][k];
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.state[d] == StepState::Pending {
                self.ready.push((self.plan.steps[d].priority, Reverse(d)));
            }
        }
    }

    /// A step's attempt failed and another follows after `delay` (unless the run is stopped
    /// meanwhile): it backs off, and says when it is due.
    fn retry_later(
        &mut self,
        i: usize,
        number: u32,
        error: String,
        delay: Duration,
        tx: &mpsc::UnboundedSender<Message>,
        cancel: &CancellationToken,
    ) {
        self.backing_off += 1;
        self.notify(Notice::Retry {
            id: self.plan.steps[i].id.clone(),
            attempt: number,
            error,
            delay,
        });
        let tx = tx.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => {}
            }
            let _ = tx.send(Message::Due(i));
        });
    }

    /// A step used up its attempts: it fails, and its dependents are skipped; a plugin that
    /// kept crashing or overrunning holds the run for a person.
    fn failed(&mut self, i: usize, number: u32, outcome: Outcome, error: String) {
        let reason = if number > 1 {
            format!("{error} (after {number} attempts)")
        } else {
            error
        };
        if matches!(outcome, Outcome::Trapped | Outcome::LimitExceeded) {
            let id = &self.plan.steps[i].id;
            self.quarantine.get_or_insert_with(|| {
                format!("step `{id}` used up its attempts on plugin traps or limits: {reason}")
            });
        }
        self.set_step(i, StepState::Failed, Some(reason), None);
        self.skip_dependents(i);
    }

    /// Puts the blocked steps back in the ready queue, to ask their breakers again.
    fn unblock(&mut self) {
        self.wake_at = None;
        for (i, _) in std::mem::take(&mut self.blocked) {
            self.ready.push((self.plan.steps[i].priority, Reverse(i)));
        }
    }

    /// Marks everything downstream of a step that did not succeed as skipped.
    fn skip_dependents(&mut self, failed: usize) {
        let mut todo = vec![failed];
        while let Some(n) = todo.pop() {
            for k in 0..self.dependents[n].len() {
                let d = self.dependents[n][k];
                if self.state[d] == StepState::Pending {
                    let reason =
                        format!("needs `{}`, which {}", self.plan.steps[n].id, self.state[n]);
                    self.set_step(d, StepState::Skipped, Some(reason), None);
                    todo.push(d);
                }
            }
        }
    }

    /// For a resumed run: a pending step whose upstream already ended badly is skipped.
    fn skip_dependents_of_ancestor(&mut self, i: usize) {
        let bad = self.plan.steps[i].needs.iter().copied().find(|&d| {
            matches!(
                self.state[d],
                StepState::Failed | StepState::Skipped | StepState::Canceled
            )
        });
        if let Some(d) = bad {
            let reason = format!("needs `{}`, which {}", self.plan.steps[d].id, self.state[d]);
            self.set_step(i, StepState::Skipped, Some(reason), None);
            self.skip_dependents(i);
        }
    }

    fn set_step(
        &mut self,
        i: usize,
        to: StepState,
        reason: Option<String>,
        output: Option<serde_json::Value>,
    ) {
        self.state[i] = to;
        let id = self.plan.steps[i].id.clone();
        self.notify(Notice::Step {
            id: id.clone(),
            state: to,
            attempts: self.attempts[i],
            reason: reason.clone(),
        });
        self.changes.push(Change::StepState {
            run: self.run,
            step: id,
            to,
            reason,
            output,
        });
    }

    fn notify(&self, notice: Notice) {
        if let Some(tx) = &self.notices {
            let _ = tx.send(notice);
        }
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        if !self.changes.is_empty() {
            let changes = std::mem::take(&mut self.changes);
            self.store.apply(&changes)?;
        }
        self.after_commit.drain(..).for_each(|f| f());
        Ok(())
    }
}

/// The CPU time this process has used, user and system, without its children's.
fn own_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Opens the ledger of command steps' process groups beside the state file, killing the groups
/// an earlier uet left running there (see [`Groups`]); returns it and how many it killed.
pub fn open_groups(store: &Store) -> std::io::Result<(Groups, usize)> {
    let path = store
        .path()
        .parent()
        .unwrap_or(Path::new("."))
        .join("uet.groups");
    Groups::open(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot open the process-group ledger {}: {e}",
                path.display()
            ),
        )
    })
}

/// The changes that put a run's in-flight steps back in the queue after its driver stopped
/// without finishing them: each unfinished attempt is marked interrupted, each running step
/// pending again.
pub fn requeue_in_flight(store: &Store, run: RunId) -> Result<Vec<Change>, StateError> {
    let mut changes = Vec::new();
    for step in store.steps(run)? {
        if step.state != StepState::Running {
            continue;
        }
        let last = store.attempts(run, &step.id)?.pop();
        if let Some(a) = last.filter(|a| a.outcome.is_none()) {
            changes.push(Change::AttemptFinished {
                run,
                step: step.id.clone(),
                number: a.number,
                outcome: Outcome::Interrupted,
                error: Some("uet stopped while this attempt was in flight".into()),
                stdout: String::new(),
                stderr: String::new(),
                retry_at: None,
            });
        }
        changes.push(Change::StepState {
            run,
            step: step.id,
            to: StepState::Pending,
            reason: Some("requeued: was in flight when uet stopped".into()),
            output: None,
        });
    }
    Ok(changes)
}

/// The changes that put a failed, canceled or quarantined run back in the queue: its steps
/// that did not succeed go back to pending, the ones that did keep their outputs.
pub fn requeue_unfinished(
    store: &Store,
    run: RunId,
    reason: &str,
) -> Result<Vec<Change>, StateError> {
    let mut changes = Vec::new();
    for step in store.steps(run)? {
        if matches!(
            step.state,
            StepState::Failed | StepState::Skipped | StepState::Canceled
        ) {
            changes.push(Change::StepState {
                run,
                step: step.id,
                to: StepState::Pending,
                reason: Some(reason.to_string()),
                output: None,
            });
        }
    }
    changes.push(Change::RunState {
        run,
        to: RunState::Pending,
        reason: Some(reason.to_string()),
    });
    Ok(changes)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Finds the tool for a step: by name, or the first tool (in the operator's order) that has the
/// capability.
pub fn route<'t>(tools: &'t Tools, target: &Target) -> Result<&'t Tool, String> {
    candidates(tools, target).map(|c| c[0])
}

/// The tools that may run a step, in the order they are tried: the named tool, or every tool
/// with the capability in the operator's order (the router skips those whose breaker is open).
pub fn candidates<'t>(tools: &'t Tools, target: &Target) -> Result<Vec<&'t Tool>, String> {
    match target {
        Target::Tool(name) => tools
            .by_name(name)
            .map(|t| vec![t])
            .ok_or_else(|| format!("no tool `{name}` in {}", tools.path.display())),
        Target::Capability(cap) => {
            let found: Vec<&Tool> = tools.with_capability(cap).collect();
            if found.is_empty() {
                Err(format!(
                    "no tool has capability `{cap}` in {}",
                    tools.path.display()
                ))
            } else {
                Ok(found)
            }
        }
    }
}

struct AttemptContext {
    run: RunId,
    step: String,
    number: u32,
    workstream: PathBuf,
    timeout: Option<Duration>,
    wasm: Option<Arc<Runtime>>,
    reports: mpsc::UnboundedSender<Message>,
    groups: Arc<Groups>,
    /// Other attempts of the run are in flight: a command starts on a blocking thread.
    crowded: bool,
    /// Where a plugin runs when it is the run's only attempt in flight (see `relay.rs`);
    /// otherwise on the runtime's blocking pool.
    relay: Option<Arc<Relay>>,
    /// Where fleet tools' attempts go.
    remote: Option<Arc<dyn Remote>>,
    /// The run's first attempt with its plugin: the plugin's file is checked to still hold
    /// what the process loaded (see `Grants::check_file`).
    check_plugin: bool,
}

async fn run_attempt(
    tool: &Tool,
    input: serde_json::Value,
    ctx: &AttemptContext,
    index: usize,
    cancel: CancellationToken,
) -> AttemptEnd {
    let mut end = attempt(tool, input, ctx, index, cancel).await;
    // a reason is kept in the attempt, the step and the event log, and shown in every answer:
    // bounded like the captured output, whatever a tool said
    if let Some(error) = end.error.take() {
        end.error = Some(bounded(&error));
    }
    // the output as kept and shown: a string of control characters takes six times its bytes
    // once escaped as JSON
    if let Some(serde_json::Value::String(text)) = &end.output
        && text.len() * 6 > tool.output_limit()
    {
        let shown = serde_json::Value::String(text.clone()).to_string().len();
        if shown > tool.output_limit() {
            end.output = None;
            end.outcome = Outcome::Failed;
            end.input_fault = true;
            end.error = Some(over_output(shown as u64, tool.output_limit()));
        }
    }
    end
}

async fn attempt(
    tool: &Tool,
    input: serde_json::Value,
    ctx: &AttemptContext,
    index: usize,
    cancel: CancellationToken,
) -> AttemptEnd {
    let mut end = AttemptEnd {
        index,
        number: ctx.number,
        outcome: Outcome::Error,
        output: None,
        error: None,
        retryable: false,
        input_fault: false,
        stdout: String::new(),
        stderr: String::new(),
        recorded: None,
    };
    if tool.fleet
        && let Some(remote) = &ctx.remote
    {
        run_remote(remote.as_ref(), tool, input, ctx, cancel, &mut end).await;
        return end;
    }
    match &tool.kind {
        ToolKind::Wasm { path } => {
            let Some(runtime) = ctx.wasm.clone() else {
                end.error = Some(format!(
                    "tool `{}`: no plugin runtime was started",
                    tool.name
                ));
                return end;
            };
            run_plugin(runtime, tool, path.clone(), input, ctx, cancel, &mut end).await;
        }
        ToolKind::Command { argv } => {
            run_command_step(tool, argv, &input, ctx, cancel, &mut end).await
        }
    }
    end
}

/// One attempt on another node: sent through the fleet, its end taken as a local one's, and
/// where it went and ran noted in the step's log.
async fn run_remote(
    remote: &dyn Remote,
    tool: &Tool,
    input: serde_json::Value,
    ctx: &AttemptContext,
    cancel: CancellationToken,
    end: &mut AttemptEnd,
) {
    let attempt = Dispatch {
        run: ctx.run,
        step: ctx.step.clone(),
        number: ctx.number,
        tool: tool.name.clone(),
        input,
        timeout_ms: ctx.timeout.map(|t| t.as_millis() as u64),
    };
    let (index, reports) = (end.index, ctx.reports.clone());
    let notes = Box::new(move |line: String| {
        let _ = reports.send(Message::Note(index, "attempt.dispatched", line));
    });
    let Back {
        ended,
        node,
        recorded,
    } = remote.dispatch(tool, attempt, notes, cancel).await;
    end.recorded = recorded;
    if let Some(node) = node {
        let line = format!("attempt {} ran on node {node}", ctx.number);
        let _ = ctx
            .reports
            .send(Message::Note(index, "attempt.remote", line));
    }
    end.outcome = ended.outcome;
    end.output = ended.output;
    end.error = ended.error;
    end.retryable = ended.retryable;
    end.input_fault = ended.input_fault;
    end.stdout = ended.stdout;
    end.stderr = ended.stderr;
}

/// One attempt through a command: its argv filled from the input (no value may begin an
/// argument with `-` unless the tool allows options), run in its own process group.
async fn run_command_step(
    tool: &Tool,
    argv: &[crate::spec::template::Template],
    input: &serde_json::Value,
    ctx: &AttemptContext,
    cancel: CancellationToken,
    end: &mut AttemptEnd,
) {
    let argv: Result<Vec<String>, _> = argv
        .iter()
        .map(|t| t.render_arg(input, tool.allow_options))
        .collect();
    let argv = match argv {
        Ok(argv) => argv,
        Err(e) => {
            end.error = Some(format!("tool `{}`: {}", tool.name, e.0));
            end.input_fault = true;
            return;
        }
    };
    let mut env = tool.env.clone();
    env.extend([
        ("UET_RUN_ID".into(), ctx.run.to_string()),
        ("UET_STEP_ID".into(), ctx.step.clone()),
        ("UET_ATTEMPT".into(), ctx.number.to_string()),
        (
            "UET_WORKSTREAM".into(),
            ctx.workstream.to_string_lossy().into_owned(),
        ),
    ]);
    let spec = CommandSpec {
        argv,
        cwd: ctx.workstream.clone(),
        stdin: serde_json::to_vec(input).unwrap_or_default(),
        env,
        timeout: ctx.timeout,
        stdout_limit: tool.output_limit(),
        groups: Some(ctx.groups.clone()),
        start_aside: ctx.crowded,
    };
    let mut result = run_command(spec, cancel).await;
    // before anything of it is kept, shown or handed on
    tool.redact(&mut result.stdout.text);
    tool.redact(&mut result.stderr.text);
    end.stdout = bounded(&result.stdout.text);
    end.stderr = bounded(&result.stderr.text);
    command_ended(tool, ctx, result, end);
}

/// Names how a command attempt ended: its outcome, whether a retry can help, and why, with
/// the last line of its stderr.
fn command_ended(
    tool: &Tool,
    ctx: &AttemptContext,
    result: crate::adapters::process::CommandResult,
    end: &mut AttemptEnd,
) {
    match result.exit {
        // a cut output would reach later steps as something the tool never said
        Exit::Code(0) if result.stdout.truncated => {
            end.outcome = Outcome::Failed;
            end.input_fault = true;
            end.error = Some(over_output(result.stdout.total_bytes, tool.output_limit()));
        }
        Exit::Code(0) => {
            end.outcome = Outcome::Succeeded;
            end.output = Some(parse_output(&result.stdout.text));
        }
        Exit::Code(code) => {
            end.outcome = Outcome::Failed;
            end.retryable = tool.exit_codes.is_retryable(code);
            end.input_fault = !end.retryable;
            end.error = Some(result.ending());
        }
        Exit::Signal(_) => {
            end.outcome = Outcome::Failed;
            end.retryable = true;
            end.error = Some(result.ending());
        }
        Exit::TimedOut => {
            end.outcome = Outcome::TimedOut;
            end.retryable = true;
            end.error = Some(format!(
                "timed out after {} and was killed",
                humantime::format_duration(ctx.timeout.unwrap_or_default())
            ));
        }
        Exit::Canceled => {
            end.outcome = Outcome::Canceled;
            end.error = Some("canceled".into());
        }
        Exit::SpawnFailed(e) => {
            end.error = Some(e);
        }
    }
}

/// One attempt through a WASM plugin, on a blocking thread or the run's relay thread; a cancel
/// reaches the running plugin within a tick, as its epoch callback asks the token (which a
/// cancel sets at once, from any thread).
async fn run_plugin(
    runtime: Arc<Runtime>,
    tool: &Tool,
    path: PathBuf,
    input: serde_json::Value,
    ctx: &AttemptContext,
    cancel: CancellationToken,
    end: &mut AttemptEnd,
) {
    let grants = Grants {
        workstream: ctx.workstream.clone(),
        read: tool.sandbox.read.clone(),
        write: tool.sandbox.write.clone(),
        pinned: tool.sha256.clone(),
        check_file: ctx.check_plugin,
    };
    let limits = Limits {
        memory: tool.memory,
        timeout: ctx.timeout,
        fuel: tool.fuel,
        output: tool.output_limit(),
    };
    let limits_output = limits.output;
    let index = end.index;
    let reports = ctx.reports.clone();
    let sink = Box::new(move |r: PluginReport| {
        let _ = reports.send(Message::Plugin(index, r));
    });
    let input = input.to_string();
    let canceled = move || cancel.is_cancelled();
    let attempt = move || runtime.run(&path, &input, &grants, &limits, canceled, Some(sink));
    let ran = match &ctx.relay {
        Some(relay) => relay.run(attempt).await,
        None => tokio::task::spawn_blocking(attempt)
            .await
            .map_err(|e| e.to_string()),
    };
    let result = match ran {
        Ok(r) => r,
        Err(e) => {
            end.error = Some(format!("the plugin's thread failed: {e}"));
            return;
        }
    };
    end.stdout = bounded(&result.stdout);
    end.stderr = bounded(&result.stderr);
    match result.outcome {
        WasmOutcome::Output(text) if text.len() > limits_output => {
            end.outcome = Outcome::Failed;
            end.input_fault = true;
            end.error = Some(over_output(text.len() as u64, limits_output));
        }
        WasmOutcome::Output(text) => {
            end.outcome = Outcome::Succeeded;
            end.output = Some(parse_output(&text));
        }
        WasmOutcome::Failed { message, retryable } => {
            end.outcome = Outcome::Failed;
            end.retryable = retryable;
            end.input_fault = !retryable;
            end.error = Some(message);
        }
        WasmOutcome::TimedOut => {
            end.outcome = Outcome::TimedOut;
            end.retryable = true;
            end.error = Some(format!(
                "timed out after {} and was stopped",
                humantime::format_duration(ctx.timeout.unwrap_or_default())
            ));
        }
        WasmOutcome::Canceled => {
            end.outcome = Outcome::Canceled;
            end.error = Some("canceled".into());
        }
        WasmOutcome::LimitExceeded(why) => {
            end.outcome = Outcome::LimitExceeded;
            end.retryable = true;
            end.error = Some(why);
        }
        WasmOutcome::Trapped(why) => {
            end.outcome = Outcome::Trapped;
            end.retryable = true;
            end.error = Some(why);
        }
        WasmOutcome::Error(why) => end.error = Some(why),
    }
}

/// Why an attempt whose output is over its tool's limit failed.
fn over_output(bytes: u64, limit: usize) -> String {
    format!(
        "its output of {} is over the tool's limit of {} (limits.output in the tools file)",
        crate::spec::doc::show_bytes(bytes),
        crate::spec::doc::show_bytes(limit as u64)
    )
}

/// stdout as JSON when it is JSON; otherwise its text (trimmed of the final newline).
fn parse_output(stdout: &str) -> serde_json::Value {
    let trimmed = stdout.trim();
    if trimmed.is_empty() {
        return serde_json::Value::Null;
    }
    match serde_json::from_str(trimmed) {
        // kept inside the state's rows, a value nested deeper than this could not be read back
        // (serde_json stops at 128 levels): it is kept as the text it came as
        Ok(value) if nesting(&value) <= MAX_OUTPUT_NESTING => value,
        _ => serde_json::Value::String(stdout.trim_end_matches('\n').to_string()),
    }
}

/// How deep an output may nest and still be kept as JSON: well under serde_json's 128 with the
/// rows around it, and deeper than any output meant to be read.
const MAX_OUTPUT_NESTING: usize = 64;

/// How deep a value nests (a scalar is 0).
fn nesting(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(value, 0usize)];
    while let Some((v, depth)) = todo.pop() {
        deepest = deepest.max(depth);
        match v {
            serde_json::Value::Array(items) => todo.extend(items.iter().map(|i| (i, depth + 1))),
            serde_json::Value::Object(map) => todo.extend(map.values().map(|i| (i, depth + 1))),
            _ => {}
        }
    }
    deepest
}

fn bounded(text: &str) -> String {
    if text.len() <= RECORD_LIMIT {
        return text.to_string();
    }
    let cut = (0..=RECORD_LIMIT)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}\n[… {} more bytes]", &text[..cut], text.len() - cut)
}

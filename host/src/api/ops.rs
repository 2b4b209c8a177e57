//! The facade: the reads and writes every face makes, as typed calls over the state. The
//! socket server answers its requests with these, the CLI calls them when it reads a state
//! itself (no daemon answering), and so will the HTTP server: one place that knows how a run
//! is shown, an event log paged, a breaker described.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::api::types::{
    AttemptBar, AttemptLog, AttemptSummary, BreakerShown, EventShown, RunShown, RunSummary, Status,
    StepDetail, StepShown, ToolShown, TopRun, TopView,
};
use crate::model::{BreakerPhase, BreakerRecord, RunId, RunState, StepState, now_millis};
use crate::spec::tools::Tools;
use crate::spec::workflow::Plan;
use crate::state::{StateError, Store};
use crate::views::graph::Layout;

/// Why a call was not answered: the request's own fault (`invalid`: an unknown run, input that
/// cannot be used), or the state's or the daemon's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// In words, for a person.
    pub message: String,
    /// The request's fault: the client exits 2.
    pub invalid: bool,
}

impl Refused {
    /// The request's fault.
    pub fn invalid(message: impl Into<String>) -> Refused {
        Refused {
            message: message.into(),
            invalid: true,
        }
    }
}

impl From<StateError> for Refused {
    fn from(e: StateError) -> Refused {
        Refused {
            invalid: matches!(e, StateError::UnknownRun(_)),
            message: e.to_string(),
        }
    }
}

impl From<Refused> for crate::api::protocol::Response {
    fn from(r: Refused) -> Self {
        crate::api::protocol::Response::Error {
            message: r.message,
            invalid: r.invalid,
        }
    }
}

/// What a running daemon does when asked, whatever face asks: the control socket now, the web
/// dashboard and the fleet next. A face maps its requests onto these calls and the answers onto
/// its own messages, so what a run looks like, and what may be retried or canceled, is decided
/// once, here and in the daemon, never again in a face. Events are not here: each face streams
/// them its own way, through [`events`].
pub trait Control {
    /// The daemon in brief.
    fn status(&self) -> Result<Status, Refused>;
    /// See [`runs`].
    fn runs(&self, limit: Option<usize>) -> Result<Vec<RunSummary>, Refused>;
    /// See [`show`].
    fn show(&self, run: RunId, from: usize) -> Result<RunShown, Refused>;
    /// The tools of every watched folder, with their breakers as they stand.
    fn tools(&self) -> Result<Vec<ToolShown>, Refused>;
    /// See [`top`].
    fn top(&self) -> Result<TopView, Refused>;
    /// See [`metrics`].
    fn metrics(&self) -> Result<String, Refused>;
    /// See [`verify`].
    fn verify(&self, run: RunId) -> Result<String, Refused>;
    /// See [`prune`].
    fn prune(&self, older_than_ms: Option<u64>, keep: Option<usize>) -> Result<String, Refused>;
    /// Runs a workflow file (claimed like a drop when it sits in a watched folder).
    fn submit(&self, path: &Path, sets: &crate::spec::workflow::Sets) -> Result<RunId, Refused>;
    /// Cancels a run that is going.
    fn cancel(&self, run: RunId) -> Result<String, Refused>;
    /// Puts a failed or canceled run's unfinished steps back and resumes it.
    fn retry(&self, run: RunId) -> Result<String, Refused>;
    /// Puts a quarantined run back, as [`Control::retry`] does.
    fn release(&self, run: RunId) -> Result<String, Refused>;
    /// Withdraws the standing workflows of this name: they run no more on changes or on their
    /// schedule (a run going goes on).
    fn unwatch(&self, name: &str) -> Result<String, Refused>;
    /// Stops the daemon: runs going are left to resume at its next start.
    fn stop(&self);
    /// A one-time login address of the web dashboard, or why there is none.
    fn web_login(&self) -> Result<String, Refused>;
    /// The state the facade's reads ([`run_page`], [`step_detail`], [`events`], ...) take.
    fn state(&self) -> &Store;
}

/// Bytes of steps per page of a run shown: half a frame, so the run's own fields and a last
/// step with a large output still fit one.
pub const SHOW_PAGE: usize = 8 << 20;

/// Events per page of an event log: an event's detail is a line or two, so a thousand stay far
/// below a frame however long the log is.
pub const EVENTS_PAGE: usize = 1000;

/// The latest runs (all of them without a limit), oldest first.
pub fn runs(store: &Store, limit: Option<usize>) -> Result<Vec<RunSummary>, Refused> {
    let runs = store.latest_runs(limit.unwrap_or(usize::MAX))?;
    Ok(runs.iter().map(RunSummary::from).collect())
}

/// A run with its steps from the `from`th on, as many as [`SHOW_PAGE`] holds (at least one),
/// read without holding the other steps' outputs; `steps_next` says where the next page starts.
/// The progress is the first page's: a later one would read every step again for it.
pub fn show(store: &Store, run: RunId, from: usize) -> Result<RunShown, Refused> {
    let record = store
        .run(run)?
        .ok_or_else(|| Refused::invalid(format!("no run {run}")))?;
    let progress = if from == 0 {
        let brief = store.steps_brief(run)?;
        crate::engine::progress::load_for(store, &record, &brief)?
    } else {
        None
    };
    let (steps, next) = store.steps_page(run, from, SHOW_PAGE)?;
    let mut shown = RunShown::new(&record, &steps, progress);
    shown.steps_next = next;
    // step by step: a page of a huge run reads only its own steps' attempts
    for step in &mut shown.steps {
        step.attempt_summaries = store
            .attempts(run, &step.id)?
            .iter()
            .map(AttemptSummary::from)
            .collect();
    }
    Ok(shown)
}

/// A run with every step, whatever their size (`uet run --json`, in the process that ran it
/// from `plan`).
pub fn whole_run(
    store: &Store,
    run: RunId,
    plan: &crate::spec::workflow::Plan,
) -> Result<RunShown, Refused> {
    let record = store
        .run(run)?
        .ok_or_else(|| Refused::invalid(format!("no run {run}")))?;
    let steps = store.steps(run)?;
    let progress = Some(crate::engine::progress::with_plan(
        store, &record, plan, &steps,
    )?);
    let mut shown = RunShown::new(&record, &steps, progress);
    let mut by_step: HashMap<String, Vec<AttemptSummary>> = HashMap::new();
    for (step, attempt) in store.run_attempts(run)? {
        by_step
            .entry(step)
            .or_default()
            .push(AttemptSummary::from(&attempt));
    }
    for step in &mut shown.steps {
        step.attempt_summaries = by_step.remove(&step.id).unwrap_or_default();
    }
    Ok(shown)
}

/// A run with every step brief (no outputs: a step panel reads one with [`step_detail`]),
/// and its progress: what a run's page draws, whatever the size of the outputs.
pub fn run_page(store: &Store, run: RunId) -> Result<RunShown, Refused> {
    let record = store
        .run(run)?
        .ok_or_else(|| Refused::invalid(format!("no run {run}")))?;
    let steps = store.steps_brief(run)?;
    let progress = crate::engine::progress::load_for(store, &record, &steps)?;
    Ok(RunShown::new(&record, &steps, progress))
}

/// One step in full: its record and output, what it runs and needs, and every attempt with
/// what it printed.
pub fn step_detail(store: &Store, run: RunId, id: &str) -> Result<StepDetail, Refused> {
    let plan = plan_of(store, run)?;
    let Some(at) = plan.steps.iter().position(|s| s.id == id) else {
        return Err(Refused::invalid(format!("run {run} has no step {id:?}")));
    };
    let planned = &plan.steps[at];
    let record = store
        .step(run, id)?
        .ok_or_else(|| Refused::invalid(format!("run {run} has no step {id:?}")))?;
    Ok(StepDetail {
        step: StepShown::from(&record),
        target: planned.target.to_string(),
        needs: planned
            .needs
            .iter()
            .filter_map(|&d| plan.steps.get(d).map(|s| s.id.clone()))
            .collect(),
        with: planned.with.clone(),
        attempts: store.attempts(run, id)?,
        events: store
            .events(run)?
            .iter()
            .filter(|e| e.step.as_deref() == Some(id))
            .map(|e| EventShown::new(run, e))
            .collect(),
    })
}

/// Every attempt of a run without its output, oldest first: a timeline's bars.
pub fn timeline(store: &Store, run: RunId) -> Result<Vec<AttemptBar>, Refused> {
    known(store, Some(run))?;
    let mut bars: Vec<AttemptBar> = store
        .run_attempts(run)?
        .into_iter()
        .map(|(step, a)| AttemptBar {
            step,
            number: a.number,
            started_at: a.started_at,
            finished_at: a.finished_at,
            outcome: a.outcome,
            retry_at: a.retry_at,
        })
        .collect();
    bars.sort_by_key(|b| (b.started_at, b.number));
    Ok(bars)
}

/// A run's steps laid out for drawing (see [`crate::views::graph`]).
pub fn layout(store: &Store, run: RunId) -> Result<Layout, Refused> {
    Ok(crate::views::graph::layout(&plan_of(store, run)?))
}

/// The latest `limit` runs of one workflow, by name, oldest first: its duration history.
pub fn history(store: &Store, name: &str, limit: usize) -> Result<Vec<RunSummary>, Refused> {
    let mut runs: Vec<RunSummary> = store
        .runs()?
        .iter()
        .filter(|r| r.name == name)
        .map(RunSummary::from)
        .collect();
    runs.sort_by_key(|r| r.run_id);
    let skip = runs.len().saturating_sub(limit);
    Ok(runs.split_off(skip))
}

fn plan_of(store: &Store, run: RunId) -> Result<Plan, Refused> {
    let plan = store
        .plan(run)?
        .ok_or_else(|| Refused::invalid(format!("no run {run}")))?;
    serde_json::from_value(plan).map_err(|e| Refused {
        message: format!("run {run}'s plan cannot be read: {e}"),
        invalid: false,
    })
}

/// Where a reader of event logs is: the last event it has of each run.
#[derive(Debug, Clone, Default)]
pub struct EventCursor(HashMap<RunId, u64>);

/// At most `limit` of the events committed since the cursor, of one run or of every run, and
/// the cursor moved past them.
pub fn events(
    store: &Store,
    run: Option<RunId>,
    cursor: &mut EventCursor,
    limit: usize,
) -> Result<Vec<EventShown>, Refused> {
    let heads = match run {
        Some(r) => vec![(r, u64::MAX)],
        None => store.event_heads()?,
    };
    let mut out = Vec::new();
    for (r, head) in heads {
        let last = cursor.0.get(&r).copied().unwrap_or(0);
        if head <= last {
            continue;
        }
        for e in store.events_page(r, last, limit - out.len())? {
            cursor.0.insert(r, e.seq);
            out.push(EventShown::new(r, &e));
        }
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// What a run's attempts printed and logged: every step's in the plan's order, or `step`'s
/// alone, or only its attempt `attempt`. A plugin's log lines are its step's `plugin.log`
/// events, each given to the attempt that was running when it was written.
pub fn logs(
    store: &Store,
    run: RunId,
    step: Option<&str>,
    attempt: Option<u32>,
) -> Result<Vec<AttemptLog>, Refused> {
    known(store, Some(run))?;
    let plan = plan_of(store, run)?;
    if let Some(id) = step
        && !plan.steps.iter().any(|s| s.id == id)
    {
        return Err(Refused::invalid(format!("run {run} has no step `{id}`")));
    }
    let mut lines: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for e in store.events(run)? {
        if e.kind == "plugin.log"
            && let Some(s) = e.step
            && step.is_none_or(|id| id == s)
        {
            lines.entry(s).or_default().push((e.at, e.detail));
        }
    }
    let mut out = Vec::new();
    for s in plan
        .steps
        .iter()
        .filter(|s| step.is_none_or(|id| id == s.id))
    {
        let attempts = store.attempts(run, &s.id)?;
        let mut said = lines
            .remove(&s.id)
            .unwrap_or_default()
            .into_iter()
            .peekable();
        for (i, a) in attempts.iter().enumerate() {
            // this attempt's lines: those written before the next attempt began
            let next = attempts.get(i + 1).map_or(u64::MAX, |n| n.started_at);
            let mut plugin = Vec::new();
            while let Some((_, line)) = said.next_if(|(at, _)| *at < next) {
                plugin.push(line);
            }
            if attempt.is_some_and(|n| n != a.number) {
                continue;
            }
            out.push(AttemptLog {
                step: s.id.clone(),
                attempt: a.number,
                tool: a.tool.clone(),
                outcome: a.outcome,
                error: a.error.clone(),
                stdout: a.stdout.clone(),
                stderr: a.stderr.clone(),
                plugin,
            });
        }
    }
    if let Some(n) = attempt
        && out.is_empty()
    {
        return Err(Refused::invalid(format!(
            "run {run} has no attempt {n} of that step"
        )));
    }
    Ok(out)
}

/// Whether a run is there to follow: `Ok` when it is (or every run is asked for).
pub fn known(store: &Store, run: Option<RunId>) -> Result<(), Refused> {
    match run {
        Some(r) if store.run(r)?.is_none() => Err(Refused::invalid(format!("no run {r}"))),
        _ => Ok(()),
    }
}

/// Checks a run's event log against its hash chain; says how it went.
pub fn verify(store: &Store, run: RunId) -> Result<String, Refused> {
    match store.verify(run) {
        Ok(Ok(n)) => Ok(format!("run {run}: {n} events, the hash chain holds")),
        Ok(Err(broken)) => Err(Refused {
            message: format!("run {run}: the event log was tampered with: {broken}"),
            invalid: false,
        }),
        Err(StateError::UnknownRun(_)) => Err(Refused::invalid(format!("no run {run}"))),
        Err(e) => Err(e.into()),
    }
}

/// Deletes finished runs older than the age, or beyond the newest `keep`; says how many.
pub fn prune(
    store: &Store,
    older_than_ms: Option<u64>,
    keep: Option<usize>,
) -> Result<String, Refused> {
    if older_than_ms.is_none() && keep.is_none() {
        return Err(Refused::invalid(
            "say what to prune: --older-than AGE and/or --keep N",
        ));
    }
    let before = older_than_ms.map(|ms| now_millis().saturating_sub(ms));
    let n = store.prune(before, keep)?;
    Ok(format!("deleted {n} finished runs"))
}

/// The Prometheus text of the state and the breakers; `active`, the runs a daemon drives now.
pub fn metrics(
    store: &Store,
    breakers: &[(String, BreakerRecord)],
    active: Option<u64>,
) -> Result<String, Refused> {
    let live = active.map(|active| crate::views::metrics::Live { active });
    Ok(crate::views::metrics::render(store, breakers, live)?)
}

/// Runs by state, as `uet status` counts them.
pub fn run_counts(store: &Store) -> Result<BTreeMap<String, u64>, Refused> {
    Ok(store
        .run_counts()?
        .into_iter()
        .map(|(state, n)| (state.to_string(), n))
        .collect())
}

/// The tools of some tools files, each with its breaker as `breaker` says it stands.
pub fn tools(files: &[Tools], breaker: impl Fn(&str) -> Option<BreakerRecord>) -> Vec<ToolShown> {
    let now = now_millis();
    let mut shown = Vec::new();
    for file in files {
        for t in &file.tools {
            let source = t.kind.source();
            let breaker = t.breaker.map(|settings| {
                let r = breaker(&t.key).unwrap_or_default();
                let open = r.phase == BreakerPhase::Open;
                BreakerShown {
                    state: r.phase.as_str().into(),
                    failures: r.failures,
                    opens_after: settings.failures,
                    cool_down_ms: settings.cool_down.as_millis() as u64,
                    opened_at: r.opened_at,
                    probe_at: r.probe_at.filter(|_| open),
                    probe_in_ms: r.probe_at.filter(|_| open).map(|at| at.saturating_sub(now)),
                }
            });
            shown.push(ToolShown {
                name: t.name.clone(),
                kind: t.kind.name().into(),
                capabilities: t.capabilities.clone(),
                source,
                version: t.described.as_ref().map(|d| d.version.clone()),
                input_schema: t
                    .described
                    .as_ref()
                    .and_then(|d| serde_json::from_str(&d.input_schema).ok()),
                tools_file: file.path.clone(),
                breaker,
            });
        }
    }
    shown
}

/// What `uet top` draws: the runs not yet ended with their progress, and the tools.
pub fn top(
    store: &Store,
    status: Option<Status>,
    tools: Vec<ToolShown>,
) -> Result<TopView, Refused> {
    let mut runs = Vec::new();
    let mut queued = 0;
    for r in store.unfinished_runs()? {
        if r.state == RunState::Pending {
            queued += 1;
        }
        let steps = store.steps_brief(r.id)?;
        let progress = crate::engine::progress::load_for(store, &r, &steps)?;
        let running = steps
            .into_iter()
            .filter(|s| s.state == StepState::Running)
            .map(|s| s.id)
            .collect();
        runs.push(TopRun {
            run_id: r.id,
            name: r.name,
            state: r.state,
            trigger: r.trigger,
            started_at: r.started_at,
            progress,
            running,
        });
    }
    Ok(TopView {
        status,
        runs,
        queued,
        tools,
    })
}

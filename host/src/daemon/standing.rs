//! Standing workflows: registered with a run of theirs, watched over the whole workstream,
//! run again when files their globs match have changed and held still, and at the times of
//! their cron schedule.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use crate::model::now_millis;

use tokio::sync::mpsc;

use super::*;

/// Watches a workstream's whole tree for its standing workflows' triggers.
pub(super) fn watch_tree(shared: &Arc<Daemon>, dir: &Path) -> anyhow::Result<()> {
    if lock(&shared.watchers).contains_key(&(dir.to_path_buf(), true)) {
        return Ok(());
    }
    let tx = shared.standing.clone();
    let folder = dir.to_path_buf();
    let watcher = make_watcher(
        dir,
        true,
        shared.config.poll,
        move |event: notify::Event| {
            // reads do not change anything a trigger cares about
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let _ = tx.send(StandingMsg::Changed {
                workstream: folder.clone(),
                paths: event.paths,
            });
        },
    )?;
    lock(&shared.watchers).insert((dir.to_path_buf(), true), watcher);
    Ok(())
}

/// The key a standing workflow is registered under: a later file with the same name in the
/// same workstream replaces it.
pub(super) fn standing_key(workstream: &Path, name: &str) -> String {
    format!("{}\n{name}", workstream.display())
}

/// What the standing-workflow task hears.
pub(super) enum StandingMsg {
    /// A workflow with a trigger was recorded (with `running` set: its first run started).
    Register {
        key: String,
        plan: Box<Plan>,
        workstream: PathBuf,
        source: PathBuf,
        running: Option<RunId>,
    },
    /// Paths under a workstream changed.
    Changed {
        workstream: PathBuf,
        paths: Vec<PathBuf>,
    },
    /// A standing workflow's debounce window may be over: `generation` says which change
    /// armed it; a later change re-armed it.
    Quiet { key: String, generation: u64 },
    /// A run ended.
    Ended(RunId),
    /// `uet unwatch`: the workflow registered under this key is withdrawn (the state has
    /// already forgotten it).
    Forget(String),
}

/// A registered standing workflow.
pub(super) struct Registered {
    plan: Plan,
    workstream: PathBuf,
    source: PathBuf,
    matcher: globset::GlobSet,
    /// Its run in progress.
    running: Option<RunId>,
    /// A change arrived during the run: one follow-up run is due when it ends.
    queued: bool,
    /// Paths changed since its last run started, relative to the workstream.
    changed: std::collections::BTreeSet<String>,
    generation: u64,
    /// When its schedule next runs it.
    next_at: Option<u64>,
}

/// Keeps the standing workflows: debounces the changes their globs match and starts their
/// runs, at most one at a time each, with at most one follow-up queued.
pub(super) async fn standing_loop(
    shared: Arc<Daemon>,
    mut messages: mpsc::UnboundedReceiver<StandingMsg>,
    runs: Vec<crate::model::RunRecord>,
) {
    let mut registry = restore(&shared, &runs);
    let (quiet_tx, mut quiet_rx) = mpsc::unbounded_channel::<StandingMsg>();
    loop {
        show(&shared, &registry);
        let due = registry.values().filter_map(|e| e.next_at).min();
        let wait = due.map(|at| Duration::from_millis(at.saturating_sub(now_millis())));
        let message = tokio::select! {
            m = messages.recv() => m,
            m = quiet_rx.recv() => m,
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                on_schedule(&shared, &mut registry);
                continue;
            }
            _ = shared.shutdown.cancelled() => return,
        };
        let Some(message) = message else { return };
        match message {
            StandingMsg::Register {
                key,
                plan,
                workstream,
                source,
                running,
            } => {
                let empty = plan.trigger.as_ref().is_none_or(|t| !t.stands());
                if empty {
                    registry.remove(&key);
                } else {
                    register(
                        &shared,
                        &mut registry,
                        key,
                        *plan,
                        workstream,
                        source,
                        running,
                    );
                }
            }
            StandingMsg::Changed { workstream, paths } => {
                changed(&mut registry, &workstream, &paths, &quiet_tx)
            }
            StandingMsg::Quiet { key, generation } => {
                let Some(entry) = registry.get_mut(&key) else {
                    continue;
                };
                if entry.generation != generation {
                    continue; // a later change restarted the window
                }
                if entry.running.is_some() {
                    entry.queued = true;
                } else {
                    fire(&shared, entry, "changed");
                }
            }
            StandingMsg::Forget(key) => {
                if let Some(entry) = registry.remove(&key) {
                    tracing::info!(workflow = entry.plan.name, "standing workflow withdrawn");
                }
            }
            StandingMsg::Ended(run) => {
                if let Some(entry) = registry.values_mut().find(|e| e.running == Some(run)) {
                    entry.running = None;
                    if std::mem::take(&mut entry.queued) {
                        fire(&shared, entry, "changed during run");
                    }
                }
            }
        }
    }
}

/// The scheduled times that have come: each such workflow runs (or, with a run in progress,
/// runs once more when it ends), and its next time is reckoned from now, so a clock that
/// jumped or a loop that was late never fires a burst.
fn on_schedule(shared: &Arc<Daemon>, registry: &mut HashMap<String, Registered>) {
    let now = now_millis();
    for entry in registry.values_mut() {
        let Some(at) = entry.next_at.filter(|&at| at <= now) else {
            continue;
        };
        entry.next_at = next_time(&entry.plan, now);
        let what = format!("schedule {}", clock(at, &entry.plan));
        if entry.running.is_some() {
            entry.queued = true;
        } else {
            fire(shared, entry, &what);
        }
    }
}

/// When a workflow's schedule next runs it, after `after`.
fn next_time(plan: &Plan, after: u64) -> Option<u64> {
    let t = plan.trigger.as_ref()?;
    crate::spec::schedule::next_after(t.schedule.as_deref()?, t.zone(), after)
}

/// A scheduled time as people read it, in the schedule's zone.
fn clock(at: u64, plan: &Plan) -> String {
    let zone = plan
        .trigger
        .as_ref()
        .map(|t| t.timezone.clone())
        .unwrap_or_default();
    let utc = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(at));
    format!(
        "{utc} (`{}`, {zone})",
        plan.trigger
            .as_ref()
            .and_then(|t| t.schedule.as_deref())
            .unwrap_or_default()
    )
}

/// The registry as `uet status` and `uet top` show it.
fn show(shared: &Arc<Daemon>, registry: &HashMap<String, Registered>) {
    let mut shown: Vec<crate::api::types::StandingShown> = registry
        .values()
        .map(|e| {
            let t = e.plan.trigger.as_ref();
            crate::api::types::StandingShown {
                name: e.plan.name.clone(),
                workstream: e.workstream.clone(),
                source: e.source.clone(),
                watch: t.map(|t| t.watch.clone()).unwrap_or_default(),
                schedule: t.and_then(|t| t.schedule.clone()),
                timezone: t
                    .filter(|t| t.schedule.is_some())
                    .map(|t| t.timezone.clone()),
                next_at: e.next_at,
                running: e.running,
            }
        })
        .collect();
    shown.sort_by(|a, b| (&a.name, &a.workstream).cmp(&(&b.name, &b.workstream)));
    *lock(&shared.standing_shown) = shown;
}

/// The standing workflows the state holds, registered again; a run of one that the last daemon
/// left unfinished is resuming, so changes queue behind it. A scheduled one with `catch_up =
/// "one"` whose time came while no daemon ran, and that has not run since, runs once now.
fn restore(shared: &Arc<Daemon>, runs: &[crate::model::RunRecord]) -> HashMap<String, Registered> {
    let mut registry: HashMap<String, Registered> = HashMap::new();
    let saved = match shared.store.standing() {
        Ok(saved) => saved,
        Err(e) => {
            tracing::error!("cannot read the standing workflows: {e}");
            return registry;
        }
    };
    let mut all_runs: Option<Vec<crate::model::RunRecord>> = None;
    for (key, record) in saved {
        let Ok(plan) = serde_json::from_value::<Plan>(record["plan"].clone()) else {
            tracing::error!(key, "cannot read a standing workflow back; skipped");
            continue;
        };
        let workstream = PathBuf::from(record["workstream"].as_str().unwrap_or("/"));
        let running = runs
            .iter()
            .rev()
            .find(|r| {
                !r.state.is_terminal()
                    && r.name == plan.name
                    && Path::new(&r.workstream) == workstream
            })
            .map(|r| r.id);
        let source = PathBuf::from(record["source"].as_str().unwrap_or(""));
        let missed = plan.trigger.as_ref().and_then(|t| {
            let schedule = t.schedule.as_deref()?;
            if t.catch_up != crate::spec::workflow::CatchUp::One {
                return None;
            }
            // its latest run of any kind, finished ones included: a run since the latest
            // missed time has done what catching up would
            let last_ran = all_runs
                .get_or_insert_with(|| shared.store.runs().unwrap_or_default())
                .iter()
                .filter(|r| r.name == plan.name && Path::new(&r.workstream) == workstream)
                .map(|r| r.created_at)
                .max()?;
            crate::spec::schedule::missed(schedule, t.zone(), last_ran, now_millis())
        });
        register(
            shared,
            &mut registry,
            key.clone(),
            plan,
            workstream,
            source,
            running,
        );
        if let (Some(at), Some(entry)) = (missed, registry.get_mut(&key)) {
            let what = format!("schedule: caught up on {}", clock(at, &entry.plan));
            if entry.running.is_some() {
                entry.queued = true;
            } else {
                fire(shared, entry, &what);
            }
        }
    }
    registry
}

/// Files of a workstream changed: every standing workflow whose globs match one of them
/// (re)starts its quiet window, and says `Quiet` when the window has passed untouched.
fn changed(
    registry: &mut HashMap<String, Registered>,
    workstream: &Path,
    paths: &[PathBuf],
    quiet: &mpsc::UnboundedSender<StandingMsg>,
) {
    for (key, entry) in registry.iter_mut() {
        if entry.workstream != workstream {
            continue;
        }
        let mut hit = false;
        for path in paths {
            let Ok(rel) = path.strip_prefix(workstream) else {
                continue;
            };
            // the daemon's own bookkeeping is not the workstream's data
            if rel.starts_with(".uet") || rel.starts_with("rejected") {
                continue;
            }
            if entry.matcher.is_match(rel) {
                entry.changed.insert(rel.to_string_lossy().into_owned());
                hit = true;
            }
        }
        if hit {
            entry.generation += 1;
            let (tx, key, generation) = (quiet.clone(), key.clone(), entry.generation);
            let window = entry
                .plan
                .trigger
                .as_ref()
                .map(|t| t.debounce)
                .unwrap_or_default();
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                let _ = tx.send(StandingMsg::Quiet { key, generation });
            });
        }
    }
}

pub(super) fn register(
    shared: &Arc<Daemon>,
    registry: &mut HashMap<String, Registered>,
    key: String,
    plan: Plan,
    workstream: PathBuf,
    source: PathBuf,
    running: Option<RunId>,
) {
    if let Err(e) = watch_tree(shared, &workstream) {
        tracing::error!(workflow = plan.name, "cannot watch its workstream: {e:#}");
    }
    let matcher = plan
        .trigger
        .as_ref()
        .map(|t| t.matcher())
        .unwrap_or_else(globset::GlobSet::empty);
    tracing::info!(workflow = plan.name, workstream = %workstream.display(), "standing workflow registered");
    let next_at = next_time(&plan, now_millis());
    registry.insert(
        key,
        Registered {
            plan,
            workstream,
            source,
            matcher,
            running,
            queued: false,
            changed: Default::default(),
            generation: 0,
            next_at,
        },
    );
}

/// Starts a standing workflow's run for the changes gathered so far.
pub(super) fn fire(shared: &Arc<Daemon>, entry: &mut Registered, what: &str) {
    let changed = std::mem::take(&mut entry.changed);
    let mut names: Vec<&str> = changed.iter().map(String::as_str).take(3).collect();
    let more = changed.len().saturating_sub(names.len());
    let mut why = format!("trigger: {what}");
    if !names.is_empty() {
        why.push_str(&format!(": {}", names.join(", ")));
    }
    if more > 0 {
        why.push_str(&format!(" (+{more} more)"));
    }
    names.clear();
    let tools = match load_tools(shared, &entry.workstream) {
        Ok(t) => t,
        Err(p) => {
            tracing::error!(workflow = entry.plan.name, "cannot run: its tools: {p}");
            return;
        }
    };
    let steps: Vec<String> = entry.plan.steps.iter().map(|s| s.id.clone()).collect();
    let created = shared.store.create(NewRun {
        name: &entry.plan.name,
        source: &entry.source.to_string_lossy(),
        workstream: &entry.workstream.to_string_lossy(),
        plan: (&entry.plan).into(),
        steps: &steps,
        trigger: Some(&why),
        submission: None,
        standing: None,
    });
    match created {
        Ok(run) => {
            tracing::info!(run, workflow = entry.plan.name, "{why}");
            entry.running = Some(run);
            start(
                shared,
                run,
                entry.plan.clone(),
                entry.workstream.clone(),
                tools,
                false,
            );
        }
        Err(e) => tracing::error!(workflow = entry.plan.name, "cannot record its run: {e}"),
    }
}

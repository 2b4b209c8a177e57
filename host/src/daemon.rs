//! `uet daemon`: watched folders in, runs out, a control socket for people and scripts.
//!
//! One process owns the state. Files dropped into a watched folder are claimed by renaming them
//! into `.uet/claimed/`, validated, recorded durably together with the claim, and only then
//! removed; a restart finishes whatever a crash interrupted in between. Runs go through the
//! same engine as `uet run`, at most `max_runs` at once.

use crate::engine::notify::Webhooks;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::adapters::wasm::Runtime;
use crate::api::ops;
use crate::engine::breaker::Breakers;
use crate::engine::{self, Pause, Relaying, RunSpec};
use crate::model::{RunId, RunState};
use crate::spec::tools::{TOOLS_FILE, Tools};
use crate::spec::workflow::{self, Plan};
use crate::state::{Change, NewRun, StandingChange, Store, Submission};

mod control;
mod dropped;
mod intake;
mod server;
mod standing;

use intake::*;
use server::*;
use standing::*;

/// A run found in flight at this many daemon starts in a row (each after an unclean stop) is
/// quarantined as a suspected cause instead of being resumed again.
const CRASH_LIMIT: u32 = 2;

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state folder.
    pub state: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// Watched folders (workstreams).
    pub watch: Vec<PathBuf>,
    /// A tools file for every folder; else each folder's own `tools.toml`.
    pub tools: Option<PathBuf>,
    /// Runs driven at once.
    pub max_runs: usize,
    /// Quiet time before a file written in place is read: a file still being written is not.
    pub settle: Duration,
    /// How long running steps may finish at shutdown before they are stopped (their runs
    /// resume at the next start).
    pub grace: Duration,
    /// Poll folders at this interval instead of using the kernel's notifications (which are
    /// still abandoned for polling when the inotify limits are reached).
    pub poll: Option<Duration>,
    /// Serve `GET /metrics` on this loopback address (off when `None`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve the web dashboard on this address (off when `None`).
    pub http: Option<std::net::SocketAddr>,
    /// Whether `http` may be an address beyond loopback.
    pub http_public: bool,
    /// The fleet to join, if any (docs/FLEET.md).
    pub fleet: Option<crate::fleet::Config>,
    /// Retention: finished runs older than this are deleted.
    pub keep_for: Option<Duration>,
    /// Retention: only this many finished runs are kept, the newest.
    pub keep_runs: Option<usize>,
    /// The largest dropped or submitted file read; a larger one is refused unread.
    pub max_file: u64,
    /// The webhook addresses `[notify]` may call (prefixes); none unless listed.
    pub webhooks: Vec<String>,
}

/// Retention runs at start, then at most this often as runs end: it reads every run.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

struct Daemon {
    config: Config,
    store: Store,
    wasm: Option<Arc<Runtime>>,
    slots: Semaphore,
    active: Mutex<HashMap<RunId, CancellationToken>>,
    shutdown: CancellationToken,
    started: Instant,
    inbox: mpsc::UnboundedSender<FolderEvent>,
    standing: mpsc::UnboundedSender<StandingMsg>,
    /// Every tool's circuit breaker, shared by all runs.
    breakers: Arc<Breakers>,
    /// Where command steps' process groups are noted while they run.
    groups: Arc<crate::adapters::process::Groups>,
    /// Where `GET /metrics` is served, if it is.
    metrics_at: Mutex<Option<String>>,
    /// The web dashboard's logins and caches, when it is served.
    web: Option<Arc<crate::web::Web>>,
    /// This daemon's place in a fleet, when it has joined one.
    fleet: Option<crate::fleet::Fleet>,
    /// When retention last ran, and whether a run is already scheduled.
    pruned: Mutex<(Instant, bool)>,
    /// The standing workflows as the standing task last left them, for `uet status`.
    standing_shown: Mutex<Vec<crate::api::types::StandingShown>>,
    /// The live watchers, by folder and whether they watch its whole tree (standing
    /// workflows) or its direct children (the inbox).
    watchers: Mutex<HashMap<(PathBuf, bool), Box<dyn notify::Watcher + Send>>>,
    /// Counts refused drops, so that a stream of every run's events wakes to show them.
    refusals: tokio::sync::watch::Sender<u64>,
    /// Counts runs let go of ([`Daemon::let_go`]): a run's end is followed by no commit, so
    /// this is what wakes a stream waiting for it to leave `active`.
    let_go: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the daemon until it is asked to stop.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = open_state(&config)?;
    // steps a killed daemon left running must not go on beside their retries
    let (groups, reaped) = engine::open_groups(&store)?;
    if reaped > 0 {
        tracing::warn!("killed {reaped} process groups left running by an earlier uet");
    }
    let metrics_listener = metrics_listener(config.metrics).await?;
    let http_listener = match config.http {
        Some(addr) => Some(crate::web::listen(addr, config.http_public).await?),
        None => None,
    };
    let fleet = match &config.fleet {
        Some(f) => Some(crate::fleet::join(f).await?),
        None => None,
    };
    let web = http_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|addr| Arc::new(crate::web::Web::new(addr)));
    let listener = bind(&config.socket).await?;
    let watch: Vec<PathBuf> = config
        .watch
        .iter()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
        .collect();
    let unready = own_watched_folders(&watch)?;
    let wasm = Some(Arc::new(Runtime::new(
        Some(crate::adapters::wasm::cache_dir(&config.state)),
        largest_memory(&config, &watch),
    )?));
    let breakers = Arc::new(Breakers::load(&store)?);
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel::<FolderEvent>();
    let (standing_tx, standing_rx) = mpsc::unbounded_channel::<StandingMsg>();
    let shared = Arc::new(Daemon {
        slots: Semaphore::new(config.max_runs.max(1)),
        config: Config {
            watch: watch.clone(),
            ..config
        },
        store,
        wasm,
        active: Mutex::new(HashMap::new()),
        shutdown: CancellationToken::new(),
        started: Instant::now(),
        inbox: inbox_tx,
        standing: standing_tx,
        breakers,
        groups: Arc::new(groups),
        metrics_at: Mutex::new(None),
        web,
        fleet,
        pruned: Mutex::new((Instant::now(), false)),
        standing_shown: Mutex::new(Vec::new()),
        watchers: Mutex::new(HashMap::new()),
        refusals: tokio::sync::watch::Sender::new(0),
        let_go: tokio::sync::watch::Sender::new(0),
    });
    let folders: Vec<String> = watch.iter().map(|d| d.display().to_string()).collect();
    tracing::info!(
        "uet daemon {} started: watching {}; socket {}; state {}",
        env!("CARGO_PKG_VERSION"),
        folders.join(", "),
        shared.config.socket.display(),
        shared.config.state.display()
    );
    stop_on_signals(&shared)?;
    retain(&shared);
    let unfinished = resume_unfinished(&shared)?;
    tokio::spawn(standing_loop(shared.clone(), standing_rx, unfinished));
    for dir in &watch {
        if unready.contains(dir) {
            tokio::spawn(await_folder(shared.clone(), dir.clone()));
            continue;
        }
        recover_claims(&shared, dir);
        watch_inbox(&shared, dir)?;
    }
    tokio::spawn(inbox(shared.clone(), inbox_rx));
    work_for_the_fleet(&shared).await?;
    if let Some(listener) = metrics_listener {
        serve_metrics(&shared, listener);
    }
    if let (Some(listener), Some(web)) = (http_listener, shared.web.clone()) {
        tracing::info!(
            "web dashboard on http://{} (`uet web` for a login address)",
            web.addr()
        );
        let control: Arc<dyn crate::api::ops::Control + Send + Sync> = Arc::new(shared.clone());
        crate::web::spawn(control, web, listener, shared.shutdown.clone());
    }
    accept_loop(&shared, &listener).await;
    drop(listener);
    stop(&shared).await;
    Ok(())
}

/// In a fleet, takes others' attempts of the fleet tools this node has (those of its watched
/// folders' tools files), as many at once as its `fleet_slots`.
async fn work_for_the_fleet(shared: &Arc<Daemon>) -> anyhow::Result<()> {
    let (Some(fleet), Some(wasm)) = (&shared.fleet, &shared.wasm) else {
        return Ok(());
    };
    let mut work = Vec::new();
    for dir in &shared.config.watch {
        let Ok(tools) = load_tools(shared, dir) else {
            continue;
        };
        fleet
            .share_breakers(shared.breakers.clone(), &tools.tools)
            .await;
        for tool in tools.tools.into_iter().filter(|t| t.fleet) {
            work.push(crate::fleet::Work {
                tool,
                workstream: dir.clone(),
            });
        }
    }
    crate::fleet::work(
        fleet,
        work,
        wasm.clone(),
        shared.groups.clone(),
        shared.shutdown.clone(),
    )
    .await
}

/// Opens the state, saying plainly when another uet has it.
fn open_state(config: &Config) -> anyhow::Result<Store> {
    Store::open(&config.state).map_err(|e| match e {
        crate::state::StateError::InUse(path) => anyhow::anyhow!(
            "another uet process (a daemon, or `uet run`) is using the state {}",
            path.display()
        ),
        e => e.into(),
    })
}

/// The listener of `GET /metrics`, when asked for: on loopback only, as scrapers are local.
async fn metrics_listener(
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(addr) if !addr.ip().is_loopback() => {
            anyhow::bail!("metrics: {addr} is not a loopback address (use 127.0.0.1 or ::1)")
        }
        Some(addr) => {
            Ok(Some(tokio::net::TcpListener::bind(addr).await.map_err(
                |e| anyhow::anyhow!("metrics: cannot listen on {addr}: {e}"),
            )?))
        }
        None => Ok(None),
    }
}

/// Makes each watched folder (as uet always has) and the daemon's own folders in it; returns
/// those whose own folders a dropper made first (or a link in their place): they stay
/// unwatched, with the reason, until mended, and the others go on.
fn own_watched_folders(watch: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut unready = Vec::new();
    for dir in watch {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        if let Err(e) = own_folders(dir) {
            tracing::error!(folder = %dir.display(), "not watched until this is mended: {e}");
            unready.push(dir.clone());
        }
    }
    Ok(unready)
}

/// The most memory any usable tools file gives a plugin, to size the plugin pool by. With
/// `--tools` the folders' own files are never opened: droppers may have put anything there.
fn largest_memory(config: &Config, watch: &[PathBuf]) -> u64 {
    let files: Vec<PathBuf> = match &config.tools {
        Some(file) => vec![file.clone()],
        None => watch.iter().map(|d| d.join(TOOLS_FILE)).collect(),
    };
    let mut largest = 0;
    for file in &files {
        match Tools::load(file) {
            Ok(tools) => largest = largest.max(tools.max_memory()),
            // said once here; each workflow it would serve is refused with the same reason
            Err(problems) => tracing::warn!("tools file not used: {problems}"),
        }
    }
    largest
}

/// SIGTERM and SIGINT mean a graceful stop: registered before the first run starts.
fn stop_on_signals(shared: &Arc<Daemon>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = shared.shutdown.clone();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals.cancel();
    });
    Ok(())
}

/// Runs a previous daemon left unfinished go first, then what arrived while it was down;
/// returns the runs that go on (for the standing workflows they hold up).
fn resume_unfinished(shared: &Arc<Daemon>) -> anyhow::Result<Vec<crate::model::RunRecord>> {
    let mut unfinished = Vec::new();
    for run in shared.store.unfinished_runs()? {
        let resumed = match run.state {
            RunState::Pending => {
                resume(shared, run.id, false);
                true
            }
            // still running in the state: the last daemon did not stop cleanly
            RunState::Running => recover(shared, &run),
            _ => false,
        };
        // a run recovery quarantined holds no standing workflow up
        if resumed {
            unfinished.push(run);
        }
    }
    Ok(unfinished)
}

/// Serves `GET /metrics` on its listener, through the facade.
fn serve_metrics(shared: &Arc<Daemon>, listener: tokio::net::TcpListener) {
    *lock(&shared.metrics_at) = listener.local_addr().ok().map(|a| a.to_string());
    let for_render = shared.clone();
    let render: Arc<dyn Fn() -> Result<String, String> + Send + Sync> = Arc::new(move || {
        let active = lock(&for_render.active).len() as u64;
        ops::metrics(&for_render.store, &for_render.breakers.all(), Some(active))
            .map_err(|e| e.message)
    });
    tokio::spawn(crate::views::metrics::serve_http(
        listener,
        render,
        shared.shutdown.clone(),
    ));
}

/// Stops taking work; running steps get the grace period (the engine sees the same token),
/// then their runs go back to pending for the next start.
async fn stop(shared: &Arc<Daemon>) {
    lock(&shared.watchers).clear();
    let _ = std::fs::remove_file(&shared.config.socket);
    let deadline = Instant::now() + shared.config.grace + Duration::from_secs(5);
    while !lock(&shared.active).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("uet daemon stopped");
}

/// A run the last daemon left running: resumed, or quarantined when this is the second start
/// in a row that finds it so. Whether it goes on (is not quarantined).
fn recover(shared: &Arc<Daemon>, run: &crate::model::RunRecord) -> bool {
    if run.crashes + 1 < CRASH_LIMIT {
        // the crash is counted once the run is driven again, not while it waits for a slot:
        // a run that never got to run after a crash is no suspect
        resume(shared, run.id, true);
        return true;
    }
    let reason = format!(
        "in flight during {CRASH_LIMIT} unclean stops of uet in a row (a suspected cause); \
         `uet release {}` runs it again",
        run.id
    );
    let quarantined = engine::requeue_in_flight(&shared.store, run.id).and_then(|mut changes| {
        changes.push(Change::RunState {
            run: run.id,
            to: RunState::Quarantined,
            reason: Some(reason),
        });
        shared.store.apply(&changes)
    });
    match quarantined {
        Ok(()) => {
            tracing::warn!(run = run.id, "quarantined after repeated unclean stops");
            false
        }
        // left as it was: still unfinished, and tried again at the next start
        Err(e) => {
            tracing::error!(run = run.id, "cannot recover: {e}");
            true
        }
    }
}

fn load_tools(shared: &Daemon, dir: &Path) -> Result<Tools, crate::spec::doc::Problems> {
    let file = shared
        .config
        .tools
        .clone()
        .unwrap_or_else(|| dir.join(TOOLS_FILE));
    let mut tools = Tools::load(&file)?;
    if let Some(rt) = &shared.wasm {
        crate::adapters::wasm::describe_tools(&mut tools, rt, false)?;
    }
    Ok(tools)
}

/// Records a run of a dropped or submitted workflow; a standing workflow is registered (or,
/// with `watch = []`, forgotten) in the same transaction.
fn record(
    shared: &Arc<Daemon>,
    plan: &Plan,
    source: &Path,
    workstream: &Path,
    submission: Option<Submission<'_>>,
    why: &str,
) -> anyhow::Result<RunId> {
    let steps: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
    let key = standing_key(workstream, &plan.name);
    let standing = plan.trigger.as_ref().map(|t| {
        if t.stands() {
            StandingChange::Register(&key)
        } else {
            StandingChange::Unregister(&key)
        }
    });
    let why = match &plan.trigger {
        Some(t) if t.stands() => {
            let mut when = Vec::new();
            if !t.watch.is_empty() {
                when.push(format!("on changes to {}", t.watch.join(", ")));
            }
            if let Some(s) = &t.schedule {
                when.push(format!("at `{s}` ({})", t.timezone));
            }
            format!("{why}; standing: runs again {}", when.join(" and "))
        }
        _ => why.to_string(),
    };
    let source_text = source.to_string_lossy();
    let workstream_text = workstream.to_string_lossy();
    let run = shared.store.create(NewRun {
        name: &plan.name,
        source: &source_text,
        workstream: &workstream_text,
        plan: plan.into(),
        steps: &steps,
        trigger: Some(&why),
        submission,
        standing,
    })?;
    if let Some(t) = &plan.trigger {
        let _ = shared.standing.send(StandingMsg::Register {
            key,
            plan: Box::new(plan.clone()),
            workstream: workstream.to_path_buf(),
            source: source.to_path_buf(),
            // a standing workflow's first run counts as in progress: changes queue behind it
            running: t.stands().then_some(run),
        });
    }
    Ok(run)
}

/// Resumes a run recorded by an earlier daemon; `recovered` when that daemon did not stop
/// cleanly while the run was in flight.
fn resume(shared: &Arc<Daemon>, run: RunId, recovered: bool) {
    let load = || -> anyhow::Result<(Plan, PathBuf, Tools)> {
        let record = shared
            .store
            .run(run)?
            .ok_or_else(|| anyhow::anyhow!("no run {run}"))?;
        let plan: Plan = serde_json::from_value(shared.store.plan(run)?.unwrap_or_default())?;
        let workstream = PathBuf::from(record.workstream);
        let tools = load_tools(shared, &workstream).map_err(|p| anyhow::anyhow!("{p}"))?;
        Ok((plan, workstream, tools))
    };
    match load() {
        Ok((plan, workstream, tools)) => start(shared, run, plan, workstream, tools, recovered),
        Err(e) => tracing::error!(run, "cannot resume: {e:#}"),
    }
}

impl Daemon {
    /// The run is no longer this daemon's to drive (ended, canceled before it began, or left
    /// for the next start): out of `active`, and streams waiting for its end are told.
    fn let_go(&self, run: RunId) {
        lock(&self.active).remove(&run);
        self.let_go.send_modify(|n| *n += 1);
    }
}

/// Drives a run on its own task once a slot is free. `recovered`: it was in flight during an
/// unclean stop, which counts toward its quarantine once it runs again.
fn start(
    shared: &Arc<Daemon>,
    run: RunId,
    plan: Plan,
    workstream: PathBuf,
    tools: Tools,
    recovered: bool,
) {
    let cancel = CancellationToken::new();
    lock(&shared.active).insert(run, cancel.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        let permit = tokio::select! {
            // a stop wins over a slot freed at the same moment: no run starts after it
            biased;
            // still pending: it simply waits for the next start
            _ = shared.shutdown.cancelled() => {
                shared.let_go(run);
                return;
            }
            _ = cancel.cancelled() => None,
            p = shared.slots.acquire() => p.ok(),
        };
        if permit.is_some() && recovered {
            let counted = {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || {
                    shared.store.apply(&[Change::Recovered { run }])
                })
                .await
            };
            if !matches!(counted, Ok(Ok(()))) {
                tracing::error!(run, "cannot record its recovery; left for the next start");
                shared.let_go(run);
                return;
            }
        }
        let result = if permit.is_some() {
            let spec = RunSpec {
                run,
                plan: &plan,
                workstream: &workstream,
                tools: &tools,
                wasm: shared.wasm.clone(),
                pause: Some(Pause {
                    token: shared.shutdown.clone(),
                    grace: shared.config.grace,
                }),
                breakers: shared.breakers.clone(),
                groups: shared.groups.clone(),
                remote: shared.fleet.as_ref().map(|f| f.remote()),
                // its threads are every run's, the socket's and the watcher's: only a run
                // driven alone may have a thread spin for it
                relaying: Relaying::WhileAlone(Arc::new({
                    let shared = shared.clone();
                    move || shared.slots.available_permits() + 1 >= shared.config.max_runs.max(1)
                })),
            };
            engine::execute(&shared.store, spec, cancel, None)
                .await
                .map(|_| ())
        } else {
            cancel_pending(&shared.store, run)
        };
        if let Err(e) = result {
            tracing::error!(run, "run stopped on an error: {e}");
        }
        drop(permit);
        if plan.notify.is_some() {
            // after its slot is free: a slow webhook holds no run up
            let shared = shared.clone();
            tokio::spawn(async move {
                let allowed = Webhooks::Listed(shared.config.webhooks.clone());
                match allowed.allows(plan.notify.as_ref()) {
                    Ok(()) => {
                        engine::notify::run_ended(&shared.store, run, &plan, &tools, &workstream)
                            .await
                    }
                    Err(why) => {
                        let _ = shared.store.apply(&[Change::Event {
                            run,
                            step: None,
                            kind: "notify.failed".into(),
                            detail: why,
                        }]);
                    }
                }
            });
        }
        shared.let_go(run);
        let _ = shared.standing.send(StandingMsg::Ended(run));
        schedule_retention(&shared);
    });
}

/// Applies the retention settings now.
fn retain(shared: &Daemon) {
    let config = &shared.config;
    if config.keep_for.is_none() && config.keep_runs.is_none() {
        return;
    }
    let before = config
        .keep_for
        .map(|age| crate::model::now_millis().saturating_sub(age.as_millis() as u64));
    match shared.store.prune(before, config.keep_runs) {
        Ok(0) => {}
        Ok(n) => tracing::info!("retention: deleted {n} finished runs"),
        Err(e) => tracing::error!("retention failed: {e}"),
    }
    *lock(&shared.pruned) = (Instant::now(), false);
}

/// Runs retention after a run ends: at once if it last ran long enough ago, else once, later.
fn schedule_retention(shared: &Arc<Daemon>) {
    if shared.config.keep_for.is_none() && shared.config.keep_runs.is_none() {
        return;
    }
    let wait = {
        let mut pruned = lock(&shared.pruned);
        if pruned.1 {
            return; // one is scheduled already
        }
        pruned.1 = true;
        PRUNE_EVERY.saturating_sub(pruned.0.elapsed())
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let _ = tokio::task::spawn_blocking(move || retain(&shared)).await;
    });
}

fn cancel_pending(store: &Store, run: RunId) -> Result<(), engine::EngineError> {
    store.apply(&[Change::RunState {
        run,
        to: RunState::Canceled,
        reason: Some("canceled before it started".into()),
    }])?;
    Ok(())
}

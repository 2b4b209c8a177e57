//! `uet daemon`: watched folders in, runs out, a control socket for people and scripts.
//!
//! One process owns the state. Files dropped into a watched folder are claimed by renaming them
//! into `.uet/claimed/`, validated, recorded durably together with the claim, and only then
//! removed; a restart finishes whatever a crash interrupted in between. Runs go through the
//! same engine as `uet run`, at most `max_runs` at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::engine::breaker::Breakers;
use crate::engine::{self, Pause, RunSpec};
use crate::model::{RunId, RunState};
use crate::api::ops;
use crate::api::protocol::{self, Request, Response, Status};
use crate::state::{Change, NewRun, Standing as StandingChange, Store, Submission};
use crate::spec::tools::{TOOLS_FILE, Tools};
use crate::adapters::wasm::Runtime;
use crate::spec::workflow::{self, Plan};

mod intake;

/// A run found in flight at this many daemon starts in a row (each after an unclean stop) is
/// quarantined as a suspected cause instead of being resumed again.
const CRASH_LIMIT: u32 = 2;

/// How long a client may take to read an answer before it is dropped.
const SEND_TIME: Duration = Duration::from_secs(60);

/// Writes an answer to a client, which must read it within [`SEND_TIME`].
async fn send<T: serde::Serialize>(
    conn: &mut interprocess::local_socket::tokio::Stream,
    message: &T,
) -> Result<(), protocol::FrameError> {
    protocol::write_frame_within(conn, message, SEND_TIME).await
}

/// Control connections served at once: far more than people and scripts need, and few enough
/// that a client holding connections open cannot take every file descriptor.
const MAX_CONNECTIONS: usize = 256;

/// How long a new connection may take to send its first request, and an open one to send the
/// rest of a request it began: a client that stalls is dropped, not waited for.
const REQUEST_TIME: Duration = Duration::from_secs(10);

/// How long a connection may sit between requests (`uet top` asks every second or so).
const IDLE_TIME: Duration = Duration::from_secs(600);

/// The first and the longest pause after a failed accept.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// How long a file held open by some process, and not changing, is waited for before it is
/// read anyway (its close event may have been lost when the kernel's queue overflowed).
const OPEN_WAIT: Duration = Duration::from_secs(60);

/// Dropped files read and checked at once. Checking a file at the size limit can take a few
/// hundred MB (a 100,000-step workflow takes 380 MB to plan): a burst of large drops is
/// taken in a few at a time, so memory stays bounded however many arrive.
const CLAIMS_AT_ONCE: usize = 4;

/// The KiB of dropped files read and checked at once, at most: checking a file takes up to
/// some 80 times its size (8 MiB of a TOML array of numbers took 640 MB), so the largest files
/// are taken in one at a time, and smaller ones several at once.
const CLAIM_KIB: usize = 8 << 10;

/// What a claim waits for before it reads its file: one of [`CLAIMS_AT_ONCE`] turns, and its
/// file's share of [`CLAIM_KIB`].
struct Claiming {
    turns: Arc<Semaphore>,
    kib: Arc<Semaphore>,
}

impl Claiming {
    /// Waits for a turn to take `path` in; `None` when the daemon is stopping.
    async fn turn(
        &self,
        path: &Path,
        max_file: u64,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        // a file over the limit is refused unread: its size weighs nothing
        let size = std::fs::symlink_metadata(path).map_or(0, |m| m.len());
        let kib = if size > max_file {
            1
        } else {
            (size >> 10).clamp(1, CLAIM_KIB as u64) as u32
        };
        let turn = self.turns.clone().acquire_owned().await.ok()?;
        let share = self.kib.clone().acquire_many_owned(kib).await.ok()?;
        Some((turn, share))
    }
}

/// How long taking in one dropped file may take before the inbox stops waiting for it.
const CLAIM_TIME: Duration = Duration::from_secs(60);

/// How often a watched folder that was deleted is looked for, until it is back.
const REAPPEAR_POLL: Duration = Duration::from_millis(250);

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
    /// Retention: finished runs older than this are deleted.
    pub keep_for: Option<Duration>,
    /// Retention: only this many finished runs are kept, the newest.
    pub keep_runs: Option<usize>,
    /// The largest dropped or submitted file read; a larger one is refused unread.
    pub max_file: u64,
}

/// Retention runs at start, then at most this often as runs end: it reads every run.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// What the inbox task hears from the folder watchers.
enum Inbox {
    /// A path changed, and how.
    Path(PathBuf, Seen),
    /// A watched folder is gone (deleted or moved away).
    Gone(PathBuf),
}

/// What a watcher saw happen to a path in a watched folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// It was renamed in: complete already.
    RenamedIn,
    /// Something opened it (a writer, perhaps).
    Opened,
    /// Something that had it open closed it.
    Closed,
    /// Anything else: written, made, listed at start.
    Changed,
}

struct Shared {
    config: Config,
    store: Store,
    wasm: Option<Arc<Runtime>>,
    slots: Semaphore,
    active: Mutex<HashMap<RunId, CancellationToken>>,
    shutdown: CancellationToken,
    started: Instant,
    inbox: mpsc::UnboundedSender<Inbox>,
    standing: mpsc::UnboundedSender<StandingMsg>,
    /// Every tool's circuit breaker, shared by all runs.
    breakers: Arc<Breakers>,
    /// Where command steps' process groups are noted while they run.
    groups: Arc<crate::adapters::process::Groups>,
    /// Where `GET /metrics` is served, if it is.
    metrics_at: Mutex<Option<String>>,
    /// When retention last ran, and whether a run is already scheduled.
    pruned: Mutex<(Instant, bool)>,
    /// The live watchers, by folder and whether they watch its whole tree (standing
    /// workflows) or its direct children (the inbox).
    watchers: Mutex<HashMap<(PathBuf, bool), Box<dyn notify::Watcher + Send>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the daemon until it is asked to stop.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = Store::open(&config.state).map_err(|e| match e {
        crate::state::StateError::InUse(path) => {
            anyhow::anyhow!(
                "another uet process (a daemon, or `uet run`) is using the state {}",
                path.display()
            )
        }
        e => e.into(),
    })?;
    // steps a killed daemon left running must not go on beside their retries
    let (groups, reaped) = engine::open_groups(&store)?;
    if reaped > 0 {
        tracing::warn!("killed {reaped} process groups left running by an earlier uet");
    }
    let metrics_listener = match config.metrics {
        // scrapers are local: the daemon serves no one beyond this machine
        Some(addr) if !addr.ip().is_loopback() => {
            anyhow::bail!("metrics: {addr} is not a loopback address (use 127.0.0.1 or ::1)")
        }
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics: cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let listener = bind(&config.socket).await?;
    let watch: Vec<PathBuf> = config
        .watch
        .iter()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
        .collect();
    // the daemon's own folders in each watched folder, made now: one a dropper made first (or
    // a link in its place) keeps that folder unwatched, with the reason, until it is mended;
    // the other folders go on
    let mut unready = Vec::new();
    for dir in &watch {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        if let Err(e) = own_folders(dir) {
            tracing::error!(folder = %dir.display(), "not watched until this is mended: {e}");
            unready.push(dir.clone());
        }
    }
    // with --tools the folders' own files are never opened: droppers may have put anything there
    let tools_files: Vec<PathBuf> = match &config.tools {
        Some(file) => vec![file.clone()],
        None => watch.iter().map(|d| d.join(TOOLS_FILE)).collect(),
    };
    let mut max_memory = 0;
    for file in &tools_files {
        match Tools::load(file) {
            Ok(tools) => max_memory = max_memory.max(tools.max_memory()),
            // said once here; each workflow it would serve is refused with the same reason
            Err(problems) => tracing::warn!("tools file not used: {problems}"),
        }
    }
    let wasm = Some(Arc::new(Runtime::new(
        Some(crate::adapters::wasm::cache_dir(&config.state)),
        max_memory,
    )?));
    let breakers = Arc::new(Breakers::load(&store)?);
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel::<Inbox>();
    let (standing_tx, standing_rx) = mpsc::unbounded_channel::<StandingMsg>();
    let shared = Arc::new(Shared {
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
        pruned: Mutex::new((Instant::now(), false)),
        watchers: Mutex::new(HashMap::new()),
    });
    tracing::info!(socket = %shared.config.socket.display(), "uet daemon listening");

    let signals = shared.shutdown.clone();
    // registered before the first run starts, so SIGTERM/SIGINT always mean a graceful stop
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals.cancel();
    });

    retain(&shared);
    // runs a previous daemon left unfinished go first, then what arrived while it was down
    let mut unfinished = Vec::new();
    for run in shared.store.runs()? {
        let resumed = match run.state {
            RunState::Pending => {
                resume(&shared, run.id, false);
                true
            }
            // still running in the state: the last daemon did not stop cleanly
            RunState::Running => recover(&shared, &run),
            _ => false,
        };
        // a run recovery quarantined holds no standing workflow up
        if resumed {
            unfinished.push(run);
        }
    }
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
    if let Some(listener) = metrics_listener {
        *lock(&shared.metrics_at) = listener.local_addr().ok().map(|a| a.to_string());
        let for_render = shared.clone();
        let render: Arc<dyn Fn() -> Result<String, String> + Send + Sync> =
            Arc::new(move || {
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

    accept_loop(&shared, &listener).await;

    // stop taking work; running steps get the grace period (the engine sees the same token),
    // then their runs go back to pending for the next start
    lock(&shared.watchers).clear();
    drop(listener);
    let _ = std::fs::remove_file(&shared.config.socket);
    let deadline = Instant::now() + shared.config.grace + Duration::from_secs(5);
    while !lock(&shared.active).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("uet daemon stopped");
    Ok(())
}

/// Accepts control connections until shutdown: at most [`MAX_CONNECTIONS`] at once (the
/// others wait in the kernel's queue), and a failing accept (out of file descriptors, say) is
/// retried after a pause that grows, logged at most once a second, instead of spinning.
async fn accept_loop(shared: &Arc<Shared>, listener: &interprocess::local_socket::tokio::Listener) {
    use interprocess::local_socket::tokio::prelude::*;
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut pause = Duration::ZERO;
    let mut last_logged: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("never closed"),
            _ = shared.shutdown.cancelled() => return,
        };
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => {
                    pause = Duration::ZERO;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        client(shared, conn).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    unlogged += 1;
                    if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        let more = if unlogged > 1 {
                            format!(" ({} times since the last report)", unlogged)
                        } else {
                            String::new()
                        };
                        tracing::warn!("cannot accept a control connection: {e}{more}");
                        last_logged = Some(Instant::now());
                        unlogged = 0;
                    }
                    pause = (pause * 2).clamp(ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shared.shutdown.cancelled() => return,
                    }
                }
            },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// A run the last daemon left running: resumed, or quarantined when this is the second start
/// in a row that finds it so. Whether it goes on (is not quarantined).
fn recover(shared: &Arc<Shared>, run: &crate::model::RunRecord) -> bool {
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

/// Binds the socket in a folder only its owner can enter; a socket left by a crashed daemon is
/// replaced, one a live process answers on is not.
async fn bind(path: &Path) -> anyhow::Result<interprocess::local_socket::tokio::Listener> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.is_dir() {
        // an existing folder is someone's: never loosen or tighten it, only check it
        let meta = std::fs::metadata(dir)?;
        // SAFETY: getuid has no preconditions and cannot fail
        let uid = unsafe { libc::getuid() };
        if meta.uid() != uid || meta.mode() & 0o077 != 0 {
            anyhow::bail!(
                "the socket's folder {} has mode {:o} and owner {}: the control socket must be \
                 in a folder only you can enter (mode 0700, yours); choose another --socket, or \
                 a folder that does not exist yet (uet creates it so)",
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid()
            );
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // the mode given is masked by the umask: make sure of it
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // only a socket can be a crashed daemon's leftover: anything else is somebody's file
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: it was left alone; choose another --socket",
                path.display()
            );
        }
        match protocol::Client::connect(path).await {
            Ok(_) => anyhow::bail!("a uet daemon already answers on {}", path.display()),
            // nobody listens: a crashed daemon's leftover
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                std::fs::remove_file(path)?
            }
            Err(e) => anyhow::bail!(
                "something answers on {} but not as this uet daemon ({e}); it was left alone",
                path.display()
            ),
        }
    }
    let listener = interprocess::local_socket::ListenerOptions::new()
        .name(protocol::socket_name(path)?)
        .create_tokio()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A watcher over `dir` (its whole tree when `recursive`) that hands every event to
/// `handler`. Uses the kernel's notifications unless polling is configured; when the inotify
/// limits are reached, says so and polls instead.
fn make_watcher<F>(
    dir: &Path,
    recursive: bool,
    poll: Option<Duration>,
    handler: F,
) -> anyhow::Result<Box<dyn notify::Watcher + Send>>
where
    F: Fn(notify::Event) + Clone + Send + 'static,
{
    use notify::Watcher;
    let mode = if recursive {
        notify::RecursiveMode::Recursive
    } else {
        notify::RecursiveMode::NonRecursive
    };
    let on_event = |h: F| {
        move |event: notify::Result<notify::Event>| match event {
            Ok(event) => h(event),
            Err(e) => tracing::warn!("watch error: {e}"),
        }
    };
    if poll.is_none() {
        let native = notify::recommended_watcher(on_event(handler.clone())).and_then(|mut w| {
            w.watch(dir, mode)?;
            Ok(w)
        });
        match native {
            Ok(w) => return Ok(Box::new(w)),
            Err(e) if at_watch_limit(&e) => tracing::warn!(
                "cannot watch {} with inotify ({e}); polling it every second instead \
                 (raise fs.inotify.max_user_watches / max_user_instances to avoid this)",
                dir.display()
            ),
            Err(e) => anyhow::bail!("cannot watch {}: {e}", dir.display()),
        }
    }
    let interval = poll.unwrap_or(Duration::from_secs(1));
    let config = notify::Config::default().with_poll_interval(interval);
    let mut w = notify::PollWatcher::new(on_event(handler), config)
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
    w.watch(dir, mode)
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
    Ok(Box::new(w))
}

/// Whether a watcher failed because the kernel's inotify limits are used up.
fn at_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EMFILE)),
        _ => false,
    }
}

/// Watches a folder's direct children for submissions, and queues what is there already (a
/// writer may still be busy with those: they settle first).
fn watch_inbox(shared: &Arc<Shared>, dir: &Path) -> anyhow::Result<()> {
    use notify::event::{AccessKind, EventKind, ModifyKind, RenameMode};
    let tx = shared.inbox.clone();
    let folder = dir.to_path_buf();
    let watcher = make_watcher(
        dir,
        false,
        shared.config.poll,
        move |event: notify::Event| {
            // the kernel's queue overflowed: events were lost, so look at everything again
            if event.need_rescan() {
                for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
                    let _ = tx.send(Inbox::Path(entry.path(), Seen::Changed));
                }
            }
            let renamed_in = matches!(
                event.kind,
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            );
            let seen = match event.kind {
                EventKind::Access(AccessKind::Open(_)) => Seen::Opened,
                EventKind::Access(AccessKind::Close(_)) => Seen::Closed,
                _ => Seen::Changed,
            };
            // the folder itself removed or moved away: even if one of the same name is already
            // back (a quick `rm -r` and `mkdir`), this watch is on the old one
            let self_gone = matches!(
                event.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
            );
            // for a rename pair the destination is the last path
            let count = event.paths.len();
            for (i, path) in event.paths.into_iter().enumerate() {
                if path == folder && (self_gone || !folder.is_dir()) {
                    let _ = tx.send(Inbox::Gone(folder.clone()));
                } else if renamed_in && i + 1 == count {
                    let _ = tx.send(Inbox::Path(path, Seen::RenamedIn));
                } else {
                    let _ = tx.send(Inbox::Path(path, seen));
                }
            }
        },
    )?;
    lock(&shared.watchers).insert((dir.to_path_buf(), false), watcher);
    for entry in std::fs::read_dir(dir)?.flatten() {
        let _ = shared.inbox.send(Inbox::Path(entry.path(), Seen::Changed));
    }
    Ok(())
}

/// Watches a workstream's whole tree for its standing workflows' triggers.
fn watch_tree(shared: &Arc<Shared>, dir: &Path) -> anyhow::Result<()> {
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

/// A watched folder went away: wait for it to come back, then watch it again and pick up
/// whatever it holds. The wait polls, but only while the folder is missing.
async fn await_folder(shared: Arc<Shared>, dir: PathBuf) {
    let had_tree = {
        let mut watchers = lock(&shared.watchers);
        watchers.remove(&(dir.clone(), false));
        watchers.remove(&(dir.clone(), true)).is_some()
    };
    if !dir.is_dir() {
        tracing::warn!(folder = %dir.display(), "watched folder is gone; waiting for it to come back");
    }
    let mut first = true;
    let mut said = None;
    loop {
        // a folder already back is watched again at once
        if !std::mem::take(&mut first) || !dir.is_dir() {
            tokio::select! {
                _ = tokio::time::sleep(REAPPEAR_POLL) => {}
                _ = shared.shutdown.cancelled() => return,
            }
        }
        if !dir.is_dir() {
            continue;
        }
        let again = own_folders(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                recover_claims(&shared, &dir);
                watch_inbox(&shared, &dir)
            })
            .and_then(|()| {
                if had_tree {
                    watch_tree(&shared, &dir)
                } else {
                    Ok(())
                }
            });
        match again {
            Ok(()) => {
                tracing::info!(folder = %dir.display(), "watching the folder again");
                return;
            }
            // said once, not at every look
            Err(e) => {
                let now = format!("{e:#}");
                if said.as_ref() != Some(&now) {
                    tracing::warn!(folder = %dir.display(), "cannot watch it yet: {now}");
                    said = Some(now);
                }
            }
        }
    }
}

/// Makes (or checks) the daemon's own folders in a watched folder.
fn own_folders(dir: &Path) -> std::io::Result<()> {
    let inbox = intake::Inbox::open(dir)?;
    inbox.claimed()?;
    inbox.rejected()?;
    Ok(())
}

/// Whether a path is a submission: a `.toml`/`.json` file directly in a watched folder, not
/// the tools file, a dotfile or an editor's temporary.
fn is_submission(path: &Path, watch: &[PathBuf]) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let in_watch = path.parent().is_some_and(|p| watch.iter().any(|w| w == p));
    in_watch
        && (name.ends_with(".toml") || name.ends_with(".json"))
        && name != TOOLS_FILE
        && !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".tmp")
        // a link, a FIFO or a device is claimed to be refused with a report; a folder is the
        // workstream's data
        && path.symlink_metadata().is_ok_and(|m| !m.is_dir())
}

/// Waits until each candidate file has stopped changing, then claims it.
async fn inbox(shared: Arc<Shared>, mut messages: mpsc::UnboundedReceiver<Inbox>) {
    let settling: Arc<Mutex<std::collections::HashSet<PathBuf>>> = Arc::default();
    let opened: Arc<Mutex<HashMap<PathBuf, u32>>> = Arc::default();
    let claiming = Arc::new(Claiming {
        turns: Arc::new(Semaphore::new(CLAIMS_AT_ONCE)),
        kib: Arc::new(Semaphore::new(CLAIM_KIB)),
    });
    let mut gone: std::collections::HashSet<PathBuf> = Default::default();
    while let Some(message) = messages.recv().await {
        let (path, seen) = match message {
            Inbox::Gone(dir) => {
                // one waiter per folder, however many events said so
                if gone.insert(dir.clone()) {
                    let shared = shared.clone();
                    let (tx, dir2) = (shared.inbox.clone(), dir.clone());
                    tokio::spawn(async move {
                        await_folder(shared, dir2.clone()).await;
                        let _ = tx.send(Inbox::Path(dir2, Seen::Changed));
                    });
                }
                continue;
            }
            Inbox::Path(path, seen) => (path, seen),
        };
        // the waiter sends the folder itself once it is watched again
        if gone.remove(&path) {
            continue;
        }
        if !is_submission(&path, &shared.config.watch) {
            continue;
        }
        match seen {
            Seen::Opened => *lock(&opened).entry(path.clone()).or_default() += 1,
            Seen::Closed => {
                let mut opened = lock(&opened);
                if let Some(n) = opened.get_mut(&path) {
                    *n = n.saturating_sub(1);
                }
            }
            Seen::RenamedIn | Seen::Changed => {}
        }
        if !lock(&settling).insert(path.clone()) {
            continue;
        }
        let shared = shared.clone();
        let settling = settling.clone();
        let opened = opened.clone();
        let claiming = claiming.clone();
        tokio::spawn(async move {
            let turn = loop {
                // a file renamed in is complete, but may be written again while it waits
                let settled = match seen {
                    Seen::RenamedIn => (file_stamp(&path), false),
                    _ => settle(&path, shared.config.settle, &opened).await,
                };
                let Some(turn) = claiming.turn(&path, shared.config.max_file).await else {
                    return;
                };
                // the wait for a turn may have been long: a file changed or opened meanwhile
                // is waited for again
                let (stamp, held_open) = settled;
                let open = lock(&opened).get(&path).is_some_and(|&n| n > 0);
                let unchanged = stamp == file_stamp(&path) && (held_open || !open);
                if unchanged {
                    break turn;
                }
            };
            {
                // from here, an event about the path starts its settling anew
                let mut opened = lock(&opened);
                lock(&settling).remove(&path);
                opened.remove(&path);
            }
            if path.symlink_metadata().is_ok() {
                let shared2 = shared.clone();
                // the turn is held until the claim ends, even one given up on below: a claim
                // that hangs must not let a fifth start beside it
                let claiming = tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    claim(&shared2, &path)
                });
                // a claim reads only plain files, but of any file system: one that hangs is
                // given up on here (its thread may stay stuck) and the inbox goes on
                if tokio::time::timeout(CLAIM_TIME, claiming).await.is_err() {
                    tracing::error!("taking in a dropped file took over {CLAIM_TIME:?}; given up");
                }
            }
        });
    }
}

/// Returns once the file's size and modification time have held still for `window` and no
/// process holds it open, as far as the kernel's open and close events tell (a writer that
/// pauses with the file open is waited for). Without those events (polling) stillness alone
/// decides, and a file held open and still for [`OPEN_WAIT`] is taken anyway, in case a close
/// event was lost. Returns the file's stamp then, and whether it was taken though held open.
async fn settle(
    path: &Path,
    window: Duration,
    opened: &Mutex<HashMap<PathBuf, u32>>,
) -> (Stamp, bool) {
    let mut last = file_stamp(path);
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(window).await;
        let now = file_stamp(path);
        if now != last {
            last = now;
            still_since = Instant::now();
            continue;
        }
        let open = lock(opened).get(path).is_some_and(|&n| n > 0);
        if !open || still_since.elapsed() >= OPEN_WAIT {
            return (last, open);
        }
    }
}

/// What says a file has changed: its size and modification time (`None` when it is gone).
type Stamp = Option<(u64, Option<std::time::SystemTime>)>;

fn file_stamp(path: &Path) -> Stamp {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

/// Why a claimed file did not become a run.
enum ClaimError {
    /// The file is not a valid workflow: it went to `rejected/` with this report.
    Rejected(String),
    /// The daemon could not record it (the claim stays, and is retried at the next start).
    Failed(String),
}

/// Claims a file by renaming it out of the inbox (only one claimer can win a rename), then
/// records it. `None` when another claimer won, or the claim could not be made (logged).
fn claim(shared: &Arc<Shared>, path: &Path) -> Option<Result<RunId, ClaimError>> {
    let dir = path.parent()?;
    let name = path.file_name()?.to_str()?.to_string();
    // every folder a claim may need, before the file is moved: a claim that could not be
    // rejected would sit unseen in `.uet/claimed`
    let folders = intake::Inbox::open(dir).and_then(|inbox| {
        let claimed = inbox.claimed()?;
        inbox.rejected()?;
        Ok((inbox, claimed))
    });
    let (inbox, claimed) = match folders {
        Ok(f) => f,
        Err(e) => {
            let why = format!("cannot take files in from {}: {e}", dir.display());
            tracing::error!("{why}");
            return Some(Err(ClaimError::Failed(why)));
        }
    };
    if name.len() > intake::MAX_NAME {
        // its claim's name would not fit a file name: refused from where it lies
        let refusal = intake::Refusal::NameTooLong(name.len());
        let shown = intake::shortened(&name);
        return Some(Err(refuse(&inbox, inbox.fd(), &name, &shown, &refusal)));
    }
    let claim = intake::ClaimName::now(&name);
    match intake::rename_at(inbox.fd(), &name, &claimed, &claim.to_string(), false) {
        Ok(()) => {}
        // another claimer won
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            let why = format!("cannot claim {}: {e}", path.display());
            tracing::error!("{why}");
            return Some(Err(ClaimError::Failed(why)));
        }
    }
    // on disk before the run is: a crash must not bring the file back into the folder beside a
    // run recorded for it, to be run again
    if let Err(e) = intake::sync_folder(&claimed).and_then(|()| intake::sync_folder(inbox.fd())) {
        tracing::warn!(file = %path.display(), "cannot sync the claim: {e}");
    }
    Some(process_claim(shared, &inbox, &claimed, &claim))
}

/// Finishes claims a crash interrupted: recorded ones are removed, the others taken in again,
/// unless taking one in has already stopped the daemon [`intake::CLAIM_TRIES`] times.
fn recover_claims(shared: &Arc<Shared>, dir: &Path) {
    let folders = intake::Inbox::open(dir).and_then(|inbox| {
        let claimed = inbox.claimed()?;
        Ok((inbox, claimed))
    });
    let (inbox, claimed) = match folders {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(folder = %dir.display(), "cannot look for claims a crash left: {e}");
            return;
        }
    };
    let names = match intake::names_in(&claimed) {
        Ok(names) => names,
        Err(e) => {
            tracing::error!(folder = %dir.display(), "cannot look for claims a crash left: {e}");
            return;
        }
    };
    for file_name in names {
        let claim = intake::ClaimName::parse(&file_name).unwrap_or_else(|| intake::ClaimName {
            stamp: 0,
            tries: 1,
            name: file_name.clone(),
        });
        match shared.store.submission(&file_name) {
            Ok(Some(_)) => {
                let _ = intake::remove_at(&claimed, &file_name);
            }
            Ok(None) if claim.tries >= intake::CLAIM_TRIES => {
                let _ = refuse(&inbox, &claimed, &file_name, &claim.name, &intake::Refusal::Crashed);
            }
            Ok(None) => {
                // the try is counted on disk before the file is read again: if reading it
                // stops this daemon too, the next start knows
                let again = claim.retried();
                let counted = intake::rename_at(&claimed, &file_name, &claimed, &again.to_string(), false)
                    .and_then(|()| intake::sync_folder(&claimed));
                if let Err(e) = counted {
                    tracing::error!("cannot take claim {file_name} in again: {e}");
                    continue;
                }
                let _ = process_claim(shared, &inbox, &claimed, &again);
            }
            Err(e) => tracing::error!("cannot check claim {file_name}: {e}"),
        }
    }
}

/// Moves a refused file (`from` in the folder `from_dir`) to `rejected/` as `name`, with a
/// report of why; the file itself was not read.
fn refuse(
    inbox: &intake::Inbox,
    from_dir: &std::os::fd::OwnedFd,
    from: &str,
    name: &str,
    refusal: &intake::Refusal,
) -> ClaimError {
    let shown = inbox.path.join(name);
    let report = format!("{}: refused: {refusal}\n", shown.display());
    match intake::reject(inbox, from_dir, from, name, &report) {
        Ok(at) => {
            tracing::warn!(file = %shown.display(), report = %at.display(), "submission refused: {refusal}");
            ClaimError::Rejected(report)
        }
        Err(e) => ClaimError::Failed(unrejected(inbox, from_dir, from, name, &e)),
    }
}

/// A claimed file that could not be moved to `rejected/` goes back where it was dropped (not
/// over a file dropped since), so it is not left unseen in `.uet/claimed`; says so.
fn unrejected(
    inbox: &intake::Inbox,
    from_dir: &std::os::fd::OwnedFd,
    from: &str,
    name: &str,
    e: &std::io::Error,
) -> String {
    let shown = inbox.path.join(name);
    let back = intake::rename_at(from_dir, from, inbox.fd(), name, true);
    let why = match back {
        Ok(()) => format!(
            "{} cannot be moved to rejected/ ({e}); it was left in its folder",
            shown.display()
        ),
        Err(_) => format!(
            "{} cannot be moved to rejected/ ({e}); it waits in .uet/claimed",
            shown.display()
        ),
    };
    tracing::error!("{why}");
    why
}

/// Validates a claimed file; records and starts its run, or moves it to `rejected/` with a
/// report of every problem.
fn process_claim(
    shared: &Arc<Shared>,
    inbox: &intake::Inbox,
    claimed: &std::os::fd::OwnedFd,
    claim: &intake::ClaimName,
) -> Result<RunId, ClaimError> {
    let name = &claim.name;
    let claim_name = claim.to_string();
    let dir = inbox.path.as_path();
    let bytes = match intake::read_dropped(claimed, &claim_name, shared.config.max_file) {
        Ok(bytes) => bytes,
        Err(refusal) => return Err(refuse(inbox, claimed, &claim_name, name, &refusal)),
    };
    let sha = crate::hex(&Sha256::digest(&bytes));
    // problems name the file as the user dropped it
    let shown = dir.join(name);
    // a panic here (a bug on some input) must leave a report, not a claim that is read again
    // at every start
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load_tools(shared, dir)
            .and_then(|tools| workflow::parse(&shown, &bytes, &tools).map(|plan| (plan, tools)))
    }));
    drop(bytes);
    let Ok(checked) = checked else {
        let refusal = intake::Refusal::Unchecked;
        return Err(refuse(inbox, claimed, &claim_name, name, &refusal));
    };
    match checked {
        Ok((plan, tools)) => {
            let submission = Submission {
                claim: &claim_name,
                sha256: &sha,
            };
            let why = format!("dropped {name}");
            match record(shared, &plan, &shown, dir, Some(submission), &why) {
                Ok(run) => {
                    let _ = intake::remove_at(claimed, &claim_name);
                    tracing::info!(run, file = %shown.display(), "submission accepted");
                    start(shared, run, plan, dir.to_path_buf(), tools, false);
                    Ok(run)
                }
                Err(e) => {
                    tracing::error!(file = %shown.display(), "cannot record the submission: {e:#}");
                    Err(ClaimError::Failed(format!("{e:#}")))
                }
            }
        }
        Err(problems) => {
            let report = format!("{problems}\n");
            match intake::reject(inbox, claimed, &claim_name, name, &report) {
                Ok(at) => {
                    tracing::warn!(
                        file = %shown.display(),
                        report = %at.display(),
                        "submission rejected: {} problems",
                        problems.count()
                    );
                    Err(ClaimError::Rejected(report))
                }
                Err(e) => Err(ClaimError::Failed(unrejected(inbox, claimed, &claim_name, name, &e))),
            }
        }
    }
}

fn load_tools(shared: &Shared, dir: &Path) -> Result<Tools, crate::spec::doc::Problems> {
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

/// The key a standing workflow is registered under: a later file with the same name in the
/// same workstream replaces it.
fn standing_key(workstream: &Path, name: &str) -> String {
    format!("{}\n{name}", workstream.display())
}

/// Records a run of a dropped or submitted workflow; a standing workflow is registered (or,
/// with `watch = []`, forgotten) in the same transaction.
fn record(
    shared: &Arc<Shared>,
    plan: &Plan,
    source: &Path,
    workstream: &Path,
    submission: Option<Submission<'_>>,
    why: &str,
) -> anyhow::Result<RunId> {
    let steps: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
    let key = standing_key(workstream, &plan.name);
    let standing = plan.trigger.as_ref().map(|t| {
        if t.watch.is_empty() {
            StandingChange::Unregister(&key)
        } else {
            StandingChange::Register(&key)
        }
    });
    let why = match &plan.trigger {
        Some(t) if !t.watch.is_empty() => {
            format!(
                "{why}; standing: runs again on changes to {}",
                t.watch.join(", ")
            )
        }
        _ => why.to_string(),
    };
    let source_text = source.to_string_lossy();
    let workstream_text = workstream.to_string_lossy();
    let run = shared.store.create(NewRun {
        name: &plan.name,
        source: &source_text,
        workstream: &workstream_text,
        plan: serde_json::to_value(plan)?,
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
            running: (!t.watch.is_empty()).then_some(run),
        });
    }
    Ok(run)
}

/// Resumes a run recorded by an earlier daemon; `recovered` when that daemon did not stop
/// cleanly while the run was in flight.
fn resume(shared: &Arc<Shared>, run: RunId, recovered: bool) {
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

/// Drives a run on its own task once a slot is free. `recovered`: it was in flight during an
/// unclean stop, which counts toward its quarantine once it runs again.
fn start(
    shared: &Arc<Shared>,
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
                lock(&shared.active).remove(&run);
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
                lock(&shared.active).remove(&run);
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
        lock(&shared.active).remove(&run);
        let _ = shared.standing.send(StandingMsg::Ended(run));
        schedule_retention(&shared);
    });
}

/// Applies the retention settings now.
fn retain(shared: &Shared) {
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
fn schedule_retention(shared: &Arc<Shared>) {
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

/// What the standing-workflow task hears.
enum StandingMsg {
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
}

/// A registered standing workflow.
struct Standing {
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
}

/// Keeps the standing workflows: debounces the changes their globs match and starts their
/// runs, at most one at a time each, with at most one follow-up queued.
async fn standing_loop(
    shared: Arc<Shared>,
    mut messages: mpsc::UnboundedReceiver<StandingMsg>,
    runs: Vec<crate::model::RunRecord>,
) {
    let mut registry: HashMap<String, Standing> = HashMap::new();
    match shared.store.standing() {
        Ok(saved) => {
            for (key, record) in saved {
                let Ok(plan) = serde_json::from_value::<Plan>(record["plan"].clone()) else {
                    tracing::error!(key, "cannot read a standing workflow back; skipped");
                    continue;
                };
                let workstream = PathBuf::from(record["workstream"].as_str().unwrap_or("/"));
                // a run of it that the last daemon left unfinished is resuming: changes queue
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
                register(
                    &shared,
                    &mut registry,
                    key,
                    plan,
                    workstream,
                    source,
                    running,
                );
            }
        }
        Err(e) => tracing::error!("cannot read the standing workflows: {e}"),
    }
    let (quiet_tx, mut quiet_rx) = mpsc::unbounded_channel::<StandingMsg>();
    loop {
        let message = tokio::select! {
            m = messages.recv() => m,
            m = quiet_rx.recv() => m,
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
                let empty = plan.trigger.as_ref().is_none_or(|t| t.watch.is_empty());
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
                for (key, entry) in registry.iter_mut() {
                    if entry.workstream != workstream {
                        continue;
                    }
                    let mut hit = false;
                    for path in &paths {
                        let Ok(rel) = path.strip_prefix(&workstream) else {
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
                        let (tx, key, generation) =
                            (quiet_tx.clone(), key.clone(), entry.generation);
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

fn register(
    shared: &Arc<Shared>,
    registry: &mut HashMap<String, Standing>,
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
    registry.insert(
        key,
        Standing {
            plan,
            workstream,
            source,
            matcher,
            running,
            queued: false,
            changed: Default::default(),
            generation: 0,
        },
    );
}

/// Starts a standing workflow's run for the changes gathered so far.
fn fire(shared: &Arc<Shared>, entry: &mut Standing, what: &str) {
    let changed = std::mem::take(&mut entry.changed);
    let mut names: Vec<&str> = changed.iter().map(String::as_str).take(3).collect();
    let more = changed.len().saturating_sub(names.len());
    let mut why = format!("trigger: {what}: {}", names.join(", "));
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
    let plan = match serde_json::to_value(&entry.plan) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(workflow = entry.plan.name, "cannot encode its plan: {e}");
            return;
        }
    };
    let created = shared.store.create(NewRun {
        name: &entry.plan.name,
        source: &entry.source.to_string_lossy(),
        workstream: &entry.workstream.to_string_lossy(),
        plan,
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

/// Serves one client connection: the hello, then a response per request. A malformed or
/// oversized frame gets an error reply and ends the connection; nothing a client sends can
/// take the daemon down.
async fn client(shared: Arc<Shared>, mut conn: interprocess::local_socket::tokio::Stream) {
    let mut greeted = false;
    loop {
        let idle = if greeted { IDLE_TIME } else { REQUEST_TIME };
        let read = protocol::read_frame_within(&mut conn, idle, REQUEST_TIME).await;
        let request: Request = match read {
            Ok(Some(r)) => r,
            Ok(None) => return,
            // nobody is waiting for an answer
            Err(protocol::FrameError::TimedOut(_) | protocol::FrameError::Io(_)) => return,
            Err(e) => {
                let _ = send(
                    &mut conn,
                    &Response::Error {
                        message: e.to_string(),
                        invalid: true,
                    },
                )
                .await;
                return;
            }
        };
        let response = match request {
            Request::Hello { protocol } if protocol == protocol::PROTOCOL_VERSION => {
                greeted = true;
                Response::Hello {
                    protocol: protocol::PROTOCOL_VERSION,
                    version: env!("CARGO_PKG_VERSION").into(),
                }
            }
            Request::Hello { protocol } => Response::Error {
                message: format!(
                    "protocol {protocol} is not spoken here (this daemon speaks {})",
                    protocol::PROTOCOL_VERSION
                ),
                invalid: true,
            },
            _ if !greeted => Response::Error {
                message: "say hello first".into(),
                invalid: true,
            },
            Request::Shutdown => {
                let _ = send(&mut conn, &answer(&shared, Request::Shutdown)).await;
                shared.shutdown.cancel();
                return;
            }
            Request::Events { run, follow } => {
                stream_events(&shared, &mut conn, run, follow).await;
                return;
            }
            request => {
                let shared = shared.clone();
                let state = shared.store.path().to_path_buf();
                tokio::task::spawn_blocking(move || answer(&shared, request))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        // a panic in a request is the database's on a damaged page, or a bug:
                        // this request fails, the daemon goes on
                        message: format!(
                            "the daemon failed to answer ({e}); if its state {} is damaged, \
                             `uet state check` says so once the daemon is stopped",
                            state.display()
                        ),
                        invalid: false,
                    })
            }
        };
        match send(&mut conn, &response).await {
            Ok(()) => {}
            // an answer too big for one frame: say so, and keep serving this client
            Err(protocol::FrameError::TooLarge(n)) => {
                let reply = Response::Error {
                    message: format!(
                        "the answer is {n} bytes, over the {} MiB frame limit: ask for less \
                         (`uet runs --limit N`, `uet events RUN`)",
                        protocol::MAX_FRAME >> 20
                    ),
                    invalid: false,
                };
                if send(&mut conn, &reply).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Streams what the event log holds now, a frame at a time, then [`Response::Done`]; when
/// following, every new event as it is committed, until the run (if one was named) has ended,
/// the client hangs up or the daemon stops.
async fn stream_events(
    shared: &Arc<Shared>,
    conn: &mut interprocess::local_socket::tokio::Stream,
    run: Option<RunId>,
    follow: bool,
) {
    use tokio::io::AsyncReadExt;
    let mut commits = shared.store.subscribe();
    let mut seen = ops::EventCursor::default();
    if let Some(run) = run {
        match shared.store.run(run) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let reply = Response::Error {
                    message: format!("no run {run}"),
                    invalid: true,
                };
                let _ = send(conn, &reply).await;
                return;
            }
            Err(e) => {
                let reply = Response::Error {
                    message: e.to_string(),
                    invalid: false,
                };
                let _ = send(conn, &reply).await;
                return;
            }
        }
    }
    let mut started = false;
    loop {
        commits.borrow_and_update();
        // whether the run is over is read before its events, so none committed in between is
        // missed
        let ended = run.and_then(|run| {
            let state = shared.store.run(run).ok().flatten().map(|r| r.state);
            let over =
                state.is_none_or(|s| s.is_terminal()) && !lock(&shared.active).contains_key(&run);
            over.then(|| match state {
                Some(s) => format!("run {run} {s}"),
                None => format!("run {run} is gone"),
            })
        });
        // a long backlog is read and sent a frame at a time, each well under the frame limit;
        // the first frame goes out even when empty, so a client sees the stream has begun
        loop {
            let batch = match ops::events(&shared.store, run, &mut seen, ops::EVENTS_PAGE) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("cannot read events: {e}");
                    return;
                }
            };
            let full = batch.len() == ops::EVENTS_PAGE;
            if started && batch.is_empty() {
                break;
            }
            started = true;
            if send(conn, &Response::Events { events: batch })
                .await
                .is_err()
            {
                return;
            }
            if !full {
                break;
            }
        }
        if let Some(message) = ended.or_else(|| (!follow).then(String::new)) {
            let _ = send(conn, &Response::Done { message }).await;
            return;
        }
        let mut byte = [0u8; 1];
        tokio::select! {
            changed = commits.changed() => if changed.is_err() { return },
            // the client says nothing while following: any read result means it is gone
            _ = conn.read(&mut byte) => return,
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

fn answer(shared: &Arc<Shared>, request: Request) -> Response {
    let fail = |message: String| Response::Error {
        message,
        invalid: false,
    };
    let invalid = |message: String| Response::Error {
        message,
        invalid: true,
    };
    match request {
        Request::Hello { .. } => unreachable!("answered by the connection"),
        Request::Status => match status(shared) {
            Ok(status) => Response::Status(status),
            Err(e) => fail(e.to_string()),
        },
        Request::Runs { limit } => ops::runs(&shared.store, limit)
            .map(|runs| Response::Runs { runs })
            .unwrap_or_else(Response::from),
        Request::Show { run, from } => ops::show(&shared.store, run, from)
            .map(|run| Response::Run { run: Box::new(run) })
            .unwrap_or_else(Response::from),
        Request::Events { .. } => unreachable!("streamed by the connection"),
        Request::Tools => match tools_shown(shared) {
            Ok(tools) => Response::Tools { tools },
            Err(p) => fail(p.to_string()),
        },
        Request::Submit { path } => submit(shared, &path),
        Request::Cancel { run } => {
            let token = lock(&shared.active).get(&run).cloned();
            match token {
                Some(t) => {
                    t.cancel();
                    Response::Done {
                        message: format!("run {run} canceled"),
                    }
                }
                None => match shared.store.run(run) {
                    Ok(Some(r)) => invalid(format!("run {run} is {}, not running", r.state)),
                    Ok(None) => invalid(format!("no run {run}")),
                    Err(e) => fail(e.to_string()),
                },
            }
        }
        Request::Verify { run } => ops::verify(&shared.store, run)
            .map(|message| Response::Done { message })
            .unwrap_or_else(Response::from),
        Request::Prune {
            older_than_ms,
            keep,
        } => ops::prune(&shared.store, older_than_ms, keep)
            .map(|message| Response::Done { message })
            .unwrap_or_else(Response::from),
        Request::Top => top_view(shared),
        Request::Metrics => {
            let active = lock(&shared.active).len() as u64;
            ops::metrics(&shared.store, &shared.breakers.all(), Some(active))
                .map(|text| Response::Metrics { text })
                .unwrap_or_else(Response::from)
        }
        Request::Retry { run } => requeue(shared, run, false),
        Request::Release { run } => requeue(shared, run, true),
        // answered here, carried out by the connection once the answer is sent
        Request::Shutdown => Response::Done {
            message: "shutting down".into(),
        },
    }
}

/// `uet submit`: a file in a watched folder is claimed like a drop (so the watcher does not
/// run it a second time); any other file runs with its folder as the workstream.
fn submit(shared: &Arc<Shared>, path: &Path) -> Response {
    let invalid = |message: String| Response::Error {
        message,
        invalid: true,
    };
    // a file in a watched folder, however the client named it (through `..` or a link), is
    // claimed as a drop is, so the watcher cannot run it a second time
    let watched = path.parent().zip(path.file_name()).and_then(|(parent, name)| {
        use std::os::unix::fs::MetadataExt;
        let here = std::fs::metadata(parent).ok()?;
        shared
            .config
            .watch
            .iter()
            .find(|w| {
                std::fs::metadata(w).is_ok_and(|m| m.dev() == here.dev() && m.ino() == here.ino())
            })
            .map(|w| w.join(name))
    });
    if let Some(path) = watched.as_deref().filter(|p| is_submission(p, &shared.config.watch)) {
        return match claim(shared, path) {
            Some(Ok(run)) => Response::Submitted { run },
            Some(Err(ClaimError::Rejected(report))) => {
                invalid(format!("{}(moved to rejected/ in its folder)", report))
            }
            Some(Err(ClaimError::Failed(e))) => Response::Error {
                message: e,
                invalid: false,
            },
            None => Response::Error {
                message: format!(
                    "{} was picked up by the folder watcher already: see `uet runs`",
                    path.display()
                ),
                invalid: false,
            },
        };
    }
    let bytes = match intake::read_submitted(path, shared.config.max_file) {
        Ok(b) => b,
        Err(e) => return invalid(format!("{}: {e}", path.display())),
    };
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let checked = load_tools(shared, &dir)
        .and_then(|tools| workflow::parse(path, &bytes, &tools).map(|p| (p, tools)));
    match checked {
        Ok((plan, tools)) => match record(shared, &plan, path, &dir, None, "submitted") {
            Ok(run) => {
                start(shared, run, plan, dir, tools, false);
                Response::Submitted { run }
            }
            Err(e) => Response::Error {
                message: format!("{e:#}"),
                invalid: false,
            },
        },
        Err(problems) => invalid(problems.to_string()),
    }
}

/// `uet retry` (a failed or canceled run) and `uet release` (a quarantined one): the steps that
/// did not succeed go back to pending and the run resumes; succeeded steps keep their outputs.
fn requeue(shared: &Arc<Shared>, run: RunId, release: bool) -> Response {
    let invalid = |message: String| Response::Error {
        message,
        invalid: true,
    };
    let record = match shared.store.run(run) {
        Ok(Some(r)) => r,
        Ok(None) => return invalid(format!("no run {run}")),
        Err(e) => {
            return Response::Error {
                message: e.to_string(),
                invalid: false,
            };
        }
    };
    let allowed = if release {
        record.state == RunState::Quarantined
    } else {
        matches!(record.state, RunState::Failed | RunState::Canceled)
    };
    if !allowed || lock(&shared.active).contains_key(&run) {
        let hint = match (release, record.state) {
            (false, RunState::Quarantined) => format!("; `uet release {run}` puts it back"),
            (true, RunState::Failed | RunState::Canceled) => {
                format!("; `uet retry {run}` re-runs it")
            }
            _ => String::new(),
        };
        let what = if release { "released" } else { "retried" };
        return invalid(format!(
            "run {run} is {}: only a {} run can be {what}{hint}",
            record.state,
            if release {
                "quarantined"
            } else {
                "failed or canceled"
            },
        ));
    }
    let reason = if release {
        "released by request"
    } else {
        "retry requested"
    };
    let changes = engine::requeue_unfinished(&shared.store, run, reason);
    match changes.and_then(|c| shared.store.apply(&c)) {
        Ok(()) => {
            resume(shared, run, false);
            Response::Done {
                message: format!("run {run} is pending again"),
            }
        }
        Err(e) => Response::Error {
            message: e.to_string(),
            invalid: false,
        },
    }
}

fn status(shared: &Shared) -> Result<Status, ops::Refused> {
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_seconds: shared.started.elapsed().as_secs(),
        state: shared.config.state.clone(),
        watching: shared.config.watch.clone(),
        runs: ops::run_counts(&shared.store)?,
        active: lock(&shared.active).len() as u64,
        metrics: lock(&shared.metrics_at).clone(),
    })
}

/// What `uet top` shows: the daemon in brief, every run not yet ended with its progress, how
/// many wait for a slot, and the tools with their breakers.
fn top_view(shared: &Arc<Shared>) -> Response {
    let tools = tools_shown(shared).unwrap_or_default();
    status(shared)
        .and_then(|status| ops::top(&shared.store, Some(status), tools))
        .map(|view| Response::Top {
            view: Box::new(view),
        })
        .unwrap_or_else(Response::from)
}

/// The tools of every watched folder (or of `--tools`), with their breakers.
fn tools_shown(shared: &Arc<Shared>) -> Result<Vec<crate::api::types::ToolShown>, crate::spec::doc::Problems> {
    let mut dirs: Vec<PathBuf> = match &shared.config.tools {
        Some(f) => vec![f.parent().unwrap_or(Path::new("/")).to_path_buf()],
        None => shared.config.watch.clone(),
    };
    dirs.dedup();
    let files = dirs
        .iter()
        .map(|dir| load_tools(shared, dir))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ops::tools(&files, |t| shared.breakers.get(t)))
}

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
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::engine::{self, RunSpec};
use crate::model::{RunId, RunState};
use crate::protocol::{self, Request, Response, Status};
use crate::report::RunView;
use crate::store::{Store, Submission};
use crate::tools::{TOOLS_FILE, Tools};
use crate::wasm::Runtime;
use crate::workflow::{self, Plan};

/// Where the daemon's claimed files wait, inside a watched folder.
const CLAIMED: &str = ".uet/claimed";

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
    /// How long running steps may finish at shutdown before the daemon exits anyway (they
    /// resume at the next start).
    pub grace: Duration,
}

struct Shared {
    config: Config,
    store: Store,
    wasm: Option<Arc<Runtime>>,
    slots: Semaphore,
    active: Mutex<HashMap<RunId, CancellationToken>>,
    shutdown: CancellationToken,
    started: Instant,
}

/// Runs the daemon until it is asked to stop.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = Store::open(&config.state).map_err(|e| match e {
        crate::store::StateError::InUse(path) => {
            anyhow::anyhow!(
                "another uet process (a daemon, or `uet run`) is using the state {}",
                path.display()
            )
        }
        e => e.into(),
    })?;
    let listener = bind(&config.socket).await?;
    let watch: Vec<PathBuf> = config
        .watch
        .iter()
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
        .collect();
    for dir in &watch {
        std::fs::create_dir_all(dir.join(CLAIMED))?;
    }
    let mut tools_files: Vec<PathBuf> = watch.iter().map(|d| d.join(TOOLS_FILE)).collect();
    tools_files.extend(config.tools.clone());
    let max_memory = tools_files
        .iter()
        .filter_map(|f| Tools::load(f).ok())
        .map(|t| t.max_memory())
        .max()
        .unwrap_or(0);
    let wasm = Some(Arc::new(Runtime::new(
        Some(crate::wasm::cache_dir(&config.state)),
        max_memory,
    )?));
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

    // runs a previous daemon left unfinished go first, then what arrived while it was down
    for run in shared.store.runs()? {
        if matches!(run.state, RunState::Pending | RunState::Running) {
            resume(&shared, run.id);
        }
    }
    let (paths_tx, paths_rx) = mpsc::unbounded_channel::<(PathBuf, bool)>();
    let mut watchers = Vec::new();
    for dir in &watch {
        recover_claims(&shared, dir);
        for entry in std::fs::read_dir(dir)?.flatten() {
            // a writer may still be busy with a file found at start: let it settle
            let _ = paths_tx.send((entry.path(), false));
        }
        watchers.push(watch_folder(dir, paths_tx.clone())?);
    }
    tokio::spawn(inbox(shared.clone(), paths_rx));

    loop {
        use interprocess::local_socket::tokio::prelude::*;
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => { tokio::spawn(client(shared.clone(), conn)); }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            _ = shared.shutdown.cancelled() => break,
        }
    }

    // stop taking work; let running steps finish for a while; what is left resumes next start
    drop(watchers);
    drop(listener);
    let _ = std::fs::remove_file(&shared.config.socket);
    let deadline = Instant::now() + shared.config.grace;
    while !shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("uet daemon stopped");
    Ok(())
}

/// Binds the socket in a folder only its owner can enter; a socket left by a crashed daemon is
/// replaced, one a live daemon answers on is not.
async fn bind(path: &Path) -> anyhow::Result<interprocess::local_socket::tokio::Listener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if path.exists() {
        if protocol::Client::connect(path).await.is_ok() {
            anyhow::bail!("a uet daemon already answers on {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = interprocess::local_socket::ListenerOptions::new()
        .name(protocol::socket_name(path)?)
        .create_tokio()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Forwards file-system events of a folder's direct children as paths, each marked whether it
/// is complete already: a file renamed into the folder was written elsewhere and is whole.
fn watch_folder(
    dir: &Path,
    tx: mpsc::UnboundedSender<(PathBuf, bool)>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    use notify::event::{EventKind, ModifyKind, RenameMode};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            let renamed_in = matches!(
                event.kind,
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            );
            // for a rename pair the destination is the last path
            let count = event.paths.len();
            for (i, path) in event.paths.into_iter().enumerate() {
                let _ = tx.send((path, renamed_in && i + 1 == count));
            }
        }
        Err(e) => tracing::warn!("watch error: {e}"),
    })
    .map_err(|e| anyhow::anyhow!("cannot watch {}: {e} (if the inotify watch limit is reached, raise fs.inotify.max_user_watches)", dir.display()))?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
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
        && path.is_file()
}

/// Waits until each candidate file has stopped changing, then claims it.
async fn inbox(shared: Arc<Shared>, mut paths: mpsc::UnboundedReceiver<(PathBuf, bool)>) {
    let settling: Arc<Mutex<std::collections::HashSet<PathBuf>>> = Arc::default();
    while let Some((path, complete)) = paths.recv().await {
        if !is_submission(&path, &shared.config.watch) {
            continue;
        }
        if !settling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone())
        {
            continue;
        }
        let shared = shared.clone();
        let settling = settling.clone();
        tokio::spawn(async move {
            if !complete {
                settle(&path, shared.config.settle).await;
            }
            settling
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&path);
            if path.is_file() {
                let shared2 = shared.clone();
                let _ = tokio::task::spawn_blocking(move || claim(&shared2, &path)).await;
            }
        });
    }
}

/// Returns once the file's size and modification time have held still for `window`.
async fn settle(path: &Path, window: Duration) {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut last = stamp(path);
    loop {
        tokio::time::sleep(window).await;
        let now = stamp(path);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Claims a file by renaming it out of the inbox (only one claimer can win a rename), then
/// records it.
fn claim(shared: &Arc<Shared>, path: &Path) {
    let Some(dir) = path.parent() else { return };
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let claimed = dir.join(CLAIMED).join(format!("{stamp}-{name}"));
    if std::fs::rename(path, &claimed).is_err() {
        return; // gone already: someone else claimed it
    }
    process_claim(shared, dir, &claimed, &name);
}

/// Finishes claims a crash interrupted: recorded ones are removed, the others processed.
fn recover_claims(shared: &Arc<Shared>, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join(CLAIMED)) else {
        return;
    };
    for entry in entries.flatten() {
        let claimed = entry.path();
        let claim = claimed
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let name = claim
            .split_once('-')
            .map(|(_, n)| n.to_string())
            .unwrap_or(claim.clone());
        match shared.store.submission(&claim) {
            Ok(Some(_)) => {
                let _ = std::fs::remove_file(&claimed);
            }
            Ok(None) => process_claim(shared, dir, &claimed, &name),
            Err(e) => tracing::error!("cannot check claim {claim}: {e}"),
        }
    }
}

/// Validates a claimed file; records and starts its run, or moves it to `rejected/` with a
/// report of every problem.
fn process_claim(shared: &Arc<Shared>, dir: &Path, claimed: &Path, name: &str) {
    let Ok(bytes) = std::fs::read(claimed) else {
        return;
    };
    let sha = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    // problems name the file as the user dropped it
    let shown = dir.join(name);
    let checked = load_tools(shared, dir)
        .and_then(|tools| workflow::parse(&shown, &bytes, &tools).map(|plan| (plan, tools)));
    let claim = claimed
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    match checked {
        Ok((plan, tools)) => {
            let submission = Submission {
                claim: &claim,
                sha256: &sha,
            };
            match record(shared, &plan, &shown, dir, Some(submission)) {
                Ok(run) => {
                    let _ = std::fs::remove_file(claimed);
                    tracing::info!(run, file = %shown.display(), "submission accepted");
                    start(shared, run, plan, dir.to_path_buf(), tools);
                }
                Err(e) => {
                    tracing::error!(file = %shown.display(), "cannot record the submission: {e}")
                }
            }
        }
        Err(problems) => {
            let rejected = dir.join("rejected");
            let _ = std::fs::create_dir_all(&rejected);
            let report = format!("{problems}\n");
            let _ = std::fs::write(rejected.join(format!("{name}.error.txt")), report);
            let _ = std::fs::rename(claimed, rejected.join(name));
            tracing::warn!(file = %shown.display(), "submission rejected: {} problems", problems.0.len());
        }
    }
}

fn load_tools(shared: &Shared, dir: &Path) -> Result<Tools, crate::doc::Problems> {
    let file = shared
        .config
        .tools
        .clone()
        .unwrap_or_else(|| dir.join(TOOLS_FILE));
    let mut tools = Tools::load(&file)?;
    if let Some(rt) = &shared.wasm {
        crate::wasm::describe_tools(&mut tools, rt, false)?;
    }
    Ok(tools)
}

fn record(
    shared: &Shared,
    plan: &Plan,
    source: &Path,
    workstream: &Path,
    submission: Option<Submission<'_>>,
) -> anyhow::Result<RunId> {
    let steps: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
    Ok(shared.store.create_run_for(
        &plan.name,
        &source.to_string_lossy(),
        &workstream.to_string_lossy(),
        serde_json::to_value(plan)?,
        &steps,
        submission,
    )?)
}

/// Resumes a run recorded by an earlier daemon.
fn resume(shared: &Arc<Shared>, run: RunId) {
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
        Ok((plan, workstream, tools)) => start(shared, run, plan, workstream, tools),
        Err(e) => tracing::error!(run, "cannot resume: {e:#}"),
    }
}

/// Drives a run on its own task once a slot is free.
fn start(shared: &Arc<Shared>, run: RunId, plan: Plan, workstream: PathBuf, tools: Tools) {
    let cancel = CancellationToken::new();
    shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(run, cancel.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        let permit = tokio::select! {
            p = shared.slots.acquire() => p.ok(),
            _ = cancel.cancelled() => None,
        };
        let result = if permit.is_some() {
            let spec = RunSpec {
                run,
                plan: &plan,
                workstream: &workstream,
                tools: &tools,
                wasm: shared.wasm.clone(),
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
        shared
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&run);
    });
}

fn cancel_pending(store: &Store, run: RunId) -> Result<(), engine::EngineError> {
    store.apply(&[crate::store::Change::RunState {
        run,
        to: RunState::Canceled,
        reason: Some("canceled before it started".into()),
    }])?;
    Ok(())
}

/// Serves one client connection: the hello, then a response per request. A malformed or
/// oversized frame gets an error reply and ends the connection; nothing a client sends can
/// take the daemon down.
async fn client(shared: Arc<Shared>, mut conn: interprocess::local_socket::tokio::Stream) {
    let mut greeted = false;
    loop {
        let request: Request = match protocol::read_frame(&mut conn).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = protocol::write_frame(
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
                let _ = protocol::write_frame(&mut conn, &answer(&shared, Request::Shutdown)).await;
                shared.shutdown.cancel();
                return;
            }
            request => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || answer(&shared, request))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("internal error: {e}"),
                        invalid: false,
                    })
            }
        };
        if protocol::write_frame(&mut conn, &response).await.is_err() {
            return;
        }
    }
}

fn answer(shared: &Arc<Shared>, request: Request) -> Response {
    let fail = |message: String| Response::Error {
        message,
        invalid: false,
    };
    match request {
        Request::Hello { .. } => unreachable!("answered by the connection"),
        Request::Status => match shared.store.runs() {
            Ok(runs) => {
                let mut counts = std::collections::BTreeMap::new();
                for r in runs {
                    *counts.entry(r.state.to_string()).or_insert(0u64) += 1;
                }
                Response::Status(Status {
                    version: env!("CARGO_PKG_VERSION").into(),
                    pid: std::process::id(),
                    uptime_seconds: shared.started.elapsed().as_secs(),
                    state: shared.config.state.clone(),
                    watching: shared.config.watch.clone(),
                    runs: counts,
                    active: shared
                        .active
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .len() as u64,
                })
            }
            Err(e) => fail(e.to_string()),
        },
        Request::Runs => match shared.store.runs() {
            Ok(runs) => Response::Runs {
                runs: runs
                    .into_iter()
                    .map(|r| {
                        serde_json::json!({
                            "run_id": r.id, "name": r.name, "state": r.state, "reason": r.reason,
                            "source": r.source, "created_at": r.created_at,
                            "started_at": r.started_at, "finished_at": r.finished_at,
                        })
                    })
                    .collect(),
            },
            Err(e) => fail(e.to_string()),
        },
        Request::Show { run } => match RunView::load(&shared.store, run) {
            Ok(Some(view)) => Response::Run {
                run: view.to_json(),
            },
            Ok(None) => Response::Error {
                message: format!("no run {run}"),
                invalid: true,
            },
            Err(e) => fail(e.to_string()),
        },
        Request::Submit { path } => {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    return Response::Error {
                        message: format!("{}: {e}", path.display()),
                        invalid: true,
                    };
                }
            };
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let checked = load_tools(shared, &dir)
                .and_then(|tools| workflow::parse(&path, &bytes, &tools).map(|p| (p, tools)));
            match checked {
                Ok((plan, tools)) => match record(shared, &plan, &path, &dir, None) {
                    Ok(run) => {
                        start(shared, run, plan, dir, tools);
                        Response::Submitted { run }
                    }
                    Err(e) => fail(format!("{e:#}")),
                },
                Err(problems) => Response::Error {
                    message: problems.to_string(),
                    invalid: true,
                },
            }
        }
        Request::Cancel { run } => {
            let token = shared
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&run)
                .cloned();
            match token {
                Some(t) => {
                    t.cancel();
                    Response::Done {
                        message: format!("run {run} canceled"),
                    }
                }
                None => match shared.store.run(run) {
                    Ok(Some(r)) => Response::Error {
                        message: format!("run {run} is {}, not running", r.state),
                        invalid: true,
                    },
                    Ok(None) => Response::Error {
                        message: format!("no run {run}"),
                        invalid: true,
                    },
                    Err(e) => fail(e.to_string()),
                },
            }
        }
        // answered here, carried out by the connection once the answer is sent
        Request::Shutdown => Response::Done {
            message: "shutting down".into(),
        },
    }
}

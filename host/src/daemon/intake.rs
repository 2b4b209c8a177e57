//! Taking files in: watching the folders, waiting for a file to be whole, claiming it,
//! checking it, and recording its run or rejecting it with a report.

use sha2::{Digest, Sha256};

use super::dropped;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::*;

/// How long a file held open by some process, and not changing, is waited for before it is
/// read anyway (its close event may have been lost when the kernel's queue overflowed).
pub(super) const OPEN_WAIT: Duration = Duration::from_secs(60);

/// Dropped files read and checked at once. Checking a file at the size limit can take a few
/// hundred MB (a 100,000-step workflow takes 380 MB to plan): a burst of large drops is
/// taken in a few at a time, so memory stays bounded however many arrive.
pub(super) const CLAIMS_AT_ONCE: usize = 4;

/// The KiB of dropped files read and checked at once, at most: checking a file takes up to
/// some 80 times its size (8 MiB of a TOML array of numbers took 640 MB), so the largest files
/// are taken in one at a time, and smaller ones several at once.
pub(super) const CLAIM_KIB: usize = 8 << 10;

/// What a claim waits for before it reads its file: one of [`CLAIMS_AT_ONCE`] turns, and its
/// file's share of [`CLAIM_KIB`].
pub(super) struct Claiming {
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
pub(super) const CLAIM_TIME: Duration = Duration::from_secs(60);

/// How often a watched folder that was deleted is looked for, until it is back.
pub(super) const REAPPEAR_POLL: Duration = Duration::from_millis(250);

/// What the inbox task hears from the folder watchers.
pub(super) enum FolderEvent {
    /// A path changed, and how.
    Path(PathBuf, Seen),
    /// A watched folder is gone (deleted or moved away).
    Gone(PathBuf),
}

/// What a watcher saw happen to a path in a watched folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// It was renamed in: complete already.
    RenamedIn,
    /// Something opened it (a writer, perhaps).
    Opened,
    /// Something that had it open closed it.
    Closed,
    /// Anything else: written, made, listed at start.
    Changed,
}

/// A watcher over `dir` (its whole tree when `recursive`) that hands every event to
/// `handler`. Uses the kernel's notifications unless polling is configured; when the inotify
/// limits are reached, says so and polls instead.
pub(super) fn make_watcher<F>(
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
pub(super) fn at_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EMFILE)),
        _ => false,
    }
}

/// Watches a folder's direct children for submissions, and queues what is there already (a
/// writer may still be busy with those: they settle first).
pub(super) fn watch_inbox(shared: &Arc<Daemon>, dir: &Path) -> anyhow::Result<()> {
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
                    let _ = tx.send(FolderEvent::Path(entry.path(), Seen::Changed));
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
                    let _ = tx.send(FolderEvent::Gone(folder.clone()));
                } else if renamed_in && i + 1 == count {
                    let _ = tx.send(FolderEvent::Path(path, Seen::RenamedIn));
                } else {
                    let _ = tx.send(FolderEvent::Path(path, seen));
                }
            }
        },
    )?;
    lock(&shared.watchers).insert((dir.to_path_buf(), false), watcher);
    for entry in std::fs::read_dir(dir)?.flatten() {
        let _ = shared
            .inbox
            .send(FolderEvent::Path(entry.path(), Seen::Changed));
    }
    Ok(())
}

/// A watched folder went away: wait for it to come back, then watch it again and pick up
/// whatever it holds. The wait polls, but only while the folder is missing.
pub(super) async fn await_folder(shared: Arc<Daemon>, dir: PathBuf) {
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
pub(super) fn own_folders(dir: &Path) -> std::io::Result<()> {
    let inbox = dropped::Inbox::open(dir)?;
    inbox.claimed()?;
    inbox.rejected()?;
    Ok(())
}

/// Whether a path is a submission: a `.toml`/`.json` file directly in a watched folder, not
/// the tools file, a dotfile or an editor's temporary.
pub(super) fn is_submission(path: &Path, watch: &[PathBuf]) -> bool {
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
pub(super) async fn inbox(shared: Arc<Daemon>, mut messages: mpsc::UnboundedReceiver<FolderEvent>) {
    let settling: Arc<Mutex<std::collections::HashSet<PathBuf>>> = Arc::default();
    let opened: Arc<Mutex<HashMap<PathBuf, u32>>> = Arc::default();
    let claiming = Arc::new(Claiming {
        turns: Arc::new(Semaphore::new(CLAIMS_AT_ONCE)),
        kib: Arc::new(Semaphore::new(CLAIM_KIB)),
    });
    let mut gone: std::collections::HashSet<PathBuf> = Default::default();
    while let Some(message) = messages.recv().await {
        let (path, seen) = match message {
            FolderEvent::Gone(dir) => {
                // one waiter per folder, however many events said so
                if gone.insert(dir.clone()) {
                    let shared = shared.clone();
                    let (tx, dir2) = (shared.inbox.clone(), dir.clone());
                    tokio::spawn(async move {
                        await_folder(shared, dir2.clone()).await;
                        let _ = tx.send(FolderEvent::Path(dir2, Seen::Changed));
                    });
                }
                continue;
            }
            FolderEvent::Path(path, seen) => (path, seen),
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
pub(super) async fn settle(
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
pub(super) type Stamp = Option<(u64, Option<std::time::SystemTime>)>;

pub(super) fn file_stamp(path: &Path) -> Stamp {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.len(), m.modified().ok()))
}

/// Why a claimed file did not become a run.
pub(super) enum ClaimError {
    /// The file is not a valid workflow: it went to `rejected/` with this report.
    Rejected(String),
    /// The daemon could not record it (the claim stays, and is retried at the next start).
    Failed(String),
}

/// Claims a file by renaming it out of the inbox (only one claimer can win a rename), then
/// records it. `None` when another claimer won, or the claim could not be made (logged).
pub(super) fn claim(shared: &Arc<Daemon>, path: &Path) -> Option<Result<RunId, ClaimError>> {
    let dir = path.parent()?;
    let name = path.file_name()?.to_str()?.to_string();
    // every folder a claim may need, before the file is moved: a claim that could not be
    // rejected would sit unseen in `.uet/claimed`
    let folders = dropped::Inbox::open(dir).and_then(|inbox| {
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
    if name.len() > dropped::MAX_NAME {
        // its claim's name would not fit a file name: refused from where it lies
        let refusal = dropped::Refusal::NameTooLong(name.len());
        let shown = dropped::shortened(&name);
        return Some(Err(refuse(&inbox, inbox.fd(), &name, &shown, &refusal)));
    }
    let claim = dropped::ClaimName::now(&name);
    match dropped::rename_at(inbox.fd(), &name, &claimed, &claim.to_string(), false) {
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
    if let Err(e) = dropped::sync_folder(&claimed).and_then(|()| dropped::sync_folder(inbox.fd())) {
        tracing::warn!(file = %path.display(), "cannot sync the claim: {e}");
    }
    Some(process_claim(shared, &inbox, &claimed, &claim))
}

/// Finishes claims a crash interrupted: recorded ones are removed, the others taken in again,
/// unless taking one in has already stopped the daemon [`dropped::CLAIM_TRIES`] times.
pub(super) fn recover_claims(shared: &Arc<Daemon>, dir: &Path) {
    let folders = dropped::Inbox::open(dir).and_then(|inbox| {
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
    let names = match dropped::names_in(&claimed) {
        Ok(names) => names,
        Err(e) => {
            tracing::error!(folder = %dir.display(), "cannot look for claims a crash left: {e}");
            return;
        }
    };
    for file_name in names {
        let claim = dropped::ClaimName::parse(&file_name).unwrap_or_else(|| dropped::ClaimName {
            stamp: 0,
            tries: 1,
            name: file_name.clone(),
        });
        match shared.store.submission(&file_name) {
            Ok(Some(_)) => {
                let _ = dropped::remove_at(&claimed, &file_name);
            }
            Ok(None) if claim.tries >= dropped::CLAIM_TRIES => {
                let _ = refuse(
                    &inbox,
                    &claimed,
                    &file_name,
                    &claim.name,
                    &dropped::Refusal::Crashed,
                );
            }
            Ok(None) => {
                // the try is counted on disk before the file is read again: if reading it
                // stops this daemon too, the next start knows
                let again = claim.retried();
                let counted =
                    dropped::rename_at(&claimed, &file_name, &claimed, &again.to_string(), false)
                        .and_then(|()| dropped::sync_folder(&claimed));
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
pub(super) fn refuse(
    inbox: &dropped::Inbox,
    from_dir: &std::os::fd::OwnedFd,
    from: &str,
    name: &str,
    refusal: &dropped::Refusal,
) -> ClaimError {
    let shown = inbox.path.join(name);
    let report = format!("{}: refused: {refusal}\n", shown.display());
    match dropped::reject(inbox, from_dir, from, name, &report) {
        Ok(at) => {
            tracing::warn!(file = %shown.display(), report = %at.display(), "submission refused: {refusal}");
            ClaimError::Rejected(report)
        }
        Err(e) => ClaimError::Failed(unrejected(inbox, from_dir, from, name, &e)),
    }
}

/// A claimed file that could not be moved to `rejected/` goes back where it was dropped (not
/// over a file dropped since), so it is not left unseen in `.uet/claimed`; says so.
pub(super) fn unrejected(
    inbox: &dropped::Inbox,
    from_dir: &std::os::fd::OwnedFd,
    from: &str,
    name: &str,
    e: &std::io::Error,
) -> String {
    let shown = inbox.path.join(name);
    let back = dropped::rename_at(from_dir, from, inbox.fd(), name, true);
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
/// report of every problem (and says so to whoever follows every run's events).
pub(super) fn process_claim(
    shared: &Arc<Daemon>,
    inbox: &dropped::Inbox,
    claimed: &std::os::fd::OwnedFd,
    claim: &dropped::ClaimName,
) -> Result<RunId, ClaimError> {
    let done = check_claim(shared, inbox, claimed, claim);
    if let Err(ClaimError::Rejected(_)) = done {
        shared.refusals.send_modify(|n| *n += 1);
    }
    done
}

fn check_claim(
    shared: &Arc<Daemon>,
    inbox: &dropped::Inbox,
    claimed: &std::os::fd::OwnedFd,
    claim: &dropped::ClaimName,
) -> Result<RunId, ClaimError> {
    let name = &claim.name;
    let claim_name = claim.to_string();
    let dir = inbox.path.as_path();
    let bytes = match dropped::read_dropped(claimed, &claim_name, shared.config.max_file) {
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
            .and_then(|(plan, tools)| {
                webhooks_allow(shared, &shown, &plan)?;
                Ok((plan, tools))
            })
    }));
    drop(bytes);
    let Ok(checked) = checked else {
        let refusal = dropped::Refusal::Unchecked;
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
                    let _ = dropped::remove_at(claimed, &claim_name);
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
            match dropped::reject(inbox, claimed, &claim_name, name, &report) {
                Ok(at) => {
                    tracing::warn!(
                        file = %shown.display(),
                        report = %at.display(),
                        "submission rejected: {} problems",
                        problems.count()
                    );
                    Err(ClaimError::Rejected(report))
                }
                Err(e) => Err(ClaimError::Failed(unrejected(
                    inbox,
                    claimed,
                    &claim_name,
                    name,
                    &e,
                ))),
            }
        }
    }
}

/// A workflow's webhook must be one the operator listed (`webhooks` in the config): a drop
/// must not make the daemon call whatever address it likes.
pub(super) fn webhooks_allow(
    shared: &Daemon,
    file: &Path,
    plan: &Plan,
) -> Result<(), crate::spec::doc::Problems> {
    crate::engine::notify::Webhooks::Listed(shared.config.webhooks.clone())
        .allows(plan.notify.as_ref())
        .map_err(|why| crate::spec::doc::Problems::of_file(file, why))
}

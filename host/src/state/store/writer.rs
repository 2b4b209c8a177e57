//! The write side's threads: the journal's sync thread and the writer thread that puts synced
//! batches into the database, the lock they share with every commit, and the durable commit
//! of a checkpoint.

use super::*;

/// What every handle of one open state, and its writer thread, share.
pub(super) struct Shared {
    pub(super) db: Db,
    /// The state's lock (`uet.lock`), held as long as the store is open.
    pub(super) _lock: Option<std::fs::File>,
    /// Whether copies of the database are kept beside it (a store over files).
    pub(super) copies: bool,
    /// A checkpoint is due once this much is journaled since the last.
    pub(super) checkpoint_after: u64,
    /// The database file.
    pub(super) path: PathBuf,
    /// Opened to be read only: every write is refused before it starts.
    pub(super) read_only: bool,
    /// The thread writing a copy of the state ([`Shared::back_up_if_due`]), if one was started:
    /// a close waits for it, so the file is closed when the store is.
    pub(super) backup: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The journal's file, for the sync thread to sync batches written to it unsynced.
    pub(super) syncer: std::sync::Arc<dyn crate::state::journal::JournalFile>,
    pub(super) writes: Mutex<Writes>,
    /// New runs waiting to be recorded together ([`Store::create`]), and the turn to record
    /// them.
    pub(super) creating: Mutex<super::Creating>,
    pub(super) create_turn: Mutex<()>,
    /// Wakes the writer thread: a batch is queued or synced, or the store is closing.
    pub(super) queued: Condvar,
    /// Wakes the sync thread: a batch was written unsynced, or the store is closing.
    pub(super) unsynced: Condvar,
    /// Wakes those waiting for the writer thread to finish its batch.
    pub(super) caught_up: Condvar,
}

/// The write side, under one lock held from a batch's read of the state to its journal write,
/// so batches reach the journal, and the database, in order.
pub(super) struct Writes {
    pub(super) journal: crate::state::journal::Journal,
    /// The journaled batches the writer thread is to put into the database next, in order.
    pub(super) behind: Vec<Behind>,
    /// The number of the last batch journaled, of the last known synced, and of the last the
    /// database holds.
    pub(super) written: u64,
    pub(super) synced: u64,
    pub(super) applied: u64,
    /// The rows batches wrote lately, as they stand after the last of them: every row of a
    /// batch not yet in the database is here.
    pub(super) pending: Pending,
    /// How many wait for the database to catch up: the writer thread stops gathering.
    pub(super) waiting: usize,
    /// The writer thread has taken batches and is putting them in.
    pub(super) writing: bool,
    /// How many wait to write the database directly: the writer thread takes no batches.
    pub(super) settling: usize,
    /// The time the writer thread's transactions took, for `RUST_LOG=uet=debug`.
    pub(super) writing_time: std::time::Duration,
    /// The writer thread's transactions, and those of them it made for someone waiting.
    pub(super) transactions: u64,
    pub(super) hurried: u64,
    /// Why a journal write, the writer thread or a durable commit failed: the journal's end,
    /// or what the database holds, is then unknown, so this process reads and writes nothing
    /// more (a restart settles it from the files).
    pub(super) failed: Option<String>,
    /// The last handle is gone: the writer thread finishes its batch and stops.
    pub(super) closing: bool,
}

/// A batch written to the journal, waiting for the writer thread.
pub(super) struct Behind {
    pub(super) seq: u64,
    pub(super) batch: Vec<u8>,
    /// When it was queued.
    pub(super) at: std::time::Instant,
}

/// The rows batches wrote, decoded, each with the number of the last batch that wrote it: a
/// batch reads them before the database, so it builds on the batches before it without waiting
/// for the writer thread, and decodes nothing a batch just before it encoded (a step's row is
/// read back two or three times in a few milliseconds). Rows the database has are kept until
/// there are [`Pending::KEPT`] rows or [`Pending::KEPT_BYTES`] of batches since the last
/// trim; every direct write of the database drops them.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) runs: HashMap<RunId, (u64, RunRow)>,
    pub(super) steps: HashMap<(RunId, String), (u64, StepRow)>,
    pub(super) attempts: HashMap<(RunId, String, u32), (u64, AttemptRecord)>,
    pub(super) stats: HashMap<String, (u64, ToolStats)>,
    pub(super) durations: HashMap<String, (u64, Vec<u64>)>,
    /// The encoded size of the batches added since the rows the database has were last dropped:
    /// a bound on what they hold (a step's row carries its output, up to 1 MiB).
    pub(super) added: usize,
}

impl Pending {
    const KEPT: usize = 1 << 15;
    const KEPT_BYTES: usize = 8 << 20;

    /// The rows of batch `seq` (its record `bytes` long), as they stand after it.
    pub(super) fn add(&mut self, seq: u64, rows: BatchRows, bytes: usize) {
        self.added += bytes;
        self.runs
            .extend(rows.runs.into_iter().map(|(k, v)| (k, (seq, v))));
        self.steps
            .extend(rows.steps.into_iter().map(|(k, v)| (k, (seq, v))));
        self.attempts
            .extend(rows.attempts.into_iter().map(|(k, v)| (k, (seq, v))));
        self.stats
            .extend(rows.stats.into_iter().map(|(k, v)| (k, (seq, v))));
        self.durations
            .extend(rows.durations.into_iter().map(|(k, v)| (k, (seq, v))));
    }

    /// The database holds the batches up to `seq`: their rows may be read from there again.
    pub(super) fn applied(&mut self, seq: u64) {
        let kept = self.runs.len()
            + self.steps.len()
            + self.attempts.len()
            + self.stats.len()
            + self.durations.len();
        if kept < Self::KEPT && self.added < Self::KEPT_BYTES {
            return;
        }
        self.added = 0;
        self.runs.retain(|_, (s, _)| *s > seq);
        self.steps.retain(|_, (s, _)| *s > seq);
        self.attempts.retain(|_, (s, _)| *s > seq);
        self.stats.retain(|_, (s, _)| *s > seq);
        self.durations.retain(|_, (s, _)| *s > seq);
    }
}

impl Writes {
    /// Takes the batches the writer thread has not: under [`Shared::settled`]'s lock, a
    /// durable commit writes them itself, before its own rows.
    pub(super) fn take_behind(&mut self) -> Vec<Behind> {
        let taken = std::mem::take(&mut self.behind);
        (self.synced, self.applied) = (self.written, self.written);
        taken
    }
}

/// A durable commit's first rows: the batches it took from the writer thread.
pub(super) fn replay_behind(tx: &WriteTransaction, behind: &[Behind]) -> Result<(), StateError> {
    let records: Vec<&[u8]> = behind.iter().map(|b| b.batch.as_slice()).collect();
    replay(tx, &records)
}

/// Waits on `condvar` with the write lock, for at most `up_to` when given; poisoning is
/// passed over as in [`Shared::lock`].
pub(super) fn wait_on<'s>(
    condvar: &Condvar,
    writes: MutexGuard<'s, Writes>,
    up_to: Option<std::time::Duration>,
) -> MutexGuard<'s, Writes> {
    match up_to {
        Some(t) => {
            condvar
                .wait_timeout(writes, t)
                .unwrap_or_else(|e| e.into_inner())
                .0
        }
        None => condvar.wait(writes).unwrap_or_else(|e| e.into_inner()),
    }
}

impl Shared {
    /// The shared state of a store over `db`, and the owner of its threads (none started yet:
    /// an open for reading starts none).
    pub(super) fn new(
        db: Db,
        path: PathBuf,
        journal: crate::state::journal::Journal,
        read_only: bool,
        setup: Setup,
    ) -> Result<(Arc<Shared>, Writer), StateError> {
        let syncer = journal.syncer();
        let shared = Arc::new(Shared {
            db,
            _lock: setup.lock,
            copies: setup.copies,
            checkpoint_after: setup.checkpoint_after,
            path,
            read_only,
            backup: Mutex::new(None),
            creating: Mutex::new(Vec::new()),
            create_turn: Mutex::new(()),
            syncer,
            writes: Mutex::new(Writes {
                journal,
                behind: Vec::new(),
                written: 0,
                synced: 0,
                applied: 0,
                pending: Pending::default(),
                waiting: 0,
                writing: false,
                settling: 0,
                writing_time: std::time::Duration::ZERO,
                transactions: 0,
                hurried: 0,
                failed: None,
                closing: false,
            }),
            queued: Condvar::new(),
            unsynced: Condvar::new(),
            caught_up: Condvar::new(),
        });
        // dropped on an error before the store is whole, it stops the threads already started
        let writer = Writer {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        Ok((shared, writer))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Writes> {
        // a panic with the lock held came before the batch reached the journal, or inside a
        // durable commit, which marks the store failed first: what it guards is still whole
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the store failed: a journal write or sync, the writer thread or a durable commit
    /// failed, so what the journal or the database holds is unknown. This process writes
    /// nothing more (a restart settles it from the files); the batches behind are dropped,
    /// after a last try at syncing what was acknowledged, and everyone waiting is told.
    pub(super) fn fail(&self, writes: &mut Writes, reason: String) {
        writes.failed.get_or_insert(reason);
        let _ = self.syncer.sync();
        writes.behind.clear();
        (writes.synced, writes.applied) = (writes.written, writes.written);
        self.caught_up.notify_all();
        self.queued.notify_all();
        self.unsynced.notify_all();
    }

    /// Renews the last good copy of the state on a thread of its own when it is due (at most
    /// every [`BACKUP_EVERY`]): it reads a snapshot, so commits go on meanwhile. A panic of
    /// the database while reading a damaged page ends the copy, not the process.
    pub(super) fn back_up_if_due(self: &Arc<Self>) {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if self.read_only || !self.copies || !backup_due(&dir) {
            return;
        }
        let mut running = self.backup.lock().unwrap_or_else(|e| e.into_inner());
        if running.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let shared = self.clone();
        // the thread's own handle of the store is let go when it ends: only a store's last
        // handle closes it
        let started = std::thread::Builder::new()
            .name("uet-state-backup".into())
            .spawn(move || shared.back_up(&dir));
        *running = started.ok();
    }

    /// Writes the last good copy now, and says how it went in the log.
    pub(super) fn back_up(&self, dir: &Path) {
        let began = std::time::Instant::now();
        let copied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_backup(&self.db, dir)));
        match copied {
            Ok(Ok(rows)) => {
                tracing::debug!(rows, took = ?began.elapsed(), "wrote the state's last good copy")
            }
            Ok(Err(e)) => tracing::error!(
                "cannot copy the state {}: {e}; the last good copy is kept (`uet state check` says more)",
                self.path.display()
            ),
            Err(_) => tracing::error!(
                "the state {} could not be read whole (its database panicked): the last good copy is kept; `uet state check` says more",
                self.path.display()
            ),
        }
    }

    /// The write lock, unless the store has failed.
    pub(super) fn usable(&self) -> Result<MutexGuard<'_, Writes>, StateError> {
        if self.read_only {
            return Err(StateError::ReadOnly(self.path.clone()));
        }
        let writes = self.lock();
        match &writes.failed {
            Some(e) => Err(failed(e)),
            None => Ok(writes),
        }
    }

    /// Waits until the database holds every batch journaled before this call (and so every
    /// sync behind is done), then lets go of the lock: later batches need not be waited for, so
    /// a reader is not held up for as long as a run keeps committing.
    pub(super) fn caught_up(&self) -> Result<(), StateError> {
        let mut writes = self.lock();
        let target = writes.written;
        writes = self.wait_for(writes, |w| w.applied >= target);
        match &writes.failed {
            Some(e) => Err(failed(e)),
            None => Ok(()),
        }
    }

    /// The write lock, with no batch in the writer thread's hands: for the writes that go into
    /// the database directly (durable commits), which must come after every journaled batch.
    /// The batches still in `behind` are the caller's to write first ([`Writes::take_behind`]);
    /// waiting for the writer thread to put them in instead could take as long as runs keep
    /// committing.
    pub(super) fn settled(&self) -> Result<MutexGuard<'_, Writes>, StateError> {
        if self.read_only {
            return Err(StateError::ReadOnly(self.path.clone()));
        }
        let mut writes = self.lock();
        // the writer thread takes no more batches meanwhile (see `write_behind`)
        writes.settling += 1;
        writes = self.wait_for(writes, |w| !w.writing);
        writes.settling -= 1;
        // to take batches again once this lock is let go
        self.queued.notify_one();
        match &writes.failed {
            Some(e) => Err(failed(e)),
            None => Ok(writes),
        }
    }

    /// Waits until `done` or the store has failed, hurrying the writer thread meanwhile.
    pub(super) fn wait_for<'s>(
        &'s self,
        mut writes: MutexGuard<'s, Writes>,
        done: impl Fn(&Writes) -> bool,
    ) -> MutexGuard<'s, Writes> {
        if done(&writes) || writes.failed.is_some() {
            return writes;
        }
        writes.waiting += 1;
        self.queued.notify_one();
        self.unsynced.notify_one();
        while !done(&writes) && writes.failed.is_none() {
            writes = wait_on(&self.caught_up, writes, None);
        }
        writes.waiting -= 1;
        writes
    }
}

pub(super) fn failed(reason: &str) -> StateError {
    StateError::Journal(std::io::Error::other(format!(
        "the state could not be written ({reason}); restart uet to recover from the journal"
    )))
}

/// How long the writer thread lets batches gather before it puts them into the database,
/// unless someone waits for them, and how many it lets gather at most: one transaction for a
/// few milliseconds' batches costs little more than one for a single batch.
pub(super) const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

pub(super) const GATHER_MOST: usize = 64;

/// How long a batch written unsynced may wait for others to share its sync: a sync costs
/// some 40 µs of CPU here whatever it carries, and a wide run commits every few hundred
/// microseconds. It is also how much longer than one sync a power loss can reach back.
pub(super) const SYNC_GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// The sync thread: syncs the journal records written unsynced as they come, a thread of its
/// own so that the writer thread's transactions never hold a sync back.
pub(super) fn sync_behind(shared: &Shared) {
    let mut writes = shared.lock();
    loop {
        if writes.synced >= writes.written || writes.failed.is_some() {
            if writes.closing {
                return;
            }
            writes = wait_on(&shared.unsynced, writes, None);
            continue;
        }
        let synced = writes.synced;
        let oldest = writes.behind.iter().find(|b| b.seq > synced).map(|b| b.at);
        let age = oldest.map_or(SYNC_GATHER, |at| at.elapsed());
        if writes.waiting == 0 && !writes.closing && age < SYNC_GATHER {
            writes = wait_on(&shared.unsynced, writes, Some(SYNC_GATHER - age));
            continue;
        }
        // one sync covers every record written before it
        let target = writes.written;
        drop(writes);
        let began = std::time::Instant::now();
        let result = shared.syncer.sync();
        let took = began.elapsed();
        writes = shared.lock();
        writes.journal.synced(took);
        match result {
            Ok(()) => writes.synced = writes.synced.max(target),
            Err(e) => {
                tracing::error!("cannot sync the state's journal: {e}");
                shared.fail(&mut writes, format!("a journal sync failed: {e}"));
            }
        }
        // the writer thread may put them in now
        shared.queued.notify_one();
    }
}

/// The writer thread: puts the journaled batches, once synced, into the database, committed
/// without a sync (the journal made them durable), a few milliseconds' worth at a time, while
/// the engine goes on.
pub(super) fn write_behind(shared: &Shared) {
    let mut writes = shared.lock();
    loop {
        let synced = writes.synced;
        let ready = writes.behind.partition_point(|b| b.seq <= synced);
        // once the store failed this process writes nothing more (see `Shared::fail`); else
        // nothing synced may be there yet, or a durable write takes what is behind itself
        let failed = writes.failed.is_some();
        if failed || ready == 0 || writes.settling > 0 {
            if writes.closing && (failed || writes.behind.is_empty()) {
                return;
            }
            writes = wait_on(&shared.queued, writes, None);
            continue;
        }
        let gathering = writes.behind[0].at.elapsed();
        if writes.waiting == 0 && !writes.closing && gathering < GATHER && ready < GATHER_MOST {
            writes = wait_on(&shared.queued, writes, Some(GATHER - gathering));
            continue;
        }
        let batches: Vec<Behind> = writes.behind.drain(..ready.min(GATHER_MOST)).collect();
        let last = batches.last().map_or(0, |b| b.seq);
        writes.transactions += 1;
        writes.hurried += u64::from(writes.waiting > 0);
        writes.writing = true;
        drop(writes);
        let began = std::time::Instant::now();
        // a panic here must not leave every reader waiting for a batch that never lands
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_batches(&shared.db, &batches)
        }))
        .unwrap_or_else(|_| Err(malformed("writing it panicked".into())));
        writes = shared.lock();
        writes.writing = false;
        writes.writing_time += began.elapsed();
        writes.applied = writes.applied.max(last);
        writes.pending.applied(last);
        if let Err(e) = written {
            tracing::error!("cannot write a journaled batch into the state: {e}");
            shared.fail(&mut writes, e.to_string());
        }
        shared.caught_up.notify_all();
    }
}

pub(super) fn write_batches(db: &Db, batches: &[Behind]) -> Result<(), StateError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::None).map_err(storage)?;
    let records: Vec<&[u8]> = batches.iter().map(|b| b.batch.as_slice()).collect();
    replay(&tx, &records)?;
    tx.commit().map_err(storage)
}

/// Owns the writer thread; dropped with the last handle of the store.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    /// The writer thread and the sync thread.
    pub(super) threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    /// Stops the writer and sync threads once they are done, then checkpoints: a clean close
    /// leaves the database holding everything, so the next open replays nothing.
    fn drop(&mut self) {
        // a copy being written holds a handle of the store: the file closes once it is done
        let copying = self
            .shared
            .backup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = copying {
            let _ = thread.join();
        }
        self.shared.lock().closing = true;
        self.shared.queued.notify_all();
        self.shared.unsynced.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let mut writes = self.shared.lock();
        if writes.journal.appended() == 0 || writes.failed.is_some() {
            return;
        }
        let checkpoint = self.shared.db.begin_write();
        if let Err(e) = checkpoint.and_then(|tx| commit_durably(tx, &mut writes)) {
            tracing::warn!("final state checkpoint failed; the next open replays the journal: {e}");
            return;
        }
        drop(writes);
        // the last chance of a short-lived uet (`uet run`) to leave a copy: made here, at once
        let dir = self.shared.path.parent().unwrap_or(Path::new("."));
        if self.shared.copies && backup_due(dir) {
            self.shared.back_up(dir);
        }
    }
}

/// Commits `tx` durably, naming a new journal generation in it: once that lands the database
/// holds every batch journaled before, and the journal starts over.
///
/// A commit that fails, or panics, may still have reached the disk in part (its header can land
/// after a failed flush), so the database may name either generation: the store then refuses
/// all work, and a restart finds out which from the file.
pub(super) fn commit_durably(tx: WriteTransaction, writes: &mut Writes) -> Result<(), StateError> {
    let began = std::time::Instant::now();
    let journaled = writes.journal.appended();
    let generation = writes.journal.generation() + 1;
    writes.failed = Some("a durable commit did not finish".into());
    let committed = (|| {
        tx.open_table(META)
            .map_err(storage)?
            .insert(JOURNAL_GENERATION, generation)
            .map_err(storage)?;
        tx.commit().map_err(storage)
    })();
    if let Err(e) = committed {
        writes.failed = Some(format!("a durable commit failed: {e}"));
        return Err(e);
    }
    // every caller holds a store that had not failed (or marked it failed only for this)
    writes.failed = None;
    writes.journal.restart(generation);
    tracing::debug!(journaled, took = ?began.elapsed(), "durable commit");
    Ok(())
}

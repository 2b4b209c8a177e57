//! Batches: a list of changes checked against the lifecycles, turned into rows and events,
//! journaled and put in (`Store::apply`).

use super::*;

/// The rows a batch touches, each read on first use (from `pending`, else the database) and
/// changed in memory as its changes come, then encoded once at its end, with the events the
/// changes made, into one journal record.
struct Batch<'b> {
    db: Reader<'b>,
    pending: &'b Pending,
    redo: Redo,
    now: Millis,
    runs: Touched<RunId, RunRow>,
    steps: Touched<(RunId, String), StepRow>,
    attempts: Touched<(RunId, String, u32), AttemptRecord>,
    stats: Touched<String, ToolStats>,
    durations: Touched<String, Vec<u64>>,
}

/// The rows a batch wrote, as they stand after it: what [`Pending`] keeps until the database
/// has them.
pub(super) struct BatchRows {
    pub(super) runs: BTreeMap<RunId, RunRow>,
    pub(super) steps: BTreeMap<(RunId, String), StepRow>,
    pub(super) attempts: BTreeMap<(RunId, String, u32), AttemptRecord>,
    pub(super) stats: BTreeMap<String, ToolStats>,
    pub(super) durations: BTreeMap<String, Vec<u64>>,
}

impl<'b> Batch<'b> {
    fn new(db: Reader<'b>, pending: &'b Pending) -> Self {
        Batch {
            db,
            pending,
            redo: Redo::default(),
            now: now_millis(),
            runs: Touched::default(),
            steps: Touched::default(),
            attempts: Touched::default(),
            stats: Touched::default(),
            durations: Touched::default(),
        }
    }

    /// Checks a change against the lifecycles and makes it to the rows; records its event.
    fn apply(&mut self, change: &Change) -> Result<(), StateError> {
        let run_id = change_run(change);
        let (db, pending) = (&mut self.db, self.pending);
        let run = self.runs.get(run_id, || load_run(db, pending, run_id))?;
        let redo = &mut self.redo;
        match change {
            Change::RunState { to, reason, .. } => run_state(redo, run, *to, reason, self.now),
            Change::StepState {
                step,
                to,
                reason,
                output,
                ..
            } => {
                let s = self.steps.get((run_id, step.clone()), || {
                    load_step(db, pending, run_id, step)
                })?;
                step_state(redo, run, s, step, *to, reason, output, self.now)
            }
            Change::AttemptStarted {
                step, number, tool, ..
            } => {
                let s = self.steps.get((run_id, step.clone()), || {
                    load_step(db, pending, run_id, step)
                })?;
                let (name, folder) = crate::model::split_tool_key(tool);
                s.record.attempts = *number;
                s.record.tool = Some(name.to_string());
                s.record.progress = None;
                s.record.attempt_started_at = Some(self.now);
                let attempt = AttemptRecord {
                    number: *number,
                    tool: name.to_string(),
                    folder: folder.to_string(),
                    started_at: self.now,
                    finished_at: None,
                    outcome: None,
                    error: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    retry_at: None,
                };
                self.attempts
                    .0
                    .insert((run_id, step.clone(), *number), attempt);
                let detail = format!("attempt {number} with tool {tool}");
                append_event(redo, run, Some(step), "attempt.started", detail)
            }
            Change::AttemptFinished { .. } => self.attempt_finished(change),
            Change::Breaker {
                step, transition, ..
            } => {
                let record = encode(&transition.record);
                redo.row(BREAKERS, transition.tool.as_str(), &record);
                match &transition.event {
                    Some((kind, detail)) => {
                        append_event(redo, run, step.as_deref(), kind, detail.clone())
                    }
                    None => Ok(()),
                }
            }
            Change::StepProgress {
                step,
                fraction,
                message,
                ..
            } => {
                let s = self.steps.get((run_id, step.clone()), || {
                    load_step(db, pending, run_id, step)
                })?;
                s.record.progress = Some(fraction.clamp(0.0, 1.0));
                let detail = format!("{:.0}% {message}", fraction * 100.0);
                append_event(redo, run, Some(step), "plugin.progress", detail)
            }
            Change::Recovered { .. } => {
                run.record.crashes += 1;
                let detail = format!(
                    "found in flight after an unclean stop ({} in a row)",
                    run.record.crashes
                );
                append_event(redo, run, None, "run.recovered", detail)
            }
            Change::Event {
                step, kind, detail, ..
            } => append_event(redo, run, step.as_deref(), kind, detail.clone()),
        }
    }

    /// An attempt ends: its row, its tool's counters and durations, its event.
    fn attempt_finished(&mut self, change: &Change) -> Result<(), StateError> {
        let Change::AttemptFinished {
            run: run_id,
            step,
            number,
            outcome,
            error,
            stdout,
            stderr,
            retry_at,
        } = change
        else {
            unreachable!("called for an attempt's end")
        };
        let (db, pending, now) = (&mut self.db, self.pending, self.now);
        let attempt = self.attempts.get((*run_id, step.clone(), *number), || {
            load_attempt(db, pending, *run_id, step, *number)
        })?;
        attempt.finished_at = Some(now);
        attempt.outcome = Some(*outcome);
        let took = now.saturating_sub(attempt.started_at);
        // counted per tool identity, and (for ETAs, which know steps' tools by name) per name
        let key = crate::model::tool_key(&attempt.tool, &attempt.folder);
        self.stats
            .get(key.clone(), || {
                or_default(db, Reader::stats, &pending.stats, &key)
            })?
            .record(*outcome, took);
        let tool = attempt.tool.as_str();
        if *outcome == Outcome::Succeeded {
            let kept = self.durations.get(tool.to_string(), || {
                or_default(db, Reader::durations, &pending.durations, tool)
            })?;
            kept.push(took);
            let extra = kept.len().saturating_sub(DURATIONS_KEPT);
            kept.drain(..extra);
        }
        attempt.error = error.clone();
        attempt.stdout = stdout.clone();
        attempt.stderr = stderr.clone();
        attempt.retry_at = *retry_at;
        let kind = format!("attempt.{}", outcome_name(*outcome));
        let mut detail = format!("attempt {number}");
        if let Some(e) = error {
            detail.push_str(&format!(": {e}"));
        }
        if let Some(at) = retry_at {
            detail.push_str(&format!("; next attempt in {}ms", at.saturating_sub(now)));
        }
        let run = self.runs.get(*run_id, || load_run(db, pending, *run_id))?;
        append_event(&mut self.redo, run, Some(step), &kind, detail)
    }

    /// Encodes every row the batch touched, once, after its events; the journal record and
    /// the rows as they now stand.
    fn finish(mut self) -> (Redo, BatchRows) {
        for (id, run) in &self.runs.0 {
            self.redo.row(RUNS, *id, &encode(run));
        }
        for ((run, step), row) in &self.steps.0 {
            self.redo.row(STEPS, (*run, step.as_str()), &encode(row));
        }
        for ((run, step, number), attempt) in &self.attempts.0 {
            self.redo
                .row(ATTEMPTS, (*run, step.as_str(), *number), &encode(attempt));
        }
        for (tool, s) in &self.stats.0 {
            self.redo.row(TOOL_STATS, tool.as_str(), &encode(s));
        }
        for (tool, kept) in &self.durations.0 {
            self.redo.row(DURATIONS, tool.as_str(), &encode(kept));
        }
        let rows = BatchRows {
            runs: self.runs.0,
            steps: self.steps.0,
            attempts: self.attempts.0,
            stats: self.stats.0,
            durations: self.durations.0,
        };
        (self.redo, rows)
    }
}

/// A run moves to another state, if its lifecycle allows.
fn run_state(
    redo: &mut Redo,
    run: &mut RunRow,
    to: RunState,
    reason: &Option<String>,
    now: Millis,
) -> Result<(), StateError> {
    let r = &mut run.record;
    if !r.state.can_become(to) {
        return Err(StateError::IllegalTransition {
            run: r.id,
            step: None,
            from: r.state.to_string(),
            to: to.to_string(),
        });
    }
    r.state = to;
    r.reason = reason.clone();
    match to {
        RunState::Running => {
            r.started_at.get_or_insert(now);
        }
        RunState::Pending => {
            r.finished_at = None;
            // back in the queue on purpose: earlier crashes are forgiven
            r.crashes = 0;
        }
        _ => r.finished_at = Some(now),
    }
    let detail = reason.clone().unwrap_or_default();
    append_event(redo, run, None, &format!("run.{to}"), detail)
}

/// A step moves to another state, if its lifecycle allows; a success keeps its output.
#[allow(clippy::too_many_arguments)]
fn step_state(
    redo: &mut Redo,
    run: &mut RunRow,
    row: &mut StepRow,
    step: &str,
    to: StepState,
    reason: &Option<String>,
    output: &Option<serde_json::Value>,
    now: Millis,
) -> Result<(), StateError> {
    let s = &mut row.record;
    if !s.state.can_become(to) {
        return Err(StateError::IllegalTransition {
            run: run.record.id,
            step: Some(step.to_string()),
            from: s.state.to_string(),
            to: to.to_string(),
        });
    }
    s.state = to;
    s.reason = reason.clone();
    match to {
        StepState::Running => {
            s.started_at.get_or_insert(now);
        }
        StepState::Pending => {
            s.finished_at = None;
            s.output = None;
        }
        _ => s.finished_at = Some(now),
    }
    if to == StepState::Succeeded {
        s.output = output.clone();
    }
    let detail = reason.clone().unwrap_or_default();
    append_event(redo, run, Some(step), &format!("step.{to}"), detail)
}

fn load_run(db: &mut Reader<'_>, pending: &Pending, run: RunId) -> Result<RunRow, StateError> {
    if let Some((_, row)) = pending.runs.get(&run) {
        return Ok(row.clone());
    }
    match db.runs()?.get(run).map_err(storage)? {
        Some(v) => decode("runs", &run, v.value()),
        None => Err(StateError::UnknownRun(run)),
    }
}

fn load_attempt(
    db: &mut Reader<'_>,
    pending: &Pending,
    run: RunId,
    step: &str,
    number: u32,
) -> Result<AttemptRecord, StateError> {
    if let Some((_, row)) = pending.attempts.get(&(run, step.to_string(), number)) {
        return Ok(row.clone());
    }
    let key = (run, step, number);
    match db.attempts()?.get(key).map_err(storage)? {
        Some(v) => decode("attempts", &key, v.value()),
        None => Err(StateError::UnknownAttempt {
            run,
            step: step.to_string(),
            number,
        }),
    }
}

pub(super) fn change_run(change: &Change) -> RunId {
    match change {
        Change::RunState { run, .. }
        | Change::StepState { run, .. }
        | Change::AttemptStarted { run, .. }
        | Change::AttemptFinished { run, .. }
        | Change::Recovered { run }
        | Change::Breaker { run, .. }
        | Change::StepProgress { run, .. }
        | Change::Event { run, .. } => *run,
    }
}

/// The rows of one table that a batch touches, each read on first use and written back once
/// at the batch's end, however many changes touch it: a step's start, attempt and end often
/// share a commit, and every write of a row costs its encoding and a walk of its B-tree.
pub(super) struct Touched<K, V>(BTreeMap<K, V>);

impl<K, V> Default for Touched<K, V> {
    fn default() -> Self {
        Touched(BTreeMap::new())
    }
}

impl<K: Ord, V> Touched<K, V> {
    pub(super) fn get(
        &mut self,
        key: K,
        load: impl FnOnce() -> Result<V, StateError>,
    ) -> Result<&mut V, StateError> {
        match self.0.entry(key) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => Ok(e.insert(load()?)),
        }
    }
}

pub(super) fn load_step(
    db: &mut Reader<'_>,
    pending: &Pending,
    run: RunId,
    step: &str,
) -> Result<StepRow, StateError> {
    if let Some((_, row)) = pending.steps.get(&(run, step.to_string())) {
        return Ok(row.clone());
    }
    match db.steps()?.get((run, step)).map_err(storage)? {
        Some(v) => decode("steps", &(run, step), v.value()),
        None => Err(StateError::UnknownStep {
            run,
            step: step.to_string(),
        }),
    }
}

/// The tables a batch reads rows back from, each opened the first time a row it needs is not
/// in [`Pending`]: most batches of a run find all but a starting step's row there.
pub(super) struct Reader<'d> {
    pub(super) db: &'d Db,
    pub(super) tx: Option<redb::ReadTransaction>,
    pub(super) runs: Option<Rows<u64>>,
    pub(super) steps: Option<Rows<(u64, &'static str)>>,
    pub(super) attempts: Option<Rows<(u64, &'static str, u32)>>,
    pub(super) stats: Option<Rows<&'static str>>,
    pub(super) durations: Option<Rows<&'static str>>,
}

/// A table of JSON rows, open for reading.
pub(super) type Rows<K> = ReadOnlyTable<K, &'static [u8]>;

impl<'d> Reader<'d> {
    pub(super) fn new(db: &'d Db) -> Self {
        Reader {
            db,
            tx: None,
            runs: None,
            steps: None,
            attempts: None,
            stats: None,
            durations: None,
        }
    }

    pub(super) fn runs(&mut self) -> Result<&Rows<u64>, StateError> {
        opened(self.db, &mut self.tx, &mut self.runs, RUNS)
    }

    pub(super) fn steps(&mut self) -> Result<&Rows<(u64, &'static str)>, StateError> {
        opened(self.db, &mut self.tx, &mut self.steps, STEPS)
    }

    pub(super) fn attempts(&mut self) -> Result<&Rows<(u64, &'static str, u32)>, StateError> {
        opened(self.db, &mut self.tx, &mut self.attempts, ATTEMPTS)
    }

    pub(super) fn stats(&mut self) -> Result<&Rows<&'static str>, StateError> {
        opened(self.db, &mut self.tx, &mut self.stats, TOOL_STATS)
    }

    pub(super) fn durations(&mut self) -> Result<&Rows<&'static str>, StateError> {
        opened(self.db, &mut self.tx, &mut self.durations, DURATIONS)
    }
}

/// `slot`'s table, opened (with the read transaction, if it is the first) unless it was.
pub(super) fn opened<'s, K: redb::Key + 'static, V: redb::Value + 'static>(
    db: &Db,
    tx: &mut Option<redb::ReadTransaction>,
    slot: &'s mut Option<ReadOnlyTable<K, V>>,
    table: TableDefinition<K, V>,
) -> Result<&'s ReadOnlyTable<K, V>, StateError> {
    let open = match slot.take() {
        Some(open) => open,
        None => {
            let began = match tx.take() {
                Some(began) => began,
                None => db.begin_read()?,
            };
            tx.insert(began).open_table(table).map_err(storage)?
        }
    };
    Ok(slot.insert(open))
}

/// A tool's record in a counters table, or a fresh one: counters are a convenience, and one
/// that cannot be read starts over rather than failing the attempt that would update it.
pub(super) fn or_default<'d, T: Clone + Default + for<'de> Deserialize<'de>>(
    db: &mut Reader<'d>,
    table: for<'r> fn(&'r mut Reader<'d>) -> Result<&'r Rows<&'static str>, StateError>,
    pending: &HashMap<String, (u64, T)>,
    tool: &str,
) -> Result<T, StateError> {
    if let Some((_, row)) = pending.get(tool) {
        return Ok(row.clone());
    }
    Ok(match table(db)?.get(tool).map_err(storage)? {
        Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
        None => T::default(),
    })
}

pub(super) fn append_event(
    redo: &mut Redo,
    run: &mut RunRow,
    step: Option<&str>,
    kind: &str,
    detail: String,
) -> Result<(), StateError> {
    let mut event = EventRecord {
        seq: run.next_event,
        at: now_millis(),
        step: step.map(str::to_string),
        kind: kind.to_string(),
        detail,
        hash: String::new(),
    };
    event.hash = chain_hash(&run.last_hash, run.record.id, &event);
    redo.row(EVENTS, (run.record.id, event.seq), &encode(&event));
    run.next_event += 1;
    run.last_hash = event.hash.clone();
    Ok(())
}

pub(super) fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Canceled => "canceled",
        Outcome::Error => "error",
        Outcome::Interrupted => "interrupted",
        Outcome::Trapped => "trapped",
        Outcome::LimitExceeded => "limit_exceeded",
    }
}

impl Store {
    /// Applies the batch in order in one write transaction, durable on return. If any change
    /// is illegal, nothing of the batch is written.
    ///
    /// The batch's rows are worked out from a read of the state (the rows of batches the writer
    /// thread has not put in yet are read from memory), appended to the journal as one record,
    /// and synced: then it is durable and this returns. The writer thread puts the rows into
    /// the database behind it; every read of this store waits for the batches before it.
    pub fn apply(&self, changes: &[Change]) -> Result<(), StateError> {
        self.apply_with(changes, true)
    }

    /// [`Store::apply`], returning once the batch is written to the journal, before it is
    /// synced: the sync thread syncs it next, and every later read of this store waits for
    /// that, so nothing is reported from a batch not yet on disk.
    ///
    /// For the engine's commits within a run, so that the attempts a batch starts run while it
    /// is synced: a `kill -9` of uet loses nothing (the written record is in the kernel's
    /// page cache), and a power loss in the sync's window, which ends those attempts too,
    /// leaves the state as of an earlier batch. See ENGINE.md, "When a change is on disk".
    pub fn apply_sync_behind(&self, changes: &[Change]) -> Result<(), StateError> {
        self.apply_with(changes, false)
    }

    pub(super) fn apply_with(&self, changes: &[Change], sync: bool) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (mut writes, checkpoint) = self.lock_for_batch()?;
        // rows of batches still behind are read from `pending`, the rest from the database:
        // the writer thread takes `writes` to drop a row from `pending`, after the database has
        // it, so under this lock one of the two always holds a row's latest
        let mut batch = Batch::new(Reader::new(&self.shared.db), &writes.pending);
        for change in changes {
            batch.apply(change)?;
        }
        let (redo, rows) = batch.finish();
        // an error above wrote nothing; from here on the batch is the journal's
        let seq = self.journal(&mut writes, &redo, sync)?;
        writes.pending.add(seq, rows, redo.0.len());
        if checkpoint {
            self.checkpoint(&mut writes, &redo, seq, sync)?;
        } else {
            self.queue(&mut writes, redo, seq, sync);
        }
        drop(writes);
        self.committed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The write lock for a batch, and whether a checkpoint is due with it: then it waits for
    /// the writer thread's transaction in progress, as this batch goes into the database with
    /// the checkpoint, and every batch before it with it.
    fn lock_for_batch(&self) -> Result<(MutexGuard<'_, Writes>, bool), StateError> {
        let writes = self.shared.usable()?;
        if writes.journal.appended() < self.shared.checkpoint_after {
            return Ok((writes, false));
        }
        drop(writes);
        let writes = self.shared.settled()?;
        // unless a commit that got the lock first checkpointed
        let due = writes.journal.appended() >= self.shared.checkpoint_after;
        Ok((writes, due))
    }

    /// Writes a batch's record to the journal (synced when `sync`); its number.
    fn journal(&self, writes: &mut Writes, redo: &Redo, sync: bool) -> Result<u64, StateError> {
        let written = if sync {
            writes.journal.append(&redo.0)
        } else {
            writes.journal.write(&redo.0)
        };
        if let Err(e) = written {
            // whether the record reached the disk is unknown, and the journal's end with it:
            // this process writes nothing more, and a restart reads what is there
            self.shared
                .fail(writes, format!("a journal write failed: {e}"));
            return Err(e.into());
        }
        writes.written += 1;
        if sync {
            // its sync covered every record before it too
            writes.synced = writes.written;
        }
        Ok(writes.written)
    }

    /// Puts the batches still behind, this one and a checkpoint into the database in one
    /// durable commit, which makes them durable whether or not their journal records were
    /// synced. No batch is in the writer thread's hands (the batch waited for that).
    fn checkpoint(
        &self,
        writes: &mut MutexGuard<'_, Writes>,
        redo: &Redo,
        seq: u64,
        sync: bool,
    ) -> Result<(), StateError> {
        // until it lands the batch is in the journal but not the database, and later writes
        // must not build on a state without it: marked failed first, so an error or a panic
        // below leaves it so
        writes.failed = Some("a checkpoint did not finish".into());
        let checkpoint = self.shared.db.begin_write().and_then(|tx| {
            let behind = writes.take_behind();
            self.shared.caught_up.notify_all();
            replay_behind(&tx, &behind)?;
            replay(&tx, &[&redo.0])?;
            commit_durably(tx, writes)
        });
        if let Err(e) = checkpoint {
            writes.failed = Some(e.to_string());
            self.shared.fail(writes, e.to_string());
            if !sync {
                // its journal record was not synced either: nothing holds the batch
                return Err(e);
            }
        }
        // the database has it, durably
        (writes.synced, writes.applied) = (seq, seq);
        self.shared.back_up_if_due();
        Ok(())
    }

    /// Leaves a journaled batch to the sync and writer threads, waking them as needed.
    fn queue(&self, writes: &mut Writes, redo: Redo, seq: u64, sync: bool) {
        writes.behind.push(Behind {
            seq,
            batch: redo.0,
            at: std::time::Instant::now(),
        });
        // otherwise each is busy, or waits for a time it set by an earlier batch
        if !sync && writes.synced + 1 == seq {
            self.shared.unsynced.notify_one();
        }
        if sync || writes.behind.len() >= GATHER_MOST {
            self.shared.queued.notify_one();
        }
    }
}

//! What the state is asked: runs, steps, attempts, event logs, history, and whether a run's
//! event log still holds its chain.

use super::*;

/// An event's link in its run's hash chain: sha256 over the previous event's hash and every
/// field of this one, each length-prefixed so no two different events encode alike.
pub fn chain_hash(previous: &str, run: RunId, e: &EventRecord) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(previous.as_bytes());
    field(&run.to_be_bytes());
    field(&e.seq.to_be_bytes());
    field(&e.at.to_be_bytes());
    field(e.step.as_deref().unwrap_or("\u{0}").as_bytes());
    field(e.kind.as_bytes());
    field(e.detail.as_bytes());
    crate::hex(&h.finalize())
}

impl Store {
    /// A run, if the state has it.
    pub fn run(&self, id: RunId) -> Result<Option<RunRecord>, StateError> {
        let tx = self.read()?;
        let runs = tx.open_table(RUNS).map_err(storage)?;
        match runs.get(id).map_err(storage)? {
            Some(v) => Ok(Some(decode::<RunRow>("runs", &id, v.value())?.record)),
            None => Ok(None),
        }
    }

    /// The run a claimed file became, if it was recorded.
    pub fn submission(&self, claim: &str) -> Result<Option<RunId>, StateError> {
        let tx = self.read()?;
        let table = tx.open_table(SUBMISSIONS).map_err(storage)?;
        match table.get(claim).map_err(storage)? {
            Some(v) => {
                let record: serde_json::Value = decode("submissions", &claim, v.value())?;
                Ok(record["run"].as_u64())
            }
            None => Ok(None),
        }
    }

    /// The plan a run was recorded with.
    pub fn plan(&self, id: RunId) -> Result<Option<serde_json::Value>, StateError> {
        let tx = self.read()?;
        let plans = tx.open_table(PLANS).map_err(storage)?;
        match plans.get(id).map_err(storage)? {
            Some(v) => Ok(Some(decode("plans", &id, v.value())?)),
            None => Ok(None),
        }
    }

    /// The newest `limit` runs, oldest first: reads only those, however long the history.
    pub fn latest_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StateError> {
        let tx = self.read()?;
        let runs = tx.open_table(RUNS).map_err(storage)?;
        let mut out = Vec::new();
        for item in runs.iter().map_err(storage)?.rev().take(limit) {
            let (k, v) = item.map_err(storage)?;
            out.push(decode::<RunRow>("runs", &k.value(), v.value())?.record);
        }
        out.reverse();
        Ok(out)
    }

    /// How many runs are in each state (states with none left out): six numbers read, however
    /// many runs there are, once the state keeps its counts (see `counts`).
    pub fn run_counts(&self) -> Result<BTreeMap<RunState, u64>, StateError> {
        if let Some(counts) = counts::read(&self.read()?)? {
            return Ok(counts.into_iter().filter(|(_, n)| *n > 0).collect());
        }
        let mut counts = BTreeMap::new();
        for r in self.runs()? {
            *counts.entry(r.state).or_default() += 1;
        }
        Ok(counts)
    }

    /// The runs not yet ended (pending or running), oldest first: read from their index,
    /// however long the history, once the state keeps it (see `counts`).
    pub fn unfinished_runs(&self) -> Result<Vec<RunRecord>, StateError> {
        let tx = self.read()?;
        let Some(ids) = counts::read_unfinished(&tx)? else {
            drop(tx);
            let mut runs = self.runs()?;
            runs.retain(|r| !r.state.is_terminal());
            return Ok(runs);
        };
        let table = tx.open_table(RUNS).map_err(storage)?;
        let mut runs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = table.get(id).map_err(storage)? {
                runs.push(decode::<RunRow>("runs", &id, v.value())?.record);
            }
        }
        Ok(runs)
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>, StateError> {
        self.latest_runs(usize::MAX)
    }

    /// A run's steps, in workflow order.
    pub fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, StateError> {
        self.step_rows(run, true)
    }

    /// A run's steps in workflow order, without their outputs (each is read and let go): what
    /// counts and progress need, however large the outputs are.
    pub fn steps_brief(&self, run: RunId) -> Result<Vec<StepRecord>, StateError> {
        self.step_rows(run, false)
    }

    pub(super) fn step_rows(
        &self,
        run: RunId,
        outputs: bool,
    ) -> Result<Vec<StepRecord>, StateError> {
        let tx = self.read()?;
        let steps = tx.open_table(STEPS).map_err(storage)?;
        let mut rows: Vec<StepRow> = Vec::new();
        for item in steps.range((run, "")..(run + 1, "")).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            rows.push(if outputs {
                decode("steps", &k.value(), v.value())?
            } else {
                decode::<BriefRow>("steps", &k.value(), v.value())?.into()
            });
        }
        rows.sort_by_key(|r| r.position);
        Ok(rows.into_iter().map(|r| r.record).collect())
    }

    /// A run's steps from the `from`th in workflow order, as many as about `max_bytes` of their
    /// JSON hold (at least one), and the place of the next when there are more: a page of a run
    /// too large for one answer, read without holding the others' outputs.
    pub fn steps_page(
        &self,
        run: RunId,
        from: usize,
        max_bytes: usize,
    ) -> Result<(Vec<StepRecord>, Option<usize>), StateError> {
        /// A step row's place alone: the rest of the row is skipped over, not kept.
        #[derive(Deserialize)]
        struct Place {
            position: u32,
        }
        let tx = self.read()?;
        let steps = tx.open_table(STEPS).map_err(storage)?;
        let mut places: Vec<(u32, String)> = Vec::new();
        for item in steps.range((run, "")..(run + 1, "")).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let place: Place = decode("steps", &k.value(), v.value())?;
            places.push((place.position, k.value().1.to_string()));
        }
        places.sort();
        let mut page = Vec::new();
        let mut size = 0;
        for (i, (_, id)) in places.iter().enumerate().skip(from) {
            let Some(v) = steps.get((run, id.as_str())).map_err(storage)? else {
                continue;
            };
            let row: StepRow = decode("steps", &(run, id.as_str()), v.value())?;
            size += v.value().len();
            if size > max_bytes && !page.is_empty() {
                return Ok((page, Some(i)));
            }
            page.push(row.record);
        }
        Ok((page, None))
    }

    /// One step of a run, with its output.
    pub fn step(&self, run: RunId, id: &str) -> Result<Option<StepRecord>, StateError> {
        let tx = self.read()?;
        let steps = tx.open_table(STEPS).map_err(storage)?;
        let Some(v) = steps.get((run, id)).map_err(storage)? else {
            return Ok(None);
        };
        let row: StepRow = decode("steps", &(run, id), v.value())?;
        Ok(Some(row.record))
    }

    /// Every attempt of a run, each with its step's id, without their captured output: what a
    /// timeline draws.
    pub fn run_attempts(&self, run: RunId) -> Result<Vec<(String, AttemptRecord)>, StateError> {
        let tx = self.read()?;
        let attempts = tx.open_table(ATTEMPTS).map_err(storage)?;
        let mut out = Vec::new();
        for item in attempts
            .range((run, "", 0)..(run + 1, "", 0))
            .map_err(storage)?
        {
            let (k, v) = item.map_err(storage)?;
            let mut a: AttemptRecord = decode("attempts", &k.value(), v.value())?;
            a.stdout = String::new();
            a.stderr = String::new();
            out.push((k.value().1.to_string(), a));
        }
        Ok(out)
    }

    /// A step's attempts, first first.
    pub fn attempts(&self, run: RunId, step: &str) -> Result<Vec<AttemptRecord>, StateError> {
        let tx = self.read()?;
        let attempts = tx.open_table(ATTEMPTS).map_err(storage)?;
        let mut out = Vec::new();
        for item in attempts
            .range((run, step, 0)..=(run, step, u32::MAX))
            .map_err(storage)?
        {
            let (k, v) = item.map_err(storage)?;
            out.push(decode("attempts", &k.value(), v.value())?);
        }
        Ok(out)
    }

    /// A run's event log, in order.
    pub fn events(&self, run: RunId) -> Result<Vec<EventRecord>, StateError> {
        self.events_after(run, 0)
    }

    /// The events of a run's log numbered above `after`, in order.
    pub fn events_after(&self, run: RunId, after: u64) -> Result<Vec<EventRecord>, StateError> {
        self.events_page(run, after, usize::MAX)
    }

    /// At most `limit` of a run's events after event number `after`, oldest first.
    pub fn events_page(
        &self,
        run: RunId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StateError> {
        let tx = self.read()?;
        let events = tx.open_table(EVENTS).map_err(storage)?;
        let mut out = Vec::new();
        for item in events
            .range((run, after.saturating_add(1))..=(run, u64::MAX))
            .map_err(storage)?
            .take(limit)
        {
            let (k, v) = item.map_err(storage)?;
            out.push(decode("events", &k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The number of a run's latest event, `None` for an unknown run.
    pub fn last_event(&self, run: RunId) -> Result<Option<u64>, StateError> {
        let tx = self.read()?;
        let runs = tx.open_table(RUNS).map_err(storage)?;
        let Some(v) = runs.get(run).map_err(storage)? else {
            return Ok(None);
        };
        let row: RunRow = decode("runs", &run, v.value())?;
        Ok(Some(row.next_event - 1))
    }

    /// Each run with the number of its latest event, oldest run first: what a follower of
    /// every run's log compares against to find what is new.
    pub fn event_heads(&self) -> Result<Vec<(RunId, u64)>, StateError> {
        let tx = self.read()?;
        let runs = tx.open_table(RUNS).map_err(storage)?;
        let mut out = Vec::new();
        for item in runs.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let row: RunRow = decode("runs", &k.value(), v.value())?;
            out.push((row.record.id, row.next_event - 1));
        }
        Ok(out)
    }

    /// The registered standing workflows: key and `{plan, source, workstream}`.
    pub fn standing(&self) -> Result<Vec<(String, serde_json::Value)>, StateError> {
        let tx = self.read()?;
        let table = tx.open_table(STANDING).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let key = k.value().to_string();
            out.push((key.clone(), decode("standing", &key, v.value())?));
        }
        Ok(out)
    }

    /// Withdraws a standing workflow (`uet unwatch`): it stays withdrawn across restarts. True
    /// when there was one under `key`.
    pub fn forget_standing(&self, key: &str) -> Result<bool, StateError> {
        self.write_durably(|tx, _| {
            let mut table = tx.open_table(STANDING).map_err(storage)?;
            let gone = table.remove(key).map_err(storage)?.is_some();
            Ok(gone)
        })
    }

    /// Each tool's recent successful attempt durations, in milliseconds, oldest first.
    pub fn durations(&self) -> Result<std::collections::HashMap<String, Vec<u64>>, StateError> {
        let tx = self.read()?;
        let table = tx.open_table(DURATIONS).map_err(storage)?;
        let mut out = std::collections::HashMap::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let key = k.value().to_string();
            out.insert(key.clone(), decode("durations", &key, v.value())?);
        }
        Ok(out)
    }

    /// Deletes finished runs (succeeded, failed, canceled) finished before `before`, and
    /// beyond the newest `keep` of them, with their plans, steps, attempts, events and the
    /// records of the files that started them, in one transaction. Pending, running and
    /// quarantined runs are never touched, even one that a retry put back in the queue between
    /// the choice and the deletion. Returns how many runs went.
    pub fn prune(&self, before: Option<Millis>, keep: Option<usize>) -> Result<usize, StateError> {
        let finished: Vec<(RunId, Millis)> = self
            .runs()?
            .into_iter()
            .filter(|r| {
                matches!(
                    r.state,
                    RunState::Succeeded | RunState::Failed | RunState::Canceled
                )
            })
            .map(|r| (r.id, r.finished_at.unwrap_or(r.created_at)))
            .collect();
        let beyond = keep.map_or(0, |k| finished.len().saturating_sub(k));
        let doomed: Vec<RunId> = finished
            .iter()
            .enumerate()
            .filter(|(i, (_, at))| *i < beyond || before.is_some_and(|b| *at < b))
            .map(|(_, (id, _))| *id)
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        let gone = self.write_durably(|tx, _| {
            let mut gone = std::collections::HashSet::new();
            let mut moves = counts::Moves::default();
            let mut runs = tx.open_table(RUNS).map_err(storage)?;
            let mut plans = tx.open_table(PLANS).map_err(storage)?;
            let mut steps = tx.open_table(STEPS).map_err(storage)?;
            let mut attempts = tx.open_table(ATTEMPTS).map_err(storage)?;
            let mut events = tx.open_table(EVENTS).map_err(storage)?;
            let mut submissions = tx.open_table(SUBMISSIONS).map_err(storage)?;
            for &run in &doomed {
                // chosen from a read that may be stale by now: only what is still finished goes
                let state = match runs.get(run).map_err(storage)? {
                    Some(v) => Some(decode::<RunRow>("runs", &run, v.value())?.record.state),
                    None => None,
                };
                let still_finished = matches!(
                    state,
                    Some(RunState::Succeeded | RunState::Failed | RunState::Canceled)
                );
                if !still_finished {
                    continue;
                }
                counts::moved(&mut moves, run, state, None);
                gone.insert(run);
                runs.remove(run).map_err(storage)?;
                plans.remove(run).map_err(storage)?;
                steps
                    .retain_in((run, "")..(run + 1, ""), |_, _| false)
                    .map_err(storage)?;
                attempts
                    .retain_in((run, "", 0)..(run + 1, "", 0), |_, _| false)
                    .map_err(storage)?;
                events
                    .retain_in((run, 0)..=(run, u64::MAX), |_, _| false)
                    .map_err(storage)?;
            }
            // a submission's record only matters while its claimed file may still be around
            submissions
                .retain(|_, v| {
                    serde_json::from_slice::<serde_json::Value>(v)
                        .ok()
                        .and_then(|r| r["run"].as_u64())
                        .is_none_or(|run| !gone.contains(&run))
                })
                .map_err(storage)?;
            counts::apply(tx, &moves)?;
            Ok(gone)
        })?;
        self.committed.send_modify(|n| *n += 1);
        Ok(gone.len())
    }

    /// Every tool's attempt counters.
    pub fn tool_stats(&self) -> Result<Vec<(String, ToolStats)>, StateError> {
        let tx = self.read()?;
        let table = tx.open_table(TOOL_STATS).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let key = k.value().to_string();
            out.push((key.clone(), decode("tool_stats", &key, v.value())?));
        }
        Ok(out)
    }

    /// How many steps of all runs are in each state.
    pub fn step_counts(&self) -> Result<std::collections::BTreeMap<StepState, u64>, StateError> {
        let tx = self.read()?;
        let table = tx.open_table(STEPS).map_err(storage)?;
        let mut out = std::collections::BTreeMap::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let row: StepRow = decode("steps", &k.value(), v.value())?;
            *out.entry(row.record.state).or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Every tool's circuit breaker as last written.
    pub fn breakers(&self) -> Result<Vec<(String, crate::model::BreakerRecord)>, StateError> {
        let tx = self.read()?;
        let table = tx.open_table(BREAKERS).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let key = k.value().to_string();
            out.push((key.clone(), decode("breakers", &key, v.value())?));
        }
        Ok(out)
    }

    /// Checks a run's event log against its hash chain: every event's hash, the numbering, and
    /// the chain's head kept with the run. `Ok(n)` with the number of events when it holds;
    /// `Err` says where it breaks.
    pub fn verify(&self, run: RunId) -> Result<Result<u64, String>, StateError> {
        let tx = self.read()?;
        let runs = tx.open_table(RUNS).map_err(storage)?;
        let row: RunRow = match runs.get(run).map_err(storage)? {
            Some(v) => decode("runs", &run, v.value())?,
            None => return Err(StateError::UnknownRun(run)),
        };
        let events = tx.open_table(EVENTS).map_err(storage)?;
        let mut previous = String::new();
        let mut expected = 1;
        for item in events.range((run, 0)..=(run, u64::MAX)).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let seq = k.value().1;
            let event: EventRecord = match serde_json::from_slice(v.value()) {
                Ok(e) => e,
                Err(e) => return Ok(Err(format!("event {seq} cannot be read: {e}"))),
            };
            if seq != expected || event.seq != seq {
                return Ok(Err(format!(
                    "event {expected} is missing (found event {seq} next)"
                )));
            }
            if event.hash.is_empty() {
                return Ok(Err(format!(
                    "event {seq} has no hash (an older uet wrote it)"
                )));
            }
            if chain_hash(&previous, run, &event) != event.hash {
                return Ok(Err(format!(
                    "event {seq} ({}) does not match its hash: it was changed after it was written",
                    event.kind
                )));
            }
            previous = event.hash;
            expected += 1;
        }
        if expected != row.next_event || previous != row.last_hash {
            return Ok(Err(format!(
                "the log ends at event {} but the run recorded {} events: events were removed",
                expected - 1,
                row.next_event - 1
            )));
        }
        Ok(Ok(expected - 1))
    }
}

//! How many runs the state holds in each run state, kept in `meta` (`runs.<state>`) by every
//! write and removal of a run row, in the same transaction: `uet status` and `/metrics` read
//! six numbers instead of every run. A state written before the counts were kept is counted
//! once, when it is next opened to be written (`runs.counted` marks that it was).

use super::*;

/// The marker: the counts in `meta` and the `unfinished` index cover every run, as this
/// layout keeps them ([`LAYOUT`]).
const COUNTED: &str = "runs.counted";

/// 2: the counts and the index of unfinished runs. A state marked with an older layout is
/// counted again.
const LAYOUT: u64 = 2;

/// Whether the state keeps the counts and the index, as this uet does.
fn kept(meta: &impl ReadableTable<&'static str, u64>) -> Result<bool, StateError> {
    Ok(meta
        .get(COUNTED)
        .map_err(storage)?
        .is_some_and(|v| v.value() >= LAYOUT))
}

/// Changes to the counts, by run state, and the runs that began or stopped being unfinished
/// (pending or running).
#[derive(Default)]
pub(super) struct Moves {
    by_state: BTreeMap<RunState, i64>,
    unfinished: BTreeMap<RunId, bool>,
}

fn unfinished(state: Option<RunState>) -> bool {
    state.is_some_and(|s| !s.is_terminal())
}

fn key(state: RunState) -> String {
    format!("runs.{}", state.as_str())
}

/// A run row read for its state alone; `None` when the row does not parse (a damaged row
/// is not counted, and `uet state check` names it).
pub(super) fn state_of(bytes: &[u8]) -> Option<RunState> {
    #[derive(Deserialize)]
    struct Row {
        record: Record,
    }
    #[derive(Deserialize)]
    struct Record {
        state: RunState,
    }
    serde_json::from_slice::<Row>(bytes)
        .ok()
        .map(|r| r.record.state)
}

/// Notes that run `run`'s row went from `before` to `after` (either may be none: a new or
/// removed row).
pub(super) fn moved(
    moves: &mut Moves,
    run: RunId,
    before: Option<RunState>,
    after: Option<RunState>,
) {
    if before == after {
        return;
    }
    if let Some(b) = before {
        *moves.by_state.entry(b).or_default() -= 1;
    }
    if let Some(a) = after {
        *moves.by_state.entry(a).or_default() += 1;
    }
    if unfinished(before) != unfinished(after) {
        moves.unfinished.insert(run, unfinished(after));
    }
}

/// Adds `moves` to the counts in `meta`, when the state keeps them.
pub(super) fn apply(tx: &WriteTransaction, moves: &Moves) -> Result<(), StateError> {
    if moves.by_state.values().all(|n| *n == 0) && moves.unfinished.is_empty() {
        return Ok(());
    }
    let mut meta = tx.open_table(META).map_err(storage)?;
    if !kept(&meta)? {
        return Ok(());
    }
    let mut table = tx.open_table(UNFINISHED).map_err(storage)?;
    for (&run, &now) in &moves.unfinished {
        if now {
            table.insert(run, ()).map_err(storage)?;
        } else {
            table.remove(run).map_err(storage)?;
        }
    }
    for (&state, &n) in &moves.by_state {
        let key = key(state);
        let had = meta
            .get(key.as_str())
            .map_err(storage)?
            .map_or(0, |v| v.value());
        meta.insert(key.as_str(), had.saturating_add_signed(n))
            .map_err(storage)?;
    }
    Ok(())
}

/// Counts every run, once: for a new state, or one an older uet wrote.
pub(super) fn count_all(tx: &WriteTransaction) -> Result<(), StateError> {
    let mut meta = tx.open_table(META).map_err(storage)?;
    if kept(&meta)? {
        return Ok(());
    }
    let runs = tx.open_table(RUNS).map_err(storage)?;
    let mut table = tx.open_table(UNFINISHED).map_err(storage)?;
    table.retain(|_, _| false).map_err(storage)?;
    let mut counts: BTreeMap<RunState, u64> = BTreeMap::new();
    for item in runs.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        if let Some(state) = state_of(v.value()) {
            *counts.entry(state).or_default() += 1;
            if !state.is_terminal() {
                table.insert(k.value(), ()).map_err(storage)?;
            }
        }
    }
    for state in RunState::ALL {
        let n = counts.get(&state).copied().unwrap_or(0);
        meta.insert(key(state).as_str(), n).map_err(storage)?;
    }
    meta.insert(COUNTED, LAYOUT).map_err(storage)?;
    Ok(())
}

/// The `meta` table, when the state keeps the counts and the index in it.
fn kept_meta(
    tx: &redb::ReadTransaction,
) -> Result<Option<redb::ReadOnlyTable<&'static str, u64>>, StateError> {
    let Some(meta) = existing(tx, META)? else {
        return Ok(None);
    };
    Ok(kept(&meta)?.then_some(meta))
}

/// The counts, when the state keeps them (states an older uet wrote and that were only read
/// since do not).
pub(super) fn read(
    tx: &redb::ReadTransaction,
) -> Result<Option<BTreeMap<RunState, u64>>, StateError> {
    let Some(meta) = kept_meta(tx)? else {
        return Ok(None);
    };
    let mut counts = BTreeMap::new();
    for state in RunState::ALL {
        if let Some(n) = meta.get(key(state).as_str()).map_err(storage)? {
            counts.insert(state, n.value());
        }
    }
    Ok(Some(counts))
}

/// The runs not yet ended, oldest first, when the state keeps them.
pub(super) fn read_unfinished(
    tx: &redb::ReadTransaction,
) -> Result<Option<Vec<RunId>>, StateError> {
    if kept_meta(tx)?.is_none() {
        return Ok(None);
    }
    let Some(table) = existing(tx, UNFINISHED)? else {
        return Ok(None);
    };
    let mut runs = Vec::new();
    for item in table.iter().map_err(storage)? {
        runs.push(item.map_err(storage)?.0.value());
    }
    Ok(Some(runs))
}

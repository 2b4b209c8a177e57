//! How many runs the state holds in each run state, kept in `meta` (`runs.<state>`) by every
//! write and removal of a run row, in the same transaction: `uet status` and `/metrics` read
//! six numbers instead of every run. A state written before the counts were kept is counted
//! once, when it is next opened to be written (`runs.counted` marks that it was).

use super::*;

/// The marker: the counts in `meta` cover every run.
const COUNTED: &str = "runs.counted";

/// Changes to the counts, by run state.
pub(super) type Moves = BTreeMap<RunState, i64>;

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

/// Notes that a run row went from `before` to `after` (either may be none: a new or removed
/// row).
pub(super) fn moved(moves: &mut Moves, before: Option<RunState>, after: Option<RunState>) {
    if before == after {
        return;
    }
    if let Some(b) = before {
        *moves.entry(b).or_default() -= 1;
    }
    if let Some(a) = after {
        *moves.entry(a).or_default() += 1;
    }
}

/// Adds `moves` to the counts in `meta`, when the state keeps them.
pub(super) fn apply(tx: &WriteTransaction, moves: &Moves) -> Result<(), StateError> {
    if moves.values().all(|n| *n == 0) {
        return Ok(());
    }
    let mut meta = tx.open_table(META).map_err(storage)?;
    if meta.get(COUNTED).map_err(storage)?.is_none() {
        return Ok(());
    }
    for (&state, &n) in moves {
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
    if meta.get(COUNTED).map_err(storage)?.is_some() {
        return Ok(());
    }
    let runs = tx.open_table(RUNS).map_err(storage)?;
    let mut counts: BTreeMap<RunState, u64> = BTreeMap::new();
    for item in runs.iter().map_err(storage)? {
        let (_, v) = item.map_err(storage)?;
        if let Some(state) = state_of(v.value()) {
            *counts.entry(state).or_default() += 1;
        }
    }
    for (state, n) in counts {
        meta.insert(key(state).as_str(), n).map_err(storage)?;
    }
    meta.insert(COUNTED, 1).map_err(storage)?;
    Ok(())
}

/// The counts, when the state keeps them (states an older uet wrote and that were only read
/// since do not).
pub(super) fn read(
    tx: &redb::ReadTransaction,
) -> Result<Option<BTreeMap<RunState, u64>>, StateError> {
    let meta = match tx.open_table(META) {
        Ok(m) => m,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    if meta.get(COUNTED).map_err(storage)?.is_none() {
        return Ok(None);
    }
    let mut counts = BTreeMap::new();
    for state in RunState::ALL {
        if let Some(n) = meta.get(key(state).as_str()).map_err(storage)? {
            counts.insert(state, n.value());
        }
    }
    Ok(Some(counts))
}

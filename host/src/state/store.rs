//! The durable state: runs, steps, attempts and each run's event log, in one redb file.
//!
//! Every change goes through [`Store::apply`], which checks each transition against the
//! lifecycles of `model.rs`, appends the matching events, and commits the whole batch in one
//! write transaction, or nothing of it. The batch is durable once its row writes are in the
//! journal (`journal.rs`) and synced; a writer thread puts them into the database behind it,
//! and the database file itself is made durable at checkpoints.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::model::{
    AttemptRecord, EventRecord, Millis, Outcome, RunId, RunRecord, RunState, StepRecord, StepState,
    now_millis,
};

/// The database file inside a state folder.
pub const STATE_FILE: &str = "uet.redb";

/// The copy of the database kept before redb repairs it after an unclean stop.
pub const BEFORE_REPAIR_FILE: &str = "uet.redb.before-repair";

/// The last good copy of the database, written now and then from a consistent read of it
/// (see [`Shared::back_up_if_due`]); `uet state recover` puts it back.
pub const BACKUP_FILE: &str = "uet.redb.bak";

/// How often the last good copy is renewed at most: each copy reads and writes the whole
/// file, so a large state is not copied at every checkpoint, and what a damaged file can
/// lose is the changes since, unless the journal still holds them.
const BACKUP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// A state file this small is copied at every checkpoint and close: a few milliseconds.
const BACKUP_ALWAYS: u64 = 4 << 20;

/// The layout version this build writes; a file from a newer layout is refused, not misread.
const SCHEMA_VERSION: u64 = 1;

// The whole schema. Records are JSON: readable with any redb tool, and cheap next to the fsync
// that every commit costs.
/// Counters: `next_run`, `schema`, and [`JOURNAL_GENERATION`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Run id → [`RunRow`].
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs");
/// Run id → the validated plan as JSON, so a run can resume without its original file. Kept
/// apart from the run row, which every transition rewrites.
const PLANS: TableDefinition<u64, &[u8]> = TableDefinition::new("plans");
/// (run, step id) → [`StepRow`].
const STEPS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("steps");
/// (run, step id, attempt number) → [`AttemptRecord`].
const ATTEMPTS: TableDefinition<(u64, &str, u32), &[u8]> = TableDefinition::new("attempts");
/// Claim name of a file picked up from a watched folder → `{run, sha256}` JSON: written in the
/// transaction that creates the run, so a restart knows a claimed file was already recorded.
const SUBMISSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("submissions");
/// Standing workflow key (workstream and name) → `{plan, source, workstream}` JSON.
const STANDING: TableDefinition<&str, &[u8]> = TableDefinition::new("standing");
/// Tool name → JSON list of the durations (ms) of its latest successful attempts, oldest
/// first: the history ETAs are estimated from.
const DURATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("durations");
/// How many durations are kept per tool: enough for a steady median, few enough to follow a
/// tool that got faster or slower.
const DURATIONS_KEPT: usize = 32;
/// Tool name → [`ToolStats`]: counters for `uet metrics`, kept as attempts end so a scrape
/// never walks the history.
const TOOL_STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("tool_stats");
/// Tool name → [`crate::model::BreakerRecord`].
const BREAKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("breakers");
/// (run, seq) → [`EventRecord`].
const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");

/// Applies the macro `$each` to every table of the schema, by the name of its definition: the
/// one list that creating, copying and checking the state go by.
macro_rules! every_table {
    ($each:ident) => {
        $each!(META);
        every_json_table!($each);
    };
}

/// [`every_table!`] but `meta`: the tables whose values are JSON rows.
macro_rules! every_json_table {
    ($each:ident) => {
        $each!(RUNS);
        $each!(PLANS);
        $each!(STEPS);
        $each!(ATTEMPTS);
        $each!(SUBMISSIONS);
        $each!(STANDING);
        $each!(DURATIONS);
        $each!(TOOL_STATS);
        $each!(BREAKERS);
        $each!(EVENTS);
    };
}

// after `every_table!`, which they use
#[cfg(test)]
mod powerloss;
pub mod repair;

/// The journal generation the database's last durable commit named: the journal's records of
/// that generation are the batches committed since, and are replayed on open.
const JOURNAL_GENERATION: &str = "journal";

/// A run as stored: the record plus the next event number of its log.
#[derive(Clone, Serialize, Deserialize)]
struct RunRow {
    record: RunRecord,
    next_event: u64,
    /// The hash of the run's latest event: the head of its chain, so a log cut short is
    /// caught too.
    #[serde(default)]
    last_hash: String,
}

/// A step row read without its output, which the parser skips over instead of building: every
/// field of [`StepRecord`] but `output`.
#[derive(Deserialize)]
struct BriefRow {
    position: u32,
    record: BriefStep,
}

#[derive(Deserialize)]
struct BriefStep {
    id: String,
    state: StepState,
    attempts: u32,
    tool: Option<String>,
    reason: Option<String>,
    started_at: Option<Millis>,
    finished_at: Option<Millis>,
    #[serde(default)]
    progress: Option<f32>,
    #[serde(default)]
    attempt_started_at: Option<Millis>,
}

impl From<BriefRow> for StepRow {
    fn from(row: BriefRow) -> StepRow {
        let s = row.record;
        StepRow {
            position: row.position,
            record: StepRecord {
                id: s.id,
                state: s.state,
                attempts: s.attempts,
                tool: s.tool,
                output: None,
                reason: s.reason,
                started_at: s.started_at,
                finished_at: s.finished_at,
                progress: s.progress,
                attempt_started_at: s.attempt_started_at,
            },
        }
    }
}

/// A step as stored: the record plus its place in the workflow, for listing in order.
#[derive(Clone, Serialize, Deserialize)]
struct StepRow {
    position: u32,
    record: StepRecord,
}

impl StepRow {
    /// A step as a new run records it: pending, never tried.
    fn new(position: u32, id: &str) -> StepRow {
        StepRow {
            position,
            record: StepRecord {
                id: id.to_string(),
                state: StepState::Pending,
                attempts: 0,
                tool: None,
                output: None,
                reason: None,
                started_at: None,
                finished_at: None,
                progress: None,
                attempt_started_at: None,
            },
        }
    }
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The state folder or file could not be created or opened.
    #[error("cannot open the state file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another process has the state file open.
    #[error("the state file {0} is in use by another uet process")]
    InUse(PathBuf),
    /// A command that only reads found no state to read (none is created for it).
    #[error("there is no state in {0} (no {STATE_FILE}); check --state or $UET_STATE")]
    Missing(PathBuf),
    /// The state file is empty or gone while its journal or last good copy is there.
    #[error(
        "the state file {0} is empty or gone, but its journal or last good copy is beside it: \
         opening it would start a new history; `uet state recover` puts the last good copy \
         back (to start afresh instead, remove uet.journal and uet.redb.bak too)"
    )]
    Emptied(PathBuf),
    /// Reading only, the state was found not closed cleanly: it must be recovered (redb's
    /// repair, a journal replay) by a command that may write.
    #[error("the state file {0} was not closed cleanly and must be recovered before it is read")]
    Unclean(PathBuf),
    /// The state was opened to be read only, and something tried to write it.
    #[error("the state file {0} is open for reading only")]
    ReadOnly(PathBuf),
    /// The file was written by a newer uet.
    #[error(
        "the state file {path} has layout version {found}; this uet reads version {SCHEMA_VERSION}"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u64,
    },
    /// Reading or writing the journal failed.
    #[error("state journal: {0}")]
    Journal(#[from] std::io::Error),
    /// Reading or writing the database failed.
    #[error("state storage: {0}")]
    Storage(#[from] Box<redb::Error>),
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table} at {key}: {error}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key, in words.
        key: String,
        /// The decoding error.
        error: String,
    },
    /// A transition the lifecycle does not allow; a bug in the caller.
    #[error("illegal transition of run {run}{}: {from} → {to}", step.as_ref().map(|s| format!(" step `{s}`")).unwrap_or_default())]
    IllegalTransition {
        /// The run.
        run: RunId,
        /// The step, for a step transition.
        step: Option<String>,
        /// The current state.
        from: String,
        /// The state asked for.
        to: String,
    },
    /// No such run.
    #[error("no run {0}")]
    UnknownRun(RunId),
    /// No such step.
    #[error("run {run} has no step `{step}`")]
    UnknownStep {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
    },
    /// No such attempt.
    #[error("step `{step}` of run {run} has no attempt {number}")]
    UnknownAttempt {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
        /// The attempt number.
        number: u32,
    },
}

/// Converts any redb error into a [`StateError::Storage`].
fn storage(e: impl Into<redb::Error>) -> StateError {
    StateError::Storage(Box::new(e.into()))
}

/// The database file, open to be written, or only read: a command that reads does not
/// write the file (not even the flag a clean close leaves) when it was closed cleanly.
enum Db {
    Open(Database),
    ReadOnly(redb::ReadOnlyDatabase, PathBuf),
}

/// Refuses a state folder whose database file is empty or gone while its journal or last good
/// copy is there: opening it would quietly start a new history (run ids from 1) over the lost
/// one, and the next copy would replace the good one.
fn refuse_emptied(dir: &Path) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let lost = !std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
    let traces = [crate::state::journal::JOURNAL_FILE, BACKUP_FILE]
        .iter()
        .any(|f| dir.join(f).exists());
    if lost && traces {
        return Err(StateError::Emptied(path));
    }
    Ok(())
}

/// The journal generation the database's last durable commit named; 0 for a new file.
fn journal_generation(db: &Db) -> Result<u64, StateError> {
    let tx = db.begin_read()?;
    match tx.open_table(META) {
        Ok(meta) => Ok(meta
            .get(JOURNAL_GENERATION)
            .map_err(storage)?
            .map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(storage(e)),
    }
}

/// How a store is set up beside its database and journal.
struct Setup {
    /// The state's lock, for a store over a folder's files.
    lock: Option<std::fs::File>,
    /// Whether to keep copies of the database in its folder.
    copies: bool,
    /// Journaled bytes between checkpoints.
    checkpoint_after: u64,
}

/// The lock file of a state folder: taken for as long as a store is open, exclusively to write
/// and shared to read, so that no one can set the state aside or put a copy back (`uet state
/// recover`) under a uet that has it open, even one whose database file was deleted (redb's
/// own lock is on the file, and goes with it).
pub const LOCK_FILE: &str = "uet.lock";

/// Takes the state's lock: exclusive to write, shared to read; [`StateError::InUse`] when
/// another process holds it against that.
fn lock_state(dir: &Path, exclusive: bool) -> Result<std::fs::File, StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let opened = if exclusive {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
    } else {
        // a read creates nothing: without a lock file, no writer holds the state
        match std::fs::File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::File::open(dir),
            other => other,
        }
    };
    let file = opened.map_err(|e| StateError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let taken = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match taken {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StateError::InUse(dir.join(STATE_FILE))),
        Err(std::fs::TryLockError::Error(e)) => Err(StateError::Open {
            path,
            source: Box::new(e),
        }),
    }
}

/// Makes a new database file apart and gives it its name only once it is whole and synced:
/// a power loss while it is being made leaves no half-made database under the name (which
/// would then never open), only a `.new` file the next open replaces.
fn create_whole(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("redb.new");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    drop(Database::create(&tmp).map_err(std::io::Error::other)?);
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Copies a file to `to` (replacing it) readable by its owner only, synced.
fn copy_privately(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = to.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::copy(&mut std::fs::File::open(from)?, &mut out)?;
    out.sync_all()?;
    std::fs::rename(&tmp, to)?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes the last good copy of the database into `dir` ([`BACKUP_FILE`]) from one read
/// transaction: a consistent snapshot, taken while commits go on, by reading every row. A
/// row that cannot be read (a damaged page) fails the copy, and the last good copy is kept.
/// Returns the rows copied.
fn write_backup(db: &Db, dir: &Path) -> Result<u64, StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{BACKUP_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    // made 0600 before redb writes a byte of it
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let copied = (|| {
        let out = Database::create(&tmp).map_err(storage)?;
        let from = db.begin_read()?;
        let to = out.begin_write().map_err(storage)?;
        let mut rows = 0;
        macro_rules! copy {
            ($table:ident) => {
                rows += copy_table(&from, &to, $table)?;
            };
        }
        every_table!(copy);
        // redb checks no checksum on a read: a damaged row must at least still be JSON, or
        // the copy is not a good one
        macro_rules! well_formed {
            ($table:ident) => {
                json_rows(&from, $table, stringify!($table))?;
            };
        }
        every_json_table!(well_formed);
        to.commit().map_err(storage)?;
        Ok::<u64, StateError>(rows)
    })();
    let rows = match copied {
        Ok(rows) => rows,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(BACKUP_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(rows)
}

/// A table opened for reading; `None` when the file does not have it yet.
fn existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, StateError> {
    match tx.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(storage(e)),
    }
}

/// Copies every row of one table; a table the source does not have yet is skipped.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, StateError> {
    let Some(source) = existing(from, table)? else {
        return Ok(0);
    };
    let mut target = to.open_table(table).map_err(storage)?;
    let mut rows = 0;
    for row in source.iter().map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        target.insert(k.value(), v.value()).map_err(storage)?;
        rows += 1;
    }
    Ok(rows)
}

/// Reads every row of a table of JSON rows as JSON; the first that is not is an error.
fn json_rows<K: redb::Key + 'static>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<K, &[u8]>,
    name: &'static str,
) -> Result<(), StateError> {
    let Some(rows) = existing(tx, table)? else {
        return Ok(());
    };
    for row in rows.iter().map_err(storage)? {
        let (_, v) = row.map_err(storage)?;
        serde_json::from_slice::<serde::de::IgnoredAny>(v.value()).map_err(|e| {
            StateError::Corrupt {
                table: name,
                key: "a row".into(),
                error: e.to_string(),
            }
        })?;
    }
    Ok(())
}

/// Whether the last good copy is to be renewed: it is missing or older than
/// [`BACKUP_EVERY`], or the state is small enough ([`BACKUP_ALWAYS`]) that a copy costs less
/// than what it saves.
fn backup_due(dir: &Path) -> bool {
    let small = std::fs::metadata(dir.join(STATE_FILE)).is_ok_and(|m| m.len() <= BACKUP_ALWAYS);
    small
        || std::fs::metadata(dir.join(BACKUP_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= BACKUP_EVERY)
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction, StateError> {
        match self {
            Db::Open(db) => db.begin_read().map_err(storage),
            Db::ReadOnly(db, _) => db.begin_read().map_err(storage),
        }
    }

    fn begin_write(&self) -> Result<WriteTransaction, StateError> {
        match self {
            Db::Open(db) => db.begin_write().map_err(storage),
            Db::ReadOnly(_, path) => Err(StateError::ReadOnly(path.clone())),
        }
    }
}

/// The upper bounds (seconds) of the attempt-duration histogram buckets; `+Inf` is implied.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Counters of one tool's attempts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolStats {
    /// Attempts by outcome (`succeeded`, `failed`, `timed_out`, ...).
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Attempts per duration bucket (not cumulative), one more than [`DURATION_BUCKETS`].
    pub buckets: Vec<u64>,
    /// The sum of all attempt durations, in seconds.
    pub seconds: f64,
}

impl ToolStats {
    fn record(&mut self, outcome: Outcome, ms: u64) {
        *self
            .outcomes
            .entry(outcome_name(outcome).to_string())
            .or_insert(0) += 1;
        self.buckets.resize(DURATION_BUCKETS.len() + 1, 0);
        let secs = ms as f64 / 1000.0;
        let slot = DURATION_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[slot] += 1;
        self.seconds += secs;
    }
}

/// A file picked up from a watched folder.
#[derive(Debug, Clone, Copy)]
pub struct Submission<'a> {
    /// The unique name it was claimed under.
    pub claim: &'a str,
    /// The sha256 of its content, in hex.
    pub sha256: &'a str,
}

/// What to record about a new run, beyond the run itself.
pub struct NewRun<'a> {
    /// The workflow's name.
    pub name: &'a str,
    /// The file it came from.
    pub source: &'a str,
    /// The folder its steps run in.
    pub workstream: &'a str,
    /// The checked plan, kept so the run can resume without its file.
    pub plan: serde_json::Value,
    /// Its step ids, in workflow order.
    pub steps: &'a [String],
    /// What started it, in words.
    pub trigger: Option<&'a str>,
    /// The watched-folder file it was claimed from.
    pub submission: Option<Submission<'a>>,
    /// A standing workflow registered or dropped with it.
    pub standing: Option<StandingChange<'a>>,
}

/// A change to the registered standing workflows, keyed by workstream and name.
#[derive(Debug, Clone, Copy)]
pub enum StandingChange<'a> {
    /// Keep the run's plan and start it again when its trigger fires.
    Register(&'a str),
    /// Forget it.
    Unregister(&'a str),
}

/// One change to the state. A batch of changes is applied in one write transaction.
#[derive(Debug, Clone)]
pub enum Change {
    /// A run moves to another state.
    RunState {
        /// The run.
        run: RunId,
        /// Its new state.
        to: RunState,
        /// Why, in words.
        reason: Option<String>,
    },
    /// A step moves to another state.
    StepState {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
        /// Its new state.
        to: StepState,
        /// Why, in words.
        reason: Option<String>,
        /// Its output, when it succeeded.
        output: Option<serde_json::Value>,
    },
    /// An attempt starts.
    AttemptStarted {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
        /// 1 for the first.
        number: u32,
        /// The tool that runs it.
        tool: String,
    },
    /// An attempt ends.
    AttemptFinished {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
        /// Which attempt.
        number: u32,
        /// How it ended.
        outcome: Outcome,
        /// What went wrong.
        error: Option<String>,
        /// Its captured stdout (bounded).
        stdout: String,
        /// Its captured stderr (bounded).
        stderr: String,
        /// When the next attempt is due, if one will be made.
        retry_at: Option<Millis>,
    },
    /// A tool's circuit breaker changed, because of an attempt of this run.
    Breaker {
        /// The run.
        run: RunId,
        /// The step whose attempt it was.
        step: Option<String>,
        /// What changed.
        transition: crate::model::BreakerChange,
    },
    /// A plugin reported how far its running step is.
    StepProgress {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
        /// From 0.0 to 1.0.
        fraction: f32,
        /// What it is doing.
        message: String,
    },
    /// A daemon start found the run in flight after an unclean stop: counts toward quarantine.
    Recovered {
        /// The run.
        run: RunId,
    },
    /// Anything else worth a line in the run's log.
    Event {
        /// The run.
        run: RunId,
        /// The step, if any.
        step: Option<String>,
        /// What happened.
        kind: String,
        /// In words.
        detail: String,
    },
}

/// The state of one folder, open for reading and writing. Cloning is cheap and gives another
/// handle to the same open file, so a commit can be handed to a blocking thread.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    /// The last handle to go stops the writer and checkpoints.
    _writer: Arc<Writer>,
    path: Arc<Path>,
    /// Bumped after every commit, so followers of the event log wake without polling.
    committed: tokio::sync::watch::Sender<u64>,
    /// How many journaled batches opening the state replayed.
    replayed: usize,
}

impl Store {
    /// Opens (creating if needed) the state in `dir`. A new folder is made 0700 and the files
    /// in it are 0600: they hold what steps output. When the database must be repaired (uet
    /// stopped uncleanly), a copy of it is kept first as `uet.redb.before-repair`.
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        Self::open_with(dir, None)
    }

    /// [`Store::open`] by one who holds the state's lock already ([`lock_state`]).
    fn open_with(dir: &Path, lock: Option<std::fs::File>) -> Result<Store, StateError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let path = dir.join(STATE_FILE);
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StateError::Open {
            path: path.clone(),
            source: e,
        };
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(Box::new(e)))?;
        }
        let lock = match lock {
            Some(lock) => lock,
            None => lock_state(dir, true)?,
        };
        refuse_emptied(dir)?;
        if !path.exists() {
            create_whole(&path).map_err(|e| open_err(Box::new(e)))?;
        }
        let create = |repair: bool| {
            let mut builder = redb::Builder::new();
            if !repair {
                builder.set_repair_callback(|session| session.abort());
            }
            builder.create(&path)
        };
        let db = match create(false) {
            Err(redb::DatabaseError::RepairAborted) => {
                // redb rewrites the file to repair it: if that fails too, this copy is what is left
                let copy = dir.join(BEFORE_REPAIR_FILE);
                tracing::warn!(
                    "the state file {} was not closed cleanly: repairing it (a copy is kept as {})",
                    path.display(),
                    copy.display()
                );
                copy_privately(&path, &copy).map_err(|e| open_err(Box::new(e)))?;
                create(true)
            }
            other => other,
        };
        let db = match db {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StateError::InUse(path)),
            Err(e) => return Err(open_err(Box::new(e))),
        };
        // created with the umask by redb; an older uet's file may be open to all
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_err(Box::new(e)))?;
        // opened after the database, whose lock keeps a second process away from both
        let journal = crate::state::journal::Journal::open(&dir.join(crate::state::journal::JOURNAL_FILE))
            .map_err(|e| open_err(Box::new(e)))?;
        let setup = Setup {
            lock: Some(lock),
            copies: true,
            checkpoint_after: crate::state::journal::CHECKPOINT_AFTER,
        };
        Self::assemble(db, journal, path, setup)
    }

    /// Opens a state written to `db` and `journal` rather than to a folder's files: the seam the
    /// power-loss tests cut. No lock, no copies; checkpoints every `checkpoint_after` bytes.
    #[cfg(test)]
    pub(crate) fn open_on(
        db: impl redb::StorageBackend,
        journal: std::sync::Arc<dyn crate::state::journal::JournalFile>,
        label: &Path,
        checkpoint_after: u64,
    ) -> Result<Store, StateError> {
        let db = redb::Builder::new().create_with_backend(db).map_err(|e| StateError::Open {
            path: label.to_path_buf(),
            source: Box::new(e),
        })?;
        let setup = Setup {
            lock: None,
            copies: false,
            checkpoint_after,
        };
        let journal = crate::state::journal::Journal::on(journal);
        Self::assemble(db, journal, label.to_path_buf(), setup)
    }

    /// The store over an open database and journal: its threads started, the journal's batches
    /// since the last checkpoint replayed.
    fn assemble(
        db: Database,
        mut journal: crate::state::journal::Journal,
        path: PathBuf,
        setup: Setup,
    ) -> Result<Store, StateError> {
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StateError::Open {
            path: path.clone(),
            source: e,
        };
        let db = Db::Open(db);
        let generation = journal_generation(&db)?;
        // a new database starts at a random generation, so a journal left from another one
        // (a state file deleted without its journal) never matches
        journal.restart(match generation {
            0 => rand::random::<u64>() >> 1,
            g => g,
        });
        let (shared, mut writer) = Shared::new(db, path.clone(), journal, false, setup)?;
        for (name, work) in [
            ("uet-state-writer", write_behind as fn(&Shared)),
            ("uet-state-sync", sync_behind),
        ] {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || work(&shared))
                .map_err(|e| open_err(Box::new(e)))?;
            writer.threads.push(thread);
        }
        let mut store = Store {
            shared: shared.clone(),
            path: path.into(),
            committed: tokio::sync::watch::Sender::new(0),
            replayed: 0,
            _writer: Arc::new(writer),
        };
        store.replayed = store.init(generation)?;
        Ok(store)
    }

    /// Opens the state in `dir` to read it, writing nothing: no folder or file is created,
    /// and the file is not touched. [`StateError::Missing`] when there is no state there, and
    /// [`StateError::Unclean`] when uet stopped uncleanly and the state must be recovered
    /// ([`Store::open`] does) before it can be read.
    pub fn open_read_only(dir: &Path) -> Result<Store, StateError> {
        let path = dir.join(STATE_FILE);
        if !dir.is_dir() {
            return Err(StateError::Missing(dir.to_path_buf()));
        }
        let lock = lock_state(dir, false)?;
        refuse_emptied(dir)?;
        if !path.is_file() {
            return Err(StateError::Missing(dir.to_path_buf()));
        }
        let db = match redb::Builder::new().open_read_only(&path) {
            Ok(db) => Db::ReadOnly(db, path.clone()),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StateError::InUse(path)),
            Err(redb::DatabaseError::RepairAborted) => return Err(StateError::Unclean(path)),
            Err(e) => {
                return Err(StateError::Open {
                    path,
                    source: Box::new(e),
                });
            }
        };
        let mut journal =
            crate::state::journal::Journal::open_read_only(&dir.join(crate::state::journal::JOURNAL_FILE))?;
        let generation = journal_generation(&db)?;
        if generation > 0 && !journal.records(generation)?.is_empty() {
            return Err(StateError::Unclean(path));
        }
        journal.restart(generation);
        let setup = Setup {
            lock: Some(lock),
            copies: false,
            checkpoint_after: crate::state::journal::CHECKPOINT_AFTER,
        };
        let (shared, writer) = Shared::new(db, path.clone(), journal, true, setup)?;
        Ok(Store {
            shared,
            path: path.into(),
            committed: tokio::sync::watch::Sender::new(0),
            replayed: 0,
            _writer: Arc::new(writer),
        })
    }
    /// Replays the journal's batches since the last checkpoint, creates every table so that
    /// reads of a fresh file find them, and checks the layout; durable on return. Returns how
    /// many batches it replayed.
    fn init(&self, generation: u64) -> Result<usize, StateError> {
        self.write_durably(|tx, writes| {
            self.create_tables(tx)?;
            // generation 0 is a file no journal has written to yet
            if generation > 0 {
                let records = writes.journal.records(generation)?;
                let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
                replay(tx, &slices)?;
                if !records.is_empty() {
                    tracing::info!(
                        records = records.len(),
                        "replayed the journal's batches since the last checkpoint"
                    );
                }
                return Ok(records.len());
            }
            Ok(0)
        })
    }

    /// How many journaled batches opening the state replayed into the database: none after a
    /// clean close, which checkpoints; after a crash, the batches since the last checkpoint.
    pub fn replayed_at_open(&self) -> usize {
        self.replayed
    }

    fn create_tables(&self, tx: &WriteTransaction) -> Result<(), StateError> {
        {
            let mut meta = tx.open_table(META).map_err(storage)?;
            let found = meta.get("schema").map_err(storage)?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StateError::Version {
                        path: self.path.to_path_buf(),
                        found: v,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(storage)?;
                }
            }
        }
        macro_rules! create {
            ($table:ident) => {
                tx.open_table($table).map_err(storage)?;
            };
        }
        every_table!(create);
        Ok(())
    }

    /// Runs `write` in a write transaction and commits it durably, with everything journaled
    /// before it: for the rare writes (a new run, a prune) that need not be fast.
    fn write_durably<T>(
        &self,
        write: impl FnOnce(&WriteTransaction, &mut Writes) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut writes = self.shared.settled()?;
        let tx = self.shared.db.begin_write()?;
        // a failed write leaves the batches unwritten (the writer thread would not write them
        // again): the store refuses work then, and a restart replays them from the journal
        writes.failed = Some("a durable write did not finish".into());
        let behind = writes.take_behind();
        // readers waiting for these batches go on once this lock is let go
        self.shared.caught_up.notify_all();
        replay_behind(&tx, &behind)?;
        // what it writes may change rows the batches read back from `pending`, and a write
        // that fails must not leave any of its own there
        writes.pending = Pending::default();
        writes.failed = None;
        let out = match write(&tx, &mut writes) {
            Ok(out) => out,
            Err(e) => {
                writes.pending = Pending::default();
                if !behind.is_empty() {
                    writes.failed = Some(format!("a durable write failed: {e}"));
                }
                return Err(e);
            }
        };
        commit_durably(tx, &mut writes).inspect_err(|_| writes.pending = Pending::default())?;
        drop(writes);
        self.shared.back_up_if_due();
        Ok(out)
    }

    /// A read of everything applied so far, the batches still being written behind included.
    fn read(&self) -> Result<redb::ReadTransaction, StateError> {
        self.shared.caught_up()?;
        self.shared.db.begin_read()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a new pending run with its steps (all pending, in the given order) and a
    /// `run.created` event; durable on return.
    pub fn create_run(
        &self,
        name: &str,
        source: &str,
        workstream: &str,
        plan: serde_json::Value,
        step_ids: &[String],
    ) -> Result<RunId, StateError> {
        self.create(NewRun {
            name,
            source,
            workstream,
            plan,
            steps: step_ids,
            trigger: None,
            submission: None,
            standing: None,
        })
    }

    /// Records a new run with everything that must be durable together with it.
    pub fn create(&self, new: NewRun<'_>) -> Result<RunId, StateError> {
        let NewRun {
            name,
            source,
            workstream,
            plan,
            steps: step_ids,
            trigger,
            submission,
            standing,
        } = new;
        let id = self.write_durably(|tx, writes| {
            let mut meta = tx.open_table(META).map_err(storage)?;
            let id = meta
                .get("next_run")
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert("next_run", id + 1).map_err(storage)?;
            let now = now_millis();
            let mut row = RunRow {
                record: RunRecord {
                    id,
                    name: name.to_string(),
                    state: RunState::Pending,
                    reason: None,
                    source: source.to_string(),
                    workstream: workstream.to_string(),
                    created_at: now,
                    started_at: None,
                    finished_at: None,
                    trigger: trigger.map(str::to_string),
                    crashes: 0,
                },
                next_event: 1,
                last_hash: String::new(),
            };
            // the rows go in the way a journaled batch does
            let mut created = Redo::default();
            for (position, step) in step_ids.iter().enumerate() {
                let row = StepRow::new(position as u32, step);
                created
                    .row(RedoTable::Steps)
                    .u64(id)
                    .str(step)
                    .bytes(&encode(&row));
                // the run's first batches read them back: from here, not decoded again
                let seq = writes.written;
                writes.pending.steps.insert((id, step.clone()), (seq, row));
            }
            append_event(
                &mut created,
                &mut row,
                None,
                "run.created",
                format!("{} steps from {source}", step_ids.len()),
            )?;
            created.row(RedoTable::Runs).u64(id).bytes(&encode(&row));
            writes.pending.runs.insert(id, (writes.written, row));
            replay(tx, &[&created.0])?;
            tx.open_table(PLANS)
                .map_err(storage)?
                .insert(id, encode(&plan).as_slice())
                .map_err(storage)?;
            let mut table = tx.open_table(STANDING).map_err(storage)?;
            match standing {
                Some(StandingChange::Register(key)) => {
                    let record = serde_json::json!({
                        "plan": &plan, "source": source, "workstream": workstream,
                    });
                    table
                        .insert(key, encode(&record).as_slice())
                        .map_err(storage)?;
                }
                Some(StandingChange::Unregister(key)) => {
                    table.remove(key).map_err(storage)?;
                }
                None => {}
            }
            if let Some(sub) = submission {
                let record = serde_json::json!({ "run": id, "sha256": sub.sha256 });
                tx.open_table(SUBMISSIONS)
                    .map_err(storage)?
                    .insert(sub.claim, encode(&record).as_slice())
                    .map_err(storage)?;
            }
            Ok(id)
        })?;
        self.committed.send_modify(|n| *n += 1);
        Ok(id)
    }

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

    fn apply_with(&self, changes: &[Change], sync: bool) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut writes = self.shared.usable()?;
        let mut checkpoint = writes.journal.appended() >= self.shared.checkpoint_after;
        if checkpoint {
            // this batch goes into the database with the checkpoint, and every batch before it
            // with it
            drop(writes);
            writes = self.shared.settled()?;
            // unless a commit that got the lock first checkpointed
            checkpoint = writes.journal.appended() >= self.shared.checkpoint_after;
        }
        // rows of batches still behind are read from `pending`, the rest from the database:
        // the writer thread takes `writes` to drop a row from `pending`, after the database has
        // it, so under this lock one of the two always holds a row's latest
        let mut db = Reader::new(&self.shared.db);
        let mut redo = Redo::default();
        let pending = &writes.pending;
        let (run_rows, step_rows, attempt_rows, tool_stats, tool_durations) = {
            let now = now_millis();
            let mut run_rows: Touched<RunId, RunRow> = Touched::default();
            let mut step_rows: Touched<(RunId, String), StepRow> = Touched::default();
            let mut attempt_rows: Touched<(RunId, String, u32), AttemptRecord> = Touched::default();
            let mut tool_stats: Touched<String, ToolStats> = Touched::default();
            let mut tool_durations: Touched<String, Vec<u64>> = Touched::default();
            for change in changes {
                let run_id = change_run(change);
                let run = run_rows.get(run_id, || {
                    if let Some((_, row)) = pending.runs.get(&run_id) {
                        return Ok(row.clone());
                    }
                    match db.runs()?.get(run_id).map_err(storage)? {
                        Some(v) => decode("runs", &run_id, v.value()),
                        None => Err(StateError::UnknownRun(run_id)),
                    }
                })?;
                match change {
                    Change::RunState { to, reason, .. } => {
                        let r = &mut run.record;
                        if !r.state.can_become(*to) {
                            return Err(StateError::IllegalTransition {
                                run: run_id,
                                step: None,
                                from: r.state.to_string(),
                                to: to.to_string(),
                            });
                        }
                        r.state = *to;
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
                        append_event(&mut redo, run, None, &format!("run.{to}"), detail)?;
                    }
                    Change::StepState {
                        step,
                        to,
                        reason,
                        output,
                        ..
                    } => {
                        let s = &mut step_rows
                            .get((run_id, step.clone()), || load_step(&mut db, pending, run_id, step))?
                            .record;
                        if !s.state.can_become(*to) {
                            return Err(StateError::IllegalTransition {
                                run: run_id,
                                step: Some(step.clone()),
                                from: s.state.to_string(),
                                to: to.to_string(),
                            });
                        }
                        s.state = *to;
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
                        if *to == StepState::Succeeded {
                            s.output = output.clone();
                        }
                        let detail = reason.clone().unwrap_or_default();
                        append_event(&mut redo, run, Some(step), &format!("step.{to}"), detail)?;
                    }
                    Change::AttemptStarted {
                        step, number, tool, ..
                    } => {
                        let row = step_rows
                            .get((run_id, step.clone()), || load_step(&mut db, pending, run_id, step))?;
                        row.record.attempts = *number;
                        row.record.tool = Some(tool.clone());
                        row.record.progress = None;
                        row.record.attempt_started_at = Some(now);
                        let attempt = AttemptRecord {
                            number: *number,
                            tool: tool.clone(),
                            started_at: now,
                            finished_at: None,
                            outcome: None,
                            error: None,
                            stdout: String::new(),
                            stderr: String::new(),
                            retry_at: None,
                        };
                        attempt_rows
                            .0
                            .insert((run_id, step.clone(), *number), attempt);
                        let detail = format!("attempt {number} with tool {tool}");
                        append_event(&mut redo, run, Some(step), "attempt.started", detail)?;
                    }
                    Change::AttemptFinished {
                        step,
                        number,
                        outcome,
                        error,
                        stdout,
                        stderr,
                        retry_at,
                        ..
                    } => {
                        let key = (run_id, step.as_str(), *number);
                        let attempt =
                            attempt_rows.get((run_id, step.clone(), *number), || {
                                let kept = (run_id, step.clone(), *number);
                                if let Some((_, row)) = pending.attempts.get(&kept) {
                                    return Ok(row.clone());
                                }
                                match db.attempts()?.get(key).map_err(storage)? {
                                    Some(v) => decode("attempts", &key, v.value()),
                                    None => Err(StateError::UnknownAttempt {
                                        run: run_id,
                                        step: step.clone(),
                                        number: *number,
                                    }),
                                }
                            })?;
                        attempt.finished_at = Some(now);
                        attempt.outcome = Some(*outcome);
                        let took = now.saturating_sub(attempt.started_at);
                        let tool = attempt.tool.as_str();
                        tool_stats
                            .get(tool.to_string(), || {
                                or_default(&mut db, Reader::stats, &pending.stats, tool)
                            })?
                            .record(*outcome, took);
                        if *outcome == Outcome::Succeeded {
                            let kept = tool_durations
                                .get(tool.to_string(), || {
                                    or_default(&mut db, Reader::durations, &pending.durations, tool)
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
                            detail.push_str(&format!(
                                "; next attempt in {}ms",
                                at.saturating_sub(now)
                            ));
                        }
                        append_event(&mut redo, run, Some(step), &kind, detail)?;
                    }
                    Change::Breaker {
                        step, transition, ..
                    } => {
                        let record = encode(&transition.record);
                        redo.row(RedoTable::Breakers)
                            .str(&transition.tool)
                            .bytes(&record);
                        if let Some((kind, detail)) = &transition.event {
                            append_event(&mut redo, run, step.as_deref(), kind, detail.clone())?;
                        }
                    }
                    Change::StepProgress {
                        step,
                        fraction,
                        message,
                        ..
                    } => {
                        let row = step_rows
                            .get((run_id, step.clone()), || load_step(&mut db, pending, run_id, step))?;
                        row.record.progress = Some(fraction.clamp(0.0, 1.0));
                        let detail = format!("{:.0}% {message}", fraction * 100.0);
                        append_event(&mut redo, run, Some(step), "plugin.progress", detail)?;
                    }
                    Change::Recovered { .. } => {
                        run.record.crashes += 1;
                        let detail = format!(
                            "found in flight after an unclean stop ({} in a row)",
                            run.record.crashes
                        );
                        append_event(&mut redo, run, None, "run.recovered", detail)?;
                    }
                    Change::Event {
                        step, kind, detail, ..
                    } => {
                        append_event(&mut redo, run, step.as_deref(), kind, detail.clone())?;
                    }
                }
            }
            for (id, run) in &run_rows.0 {
                redo.row(RedoTable::Runs).u64(*id).bytes(&encode(run));
            }
            for ((run, step), row) in &step_rows.0 {
                redo.row(RedoTable::Steps)
                    .u64(*run)
                    .str(step)
                    .bytes(&encode(row));
            }
            for ((run, step, number), attempt) in &attempt_rows.0 {
                redo.row(RedoTable::Attempts)
                    .u64(*run)
                    .str(step)
                    .u32(*number)
                    .bytes(&encode(attempt));
            }
            for (tool, s) in &tool_stats.0 {
                redo.row(RedoTable::ToolStats).str(tool).bytes(&encode(s));
            }
            for (tool, kept) in &tool_durations.0 {
                redo.row(RedoTable::Durations)
                    .str(tool)
                    .bytes(&encode(kept));
            }
            (run_rows, step_rows, attempt_rows, tool_stats, tool_durations)
        };
        drop(db);
        // an error above wrote nothing; from here on the batch is the journal's
        let written = if sync {
            writes.journal.append(&redo.0)
        } else {
            writes.journal.write(&redo.0)
        };
        if let Err(e) = written {
            // whether the record reached the disk is unknown, and the journal's end with it:
            // this process writes nothing more, and a restart reads what is there
            self.shared
                .fail(&mut writes, format!("a journal write failed: {e}"));
            return Err(e.into());
        }
        writes.written += 1;
        let seq = writes.written;
        if sync {
            // its sync covered every record before it too
            writes.synced = seq;
        }
        let p = &mut writes.pending;
        p.added += redo.0.len();
        p.runs.extend(run_rows.0.into_iter().map(|(k, v)| (k, (seq, v))));
        p.steps.extend(step_rows.0.into_iter().map(|(k, v)| (k, (seq, v))));
        p.attempts.extend(attempt_rows.0.into_iter().map(|(k, v)| (k, (seq, v))));
        p.stats.extend(tool_stats.0.into_iter().map(|(k, v)| (k, (seq, v))));
        p.durations.extend(tool_durations.0.into_iter().map(|(k, v)| (k, (seq, v))));
        if checkpoint {
            // no batch is in the writer thread's hands (this write waited for that): those still
            // behind, this batch and the checkpoint go into the database in one durable commit,
            // which makes them durable whether or not their journal records were synced. Until that lands the batch is in the
            // journal but not the database, and later writes must not build on a state without
            // it: marked failed first, so an error or a panic below leaves it so.
            writes.failed = Some("a checkpoint did not finish".into());
            let checkpoint = self.shared.db.begin_write().and_then(|tx| {
                    let behind = writes.take_behind();
                    self.shared.caught_up.notify_all();
                    replay_behind(&tx, &behind)?;
                    replay(&tx, &[&redo.0])?;
                    commit_durably(tx, &mut writes)
                });
            if let Err(e) = checkpoint {
                writes.failed = Some(e.to_string());
                self.shared.fail(&mut writes, e.to_string());
                if !sync {
                    // its journal record was not synced either: nothing holds the batch
                    return Err(e);
                }
            }
            // the database has it, durably
            (writes.synced, writes.applied) = (seq, seq);
            self.shared.back_up_if_due();
        } else {
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
        drop(writes);
        self.committed.send_modify(|n| *n += 1);
        Ok(())
    }

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

    fn step_rows(&self, run: RunId, outputs: bool) -> Result<Vec<StepRecord>, StateError> {
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
}

impl Store {
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
            let mut runs = tx.open_table(RUNS).map_err(storage)?;
            let mut plans = tx.open_table(PLANS).map_err(storage)?;
            let mut steps = tx.open_table(STEPS).map_err(storage)?;
            let mut attempts = tx.open_table(ATTEMPTS).map_err(storage)?;
            let mut events = tx.open_table(EVENTS).map_err(storage)?;
            let mut submissions = tx.open_table(SUBMISSIONS).map_err(storage)?;
            for &run in &doomed {
                // chosen from a read that may be stale by now: only what is still finished goes
                let still_finished = match runs.get(run).map_err(storage)? {
                    Some(v) => matches!(
                        decode::<RunRow>("runs", &run, v.value())?.record.state,
                        RunState::Succeeded | RunState::Failed | RunState::Canceled
                    ),
                    None => false,
                };
                if !still_finished {
                    continue;
                }
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

    /// How many journal syncs the state has made since it was opened (on the caller's thread,
    /// or the sync thread's, which a batch written unsynced shares with those near it), and the
    /// time they took: the part of a commit that is the disk's.
    pub fn journal_syncs(&self) -> (u64, std::time::Duration) {
        self.shared.lock().journal.syncs()
    }

    /// How many transactions the writer thread has put batches into the database with since
    /// the state was opened, how many of those it was hurried into by a read waiting for them
    /// (the rest gathered batches for up to [`GATHER`]), and the time they took.
    pub fn writer_transactions(&self) -> (u64, u64, std::time::Duration) {
        let writes = self.shared.lock();
        (writes.transactions, writes.hurried, writes.writing_time)
    }

    /// A receiver that sees a change after every commit: followers wait on it instead of
    /// polling the file.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }
}

/// What every handle of one open state, and its writer thread, share.
struct Shared {
    db: Db,
    /// The state's lock (`uet.lock`), held as long as the store is open.
    _lock: Option<std::fs::File>,
    /// Whether copies of the database are kept beside it (a store over files).
    copies: bool,
    /// A checkpoint is due once this much is journaled since the last.
    checkpoint_after: u64,
    /// The database file.
    path: PathBuf,
    /// Opened to be read only: every write is refused before it starts.
    read_only: bool,
    /// The thread writing a copy of the state ([`Shared::back_up_if_due`]), if one was started:
    /// a close waits for it, so the file is closed when the store is.
    backup: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The journal's file, for the sync thread to sync batches written to it unsynced.
    syncer: std::sync::Arc<dyn crate::state::journal::JournalFile>,
    writes: Mutex<Writes>,
    /// Wakes the writer thread: a batch is queued or synced, or the store is closing.
    queued: Condvar,
    /// Wakes the sync thread: a batch was written unsynced, or the store is closing.
    unsynced: Condvar,
    /// Wakes those waiting for the writer thread to finish its batch.
    caught_up: Condvar,
}

/// The write side, under one lock held from a batch's read of the state to its journal write,
/// so batches reach the journal, and the database, in order.
struct Writes {
    journal: crate::state::journal::Journal,
    /// The journaled batches the writer thread is to put into the database next, in order.
    behind: Vec<Behind>,
    /// The number of the last batch journaled, of the last known synced, and of the last the
    /// database holds.
    written: u64,
    synced: u64,
    applied: u64,
    /// The rows batches wrote lately, as they stand after the last of them: every row of a
    /// batch not yet in the database is here.
    pending: Pending,
    /// How many wait for the database to catch up: the writer thread stops gathering.
    waiting: usize,
    /// The writer thread has taken batches and is putting them in.
    writing: bool,
    /// How many wait to write the database directly: the writer thread takes no batches.
    settling: usize,
    /// The time the writer thread's transactions took, for `RUST_LOG=uet=debug`.
    writing_time: std::time::Duration,
    /// The writer thread's transactions, and those of them it made for someone waiting.
    transactions: u64,
    hurried: u64,
    /// Why a journal write, the writer thread or a durable commit failed: the journal's end,
    /// or what the database holds, is then unknown, so this process reads and writes nothing
    /// more (a restart settles it from the files).
    failed: Option<String>,
    /// The last handle is gone: the writer thread finishes its batch and stops.
    closing: bool,
}

/// A batch written to the journal, waiting for the writer thread.
struct Behind {
    seq: u64,
    batch: Vec<u8>,
    /// When it was queued.
    at: std::time::Instant,
}

/// The rows batches wrote, decoded, each with the number of the last batch that wrote it: a
/// batch reads them before the database, so it builds on the batches before it without waiting
/// for the writer thread, and decodes nothing a batch just before it encoded (a step's row is
/// read back two or three times in a few milliseconds). Rows the database has are kept until
/// there are [`Pending::KEPT`] rows or [`Pending::KEPT_BYTES`] of batches since the last
/// trim; every direct write of the database drops them.
#[derive(Default)]
struct Pending {
    runs: HashMap<RunId, (u64, RunRow)>,
    steps: HashMap<(RunId, String), (u64, StepRow)>,
    attempts: HashMap<(RunId, String, u32), (u64, AttemptRecord)>,
    stats: HashMap<String, (u64, ToolStats)>,
    durations: HashMap<String, (u64, Vec<u64>)>,
    /// The encoded size of the batches added since the rows the database has were last dropped:
    /// a bound on what they hold (a step's row carries its output, up to 1 MiB).
    added: usize,
}

impl Pending {
    const KEPT: usize = 1 << 15;
    const KEPT_BYTES: usize = 8 << 20;

    /// The database holds the batches up to `seq`: their rows may be read from there again.
    fn applied(&mut self, seq: u64) {
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
    fn take_behind(&mut self) -> Vec<Behind> {
        let taken = std::mem::take(&mut self.behind);
        (self.synced, self.applied) = (self.written, self.written);
        taken
    }
}

/// A durable commit's first rows: the batches it took from the writer thread.
fn replay_behind(tx: &WriteTransaction, behind: &[Behind]) -> Result<(), StateError> {
    let records: Vec<&[u8]> = behind.iter().map(|b| b.batch.as_slice()).collect();
    replay(tx, &records)
}

/// Waits on `condvar` with the write lock, for at most `up_to` when given; poisoning is
/// passed over as in [`Shared::lock`].
fn wait_on<'s>(
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
    fn new(
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

    fn lock(&self) -> MutexGuard<'_, Writes> {
        // a panic with the lock held came before the batch reached the journal, or inside a
        // durable commit, which marks the store failed first: what it guards is still whole
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the store failed: a journal write or sync, the writer thread or a durable commit
    /// failed, so what the journal or the database holds is unknown. This process writes
    /// nothing more (a restart settles it from the files); the batches behind are dropped,
    /// after a last try at syncing what was acknowledged, and everyone waiting is told.
    fn fail(&self, writes: &mut Writes, reason: String) {
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
    fn back_up_if_due(self: &Arc<Self>) {
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
    fn back_up(&self, dir: &Path) {
        let began = std::time::Instant::now();
        let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_backup(&self.db, dir)
        }));
        match copied {
            Ok(Ok(rows)) => tracing::debug!(rows, took = ?began.elapsed(), "wrote the state's last good copy"),
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
    fn usable(&self) -> Result<MutexGuard<'_, Writes>, StateError> {
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
    fn caught_up(&self) -> Result<(), StateError> {
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
    fn settled(&self) -> Result<MutexGuard<'_, Writes>, StateError> {
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
    fn wait_for<'s>(
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

fn failed(reason: &str) -> StateError {
    StateError::Journal(std::io::Error::other(format!(
        "the state could not be written ({reason}); restart uet to recover from the journal"
    )))
}

/// How long the writer thread lets batches gather before it puts them into the database,
/// unless someone waits for them, and how many it lets gather at most: one transaction for a
/// few milliseconds' batches costs little more than one for a single batch.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);
const GATHER_MOST: usize = 64;

/// How long a batch written unsynced may wait for others to share its sync: a sync costs
/// some 40 µs of CPU here whatever it carries, and a wide run commits every few hundred
/// microseconds. It is also how much longer than one sync a power loss can reach back.
const SYNC_GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// The sync thread: syncs the journal records written unsynced as they come, a thread of its
/// own so that the writer thread's transactions never hold a sync back.
fn sync_behind(shared: &Shared) {
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
fn write_behind(shared: &Shared) {
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
        if writes.waiting == 0
            && !writes.closing
            && gathering < GATHER
            && ready < GATHER_MOST
        {
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

fn write_batches(db: &Db, batches: &[Behind]) -> Result<(), StateError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::None).map_err(storage)?;
    let records: Vec<&[u8]> = batches.iter().map(|b| b.batch.as_slice()).collect();
    replay(&tx, &records)?;
    tx.commit().map_err(storage)
}

/// Owns the writer thread; dropped with the last handle of the store.
struct Writer {
    shared: Arc<Shared>,
    /// The writer thread and the sync thread.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    /// Stops the writer and sync threads once they are done, then checkpoints: a clean close
    /// leaves the database holding everything, so the next open replays nothing.
    fn drop(&mut self) {
        // a copy being written holds a handle of the store: the file closes once it is done
        let copying = self.shared.backup.lock().unwrap_or_else(|e| e.into_inner()).take();
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
fn commit_durably(tx: WriteTransaction, writes: &mut Writes) -> Result<(), StateError> {
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

/// The tables a batch writes rows of, as tagged in the journal.
#[derive(Clone, Copy)]
#[repr(u8)]
enum RedoTable {
    Runs = 1,
    Steps,
    Attempts,
    Events,
    Breakers,
    Durations,
    ToolStats,
}

/// One batch's row writes in the journal's encoding: per row the table's tag, the key's parts
/// and the value, little-endian, strings and values prefixed by their length. Replaying them is
/// a matter of inserting each again, and doing so twice changes nothing.
#[derive(Default)]
struct Redo(Vec<u8>);

impl Redo {
    fn row(&mut self, table: RedoTable) -> &mut Self {
        self.0.push(table as u8);
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
}

/// Reads a [`Redo`] back.
struct Unredo<'a>(&'a [u8]);

/// A journal record that passed its checksum but does not parse: a bug, not a torn write.
fn malformed(error: String) -> StateError {
    StateError::Corrupt {
        table: "journal",
        key: "a batch".into(),
        error,
    }
}

impl<'a> Unredo<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(malformed("it ends inside a row".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StateError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<&'a str, StateError> {
        std::str::from_utf8(self.bytes()?).map_err(|e| malformed(e.to_string()))
    }
}

/// Writes journal records' rows into `tx`, in order: a row that several of them wrote is
/// written once, with its last value (a step's row changes two or three times in a few
/// milliseconds, the run's with every batch).
fn replay(tx: &WriteTransaction, records: &[&[u8]]) -> Result<(), StateError> {
    // in key order: neighbouring rows go into the same pages one after the other
    let mut latest: BTreeMap<(u8, &[u8]), &[u8]> = BTreeMap::new();
    for record in records {
        let mut r = Unredo(record);
        while let Some((&tag, rest)) = r.0.split_first() {
            r.0 = rest;
            let key = r.0;
            match tag {
                // the key's parts, skipped: the key is the bytes they span
                t if t == RedoTable::Runs as u8 => {
                    r.take(8)?;
                }
                t if t == RedoTable::Steps as u8 => {
                    r.take(8)?;
                    r.bytes()?;
                }
                t if t == RedoTable::Attempts as u8 => {
                    r.take(8)?;
                    r.bytes()?;
                    r.take(4)?;
                }
                t if t == RedoTable::Events as u8 => {
                    r.take(16)?;
                }
                t if t == RedoTable::Breakers as u8
                    || t == RedoTable::Durations as u8
                    || t == RedoTable::ToolStats as u8 =>
                {
                    r.bytes()?;
                }
                t => return Err(malformed(format!("unknown table tag {t}"))),
            }
            let key = &key[..key.len() - r.0.len()];
            latest.insert((tag, key), r.bytes()?);
        }
    }
    let mut runs = tx.open_table(RUNS).map_err(storage)?;
    let mut steps = tx.open_table(STEPS).map_err(storage)?;
    let mut attempts = tx.open_table(ATTEMPTS).map_err(storage)?;
    let mut events = tx.open_table(EVENTS).map_err(storage)?;
    let mut breakers = tx.open_table(BREAKERS).map_err(storage)?;
    let mut durations = tx.open_table(DURATIONS).map_err(storage)?;
    let mut stats = tx.open_table(TOOL_STATS).map_err(storage)?;
    for ((tag, key), value) in latest {
        let mut r = Unredo(key);
        let written = match tag {
            t if t == RedoTable::Runs as u8 => runs.insert(r.u64()?, value).map(drop),
            t if t == RedoTable::Steps as u8 => {
                steps.insert((r.u64()?, r.str()?), value).map(drop)
            }
            t if t == RedoTable::Attempts as u8 => attempts
                .insert((r.u64()?, r.str()?, r.u32()?), value)
                .map(drop),
            t if t == RedoTable::Events as u8 => {
                events.insert((r.u64()?, r.u64()?), value).map(drop)
            }
            t if t == RedoTable::Breakers as u8 => breakers.insert(r.str()?, value).map(drop),
            t if t == RedoTable::Durations as u8 => durations.insert(r.str()?, value).map(drop),
            _ => stats.insert(r.str()?, value).map(drop),
        };
        written.map_err(storage)?;
    }
    Ok(())
}

fn change_run(change: &Change) -> RunId {
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
struct Touched<K, V>(BTreeMap<K, V>);

impl<K, V> Default for Touched<K, V> {
    fn default() -> Self {
        Touched(BTreeMap::new())
    }
}

impl<K: Ord, V> Touched<K, V> {
    fn get(
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

fn load_step(
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
struct Reader<'d> {
    db: &'d Db,
    tx: Option<redb::ReadTransaction>,
    runs: Option<Rows<u64>>,
    steps: Option<Rows<(u64, &'static str)>>,
    attempts: Option<Rows<(u64, &'static str, u32)>>,
    stats: Option<Rows<&'static str>>,
    durations: Option<Rows<&'static str>>,
}

/// A table of JSON rows, open for reading.
type Rows<K> = ReadOnlyTable<K, &'static [u8]>;

impl<'d> Reader<'d> {
    fn new(db: &'d Db) -> Self {
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

    fn runs(&mut self) -> Result<&Rows<u64>, StateError> {
        opened(self.db, &mut self.tx, &mut self.runs, RUNS)
    }

    fn steps(&mut self) -> Result<&Rows<(u64, &'static str)>, StateError> {
        opened(self.db, &mut self.tx, &mut self.steps, STEPS)
    }

    fn attempts(&mut self) -> Result<&Rows<(u64, &'static str, u32)>, StateError> {
        opened(self.db, &mut self.tx, &mut self.attempts, ATTEMPTS)
    }

    fn stats(&mut self) -> Result<&Rows<&'static str>, StateError> {
        opened(self.db, &mut self.tx, &mut self.stats, TOOL_STATS)
    }

    fn durations(&mut self) -> Result<&Rows<&'static str>, StateError> {
        opened(self.db, &mut self.tx, &mut self.durations, DURATIONS)
    }
}

/// `slot`'s table, opened (with the read transaction, if it is the first) unless it was.
fn opened<'s, K: redb::Key + 'static, V: redb::Value + 'static>(
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
fn or_default<'d, T: Clone + Default + for<'de> Deserialize<'de>>(
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

fn append_event(
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
    redo.row(RedoTable::Events)
        .u64(run.record.id)
        .u64(event.seq)
        .bytes(&encode(&event));
    run.next_event += 1;
    run.last_hash = event.hash.clone();
    Ok(())
}

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

fn outcome_name(outcome: Outcome) -> &'static str {
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

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // serializing our own plain structs to JSON cannot fail
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: &dyn std::fmt::Debug,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        table,
        key: format!("{key:?}"),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_run(store: &Store) -> RunId {
        let steps = vec!["b".to_string(), "a".to_string()];
        store
            .create_run("w", "/w.toml", "/ws", serde_json::json!({}), &steps)
            .unwrap()
    }

    /// The kinds of a run's events, in order.
    fn kinds(store: &Store, run: RunId) -> Vec<String> {
        let events = store.events(run).unwrap();
        events.into_iter().map(|e| e.kind).collect()
    }

    fn run_to(run: RunId, to: RunState) -> Change {
        Change::RunState {
            run,
            to,
            reason: None,
        }
    }

    fn step_to(run: RunId, step: &str, to: StepState) -> Change {
        Change::StepState {
            run,
            step: step.into(),
            to,
            reason: None,
            output: None,
        }
    }

    #[test]
    fn an_illegal_transition_rejects_its_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let before = store.events(run).unwrap().len();
        let batch = [
            Change::RunState {
                run,
                to: RunState::Running,
                reason: None,
            },
            step_to(run, "a", StepState::Running),
            // a running step cannot be skipped
            step_to(run, "a", StepState::Skipped),
        ];
        let err = store.apply(&batch).unwrap_err();
        assert!(
            matches!(&err, StateError::IllegalTransition { step: Some(s), .. } if s == "a"),
            "{err}"
        );
        assert_eq!(store.run(run).unwrap().unwrap().state, RunState::Pending);
        assert_eq!(store.steps(run).unwrap()[1].state, StepState::Pending);
        assert_eq!(store.events(run).unwrap().len(), before);
    }

    #[test]
    fn no_op_and_backward_transitions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let to = |to| run_to(run, to);
        assert!(store.apply(&[to(RunState::Pending)]).is_err());
        assert!(store.apply(&[to(RunState::Succeeded)]).is_err());
        store.apply(&[to(RunState::Running)]).unwrap();
        store.apply(&[to(RunState::Succeeded)]).unwrap();
        assert!(store.apply(&[to(RunState::Running)]).is_err());
    }

    #[test]
    fn unknown_runs_steps_and_attempts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let err = store
            .apply(&[step_to(run + 7, "a", StepState::Running)])
            .unwrap_err();
        assert!(matches!(err, StateError::UnknownRun(r) if r == run + 7));
        let err = store
            .apply(&[step_to(run, "zz", StepState::Running)])
            .unwrap_err();
        assert!(matches!(err, StateError::UnknownStep { .. }));
        let finish = Change::AttemptFinished {
            run,
            step: "a".into(),
            number: 1,
            outcome: Outcome::Failed,
            error: None,
            stdout: String::new(),
            stderr: String::new(),
            retry_at: None,
        };
        assert!(matches!(
            store.apply(&[finish]).unwrap_err(),
            StateError::UnknownAttempt { .. }
        ));
        assert!(store.run(run + 7).unwrap().is_none());
    }

    #[test]
    fn a_batch_lands_whole_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let run;
        {
            let store = Store::open(dir.path()).unwrap();
            run = new_run(&store);
            let mut batch = vec![Change::RunState {
                run,
                to: RunState::Running,
                reason: None,
            }];
            for step in ["a", "b"] {
                batch.push(step_to(run, step, StepState::Running));
                batch.push(Change::AttemptStarted {
                    run,
                    step: step.into(),
                    number: 1,
                    tool: "t".into(),
                });
                batch.push(Change::AttemptFinished {
                    run,
                    step: step.into(),
                    number: 1,
                    outcome: Outcome::Succeeded,
                    error: None,
                    stdout: "{}".into(),
                    stderr: "warn".into(),
                    retry_at: None,
                });
                batch.push(Change::StepState {
                    run,
                    step: step.into(),
                    to: StepState::Succeeded,
                    reason: None,
                    output: Some(serde_json::json!({ "step": step })),
                });
            }
            store.apply(&batch).unwrap();
            // the second process on the same file is refused while this one holds it
            assert!(matches!(Store::open(dir.path()), Err(StateError::InUse(_))));
        }
        let store = Store::open(dir.path()).unwrap();
        let steps = store.steps(run).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert!(
            steps
                .iter()
                .all(|s| s.state == StepState::Succeeded && s.attempts == 1)
        );
        assert_eq!(steps[1].output, Some(serde_json::json!({ "step": "a" })));
        let attempts = store.attempts(run, "a").unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].stderr, "warn");
        let kinds = kinds(&store, run);
        assert_eq!(kinds.len(), 1 + 1 + 2 * 4);
        assert_eq!(kinds[0], "run.created");
        assert_eq!(kinds[1], "run.running");
        assert_eq!(kinds[3], "attempt.started");
        assert_eq!(kinds[4], "attempt.succeeded");
        // ids keep growing across reopens
        assert_eq!(new_run(&store), run + 1);
    }

    #[test]
    fn a_whole_attempt_in_one_batch_reads_its_own_writes() {
        // a quick step's start and end often share a commit: each change must see the rows the
        // earlier ones of its batch wrote, though they reach the tables only at its end
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let finished = |number, outcome| Change::AttemptFinished {
            run,
            step: "a".into(),
            number,
            outcome,
            error: None,
            stdout: "out".into(),
            stderr: String::new(),
            retry_at: None,
        };
        let started = |number| Change::AttemptStarted {
            run,
            step: "a".into(),
            number,
            tool: "t".into(),
        };
        store
            .apply(&[
                Change::RunState {
                    run,
                    to: RunState::Running,
                    reason: None,
                },
                step_to(run, "a", StepState::Running),
                started(1),
                finished(1, Outcome::Failed),
                started(2),
                finished(2, Outcome::Succeeded),
                Change::StepState {
                    run,
                    step: "a".into(),
                    to: StepState::Succeeded,
                    reason: None,
                    output: Some(serde_json::json!({"n": 1})),
                },
                // another step, in the same batch
                step_to(run, "b", StepState::Running),
            ])
            .unwrap();
        let steps = store.steps(run).unwrap();
        let a = steps.iter().find(|s| s.id == "a").unwrap();
        assert_eq!(a.state, StepState::Succeeded);
        assert_eq!(a.attempts, 2);
        assert_eq!(a.output, Some(serde_json::json!({"n": 1})));
        let attempts = store.attempts(run, "a").unwrap();
        let outcomes: Vec<_> = attempts.iter().map(|a| a.outcome).collect();
        assert_eq!(outcomes, [Some(Outcome::Failed), Some(Outcome::Succeeded)]);
        assert!(
            attempts
                .iter()
                .all(|a| a.stdout == "out" && a.finished_at.is_some())
        );
        let stats = store.tool_stats().unwrap();
        let (_, t) = stats.iter().find(|(name, _)| name == "t").unwrap();
        assert_eq!(t.outcomes["failed"], 1);
        assert_eq!(t.outcomes["succeeded"], 1);
        assert_eq!(
            store.durations().unwrap()["t"].len(),
            1,
            "only the success is a duration"
        );
        let kinds = kinds(&store, run);
        assert_eq!(
            kinds,
            [
                "run.created",
                "run.running",
                "step.running",
                "attempt.started",
                "attempt.failed",
                "attempt.started",
                "attempt.succeeded",
                "step.succeeded",
                "step.running",
            ]
        );
        assert!(store.verify(run).unwrap().is_ok());
        // and a later batch starts from what this one wrote
        store
            .apply(&[step_to(run, "b", StepState::Succeeded)])
            .unwrap();
        assert!(
            store
                .apply(&[step_to(run, "a", StepState::Running)])
                .is_err()
        );
    }
    /// The state folder's files as a crash would leave them: whatever was written, synced or not.
    fn crash_copy(from: &Path, journal: bool) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        std::fs::copy(from.join(STATE_FILE), to.path().join(STATE_FILE)).unwrap();
        if journal {
            let name = crate::state::journal::JOURNAL_FILE;
            std::fs::copy(from.join(name), to.path().join(name)).unwrap();
        }
        to
    }

    #[test]
    fn a_crash_loses_no_acknowledged_batch_across_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        store
            .apply(&[step_to(run, "a", StepState::Running)])
            .unwrap();
        // 600 KB of output per attempt: the journal passes a checkpoint partway through
        let big = "x".repeat(600_000);
        let attempts = 8;
        for number in 1..=attempts {
            let finished = Change::AttemptFinished {
                run,
                step: "a".into(),
                number,
                outcome: Outcome::Failed,
                error: None,
                stdout: format!("{number}{big}"),
                stderr: String::new(),
                retry_at: None,
            };
            let started = Change::AttemptStarted {
                run,
                step: "a".into(),
                number,
                tool: "t".into(),
            };
            store.apply(&[started]).unwrap();
            store.apply(&[finished]).unwrap();
        }
        let journaled = store.shared.lock().journal.appended();
        assert!(journaled > 0 && journaled < crate::state::journal::CHECKPOINT_AFTER);

        // the database file alone holds only what the last checkpoint made durable ...
        let bare = crash_copy(dir.path(), false);
        let older = Store::open(bare.path())
            .unwrap()
            .attempts(run, "a")
            .unwrap();
        let ended = older.iter().filter(|a| a.outcome.is_some()).count();
        assert!(ended < attempts as usize, "{ended} attempts ended");
        // ... and the journal replays the rest
        let copy = crash_copy(dir.path(), true);
        let reopened = Store::open(copy.path()).unwrap();
        assert!(reopened.replayed_at_open() > 0);
        let got = reopened.attempts(run, "a").unwrap();
        assert_eq!(got.len(), attempts as usize);
        for (a, number) in got.iter().zip(1..) {
            assert_eq!(a.outcome, Some(Outcome::Failed));
            assert!(a.stdout.starts_with(&format!("{number}x")));
        }
        assert_eq!(reopened.verify(run).unwrap(), store.verify(run).unwrap());
        let stats = reopened.tool_stats().unwrap();
        assert_eq!(stats[0].1.outcomes["failed"], u64::from(attempts));
        // the replay was checkpointed: the next open of the same files finds nothing to redo
        drop(reopened);
        let again = Store::open(copy.path()).unwrap();
        assert_eq!(again.replayed_at_open(), 0);
        assert_eq!(again.shared.lock().journal.appended(), 0);
        assert_eq!(again.attempts(run, "a").unwrap().len(), attempts as usize);
    }
    #[test]
    fn a_batch_synced_behind_is_on_disk_before_anything_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let (synced, _) = store.journal_syncs();
        store
            .apply_sync_behind(&[step_to(run, "a", StepState::Running)])
            .unwrap();
        // the read waits for the writer thread, which puts the batch in once it is synced
        let steps = store.steps(run).unwrap();
        assert_eq!(steps.iter().find(|s| s.id == "a").unwrap().state, StepState::Running);
        assert_eq!(store.journal_syncs().0, synced + 1, "one sync, by the sync thread");
        // and a crash after that finds it in the journal
        let copy = crash_copy(dir.path(), true);
        let reopened = Store::open(copy.path()).unwrap();
        assert_eq!(reopened.replayed_at_open(), 1);
        assert_eq!(kinds(&reopened, run), ["run.created", "step.running"]);
    }

    #[test]
    fn a_journal_left_from_another_database_is_not_replayed() {
        // the first state: run 1 with steps b and a, and a batch that only its journal holds
        let first = tempfile::tempdir().unwrap();
        let store = Store::open(first.path()).unwrap();
        let run = new_run(&store);
        store
            .apply(&[step_to(run, "a", StepState::Running)])
            .unwrap();
        let left = crash_copy(first.path(), true);
        drop(store);

        // a state file deleted without its journal is refused, not started over...
        std::fs::remove_file(left.path().join(STATE_FILE)).unwrap();
        assert!(matches!(
            Store::open(left.path()),
            Err(StateError::Emptied(_))
        ));
        // ...and a new one that finds that journal beside it all the same (copied there) never
        // takes its records, though its first run is run 1 too
        let fresh = tempfile::tempdir().unwrap();
        let store = Store::open(fresh.path()).unwrap();
        let other = store
            .create_run("x", "/x.toml", "/ws", serde_json::json!({}), &["c".into()])
            .unwrap();
        assert_eq!(other, run, "both are run 1");
        let crashed = crash_copy(fresh.path(), true);
        drop(store);
        let journal = crate::state::journal::JOURNAL_FILE;
        std::fs::copy(left.path().join(journal), crashed.path().join(journal)).unwrap();

        let reopened = Store::open(crashed.path()).unwrap();
        let steps: Vec<_> = reopened.steps(run).unwrap();
        let ids: Vec<_> = steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["c"], "the other database's rows came back");
        assert_eq!(kinds(&reopened, run), ["run.created"]);
    }

    /// A step's whole life, one batch per transition, as the engine commits it.
    fn step_batches(run: RunId, step: &str) -> Vec<Vec<Change>> {
        vec![
            vec![
                step_to(run, step, StepState::Running),
                Change::AttemptStarted {
                    run,
                    step: step.into(),
                    number: 1,
                    tool: "t".into(),
                },
            ],
            vec![Change::AttemptFinished {
                run,
                step: step.into(),
                number: 1,
                outcome: Outcome::Succeeded,
                error: None,
                stdout: format!("out of {step}"),
                stderr: String::new(),
                retry_at: None,
            }],
            vec![step_to(run, step, StepState::Succeeded)],
        ]
    }

    #[test]
    fn batches_synced_behind_build_on_each_other_and_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        // back to back, without a read between: each batch reads the rows of the one before
        // it from what is pending (the writer thread lets them gather), not from the database
        for step in ["a", "b"] {
            for batch in step_batches(run, step) {
                store.apply_sync_behind(&batch).unwrap();
            }
        }
        // copied as a crash leaves them, whether or not the writer thread has caught up
        let copy = crash_copy(dir.path(), true);
        for reopened in [Store::open(copy.path()).unwrap(), store] {
            let steps = reopened.steps(run).unwrap();
            assert!(steps.iter().all(|s| s.state == StepState::Succeeded));
            let a = reopened.attempts(run, "a").unwrap();
            assert_eq!(a.len(), 1);
            assert_eq!(a[0].outcome, Some(Outcome::Succeeded));
            assert_eq!(a[0].stdout, "out of a");
            assert_eq!(reopened.verify(run).unwrap(), Ok(9));
            assert_eq!(reopened.tool_stats().unwrap()[0].1.outcomes["succeeded"], 2);
        }
    }

    #[test]
    fn a_replay_writes_a_row_several_records_wrote_once_with_its_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let row = |state: StepState| {
            let mut redo = Redo::default();
            let mut step = StepRow::new(1, "a");
            step.record.state = state;
            redo.row(RedoTable::Steps)
                .u64(run)
                .str("a")
                .bytes(&encode(&step));
            redo.0
        };
        let (first, second) = (row(StepState::Running), row(StepState::Failed));
        let tx = store.shared.db.begin_write().unwrap();
        replay(&tx, &[&first, &second]).unwrap();
        tx.commit().unwrap();
        let steps = store.steps(run).unwrap();
        assert_eq!(steps.iter().find(|s| s.id == "a").unwrap().state, StepState::Failed);
    }

    #[test]
    fn a_pruned_run_is_not_read_back_from_what_batches_left_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let to = |to| run_to(run, to);
        store.apply_sync_behind(&[to(RunState::Running)]).unwrap();
        store.apply_sync_behind(&[to(RunState::Canceled)]).unwrap();
        assert_eq!(store.prune(None, Some(0)).unwrap(), 1);
        // the run's row was pending when the prune deleted it: gone all the same
        match store.apply(&[to(RunState::Pending)]) {
            Err(StateError::UnknownRun(r)) => assert_eq!(r, run),
            other => panic!("expected an unknown run, got {other:?}"),
        }
    }

    #[test]
    fn a_durable_write_takes_the_batches_behind_it_along() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        for batch in step_batches(run, "a") {
            store.apply_sync_behind(&batch).unwrap();
        }
        // a new run is committed durably, with whatever the writer thread had not put in yet
        let other = new_run(&store);
        let bare = crash_copy(dir.path(), false);
        let reopened = Store::open(bare.path()).unwrap();
        assert_eq!(reopened.replayed_at_open(), 0);
        let steps = reopened.steps(run).unwrap();
        assert_eq!(steps[1].state, StepState::Succeeded, "{steps:?}");
        assert_eq!(reopened.verify(run).unwrap(), Ok(5));
        assert!(reopened.run(other).unwrap().is_some());
        // and the store goes on from there
        store
            .apply_sync_behind(&[step_to(run, "b", StepState::Running)])
            .unwrap();
        assert_eq!(store.steps(run).unwrap()[0].state, StepState::Running);
    }

    #[test]
    fn reads_durable_writes_and_batches_from_many_threads_all_finish() {
        // batches, new runs (durable writes, which take the batches behind them) and reads,
        // side by side: each thread must get through, whoever takes the batches in
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let (threads, rounds) = (8, 150);
        let handles: Vec<_> = (0..threads)
            .map(|role| {
                let (store, done) = (store.clone(), done.clone());
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        match role {
                            0 | 1 => {
                                let run = new_run(&store);
                                for batch in step_batches(run, "a") {
                                    store.apply_sync_behind(&batch).unwrap();
                                }
                            }
                            2 | 3 => drop(new_run(&store)),
                            _ => drop(store.latest_runs(5).unwrap()),
                        }
                    }
                    done.send(role).unwrap();
                })
            })
            .collect();
        for _ in 0..threads {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a thread is stuck");
        }
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(store.runs().unwrap().len(), 4 * rounds);
    }

    /// A batch behind that the writer thread is kept from taking (as while a durable write
    /// waits for it), and a reader waiting for it: what the reader gets comes out of the
    /// receiver.
    fn a_reader_waiting(
        store: &Store,
        run: RunId,
    ) -> std::sync::mpsc::Receiver<Result<Vec<StepRecord>, StateError>> {
        store.shared.lock().settling += 1;
        store
            .apply_sync_behind(&[step_to(run, "a", StepState::Running)])
            .unwrap();
        let (done, read) = std::sync::mpsc::channel();
        let store = store.clone();
        std::thread::spawn(move || done.send(store.steps(run)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        read
    }

    #[test]
    fn a_reader_waiting_for_batches_a_durable_write_took_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let read = a_reader_waiting(&store, run);
        // a new run's durable write takes the batch in
        new_run(&store);
        let steps = read
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the reader was left waiting");
        assert_eq!(steps.unwrap()[1].state, StepState::Running);
        store.shared.lock().settling -= 1;
    }

    #[test]
    fn after_a_failure_waiting_readers_and_the_close_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let run = new_run(&store);
        let read = a_reader_waiting(&store, run);
        {
            let mut writes = store.shared.lock();
            store.shared.fail(&mut writes, "a test's failure".into());
            writes.settling -= 1;
        }
        let got = read
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the reader was left waiting");
        assert!(got.unwrap_err().to_string().contains("a test's failure"));
        assert!(store.apply(&[step_to(run, "b", StepState::Running)]).is_err());
        // and the last handle's close stops both threads
        let (closed, close) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(store);
            closed.send(()).unwrap();
        });
        close
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("closing the failed store hung");
    }
}

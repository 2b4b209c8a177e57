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

#[macro_use]
mod schema;
mod batch;
mod counts;
mod files;
#[cfg(test)]
mod powerloss;
mod queries;
mod redo;
pub mod repair;
mod writer;

use batch::*;
use files::*;
pub use files::{BACKUP_FILE, BEFORE_REPAIR_FILE, LOCK_FILE};
pub use queries::chain_hash;
use redo::*;
use schema::*;
pub use schema::{DURATION_BUCKETS, ToolStats};
use writer::*;

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
    pub plan: PlanJson,
    /// Its step ids, in workflow order.
    pub steps: &'a [String],
    /// What started it, in words.
    pub trigger: Option<&'a str>,
    /// The watched-folder file it was claimed from.
    pub submission: Option<Submission<'a>>,
    /// A standing workflow registered or dropped with it.
    pub standing: Option<StandingChange<'a>>,
}

/// A run's plan as the state keeps it: its JSON, encoded by the caller from whatever it holds
/// (a [`Plan`](crate::spec::workflow::Plan), or a test's literal), and what its `run.created`
/// event says about the parameters it takes.
pub struct PlanJson {
    json: Vec<u8>,
    params: Option<String>,
}

impl From<&crate::spec::workflow::Plan> for PlanJson {
    // straight to bytes: a 10,000-step plan built as a `serde_json::Value` first cost some 30 ms
    // to build, encode and drop
    fn from(plan: &crate::spec::workflow::Plan) -> PlanJson {
        PlanJson {
            json: encode(plan),
            params: params_words(&plan.params),
        }
    }
}

impl From<&serde_json::Value> for PlanJson {
    fn from(plan: &serde_json::Value) -> PlanJson {
        let params = plan
            .get("params")
            .and_then(|p| serde_json::from_value::<crate::spec::template::Params>(p.clone()).ok())
            .unwrap_or_default();
        PlanJson {
            json: encode(plan),
            params: params_words(&params),
        }
    }
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
        /// The tool that runs it: its identity ([`crate::model::tool_key`]), or a bare name.
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
        let journal =
            crate::state::journal::Journal::open(&dir.join(crate::state::journal::JOURNAL_FILE))
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
        let db = redb::Builder::new()
            .create_with_backend(db)
            .map_err(|e| StateError::Open {
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
        let mut journal = crate::state::journal::Journal::open_read_only(
            &dir.join(crate::state::journal::JOURNAL_FILE),
        )?;
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
        counts::count_all(tx)?;
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
        plan: impl Into<PlanJson>,
        step_ids: &[String],
    ) -> Result<RunId, StateError> {
        self.create(NewRun {
            name,
            source,
            workstream,
            plan: plan.into(),
            steps: step_ids,
            trigger: None,
            submission: None,
            standing: None,
        })
    }

    /// Records a new run with everything that must be durable together with it. Runs that
    /// come while another is being recorded wait for it, and are recorded together in the next
    /// durable commit: a burst of dropped files shares its syncs.
    pub fn create(&self, new: NewRun<'_>) -> Result<RunId, StateError> {
        let ours = Arc::new(Creation::from(new));
        let made = Arc::new(Mutex::new(None));
        relock(&self.shared.creating).push((ours.clone(), made.clone()));
        let _turn = relock(&self.shared.create_turn);
        match relock(&made).take() {
            Some(Some(id)) => return Ok(id),
            // the commit that held it failed: recorded alone, it fails with its own error
            Some(None) => {
                let id = self.write_durably(|tx, writes| create_one(tx, writes, &ours))?;
                self.committed.send_modify(|n| *n += 1);
                return Ok(id);
            }
            None => {}
        }
        // its turn, and not yet recorded: every run waiting goes in, this one among them
        let mut batch = std::mem::take(&mut *relock(&self.shared.creating));
        // a turn whose holder panicked took runs out of the queue and recorded none of them
        if !batch.iter().any(|(c, _)| Arc::ptr_eq(c, &ours)) {
            batch.push((ours.clone(), made.clone()));
        }
        let ids = self.write_durably(|tx, writes| {
            batch
                .iter()
                .map(|(creation, _)| create_one(tx, writes, creation))
                .collect::<Result<Vec<_>, _>>()
        });
        let ids = match ids {
            Ok(ids) => ids,
            Err(e) => {
                for (_, made) in &batch {
                    *relock(made) = Some(None);
                }
                return Err(e);
            }
        };
        self.committed.send_modify(|n| *n += 1);
        for ((_, made), id) in batch.iter().zip(ids) {
            *relock(made) = Some(Some(id));
        }
        let id = relock(&made).take().flatten();
        Ok(id.expect("the batch held this run"))
    }
}

/// A new run as it waits to be recorded ([`Store::create`]): [`NewRun`], owned.
pub(super) struct Creation {
    name: String,
    source: String,
    workstream: String,
    plan: PlanJson,
    steps: Vec<String>,
    trigger: Option<String>,
    submission: Option<(String, String)>,
    standing: Option<(bool, String)>,
}

impl From<NewRun<'_>> for Creation {
    fn from(n: NewRun<'_>) -> Creation {
        Creation {
            name: n.name.into(),
            source: n.source.into(),
            workstream: n.workstream.into(),
            plan: n.plan,
            steps: n.steps.to_vec(),
            trigger: n.trigger.map(Into::into),
            submission: n.submission.map(|s| (s.claim.into(), s.sha256.into())),
            standing: n.standing.map(|s| match s {
                StandingChange::Register(k) => (true, k.into()),
                StandingChange::Unregister(k) => (false, k.into()),
            }),
        }
    }
}

/// New runs waiting for [`Store::create`]'s next durable commit, each with where its id goes
/// (`Some(None)`: the commit failed).
pub(super) type Creating = Vec<(Arc<Creation>, Arc<Mutex<Option<Option<RunId>>>>)>;

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One new run's rows, in a durable write.
fn create_one(
    tx: &WriteTransaction,
    writes: &mut Writes,
    new: &Creation,
) -> Result<RunId, StateError> {
    let Creation {
        name,
        source,
        workstream,
        plan,
        steps: step_ids,
        trigger,
        submission,
        standing,
    } = new;
    let mut meta = tx.open_table(META).map_err(storage)?;
    let id = meta
        .get("next_run")
        .map_err(storage)?
        .map(|v| v.value())
        .unwrap_or(1);
    meta.insert("next_run", id + 1).map_err(storage)?;
    // the replay below opens `meta` again, to count the run
    drop(meta);
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
            trigger: trigger.clone(),
            crashes: 0,
        },
        next_event: 1,
        last_hash: String::new(),
    };
    // the rows go in the way a journaled batch does
    let mut created = Redo::default();
    writes.pending.steps.reserve(step_ids.len());
    for (position, step) in step_ids.iter().enumerate() {
        let row = StepRow::new(position as u32, step);
        created.row(STEPS, (id, step.as_str()), &encode(&row));
        // the run's first batches read them back: from here, not decoded again
        let seq = writes.written;
        writes.pending.steps.insert((id, step.clone()), (seq, row));
    }
    append_event(
        &mut created,
        &mut row,
        None,
        "run.created",
        created_detail(step_ids.len(), source, plan),
    )?;
    created.row(RUNS, id, &encode(&row));
    writes.pending.runs.insert(id, (writes.written, row));
    replay(tx, &[&created.0])?;
    tx.open_table(PLANS)
        .map_err(storage)?
        .insert(id, plan.json.as_slice())
        .map_err(storage)?;
    let mut table = tx.open_table(STANDING).map_err(storage)?;
    match standing {
        Some((true, key)) => {
            // `{"plan": …, "source": …, "workstream": …}`, the plan's bytes as they are
            let mut record = br#"{"plan":"#.to_vec();
            record.extend_from_slice(&plan.json);
            record.extend_from_slice(br#","source":"#);
            record.extend_from_slice(&encode(source));
            record.extend_from_slice(br#","workstream":"#);
            record.extend_from_slice(&encode(workstream));
            record.push(b'}');
            table
                .insert(key.as_str(), record.as_slice())
                .map_err(storage)?;
        }
        Some((false, key)) => {
            table.remove(key.as_str()).map_err(storage)?;
        }
        None => {}
    }
    if let Some((claim, sha256)) = submission {
        let record = serde_json::json!({ "run": id, "sha256": sha256 });
        tx.open_table(SUBMISSIONS)
            .map_err(storage)?
            .insert(claim.as_str(), encode(&record).as_slice())
            .map_err(storage)?;
    }
    Ok(id)
}

impl Store {
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

impl Store {}

/// `run.created`'s words: how many steps from where, and the parameters the run takes, so
/// the log says what values it ran with.
fn created_detail(steps: usize, source: &str, plan: &PlanJson) -> String {
    let mut detail = format!("{steps} steps from {source}");
    if let Some(params) = &plan.params {
        detail.push_str(&format!("; params {params}"));
    }
    detail
}

fn params_words(params: &crate::spec::template::Params) -> Option<String> {
    (!params.is_empty()).then(|| crate::spec::template::params_line(params))
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
            .create_run("w", "/w.toml", "/ws", &serde_json::json!({}), &steps)
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
        assert_eq!(
            steps.iter().find(|s| s.id == "a").unwrap().state,
            StepState::Running
        );
        assert_eq!(
            store.journal_syncs().0,
            synced + 1,
            "one sync, by the sync thread"
        );
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
            .create_run("x", "/x.toml", "/ws", &serde_json::json!({}), &["c".into()])
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
            redo.row(STEPS, (run, "a"), &encode(&step));
            redo.0
        };
        let (first, second) = (row(StepState::Running), row(StepState::Failed));
        let tx = store.shared.db.begin_write().unwrap();
        replay(&tx, &[&first, &second]).unwrap();
        tx.commit().unwrap();
        let steps = store.steps(run).unwrap();
        assert_eq!(
            steps.iter().find(|s| s.id == "a").unwrap().state,
            StepState::Failed
        );
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

    /// The counts kept in `meta` are those a read of every run gives.
    fn counts_hold(store: &Store) -> BTreeMap<RunState, u64> {
        let mut scanned = BTreeMap::new();
        for r in store.runs().unwrap() {
            *scanned.entry(r.state).or_insert(0) += 1;
        }
        let kept = counts::read(&store.read().unwrap())
            .unwrap()
            .expect("counts kept");
        let kept: BTreeMap<_, _> = kept.into_iter().filter(|(_, n)| *n > 0).collect();
        assert_eq!(kept, scanned);
        assert_eq!(store.run_counts().unwrap(), scanned);
        // and the index of the runs not yet ended
        let runs = store.runs().unwrap();
        let unfinished: Vec<RunId> = runs
            .iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id)
            .collect();
        let indexed = counts::read_unfinished(&store.read().unwrap())
            .unwrap()
            .expect("index kept");
        assert_eq!(indexed, unfinished);
        let read: Vec<RunId> = store
            .unfinished_runs()
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(read, unfinished);
        scanned
    }

    #[test]
    fn run_counts_follow_every_move_prune_crash_and_an_uncounted_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let runs: Vec<RunId> = (0..5).map(|_| new_run(&store)).collect();
        assert_eq!(counts_hold(&store)[&RunState::Pending], 5);
        for &run in &runs[..3] {
            store
                .apply_sync_behind(&[run_to(run, RunState::Running)])
                .unwrap();
        }
        // several moves of one run in one batch count as where it ends
        store
            .apply(&[run_to(runs[0], RunState::Succeeded)])
            .unwrap();
        store
            .apply_sync_behind(&[run_to(runs[1], RunState::Failed)])
            .unwrap();
        store
            .apply_sync_behind(&[run_to(runs[3], RunState::Canceled)])
            .unwrap();
        let counts = counts_hold(&store);
        assert_eq!(counts[&RunState::Running], 1);
        assert_eq!(counts[&RunState::Pending], 1);
        // a refused batch moves nothing
        assert!(
            store
                .apply(&[run_to(runs[4], RunState::Succeeded)])
                .is_err()
        );
        assert_eq!(counts_hold(&store), counts);
        // a prune takes its runs out of the counts: the oldest two finished go
        assert_eq!(store.prune(None, Some(1)).unwrap(), 2);
        let counts = counts_hold(&store);
        let expected = [
            (RunState::Pending, 1),
            (RunState::Running, 1),
            (RunState::Canceled, 1),
        ];
        assert_eq!(counts, BTreeMap::from(expected));

        // a crash: the journal's batches are replayed onto the rows and the counts the
        // database had, some of them a second time
        store
            .apply_sync_behind(&[run_to(runs[2], RunState::Succeeded)])
            .unwrap();
        let copy = crash_copy(dir.path(), true);
        let reopened = Store::open(copy.path()).unwrap();
        assert_eq!(counts_hold(&reopened)[&RunState::Succeeded], 1);
        assert!(!counts_hold(&reopened).contains_key(&RunState::Running));
        drop(reopened);

        // a state an older uet wrote, without counts: counted when next opened
        store
            .write_durably(|tx, _| {
                let mut meta = tx.open_table(META).map_err(storage)?;
                meta.retain(|k, _| !k.starts_with("runs."))
                    .map_err(storage)?;
                Ok(())
            })
            .unwrap();
        assert!(counts::read(&store.read().unwrap()).unwrap().is_none());
        // without them, the counts are read from every run
        assert_eq!(store.run_counts().unwrap()[&RunState::Succeeded], 1);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(counts_hold(&store)[&RunState::Succeeded], 1);
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
        assert_eq!(counts_hold(&store)[&RunState::Pending], 4 * rounds as u64);
    }

    #[test]
    fn runs_created_side_by_side_are_each_recorded_once_with_their_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (threads, each) = (8, 40);
        let ids: Vec<RunId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let store = &store;
                    s.spawn(move || {
                        (0..each)
                            .map(|i| {
                                let steps = vec![format!("s{t}-{i}")];
                                let source = format!("/w{t}-{i}.toml");
                                let id = store
                                    .create_run("w", &source, "/ws", &serde_json::json!({}), &steps)
                                    .unwrap();
                                (id, source, steps)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .map(|(id, source, steps)| {
                    // each id is the run its caller asked for, with its own steps
                    let run = store.run(id).unwrap().unwrap();
                    assert_eq!(run.source, source);
                    assert_eq!(store.steps(id).unwrap()[0].id, steps[0]);
                    id
                })
                .collect()
        });
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), threads * each);
        assert_eq!(sorted, (1..=(threads * each) as u64).collect::<Vec<_>>());
        assert_eq!(
            counts_hold(&store)[&RunState::Pending],
            (threads * each) as u64
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.runs().unwrap().len(), threads * each);
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
        assert!(
            store
                .apply(&[step_to(run, "b", StepState::Running)])
                .is_err()
        );
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

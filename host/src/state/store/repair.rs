//! `uet state check` and `uet state recover`: finding out whether the state file can be read
//! whole, and putting the last good copy back when it cannot. Neither repairs the file in
//! place: a check reads it (or, when it needs recovery, a copy of it), and a recovery sets the
//! damaged file aside under a name of its own before anything else.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use super::{
    ATTEMPTS, BACKUP_FILE, BREAKERS, DURATIONS, EVENTS, META, PLANS, RUNS, STANDING, STATE_FILE,
    STEPS, SUBMISSIONS, StateError, Store, TOOL_STATS, UNFINISHED, copy_privately, existing,
    lock_state, storage,
};
use redb::{ReadableTable, TableDefinition};

/// Problems named per check at most; the rest are counted.
const LISTED: usize = 20;

/// What a check found.
#[derive(Debug, Default)]
pub struct Health {
    /// The state file.
    pub file: PathBuf,
    /// Whether uet stopped without closing it (then a copy was recovered and checked).
    pub unclean: bool,
    /// Rows read, all tables together.
    pub rows: u64,
    /// Runs whose steps and event chain were read and verified.
    pub runs: u64,
    /// Runs whose events an older uet wrote without hashes: read, not verified.
    pub unverified: u64,
    /// What could not be read or did not verify, in words (at most [`LISTED`]).
    pub damage: Vec<String>,
    /// How many more problems there were.
    pub unlisted: usize,
    /// The last good copy, and when it was written.
    pub backup: Option<(PathBuf, std::time::SystemTime)>,
}

impl Health {
    /// Whether every row could be read and every chain verified.
    pub fn is_sound(&self) -> bool {
        self.damage.is_empty()
    }

    fn damaged(&mut self, what: String) {
        if self.damage.len() < LISTED {
            self.damage.push(what);
        } else {
            self.unlisted += 1;
        }
    }
}

/// Checks the state in `dir` without writing it: every row of every table is read, and every
/// run's steps and event chain. A state left unclean is recovered into a copy, and the copy is
/// checked. A panic of the database on a damaged page is a finding, not a crash.
pub fn check(dir: &Path) -> Result<Health, StateError> {
    let mut health = Health {
        file: dir.join(STATE_FILE),
        backup: last_copy(dir),
        ..Health::default()
    };
    match quietly(|| Store::open_read_only(dir)) {
        Ok(Ok(store)) => walk(&store, &mut health),
        Ok(Err(StateError::Unclean(_))) => {
            health.unclean = true;
            let scratch = dir.join(format!(".check-{}", std::process::id()));
            let checked = check_copy(dir, &scratch, &mut health);
            let _ = std::fs::remove_dir_all(&scratch);
            checked?;
        }
        Ok(Err(e @ (StateError::Missing(_) | StateError::InUse(_) | StateError::Emptied(_)))) => {
            return Err(e);
        }
        // the system's refusal (permissions, no descriptors left) says nothing of the file
        Ok(Err(e)) if is_io(&e) => return Err(e),
        Ok(Err(e)) => health.damaged(format!("the file cannot be opened: {e}")),
        Err(panic) => health.damaged(format!("the file cannot be opened: {panic}")),
    }
    Ok(health)
}

/// Whether an error is the system's (a read or an open refused) rather than the file's.
fn is_io(e: &StateError) -> bool {
    match e {
        StateError::Journal(_) => true,
        StateError::Open { source, .. } => {
            source.downcast_ref::<std::io::Error>().is_some()
                || matches!(
                    source.downcast_ref::<redb::DatabaseError>(),
                    Some(redb::DatabaseError::Storage(redb::StorageError::Io(_)))
                )
        }
        _ => false,
    }
}

/// Recovers a copy of the state into `scratch` (redb's repair, the journal's replay) and
/// checks the copy.
fn check_copy(dir: &Path, scratch: &Path, health: &mut Health) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(scratch)?;
    for file in [STATE_FILE, crate::state::journal::JOURNAL_FILE] {
        if dir.join(file).exists() {
            copy_privately(&dir.join(file), &scratch.join(file))?;
        }
    }
    match quietly(|| Store::open(scratch)) {
        Ok(Ok(store)) => walk(&store, health),
        Ok(Err(e)) => health.damaged(format!("it cannot be recovered: {e}")),
        Err(panic) => health.damaged(format!("it cannot be recovered: {panic}")),
    }
    Ok(())
}

/// Reads every table whole, then every run's steps and event chain.
fn walk(store: &Store, health: &mut Health) {
    let tx = match store.shared.db.begin_read() {
        Ok(tx) => tx,
        Err(e) => return health.damaged(format!("cannot read it: {e}")),
    };
    macro_rules! read_whole {
        ($table:ident) => {
            match quietly(|| count_rows(&tx, $table)) {
                Ok(Ok(rows)) => health.rows += rows,
                Ok(Err(e)) => {
                    health.damaged(format!("table {} cannot be read: {e}", $table.to_string()))
                }
                Err(panic) => health.damaged(format!(
                    "table {} cannot be read: {panic}",
                    $table.to_string()
                )),
            }
        };
    }
    every_table!(read_whole);
    drop(tx);
    let runs = match quietly(|| store.runs()) {
        Ok(Ok(runs)) => runs,
        Ok(Err(e)) => return health.damaged(format!("the runs cannot be read: {e}")),
        Err(panic) => return health.damaged(format!("the runs cannot be read: {panic}")),
    };
    for run in runs {
        let verified = quietly(|| {
            store.steps(run.id)?;
            store.verify(run.id)
        });
        match verified {
            Ok(Ok(Ok(_))) => health.runs += 1,
            // an older uet wrote its events without hashes: nothing to verify, nothing broken
            Ok(Ok(Err(broken))) if broken.contains("has no hash") => health.unverified += 1,
            Ok(Ok(Err(broken))) => health.damaged(format!("run {}: {broken}", run.id)),
            Ok(Err(e)) => health.damaged(format!("run {} cannot be read: {e}", run.id)),
            Err(panic) => health.damaged(format!("run {} cannot be read: {panic}", run.id)),
        }
    }
}

fn count_rows<K: redb::Key + 'static, V: redb::Value + 'static>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, StateError> {
    let Some(t) = existing(tx, table)? else {
        return Ok(0);
    };
    let mut rows = 0;
    for row in t.iter().map_err(storage)? {
        let (k, v) = row.map_err(storage)?;
        // the bytes themselves, not only the pages that lead to them
        std::hint::black_box((k.value(), v.value()));
        rows += 1;
    }
    Ok(rows)
}

/// The last good copy in `dir`, and when it was written.
fn last_copy(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let path = dir.join(BACKUP_FILE);
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    Some((path, written))
}

/// What a recovery did.
#[derive(Debug)]
pub enum Recovered {
    /// The state was sound: nothing was changed.
    Sound(Health),
    /// The damaged file was set aside and the last good copy put in its place.
    Restored {
        /// What the check found.
        health: Health,
        /// Where the damaged file now is.
        damaged: PathBuf,
        /// When the copy put back was written.
        copy_written: std::time::SystemTime,
        /// Runs the recovered state holds.
        runs: usize,
        /// Journaled batches replayed on top of the copy (the changes since it, when the
        /// journal still held them).
        replayed: usize,
    },
    /// The damaged file was set aside; there was no good copy, so the next uet starts a new
    /// history.
    SetAside {
        /// What the check found.
        health: Health,
        /// Where the damaged file now is.
        damaged: PathBuf,
    },
}

/// Recovers the state in `dir` when a check finds it damaged: the file is renamed to
/// `uet.redb.damaged-SECONDS` (kept, never overwritten), the last good copy is put in its place
/// and opened, which replays the journal when it still holds the changes since the copy.
pub fn recover(dir: &Path) -> Result<Recovered, StateError> {
    let health = check(dir).or_else(|e| match e {
        // an emptied or lost file is damage too: there is nothing in it to lose
        StateError::Emptied(_) => Ok(Health {
            file: dir.join(STATE_FILE),
            damage: vec!["the file is empty or gone".into()],
            backup: last_copy(dir),
            ..Health::default()
        }),
        e => Err(e),
    })?;
    if health.is_sound() {
        return Ok(Recovered::Sound(health));
    }
    // held from here until the recovered state is open: no uet may have it meanwhile, even one
    // whose database file is gone (its redb lock went with the file)
    let lock = lock_state(dir, true)?;
    let file = dir.join(STATE_FILE);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let damaged = dir.join(format!("{STATE_FILE}.damaged-{stamp}"));
    if damaged.exists() {
        return Err(StateError::Journal(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists already: try again in a second",
                damaged.display()
            ),
        )));
    }
    if file.exists() {
        std::fs::rename(&file, &damaged)?;
    }
    let journal = dir.join(crate::state::journal::JOURNAL_FILE);
    let Some((copy, copy_written)) = health.backup.clone() else {
        // its records are of the history set aside: a new one must not replay them
        if journal.exists() {
            std::fs::rename(&journal, dir.join(format!("uet.journal.damaged-{stamp}")))?;
        }
        return Ok(Recovered::SetAside { health, damaged });
    };
    copy_privately(&copy, &file)?;
    let (runs, replayed) = {
        let store = Store::open_with(dir, Some(lock))?;
        (store.runs()?.len(), store.replayed_at_open())
    };
    // closed cleanly, the copy holds all the journal had for it; the journal's other records
    // are of generations the restored file is behind, which it would name again as it goes
    // on: they must never be replayed into it
    std::fs::remove_file(&journal)?;
    Ok(Recovered::Restored {
        health,
        damaged,
        copy_written,
        runs,
        replayed,
    })
}

/// Runs `f`, catching a panic (redb's, on a damaged page) as its message; the panic hook is
/// the caller's business (the CLI keeps such panics off the terminal).
pub fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|panic| format!("the database panicked ({})", crate::panic_message(&*panic)))
}

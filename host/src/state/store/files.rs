//! The state's files beside the database: its lock, its copies (the last good one, the one
//! kept before a repair), and the checks that refuse a folder whose database was lost.

use super::*;

/// The copy of the database kept before redb repairs it after an unclean stop.
pub const BEFORE_REPAIR_FILE: &str = "uet.redb.before-repair";

/// The last good copy of the database, written now and then from a consistent read of it
/// (see [`Shared::back_up_if_due`]); `uet state recover` puts it back.
pub const BACKUP_FILE: &str = "uet.redb.bak";

/// How often the last good copy is renewed at most: each copy reads and writes the whole
/// file, so a large state is not copied at every checkpoint, and what a damaged file can
/// lose is the changes since, unless the journal still holds them.
pub(super) const BACKUP_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// A state file this small is copied at every checkpoint and close: a few milliseconds.
pub(super) const BACKUP_ALWAYS: u64 = 4 << 20;

/// Refuses a state folder whose database file is empty or gone while its journal or last good
/// copy is there: opening it would quietly start a new history (run ids from 1) over the lost
/// one, and the next copy would replace the good one.
pub(super) fn refuse_emptied(dir: &Path) -> Result<(), StateError> {
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

/// The lock file of a state folder: taken for as long as a store is open, exclusively to write
/// and shared to read, so that no one can set the state aside or put a copy back (`uet state
/// recover`) under a uet that has it open, even one whose database file was deleted (redb's
/// own lock is on the file, and goes with it).
pub const LOCK_FILE: &str = "uet.lock";

/// Takes the state's lock: exclusive to write, shared to read; [`StateError::InUse`] when
/// another process holds it against that.
pub(super) fn lock_state(dir: &Path, exclusive: bool) -> Result<std::fs::File, StateError> {
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

/// An empty file at `path`, replacing any left there, made 0600 before redb writes a byte of it.
fn fresh_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    Ok(())
}

/// Makes a new database file apart and gives it its name only once it is whole and synced:
/// a power loss while it is being made leaves no half-made database under the name (which
/// would then never open), only a `.new` file the next open replaces.
pub(super) fn create_whole(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("redb.new");
    fresh_private(&tmp)?;
    drop(Database::create(&tmp).map_err(std::io::Error::other)?);
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Copies a file to `to` (replacing it) readable by its owner only, synced.
pub(super) fn copy_privately(from: &Path, to: &Path) -> std::io::Result<()> {
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
pub(super) fn write_backup(db: &Db, dir: &Path) -> Result<u64, StateError> {
    let tmp = dir.join(format!("{BACKUP_FILE}.tmp"));
    fresh_private(&tmp)?;
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
pub(super) fn existing<K: redb::Key + 'static, V: redb::Value + 'static>(
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
pub(super) fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
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
pub(super) fn json_rows<K: redb::Key + 'static>(
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
pub(super) fn backup_due(dir: &Path) -> bool {
    let small = std::fs::metadata(dir.join(STATE_FILE)).is_ok_and(|m| m.len() <= BACKUP_ALWAYS);
    small
        || std::fs::metadata(dir.join(BACKUP_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= BACKUP_EVERY)
}

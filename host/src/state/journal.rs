//! The redo journal in front of the state file. A batch's row writes are appended to one file
//! with one fdatasync, so a commit costs one sequential write, where a durable commit of the
//! copy-on-write B-tree writes some eighteen scattered pages. The database is made durable at
//! checkpoints, each naming a new generation; on open, the records of the generation the
//! database names are replayed into it, so a crash loses nothing a commit acknowledged.
//! docs/ENGINE.md ("When a change is on disk") has the whole argument.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The journal file inside a state folder, beside the database.
pub const JOURNAL_FILE: &str = "uet.journal";

/// Zero-filled when the journal is created, so appends overwrite blocks the file already has
/// and the fdatasync after each carries no change of size or extents.
const PREALLOCATED: u64 = 8 << 20;

/// A checkpoint is due once this much has been appended since the last: sooner costs more
/// durable B-tree commits, later a longer replay after a crash and a larger file between.
pub const CHECKPOINT_AFTER: u64 = 4 << 20;

/// A record's header: payload length (u32), generation (u64), crc32 of both and the payload.
const HEADER: usize = 16;

/// What the journal is written to: a file, or, for the power-loss tests, memory that knows
/// which writes a sync made durable. Shared by the journal and the thread that syncs it.
pub trait JournalFile: Send + Sync {
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Reads `buf.len()` bytes at `at`.
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<()>;
    /// Writes `buf` at `at`.
    fn write_at(&self, buf: &[u8], at: u64) -> io::Result<()>;
    /// Makes what was written durable.
    fn sync(&self) -> io::Result<()>;
}

impl JournalFile for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.read_exact_at(buf, at)
    }
    fn write_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        self.write_all_at(buf, at)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// The open journal. Records are written from the start of the file under the current
/// generation; whatever follows the last one (zeros, a torn write, or records of an older
/// generation) ends the replay.
pub struct Journal {
    file: std::sync::Arc<dyn JournalFile>,
    /// Where the next record goes.
    end: u64,
    /// The generation the database's last durable commit named.
    generation: u64,
    /// Syncs so far and the time they took (with the write, for an append): for
    /// `RUST_LOG=uet=debug`.
    syncs: (u64, std::time::Duration),
}

impl Journal {
    /// Opens (creating and zero-filling if needed) the journal at `path`.
    pub fn open(path: &Path) -> io::Result<Journal> {
        use std::os::unix::fs::OpenOptionsExt;
        // it holds what steps output, secrets perhaps: the owner's alone
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // an older uet made it with the umask
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let len = file.metadata()?.len();
        if len < PREALLOCATED {
            let zeros = vec![0u8; 1 << 16];
            let mut at = len;
            while at < PREALLOCATED {
                let n = (PREALLOCATED - at).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            file.sync_all()?;
            // and its name, so a crash cannot leave synced records in a file no folder lists
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(Journal::on(std::sync::Arc::new(file)))
    }

    /// A journal written to `file`, which holds what it holds: zero-filled when it is new.
    pub fn on(file: std::sync::Arc<dyn JournalFile>) -> Journal {
        Journal {
            file,
            end: 0,
            generation: 0,
            syncs: (0, std::time::Duration::ZERO),
        }
    }

    /// Opens the journal at `path` to read it only: nothing is created or written. With no
    /// journal there, an empty one (`/dev/null`) stands in: it holds no records.
    pub fn open_read_only(path: &Path) -> io::Result<Journal> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => File::open("/dev/null")?,
            Err(e) => return Err(e),
        };
        Ok(Journal::on(std::sync::Arc::new(file)))
    }

    /// The payloads written under `generation`, in order, up to the first record that is torn,
    /// zero or of another generation. Read a record at a time: after a clean close the first
    /// header already ends it.
    pub fn records(&self, generation: u64) -> io::Result<Vec<Vec<u8>>> {
        let len = self.file.len()?;
        let mut out = Vec::new();
        let mut at = 0u64;
        let mut header = [0u8; HEADER];
        while at + HEADER as u64 <= len {
            self.file.read_at(&mut header, at)?;
            let size = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as u64;
            let generation_bytes: [u8; 8] = header[4..12].try_into().unwrap_or_default();
            let crc = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
            let start = at + HEADER as u64;
            if u64::from_le_bytes(generation_bytes) != generation || start + size > len {
                break;
            }
            let mut payload = vec![0u8; size as usize];
            self.file.read_at(&mut payload, start)?;
            if checksum(&generation_bytes, &payload) != crc {
                break;
            }
            out.push(payload);
            at = start + size;
        }
        Ok(out)
    }

    /// The generation records are written under.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many syncs this journal has had since it was opened, appends' and [`Journal::synced`]
    /// ones, and the time they took.
    pub fn syncs(&self) -> (u64, std::time::Duration) {
        self.syncs
    }

    /// How much has been appended since the last checkpoint.
    pub fn appended(&self) -> u64 {
        self.end
    }

    /// Starts `generation` at the beginning of the file: the database's durable commit that
    /// names it holds everything journaled before, so the older records are spent.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.end = 0;
    }

    /// Appends one record and waits until it is on disk.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let began = std::time::Instant::now();
        self.write(payload)?;
        self.file.sync()?;
        self.synced(began.elapsed());
        Ok(())
    }

    /// Appends one record to the page cache; a sync ([`Journal::syncer`]) makes it durable.
    /// Records reach the disk in order or not at all as far as a replay can tell: it stops at
    /// the first one missing or torn.
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        let generation = self.generation.to_le_bytes();
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&generation);
        record.extend_from_slice(&checksum(&generation, payload).to_le_bytes());
        record.extend_from_slice(payload);
        self.file.write_at(&record, self.end)?;
        self.end += record.len() as u64;
        Ok(())
    }

    /// A handle to sync the journal with from another thread, without holding the journal.
    pub fn syncer(&self) -> std::sync::Arc<dyn JournalFile> {
        self.file.clone()
    }

    /// Counts a sync made through [`Journal::syncer`] that took `took`.
    pub fn synced(&mut self, took: std::time::Duration) {
        self.syncs.0 += 1;
        self.syncs.1 += took;
    }
}

fn checksum(generation: &[u8; 8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(generation);
    h.update(payload);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_stops_at_a_torn_record_and_ignores_older_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = Journal::open(&path).unwrap();
        j.restart(1);
        for p in [&b"one"[..], b"two", b"three"] {
            j.append(p).unwrap();
        }
        // a new generation overwrites the start; the old third record still follows it
        j.restart(2);
        j.append(b"uno").unwrap();
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.records(2).unwrap(), vec![b"uno".to_vec()]);
        assert!(j.records(1).unwrap().is_empty(), "overwritten at the start");
        assert!(j.records(3).unwrap().is_empty());

        // a record cut short by a crash ends the replay there
        let mut j = Journal::open(&path).unwrap();
        j.restart(3);
        j.append(b"kept").unwrap();
        j.append(b"torn record").unwrap();
        let at = (HEADER + 4 + HEADER + 5) as u64;
        j.file.write_at(b"XXXXXX", at).unwrap();
        assert_eq!(j.records(3).unwrap(), vec![b"kept".to_vec()]);
    }
}

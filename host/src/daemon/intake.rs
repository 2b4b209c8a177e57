//! What is dropped into a watched folder is somebody else's file, read with the daemon's
//! rights: it is opened without following a link or waiting on a FIFO, read only when it is a
//! plain file of one name, and never beyond a size limit. Whatever is refused or invalid goes
//! to `rejected/` with a report only the daemon's user can read.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes of a dropped file's name that are taken in: the claim's name adds a stamp of up to 25
/// bytes and a report's name `.error.txt` and a number, and both must fit the 255 bytes a file
/// name may have.
pub const MAX_NAME: usize = 200;

/// Tries at taking a claimed file in: one whose taking-in stopped the daemon this many times is
/// refused instead of being read again at every start.
pub const CLAIM_TRIES: u32 = 2;

/// Why a dropped file was refused without being read as a workflow.
#[derive(Debug)]
pub enum Refusal {
    /// It is a symbolic link.
    Link,
    /// It is not a plain file (a FIFO, a device, a socket, a folder).
    NotPlain(&'static str),
    /// It has other names (hard links), so it may not be the submitter's own.
    OtherNames(u64),
    /// It is larger than the limit.
    TooLarge(u64),
    /// Its name is longer than [`MAX_NAME`] bytes.
    NameTooLong(usize),
    /// Taking it in stopped the daemon [`CLAIM_TRIES`] times.
    Crashed,
    /// It could not be read.
    Unreadable(std::io::Error),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Link => write!(
                f,
                "it is a symbolic link; links are not followed (drop the file itself)"
            ),
            Refusal::NotPlain(kind) => write!(f, "it is {kind}, not a plain file"),
            Refusal::OtherNames(n) => write!(
                f,
                "it has {n} names (hard links), so it may be somebody else's file; drop a copy"
            ),
            Refusal::TooLarge(limit) => write!(
                f,
                "it is larger than {}, the most read of a workflow (max_file in the daemon's config)",
                crate::doc::show_bytes(*limit)
            ),
            Refusal::NameTooLong(n) => write!(
                f,
                "its name is {n} bytes long, over the {MAX_NAME} bytes a workflow's name may have"
            ),
            Refusal::Crashed => write!(
                f,
                "uet stopped while taking it in, {CLAIM_TRIES} times: it is set aside unread as a \
                 suspected cause"
            ),
            Refusal::Unreadable(e) => write!(f, "it cannot be read: {e}"),
        }
    }
}

/// Reads a dropped (or claimed) file: not through a link, without blocking on a FIFO, only a
/// plain file with no other name, and at most `limit` bytes of it.
pub fn read_dropped(path: &Path, limit: u64) -> Result<Vec<u8>, Refusal> {
    read_plain(path, limit, false)
}

/// Reads a file a client named with `uet submit`: the socket's owner is the daemon's user, so
/// links are followed, but only a plain file is read, and at most `limit` bytes of it.
pub fn read_submitted(path: &Path, limit: u64) -> Result<Vec<u8>, Refusal> {
    read_plain(path, limit, true)
}

fn read_plain(path: &Path, limit: u64, follow: bool) -> Result<Vec<u8>, Refusal> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) if !follow => Refusal::Link,
            _ => Refusal::Unreadable(e),
        })?;
    // what was opened, not what the name says now
    let meta = file.metadata().map_err(Refusal::Unreadable)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        return Err(Refusal::NotPlain(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a folder"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else {
            "a special file"
        }));
    }
    if !follow && meta.nlink() > 1 {
        return Err(Refusal::OtherNames(meta.nlink()));
    }
    if meta.len() > limit {
        return Err(Refusal::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(Refusal::Unreadable)?;
    if bytes.len() as u64 > limit {
        return Err(Refusal::TooLarge(limit));
    }
    Ok(bytes)
}

/// The name a file is claimed under in `.uet/claimed/`: the time it was claimed, the tries at
/// taking it in after the first (a restart after a crash is another try), and its own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimName {
    /// Nanoseconds since the epoch when it was claimed.
    pub stamp: u128,
    /// Which try at taking it in this is, from 1.
    pub tries: u32,
    /// The name it was dropped under.
    pub name: String,
}

impl ClaimName {
    /// A claim made now of a file named `name`.
    pub fn now(name: &str) -> ClaimName {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ClaimName {
            stamp,
            tries: 1,
            name: name.to_string(),
        }
    }

    /// Reads a claimed file's name: `STAMP-NAME`, or `STAMP.TRIES-NAME` after the first try.
    pub fn parse(claim: &str) -> Option<ClaimName> {
        let (head, name) = claim.split_once('-')?;
        let (stamp, tries) = match head.split_once('.') {
            Some((stamp, tries)) => (stamp, tries.parse().ok()?),
            None => (head, 1),
        };
        Some(ClaimName {
            stamp: stamp.parse().ok()?,
            tries,
            name: name.to_string(),
        })
    }

    /// The next try's claim.
    pub fn retried(&self) -> ClaimName {
        ClaimName {
            tries: self.tries + 1,
            ..self.clone()
        }
    }
}

impl fmt::Display for ClaimName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tries <= 1 {
            write!(f, "{}-{}", self.stamp, self.name)
        } else {
            write!(f, "{}.{}-{}", self.stamp, self.tries, self.name)
        }
    }
}

/// A name as short as [`MAX_NAME`] bytes (cut at a character's edge): what a file whose own
/// name is too long is rejected under.
pub fn shortened(name: &str) -> String {
    if name.len() <= MAX_NAME {
        return name.to_string();
    }
    let mut cut = MAX_NAME;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    name[..cut].to_string()
}

/// Moves `from` to `dir/rejected/` as `name` and writes the report beside it as
/// `name.error.txt`: the first pair of names no earlier rejection holds (`name`, then
/// `2-name`, `3-name`, ...), so a file rejected twice keeps both reports. The report is the
/// daemon user's alone (0600): it may quote what the file held. Returns the report's path.
pub fn reject(dir: &Path, from: &Path, name: &str, report: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let rejected = dir.join("rejected");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&rejected)?;
    for n in 1u32.. {
        let kept = if n == 1 {
            name.to_string()
        } else {
            format!("{n}-{name}")
        };
        let report_path = rejected.join(format!("{kept}.error.txt"));
        let file_path = rejected.join(&kept);
        if file_path.symlink_metadata().is_ok() {
            continue;
        }
        // the report's name is taken first, atomically: two rejections never share it
        let mut out = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&report_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        out.write_all(report.as_bytes())?;
        // the file itself; a name taken meanwhile by a file dropped in by hand is not replaced
        if let Err(e) = rename_new(from, &file_path) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                let _ = std::fs::remove_file(&report_path);
                continue;
            }
            return Err(e);
        }
        return Ok(report_path);
    }
    unreachable!("some number is free")
}

/// Renames without replacing what is at `to` (`RENAME_NOREPLACE`).
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings; renameat2 touches nothing else
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_round_trip_and_count_tries() {
        let first = ClaimName::now("a-b.toml");
        let text = first.to_string();
        assert!(!text.contains('.') || text.ends_with(".toml"));
        assert_eq!(ClaimName::parse(&text), Some(first.clone()));
        let again = first.retried();
        assert_eq!(again.tries, 2);
        assert_eq!(ClaimName::parse(&again.to_string()), Some(again.clone()));
        assert_eq!(ClaimName::parse("x.toml"), None);
        // the longest name still fits a file name with its stamp and tries
        assert!(ClaimName::now(&"n".repeat(MAX_NAME)).retried().to_string().len() <= 255);
        assert!(format!("99-{}.error.txt", "n".repeat(MAX_NAME)).len() <= 255);
    }

    #[test]
    fn shortened_names_cut_at_a_character() {
        let name = "é".repeat(150);
        let short = shortened(&name);
        assert!(short.len() <= MAX_NAME && short.chars().all(|c| c == 'é'));
        assert_eq!(shortened("a.toml"), "a.toml");
    }

    #[test]
    fn refuses_links_fifos_hard_links_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.toml");
        std::fs::write(&plain, "name = 1").unwrap();
        assert_eq!(read_dropped(&plain, 100).unwrap(), b"name = 1");
        assert!(matches!(read_dropped(&plain, 4), Err(Refusal::TooLarge(4))));
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&plain, &link).unwrap();
        assert!(matches!(read_dropped(&link, 100), Err(Refusal::Link)));
        assert_eq!(read_submitted(&link, 100).unwrap(), b"name = 1");
        let fifo = dir.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // returns at once: no writer is waited for
        assert!(matches!(
            read_dropped(&fifo, 100),
            Err(Refusal::NotPlain("a FIFO"))
        ));
        let twin = dir.path().join("twin.toml");
        std::fs::hard_link(&plain, &twin).unwrap();
        assert!(matches!(read_dropped(&twin, 100), Err(Refusal::OtherNames(2))));
    }

    #[test]
    fn a_second_rejection_of_a_name_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["one", "two"] {
            let f = dir.path().join("x.toml");
            std::fs::write(&f, text).unwrap();
            reject(dir.path(), &f, "x.toml", &format!("report {text}")).unwrap();
        }
        let rejected = dir.path().join("rejected");
        let read = |n: &str| std::fs::read_to_string(rejected.join(n)).unwrap();
        assert_eq!(read("x.toml"), "one");
        assert_eq!(read("x.toml.error.txt"), "report one");
        assert_eq!(read("2-x.toml"), "two");
        assert_eq!(read("2-x.toml.error.txt"), "report two");
        let mode = std::fs::metadata(rejected.join("2-x.toml.error.txt"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

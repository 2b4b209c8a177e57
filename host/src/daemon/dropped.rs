//! What is dropped into a watched folder is somebody else's file, read with the daemon's
//! rights: it is opened without following a link or waiting on a FIFO, read only when it is a
//! plain file of one name, and never beyond a size limit. Whatever is refused or invalid goes
//! to `rejected/` with a report only the daemon's user can read.
//!
//! The folder's contents are the droppers' too: `rejected` or `.uet` may have been made a link
//! (to `~/.ssh`, say) before the daemon first needed them. So the daemon's own folders are
//! opened from the watched folder without following a link and checked to be the daemon's, and
//! every move, read and write is made relative to those open folders, never by a path.

use std::ffi::CString;
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
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
    /// Checking it failed inside uet (a bug, which the daemon's log shows).
    Unchecked,
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
                crate::spec::doc::show_bytes(*limit)
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
            Refusal::Unchecked => write!(
                f,
                "checking it failed inside uet (a bug; the daemon's log says where)"
            ),
            Refusal::Unreadable(e) => write!(f, "it cannot be read: {e}"),
        }
    }
}

/// Reads a claimed file, `name` in the folder `dir`: not through a link, without blocking on a
/// FIFO, only a plain file with no other name, and at most `limit` bytes of it.
pub fn read_dropped(dir: &OwnedFd, name: &str, limit: u64) -> Result<Vec<u8>, Refusal> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let file = open_at(dir, name, flags, 0).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => Refusal::Link,
        _ => Refusal::Unreadable(e),
    })?;
    read_plain(std::fs::File::from(file), limit, false)
}

/// Reads a file a client named with `uet submit`: the socket's owner is the daemon's user, so
/// links are followed, but only a plain file is read, and at most `limit` bytes of it.
pub fn read_submitted(path: &Path, limit: u64) -> Result<Vec<u8>, Refusal> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(Refusal::Unreadable)?;
    read_plain(file, limit, true)
}

/// Reads an opened file when it is a plain file (with no other name, unless `any_names`), at
/// most `limit` bytes of it.
fn read_plain(file: std::fs::File, limit: u64, any_names: bool) -> Result<Vec<u8>, Refusal> {
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
    if !any_names && meta.nlink() > 1 {
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

/// A watched folder held open, with the daemon's own folders in it.
pub struct Inbox {
    /// Its path, for messages and for the names of what is in it.
    pub path: PathBuf,
    fd: OwnedFd,
}

impl Inbox {
    /// Opens a watched folder (the operator's, named in the daemon's config: opened as given).
    pub fn open(path: &Path) -> std::io::Result<Inbox> {
        let fd = crate::adapters::beneath::open_folder(path, ".", false)
            .map_err(std::io::Error::other)?;
        Ok(Inbox {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The folder itself.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// `.uet/claimed`, where claimed files wait (made 0700 if missing).
    pub fn claimed(&self) -> std::io::Result<OwnedFd> {
        self.own(".uet", 0o700)?;
        self.own(".uet/claimed", 0o700)
    }

    /// `rejected`, where refused and invalid files go with their reports (made if missing).
    pub fn rejected(&self) -> std::io::Result<OwnedFd> {
        self.own("rejected", 0o755)
    }

    /// One of the daemon's own folders: reached without following a link, and the daemon's
    /// (a folder a dropper made there first is theirs to change under the daemon's feet).
    fn own(&self, rel: &str, mode: u32) -> std::io::Result<OwnedFd> {
        let fd = crate::adapters::beneath::open_folder_at(&self.fd, &self.path, rel, true)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata()?;
        // SAFETY: geteuid has no preconditions and cannot fail
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to uid {}, not to this daemon's user (uid {me}): somebody else \
                     made it (or the file system maps owners); move it away (files in \
                     .uet/claimed are drops not yet taken in: put them back in the folder)",
                    self.path.join(rel).display(),
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o777 != mode && rel.starts_with(".uet") {
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        Ok(OwnedFd::from(file))
    }
}

/// Moves `from` in the folder `from_dir` to `to` in `to_dir`; with `keep`, not over a file
/// that is there (`RENAME_NOREPLACE`).
pub fn rename_at(
    from_dir: &OwnedFd,
    from: &str,
    to_dir: &OwnedFd,
    to: &str,
    keep: bool,
) -> std::io::Result<()> {
    let (from, to) = (c_name(from)?, c_name(to)?);
    let flags = if keep { libc::RENAME_NOREPLACE } else { 0 };
    // SAFETY: valid descriptors and C strings; renameat2 touches nothing else
    let r = unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !(keep && e.raw_os_error() == Some(libc::EINVAL)) {
        return Err(e);
    }
    // a file system without RENAME_NOREPLACE (NFS, some FUSE): a hard link fails as well over a
    // name that is taken, and the old name goes once the new one holds the file
    // SAFETY: valid descriptors and C strings
    let linked = unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            0,
        )
    };
    if linked != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a valid descriptor and C string
    if unsafe { libc::unlinkat(from_dir.as_raw_fd(), from.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the file `name` from the folder `dir`.
pub fn remove_at(dir: &OwnedFd, name: &str) -> std::io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: a valid descriptor and C string
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes what was renamed in `dir` survive a crash.
pub fn sync_folder(dir: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: a valid descriptor
    if unsafe { libc::fsync(dir.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The names in the folder `dir`.
pub fn names_in(dir: &OwnedFd) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(crate::adapters::beneath::fd_path(dir))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

fn c_name(name: &str) -> std::io::Result<CString> {
    CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

fn open_at(dir: &OwnedFd, name: &str, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let name = c_name(name)?;
    // SAFETY: a valid descriptor and C string; the descriptor returned is ours
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and nobody else owns it
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// Moves `from` (in the folder `from_dir`) to the inbox's `rejected/` as `name`, and writes
/// the report beside it as `name.error.txt`: the first pair of names no earlier rejection holds
/// (`name`, then `2-name`, `3-name`, ...), so a file rejected twice keeps both reports. The
/// report is the daemon user's alone (0600): it may quote what the file held. Returns the
/// report's path.
pub fn reject(
    inbox: &Inbox,
    from_dir: &OwnedFd,
    from: &str,
    name: &str,
    report: &str,
) -> std::io::Result<PathBuf> {
    let rejected = inbox.rejected()?;
    for n in 1u32.. {
        let kept = if n == 1 {
            name.to_string()
        } else {
            format!("{n}-{name}")
        };
        let report_name = format!("{kept}.error.txt");
        // the report's name is taken first, atomically: two rejections never share it
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let mut out = match open_at(&rejected, &report_name, flags, 0o600) {
            Ok(fd) => std::fs::File::from(fd),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        out.write_all(report.as_bytes())?;
        // the file itself; a name taken by a file put there by hand is not replaced
        if let Err(e) = rename_at(from_dir, from, &rejected, &kept, true) {
            let _ = remove_at(&rejected, &report_name);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                continue;
            }
            return Err(e);
        }
        return Ok(inbox.path.join("rejected").join(report_name));
    }
    unreachable!("some number is free")
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
        assert!(
            ClaimName::now(&"n".repeat(MAX_NAME))
                .retried()
                .to_string()
                .len()
                <= 255
        );
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
        let inbox = Inbox::open(dir.path()).unwrap();
        let plain = dir.path().join("plain.toml");
        std::fs::write(&plain, "name = 1").unwrap();
        let read = |name: &str, limit| read_dropped(inbox.fd(), name, limit);
        assert_eq!(read("plain.toml", 100).unwrap(), b"name = 1");
        assert!(matches!(read("plain.toml", 4), Err(Refusal::TooLarge(4))));
        std::os::unix::fs::symlink(&plain, dir.path().join("link.toml")).unwrap();
        assert!(matches!(read("link.toml", 100), Err(Refusal::Link)));
        assert_eq!(
            read_submitted(&dir.path().join("link.toml"), 100).unwrap(),
            b"name = 1"
        );
        let fifo = dir.path().join("fifo.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // returns at once: no writer is waited for
        assert!(matches!(
            read("fifo.toml", 100),
            Err(Refusal::NotPlain("a FIFO"))
        ));
        std::fs::hard_link(&plain, dir.path().join("twin.toml")).unwrap();
        assert!(matches!(
            read("twin.toml", 100),
            Err(Refusal::OtherNames(2))
        ));
    }

    #[test]
    fn a_second_rejection_of_a_name_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        for text in ["one", "two"] {
            std::fs::write(dir.path().join("x.toml"), text).unwrap();
            reject(
                &inbox,
                inbox.fd(),
                "x.toml",
                "x.toml",
                &format!("report {text}"),
            )
            .unwrap();
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

    #[test]
    fn the_daemon_s_folders_are_never_reached_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("rejected")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join(".uet")).unwrap();
        let inbox = Inbox::open(dir.path()).unwrap();
        assert!(inbox.rejected().is_err());
        assert!(inbox.claimed().is_err());
        std::fs::write(dir.path().join("config.toml"), "x").unwrap();
        assert!(reject(&inbox, inbox.fd(), "config.toml", "config.toml", "r").is_err());
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
        assert!(
            dir.path().join("config.toml").exists(),
            "the file stays where it was"
        );
    }
}

//! Folders and files opened inside a folder without following a symbolic link on the way.
//!
//! A workstream's contents belong to whoever may drop files into it, not to the operator who
//! granted a tool `write = ["out"]`: if `out` is a link to `/root/.ssh`, following it would hand
//! a plugin the operator's keys. So a grant is opened one path component at a time, each with
//! `O_NOFOLLOW`, from a descriptor of the workstream; a missing folder is made with `mkdirat`
//! in the folder just opened, never by a path that a link could redirect. Links below a granted
//! folder are the sandbox's business (wasmtime's capability filesystem never lets one out).

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why a folder could not be opened beneath its root.
#[derive(Debug)]
pub enum BeneathError {
    /// A component on the way is a symbolic link.
    Link(PathBuf),
    /// A component on the way is not a folder.
    NotFolder(PathBuf),
    /// It does not exist (and was not to be made).
    Missing(PathBuf),
    /// The relative path leaves its root (`..`, absolute) or is empty.
    Outside(String),
    /// Anything else the system said, at this path.
    Io(PathBuf, std::io::Error),
}

impl fmt::Display for BeneathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BeneathError::Link(p) => write!(
                f,
                "{} is a symbolic link, and grants never follow links",
                p.display()
            ),
            BeneathError::NotFolder(p) => write!(f, "{} is not a folder", p.display()),
            BeneathError::Missing(p) => write!(f, "{} does not exist", p.display()),
            BeneathError::Outside(rel) => {
                write!(f, "{rel:?} is not a folder inside the workstream")
            }
            BeneathError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl std::error::Error for BeneathError {}

/// Opens the folder `rel` inside `root`, following no link from `root` down, and making the
/// folders that are missing when `create`. `rel` is `/`-separated; `.` (or `./`) is `root`
/// itself; `..`, an absolute path and an empty one are refused.
pub fn open_folder(root: &Path, rel: &str, create: bool) -> Result<OwnedFd, BeneathError> {
    // the root itself is the operator's (a watched folder) or the submitter's own: opened as
    // given
    let root_fd = open_at(None, root.as_os_str().as_bytes(), true)
        .map_err(|e| BeneathError::Io(root.to_path_buf(), e))?;
    open_folder_at(&root_fd, root, rel, create)
}

/// [`open_folder`] from a folder already open, `root` naming it in messages.
pub fn open_folder_at(
    root_fd: &OwnedFd,
    root: &Path,
    rel: &str,
    create: bool,
) -> Result<OwnedFd, BeneathError> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
        return Err(BeneathError::Outside(rel.to_string()));
    }
    let mut here = root_fd
        .try_clone()
        .map_err(|e| BeneathError::Io(root.to_path_buf(), e))?;
    let mut walked = root.to_path_buf();
    for part in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        walked.push(part);
        let opened = match open_at(Some(&here), part.as_bytes(), false) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                make_at(&here, part).map_err(|e| BeneathError::Io(walked.clone(), e))?;
                open_at(Some(&here), part.as_bytes(), false)
            }
            other => other,
        };
        here = opened.map_err(|e| classify(&here, part, &walked, e))?;
    }
    Ok(here)
}

/// The path under which a descriptor's folder can be opened again by a library that takes
/// paths: `/proc/self/fd/N` names the very folder the descriptor holds, not a path that could
/// be swapped in between.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn open_at(dir: Option<&OwnedFd>, name: &[u8], follow: bool) -> std::io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is a valid C string; openat returns a new descriptor we then own
    let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn make_at(dir: &OwnedFd, name: &str) -> std::io::Result<()> {
    let c = CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: a valid descriptor and C string; mkdirat touches nothing else
    let made = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o777) };
    if made < 0 {
        let e = std::io::Error::last_os_error();
        // made by someone else meanwhile: the open that follows checks what it is
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Names why `name` in `dir` could not be opened as a folder.
fn classify(dir: &OwnedFd, name: &str, walked: &Path, e: std::io::Error) -> BeneathError {
    match e.raw_os_error() {
        Some(libc::ELOOP) => BeneathError::Link(walked.to_path_buf()),
        Some(libc::ENOENT) => BeneathError::Missing(walked.to_path_buf()),
        Some(libc::ENOTDIR) => {
            // O_NOFOLLOW|O_DIRECTORY on a link to a file says ENOTDIR, not ELOOP
            if is_link_at(dir, name) {
                BeneathError::Link(walked.to_path_buf())
            } else {
                BeneathError::NotFolder(walked.to_path_buf())
            }
        }
        _ => BeneathError::Io(walked.to_path_buf(), e),
    }
}

fn is_link_at(dir: &OwnedFd, name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: stat is plain data, filled in by fstatat
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, C string and stat buffer
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn opens_and_makes_folders_beneath() {
        let dir = tempfile::tempdir().unwrap();
        open_folder(dir.path(), "out/deep", true).unwrap();
        assert!(dir.path().join("out/deep").is_dir());
        open_folder(dir.path(), ".", false).unwrap();
        open_folder(dir.path(), "./out", false).unwrap();
        assert!(matches!(
            open_folder(dir.path(), "nope", false),
            Err(BeneathError::Missing(_))
        ));
    }

    #[test]
    fn refuses_links_and_paths_that_leave() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        symlink(elsewhere.path(), dir.path().join("out")).unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        symlink(elsewhere.path(), dir.path().join("real/link")).unwrap();
        std::fs::write(elsewhere.path().join("file"), "x").unwrap();
        symlink(elsewhere.path().join("file"), dir.path().join("filelink")).unwrap();
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        for (rel, create) in [("out", true), ("out/sub", true), ("real/link/x", true)] {
            assert!(
                matches!(
                    open_folder(dir.path(), rel, create),
                    Err(BeneathError::Link(_))
                ),
                "{rel}"
            );
        }
        assert!(matches!(
            open_folder(dir.path(), "filelink", false),
            Err(BeneathError::Link(_))
        ));
        assert!(matches!(
            open_folder(dir.path(), "plain", false),
            Err(BeneathError::NotFolder(_))
        ));
        // nothing was made through the links
        assert!(!elsewhere.path().join("sub").exists());
        assert!(!elsewhere.path().join("x").exists());
        for rel in ["", "..", "a/../..", "/etc"] {
            assert!(
                matches!(
                    open_folder(dir.path(), rel, true),
                    Err(BeneathError::Outside(_))
                ),
                "{rel:?}"
            );
        }
    }
}

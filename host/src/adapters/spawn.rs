//! Starting a command step's process with `posix_spawnp`, and waiting for it on a pidfd.
//!
//! `std::process::Command` (and tokio's, built on it) copies the whole environment into a map
//! and rebuilds every `KEY=VALUE` string for each spawn that sets a variable, and every attempt
//! sets four (`UET_RUN_ID` and the rest): some 30 µs a spawn here, a twentieth of a `true` step.
//! This keeps the inherited environment as C strings, built once, and adds the attempt's own.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::OnceLock;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// A started process: its id, the parent's ends of its stdin, stdout and stderr, and a waiter
/// that kills and reaps it if dropped before it was waited for.
pub struct Child {
    pub pid: i32,
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
    pub waiter: Waiter,
}

/// Waits for one child; kills and reaps it when dropped unwaited, so a dropped attempt leaves
/// no zombie behind.
pub struct Waiter {
    pid: i32,
    reaped: bool,
}

/// A process just started, its pipes not yet handed to the runtime ([`Started::into_child`]).
pub struct Started {
    pid: i32,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    waiter: Waiter,
}

impl Started {
    /// Registers the pipes with the runtime: on a runtime thread.
    pub fn into_child(self) -> io::Result<Child> {
        Ok(Child {
            pid: self.pid,
            stdin: pipe::Sender::from_owned_fd_unchecked(nonblocking(self.stdin)?)?,
            stdout: pipe::Receiver::from_owned_fd_unchecked(nonblocking(self.stdout)?)?,
            stderr: pipe::Receiver::from_owned_fd_unchecked(nonblocking(self.stderr)?)?,
            waiter: self.waiter,
        })
    }
}

/// [`start`], then [`Started::into_child`].
pub fn spawn(argv: &[String], cwd: &Path, env: &[(String, String)]) -> io::Result<Child> {
    start(argv, cwd, env)?.into_child()
}

/// Starts `argv` in `cwd`, in a new process group of its own, with the inherited environment
/// plus `env`, its stdio on pipes. The program is looked up on `PATH` like a shell would.
///
/// The calling thread stands still until the child has exec'd (posix_spawn is a vfork): some
/// 100 µs here, the child resetting every signal's handler first. The engine calls it on a
/// blocking thread, so the scheduler goes on meanwhile.
pub fn start(argv: &[String], cwd: &Path, env: &[(String, String)]) -> io::Result<Started> {
    let args = argv
        .iter()
        .map(|a| c_string(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let Some(program) = args.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let own = env
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let cwd = c_string(cwd.as_os_str().as_bytes())?;
    let mut envp: Vec<*const libc::c_char> = inherited()
        .iter()
        .filter(|(key, _)| !env.iter().any(|(k, _)| k.as_bytes() == key.as_bytes()))
        .map(|(_, entry)| entry.as_ptr())
        .chain(own.iter().map(|e| e.as_ptr()))
        .collect();
    envp.push(std::ptr::null());
    let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());

    // (child's end, parent's end) of each: the child reads stdin and writes the others
    let (stdin_child, stdin_parent) = pipe_pair()?;
    let (stdout_parent, stdout_child) = pipe_pair()?;
    let (stderr_parent, stderr_child) = pipe_pair()?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer handed over lives until posix_spawnp returns (argp and envp point
    // into `args`, `own` and the inherited strings; the terminating nulls are there); the
    // attribute and file-action objects are initialized before use and destroyed after.
    let spawned = unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        check(libc::posix_spawnattr_init(&mut attr))?;
        let result = (|| {
            for (fd, to) in [(&stdin_child, 0), (&stdout_child, 1), (&stderr_child, 2)] {
                // the originals are close-on-exec; the copies at 0, 1, 2 are not
                check(libc::posix_spawn_file_actions_adddup2(
                    &mut actions,
                    fd.as_raw_fd(),
                    to,
                ))?;
            }
            check(libc::posix_spawn_file_actions_addchdir_np(
                &mut actions,
                cwd.as_ptr(),
            ))?;
            // a group of its own, so a timeout or cancel can kill everything it started
            check(libc::posix_spawnattr_setpgroup(&mut attr, 0))?;
            // no signal blocked, and SIGPIPE back to its default (Rust ignores it in uet)
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &none))?;
            let mut pipe_signal: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe_signal);
            libc::sigaddset(&mut pipe_signal, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &pipe_signal))?;
            let flags = libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(&mut attr, flags as _))?;
            check(libc::posix_spawnp(
                &mut pid,
                program.as_ptr(),
                &actions,
                &attr,
                argp.as_ptr() as *const *mut libc::c_char,
                envp.as_ptr() as *const *mut libc::c_char,
            ))
        })();
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        result
    };
    spawned?;
    let waiter = Waiter { pid, reaped: false };
    // the child's ends close here: the parent keeps only its own
    drop((stdin_child, stdout_child, stderr_child));
    Ok(Started {
        pid,
        stdin: stdin_parent,
        stdout: stdout_parent,
        stderr: stderr_parent,
        waiter,
    })
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Code(i32),
    /// This signal ended it.
    Signal(i32),
}

impl Waiter {
    /// Waits for the process to end, without reaping it: until [`Waiter::reap`], the exited
    /// leader keeps its id, and so its process group's, from being reused, and the group can
    /// still be killed safely.
    pub async fn wait(&mut self) -> io::Result<Ended> {
        if self.reaped {
            return Err(io::Error::other("already reaped"));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        let pidfd = match fd {
            // SAFETY: a descriptor pidfd_open just returned, owned by nothing else; the OwnedFd
            // inside the AsyncFd keeps it open as long as the registration lives
            fd if fd >= 0 => Some(unsafe {
                AsyncFd::register(OwnedFd::from_raw_fd(fd as RawFd)).map_err(io::Error::from)?
            }),
            // no pidfd (a kernel before 5.3, a seccomp filter, no descriptors left): polled,
            // backing off so that long steps cost few wake-ups
            _ => None,
        };
        let mut poll = std::time::Duration::from_millis(1);
        loop {
            if let Some(ended) = self.ended()? {
                return Ok(ended);
            }
            match &pidfd {
                Some(fd) => fd.readable().await?.clear_ready(),
                None => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    /// How the process ended, if it has, leaving it unreaped.
    fn ended(&mut self) -> io::Result<Option<Ended>> {
        // SAFETY: waitid on our own child, writing into `info`; WNOWAIT leaves it a zombie
        let info = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            if libc::waitid(libc::P_PID, self.pid as libc::id_t, &mut info, flags) == -1 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ECHILD) {
                    // not ours to wait for (any more): its id may be another process's now,
                    // so nothing may signal it
                    self.reaped = true;
                }
                return Err(e);
            }
            info
        };
        // SAFETY: waitid filled a SIGCHLD siginfo (or left it zeroed: no child has ended)
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        Ok((pid != 0).then_some(if code == libc::CLD_EXITED {
            Ended::Code(status)
        } else {
            Ended::Signal(status)
        }))
    }

    /// Reaps the process once [`Waiter::wait`] has seen it end.
    pub fn reap(&mut self) {
        if self.reaped {
            return;
        }
        let mut status = 0;
        // SAFETY: waitpid on our own ended child
        unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        self.reaped = true;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: kill and waitpid on our own, not yet reaped, child: its id and its group's
        // are still ours
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::kill(self.pid, libc::SIGKILL);
        }
        let mut status = 0;
        // SAFETY: as above
        if unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } == 0 {
            // it dies in a moment: reaped off this thread, which must not block
            let pid = self.pid;
            std::thread::spawn(move || {
                let mut status = 0;
                // SAFETY: as above
                unsafe { libc::waitpid(pid, &mut status, 0) };
            });
        }
    }
}

/// The environment uet was started with, as (key, `KEY=VALUE`) pairs, built once: uet does
/// not change its own environment.
fn inherited() -> &'static [(OsString, CString)] {
    static ENV: OnceLock<Vec<(OsString, CString)>> = OnceLock::new();
    ENV.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut entry = k.clone().into_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                Some((k, CString::new(entry).ok()?))
            })
            .collect()
    })
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        let shown = OsStr::from_bytes(bytes).to_string_lossy().into_owned();
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{shown:?} holds a NUL byte"),
        )
    })
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`
    check_errno(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both were just created and are owned by nothing else
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we own
    unsafe {
        let flags = check_errno(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        check_errno(libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        ))?;
    }
    Ok(fd)
}

/// posix_spawn's functions return an error number rather than setting errno.
fn check(code: libc::c_int) -> io::Result<()> {
    match code {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

fn check_errno(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

//! Promises kept under attack: the drop folder, the control socket and the state against
//! hostile input, each case a regression test of a break found by a hostile review.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, daemon_command, tools};
use crate::util::Env;

/// A connection that is only begun: the socket connected without blocking (`None` when the
/// daemon's queue is full), nothing sent.
fn connect_quietly(path: &Path) -> Option<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor we own; the address is built in full
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        assert!(fd >= 0);
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let r = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
        (r == 0).then_some(owned)
    }
}

/// Runs a command that must end by itself: killed and failed after `limit`.
fn exits_within(mut cmd: std::process::Command, limit: Duration) -> std::process::Output {
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// CPU time a process has used, user and system.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn a_socket_path_that_is_somebody_s_file_is_left_alone() {
    let env = Env::new();
    tools(&env);
    let dir = env.ws.parent().unwrap().join("sock");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let file = dir.join("notes.txt");
    std::fs::write(&file, "precious").unwrap();
    let out = exits_within(daemon_command(&env, &file), Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

/// Out of file descriptors, a daemon used to retry its accept at once, for ever: 100% CPU and
/// a line of log per try.
#[test]
fn held_connections_neither_spin_the_daemon_nor_flood_its_log() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    tools(&env);
    let socket = env.ws.parent().unwrap().join("sock/uet.sock");
    let log = env.ws.parent().unwrap().join("daemon.log");
    let mut cmd = daemon_command(&env, &socket);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; it only lowers this child's own limit
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = Daemon {
        child: cmd.spawn().unwrap(),
        socket: socket.clone(),
    };
    let waited = Instant::now();
    while daemon.client(&env, &["status"]).code() != 0 {
        assert!(waited.elapsed() < Duration::from_secs(20), "never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let held: Vec<OwnedFd> = (0..500).filter_map(|_| connect_quietly(&socket)).collect();
    assert!(held.len() > 256, "only {} connections", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(daemon.child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(daemon.child.id()) - before;
    assert!(
        used < Duration::from_millis(1500),
        "the daemon used {used:?} of CPU in 3 s"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let complaints = text.lines().filter(|l| l.contains("cannot accept")).count();
    assert!(
        (1..=10).contains(&complaints),
        "{complaints} lines about accepting:\n{}",
        &text[..text.len().min(2000)]
    );
    // the held connections are dropped (they never sent a request) and the daemon serves
    drop(held);
    let waited = Instant::now();
    while daemon.client(&env, &["status"]).code() != 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "stopped answering"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.client(&env, &["shutdown"]).expect(0);
    assert!(daemon.child.wait().unwrap().success());
}

/// A client that connects and says nothing, or half a request, is dropped, so it cannot hold
/// one of the daemon's connections for ever.
#[test]
fn a_stalled_client_is_dropped() {
    use std::io::{Read, Write};
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let mut silent = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let mut half = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    half.write_all(&100u32.to_be_bytes()).unwrap();
    half.write_all(b"{\"type\":").unwrap();
    let started = Instant::now();
    for s in [&mut silent, &mut half] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        // the daemon closes it: end of stream
        assert_eq!(s.read(&mut buf).unwrap(), 0);
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(daemon.client(&env, &["status"]).code(), 0);
}

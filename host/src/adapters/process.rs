//! The command adapter: one attempt of a step as a subprocess.
//!
//! The child runs in its own process group so that a timeout or a cancel can kill everything it
//! started, and its output is read as it comes, keeping only a bounded part, so neither a full
//! pipe nor a flood of output can stall or exhaust the host.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// stderr is kept for people reading a failure; its end is where the error usually is, so the
/// last 64 KiB are kept.
pub const STDERR_LIMIT: usize = 64 << 10;

/// After the process exits, how long to keep reading pipes that something outside its process
/// group (a `setsid` daemon) may still hold open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// The program and its arguments, already filled in.
    pub argv: Vec<String>,
    /// The folder it runs in (the workstream).
    pub cwd: PathBuf,
    /// Written to its stdin, then closed (the step input as JSON).
    pub stdin: Vec<u8>,
    /// Added to the inherited environment.
    pub env: Vec<(String, String)>,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
    /// How much of stdout is kept (the tool's `limits.output`); the rest is counted.
    pub stdout_limit: usize,
    /// Where the process group is noted while it runs (see [`Groups`]).
    pub groups: Option<Arc<Groups>>,
    /// Start it on a blocking thread: the thread that starts a process stands still until the
    /// child has exec'd, and the caller's has other attempts to see to meanwhile. A lone
    /// attempt (a chain's) starts on its own thread, sparing the handoff.
    pub start_aside: bool,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It ran past its timeout and its process group was killed.
    TimedOut,
    /// It was canceled and its process group was killed.
    Canceled,
    /// It could not be started.
    SpawnFailed(String),
}

/// How it ended, in words: what a step's error and a notifier's event say.
impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exited with code {code}"),
            Exit::Signal(signal) => write!(f, "killed by signal {signal}"),
            Exit::TimedOut => f.write_str("timed out"),
            Exit::Canceled => f.write_str("canceled"),
            Exit::SpawnFailed(why) => f.write_str(why),
        }
    }
}

/// One captured stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// What was kept, as text (invalid UTF-8 replaced).
    pub text: String,
    /// True when more was written than was kept.
    pub truncated: bool,
    /// Everything the stream carried, in bytes.
    pub total_bytes: u64,
}

/// The end of one command attempt.
#[derive(Debug, Clone)]
pub struct CommandResult {
    /// How it ended.
    pub exit: Exit,
    /// Its stdout: the first [`CommandSpec::stdout_limit`] bytes.
    pub stdout: Captured,
    /// Its stderr: the last [`STDERR_LIMIT`] bytes.
    pub stderr: Captured,
    /// How long it ran.
    pub duration: Duration,
}

impl CommandResult {
    /// How it ended, with the last line it wrote to stderr, if any: where a failing program
    /// usually says why.
    pub fn ending(&self) -> String {
        let last = self
            .stderr
            .text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty());
        match last {
            Some(line) => format!("{}: {line}", self.exit),
            None => self.exit.to_string(),
        }
    }
}

/// Runs a command to its end, its timeout or a cancel.
pub async fn run_command(mut spec: CommandSpec, cancel: CancellationToken) -> CommandResult {
    let started = Instant::now();
    let failed = |msg: String| CommandResult {
        exit: Exit::SpawnFailed(msg),
        stdout: Captured::default(),
        stderr: Captured::default(),
        duration: started.elapsed(),
    };
    // the token the ledger notes the group with, in the step's environment too: what a later
    // uet checks before it kills a noted group, so a note cannot name somebody else's
    let token = spec.groups.is_some().then(|| {
        let token = rand::random::<u32>() | 1;
        spec.env.push((GROUP_TOKEN.into(), format!("{token:08x}")));
        token
    });
    let Some(program) = spec.argv.first() else {
        return failed("empty command".into());
    };
    let child = if spec.start_aside {
        let (argv, cwd, env) = (spec.argv.clone(), spec.cwd.clone(), spec.env.clone());
        let starting =
            tokio::task::spawn_blocking(move || crate::adapters::spawn::start(&argv, &cwd, &env));
        match starting.await {
            Ok(Ok(started)) => started.into_child(),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e)),
        }
    } else {
        crate::adapters::spawn::spawn(&spec.argv, &spec.cwd, &spec.env)
    };
    let child = match child {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot start `{program}`: {e}")),
    };
    let crate::adapters::spawn::Child {
        pid: pgid,
        stdin: mut child_stdin,
        stdout,
        stderr,
        mut waiter,
    } = child;
    let noted = spec
        .groups
        .as_ref()
        .zip(token)
        .and_then(|(groups, token)| groups.note(pgid, token).map(|slot| (groups, slot)));

    let input = spec.stdin;
    let feed = async move {
        // a child that exits or closes stdin early is not an error of ours; the pipe closes
        // when this ends
        let _ = child_stdin.write_all(&input).await;
    };
    let stdout = tokio::spawn(capture(stdout, spec.stdout_limit, Keep::Head));
    let stderr = tokio::spawn(capture(stderr, STDERR_LIMIT, Keep::Tail));

    let deadline = async {
        match spec.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    // fed from its own task: a grandchild that inherited stdin and never reads it must not
    // keep us waiting once the child itself has exited
    let feeder = tokio::spawn(feed);
    let exit = tokio::select! {
        status = waiter.wait() => match status {
            Ok(crate::adapters::spawn::Ended::Code(code)) => Exit::Code(code),
            Ok(crate::adapters::spawn::Ended::Signal(signal)) => Exit::Signal(signal),
            Err(e) => Exit::SpawnFailed(format!("cannot wait for `{program}`: {e}")),
        },
        _ = deadline => Exit::TimedOut,
        _ = cancel.cancelled() => Exit::Canceled,
    };
    feeder.abort();
    // the leader is done (or must be): nothing it started may outlive the attempt. It is not
    // reaped yet, so the group's id cannot have been reused
    kill_group(pgid);
    if let Some((groups, slot)) = noted {
        groups.clear(slot);
    }
    if matches!(exit, Exit::TimedOut | Exit::Canceled) {
        // killed with its group just now: waited for here rather than by the waiter's drop
        let _ = waiter.wait().await;
    }
    waiter.reap();
    let stdout = drain(stdout).await;
    let stderr = drain(stderr).await;
    CommandResult {
        exit,
        stdout,
        stderr,
        duration: started.elapsed(),
    }
}

/// The process groups of running command steps, noted in one file beside the state while they
/// run, so that a uet that opens the state after an unclean stop (a `kill -9`, a crash) can
/// kill what is left of them: steps must not run on unseen beside their own retries.
///
/// A note is a 16-byte slot (group id, then the boot-clock time it was noted), written in place
/// and zeroed when the attempt ends, after a first slot that names the boot: two small writes to the page cache per attempt, where a
/// file created and removed per attempt, with the leader's start time read from `/proc`, cost
/// about 100 µs. Notes are not synced: they matter when uet dies and the machine does not, and
/// a power loss ends the steps too.
#[derive(Debug)]
pub struct Groups {
    file: std::fs::File,
    /// Slots free for reuse, and the first never used.
    slots: std::sync::Mutex<(Vec<u64>, u64)>,
}

const SLOT: usize = 16;

impl Groups {
    /// Opens the ledger at `path`, first killing the groups an earlier uet left noted there;
    /// returns it and how many groups were killed.
    pub fn open(path: &Path) -> std::io::Result<(Groups, usize)> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // an older uet made it with the umask
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let mut killed = 0;
        let mut notes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut notes)?;
        let boot = boot_id();
        // the first slot names the boot the notes are of: after a reboot the ids and the boot
        // clock start over, and every group noted then is gone anyway
        let this_boot = notes.get(..SLOT).is_some_and(|header| header == boot);
        let notes = if this_boot { &notes[SLOT..] } else { &[][..] };
        for slot in notes.chunks_exact(SLOT) {
            let pgid = i32::from_le_bytes(slot[..4].try_into().expect("4 bytes"));
            let token = u32::from_le_bytes(slot[4..8].try_into().expect("4 bytes"));
            let noted = u64::from_le_bytes(slot[8..].try_into().expect("8 bytes"));
            if pgid > 1 && ours(pgid, token, noted) {
                kill_group(pgid);
                killed += 1;
            }
        }
        file.set_len(0)?;
        file.write_all_at(&boot, 0)?;
        let groups = Groups {
            file,
            slots: std::sync::Mutex::new((Vec::new(), 0)),
        };
        Ok((groups, killed))
    }

    /// Notes a running group, started with `token` in its environment; the slot it took, to
    /// clear when the group is gone.
    fn note(&self, pgid: i32, token: u32) -> Option<u64> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.0.pop() {
                Some(free) => free,
                None => {
                    slots.1 += 1;
                    slots.1 - 1
                }
            }
        };
        let mut note = [0u8; SLOT];
        note[..4].copy_from_slice(&pgid.to_le_bytes());
        note[4..8].copy_from_slice(&token.to_le_bytes());
        note[8..].copy_from_slice(&boot_clock().to_le_bytes());
        match self.file.write_all_at(&note, (slot + 1) * SLOT as u64) {
            Ok(()) => Some(slot),
            Err(e) => {
                tracing::warn!("cannot note process group {pgid}: {e}");
                self.free(slot);
                None
            }
        }
    }

    /// Clears a slot: its group is gone.
    fn clear(&self, slot: u64) {
        let _ = self
            .file
            .write_all_at(&[0u8; SLOT], (slot + 1) * SLOT as u64);
        self.free(slot);
    }

    fn free(&self, slot: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.0.push(slot);
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, its 32 hex digits as 16 bytes); zeros
/// where there is none, when a ledger is taken as this boot's.
fn boot_id() -> [u8; SLOT] {
    let mut id = [0u8; SLOT];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let digits: Vec<u8> = text
            .bytes()
            .filter_map(|b| (b as char).to_digit(16).map(|d| d as u8))
            .collect();
        for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = pair[0] << 4 | pair[1];
        }
    }
    id
}

/// Nanoseconds since boot, on the clock `/proc/PID/stat` gives start times on.
fn boot_clock() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_BOOTTIME exists on every
    // kernel uet runs on
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// When a process started, in nanoseconds since boot (field 22 of `/proc/PID/stat`, in clock
/// ticks): rounded down, so never after the true start.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) may hold spaces and parentheses: count from its end
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&hz| hz > 0)?;
    Some(ticks * (1_000_000_000 / per_second))
}

/// How long after a step's leader started its group may be noted: the note is written as soon
/// as the spawn returns, so even a loaded machine takes far less. A process that started longer
/// before its note is not the one noted, whatever the ledger says.
const NOTE_WITHIN: u64 = 5_000_000_000;

/// The variable a step's environment carries its ledger token in.
const GROUP_TOKEN: &str = "UET_GROUP_TOKEN";

/// Whether the group a note names is one a uet started: its leader started at most
/// [`NOTE_WITHIN`] before the note (a leader that started after it reused the id; the kernel
/// does not reuse an id while its group has members, so the old group is empty), and carries
/// the note's token in its environment, which only uet put there and only the process's own
/// user (or root) can read. A group whose leader has exited may still have members: they are
/// killed too when one carries the token and none started before the leader could have. A note
/// forged, stale or of an older uet (no token) names no group that is killed.
fn ours(pgid: i32, token: u32, noted: u64) -> bool {
    let earliest = noted.saturating_sub(NOTE_WITHIN);
    if token == 0 {
        return false;
    }
    if let Some(started) = start_time(pgid) {
        // a leader that set its own environment (`env -i`, a setuid program) leaves the token
        // to the processes it started
        return (earliest..=noted).contains(&started)
            && (carries(pgid, token)
                || group_members(pgid)
                    .iter()
                    .any(|&(pid, _)| carries(pid, token)));
    }
    let members = group_members(pgid);
    members.iter().all(|&(_, started)| started >= earliest)
        && members.iter().any(|&(pid, _)| carries(pid, token))
}

/// Whether a process's environment holds the ledger token `token`.
fn carries(pid: i32, token: u32) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("{GROUP_TOKEN}={token:08x}");
    environ
        .split(|&b| b == 0)
        .any(|var| var == wanted.as_bytes())
}

/// The processes of a group, with their start times, from `/proc`.
fn group_members(pgid: i32) -> Vec<(i32, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        // after the name: state, ppid, pgrp
        if rest
            .split_whitespace()
            .nth(2)
            .and_then(|g| g.parse::<i32>().ok())
            == Some(pgid)
            && let Some(started) = start_time(pid)
        {
            members.push((pid, started));
        }
    }
    members
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

async fn drain(task: tokio::task::JoinHandle<Captured>) -> Captured {
    let abort = task.abort_handle();
    match tokio::time::timeout(DRAIN_AFTER_EXIT, task).await {
        Ok(Ok(captured)) => captured,
        _ => {
            abort.abort();
            Captured {
                text: String::new(),
                truncated: true,
                total_bytes: 0,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Head,
    Tail,
}

/// Reads a stream to its end, keeping at most `limit` bytes of its head or tail.
async fn capture(mut stream: impl AsyncRead + Unpin, limit: usize, keep: Keep) -> Captured {
    // read straight into what is kept, without zeroing a buffer first: most steps print
    // little, and a zeroed 64 KiB buffer per stream was a seventh of a command step's cost
    let mut kept: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let mut spill = [0u8; 4096];
    loop {
        let full = keep == Keep::Head && kept.len() >= limit;
        let read = if full {
            // the head is kept whole: the rest is only counted
            stream.read(&mut spill).await
        } else {
            if kept.capacity() - kept.len() < 1024 {
                kept.reserve(kept.len().clamp(4096, 64 << 10));
            }
            stream.read_buf(&mut kept).await
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        match keep {
            Keep::Head => kept.truncate(limit),
            // trimmed once it holds twice the limit, so a chatty step is not copied per read
            Keep::Tail if kept.len() > 2 * limit => {
                kept.drain(..kept.len() - limit);
            }
            Keep::Tail => {}
        }
    }
    if kept.len() > limit {
        kept.drain(..kept.len() - limit);
    }
    Captured {
        text: String::from_utf8_lossy(&kept).into_owned(),
        truncated: total > kept.len() as u64,
        total_bytes: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    fn spec(script: &str) -> CommandSpec {
        CommandSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            stdin: Vec::new(),
            env: vec![("UET_TEST".into(), "yes".into())],
            timeout: None,
            stdout_limit: 1 << 20,
            groups: None,
            start_aside: false,
        }
    }

    /// Whether a process is gone (or a zombie) within a moment: SIGKILL is delivered
    /// asynchronously, so a check right after sending it may still see the process.
    fn gone(pid: i32) -> bool {
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| {
                    !s.lines()
                        .any(|l| l.starts_with("State:") && l.contains('Z'))
                })
                .unwrap_or(false)
        };
        let since = Instant::now();
        while alive() {
            if since.elapsed() > Duration::from_secs(2) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    #[tokio::test]
    async fn its_ending_says_how_with_the_last_line_of_stderr() {
        let said = run_command(
            spec("echo first >&2; echo '  why  ' >&2; echo >&2; exit 3"),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(said.ending(), "exited with code 3: why");
        let quiet = run_command(spec("kill -9 $$"), CancellationToken::new()).await;
        assert_eq!(quiet.ending(), "killed by signal 9");
    }

    #[tokio::test]
    async fn stdin_goes_in_and_stdout_comes_out() {
        // started on this thread, and on a blocking one (as beside other attempts) alike
        for aside in [false, true] {
            let mut s = spec("cat; echo \"$UET_TEST\" >&2; exit 4");
            s.stdin = br#"{"a": 1}"#.to_vec();
            s.start_aside = aside;
            let r = run_command(s, CancellationToken::new()).await;
            assert_eq!(r.exit, Exit::Code(4));
            assert_eq!(r.stdout.text, r#"{"a": 1}"#);
            assert_eq!(r.stderr.text, "yes\n");
            assert!(!r.stdout.truncated);
        }
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_aside_is_a_spawn_failure() {
        let mut s = spec("");
        s.argv = vec!["/nonexistent/uet-test-program".into()];
        s.start_aside = true;
        let r = run_command(s, CancellationToken::new()).await;
        match r.exit {
            Exit::SpawnFailed(e) => assert!(e.contains("cannot start"), "{e}"),
            other => panic!("expected a spawn failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_environment_is_inherited_with_the_attempt_s_own_on_top() {
        let cwd = tempfile::tempdir().unwrap();
        let mut s = spec("printf '%s|%s|%s|' \"$HOME\" \"$UET_TEST\" \"$PATH\"; pwd");
        s.cwd = cwd.path().to_path_buf();
        s.env.push(("HOME".into(), "/elsewhere".into()));
        let r = run_command(s, CancellationToken::new()).await;
        assert_eq!(r.exit, Exit::Code(0));
        let path = std::env::var("PATH").unwrap();
        let here = cwd.path().canonicalize().unwrap();
        assert_eq!(
            r.stdout.text,
            format!("/elsewhere|yes|{path}|{}\n", here.display())
        );
    }

    #[tokio::test]
    async fn a_closed_pipe_ends_a_writer_quietly_as_in_a_shell() {
        // uet ignores SIGPIPE; its steps get the default back, so `yes` ends by the signal
        // instead of complaining of a broken pipe
        let r = run_command(spec("yes | head -n 1"), CancellationToken::new()).await;
        assert_eq!(r.exit, Exit::Code(0));
        assert_eq!(r.stdout.text, "y\n");
        assert_eq!(r.stderr.text, "");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let mut s = spec(&format!(
            "echo $$ > {p}; sleep 30 & echo $! >> {p}; wait",
            p = pids.display()
        ));
        s.timeout = Some(Duration::from_millis(300));
        let r = run_command(s, CancellationToken::new()).await;
        assert_eq!(r.exit, Exit::TimedOut);
        assert!(r.duration < Duration::from_secs(5), "{:?}", r.duration);
        let pids: Vec<i32> = std::fs::read_to_string(&pids)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2);
        assert!(pids.iter().all(|&p| gone(p)), "{pids:?} still alive");
    }

    #[tokio::test]
    async fn a_cancel_stops_it_at_once() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            trigger.cancel();
        });
        let r = run_command(spec("sleep 30"), cancel).await;
        assert_eq!(r.exit, Exit::Canceled);
        assert!(r.duration < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_background_child_does_not_outlive_a_normal_exit() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let r = run_command(
            spec(&format!(
                "sleep 30 & echo $! > {}; echo done",
                pid.display()
            )),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.exit, Exit::Code(0));
        assert_eq!(r.stdout.text, "done\n");
        let pid: i32 = std::fs::read_to_string(&pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid));
    }

    #[tokio::test]
    async fn floods_of_output_are_bounded() {
        let r = run_command(
            spec("head -c 50000000 /dev/zero; head -c 300000 /dev/zero | tr '\\0' e >&2; printf END >&2"),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.exit, Exit::Code(0));
        assert_eq!(r.stdout.total_bytes, 50_000_000);
        assert_eq!(r.stdout.text.len(), 1 << 20);
        assert!(r.stdout.truncated);
        assert_eq!(r.stderr.text.len(), STDERR_LIMIT);
        assert!(
            r.stderr.text.ends_with("eeeEND"),
            "the tail of stderr is kept"
        );
    }

    #[tokio::test]
    async fn a_child_that_ignores_stdin_still_finishes() {
        let mut s = spec("echo ok");
        s.stdin = vec![b'x'; 8 << 20];
        let r = run_command(s, CancellationToken::new()).await;
        assert_eq!(r.exit, Exit::Code(0));
        assert_eq!(r.stdout.text, "ok\n");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_failure() {
        let mut s = spec("");
        s.argv = vec!["/no/such/tool".into()];
        let r = run_command(s, CancellationToken::new()).await;
        assert!(
            matches!(&r.exit, Exit::SpawnFailed(m) if m.contains("/no/such/tool")),
            "{:?}",
            r.exit
        );
        s = spec("");
        s.argv.clear();
        assert!(matches!(
            run_command(s, CancellationToken::new()).await.exit,
            Exit::SpawnFailed(_)
        ));
    }

    /// A group leader started as a step is: in a group of its own, with a ledger token.
    fn step_like(script: &str, token: u32) -> (std::process::Child, i32) {
        use std::os::unix::process::CommandExt;
        let mut leader = std::process::Command::new("sh")
            .args(["-c", script])
            .env(GROUP_TOKEN, format!("{token:08x}"))
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        (leader, line.trim().parse().unwrap())
    }

    /// A ledger of one note, under this boot's id.
    fn ledger(pgid: i32, token: u32, noted: u64) -> Vec<u8> {
        let mut l = boot_id().to_vec();
        l.extend_from_slice(&pgid.to_le_bytes());
        l.extend_from_slice(&token.to_le_bytes());
        l.extend_from_slice(&noted.to_le_bytes());
        l
    }

    #[test]
    fn reaping_kills_noted_groups_and_spares_reused_ids() {
        let dir = tempfile::tempdir().unwrap();
        let token = 0x5eed_0001;
        let (mut leader, grandchild) = step_like("sleep 30 & echo $!; wait", token);
        let pgid = leader.id() as i32;
        let path = dir.path().join("groups");
        let (groups, killed) = Groups::open(&path).unwrap();
        assert_eq!(killed, 0);
        groups.note(pgid, token).unwrap();
        // a note made before its leader started is of another process that reused the id:
        // left alone
        let (mut other, _) = step_like("echo 0; exec sleep 30", token);
        let other_pid = other.id() as i32;
        let mut stale = [0u8; SLOT];
        stale[..4].copy_from_slice(&other_pid.to_le_bytes());
        stale[4..8].copy_from_slice(&token.to_le_bytes());
        stale[8..].copy_from_slice(&1u64.to_le_bytes());
        groups.file.write_all_at(&stale, 5 * SLOT as u64).unwrap();
        // a group whose attempt ended is no longer noted
        let (mut ended, _) = step_like("echo 0; exec sleep 30", token);
        let ended_pid = ended.id() as i32;
        let slot = groups.note(ended_pid, token).unwrap();
        groups.clear(slot);
        drop(groups);

        // as a uet opening the state after a kill -9 of the one that noted them
        let (_, killed) = Groups::open(&path).unwrap();
        assert_eq!(killed, 1);
        let _ = leader.wait();
        assert!(gone(grandchild), "the whole group is killed");
        assert!(!gone(other_pid), "a reused id is spared");
        assert!(!gone(ended_pid), "a cleared note is not reaped");
        for (child, pid) in [(&mut other, other_pid), (&mut ended, ended_pid)] {
            kill_group(pid);
            let _ = child.wait();
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            boot_id(),
            "the ledger starts over, naming this boot"
        );
    }

    /// A ledger others could write (or an older uet's) must not have somebody else's processes
    /// killed: a note counts only with the right boot, time and token.
    #[test]
    fn only_a_note_with_the_boot_time_and_token_of_its_group_reaps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("groups");
        let token = 0x5eed_0002;
        let (mut sleeping, _) = step_like("echo 0; exec sleep 30", token);
        let pid = sleeping.id() as i32;
        let started = start_time(pid).unwrap();
        let noted = started + 1_000_000;
        let mut another_boot = ledger(pid, token, noted);
        another_boot[..SLOT].fill(0xee);
        for (forged, why) in [
            (another_boot, "another boot's note"),
            (
                ledger(pid, token, started + 10 * NOTE_WITHIN),
                "a note long after the start",
            ),
            (ledger(pid, token, u64::MAX), "a note at the end of time"),
            (
                ledger(pid, token ^ 0xff, noted),
                "a note with another token",
            ),
            (
                ledger(pid, 0, noted),
                "a note without a token (an older uet's)",
            ),
        ] {
            std::fs::write(&path, &forged).unwrap();
            let (_, killed) = Groups::open(&path).unwrap();
            assert_eq!(killed, 0, "{why}");
            assert!(!gone(pid), "{why} is not reaped");
        }
        std::fs::write(&path, ledger(pid, token, noted)).unwrap();
        let (_, killed) = Groups::open(&path).unwrap();
        assert_eq!(killed, 1);
        let _ = sleeping.wait();
        assert!(gone(pid));
    }

    #[test]
    fn a_group_whose_leader_is_gone_is_reaped_by_the_token_its_members_carry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("groups");
        let token = 0x5eed_0003;
        // a leader that leaves a member behind, as `sh -c "cmd &"` does
        let (mut leader, member) = step_like("sleep 30 & echo $!", token);
        let pgid = leader.id() as i32;
        leader.wait().unwrap();
        let member_started = start_time(member).unwrap();
        for (forged, why) in [
            (
                ledger(pgid, token, member_started + 10 * NOTE_WITHIN),
                "noted long after",
            ),
            (ledger(pgid, token ^ 0xff, member_started), "another token"),
        ] {
            std::fs::write(&path, forged).unwrap();
            assert_eq!(Groups::open(&path).unwrap().1, 0, "{why}");
            assert!(!gone(member), "{why}");
        }
        std::fs::write(&path, ledger(pgid, token, member_started)).unwrap();
        assert_eq!(Groups::open(&path).unwrap().1, 1);
        assert!(gone(member));
    }
}

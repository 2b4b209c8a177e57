//! The command adapter: one attempt of a step as a subprocess.
//!
//! The child runs in its own process group so that a timeout or a cancel can kill everything it
//! started, and its output is read as it comes, keeping only a bounded part, so neither a full
//! pipe nor a flood of output can stall or exhaust the host.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// stdout is the step's output and is kept in the state: 1 MiB is far more than any JSON result
/// a step should hand on, and small enough to hold many attempts in memory at once.
pub const STDOUT_LIMIT: usize = 1 << 20;

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
    /// A folder where the process group is noted while it runs (see [`reap_groups`]).
    pub ledger: Option<PathBuf>,
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
    /// Its stdout: the first [`STDOUT_LIMIT`] bytes.
    pub stdout: Captured,
    /// Its stderr: the last [`STDERR_LIMIT`] bytes.
    pub stderr: Captured,
    /// How long it ran.
    pub duration: Duration,
}

/// Runs a command to its end, its timeout or a cancel.
pub async fn run_command(spec: CommandSpec, cancel: CancellationToken) -> CommandResult {
    let started = Instant::now();
    let failed = |msg: String| CommandResult {
        exit: Exit::SpawnFailed(msg),
        stdout: Captured::default(),
        stderr: Captured::default(),
        duration: started.elapsed(),
    };
    let Some(program) = spec.argv.first() else {
        return failed("empty command".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot start `{program}`: {e}")),
    };
    let pgid = child.id().map(|id| id as i32);
    let noted = match (&spec.ledger, pgid) {
        (Some(dir), Some(pgid)) => note_group(dir, pgid),
        _ => None,
    };

    let stdin = child.stdin.take();
    let input = spec.stdin;
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // a child that exits or closes stdin early is not an error of ours
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let stdout = tokio::spawn(capture(child.stdout.take(), STDOUT_LIMIT, Keep::Head));
    let stderr = tokio::spawn(capture(child.stderr.take(), STDERR_LIMIT, Keep::Tail));

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
        status = child.wait() => match status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(code), _) => Exit::Code(code),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Code(-1),
                }
            }
            Err(e) => Exit::SpawnFailed(format!("cannot wait for `{program}`: {e}")),
        },
        _ = deadline => Exit::TimedOut,
        _ = cancel.cancelled() => Exit::Canceled,
    };
    feeder.abort();
    // the leader is done (or must be): nothing it started may outlive the attempt
    if let Some(pgid) = pgid {
        kill_group(pgid);
    }
    if let Some(note) = noted {
        let _ = std::fs::remove_file(note);
    }
    if matches!(exit, Exit::TimedOut | Exit::Canceled) {
        let _ = child.kill().await;
    }
    let stdout = drain(stdout).await;
    let stderr = drain(stderr).await;
    CommandResult {
        exit,
        stdout,
        stderr,
        duration: started.elapsed(),
    }
}

/// Notes a running process group in `dir` as a file named by its id holding the leader's
/// start time, so that a later [`reap_groups`] can tell it from a process that reused the id.
fn note_group(dir: &Path, pgid: i32) -> Option<PathBuf> {
    let path = dir.join(pgid.to_string());
    let started = start_time(pgid)?;
    std::fs::create_dir_all(dir).ok()?;
    std::fs::write(&path, started.to_string()).ok()?;
    Some(path)
}

/// The start time of a process, in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) may hold spaces and parentheses: count from its end
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process groups noted in `dir` by an earlier uet that stopped without ending them
/// (a `kill -9`, a crash): steps must not run on unseen beside their own retries. A group whose
/// leader's id now belongs to another process is left alone (the kernel does not reuse an id
/// while its group has members, so the old group is empty then). Returns how many were killed.
pub fn reap_groups(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let pgid = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok());
        let noted = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        if let (Some(pgid), Some(noted)) = (pgid, noted)
            && pgid > 1
            && start_time(pgid).is_none_or(|now| now == noted)
        {
            kill_group(pgid);
            killed += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
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
async fn capture(stream: Option<impl AsyncRead + Unpin>, limit: usize, keep: Keep) -> Captured {
    let Some(mut stream) = stream else {
        return Captured::default();
    };
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

    fn spec(script: &str) -> CommandSpec {
        CommandSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: std::env::temp_dir(),
            stdin: Vec::new(),
            env: vec![("UET_TEST".into(), "yes".into())],
            timeout: None,
            ledger: None,
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
    async fn stdin_goes_in_and_stdout_comes_out() {
        let mut s = spec("cat; echo \"$UET_TEST\" >&2; exit 4");
        s.stdin = br#"{"a": 1}"#.to_vec();
        let r = run_command(s, CancellationToken::new()).await;
        assert_eq!(r.exit, Exit::Code(4));
        assert_eq!(r.stdout.text, r#"{"a": 1}"#);
        assert_eq!(r.stderr.text, "yes\n");
        assert!(!r.stdout.truncated);
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
        assert_eq!(r.stdout.text.len(), STDOUT_LIMIT);
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

    #[test]
    fn reaping_kills_noted_groups_and_spares_reused_ids() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
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
        let grandchild: i32 = line.trim().parse().unwrap();
        let pgid = leader.id() as i32;
        note_group(dir.path(), pgid).unwrap();
        // a note whose start time does not match is a reused id: left alone
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let other_pid = other.id() as i32;
        std::fs::write(dir.path().join(other_pid.to_string()), "1").unwrap();

        assert_eq!(reap_groups(dir.path()), 1);
        let _ = leader.wait();
        assert!(gone(grandchild), "the whole group is killed");
        assert!(!gone(other_pid), "a reused id is spared");
        kill_group(other_pid);
        let _ = other.wait();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

//! The daemon: watched folders, the control socket and its client commands, against the real
//! binary, real file-system events and a real socket.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Env, gone, shared_cache};

/// A daemon watching the env's workstream, stopped (killed) when dropped.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
}

impl Daemon {
    pub(crate) fn start(env: &Env) -> Daemon {
        Daemon::start_with(env, &[])
    }

    /// A daemon with more arguments (`--config F`, ...).
    pub(crate) fn start_with(env: &Env, args: &[&str]) -> Daemon {
        Daemon::start_with_vars(env, args, &[])
    }

    /// [`Daemon::start_with`], with these environment variables set for the daemon.
    pub(crate) fn start_with_vars(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Daemon {
        let socket = env.ws.parent().unwrap().join("sock/uet.sock");
        // its log is read by no one (a full pipe would stall it), unless asked for to debug
        let log = if std::env::var_os("UET_TEST_DAEMON_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let child = daemon_command(env, &socket)
            .args(args)
            .envs(vars.iter().copied())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        let daemon = Daemon { child, socket };
        let waited = Instant::now();
        while daemon.client(env, &["status"]).code() != 0 {
            assert!(
                waited.elapsed() < Duration::from_secs(20),
                "the daemon never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    pub(crate) fn client(&self, env: &Env, args: &[&str]) -> crate::util::Run {
        let mut all: Vec<&str> = args.to_vec();
        let socket = self.socket.to_str().unwrap().to_string();
        all.extend(["--socket", &socket]);
        env.uet(&all)
    }

    /// `uet submit --wait FILE`, started: its stdout piped, its stderr dropped.
    pub(crate) fn submit_waiting(&self, env: &Env, file: &std::path::Path) -> Child {
        env.command(env!("CARGO_BIN_EXE_uet"))
            .arg("submit")
            .arg("--wait")
            .arg(file)
            .arg("--socket")
            .arg(&self.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `uet status --json`, parsed.
    pub(crate) fn status(&self, env: &Env) -> serde_json::Value {
        serde_json::from_str(&self.client(env, &["status", "--json"]).expect(0).stdout()).unwrap()
    }

    pub(crate) fn runs(&self, env: &Env) -> Vec<serde_json::Value> {
        let run = self.client(env, &["runs", "--json"]).expect(0);
        serde_json::from_str::<Vec<serde_json::Value>>(&run.stdout()).unwrap()
    }

    /// Polls `uet runs --json` until `n` runs have ended.
    pub(crate) fn wait_for_runs(&self, env: &Env, n: usize) -> Vec<serde_json::Value> {
        let waited = Instant::now();
        loop {
            let runs = self.runs(env);
            let ended = runs
                .iter()
                .filter(|r| !matches!(r["state"].as_str(), Some("pending" | "running")))
                .count();
            if ended >= n {
                return runs;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "only {ended} of {n} runs ended: {runs:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn daemon_command(env: &Env, socket: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uet"));
    cmd.args(["daemon", "--watch"])
        .arg(&env.ws)
        .arg("--state")
        .arg(&env.state)
        .arg("--socket")
        .arg(socket)
        .env("UET_CACHE_DIR", shared_cache())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

pub(crate) fn tools(env: &Env) {
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "echo"
command = ["cat"]

[[tools]]
name = "sleepy"
command = ["sh", "-c", "echo $$ > {pidfile}; sleep 30 & echo $! >> {pidfile}; touch {pidfile}.done; wait"]
"#,
    );
}

/// Drops a file the way a careful writer does: written beside, renamed in.
pub(crate) fn drop_file(env: &Env, name: &str, text: &str) {
    let tmp = env.ws.join(format!(".{name}.partial"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, env.ws.join(name)).unwrap();
}

pub(crate) const GOOD: &str =
    "name = \"hello\"\n[[steps]]\nid = \"say\"\ntool = \"echo\"\nwith = { hi = 1 }\n";

#[test]
fn a_dropped_file_becomes_a_run() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    drop_file(&env, "hello.toml", GOOD);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["name"], "hello");
    assert_eq!(runs[0]["state"], "succeeded");
    assert!(
        !env.ws.join("hello.toml").exists(),
        "a picked-up file leaves the folder"
    );
    let show = daemon.client(&env, &["show", "1", "--json"]).expect(0);
    let run: serde_json::Value = serde_json::from_str(&show.stdout()).unwrap();
    assert_eq!(run["steps"][0]["output"], serde_json::json!({"hi": 1}));
    assert!(
        daemon
            .client(&env, &["show", "1"])
            .expect(0)
            .stdout()
            .starts_with("run 1 `hello`: succeeded")
    );
    daemon.client(&env, &["show", "99"]).expect(2);
}

#[test]
fn files_waiting_at_start_are_picked_up_and_others_ignored() {
    let env = Env::new();
    tools(&env);
    env.write("early.toml", GOOD);
    env.write("notes.txt", "not a workflow");
    env.write("draft.toml~", GOOD);
    env.write(".hidden.toml", GOOD);
    let daemon = Daemon::start(&env);
    let runs = daemon.wait_for_runs(&env, 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.runs(&env).len(), 1, "{runs:?}");
    for kept in ["notes.txt", "draft.toml~", ".hidden.toml", "tools.toml"] {
        assert!(
            env.ws.join(kept).exists(),
            "{kept} is not a submission and stays"
        );
    }
}

#[test]
fn an_invalid_drop_is_rejected_with_its_report_and_the_daemon_keeps_serving() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    drop_file(
        &env,
        "bad.toml",
        "name = \"bad\"\ncolour = \"red\"\n[[steps]]\nid = \"a\"\ntool = \"ghost\"\n",
    );
    let report = env.ws.join("rejected/bad.toml.error.txt");
    let waited = Instant::now();
    while !report.exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "no rejection report"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(
        text.contains("bad.toml:2:1: workflow: unknown key `colour`"),
        "{text}"
    );
    assert!(
        text.contains("bad.toml:5:8: step `a`: unknown tool `ghost`"),
        "{text}"
    );
    assert!(
        env.ws.join("rejected/bad.toml").exists(),
        "the file itself is kept beside its report"
    );
    assert!(!env.ws.join("bad.toml").exists());
    drop_file(&env, "good.toml", GOOD);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["state"], "succeeded");
}

#[test]
fn a_slow_writers_partial_file_is_not_read_early() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    // written in place, in pieces, each piece sooner than the settle window: a read between
    // pieces would see broken TOML and reject it
    let path = env.ws.join("slow.toml");
    let mut file = std::fs::File::create(&path).unwrap();
    let (first, rest) = GOOD.split_at(20);
    file.write_all(first.as_bytes()).unwrap();
    for chunk in rest.as_bytes().chunks(12) {
        std::thread::sleep(Duration::from_millis(60));
        file.write_all(chunk).unwrap();
    }
    drop(file);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded");
    assert!(
        std::fs::read_dir(env.ws.join("rejected")).map_or(true, |mut d| d.next().is_none()),
        "a partial read would have been rejected"
    );
}

#[test]
fn two_hundred_files_dropped_at_once_become_two_hundred_runs() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    for i in 0..200 {
        drop_file(
            &env,
            &format!("burst-{i:03}.toml"),
            &GOOD.replace("hello", &format!("burst-{i:03}")),
        );
    }
    let runs = daemon.wait_for_runs(&env, 200);
    std::thread::sleep(Duration::from_millis(500));
    let runs_after = daemon.runs(&env);
    assert_eq!(runs_after.len(), 200, "exactly one run per file");
    let mut names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 200);
    assert!(runs.iter().all(|r| r["state"] == "succeeded"));
}

#[test]
fn cancel_stops_a_long_step_at_once() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    // submitted files live outside the watched folder, or the watcher would run them too
    let sub = env.ws.parent().unwrap().join("submitted");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(env.ws.join("tools.toml"), sub.join("tools.toml")).unwrap();
    std::fs::write(
        sub.join("long.toml"),
        "name = \"long\"\n[[steps]]\nid = \"nap\"\ntool = \"sleepy\"\nwith = { pidfile = \"pids\" }\n",
    )
    .unwrap();
    let long = sub.join("long.toml");
    let submitted = daemon
        .client(&env, &["submit", long.to_str().unwrap(), "--json"])
        .expect(0);
    let run: serde_json::Value = serde_json::from_str(&submitted.stdout()).unwrap();
    let id = run["run_id"].to_string();
    let waited = Instant::now();
    while !sub.join("pids.done").exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the step never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let canceled = Instant::now();
    daemon.client(&env, &["cancel", &id]).expect(0);
    let runs = daemon.wait_for_runs(&env, 1);
    assert!(canceled.elapsed() < Duration::from_secs(10));
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["state"], "canceled");
    let pids = std::fs::read_to_string(sub.join("pids")).unwrap();
    for pid in pids.lines().map(|l| l.trim().parse::<i32>().unwrap()) {
        assert!(gone(pid), "process {pid} outlived the cancel");
    }
    // an invalid submission is refused with its problems, exit 2
    let bad = sub.join("bad.toml");
    std::fs::write(&bad, "name = 3\n").unwrap();
    let refused = daemon
        .client(&env, &["submit", bad.to_str().unwrap()])
        .expect(2);
    assert!(
        refused.stderr().contains("bad.toml:1:8"),
        "{}",
        refused.describe()
    );
    // ending as `uet run` ends: how many, and that nothing ran
    assert!(
        refused
            .stderr()
            .ends_with("\nuet: 2 problems; nothing was run\n"),
        "{}",
        refused.describe()
    );
}

#[test]
fn the_socket_is_the_owners_and_one_daemon_owns_a_state() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(daemon.socket.parent().unwrap()), 0o700);

    // a second daemon on the same state refuses, saying why
    let other = env.ws.parent().unwrap().join("sock2/uet.sock");
    let out = daemon_command(&env, &other).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is using the state"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and so does one on the same socket
    let env2 = Env::new();
    let out = daemon_command(&env2, &daemon.socket).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already answers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        daemon.client(&env, &["status"]).code(),
        0,
        "the first daemon still serves"
    );

    // a socket in a folder others can enter is refused, and the folder is left as it was
    let env3 = Env::new();
    let open = env3.ws.parent().unwrap().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = daemon_command(&env3, &open.join("uet.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("mode 755") && err.contains("only you can enter"),
        "{err}"
    );
    assert!(!err.contains("  "), "one line, no runs of spaces: {err}");
    assert_eq!(mode(&open), 0o755);
    assert!(!open.join("uet.sock").exists());
}

#[test]
fn malformed_and_oversized_frames_get_an_error_and_hurt_nothing() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let reply = |bytes: &[u8]| {
        let mut s = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        s.write_all(bytes).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend(b"{nope");
    let r = reply(&garbage);
    assert_eq!(r["type"], "error");
    assert!(r["message"].as_str().unwrap().contains("malformed"), "{r}");
    let r = reply(&u32::MAX.to_be_bytes());
    assert!(
        r["message"].as_str().unwrap().contains("larger than"),
        "{r}"
    );
    let mut early = Vec::new();
    let status = serde_json::to_vec(&serde_json::json!({"type": "status"})).unwrap();
    early.extend((status.len() as u32).to_be_bytes());
    early.extend(&status);
    assert!(
        reply(&early)["message"]
            .as_str()
            .unwrap()
            .contains("hello first")
    );
    assert_eq!(daemon.client(&env, &["status"]).code(), 0);
}

#[test]
fn clients_without_a_daemon_exit_3_and_shutdown_removes_the_socket() {
    let env = Env::new();
    tools(&env);
    let socket = env.ws.parent().unwrap().join("none/uet.sock");
    for cmd in [
        &["status"][..],
        &["runs", "--json"],
        &["show", "1"],
        &["cancel", "1"],
        &["retry", "1"],
        &["release", "1"],
        &["events", "--follow"],
        &["shutdown"],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--socket", socket.to_str().unwrap()]);
        let run = env.uet(&args).expect(3);
        assert!(
            run.stderr().contains("no uet daemon answers"),
            "{}",
            run.describe()
        );
    }
    // `tools` has another way: the tools file of the folder it runs in
    let mut args = vec!["tools", "--json", "--socket"];
    args.push(socket.to_str().unwrap());
    let listed = env.uet(&args).expect(0);
    assert!(
        listed.stdout().contains("\"sleepy\""),
        "{}",
        listed.describe()
    );
    let mut daemon = Daemon::start(&env);
    daemon.client(&env, &["shutdown"]).expect(0);
    let status = daemon.child.wait().unwrap();
    assert!(status.success());
    assert!(
        !daemon.socket.exists(),
        "the socket file is removed on exit"
    );
}

#[test]
fn a_kill_9_mid_run_resumes_without_running_a_finished_step_again() {
    let env = Env::new();
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "note"
command = ["sh", "-c", "echo {name} >> ran.log; echo '{{}}'"]

[[tools]]
name = "stall"
# stalls on its first attempt only (until the daemon is killed), as a long step would
command = ["sh", "-c", "echo {name} >> ran.log; if [ ! -e stalled ]; then touch stalled; sleep 30; fi; echo '{{}}'"]
"#,
    );
    let mut daemon = Daemon::start(&env);
    drop_file(
        &env,
        "crash.toml",
        "name = \"crash\"\n[[steps]]\nid = \"a\"\ntool = \"note\"\nwith = { name = \"a\" }\n\
         [[steps]]\nid = \"b\"\ntool = \"stall\"\nneeds = [\"a\"]\nwith = { name = \"b\" }\n\
         [[steps]]\nid = \"c\"\ntool = \"note\"\nneeds = [\"b\"]\nwith = { name = \"c\" }\n",
    );
    let waited = Instant::now();
    while !env.ws.join("stalled").exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "step b never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.child.kill().unwrap(); // SIGKILL: no chance to record anything
    daemon.child.wait().unwrap();
    drop(daemon);

    let daemon = Daemon::start(&env);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let log = env.read("ran.log");
    let count = |s: &str| log.lines().filter(|l| *l == s).count();
    assert_eq!(
        count("a"),
        1,
        "a succeeded before the crash and must not run again: {log}"
    );
    assert_eq!(count("b"), 2, "b was in flight, so it runs again: {log}");
    assert_eq!(count("c"), 1, "{log}");
    let show: serde_json::Value = serde_json::from_str(
        &daemon
            .client(&env, &["show", "1", "--json"])
            .expect(0)
            .stdout(),
    )
    .unwrap();
    assert_eq!(show["steps"][1]["attempts"], 2);
    drop(daemon);
    let store = uet::state::Store::open(&env.state).unwrap();
    let attempts = store.attempts(1, "b").unwrap();
    assert_eq!(attempts[0].outcome, Some(uet::model::Outcome::Interrupted));
    assert_eq!(attempts[1].outcome, Some(uet::model::Outcome::Succeeded));
}

/// A run's time is one figure wherever it is shown: the wall clock's from its first start to
/// its end, counting the time the daemon was down between (ENGINE.md).
#[test]
fn a_resumed_runs_time_is_the_same_in_its_event_and_in_show() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"nap\"\ncommand = [\"sh\", \"-c\", \"touch {mark}; sleep 1\"]\n",
    );
    let daemon = Daemon::start(&env);
    drop_file(
        &env,
        "slow.toml",
        "name = \"slow\"\n[[steps]]\nid = \"a\"\ntool = \"nap\"\nwith = { mark = \"started\" }\n",
    );
    let start = Instant::now();
    while !env.ws.join("started").exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(daemon); // kill -9 mid-step
    std::thread::sleep(Duration::from_secs(2));
    let daemon = Daemon::start(&env);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let shown = daemon
        .client(&env, &["show", "1", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let in_show = shown["duration_ms"].as_u64().unwrap() as f64 / 1000.0;
    let events = daemon
        .client(&env, &["events", "1", "--json"])
        .expect(0)
        .stdout();
    let detail = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["kind"] == "run.succeeded")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_string();
    let in_event: f64 = detail
        .rsplit(" in ")
        .next()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|e| panic!("{detail:?}: {e}"));
    assert!(in_show >= 3.0, "the downtime counts: {in_show} s");
    // and the daemon answers `uet logs` as the state would: the attempt cut off, then the one
    // that ran to its end
    let logs = daemon
        .client(&env, &["logs", "1", "--json"])
        .expect(0)
        .stdout();
    let logs: serde_json::Value = serde_json::from_str(&logs).unwrap();
    let ended: Vec<&str> = logs
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(ended, ["interrupted", "succeeded"]);
    assert!(
        (in_event - in_show).abs() < 0.1,
        "event says {in_event} s, show says {in_show} s"
    );
}

/// A folder beside the watched one, for workflows submitted with these tools.
fn submitted(env: &Env, tools: &str) -> PathBuf {
    let sub = env.ws.parent().unwrap().join("submitted");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("tools.toml"), tools).unwrap();
    sub
}

/// `submit --wait` returns when its run ends, whatever the run's size. The run's last commit
/// comes a moment before the daemon lets go of it, and nothing is committed after: the wait
/// must be woken by the letting go itself. Without that, waits on runs of a few thousand
/// plugin steps hung about half the time.
#[test]
fn submit_wait_returns_when_a_big_run_ends() {
    let env = Env::new();
    let daemon = Daemon::start(&env);
    let sub = submitted(
        &env,
        &format!(
            "[[tools]]\nname = \"q\"\nwasm = \"{}\"\n",
            crate::util::plugin("jsonq").display()
        ),
    );
    let mut text = String::from("name = \"big\"\n");
    for i in 0..3000 {
        text.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"q\"\nwith = {{ value = {i}, query = \"\" }}\n"
        ));
    }
    let file = sub.join("big.toml");
    std::fs::write(&file, text).unwrap();
    for round in 1..=4 {
        let wait = daemon.submit_waiting(&env, &file);
        let what = format!("round {round}: `submit --wait`");
        let out = crate::util::output_within(wait, Duration::from_secs(30), &what);
        assert!(out.status.success(), "{what}: {}", out.status);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("run {round} succeeded\n")
        );
    }
}

/// A run the daemon drives alone sends its lone plugin attempts to a relay thread, as `uet run`
/// does; two runs driven at once keep to the blocking pool, where no thread spins for either.
#[test]
fn only_a_run_driven_alone_has_a_relay_thread() {
    if std::thread::available_parallelism().is_ok_and(|n| n.get() < 2) {
        return; // one CPU: no process relays (plugins.rs tests that)
    }
    let env = Env::new();
    let daemon = Daemon::start(&env);
    let sub = submitted(
        &env,
        &format!(
            "[[tools]]\nname = \"pause\"\ncommand = [\"sleep\", \"1\"]\n\
             [[tools]]\nname = \"nap\"\nwasm = \"{}\"\n",
            crate::util::plugin("hostile").display()
        ),
    );
    // a command step first, so that two runs submitted together are both driven before
    // either's plugin attempt begins
    let file = sub.join("nap.toml");
    std::fs::write(
        &file,
        "name = \"nap\"\n[[steps]]\nid = \"a\"\ntool = \"pause\"\n\
         [[steps]]\nid = \"b\"\ntool = \"nap\"\nneeds = [\"a\"]\n\
         with = { mode = \"sleep\", ms = 1000 }\n",
    )
    .unwrap();
    // the names of the daemon's threads while `runs` submissions wait for their runs
    let threads_while = |runs: usize| {
        let waits: Vec<Child> = (0..runs)
            .map(|_| daemon.submit_waiting(&env, &file))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for mut wait in waits {
            while wait.try_wait().unwrap().is_none() {
                crate::util::thread_names(daemon.child.id(), &mut seen);
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(wait.wait().unwrap().success());
        }
        seen
    };
    let alone = threads_while(1);
    assert!(alone.contains("uet-relay"), "{alone:?}");
    let together = threads_while(2);
    assert!(together.contains("uet-state-sync"), "{together:?}");
    assert!(!together.contains("uet-relay"), "{together:?}");
}

/// `top` and `tools` show a plugin as the plugin describes itself, capabilities included.
#[test]
fn top_and_tools_show_a_plugins_own_capabilities_alike() {
    let env = Env::new();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"q\"\nwasm = \"{}\"\n",
            crate::util::plugin("jsonq").display()
        ),
    );
    let daemon = Daemon::start(&env);
    let top = daemon.client(&env, &["top", "--json"]).expect(0).stdout();
    let top: serde_json::Value = serde_json::from_str(&top).unwrap();
    let tools = daemon.client(&env, &["tools", "--json"]).expect(0).stdout();
    let tools: serde_json::Value = serde_json::from_str(&tools).unwrap();
    assert_eq!(
        top["tools"][0]["capabilities"],
        serde_json::json!(["data.query"])
    );
    assert_eq!(top["tools"], tools);
}

/// A daemon says in one plain line where it is when it starts, and refuses a watched folder
/// that is not there unless told to make it.
#[test]
fn the_daemon_says_where_it_is_and_watches_only_folders_that_exist() {
    let env = Env::new();
    let socket = env.ws.parent().unwrap().join("sock/uet.sock");
    let missing = env.ws.join("typo");
    let out = daemon_command(&env, &socket)
        .arg("--watch")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot watch {}: no such folder (create it, or pass --create)",
            missing.display()
        )),
        "{err}"
    );
    assert!(!missing.exists());
    let mut child = daemon_command(&env, &socket)
        .arg("--watch")
        .arg(&missing)
        .arg("--create")
        .spawn()
        .unwrap();
    let start = Instant::now();
    while env
        .uet(&["status", "--socket", socket.to_str().unwrap()])
        .code()
        != 0
    {
        assert!(start.elapsed() < Duration::from_secs(20), "never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(missing.is_dir());
    // --wait returns once the daemon's process has ended, not merely its socket
    env.uet(&["shutdown", "--wait", "--socket", socket.to_str().unwrap()])
        .expect(0);
    assert!(
        child.try_wait().unwrap().is_some(),
        "shutdown --wait returned while the daemon still ran"
    );
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let started = format!(
        "started: watching {}, {}; socket {}; state {}",
        env.ws.display(),
        missing.display(),
        socket.display(),
        env.state.display()
    );
    assert!(log.contains(&started), "{log}");
    assert!(log.contains("uet daemon stopped"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log that is not a terminal: {log:?}"
    );
}

/// `submit --wait` and `events RUN --follow` end with the run, and exit with its code.
#[test]
fn submit_wait_and_follow_exit_with_the_runs_code() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"ok\"\ncommand = [\"true\"]\n\n[[tools]]\nname = \"no\"\ncommand = [\"false\"]\n",
    );
    let daemon = Daemon::start(&env);
    let sub = env.ws.parent().unwrap().join("submitted");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(env.ws.join("tools.toml"), sub.join("tools.toml")).unwrap();
    let good = sub.join("good.toml");
    std::fs::write(
        &good,
        "name = \"good\"\n[[steps]]\nid = \"a\"\ntool = \"ok\"\n",
    )
    .unwrap();
    let bad = sub.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n[[steps]]\nid = \"a\"\ntool = \"no\"\n",
    )
    .unwrap();
    let out = daemon
        .client(&env, &["submit", "--wait", good.to_str().unwrap()])
        .expect(0);
    assert_eq!(out.stdout(), "run 1 succeeded\n");
    let out = daemon
        .client(&env, &["submit", "--wait", "--json", bad.to_str().unwrap()])
        .expect(1);
    let json: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
    assert_eq!(json, serde_json::json!({"run_id": 2, "state": "failed"}));
    daemon.client(&env, &["events", "1", "--follow"]).expect(0);
    daemon.client(&env, &["events", "2", "--follow"]).expect(1);
    // without --follow it is a listing, whatever the run's end
    daemon.client(&env, &["events", "2"]).expect(0);
    // `last` names the newest run
    let shown = daemon
        .client(&env, &["show", "last", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["run_id"], 2);
    daemon
        .client(&env, &["events", "last", "--follow"])
        .expect(1);
    // --since keeps the events of a recent while, or from a time on
    let recent = daemon
        .client(&env, &["events", "1", "--since", "1h", "--json"])
        .expect(0)
        .stdout();
    assert!(recent.lines().count() >= 3, "{recent}");
    let later = daemon
        .client(
            &env,
            &["events", "--since", "2999-01-01T00:00:00Z", "--json"],
        )
        .expect(0)
        .stdout();
    assert_eq!(later, "");
    let err = daemon.client(&env, &["show", "lats"]).expect(2).stderr();
    assert!(
        err.contains("\"lats\" is not a run: give its number, or `last`"),
        "{err}"
    );
}

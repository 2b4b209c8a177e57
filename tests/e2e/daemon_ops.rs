//! The daemon's run lifecycle: retry, release, quarantine after repeated crashes, graceful
//! shutdown, the event log over the socket, `tools` and `submit` of a file in a watched folder.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, GOOD, drop_file, tools};
use crate::util::Env;

/// Waits up to 30 s for `cond`, saying `what` if it never holds.
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let waited = Instant::now();
    while !cond() {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The state of run `id` as `uet runs --json` says.
fn state_of(daemon: &Daemon, env: &Env, id: u64) -> String {
    daemon
        .runs(env)
        .iter()
        .find(|r| r["run_id"] == id)
        .and_then(|r| r["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn count_lines(env: &Env, file: &str, line: &str) -> usize {
    std::fs::read_to_string(env.ws.join(file))
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == line)
        .count()
}

const CHAIN: &str = "name = \"chain\"\n\
    [[steps]]\nid = \"a\"\ntool = \"note\"\nwith = { name = \"a\" }\n\
    [[steps]]\nid = \"b\"\ntool = \"gate\"\nneeds = [\"a\"]\nwith = { name = \"b\" }\n\
    [[steps]]\nid = \"c\"\ntool = \"note\"\nneeds = [\"b\"]\nwith = { name = \"c\" }\n";

/// `note` logs and succeeds; `gate` logs, then fails until the file `open` exists;
/// `stall` logs, then sleeps unless the file `open` exists.
fn lifecycle_tools(env: &Env) {
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "note"
command = ["sh", "-c", "echo {name} >> ran.log; echo '{{}}'"]

[[tools]]
name = "gate"
command = ["sh", "-c", "echo {name} >> ran.log; test -e open && echo '{{}}'"]

[[tools]]
name = "stall"
command = ["sh", "-c", "echo {name} >> ran.log; test -e open || sleep 30; echo '{{}}'"]
"#,
    );
}

#[test]
fn retry_reruns_what_did_not_succeed_and_keeps_what_did() {
    let env = Env::new();
    lifecycle_tools(&env);
    let daemon = Daemon::start(&env);
    drop_file(&env, "chain.toml", CHAIN);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "failed", "{runs:?}");
    assert!(runs[0]["trigger"].as_str().unwrap().contains("chain.toml"));

    // only failed or canceled runs can be retried, only quarantined ones released
    let refused = daemon.client(&env, &["release", "1"]).expect(2);
    assert!(
        refused.stderr().contains("uet retry 1"),
        "{}",
        refused.describe()
    );
    daemon.client(&env, &["retry", "7"]).expect(2);

    env.write("open", "");
    daemon.client(&env, &["retry", "1"]).expect(0);
    wait_until("the retried run ends", || {
        state_of(&daemon, &env, 1) == "succeeded"
    });
    assert_eq!(
        count_lines(&env, "ran.log", "a"),
        1,
        "a succeeded and is kept"
    );
    assert_eq!(count_lines(&env, "ran.log", "b"), 2);
    assert_eq!(
        count_lines(&env, "ran.log", "c"),
        1,
        "c was skipped, then ran"
    );
    let refused = daemon.client(&env, &["retry", "1"]).expect(2);
    assert!(
        refused.stderr().contains("succeeded"),
        "{}",
        refused.describe()
    );

    // the audit trail tells the whole story, in order
    let events = daemon.client(&env, &["events", "1", "--json"]).expect(0);
    let events: Vec<serde_json::Value> = events
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or(usize::MAX);
    assert_eq!(kinds[0], "run.created");
    assert!(at("run.failed") < at("run.pending"), "{kinds:?}");
    assert_eq!(*kinds.last().unwrap(), "run.succeeded", "{kinds:?}");
    let text = daemon.client(&env, &["events", "1"]).expect(0).stdout();
    assert!(
        text.contains("run 1") && text.contains("step.skipped"),
        "{text}"
    );
}

#[test]
fn a_run_in_flight_during_two_crashes_is_quarantined_until_released() {
    let env = Env::new();
    lifecycle_tools(&env);
    let stall =
        "name = \"poison\"\n[[steps]]\nid = \"s\"\ntool = \"stall\"\nwith = { name = \"s\" }\n";
    let mut daemon = Daemon::start(&env);
    drop_file(&env, "poison.toml", stall);
    for crash in 1..=2 {
        wait_until("the step is in flight", || {
            count_lines(&env, "ran.log", "s") == crash
        });
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        drop(daemon);
        daemon = Daemon::start(&env);
    }
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "quarantined", "{runs:?}");
    let reason = runs[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("unclean stops") && reason.contains("uet release 1"),
        "{reason}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count_lines(&env, "ran.log", "s"),
        2,
        "nothing retries it on its own"
    );

    let refused = daemon.client(&env, &["retry", "1"]).expect(2);
    assert!(
        refused.stderr().contains("uet release 1"),
        "{}",
        refused.describe()
    );
    env.write("open", "");
    daemon.client(&env, &["release", "1"]).expect(0);
    wait_until("the released run succeeds", || {
        state_of(&daemon, &env, 1) == "succeeded"
    });
    assert_eq!(count_lines(&env, "ran.log", "s"), 3);
}

#[test]
fn shutdown_lets_steps_finish_within_the_grace_and_the_rest_resumes() {
    let env = Env::new();
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "quick"
command = ["sh", "-c", "echo {name} >> ran.log; touch {name}.started; sleep 1; echo '{{}}'"]

[[tools]]
name = "long"
command = ["sh", "-c", "echo {name} >> ran.log; touch {name}.started; test -e open || sleep 30; echo '{{}}'"]
"#,
    );
    let config = env.ws.parent().unwrap().join("daemon.toml");
    std::fs::write(&config, "grace = \"2s\"\n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let mut daemon = Daemon::start_with(&env, &["--config", &config]);
    drop_file(
        &env,
        "two.toml",
        "name = \"two\"\n\
         [[steps]]\nid = \"q\"\ntool = \"quick\"\nwith = { name = \"q\" }\n\
         [[steps]]\nid = \"after\"\ntool = \"quick\"\nneeds = [\"q\"]\nwith = { name = \"after\" }\n\
         [[steps]]\nid = \"l\"\ntool = \"long\"\nwith = { name = \"l\" }\n",
    );
    wait_until("both steps run", || {
        env.ws.join("q.started").exists() && env.ws.join("l.started").exists()
    });
    let asked = Instant::now();
    daemon.client(&env, &["shutdown"]).expect(0);
    let status = daemon.child.wait().unwrap();
    assert!(status.success());
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the grace bounds the shutdown"
    );
    drop(daemon);
    {
        let store = uet::state::Store::open(&env.state).unwrap();
        let run = store.run(1).unwrap().unwrap();
        assert_eq!(run.state, uet::model::RunState::Pending, "{run:?}");
        let steps = store.steps(1).unwrap();
        let state = |id: &str| steps.iter().find(|s| s.id == id).unwrap().state;
        use uet::model::StepState;
        assert_eq!(
            state("q"),
            StepState::Succeeded,
            "finished within the grace"
        );
        assert_eq!(state("after"), StepState::Pending, "nothing new starts");
        assert_eq!(state("l"), StepState::Pending, "stopped at the grace's end");
        let l = store.attempts(1, "l").unwrap();
        assert_eq!(l[0].outcome, Some(uet::model::Outcome::Interrupted));
    }

    env.write("open", "");
    let daemon = Daemon::start_with(&env, &["--config", &config]);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    assert_eq!(count_lines(&env, "ran.log", "q"), 1);
    assert_eq!(count_lines(&env, "ran.log", "after"), 1);
    assert_eq!(count_lines(&env, "ran.log", "l"), 2);
}

#[test]
fn events_follow_streams_a_run_live_and_ends_with_it() {
    let env = Env::new();
    lifecycle_tools(&env);
    let daemon = Daemon::start(&env);
    drop_file(
        &env,
        "wait.toml",
        "name = \"wait\"\n[[steps]]\nid = \"s\"\ntool = \"stall\"\nwith = { name = \"s\" }\n\
         [[steps]]\nid = \"t\"\ntool = \"note\"\nneeds = [\"s\"]\nwith = { name = \"t\" }\n",
    );
    wait_until("the step is in flight", || {
        count_lines(&env, "ran.log", "s") == 1
    });
    let mut follower = daemon_client_command(&env, &daemon, &["events", "1", "--follow", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    // what was logged before it connected comes first
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["kind"], "run.created");
    // the stalled step is released by cancelling it: the stream carries that live
    daemon.client(&env, &["cancel", "1"]).expect(0);
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = follower.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the stream ends by itself when the run does, with the run's code (canceled: 1)"
    );
    let kinds: Vec<&str> = rest.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(*kinds.last().unwrap(), "run.canceled", "{kinds:?}");
    let mut seqs = vec![first["seq"].as_u64().unwrap()];
    seqs.extend(rest.iter().map(|e| e["seq"].as_u64().unwrap()));
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none missed: {seqs:?}"
    );

    // following every run ends when the client hangs up, and the daemon serves on
    let mut all = daemon_client_command(&env, &daemon, &["events", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(all.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("run.created"));
    all.kill().unwrap();
    all.wait().unwrap();
    daemon.client(&env, &["status"]).expect(0);
    daemon.client(&env, &["events", "9"]).expect(2);
}

fn daemon_client_command(env: &Env, daemon: &Daemon, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_uet"));
    cmd.args(args)
        .arg("--socket")
        .arg(&daemon.socket)
        .current_dir(&env.ws)
        .stderr(Stdio::null());
    cmd
}

#[test]
fn tools_come_from_the_daemon_and_submit_claims_a_file_in_a_watched_folder() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let listed = daemon.client(&env, &["tools", "--json"]).expect(0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout()).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["echo", "sleepy"]);
    assert!(
        rows[0]["tools_file"]
            .as_str()
            .unwrap()
            .ends_with("tools.toml")
    );

    // written in place and submitted at once: the daemon claims it, so the watcher (which
    // sees the same file) cannot start a second run of it
    let path = env.write("direct.toml", GOOD);
    let submitted = daemon
        .client(&env, &["submit", path.to_str().unwrap(), "--json"])
        .expect(0);
    let run: serde_json::Value = serde_json::from_str(&submitted.stdout()).unwrap();
    assert_eq!(run["run_id"], 1);
    daemon.wait_for_runs(&env, 1);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(daemon.runs(&env).len(), 1, "one file, one run");
    assert!(!path.exists());
}

/// How many inotify instances a process holds, from its open files.
fn inotify_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("inotify"))
        })
        .count()
}

#[test]
fn a_daemon_polling_its_folders_still_runs_drops() {
    let env = Env::new();
    tools(&env);
    // the kernel's notifications are what a daemon uses by default...
    let native = Daemon::start(&env);
    assert!(inotify_fds(native.child.id()) > 0);
    drop(native);
    // ...and a polling one has none: the drop is seen by polling alone
    let config = env.ws.parent().unwrap().join("daemon.toml");
    std::fs::write(&config, "poll = \"100ms\"\nsettle = \"100ms\"\n").unwrap();
    let daemon = Daemon::start_with(&env, &["--config", config.to_str().unwrap()]);
    assert_eq!(inotify_fds(daemon.child.id()), 0);
    drop_file(&env, "hello.toml", GOOD);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded");
}

#[test]
fn sigterm_and_sigint_stop_the_daemon_gracefully() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let env = Env::new();
        tools(&env);
        let config = env.ws.parent().unwrap().join("daemon.toml");
        std::fs::write(&config, "grace = \"300ms\"\n").unwrap();
        let mut daemon = Daemon::start_with(&env, &["--config", config.to_str().unwrap()]);
        drop_file(
            &env,
            "long.toml",
            "name = \"long\"\n[[steps]]\nid = \"nap\"\ntool = \"sleepy\"\nwith = { pidfile = \"pids\" }\n",
        );
        wait_until("the step started", || env.ws.join("pids.done").exists());
        let asked = Instant::now();
        // SAFETY: a plain kill(2) of our own child
        unsafe { libc::kill(daemon.child.id() as i32, signal) };
        let status = daemon.child.wait().unwrap();
        assert!(status.success(), "signal {signal}: {status:?}");
        assert!(asked.elapsed() < Duration::from_secs(10));
        assert!(!daemon.socket.exists(), "the socket file is removed");
        drop(daemon);
        let store = uet::state::Store::open(&env.state).unwrap();
        let run = store.run(1).unwrap().unwrap();
        assert_eq!(
            run.state,
            uet::model::RunState::Pending,
            "paused, to resume: {run:?}"
        );
        for pid in env.read("pids").lines() {
            assert!(
                crate::util::gone(pid.trim().parse().unwrap()),
                "a step's process outlived the stop"
            );
        }
    }
}

#[test]
fn a_recovered_run_still_waiting_for_a_slot_at_a_crash_is_not_a_suspect() {
    let env = Env::new();
    lifecycle_tools(&env);
    let config = env.ws.parent().unwrap().join("daemon.toml");
    let config = config.to_str().unwrap().to_string();
    std::fs::write(&config, "max_runs = 2\n").unwrap();
    let mut daemon = Daemon::start_with(&env, &["--config", &config]);
    for name in ["one", "two"] {
        drop_file(
            &env,
            &format!("{name}.toml"),
            &format!(
                "name = \"{name}\"\n[[steps]]\nid = \"{name}\"\ntool = \"stall\"\nwith = {{ name = \"{name}\" }}\n"
            ),
        );
    }
    wait_until("both runs are in flight", || {
        count_lines(&env, "ran.log", "one") == 1 && count_lines(&env, "ran.log", "two") == 1
    });
    // crash 1; the next daemon has one slot, so one of the two waits without running
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    drop(daemon);
    std::fs::write(&config, "max_runs = 1\n").unwrap();
    let mut daemon = Daemon::start_with(&env, &["--config", &config]);
    wait_until("one run is in flight again", || {
        count_lines(&env, "ran.log", "one") + count_lines(&env, "ran.log", "two") == 3
    });
    let driven = if count_lines(&env, "ran.log", "one") == 2 {
        "one"
    } else {
        "two"
    };
    let id_of = |daemon: &Daemon, name: &str| {
        daemon
            .runs(&env)
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["run_id"]
            .as_u64()
            .unwrap()
    };
    let driven = id_of(&daemon, driven);
    // crash 2: only the run that ran through both crashes is suspect
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    drop(daemon);
    env.write("open", "");
    std::fs::write(&config, "max_runs = 2\n").unwrap();
    let daemon = Daemon::start_with(&env, &["--config", &config]);
    wait_until("the other run succeeds", || {
        state_of(&daemon, &env, 3 - driven) == "succeeded"
    });
    assert_eq!(state_of(&daemon, &env, driven), "quarantined");
}

#[test]
fn a_watched_folder_deleted_and_recreated_is_watched_again() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let saved = std::fs::read_to_string(env.ws.join("tools.toml")).unwrap();
    std::fs::remove_dir_all(&env.ws).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::create_dir_all(&env.ws).unwrap();
    std::fs::write(env.ws.join("tools.toml"), saved).unwrap();
    // the daemon needs a moment to notice the folder is back; a file dropped meanwhile is
    // picked up by the scan that follows
    drop_file(&env, "again.toml", GOOD);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded");
    drop_file(&env, "later.toml", &GOOD.replace("hello", "later"));
    let runs = daemon.wait_for_runs(&env, 2);
    assert_eq!(runs.len(), 2);

    // gone and back before the daemon could look: its watch was on the old folder
    let saved = std::fs::read_to_string(env.ws.join("tools.toml")).unwrap();
    std::fs::remove_dir_all(&env.ws).unwrap();
    std::fs::create_dir_all(&env.ws).unwrap();
    std::fs::write(env.ws.join("tools.toml"), saved).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop_file(&env, "quick.toml", &GOOD.replace("hello", "quick"));
    let runs = daemon.wait_for_runs(&env, 3);
    assert_eq!(runs.len(), 3);
}

#[test]
fn steps_left_running_by_a_killed_daemon_are_killed_at_the_next_start() {
    let env = Env::new();
    tools(&env);
    let mut daemon = Daemon::start(&env);
    drop_file(
        &env,
        "long.toml",
        "name = \"long\"\n[[steps]]\nid = \"nap\"\ntool = \"sleepy\"\nwith = { pidfile = \"pids\" }\n",
    );
    wait_until("the step started", || env.ws.join("pids.done").exists());
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    drop(daemon);
    let pids: Vec<i32> = env
        .read("pids")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(
        pids.iter().all(|&p| !crate::util::gone(p)),
        "a SIGKILLed daemon leaves its step's processes behind"
    );
    std::fs::remove_file(env.ws.join("pids.done")).unwrap();
    let daemon = Daemon::start(&env);
    for pid in &pids[..2] {
        assert!(
            crate::util::gone(*pid),
            "process {pid} outlived the restart"
        );
    }
    // the step runs again, alone
    wait_until("the step runs again", || env.ws.join("pids.done").exists());
    daemon.client(&env, &["cancel", "1"]).expect(0);
}

#[test]
fn many_clients_at_once_are_all_answered() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    drop_file(&env, "hello.toml", GOOD);
    daemon.wait_for_runs(&env, 1);
    // a follower holds its connection open the whole time; the others come and go around it
    let mut follower = daemon_client_command(&env, &daemon, &["events", "--follow"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (env, daemon) = (&env, &daemon);
                s.spawn(move || {
                    let cmd = if i % 2 == 0 { "runs" } else { "status" };
                    daemon.client(env, &[cmd, "--json"]).expect(0).stdout()
                })
            })
            .collect();
        for h in handles {
            let out = h.join().unwrap();
            assert!(out.starts_with('[') || out.contains("\"pid\""), "{out}");
        }
    });
    follower.kill().unwrap();
    follower.wait().unwrap();
}

#[test]
fn json_is_never_silently_ignored_refusals_and_messages_included() {
    let env = Env::new();
    crate::daemon::tools(&env);
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"s\"\ntool = \"echo\"\nwith = { a = 1 }\n",
    );
    env.uet(&["run", "w.toml"]).expect(0);
    let said = env.uet(&["verify", "1", "--json"]).expect(0).stdout();
    let said: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert!(
        said["message"]
            .as_str()
            .unwrap()
            .contains("the hash chain holds"),
        "{said}"
    );
    let refused = env.uet(&["verify", "99", "--json"]).expect(2).stdout();
    let refused: serde_json::Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["error"], "no run 99");
    assert_eq!(refused["invalid"], true);
    // no JSON form: said so, not ignored
    let err = env.uet(&["metrics", "--json"]).expect(2).stderr();
    assert!(err.contains("has no --json form"), "{err}");

    let daemon = crate::daemon::Daemon::start(&env);
    let refused = daemon
        .client(&env, &["cancel", "1", "--json"])
        .expect(2)
        .stdout();
    let refused: serde_json::Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["error"], "run 1 is succeeded, not running");
    let err = daemon
        .client(&env, &["unwatch", "none", "--json"])
        .expect(2)
        .stdout();
    assert!(err.contains("\"error\""), "{err}");
}

#[test]
fn logs_follow_prints_each_attempt_as_it_ends_and_exits_with_the_run_s_code() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"say\"\ncommand = [\"sh\", \"-c\", \"sleep {nap}; echo said {word}; echo '{{}}'\"]\n\n\
         [[tools]]\nname = \"fail\"\ncommand = [\"sh\", \"-c\", \"echo no luck >&2; exit 1\"]\n",
    );
    let daemon = crate::daemon::Daemon::start(&env);
    let flow = |name: &str, last: &str| {
        format!(
            "name = \"{name}\"\n[[steps]]\nid = \"a\"\ntool = \"say\"\nwith = {{ nap = \"0.8\", word = \"first\" }}\n\
             [[steps]]\nid = \"b\"\ntool = \"{last}\"\nneeds = [\"a\"]\nwith = {{ nap = \"0\", word = \"second\" }}\n"
        )
    };
    let file = env.write("ok.toml", &flow("ok", "say"));
    let submitted = daemon
        .client(&env, &["submit", file.to_str().unwrap(), "--json"])
        .expect(0)
        .stdout();
    assert!(submitted.contains("\"run_id\":1"), "{submitted}");
    // started while the run goes: it waits for both attempts, in order
    let out = daemon
        .client(&env, &["logs", "1", "--follow"])
        .expect(0)
        .stdout();
    let first = out.find("said first").expect(&out);
    let second = out.find("said second").expect(&out);
    assert!(first < second, "{out}");
    assert_eq!(
        out.matches("== a · attempt 1").count(),
        1,
        "each attempt once: {out}"
    );

    let file = env.write("bad.toml", &flow("bad", "fail"));
    daemon
        .client(&env, &["submit", file.to_str().unwrap()])
        .expect(0);
    let out = daemon
        .client(&env, &["logs", "2", "--follow", "--json"])
        .expect(1)
        .stdout();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[1]["step"], "b");
    assert_eq!(lines[1]["outcome"], "failed");
    assert!(lines[1]["stderr"].as_str().unwrap().contains("no luck"));
}

#[test]
fn rejected_drops_are_listed_by_status_and_top_across_restarts() {
    let env = Env::new();
    crate::daemon::tools(&env);
    let mut daemon = crate::daemon::Daemon::start(&env);
    crate::daemon::drop_file(&env, "bad.toml", "name = \"bad\"\ncolour = 1\n");
    wait_until("the refusal", || {
        env.ws.join("rejected/bad.toml.error.txt").exists()
    });
    let shown = daemon.client(&env, &["status"]).expect(0).stdout();
    assert!(shown.contains("rejected: bad.toml at "), "{shown}");
    // the report's first problem
    assert!(
        shown.contains("bad.toml:1:1: workflow: no steps"),
        "{shown}"
    );
    assert!(shown.contains("rejected/bad.toml.error.txt)"), "{shown}");
    let top = daemon.client(&env, &["top"]).expect(0).stdout();
    assert!(
        top.contains("rejected: 1 of late, latest bad.toml"),
        "{top}"
    );
    let runs = daemon.client(&env, &["runs"]).expect(0).stdout();
    assert!(runs.contains("rejected: bad.toml in "), "{runs}");
    assert!(runs.contains("workflow: no steps"), "{runs}");

    // every run's events say it too: the refusal that was, then one as it happens
    let mut follower = daemon_client_command(&env, &daemon, &["events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| _ = tx.send(l)));
    // a stream that never shows the refusal fails here, not by hanging the suite
    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a refusal event");
        serde_json::from_str(&line).unwrap()
    };
    let first = next();
    assert_eq!(first["kind"], "drop.rejected", "{first}");
    assert_eq!(first["run_id"], serde_json::Value::Null, "{first}");
    let detail = first["detail"].as_str().unwrap();
    assert!(detail.starts_with("bad.toml in "), "{detail}");
    assert!(detail.contains("workflow: no steps"), "{detail}");
    assert!(detail.contains("rejected/bad.toml.error.txt"), "{detail}");
    crate::daemon::drop_file(&env, "worse.toml", "name = \"worse\"\n[[step]]\n");
    let second = next();
    assert_eq!(second["kind"], "drop.rejected", "{second}");
    assert!(
        second["detail"]
            .as_str()
            .unwrap()
            .starts_with("worse.toml in "),
        "{second}"
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
    let text = daemon.client(&env, &["events"]).expect(0).stdout();
    assert!(
        text.lines().any(|l| l.contains("run -    -")
            && l.contains("drop.rejected")
            && l.contains("worse.toml")),
        "{text}"
    );
    // one run's events are that run's alone
    drop_file(&env, "hello.toml", GOOD);
    daemon.wait_for_runs(&env, 1);
    let one = daemon.client(&env, &["events", "1"]).expect(0).stdout();
    assert!(!one.contains("drop.rejected"), "{one}");
    daemon.client(&env, &["shutdown", "--wait"]).expect(0);
    daemon.child.wait().unwrap();
    drop(daemon);
    let daemon = crate::daemon::Daemon::start(&env);
    let status = daemon.status(&env);
    let bad = status["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "bad.toml")
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        bad["reason"].as_str().unwrap().contains("bad.toml:1:1"),
        "{status}"
    );
}

/// A tools file whose one tool appends `$WORD` (from `word.env`) and `mark` to said.txt.
fn say_tools(env: &Env, mark: &str) -> std::path::PathBuf {
    let said = env.ws.join("said.txt");
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"say\"\nenv_file = \"word.env\"\n\
             command = [\"sh\", \"-c\", \"echo $WORD {mark} >> {}\"]\n",
            said.display()
        ),
    )
}

fn say_word(env: &Env, word: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let file = env.write("word.env", &format!("WORD={word}\n"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

#[test]
fn a_tools_file_or_its_secrets_changed_in_place_are_read_again_for_the_next_drop() {
    use std::os::unix::fs::PermissionsExt;
    const SAY: &str = "name = \"say\"\n[[steps]]\nid = \"say\"\ntool = \"say\"\n";
    let env = Env::new();
    let tools_file = say_tools(&env, "one");
    let word = say_word(&env, "red");
    let said = || {
        env.read("said.txt")
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // each drop is checked against its folder's tools file as it is then. A daemon that kept
    // the parsed file between drops (tried for speed: docs/PERFORMANCE.md) must still see each
    // change below, even one at the same size within the same second; the files are first
    // left to settle for 2 s, the age at which a stamp can be believed, so that a kept copy
    // would be used
    std::thread::sleep(Duration::from_millis(2100));
    let daemon = Daemon::start(&env);
    let mut drops = 0;
    let mut drop_one = || {
        drops += 1;
        drop_file(&env, &format!("say{drops}.toml"), SAY);
        let runs = daemon.wait_for_runs(&env, drops);
        assert!(runs.iter().all(|r| r["state"] == "succeeded"), "{runs:?}");
    };
    drop_one();
    drop_one();
    assert_eq!(said(), ["red one", "red one"]);

    // rewritten in place at the same size, within the second: read again
    say_tools(&env, "two");
    drop_one();
    assert_eq!(said()[2], "red two");
    // the secrets file likewise
    std::thread::sleep(Duration::from_millis(2100));
    drop_one();
    say_word(&env, "tan");
    drop_one();
    assert_eq!(said()[3..], ["red two", "tan two"]);

    // kept or not, a tools file others may now write is refused: its trust is checked anew
    std::thread::sleep(Duration::from_millis(2100));
    drop_one();
    assert_eq!(said().len(), 6);
    std::fs::set_permissions(&tools_file, std::fs::Permissions::from_mode(0o666)).unwrap();
    drop_file(&env, "refused.toml", SAY);
    let report = env.ws.join("rejected/refused.toml.error.txt");
    wait_until("the drop is refused", || report.exists());
    let report = std::fs::read_to_string(&report).unwrap();
    assert!(report.contains("can be written by anyone"), "{report}");
    // and a secrets file others may read likewise
    std::fs::set_permissions(&tools_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    drop_one();
    std::fs::set_permissions(&word, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop_file(&env, "refused2.toml", SAY);
    let report = env.ws.join("rejected/refused2.toml.error.txt");
    wait_until("the drop is refused", || report.exists());
    assert!(
        std::fs::read_to_string(&report)
            .unwrap()
            .contains("word.env"),
        "the report names the secrets file"
    );
    assert_eq!(said().len(), 7, "no refused drop ran");
}

#[test]
fn a_plugin_replaced_at_its_path_runs_as_replaced_without_a_restart() {
    const QUERY: &str = "name = \"query\"\n[[steps]]\nid = \"q\"\ntool = \"p\"\n\
                         with = { value = { a = 7 }, query = \"a\" }\n";
    const COUNT: &str = "name = \"count\"\n[[steps]]\nid = \"c\"\ntool = \"p\"\n\
                         with = { path = \"docs\", glob = \"*.md\" }\n";
    let env = Env::new();
    env.write("docs/a.md", "one two three\n");
    let dir = env.ws.parent().unwrap().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("p.wasm");
    std::fs::copy(crate::util::plugin("jsonq"), &p).unwrap();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"p\"\nwasm = \"{}\"\nsandbox = {{ read = [\"docs\"] }}\n",
            p.display()
        ),
    );
    // settled, so that its hash is kept by its stamp from the first attempt on: the stamp,
    // not a hash per attempt, must notice each change below
    std::thread::sleep(Duration::from_millis(2100));
    let daemon = Daemon::start(&env);
    let mut drops = 0;
    let mut drop_one = |text: &str| {
        drops += 1;
        drop_file(&env, &format!("w{drops}.toml"), text);
        let runs = daemon.wait_for_runs(&env, drops);
        assert_eq!(runs[drops - 1]["state"], "succeeded", "{runs:?}");
        let shown = daemon
            .client(&env, &["show", &drops.to_string(), "--json"])
            .expect(0);
        let shown: serde_json::Value = serde_json::from_str(&shown.stdout()).unwrap();
        shown["steps"][0]["output"].clone()
    };
    assert_eq!(drop_one(QUERY)["value"], 7);

    // replaced as an installer does (a new file renamed over it): the next drop is checked
    // against, and runs, the new plugin, whose inputs the old one would refuse
    let tmp = dir.join(".p.wasm.new");
    std::fs::copy(crate::util::plugin("wordcount"), &tmp).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    assert_eq!(drop_one(COUNT)["words"], 3);

    // and rewritten in place (same inode) once settled
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(drop_one(COUNT)["words"], 3);
    std::fs::copy(crate::util::plugin("jsonq"), &p).unwrap();
    assert_eq!(drop_one(QUERY)["value"], 7);

    // a plugin gone is not run from memory
    std::fs::remove_file(&p).unwrap();
    drop_file(&env, "gone.toml", QUERY);
    let report = env.ws.join("rejected/gone.toml.error.txt");
    let ended = |r: &serde_json::Value| !matches!(r["state"].as_str(), Some("pending" | "running"));
    wait_until("the drop is refused or its run ends", || {
        report.exists() || daemon.runs(&env).get(drops).is_some_and(ended)
    });
    let runs = daemon.runs(&env);
    assert!(
        runs.get(drops).is_none_or(|r| r["state"] != "succeeded"),
        "a deleted plugin still ran: {runs:?}"
    );
}

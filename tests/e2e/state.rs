//! The state folder: what a run leaves behind is all there when the folder is opened again.

use uet::model::{Outcome, RunState, StepState};
use uet::state::Store;

use crate::util::Env;

#[test]
fn a_reopened_state_holds_the_run_steps_attempts_and_events() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\n\n[[tools]]\nname = \"fail\"\ncommand = [\"sh\", \"-c\", \"echo nope >&2; exit 1\"]\nretry = { base = \"1ms\" }\n",
    );
    env.write(
        "w.toml",
        r#"
name = "kept"
[[steps]]
id = "hello"
tool = "echo"
with = { greeting = "hi" }
[[steps]]
id = "sad"
tool = "fail"
retries = 1
[[steps]]
id = "later"
tool = "echo"
needs = ["sad"]
"#,
    );
    let (run, out) = env.run_json("w.toml");
    run.expect(1);
    let id = out["run_id"].as_u64().unwrap();

    // the binary has exited; open its state as a new process would
    let store = Store::open(&env.state).expect("the state opens again");
    let record = store.run(id).unwrap().expect("the run is there");
    assert_eq!(record.name, "kept");
    assert_eq!(record.state, RunState::Failed);
    assert!(record.started_at.is_some() && record.finished_at.is_some());

    let steps = store.steps(id).unwrap();
    let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["hello", "sad", "later"]);
    assert_eq!(steps[0].state, StepState::Succeeded);
    assert_eq!(steps[0].output, Some(serde_json::json!({"greeting": "hi"})));
    assert_eq!(steps[1].state, StepState::Failed);
    assert_eq!(steps[1].attempts, 2);
    assert_eq!(steps[2].state, StepState::Skipped);

    let attempts = store.attempts(id, "sad").unwrap();
    assert_eq!(attempts.len(), 2);
    for (n, a) in attempts.iter().enumerate() {
        assert_eq!(a.number, n as u32 + 1);
        assert_eq!(a.outcome, Some(Outcome::Failed));
        assert!(a.stderr.contains("nope"), "{a:?}");
        assert!(a.finished_at >= Some(a.started_at));
    }
    assert!(
        attempts[0].retry_at.is_some(),
        "the first failure scheduled a retry"
    );
    assert!(attempts[1].retry_at.is_none());

    let events = store.events(id).unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"run.created"));
    assert_eq!(kinds.last(), Some(&"run.failed"));
    for want in [
        "run.running",
        "step.running",
        "attempt.started",
        "attempt.failed",
        "step.succeeded",
        "step.failed",
        "step.skipped",
    ] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "events are numbered in order"
    );
    drop(store);

    // a second run in the same state gets the next id and leaves the first alone
    let (_, again) = env.run_json("w.toml");
    assert_eq!(again["run_id"].as_u64().unwrap(), id + 1);
    let store = Store::open(&env.state).unwrap();
    assert_eq!(store.runs().unwrap().len(), 2);
    assert_eq!(store.events(id).unwrap(), events);
}

#[test]
fn the_event_log_is_hash_chained_and_tampering_is_caught() {
    use redb::{ReadableTable, TableDefinition};
    const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");
    type Events<'t> = redb::Table<'t, (u64, u64), &'static [u8]>;
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\n",
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"echo\"\n[[steps]]\nid = \"b\"\ntool = \"echo\"\nneeds = [\"a\"]\n",
    );
    env.uet(&["run", "w.toml"]).expect(0);
    let no_daemon = ["--socket", "/nonexistent/uet.sock"];
    let verify = |run: &str| {
        let mut args = vec!["verify", run];
        args.extend(no_daemon);
        env.uet(&args)
    };
    let ok = verify("1").expect(0);
    assert!(
        ok.stdout().contains("hash chain holds"),
        "{}",
        ok.describe()
    );
    verify("9").expect(2);

    let file = env.state.join(uet::state::STATE_FILE);
    let edit = |f: &dyn Fn(&mut Events)| {
        let db = redb::Database::open(&file).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(EVENTS).unwrap();
            f(&mut t);
        }
        tx.commit().unwrap();
    };
    // a changed detail breaks that event's link
    edit(&|t| {
        let mut e: serde_json::Value =
            serde_json::from_slice(t.get((1, 3)).unwrap().unwrap().value()).unwrap();
        e["detail"] = "nothing to see here".into();
        t.insert((1, 3), serde_json::to_vec(&e).unwrap().as_slice())
            .unwrap();
    });
    let bad = verify("1").expect(1);
    assert!(
        bad.stderr().contains("event 3") && bad.stderr().contains("tampered"),
        "{}",
        bad.describe()
    );

    // so does a log cut short, even with every remaining link intact
    env.uet(&["run", "w.toml"]).expect(0);
    verify("2").expect(0);
    edit(&|t| {
        let last = t
            .range((2, 0)..=(2, u64::MAX))
            .unwrap()
            .next_back()
            .unwrap()
            .unwrap()
            .0
            .value();
        t.remove(last).unwrap();
    });
    let cut = verify("2").expect(1);
    assert!(cut.stderr().contains("removed"), "{}", cut.describe());
}

#[test]
fn pruning_deletes_old_finished_runs_and_keeps_what_it_must() {
    use uet::state::Change;
    let env = Env::new();
    {
        let store = Store::open(&env.state).unwrap();
        let plan = serde_json::json!({});
        let steps = vec!["a".to_string()];
        let mut ids = Vec::new();
        for i in 0..7 {
            // each came from a dropped file, whose record goes with the run
            let claim = format!("claim-{i}");
            ids.push(
                store
                    .create(uet::state::NewRun {
                        name: "r",
                        source: "f",
                        workstream: "",
                        plan: (&plan).into(),
                        steps: &steps,
                        trigger: None,
                        submission: Some(uet::state::Submission {
                            claim: &claim,
                            sha256: "00",
                        }),
                        standing: None,
                    })
                    .unwrap(),
            );
        }
        let to = |run, to| Change::RunState {
            run,
            to,
            reason: None,
        };
        // 1-4 finished, 5 running, 6 quarantined, 7 pending; each that ran made an attempt
        for &id in &ids[..6] {
            store
                .apply(&[
                    to(id, RunState::Running),
                    Change::AttemptStarted {
                        run: id,
                        step: "a".into(),
                        number: 1,
                        tool: "t".into(),
                    },
                    Change::AttemptFinished {
                        run: id,
                        step: "a".into(),
                        number: 1,
                        outcome: uet::model::Outcome::Failed,
                        error: None,
                        stdout: String::new(),
                        stderr: String::new(),
                        retry_at: None,
                    },
                ])
                .unwrap();
        }
        for (id, end) in [
            (1, RunState::Succeeded),
            (2, RunState::Failed),
            (3, RunState::Canceled),
            (4, RunState::Succeeded),
            (6, RunState::Quarantined),
        ] {
            store.apply(&[to(id, end)]).unwrap();
        }
    }
    let no_daemon = ["--socket", "/nonexistent/uet.sock"];
    let prune = |args: &[&str]| {
        let mut all = vec!["prune"];
        all.extend(args);
        all.extend(no_daemon);
        env.uet(&all)
    };
    prune(&[]).expect(2);
    let out = prune(&["--keep", "2"]).expect(0);
    assert!(
        out.stdout().contains("deleted 2 finished runs"),
        "{}",
        out.describe()
    );
    let store = Store::open(&env.state).unwrap();
    let left: Vec<u64> = store.runs().unwrap().iter().map(|r| r.id).collect();
    assert_eq!(left, [3, 4, 5, 6, 7], "the two oldest finished runs went");
    for gone in [1, 2] {
        assert!(store.steps(gone).unwrap().is_empty());
        assert!(store.attempts(gone, "a").unwrap().is_empty());
        assert!(store.events(gone).unwrap().is_empty());
        assert!(store.plan(gone).unwrap().is_none());
        let claim = format!("claim-{}", gone - 1);
        assert_eq!(store.submission(&claim).unwrap(), None);
    }
    assert_eq!(store.events(3).unwrap().len(), 5, "the kept ones are whole");
    assert_eq!(store.attempts(3, "a").unwrap().len(), 1);
    assert_eq!(store.submission("claim-2").unwrap(), Some(3));
    drop(store);
    // an age of zero takes every finished run, and still nothing else
    prune(&["--older-than", "0s"]).expect(0);
    let store = Store::open(&env.state).unwrap();
    let left: Vec<(u64, RunState)> = store
        .runs()
        .unwrap()
        .iter()
        .map(|r| (r.id, r.state))
        .collect();
    assert_eq!(
        left,
        [
            (5, RunState::Running),
            (6, RunState::Quarantined),
            (7, RunState::Pending)
        ]
    );
}

#[test]
fn the_daemon_applies_its_retention_settings() {
    let env = Env::new();
    crate::daemon::tools(&env);
    env.write("w.toml", crate::daemon::GOOD);
    for _ in 0..3 {
        env.uet(&["run", "w.toml"]).expect(0);
    }
    let config = env.ws.parent().unwrap().join("daemon.toml");
    std::fs::write(&config, "keep_runs = 1\nkeep_for = \"30d\"\n").unwrap();
    std::fs::remove_file(env.ws.join("w.toml")).unwrap();
    let daemon = crate::daemon::Daemon::start_with(&env, &["--config", config.to_str().unwrap()]);
    let runs = daemon.runs(&env);
    let ids: Vec<u64> = runs.iter().map(|r| r["run_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [3], "only the newest finished run is kept");
}

/// Without a daemon, the commands that read go to the state itself, through the same facade
/// the daemon answers with: the same JSON either way.
#[test]
fn reads_go_to_the_state_when_no_daemon_answers() {
    let env = crate::util::Env::new();
    crate::daemon::tools(&env);
    env.write("hello.toml", crate::daemon::GOOD);
    let (run, ran) = env.run_json("hello.toml");
    run.expect(0);
    let socket = env.ws.parent().unwrap().join("none/uet.sock");
    let socket = socket.to_str().unwrap();
    let read = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--socket", socket]);
        env.uet(&all).expect(0)
    };
    let runs: serde_json::Value =
        serde_json::from_str(&read(&["runs", "--json"]).stdout()).unwrap();
    assert_eq!(runs[0]["run_id"], 1);
    assert_eq!(runs[0]["name"], "hello");
    assert_eq!(runs[0]["state"], "succeeded");
    let shown: serde_json::Value =
        serde_json::from_str(&read(&["show", "1", "--json"]).stdout()).unwrap();
    assert_eq!(
        shown["steps"], ran["steps"],
        "the same steps as `uet run --json` printed"
    );
    assert!(
        read(&["show", "1"])
            .stdout()
            .starts_with("run 1 `hello`: succeeded")
    );
    let events = read(&["events", "1", "--json"]).stdout();
    let kinds: Vec<String> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("run.created"));
    assert!(kinds.iter().any(|k| k == "run.succeeded"), "{kinds:?}");
    let top: serde_json::Value = serde_json::from_str(&read(&["top", "--json"]).stdout()).unwrap();
    assert!(top["status"].is_null() && top["runs"].as_array().unwrap().is_empty());
    // `--every` takes seconds, as its help says, or a duration with its unit
    for every in ["2", "0.5", "300ms"] {
        read(&["top", "--every", every, "--json"]);
    }
    let refused = env.uet(&["top", "--every", "0"]).expect(2).stderr();
    assert!(
        refused.contains("not a positive number of seconds"),
        "{refused}"
    );
    // an unknown run is the request's fault, as the daemon says it
    let mut args = vec!["show", "7", "--socket", socket];
    args.push("--json");
    env.uet(&args).expect(2);
}

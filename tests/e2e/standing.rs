//! Standing workflows: a `[trigger] watch` workflow re-runs when matching files in its
//! workstream change, debounced, one run at a time with at most one follow-up queued.

use std::time::Duration;

use crate::daemon::{Daemon, drop_file};
use crate::daemon_ops::wait_until;
use crate::util::Env;

fn standing_tools(env: &Env) {
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "note"
command = ["sh", "-c", "echo run >> ran.log; touch running; sleep {nap}; rm -f running; echo '{{}}'"]
"#,
    );
}

fn standing(nap: &str) -> String {
    format!(
        "name = \"docs\"\n[trigger]\nwatch = [\"docs/**/*.md\"]\ndebounce = \"150ms\"\n\
         [[steps]]\nid = \"n\"\ntool = \"note\"\nwith = {{ nap = \"{nap}\" }}\n"
    )
}

fn ended(runs: &[serde_json::Value]) -> usize {
    runs.iter()
        .filter(|r| !matches!(r["state"].as_str(), Some("pending" | "running")))
        .count()
}

#[test]
fn a_standing_workflow_runs_again_when_matching_files_change() {
    let env = Env::new();
    standing_tools(&env);
    std::fs::create_dir_all(env.ws.join("docs/guide")).unwrap();
    let daemon = Daemon::start(&env);
    drop_file(&env, "docs.toml", &standing("0"));
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded");
    assert!(
        runs[0]["trigger"].as_str().unwrap().contains("standing"),
        "{runs:?}"
    );

    // a burst of writes to matching files is one run, and says which files
    for i in 0..5 {
        env.write(&format!("docs/guide/page{i}.md"), "# hi\n");
    }
    let runs = daemon.wait_for_runs(&env, 2);
    let why = runs[1]["trigger"].as_str().unwrap();
    assert!(
        why.starts_with("trigger: changed: docs/guide/page"),
        "{why}"
    );
    assert!(why.contains("(+2 more)"), "{why}");

    // files the globs do not match start nothing
    env.write("notes.md", "no\n");
    env.write("docs/image.png", "no\n");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(daemon.runs(&env).len(), 2, "{:?}", daemon.runs(&env));
}

#[test]
fn changes_during_a_run_queue_exactly_one_follow_up() {
    let env = Env::new();
    standing_tools(&env);
    std::fs::create_dir_all(env.ws.join("docs")).unwrap();
    let daemon = Daemon::start(&env);
    drop_file(&env, "docs.toml", &standing("1.5"));
    wait_until("the first run's step is running", || {
        env.ws.join("running").exists()
    });
    // three separate changes, each past the debounce window, while the run goes on
    for i in 0..3 {
        env.write(&format!("docs/{i}.md"), "x\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_until("two runs have ended", || ended(&daemon.runs(&env)) >= 2);
    std::thread::sleep(Duration::from_millis(2500));
    let runs = daemon.runs(&env);
    assert_eq!(runs.len(), 2, "one follow-up, not one per change: {runs:?}");
    assert!(
        runs[1]["trigger"]
            .as_str()
            .unwrap()
            .contains("changed during run"),
        "{runs:?}"
    );
}

#[test]
fn a_standing_workflow_survives_a_restart_and_can_be_withdrawn() {
    let env = Env::new();
    standing_tools(&env);
    std::fs::create_dir_all(env.ws.join("docs")).unwrap();
    let mut daemon = Daemon::start(&env);
    drop_file(&env, "docs.toml", &standing("0"));
    daemon.wait_for_runs(&env, 1);
    daemon.client(&env, &["shutdown"]).expect(0);
    daemon.child.wait().unwrap();
    drop(daemon);

    let daemon = Daemon::start(&env);
    env.write("docs/new.md", "x\n");
    let runs = daemon.wait_for_runs(&env, 2);
    assert!(runs[1]["trigger"].as_str().unwrap().contains("docs/new.md"));

    // the same name with an empty watch list withdraws it (after running once)
    drop_file(
        &env,
        "docs.toml",
        "name = \"docs\"\n[trigger]\nwatch = []\n[[steps]]\nid = \"n\"\ntool = \"note\"\nwith = { nap = \"0\" }\n",
    );
    daemon.wait_for_runs(&env, 3);
    env.write("docs/other.md", "x\n");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(daemon.runs(&env).len(), 3);
}

fn scheduled(catch_up: &str) -> String {
    // every two seconds (croner's six-field form, seconds first): a test cannot wait hours
    format!(
        "name = \"tick\"\n[trigger]\nschedule = \"*/2 * * * * *\"\ncatch_up = \"{catch_up}\"\n\
         [[steps]]\nid = \"n\"\ntool = \"note\"\nwith = {{ nap = \"0\" }}\n"
    )
}

#[test]
fn a_scheduled_workflow_runs_at_its_times_is_listed_and_can_be_unwatched() {
    let env = Env::new();
    standing_tools(&env);
    let mut daemon = Daemon::start(&env);
    drop_file(&env, "tick.toml", &scheduled("none"));
    // the drop's own run, then runs at the schedule's times
    let runs = daemon.wait_for_runs(&env, 3);
    assert!(
        runs[0]["trigger"]
            .as_str()
            .unwrap()
            .contains("standing: runs again at `*/2 * * * * *` (UTC)"),
        "{runs:?}"
    );
    let why = runs[2]["trigger"].as_str().unwrap();
    assert!(why.starts_with("trigger: schedule "), "{why}");
    assert!(why.contains("(`*/2 * * * * *`, UTC)"), "{why}");

    // listed, with its next time, in status and in top
    let shown = daemon.status(&env);
    let standing = &shown["standing"][0];
    assert_eq!(standing["name"], "tick", "{shown}");
    assert_eq!(standing["schedule"], "*/2 * * * * *");
    assert_eq!(standing["timezone"], "UTC");
    assert!(standing["next_at"].as_u64().unwrap() > 0);
    let text = daemon.client(&env, &["status"]).expect(0).stdout();
    assert!(text.contains("standing: tick in "), "{text}");
    assert!(text.contains("at `*/2 * * * * *` (UTC, next "), "{text}");
    let top = daemon.client(&env, &["top"]).expect(0).stdout();
    assert!(top.contains("standing: tick in "), "{top}");

    // withdrawn: no run after the one that may be going, now or after a restart
    let err = daemon.client(&env, &["unwatch", "nope"]).expect(2).stderr();
    assert!(
        err.contains("no standing workflow `nope` (standing: tick)"),
        "{err}"
    );
    let said = daemon.client(&env, &["unwatch", "tick"]).expect(0).stdout();
    assert!(said.contains("standing workflow `tick` of"), "{said}");
    std::thread::sleep(Duration::from_millis(600));
    let settled = ended(&daemon.runs(&env));
    std::thread::sleep(Duration::from_millis(3000));
    let runs = daemon.runs(&env);
    assert_eq!(runs.len(), settled, "{runs:?}");
    assert_eq!(daemon.status(&env)["standing"], serde_json::json!([]));
    daemon.client(&env, &["shutdown", "--wait"]).expect(0);
    daemon.child.wait().unwrap();
    drop(daemon);
    let daemon = Daemon::start(&env);
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(daemon.runs(&env).len(), settled);
}

#[test]
fn a_daemon_stopped_over_scheduled_times_catches_up_once_when_asked() {
    let env = Env::new();
    standing_tools(&env);
    // both registered by one daemon: a second start between them would itself catch up
    let mut daemon = Daemon::start(&env);
    for (file, catch_up) in [("one.toml", "one"), ("none.toml", "none")] {
        let text = scheduled(catch_up).replace("\"tick\"", &format!("\"{catch_up}\""));
        drop_file(&env, file, &text);
        wait_until("its first run", || {
            daemon
                .runs(&env)
                .iter()
                .any(|r| r["name"] == catch_up && r["state"] == "succeeded")
        });
    }
    daemon.client(&env, &["shutdown", "--wait"]).expect(0);
    daemon.child.wait().unwrap();
    drop(daemon);
    // stopped over at least two scheduled times
    std::thread::sleep(Duration::from_millis(4500));
    let daemon = Daemon::start(&env);
    wait_until("the catch-up run", || {
        daemon
            .runs(&env)
            .iter()
            .any(|r| r["trigger"].as_str().unwrap_or("").contains("caught up"))
    });
    let runs = daemon.runs(&env);
    let caught: Vec<&serde_json::Value> = runs
        .iter()
        .filter(|r| r["trigger"].as_str().unwrap_or("").contains("caught up"))
        .collect();
    assert_eq!(
        caught.len(),
        1,
        "one run stands for all it missed: {runs:?}"
    );
    assert_eq!(caught[0]["name"], "one");
}

#[test]
fn a_bad_schedule_or_zone_is_a_located_error() {
    let env = Env::new();
    standing_tools(&env);
    env.write(
        "bad.toml",
        "name = \"bad\"\n[trigger]\nschedule = \"61 * * * *\"\ntimezone = \"Mars/Olympus\"\ncatch_up = \"all\"\n[[steps]]\nid = \"n\"\ntool = \"note\"\nwith = { nap = \"0\" }\n",
    );
    let err = env.uet(&["validate", "bad.toml"]).expect(2).stderr();
    assert!(
        err.contains("bad.toml:3:12: trigger.schedule: bad cron schedule"),
        "{err}"
    );
    assert!(
        err.contains("bad.toml:4:12: trigger.timezone: unknown time zone"),
        "{err}"
    );
    assert!(err.contains("bad.toml:5:12: trigger.catch_up"), "{err}");
}

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

//! Progress and ETA: estimated from the recorded durations of earlier attempts, along the
//! remaining critical path and `max_parallel`; kept in the state.

use std::time::Duration;

use crate::daemon::{Daemon, drop_file};
use crate::daemon_ops::wait_until;
use crate::util::Env;

/// The ETA a just-recorded run of `file` gets from the history in the state, then the time
/// the same workflow actually takes, both in seconds.
fn eta_then_actual(env: &Env, file: &str) -> (f64, f64) {
    let eta = {
        let store = uet::state::Store::open(&env.state).unwrap();
        let tools = uet::spec::tools::Tools::load(&env.ws.join("tools.toml")).unwrap();
        let plan = uet::spec::workflow::load(&env.ws.join(file), &tools).unwrap();
        let ids: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
        let run = store.create_run(&plan.name, file, "", &plan, &ids).unwrap();
        let p = uet::engine::progress::load(&store, run).unwrap().unwrap();
        assert_eq!((p.done, p.total), (0, ids.len()));
        p.eta_seconds.expect("history gives an ETA")
    };
    let (run, out) = env.run_json(file);
    run.expect(0);
    let actual = out["duration_ms"].as_u64().unwrap() as f64 / 1000.0;
    assert_eq!(out["progress"]["percent"], 100.0);
    assert_eq!(out["progress"]["eta_seconds"], 0.0);
    (eta, actual)
}

#[test]
fn the_eta_from_history_matches_a_chain_and_a_wide_dag() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"nap\"\ncommand = [\"sh\", \"-c\", \"sleep 0.4; echo '{{}}'\"]\n",
    );
    let mut seed = String::from("name = \"seed\"\nmax_parallel = 5\n");
    for i in 0..5 {
        seed.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"nap\"\n"));
    }
    env.write("seed.toml", &seed);
    env.run_json("seed.toml").0.expect(0);

    let mut chain = String::from("name = \"chain\"\n");
    for i in 0..5 {
        chain.push_str(&format!("[[steps]]\nid = \"c{i}\"\ntool = \"nap\"\n"));
        if i > 0 {
            chain.push_str(&format!("needs = [\"c{}\"]\n", i - 1));
        }
    }
    env.write("chain.toml", &chain);
    let mut wide = String::from("name = \"wide\"\nmax_parallel = 2\n");
    for i in 0..8 {
        wide.push_str(&format!("[[steps]]\nid = \"w{i}\"\ntool = \"nap\"\n"));
    }
    env.write("wide.toml", &wide);

    // stated tolerance: within 25% of the actual time
    for file in ["chain.toml", "wide.toml"] {
        let (eta, actual) = eta_then_actual(&env, file);
        let off = (eta - actual).abs() / actual;
        assert!(off < 0.25, "{file}: eta {eta:.2}s, actual {actual:.2}s");
    }
}

#[test]
fn progress_is_kept_in_the_state_across_a_daemon_restart() {
    let env = Env::new();
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "note"
command = ["sh", "-c", "echo '{{}}'"]

[[tools]]
name = "stall"
command = ["sh", "-c", "touch stalled; test -e open || sleep 30; echo '{{}}'"]
"#,
    );
    let show = |daemon: &Daemon| -> serde_json::Value {
        serde_json::from_str(
            &daemon
                .client(&env, &["show", "1", "--json"])
                .expect(0)
                .stdout(),
        )
        .unwrap()
    };
    let config = env.ws.parent().unwrap().join("daemon.toml");
    std::fs::write(&config, "grace = \"100ms\"\n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let mut daemon = Daemon::start_with(&env, &["--config", &config]);
    drop_file(
        &env,
        "three.toml",
        "name = \"three\"\n[[steps]]\nid = \"a\"\ntool = \"note\"\n\
         [[steps]]\nid = \"b\"\ntool = \"stall\"\nneeds = [\"a\"]\n\
         [[steps]]\nid = \"c\"\ntool = \"note\"\nneeds = [\"b\"]\n",
    );
    wait_until("b is running", || env.ws.join("stalled").exists());
    let before = show(&daemon);
    assert_eq!(before["progress"]["done"], 1, "{before}");
    assert_eq!(before["progress"]["running"], 1);
    assert_eq!(before["progress"]["total"], 3);
    let text = daemon.client(&env, &["show", "1"]).expect(0).stdout();
    assert!(text.contains("1/3 done · 1 running"), "{text}");

    daemon.client(&env, &["shutdown"]).expect(0);
    daemon.child.wait().unwrap();
    drop(daemon);
    std::fs::remove_file(env.ws.join("stalled")).unwrap();
    let daemon = Daemon::start_with(&env, &["--config", &config]);
    wait_until("b runs again", || env.ws.join("stalled").exists());
    let after = show(&daemon);
    assert_eq!(after["progress"]["done"], 1, "a stays done: {after}");
    assert!(after["progress"]["percent"].as_f64().unwrap() >= 33.3);
    env.write("open", "");
    daemon.client(&env, &["cancel", "1"]).expect(0);
    std::thread::sleep(Duration::from_millis(100));
}

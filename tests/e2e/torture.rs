//! Crash torture: a daemon with many runs in flight is `kill -9`ed at random moments, again and
//! again, then left to finish. Every run must end, no step recorded as succeeded may run again,
//! no dropped file may be lost or run twice, and the state must open cleanly after every kill.
//!
//! `UET_TORTURE_ROUNDS` sets the number of kills (CI runs a short form; try 100 locally) and
//! `UET_TORTURE_SEED` replays a sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use crate::daemon::{Daemon, drop_file};
use crate::util::Env;

fn torture_tools(env: &Env) {
    // every execution of a step appends `run step attempt` to a side log before doing anything
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "work"
command = ["sh", "-c", "echo \"$UET_RUN_ID $UET_STEP_ID $UET_ATTEMPT\" >> side.log; sleep {nap}; echo '{{\"ok\": true}}'"]
"#,
    );
}

/// A workflow of 4 to 8 steps, some chained, some parallel, each napping 0 to 150 ms.
fn workflow(name: &str, rng: &mut rand::rngs::SmallRng) -> String {
    let steps = rng.random_range(4..=8);
    let mut text = format!("name = \"{name}\"\nmax_parallel = 3\n");
    for i in 0..steps {
        let nap = rng.random_range(0..=150) as f64 / 1000.0;
        text.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"work\"\nwith = {{ nap = \"{nap}\" }}\n"
        ));
        if i > 0 && rng.random_bool(0.5) {
            text.push_str(&format!("needs = [\"s{}\"]\n", rng.random_range(0..i)));
        }
    }
    text
}

#[test]
fn kill_9_at_random_moments_loses_nothing_and_repeats_no_success() {
    let rounds: usize = std::env::var("UET_TORTURE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed: u64 = std::env::var("UET_TORTURE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("torture: {rounds} rounds, UET_TORTURE_SEED={seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let env = Env::new();
    torture_tools(&env);
    let mut dropped = BTreeSet::new();
    let mut next = 0;
    // kills after which opening the state replayed the journal's batches into the database
    let mut replays = 0;
    let mut drop_some = |env: &Env, rng: &mut rand::rngs::SmallRng, n: usize| {
        for _ in 0..n {
            let name = format!("w{next:04}");
            next += 1;
            drop_file(env, &format!("{name}.toml"), &workflow(&name, rng));
            dropped.insert(name);
        }
    };
    for round in 0..rounds {
        let mut daemon = Daemon::start(&env);
        let n = rng.random_range(1..=4);
        drop_some(&env, &mut rng, n);
        std::thread::sleep(Duration::from_millis(rng.random_range(20..=600)));
        daemon.child.kill().unwrap();
        daemon.child.wait().unwrap();
        drop(daemon);
        // the state opens cleanly after every kill
        let store = uet::state::Store::open(&env.state)
            .unwrap_or_else(|e| panic!("round {round}: the state does not open: {e}"));
        replays += usize::from(store.replayed_at_open() > 0);
        drop(store);
        // files keep arriving while no daemon runs
        if rng.random_bool(0.3) {
            drop_some(&env, &mut rng, 1);
        }
    }

    // then left alone: quarantined runs (in flight during repeated kills) are released by hand,
    // as a person would, until every run has succeeded
    let daemon = Daemon::start(&env);
    let waited = Instant::now();
    let mut released = 0;
    loop {
        let runs = daemon.runs(&env);
        let mut open = 0;
        for r in &runs {
            match r["state"].as_str().unwrap() {
                "succeeded" => {}
                "quarantined" => {
                    let id = r["run_id"].to_string();
                    daemon.client(&env, &["release", &id]).expect(0);
                    released += 1;
                    open += 1;
                }
                "failed" | "canceled" => panic!("a run ended badly: {r}"),
                _ => open += 1,
            }
        }
        if open == 0 && runs.len() == dropped.len() {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "runs never finished (seed {seed}): {runs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs = daemon.runs(&env);
    drop(daemon);

    // every drop became exactly one run
    let names: Vec<String> = runs
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let unique: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(unique.len(), names.len(), "a drop ran twice (seed {seed})");
    assert_eq!(unique, dropped, "a drop was lost (seed {seed})");
    assert!(
        std::fs::read_dir(&env.ws)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('w')),
        "every drop left the folder"
    );

    // no step ran again after its success was recorded, and every execution had an attempt
    // record before it began
    let mut executions: BTreeMap<(u64, String), Vec<u32>> = BTreeMap::new();
    for line in env.read("side.log").lines() {
        let mut parts = line.split(' ');
        let (run, step, attempt) = (parts.next(), parts.next(), parts.next());
        let (Some(run), Some(step), Some(attempt)) = (run, step, attempt) else {
            continue; // a line cut short by a kill
        };
        let (Ok(run), Ok(attempt)) = (run.parse::<u64>(), attempt.parse::<u32>()) else {
            continue;
        };
        executions
            .entry((run, step.to_string()))
            .or_default()
            .push(attempt);
    }
    let store = uet::state::Store::open(&env.state).unwrap();
    let mut checked = 0;
    let mut interrupted = 0;
    for r in store.runs().unwrap() {
        for step in store.steps(r.id).unwrap() {
            let attempts = store.attempts(r.id, &step.id).unwrap();
            let won = attempts
                .iter()
                .filter(|a| a.outcome == Some(uet::model::Outcome::Succeeded))
                .map(|a| a.number)
                .collect::<Vec<_>>();
            assert_eq!(won.len(), 1, "run {} step {}: {attempts:?}", r.id, step.id);
            interrupted += attempts
                .iter()
                .filter(|a| a.outcome == Some(uet::model::Outcome::Interrupted))
                .count();
            let ran = executions
                .get(&(r.id, step.id.clone()))
                .cloned()
                .unwrap_or_default();
            assert!(
                ran.iter().all(|&n| n <= won[0]),
                "run {} step {} ran again after attempt {} succeeded: {ran:?} (seed {seed})",
                r.id,
                step.id,
                won[0]
            );
            assert!(
                ran.iter().all(|&n| n as usize <= attempts.len()),
                "an execution without an attempt record: {ran:?} vs {attempts:?}"
            );
            checked += 1;
        }
        assert!(store.verify(r.id).unwrap().is_ok(), "run {}'s log", r.id);
    }
    assert!(checked >= dropped.len() * 4);
    eprintln!(
        "torture: {} runs, {checked} steps, {interrupted} attempts cut off by a kill, \
         {released} quarantined runs released, the journal replayed after {replays} kills",
        dropped.len()
    );
    // the kills must have landed mid-step and between checkpoints, or this test tested nothing
    assert!(rounds < 5 || (interrupted > 0 && replays > 0));
}

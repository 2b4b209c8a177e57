//! The floor under a command step: what starting `true` and waiting for it costs this machine
//! before uet records anything. 2,000 times each, one after the other (as a chain runs them):
//! a plain spawn and wait, the same with the three pipes and the process group uet gives every
//! attempt, that through tokio on a current-thread runtime with the attempt's four `UET_*`
//! variables, and uet's own spawn (`posix_spawnp`, waited for on a pidfd) with the same. Set
//! against `make -j1` over as many targets (`scripts/bench`), it says how much of a command
//! chain's ratio to make is the state's and uet's own work, and how much is spawning.
//!
//! `cargo bench -p uet --bench spawn`

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const STEPS: u32 = 2000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let argv = ["true".to_string()];
    // the variants take turns, so a slower minute of a shared host weighs on each alike
    let mut took = [Duration::ZERO; 4];
    runtime.block_on(async {
        for _ in 0..STEPS {
            let t = Instant::now();
            std::process::Command::new("true").status().unwrap();
            took[0] += t.elapsed();

            let t = Instant::now();
            let mut cmd = std::process::Command::new("true");
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            cmd.spawn().unwrap().wait_with_output().unwrap();
            took[1] += t.elapsed();

            let t = Instant::now();
            let mut cmd = tokio::process::Command::new("true");
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .envs(attempt_env())
                .kill_on_drop(true);
            cmd.spawn().unwrap().wait_with_output().await.unwrap();
            took[2] += t.elapsed();

            let t = Instant::now();
            let child = uet::adapters::spawn::spawn(&argv, Path::new("."), &attempt_env()).unwrap();
            let uet::adapters::spawn::Child {
                stdin, mut waiter, ..
            } = child;
            drop(stdin);
            waiter.wait().await.unwrap();
            waiter.reap();
            took[3] += t.elapsed();
        }
    });
    println!("per step over {STEPS} runs of `true`, one after the other:");
    for (what, took) in [
        "spawn + wait",
        "with 3 pipes and a process group",
        "the same through tokio, with 4 variables set",
        "uet's spawn (posix_spawnp, pidfd), the same",
    ]
    .iter()
    .zip(took)
    {
        let per_step = took.as_secs_f64() * 1e6 / f64::from(STEPS);
        println!("  {what}: {per_step:.0} µs");
    }
}

/// The variables every attempt sets beside the inherited ones.
fn attempt_env() -> Vec<(String, String)> {
    ["UET_RUN_ID", "UET_STEP_ID", "UET_ATTEMPT", "UET_WORKSTREAM"]
        .iter()
        .map(|k| (k.to_string(), "1".to_string()))
        .collect()
}

//! The floor under a command step: what starting `true` and waiting for it costs this machine
//! before uet records anything. 2,000 times each, one after the other (as a chain runs them):
//! a plain spawn and wait, the same with the three pipes and the process group uet gives every
//! attempt, and that through tokio on a current-thread runtime, as `uet run` does it. Set
//! against `make -j1` over as many targets (`scripts/bench`), it says how much of a command
//! chain's ratio to make is the state's and uet's own work, and how much is spawning.
//!
//! `cargo bench -p uet --bench spawn`

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Instant;

const STEPS: u32 = 2000;

fn main() {
    println!("per step over {STEPS} runs of `true`, one after the other:");
    let t = Instant::now();
    for _ in 0..STEPS {
        std::process::Command::new("true").status().unwrap();
    }
    report("spawn + wait", t);

    let t = Instant::now();
    for _ in 0..STEPS {
        let mut cmd = std::process::Command::new("true");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd.spawn().unwrap().wait_with_output().unwrap();
    }
    report("with 3 pipes and a process group", t);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let t = Instant::now();
        for _ in 0..STEPS {
            let mut cmd = tokio::process::Command::new("true");
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true);
            cmd.spawn().unwrap().wait_with_output().await.unwrap();
        }
        report("the same through tokio (current thread)", t);
    });
}

fn report(what: &str, since: Instant) {
    let per_step = since.elapsed().as_secs_f64() * 1e6 / f64::from(STEPS);
    println!("  {what}: {per_step:.0} µs");
}

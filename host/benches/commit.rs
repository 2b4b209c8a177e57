//! What one step of a chain costs the state: the commit that records the end of one step and
//! the start of the next (the batch `uet run` writes between two steps of a chain), timed over
//! a 2,000-step run in a real redb file, beside the raw cost of one durable write (4 KiB +
//! fdatasync) in the same folder. The difference is redb's own work per commit.
//!
//! `cargo bench -p uet --bench commit`

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use uet::model::{Outcome, RunState, StepState};
use uet::store::{Change, Store};

fn main() {
    let n: usize = std::env::var("UET_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let steps: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let run = store
        .create_run("chain", "bench.toml", "/tmp", serde_json::json!({}), &steps)
        .unwrap();
    let started = |i: usize| {
        [
            Change::StepState {
                run,
                step: steps[i].clone(),
                to: StepState::Running,
                reason: None,
                output: None,
            },
            Change::AttemptStarted {
                run,
                step: steps[i].clone(),
                number: 1,
                tool: "true".into(),
            },
        ]
    };
    let ended = |i: usize| {
        [
            Change::AttemptFinished {
                run,
                step: steps[i].clone(),
                number: 1,
                outcome: Outcome::Succeeded,
                error: None,
                stdout: String::new(),
                stderr: String::new(),
                retry_at: None,
            },
            Change::StepState {
                run,
                step: steps[i].clone(),
                to: StepState::Succeeded,
                reason: None,
                output: Some(serde_json::Value::Null),
            },
        ]
    };
    let mut first = vec![Change::RunState {
        run,
        to: RunState::Running,
        reason: None,
    }];
    first.extend(started(0));
    store.apply(&first).unwrap();
    let mut commits = Vec::with_capacity(n);
    for i in 1..n {
        let mut batch = ended(i - 1).to_vec();
        batch.extend(started(i));
        let t = Instant::now();
        store.apply(&batch).unwrap();
        commits.push(t.elapsed());
    }

    let path = dir.path().join("fsync.bin");
    let file = std::fs::File::create(&path).unwrap();
    let block = [7u8; 4096];
    let mut writes = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        file.write_all_at(&block, 0).unwrap();
        file.sync_data().unwrap();
        writes.push(t.elapsed());
    }

    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "per commit over {} commits:", n - 1);
    report(&mut out, "end of a step + start of the next", &mut commits);
    report(
        &mut out,
        "raw durable write (4 KiB + fdatasync)",
        &mut writes,
    );
}

fn report(out: &mut impl Write, what: &str, times: &mut [Duration]) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let _ = writeln!(
        out,
        "  {what}: median {:.0} µs (p10 {:.0}, p90 {:.0})",
        at(0.5),
        at(0.1),
        at(0.9)
    );
}

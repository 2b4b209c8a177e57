//! What one step of a chain costs the state: the commit that records the end of one step and
//! the start of the next (the batch `uet run` writes between two steps of a chain), timed over
//! a 2,000-step run in a real state folder; the batch of a wide run at `max_parallel` 4 (four
//! ends and the four starts that refill the slots); and beside them the raw cost of one durable
//! write (4 KiB + fdatasync) in the same folder. The difference is the store's own work.
//!
//! Each commit is timed once the writer thread has put the batch before it into the database,
//! as it has in a run, where a step executes between two commits: the figure is the time a
//! commit keeps a step from starting. The raw write of as many scattered pages as a durable
//! redb commit writes shows what the journal spares.
//!
//! `cargo bench -p uet --bench commit`

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use uet::model::{Outcome, RunState, StepState};
use uet::state::{Change, Store};

/// Pages redb writes per commit of these batches (`strace -c -f` of this bench: 45,252
/// pwrites for 2,500 commits).
const PAGES: u64 = 18;

fn main() {
    let n: usize = std::env::var("UET_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let steps: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let run = store
        .create_run(
            "chain",
            "bench.toml",
            "/tmp",
            &serde_json::json!({}),
            &steps,
        )
        .unwrap();
    let (ended, started) = (batch(run, &steps, true), batch(run, &steps, false));
    let mut first = vec![Change::RunState {
        run,
        to: RunState::Running,
        reason: None,
    }];
    first.extend(started(0));
    store.apply(&first).unwrap();
    let mut commits = Vec::with_capacity(n);
    for i in 1..n {
        let mut changes = ended(i - 1).to_vec();
        changes.extend(started(i));
        // a read waits for the writer thread to catch up
        store.run(run).unwrap();
        let t = Instant::now();
        store.apply(&changes).unwrap();
        commits.push(t.elapsed());
    }

    // a wide run at max_parallel 4: four ends and the four starts that refill the slots
    let wide = store
        .create_run("wide", "bench.toml", "/tmp", &serde_json::json!({}), &steps)
        .unwrap();
    let (ended_w, started_w) = (batch(wide, &steps, true), batch(wide, &steps, false));
    let mut first = vec![Change::RunState {
        run: wide,
        to: RunState::Running,
        reason: None,
    }];
    (0..4).for_each(|i| first.extend(started_w(i)));
    store.apply(&first).unwrap();
    let mut wides = Vec::with_capacity(n / 4);
    for k in 1..n / 4 {
        let mut changes = Vec::new();
        (4 * (k - 1)..4 * k).for_each(|i| changes.extend(ended_w(i)));
        (4 * k..4 * k + 4).for_each(|i| changes.extend(started_w(i)));
        store.run(wide).unwrap();
        let t = Instant::now();
        store.apply(&changes).unwrap();
        wides.push(t.elapsed());
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

    // what redb writes per commit here (`strace -c -f`: about 18 pwrites, one page each, then
    // one fdatasync): as many pages written raw, scattered over a 4 MiB file
    let mut pages = Vec::with_capacity(n);
    for k in 0..n as u64 {
        let t = Instant::now();
        for p in 0..PAGES {
            let at = ((k * 7 + p * 131) % 1024) * 4096;
            file.write_all_at(&block, at).unwrap();
        }
        file.sync_data().unwrap();
        pages.push(t.elapsed());
    }

    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "per commit over {} commits:", n - 1);
    report(&mut out, "end of a step + start of the next", &mut commits);
    report(&mut out, "4 ends + 4 starts (wide)", &mut wides);
    report(
        &mut out,
        "raw durable write (4 KiB + fdatasync)",
        &mut writes,
    );
    report(
        &mut out,
        &format!("raw durable write of {PAGES} scattered pages (+ fdatasync)"),
        &mut pages,
    );
}

/// The changes that record step `i`'s start (`end` false) or its successful end.
fn batch(run: u64, steps: &[String], end: bool) -> impl Fn(usize) -> [Change; 2] + '_ {
    move |i| {
        let step = steps[i].clone();
        if end {
            [
                Change::AttemptFinished {
                    run,
                    step: step.clone(),
                    number: 1,
                    outcome: Outcome::Succeeded,
                    error: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    retry_at: None,
                },
                Change::StepState {
                    run,
                    step,
                    to: StepState::Succeeded,
                    reason: None,
                    output: Some(serde_json::Value::Null),
                },
            ]
        } else {
            [
                Change::StepState {
                    run,
                    step: step.clone(),
                    to: StepState::Running,
                    reason: None,
                    output: None,
                },
                Change::AttemptStarted {
                    run,
                    step,
                    number: 1,
                    tool: "true".into(),
                },
            ]
        }
    }
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

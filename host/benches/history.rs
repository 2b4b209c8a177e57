//! How `uet runs`, `uet show`, `uet status` and `uet top` answer with a long history: fills a state with
//! finished runs (100,000 by default; `UET_BENCH_RUNS` to change), starts the real daemon on it
//! and times the real client commands, end to end (the client process included).
//!
//! `cargo bench -p uet --bench history`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uet::model::{RunState, StepState};
use uet::state::{Change, Store};

fn main() {
    let n: u64 = std::env::var("UET_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let state = dir.path().join("state");
    let filled = Instant::now();
    {
        let store = Store::open(&state).unwrap();
        let steps = vec!["a".to_string()];
        let plan = serde_json::json!({});
        for _ in 0..n {
            let run = store
                .create_run("history", "bench.toml", "/tmp", &plan, &steps)
                .unwrap();
            let step = |to| Change::StepState {
                run,
                step: "a".into(),
                to,
                reason: None,
                output: Some(serde_json::json!({"ok": true})),
            };
            let to = |to| Change::RunState {
                run,
                to,
                reason: None,
            };
            store
                .apply(&[
                    to(RunState::Running),
                    step(StepState::Running),
                    step(StepState::Succeeded),
                    to(RunState::Succeeded),
                ])
                .unwrap();
        }
    }
    let bytes = std::fs::metadata(state.join(uet::state::STATE_FILE))
        .unwrap()
        .len();
    println!(
        "history: {n} finished runs written in {:.1?}; state file {:.1} MB ({} bytes per run)",
        filled.elapsed(),
        bytes as f64 / 1e6,
        bytes / n
    );

    let uet = env!("CARGO_BIN_EXE_uet");
    let socket = dir.path().join("sock/uet.sock");
    let watch = dir.path().join("ws");
    std::fs::create_dir_all(&watch).unwrap();
    let mut daemon = Command::new(uet)
        .args(["daemon", "--watch"])
        .arg(&watch)
        .arg("--state")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = |args: &[&str]| {
        let out = Command::new(uet)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        out.status.success()
    };
    let started = Instant::now();
    while !client(&["status"]) {
        assert!(started.elapsed() < Duration::from_secs(60), "no daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = n.to_string();
    let cases: [(&str, Vec<&str>); 4] = [
        ("uet runs --json (latest 1,000)", vec!["runs", "--json"]),
        ("uet show RUN --json", vec!["show", &last, "--json"]),
        ("uet status --json", vec!["status", "--json"]),
        ("uet top --json", vec!["top", "--json"]),
    ];
    for (name, args) in &cases {
        let mut times: Vec<Duration> = (0..7)
            .map(|_| {
                let t = Instant::now();
                assert!(client(args), "{name} failed");
                t.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "{name}: median {:.1?} (min {:.1?}, max {:.1?}) with {n} runs",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    // every run at once is more than one frame holds at this size: refused, with a hint
    let all = Command::new(uet)
        .args(["runs", "--all", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    println!(
        "uet runs --all --json: exit {}, {}",
        all.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&all.stderr).trim()
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}

//! Circuit breakers, failover, quarantine and waiting points, through `uet run` on a shared
//! state folder (each `uet run` is a new process: what one learns, the next one knows).

use std::time::{Duration, Instant};

use crate::util::{Env, step};

/// `bad` always fails and logs the time of each call; `backup` has the same capability and
/// works; `flaky` fails its first two calls in this workstream, then works.
fn breaker_tools(env: &Env, bad_breaker: &str) {
    env.write(
        "tools.toml",
        &format!(
            r#"
[[tools]]
name = "bad"
command = ["sh", "-c", "date +%s%N >> bad.calls; exit 1"]
capabilities = ["lint"]
breaker = {bad_breaker}

[[tools]]
name = "backup"
command = ["sh", "-c", "echo backup >> backup.calls; echo '{{{{\"by\": \"backup\"}}}}'"]
capabilities = ["lint"]

[[tools]]
name = "flaky"
command = ["sh", "-c", "echo x >> flaky.calls; [ $(wc -l < flaky.calls) -gt 2 ] && echo '{{{{}}}}'"]
breaker = {{ failures = 2, cool_down = "300ms" }}
"#
        ),
    );
}

fn calls(env: &Env, file: &str) -> Vec<u64> {
    std::fs::read_to_string(env.ws.join(file))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse::<u64>().unwrap_or(0))
        .collect()
}

fn event_kinds(env: &Env, run: u64) -> Vec<String> {
    let store = uet::state::Store::open(&env.state).unwrap();
    store
        .events(run)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[test]
fn an_always_failing_tool_opens_its_breaker_and_the_run_is_quarantined_at_its_deadline() {
    let env = Env::new();
    breaker_tools(&env, r#"{ failures = 3, cool_down = "2500ms" }"#);
    let mut wf = String::from("name = \"ten\"\ntimeout = \"4s\"\n");
    for i in 0..10 {
        wf.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"bad\"\n"));
    }
    env.write("ten.toml", &wf);
    let started = Instant::now();
    let (run, out) = env.run_json("ten.toml");
    run.expect(1);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out["state"], "quarantined", "{out}");
    let reason = out["reason"].as_str().unwrap();
    assert!(
        reason.contains("`bad`") && reason.contains("stayed open"),
        "{reason}"
    );

    let times = calls(&env, "bad.calls");
    assert_eq!(
        times.len(),
        4,
        "3 failures open it, then one probe: {times:?}"
    );
    // nothing is called while it is open: the probe comes a whole cool-down after the third
    let gap = Duration::from_nanos(times[3] - times[2]);
    assert!(gap >= Duration::from_millis(2450), "probe after {gap:?}");
    let kinds = event_kinds(&env, 1);
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("no {k} event: {kinds:?}"))
    };
    assert!(
        pos("breaker.opened") < pos("breaker.half_open"),
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| *k == "breaker.opened").count(), 2);
    // waiting steps used no attempts
    let waited: Vec<&serde_json::Value> = out["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "canceled")
        .collect();
    assert_eq!(waited.len(), 6, "{out}");
    assert!(waited.iter().all(|s| s["attempts"] == 0));
}

#[test]
fn a_flaky_tool_recovers_and_its_breaker_closes() {
    let env = Env::new();
    breaker_tools(&env, r#"{ failures = 3, cool_down = "1s" }"#);
    let mut wf = String::from("name = \"flaky\"\nmax_parallel = 1\n[defaults]\nretries = 3\n");
    for i in 0..5 {
        wf.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"flaky\"\nretry = {{ base = \"50ms\", max = \"50ms\", jitter = false }}\n"
        ));
    }
    env.write("flaky.toml", &wf);
    let (run, out) = env.run_json("flaky.toml");
    run.expect(0);
    assert_eq!(out["state"], "succeeded");
    let calls = env.read("flaky.calls").lines().count();
    assert_eq!(calls, 7, "2 failures, then one success per step");
    let kinds = event_kinds(&env, 1);
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("no {k} event: {kinds:?}"))
    };
    assert!(
        pos("breaker.opened") < pos("breaker.half_open"),
        "{kinds:?}"
    );
    assert!(
        pos("breaker.half_open") < pos("breaker.closed"),
        "{kinds:?}"
    );

    let listed = env
        .uet(&["tools", "--json", "--socket", "/nonexistent/uet.sock"])
        .expect(0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed.stdout()).unwrap();
    let flaky = rows.iter().find(|r| r["name"] == "flaky").unwrap();
    assert_eq!(flaky["breaker"]["state"], "closed", "{flaky}");
    assert_eq!(flaky["breaker"]["failures"], 0);
    let backup = rows.iter().find(|r| r["name"] == "backup").unwrap();
    assert!(backup["breaker"].is_null(), "no breaker configured");
}

#[test]
fn capability_steps_fail_over_while_a_breaker_is_open_and_it_stays_open_across_runs() {
    let env = Env::new();
    breaker_tools(&env, r#"{ failures = 1, cool_down = "60s" }"#);
    env.write(
        "first.toml",
        "name = \"first\"\n[[steps]]\nid = \"direct\"\ntool = \"bad\"\n",
    );
    env.run_json("first.toml").0.expect(1);
    assert_eq!(calls(&env, "bad.calls").len(), 1);

    // a new process on the same state: the breaker is still open, so the router passes over
    // `bad` to the next tool with the capability, without calling `bad`
    env.write(
        "second.toml",
        "name = \"second\"\n[[steps]]\nid = \"lint\"\ncapability = \"lint\"\n",
    );
    let (run, out) = env.run_json("second.toml");
    run.expect(0);
    assert_eq!(step(&out, "lint")["tool"], "backup");
    assert_eq!(step(&out, "lint")["output"]["by"], "backup");
    assert_eq!(
        calls(&env, "bad.calls").len(),
        1,
        "an open breaker is not called"
    );

    let listed = env
        .uet(&["tools", "--socket", "/nonexistent/uet.sock"])
        .expect(0)
        .stdout();
    let line = listed.lines().find(|l| l.starts_with("bad ")).unwrap();
    assert!(line.contains("open (1 failures; probe in"), "{listed}");
    let json = env
        .uet(&["tools", "--json", "--socket", "/nonexistent/uet.sock"])
        .expect(0)
        .stdout();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let bad = rows.iter().find(|r| r["name"] == "bad").unwrap();
    assert_eq!(bad["breaker"]["state"], "open");
    assert!(
        bad["breaker"]["probe_in_ms"].as_u64().unwrap() > 50_000,
        "{bad}"
    );
}

#[test]
fn a_step_waiting_behind_an_open_breaker_is_canceled_at_once() {
    let env = Env::new();
    breaker_tools(&env, r#"{ failures = 1, cool_down = "60s" }"#);
    env.write(
        "first.toml",
        "name = \"first\"\n[[steps]]\nid = \"direct\"\ntool = \"bad\"\n",
    );
    env.run_json("first.toml").0.expect(1);
    // the step waits for a probe a minute away; Ctrl-C ends the wait at once
    env.write(
        "wait.toml",
        "name = \"wait\"\n[[steps]]\nid = \"w\"\ntool = \"bad\"\n\
         [[steps]]\nid = \"mark\"\ntool = \"backup\"\n",
    );
    let started = Instant::now();
    let (code, out) = env.interrupt_run("wait.toml", "backup.calls");
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out["state"], "canceled");
    assert_eq!(step(&out, "w")["attempts"], 0);
}

#[test]
fn a_deadline_ends_a_run_waiting_in_backoff_at_once() {
    let env = Env::new();
    breaker_tools(&env, r#"{ failures = 100, cool_down = "1s" }"#);
    env.write(
        "slow.toml",
        "name = \"slow\"\ntimeout = \"1s\"\n[[steps]]\nid = \"b\"\ntool = \"bad\"\nretries = 5\n\
         retry = { base = \"30s\", max = \"30s\", jitter = false }\n",
    );
    let started = Instant::now();
    let (run, out) = env.run_json("slow.toml");
    run.expect(1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out["state"], "failed");
    assert!(
        out["reason"].as_str().unwrap().contains("run timed out"),
        "{out}"
    );
    assert_eq!(
        step(&out, "b")["attempts"],
        1,
        "the retry was still 30 s away"
    );
    // the attempt's record says when the next one was due
    let store = uet::state::Store::open(&env.state).unwrap();
    let attempts = store.attempts(1, "b").unwrap();
    let first = &attempts[0];
    let due = first.retry_at.unwrap() - first.finished_at.unwrap();
    assert!((29_000..=30_100).contains(&due), "{due}");
    assert!(
        first.error.as_deref().unwrap().contains("exit"),
        "{first:?}"
    );
}

#[test]
fn a_cancel_ends_a_run_waiting_in_backoff_at_once() {
    let env = Env::new();
    breaker_tools(&env, r#"{ failures = 100, cool_down = "1s" }"#);
    // `bad` fails and its retry is 30 s away; `backup` marks the moment the wait has begun
    env.write(
        "wait.toml",
        "name = \"wait\"\nmax_parallel = 1\n[[steps]]\nid = \"b\"\ntool = \"bad\"\nretries = 5\n\
         retry = { base = \"30s\", max = \"30s\", jitter = false }\npriority = 1\n\
         [[steps]]\nid = \"mark\"\ntool = \"backup\"\n",
    );
    let started = Instant::now();
    let (code, out) = env.interrupt_run("wait.toml", "backup.calls");
    assert_eq!(code, 1, "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out["state"], "canceled", "{out}");
    assert_eq!(step(&out, "b")["attempts"], 1, "the retry never came");
    assert_eq!(calls(&env, "bad.calls").len(), 1);
}

#[test]
fn a_cancel_ends_steps_waiting_in_the_ready_queue() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"slow\"\ncommand = [\"sh\", \"-c\", \"echo x >> slow.calls; sleep 30\"]\n",
    );
    // one slot: the first step runs, the others wait in the queue
    let mut wf = String::from("name = \"queue\"\nmax_parallel = 1\n");
    for i in 0..5 {
        wf.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"slow\"\n"));
    }
    env.write("queue.toml", &wf);
    let started = Instant::now();
    let (code, out) = env.interrupt_run("queue.toml", "slow.calls");
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out["state"], "canceled", "{out}");
    let steps = out["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["state"] == "canceled"), "{out}");
    let queued: Vec<_> = steps.iter().filter(|s| s["attempts"] == 0).collect();
    assert_eq!(queued.len(), 4, "{out}");
    assert_eq!(env.read("slow.calls").lines().count(), 1);
}

#[test]
fn a_slow_healthy_tool_at_the_deadline_fails_the_run_rather_than_quarantining_it() {
    let env = Env::new();
    // a breaker that never opens here, but limits how many attempts run at once: the steps
    // that wait for room are not waiting on a failing tool
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"slow\"\ncommand = [\"sleep\", \"5\"]\n\
         breaker = { failures = 2, cool_down = \"1s\" }\n",
    );
    let mut wf = String::from("name = \"slow\"\ntimeout = \"1s\"\nmax_parallel = 6\n");
    for i in 0..6 {
        wf.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"slow\"\n"));
    }
    env.write("slow.toml", &wf);
    let (run, out) = env.run_json("slow.toml");
    run.expect(1);
    assert_eq!(out["state"], "failed", "{out}");
    assert!(
        out["reason"].as_str().unwrap().contains("run timed out"),
        "{out}"
    );
}

#[test]
fn failures_of_the_input_do_not_count_against_the_tool() {
    let env = Env::new();
    // exit 2 is listed as fatal: the tool said this input cannot work, not that it is broken
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"picky\"\ncommand = [\"sh\", \"-c\", \"echo x >> picky.calls; exit 2\"]\n\
         exit_codes = { fatal = [2] }\nretries = 3\nbreaker = { failures = 2, cool_down = \"60s\" }\n",
    );
    let mut wf = String::from("name = \"picky\"\nmax_parallel = 1\n");
    for i in 0..4 {
        wf.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"picky\"\n"));
    }
    env.write("picky.toml", &wf);
    let (run, out) = env.run_json("picky.toml");
    run.expect(1);
    assert_eq!(out["state"], "failed", "{out}");
    // no retries (fatal), and every step reached the tool: its breaker never opened
    assert_eq!(env.read("picky.calls").lines().count(), 4, "{out}");
    let steps = out["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["attempts"] == 1), "{out}");
    assert!(!event_kinds(&env, 1).iter().any(|k| k == "breaker.opened"));
}

//! `uet run`: scheduling, data flow, failures, retries, timeouts, routing.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{Env, gone, step};

/// Tools every test here can use.
fn tools(env: &Env) {
    env.script("bin/add", r#"printf '{"n": %d}\n' $(( $1 + 1 ))"#);
    env.script(
        "bin/flaky",
        // fails until its third call: the count lives in the workstream, as a real tool's
        // external state would
        r#"n=$(cat .calls 2>/dev/null || echo 0); n=$((n + 1)); echo $n > .calls
if [ "$n" -lt 3 ]; then echo "not yet ($n)" >&2; exit 1; fi
echo '{"calls": '$n'}'"#,
    );
    env.script(
        "bin/slow",
        r#"echo "start $(date +%s%N) $1" >> parallel.log; sleep 0.3; echo "end $(date +%s%N) $1" >> parallel.log; echo '{}'"#,
    );
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "echo"
command = ["cat"]
capabilities = ["text.echo"]

[[tools]]
name = "echo-too"
command = ["cat"]
capabilities = ["text.echo", "text.other"]

[[tools]]
name = "add"
command = ["bin/add", "{n}"]

[[tools]]
name = "fail"
command = ["sh", "-c", "echo boom >&2; exit 3"]
retry = { base = "1ms", max = "5ms" }

[[tools]]
name = "flaky"
command = ["bin/flaky"]
retry = { base = "10ms", max = "20ms" }

[[tools]]
name = "sleepy"
command = ["sh", "-c", "echo $$ > {pidfile}; sleep 30 & echo $! >> {pidfile}; touch {pidfile}.done; wait"]

[[tools]]
name = "slow"
command = ["bin/slow", "{name}"]
"#,
    );
}

#[test]
fn a_diamond_passes_data_between_steps() {
    let env = Env::new();
    tools(&env);
    env.write(
        "diamond.toml",
        r#"
name = "diamond"
[[steps]]
id = "a"
tool = "add"
with = { n = 1 }
[[steps]]
id = "b"
tool = "add"
needs = ["a"]
with = { n = "${steps.a.output.n}" }
[[steps]]
id = "c"
tool = "echo"
needs = ["a"]
with = { x = "${steps.a.output.n}" }
[[steps]]
id = "d"
tool = "echo"
needs = ["b", "c"]
with = { b = "${steps.b.output.n}", c = "${steps.c.output.x}", msg = "b is ${steps.b.output.n}", all = "${steps.c.output}" }
"#,
    );
    let (run, out) = env.run_json("diamond.toml");
    let run = run.expect(0);
    assert_eq!(out["state"], "succeeded", "{}", run.describe());
    assert_eq!(step(&out, "a")["output"], json!({"n": 2}));
    assert_eq!(step(&out, "b")["output"], json!({"n": 3}));
    assert_eq!(
        step(&out, "d")["output"],
        json!({"b": 3, "c": 2, "msg": "b is 3", "all": {"x": 2}})
    );
    for id in ["a", "b", "c", "d"] {
        assert_eq!(step(&out, id)["state"], "succeeded");
        assert_eq!(step(&out, id)["attempts"], 1);
    }
    assert!(out["run_id"].is_u64());
}

#[test]
fn a_failure_skips_dependents_and_spares_independent_branches() {
    let env = Env::new();
    tools(&env);
    env.write(
        "fail.toml",
        r#"
name = "fail"
[[steps]]
id = "broken"
tool = "fail"
[[steps]]
id = "after"
tool = "echo"
needs = ["broken"]
[[steps]]
id = "after-after"
tool = "echo"
needs = ["after"]
[[steps]]
id = "independent"
tool = "echo"
with = { ok = true }
"#,
    );
    let (run, out) = env.run_json("fail.toml");
    run.expect(1);
    assert_eq!(out["state"], "failed");
    let broken = step(&out, "broken");
    assert_eq!(broken["state"], "failed");
    assert!(
        broken["reason"]
            .as_str()
            .unwrap()
            .contains("exited with code 3: boom"),
        "{broken}"
    );
    assert_eq!(step(&out, "after")["state"], "skipped");
    assert_eq!(step(&out, "after")["attempts"], 0);
    assert_eq!(step(&out, "after-after")["state"], "skipped");
    assert_eq!(step(&out, "independent")["state"], "succeeded");
    assert_eq!(step(&out, "independent")["output"], json!({"ok": true}));
}

#[test]
fn a_flaky_tool_succeeds_on_its_third_attempt() {
    let env = Env::new();
    tools(&env);
    env.write(
        "flaky.toml",
        r#"
name = "flaky"
[[steps]]
id = "try"
tool = "flaky"
retries = 3
"#,
    );
    let (run, out) = env.run_json("flaky.toml");
    run.expect(0);
    let s = step(&out, "try");
    assert_eq!(s["state"], "succeeded");
    assert_eq!(s["attempts"], 3);
    assert_eq!(s["output"], json!({"calls": 3}));
    // each attempt in brief, in `uet run --json` and in `uet show --json`
    let shown = env.uet(&["show", "last", "--json"]).expect(0).stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    for out in [&out, &shown] {
        let tries = step(out, "try")["attempt_summaries"]
            .as_array()
            .unwrap()
            .clone();
        let outcomes: Vec<&str> = tries
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(outcomes, ["failed", "failed", "succeeded"], "{out}");
        assert_eq!(tries[0]["number"], 1);
        assert_eq!(tries[0]["tool"], "flaky");
        assert!(
            tries[0]["error"].as_str().unwrap().contains("not yet (1)"),
            "{out}"
        );
        assert!(tries[0]["retry_at"].as_u64().is_some());
        assert!(tries[2]["error"].is_null() && tries[2]["duration_ms"].as_u64().is_some());
    }
}

#[test]
fn retries_run_out() {
    let env = Env::new();
    tools(&env);
    env.write(
        "out.toml",
        r#"
name = "out"
[[steps]]
id = "try"
tool = "fail"
retries = 2
"#,
    );
    let (run, out) = env.run_json("out.toml");
    run.expect(1);
    let s = step(&out, "try");
    assert_eq!(s["state"], "failed");
    assert_eq!(s["attempts"], 3);
    assert!(
        s["reason"].as_str().unwrap().contains("after 3 attempts"),
        "{s}"
    );
}

#[test]
fn a_step_timeout_kills_the_whole_process_tree() {
    let env = Env::new();
    tools(&env);
    env.write(
        "sleep.toml",
        r#"
name = "sleep"
[[steps]]
id = "nap"
tool = "sleepy"
timeout = "1s"
with = { pidfile = "pids" }
"#,
    );
    let started = Instant::now();
    let (run, out) = env.run_json("sleep.toml");
    let took = started.elapsed();
    run.expect(1);
    // the tree sleeps 30 s; finishing far sooner shows the timeout ended it
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let s = step(&out, "nap");
    assert_eq!(s["state"], "failed");
    assert!(
        s["reason"].as_str().unwrap().contains("timed out after 1s"),
        "{s}"
    );
    let pids: Vec<i32> = env
        .read("pids")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "the shell and its background sleep");
    for pid in pids {
        assert!(gone(pid), "process {pid} outlived the timeout");
    }
}

#[test]
fn a_run_timeout_cancels_what_is_running() {
    let env = Env::new();
    tools(&env);
    env.write(
        "late.toml",
        r#"
name = "late"
timeout = "1200ms"
[[steps]]
id = "nap"
tool = "sleepy"
with = { pidfile = "pids" }
[[steps]]
id = "next"
tool = "echo"
needs = ["nap"]
"#,
    );
    let started = Instant::now();
    let (run, out) = env.run_json("late.toml");
    run.expect(1);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out["state"], "failed");
    assert!(
        out["reason"]
            .as_str()
            .unwrap()
            .contains("run timed out after 1s 200ms"),
        "{out}"
    );
    assert_eq!(step(&out, "nap")["state"], "canceled");
    assert_eq!(step(&out, "next")["state"], "canceled");
    for pid in env
        .read("pids")
        .lines()
        .map(|l| l.trim().parse::<i32>().unwrap())
    {
        assert!(gone(pid), "process {pid} outlived the run");
    }
}

#[test]
fn max_parallel_is_honoured() {
    let env = Env::new();
    tools(&env);
    let mut wf = String::from("name = \"wide\"\nmax_parallel = 2\n");
    for i in 0..6 {
        wf.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"slow\"\nwith = {{ name = \"s{i}\" }}\n"
        ));
    }
    env.write("wide.toml", &wf);
    let (run, _) = env.run_json("wide.toml");
    run.expect(0);
    let mut events: Vec<(u128, i32)> = env
        .read("parallel.log")
        .lines()
        .map(|l| {
            let mut parts = l.split_whitespace();
            let kind = parts.next().unwrap();
            let at: u128 = parts.next().unwrap().parse().unwrap();
            (at, if kind == "start" { 1 } else { -1 })
        })
        .collect();
    assert_eq!(events.len(), 12);
    // ends before starts at the same instant, so a hand-over is not counted as overlap
    events.sort();
    let (mut now, mut most) = (0, 0);
    for (_, delta) in events {
        now += delta;
        most = most.max(now);
    }
    assert_eq!(most, 2, "at most 2 at once, and the 2 slots were used");
}

#[test]
fn priority_orders_ready_steps() {
    let env = Env::new();
    tools(&env);
    env.write(
        "prio.toml",
        r#"
name = "prio"
max_parallel = 1
[[steps]]
id = "low"
tool = "slow"
priority = 1
with = { name = "low" }
[[steps]]
id = "high"
tool = "slow"
priority = 9
with = { name = "high" }
[[steps]]
id = "mid"
tool = "slow"
priority = 5
with = { name = "mid" }
"#,
    );
    env.run_json("prio.toml").0.expect(0);
    let order: Vec<String> = env
        .read("parallel.log")
        .lines()
        .filter(|l| l.starts_with("start"))
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    assert_eq!(order, ["high", "mid", "low"]);
}

#[test]
fn capability_routing_picks_a_tool_that_has_it() {
    let env = Env::new();
    tools(&env);
    env.write(
        "cap.toml",
        r#"
name = "cap"
[[steps]]
id = "first"
capability = "text.echo"
with = { v = 1 }
[[steps]]
id = "only"
capability = "text.other"
with = { v = 2 }
"#,
    );
    let (run, out) = env.run_json("cap.toml");
    run.expect(0);
    // both tools have text.echo: the operator's first one wins
    assert_eq!(step(&out, "first")["tool"], "echo");
    assert_eq!(step(&out, "first")["output"], json!({"v": 1}));
    assert_eq!(step(&out, "only")["tool"], "echo-too");
}

#[test]
fn the_summary_is_readable_and_progress_goes_to_stderr() {
    let env = Env::new();
    tools(&env);
    env.write(
        "two.toml",
        "name = \"two\"\n[[steps]]\nid = \"one\"\ntool = \"echo\"\n[[steps]]\nid = \"two\"\ntool = \"fail\"\n",
    );
    let run = env.uet(&["run", "two.toml"]).expect(1);
    let out = run.stdout();
    assert!(out.starts_with("run 1 `two`: failed"), "{}", run.describe());
    assert!(out.contains("one") && out.contains("succeeded"), "{out}");
    assert!(
        run.stderr()
            .contains("✗ two failed: exited with code 3: boom"),
        "{}",
        run.describe()
    );
    // not a terminal: plain lines, no bar drawn with escape codes
    assert!(!run.stderr().contains('\x1b'), "{}", run.describe());
}

#[test]
fn ctrl_c_cancels_the_run_and_its_processes() {
    let env = Env::new();
    tools(&env);
    env.write(
        "long.toml",
        "name = \"long\"\n[[steps]]\nid = \"nap\"\ntool = \"sleepy\"\nwith = { pidfile = \"pids\" }\n",
    );
    // the tool writes its pids first: once both are there, it is running
    let started = Instant::now();
    let (code, out) = env.interrupt_run("long.toml", "pids.done");
    assert_eq!(code, 1);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out["state"], "canceled");
    assert_eq!(step(&out, "nap")["state"], "canceled");
    for pid in env
        .read("pids")
        .lines()
        .map(|l| l.trim().parse::<i32>().unwrap())
    {
        assert!(gone(pid), "process {pid} outlived the cancel");
    }
}

/// A workflow fills a command's `{key}`s, but the options are the operator's: a value that
/// would begin an argument with `-` is refused, written in the workflow or handed on by a step.
#[test]
fn workflow_values_cannot_become_a_command_s_options() {
    let env = Env::new();
    env.write("list.txt", "b\na\n");
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "sort"
command = ["sort", "{path}"]

[[tools]]
name = "sort-with-options"
command = ["sort", "{flag}", "list.txt"]
allow_options = true

[[tools]]
name = "say"
command = ["sh", "-c", "echo '\"--output=planted.txt\"'"]
"#,
    );
    env.write(
        "written.toml",
        "name = \"w\"\n[[steps]]\nid = \"s\"\ntool = \"sort\"\nwith = { path = \"--output=planted.txt\" }\n",
    );
    let run = env.uet(&["validate", "written.toml"]).expect(2);
    assert!(
        run.stderr().contains("written.toml:4:")
            && run
                .stderr()
                .contains("starts with `-` and would be read as an option"),
        "{}",
        run.describe()
    );
    env.write(
        "handed.toml",
        r#"
name = "h"
[[steps]]
id = "say"
tool = "say"
[[steps]]
id = "sort"
tool = "sort"
needs = ["say"]
with = { path = "${steps.say.output}" }
[[steps]]
id = "allowed"
tool = "sort-with-options"
with = { flag = "--output=sorted.txt" }
"#,
    );
    let (run, out) = env.run_json("handed.toml");
    run.expect(1);
    let sort = step(&out, "sort");
    assert_eq!(sort["state"], "failed", "{sort}");
    assert!(
        sort["reason"]
            .as_str()
            .unwrap()
            .contains("allow_options = true"),
        "{sort}"
    );
    assert!(!env.ws.join("planted.txt").exists());
    // a tool that says so takes options from its input
    assert_eq!(step(&out, "allowed")["state"], "succeeded");
    assert_eq!(env.read("sorted.txt"), "a\nb\n");
}

#[test]
fn a_second_ctrl_c_kills_the_steps_and_records_the_run_canceled() {
    let env = Env::new();
    // a command the first Ctrl-C kills at once, and a plugin asleep in a host call, which no
    // cancel reaches until it wakes: only the second Ctrl-C ends the run
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"mark\"\n\
             command = [\"sh\", \"-c\", \"echo $$ > {{pidfile}}; touch {{pidfile}}.done; sleep 60\"]\n\
             [[tools]]\nname = \"nap\"\nwasm = \"{}\"\n",
            crate::util::plugin("hostile").display()
        ),
    );
    env.write(
        "stuck.toml",
        "name = \"stuck\"\nmax_parallel = 2\n\
         [[steps]]\nid = \"s\"\ntool = \"mark\"\nwith = { pidfile = \"pid\" }\n\
         [[steps]]\nid = \"z\"\ntool = \"nap\"\nwith = { mode = \"sleep\", ms = 30000 }\n",
    );
    let child = env
        .command(env!("CARGO_BIN_EXE_uet"))
        .args(["run", "stuck.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !env.ws.join("pid.done").exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctrl_c = || {
        // SAFETY: signalling a child we spawned
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    };
    ctrl_c();
    std::thread::sleep(Duration::from_millis(300));
    ctrl_c();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("run 1 recorded canceled"), "{err}");
    let pid: i32 = env.read("pid").trim().parse().unwrap();
    let start = Instant::now();
    while !gone(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the step outlived uet"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // the state says so: a later daemon finds nothing to resume
    let shown = env.uet(&["show", "1", "--json"]).expect(0).stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["state"], "canceled", "{shown}");
    assert_eq!(shown["reason"], "canceled: forced by a second Ctrl-C");
}

/// A plan seen without running it: `uet graph` draws it, `uet run --dry-run` lists its waves
/// with the tools they resolve to; neither runs a step nor touches the state.
#[test]
fn graph_and_dry_run_show_the_plan_and_run_nothing() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"echo\"\ncommand = [\"touch\", \"ran\"]\ncapabilities = [\"say\"]\n",
    );
    env.write(
        "w.toml",
        "name = \"a \\\"quoted\\\" plan\"\n\
         [[steps]]\nid = \"last\"\ntool = \"echo\"\nneeds = [\"first\", \"second\"]\n\
         [[steps]]\nid = \"first\"\ncapability = \"say\"\n\
         [[steps]]\nid = \"second\"\ntool = \"echo\"\nneeds = [\"first\"]\n",
    );
    let mermaid = env.uet(&["graph", "w.toml"]).expect(0).stdout();
    assert!(mermaid.contains("flowchart LR\n"), "{mermaid}");
    assert!(
        mermaid.contains("s1[\"first<br/><i>say → echo</i>\"]"),
        "{mermaid}"
    );
    for edge in ["s1 --> s0", "s2 --> s0", "s1 --> s2"] {
        assert!(mermaid.contains(edge), "{edge}: {mermaid}");
    }
    let dot = env
        .uet(&["graph", "--format", "dot", "w.toml"])
        .expect(0)
        .stdout();
    assert!(
        dot.starts_with("digraph \"a \\\"quoted\\\" plan\" {"),
        "{dot}"
    );
    assert!(
        dot.contains("s1 -> s2;") && dot.trim_end().ends_with('}'),
        "{dot}"
    );
    let text = env.uet(&["run", "--dry-run", "w.toml"]).expect(0).stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("3 steps in 3 waves"), "{text}");
    assert_eq!(lines[1], "wave 1:");
    assert!(
        lines[2]
            .trim_start()
            .starts_with("first   capability `say` → echo (command "),
        "{text}"
    );
    assert!(lines[6].contains("after first, second"), "{text}");
    let json = env
        .uet(&["run", "--dry-run", "--json", "w.toml"])
        .expect(0)
        .stdout();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let order: Vec<(&str, u64)> = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap(), s["wave"].as_u64().unwrap()))
        .collect();
    assert_eq!(order, [("first", 1), ("second", 2), ("last", 3)]);
    assert_eq!(json["steps"][0]["capability"], "say");
    assert_eq!(json["steps"][0]["tool"], "echo");
    assert!(!env.ws.join("ran").exists(), "a step ran");
    assert!(!env.state.exists(), "the state was touched");
    // a plan that cannot be made is refused as `uet run` refuses it
    env.write(
        "bad.toml",
        "name = \"b\"\n[[steps]]\nid = \"x\"\ntool = \"nope\"\n",
    );
    let err = env.uet(&["graph", "bad.toml"]).expect(2).stderr();
    assert!(
        err.contains("bad.toml:4:") && err.contains("nothing was run"),
        "{err}"
    );
}

/// `uet logs`: what each attempt printed and logged, per step and attempt, from the state.
#[test]
fn logs_show_each_attempts_output_and_plugin_lines() {
    let env = Env::new();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"flaky\"\n\
             command = [\"sh\", \"-c\", \"echo out-$(cat n 2>/dev/null || echo 1); echo err >&2; [ -f n ] && exit 0; echo 2 > n; exit 1\"]\n\
             [[tools]]\nname = \"nice\"\nwasm = \"{}\"\n",
            crate::util::plugin("hostile").display()
        ),
    );
    env.write(
        "w.toml",
        "name = \"w\"\n\
         [[steps]]\nid = \"cmd\"\ntool = \"flaky\"\nretries = 1\nretry = { base = \"10ms\" }\n\
         [[steps]]\nid = \"plug\"\ntool = \"nice\"\nwith = { mode = \"ok\" }\n",
    );
    let (_, out) = env.run_json("w.toml");
    assert_eq!(out["state"], "succeeded", "{out}");
    let text = env.uet(&["logs", "1"]).expect(0).stdout();
    let expected = [
        "== cmd · attempt 1 · flaky · failed",
        "stdout:",
        "  out-1",
        "stderr:",
        "  err",
        "error: ",
        "== cmd · attempt 2 · flaky · succeeded",
        "  out-2",
        "== plug · attempt 1 · nice · succeeded",
        "log:",
        "  info: behaving, for once",
    ];
    let mut at = 0;
    for want in expected {
        let found = text[at..]
            .find(want)
            .unwrap_or_else(|| panic!("{want:?} after {at}:\n{text}"));
        at += found + want.len();
    }
    let one = env
        .uet(&["logs", "1", "cmd", "--attempt", "2", "--json"])
        .expect(0)
        .stdout();
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["stdout"], "out-2\n");
    assert_eq!(one[0]["outcome"], "succeeded");
    // `last` is the newest run of the state, when no daemon answers
    let last = env
        .uet(&["logs", "last", "cmd", "--attempt", "2", "--json"])
        .expect(0)
        .stdout();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&last).unwrap(),
        one
    );
    let err = env.uet(&["logs", "1", "nope"]).expect(2).stderr();
    assert!(err.contains("run 1 has no step `nope`"), "{err}");
    env.uet(&["logs", "1", "cmd", "--attempt", "9"]).expect(2);
}

#[test]
fn last_names_no_run_when_there_is_none() {
    let env = Env::new();
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"t\"\n",
    );
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"t\"\ncommand = [\"true\"]\n",
    );
    // no state yet, then a state with one run
    let err = env.uet(&["show", "last"]).expect(2).stderr();
    assert!(
        err.contains("there is no run yet for `last` to name"),
        "{err}"
    );
    env.run_json("w.toml");
    let shown = env.uet(&["show", "last", "--json"]).expect(0).stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["run_id"], 1);
}

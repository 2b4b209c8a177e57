//! WASM plugins end to end: real components built from `plugins/` and `tests/plugins/`, run by
//! the real binary in their sandbox.

use std::time::{Duration, Instant};

use serde_json::json;
use uet::state::Store;

use crate::util::{Env, plugin, step};

/// A workstream with docs to read, a secret beside them, and the plugins as tools.
fn workstream() -> Env {
    let env = Env::new();
    env.write("docs/a.md", "one two three\nfour\n");
    env.write("docs/b.md", "five six\n");
    env.write("secret.txt", "the workstream root is not granted\n");
    let tools = format!(
        r#"
[[tools]]
name = "wordcount"
wasm = "{wordcount}"
sandbox = {{ read = ["docs"] }}

[[tools]]
name = "filehash"
wasm = "{filehash}"
capabilities = ["file.hash"]
sandbox = {{ read = ["docs"] }}

[[tools]]
name = "template"
wasm = "{template}"
sandbox = {{ read = ["docs"], write = ["out"] }}

[[tools]]
name = "jsonq"
wasm = "{jsonq}"

[[tools]]
name = "hostile"
wasm = "{hostile}"
sandbox = {{ read = ["docs"], write = ["out"] }}
limits = {{ memory = "32MiB", timeout = "1s" }}

[[tools]]
name = "hostile-slow"
wasm = "{hostile}"
sandbox = {{ write = ["out"] }}

[[tools]]
name = "hostile-fuel"
wasm = "{hostile}"
limits = {{ fuel = 1000000 }}

[[tools]]
name = "shout"
command = ["sh", "-c", "tr a-z A-Z"]
"#,
        wordcount = plugin("wordcount").display(),
        filehash = plugin("filehash").display(),
        template = plugin("template").display(),
        jsonq = plugin("jsonq").display(),
        hostile = plugin("hostile").display(),
    );
    env.write("tools.toml", &tools);
    env
}

#[test]
fn data_flows_from_plugin_to_plugin() {
    let env = workstream();
    env.write(
        "flow.toml",
        r#"
name = "flow"
[[steps]]
id = "count"
capability = "text.count"   # the plugin's own description says it has this
with = { path = "docs", glob = "*.md" }
[[steps]]
id = "hash"
capability = "file.hash"
with = { root = "docs", glob = "*.md" }
[[steps]]
id = "first"
tool = "jsonq"
needs = ["count"]
with = { value = "${steps.count.output}", query = "per_file.0.words" }
[[steps]]
id = "report"
tool = "template"
needs = ["count", "hash", "first"]
with = { out = "out/report.md", template = "{{words}} words, {{first}} in the first file, digest {{digest}}", vars = { words = "${steps.count.output.words}", first = "${steps.first.output.value}", digest = "${steps.hash.output.digest}" } }
[[steps]]
id = "loud"
tool = "shout"
needs = ["report"]
with = { path = "${steps.report.output.path}" }
"#,
    );
    let (run, out) = env.run_json("flow.toml");
    run.expect(0);
    assert_eq!(step(&out, "count")["output"]["words"], 6);
    assert_eq!(step(&out, "count")["tool"], "wordcount");
    assert_eq!(step(&out, "first")["output"], json!({"value": 4}));
    let digest = step(&out, "hash")["output"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(digest.len(), 64);
    let report = env.read("out/report.md");
    assert_eq!(
        report,
        format!("6 words, 4 in the first file, digest {digest}")
    );
    assert_eq!(
        step(&out, "report")["output"],
        json!({"path": "out/report.md", "bytes": report.len()})
    );
    // a command tool takes the plugin's output on stdin
    assert_eq!(
        step(&out, "loud")["output"],
        json!({"PATH": "OUT/REPORT.MD"})
    );
}

#[test]
fn a_plugin_writes_only_where_granted() {
    let env = workstream();
    env.write(
        "write.toml",
        r#"
name = "write"
[[steps]]
id = "granted"
tool = "template"
with = { out = "out/ok.md", template = "fine" }
[[steps]]
id = "read-only"
tool = "template"
with = { out = "docs/evil.md", template = "defaced" }
[[steps]]
id = "not-granted"
tool = "template"
with = { out = "elsewhere/evil.md", template = "planted" }
"#,
    );
    let (run, out) = env.run_json("write.toml");
    run.expect(1);
    assert_eq!(step(&out, "granted")["state"], "succeeded");
    assert_eq!(env.read("out/ok.md"), "fine");
    let ro = step(&out, "read-only");
    assert_eq!(ro["state"], "failed");
    assert!(
        ro["reason"].as_str().unwrap().contains("not permitted"),
        "{ro}"
    );
    assert!(!env.ws.join("docs/evil.md").exists());
    assert_eq!(step(&out, "not-granted")["state"], "failed");
    assert!(!env.ws.join("elsewhere").exists());
}

#[test]
fn hostile_plugins_end_their_own_attempt_only() {
    let env = workstream();
    env.write(
        "hostile.toml",
        r#"
name = "hostile"
max_parallel = 16
[[steps]]
id = "loop"
tool = "hostile"
with = { mode = "loop" }
[[steps]]
id = "alloc"
tool = "hostile"
with = { mode = "alloc" }
[[steps]]
id = "recurse"
tool = "hostile"
with = { mode = "recurse" }
[[steps]]
id = "panic"
tool = "hostile"
with = { mode = "panic" }
[[steps]]
id = "passwd"
tool = "hostile"
with = { mode = "read", path = "/etc/passwd" }
[[steps]]
id = "outside"
tool = "hostile"
with = { mode = "read", path = "secret.txt" }
[[steps]]
id = "escape"
tool = "hostile"
with = { mode = "read", path = "docs/../secret.txt" }
[[steps]]
id = "write-read-only"
tool = "hostile"
with = { mode = "write", path = "docs/a.md" }
[[steps]]
id = "fuel"
tool = "hostile-fuel"
with = { mode = "loop" }
[[steps]]
id = "env"
tool = "hostile"
with = { mode = "env" }
[[steps]]
id = "flood"
tool = "hostile"
with = { mode = "stdout" }
[[steps]]
id = "fine"
tool = "hostile"
with = { mode = "ok" }
[[steps]]
id = "after"
tool = "wordcount"
needs = ["fine"]
with = { path = "docs" }
"#,
    );
    let started = Instant::now();
    let (run, out) = env.run_json("hostile.toml");
    run.expect(1);
    // steps that used up their attempts on traps and limits hold the run for a person
    assert_eq!(out["state"], "quarantined", "{out}");
    assert!(
        out["reason"].as_str().unwrap().contains("traps or limits"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let reason = |id: &str| {
        let s = step(&out, id);
        assert_eq!(s["state"], "failed", "{s}");
        s["reason"].as_str().unwrap().to_string()
    };
    assert!(reason("loop").contains("timed out after 1s"));
    assert!(reason("alloc").contains("exceeded its memory limit of 32 MiB"));
    assert!(reason("recurse").contains("stack overflow"));
    assert!(
        reason("panic").contains("panicked at")
            && reason("panic").contains("hostile plugin panics on purpose")
    );
    assert!(reason("passwd").starts_with("read /etc/passwd:"));
    assert!(reason("outside").starts_with("read secret.txt:"));
    assert!(reason("escape").contains("not permitted"));
    assert!(reason("write-read-only").contains("not permitted"));
    assert!(reason("fuel").contains("ran out of fuel"));
    assert_eq!(
        env.read("docs/a.md"),
        "one two three\nfour\n",
        "the read-only file is intact"
    );
    // no environment leaks in; a flood of stdout is cut, not fatal
    assert_eq!(step(&out, "env")["output"], json!({"vars": 0}));
    assert_eq!(step(&out, "flood")["state"], "succeeded");
    assert_eq!(step(&out, "fine")["state"], "succeeded");
    assert_eq!(step(&out, "after")["output"]["words"], 6);

    // the attempts record why, and the plugin's log and progress are in the event log
    let store = Store::open(&env.state).unwrap();
    let id = out["run_id"].as_u64().unwrap();
    let attempt = &store.attempts(id, "alloc").unwrap()[0];
    assert_eq!(attempt.outcome, Some(uet::model::Outcome::LimitExceeded));
    assert_eq!(
        store.attempts(id, "panic").unwrap()[0].outcome,
        Some(uet::model::Outcome::Trapped)
    );
    assert!(store.attempts(id, "flood").unwrap()[0].stdout.len() <= 20 << 10);
    let events = store.events(id).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "plugin.log" && e.detail == "info: behaving, for once")
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "plugin.progress" && e.detail == "50% halfway")
    );
}

#[test]
fn cancel_reaches_a_running_plugin() {
    let env = workstream();
    env.write("spin.toml", "name = \"spin\"\n[[steps]]\nid = \"spin\"\ntool = \"hostile-slow\"\nwith = { mode = \"mark-then-loop\", path = \"out/started\" }\n");
    let interrupted = Instant::now();
    let (code, out) = env.interrupt_run("spin.toml", "out/started");
    // the plugin spins until stopped: ending this soon means the cancel reached it
    assert!(
        interrupted.elapsed() < Duration::from_secs(20),
        "the plugin kept spinning"
    );
    assert_eq!(code, 1);
    assert_eq!(out["state"], "canceled");
}

/// A plugin step alone in flight goes to a relay thread that spins between steps (see
/// PERFORMANCE.md, third pass), unless the process may use a single CPU only: there the spin
/// would hold off the very thread it waits for (a chain took seven times as long).
#[test]
fn a_lone_plugin_step_goes_to_a_relay_thread_only_with_a_cpu_to_spare() {
    let env = workstream();
    env.write(
        "nap.toml",
        "name = \"nap\"\n[[steps]]\nid = \"a\"\ntool = \"hostile-slow\"\n\
         with = { mode = \"sleep\", ms = 1500 }\n",
    );
    // the names of uet's threads, looked at while it runs
    let threads = |argv: &[&str]| {
        let mut child = env
            .command(argv[0])
            .args(&argv[1..])
            .args([env!("CARGO_BIN_EXE_uet"), "run", "nap.toml", "--json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while child.try_wait().unwrap().is_none() {
            crate::util::thread_names(child.id(), &mut seen);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(child.wait().unwrap().success());
        seen
    };
    let one_cpu = threads(&["taskset", "-c", "0"]);
    assert!(one_cpu.contains("uet-state-sync"), "{one_cpu:?}");
    assert!(!one_cpu.contains("uet-relay"), "{one_cpu:?}");
    if std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
        let spare = threads(&["env"]);
        assert!(spare.contains("uet-relay"), "{spare:?}");
    }
}

#[test]
fn tools_lists_plugins_with_what_they_say_of_themselves() {
    let env = workstream();
    let run = env.uet(&["tools", "--json"]).expect(0);
    let tools: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    let wc = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "wordcount")
        .unwrap();
    assert_eq!(wc["kind"], "wasm");
    assert_eq!(
        wc["capabilities"],
        json!(["text.count"]),
        "from describe: the entry lists none"
    );
    assert_eq!(wc["version"], "0.1.0");
    assert!(wc["source"].as_str().unwrap().ends_with("wordcount.wasm"));
    let shout = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "shout")
        .unwrap();
    assert_eq!(shout["kind"], "command");
    let text = env.uet(&["tools"]).expect(0).stdout();
    assert!(
        text.contains("wordcount") && text.contains("text.count"),
        "{text}"
    );
}

#[test]
fn a_broken_plugin_file_is_reported_before_anything_runs() {
    let env = Env::new();
    env.write("bad.wasm", "this is not wasm");
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"bad\"\nwasm = \"bad.wasm\"\n",
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"bad\"\n",
    );
    let run = env.uet(&["run", "w.toml"]).expect(2);
    assert!(
        run.stderr().contains("tool `bad`: cannot compile plugin"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_scaffolded_plugin_builds_and_runs_as_it_is() {
    let env = Env::new();
    let run = env.uet(&["plugin", "new", "char-count"]).expect(0);
    assert!(
        run.stdout().contains("created ./char-count"),
        "{}",
        run.describe()
    );
    // it carries its own SDK and interface: nothing in it names the folder uet was built in
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let made = crate::secrets::files_under(&env.ws.join("char-count"));
    assert!(made.len() >= 5, "{made:?}");
    for (path, bytes) in made {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(repo.to_str().unwrap()) && !text.contains("/plugin-sdk"),
            "{} names the build machine's folders:\n{text}",
            path.display()
        );
    }
    env.uet(&["plugin", "new", "char-count"]).expect(2);
    env.uet(&["plugin", "new", "Bad_Name"]).expect(2);

    // its own target folder, kept between runs so only the first build pays for the deps
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/scaffold");
    let build = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(env.ws.join("char-count"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let wasm = target.join("wasm32-wasip2/release/char_count.wasm");
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"chars\"\nwasm = \"{}\"\n",
            wasm.display()
        ),
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"m\"\ncapability = \"char-count.measure\"\nwith = { text = \"héllo\" }\n",
    );
    let (run, out) = env.run_json("w.toml");
    run.expect(0);
    assert_eq!(step(&out, "m")["output"], json!({"chars": 5}));
}

/// A workstream's folders belong to whoever may drop files there, so a grant that is a link
/// would hand the plugin whatever the link points at.
#[test]
fn grants_never_follow_links_out_of_the_workstream() {
    let env = workstream();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("secret"), "not for plugins\n").unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), env.ws.join("out")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), env.ws.join("docs/link")).unwrap();
    env.write(
        "tools.toml",
        &format!(
            r#"
[[tools]]
name = "template"
wasm = "{template}"
sandbox = {{ write = ["out"] }}

[[tools]]
name = "reader"
wasm = "{hostile}"
sandbox = {{ read = ["docs/link"] }}

[[tools]]
name = "docs-reader"
wasm = "{hostile}"
sandbox = {{ read = ["docs"] }}
"#,
            template = plugin("template").display(),
            hostile = plugin("hostile").display(),
        ),
    );
    env.write(
        "links.toml",
        r#"
name = "links"
[[steps]]
id = "plant"
tool = "template"
with = { out = "out/authorized_keys", template = "ssh-ed25519 AAAA attacker" }
[[steps]]
id = "steal"
tool = "reader"
with = { mode = "read", path = "docs/link/secret" }
[[steps]]
id = "below"
tool = "docs-reader"
with = { mode = "read", path = "docs/link/secret" }
"#,
    );
    let (run, out) = env.run_json("links.toml");
    run.expect(1);
    for id in ["plant", "steal"] {
        let s = step(&out, id);
        assert_eq!(s["state"], "failed", "{s}");
        assert!(
            s["reason"].as_str().unwrap().contains("is a symbolic link"),
            "{s}"
        );
        // refused before the plugin ran, and not worth a retry
        assert_eq!(s["attempts"], 1, "{s}");
    }
    assert!(!elsewhere.path().join("authorized_keys").exists());
    // a link below a granted folder does not lead out of it either
    let below = step(&out, "below");
    assert_eq!(below["state"], "failed", "{below}");
    assert!(
        !below["reason"]
            .as_str()
            .unwrap()
            .contains("not for plugins")
    );
}

#[test]
fn an_empty_grant_is_refused_where_it_is_written() {
    let env = workstream();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"reader\"\nwasm = \"{}\"\nsandbox = {{ read = [\"\"] }}\n",
            plugin("hostile").display()
        ),
    );
    env.write(
        "flow.toml",
        "name = \"f\"\n[[steps]]\nid = \"a\"\ntool = \"reader\"\nwith = { mode = \"ok\" }\n",
    );
    let run = env.uet(&["validate", "flow.toml"]).expect(2);
    assert!(
        run.stderr().contains("tools.toml:4:")
            && run.stderr().contains("sandbox.read entry is empty"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_plugin_s_output_is_capped_by_its_tool() {
    let env = workstream();
    env.write(
        "tools.toml",
        &format!(
            r#"
[[tools]]
name = "hostile"
wasm = "{hostile}"

[[tools]]
name = "roomy"
wasm = "{hostile}"
limits = {{ output = "4MiB" }}
"#,
            hostile = plugin("hostile").display(),
        ),
    );
    env.write(
        "big.toml",
        r#"
name = "big"
[[steps]]
id = "huge"
tool = "hostile"
with = { mode = "big", size = 50000000 }
[[steps]]
id = "roomy"
tool = "roomy"
with = { mode = "big", size = 2000000 }
[[steps]]
id = "wordy"
tool = "hostile"
with = { mode = "big-error", size = 50000000 }
"#,
    );
    let (run, out) = env.run_json("big.toml");
    run.expect(1);
    let huge = step(&out, "huge");
    assert_eq!(huge["state"], "failed", "{huge}");
    assert_eq!(huge["attempts"], 1, "{huge}");
    assert!(
        huge["reason"]
            .as_str()
            .unwrap()
            .contains("over the tool's limit of 1 MiB (limits.output"),
        "{huge}"
    );
    assert!(huge["output"].is_null());
    // an error is a reason kept in the state and shown everywhere: bounded too
    let wordy = step(&out, "wordy");
    assert_eq!(wordy["state"], "failed", "{wordy}");
    let reason = wordy["reason"].as_str().unwrap();
    assert!(
        reason.len() < 20 << 10 && reason.contains("more bytes"),
        "{}",
        reason.len()
    );
    let roomy = step(&out, "roomy");
    assert_eq!(roomy["state"], "succeeded");
    assert_eq!(roomy["output"]["big"].as_str().unwrap().len(), 2_000_000);
    // nothing of the refused output reached the state
    let state = std::fs::metadata(env.state.join("uet.redb")).unwrap().len()
        + std::fs::metadata(env.state.join("uet.journal"))
            .unwrap()
            .len();
    assert!(state < 40 << 20, "state holds {state} bytes");
}

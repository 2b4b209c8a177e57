//! Plugins in other languages, through the same `wit/plugin.wit`: the Python example built
//! with componentize-py and the JavaScript one with componentize-js, each by its own build
//! script, then run by `uet run` as any plugin is.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{Env, step};

/// Builds an example plugin with its build script into the target folder.
fn build(example: &str, file: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = repo.join("target/examples").join(file);
    let status = Command::new(repo.join("examples/plugins").join(example).join("build.sh"))
        .arg(&out)
        .status()
        .expect("run the build script");
    assert!(
        status.success(),
        "examples/plugins/{example}/build.sh failed"
    );
    out
}

/// One example plugin from its build to its steps: described (name, version, capability,
/// input schema), compiled ahead of the run and said so, run by name and by capability, its
/// log line in the step's log, and a bad input failed at once (no retry helps it).
fn runs_through_uet(example: &str, file: &str, tool: &str, capability: &str, language: &str) {
    let wasm = build(example, file);
    let env = Env::new();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"{tool}\"\nwasm = \"{}\"\nlimits = {{ memory = \"64MiB\", timeout = \"60s\" }}\n",
            wasm.display()
        ),
    );
    env.write(
        "w.toml",
        &format!(
            "name = \"w\"\n[[steps]]\nid = \"hi\"\ntool = \"{tool}\"\nwith = {{ name = \"uet\" }}\n\
             [[steps]]\nid = \"again\"\ncapability = \"{capability}\"\nneeds = [\"hi\"]\n\
             with = {{ name = \"${{steps.hi.output.greeting}}\", shout = true }}\n"
        ),
    );
    // a cache of its own, so that this run is the one that compiles it
    let cache = env.ws.parent().unwrap().join("cache");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let out = Command::new(env!("CARGO_BIN_EXE_uet"))
        .args(["run", "w.toml", "--json"])
        .current_dir(&env.ws)
        .env("UET_STATE", &env.state)
        .env("UET_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("compiling plugin {file}")),
        "{stderr}"
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        step(&run, "hi")["output"],
        serde_json::json!({"greeting": "hello, uet", "language": language})
    );
    assert_eq!(
        step(&run, "again")["output"]["greeting"],
        "HELLO, HELLO, UET!"
    );
    // the compile came before the run was made: none of it is in a step's time
    let created = run["created_at"].as_u64().unwrap();
    let took = step(&run, "hi")["duration_ms"].as_u64().unwrap();
    assert!(
        created - before > took,
        "compiled in {} ms before the run; the step took {took} ms",
        created - before
    );

    let logs = env.uet(&["logs", "last", "hi"]).expect(0).stdout();
    assert!(logs.contains("info: greeting uet"), "{logs}");
    let tools = env
        .uet(&["tools", "--tools", "tools.toml", "--json"])
        .expect(0)
        .stdout();
    let tools: serde_json::Value = serde_json::from_str(&tools).unwrap();
    assert_eq!(tools[0]["capabilities"], serde_json::json!([capability]));
    assert_eq!(tools[0]["version"], "0.1.0");

    env.write(
        "bad.toml",
        &format!("name = \"bad\"\n[[steps]]\nid = \"s\"\ntool = \"{tool}\"\nretries = 3\nwith = {{ who = 1 }}\n"),
    );
    let bad = env.uet(&["run", "bad.toml", "--json"]).expect(1);
    let bad: serde_json::Value = serde_json::from_str(&bad.stdout()).unwrap();
    let s = step(&bad, "s");
    assert_eq!(s["attempts"], 1, "{s}");
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("`name` (a non-empty string) is required"),
        "{s}"
    );
}

#[test]
fn a_python_plugin_built_with_componentize_py_runs() {
    runs_through_uet(
        "python",
        "pygreet.wasm",
        "pygreet",
        "example.python",
        "python",
    );
}

#[test]
fn a_javascript_plugin_built_with_componentize_js_runs() {
    runs_through_uet("js", "jsgreet.wasm", "jsgreet", "example.js", "javascript");
}

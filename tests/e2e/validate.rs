//! Invalid input: every class of problem is reported with its place, exit 2, and nothing runs.

use crate::util::Env;

fn env_with_tools() -> Env {
    let env = Env::new();
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "echo"
command = ["cat"]
capabilities = ["text.echo"]
"#,
    );
    env
}

/// Validates `text` as `name` and returns stderr, asserting exit 2; then checks that `uet run`
/// refuses it too and records nothing.
fn rejected(env: &Env, name: &str, text: &[u8]) -> String {
    let path = env.ws.join(name);
    std::fs::write(&path, text).unwrap();
    let run = env.uet(&["validate", name]).expect(2);
    let err = run.stderr();
    assert!(err.contains("nothing was run"), "{}", run.describe());
    env.uet(&["run", name]).expect(2);
    assert!(
        !env.state.exists(),
        "an invalid workflow must not touch the state"
    );
    err
}

#[test]
fn a_valid_workflow_passes() {
    let env = env_with_tools();
    env.write(
        "ok.toml",
        "name = \"ok\"\n[[steps]]\nid = \"a\"\ntool = \"echo\"\n",
    );
    env.write(
        "ok.json",
        r#"{"name": "ok", "steps": [{"id": "a", "capability": "text.echo"}]}"#,
    );
    let run = env.uet(&["validate", "ok.toml", "ok.json"]).expect(0);
    assert!(
        run.stdout().contains("ok.toml: ok: `ok`, 1 steps"),
        "{}",
        run.describe()
    );
}

#[test]
fn syntax_errors_point_at_the_place() {
    let env = env_with_tools();
    let err = rejected(&env, "syntax.toml", b"name = \"x\"\n[[steps]\nid = \"a\"\n");
    assert!(err.contains("syntax.toml:2:"), "{err}");
    assert!(err.contains("TOML syntax"), "{err}");
    let err = rejected(&env, "syntax.json", b"{\"name\": \"x\",\n \"steps\": [}\n");
    assert!(err.contains("syntax.json:2:"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let env = env_with_tools();
    let err = rejected(
        &env,
        "bad.toml",
        br#"name = "bad"
colour = "red"
timeout = "soon"

[[steps]]
id = "a"
tool = "ghost"
command = ["rm", "-rf", "/"]

[[steps]]
id = "a"
capability = "no.such.thing"

[[steps]]
id = "b"
tool = "echo"
needs = ["nobody", "c"]
with = { v = "${steps.d.output.x}" }

[[steps]]
id = "c"
tool = "echo"
needs = ["b"]

[[steps]]
id = "d"
tool = "echo"
timeout = "1 fortnight"
"#,
    );
    for want in [
        "bad.toml:2:1: workflow: unknown key `colour`",
        "bad.toml:3:11: workflow: `timeout`: bad duration \"soon\"",
        "bad.toml:7:8: step `a`: unknown tool `ghost`",
        "bad.toml:8:11: step `a`: a step cannot carry its own `command`",
        "bad.toml:11:6: duplicate step id `a` (first defined on line 6)",
        "bad.toml:12:14: step `a`: no tool in",
        "has capability `no.such.thing`",
        "bad.toml:17:10: step `b` needs `nobody`, which is not a step of this workflow",
        "cycle in `needs`: b → c → b",
        "step `b`: ${steps.d.output.x} reads step `d`, which is not upstream",
        "bad.toml:28:11: step `d`: `timeout`: bad duration \"1 fortnight\"",
        "problems; nothing was run",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn json_workflows_get_places_too() {
    let env = env_with_tools();
    let err = rejected(
        &env,
        "bad.json",
        b"{\n  \"name\": \"j\",\n  \"steps\": [\n    {\"id\": \"a\", \"tool\": \"echo\", \"needs\": [\"zz\"]}\n  ]\n}\n",
    );
    assert!(err.contains("bad.json:4:43: step `a` needs `zz`"), "{err}");
}

#[test]
fn binary_garbage_is_refused_cleanly() {
    let env = env_with_tools();
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let err = rejected(&env, "garbage.toml", &garbage);
    assert!(err.contains("garbage.toml:1:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let err = rejected(&env, "deep.json", "[".repeat(1_000_000).as_bytes());
    assert!(err.contains("nested more than"), "{err}");
}

#[test]
fn a_bad_tools_file_is_reported_with_its_place() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"t\"\ncommand = [\"x\"]\nlimits = { timeout = \"later\" }\n",
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"t\"\n",
    );
    let run = env.uet(&["run", "w.toml"]).expect(2);
    assert!(
        run.stderr()
            .contains("tools.toml:4:22: tool `t`: `limits.timeout`: bad duration"),
        "{}",
        run.describe()
    );
    assert!(!env.state.exists());
}

#[test]
fn usage_errors_exit_2() {
    let env = Env::new();
    env.uet(&["run"]).expect(2);
    env.uet(&["frobnicate"]).expect(2);
    let run = env.uet(&["run", "missing.toml"]).expect(2);
    assert!(run.stderr().contains("missing"), "{}", run.describe());
}

#[test]
fn steps_inputs_are_checked_against_their_plugins_input_schemas_where_written() {
    let env = Env::new();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"hash\"\nwasm = \"{}\"\nsandbox = {{ read = [\".\"] }}\n",
            crate::util::plugin("filehash").display()
        ),
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[params]\nroot = \"docs\"\n\
         [[steps]]\nid = \"good\"\ntool = \"hash\"\nwith = { glob = \"*.md\", root = \"${params.root}\" }\n\
         [[steps]]\nid = \"later\"\ntool = \"hash\"\nneeds = [\"good\"]\nwith = { glob = \"${steps.good.output.files}\" }\n\
         [[steps]]\nid = \"bad\"\ntool = \"hash\"\nwith = { root = 5, colour = \"red\" }\n",
    );
    let err = env.uet(&["validate", "w.toml"]).expect(2).stderr();
    // the wrong type at the value, the unknown key and the missing one at the table
    assert!(
        err.contains("w.toml:16:17: step `bad`: `with` at /root: 5 is not of type \"string\""),
        "{err}"
    );
    assert!(err.contains("w.toml:16:8: step `bad`: `with`:"), "{err}");
    assert!(err.contains("\"glob\" is a required property"), "{err}");
    assert!(err.contains("colour"), "{err}");
    assert!(err.contains("(the input schema of tool `hash`)"), "{err}");
    // filled from params, or from an upstream output: nothing said of `good` and `later`
    assert!(
        !err.contains("step `good`") && !err.contains("step `later`"),
        "{err}"
    );

    // `uet tools --json` shows the schema
    let tools = env
        .uet(&["tools", "--tools", "tools.toml", "--json"])
        .expect(0)
        .stdout();
    let tools: serde_json::Value = serde_json::from_str(&tools).unwrap();
    assert_eq!(
        tools[0]["input_schema"]["required"],
        serde_json::json!(["glob"])
    );
}

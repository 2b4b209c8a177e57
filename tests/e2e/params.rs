//! Saying what you mean: a workflow's `[params]`, filled by `--set` on `uet run` and
//! `uet submit`, and every wrong or missing one a located error.

use serde_json::json;

use crate::daemon::{Daemon, tools};
use crate::util::{Env, step};

const FLOW: &str = r#"name = "greet"

[params]
greeting = "hello"
times = 2
loud = false

[[steps]]
id = "say"
tool = "echo"
with = { text = "${params.greeting} x${params.times}", times = "${params.times}", loud = "${params.loud}" }
"#;

fn output(run: &crate::util::Run) -> serde_json::Value {
    let out: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    step(&out, "say")["output"].clone()
}

#[test]
fn params_take_their_defaults_or_the_values_set_and_keep_their_types() {
    let env = Env::new();
    tools(&env);
    env.write("w.toml", FLOW);
    let run = env.uet(&["run", "w.toml", "--json"]).expect(0);
    assert_eq!(
        output(&run),
        json!({"text": "hello x2", "times": 2, "loud": false})
    );
    let run = env
        .uet(&[
            "run",
            "w.toml",
            "--json",
            "--set",
            "greeting=bye",
            "--set",
            "times=5",
            "--set",
            "loud=true",
        ])
        .expect(0);
    assert_eq!(
        output(&run),
        json!({"text": "bye x5", "times": 5, "loud": true})
    );
    // the log says what the run took
    let events = env.uet(&["events", "last"]).expect(0).stdout();
    assert!(
        events.contains("params greeting=bye, loud=true, times=5"),
        "{events}"
    );
    // a value is filled in as it is: never read again for references
    let run = env
        .uet(&[
            "run",
            "w.toml",
            "--json",
            "--set",
            "greeting=${steps.say.output}",
        ])
        .expect(0);
    assert_eq!(output(&run)["text"], "${steps.say.output} x2");
    // the dry run shows the values
    let dry = env
        .uet(&["run", "w.toml", "--dry-run", "--set", "times=9"])
        .expect(0)
        .stdout();
    assert!(
        dry.contains("params: greeting=hello, loud=false, times=9"),
        "{dry}"
    );
}

#[test]
fn an_unknown_mistyped_or_undeclared_parameter_is_a_located_error_and_nothing_runs() {
    let env = Env::new();
    tools(&env);
    env.write("w.toml", FLOW);
    let run = env.uet(&["run", "w.toml", "--set", "nope=1"]).expect(2);
    let err = run.stderr();
    assert!(err.contains("w.toml:3:1"), "{err}");
    assert!(err.contains("no parameter `nope`"), "{err}");
    assert!(err.contains("greeting, loud, times"), "{err}");
    assert!(err.contains("nothing was run"), "{err}");
    let err = env
        .uet(&["run", "w.toml", "--set", "times=many"])
        .expect(2)
        .stderr();
    assert!(
        err.contains("`times` takes an integer (its default is 2)"),
        "{err}"
    );
    let err = env
        .uet(&["run", "w.toml", "--set", "times"])
        .expect(2)
        .stderr();
    assert!(err.contains("write NAME=VALUE"), "{err}");

    env.write(
        "bad.toml",
        "name = \"bad\"\n[params]\na = 1\n[[steps]]\nid = \"s\"\ntool = \"echo\"\nwith = { x = \"${params.a}\", y = [\"ok\", \"${params.missing}\"] }\n",
    );
    let err = env.uet(&["run", "bad.toml"]).expect(2).stderr();
    // at the string that names it
    assert!(err.contains("bad.toml:7:40"), "{err}");
    assert!(
        err.contains("`${params.missing}` names no parameter"),
        "{err}"
    );
    // nothing was recorded: no state was even made
    assert!(!env.state.exists());
}

#[test]
fn submit_takes_values_for_a_file_from_elsewhere_and_refuses_them_for_a_drop() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let elsewhere = env.ws.parent().unwrap().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(env.ws.join("tools.toml"), elsewhere.join("tools.toml")).unwrap();
    let file = elsewhere.join("w.toml");
    std::fs::write(&file, FLOW).unwrap();
    let file = file.to_str().unwrap();
    daemon
        .client(&env, &["submit", file, "--wait", "--set", "greeting=hi"])
        .expect(0);
    let shown = daemon.client(&env, &["show", "last", "--json"]).expect(0);
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout()).unwrap();
    assert_eq!(step(&shown, "say")["output"]["text"], "hi x2", "{shown}");
    let err = daemon
        .client(&env, &["submit", file, "--set", "greeting"])
        .expect(2)
        .stderr();
    assert!(err.contains("write NAME=VALUE"), "{err}");
    let err = daemon
        .client(&env, &["submit", file, "--set", "other=1"])
        .expect(2)
        .stderr();
    assert!(err.contains("no parameter `other`"), "{err}");

    // one in a watched folder is a drop, read again from its claim after a crash, where no
    // value given here would be kept
    let dropped = env.write("later.toml", &FLOW.replace("greet", "later"));
    let err = daemon
        .client(
            &env,
            &["submit", dropped.to_str().unwrap(), "--set", "times=3"],
        )
        .expect(2)
        .stderr();
    assert!(
        err.contains("--set is for files outside the watched folders"),
        "{err}"
    );
}

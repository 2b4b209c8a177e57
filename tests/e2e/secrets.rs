//! Environment and secrets for command tools: `env` and `env_file` in tools.toml; a secrets
//! file must be the operator's alone, and its values never reach the state, the log, the
//! events or anything shown.

use std::os::unix::fs::PermissionsExt;

use crate::daemon::Daemon;
use crate::util::{Env, step};

const SECRET: &str = "s3cr3t-\"quoted\"-token";

fn leaky_tools(env: &Env, mode: u32) {
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "leaky"
command = ["sh", "-c", "printf '{{\"token\": \"%s\", \"region\": \"%s\"}}' \"$API_TOKEN\" \"$REGION\"; echo \"using $API_TOKEN\" >&2"]
env = { REGION = "eu-west" }
env_file = "secrets.env"

[[tools]]
name = "failing"
command = ["sh", "-c", "echo \"auth with $API_TOKEN refused\" >&2; exit 1"]
env_file = "secrets.env"
"#,
    );
    let file = env.write(
        "secrets.env",
        &format!("# the API's\nexport API_TOKEN='{SECRET}'\nSHORT=abc\n"),
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every file under `dir`, as bytes, with its path.
pub(crate) fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

fn holds(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_secret_reaches_the_command_but_never_the_state_the_log_or_the_events() {
    let env = Env::new();
    leaky_tools(&env, 0o600);
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"leaky\"\n[[steps]]\nid = \"b\"\ntool = \"failing\"\n",
    );
    let run = env.uet(&["run", "w.toml", "--json"]).expect(1);
    let out: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    // the command had it (it printed it), and what it printed was cut before it was kept
    assert_eq!(
        step(&out, "a")["output"],
        serde_json::json!({"token": "[redacted]", "region": "eu-west"})
    );
    assert_eq!(
        step(&out, "b")["reason"],
        "exited with code 1: auth with [redacted] refused"
    );
    let logs = env.uet(&["logs", "last"]).expect(0).stdout();
    assert!(logs.contains("using [redacted]"), "{logs}");
    let mut shown = run.stdout() + &run.stderr() + &logs;
    shown += &env.uet(&["events", "last"]).expect(0).stdout();
    shown += &env.uet(&["show", "last", "--json"]).expect(0).stdout();
    shown += &env.uet(&["logs", "last", "--json"]).expect(0).stdout();
    assert!(!shown.contains("s3cr3t"), "{shown}");
    // and not a byte of it in the state's files: the database and its journal
    for (path, bytes) in files_under(&env.state) {
        assert!(
            !holds(&bytes, "s3cr3t"),
            "{} holds the secret",
            path.display()
        );
    }
    // the daemon cuts it from what it shows too
    let daemon = Daemon::start(&env);
    crate::daemon::drop_file(
        &env,
        "again.toml",
        "name = \"again\"\n[[steps]]\nid = \"a\"\ntool = \"leaky\"\n",
    );
    let runs = daemon.wait_for_runs(&env, 2);
    assert!(runs.iter().any(|r| r["name"] == "again"), "{runs:?}");
    let shown = daemon.client(&env, &["logs", "last"]).expect(0).stdout();
    assert!(shown.contains("using [redacted]"), "{shown}");
    for (path, bytes) in files_under(&env.state) {
        assert!(
            !holds(&bytes, "s3cr3t"),
            "{} holds the secret",
            path.display()
        );
    }
}

#[test]
fn a_secrets_file_others_may_read_is_refused_where_it_is_named() {
    let env = Env::new();
    leaky_tools(&env, 0o644);
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"leaky\"\n",
    );
    let err = env.uet(&["run", "w.toml"]).expect(2).stderr();
    assert!(err.contains("tools.toml:6:12"), "{err}");
    assert!(
        err.contains("mode 644: a secrets file must be readable by its owner alone"),
        "{err}"
    );
    assert!(!env.state.exists(), "nothing was run");
    // listing and checking read no secret, so they still work
    env.uet(&["tools", "--tools", "tools.toml"]).expect(0);
    env.uet(&["validate", "w.toml"]).expect(0);

    // env is for commands, and names are plain and not uet's
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"p\"\nwasm = \"p.wasm\"\nenv = { A = \"1\" }\n\n[[tools]]\nname = \"c\"\ncommand = [\"true\"]\nenv = { UET_RUN_ID = \"7\", \"A-B\" = \"x\", N = 1 }\n",
    );
    let err = env.uet(&["validate", "w.toml"]).expect(2).stderr();
    assert!(
        err.contains("`env` and `env_file` are for command tools"),
        "{err}"
    );
    assert!(
        err.contains("names starting with UET_ are uet's own"),
        "{err}"
    );
    assert!(err.contains("`A-B` is not a variable name"), "{err}");
    assert!(err.contains("`N` must be a string"), "{err}");
}

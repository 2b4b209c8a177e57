//! Notifications: `[notify]` sends a run's summary to a webhook (retried with backoff, signed)
//! and/or a command tool when the run ends as asked; a failing webhook never fails the run,
//! its attempts are events, and a daemon calls only the webhooks its operator listed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use crate::daemon::{Daemon, drop_file, tools};
use crate::daemon_ops::wait_until;
use crate::util::Env;

/// One request a hook received: its headers (lower-cased names) and body.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: String,
}

/// A webhook receiver on a loopback port: answers each request with the next status of
/// `answers` (the last one for the rest), keeping what it got.
fn hook(answers: Vec<u16>) -> (u16, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let kept = got.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                headers.push((k.to_lowercase(), v.trim().to_string()));
            }
            let length: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            kept.lock().unwrap().push(Received {
                headers,
                body: String::from_utf8(body).unwrap(),
            });
            let status = answers.get(n).or(answers.last()).copied().unwrap_or(200);
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (port, got)
}

fn events(daemon: &Daemon, env: &Env, run: &str) -> String {
    daemon.client(env, &["events", run]).expect(0).stdout()
}

#[test]
fn a_webhook_is_retried_signed_and_never_fails_the_run() {
    let env = Env::new();
    tools(&env);
    let (port, got) = hook(vec![500, 200]);
    let config = env.ws.parent().unwrap().join("daemon.toml");
    std::fs::write(
        &config,
        format!("webhooks = [\"http://127.0.0.1:{port}/\"]\n"),
    )
    .unwrap();
    let daemon = Daemon::start_with_vars(
        &env,
        &["--config", config.to_str().unwrap()],
        &[("UET_WEBHOOK_SECRET", "shh-its-a-secret")],
    );
    drop_file(
        &env,
        "w.toml",
        &format!(
            "name = \"w\"\n[notify]\non = [\"succeeded\"]\nwebhook = \"http://127.0.0.1:{port}/hook\"\nbackoff = \"50ms\"\n\
             [[steps]]\nid = \"say\"\ntool = \"echo\"\nwith = {{ hi = 1 }}\n"
        ),
    );
    daemon.wait_for_runs(&env, 1);
    wait_until("the webhook delivered", || {
        events(&daemon, &env, "1").contains("notify.sent")
    });
    let log = events(&daemon, &env, "1");
    assert!(
        log.contains("notify.retry") && log.contains("answered 500 (attempt 1 of 4); next in 50ms"),
        "{log}"
    );
    assert!(log.contains("200 (attempt 2 of 4)"), "{log}");
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    let body: serde_json::Value = serde_json::from_str(&got[1].body).unwrap();
    assert_eq!(body["run_id"], 1);
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["steps"]["succeeded"], 1);
    // the signature is the body's HMAC-SHA256 under the secret, as openssl computes it
    let signature = got[1]
        .headers
        .iter()
        .find(|(k, _)| k == "x-uet-signature")
        .map(|(_, v)| v.clone())
        .expect("signed");
    let mut openssl = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", "shh-its-a-secret", "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(got[1].body.as_bytes())
        .unwrap();
    let out = openssl.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    let hex = hex.split_whitespace().next().unwrap();
    assert_eq!(signature, format!("sha256={hex}"));

    // a hook that never answers: the run stays what it was, the attempts are in its log
    drop_file(
        &env,
        "down.toml",
        "name = \"down\"\n[notify]\non = [\"failed\", \"succeeded\"]\nwebhook = \"http://127.0.0.1:9/hook\"\nretries = 1\nbackoff = \"10ms\"\n\
         [[steps]]\nid = \"say\"\ntool = \"echo\"\nwith = { hi = 1 }\n",
    );
    // refused: not a listed address
    wait_until("the refusal", || {
        env.ws.join("rejected/down.toml.error.txt").exists()
    });
    let report = std::fs::read_to_string(env.ws.join("rejected/down.toml.error.txt")).unwrap();
    assert!(
        report.contains("is not among the addresses this daemon may call"),
        "{report}"
    );
}

#[test]
fn uet_run_tells_a_tool_and_gives_up_on_a_dead_webhook_without_failing() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\n\n\
         [[tools]]\nname = \"tell\"\ncommand = [\"sh\", \"-c\", \"cat > told.json; echo {state} > state.txt\"]\n",
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[notify]\non = [\"succeeded\"]\nwebhook = \"http://127.0.0.1:9/hook\"\nretries = 1\nbackoff = \"10ms\"\ntool = \"tell\"\n\
         [[steps]]\nid = \"say\"\ntool = \"echo\"\nwith = { hi = 1 }\n",
    );
    env.uet(&["run", "w.toml"]).expect(0);
    let told: serde_json::Value = serde_json::from_str(&env.read("told.json")).unwrap();
    assert_eq!(told["name"], "w");
    assert_eq!(told["state"], "succeeded");
    assert_eq!(env.read("state.txt").trim(), "succeeded");
    let log = env.uet(&["events", "last"]).expect(0).stdout();
    assert!(log.contains("notify.retry"), "{log}");
    assert!(log.contains("(attempt 2 of 2); given up"), "{log}");
    assert!(log.contains("tool `tell`: exited 0"), "{log}");
    assert!(log.contains("run.succeeded"), "{log}");

    // not told when the run ends otherwise than asked
    std::fs::remove_file(env.ws.join("told.json")).unwrap();
    env.write(
        "quiet.toml",
        "name = \"quiet\"\n[notify]\ntool = \"tell\"\n[[steps]]\nid = \"say\"\ntool = \"echo\"\nwith = { hi = 1 }\n",
    );
    env.uet(&["run", "quiet.toml"]).expect(0);
    assert!(
        !env.ws.join("told.json").exists(),
        "on defaults to failed and quarantined"
    );

    // what is wrong is said where it is written
    env.write(
        "bad.toml",
        "name = \"bad\"\n[notify]\non = [\"done\"]\nwebhook = \"https://example.com/x\"\ntool = \"nope\"\n[[steps]]\nid = \"say\"\ntool = \"echo\"\nwith = { hi = 1 }\n",
    );
    let err = env.uet(&["validate", "bad.toml"]).expect(2).stderr();
    assert!(
        err.contains("bad.toml:3:7: notify.on: `done` is not a run's end"),
        "{err}"
    );
    assert!(err.contains("bad.toml:4:11: notify.webhook"), "{err}");
    assert!(err.contains("only plain `http://` addresses"), "{err}");
    assert!(
        err.contains("bad.toml:5:8: notify.tool: unknown tool `nope`"),
        "{err}"
    );
}

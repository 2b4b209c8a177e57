//! Metrics for machines: Prometheus text from `uet metrics`, and from the daemon's opt-in
//! loopback HTTP endpoint.

use std::io::{Read, Write};

use crate::daemon::{Daemon, daemon_command, drop_file};
use crate::util::Env;

/// Checks the text line by line against the exposition format (every sample of a family
/// declared by `# TYPE`, names and labels well formed, values numbers), then parses it.
fn parse(text: &str) -> prometheus_parse::Scrape {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string()), "declared twice: {line}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "value of {line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no # TYPE before {line}");
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(!v.trim_end_matches('"').contains('"'), "{line}");
            }
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {metric} {labels:?}"));
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        prometheus_parse::Value::Histogram(buckets) => {
            buckets.last().map(|b| b.count).unwrap_or(0.0)
        }
        other => panic!("{other:?}"),
    }
}

fn monitored_tools(env: &Env) {
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\n\n\
         [[tools]]\nname = \"fail\"\ncommand = [\"false\"]\nbreaker = { failures = 1, cool_down = \"60s\" }\n",
    );
    env.write(
        "w.toml",
        "name = \"w\"\ntimeout = \"1s\"\n[[steps]]\nid = \"ok\"\ntool = \"echo\"\n[[steps]]\nid = \"no\"\ntool = \"fail\"\n",
    );
}

#[test]
fn metrics_are_valid_prometheus_text_from_the_state_and_from_the_daemon() {
    let env = Env::new();
    monitored_tools(&env);
    env.uet(&["run", "w.toml"]).expect(1);
    env.uet(&["run", "w.toml"]).expect(1);
    let text = env
        .uet(&["metrics", "--socket", "/nonexistent/uet.sock"])
        .expect(0)
        .stdout();
    let scrape = parse(&text);
    assert_eq!(value(&scrape, "uet_runs", &[("state", "failed")]), 1.0);
    // the second found the breaker open and waited for it past its deadline
    assert_eq!(value(&scrape, "uet_runs", &[("state", "quarantined")]), 1.0);
    assert_eq!(value(&scrape, "uet_runs", &[("state", "succeeded")]), 0.0);
    assert_eq!(value(&scrape, "uet_steps", &[("state", "succeeded")]), 2.0);
    assert_eq!(
        value(
            &scrape,
            "uet_attempts_total",
            &[("tool", "echo"), ("outcome", "succeeded")]
        ),
        2.0
    );
    // and never called `fail`
    assert_eq!(
        value(&scrape, "uet_attempt_failures_total", &[("tool", "fail")]),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "uet_breaker_state",
            &[("tool", "fail"), ("state", "open")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "uet_step_duration_seconds", &[("tool", "echo")]),
        2.0
    );
    let folder = env.ws.canonicalize().unwrap();
    assert!(text.contains(&format!(
        "uet_step_duration_seconds_bucket{{tool=\"echo\",folder=\"{}\",le=\"+Inf\"}} 2",
        folder.display()
    )));

    // the daemon serves the same on a loopback port when asked to
    let config = env.ws.parent().unwrap().join("daemon.toml");
    std::fs::write(&config, "metrics = \"127.0.0.1:0\"\n").unwrap();
    // read before the daemon starts: it takes w.toml in, as a file already there
    let again = env.read("w.toml").replace("\"w\"", "\"again\"");
    let daemon = Daemon::start_with(&env, &["--config", config.to_str().unwrap()]);
    drop_file(&env, "again.toml", &again);
    daemon.wait_for_runs(&env, 3);
    let status = daemon.status(&env);
    let addr = status["metrics"]
        .as_str()
        .expect("status says where metrics are");
    let get = |path: &str| {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        reply
    };
    let reply = get("/metrics");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let scrape = parse(body);
    assert_eq!(value(&scrape, "uet_runs", &[("state", "quarantined")]), 2.0);
    // the run has ended; its task may still be letting go of its slot
    assert!(value(&scrape, "uet_runs_active", &[]) <= 1.0);
    assert!(get("/other").starts_with("HTTP/1.1 404"));
    let over_socket = daemon.client(&env, &["metrics"]).expect(0).stdout();
    parse(&over_socket);

    // never beyond this machine
    drop(daemon);
    std::fs::write(&config, "metrics = \"0.0.0.0:9464\"\n").unwrap();
    let socket = env.ws.parent().unwrap().join("sock3/uet.sock");
    let out = daemon_command(&env, &socket)
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn two_tools_files_tools_of_one_name_have_their_own_breakers_and_counters() {
    let env = Env::new();
    // two folders, each with its own `check`: one always fails, the other never does
    env.write(
        "a/tools.toml",
        "[[tools]]\nname = \"check\"\ncommand = [\"false\"]\nbreaker = { failures = 1, cool_down = \"1h\" }\n",
    );
    env.write(
        "b/tools.toml",
        "[[tools]]\nname = \"check\"\ncommand = [\"true\"]\nbreaker = { failures = 1, cool_down = \"1h\" }\n",
    );
    let flow = "name = \"w\"\ntimeout = \"3s\"\n[[steps]]\nid = \"c\"\ntool = \"check\"\n";
    env.write("a/w.toml", flow);
    env.write("b/w.toml", flow);
    env.uet(&["run", "a/w.toml"]).expect(1);
    // a's breaker is open for an hour; b's `check` is another tool and runs at once
    let b = env.uet(&["run", "b/w.toml", "--json"]).expect(0);
    assert!(b.stdout().contains("\"succeeded\""), "{}", b.describe());

    let text = env.uet(&["metrics"]).expect(0).stdout();
    let scrape = parse(&text);
    let a = env.ws.join("a").canonicalize().unwrap();
    let b = env.ws.join("b").canonicalize().unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let open = |folder| {
        value(
            &scrape,
            "uet_breaker_state",
            &[("tool", "check"), ("folder", folder), ("state", "open")],
        )
    };
    assert_eq!(open(a), 1.0);
    // b's never changed, so it was never written
    assert!(
        !text.contains(&format!("folder=\"{b}\",state=\"open\"}} 1")),
        "{text}"
    );
    let failures = |folder| {
        value(
            &scrape,
            "uet_attempt_failures_total",
            &[("tool", "check"), ("folder", folder)],
        )
    };
    assert_eq!((failures(a), failures(b)), (1.0, 0.0));
    // `uet tools` shows each file's own breaker
    let shown = env
        .uet(&["tools", "--tools", "b/tools.toml", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown[0]["breaker"]["state"], "closed", "{shown}");
    let shown = env
        .uet(&["tools", "--tools", "a/tools.toml", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown[0]["breaker"]["state"], "open", "{shown}");
}

//! The web dashboard over real HTTP: logins, every refusal of the guard, the JSON reads, the
//! actions and the live stream. The browser tests are in `browser.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, drop_file, tools};
use crate::util::Env;

/// A daemon serving the dashboard on a free loopback port.
pub(crate) struct Dashboard {
    pub(crate) daemon: Daemon,
    pub(crate) port: u16,
}

impl Dashboard {
    pub(crate) fn start(env: &Env) -> Dashboard {
        let daemon = Daemon::start_with(env, &["--http", "127.0.0.1:0"]);
        let status = daemon.status(env);
        let web = status["web"]
            .as_str()
            .expect("status says where the dashboard is");
        let port = web.rsplit(':').next().unwrap().parse().unwrap();
        Dashboard { daemon, port }
    }

    /// A fresh one-time login address from `uet web`.
    pub(crate) fn login_url(&self, env: &Env) -> String {
        let out = self.daemon.client(env, &["web"]).expect(0).stdout();
        let url = out.trim().to_string();
        assert!(
            url.starts_with(&format!("http://localhost:{}/login?token=", self.port)),
            "{url}"
        );
        url
    }

    /// Logs in over HTTP: the session cookie, as `uet_session=...`.
    pub(crate) fn session(&self, env: &Env) -> String {
        let url = self.login_url(env);
        let path = &url[url.find("/login").unwrap()..];
        let answer = self.get(path, &[]);
        assert_eq!(answer.status, 303, "{answer:?}");
        let cookie = answer.header("set-cookie").unwrap();
        cookie.split(';').next().unwrap().to_string()
    }

    pub(crate) fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        http(self.port, "GET", path, headers)
    }
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// One request on its own connection (`Host: localhost:PORT` unless given), read to the end.
pub(crate) fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: localhost:{port}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let (status, headers) = read_head(&mut reader);
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).unwrap();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(&raw) } else { raw };
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16);
        let size = size.unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

/// A workflow whose one step waits for a file (`gate`) the test writes.
pub(crate) fn gated(env: &Env) -> &'static str {
    tools(env);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(env.ws.join("tools.toml"))
        .unwrap();
    let gate = "\n[[tools]]\nname = \"gate\"\n\
                command = [\"sh\", \"-c\", \"while [ ! -e gate ]; do sleep 0.05; done; cat\"]\n";
    file.write_all(gate.as_bytes()).unwrap();
    "name = \"gated\"\n[[steps]]\nid = \"first\"\ntool = \"echo\"\nwith = { n = 1 }\n\
     [[steps]]\nid = \"wait\"\ntool = \"gate\"\nneeds = [\"first\"]\nwith = { n = 2 }\n\
     [[steps]]\nid = \"last\"\ntool = \"echo\"\nneeds = [\"wait\"]\nwith = { n = 3 }\n"
}

/// A dashboard whose run 1 (`gated`) has its middle step waiting at the gate.
pub(crate) fn at_the_gate(env: &Env) -> Dashboard {
    let flow = gated(env);
    let web = Dashboard::start(env);
    drop_file(env, "g.toml", flow);
    wait_until(&web.daemon, env, 1, |r| r["steps"][1]["state"] == "running");
    web
}

/// Polls `uet show RUN --json` until `ok` holds of it.
pub(crate) fn wait_until(
    daemon: &Daemon,
    env: &Env,
    run: u64,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let out = daemon.client(env, &["show", &run.to_string(), "--json"]);
        if out.code() == 0 {
            let shown: serde_json::Value = serde_json::from_str(&out.stdout()).unwrap();
            if ok(&shown) {
                return shown;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "run {run} never got there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_dashboard_is_off_unless_asked_and_stays_on_loopback_unless_told() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let off = daemon.client(&env, &["web"]).expect(2);
    assert!(off.stderr().contains("--http"), "{}", off.describe());
    drop(daemon);
    // the config file's `http` turns it on as the flag does
    let config = env.ws.parent().unwrap().join("uet.toml");
    std::fs::write(&config, "http = \"127.0.0.1:0\"\n").unwrap();
    let daemon = Daemon::start_with(&env, &["--config", config.to_str().unwrap()]);
    let url = daemon.client(&env, &["web"]).expect(0).stdout();
    assert!(url.starts_with("http://localhost:"), "{url}");
    let status = daemon.client(&env, &["status"]).expect(0).stdout();
    assert!(status.contains("web: http://127.0.0.1:"), "{status}");
    drop(daemon);
    // beyond loopback without --http-public: refused at start, and says how
    let out = crate::daemon::daemon_command(&env, &env.ws.parent().unwrap().join("s2/u.sock"))
        .args(["--http", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--http-public"), "{err}");
}

#[test]
fn a_login_address_works_once_and_gives_a_strict_http_only_cookie() {
    let env = Env::new();
    tools(&env);
    let web = Dashboard::start(&env);
    let url = web.login_url(&env);
    let path = &url[url.find("/login").unwrap()..];
    let first = web.get(path, &[]);
    assert_eq!(first.status, 303);
    assert_eq!(first.header("location"), Some("/"));
    let cookie = first.header("set-cookie").unwrap();
    for part in ["uet_session=", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    // spent: the same address again, and a made-up one, log nobody in
    assert_eq!(web.get(path, &[]).status, 403);
    assert_eq!(web.get("/login?token=00", &[]).status, 403);
    let session = cookie.split(';').next().unwrap();
    assert_eq!(web.get("/api/runs", &[("Cookie", session)]).status, 200);
    // a guessed session is no session
    let guessed = web.get("/api/runs", &[("Cookie", "uet_session=abc")]);
    assert_eq!(guessed.status, 401);
}

#[test]
fn without_a_session_only_the_code_is_served_and_every_answer_forbids_foreign_code() {
    let env = Env::new();
    tools(&env);
    let web = Dashboard::start(&env);
    for path in ["/", "/api/runs", "/api/runs/1", "/api/tools", "/api/stream"] {
        let a = web.get(path, &[]);
        assert_eq!(a.status, 401, "{path}: {a:?}");
        assert!(a.json()["error"].as_str().unwrap().contains("uet web"));
    }
    let js = web.get("/app.js", &[]);
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").unwrap().contains("javascript"));
    for a in [js, web.get("/api/runs", &[])] {
        let csp = a.header("content-security-policy").unwrap();
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("x-frame-options"), Some("DENY"));
        assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
    }
}

#[test]
fn a_foreign_host_is_refused_even_with_a_session() {
    let env = Env::new();
    tools(&env);
    let web = Dashboard::start(&env);
    let session = web.session(&env);
    // a DNS-rebinding page reaches our port under its own name
    let host = format!("evil.example:{}", web.port);
    let a = web.get("/api/runs", &[("Host", &host), ("Cookie", &session)]);
    assert_eq!(a.status, 421, "{a:?}");
    assert_eq!(web.get("/app.js", &[("Host", &host)]).status, 421);
    let a = web.get(
        "/api/runs",
        &[("Host", "localhost:1"), ("Cookie", &session)],
    );
    assert_eq!(a.status, 421, "another port is another origin");
    let ip = format!("127.0.0.1:{}", web.port);
    let a = web.get("/api/runs", &[("Host", &ip), ("Cookie", &session)]);
    assert_eq!(a.status, 200, "the address it listens on is ours");
}

#[test]
fn an_action_needs_a_post_from_the_dashboard_itself() {
    let env = Env::new();
    let web = at_the_gate(&env);
    let session = web.session(&env);
    let origin = format!("http://localhost:{}", web.port);
    let post = |headers: &[(&str, &str)]| {
        let mut all = vec![("Cookie", session.as_str())];
        all.extend_from_slice(headers);
        http(web.port, "POST", "/api/runs/1/cancel", &all)
    };
    // a GET never acts
    assert_eq!(
        web.get("/api/runs/1/cancel", &[("Cookie", &session)])
            .status,
        405
    );
    let refused = [
        post(&[("Origin", "http://evil.example")]),
        post(&[("Sec-Fetch-Site", "cross-site"), ("Origin", &origin)]),
        post(&[("Sec-Fetch-Site", "same-site")]),
        post(&[]),
    ];
    for a in &refused {
        assert_eq!(a.status, 403, "{a:?}");
    }
    // none of them touched the run
    let shown = wait_until(&web.daemon, &env, 1, |_| true);
    assert_eq!(shown["state"], "running");
    // without a session, from the right origin: still no
    let a = http(
        web.port,
        "POST",
        "/api/runs/1/cancel",
        &[("Origin", &origin)],
    );
    assert_eq!(a.status, 401);
    let a = post(&[("Origin", &origin), ("Sec-Fetch-Site", "same-origin")]);
    assert_eq!(a.status, 200, "{a:?}");
    wait_until(&web.daemon, &env, 1, |r| r["state"] == "canceled");
    // cancel twice: the daemon says why not
    let again = post(&[("Origin", &origin)]);
    assert_eq!(again.status, 409, "{again:?}");
}

#[test]
fn the_reads_say_what_uet_show_says() {
    let env = Env::new();
    let web = at_the_gate(&env);
    let cookie = web.session(&env);
    let c = [("Cookie", cookie.as_str())];
    std::fs::write(env.ws.join("gate"), "").unwrap();
    let shown = wait_until(&web.daemon, &env, 1, |r| r["state"] == "succeeded");
    let runs = web.get("/api/runs?state=succeeded&q=GAT", &c).json();
    assert_eq!(runs[0]["run_id"], 1);
    assert_eq!(
        web.get("/api/runs?q=nothing", &c).json(),
        serde_json::json!([])
    );
    let page = web.get("/api/runs/1", &c).json();
    assert_eq!(page["run"]["state"], "succeeded");
    assert_eq!(page["run"]["steps"].as_array().unwrap().len(), 3);
    assert!(page["head"].as_u64().unwrap() >= 8, "{page}");
    let layout = web.get("/api/runs/1/layout", &c).json();
    let columns: Vec<_> = layout["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["column"])
        .collect();
    assert_eq!(columns, [0, 1, 2]);
    let step = web.get("/api/runs/1/steps/wait", &c).json();
    assert_eq!(step["step"]["output"], shown["steps"][1]["output"]);
    assert_eq!(step["needs"], serde_json::json!(["first"]));
    assert_eq!(step["attempts"][0]["outcome"], "succeeded");
    let kinds: Vec<&str> = step["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"step.running") && kinds.contains(&"step.succeeded"),
        "{kinds:?}"
    );
    assert_eq!(web.get("/api/runs/1/steps/nope", &c).status, 404);
    assert_eq!(web.get("/api/runs/99", &c).status, 404);
    assert_eq!(
        web.get("/api/runs/1/timeline", &c)
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let events = web.get("/api/runs/1/events", &c).json();
    assert_eq!(events[0]["seq"], 1);
    let verified = web.get("/api/runs/1/verify", &c).json();
    assert_eq!(verified["holds"], true, "{verified}");
    let tools = web.get("/api/tools", &c).json();
    assert_eq!(tools.as_array().unwrap().len(), 3);
    let history = web.get("/api/history?name=gated", &c).json();
    assert_eq!(history[0]["run_id"], 1);
}

/// Reads server-sent events from a stream until `enough` holds of what came, returning the
/// `(id, event, data)` of each.
fn read_events(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    enough: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    let mut got = Vec::new();
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    let mut line = String::new();
    while !enough(&got) {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        let l = line.trim_end();
        // chunk sizes of the chunked encoding are not SSE lines
        if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().into();
        } else if let Some(v) = l.strip_prefix("event:") {
            event = v.trim().into();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim());
        } else if l.is_empty() && !event.is_empty() {
            got.push((
                id.clone(),
                std::mem::take(&mut event),
                std::mem::take(&mut data),
            ));
        }
    }
    got
}

#[test]
fn the_live_stream_sends_a_runs_events_and_resumes_after_the_last_id() {
    let env = Env::new();
    let web = at_the_gate(&env);
    let cookie = web.session(&env);
    let c = [("Cookie", cookie.as_str())];
    // from the start: everything so far, up to the waiting step's start
    let kinds = |got: &[(String, String, String)]| -> Vec<String> {
        got.iter()
            .flat_map(|(_, _, data)| serde_json::from_str::<Vec<serde_json::Value>>(data).unwrap())
            .map(|e| {
                format!(
                    "{} {}",
                    e["kind"].as_str().unwrap(),
                    e["step"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let got = read_events(web.port, "/api/stream?run=1&after=0", &c, |g| {
        kinds(g).iter().any(|k| k == "step.running wait")
    });
    assert_eq!(got[0].1, "events");
    let last: u64 = got.last().unwrap().0.parse().unwrap();
    // a reconnecting page names the last id it saw, and gets only what came after
    let opener = std::thread::spawn({
        let ws = env.ws.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(ws.join("gate"), "").unwrap();
        }
    });
    let id = last.to_string();
    let mut headers = c.to_vec();
    headers.push(("Last-Event-ID", &id));
    let resumed = read_events(web.port, "/api/stream?run=1&after=0", &headers, |g| {
        kinds(g).iter().any(|k| k == "run.succeeded ")
    });
    opener.join().unwrap();
    let seqs: Vec<u64> = resumed
        .iter()
        .flat_map(|(_, _, d)| serde_json::from_str::<Vec<serde_json::Value>>(d).unwrap())
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs[0],
        last + 1,
        "resumed right after the last id: {seqs:?}"
    );
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // the list's stream says a change happened
    let change = std::thread::spawn({
        let env_ws = env.ws.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            let tmp = env_ws.join(".again.partial");
            std::fs::write(
                &tmp,
                "name = \"again\"\n[[steps]]\nid = \"a\"\ntool = \"echo\"\n",
            )
            .unwrap();
            std::fs::rename(&tmp, env_ws.join("again.toml")).unwrap();
        }
    });
    let got = read_events(web.port, "/api/stream", &c, |g| !g.is_empty());
    change.join().unwrap();
    assert_eq!(got[0].1, "change");
}

/// Follows a run's stream from its start until the run ends: for each event, the ms from its
/// commit (`at`) to its arrival here, sorted.
pub(crate) fn event_latencies(port: u16, cookie: &str, run: u64) -> Vec<u64> {
    let latencies = std::cell::RefCell::new(Vec::new());
    let seen = std::cell::Cell::new(0);
    let path = format!("/api/stream?run={run}&after=0");
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // events already committed when the stream opens are a backlog, not latency
    let opened = now_ms();
    read_events(port, &path, &[("Cookie", cookie)], |got| {
        // called at every line read: only a new event counts
        if got.len() == seen.get() {
            return false;
        }
        seen.set(got.len());
        let (_, _, data) = got.last().unwrap();
        let arrived = now_ms();
        let events: Vec<serde_json::Value> = serde_json::from_str(data).unwrap();
        for e in &events {
            let at = e["at"].as_u64().unwrap();
            if at >= opened {
                latencies.borrow_mut().push(arrived.saturating_sub(at));
            }
        }
        events.iter().any(|e| e["kind"] == "run.succeeded")
    });
    let mut latencies = latencies.into_inner();
    latencies.sort();
    latencies
}

#[test]
fn connections_are_bounded_and_the_rest_wait_their_turn() {
    let env = Env::new();
    tools(&env);
    let web = Dashboard::start(&env);
    // 128 connections that say nothing hold every place
    let held: Vec<TcpStream> = (0..128)
        .map(|_| TcpStream::connect(("127.0.0.1", web.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut next = TcpStream::connect(("127.0.0.1", web.port)).unwrap();
    let ask = format!(
        "GET /app.js HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
        web.port
    );
    next.write_all(ask.as_bytes()).unwrap();
    next.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut byte = [0u8; 1];
    let waited = next.read(&mut byte);
    assert!(
        waited.is_err(),
        "the 129th was served beside 128 others: {waited:?}"
    );
    // the daemon itself goes on answering on its socket
    web.daemon.client(&env, &["status"]).expect(0);
    drop(held);
    next.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    next.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

//! The web dashboard in a real browser: Debian's chromium, headless, driven through its
//! chromedriver over WebDriver (fantoccini). `./test.sh` installs both.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};

use crate::daemon::{GOOD, drop_file, tools};
use crate::util::{Env, plugin};
use crate::web::{Dashboard, at_the_gate, gated, wait_until};

/// A headless chromium behind its own chromedriver, logged in to a dashboard; both stopped
/// when dropped.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: Child,
    rt: tokio::runtime::Runtime,
    base: String,
    _profile: tempfile::TempDir,
}

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

impl Browser {
    /// Starts the browser and logs in with a fresh `uet web` address.
    pub(crate) fn open(web: &Dashboard, env: &Env) -> Browser {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "the browser tests need Debian's chromium and chromium-driver (./test.sh installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                // no sandbox: the tests may run as root; no background networking: this
                // machine's network is closed and chromium would try it at every start
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let caps: fantoccini::wd::Capabilities = caps.as_object().unwrap().clone();
        let client = rt.block_on(async {
            let started = Instant::now();
            loop {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                match ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&format!("http://127.0.0.1:{port}"))
                    .await
                {
                    Ok(c) => break c,
                    Err(e) if started.elapsed() > Duration::from_secs(20) => {
                        panic!("chromedriver never took a session: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let browser = Browser {
            client,
            driver,
            rt,
            base: format!("http://localhost:{}", web.port),
            _profile: profile,
        };
        let login = web.login_url(env);
        browser.block(browser.client.goto(&login)).unwrap();
        browser
    }

    pub(crate) fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Opens a page of the dashboard (`#/run/1`, ...).
    pub(crate) fn go(&self, hash: &str) {
        self.block(self.client.goto(&format!("{}/{hash}", self.base)))
            .unwrap();
    }

    /// Waits (up to 10 s) for an element, by CSS selector.
    pub(crate) fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.block(
            self.client
                .wait()
                .at_most(Duration::from_secs(10))
                .for_element(Locator::Css(css)),
        )
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    /// Runs a script in the page and returns its value.
    pub(crate) fn js(&self, script: &str) -> serde_json::Value {
        self.block(self.client.execute(script, vec![])).unwrap()
    }

    /// Waits (up to 10 s) until a script returns true.
    pub(crate) fn until(&self, what: &str, script: &str) {
        let start = Instant::now();
        while self.js(script) != serde_json::json!(true) {
            assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Fails on anything the browser logged as an error (a script error, a refused load, a
    /// policy violation), and on the page's own error banner.
    pub(crate) fn assert_clean(&self) {
        let log = self.block(self.client.issue_cmd(BrowserLog)).unwrap();
        let severe: Vec<_> = log
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .collect();
        assert!(severe.is_empty(), "the browser logged errors: {severe:#?}");
        let banner = self.js("return document.getElementById('errors').hidden");
        let text = self.js("return document.getElementById('errors').textContent");
        assert_eq!(
            banner,
            serde_json::json!(true),
            "the page shows an error: {text}"
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.rt.block_on(client.close());
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// chromedriver's console log of the page (not W3C, but chromedriver's own command).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// A script expression: the class of a step's drawn box ('' when it is not drawn).
fn node_class(step: &str) -> String {
    format!(
        "(document.querySelector('#drawing rect[data-step=\"{step}\"]')?.className.baseVal || '')"
    )
}

#[test]
fn the_runs_list_shows_a_dropped_run_as_it_comes() {
    let env = Env::new();
    tools(&env);
    let web = Dashboard::start(&env);
    let browser = Browser::open(&web, &env);
    browser.go("#/");
    browser.find("#runs");
    drop_file(&env, "hello.toml", GOOD);
    // no reload: the list's stream says a run came
    let row = browser.find("#runs tr[data-run='1']");
    browser.until(
        "the run shows as succeeded",
        "return document.querySelector(\"#runs tr[data-run='1']\").textContent.includes('succeeded')",
    );
    assert!(browser.block(row.text()).unwrap().contains("hello"));
    browser.assert_clean();
}

#[test]
fn a_run_page_colours_its_steps_as_they_finish() {
    let env = Env::new();
    let web = at_the_gate(&env);
    let browser = Browser::open(&web, &env);
    browser.go("#/run/1");
    browser.find("#drawing rect[data-step='wait']");
    let class = |step: &str| browser.js(&format!("return {}", node_class(step)));
    assert!(class("first").as_str().unwrap().contains("st-succeeded"));
    assert!(class("wait").as_str().unwrap().contains("st-running"));
    assert!(class("last").as_str().unwrap().contains("st-pending"));
    std::fs::write(env.ws.join("gate"), "").unwrap();
    browser.until(
        "the last step turns green without a reload",
        &format!("return {}.includes('st-succeeded')", node_class("last")),
    );
    browser.until(
        "the run's badge says succeeded",
        "return document.getElementById('run-state').textContent === 'succeeded'",
    );
    // a step's panel: what it ran, its attempts and output
    browser
        .block(browser.find("#drawing rect[data-step='wait']").click())
        .unwrap();
    browser.until(
        "the panel shows the step",
        "return (document.getElementById('step-title') || {}).textContent?.startsWith('wait')",
    );
    let panel = browser.block(browser.find("#panel").text()).unwrap();
    assert!(
        panel.contains("tool `gate`") && panel.contains("attempts (1)"),
        "{panel}"
    );
    // the timeline: an attempt bar a step, each clickable, and the queue before `wait`
    browser
        .block(browser.find("#tab-timeline").click())
        .unwrap();
    browser.find("#drawing rect.node[data-step='last']");
    browser.until(
        "a bar for each attempt",
        "return document.querySelectorAll('#drawing rect.node').length === 3",
    );
    browser.block(browser.find("#tab-events").click()).unwrap();
    browser.until(
        "the log lists the run's end",
        "return document.getElementById('events').textContent.includes('run.succeeded')",
    );
    browser.block(browser.find("#verify").click()).unwrap();
    browser.until(
        "the chain is checked",
        "return document.getElementById('verified').textContent.includes('holds')",
    );
    browser.assert_clean();
}

#[test]
fn cancel_from_the_page_cancels_the_run() {
    let env = Env::new();
    let web = at_the_gate(&env);
    let browser = Browser::open(&web, &env);
    browser.go("#/run/1");
    browser.block(browser.find("#act-cancel").click()).unwrap();
    let asked = browser.block(browser.client.get_alert_text()).unwrap();
    assert!(asked.contains("cancel run #1"), "{asked}");
    browser.block(browser.client.accept_alert()).unwrap();
    wait_until(&web.daemon, &env, 1, |r| r["state"] == "canceled");
    browser.until(
        "the page shows the run canceled",
        "return document.getElementById('run-state').textContent === 'canceled'",
    );
    browser.assert_clean();
}

#[test]
fn a_10000_step_run_page_draws_only_what_is_in_view() {
    let env = Env::new();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"q\"\nwasm = \"{}\"\n",
            plugin("jsonq").display()
        ),
    );
    let mut flow = String::from("name = \"wide\"\nmax_parallel = 4\n");
    for i in 0..10_000 {
        flow.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"q\"\nwith = {{ value = {i}, query = \"\" }}\n"
        ));
    }
    let web = Dashboard::start(&env);
    drop_file(&env, "wide.toml", &flow);
    wait_until(&web.daemon, &env, 1, |r| r["state"] == "succeeded");
    let browser = Browser::open(&web, &env);
    let start = Instant::now();
    browser.go("#/run/1");
    browser.find("#drawing rect[data-step='s0']");
    let took = start.elapsed();
    eprintln!("a 10,000-step run page drew its first screen in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let drawn = browser.js("return document.querySelectorAll('#drawing *').length");
    assert!(drawn.as_u64().unwrap() < 500, "{drawn} elements drawn");
    assert_eq!(
        browser.js("return document.getElementById('run-progress').textContent"),
        "10000/10000 done"
    );
    // scrolled to the end, the last steps are drawn
    browser.js(
        "const s = document.getElementById('scroller'); s.scrollTop = s.scrollHeight; return 0",
    );
    browser.find("#drawing rect[data-step='s9999']");
    browser.assert_clean();
}

/// Screenshots of the main views for the docs: `scripts/screenshots` runs this with
/// `UET_SCREENSHOTS=docs/img`.
#[test]
#[ignore = "writes docs/img: run by scripts/screenshots"]
fn screenshots() {
    let out = std::path::PathBuf::from(std::env::var("UET_SCREENSHOTS").expect("UET_SCREENSHOTS"));
    let env = Env::new();
    let flow = gated(&env);
    let tools = std::fs::read_to_string(env.ws.join("tools.toml")).unwrap();
    env.write(
        "tools.toml",
        &format!("{tools}\n[[tools]]\nname = \"flaky\"\ncommand = [\"sh\", \"-c\", \"echo no route to host >&2; exit 3\"]\n"),
    );
    let fan = "name = \"fan-out\"\n[[steps]]\nid = \"fetch\"\ntool = \"echo\"\n\
         [[steps]]\nid = \"parse-a\"\ntool = \"echo\"\nneeds = [\"fetch\"]\n\
         [[steps]]\nid = \"parse-b\"\ntool = \"echo\"\nneeds = [\"fetch\"]\n\
         [[steps]]\nid = \"parse-c\"\ntool = \"echo\"\nneeds = [\"fetch\"]\n\
         [[steps]]\nid = \"report\"\ntool = \"gate\"\nneeds = [\"parse-a\", \"parse-b\", \"parse-c\"]\n";
    let web = Dashboard::start(&env);
    for i in 0..2 {
        drop_file(&env, &format!("g{i}.toml"), flow);
        std::fs::write(env.ws.join("gate"), "").unwrap();
        wait_until(&web.daemon, &env, i + 1, |r| r["state"] == "succeeded");
        std::fs::remove_file(env.ws.join("gate")).unwrap();
    }
    drop_file(
        &env,
        "sync.toml",
        "name = \"sync\"\n[[steps]]\nid = \"push\"\ntool = \"flaky\"\n",
    );
    wait_until(&web.daemon, &env, 3, |r| r["state"] == "failed");
    drop_file(&env, "fan-now.toml", fan);
    wait_until(&web.daemon, &env, 4, |r| {
        r["steps"][4]["state"] == "running"
    });
    let browser = Browser::open(&web, &env);
    let shot = |name: &str| {
        std::thread::sleep(Duration::from_millis(400));
        let png = browser.block(browser.client.screenshot()).unwrap();
        std::fs::write(out.join(name), png).unwrap();
    };
    browser.go("#/");
    browser.find("#runs tr[data-run='4']");
    shot("runs.png");
    browser.go("#/run/4");
    browser.find("#drawing rect[data-step='report']");
    browser
        .block(browser.find("#drawing rect[data-step='parse-b']").click())
        .unwrap();
    browser.find("#step-title");
    shot("run.png");
    browser
        .block(browser.find("#tab-timeline").click())
        .unwrap();
    browser.find("#drawing rect");
    shot("timeline.png");
    browser.go("#/tools");
    browser.find("#tools tr");
    shot("tools.png");
}

/// The dashboard's figures for docs/PERFORMANCE.md: `scripts/measure-web` runs this.
#[test]
#[ignore = "a measurement: run by scripts/measure-web"]
fn measure_web() {
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    // idle RSS, without and with the dashboard (nothing run yet; a second to settle)
    for http in [false, true] {
        let env = Env::new();
        tools(&env);
        let daemon = if http {
            Dashboard::start(&env).daemon
        } else {
            crate::daemon::Daemon::start(&env)
        };
        std::thread::sleep(Duration::from_secs(1));
        println!(
            "idle RSS, dashboard {}: {:.1} MB",
            if http { "on" } else { "off" },
            rss(daemon.child.id()) as f64 / 1024.0
        );
    }
    let env = Env::new();
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"q\"\nwasm = \"{}\"\n\n[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\n",
            plugin("jsonq").display()
        ),
    );
    let web = Dashboard::start(&env);
    let sizes = [10, 1_000, 10_000];
    for (i, n) in sizes.iter().enumerate() {
        let mut flow = format!("name = \"wide-{n}\"\nmax_parallel = 4\n");
        for s in 0..*n {
            flow.push_str(&format!(
                "[[steps]]\nid = \"s{s}\"\ntool = \"q\"\nwith = {{ value = {s}, query = \"\" }}\n"
            ));
        }
        drop_file(&env, &format!("w{n}.toml"), &flow);
        wait_until(&web.daemon, &env, i as u64 + 1, |r| {
            r["state"] == "succeeded"
        });
    }
    let browser = Browser::open(&web, &env);
    println!("page|steps|median ms|min–max ms");
    for (i, n) in sizes.iter().enumerate() {
        let mut took = Vec::new();
        for _ in 0..5 {
            browser.block(browser.client.goto("about:blank")).unwrap();
            let start = Instant::now();
            browser.go(&format!("#/run/{}", i + 1));
            browser.find("#drawing rect[data-step='s0']");
            took.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        println!(
            "run page, first screen drawn|{n}|{:.0}|{:.0}–{:.0}",
            took[2], took[0], took[4]
        );
    }
    browser.assert_clean();
    // SSE latency: from an event's commit (its `at`) to its arrival on a run's stream
    let cookie = web.session(&env);
    let mut flow = String::from("name = \"chain\"\n");
    for s in 0..300 {
        flow.push_str(&format!("[[steps]]\nid = \"c{s}\"\ntool = \"echo\"\n"));
        if s > 0 {
            flow.push_str(&format!("needs = [\"c{}\"]\n", s - 1));
        }
    }
    drop_file(&env, "chain.toml", &flow);
    let run = sizes.len() as u64 + 1;
    let latencies = crate::web::event_latencies(web.port, &cookie, run);
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "SSE: commit to arrival over {} events: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        latencies.len(),
        pick(0.5),
        pick(0.9),
        pick(0.99),
        latencies[latencies.len() - 1]
    );
}

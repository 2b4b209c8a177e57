//! The live views in a real terminal: `uet top` and `uet run` inside tmux, read back with
//! capture-pane, driven with send-keys.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, drop_file};
use crate::util::{Env, shared_cache};

/// A tmux server of our own, killed when dropped.
struct Tmux {
    name: String,
}

impl Tmux {
    fn new(tag: &str) -> Tmux {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .map(|o| o.status.success());
        assert!(
            matches!(ok, Ok(true)),
            "these tests need tmux (the test command installs it: apt-get install tmux)"
        );
        Tmux {
            name: format!("uet-test-{}-{tag}", std::process::id()),
        }
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.name)
            .args(args)
            .env_remove("TMUX")
            .output()
            .unwrap()
    }

    /// Starts `shell` in a 110×30 window, in `cwd`.
    fn start(&self, cwd: &Path, shell: &str) {
        let out = self.tmux(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "110",
            "-y",
            "30",
            "-c",
            cwd.to_str().unwrap(),
            shell,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    /// Waits until the screen shows everything in `wanted`, and returns it.
    fn wait_for(&self, wanted: &[&str]) -> String {
        let waited = Instant::now();
        loop {
            let screen = self.screen();
            if wanted.iter().all(|w| screen.contains(w)) {
                return screen;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(20),
                "the screen never showed {wanted:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keys(&self, keys: &str) {
        self.tmux(&["send-keys", "-t", "t", keys]);
    }

    fn gone_within(&self, limit: Duration) -> bool {
        let waited = Instant::now();
        while waited.elapsed() < limit {
            if !self.tmux(&["has-session", "-t", "t"]).status.success() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[test]
fn top_shows_runs_progress_and_breakers_live_and_quits_on_q_and_ctrl_c() {
    let env = Env::new();
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "nap"
command = ["sh", "-c", "sleep {secs}; echo '{{}}'"]

[[tools]]
name = "broken"
command = ["false"]
breaker = { failures = 1, cool_down = "10m" }
"#,
    );
    let daemon = Daemon::start(&env);
    drop_file(
        &env,
        "b.toml",
        "name = \"b\"\n[[steps]]\nid = \"x\"\ntool = \"broken\"\n",
    );
    daemon.wait_for_runs(&env, 1);
    drop_file(
        &env,
        "long.toml",
        "name = \"long-one\"\n[[steps]]\nid = \"first\"\ntool = \"nap\"\nwith = { secs = \"0\" }\n\
         [[steps]]\nid = \"slow\"\ntool = \"nap\"\nneeds = [\"first\"]\nwith = { secs = \"30\" }\n",
    );
    let uet = Path::new(env!("CARGO_BIN_EXE_uet"));
    let done = env.ws.join("top.exit");
    let shell = format!(
        "{} top --every 200ms --socket {}; echo $? > {}",
        shell_quote(uet),
        shell_quote(&daemon.socket),
        shell_quote(&done)
    );
    for quit in ["q", "C-c"] {
        let _ = std::fs::remove_file(&done);
        let tmux = Tmux::new(quit);
        tmux.start(&env.ws, &shell);
        let screen = tmux.wait_for(&["uet top", "long-one", "running", "1/2", "slow", "open ("]);
        assert!(screen.contains("broken"), "{screen}");
        // the run's row carries its elapsed time and an ETA (from `first`'s history)
        let row = screen.lines().find(|l| l.contains("long-one")).unwrap();
        let times = row
            .split_whitespace()
            .filter(|w| {
                w.strip_suffix('s')
                    .is_some_and(|n| n.parse::<f64>().is_ok())
            })
            .count();
        assert_eq!(times, 2, "elapsed and ETA: {row}");
        // it redraws in place: the header is on the first line, once
        assert!(screen.starts_with("uet top"), "{screen}");
        assert_eq!(screen.matches("uet top").count(), 1, "{screen}");
        tmux.keys(quit);
        assert!(
            tmux.gone_within(Duration::from_secs(5)),
            "{quit} did not quit"
        );
        assert_eq!(std::fs::read_to_string(&done).unwrap().trim(), "0");
    }
    daemon.client(&env, &["cancel", "2"]).expect(0);
}

#[test]
fn uet_run_shows_a_live_bar_on_a_terminal() {
    let env = Env::new();
    env.write(
        "tools.toml",
        "[[tools]]\nname = \"nap\"\ncommand = [\"sh\", \"-c\", \"sleep 0.7; echo '{{}}'\"]\n",
    );
    let mut wf = String::from("name = \"live\"\n");
    for i in 0..4 {
        wf.push_str(&format!("[[steps]]\nid = \"step{i}\"\ntool = \"nap\"\n"));
        if i > 0 {
            wf.push_str(&format!("needs = [\"step{}\"]\n", i - 1));
        }
    }
    env.write("live.toml", &wf);
    // history first, so the bar has an ETA
    env.uet(&["run", "live.toml"]).expect(0);
    let uet = Path::new(env!("CARGO_BIN_EXE_uet"));
    let done = env.ws.join("run.exit");
    let shell = format!(
        "UET_STATE={} UET_CACHE_DIR={} {} run live.toml; echo $? > {}; sleep 30",
        shell_quote(&env.state),
        shell_quote(&shared_cache()),
        shell_quote(uet),
        shell_quote(&done)
    );
    let tmux = Tmux::new("run");
    tmux.start(&env.ws, &shell);
    let live = tmux.wait_for(&["1/4", "eta", "running: step1"]);
    assert!(live.contains("✓ step0 succeeded"), "{live}");
    let end = tmux.wait_for(&["run 2 `live`: succeeded"]);
    assert!(
        !end.contains("running: "),
        "the bar is cleared at the end:\n{end}"
    );
    // The shell writes the exit code just after uet prints its last line: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        let code = std::fs::read_to_string(&done).unwrap_or_default();
        if code.ends_with('\n') || Instant::now() > deadline {
            break code;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.trim(), "0");
}

//! Living with it: shell completions, manual pages, and the systemd user unit in contrib/,
//! checked by systemd's own verifier where systemd is installed and started as the unit says.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::Env;

#[test]
fn completions_and_manual_pages_are_printed_and_written() {
    let env = Env::new();
    let bash = env.uet(&["completions", "bash"]).expect(0).stdout();
    assert!(
        bash.contains("_uet()") && bash.contains("complete -F _uet"),
        "{bash}"
    );
    // every command is offered
    for command in ["run", "submit", "logs", "graph", "completions", "man"] {
        assert!(bash.contains(command), "bash completions lack {command}");
    }
    assert!(
        env.uet(&["completions", "zsh"])
            .expect(0)
            .stdout()
            .starts_with("#compdef uet")
    );
    assert!(
        env.uet(&["completions", "fish"])
            .expect(0)
            .stdout()
            .contains("complete -c uet")
    );
    env.uet(&["completions", "tcsh"]).expect(2);

    let page = env.uet(&["man"]).expect(0).stdout();
    assert!(page.contains(".TH uet 1"), "{page}");
    let dir = env.ws.join("man/man1");
    env.uet(&["man", "--dir", dir.to_str().unwrap()]).expect(0);
    for page in ["uet.1", "uet-daemon.1", "uet-run.1", "uet-logs.1"] {
        assert!(dir.join(page).is_file(), "no {page}");
    }
    let daemon = std::fs::read_to_string(dir.join("uet-daemon.1")).unwrap();
    assert!(daemon.contains("watch"), "{daemon}");
}

#[test]
fn the_systemd_user_unit_verifies_and_its_command_runs_a_daemon() {
    let env = Env::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(repo.join("contrib/uet.service")).unwrap();
    // a home as the unit's comments make it: the binary where `cargo install` puts it, and
    // the config they write
    let home = env.ws.parent().unwrap().join("home");
    let bin = home.join(".cargo/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_uet"), bin.join("uet")).unwrap();
    std::fs::create_dir_all(home.join(".config/uet")).unwrap();
    let inbox = home.join("uet-inbox");
    std::fs::write(
        home.join(".config/uet/daemon.toml"),
        format!("watch = [\"{}\"]\ncreate = true\n", inbox.display()),
    )
    .unwrap();
    let runtime = env.ws.parent().unwrap().join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        // the pages its Documentation= names, where man finds them
        let man = env.ws.parent().unwrap().join("man");
        env.uet(&["man", "--dir", man.join("man1").to_str().unwrap()])
            .expect(0);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--user"])
            .arg(repo.join("contrib/uet.service"))
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("MANPATH", &man)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        let has_man = Command::new("man").arg("--version").output().is_ok();
        // every complaint, but that no `man` program is installed to look pages up with
        let complaints: Vec<&str> = said
            .lines()
            .filter(|l| has_man || !l.contains("Command 'man "))
            .collect();
        assert!(
            complaints.is_empty() && (out.status.success() || !has_man),
            "systemd-analyze verify: {said}"
        );
    } else {
        eprintln!("no systemd-analyze here: the unit's syntax is not verified");
    }

    // ExecStart as systemd would run it: %h is the home
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has ExecStart");
    let argv: Vec<String> = exec
        .split_whitespace()
        .map(|a| a.replace("%h", home.to_str().unwrap()))
        .collect();
    let mut daemon = Command::new(&argv[0])
        .args(&argv[1..])
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("UET_STATE")
        .env_remove("UET_SOCKET")
        .env_remove("XDG_STATE_HOME")
        .env("UET_CACHE_DIR", crate::util::shared_cache())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // and the other commands find it where they look by default
    let client = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_uet"))
            .args(args)
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env_remove("UET_STATE")
            .env_remove("UET_SOCKET")
            .env_remove("XDG_STATE_HOME")
            .output()
            .unwrap()
    };
    let started = Instant::now();
    while !client(&["status"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the unit's daemon never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(inbox.is_dir(), "the config's folder was made");
    assert!(runtime.join("uet/uet.sock").exists());
    assert!(client(&["shutdown", "--wait"]).status.success());
    let ended = daemon.wait().unwrap();
    assert!(ended.success(), "{ended:?}");
    assert!(
        home.join(".local/state/uet").is_dir(),
        "the state where `uet` looks for it"
    );
}

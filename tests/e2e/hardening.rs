//! Promises kept under attack: the drop folder, the control socket and the state against
//! hostile input, each case a regression test of a break found by a hostile review.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, daemon_command, tools};
use crate::util::Env;

/// A connection that is only begun: the socket connected without blocking (`None` when the
/// daemon's queue is full), nothing sent.
fn connect_quietly(path: &Path) -> Option<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor we own; the address is built in full
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        assert!(fd >= 0);
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let r = libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len);
        (r == 0).then_some(owned)
    }
}

/// CPU time a process has used, user and system.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn a_socket_path_that_is_somebody_s_file_is_left_alone() {
    let env = Env::new();
    tools(&env);
    let dir = env.ws.parent().unwrap().join("sock");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let file = dir.join("notes.txt");
    std::fs::write(&file, "precious").unwrap();
    let daemon = daemon_command(&env, &file).spawn().unwrap();
    let out = crate::util::output_within(daemon, Duration::from_secs(20), "the daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

/// Out of file descriptors, a daemon used to retry its accept at once, for ever: 100% CPU and
/// a line of log per try.
#[test]
fn held_connections_neither_spin_the_daemon_nor_flood_its_log() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    tools(&env);
    let socket = env.ws.parent().unwrap().join("sock/uet.sock");
    let log = env.ws.parent().unwrap().join("daemon.log");
    let mut cmd = daemon_command(&env, &socket);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; it only lowers this child's own limit
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = Daemon {
        child: cmd.spawn().unwrap(),
        socket: socket.clone(),
    };
    let waited = Instant::now();
    while daemon.client(&env, &["status"]).code() != 0 {
        assert!(waited.elapsed() < Duration::from_secs(20), "never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let held: Vec<OwnedFd> = (0..500).filter_map(|_| connect_quietly(&socket)).collect();
    assert!(held.len() > 256, "only {} connections", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(daemon.child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(daemon.child.id()) - before;
    assert!(
        used < Duration::from_millis(1500),
        "the daemon used {used:?} of CPU in 3 s"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let complaints = text.lines().filter(|l| l.contains("cannot accept")).count();
    assert!(
        (1..=10).contains(&complaints),
        "{complaints} lines about accepting:\n{}",
        &text[..text.len().min(2000)]
    );
    // the held connections are dropped (they never sent a request) and the daemon serves
    drop(held);
    let waited = Instant::now();
    while daemon.client(&env, &["status"]).code() != 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "stopped answering"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.client(&env, &["shutdown"]).expect(0);
    assert!(daemon.child.wait().unwrap().success());
}

/// A client that connects and says nothing, or half a request, is dropped, so it cannot hold
/// one of the daemon's connections for ever.
#[test]
fn a_stalled_client_is_dropped() {
    use std::io::{Read, Write};
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let mut silent = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let mut half = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    half.write_all(&100u32.to_be_bytes()).unwrap();
    half.write_all(b"{\"type\":").unwrap();
    let started = Instant::now();
    for s in [&mut silent, &mut half] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        // the daemon closes it: end of stream
        assert_eq!(s.read(&mut buf).unwrap(), 0);
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(daemon.client(&env, &["status"]).code(), 0);
}

/// Waits for a file to appear, failing after 20 s.
fn wait_for(path: &Path) {
    let waited = Instant::now();
    while !path.exists() {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The most memory a process has held (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// One dropped file of five million bad lines took 1.39 GB and wrote a 439 MB report.
#[test]
fn a_flood_of_bad_lines_gets_a_short_report_and_takes_little_memory() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let huge = "!\n".repeat(5_000_000);
    let big = "!\n".repeat(1_000_000);
    crate::daemon::drop_file(&env, "huge.toml", &huge);
    crate::daemon::drop_file(&env, "big.toml", &big);
    for name in ["huge.toml", "big.toml"] {
        wait_for(&env.ws.join(format!("rejected/{name}.error.txt")));
    }
    let report = |n: &str| env.read(&format!("rejected/{n}.error.txt"));
    assert!(
        report("huge.toml").contains("is larger than 8 MiB"),
        "{}",
        report("huge.toml")
    );
    let big_report = report("big.toml");
    assert!(
        big_report.lines().count() <= 102,
        "{} lines",
        big_report.lines().count()
    );
    // every line is a problem; a window of the parse may count one twice
    let more: u64 = big_report
        .split("… and ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of the rest: {big_report}"));
    assert!((999_900..1_001_000).contains(&more), "{more} more problems");
    let peak = peak_rss(daemon.child.id());
    assert!(peak < 300 << 20, "the daemon peaked at {} MiB", peak >> 20);
    assert_eq!(daemon.client(&env, &["status"]).code(), 0);

    // `uet validate` reads them the same way
    let outside = env.ws.parent().unwrap();
    std::fs::write(outside.join("huge.toml"), &huge).unwrap();
    std::fs::write(outside.join("big.toml"), &big).unwrap();
    let run = env
        .uet(&[
            "validate",
            "../huge.toml",
            "../big.toml",
            "--tools",
            "tools.toml",
        ])
        .expect(2);
    assert!(
        run.stderr().contains("is larger than 8 MiB"),
        "{}",
        run.describe()
    );
    // the huge file's line, a hundred problems, the count of the rest, the summary
    assert!(
        run.stderr().lines().count() <= 103,
        "{}",
        run.stderr().lines().count()
    );
    assert!(run.stderr().contains("uet: 100"), "{}", run.describe());
}

/// A link is dropped to have the daemon read (and run, and quote) a file the dropper cannot
/// read; a link that becomes a FIFO froze the claims.
#[test]
fn links_fifos_and_hard_links_dropped_are_refused_unread() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let outside = env.ws.parent().unwrap().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret.toml");
    std::fs::write(&secret, "password = \"hunter2\"\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = outside.join("good.toml");
    std::fs::write(&good, crate::daemon::GOOD).unwrap();
    let fifo = outside.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut links = vec![("leak.toml", &secret), ("elsewhere.toml", &good)];
    let names: Vec<String> = (0..40).map(|i| format!("flip-{i}.toml")).collect();
    for n in &names {
        links.push((n.as_str(), &fifo));
    }
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, env.ws.join(name)).unwrap();
    }
    let twin = outside.join("twin.toml");
    std::fs::write(&twin, crate::daemon::GOOD).unwrap();
    std::fs::hard_link(&twin, env.ws.join("twin.toml")).unwrap();
    for (name, _) in &links {
        wait_for(&env.ws.join(format!("rejected/{name}.error.txt")));
    }
    wait_for(&env.ws.join("rejected/twin.toml.error.txt"));
    let report = env.read("rejected/leak.toml.error.txt");
    assert!(report.contains("symbolic link"), "{report}");
    assert!(
        !report.contains("hunter2") && !report.contains("password"),
        "{report}"
    );
    let mode = std::fs::metadata(env.ws.join("rejected/leak.toml.error.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        env.read("rejected/twin.toml.error.txt")
            .contains("hard links")
    );
    // nothing ran, the daemon answers, and a plain drop still runs
    assert_eq!(daemon.client(&env, &["status"]).code(), 0);
    assert!(daemon.runs(&env).is_empty());
    crate::daemon::drop_file(&env, "plain.toml", crate::daemon::GOOD);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["state"], "succeeded");
}

#[test]
fn long_names_and_names_rejected_twice_have_a_defined_place() {
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    // 245 bytes: its claim's name would have been too long, and it never ran nor said why
    let long = format!("{}.toml", "a".repeat(240));
    crate::daemon::drop_file(&env, &long, crate::daemon::GOOD);
    let kept = "a".repeat(200);
    wait_for(&env.ws.join(format!("rejected/{kept}.error.txt")));
    let report = env.read(&format!("rejected/{kept}.error.txt"));
    assert!(report.contains("its name is 245 bytes long"), "{report}");
    assert!(env.ws.join("rejected").join(&kept).exists());

    for text in ["colour = 1\n", "shade = 2\n"] {
        crate::daemon::drop_file(&env, "bad.toml", text);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for(&env.ws.join("rejected/2-bad.toml.error.txt"));
    assert!(env.read("rejected/bad.toml.error.txt").contains("colour"));
    assert!(env.read("rejected/2-bad.toml.error.txt").contains("shade"));
    assert_eq!(env.read("rejected/2-bad.toml"), "shade = 2\n");
    assert!(daemon.runs(&env).is_empty());
}

/// A writer that pauses with the file open is waited for: the file used to be read after the
/// 200 ms settle window, half written.
#[test]
fn a_writer_that_pauses_with_the_file_open_is_waited_for() {
    use std::io::Write;
    let env = Env::new();
    tools(&env);
    let daemon = Daemon::start(&env);
    let path = env.ws.join("paused.toml");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(crate::daemon::GOOD.as_bytes()).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    file.write_all(b"[[steps]]\nid = \"second\"\ntool = \"echo\"\nwith = { hi = 2 }\n")
        .unwrap();
    drop(file);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded");
    let show = daemon.client(&env, &["show", "1", "--json"]).expect(0);
    let run: serde_json::Value = serde_json::from_str(&show.stdout()).unwrap();
    assert_eq!(run["steps"].as_array().unwrap().len(), 2, "{run}");
}

/// A claimed file whose taking-in killed the daemon was read again at every start, killing it
/// again; now the second crash sets it aside.
#[test]
fn a_claim_that_stopped_the_daemon_twice_is_set_aside() {
    let env = Env::new();
    tools(&env);
    let claimed = env.ws.join(".uet/claimed");
    std::fs::create_dir_all(&claimed).unwrap();
    // as a crash during the second try leaves them, and one after the first
    std::fs::write(
        claimed.join("1700000000000000000.2-boom.toml"),
        crate::daemon::GOOD,
    )
    .unwrap();
    std::fs::write(
        claimed.join("1700000000000000001-once.toml"),
        crate::daemon::GOOD.replace("hello", "once"),
    )
    .unwrap();
    let daemon = Daemon::start(&env);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["name"], "once");
    let report = env.read("rejected/boom.toml.error.txt");
    assert!(
        report.contains("uet stopped while taking it in, 2 times"),
        "{report}"
    );
    assert_eq!(std::fs::read_dir(&claimed).unwrap().count(), 0);
}

#[test]
fn a_workflow_over_the_step_limit_is_refused_where_its_steps_are() {
    let env = Env::new();
    tools(&env);
    let mut text = String::from("name = \"huge\"\n");
    for i in 0..100_001 {
        text.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"echo\"\n"));
    }
    env.write("huge.toml", &text);
    let run = env.uet(&["validate", "huge.toml"]).expect(2);
    assert!(
        run.stderr()
            .contains("huge.toml:2:1: workflow: 100001 steps, over the limit of 100000"),
        "{}",
        run.describe()
    );
}

fn sha(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_default();
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// A state with one finished run, written by `uet run`.
fn state_with_a_run() -> Env {
    let env = Env::new();
    tools(&env);
    env.write("hello.toml", crate::daemon::GOOD);
    env.uet(&["run", "hello.toml"]).expect(0);
    env
}

#[test]
fn commands_that_read_write_nothing_and_create_no_state() {
    let env = state_with_a_run();
    let files = ["uet.redb", "uet.journal", "uet.groups"].map(|f| env.state.join(f));
    let before: Vec<String> = files.iter().map(|f| sha(f)).collect();
    let state = env.state.to_str().unwrap().to_string();
    let socket = env.ws.parent().unwrap().join("none/uet.sock");
    let socket = socket.to_str().unwrap();
    for cmd in [
        &["verify", "1"][..],
        &["metrics"],
        &["runs", "--json"],
        &["show", "1", "--json"],
        &["events", "1", "--json"],
        &["top", "--json"],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--state", &state, "--socket", socket]);
        env.uet(&args).expect(0);
    }
    env.uet(&["state", "check", "--state", &state]).expect(0);
    let after: Vec<String> = files.iter().map(|f| sha(f)).collect();
    assert_eq!(before, after, "a read changed the state's files");

    // a state folder named by mistake is not made
    let typo = env.ws.parent().unwrap().join("typo");
    let run = env
        .uet(&[
            "verify",
            "1",
            "--state",
            typo.to_str().unwrap(),
            "--socket",
            socket,
        ])
        .expect(2);
    assert!(
        run.stderr().contains("there is no state in"),
        "{}",
        run.describe()
    );
    assert!(!typo.exists());
}

#[test]
fn the_state_is_its_owner_s_alone() {
    use std::os::unix::fs::PermissionsExt;
    let env = state_with_a_run();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.state), 0o700);
    for f in ["uet.redb", "uet.journal", "uet.groups", "uet.redb.bak"] {
        assert_eq!(mode(&env.state.join(f)), 0o600, "{f}");
    }
}

/// Random bytes over the middle of the file made `uet metrics` panic, after which the repair
/// failed and every run was lost.
#[test]
fn a_damaged_state_is_reported_and_recovered_from_its_last_good_copy() {
    let env = state_with_a_run();
    let file = env.state.join("uet.redb");
    assert!(
        env.state.join("uet.redb.bak").exists(),
        "no good copy was kept"
    );
    let mut bytes = std::fs::read(&file).unwrap();
    let (from, to) = (bytes.len() / 4, bytes.len() * 3 / 4);
    let mut seed = 0x9e3779b97f4a7c15u64;
    for b in &mut bytes[from..to] {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
    std::fs::write(&file, &bytes).unwrap();
    let damaged = sha(&file);
    let state = env.state.to_str().unwrap().to_string();
    let socket = env.ws.parent().unwrap().join("none/uet.sock");
    let socket = socket.to_str().unwrap();
    for cmd in [
        &["metrics", "--state", &state, "--socket", socket][..],
        &["verify", "1", "--state", &state, "--socket", socket],
    ] {
        let run = env.uet(cmd).expect(2);
        assert!(
            run.stderr().contains(file.to_str().unwrap()) && !run.stderr().contains("panicked at"),
            "{}",
            run.describe()
        );
    }
    assert_eq!(sha(&file), damaged, "a read repaired the file in place");
    let check = env.uet(&["state", "check", "--state", &state]).expect(1);
    assert!(check.stdout().contains("damaged"), "{}", check.describe());
    assert!(
        check.stdout().contains("uet state recover"),
        "{}",
        check.describe()
    );
    let recover = env.uet(&["state", "recover", "--state", &state]).expect(0);
    assert!(
        recover.stdout().contains("is back"),
        "{}",
        recover.describe()
    );
    let kept: Vec<_> = std::fs::read_dir(&env.state)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("uet.redb.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file is kept");
    assert_eq!(sha(&kept[0].path()), damaged);
    env.uet(&["verify", "1", "--state", &state, "--socket", socket])
        .expect(0);
    env.uet(&["state", "check", "--state", &state]).expect(0);
    env.uet(&["run", "hello.toml"]).expect(0);
}

/// A recovery must not swap the state under a uet that has it open, even one whose database
/// file was deleted (redb's own lock went with it).
#[test]
fn a_state_in_use_is_not_recovered() {
    let env = state_with_a_run();
    let daemon = Daemon::start(&env);
    std::fs::remove_file(env.state.join("uet.redb")).unwrap();
    let state = env.state.to_str().unwrap();
    let run = env.uet(&["state", "recover", "--state", state]).expect(2);
    assert!(run.stderr().contains("in use"), "{}", run.describe());
    assert!(!env.state.join("uet.redb").exists(), "nothing was put back");
    drop(daemon);
}

/// A state file cut to nothing became a new database: the history gone and run ids from 1.
#[test]
fn an_emptied_state_file_is_refused_not_started_over() {
    let env = state_with_a_run();
    let file = env.state.join("uet.redb");
    std::fs::write(&file, b"").unwrap();
    let run = env.uet(&["run", "hello.toml"]).expect(2);
    assert!(
        run.stderr().contains("is empty or gone, but its journal"),
        "{}",
        run.describe()
    );
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
    let state = env.state.to_str().unwrap();
    env.uet(&["state", "recover", "--state", state]).expect(0);
    let (run, out) = env.run_json("hello.toml");
    run.expect(0);
    assert_eq!(out["run_id"], 2, "the history goes on");
}

/// A run whose steps' outputs add up to more than a frame could not be shown at all.
#[test]
fn a_run_too_large_for_one_answer_is_shown_a_page_at_a_time() {
    let env = Env::new();
    env.write(
        "tools.toml",
        r#"
[[tools]]
name = "wide"
command = ["sh", "-c", "printf '\"'; head -c 700000 /dev/zero | tr '\\0' x; printf '\"'"]
"#,
    );
    let mut text = String::from("name = \"large\"\nmax_parallel = 8\n");
    for i in 0..40 {
        text.push_str(&format!("[[steps]]\nid = \"s{i:02}\"\ntool = \"wide\"\n"));
    }
    let daemon = Daemon::start(&env);
    crate::daemon::drop_file(&env, "large.toml", &text);
    let runs = daemon.wait_for_runs(&env, 1);
    assert_eq!(runs[0]["state"], "succeeded", "{runs:?}");
    let show = daemon.client(&env, &["show", "1", "--json"]).expect(0);
    assert!(
        show.output.stdout.len() > 16 << 20,
        "not larger than a frame"
    );
    let run: serde_json::Value = serde_json::from_slice(&show.output.stdout).unwrap();
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 40);
    assert!(
        steps
            .iter()
            .all(|s| s["output"].as_str().unwrap().len() == 700_000)
    );
    assert_eq!(steps[39]["id"], "s39");
    assert!(run.get("steps_next").is_none());
    // and the event log, a frame at a time
    let events = daemon.client(&env, &["events", "1", "--json"]).expect(0);
    assert!(events.stdout().lines().count() >= 80, "{}", events.stdout());
}

/// `rejected` planted as a link to `~/.cargo` had a dropped `config.toml` land there, intact.
#[test]
fn the_daemon_s_own_folders_are_never_reached_through_a_link() {
    let env = Env::new();
    tools(&env);
    let elsewhere = env.ws.parent().unwrap().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, env.ws.join("rejected")).unwrap();
    // found so at start: the folder is not watched until it is mended, the daemon serves on
    let daemon = Daemon::start(&env);
    crate::daemon::drop_file(&env, "config.toml", "colour = 1\n");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        env.ws.join("config.toml").exists(),
        "taken in from an unwatched folder"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // mended, it is watched again and what waits there is taken in
    std::fs::remove_file(env.ws.join("rejected")).unwrap();
    wait_for(&env.ws.join("rejected/config.toml.error.txt"));
    drop(daemon);

    // swapped for a link while the daemon runs: nothing lands through it
    let daemon = Daemon::start(&env);
    std::fs::rename(env.ws.join("rejected"), env.ws.join("old")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, env.ws.join("rejected")).unwrap();
    crate::daemon::drop_file(
        &env,
        "cargo.toml",
        "[build]\nrustc-wrapper = \"/tmp/evil\"\n",
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // the file is back where it was dropped, not lost in the daemon's own folder
    assert!(env.ws.join("cargo.toml").exists());
    assert_eq!(daemon.client(&env, &["status"]).code(), 0);
}

/// A watched folder's tools file decides what runs with the daemon's rights: a FIFO there froze
/// the daemon, and a dropper's own file would have been believed.
#[test]
fn a_tools_file_that_is_not_the_operator_s_is_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let c = std::ffi::CString::new(env.ws.join("tools.toml").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let daemon = Daemon::start(&env);
    crate::daemon::drop_file(&env, "hello.toml", crate::daemon::GOOD);
    wait_for(&env.ws.join("rejected/hello.toml.error.txt"));
    assert!(
        env.read("rejected/hello.toml.error.txt")
            .contains("is not a plain file")
    );
    drop(daemon);

    std::fs::remove_file(env.ws.join("tools.toml")).unwrap();
    tools(&env);
    env.write("hello.toml", crate::daemon::GOOD);
    env.uet(&["validate", "hello.toml"]).expect(0);
    std::fs::set_permissions(
        env.ws.join("tools.toml"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let run = env.uet(&["validate", "hello.toml"]).expect(2);
    assert!(
        run.stderr().contains("can be written by anyone"),
        "{}",
        run.describe()
    );
    std::fs::set_permissions(
        env.ws.join("tools.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // SAFETY: geteuid cannot fail
    if unsafe { libc::geteuid() } == 0 {
        // writable by a group that is not the owner's own: droppers may be in it
        let tools_file = env.ws.join("tools.toml");
        std::os::unix::fs::chown(&tools_file, None, Some(65534)).unwrap();
        std::fs::set_permissions(&tools_file, std::fs::Permissions::from_mode(0o664)).unwrap();
        let run = env.uet(&["run", "hello.toml"]).expect(2);
        assert!(
            run.stderr().contains("can be written by its group"),
            "{}",
            run.describe()
        );
        std::fs::set_permissions(&tools_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        env.uet(&["run", "hello.toml"]).expect(0);
        // somebody else's: not used to run anything, though it may be read to check against
        std::os::unix::fs::chown(&tools_file, Some(65534), None).unwrap();
        let run = env.uet(&["run", "hello.toml"]).expect(2);
        assert!(
            run.stderr().contains("belongs to uid 65534"),
            "{}",
            run.describe()
        );
        env.uet(&["validate", "hello.toml"]).expect(0);
    }
}

/// An output nested 127 levels deep was taken as JSON, then could not be read back from inside
/// its row: the run could not be shown nor resumed, and `state check` called it damage.
#[test]
fn a_deeply_nested_output_is_kept_as_text() {
    let env = Env::new();
    let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
    env.write(
        "tools.toml",
        &format!("[[tools]]\nname = \"deep\"\ncommand = [\"printf\", \"%s\", \"{deep}\"]\n"),
    );
    env.write(
        "deep.toml",
        "name = \"deep\"\n[[steps]]\nid = \"d\"\ntool = \"deep\"\n",
    );
    let (run, out) = env.run_json("deep.toml");
    run.expect(0);
    assert_eq!(crate::util::step(&out, "d")["output"], deep.as_str());
    let state = env.state.to_str().unwrap();
    env.uet(&["state", "check", "--state", state]).expect(0);
}

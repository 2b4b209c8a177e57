//! Talking to the daemon over its socket.

use std::path::{Path, PathBuf};
use uet::spec::workflow::Sets;

use anyhow::Context;

use uet::api::protocol::{Client, Request, Response};
use uet::api::types::RunShown;

use super::Failure;
use super::args::{ClientArgs, exit};
use super::print;

/// Sends one request to the daemon and prints the answer; says so, and exits 3, when no daemon
/// answers.
pub(crate) fn send(args: &ClientArgs, request: Request) -> Result<u8, Failure> {
    ask(args, request, false)
}

/// [`send`], saying nothing when no daemon answers if `quiet`: the caller has another way.
pub(crate) fn ask(args: &ClientArgs, request: Request, quiet: bool) -> Result<u8, Failure> {
    talk(args, quiet, async |client, socket| match request {
        Request::Show { run, .. } => show_pages(client, socket, args, run).await,
        Request::Events { follow, .. } => stream(client, socket, args, request, follow).await,
        request => match client.call(&request).await {
            Ok(answer) => Ok(print::response(args.json, answer)),
            Err(e) => Ok(stopped(socket, &e)),
        },
    })
}

/// The files the daemon's folders refused of late (from its status), for `uet runs` to say
/// below its runs; none when no daemon answers.
pub(crate) fn rejected_drops(args: &ClientArgs) -> Vec<uet::api::types::RejectedShown> {
    let mut found = Vec::new();
    let _ = talk(args, true, async |client, _| {
        if let Ok(Response::Status(status)) = client.call(&Request::Status).await {
            found = status.rejected;
        }
        Ok(exit::OK)
    });
    found
}

/// The newest run of the daemon: `Ok(None)` when no daemon answers, `Ok(Some(None))` when it
/// has no run.
pub(crate) fn newest_run(args: &ClientArgs) -> Result<Option<Option<u64>>, Failure> {
    let mut found = None;
    let code = talk(args, true, async |client, socket| {
        match client.call(&Request::Runs { limit: Some(1) }).await {
            Ok(Response::Runs { runs }) => {
                found = Some(runs.last().map(|r| r.run_id));
                Ok(exit::OK)
            }
            Ok(other) => Ok(print::response(args.json, other)),
            Err(e) => Ok(stopped(socket, &e)),
        }
    })?;
    Ok(if code == exit::NO_DAEMON { None } else { found })
}

/// `uet shutdown --wait`: asks the daemon its process id, stops it, and returns once that
/// process has exited (its runs paused and its state closed); gives up after its grace period
/// and a minute more, exit 1.
pub(crate) fn shutdown_and_wait(args: &ClientArgs) -> Result<u8, Failure> {
    let mut pid = None;
    let code = talk(args, false, async |client, socket| {
        let status = match client.call(&Request::Status).await {
            Ok(Response::Status(status)) => status,
            Ok(other) => return Ok(print::response(args.json, other)),
            Err(e) => return Ok(stopped(socket, &e)),
        };
        pid = Some(status.pid);
        match client.call(&Request::Shutdown).await {
            Ok(answer) => Ok(print::response(args.json, answer)),
            Err(e) => Ok(stopped(socket, &e)),
        }
    })?;
    let Some(pid) = pid.filter(|_| code == exit::OK) else {
        return Ok(code);
    };
    // gone, or a zombie its parent has not reaped yet: it has exited either way
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.trim().chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        })
    };
    let start = std::time::Instant::now();
    while alive() {
        if start.elapsed() > std::time::Duration::from_secs(600) {
            eprintln!("uet: the daemon (pid {pid}) has not stopped within 10 minutes");
            return Ok(exit::RUN_FAILED);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(exit::OK)
}

/// Connects to the daemon and hands the connection to `conversation`; when no daemon answers,
/// says so (unless `quiet`) and exits 3.
fn talk(
    args: &ClientArgs,
    quiet: bool,
    conversation: impl AsyncFnOnce(&mut Client, &Path) -> Result<u8, Failure>,
) -> Result<u8, Failure> {
    let socket = socket(args);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut client = match Client::connect(&socket).await {
            Ok(c) => c,
            Err(e) => {
                if !quiet {
                    no_daemon(&socket, &e, None);
                }
                return Ok(exit::NO_DAEMON);
            }
        };
        conversation(&mut client, &socket).await
    })
}

/// `uet web`: asks the daemon for a one-time login address, prints it, and with `open` hands
/// it to the desktop's browser.
pub(crate) fn web(args: &ClientArgs, open: bool) -> Result<u8, Failure> {
    let socket = socket(args);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let answer = runtime.block_on(async {
        let mut client = Client::connect(&socket).await.map_err(Err)?;
        client.call(&Request::WebLogin).await.map_err(Ok)
    });
    match answer {
        Ok(Response::Done { message: url }) => {
            println!("{url}");
            if open {
                open_browser(&url);
            }
            Ok(exit::OK)
        }
        Ok(other) => Ok(print::response(args.json, other)),
        Err(Err(e)) => {
            no_daemon(&socket, &e, None);
            Ok(exit::NO_DAEMON)
        }
        Err(Ok(e)) => Ok(stopped(&socket, &e)),
    }
}

/// Opens an address in `$BROWSER`, else `xdg-open`; says so when neither can, since the
/// address is printed anyway.
fn open_browser(url: &str) {
    let browser = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "xdg-open".into());
    let opened = std::process::Command::new(&browser)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = opened {
        eprintln!("uet: cannot open a browser with {browser} ({e}): open the address above");
    }
}

/// The socket the command asks: `--socket`, `UET_SOCKET`, else the default.
pub(crate) fn socket(args: &ClientArgs) -> PathBuf {
    args.socket
        .clone()
        .unwrap_or_else(uet::api::protocol::default_socket)
}

/// Says that no daemon answers on `socket` (and, when there is one, that there is no state
/// to read instead either).
pub(crate) fn no_daemon(socket: &Path, e: &std::io::Error, state: Option<&Path>) {
    if e.kind() == std::io::ErrorKind::InvalidData {
        eprintln!(
            "uet: the daemon on {} does not speak this uet's protocol ({e}); use the uet that started it, or restart the daemon with this one",
            socket.display()
        );
        return;
    }
    let instead = match state {
        Some(dir) => format!(
            ", and there is no state in {} to read instead",
            dir.display()
        ),
        None => String::new(),
    };
    eprintln!(
        "uet: no uet daemon answers on {} ({e}){instead}; start one with `uet daemon --watch DIR`, or point --socket / UET_SOCKET at it",
        socket.display()
    );
}

fn stopped(socket: &Path, e: &dyn std::fmt::Display) -> u8 {
    eprintln!(
        "uet: the daemon on {} stopped answering: {e}",
        socket.display()
    );
    exit::NO_DAEMON
}

/// An event log as the daemon streams it, a frame at a time, to its end (when following, the
/// end of the run).
async fn stream(
    client: &mut Client,
    socket: &Path,
    args: &ClientArgs,
    request: Request,
    following: bool,
) -> Result<u8, Failure> {
    let mut answer = client.call(&request).await;
    loop {
        match answer {
            // the end of a followed run: a note for a person, nothing in a JSON-lines stream; the
            // exit code is the run's
            Ok(Response::Done { message }) => {
                if following && !args.json {
                    eprintln!("uet: {message}");
                }
                let run_named = matches!(request, Request::Events { run: Some(_), .. });
                return Ok(if following && run_named {
                    ended_code(&message)
                } else {
                    exit::OK
                });
            }
            Ok(Response::Events { events }) => print::events(args.json, &events),
            Ok(other) => return Ok(print::response(args.json, other)),
            Err(e) => return Ok(stopped(socket, &e)),
        }
        answer = client.next().await;
    }
}

/// The exit code of a followed run, from the daemon's last word on it (`run 7 succeeded`).
fn ended_code(message: &str) -> u8 {
    if message.ends_with(" succeeded") {
        exit::OK
    } else {
        exit::RUN_FAILED
    }
}

/// `uet submit --wait`: submits, then follows the run on the same connection, printing
/// nothing until it ends; says how it ended and exits with its code.
pub(crate) fn submit_and_wait(args: &ClientArgs, path: PathBuf, sets: Sets) -> Result<u8, Failure> {
    talk(args, false, async |client, socket| {
        let submit = Request::Submit {
            path: path.clone(),
            sets: sets.clone(),
        };
        let run = match client.call(&submit).await {
            Ok(Response::Submitted { run }) => run,
            Ok(other) => return Ok(print::response(args.json, other)),
            Err(e) => return Ok(stopped(socket, &e)),
        };
        if !args.json {
            eprintln!("submitted: run {run}; waiting for it to end");
        }
        let follow = Request::Events {
            run: Some(run),
            follow: true,
            since: None,
        };
        let mut answer = client.call(&follow).await;
        loop {
            match answer {
                Ok(Response::Done { message }) => {
                    let code = ended_code(&message);
                    if args.json {
                        let state = message.rsplit(' ').next().unwrap_or_default();
                        println!("{}", serde_json::json!({ "run_id": run, "state": state }));
                    } else {
                        println!("{message}");
                    }
                    return Ok(code);
                }
                Ok(Response::Events { .. }) => {}
                Ok(other) => return Ok(print::response(args.json, other)),
                Err(e) => return Ok(stopped(socket, &e)),
            }
            answer = client.next().await;
        }
    })
}

/// `uet show`: the run a page at a time (a run of many steps does not fit one answer), printed
/// as one object.
async fn show_pages(
    client: &mut Client,
    socket: &Path,
    args: &ClientArgs,
    run: u64,
) -> Result<u8, Failure> {
    let mut whole: Option<RunShown> = None;
    let mut from = 0;
    loop {
        let page = match client.call(&Request::Show { run, from }).await {
            Ok(Response::Run { run: page }) => *page,
            Ok(other) => return Ok(print::response(args.json, other)),
            Err(e) => return Ok(stopped(socket, &e)),
        };
        let next = page.steps_next;
        match &mut whole {
            None => whole = Some(page),
            Some(w) => w.steps.extend(page.steps),
        }
        match next {
            Some(n) if n > from => from = n,
            _ => break,
        }
    }
    let mut run = whole.expect("the first page was read");
    run.steps_next = None;
    print::run(args.json, &run);
    Ok(exit::OK)
}

/// `uet logs RUN --follow`: each attempt once it has ended, as it ends, until the run ends;
/// the run's exit code. `NO_DAEMON`, quietly, when no daemon answers (the caller prints what
/// the state holds).
pub(crate) fn follow_logs(
    args: &ClientArgs,
    run: u64,
    step: Option<String>,
    attempt: Option<u32>,
) -> Result<u8, Failure> {
    talk(args, true, async |client, socket| {
        let mut printed = std::collections::HashSet::new();
        loop {
            // the run's state before its logs: once it has ended, the logs read after hold
            // every attempt
            let state = match client
                .call(&Request::Show {
                    run,
                    from: usize::MAX,
                })
                .await
            {
                Ok(Response::Run { run }) => run.state,
                Ok(other) => return Ok(print::response(args.json, other)),
                Err(e) => return Ok(stopped(socket, &e)),
            };
            let request = Request::Logs {
                run,
                step: step.clone(),
                attempt,
            };
            let logs = match client.call(&request).await {
                Ok(Response::Logs { logs }) => logs,
                Ok(other) => return Ok(print::response(args.json, other)),
                Err(e) => return Ok(stopped(socket, &e)),
            };
            let fresh: Vec<_> = logs
                .into_iter()
                .filter(|l| l.outcome.is_some() && printed.insert((l.step.clone(), l.attempt)))
                .collect();
            if args.json {
                // one attempt a line, as `events --follow` prints events
                for log in &fresh {
                    println!("{}", serde_json::to_string(log).unwrap_or_default());
                }
            } else if !fresh.is_empty() {
                print::logs(false, &fresh);
            }
            if state.is_terminal() {
                return Ok(if state == uet::model::RunState::Succeeded {
                    exit::OK
                } else {
                    exit::RUN_FAILED
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    })
}

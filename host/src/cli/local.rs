//! Commands that read (or prune) a state: the daemon's answer when one answers, else the state
//! opened here, through the same facade calls. A state is opened here to read without writing
//! anything, and one that is not there is never created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use uet::api::ops;
use uet::api::protocol::Request;
use uet::state::Store;

use super::args::{ClientArgs, exit};
use super::{Failure, QUIET_PANICS, client, default_state_dir, guarded, print};

/// Runs `f` on the state in `state` (else the default folder), opened here because no daemon
/// answers. A command that only reads opens it without writing anything, and never creates a
/// state that is not there; only a state that uet left unclean is recovered first.
pub(crate) fn with_local_state(
    state: Option<PathBuf>,
    writes: bool,
    f: impl FnOnce(&Store) -> Result<u8, Failure>,
) -> Result<u8, Failure> {
    let state = state_dir(state)?;
    let file = state.join(uet::state::STATE_FILE);
    let opened = guarded(&file, || {
        let opened = if writes {
            Store::open(&state)
        } else {
            match Store::open_read_only(&state) {
                Err(uet::state::StateError::Unclean(_)) => {
                    tracing::info!("recovering the state {} first", file.display());
                    Store::open(&state)
                }
                other => other,
            }
        };
        Ok(opened.with_context(|| format!("cannot open the state in {}", state.display()))?)
    })?;
    guarded(&file, || f(&opened))
}

fn state_dir(state: Option<PathBuf>) -> Result<PathBuf, Failure> {
    Ok(match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    })
}

/// What a read does when neither a daemon answers nor a state is there to read.
enum Missing {
    /// Says no daemon answers, and exits 3, as a client without a daemon does.
    NoDaemon,
    /// Says there is no state there (`metrics` and `verify` have always said so).
    Error,
}

/// Asks the daemon; when none answers, reads the state with `local` (nothing is created).
fn daemon_or_state(
    args: &ClientArgs,
    state: Option<PathBuf>,
    request: Request,
    missing: Missing,
    local: impl FnOnce(&Store) -> Result<u8, Failure>,
) -> Result<u8, Failure> {
    let code = client::ask(args, request, true)?;
    if code != exit::NO_DAEMON {
        return Ok(code);
    }
    let dir = state_dir(state)?;
    if matches!(missing, Missing::NoDaemon) && !dir.join(uet::state::STATE_FILE).exists() {
        let socket = client::socket(args);
        let e = std::io::Error::from(std::io::ErrorKind::NotFound);
        client::no_daemon(&socket, &e, Some(&dir));
        return Ok(exit::NO_DAEMON);
    }
    with_local_state(Some(dir), false, local)
}

/// A refusal of the facade, printed as the daemon's would be.
fn refused(json: bool, r: ops::Refused) -> u8 {
    print::response(json, r.into())
}

/// `uet runs`.
pub(crate) fn runs(
    limit: Option<usize>,
    args: &ClientArgs,
    state: Option<PathBuf>,
) -> Result<u8, Failure> {
    let code = daemon_or_state(
        args,
        state,
        Request::Runs { limit },
        Missing::NoDaemon,
        |store| {
            Ok(match ops::runs(store, limit) {
                Ok(runs) => {
                    print::runs(args.json, &runs);
                    exit::OK
                }
                Err(r) => refused(args.json, r),
            })
        },
    )?;
    // a dropped file that never became a run is what `uet runs` is asked about next
    if code == exit::OK && !args.json {
        for r in client::rejected_drops(args) {
            println!(
                "rejected: {} in {}: {} (report: {})",
                r.name,
                r.folder.display(),
                r.reason,
                r.report.display()
            );
        }
    }
    Ok(code)
}

/// `uet show`: a page at a time, printed as one object.
/// The newest run of the state, if it has any (or there is a state at all).
pub(crate) fn newest_run(state: Option<PathBuf>) -> Result<Option<u64>, Failure> {
    let dir = state_dir(state)?;
    if !dir.join(uet::state::STATE_FILE).exists() {
        return Ok(None);
    }
    let store = uet::state::Store::open_read_only(&dir)
        .map_err(|e| anyhow::anyhow!("cannot read the state in {}: {e}", dir.display()))?;
    let runs = ops::runs(&store, Some(1)).map_err(|r| anyhow::anyhow!("{}", r.message))?;
    Ok(runs.last().map(|r| r.run_id))
}

/// `uet logs`.
pub(crate) fn logs(
    run: u64,
    step: Option<String>,
    attempt: Option<u32>,
    args: &ClientArgs,
    state: Option<PathBuf>,
) -> Result<u8, Failure> {
    let request = Request::Logs {
        run,
        step: step.clone(),
        attempt,
    };
    daemon_or_state(args, state, request, Missing::NoDaemon, |store| {
        Ok(match ops::logs(store, run, step.as_deref(), attempt) {
            Ok(logs) => {
                print::logs(args.json, &logs);
                exit::OK
            }
            Err(r) => refused(args.json, r),
        })
    })
}

pub(crate) fn show(run: u64, args: &ClientArgs, state: Option<PathBuf>) -> Result<u8, Failure> {
    daemon_or_state(
        args,
        state,
        Request::Show { run, from: 0 },
        Missing::NoDaemon,
        |store| {
            let mut shown = match ops::show(store, run, 0) {
                Ok(page) => page,
                Err(r) => return Ok(refused(args.json, r)),
            };
            while let Some(from) = shown.steps_next.take() {
                match ops::show(store, run, from) {
                    Ok(page) => {
                        shown.steps.extend(page.steps);
                        shown.steps_next = page.steps_next.filter(|&n| n > from);
                    }
                    Err(r) => return Ok(refused(args.json, r)),
                }
            }
            print::run(args.json, &shown);
            Ok(exit::OK)
        },
    )
}

/// `uet events`: without a daemon, the log as it stands (nothing else writes the state then).
pub(crate) fn events(
    (run, since): (Option<u64>, Option<u64>),
    follow: bool,
    args: &ClientArgs,
    state: Option<PathBuf>,
) -> Result<u8, Failure> {
    daemon_or_state(
        args,
        state,
        Request::Events { run, follow, since },
        Missing::NoDaemon,
        |store| {
            if let Err(r) = ops::known(store, run) {
                return Ok(refused(args.json, r));
            }
            let mut cursor = ops::EventCursor::default();
            loop {
                match ops::events(store, run, &mut cursor, ops::EVENTS_PAGE) {
                    Ok(batch) if batch.is_empty() => break,
                    Ok(mut batch) => {
                        batch.retain(|e| since.is_none_or(|at| e.at >= at));
                        print::events(args.json, &batch)
                    }
                    Err(r) => return Ok(refused(args.json, r)),
                }
            }
            if follow && !args.json {
                eprintln!("uet: no daemon answers: this is the log as the state holds it");
            }
            Ok(exit::OK)
        },
    )
}

/// `uet top`: the daemon's view, else the state's, read afresh at every refresh.
pub(crate) fn top(
    every: Duration,
    args: &ClientArgs,
    state: Option<PathBuf>,
) -> Result<u8, Failure> {
    use uet::views::top::TopError;
    if args.json {
        return daemon_or_state(args, state, Request::Top, Missing::NoDaemon, |store| {
            Ok(match ops::top(store, None, Vec::new()) {
                Ok(view) => {
                    print::top(true, &view);
                    exit::OK
                }
                Err(r) => refused(args.json, r),
            })
        });
    }
    let shown = match uet::views::top::from_daemon(&client::socket(args)) {
        Ok(fetch) => uet::views::top::run(fetch, every),
        Err(TopError::NoDaemon(..)) => {
            let dir = state_dir(state)?;
            if !dir.join(uet::state::STATE_FILE).exists() {
                let e = std::io::Error::from(std::io::ErrorKind::NotFound);
                client::no_daemon(&client::socket(args), &e, Some(&dir));
                return Ok(exit::NO_DAEMON);
            }
            uet::views::top::run(|| top_of(&dir), every)
        }
        Err(e) => Err(e),
    };
    shown
        .map(|()| exit::OK)
        .map_err(|e| anyhow::anyhow!("{e}").into())
}

/// The view of `uet top` from the state in `dir`, opened to read for the one frame.
fn top_of(dir: &Path) -> Result<uet::api::types::TopView, uet::views::top::TopError> {
    let daemonless = |e: String| uet::views::top::TopError::Daemon(e);
    let store = Store::open_read_only(dir).map_err(|e| daemonless(e.to_string()))?;
    ops::top(&store, None, Vec::new()).map_err(|r| daemonless(r.message))
}

/// `uet metrics`.
pub(crate) fn metrics(state: Option<PathBuf>, args: &ClientArgs) -> Result<u8, Failure> {
    if args.json {
        // said, not ignored: the exposition format is what scrapers read
        return Err(anyhow::anyhow!(
            "uet metrics prints Prometheus text, which has no --json form; `uet status --json` and `uet runs --json` give the counts as JSON"
        )
        .into());
    }
    daemon_or_state(args, state, Request::Metrics, Missing::Error, |store| {
        let breakers = store.breakers().context("cannot read the breakers")?;
        Ok(match ops::metrics(store, &breakers, None) {
            Ok(text) => {
                print!("{text}");
                exit::OK
            }
            Err(r) => refused(args.json, r),
        })
    })
}

/// `uet verify`.
pub(crate) fn verify(run: u64, state: Option<PathBuf>, args: &ClientArgs) -> Result<u8, Failure> {
    daemon_or_state(
        args,
        state,
        Request::Verify { run },
        Missing::Error,
        |store| {
            Ok(match ops::verify(store, run) {
                Ok(message) => {
                    print::response(args.json, uet::api::protocol::Response::Done { message })
                }
                Err(r) => refused(args.json, r),
            })
        },
    )
}

/// `uet prune`: the one command here that writes the state it opens.
pub(crate) fn prune(
    older_than: Option<Duration>,
    keep: Option<usize>,
    state: Option<PathBuf>,
    args: &ClientArgs,
) -> Result<u8, Failure> {
    let older_than_ms = older_than.map(|d| d.as_millis() as u64);
    let request = Request::Prune {
        older_than_ms,
        keep,
    };
    let code = client::ask(args, request, true)?;
    if code != exit::NO_DAEMON {
        return Ok(code);
    }
    with_local_state(state, true, |store| {
        Ok(match ops::prune(store, older_than_ms, keep) {
            Ok(message) => {
                print::response(args.json, uet::api::protocol::Response::Done { message })
            }
            Err(r) => refused(args.json, r),
        })
    })
}

/// `uet state check`: 0 when every row reads and every chain verifies, 1 when not.
pub(crate) fn state_check(state: Option<PathBuf>, json: bool) -> Result<u8, Failure> {
    let dir = state_dir(state)?;
    QUIET_PANICS.with(|q| q.set(true));
    let checked = uet::state::repair::check(&dir);
    QUIET_PANICS.with(|q| q.set(false));
    let health = checked.with_context(|| format!("cannot check the state in {}", dir.display()))?;
    let backup = health.backup.as_ref().map(|(path, at)| {
        let age = at.elapsed().unwrap_or_default().as_secs();
        (path.display().to_string(), age)
    });
    if json {
        println!(
            "{}",
            serde_json::json!({
                "file": health.file,
                "sound": health.is_sound(),
                "unclean": health.unclean,
                "rows": health.rows,
                "runs": health.runs,
                "damage": health.damage,
                "unlisted": health.unlisted,
                "backup": backup.as_ref().map(|(p, age)| serde_json::json!({"file": p, "age_seconds": age})),
            })
        );
    } else {
        let how = if health.unclean {
            " (it was not closed cleanly: a recovered copy was checked)"
        } else {
            ""
        };
        if health.is_sound() {
            println!(
                "{}: sound{how}: {} rows, {} runs with their event chains verified",
                health.file.display(),
                health.rows,
                health.runs
            );
        } else {
            println!("{}: damaged{how}:", health.file.display());
            for d in &health.damage {
                println!("  {d}");
            }
            if health.unlisted > 0 {
                println!("  … and {} more", health.unlisted);
            }
            match &backup {
                Some((p, age)) => println!(
                    "`uet state recover` sets it aside and puts back {p}, written {} ago",
                    humantime::format_duration(std::time::Duration::from_secs(*age))
                ),
                None => println!("there is no good copy to put back (no uet.redb.bak)"),
            }
        }
    }
    Ok(if health.is_sound() {
        exit::OK
    } else {
        exit::RUN_FAILED
    })
}

/// `uet state recover`: sets a damaged file aside and puts the last good copy back.
pub(crate) fn state_recover(state: Option<PathBuf>) -> Result<u8, Failure> {
    use uet::state::repair::Recovered;
    let dir = state_dir(state)?;
    QUIET_PANICS.with(|q| q.set(true));
    let recovered = uet::state::repair::recover(&dir);
    QUIET_PANICS.with(|q| q.set(false));
    match recovered.with_context(|| format!("cannot recover the state in {}", dir.display()))? {
        Recovered::Sound(health) => {
            println!(
                "{}: sound, nothing to recover ({} runs)",
                health.file.display(),
                health.runs
            );
            Ok(exit::OK)
        }
        Recovered::Restored {
            health,
            damaged,
            copy_written,
            runs,
            replayed,
        } => {
            let age = copy_written.elapsed().unwrap_or_default().as_secs();
            println!(
                "{}: the damaged file is kept as {}; the copy written {} ago is back, with {} \
                 journaled batches since it: {runs} runs",
                health.file.display(),
                damaged.display(),
                humantime::format_duration(std::time::Duration::from_secs(age)),
                replayed
            );
            Ok(exit::OK)
        }
        Recovered::SetAside { health, damaged } => {
            println!(
                "{}: the damaged file is kept as {}; there was no good copy, so the next uet \
                 starts a new history",
                health.file.display(),
                damaged.display()
            );
            Ok(exit::RUN_FAILED)
        }
    }
}

//! The control socket: accepting connections within limits, reading requests, and answering
//! them through the facade ([`protocol::answer`] over the daemon's [`ops::Control`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::*;
use crate::api::ops::{self, Control};
use crate::api::protocol::{self, Request, Response};

/// Writes an answer to a client, which must read it within [`SEND_TIME`].
pub(super) async fn send<T: serde::Serialize>(
    conn: &mut interprocess::local_socket::tokio::Stream,
    message: &T,
) -> Result<(), protocol::FrameError> {
    protocol::write_frame_within(conn, message, SEND_TIME).await
}

/// How long a client may take to read an answer before it is dropped.
pub(super) const SEND_TIME: Duration = Duration::from_secs(60);

/// Control connections served at once: far more than people and scripts need, and few enough
/// that a client holding connections open cannot take every file descriptor.
pub(super) const MAX_CONNECTIONS: usize = 256;

/// How long a new connection may take to send its first request, and an open one to send the
/// rest of a request it began: a client that stalls is dropped, not waited for.
pub(super) const REQUEST_TIME: Duration = Duration::from_secs(10);

/// The least time between two reads of a stream that follows the event log: a commit that
/// comes sooner waits out the rest, with any others that come meanwhile. A busy run commits
/// thousands of times a second, and each read waits for the state's writer to catch up: read
/// at every commit, a `submit --wait` on a 10,000-step run took a quarter longer than with
/// this. A commit after a quiet spell is read at once, and so is a followed run's end.
const FOLLOW_GATHER: Duration = Duration::from_millis(20);

/// How long a connection may sit between requests (`uet top` asks every second or so).
pub(super) const IDLE_TIME: Duration = Duration::from_secs(600);

/// The first and the longest pause after a failed accept.
pub(super) const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);

pub(super) const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Accepts control connections until shutdown: at most [`MAX_CONNECTIONS`] at once (the
/// others wait in the kernel's queue), and a failing accept (out of file descriptors, say) is
/// retried after a pause that grows, logged at most once a second, instead of spinning.
pub(super) async fn accept_loop(
    shared: &Arc<Daemon>,
    listener: &interprocess::local_socket::tokio::Listener,
) {
    use interprocess::local_socket::tokio::prelude::*;
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut pause = Duration::ZERO;
    let mut last_logged: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("never closed"),
            _ = shared.shutdown.cancelled() => return,
        };
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => {
                    pause = Duration::ZERO;
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        client(shared, conn).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    unlogged += 1;
                    if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        let more = if unlogged > 1 {
                            format!(" ({} times since the last report)", unlogged)
                        } else {
                            String::new()
                        };
                        tracing::warn!("cannot accept a control connection: {e}{more}");
                        last_logged = Some(Instant::now());
                        unlogged = 0;
                    }
                    pause = (pause * 2).clamp(ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shared.shutdown.cancelled() => return,
                    }
                }
            },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// Binds the socket in a folder only its owner can enter; a socket left by a crashed daemon is
/// replaced, one a live process answers on is not.
pub(super) async fn bind(
    path: &Path,
) -> anyhow::Result<interprocess::local_socket::tokio::Listener> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.is_dir() {
        // an existing folder is someone's: never loosen or tighten it, only check it
        let meta = std::fs::metadata(dir)?;
        // SAFETY: getuid has no preconditions and cannot fail
        let uid = unsafe { libc::getuid() };
        if meta.uid() != uid || meta.mode() & 0o077 != 0 {
            anyhow::bail!(
                "the socket's folder {} has mode {:o} and owner {}: the control socket must be \
                 in a folder only you can enter (mode 0700, yours); choose another --socket, or \
                 a folder that does not exist yet (uet creates it so)",
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid()
            );
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // the mode given is masked by the umask: make sure of it
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // only a socket can be a crashed daemon's leftover: anything else is somebody's file
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: it was left alone; choose another --socket",
                path.display()
            );
        }
        match protocol::Client::connect(path).await {
            Ok(_) => anyhow::bail!("a uet daemon already answers on {}", path.display()),
            // nobody listens: a crashed daemon's leftover
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                std::fs::remove_file(path)?
            }
            Err(e) => anyhow::bail!(
                "something answers on {} but not as this uet daemon ({e}); it was left alone",
                path.display()
            ),
        }
    }
    let listener = interprocess::local_socket::ListenerOptions::new()
        .name(protocol::socket_name(path)?)
        .create_tokio()?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves one client connection: the hello, then a response per request. A malformed or
/// oversized frame gets an error reply and ends the connection; nothing a client sends can
/// take the daemon down.
pub(super) async fn client(
    shared: Arc<Daemon>,
    mut conn: interprocess::local_socket::tokio::Stream,
) {
    let mut greeted = false;
    loop {
        let idle = if greeted { IDLE_TIME } else { REQUEST_TIME };
        let read = protocol::read_frame_within(&mut conn, idle, REQUEST_TIME).await;
        let request: Request = match read {
            Ok(Some(r)) => r,
            Ok(None) => return,
            // nobody is waiting for an answer
            Err(protocol::FrameError::TimedOut(_) | protocol::FrameError::Io(_)) => return,
            Err(e) => {
                let _ = send(
                    &mut conn,
                    &Response::Error {
                        message: e.to_string(),
                        invalid: true,
                    },
                )
                .await;
                return;
            }
        };
        let response = match request {
            Request::Hello { protocol } if protocol == protocol::PROTOCOL_VERSION => {
                greeted = true;
                Response::Hello {
                    protocol: protocol::PROTOCOL_VERSION,
                    version: env!("CARGO_PKG_VERSION").into(),
                }
            }
            Request::Hello { protocol } => Response::Error {
                message: format!(
                    "protocol {protocol} is not spoken here (this daemon speaks {})",
                    protocol::PROTOCOL_VERSION
                ),
                invalid: true,
            },
            _ if !greeted => Response::Error {
                message: "say hello first".into(),
                invalid: true,
            },
            Request::Shutdown => {
                let _ = send(&mut conn, &protocol::answer(&shared, Request::Shutdown)).await;
                shared.stop();
                return;
            }
            Request::Events { run, follow, since } => {
                stream_events(&shared, &mut conn, (run, since), follow).await;
                return;
            }
            request => {
                let shared = shared.clone();
                let state = shared.store.path().to_path_buf();
                tokio::task::spawn_blocking(move || protocol::answer(&shared, request))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        // a panic in a request is the database's on a damaged page, or a bug:
                        // this request fails, the daemon goes on
                        message: format!(
                            "the daemon failed to answer ({e}); if its state {} is damaged, \
                             `uet state check` says so once the daemon is stopped",
                            state.display()
                        ),
                        invalid: false,
                    })
            }
        };
        match send(&mut conn, &response).await {
            Ok(()) => {}
            // an answer too big for one frame: say so, and keep serving this client
            Err(protocol::FrameError::TooLarge(n)) => {
                let reply = Response::Error {
                    message: format!(
                        "the answer is {n} bytes, over the {} MiB frame limit: ask for less \
                         (`uet runs --limit N`, `uet events RUN`)",
                        protocol::MAX_FRAME >> 20
                    ),
                    invalid: false,
                };
                if send(&mut conn, &reply).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// The refused drops a stream of every run's events shows first: the latest, oldest first.
/// Each is a line or two, so these fit one frame.
const DROPS_SHOWN: usize = 1000;

/// Streams what the event log holds now, a frame at a time, then [`Response::Done`]; when
/// following, every new event as it is committed, until the run (if one was named) has ended,
/// the client hangs up or the daemon stops.
pub(super) async fn stream_events(
    shared: &Arc<Daemon>,
    conn: &mut interprocess::local_socket::tokio::Stream,
    (run, since): (Option<RunId>, Option<crate::model::Millis>),
    follow: bool,
) {
    use tokio::io::AsyncReadExt;
    let mut commits = shared.store.subscribe();
    let mut refusals = shared.refusals.subscribe();
    let mut let_go = shared.let_go.subscribe();
    let mut seen = ops::EventCursor::default();
    // refused drops are no run's: the stream of every run's events shows them too, read from
    // the reports in `rejected/` (so a restart loses none) and again whenever one is refused
    let mut drops_seen = std::collections::HashSet::new();
    let mut drops_due = run.is_none();
    if let Some(run) = run {
        match shared.store.run(run) {
            Ok(Some(_)) => {}
            Ok(None) => {
                let reply = Response::Error {
                    message: format!("no run {run}"),
                    invalid: true,
                };
                let _ = send(conn, &reply).await;
                return;
            }
            Err(e) => {
                let reply = Response::Error {
                    message: e.to_string(),
                    invalid: false,
                };
                let _ = send(conn, &reply).await;
                return;
            }
        }
    }
    let mut started = false;
    loop {
        commits.borrow_and_update();
        let_go.borrow_and_update();
        let read_at = Instant::now();
        if std::mem::take(&mut drops_due) {
            refusals.borrow_and_update();
            let mut drops = super::control::rejected_drops(&shared.config.watch, DROPS_SHOWN);
            drops.retain(|d| {
                since.is_none_or(|at| d.at >= at) && drops_seen.insert(d.report.clone())
            });
            drops.reverse();
            if !drops.is_empty() {
                started = true;
                let events = drops
                    .iter()
                    .map(crate::api::types::EventShown::rejected)
                    .collect();
                if send(conn, &Response::Events { events }).await.is_err() {
                    return;
                }
            }
        }
        // whether the run is over is read before its events, so none committed in between is
        // missed
        let ended = run.and_then(|run| {
            let state = shared.store.run(run).ok().flatten().map(|r| r.state);
            let over =
                state.is_none_or(|s| s.is_terminal()) && !lock(&shared.active).contains_key(&run);
            over.then(|| match state {
                Some(s) => format!("run {run} {s}"),
                None => format!("run {run} is gone"),
            })
        });
        // a long backlog is read and sent a frame at a time, each well under the frame limit;
        // the first frame goes out even when empty, so a client sees the stream has begun
        loop {
            let mut batch = match ops::events(&shared.store, run, &mut seen, ops::EVENTS_PAGE) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("cannot read events: {e}");
                    return;
                }
            };
            let full = batch.len() == ops::EVENTS_PAGE;
            if let Some(since) = since {
                batch.retain(|e| e.at >= since);
            }
            if started && batch.is_empty() {
                break;
            }
            started = true;
            if send(conn, &Response::Events { events: batch })
                .await
                .is_err()
            {
                return;
            }
            if !full {
                break;
            }
        }
        if let Some(message) = ended.or_else(|| (!follow).then(String::new)) {
            let _ = send(conn, &Response::Done { message }).await;
            return;
        }
        let mut byte = [0u8; 1];
        tokio::select! {
            changed = commits.changed() => {
                if changed.is_err() { return }
                // the run let go of ends the gathering: its end is read at once
                tokio::select! {
                    _ = tokio::time::sleep(FOLLOW_GATHER.saturating_sub(read_at.elapsed())) => {}
                    _ = let_go.changed(), if run.is_some() => {}
                }
            }
            // its last commit can come before the daemon lets go of it
            changed = let_go.changed(), if run.is_some() => if changed.is_err() { return },
            changed = refusals.changed(), if run.is_none() => {
                if changed.is_err() { return }
                drops_due = true;
            }
            // the client says nothing while following: any read result means it is gone
            _ = conn.read(&mut byte) => return,
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

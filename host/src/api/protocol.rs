//! The control protocol between `uet` clients and the daemon: length-prefixed JSON frames over
//! a local socket, a version exchanged first, then typed requests and responses.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON. The client opens with
//! [`Request::Hello`]; the daemon answers [`Response::Hello`] (or an error if the versions do
//! not match) and then answers each request with one response.

#[cfg(feature = "runtime")]
use std::path::Path;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
#[cfg(feature = "runtime")]
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use crate::api::types::Status;
use crate::api::types::{EventShown, RunShown, RunSummary, ToolShown, TopView};
use crate::model::RunId;

/// Bumped when a request or response changes meaning; additions of fields do not bump it.
pub const PROTOCOL_VERSION: u32 = 2;

/// The largest frame either side accepts: a `show` of a run with large outputs fits, and a
/// hostile or broken peer cannot make the daemon allocate more.
pub const MAX_FRAME: usize = 16 << 20;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The first message of a connection.
    Hello {
        /// The client's [`PROTOCOL_VERSION`].
        protocol: u32,
    },
    /// The daemon's state in brief; its shape never changes (fields are only added).
    Status,
    /// The latest runs (all of them without a `limit`), oldest first.
    Runs {
        /// At most this many, the newest.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// One run with its steps, from step `from` on: as many as fit a frame (a large run is
    /// shown a page at a time; the answer's `steps_next` says where the next page starts).
    Show {
        /// The run.
        run: RunId,
        /// The index of the first step to send.
        #[serde(default)]
        from: usize,
    },
    /// Run a workflow file; its folder is the workstream.
    Submit {
        /// An absolute path the daemon can read.
        path: PathBuf,
        /// Values for the workflow's parameters.
        #[serde(default, skip_serializing_if = "sets_empty")]
        sets: crate::spec::workflow::Sets,
    },
    /// Stop a run: running steps are killed at once.
    Cancel {
        /// The run.
        run: RunId,
    },
    /// Re-run a failed or canceled run's steps that did not succeed.
    Retry {
        /// The run.
        run: RunId,
    },
    /// Put a quarantined run back in the queue.
    Release {
        /// The run.
        run: RunId,
    },
    /// Withdraw a standing workflow.
    Unwatch {
        /// Its name.
        name: String,
    },
    /// The event log of one run, or of every run, as [`Response::Events`] frames of at most a
    /// thousand events, then [`Response::Done`]. With `follow`, the daemon keeps sending
    /// frames as events happen, until the run ends or the client hangs up.
    Events {
        /// The run; every run when absent.
        run: Option<RunId>,
        /// Keep the stream open.
        follow: bool,
        /// Only events at or after this time (milliseconds since the epoch).
        #[serde(default)]
        since: Option<crate::model::Millis>,
    },
    /// The tools of every watched folder.
    Tools,
    /// The Prometheus text exposition of `uet metrics`.
    Metrics,
    /// Everything `uet top` draws: status, runs in flight with progress, tools and breakers.
    Top,
    /// What a run's attempts printed and logged: every step's, or one step's, or one attempt's.
    Logs {
        /// The run.
        run: RunId,
        /// One step, by id.
        #[serde(default)]
        step: Option<String>,
        /// One attempt, by number.
        #[serde(default)]
        attempt: Option<u32>,
    },
    /// Delete finished runs older than `older_than_ms` or beyond the newest `keep`.
    Prune {
        /// Age limit, in milliseconds.
        older_than_ms: Option<u64>,
        /// How many finished runs to keep.
        keep: Option<usize>,
    },
    /// Check a run's event log against its hash chain.
    Verify {
        /// The run.
        run: RunId,
    },
    /// Stop the daemon gracefully.
    Shutdown,
    /// A one-time login address of the web dashboard ([`Response::Done`] carries it): only
    /// whoever can reach the socket may ask, so the socket's folder guards the dashboard too.
    WebLogin,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The answer to [`Request::Hello`].
    Hello {
        /// The daemon's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// The daemon's uet version.
        version: String,
    },
    /// The answer to [`Request::Status`].
    Status(Box<Status>),
    /// The answer to [`Request::Runs`].
    Runs {
        /// The runs.
        runs: Vec<RunSummary>,
    },
    /// The answer to [`Request::Show`]: the object `uet show --json` prints, with
    /// `steps_next` when more steps follow on another page.
    Run {
        /// The run.
        run: Box<RunShown>,
    },
    /// Events, oldest first.
    Events {
        /// The events.
        events: Vec<EventShown>,
    },
    /// The answer to [`Request::Tools`].
    Tools {
        /// The tools.
        tools: Vec<ToolShown>,
    },
    /// The answer to [`Request::Top`].
    Top {
        /// The view.
        view: Box<TopView>,
    },
    /// The answer to [`Request::Logs`].
    Logs {
        /// One entry per attempt, in the plan's order of steps, first attempt first.
        logs: Vec<crate::api::types::AttemptLog>,
    },
    /// The answer to [`Request::Metrics`].
    Metrics {
        /// Prometheus text exposition.
        text: String,
    },
    /// The answer to [`Request::Submit`].
    Submitted {
        /// The new run.
        run: RunId,
    },
    /// The request was carried out.
    Done {
        /// What happened, in words.
        message: String,
    },
    /// The request was refused.
    Error {
        /// Why; for invalid input, one problem a line.
        message: String,
        /// True when the cause is the request's input (the client exits 2), not the daemon.
        invalid: bool,
    },
}

#[cfg(feature = "runtime")]
/// The answer to a request, through the facade. Two requests are the connection's to carry
/// out, not this function's: [`Request::Events`] streams (here it is refused), and
/// [`Request::Shutdown`] is only acknowledged, so the connection can send the answer before it
/// calls [`Control::stop`](crate::api::ops::Control::stop).
pub fn answer(control: &impl crate::api::ops::Control, request: Request) -> Response {
    fn done(r: Result<String, crate::api::ops::Refused>) -> Response {
        r.map(|message| Response::Done { message })
            .unwrap_or_else(Response::from)
    }
    let answered = match request {
        Request::Hello { .. } => Ok(Response::Hello {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        Request::Status => control.status().map(|s| Response::Status(Box::new(s))),
        Request::Runs { limit } => control.runs(limit).map(|runs| Response::Runs { runs }),
        Request::Show { run, from } => control
            .show(run, from)
            .map(|run| Response::Run { run: Box::new(run) }),
        Request::Events { .. } => Err(crate::api::ops::Refused {
            message: "events are streamed by the connection".into(),
            invalid: false,
        }),
        Request::Tools => control.tools().map(|tools| Response::Tools { tools }),
        Request::Top => control.top().map(|view| Response::Top {
            view: Box::new(view),
        }),
        Request::Metrics => control.metrics().map(|text| Response::Metrics { text }),
        // a read of the state, the same from a daemon as from the state itself
        Request::Logs { run, step, attempt } => {
            crate::api::ops::logs(control.state(), run, step.as_deref(), attempt)
                .map(|logs| Response::Logs { logs })
        }
        Request::Submit { path, sets } => control
            .submit(&path, &sets)
            .map(|run| Response::Submitted { run }),
        Request::Verify { run } => return done(control.verify(run)),
        Request::Prune {
            older_than_ms,
            keep,
        } => return done(control.prune(older_than_ms, keep)),
        Request::Cancel { run } => return done(control.cancel(run)),
        Request::Retry { run } => return done(control.retry(run)),
        Request::Release { run } => return done(control.release(run)),
        Request::Unwatch { name } => return done(control.unwatch(&name)),
        Request::WebLogin => return done(control.web_login()),
        Request::Shutdown => Ok(Response::Done {
            message: "shutting down".into(),
        }),
    };
    answered.unwrap_or_else(Response::from)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame above [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame is not the JSON expected.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer sent nothing, or not the whole frame, in the time allowed.
    #[error("timed out waiting for {0}")]
    TimedOut(&'static str),
}

#[cfg(feature = "runtime")]
/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(feature = "runtime")]
/// Writes one frame to a peer that must take it within `time`: a client that stops reading
/// does not hold its connection (and its share of the daemon) for ever.
pub async fn write_frame_within<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    message: &T,
    time: std::time::Duration,
) -> Result<(), FrameError> {
    tokio::time::timeout(time, write_frame(w, message))
        .await
        .map_err(|_| FrameError::TimedOut("the client to read an answer"))?
}

/// Decodes the first frame held whole in `buf`: the message and the bytes it took, `None` when
/// `buf` holds less than a whole frame. The same checks as [`read_frame`], for callers (and
/// fuzzers) that have bytes in hand.
pub fn decode_frame<T: for<'de> Deserialize<'de>>(
    buf: &[u8],
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    serde_json::from_slice(body)
        .map(|m| Some((m, 4 + len)))
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(feature = "runtime")]
/// Reads one frame; `None` at a clean end of the connection.
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    read_body(r, len).await.map(Some)
}

#[cfg(feature = "runtime")]
/// Reads one frame as a server must from a peer it does not trust: waiting at most `idle` for
/// the frame to begin, then at most `whole` for the rest of it, so a client that sends half a
/// frame and stalls cannot hold its connection (and its share of the daemon) forever.
pub async fn read_frame_within<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
    idle: std::time::Duration,
    whole: std::time::Duration,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    match tokio::time::timeout(idle, r.read(&mut len[..1])).await {
        Err(_) => return Err(FrameError::TimedOut("a request")),
        Ok(Ok(0)) => return Ok(None),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e.into()),
    }
    tokio::time::timeout(whole, async {
        r.read_exact(&mut len[1..]).await?;
        read_body(r, len).await
    })
    .await
    .map_err(|_| FrameError::TimedOut("the rest of a request"))?
    .map(Some)
}

#[cfg(feature = "runtime")]
async fn read_body<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
    len: [u8; 4],
) -> Result<T, FrameError> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // grown as the bytes come, not allocated at the size a peer announced
    let mut body = Vec::with_capacity(len.min(64 << 10));
    let read = r.take(len as u64).read_to_end(&mut body).await?;
    if read < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(feature = "runtime")]
/// The socket clients use when neither `--socket` nor `UET_SOCKET` says: per user, in
/// `$XDG_RUNTIME_DIR/uet/`, else `/tmp/uet-UID/`.
pub fn default_socket() -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("uet"),
        // SAFETY: getuid has no preconditions and cannot fail
        None => PathBuf::from(format!("/tmp/uet-{}", unsafe { libc::getuid() })),
    };
    dir.join("uet.sock")
}

#[cfg(feature = "runtime")]
/// The local-socket name of a socket file.
pub fn socket_name(path: &Path) -> std::io::Result<interprocess::local_socket::Name<'_>> {
    use interprocess::local_socket::{GenericFilePath, ToFsName};
    path.to_fs_name::<GenericFilePath>()
}

#[cfg(feature = "runtime")]
/// A connected client, past the hello.
pub struct Client {
    stream: interprocess::local_socket::tokio::Stream,
}

#[cfg(feature = "runtime")]
impl Client {
    /// Connects and exchanges versions. A peer that accepted the connection but answered the
    /// hello with anything else is an [`std::io::ErrorKind::InvalidData`] error: something
    /// lives there, it just does not speak this protocol.
    pub async fn connect(path: &Path) -> std::io::Result<Client> {
        use interprocess::local_socket::tokio::prelude::*;
        let stream = interprocess::local_socket::tokio::Stream::connect(socket_name(path)?).await?;
        let mut client = Client { stream };
        let hello = client
            .call(&Request::Hello {
                protocol: PROTOCOL_VERSION,
            })
            .await
            .map_err(|e| match e {
                FrameError::Io(io) => io,
                other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
            })?;
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        match hello {
            Response::Hello { .. } => Ok(client),
            Response::Error { message, .. } => Err(invalid(message)),
            other => Err(invalid(format!("unexpected hello: {other:?}"))),
        }
    }

    /// Sends a request and reads its response.
    pub async fn call(&mut self, request: &Request) -> Result<Response, FrameError> {
        write_frame(&mut self.stream, request).await?;
        self.next().await
    }

    /// Reads the next response of a stream (see [`Request::Events`]).
    pub async fn next(&mut self) -> Result<Response, FrameError> {
        read_frame(&mut self.stream)
            .await?
            .ok_or_else(|| FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
    }
}

// the tests drive frames through tokio streams
#[cfg(all(test, feature = "runtime"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_refuse_what_they_must() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, &Request::Show { run: 7, from: 0 })
            .await
            .unwrap();
        let got: Option<Request> = read_frame(&mut b).await.unwrap();
        assert_eq!(got, Some(Request::Show { run: 7, from: 0 }));

        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_frame::<_, Request>(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{nope").await.unwrap();
        assert!(matches!(
            read_frame::<_, Request>(&mut b).await,
            Err(FrameError::Malformed(_))
        ));
        drop(a);
        assert!(read_frame::<_, Request>(&mut b).await.unwrap().is_none());
    }
}

fn sets_empty(sets: &crate::spec::workflow::Sets) -> bool {
    sets.0.is_empty()
}

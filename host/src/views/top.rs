//! `uet top`: a live view of the daemon, redrawn in place, over the control socket.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::api::protocol::{Client, Request, Response};
use crate::api::types::{BreakerShown, TopView};

/// One screen of `uet top`, cut to `width` columns.
pub fn frame(view: &TopView, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    match &view.status {
        Some(status) => {
            let counts: Vec<String> = status
                .runs
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            lines.push(format!(
                "uet top · daemon {} (pid {}) · up {}s · {} active · {} queued · q to quit",
                status.version, status.pid, status.uptime_seconds, status.active, view.queued,
            ));
            lines.push(format!(
                "runs: {}",
                if counts.is_empty() {
                    "none".into()
                } else {
                    counts.join(", ")
                }
            ));
        }
        None => lines.push(format!(
            "uet top · the state, read without a daemon · {} queued · q to quit",
            view.queued
        )),
    }
    if let Some(status) = &view.status {
        for s in &status.standing {
            lines.push(format!("standing: {}", s.line()));
        }
        if let Some(r) = status.rejected.first() {
            lines.push(format!(
                "rejected: {} of late, latest {}: {}",
                status.rejected.len(),
                r.name,
                r.reason
            ));
        }
    }
    lines.push(String::new());
    lines.push(format!(
        "{:>5}  {:<20} {:<8} {:<32} {:>8} {:>8}  RUNNING",
        "RUN", "NAME", "STATE", "PROGRESS", "ELAPSED", "ETA"
    ));
    if view.runs.is_empty() {
        lines.push("    (no runs in flight)".into());
    }
    let secs = |v: Option<f64>| v.map(|x| format!("{x:.1}s")).unwrap_or_else(|| "-".into());
    for r in &view.runs {
        let p = r.progress.as_ref();
        let bar = match p {
            Some(p) => format!(
                "{} {}/{}",
                crate::engine::progress::bar(p.percent, 16),
                p.done,
                p.total
            ),
            None => "-".into(),
        };
        lines.push(format!(
            "{:>5}  {:<20} {:<8} {:<32} {:>8} {:>8}  {}",
            r.run_id,
            clip(&r.name, 20),
            r.state.as_str(),
            bar,
            secs(p.and_then(|p| p.elapsed_seconds)),
            secs(p.and_then(|p| p.eta_seconds)),
            r.running.join(", "),
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "{:<16} {:<8} {:<36} CAPABILITIES",
        "TOOL", "KIND", "BREAKER"
    ));
    for t in &view.tools {
        lines.push(format!(
            "{:<16} {:<8} {:<36} {}",
            clip(&t.name, 16),
            t.kind,
            BreakerShown::cell(t.breaker.as_ref()),
            t.capabilities.join(","),
        ));
    }
    lines.into_iter().map(|l| clip(&l, width)).collect()
}

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        text.chars()
            .take(width.saturating_sub(1))
            .chain(['…'])
            .collect()
    }
}

/// Where `uet top` gets its view from a daemon: connects now, asks at every refresh.
pub fn from_daemon(socket: &Path) -> Result<impl FnMut() -> Result<TopView, TopError>, TopError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client = rt
        .block_on(Client::connect(socket))
        .map_err(|e| TopError::NoDaemon(socket.display().to_string(), e))?;
    Ok(move || match rt.block_on(client.call(&Request::Top)) {
        Ok(Response::Top { view }) => Ok(*view),
        Ok(Response::Error { message, .. }) => Err(TopError::Daemon(message)),
        Ok(other) => Err(TopError::Daemon(format!("unexpected answer: {other:?}"))),
        Err(e) => Err(TopError::Daemon(format!(
            "the daemon stopped answering: {e}"
        ))),
    })
}

/// Restores the terminal however `uet top` ends, a panic included.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        crossterm::terminal::enable_raw_mode()?;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Why `uet top` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// No daemon answers on the socket.
    #[error("no uet daemon answers on {0}: {1}")]
    NoDaemon(String, std::io::Error),
    /// The daemon stopped answering, or refused.
    #[error("{0}")]
    Daemon(String),
    /// The terminal could not be driven.
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// Runs `uet top` until `q`, Esc or Ctrl-C. When stdout is not a terminal, prints one frame and
/// returns, like `top -b -n 1`.
pub fn run(
    mut fetch: impl FnMut() -> Result<TopView, TopError>,
    every: Duration,
) -> Result<(), TopError> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        let mut out = std::io::stdout().lock();
        for line in frame(&fetch()?, 200) {
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let _screen = Screen::enter()?;
    loop {
        let view = fetch()?;
        let (cols, rows) = crossterm::terminal::size().unwrap_or((100, 30));
        let mut out = std::io::stdout().lock();
        crossterm::queue!(
            out,
            crossterm::cursor::MoveTo(0, 0),
            crossterm::terminal::Clear(crossterm::terminal::ClearType::All)
        )?;
        for (i, line) in frame(&view, cols as usize)
            .iter()
            .take(rows as usize)
            .enumerate()
        {
            crossterm::queue!(out, crossterm::cursor::MoveTo(0, i as u16))?;
            write!(out, "{line}")?;
        }
        out.flush()?;
        drop(out);
        // wait for the next refresh, or a key
        let deadline = std::time::Instant::now() + every;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            if !crossterm::event::poll(left)? {
                break;
            }
            use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
            if let Event::Key(KeyEvent {
                code, modifiers, ..
            }) = crossterm::event::read()?
            {
                let ctrl_c =
                    code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(());
                }
            }
        }
    }
}

//! `uet metrics`: the state as Prometheus text exposition, for machines.
//!
//! Everything comes from counters the store keeps up to date as it commits (attempts and
//! durations per tool, breakers) or from one pass over runs and steps, so a scrape costs the
//! same however long the history is, give or take the runs kept (see retention).

use std::fmt::Write as _;

use crate::model::BreakerRecord;
use crate::model::RunState;
use crate::state::{DURATION_BUCKETS, StateError, Store, ToolStats};

/// What only a live daemon knows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Runs whose steps are being driven now.
    pub active: u64,
}

/// The exposition text. `breakers` are the live ones when a daemon asks, else the stored ones.
pub fn render(
    store: &Store,
    breakers: &[(String, BreakerRecord)],
    live: Option<Live>,
) -> Result<String, StateError> {
    let mut out = String::new();
    runs(&mut out, store, live)?;
    let stats = store.tool_stats()?;
    attempts(&mut out, &stats);
    durations(&mut out, &stats);
    breaker_states(&mut out, breakers);
    Ok(out)
}

/// Runs by state, the queue, the runs a daemon drives, steps by state.
fn runs(out: &mut String, store: &Store, live: Option<Live>) -> Result<(), StateError> {
    let mut by_state = std::collections::BTreeMap::new();
    for state in RunState::ALL {
        by_state.insert(state.as_str(), 0u64);
    }
    for (state, n) in store.run_counts()? {
        by_state.insert(state.as_str(), n);
    }
    family(out, "uet_runs", "gauge", "Runs in the state, by run state.");
    for (state, n) in &by_state {
        let _ = writeln!(out, "uet_runs{{state=\"{state}\"}} {n}");
    }
    family(
        out,
        "uet_queue_depth",
        "gauge",
        "Runs waiting to start (pending).",
    );
    let _ = writeln!(out, "uet_queue_depth {}", by_state["pending"]);
    if let Some(live) = live {
        family(
            out,
            "uet_runs_active",
            "gauge",
            "Runs the daemon is driving now.",
        );
        let _ = writeln!(out, "uet_runs_active {}", live.active);
    }
    family(
        out,
        "uet_steps",
        "gauge",
        "Steps of all runs, by step state.",
    );
    for (state, n) in store.step_counts()? {
        let _ = writeln!(out, "uet_steps{{state=\"{state}\"}} {n}");
    }
    Ok(())
}

/// Attempts by tool and outcome, and the failures among them.
fn attempts(out: &mut String, stats: &[(String, ToolStats)]) {
    family(
        out,
        "uet_attempts_total",
        "counter",
        "Attempts by tool and outcome.",
    );
    for (tool, s) in stats {
        for (outcome, n) in &s.outcomes {
            let _ = writeln!(
                out,
                "uet_attempts_total{{{},outcome=\"{outcome}\"}} {n}",
                labels(tool)
            );
        }
    }
    family(
        out,
        "uet_attempt_failures_total",
        "counter",
        "Attempts that failed (not counting cancels and interruptions), by tool.",
    );
    for (tool, s) in stats {
        let failed: u64 = s
            .outcomes
            .iter()
            .filter(|(o, _)| !matches!(o.as_str(), "succeeded" | "canceled" | "interrupted"))
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            out,
            "uet_attempt_failures_total{{{}}} {failed}",
            labels(tool)
        );
    }
}

/// The histogram of attempts' durations, by tool.
fn durations(out: &mut String, stats: &[(String, ToolStats)]) {
    family(
        out,
        "uet_step_duration_seconds",
        "histogram",
        "How long each attempt of a step ran, by tool.",
    );
    for (tool, s) in stats {
        let tool = labels(tool);
        let mut cumulative = 0;
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            cumulative += s.buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "uet_step_duration_seconds_bucket{{{tool},le=\"{bound}\"}} {cumulative}"
            );
        }
        let count: u64 = s.buckets.iter().sum();
        let _ = writeln!(
            out,
            "uet_step_duration_seconds_bucket{{{tool},le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "uet_step_duration_seconds_sum{{{tool}}} {}", s.seconds);
        let _ = writeln!(out, "uet_step_duration_seconds_count{{{tool}}} {count}");
    }
}

/// Each tool's breaker: its state, and the failures it has counted.
fn breaker_states(out: &mut String, breakers: &[(String, BreakerRecord)]) {
    family(
        out,
        "uet_breaker_state",
        "gauge",
        "1 for each tool's current circuit breaker state.",
    );
    for (tool, record) in breakers {
        for state in ["closed", "open", "half-open"] {
            let on = u8::from(record.phase.as_str() == state);
            let _ = writeln!(
                out,
                "uet_breaker_state{{{},state=\"{}\"}} {on}",
                labels(tool),
                state.replace('-', "_")
            );
        }
    }
    family(
        out,
        "uet_breaker_failures",
        "gauge",
        "Consecutive failures each tool's breaker has counted.",
    );
    for (tool, record) in breakers {
        let _ = writeln!(
            out,
            "uet_breaker_failures{{{}}} {}",
            labels(tool),
            record.failures
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the exposition format wants it.
/// A tool's labels from its identity: `tool="NAME",folder="FOLDER"`, the folder of its tools
/// file (empty for counters an older state kept by name alone).
fn labels(key: &str) -> String {
    let (name, folder) = crate::model::split_tool_key(key);
    format!("tool=\"{}\",folder=\"{}\"", escape(name), escape(folder))
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves the exposition over HTTP on a loopback address until `stop`: `GET /metrics` gets the
/// text, anything else 404. A one-route responder written here rather than a web framework:
/// scrapers send one small GET and read one reply.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> Result<String, String> + Send + Sync>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.cancelled() => return,
        };
        let Ok((mut conn, _)) = conn else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            // the request head only; a client that sends more than 8 KiB of it is not a scraper
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = String::from_utf8_lossy(&head);
            let target = line.split_whitespace().take(2).collect::<Vec<_>>();
            let (status, kind, body) = match target.as_slice() {
                // rendering reads the state: off the async threads that serve the socket
                ["GET", "/metrics"] => match tokio::task::spawn_blocking(move || render()).await {
                    Ok(Ok(text)) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
                    Ok(Err(e)) => ("500 Internal Server Error", "text/plain", e),
                    Err(e) => ("500 Internal Server Error", "text/plain", e.to_string()),
                },
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try GET /metrics\n".to_string(),
                ),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

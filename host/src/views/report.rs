//! What people read of a run and its log: the facade's typed answers, as lines of text.

use crate::api::types::{EventShown, RunShown};
use crate::model::Progress;

/// A run for a person: the run's line, its progress, then a line per step.
pub fn text(run: &RunShown) -> String {
    let mut out = format!("run {} `{}`: {}", run.run_id, run.name, run.state);
    if let Some(ms) = run.duration_ms {
        out.push_str(&format!(" in {}", seconds(ms)));
    }
    if run.state != crate::model::RunState::Succeeded
        && let Some(reason) = &run.reason
    {
        out.push_str(&format!(" ({reason})"));
    }
    out.push('\n');
    if let Some(p) = &run.progress {
        out.push_str(&format!("  {}\n", progress_line(p)));
    }
    let width = run.steps.iter().map(|st| st.id.len()).max().unwrap_or(0);
    for st in &run.steps {
        let attempts = match st.attempts {
            1 => "1 attempt".to_string(),
            n => format!("{n} attempts"),
        };
        let time = st.duration_ms.map(seconds).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "  {:<width$}  {:<9}  {:<10}  {:>7}  {}",
            st.id,
            st.state.to_string(),
            attempts,
            time,
            st.tool.as_deref().unwrap_or("-"),
        ));
        if let Some(reason) = &st.reason {
            out.push_str(&format!("  {reason}"));
        }
        out.push('\n');
    }
    out
}

/// `[#####-----] 50% · 2/4 done · 1 running · 1 failed · 3.1s elapsed · eta 2.0s`.
pub fn progress_line(p: &Progress) -> String {
    let mut line = format!(
        "{} · {}/{} done",
        crate::engine::progress::bar(p.percent, 20),
        p.done,
        p.total
    );
    for (n, word) in [(p.running, "running"), (p.failed, "failed")] {
        if n > 0 {
            line.push_str(&format!(" · {n} {word}"));
        }
    }
    if let Some(e) = p.elapsed_seconds {
        line.push_str(&format!(" · {e:.1}s elapsed"));
    }
    if p.done != p.total {
        match p.eta_seconds {
            Some(eta) => line.push_str(&format!(" · eta {eta:.1}s")),
            None => line.push_str(" · eta unknown (no history yet)"),
        }
    }
    line
}

fn seconds(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

/// One line of `uet events`: time, run, step, kind, detail.
pub fn event_line(e: &EventShown) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at);
    format!(
        "{}  run {:<4} {:<16} {:<18} {}",
        humantime::format_rfc3339_millis(t),
        e.run_id.map_or_else(|| "-".to_string(), |r| r.to_string()),
        e.step.as_deref().unwrap_or("-"),
        e.kind,
        e.detail,
    )
}

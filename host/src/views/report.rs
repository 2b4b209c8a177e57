//! What users see of a run: the JSON object of DESIGN.md and a readable summary.

use serde_json::json;

use crate::model::{EventRecord, RunId, RunRecord, StepRecord};
use crate::state::{StateError, Store};

/// A run and its steps, read from the state.
pub struct RunView {
    /// The run.
    pub run: RunRecord,
    /// Its steps, in workflow order.
    pub steps: Vec<StepRecord>,
    /// How far it is, with an ETA from history.
    pub progress: Option<crate::engine::progress::Progress>,
}

impl RunView {
    /// Reads a run; `None` when the state has no such run.
    pub fn load(store: &Store, id: RunId) -> Result<Option<RunView>, StateError> {
        let Some(run) = store.run(id)? else {
            return Ok(None);
        };
        let steps = store.steps(id)?;
        let progress = crate::engine::progress::load_for(store, &run, &steps)?;
        Ok(Some(RunView {
            run,
            steps,
            progress,
        }))
    }

    /// A page of a run: its steps from the `from`th on, as many as about `max_bytes` of them
    /// hold (at least one), read without holding the other steps' outputs; the object of
    /// [`RunView::to_json`] with `steps_next`, the place of the next page, when there is one.
    pub fn load_page(
        store: &Store,
        id: RunId,
        from: usize,
        max_bytes: usize,
    ) -> Result<Option<serde_json::Value>, StateError> {
        let Some(run) = store.run(id)? else {
            return Ok(None);
        };
        // progress is the first page's: each later one would read every step again for it
        let progress = if from == 0 {
            let brief = store.steps_brief(id)?;
            crate::engine::progress::load_for(store, &run, &brief)?
        } else {
            None
        };
        let (steps, next) = store.steps_page(id, from, max_bytes)?;
        let mut page = RunView {
            run,
            steps,
            progress,
        }
        .to_json();
        if let Some(next) = next {
            page["steps_next"] = json!(next);
        }
        Ok(Some(page))
    }

    /// The object `uet run --json` and `uet show --json` print.
    pub fn to_json(&self) -> serde_json::Value {
        let mut run = self.run_json();
        run["steps"] = self.steps.iter().map(step_json).collect();
        run
    }

    fn run_json(&self) -> serde_json::Value {
        json!({
            "run_id": self.run.id,
            "name": self.run.name,
            "state": self.run.state,
            "reason": self.run.reason,
            "source": self.run.source,
            "workstream": self.run.workstream,
            "trigger": self.run.trigger,
            "created_at": self.run.created_at,
            "started_at": self.run.started_at,
            "finished_at": self.run.finished_at,
            "duration_ms": duration_ms(self.run.started_at, self.run.finished_at),
            "progress": self.progress,
            "steps": [],
        })
    }

    /// A summary for a person: the run's line, then a line per step.
    pub fn to_text(&self) -> String {
        text(&self.to_json())
    }
}

/// One step of [`RunView::to_json`].
fn step_json(s: &StepRecord) -> serde_json::Value {
    json!({
                "id": s.id,
                "state": s.state,
                "attempts": s.attempts,
                "output": s.output,
                "tool": s.tool,
                "reason": s.reason,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "duration_ms": duration_ms(s.started_at, s.finished_at),
            })
}

/// The summary of [`RunView::to_text`], from the JSON object (as a client receives it).
pub fn text(run: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "run {} `{}`: {}",
        run["run_id"],
        s(&run["name"]),
        s(&run["state"])
    );
    if let Some(ms) = run["duration_ms"].as_u64() {
        out.push_str(&format!(" in {}", seconds(ms)));
    }
    if run["state"] != "succeeded"
        && let Some(reason) = run["reason"].as_str()
    {
        out.push_str(&format!(" ({reason})"));
    }
    out.push('\n');
    if let Some(line) = progress_line(&run["progress"]) {
        out.push_str(&format!("  {line}\n"));
    }
    let steps = run["steps"].as_array().cloned().unwrap_or_default();
    let width = steps.iter().map(|st| s(&st["id"]).len()).max().unwrap_or(0);
    for st in &steps {
        let attempts = match st["attempts"].as_u64().unwrap_or(0) {
            1 => "1 attempt".to_string(),
            n => format!("{n} attempts"),
        };
        let time = st["duration_ms"]
            .as_u64()
            .map(seconds)
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "  {:<width$}  {:<9}  {:<10}  {:>7}  {}",
            s(&st["id"]),
            s(&st["state"]),
            attempts,
            time,
            s(&st["tool"]),
        ));
        if let Some(reason) = st["reason"].as_str() {
            out.push_str(&format!("  {reason}"));
        }
        out.push('\n');
    }
    out
}

/// `[#####-----] 50% · 2/4 done · 1 running · 1 failed · 3.1s elapsed · eta 2.0s`, from a
/// run's `progress` object.
pub fn progress_line(p: &serde_json::Value) -> Option<String> {
    let total = p["total"].as_u64()?;
    let mut line = format!(
        "{} · {}/{total} done",
        crate::engine::progress::bar(p["percent"].as_f64().unwrap_or(0.0), 20),
        p["done"].as_u64().unwrap_or(0)
    );
    for (key, word) in [("running", "running"), ("failed", "failed")] {
        if let Some(n) = p[key].as_u64().filter(|n| *n > 0) {
            line.push_str(&format!(" · {n} {word}"));
        }
    }
    if let Some(e) = p["elapsed_seconds"].as_f64() {
        line.push_str(&format!(" · {e:.1}s elapsed"));
    }
    if p["done"] != p["total"] {
        match p["eta_seconds"].as_f64() {
            Some(eta) => line.push_str(&format!(" · eta {eta:.1}s")),
            None => line.push_str(" · eta unknown (no history yet)"),
        }
    }
    Some(line)
}

fn duration_ms(start: Option<u64>, end: Option<u64>) -> Option<u64> {
    Some(end?.saturating_sub(start?))
}

fn seconds(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

/// An event of a run's log as clients receive it.
pub fn event_json(run: RunId, e: &EventRecord) -> serde_json::Value {
    serde_json::json!({
        "run_id": run, "seq": e.seq, "at": e.at, "step": e.step, "kind": e.kind, "detail": e.detail,
        "hash": e.hash,
    })
}

/// One line of `uet events`: time, run, step, kind, detail.
pub fn event_line(e: &serde_json::Value) -> String {
    let at = e["at"]
        .as_u64()
        .map(|ms| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_millis(t).to_string()
        })
        .unwrap_or_else(|| "-".into());
    format!(
        "{at}  run {:<4} {:<16} {:<18} {}",
        e["run_id"],
        e["step"].as_str().unwrap_or("-"),
        e["kind"].as_str().unwrap_or("-"),
        e["detail"].as_str().unwrap_or(""),
    )
}

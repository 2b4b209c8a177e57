//! What users see of a run: the JSON object of DESIGN.md and a readable summary.

use serde_json::json;

use crate::model::{RunId, RunRecord, StepRecord};
use crate::store::{StateError, Store};

/// A run and its steps, read from the state.
pub struct RunView {
    /// The run.
    pub run: RunRecord,
    /// Its steps, in workflow order.
    pub steps: Vec<StepRecord>,
}

impl RunView {
    /// Reads a run; `None` when the state has no such run.
    pub fn load(store: &Store, id: RunId) -> Result<Option<RunView>, StateError> {
        let Some(run) = store.run(id)? else {
            return Ok(None);
        };
        let steps = store.steps(id)?;
        Ok(Some(RunView { run, steps }))
    }

    /// The object `uet run --json` and `uet show --json` print.
    pub fn to_json(&self) -> serde_json::Value {
        let steps: Vec<_> = self
            .steps
            .iter()
            .map(|s| {
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
            })
            .collect();
        json!({
            "run_id": self.run.id,
            "name": self.run.name,
            "state": self.run.state,
            "reason": self.run.reason,
            "source": self.run.source,
            "workstream": self.run.workstream,
            "created_at": self.run.created_at,
            "started_at": self.run.started_at,
            "finished_at": self.run.finished_at,
            "duration_ms": duration_ms(self.run.started_at, self.run.finished_at),
            "steps": steps,
        })
    }

    /// A summary for a person: the run's line, then a line per step.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "run {} `{}`: {}",
            self.run.id, self.run.name, self.run.state
        );
        if let Some(ms) = duration_ms(self.run.started_at, self.run.finished_at) {
            out.push_str(&format!(" in {}", seconds(ms)));
        }
        if let Some(reason) = &self.run.reason
            && self.run.state != crate::model::RunState::Succeeded
        {
            out.push_str(&format!(" ({reason})"));
        }
        out.push('\n');
        let width = self.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
        for s in &self.steps {
            let attempts = match s.attempts {
                1 => "1 attempt".to_string(),
                n => format!("{n} attempts"),
            };
            let time = duration_ms(s.started_at, s.finished_at)
                .map(seconds)
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "  {:<width$}  {:<9}  {:<10}  {:>7}  {}",
                s.id,
                s.state.as_str(),
                attempts,
                time,
                s.tool.as_deref().unwrap_or("-"),
            ));
            if let Some(reason) = &s.reason {
                out.push_str(&format!("  {reason}"));
            }
            out.push('\n');
        }
        out
    }
}

fn duration_ms(start: Option<u64>, end: Option<u64>) -> Option<u64> {
    Some(end?.saturating_sub(start?))
}

fn seconds(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

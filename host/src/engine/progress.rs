//! How far a run is, and when it will be done.
//!
//! The ETA comes from history: the median of each tool's latest successful attempt durations,
//! kept in the state. A step still to run is expected to take its tool's median; a running step
//! what is left of it (by its plugin's own progress report when there is one, else by the time
//! it has had). The run then needs at least its longest remaining chain of steps (the critical
//! path) and at least its remaining work spread over `max_parallel`; the ETA is the larger of
//! the two, which is exact for a chain and for a wide set of equal steps, and a lower bound
//! within a factor of two for any DAG (Graham's list-scheduling bound).

use std::collections::HashMap;

use crate::model::{
    Millis, Progress, RunId, RunRecord, RunState, StepRecord, StepState, now_millis,
};
use crate::spec::workflow::{Plan, Target};
use crate::state::{StateError, Store};

/// Each tool's median duration (ms), from [`Store::durations`].
pub fn medians(durations: &HashMap<String, Vec<u64>>) -> HashMap<String, u64> {
    durations
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(tool, d)| {
            let mut d = d.clone();
            d.sort_unstable();
            (tool.clone(), d[d.len() / 2])
        })
        .collect()
}

/// The progress of a run from its plan, its steps and the tools' medians, at `now`.
pub fn estimate(
    run: &RunRecord,
    plan: &Plan,
    steps: &[StepRecord],
    medians: &HashMap<String, u64>,
    now: Millis,
) -> Progress {
    let n = plan.steps.len();
    let by_id: HashMap<&str, &StepRecord> = steps.iter().map(|s| (s.id.as_str(), s)).collect();
    let record = |i: usize| by_id.get(plan.steps[i].id.as_str()).copied();
    let state = |i: usize| record(i).map(|r| r.state).unwrap_or(StepState::Pending);
    let done = (0..n).filter(|&i| state(i).is_terminal()).count();
    let running = (0..n).filter(|&i| state(i) == StepState::Running).count();
    let failed = (0..n).filter(|&i| state(i) == StepState::Failed).count();
    let fractions: f64 = (0..n)
        .filter(|&i| state(i) == StepState::Running)
        .filter_map(|i| record(i).and_then(|r| r.progress))
        .map(f64::from)
        .sum();
    let percent = if n == 0 {
        100.0
    } else {
        (done as f64 + fractions) / n as f64 * 100.0
    };
    let elapsed_seconds = run.started_at.map(|s| {
        let end = run.finished_at.unwrap_or(now);
        end.saturating_sub(s) as f64 / 1000.0
    });

    // a tool never seen yet is expected to take what tools typically take here
    let fallback = {
        let mut all: Vec<u64> = medians.values().copied().collect();
        all.sort_unstable();
        all.get(all.len() / 2).copied()
    };
    let expected = |i: usize| -> Option<u64> {
        let tool = record(i)
            .and_then(|r| r.tool.clone())
            .or_else(|| match &plan.steps[i].target {
                Target::Tool(name) => Some(name.clone()),
                Target::Capability(_) => None,
            });
        tool.and_then(|t| medians.get(&t).copied()).or(fallback)
    };
    let mut remaining = vec![0u64; n];
    let mut known = true;
    for (i, left) in remaining.iter_mut().enumerate() {
        *left = match state(i) {
            s if s.is_terminal() => 0,
            StepState::Running => {
                let r = record(i);
                let ran = r
                    .and_then(|r| r.attempt_started_at.or(r.started_at))
                    .map(|s| now.saturating_sub(s))
                    .unwrap_or(0);
                match r.and_then(|r| r.progress).filter(|f| *f > 0.0) {
                    // the plugin knows best: what it has done took `ran`
                    Some(f) => (ran as f64 * (1.0 - f64::from(f)) / f64::from(f)) as u64,
                    None => match expected(i) {
                        Some(e) => e.saturating_sub(ran),
                        None => {
                            known = false;
                            0
                        }
                    },
                }
            }
            _ => match expected(i) {
                Some(e) => e,
                None => {
                    known = false;
                    0
                }
            },
        };
    }
    let eta_seconds = if run.state == RunState::Quarantined {
        // held for a person: it ends when someone releases it, not by any estimate
        None
    } else if run.state.is_terminal() {
        Some(0.0)
    } else if !known {
        None
    } else {
        let path = critical_path(plan, &remaining);
        let work: u64 = remaining.iter().sum();
        let spread = work as f64 / plan.max_parallel.max(1) as f64;
        Some(path.max(spread) / 1000.0)
    };
    Progress {
        done,
        total: n,
        running,
        failed,
        percent: (percent * 10.0).round() / 10.0,
        elapsed_seconds,
        eta_seconds: eta_seconds.map(|e| (e * 10.0).round() / 10.0),
    }
}

/// The longest chain of remaining durations through the DAG, in ms.
fn critical_path(plan: &Plan, remaining: &[u64]) -> f64 {
    let n = plan.steps.len();
    // longest path ending at each step; needs point upstream, so settle steps in an order
    // where every need comes first
    let mut finish: Vec<Option<u64>> = vec![None; n];
    let mut longest = 0u64;
    for start in 0..n {
        let mut stack = vec![start];
        while let Some(&i) = stack.last() {
            if finish[i].is_some() {
                stack.pop();
                continue;
            }
            let pending: Vec<usize> = plan.steps[i]
                .needs
                .iter()
                .copied()
                .filter(|&d| finish[d].is_none())
                .collect();
            if pending.is_empty() {
                let before = plan.steps[i]
                    .needs
                    .iter()
                    .filter_map(|&d| finish[d])
                    .max()
                    .unwrap_or(0);
                let f = before + remaining[i];
                finish[i] = Some(f);
                longest = longest.max(f);
                stack.pop();
            } else {
                // validated plans have no cycles, so this ends
                stack.extend(pending);
            }
        }
    }
    longest as f64
}

/// The progress of a stored run; `None` when the state has no such run.
pub fn load(store: &Store, run: RunId) -> Result<Option<Progress>, StateError> {
    let Some(record) = store.run(run)? else {
        return Ok(None);
    };
    let steps = store.steps(run)?;
    load_for(store, &record, &steps)
}

/// [`load`], for a run whose record and steps the caller has already read.
pub fn load_for(
    store: &Store,
    record: &RunRecord,
    steps: &[StepRecord],
) -> Result<Option<Progress>, StateError> {
    let Some(plan) = store
        .plan(record.id)?
        .and_then(|p| serde_json::from_value::<Plan>(p).ok())
    else {
        return Ok(None);
    };
    with_plan(store, record, &plan, steps).map(Some)
}

/// [`load_for`], for a caller that holds the run's plan: a big plan is not read and decoded
/// again (some 50 ms over 10,000 steps).
pub fn with_plan(
    store: &Store,
    record: &RunRecord,
    plan: &Plan,
    steps: &[StepRecord],
) -> Result<Progress, StateError> {
    let medians = medians(&store.durations()?);
    Ok(estimate(record, plan, steps, &medians, now_millis()))
}

/// A bar for a person: `[########------------] 40%`.
pub fn bar(percent: f64, width: usize) -> String {
    let filled = ((percent / 100.0) * width as f64).round() as usize;
    let filled = filled.min(width);
    format!(
        "[{}{}] {percent:.0}%",
        "#".repeat(filled),
        "-".repeat(width - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RunState;
    use crate::spec::tools::Tools;

    fn plan(text: &str) -> Plan {
        let tools = Tools::parse(
            std::path::Path::new("tools.toml"),
            b"[[tools]]\nname = \"slow\"\ncommand = [\"true\"]\n\
              [[tools]]\nname = \"fast\"\ncommand = [\"true\"]\n",
        )
        .unwrap();
        crate::spec::workflow::parse(std::path::Path::new("w.toml"), text.as_bytes(), &tools)
            .unwrap()
    }

    fn run(state: RunState) -> RunRecord {
        RunRecord {
            id: 1,
            name: "w".into(),
            state,
            reason: None,
            source: String::new(),
            workstream: String::new(),
            created_at: 0,
            started_at: Some(0),
            finished_at: None,
            trigger: None,
            crashes: 0,
        }
    }

    fn medians() -> HashMap<String, u64> {
        [("slow".to_string(), 4000), ("fast".to_string(), 1000)]
            .into_iter()
            .collect()
    }

    #[test]
    fn a_chain_takes_the_sum_and_a_wide_set_its_work_over_the_slots() {
        let chain = plan(
            "name = \"c\"\n[[steps]]\nid = \"a\"\ntool = \"slow\"\n\
             [[steps]]\nid = \"b\"\ntool = \"fast\"\nneeds = [\"a\"]\n\
             [[steps]]\nid = \"c\"\ntool = \"fast\"\nneeds = [\"b\"]\n",
        );
        let p = estimate(&run(RunState::Pending), &chain, &[], &medians(), 0);
        assert_eq!(p.eta_seconds, Some(6.0));
        assert_eq!((p.done, p.total, p.percent), (0, 3, 0.0));

        let mut wide = String::from("name = \"w\"\nmax_parallel = 2\n");
        for i in 0..6 {
            wide.push_str(&format!("[[steps]]\nid = \"s{i}\"\ntool = \"fast\"\n"));
        }
        let p = estimate(&run(RunState::Pending), &plan(&wide), &[], &medians(), 0);
        assert_eq!(p.eta_seconds, Some(3.0), "6 × 1 s over 2 slots");
    }

    #[test]
    fn running_steps_count_what_is_left_of_them_and_unknown_tools_give_no_eta() {
        let chain = plan(
            "name = \"c\"\n[[steps]]\nid = \"a\"\ntool = \"slow\"\n\
             [[steps]]\nid = \"b\"\ntool = \"fast\"\nneeds = [\"a\"]\n",
        );
        let step = |id: &str, state, progress| StepRecord {
            id: id.into(),
            state,
            attempts: 1,
            tool: None,
            output: None,
            reason: None,
            started_at: Some(1000),
            finished_at: None,
            progress,
            attempt_started_at: None,
        };
        // a has run 1 s of its 4 s median: 3 s left, then b's 1 s
        let steps = [step("a", StepState::Running, None)];
        let p = estimate(&run(RunState::Running), &chain, &steps, &medians(), 2000);
        assert_eq!(p.eta_seconds, Some(4.0));
        // its plugin says it is half done after 1 s: 1 s more (not the 3 s its median says),
        // then b's 1 s; and half a step of two is done
        let steps = [step("a", StepState::Running, Some(0.5))];
        let p = estimate(&run(RunState::Running), &chain, &steps, &medians(), 2000);
        assert_eq!(p.eta_seconds, Some(2.0));
        assert_eq!(p.percent, 25.0);
        // a second attempt started at 1.5 s has had 0.5 s, whatever the first one took
        let mut retried = step("a", StepState::Running, None);
        retried.attempts = 2;
        retried.attempt_started_at = Some(1500);
        let p = estimate(
            &run(RunState::Running),
            &chain,
            &[retried],
            &medians(),
            2000,
        );
        assert_eq!(p.eta_seconds, Some(4.5));
        // a quarantined run waits for a person: no estimate
        let p = estimate(&run(RunState::Quarantined), &chain, &[], &medians(), 2000);
        assert_eq!(p.eta_seconds, None);
        let p = estimate(&run(RunState::Running), &chain, &[], &HashMap::new(), 0);
        assert_eq!(p.eta_seconds, None);
        assert_eq!(bar(40.0, 10), "[####------] 40%");
    }
}

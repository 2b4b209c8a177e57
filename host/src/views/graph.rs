//! A run's steps as a layered drawing: each step in the column after the last of its needs,
//! ordered within its column to keep edges short. Computed once per plan (a plan never changes
//! after its run is created) and drawn by any face: the web dashboard draws the part of it in
//! view, so a 10,000-step run costs the page what fits on a screen.

use serde::{Deserialize, Serialize};

use crate::spec::workflow::Plan;

/// Where each step of a plan is drawn, in workflow order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Columns: a step is in the column after the last of its needs (0 without needs).
    pub columns: usize,
    /// The most steps in one column.
    pub rows: usize,
    /// The steps, in workflow order (the order of the run's steps).
    pub nodes: Vec<Node>,
}

/// One step's place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The step's id.
    pub id: String,
    /// Its column.
    pub column: usize,
    /// Its row within the column, from the top.
    pub row: usize,
    /// The steps it needs, by their place in `nodes`.
    pub needs: Vec<usize>,
}

/// Sweeps of ordering by the needs' mean row: two already untangle most real graphs, and each
/// costs a pass over the edges.
const SWEEPS: usize = 2;

/// Lays a plan out. A plan is acyclic (validation refused it otherwise); a need that points
/// past the steps is ignored rather than trusted.
pub fn layout(plan: &Plan) -> Layout {
    let n = plan.steps.len();
    let needs: Vec<Vec<usize>> = plan
        .steps
        .iter()
        .map(|s| s.needs.iter().copied().filter(|&d| d < n).collect())
        .collect();
    let column = columns(&needs);
    let columns = column.iter().max().map_or(0, |c| c + 1);
    let mut by_column: Vec<Vec<usize>> = vec![Vec::new(); columns];
    for (step, &c) in column.iter().enumerate() {
        by_column[c].push(step);
    }
    let mut row = vec![0usize; n];
    for members in &by_column {
        for (r, &step) in members.iter().enumerate() {
            row[step] = r;
        }
    }
    for _ in 0..SWEEPS {
        for members in by_column.iter_mut().skip(1) {
            let key = |step: &usize| -> f64 {
                let ds = &needs[*step];
                if ds.is_empty() {
                    return row[*step] as f64;
                }
                ds.iter().map(|&d| row[d] as f64).sum::<f64>() / ds.len() as f64
            };
            let mut keyed: Vec<(f64, usize)> = members.iter().map(|s| (key(s), *s)).collect();
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            *members = keyed.into_iter().map(|(_, s)| s).collect();
            for (r, &step) in members.iter().enumerate() {
                row[step] = r;
            }
        }
    }
    let rows = by_column.iter().map(Vec::len).max().unwrap_or(0);
    let nodes = plan
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| Node {
            id: s.id.clone(),
            column: column[i],
            row: row[i],
            needs: needs[i].clone(),
        })
        .collect();
    Layout {
        columns,
        rows,
        nodes,
    }
}

/// Each step's column: one past the furthest of its needs, in topological order (Kahn's), so
/// a 10,000-step chain needs no recursion. Steps left in a cycle (never in a valid plan) stay
/// in column 0.
pub fn columns(needs: &[Vec<usize>]) -> Vec<usize> {
    let n = needs.len();
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (step, ds) in needs.iter().enumerate() {
        for &d in ds {
            after[d].push(step);
        }
    }
    let mut column = vec![0usize; n];
    let mut ready: Vec<usize> = (0..n).filter(|&s| waiting[s] == 0).collect();
    while let Some(step) = ready.pop() {
        for &next in &after[step] {
            column[next] = column[next].max(column[step] + 1);
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.push(next);
            }
        }
    }
    column
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(needs: &[&[usize]]) -> Plan {
        let steps = needs
            .iter()
            .enumerate()
            .map(|(i, ds)| {
                serde_json::json!({
                    "id": format!("s{i}"), "target": {"tool": "t"}, "needs": ds, "with": null,
                    "priority": 0, "retries": null, "retry": null, "timeout": null
                })
            })
            .collect::<Vec<_>>();
        serde_json::from_value(serde_json::json!({
            "name": "p", "meta": [], "max_parallel": 1, "timeout": null, "trigger": null,
            "steps": steps
        }))
        .unwrap()
    }

    #[test]
    fn a_step_sits_one_column_past_its_furthest_need() {
        // s0 -> s1 -> s3, s0 -> s3 directly, s2 alone, s4 needs s2 and s3
        let l = layout(&plan(&[&[], &[0], &[], &[0, 1], &[2, 3]]));
        let cols: Vec<usize> = l.nodes.iter().map(|n| n.column).collect();
        assert_eq!(cols, vec![0, 1, 0, 2, 3]);
        assert_eq!(l.columns, 4);
        assert_eq!(l.rows, 2);
    }

    #[test]
    fn rows_follow_the_needs_so_edges_do_not_cross() {
        // two chains started in one order, their second steps declared in the other
        let l = layout(&plan(&[&[], &[], &[1], &[0]]));
        assert_eq!(l.nodes[0].row, 0);
        assert_eq!(l.nodes[1].row, 1);
        assert_eq!(l.nodes[3].row, 0, "s3 follows s0");
        assert_eq!(l.nodes[2].row, 1, "s2 follows s1");
    }

    #[test]
    fn a_long_chain_and_a_wide_fan_lay_out_without_recursion() {
        let chain: Vec<Vec<usize>> = (0..20_000)
            .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
            .collect();
        let refs: Vec<&[usize]> = chain.iter().map(Vec::as_slice).collect();
        let l = layout(&plan(&refs));
        assert_eq!((l.columns, l.rows), (20_000, 1));
        let wide: Vec<&[usize]> = vec![&[]; 10_000];
        let l = layout(&plan(&wide));
        assert_eq!((l.columns, l.rows), (1, 10_000));
        assert_eq!(l.nodes[9_999].row, 9_999);
    }
}

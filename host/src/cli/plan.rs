//! Seeing a plan without running it: `uet graph FILE` draws it (Mermaid or DOT), and
//! `uet run --dry-run FILE` lists what would run in which order, with the tools it resolves to.

use std::path::Path;

use uet::engine::route;
use uet::spec::tools::Tools;
use uet::spec::workflow::Sets;
use uet::spec::workflow::{self, Plan, Target};

use super::args::{GraphFormat, exit};
use super::{Failure, default_state_dir, run};

/// A workflow's plan and its tools (described, as a run would have them); without a tools
/// file beside it, tool names are not checked and steps resolve to nothing.
fn load(file: &Path, tools: Option<&Path>, sets: &Sets) -> Result<(Plan, Tools), Failure> {
    let tools_file = run::tools_path(file, tools);
    let mut tools = if tools.is_none() && !tools_file.exists() {
        eprintln!(
            "{}: note: no {} beside it; tool names not checked",
            file.display(),
            uet::spec::tools::TOOLS_FILE
        );
        Tools::empty()
    } else {
        Tools::load_to_read(&tools_file).map_err(Failure::Problems)?
    };
    run::plugin_runtime(&mut tools, &default_state_dir()?, false)?;
    let plan = workflow::load_with(file, &tools, sets).map_err(Failure::Problems)?;
    Ok((plan, tools))
}

/// Each step's wave: 1 for a step that needs nothing, else one more than its latest need's
/// (the dashboard's graph columns, counted from 1).
fn waves(plan: &Plan) -> Vec<usize> {
    let needs: Vec<Vec<usize>> = plan.steps.iter().map(|s| s.needs.clone()).collect();
    uet::views::graph::columns(&needs)
        .into_iter()
        .map(|c| c + 1)
        .collect()
}

/// What a step resolves to: the tool the router tries first, as `name (kind source)`.
fn resolved(tools: &Tools, target: &Target) -> Option<(String, &'static str, String)> {
    if tools.path.as_os_str().is_empty() {
        return None;
    }
    route(tools, target)
        .ok()
        .map(|t| (t.name.clone(), t.kind.name(), t.kind.source()))
}

/// `uet graph FILE`: the plan as a Mermaid flowchart or a Graphviz digraph, on stdout.
pub(crate) fn graph(file: &Path, tools: Option<&Path>, format: GraphFormat) -> Result<u8, Failure> {
    let (plan, tools) = load(file, tools, &Sets::default())?;
    let label = |i: usize| {
        let step = &plan.steps[i];
        let how = match (&step.target, resolved(&tools, &step.target)) {
            (Target::Capability(c), Some((name, ..))) => format!("{c} → {name}"),
            (Target::Capability(c), None) => c.clone(),
            (Target::Tool(name), _) => name.clone(),
        };
        (step.id.clone(), how)
    };
    let mut out = String::new();
    match format {
        GraphFormat::Mermaid => {
            // ids of their own: a step's id may hold what Mermaid reads as syntax
            let text = |s: &str| s.replace('"', "#quot;");
            out.push_str(&format!("%% {}\nflowchart LR\n", text(&plan.name)));
            for i in 0..plan.steps.len() {
                let (id, how) = label(i);
                out.push_str(&format!(
                    "  s{i}[\"{}<br/><i>{}</i>\"]\n",
                    text(&id),
                    text(&how)
                ));
            }
            for (i, s) in plan.steps.iter().enumerate() {
                for &d in &s.needs {
                    out.push_str(&format!("  s{d} --> s{i}\n"));
                }
            }
        }
        GraphFormat::Dot => {
            let text = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
            out.push_str(&format!(
                "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n",
                text(&plan.name)
            ));
            for i in 0..plan.steps.len() {
                let (id, how) = label(i);
                out.push_str(&format!(
                    "  s{i} [label=\"{}\\n{}\"];\n",
                    text(&id),
                    text(&how)
                ));
            }
            for (i, s) in plan.steps.iter().enumerate() {
                for &d in &s.needs {
                    out.push_str(&format!("  s{d} -> s{i};\n"));
                }
            }
            out.push_str("}\n");
        }
    }
    print!("{out}");
    Ok(exit::OK)
}

/// `uet run --dry-run FILE`: what would run, wave by wave (a wave's steps may run side by side
/// once the waves before it are done; within one, higher priority first, then file order), and
/// the tool each step resolves to. Nothing runs and no state is touched.
pub(crate) fn dry_run(
    file: &Path,
    tools: Option<&Path>,
    sets: &Sets,
    json: bool,
) -> Result<u8, Failure> {
    let (plan, tools) = load(file, tools, sets)?;
    let wave = waves(&plan);
    let mut order: Vec<usize> = (0..plan.steps.len()).collect();
    order.sort_by_key(|&i| (wave[i], -plan.steps[i].priority, i));
    if json {
        let steps: Vec<serde_json::Value> = order
            .iter()
            .map(|&i| {
                let s = &plan.steps[i];
                let tool = resolved(&tools, &s.target);
                serde_json::json!({
                    "id": s.id,
                    "wave": wave[i],
                    "needs": s.needs.iter().map(|&d| &plan.steps[d].id).collect::<Vec<_>>(),
                    "capability": match &s.target {
                        Target::Capability(c) => Some(c),
                        Target::Tool(_) => None,
                    },
                    "tool": tool.as_ref().map(|t| &t.0),
                    "kind": tool.as_ref().map(|t| t.1),
                    "source": tool.as_ref().map(|t| &t.2),
                })
            })
            .collect();
        let shown = serde_json::json!({
            "name": plan.name,
            "max_parallel": plan.max_parallel,
            "params": plan.params,
            "waves": wave.iter().max().copied().unwrap_or(0),
            "steps": steps,
        });
        println!("{shown}");
        return Ok(exit::OK);
    }
    println!(
        "dry run of `{}`: {} steps in {} waves, at most {} at once; nothing was run",
        plan.name,
        plan.steps.len(),
        wave.iter().max().copied().unwrap_or(0),
        plan.max_parallel
    );
    if !plan.params.is_empty() {
        println!("params: {}", uet::spec::template::params_line(&plan.params));
    }
    let width = plan.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
    let mut current = 0;
    for &i in &order {
        if wave[i] != current {
            current = wave[i];
            println!("wave {current}:");
        }
        let s = &plan.steps[i];
        let runs = match resolved(&tools, &s.target) {
            Some((name, kind, source)) => match &s.target {
                Target::Capability(_) => format!("{} → {name} ({kind} {source})", s.target),
                Target::Tool(_) => format!("{} ({kind} {source})", s.target),
            },
            None => s.target.to_string(),
        };
        let needs: Vec<&str> = s.needs.iter().map(|&d| plan.steps[d].id.as_str()).collect();
        let needs = if needs.is_empty() {
            String::new()
        } else {
            format!("  after {}", needs.join(", "))
        };
        println!("  {:width$}  {runs}{needs}", s.id);
    }
    Ok(exit::OK)
}

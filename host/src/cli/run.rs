//! Running a workflow here (`uet run`), checking workflows, and listing tools from a file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uet::spec::workflow::Sets;

use anyhow::{Context, anyhow};
use tokio_util::sync::CancellationToken;

use uet::adapters::wasm::{self, Runtime};
use uet::api::ops;
use uet::api::protocol::Request;
use uet::engine::{self, Notice, RunSpec};
use uet::model::{RunState, StepState};
use uet::spec::doc::Problems;
use uet::spec::tools::{TOOLS_FILE, Tools};
use uet::spec::workflow;
use uet::state::Store;

use super::args::{ClientArgs, exit};
use super::{Failure, client, default_state_dir, print};

/// Starts the plugin runtime when any tool is a plugin, and asks plugins that list no
/// capabilities (every plugin when `all`) what they are.
pub(crate) fn plugin_runtime(
    tools: &mut Tools,
    state: &Path,
    all: bool,
) -> Result<Option<Arc<Runtime>>, Failure> {
    if !tools.has_plugins() {
        return Ok(None);
    }
    let runtime = Runtime::new(Some(wasm::cache_dir(state)), tools.max_memory())
        .context("cannot start the plugin runtime")?
        .announce_with(|line| eprintln!("uet: {line}"));
    wasm::describe_tools(tools, &runtime, all).map_err(Failure::Problems)?;
    Ok(Some(Arc::new(runtime)))
}

pub(crate) fn tools(
    tools: Option<&Path>,
    state: Option<PathBuf>,
    args: &ClientArgs,
) -> Result<u8, Failure> {
    let json = args.json;
    let local = PathBuf::from(TOOLS_FILE);
    if tools.is_none() {
        // the daemon's tools when one answers; a tools file here stands in when none does
        let code = client::ask(args, Request::Tools, local.exists())?;
        if code != exit::NO_DAEMON || !local.exists() {
            return Ok(code);
        }
    }
    let path = tools.map(Path::to_path_buf).unwrap_or(local);
    let mut tools = Tools::load_to_read(&path).map_err(Failure::Problems)?;
    let state = match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    plugin_runtime(&mut tools, &state, true)?;
    // the breakers as the state last recorded them, when there is one to read
    let records = Store::open_read_only(&state)
        .ok()
        .and_then(|store| store.breakers().ok())
        .unwrap_or_default();
    let shown = ops::tools(std::slice::from_ref(&tools), |key| {
        records
            .iter()
            .find(|(t, _)| t == key)
            .map(|(_, r)| r.clone())
    });
    print::tools(json, &shown);
    Ok(exit::OK)
}

/// The tools file for a workflow: `--tools`, else `tools.toml` beside it.
pub(crate) fn tools_path(workflow: &Path, given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workflow.parent().unwrap_or(Path::new(".")).join(TOOLS_FILE))
}

pub(crate) fn validate(files: &[PathBuf], tools: Option<&Path>) -> Result<u8, Failure> {
    let mut problems = Problems::new(Vec::new());
    for file in files {
        let tools_file = tools_path(file, tools);
        let mut tools = if tools.is_none() && !tools_file.exists() {
            // without a tools file the shape is still worth checking; say what was not
            eprintln!(
                "{}: note: no {} beside it; tool names not checked",
                file.display(),
                TOOLS_FILE
            );
            Tools::empty()
        } else {
            match Tools::load_to_read(&tools_file) {
                Ok(t) => t,
                Err(p) => {
                    problems.extend(p);
                    continue;
                }
            }
        };
        if let Err(failure) = default_state_dir()
            .map_err(Failure::from)
            // every plugin described: its input schema checks the steps' `with`
            .and_then(|state| plugin_runtime(&mut tools, &state, true))
        {
            match failure {
                Failure::Problems(p) => problems.extend(p),
                Failure::Other(e) => return Err(Failure::Other(e)),
            }
            continue;
        }
        let checked = workflow::load(file, &tools)
            .and_then(|plan| uet::spec::inputs::check(file, &plan, &tools).map(|()| plan));
        match checked {
            Ok(plan) => println!(
                "{}: ok: `{}`, {} steps",
                file.display(),
                plan.name,
                plan.steps.len()
            ),
            Err(p) => problems.extend(p),
        }
    }
    if problems.count() == 0 {
        Ok(exit::OK)
    } else {
        Err(Failure::Problems(problems))
    }
}

pub(crate) fn run(
    file: &Path,
    tools: Option<&Path>,
    sets: &Sets,
    state: Option<PathBuf>,
    json: bool,
) -> Result<u8, Failure> {
    if !file.is_file() {
        return Err(anyhow!("{}: no such workflow file", file.display()).into());
    }
    let mut tools = Tools::load(&tools_path(file, tools)).map_err(Failure::Problems)?;
    let state_dir = match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    let wasm = plugin_runtime(&mut tools, &state_dir, false)?;
    let plan = workflow::load_with(file, &tools, sets).map_err(Failure::Problems)?;
    let store = Store::open(&state_dir)
        .with_context(|| format!("cannot open the state in {}", state_dir.display()))?;
    // this process owns the state now: steps an earlier uet left running are stopped
    let (groups, _) = engine::open_groups(&store).map_err(anyhow::Error::from)?;
    let source = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let workstream = source.parent().unwrap_or(Path::new(".")).to_path_buf();
    let step_ids: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
    let run = store
        .create_run(
            &plan.name,
            &source.to_string_lossy(),
            &workstream.to_string_lossy(),
            &plan,
            &step_ids,
        )
        .context("cannot record the run")?;

    // one thread drives the run: the work is in the children and in plugin threads, and
    // handing each step between worker threads cost more than it gave (see PERFORMANCE.md)
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let final_state = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        // registered before any step starts: a Ctrl-C from then on cancels, never kills outright
        let mut interrupts =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let forced = store.clone();
        tokio::spawn(async move {
            if interrupts.recv().await.is_some() {
                eprintln!("uet: canceling (Ctrl-C again to force)…");
                on_signal.cancel();
                if interrupts.recv().await.is_some() {
                    force_stop(&forced, run);
                    std::process::exit(130);
                }
            }
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let spec = RunSpec {
            run,
            plan: &plan,
            workstream: &workstream,
            tools: &tools,
            wasm,
            pause: None,
            breakers: Arc::new(uet::engine::breaker::Breakers::load(&store)?),
            groups: Arc::new(groups),
            // `uet run` is one process, not a fleet's node: every step runs here
            remote: None,
            relaying: uet::engine::Relaying::Always,
        };
        let printer = live_progress(&store, run, plan.steps.len(), rx);
        let (result, ()) = tokio::join!(
            engine::execute(&store, spec, cancel, (!json).then_some(tx)),
            printer
        );
        let state = result?;
        // your own file on your own machine: any webhook it names
        engine::notify::run_ended(&store, run, &plan, &tools, &workstream).await;
        Ok::<_, anyhow::Error>(state)
    });
    let final_state = final_state.context("the run could not be driven")?;
    let shown =
        ops::whole_run(&store, run, &plan).map_err(|r| anyhow!("cannot read the run back: {r}"))?;
    print::run(json, &shown);
    Ok(match final_state {
        RunState::Succeeded => exit::OK,
        _ => exit::RUN_FAILED,
    })
}

/// A second Ctrl-C: the steps are not waited for. Their command processes are killed, and
/// the run is recorded canceled (its unfinished attempts interrupted) before uet exits, so no
/// later daemon takes it for one that was cut off and runs it again unasked.
fn force_stop(store: &Store, run: u64) {
    // opening the ledger again kills the process groups it notes: this run's commands
    let killed = engine::open_groups(store).map(|(_, n)| n).unwrap_or(0);
    let mut changes = engine::requeue_in_flight(store, run).unwrap_or_default();
    changes.push(uet::state::Change::RunState {
        run,
        to: RunState::Canceled,
        reason: Some("canceled: forced by a second Ctrl-C".into()),
    });
    match store.apply(&changes) {
        Ok(()) => eprintln!(
            "uet: forced; run {run} recorded canceled ({killed} command{} killed)",
            if killed == 1 { "" } else { "s" }
        ),
        Err(e) => eprintln!("uet: forced; run {run} could not be recorded canceled: {e}"),
    }
}

/// Shows a run's progress on stderr as it goes: on a terminal, a bar with the steps running
/// and the ETA, redrawn in place, with a line above it for each step that ends; otherwise only
/// those lines, so logs stay plain.
async fn live_progress(
    store: &Store,
    run: u64,
    total: usize,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
) {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}") {
            bar.set_style(style.progress_chars("##-"));
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let mut running: std::collections::BTreeSet<String> = Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut eta = String::from("eta …");
    // the bar's message: the ETA (refreshed on the tick) and the steps running (at once)
    let message = |eta: &str, running: &std::collections::BTreeSet<String>| {
        let names: Vec<&str> = running.iter().map(String::as_str).take(4).collect();
        let more = running.len().saturating_sub(names.len());
        let mut msg = format!("{eta} · running: {}", names.join(", "));
        if more > 0 {
            msg.push_str(&format!(" +{more}"));
        }
        msg
    };
    loop {
        tokio::select! {
            notice = notices.recv() => {
                let Some(notice) = notice else { break };
                if let Notice::Step { id, state, .. } = &notice {
                    if *state == StepState::Running {
                        running.insert(id.clone());
                    } else {
                        running.remove(id);
                    }
                    if let (Some(bar), true) = (&bar, state.is_terminal()) {
                        bar.inc(1);
                    }
                }
                match (&bar, notice_line(&notice)) {
                    (Some(bar), Some(line)) if !matches!(notice, Notice::Step { state: StepState::Running, .. } | Notice::Progress { .. }) => bar.println(line),
                    (None, Some(line)) => eprintln!("{line}"),
                    _ => {}
                }
                if let Some(bar) = &bar {
                    bar.set_message(message(&eta, &running));
                }
            }
            _ = tick.tick(), if bar.is_some() => {
                eta = uet::engine::progress::load(store, run)
                    .ok()
                    .flatten()
                    .and_then(|p| p.eta_seconds)
                    .map(|e| format!("eta {e:.1}s"))
                    .unwrap_or_else(|| "eta unknown".into());
                if let Some(bar) = &bar {
                    bar.set_message(message(&eta, &running));
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// A progress line for stderr; quiet about the routine (a step starting) unless stderr is a
/// terminal, so logs of scripted runs stay short.
fn notice_line(notice: &Notice) -> Option<String> {
    match notice {
        Notice::Step {
            id,
            state,
            attempts,
            reason,
        } => {
            let mark = match state {
                StepState::Running if !std::io::stderr().is_terminal() => return None,
                StepState::Running => "…",
                StepState::Succeeded => "✓",
                StepState::Failed => "✗",
                StepState::Skipped => "-",
                StepState::Canceled => "⊘",
                StepState::Pending => return None,
            };
            let mut line = format!("{mark} {id} {state}");
            if state.is_terminal() && *attempts > 1 {
                line.push_str(&format!(" after {attempts} attempts"));
            }
            if let Some(r) = reason {
                line.push_str(&format!(": {r}"));
            }
            Some(line)
        }
        Notice::Progress {
            id,
            fraction,
            message,
        } => std::io::stderr()
            .is_terminal()
            .then(|| format!("… {id} {:.0}% {message}", fraction * 100.0)),
        Notice::Retry {
            id,
            attempt,
            error,
            delay,
        } => Some(format!(
            "↻ {id} attempt {attempt} failed ({error}); retrying in {}",
            humantime::format_duration(std::time::Duration::from_millis(delay.as_millis() as u64))
        )),
    }
}

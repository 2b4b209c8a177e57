//! The facade's typed answers, printed for a person or as JSON.

use std::io::Write;

use uet::api::protocol::{Response, Status};
use uet::api::types::{BreakerShown, EventShown, RunShown, RunSummary, ToolShown, TopView};
use uet::model::RunState;

use super::args::exit;

/// Prints one answer of the daemon and says what the command's exit code is.
pub(crate) fn response(json: bool, answer: Response) -> u8 {
    match answer {
        Response::Error { message, invalid } => {
            if json {
                // on stdout too: a script reading JSON gets the refusal as JSON
                println!(
                    "{}",
                    serde_json::json!({ "error": message, "invalid": invalid })
                );
            }
            eprintln!("{message}");
            if invalid {
                exit::INVALID
            } else {
                exit::RUN_FAILED
            }
        }
        Response::Logs { logs } => {
            self::logs(json, &logs);
            exit::OK
        }
        Response::Status(status) => {
            self::status(json, &status);
            exit::OK
        }
        Response::Runs { runs } => {
            self::runs(json, &runs);
            exit::OK
        }
        Response::Run { run } => {
            self::run(json, &run);
            exit::OK
        }
        Response::Submitted { run } => {
            if json {
                println!("{}", serde_json::json!({ "run_id": run }));
            } else {
                println!("submitted: run {run}");
            }
            exit::OK
        }
        Response::Done { message } => {
            if json {
                println!("{}", serde_json::json!({ "message": message }));
            } else {
                println!("{message}");
            }
            exit::OK
        }
        Response::Events { events } => {
            self::events(json, &events);
            exit::OK
        }
        Response::Tools { tools } => {
            self::tools(json, &tools);
            exit::OK
        }
        Response::Top { view } => {
            top(json, &view);
            exit::OK
        }
        Response::Metrics { text } => {
            print!("{text}");
            exit::OK
        }
        Response::Hello { .. } => exit::OK,
    }
}

/// Prints `value` as one line of JSON.
fn json_line(value: &impl serde::Serialize) {
    // buffered: stdout is line-buffered, and looks for a newline in each of serde_json's many
    // small writes (a 10,000-step run's 5 MB line took 16 ms that way, 5 ms buffered)
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let _ = serde_json::to_writer(&mut out, value);
    let _ = writeln!(out);
    let _ = out.flush();
}

pub(crate) fn status(json: bool, status: &Status) {
    if json {
        return json_line(status);
    }
    let counts: Vec<String> = status
        .runs
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    let watching: Vec<String> = status
        .watching
        .iter()
        .map(|w| w.display().to_string())
        .collect();
    println!(
        "uet daemon {} (pid {}), up {}s, state {}\nwatching: {}\nruns: {} ({} active)",
        status.version,
        status.pid,
        status.uptime_seconds,
        status.state.display(),
        watching.join(", "),
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        },
        status.active,
    );
    if let Some(metrics) = &status.metrics {
        println!("metrics: http://{metrics}/metrics");
    }
    if let Some(fleet) = &status.fleet {
        println!(
            "fleet: node {} on {}, {} ({} of each stream)",
            fleet.node,
            fleet.server,
            if fleet.connected {
                "connected"
            } else {
                "reconnecting"
            },
            if fleet.replicas == 1 {
                "1 copy".to_string()
            } else {
                format!("{} copies", fleet.replicas)
            }
        );
        if let Some(waiting) = &fleet.waiting {
            println!("fleet: waiting: {waiting}");
        }
    }
    if let Some(web) = &status.web {
        println!("web: {web} (`uet web` for a login address)");
    }
    for s in &status.standing {
        println!("standing: {}", s.line());
    }
    for r in &status.rejected {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at);
        println!(
            "rejected: {} at {}: {} (report: {})",
            r.name,
            humantime::format_rfc3339_seconds(at),
            r.reason,
            r.report.display()
        );
    }
}

pub(crate) fn runs(json: bool, runs: &[RunSummary]) {
    if json {
        return json_line(&runs);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:>6}  {:<11}  {:<24}  STARTED BY · REASON",
        "RUN", "STATE", "NAME"
    );
    for r in runs {
        let mut why = r.trigger.clone().unwrap_or_else(|| "-".into());
        if r.state != RunState::Succeeded
            && let Some(reason) = &r.reason
        {
            why.push_str(&format!(" · {reason}"));
        }
        let _ = writeln!(
            out,
            "{:>6}  {:<11}  {:<24}  {why}",
            r.run_id,
            r.state.as_str(),
            r.name
        );
    }
}

pub(crate) fn run(json: bool, run: &RunShown) {
    if json {
        json_line(run);
    } else {
        print!("{}", uet::views::report::text(run));
    }
}

pub(crate) fn events(json: bool, events: &[EventShown]) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    for e in events {
        if json {
            let _ = serde_json::to_writer(&mut out, e);
            let _ = writeln!(out);
        } else {
            let _ = writeln!(out, "{}", uet::views::report::event_line(e));
        }
    }
    let _ = out.flush();
}

/// `uet tools`: a table, or a JSON list.
pub(crate) fn tools(json: bool, tools: &[ToolShown]) {
    if json {
        return json_line(&tools);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<24} {:<30} SOURCE",
        "TOOL", "KIND", "CAPABILITIES", "BREAKER"
    );
    for t in tools {
        let mut source = t.source.clone();
        if let Some(v) = &t.version {
            source.push_str(&format!(" (v{v})"));
        }
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<24} {:<30} {source}",
            t.name,
            t.kind,
            t.capabilities.join(","),
            BreakerShown::cell(t.breaker.as_ref()),
        );
    }
}

pub(crate) fn top(json: bool, view: &TopView) {
    if json {
        return json_line(view);
    }
    for line in uet::views::top::frame(view, 200) {
        println!("{line}");
    }
}

/// `uet logs`: each attempt under a heading, then what it printed and logged, indented.
pub(crate) fn logs(json: bool, logs: &[uet::api::types::AttemptLog]) {
    if json {
        println!("{}", serde_json::to_string(logs).unwrap_or_default());
        return;
    }
    for log in logs {
        // the outcome's name as JSON spells it: `succeeded`, `timed_out`, ...
        let ended = log
            .outcome
            .and_then(|o| serde_json::to_value(o).ok())
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "running".into());
        println!(
            "== {} · attempt {} · {} · {ended}",
            log.step, log.attempt, log.tool
        );
        let plugin = log.plugin.join("\n");
        for (what, text) in [
            ("stdout", log.stdout.as_str()),
            ("stderr", log.stderr.as_str()),
            ("log", plugin.as_str()),
        ] {
            if text.trim().is_empty() {
                continue;
            }
            println!("{what}:");
            for line in text.trim_end_matches('\n').lines() {
                println!("  {line}");
            }
        }
        if let Some(error) = &log.error {
            println!("error: {error}");
        }
    }
}

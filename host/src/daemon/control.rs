//! The daemon's side of the facade: what it does when a face asks ([`ops::Control`]). The
//! socket maps its requests onto these calls; the web dashboard and the fleet will do the same.

use crate::spec::workflow::Sets;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::api::ops::{self, Control, Refused};
use crate::api::types::{RunShown, RunSummary, Status, ToolShown, TopView};

impl Control for Arc<Daemon> {
    fn state(&self) -> &crate::state::Store {
        &self.store
    }

    fn web_login(&self) -> Result<String, Refused> {
        match &self.web {
            Some(web) => Ok(web.login_url()),
            None => Err(Refused::invalid(
                "the web dashboard is off: start the daemon with --http 127.0.0.1:7878 (or \
                 `http = \"127.0.0.1:7878\"` in its config file)",
            )),
        }
    }

    fn status(&self) -> Result<Status, Refused> {
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            state: self.config.state.clone(),
            watching: self.config.watch.clone(),
            runs: ops::run_counts(&self.store)?,
            active: lock(&self.active).len() as u64,
            metrics: lock(&self.metrics_at).clone(),
            web: self.web.as_ref().map(|w| format!("http://{}", w.addr())),
            fleet: self.fleet.as_ref().map(|f| f.shown()),
            standing: lock(&self.standing_shown).clone(),
            rejected: rejected_drops(&self.config.watch, 10),
        })
    }

    fn runs(&self, limit: Option<usize>) -> Result<Vec<RunSummary>, Refused> {
        ops::runs(&self.store, limit)
    }

    fn show(&self, run: RunId, from: usize) -> Result<RunShown, Refused> {
        ops::show(&self.store, run, from)
    }

    /// The tools of every watched folder (or of `--tools`), with their breakers.
    fn tools(&self) -> Result<Vec<ToolShown>, Refused> {
        let mut dirs: Vec<PathBuf> = match &self.config.tools {
            Some(f) => vec![f.parent().unwrap_or(Path::new("/")).to_path_buf()],
            None => self.config.watch.clone(),
        };
        dirs.dedup();
        let files = dirs
            .iter()
            .map(|dir| load_tools(self, dir))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|problems| Refused {
                message: problems.to_string(),
                invalid: false,
            })?;
        Ok(ops::tools(&files, |t| self.breakers.get(t)))
    }

    /// The daemon in brief, every run not yet ended with its progress, how many wait for a
    /// slot, and the tools with their breakers (none when a tools file cannot be read: the
    /// runs are still worth seeing).
    fn top(&self) -> Result<TopView, Refused> {
        let tools = self.tools().unwrap_or_default();
        ops::top(&self.store, Some(self.status()?), tools)
    }

    fn metrics(&self) -> Result<String, Refused> {
        let active = lock(&self.active).len() as u64;
        ops::metrics(&self.store, &self.breakers.all(), Some(active))
    }

    fn verify(&self, run: RunId) -> Result<String, Refused> {
        ops::verify(&self.store, run)
    }

    fn prune(&self, older_than_ms: Option<u64>, keep: Option<usize>) -> Result<String, Refused> {
        ops::prune(&self.store, older_than_ms, keep)
    }

    /// `uet submit`: a file in a watched folder is claimed like a drop (so the watcher does not
    /// run it a second time); any other file runs with its folder as the workstream.
    fn submit(&self, path: &Path, sets: &Sets) -> Result<RunId, Refused> {
        if let Some(path) = watched_as(self, path) {
            if !sets.0.is_empty() {
                // a drop is read again from its claim after a crash, where no `--set` is kept
                return Err(Refused::invalid(format!(
                    "{}: --set is for files outside the watched folders (one dropped here runs with its defaults); submit a copy from elsewhere",
                    path.display()
                )));
            }
            return match claim(self, &path) {
                Some(Ok(run)) => Ok(run),
                Some(Err(ClaimError::Rejected(report))) => Err(Refused::invalid(format!(
                    "{report}(moved to rejected/ in its folder)"
                ))),
                Some(Err(ClaimError::Failed(e))) => Err(failed(e)),
                None => Err(failed(format!(
                    "{} was picked up by the folder watcher already: see `uet runs`",
                    path.display()
                ))),
            };
        }
        let bytes = dropped::read_submitted(path, self.config.max_file)
            .map_err(|e| Refused::invalid(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        // said as `uet run` says it: the problems, then how many
        let refused =
            |p: crate::spec::doc::Problems| Refused::invalid(format!("{p}\n{}", p.nothing_run()));
        let tools = load_tools(self, &dir).map_err(refused)?;
        let plan = workflow::parse_with(path, &bytes, &tools, sets).map_err(refused)?;
        webhooks_allow(self, path, &plan).map_err(refused)?;
        let run = record(self, &plan, path, &dir, None, "submitted")
            .map_err(|e| failed(format!("{e:#}")))?;
        start(self, run, plan, dir, tools, false);
        Ok(run)
    }

    fn cancel(&self, run: RunId) -> Result<String, Refused> {
        let token = lock(&self.active).get(&run).cloned();
        match token {
            Some(t) => {
                t.cancel();
                Ok(format!("run {run} canceled"))
            }
            None => match self.store.run(run)? {
                Some(r) => Err(Refused::invalid(format!(
                    "run {run} is {}, not running",
                    r.state
                ))),
                None => Err(Refused::invalid(format!("no run {run}"))),
            },
        }
    }

    fn retry(&self, run: RunId) -> Result<String, Refused> {
        requeue(self, run, false)
    }

    fn unwatch(&self, name: &str) -> Result<String, Refused> {
        let known: Vec<crate::api::types::StandingShown> = lock(&self.standing_shown)
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect();
        if known.is_empty() {
            let names: Vec<String> = lock(&self.standing_shown)
                .iter()
                .map(|s| s.name.clone())
                .collect();
            return Err(Refused::invalid(if names.is_empty() {
                format!("no standing workflow `{name}`: there are none")
            } else {
                format!(
                    "no standing workflow `{name}` (standing: {})",
                    names.join(", ")
                )
            }));
        }
        for s in &known {
            let key = standing_key(&s.workstream, &s.name);
            self.store.forget_standing(&key)?;
            let _ = self.standing.send(StandingMsg::Forget(key));
        }
        // the task's view is updated when it takes the message; say it at once here
        lock(&self.standing_shown).retain(|s| s.name != name);
        Ok(match known.as_slice() {
            [one] => format!(
                "standing workflow `{name}` of {} withdrawn",
                one.workstream.display()
            ),
            many => format!("{} standing workflows `{name}` withdrawn", many.len()),
        })
    }

    fn release(&self, run: RunId) -> Result<String, Refused> {
        requeue(self, run, true)
    }

    fn stop(&self) {
        self.shutdown.cancel();
    }
}

/// The daemon's own fault, not the request's.
fn failed(message: String) -> Refused {
    Refused {
        message,
        invalid: false,
    }
}

/// The path under a watched folder of a file in it, however the client named it (through `..`
/// or a link), when it is one the watcher would take: such a file is claimed as a drop is, so
/// the watcher cannot run it a second time.
fn watched_as(shared: &Daemon, path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let (parent, name) = path.parent().zip(path.file_name())?;
    let here = std::fs::metadata(parent).ok()?;
    let folder = shared.config.watch.iter().find(|w| {
        std::fs::metadata(w).is_ok_and(|m| m.dev() == here.dev() && m.ino() == here.ino())
    })?;
    Some(folder.join(name)).filter(|p| is_submission(p, &shared.config.watch))
}

/// `uet retry` (a failed or canceled run) and `uet release` (a quarantined one): the steps that
/// did not succeed go back to pending and the run resumes; succeeded steps keep their outputs.
fn requeue(shared: &Arc<Daemon>, run: RunId, release: bool) -> Result<String, Refused> {
    let record = shared
        .store
        .run(run)?
        .ok_or_else(|| Refused::invalid(format!("no run {run}")))?;
    let allowed = if release {
        record.state == RunState::Quarantined
    } else {
        matches!(record.state, RunState::Failed | RunState::Canceled)
    };
    if !allowed || lock(&shared.active).contains_key(&run) {
        let hint = match (release, record.state) {
            (false, RunState::Quarantined) => format!("; `uet release {run}` puts it back"),
            (true, RunState::Failed | RunState::Canceled) => {
                format!("; `uet retry {run}` re-runs it")
            }
            _ => String::new(),
        };
        let (what, which) = if release {
            ("released", "quarantined")
        } else {
            ("retried", "failed or canceled")
        };
        return Err(Refused::invalid(format!(
            "run {run} is {}: only a {which} run can be {what}{hint}",
            record.state,
        )));
    }
    let reason = if release {
        "released by request"
    } else {
        "retry requested"
    };
    let changes = engine::requeue_unfinished(&shared.store, run, reason)?;
    shared.store.apply(&changes)?;
    resume(shared, run, false);
    Ok(format!("run {run} is pending again"))
}

/// The latest reports in the watched folders' `rejected/`, newest first: what a person who
/// dropped a file and saw no run wants to know, read from the reports themselves so that a
/// restart loses none.
pub(super) fn rejected_drops(
    folders: &[PathBuf],
    limit: usize,
) -> Vec<crate::api::types::RejectedShown> {
    use std::io::BufRead;
    let mut found = Vec::new();
    for folder in folders {
        let Ok(entries) = std::fs::read_dir(folder.join("rejected")) else {
            continue;
        };
        // a folder that collected thousands of refusals is not read whole at every status
        for entry in entries.flatten().take(10_000) {
            let report = entry.path();
            let Some(name) = report
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".error.txt"))
            else {
                continue;
            };
            let at = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            found.push((at, name.to_string(), folder.clone(), report));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.truncate(limit);
    found
        .into_iter()
        .map(|(at, name, folder, report)| {
            let reason = std::fs::File::open(&report)
                .ok()
                .and_then(|f| std::io::BufReader::new(f).lines().next())
                .and_then(Result::ok)
                .unwrap_or_default();
            crate::api::types::RejectedShown {
                name,
                folder,
                at,
                reason: reason.chars().take(300).collect(),
                report,
            }
        })
        .collect()
}

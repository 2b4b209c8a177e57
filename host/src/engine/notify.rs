//! Telling someone a run ended: `[notify]` — a webhook POSTed the run's summary as JSON (retried
//! with backoff, signed when `UET_WEBHOOK_SECRET` is set) and/or a command tool given it as
//! input. A notification never changes the run's outcome; each attempt is an event of the run.

use std::path::Path;
use std::time::Duration;

use crate::model::RunId;
use crate::spec::tools::{ToolKind, Tools};
use crate::spec::workflow::{Notify, Plan, webhook_parts};
use crate::state::{Change, Store};

/// The environment variable whose value signs webhook bodies: `X-Uet-Signature:
/// sha256=HEX` is the HMAC-SHA256 of the body under it.
pub const SECRET_ENV: &str = "UET_WEBHOOK_SECRET";

/// How long one webhook attempt may take, connecting included.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

/// The longest wait between two webhook attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Who may be sent to: a daemon sends only to the webhooks its operator listed (any other is
/// refused when the workflow is taken in); `uet run` runs its user's own file.
#[derive(Debug, Clone, Default)]
pub enum Webhooks {
    /// Any address.
    #[default]
    Any,
    /// Addresses starting with one of these.
    Listed(Vec<String>),
}

impl Webhooks {
    /// Whether a workflow's `[notify]` may be sent where it says; why not, in words.
    pub fn allows(&self, notify: Option<&Notify>) -> Result<(), String> {
        let Some(url) = notify.and_then(|n| n.webhook.as_deref()) else {
            return Ok(());
        };
        match self {
            Webhooks::Any => Ok(()),
            Webhooks::Listed(prefixes) if prefixes.iter().any(|p| url.starts_with(p.as_str())) => {
                Ok(())
            }
            Webhooks::Listed(prefixes) => Err(format!(
                "notify.webhook {url:?} is not among the addresses this daemon may call ({}); \
                 its operator lists them in the config's `webhooks`",
                if prefixes.is_empty() {
                    "none are listed".to_string()
                } else {
                    prefixes.join(", ")
                }
            )),
        }
    }
}

/// Notifies about a run that has ended, when its workflow asks to for this end; returns once
/// every notification was delivered or given up on.
pub async fn run_ended(store: &Store, run: RunId, plan: &Plan, tools: &Tools, workstream: &Path) {
    let Some(notify) = &plan.notify else { return };
    let Ok(Some(record)) = store.run(run) else {
        return;
    };
    if !notify.on.iter().any(|s| s == record.state.as_str()) {
        return;
    }
    let summary = summary(store, &record);
    let event = |kind: &str, detail: String| {
        let _ = store.apply(&[Change::Event {
            run,
            step: None,
            kind: kind.into(),
            detail,
        }]);
    };
    if let Some(url) = &notify.webhook {
        webhook(url, notify, &summary, &event).await;
    }
    if let Some(name) = &notify.tool {
        tool(name, tools, &summary, workstream, &event).await;
    }
}

/// What is sent: the run, how it ended, and its steps by state.
fn summary(store: &Store, record: &crate::model::RunRecord) -> serde_json::Value {
    let steps = store.steps(record.id).unwrap_or_default();
    let mut counts = std::collections::BTreeMap::new();
    for s in &steps {
        *counts.entry(s.state.as_str()).or_insert(0u64) += 1;
    }
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| matches!(s.state, crate::model::StepState::Failed))
        .map(|s| s.id.as_str())
        .collect();
    serde_json::json!({
        "run_id": record.id,
        "name": record.name,
        "state": record.state.as_str(),
        "reason": record.reason,
        "source": record.source,
        "workstream": record.workstream,
        "trigger": record.trigger,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "duration_ms": record.started_at.zip(record.finished_at).map(|(s, f)| f.saturating_sub(s)),
        "steps": counts,
        "failed_steps": failed,
    })
}

/// POSTs the summary until a 2xx answer or the attempts run out, each attempt an event.
async fn webhook(
    url: &str,
    notify: &Notify,
    summary: &serde_json::Value,
    event: &(dyn Fn(&str, String) + Sync),
) {
    let body = summary.to_string();
    let signature = std::env::var(SECRET_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .map(|secret| sign(secret.as_bytes(), body.as_bytes()));
    let attempts = notify.retries + 1;
    let mut wait = notify.backoff;
    for n in 1..=attempts {
        match post(url, &body, signature.as_deref()).await {
            Ok(status) if (200..300).contains(&status) => {
                event(
                    "notify.sent",
                    format!("webhook {url}: {status} (attempt {n} of {attempts})"),
                );
                return;
            }
            outcome => {
                let why = match outcome {
                    Ok(status) => format!("answered {status}"),
                    Err(e) => e,
                };
                if n == attempts {
                    event(
                        "notify.failed",
                        format!("webhook {url}: {why} (attempt {n} of {attempts}); given up"),
                    );
                    return;
                }
                event(
                    "notify.retry",
                    format!(
                        "webhook {url}: {why} (attempt {n} of {attempts}); next in {}",
                        humantime::format_duration(wait)
                    ),
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// `sha256=HEX`: the body's HMAC-SHA256 under the secret.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", crate::hex(&mac.finalize().into_bytes()))
}

/// One POST; the answer's status, or why there is none.
async fn post(url: &str, body: &str, signature: Option<&str>) -> Result<u16, String> {
    use http_body_util::Full;
    use hyper::header;
    let (host, port, path) = webhook_parts(url)?;
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("cannot talk HTTP: {e}"))?;
        tokio::spawn(conn);
        let mut request = hyper::Request::post(path)
            .header(header::HOST, format!("{host}:{port}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("uet/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(sig) = signature {
            request = request.header("x-uet-signature", sig);
        }
        let request = request
            .body(Full::new(bytes::Bytes::from(body.to_string())))
            .map_err(|e| format!("cannot make the request: {e}"))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        Ok(answer.status().as_u16())
    };
    tokio::time::timeout(ATTEMPT_LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", ATTEMPT_LIMIT.as_secs())))
}

/// Runs the command tool with the summary as its input (its `{key}`s filled from it, the JSON
/// on stdin), its output cut of the tool's secrets as any attempt's.
async fn tool(
    name: &str,
    tools: &Tools,
    summary: &serde_json::Value,
    workstream: &Path,
    event: &(dyn Fn(&str, String) + Sync),
) {
    let Some(tool) = tools.by_name(name) else {
        event(
            "notify.failed",
            format!("tool `{name}`: not in the tools file"),
        );
        return;
    };
    let ToolKind::Command { argv } = &tool.kind else {
        event(
            "notify.failed",
            format!("tool `{name}`: not a command tool"),
        );
        return;
    };
    let filled: Result<Vec<String>, String> = argv
        .iter()
        .map(|t| t.render(summary).map_err(|e| e.0))
        .collect();
    let argv = match filled {
        Ok(a) => a,
        Err(e) => {
            event("notify.failed", format!("tool `{name}`: {e}"));
            return;
        }
    };
    let spec = crate::adapters::process::CommandSpec {
        argv,
        cwd: workstream.to_path_buf(),
        stdin: summary.to_string().into_bytes(),
        env: tool.env.clone(),
        timeout: Some(tool.timeout.unwrap_or(Duration::from_secs(60))),
        stdout_limit: tool.output_limit(),
        groups: None,
        start_aside: false,
    };
    let mut result =
        crate::adapters::process::run_command(spec, tokio_util::sync::CancellationToken::new())
            .await;
    tool.redact(&mut result.stderr.text);
    use crate::adapters::process::Exit;
    match result.exit {
        Exit::Code(0) => event("notify.sent", format!("tool `{name}`: exited 0")),
        _ => event(
            "notify.failed",
            format!("tool `{name}`: {}", result.ending()),
        ),
    }
}

//! The dashboard's addresses: its page and code, the login, JSON reads through the facade,
//! and the three actions, POST only.

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::guard::{self, refuse};
use super::{App, stream};
use crate::api::ops::{self, Control, Refused};
use crate::model::RunId;

pub(super) fn router(app: App) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html", INDEX) }))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/app.css", get(|| async { asset("text/css", APP_CSS) }))
        .route(
            "/favicon.svg",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
        .route("/login", get(login))
        .route("/api/status", get(status))
        .route("/api/runs", get(runs))
        .route("/api/runs/{run}", get(run))
        .route("/api/runs/{run}/layout", get(layout))
        .route("/api/runs/{run}/timeline", get(timeline))
        .route("/api/runs/{run}/events", get(events))
        .route("/api/runs/{run}/verify", get(verify))
        .route("/api/runs/{run}/steps/{step}", get(step))
        .route("/api/runs/{run}/cancel", post(cancel))
        .route("/api/runs/{run}/retry", post(retry))
        .route("/api/runs/{run}/release", post(release))
        .route("/api/tools", get(tools))
        .route("/api/history", get(history))
        .route("/api/stream", get(stream::stream))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            guard::guard,
        ))
        .with_state(app)
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/favicon.svg");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            // the code changes only with the binary: a browser may keep it, but asks again
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// Spends a one-time login address: a session cookie, and on to the dashboard.
async fn login(State(app): State<App>, Query(q): Query<Login>) -> Response {
    let Some(session) = app.web.log_in(&q.token) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "this login address was used already or is over 5 minutes old: run `uet web` \
             for a new one",
        );
    };
    let cookie = format!(
        "{}={session}; HttpOnly; SameSite=Strict; Path=/",
        guard::COOKIE
    );
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
    )
        .into_response()
}

/// Runs a read of the facade off the async threads (it reads the state), as JSON.
async fn read<T, F>(app: &App, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&dyn Control) -> Result<T, Refused> + Send + 'static,
{
    let control = app.control.clone();
    match tokio::task::spawn_blocking(move || f(&*control)).await {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(refused)) => refused_answer(refused),
        // a panic is the database's on a damaged page, or a bug: this request fails
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the daemon failed to answer: {e}"),
        ),
    }
}

fn refused_answer(refused: Refused) -> Response {
    let status = if refused.invalid {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    refuse(status, &refused.message)
}

async fn status(State(app): State<App>) -> Response {
    read(&app, |c| c.status()).await
}

#[derive(Deserialize)]
struct RunsQuery {
    /// Only runs in this state.
    state: Option<String>,
    /// Only runs whose name holds this, in any case.
    q: Option<String>,
    limit: Option<usize>,
}

/// Runs scanned for a filtered list: the newest, as `uet runs` shows them.
const RUNS_SCANNED: usize = 10_000;

/// The latest runs, newest first, filtered by state and name.
async fn runs(State(app): State<App>, Query(q): Query<RunsQuery>) -> Response {
    read(&app, move |c| {
        let needle = q.q.unwrap_or_default().to_lowercase();
        let mut runs = ops::runs(c.state(), Some(RUNS_SCANNED))?;
        runs.reverse();
        runs.retain(|r| {
            q.state
                .as_deref()
                .is_none_or(|s| s.is_empty() || r.state.to_string() == s)
                && r.name.to_lowercase().contains(&needle)
        });
        runs.truncate(q.limit.unwrap_or(200).min(RUNS_SCANNED));
        Ok(runs)
    })
    .await
}

/// A run's page: the run with its steps brief, and the last event it reflects (where the
/// page's live stream starts).
#[derive(Serialize)]
struct RunPage {
    head: u64,
    run: crate::api::types::RunShown,
}

async fn run(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    read(&app, move |c| {
        // the head first: an event committed after it is sent again, never missed
        let head = c.state().last_event(run)?.unwrap_or(0);
        let run = ops::run_page(c.state(), run)?;
        Ok(RunPage { head, run })
    })
    .await
}

/// A run's steps laid out, computed once per run and kept as the JSON sent.
async fn layout(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    let json =
        |body: bytes::Bytes| ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(body) = app.web.layout(run) {
        return json(body);
    }
    let control = app.control.clone();
    let laid = tokio::task::spawn_blocking(move || {
        ops::layout(control.state(), run).map(|l| serde_json::to_vec(&l).unwrap_or_default())
    })
    .await;
    match laid {
        Ok(Ok(body)) => {
            let body = bytes::Bytes::from(body);
            app.web.keep_layout(run, body.clone());
            json(body)
        }
        Ok(Err(refused)) => refused_answer(refused),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn timeline(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    read(&app, move |c| ops::timeline(c.state(), run)).await
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
}

/// A page of a run's event log, after a place in it.
async fn events(
    State(app): State<App>,
    Path(run): Path<RunId>,
    Query(q): Query<EventsQuery>,
) -> Response {
    read(&app, move |c| {
        ops::known(c.state(), Some(run))?;
        let page = c.state().events_page(run, q.after, ops::EVENTS_PAGE)?;
        Ok(page
            .iter()
            .map(|e| crate::api::types::EventShown::new(run, e))
            .collect::<Vec<_>>())
    })
    .await
}

#[derive(Serialize)]
struct Verified {
    holds: bool,
    message: String,
}

/// Checks a run's hash chain: a read, so a GET.
async fn verify(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    read(&app, move |c| match ops::verify(c.state(), run) {
        Ok(message) => Ok(Verified {
            holds: true,
            message,
        }),
        Err(r) if r.invalid => Err(r),
        Err(r) => Ok(Verified {
            holds: false,
            message: r.message,
        }),
    })
    .await
}

async fn step(State(app): State<App>, Path((run, step)): Path<(RunId, String)>) -> Response {
    read(&app, move |c| ops::step_detail(c.state(), run, &step)).await
}

async fn tools(State(app): State<App>) -> Response {
    read(&app, |c| c.tools()).await
}

#[derive(Deserialize)]
struct HistoryQuery {
    name: String,
}

/// Runs of one workflow kept for its duration chart.
const HISTORY: usize = 50;

async fn history(State(app): State<App>, Query(q): Query<HistoryQuery>) -> Response {
    read(&app, move |c| ops::history(c.state(), &q.name, HISTORY)).await
}

#[derive(Serialize)]
struct Done {
    message: String,
}

/// An action's answer: what the daemon did, or 409 with why it did not.
async fn act(
    app: &App,
    f: fn(&dyn Control, RunId) -> Result<String, Refused>,
    run: RunId,
) -> Response {
    let control = app.control.clone();
    match tokio::task::spawn_blocking(move || f(&*control, run)).await {
        Ok(Ok(message)) => Json(Done { message }).into_response(),
        Ok(Err(r)) if r.invalid => refuse(StatusCode::CONFLICT, &r.message),
        Ok(Err(r)) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &r.message),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn cancel(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    act(&app, |c, run| c.cancel(run), run).await
}

async fn retry(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    act(&app, |c, run| c.retry(run), run).await
}

async fn release(State(app): State<App>, Path(run): Path<RunId>) -> Response {
    act(&app, |c, run| c.release(run), run).await
}

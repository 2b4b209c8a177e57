//! Live changes for a page, as Server-Sent Events: one stream per tab.
//!
//! A run's page gets the run's new events (`event: events`, a JSON array, `id:` the last
//! one's number), from which it colours its steps; a reconnecting browser sends the last id
//! it saw (`Last-Event-ID`) and gets what it missed. Other pages get `event: change` after
//! commits, and read again what they show. Commits come in bursts (a wide run commits
//! thousands a second), so a stream waits [`COALESCE`] after the first and sends once.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;

use super::App;
use crate::api::ops;
use crate::api::types::EventShown;
use crate::model::RunId;

/// How long a stream gathers commits before it sends: well under the second a page has.
const COALESCE: Duration = Duration::from_millis(100);

#[derive(Deserialize)]
pub(super) struct StreamQuery {
    /// Follow this run's events; without it, any change.
    run: Option<RunId>,
    /// The last event the page has (its first connection; later ones send `Last-Event-ID`).
    #[serde(default)]
    after: u64,
}

pub(super) async fn stream(
    State(app): State<App>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let keep_alive = KeepAlive::new().interval(Duration::from_secs(15));
    match q.run {
        Some(run) => Sse::new(run_events(app, run, resumed.unwrap_or(q.after)))
            .keep_alive(keep_alive)
            .into_response(),
        None => Sse::new(changes(app, resumed))
            .keep_alive(keep_alive)
            .into_response(),
    }
}

/// Where a run's stream is.
struct Following {
    app: App,
    run: RunId,
    after: u64,
    commits: tokio::sync::watch::Receiver<u64>,
    /// Whether the last page read was full: read on without waiting for a commit.
    more: bool,
}

fn run_events(app: App, run: RunId, after: u64) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut commits = app.control.state().subscribe();
    commits.mark_changed();
    let start = Following {
        app,
        run,
        after,
        commits,
        more: false,
    };
    stream::unfold(start, |mut f| async move {
        loop {
            if !f.more && !next_commit(&f.app, &mut f.commits).await {
                return None;
            }
            let (control, run, after) = (f.app.control.clone(), f.run, f.after);
            let page = tokio::task::spawn_blocking(move || {
                control.state().events_page(run, after, ops::EVENTS_PAGE)
            })
            .await;
            let Ok(Ok(page)) = page else {
                // a read that fails now may not later: the page reconnects and asks again
                return None;
            };
            f.more = page.len() == ops::EVENTS_PAGE;
            let Some(last) = page.last().map(|e| e.seq) else {
                continue;
            };
            f.after = last;
            let shown: Vec<EventShown> = page.iter().map(|e| EventShown::new(run, e)).collect();
            let data = serde_json::to_string(&shown).unwrap_or_default();
            let event = Event::default()
                .event("events")
                .id(last.to_string())
                .data(data);
            return Some((Ok(event), f));
        }
    })
}

/// Waits for a commit, then [`COALESCE`] more; `false` when the daemon stops.
async fn next_commit(app: &App, commits: &mut tokio::sync::watch::Receiver<u64>) -> bool {
    tokio::select! {
        changed = commits.changed() => if changed.is_err() { return false },
        _ = app.stop.cancelled() => return false,
    }
    tokio::select! {
        _ = tokio::time::sleep(COALESCE) => {}
        _ = app.stop.cancelled() => return false,
    }
    commits.borrow_and_update();
    true
}

fn changes(app: App, resumed: Option<u64>) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut commits = app.control.state().subscribe();
    // a page that reconnects after commits it did not see reads again at once
    if resumed.is_some_and(|seen| seen != *commits.borrow()) {
        commits.mark_changed();
    }
    stream::unfold((app, commits), |(app, mut commits)| async move {
        if !next_commit(&app, &mut commits).await {
            return None;
        }
        let seen = *commits.borrow();
        // the data is the commit's number: a browser drops an event whose data is empty
        let event = Event::default()
            .event("change")
            .id(seen.to_string())
            .data(seen.to_string());
        Some((Ok(event), (app, commits)))
    })
}

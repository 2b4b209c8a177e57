//! What every request passes before a handler sees it, and what every answer carries.
//!
//! In order: the `Host` must be ours (a DNS-rebinding page names its own domain); a request
//! that is not a GET or HEAD must come from our own origin (`Origin`, or `Sec-Fetch-Site:
//! same-origin` when a browser sends no `Origin`), and one that says it is cross-site is
//! refused whatever else it says; and, but for the login itself and the static files, the
//! session cookie must be live. Every answer forbids framing, sniffing, referrers and any
//! script, style or connection that is not the dashboard's own.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::App;

/// The cookie that carries a session.
pub(super) const COOKIE: &str = "uet_session";

const CSP: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Paths anyone may fetch: the login (it checks its own token) and the page's code, which
/// holds no data.
fn open_path(path: &str) -> bool {
    matches!(path, "/login" | "/app.js" | "/app.css" | "/favicon.svg")
}

pub(super) async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let mut response = match refusal(&app, &request) {
        Some(refused) => refused,
        None => next.run(request).await,
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Why a request is refused, as the answer to send, or `None` to serve it.
fn refusal(app: &App, request: &Request) -> Option<Response> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !app.web.host_allowed(host) {
        return Some(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            &format!("this dashboard does not answer for the host {host:?}"),
        ));
    }
    if request.method() != Method::GET
        && request.method() != Method::HEAD
        && let Err(why) = same_origin(headers, host)
    {
        return Some(refuse(StatusCode::FORBIDDEN, why));
    }
    let path = request.uri().path();
    if !open_path(path) && !cookie(headers).is_some_and(|id| app.web.session(id)) {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "not logged in: run `uet web` on the daemon's machine for a login address",
        ));
    }
    None
}

/// Whether a state-changing request comes from a page of this dashboard.
fn same_origin(headers: &HeaderMap, host: &str) -> Result<(), &'static str> {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin") {
        return Err("refused: the request comes from another site");
    }
    match headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or(""))
    {
        Some(origin) if origin.eq_ignore_ascii_case(&format!("http://{host}")) => Ok(()),
        Some(_) => Err("refused: the request's Origin is not this dashboard"),
        None if site == Some("same-origin") => Ok(()),
        None => Err(
            "refused: a request that changes something must say where it comes from \
                     (Origin or Sec-Fetch-Site)",
        ),
    }
}

/// The session id in the request's cookies, if any.
pub(super) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// A refusal: JSON `{"error": ...}` for the API, text for a person elsewhere.
pub(super) fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

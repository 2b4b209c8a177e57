//! The web dashboard: a face on the facade, served by the daemon when asked (`--http ADDR`).
//! Pages are hand-written HTML, CSS and JS embedded in the binary; their data comes from JSON
//! reads of [`crate::api::ops`] and live changes from one Server-Sent Events stream per tab.
//!
//! Who may look: whoever opens a one-time login address (`uet web`, which only the daemon's
//! owner can ask for over the control socket) gets a session cookie (HttpOnly,
//! SameSite=Strict). Every request must name an allowed `Host` (no DNS rebinding), every POST
//! must come from the dashboard's own origin (no cross-site requests), and nothing a GET does
//! changes anything. See docs/WEB.md.

mod conn;
mod guard;
mod routes;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::api::ops::Control;
use crate::model::RunId;

/// How long a login address works, unused.
const LOGIN_LIFE: Duration = Duration::from_secs(300);

/// How long a session lasts without a request. Sessions live in the daemon's memory: a
/// restart ends them all (`uet web` gives a new address).
const SESSION_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Sessions and login addresses kept at most: a flood of `uet web` calls cannot grow memory.
const MAX_SESSIONS: usize = 1024;

/// Laid-out plans kept: a plan never changes once its run exists, and laying out a
/// 10,000-step plan costs a few ms, so the pages open often are kept.
const LAYOUTS_KEPT: usize = 16;

/// The dashboard's own state: who is logged in, and the layouts drawn lately.
pub struct Web {
    /// Where it listens.
    addr: SocketAddr,
    /// `Host` header values accepted (DNS rebinding sends an attacker's name).
    hosts: Vec<String>,
    /// Any IP literal with our port is accepted too: listening on every address.
    any_ip: bool,
    logins: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<String, Instant>>,
    /// Laid-out plans as the JSON sent: a plan never changes, so neither does its layout.
    layouts: Mutex<VecDeque<(RunId, bytes::Bytes)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 256 random bits, as hex: a login token or a session id.
fn secret() -> String {
    use rand::Rng as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    crate::hex(&bytes)
}

impl Web {
    /// The dashboard of a listener bound at `addr`.
    pub fn new(addr: SocketAddr) -> Web {
        let port = addr.port();
        let mut hosts = vec![format!("localhost:{port}"), host_of(addr.ip(), port)];
        if let Some(name) = hostname() {
            hosts.push(format!("{name}:{port}"));
        }
        Web {
            addr,
            hosts,
            any_ip: addr.ip().is_unspecified(),
            logins: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            layouts: Mutex::new(VecDeque::new()),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A new one-time login address, good for [`LOGIN_LIFE`].
    pub fn login_url(&self) -> String {
        let token = secret();
        let mut logins = lock(&self.logins);
        logins.retain(|_, at| at.elapsed() < LOGIN_LIFE);
        if logins.len() >= MAX_SESSIONS {
            // the oldest goes: whoever asked for it has had minutes to use it
            if let Some(old) = logins
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, _)| t.clone())
            {
                logins.remove(&old);
            }
        }
        logins.insert(token.clone(), Instant::now());
        let host = if self.addr.ip().is_unspecified() || self.addr.ip().is_loopback() {
            format!("localhost:{}", self.addr.port())
        } else {
            host_of(self.addr.ip(), self.addr.port())
        };
        format!("http://{host}/login?token={token}")
    }

    /// Spends a login token: a new session id, or `None` if the token is unknown, used or
    /// stale.
    fn log_in(&self, token: &str) -> Option<String> {
        let minted = lock(&self.logins).remove(token)?;
        if minted.elapsed() >= LOGIN_LIFE {
            return None;
        }
        let id = secret();
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, seen| seen.elapsed() < SESSION_IDLE);
        if sessions.len() >= MAX_SESSIONS
            && let Some(old) = sessions
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(s, _)| s.clone())
        {
            sessions.remove(&old);
        }
        sessions.insert(id.clone(), Instant::now());
        Some(id)
    }

    /// Whether a session id is live, and marks it seen.
    fn session(&self, id: &str) -> bool {
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(id) {
            Some(seen) if seen.elapsed() < SESSION_IDLE => {
                *seen = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Whether a `Host` header names this dashboard.
    fn host_allowed(&self, host: &str) -> bool {
        if self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return true;
        }
        // on every address, any of the machine's IP literals with our port: a rebinding
        // attacker's request names its own domain, never an IP
        self.any_ip
            && host
                .rsplit_once(':')
                .filter(|(_, port)| *port == self.addr.port().to_string())
                .map(|(ip, _)| ip.trim_start_matches('[').trim_end_matches(']'))
                .is_some_and(|ip| ip.parse::<IpAddr>().is_ok())
    }

    fn layout(&self, run: RunId) -> Option<bytes::Bytes> {
        let layouts = lock(&self.layouts);
        layouts
            .iter()
            .find(|(r, _)| *r == run)
            .map(|(_, l)| l.clone())
    }

    fn keep_layout(&self, run: RunId, layout: bytes::Bytes) {
        let mut layouts = lock(&self.layouts);
        layouts.retain(|(r, _)| *r != run);
        if layouts.len() >= LAYOUTS_KEPT {
            layouts.pop_front();
        }
        layouts.push_back((run, layout));
    }
}

fn host_of(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// Binds the dashboard's address: loopback unless `public` says the user means it, since
/// anyone who can reach the port can try to log in.
pub async fn listen(addr: SocketAddr, public: bool) -> anyhow::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() && !public {
        anyhow::bail!(
            "http: {addr} is not a loopback address: the dashboard would be open to the \
             network; add --http-public if that is meant (use 127.0.0.1 or ::1 otherwise)"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("http: cannot listen on {addr}: {e}"))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "the web dashboard listens on {addr}, beyond this machine: anyone who can reach it \
             and holds a login address can cancel and retry runs; it speaks plain HTTP"
        );
    }
    Ok(listener)
}

/// Everything a request handler needs: the facade and the dashboard's own state.
#[derive(Clone)]
struct App {
    control: Arc<dyn Control + Send + Sync>,
    web: Arc<Web>,
    stop: CancellationToken,
}

/// Serves the dashboard on its listener until `stop`.
pub fn spawn(
    control: Arc<dyn Control + Send + Sync>,
    web: Arc<Web>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    let app = App {
        control,
        web,
        stop: stop.clone(),
    };
    let router = routes::router(app);
    tokio::spawn(async move {
        let served = axum::serve(conn::Bounded::new(listener), router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("the web dashboard stopped: {e}");
        }
    });
}

//! `uet daemon`: its config file, and starting it.

use std::path::PathBuf;

use anyhow::{Context, anyhow};

use super::args::exit;
use super::{Failure, default_state_dir};

/// The daemon's config file: the flags' settings, flags winning.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DaemonFile {
    tools: Option<PathBuf>,
    #[serde(default)]
    watch: Vec<PathBuf>,
    #[serde(default)]
    create: bool,
    state: Option<PathBuf>,
    socket: Option<PathBuf>,
    max_runs: Option<usize>,
    #[serde(default, with = "humantime_opt")]
    settle: Option<std::time::Duration>,
    #[serde(default, with = "humantime_opt")]
    grace: Option<std::time::Duration>,
    /// Poll folders at this interval instead of using inotify.
    #[serde(default, with = "humantime_opt")]
    poll: Option<std::time::Duration>,
    /// Serve `GET /metrics` on this loopback address, e.g. "127.0.0.1:9464".
    metrics: Option<std::net::SocketAddr>,
    /// Delete finished runs older than this.
    #[serde(default, with = "humantime_opt")]
    keep_for: Option<std::time::Duration>,
    /// Keep only this many finished runs.
    keep_runs: Option<usize>,
    /// The largest workflow file read from a watched folder ("8MiB").
    max_file: Option<String>,
    /// Serve the web dashboard on this address, e.g. "127.0.0.1:7878".
    http: Option<std::net::SocketAddr>,
    /// Let `http` be an address beyond loopback.
    #[serde(default)]
    http_public: bool,
    /// Join a fleet through these NATS servers.
    #[serde(default)]
    nats: Vec<String>,
    /// This node's name in the fleet.
    node: Option<String>,
    /// How long a dispatch may go without word from its worker ("30s").
    #[serde(default, with = "humantime_opt")]
    fleet_ack_wait: Option<std::time::Duration>,
    /// Attempts run for the fleet at once (default: two per core; 0: none).
    fleet_slots: Option<usize>,
    /// The webhook addresses (prefixes) workflows' `[notify]` may call.
    #[serde(default)]
    webhooks: Vec<String>,
}

/// The fleet's flags.
pub(crate) struct Nats {
    pub(crate) urls: Vec<String>,
    pub(crate) node: Option<String>,
}

/// The dashboard's flags.
pub(crate) struct Http {
    pub(crate) addr: Option<std::net::SocketAddr>,
    pub(crate) public: bool,
}

mod humantime_opt {
    use serde::Deserialize;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The folders to watch, and whether missing ones are made.
pub(crate) struct Folders {
    pub(crate) watch: Vec<PathBuf>,
    pub(crate) create: bool,
}

pub(crate) fn daemon(
    config: Option<PathBuf>,
    tools: Option<PathBuf>,
    Folders { watch, create }: Folders,
    state: Option<PathBuf>,
    socket: Option<PathBuf>,
    http: Http,
    nats: Nats,
) -> Result<u8, Failure> {
    let file: DaemonFile = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
        None => DaemonFile::default(),
    };
    let fleet = fleet_config(nats, &file)?;
    let watch = if watch.is_empty() { file.watch } else { watch };
    if watch.is_empty() {
        return Err(
            anyhow!("nothing to watch: pass --watch DIR (or `watch = [...]` in --config)").into(),
        );
    }
    // a mistyped folder would be watched forever, empty: refused unless creating is asked for
    if !(create || file.create)
        && let Some(missing) = watch.iter().find(|d| !d.exists())
    {
        return Err(anyhow!(
            "cannot watch {}: no such folder (create it, or pass --create)",
            missing.display()
        )
        .into());
    }
    let state = match state.or(file.state) {
        Some(s) => s,
        None => default_state_dir()?,
    };
    let config = uet::daemon::Config {
        state,
        socket: socket
            .or(file.socket)
            .unwrap_or_else(uet::api::protocol::default_socket),
        watch,
        tools: tools.or(file.tools),
        max_runs: file.max_runs.unwrap_or(8),
        // a window of nothing would poll the file as fast as the machine can
        settle: file
            .settle
            .unwrap_or(std::time::Duration::from_millis(200))
            .max(std::time::Duration::from_millis(10)),
        grace: file.grace.unwrap_or(std::time::Duration::from_secs(10)),
        poll: file.poll,
        metrics: file.metrics,
        http: http.addr.or(file.http),
        http_public: http.public || file.http_public,
        fleet,
        keep_for: file.keep_for,
        keep_runs: file.keep_runs,
        max_file: match &file.max_file {
            Some(text) => uet::spec::doc::parse_bytes(text).ok_or_else(|| {
                anyhow!("max_file: bad size {text:?}; write e.g. \"8MiB\" or \"512KiB\"")
            })?,
            None => uet::spec::doc::MAX_FILE,
        },
        webhooks: file.webhooks,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(uet::daemon::serve(config))?;
    Ok(exit::OK)
}

/// The fleet to join: the flags' servers, else the file's; a node's name, else the host's.
fn fleet_config(flags: Nats, file: &DaemonFile) -> anyhow::Result<Option<uet::fleet::Config>> {
    let urls = if flags.urls.is_empty() {
        file.nats.clone()
    } else {
        flags.urls
    };
    if urls.is_empty() {
        return Ok(None);
    }
    let node = match flags.node.or(file.node.clone()) {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    // the name is part of NATS subjects: letters, digits, `-` and `_` only
    if !uet::fleet::plain_name(&node) {
        anyhow::bail!(
            "node: {node:?} cannot name a fleet node: use letters, digits, - and _ (--node NAME)"
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Some(uet::fleet::Config {
        urls,
        node,
        // a second at least: in-progress acks go every third of it
        ack_wait: file
            .fleet_ack_wait
            .unwrap_or(uet::fleet::ACK_WAIT)
            .max(std::time::Duration::from_secs(1)),
        slots: file.fleet_slots.unwrap_or(2 * cores),
    }))
}

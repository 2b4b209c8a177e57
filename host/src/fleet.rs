//! The fleet: daemons that share steps through NATS JetStream (docs/FLEET.md).
//!
//! This room is being built in the order FLEET.md lists. What is here: joining the NATS
//! cluster at start (a server older than 2.11 is refused, plainly), and the streams, consumers'
//! homes and buckets every node shares, made once by whichever node comes first.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

use crate::api::types::FleetShown;

/// The oldest nats-server uet works with: clustered work queues and the per-message
/// duplicate window behave as FLEET.md needs from 2.11 on.
pub const MIN_SERVER: (u64, u64) = (2, 11);

/// How long joining may take at start: the servers must answer, and JetStream must be ready
/// (a cluster elects its leaders in a few seconds after starting).
const JOIN_TIME: Duration = Duration::from_secs(30);

/// The work queue of attempts waiting for a worker.
pub const STEPS: &str = "UET_STEPS";

/// The queue of outcomes on their way to their run's owner.
pub const RESULTS: &str = "UET_RESULTS";

/// How this daemon joins a fleet.
#[derive(Debug, Clone)]
pub struct Config {
    /// The NATS servers (any one is enough to join).
    pub urls: Vec<String>,
    /// This node's name: owners address results to it.
    pub node: String,
}

/// This daemon's membership: its connection and what it made.
pub struct Fleet {
    client: async_nats::Client,
    node: String,
    replicas: usize,
}

impl Fleet {
    /// The fleet as `uet status` shows it.
    pub fn shown(&self) -> FleetShown {
        let info = self.client.server_info();
        FleetShown {
            node: self.node.clone(),
            server: format!("{} ({} {})", info.server_name, "nats-server", info.version),
            connected: self.client.connection_state() == async_nats::connection::State::Connected,
            replicas: self.replicas,
        }
    }
}

/// A server version's major and minor, from `2.11.3` or `v2.12.0-beta`.
pub fn version_of(text: &str) -> Option<(u64, u64)> {
    let mut parts = text.trim().trim_start_matches('v').split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Joins the fleet: connects (waiting up to [`JOIN_TIME`] for a server to answer), refuses a
/// server older than [`MIN_SERVER`], and makes the shared streams if they are not there yet.
pub async fn join(config: &Config) -> anyhow::Result<Fleet> {
    let servers = config.urls.join(",");
    let addrs = config
        .urls
        .iter()
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("nats: {u:?} is not a server address: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let started = Instant::now();
    let client = loop {
        let options = async_nats::ConnectOptions::new()
            .name(format!("uet {}", config.node))
            .event_callback(|event| async move {
                // a lost server is said once per change, and the client reconnects by itself
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("fleet: lost the NATS server; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("fleet: connected to NATS"),
                    other => tracing::debug!("fleet: {other}"),
                }
            });
        match tokio::time::timeout(Duration::from_secs(5), options.connect(addrs.as_slice())).await
        {
            Ok(Ok(client)) => break client,
            Ok(Err(e)) if started.elapsed() < JOIN_TIME => {
                tracing::warn!("fleet: cannot reach NATS at {servers} ({e}); trying again");
            }
            Err(_) if started.elapsed() < JOIN_TIME => {
                tracing::warn!("fleet: NATS at {servers} does not answer; trying again");
            }
            Ok(Err(e)) => anyhow::bail!("nats: cannot reach {servers}: {e}"),
            Err(_) => anyhow::bail!("nats: {servers} did not answer within {JOIN_TIME:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let info = client.server_info();
    match version_of(&info.version) {
        Some(v) if v >= MIN_SERVER => {}
        _ => anyhow::bail!(
            "nats: {} runs nats-server {}; uet needs {}.{} or newer (clustered work queues)",
            info.server_name,
            info.version,
            MIN_SERVER.0,
            MIN_SERVER.1
        ),
    }
    // a server that knows of two others is in a cluster of three or more: keep three copies
    let replicas = if info.connect_urls.len() >= 3 { 3 } else { 1 };
    let js = jetstream::new(client.clone());
    make_streams(&js, replicas, started).await?;
    tracing::info!(
        node = %config.node,
        server = %info.server_name,
        version = %info.version,
        replicas,
        "fleet: joined"
    );
    Ok(Fleet {
        client,
        node: config.node.clone(),
        replicas,
    })
}

/// The streams every node shares, made by the first node to come (the others find them).
/// A cluster that has just started has no JetStream leader for a few seconds: asked again.
async fn make_streams(
    js: &jetstream::Context,
    replicas: usize,
    started: Instant,
) -> anyhow::Result<()> {
    let queue = |name: &str, subjects: &str| stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        // a message is gone once acked: a queue, not a log
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        // a re-publish after a crash, within this window, is dropped by the stream
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    for config in [queue(STEPS, "uet.steps.>"), queue(RESULTS, "uet.results.>")] {
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) => break,
                Err(e) if started.elapsed() < JOIN_TIME => {
                    tracing::debug!("fleet: stream {} not ready: {e}", config.name);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => anyhow::bail!("nats: cannot make the stream {}: {e}", config.name),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_released_and_as_built() {
        assert_eq!(version_of("2.11.3"), Some((2, 11)));
        assert_eq!(version_of("v2.12.0-beta.1"), Some((2, 12)));
        assert_eq!(version_of("2.9"), Some((2, 9)));
        assert!(version_of("2.9.25").unwrap() < MIN_SERVER);
        assert!(version_of("2.15.1").unwrap() >= MIN_SERVER);
        assert!(version_of("3.0.0").unwrap() >= MIN_SERVER);
        assert_eq!(version_of("nightly"), None);
    }
}

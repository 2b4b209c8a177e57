//! The fleet: daemons that share steps through NATS JetStream (docs/FLEET.md).
//!
//! This room is being built in the order FLEET.md lists. What is here: joining the NATS
//! cluster at start (a server older than 2.11 is refused, plainly); the streams every node
//! shares, made once by whichever node comes first; the owner's side of a remote attempt
//! ([`Owner`]: dispatch, results, fencing) and the worker's ([`work`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use crate::adapters::process::Groups;
use crate::adapters::wasm::Runtime;
use crate::api::types::FleetShown;
use crate::engine::breaker::Breakers;
use crate::engine::{Back, Dispatch, Ended, Landing, Notes, Recorded, Remote};
use crate::model::{BreakerPhase, BreakerRecord, Outcome};
use crate::spec::tools::{Tool, ToolKind};

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

/// The object store plugins travel through, each under its sha256.
pub const PLUGINS: &str = "uet_plugins";

/// The subject an owner tells workers on to stop an attempt (plain NATS: whoever runs it
/// now hears it; the dispatch itself leaves the queue by its sequence).
const CANCEL: &str = "uet.cancel";

/// The key-value bucket of fleet tools' breakers, each under its tool's name and content.
pub const BREAKERS: &str = "uet_breakers";

/// The object store of dispatches and outcomes too large for a message.
pub const BLOBS: &str = "uet_blobs";

/// A dispatch or outcome larger than this travels through [`BLOBS`]; its message carries
/// only the blob's name, in this header. NATS refuses messages over 1 MiB by default.
const INLINE_MAX: usize = 512 << 10;
const BLOB_HEADER: &str = "Uet-Blob";

/// The largest blob a node reads: outputs are at most 8 MiB, and an input is made of a few.
const BLOB_MAX: usize = 64 << 20;

/// Where large messages go, and come from.
#[derive(Clone)]
struct Blobs(jetstream::object_store::ObjectStore);

/// Why a blob could not be read: gone for good (its attempt ended and its owner dropped it),
/// or not now.
enum Unpacked {
    Gone(String),
    NotNow(String),
}

impl Blobs {
    /// The payload to publish: the body itself, or, when it is large, nothing but the name of
    /// the blob now holding it (in the headers).
    async fn pack(
        &self,
        name: &str,
        body: &bytes::Bytes,
        headers: &mut async_nats::HeaderMap,
    ) -> Result<bytes::Bytes, String> {
        if body.len() <= INLINE_MAX {
            return Ok(body.clone());
        }
        self.0
            .put(name, &mut body.as_ref())
            .await
            .map_err(|e| format!("cannot store a blob of {} bytes ({e})", body.len()))?;
        headers.insert(BLOB_HEADER, name);
        Ok(bytes::Bytes::new())
    }

    /// Publishes `body` once under the message id `id` (through the blob `blob` when it is
    /// large) and waits for JetStream's ack; the caller decides whether to try again.
    async fn publish(
        &self,
        js: &jetstream::Context,
        subject: &str,
        id: &str,
        blob: &str,
        body: &bytes::Bytes,
    ) -> Result<jetstream::publish::PublishAck, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let payload = self.pack(blob, body, &mut headers).await?;
        js.publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    }

    /// A message's body, from the blob it names if it names one.
    async fn unpack(&self, message: &async_nats::Message) -> Result<bytes::Bytes, Unpacked> {
        let Some(name) = blob_of(message) else {
            return Ok(message.payload.clone());
        };
        let mut object = match self.0.get(&name).await {
            Ok(o) => o,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Err(Unpacked::Gone(format!("blob {name} is gone")));
            }
            Err(e) => return Err(Unpacked::NotNow(format!("cannot read blob {name}: {e}"))),
        };
        if object.info().size > BLOB_MAX {
            return Err(Unpacked::Gone(format!(
                "blob {name} holds {} bytes, over the {BLOB_MAX} a node reads",
                object.info().size
            )));
        }
        let mut body = Vec::with_capacity(object.info().size);
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut body)
            .await
            .map_err(|e| Unpacked::NotNow(format!("cannot read blob {name}: {e}")))?;
        Ok(body.into())
    }

    /// Drops a blob whose message is done with (the bucket's age limit takes any missed).
    async fn drop_blob(&self, name: &str) {
        if let Err(e) = self.0.delete(name).await {
            tracing::debug!("fleet: cannot drop blob {name}: {e}");
        }
    }
}

/// The blob a message names, if any.
fn blob_of(message: &async_nats::Message) -> Option<String> {
    let header = message.headers.as_ref()?.get(BLOB_HEADER)?;
    Some(header.as_str().to_string())
}

/// How this daemon joins a fleet.
#[derive(Debug, Clone)]
pub struct Config {
    /// The NATS servers (any one is enough to join).
    pub urls: Vec<String>,
    /// This node's name: owners address results to it.
    pub node: String,
    /// How long a dispatch may go without word from its worker before another gets it (set
    /// by the first node to make a tool's queue; 30 s unless the config says otherwise).
    pub ack_wait: Duration,
    /// Attempts this node runs for the fleet at once; 0: it only sends its own.
    pub slots: usize,
}

/// The default [`Config::ack_wait`].
pub const ACK_WAIT: Duration = Duration::from_secs(30);

/// This daemon's membership: its connection and what it made.
pub struct Fleet {
    client: async_nats::Client,
    breakers: jetstream::kv::Store,
    node: String,
    replicas: usize,
    owner: Arc<Owner>,
    ack_wait: Duration,
    slots: usize,
}

impl Fleet {
    /// Where this node's runs send their fleet tools' attempts.
    pub fn remote(&self) -> Arc<dyn Remote> {
        Arc::new(Dispatcher(self.owner.clone()))
    }

    /// The fleet as `uet status` shows it.
    pub fn shown(&self) -> FleetShown {
        let info = self.client.server_info();
        FleetShown {
            node: self.node.clone(),
            server: format!("{} ({} {})", info.server_name, "nats-server", info.version),
            connected: self.client.connection_state() == async_nats::connection::State::Connected,
            replicas: self.replicas,
            waiting: lock(&self.owner.waiting).clone(),
        }
    }
}

/// A fleet tool's breaker as the fleet keeps it: its record, and the node that wrote it.
#[derive(Serialize, Deserialize)]
struct SharedBreaker {
    node: String,
    record: BreakerRecord,
}

/// Whether a breaker record says more than the one the fleet holds: an opening later than the
/// fleet's, or the closing of the very opening the fleet holds (a probe that succeeded). A
/// closing of an older opening says nothing: another node opened it again since.
fn says_more(ours: &BreakerRecord, held: Option<&BreakerRecord>) -> bool {
    let Some(held) = held else {
        return true;
    };
    match (ours.phase, held.phase) {
        (BreakerPhase::Open, BreakerPhase::Open) => ours.opened_at > held.opened_at,
        (BreakerPhase::Open, _) => true,
        (BreakerPhase::Closed, BreakerPhase::Open) => ours.opened_at >= held.opened_at,
        _ => false,
    }
}

impl Fleet {
    /// Shares the breakers of this node's fleet tools that have one: an opening or closing
    /// here is written to the fleet's bucket by compare-and-set, and one written by another
    /// node is taken here, so a tool failing on one node holds every owner's steps.
    pub async fn share_breakers(&self, breakers: Arc<Breakers>, tools: &[Tool]) {
        let mut keys = HashMap::new();
        for tool in tools.iter().filter(|t| t.fleet && t.breaker.is_some()) {
            let ToolKind::Wasm { path } = &tool.kind else {
                continue;
            };
            if let Ok(hash) = self.owner.content_of(tool, path) {
                keys.insert(tool.key.clone(), format!("{}.{}", &hash[..16], tool.name));
            }
        }
        if keys.is_empty() {
            return;
        }
        let names: HashMap<String, String> =
            keys.iter().map(|(n, k)| (k.clone(), n.clone())).collect();
        let (kv, node) = (self.breakers.clone(), self.node.clone());
        let mut news = breakers.news();
        tokio::spawn(async move {
            loop {
                match news.recv().await {
                    Ok((tool, record)) => {
                        if let Some(key) = keys.get(&tool) {
                            write_breaker(&kv, key, &node, record).await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let (kv, node) = (self.breakers.clone(), self.node.clone());
        tokio::spawn(async move {
            loop {
                // the latest of each key first, then every change
                let mut watch = match kv.watch_with_history(">").await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::debug!("fleet: cannot watch breakers: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(Ok(entry)) = watch.next().await {
                    let Some(tool) = names.get(&entry.key) else {
                        continue;
                    };
                    let Ok(shared) = serde_json::from_slice::<SharedBreaker>(&entry.value) else {
                        continue;
                    };
                    if shared.node != node && breakers.adopt(tool, &shared.record) {
                        tracing::info!(%tool, by = %shared.node, "fleet: breaker {} by another node", shared.record.phase.as_str());
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

/// Writes a breaker's opening or closing to the fleet's bucket, unless the fleet knows as much
/// already; another node's write in between makes it read again and decide again.
async fn write_breaker(kv: &jetstream::kv::Store, key: &str, node: &str, record: BreakerRecord) {
    let value: bytes::Bytes = serde_json::to_vec(&SharedBreaker {
        node: node.to_string(),
        record: record.clone(),
    })
    .unwrap_or_default()
    .into();
    for _ in 0..10 {
        let (held, revision) = match kv.entry(key).await {
            Ok(Some(e)) if e.operation == jetstream::kv::Operation::Put => (
                serde_json::from_slice::<SharedBreaker>(&e.value).ok(),
                Some(e.revision),
            ),
            Ok(_) => (None, None),
            Err(e) => {
                tracing::warn!("fleet: cannot read breaker {key}: {e}");
                return;
            }
        };
        if !says_more(&record, held.as_ref().map(|h| &h.record)) {
            return;
        }
        let written = match revision {
            Some(r) => kv.update(key, value.clone(), r).await.is_ok(),
            None => kv.create(key, value.clone()).await.is_ok(),
        };
        if written {
            return;
        }
    }
    tracing::warn!("fleet: breaker {key} kept changing; not written");
}

/// Whether a node's name can be a subject's token: letters, digits, `-` and `_`.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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
    let plugins = object_store(
        &js,
        PLUGINS,
        "uet plugins, each under its sha256",
        replicas,
        None,
    )
    .await?;
    let blobs = object_store(
        &js,
        BLOBS,
        "uet dispatches and outcomes too large for a message",
        replicas,
        Some(BLOB_AGE),
    )
    .await?;
    let breakers = match js.get_key_value(BREAKERS).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: BREAKERS.into(),
                description: "uet fleet tools' circuit breakers".into(),
                history: 1,
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("nats: cannot make the bucket {BREAKERS}: {e}"))?,
    };
    let owner = Arc::new(Owner {
        steps: js.get_stream(STEPS).await?,
        js: js.clone(),
        plugins,
        blobs: Blobs(blobs),
        shared: Mutex::new(std::collections::HashSet::new()),
        node: config.node.clone(),
        pending: Mutex::new(HashMap::new()),
        waiting: Mutex::new(None),
        die_before_ack: std::env::var("UET_FAULT").is_ok_and(|f| f == FAULT_BEFORE_ACK),
    });
    let results = results_consumer(&js, &config.node, config.ack_wait).await?;
    tokio::spawn(owner.clone().take_results(results));
    tracing::info!(
        node = %config.node,
        server = %info.server_name,
        version = %info.version,
        replicas,
        "fleet: joined"
    );
    Ok(Fleet {
        client,
        breakers,
        node: config.node.clone(),
        replicas,
        owner,
        ack_wait: config.ack_wait,
        slots: config.slots,
    })
}

/// A dispatch on the wire: the attempt, who owns it, and its id (also its `Nats-Msg-Id`).
#[derive(Serialize, Deserialize)]
struct Sent {
    owner: String,
    id: String,
    attempt: Dispatch,
}

/// An outcome on the wire, to its owner.
#[derive(Serialize, Deserialize)]
struct Returned {
    id: String,
    node: String,
    /// How many times NATS had handed the dispatch out (more than once: a worker died or
    /// went silent past the ack wait).
    #[serde(default)]
    delivered: i64,
    ended: Ended,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The subject of a tool's work: its name (a `.` would split the subject, and `~` is never
/// in a tool's name) and the first 16 hex digits of its plugin's sha256.
fn work_subject(tool: &str, sha256: &str) -> String {
    format!(
        "uet.steps.{}.{}",
        tool.replace('.', "~"),
        &sha256[..16.min(sha256.len())]
    )
}

/// A fault the tests inject (`UET_FAULT=fleet-owner-before-ack`): the owner kills itself
/// (SIGKILL) after recording a remote outcome and before taking it off its queue, the one
/// instant a test cannot hit from outside.
const FAULT_BEFORE_ACK: &str = "fleet-owner-before-ack";

/// The owner's side: attempts sent and not yet back, by id. An outcome whose id is not here
/// (a duplicate, a late one, one from before a restart) is fenced: logged and dropped.
pub struct Owner {
    js: jetstream::Context,
    /// The queue of dispatches, to take back one no longer wanted.
    steps: jetstream::stream::Stream,
    /// Where plugins travel by hash, and the hashes this node knows are there.
    plugins: jetstream::object_store::ObjectStore,
    shared: Mutex<std::collections::HashSet<String>>,
    blobs: Blobs,
    node: String,
    pending: Mutex<HashMap<String, oneshot::Sender<(Returned, Recorded)>>>,
    /// Why JetStream is not answering, while it is not (shown by `uet status`).
    waiting: Mutex<Option<String>>,
    die_before_ack: bool,
}

impl Owner {
    /// The content of a fleet tool's plugin: the file's sha256, or the pinned one of a plugin
    /// that comes from the fleet; a file that no longer matches its pin is refused.
    fn content_of(&self, tool: &Tool, path: &Path) -> Result<String, String> {
        if tool.from_fleet
            && let Some(pinned) = &tool.sha256
            && !path.exists()
        {
            return Ok(pinned.clone());
        }
        let hash = crate::adapters::wasm::sha256_file(path)
            .map_err(|e| format!("cannot read the plugin {}: {e}", path.display()))?;
        match &tool.sha256 {
            Some(pinned) if *pinned != hash => Err(format!(
                "the plugin {} has sha256 {hash}, and its entry pins {pinned}",
                path.display()
            )),
            _ => Ok(hash),
        }
    }

    /// Puts a plugin in the fleet's store under its hash, unless it is there already: nodes
    /// that name it only by hash take it from there.
    async fn share(&self, path: &Path, hash: &str) {
        if lock(&self.shared).contains(hash) {
            return;
        }
        let there = match self.plugins.info(hash).await {
            Ok(_) => true,
            Err(e) if e.kind() == jetstream::object_store::InfoErrorKind::NotFound => false,
            Err(e) => {
                tracing::debug!("fleet: cannot ask for plugin {hash}: {e}");
                return;
            }
        };
        if !there {
            let Ok(bytes) = tokio::fs::read(path).await else {
                return;
            };
            // the bytes read now must still be the content the subject names
            if crate::adapters::wasm::sha256_bytes(&bytes) != hash {
                return;
            }
            match self.plugins.put(hash, &mut bytes.as_slice()).await {
                Ok(_) => tracing::info!(%hash, plugin = %path.display(), "fleet: shared a plugin"),
                Err(e) => {
                    tracing::warn!("fleet: cannot share plugin {}: {e}", path.display());
                    return;
                }
            }
        }
        lock(&self.shared).insert(hash.to_string());
    }

    /// Sends one attempt and waits for its outcome, its deadline or its cancel.
    async fn send_and_wait(
        self: Arc<Self>,
        tool: Tool,
        path: PathBuf,
        attempt: Dispatch,
        notes: Notes,
        cancel: CancellationToken,
    ) -> Back {
        let hash = match self.content_of(&tool, &path) {
            Ok(h) => h,
            Err(e) => return home(not_run(e)),
        };
        if path.exists() {
            self.share(&path, &hash).await;
        }
        let subject = work_subject(&attempt.tool, &hash);
        let id = format!(
            "{}/{}/{}/{}/{:016x}",
            self.node,
            attempt.run,
            attempt.step,
            attempt.number,
            rand::random::<u64>()
        );
        let timeout = attempt.timeout_ms.map(Duration::from_millis);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let sent = Sent {
            owner: self.node.clone(),
            id: id.clone(),
            attempt,
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id.clone(), tx);
        let body: bytes::Bytes = serde_json::to_vec(&sent).unwrap_or_default().into();
        let blob = format!("{id}/in");
        // JetStream not answering (a lost server, no majority up) is waited out, not failed:
        // the same message id makes a publish that did land before its ack was lost count once
        let publish = async {
            let mut pause = Duration::from_millis(100);
            loop {
                let published = self.blobs.publish(&self.js, &subject, &id, &blob, &body);
                match published.await {
                    Ok(ack) => {
                        self.untroubled();
                        return ack.sequence;
                    }
                    Err(e) => self.troubled(format!("cannot send attempts ({e})")),
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        };
        let queued_as = tokio::select! {
            seq = publish => Some(seq),
            _ = sleep_until(deadline) => None,
            _ = cancel.cancelled() => None,
        };
        let sent_off = queued_as.is_some();
        if sent_off {
            notes(format!(
                "attempt {} sent on {subject} as {id}",
                sent.attempt.number
            ));
        }
        let ended = tokio::select! {
            back = rx, if sent_off => back.ok(),
            _ = sleep_until(deadline) => None,
            _ = cancel.cancelled() => None,
        };
        lock(&self.pending).remove(&id);
        if ended.is_none()
            && let Some(seq) = queued_as
        {
            self.call_off(&id, seq).await;
        }
        if body.len() > INLINE_MAX {
            // the attempt is over: a copy of its dispatch still queued finds nothing, and goes
            self.blobs.drop_blob(&blob).await;
        }
        match ended {
            Some((r, recorded)) => Back {
                node: Some(if r.delivered > 1 {
                    format!("{} (delivery {})", r.node, r.delivered)
                } else {
                    r.node
                }),
                ended: r.ended,
                recorded: Some(recorded),
            },
            None if cancel.is_cancelled() => home(ended_as(Outcome::Canceled, "canceled".into())),
            None => home(ended_as(
                Outcome::TimedOut,
                format!(
                    "no outcome from the fleet within {:?}",
                    timeout.unwrap_or_default()
                ),
            )),
        }
    }

    /// An attempt canceled or past its deadline here: its dispatch leaves the queue if no
    /// worker took it yet, and the worker running it is told to stop (best effort: one that
    /// misses it finishes, and its outcome is fenced).
    async fn call_off(&self, id: &str, seq: u64) {
        if let Err(e) = self.steps.delete_message(seq).await {
            tracing::debug!(%id, "fleet: dispatch not deleted ({e})");
        }
        let client = self.js.client();
        if let Err(e) = client.publish(CANCEL, id.to_string().into()).await {
            tracing::debug!(%id, "fleet: cannot call off ({e})");
        }
    }

    /// JetStream did not answer: said once per spell in the log, and kept for `uet status`.
    fn troubled(&self, why: String) {
        let mut waiting = lock(&self.waiting);
        if waiting.is_none() {
            tracing::warn!("fleet: JetStream does not answer: {why}; waiting for it");
        }
        *waiting = Some(format!("JetStream does not answer: {why}"));
    }

    fn untroubled(&self) {
        if lock(&self.waiting).take().is_some() {
            tracing::info!("fleet: JetStream answers again");
        }
    }

    /// Called once the engine recorded an outcome: it leaves the owner's queue only now.
    fn take_off(self: &Arc<Self>, message: jetstream::Message) -> Recorded {
        let die = self.die_before_ack;
        let runtime = tokio::runtime::Handle::current();
        let blobs = self.blobs.clone();
        Box::new(move || {
            if die {
                // SAFETY: kill and getpid have no preconditions; this is the test's kill -9
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            runtime.spawn(done_with(blobs, message));
        })
    }

    /// Takes this node's results for as long as the connection lives: hands each to the
    /// attempt waiting for it, or fences it.
    async fn take_results(self: Arc<Self>, results: consumer::PullConsumer) {
        loop {
            let mut messages = match results.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("fleet: cannot read results: {e}; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(message) = messages.next().await {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        self.troubled(format!("cannot read results ({e})"));
                        break;
                    }
                };
                self.untroubled();
                let payload = match self.blobs.unpack(&message).await {
                    Ok(p) => p,
                    Err(Unpacked::NotNow(e)) => {
                        tracing::warn!("fleet: {e}; trying again");
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        continue;
                    }
                    Err(Unpacked::Gone(e)) => {
                        tracing::warn!("fleet: dropped a result: {e}");
                        let _ = message.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                let returned = match serde_json::from_slice::<Returned>(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("fleet: dropped a result that cannot be read: {e}");
                        let _ = message.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                let waiting = lock(&self.pending).remove(&returned.id);
                let Some(waiting) = waiting else {
                    tracing::info!(id = %returned.id, node = %returned.node, "fleet: fenced an outcome no attempt waits for");
                    done_with(self.blobs.clone(), message).await;
                    continue;
                };
                // acked once the engine has recorded it; if the attempt stopped waiting in
                // the meantime, it is fenced here and now
                let recorded = self.take_off(message.clone());
                if let Err((r, recorded)) = waiting.send((returned, recorded)) {
                    tracing::info!(id = %r.id, node = %r.node, "fleet: fenced an outcome that came as its attempt ended");
                    recorded();
                }
            }
        }
    }
}

/// Takes an outcome off the owner's queue, and drops the blob that held it, if one did.
async fn done_with(blobs: Blobs, message: jetstream::Message) {
    if message.ack().await.is_ok()
        && let Some(name) = blob_of(&message)
    {
        blobs.drop_blob(&name).await;
    }
}

/// The engine's door to the owner.
struct Dispatcher(Arc<Owner>);

impl Remote for Dispatcher {
    fn dispatch(
        &self,
        tool: &Tool,
        attempt: Dispatch,
        notes: Notes,
        cancel: CancellationToken,
    ) -> Landing {
        let ToolKind::Wasm { path } = &tool.kind else {
            let name = tool.name.clone();
            return Box::pin(async move {
                home(not_run(format!(
                    "tool `{name}` is not a plugin and cannot travel"
                )))
            });
        };
        Box::pin(
            self.0
                .clone()
                .send_and_wait(tool.clone(), path.clone(), attempt, notes, cancel),
        )
    }
}

fn ended_as(outcome: Outcome, error: String) -> Ended {
    Ended {
        outcome,
        output: None,
        error: Some(error),
        retryable: true,
        input_fault: false,
        stdout: String::new(),
        stderr: String::new(),
    }
}

fn not_run(error: String) -> Ended {
    ended_as(Outcome::Error, error)
}

/// An end that never went out, or never came back: nothing to take off a queue.
fn home(ended: Ended) -> Back {
    Back {
        ended,
        node: None,
        recorded: None,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn results_consumer(
    js: &jetstream::Context,
    node: &str,
    ack_wait: Duration,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js.get_stream(RESULTS).await?;
    let name = format!("results-{node}");
    Ok(stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: format!("uet.results.{node}"),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            },
        )
        .await?)
}

/// What a worker needs to run others' attempts of one tool.
pub struct Work {
    /// The tool, from this node's tools file.
    pub tool: Tool,
    /// The folder its attempts run in (its tools file's).
    pub workstream: PathBuf,
}

/// Works for the fleet: for each tool, takes dispatches as slots free up, runs them here,
/// says so while they run, sends each outcome home and only then takes the dispatch off the
/// queue. Returns at once; the work goes on until `stop`.
pub async fn work(
    fleet: &Fleet,
    tools: Vec<Work>,
    wasm: Arc<Runtime>,
    groups: Arc<Groups>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    if fleet.slots == 0 {
        tracing::info!("fleet: this node sends its attempts and runs none of others'");
        return Ok(());
    }
    let slots = Arc::new(Semaphore::new(fleet.slots));
    let running: Running = Arc::new(Mutex::new(HashMap::new()));
    let mut calls = fleet.client.subscribe(CANCEL).await?;
    let called = running.clone();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let call = tokio::select! {
                c = calls.next() => c,
                _ = stopped.cancelled() => return,
            };
            let Some(call) = call else { return };
            let id = String::from_utf8_lossy(&call.payload);
            if let Some(token) = lock(&called).get(id.as_ref()) {
                tracing::info!(%id, "fleet: its owner called the attempt off");
                token.cancel();
            }
        }
    });
    for w in tools {
        let ToolKind::Wasm { path } = &w.tool.kind else {
            continue;
        };
        let hash = match fleet.owner.content_of(&w.tool, path) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(tool = %w.tool.name, "fleet: not working on it: {e}");
                continue;
            }
        };
        let subject = work_subject(&w.tool.name, &hash);
        let name = subject.replace(['.', '~'], "-");
        let stream = fleet.owner.js.get_stream(STEPS).await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subject.clone(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: fleet.ack_wait,
                    ..Default::default()
                },
            )
            .await?;
        tracing::info!(tool = %w.tool.name, %subject, "fleet: working");
        let job = Job {
            js: fleet.owner.js.clone(),
            node: fleet.node.clone(),
            tool: Arc::new(w.tool),
            workstream: w.workstream,
            wasm: wasm.clone(),
            groups: groups.clone(),
            ack_wait: fleet.ack_wait,
            sha256: hash,
            plugins: fleet.owner.plugins.clone(),
            blobs: fleet.owner.blobs.clone(),
            running: running.clone(),
            fetching: Arc::new(tokio::sync::Mutex::new(())),
        };
        tokio::spawn(take_work(consumer, job, slots.clone(), stop.clone()));
    }
    Ok(())
}

/// One tool's work, shared by its attempts.
#[derive(Clone)]
struct Job {
    js: jetstream::Context,
    node: String,
    tool: Arc<Tool>,
    workstream: PathBuf,
    wasm: Arc<Runtime>,
    groups: Arc<Groups>,
    /// The queue's ack wait: the worker says it is still at it every third of it.
    ack_wait: Duration,
    /// The plugin's content, and where to fetch it from when this node has no copy yet.
    sha256: String,
    plugins: jetstream::object_store::ObjectStore,
    blobs: Blobs,
    /// The attempts this node runs now, by id: an owner may call one off.
    running: Running,
    fetching: Arc<tokio::sync::Mutex<()>>,
}

type Running = Arc<Mutex<HashMap<String, CancellationToken>>>;

impl Job {
    /// Makes sure this node has the plugin: one that comes from the fleet is fetched by its
    /// hash the first time it is needed, checked, and kept in the cache.
    async fn plugin_here(&self) -> Result<(), String> {
        let ToolKind::Wasm { path } = &self.tool.kind else {
            return Ok(());
        };
        if !self.tool.from_fleet || path.exists() {
            return Ok(());
        }
        let _one_at_a_time = self.fetching.lock().await;
        if path.exists() {
            return Ok(());
        }
        let mut object = self
            .plugins
            .get(&self.sha256)
            .await
            .map_err(|e| format!("cannot fetch plugin {} from the fleet: {e}", self.sha256))?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
            .await
            .map_err(|e| format!("cannot fetch plugin {} from the fleet: {e}", self.sha256))?;
        // whoever put it there, only the content the tool's entry pins is kept
        let got = crate::adapters::wasm::sha256_bytes(&bytes);
        if got != self.sha256 {
            return Err(format!(
                "the fleet's plugin {} has sha256 {got}: not kept",
                self.sha256
            ));
        }
        keep_private(path, &bytes)
            .map_err(|e| format!("cannot keep plugin {}: {e}", path.display()))?;
        tracing::info!(tool = %self.tool.name, hash = %self.sha256, "fleet: fetched a plugin");
        Ok(())
    }
}

/// Writes a file whole (a temporary beside it, renamed), readable by this user alone, in a
/// folder of its own.
fn keep_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{}.tmp", rand::random::<u64>()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn take_work(
    consumer: consumer::PullConsumer,
    job: Job,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        // as many as there are free slots, never more: the rest wait for another node
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => return,
        };
        let mut places = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            places.push(p);
        }
        let batch = consumer
            .fetch()
            .max_messages(places.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!("fleet: cannot fetch work: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(message) = batch.next().await {
            let Ok(message) = message else { break };
            let Some(place) = places.pop() else { break };
            let job = job.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                do_one(job, message, stop).await;
                drop(place);
            });
        }
    }
}

/// Runs one dispatch here: in-progress acks while it runs, the outcome published and its
/// publish acknowledged, then the dispatch acked. Dies before that ack, and it runs again.
async fn do_one(job: Job, message: jetstream::Message, stop: CancellationToken) {
    let payload = match job.blobs.unpack(&message).await {
        Ok(p) => p,
        Err(Unpacked::NotNow(e)) => {
            tracing::warn!("fleet: {e}; trying again");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
        Err(Unpacked::Gone(e)) => {
            // its attempt is over: nothing to run
            tracing::info!("fleet: dropped a dispatch: {e}");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let sent: Sent = match serde_json::from_slice::<Sent>(&payload) {
        // the owner's name becomes a subject: a plain name or nothing
        Ok(s) if plain_name(&s.owner) => s,
        Ok(s) => {
            tracing::warn!(owner = %s.owner, "fleet: dropped a dispatch from an owner that cannot be named");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
        Err(e) => {
            tracing::warn!("fleet: dropped a dispatch that cannot be read: {e}");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    if let Err(e) = job.plugin_here().await {
        // another node may have it, or the store may answer later
        tracing::warn!(tool = %job.tool.name, "fleet: {e}");
        let _ = message
            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
        return;
    }
    let called_off = stop.child_token();
    lock(&job.running).insert(sent.id.clone(), called_off.clone());
    let run = crate::engine::run_here(
        &job.tool,
        &sent.attempt,
        job.wasm.clone(),
        job.groups.clone(),
        &job.workstream,
        called_off,
    );
    tokio::pin!(run);
    let ended = loop {
        tokio::select! {
            ended = &mut run => break ended,
            _ = tokio::time::sleep(job.ack_wait / 3) => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    };
    lock(&job.running).remove(&sent.id);
    if stop.is_cancelled() {
        // stopped mid-attempt: let another node have it now rather than after the ack wait
        let _ = message.ack_with(AckKind::Nak(None)).await;
        return;
    }
    let delivered = message.info().map_or(1, |i| i.delivered);
    let back = Returned {
        id: sent.id.clone(),
        node: job.node.clone(),
        delivered,
        ended,
    };
    // one id per copy: a worker's own re-publish is dropped by the stream, while another
    // worker's copy of a redelivered dispatch reaches the owner, which fences it
    let copy = format!("{}/end/{}/{delivered}", sent.id, job.node);
    let body: bytes::Bytes = serde_json::to_vec(&back).unwrap_or_default().into();
    let subject = format!("uet.results.{}", sent.owner);
    // JetStream not answering is waited out: the outcome is kept and sent when it answers
    // (saying, while it can, that the dispatch is still in hand); stopped first, the dispatch
    // is not acked and NATS hands it out again
    let mut pause = Duration::from_millis(100);
    let mut said = false;
    loop {
        let published = job.blobs.publish(&job.js, &subject, &copy, &copy, &body);
        match published.await {
            Ok(_) => break,
            Err(e) if !said => {
                tracing::warn!(id = %sent.id, "fleet: cannot send an outcome home ({e}); trying again");
                said = true;
            }
            Err(_) => {}
        }
        let _ = message.ack_with(AckKind::Progress).await;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
    if said {
        tracing::info!(id = %sent.id, "fleet: sent the outcome home");
    }
    let _ = message.double_ack().await;
}

/// How long a blob is kept at most: its owner drops it once its attempt ended, and this takes
/// any an owner missed (it died, and came back under another name).
const BLOB_AGE: Duration = Duration::from_secs(24 * 3600);

/// An object store every node shares, made by the first node to come.
async fn object_store(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
    max_age: Option<Duration>,
) -> anyhow::Result<jetstream::object_store::ObjectStore> {
    if let Ok(store) = js.get_object_store(bucket).await {
        return Ok(store);
    }
    js.create_object_store(jetstream::object_store::Config {
        bucket: bucket.into(),
        description: Some(description.into()),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: max_age.unwrap_or_default(),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("nats: cannot make the object store {bucket}: {e}"))
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

    #[test]
    fn a_breaker_is_written_only_when_it_says_more_than_the_fleet_knows() {
        let open = |at| BreakerRecord {
            phase: BreakerPhase::Open,
            failures: 3,
            opened_at: Some(at),
            probe_at: Some(at + 1000),
        };
        let closed = |at| BreakerRecord {
            phase: BreakerPhase::Closed,
            failures: 0,
            opened_at: Some(at),
            probe_at: None,
        };
        assert!(says_more(&open(5), None));
        assert!(says_more(&open(6), Some(&open(5))));
        assert!(!says_more(&open(5), Some(&open(6))), "an older opening");
        assert!(says_more(&open(5), Some(&closed(4))));
        // a probe's success closes the opening it knew, not a later one
        assert!(says_more(&closed(5), Some(&open(5))));
        assert!(!says_more(&closed(5), Some(&open(6))));
        assert!(!says_more(&closed(5), Some(&closed(5))));
    }
}

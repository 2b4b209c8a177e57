//! The WASM plugin runtime: components compiled once and cached on disk, linked once, and run
//! in a fresh sandboxed store per attempt.
//!
//! Nothing outside this module touches wasmtime's or the bindings' types: attempts go in as a
//! JSON string with grants and limits, and come out as a [`WasmResult`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, Trap, UpdateDeadline,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

use bindings::uet::plugin::host::Level;

/// Memory a plugin may use when its tool entry does not say: plenty for text and JSON work,
/// and small enough that a memory bomb is stopped long before it troubles the machine.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// Bytes of a plugin's linear memory kept resident (and wiped with memset) when its pool slot is
/// freed: a typical small plugin's whole working set (a Rust component touches well under a
/// MiB for small inputs), while a plugin that grew large still returns its memory.
const KEEP_RESIDENT: usize = 2 << 20;

/// Freed slots whose memory goes back to the kernel in one batch.
const DECOMMIT_BATCH: usize = 8;

/// How often the epoch advances while plugins run: the resolution of timeouts and cancels.
const TICK: Duration = Duration::from_millis(10);

/// How much of a plugin's stdout and stderr is kept; the rest is counted and dropped.
const OUTPUT_LIMIT: usize = 64 << 10;

/// Log lines and progress reports kept per attempt: enough to follow a plugin, not enough to
/// let a chatty one flood the event log.
const REPORT_LIMIT: usize = 1000;

/// How many component instances may be alive at once: one per concurrent plugin attempt.
const POOL_INSTANCES: u32 = 64;

/// Where compiled plugins are cached: `$UET_CACHE_DIR`, else `cache/` in the state folder.
pub fn cache_dir(state: &Path) -> PathBuf {
    std::env::var_os("UET_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| state.join("cache"))
}

// Kept with the tools file, which holds it once asked and builds without the WASM runtime.
pub use crate::spec::tools::Description;

/// Something a plugin reported while it ran.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginReport {
    /// A log line.
    Log {
        /// `trace`, `debug`, `info`, `warn` or `error`.
        level: &'static str,
        /// The line.
        message: String,
    },
    /// How far it has got.
    Progress {
        /// From 0.0 to 1.0.
        fraction: f32,
        /// What it is doing.
        message: String,
    },
}

/// Where a plugin may read and write, relative to the workstream.
#[derive(Debug, Clone)]
pub struct Grants {
    /// The workstream folder.
    pub workstream: PathBuf,
    /// Folders it may read.
    pub read: Vec<String>,
    /// Folders it may read and write (created if missing).
    pub write: Vec<String>,
    /// The only content the plugin may have (its tool's `sha256`), checked on the very bytes
    /// compiled: a file swapped after its tools file's check still does not run.
    pub pinned: Option<String>,
    /// Whether the plugin's file is first checked to still hold what this process loaded from
    /// it (a stat, 1.3 µs here, against some 11 µs for a small attempt): the engine asks it of
    /// a run's first attempt with each plugin, so that a plugin replaced at its path is used
    /// from the next run on, and the attempts after it trust that.
    pub check_file: bool,
}

/// What one attempt may use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Bytes of linear memory; [`DEFAULT_MEMORY`] when `None`.
    pub memory: Option<u64>,
    /// Wall-clock time.
    pub timeout: Option<Duration>,
    /// Instructions, roughly (wasmtime fuel).
    pub fuel: Option<u64>,
    /// Bytes of output `run` may return; the caller checks it once the output is back.
    pub output: usize,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WasmOutcome {
    /// `run` returned output (JSON text).
    Output(String),
    /// `run` returned its typed error.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether another attempt could help.
        retryable: bool,
    },
    /// It ran past its time limit.
    TimedOut,
    /// It was canceled while running.
    Canceled,
    /// It hit its memory or fuel limit.
    LimitExceeded(String),
    /// It trapped: a panic, a stack overflow, an illegal operation.
    Trapped(String),
    /// It could not be loaded or started.
    Error(String),
}

/// The end of one attempt.
#[derive(Debug, Clone)]
pub struct WasmResult {
    /// How it ended.
    pub outcome: WasmOutcome,
    /// What it wrote to stdout (bounded).
    pub stdout: String,
    /// What it wrote to stderr (bounded).
    pub stderr: String,
}

/// The per-attempt host state a store carries.
struct HostState {
    ctx: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    reports: Option<Box<dyn FnMut(PluginReport) + Send>>,
    reported: usize,
    interrupted: Option<Interruption>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Interruption {
    Deadline,
    Cancel,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn report(&mut self, report: PluginReport) {
        if self.reported < REPORT_LIMIT {
            self.reported += 1;
            if let Some(sink) = &mut self.reports {
                sink(report);
            }
        }
    }
}

impl bindings::uet::plugin::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.report(PluginReport::Log {
            level,
            message: clip(message),
        });
    }

    fn progress(&mut self, fraction: f32, message: String) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.report(PluginReport::Progress {
            fraction,
            message: clip(message),
        });
    }
}

/// A log line or progress message longer than this is cut: they are for people.
fn clip(mut message: String) -> String {
    const MAX: usize = 1000;
    if message.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|&i| message.is_char_boundary(i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// A loaded plugin: compiled, linked, ready to instantiate.
struct Loaded {
    pre: bindings::PluginPre<HostState>,
    /// The sha256 of the bytes compiled.
    sha256: String,
}

/// Compiles, caches and runs plugins. One per process; cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    /// Linked plugins by path, each used while its file still holds what was compiled.
    loaded: Mutex<HashMap<PathBuf, Arc<Loaded>>>,
    ticker: Arc<Ticker>,
    fuel: bool,
    /// Says that a plugin is being compiled (seconds, for a large one): the daemon's log by
    /// default, stderr for `uet run`.
    announce: Box<dyn Fn(&str) + Send + Sync>,
}

/// Advances the engine's epoch every [`TICK`] while any plugin runs, and sleeps otherwise, so
/// an idle daemon costs no CPU.
struct Ticker {
    active: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
}

struct Active<'a>(&'a Ticker);

impl Ticker {
    fn enter(&self) -> Active<'_> {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.wake.notify_all();
        Active(self)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        *self.0.active.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::Relaxed);
        self.ticker.wake.notify_all();
    }
}

static RUNTIMES: AtomicUsize = AtomicUsize::new(0);

impl Runtime {
    /// A runtime whose compiled plugins are cached in `cache_dir`, sized for plugins that may
    /// use up to `max_memory` bytes each.
    pub fn new(cache_dir: Option<PathBuf>, max_memory: u64) -> anyhow::Result<Runtime> {
        let max_memory = max_memory.max(DEFAULT_MEMORY);
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES * 2)
            .total_tables(POOL_INSTANCES * 8)
            .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
            // A slot coming back is wiped with memset of the pages the plugin touched (found
            // with PAGEMAP_SCAN where the kernel has it) rather than with madvise: each madvise
            // is a TLB shootdown across every core, and was the largest cost of a short
            // attempt. Beyond these sizes, the rest is still given back to the kernel.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT / 16)
            .pagemap_scan(wasmtime::Enabled::Auto)
            // what is given back goes in batches: one shootdown for several slots
            .decommit_batch_size(DECOMMIT_BATCH);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(e) => {
                // a machine that refuses the pool's address-space reservation still runs
                // plugins, only with slower instantiation
                tracing::warn!("pooling allocator unavailable ({e:#}); allocating on demand");
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                Engine::new(&config)?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        let ticker = Arc::new(Ticker {
            active: Mutex::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let weak_engine = engine.weak();
        let t = ticker.clone();
        std::thread::Builder::new()
            .name(format!(
                "uet-epoch-{}",
                RUNTIMES.fetch_add(1, Ordering::Relaxed)
            ))
            .spawn(move || {
                loop {
                    let mut active = t.active.lock().unwrap_or_else(|e| e.into_inner());
                    while *active == 0 && !t.stop.load(Ordering::Relaxed) {
                        active = t.wake.wait(active).unwrap_or_else(|e| e.into_inner());
                    }
                    drop(active);
                    if t.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(TICK);
                    match weak_engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Runtime {
            engine,
            linker,
            cache_dir,
            loaded: Mutex::new(HashMap::new()),
            ticker,
            fuel: true,
            announce: Box::new(|line| tracing::info!("{line}")),
        })
    }

    /// Says a plugin's compilation with `announce` instead of the log.
    pub fn announce_with(mut self, announce: impl Fn(&str) + Send + Sync + 'static) -> Runtime {
        self.announce = Box::new(announce);
        self
    }

    /// Compiles (or takes from the cache) and links a plugin now, so that its first attempt
    /// does not: said when it compiles. What goes wrong is left for the attempt to report.
    pub fn preload(&self, path: &Path, pinned: Option<&str>) {
        let _ = self.load(path, pinned, true);
    }

    /// Loads a plugin once per content: from the on-disk cache when this engine compiled it
    /// before, else compiled and written to the cache. When `pinned`, only bytes with that
    /// sha256 are compiled or used. Else, when `check`, what the file holds now is (found by
    /// its stamp once it has settled, else by its hash), so that a plugin replaced at its path
    /// is loaded again; without `check`, what was loaded from the path last.
    fn load(&self, path: &Path, pinned: Option<&str>, check: bool) -> Result<Arc<Loaded>, String> {
        // what a plugin linked before must hold to be used again: the pinned bytes; else, when
        // checking, what the file holds now (its hash kept by its stamp, see `sha256_file`),
        // nothing when it cannot be read (the read below then says why); else anything
        let now_there = (check && pinned.is_none())
            .then(|| sha256_file(path).ok())
            .flatten();
        let reusable = |l: &Loaded| match pinned.or(now_there.as_deref()) {
            Some(wanted) => wanted == l.sha256,
            None => !check,
        };
        if let Some(l) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .filter(|l| reusable(l))
        {
            return Ok(l.clone());
        }
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read plugin {}: {e}", path.display()))?;
        let sha256 = sha256_bytes(&bytes);
        if let Some(pinned) = pinned
            && pinned != sha256
        {
            return Err(format!(
                "plugin {} has sha256 {sha256}, and its tool pins {pinned}: not run",
                path.display()
            ));
        }
        let component = self.compile_cached(path, &bytes, &sha256)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "plugin {} does not fit the uet:plugin interface: {e:#}",
                path.display()
            )
        })?;
        let pre = bindings::PluginPre::new(pre).map_err(|e| {
            format!(
                "plugin {} does not export uet:plugin/tool: {e:#}",
                path.display()
            )
        })?;
        let loaded = Arc::new(Loaded { pre, sha256 });
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), loaded.clone());
        Ok(loaded)
    }

    fn compile_cached(&self, path: &Path, bytes: &[u8], sha256: &str) -> Result<Component, String> {
        use std::hash::{Hash, Hasher};
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes)
                .map_err(|e| format!("cannot compile plugin {}: {e:#}", path.display()));
        };
        // keyed by the plugin's content and everything about the engine that changes code
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let key = format!("{sha256}-{:016x}", engine_hash.finish());
        let file = dir.join(format!("{key}.cwasm"));
        if !file.exists() {
            let name = path
                .file_name()
                .unwrap_or(path.as_os_str())
                .to_string_lossy();
            (self.announce)(&format!(
                "compiling plugin {name} ({:.1} MB): once, then it loads from the cache",
                bytes.len() as f64 / 1e6
            ));
        } else {
            // SAFETY: files in the cache are written only by `Component::serialize` of this
            // process's code, keyed by the engine's compatibility hash, and renamed into place
            // whole; a file that still fails to load is recompiled below.
            match unsafe { Component::deserialize_file(&self.engine, &file) } {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(file = %file.display(), "cached plugin unusable ({e:#}); recompiling")
                }
            }
        }
        let compiled = Component::new(&self.engine, bytes)
            .map_err(|e| format!("cannot compile plugin {}: {e:#}", path.display()));
        let component = match compiled {
            Ok(component) => component,
            Err(e) => {
                give_back_heap();
                return Err(e);
            }
        };
        let written = match component.serialize() {
            Ok(data) => {
                let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
                let written =
                    std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, &file));
                if written.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::warn!(dir = %dir.display(), "cannot write the plugin cache");
                }
                written.is_ok()
            }
            Err(e) => {
                tracing::warn!("cannot serialize plugin {}: {e:#}", path.display());
                false
            }
        };
        // run from the cache file, as after a restart: its code is then the file's pages,
        // which the kernel may share and drop, not the compile's heap (77 MB against 181 MB
        // for a 17 MB Python plugin)
        // SAFETY: as above; this process wrote the file just now
        let cached = written.then(|| unsafe { Component::deserialize_file(&self.engine, &file) });
        let component = match cached {
            Some(Ok(cached)) => {
                // freed before the heap is given back
                drop(component);
                cached
            }
            _ => component,
        };
        give_back_heap();
        Ok(component)
    }

    fn store(
        &self,
        grants: Option<&Grants>,
        limits: &Limits,
    ) -> Result<(Store<HostState>, BoundedPipe, BoundedPipe), String> {
        let stdout = BoundedPipe::new(OUTPUT_LIMIT);
        let stderr = BoundedPipe::new(OUTPUT_LIMIT);
        let mut wasi = WasiCtxBuilder::new();
        // no environment, arguments, network or stdin: only what the tool entry grants
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        // each descriptor is held until its folder is preopened: the preopen opens the very
        // folder it names, not a path
        let mut opened = Vec::new();
        if let Some(g) = grants {
            for dir in &g.write {
                let fd = crate::adapters::beneath::open_folder(&g.workstream, dir, true)
                    .map_err(|e| format!("sandbox write grant {dir:?} refused: {e}"))?;
                wasi.preopened_dir(
                    crate::adapters::beneath::fd_path(&fd),
                    dir,
                    FsPerms::ReadWrite,
                )
                .map_err(|e| format!("cannot grant {dir:?}: {e:#}"))?;
                opened.push(fd);
            }
            for dir in g.read.iter().filter(|d| !g.write.contains(d)) {
                let fd = match crate::adapters::beneath::open_folder(&g.workstream, dir, false) {
                    Ok(fd) => fd,
                    // a folder the workstream does not have (yet) is simply not there
                    Err(crate::adapters::beneath::BeneathError::Missing(_)) => continue,
                    Err(e) => return Err(format!("sandbox read grant {dir:?} refused: {e}")),
                };
                wasi.preopened_dir(
                    crate::adapters::beneath::fd_path(&fd),
                    dir,
                    FsPerms::ReadOnly,
                )
                .map_err(|e| format!("cannot grant {dir:?}: {e:#}"))?;
                opened.push(fd);
            }
        }
        let memory = limits.memory.unwrap_or(DEFAULT_MEMORY);
        let state = HostState {
            ctx: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(memory).unwrap_or(usize::MAX))
                .trap_on_grow_failure(true)
                .build(),
            reports: None,
            reported: 0,
            interrupted: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        if self.fuel {
            store
                .set_fuel(limits.fuel.unwrap_or(u64::MAX))
                .map_err(|e| format!("cannot set fuel: {e:#}"))?;
        }
        Ok((store, stdout, stderr))
    }

    /// Where this node keeps a plugin that came from the fleet by its sha256 (in the cache;
    /// `None` when the runtime keeps none).
    pub fn fleet_copy(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        Some(dir.join("fleet").join(format!("{sha256}.wasm")))
    }

    /// Asks a plugin what it is.
    pub fn describe(&self, path: &Path, pinned: Option<&str>) -> Result<Description, String> {
        let loaded = self.load(path, pinned, true)?;
        let (mut store, _, stderr) = self.store(None, &Limits::default())?;
        let _active = self.ticker.enter();
        let deadline = Instant::now() + Duration::from_secs(10);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        let plugin = loaded
            .pre
            .instantiate(&mut store)
            .map_err(|e| format!("cannot start plugin {}: {e:#}", path.display()))?;
        let d = plugin
            .uet_plugin_tool()
            .call_describe(&mut store)
            .map_err(|e| {
                format!(
                    "plugin {} failed to describe itself: {}",
                    path.display(),
                    trap_reason(&e, &stderr.text())
                )
            })?;
        Ok(Description {
            name: d.name,
            version: d.version,
            capabilities: d.capabilities,
            input_schema: d.input_schema,
        })
    }

    /// Runs one attempt: a fresh store with its own limits and sandbox, `run(input)`, and the
    /// end classified. Blocks, on whatever thread calls it. `canceled` is asked at each tick;
    /// once it says yes, the plugin is stopped as canceled within that tick.
    pub fn run(
        &self,
        path: &Path,
        input: &str,
        grants: &Grants,
        limits: &Limits,
        canceled: impl Fn() -> bool + Send + Sync + 'static,
        reports: Option<Box<dyn FnMut(PluginReport) + Send>>,
    ) -> WasmResult {
        let error = |msg: String| WasmResult {
            outcome: WasmOutcome::Error(msg),
            stdout: String::new(),
            stderr: String::new(),
        };
        let loaded = match self.load(path, grants.pinned.as_deref(), grants.check_file) {
            Ok(l) => l,
            Err(e) => return error(e),
        };
        let (mut store, stdout, stderr) = match self.store(Some(grants), limits) {
            Ok(s) => s,
            Err(e) => return error(e),
        };
        store.data_mut().reports = reports;
        let deadline = limits.timeout.map(|t| Instant::now() + t);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let why = if canceled() {
                Some(Interruption::Cancel)
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                Some(Interruption::Deadline)
            } else {
                None
            };
            match why {
                Some(why) => {
                    ctx.data_mut().interrupted = Some(why);
                    Ok(UpdateDeadline::Interrupt)
                }
                None => Ok(UpdateDeadline::Continue(1)),
            }
        });
        let _active = self.ticker.enter();
        let called = loaded
            .pre
            .instantiate(&mut store)
            .and_then(|plugin| plugin.uet_plugin_tool().call_run(&mut store, input));
        let stderr_text = stderr.text();
        let outcome = match called {
            Ok(Ok(output)) => WasmOutcome::Output(output),
            Ok(Err(e)) => WasmOutcome::Failed {
                message: e.message,
                retryable: e.retryable,
            },
            Err(e) => match store.data().interrupted {
                Some(Interruption::Cancel) => WasmOutcome::Canceled,
                Some(Interruption::Deadline) => WasmOutcome::TimedOut,
                None => classify(&e, &stderr_text, limits),
            },
        };
        WasmResult {
            outcome,
            stdout: stdout.text(),
            stderr: stderr_text,
        }
    }
}

/// Asks plugins what they are: every WASM tool when `all`, else those whose entry lists no
/// capabilities (their capabilities are then the plugin's own). A plugin that cannot be loaded
/// or described is a problem of the tools file.
pub fn describe_tools(
    tools: &mut crate::spec::tools::Tools,
    runtime: &Runtime,
    all: bool,
) -> Result<(), crate::spec::doc::Problems> {
    let mut problems = Vec::new();
    for tool in &mut tools.tools {
        let crate::spec::tools::ToolKind::Wasm { path } = &mut tool.kind else {
            continue;
        };
        if tool.from_fleet {
            // the copy this node keeps, once fetched; until then its entry says what it does
            let Some(copy) = runtime.fleet_copy(tool.sha256.as_deref().unwrap_or_default()) else {
                continue;
            };
            let fetched = copy.exists();
            *path = copy;
            if !fetched {
                continue;
            }
        } else if let Some(pinned) = &tool.sha256 {
            // a plugin refused here is neither compiled nor asked what it is: its load would
            // only refuse it again, as a second problem
            match sha256_file(path) {
                Ok(h) if &h == pinned => {}
                Ok(h) => {
                    problems.push(crate::spec::doc::Problem {
                        file: tools.path.clone(),
                        position: None,
                        message: format!(
                            "tool `{}`: {} has sha256 {h}, and its entry pins {pinned}",
                            tool.name,
                            path.display()
                        ),
                    });
                    continue;
                }
                Err(e) => {
                    problems.push(crate::spec::doc::Problem {
                        file: tools.path.clone(),
                        position: None,
                        message: format!(
                            "tool `{}`: cannot read {}: {e}",
                            tool.name,
                            path.display()
                        ),
                    });
                    continue;
                }
            }
        }
        let path = &*path;
        let pinned = tool.sha256.as_deref();
        if !all && !tool.capabilities.is_empty() {
            // compiled now, not inside the first step that uses it (its time is the step's)
            runtime.preload(path, pinned);
            continue;
        }
        match runtime.describe(path, pinned) {
            Ok(d) => {
                if tool.capabilities.is_empty() {
                    tool.capabilities = d.capabilities.clone();
                }
                tool.described = Some(d);
            }
            Err(e) => problems.push(crate::spec::doc::Problem {
                file: tools.path.clone(),
                position: None,
                message: format!("tool `{}`: {e}", tool.name),
            }),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::spec::doc::Problems::new(problems))
    }
}

/// A file's sha256, as lowercase hex. Kept per file while it stays the same file with the
/// same size and change times: a pinned plugin is checked at every load of its tools file
/// (every drop), and a fleet plugin at every attempt sent, and a plugin may be tens of
/// megabytes. The change time (`ctime`) is part of that because no one can set it back: a
/// modification time can be set to anything, so a plugin rewritten at the same size with its
/// old mtime put back would otherwise pass its pin.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    static KNOWN: std::sync::LazyLock<Mutex<HashMap<PathBuf, (Stamp, String)>>> =
        std::sync::LazyLock::new(Default::default);
    let hashing = std::time::SystemTime::now();
    let meta = std::fs::metadata(path)?;
    let stamp = Stamp::of(&meta);
    let known = |m: &Mutex<HashMap<PathBuf, (Stamp, String)>>| {
        m.lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .filter(|(s, _)| *s == stamp)
            .map(|(_, h)| h.clone())
    };
    if let Some(hash) = known(&KNOWN) {
        return Ok(hash);
    }
    let hash = sha256_bytes(&std::fs::read(path)?);
    if stamp.settled(hashing) {
        KNOWN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), (stamp, hash.clone()));
    }
    Ok(hash)
}

/// What says a file is unchanged: its device, inode, size, mtime and ctime. Anyone who may
/// write a file can set its mtime back, but not its ctime, nor make a new file keep the inode.
#[derive(PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// How long before a read a file must have last changed for its stamp to be believed:
    /// change times move in coarse ticks on some file systems, so a file written again within
    /// a tick of being read, at the same size, could keep its stamp.
    const SETTLED: Duration = Duration::from_secs(2);

    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file had been unchanged for [`Stamp::SETTLED`] at `read` (a time out of
    /// range, before 1970 or past what SystemTime holds, is not settled).
    fn settled(&self, read: std::time::SystemTime) -> bool {
        let changed = u64::try_from(self.ctime.0.max(self.mtime.0))
            .ok()
            .and_then(|secs| std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs)));
        changed.is_some_and(|c| read.duration_since(c).is_ok_and(|ago| ago >= Self::SETTLED))
    }
}

/// Gives the heap that a compile freed back to the system. Cranelift compiles functions on
/// several threads, and glibc keeps what each freed in that thread's arena: after a 17 MB
/// Python plugin a daemon held some 380 MB it no longer used, for the rest of its life.
fn give_back_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of glibc's arenas to the system; it reads
    // no memory of ours and is safe to call from any thread at any time
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes' sha256, as lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    crate::hex(&Sha256::digest(bytes))
}

/// Names what ended an attempt that trapped, in a user's words.
fn classify(e: &wasmtime::Error, stderr: &str, limits: &Limits) -> WasmOutcome {
    let chain = format!("{e:#}");
    // `trap_on_grow_failure` turns a refused memory.grow into a trap that says so
    if chain.contains("growing memory") || stderr.contains("memory allocation of") {
        let limit = limits.memory.unwrap_or(DEFAULT_MEMORY);
        return WasmOutcome::LimitExceeded(format!(
            "exceeded its memory limit of {} MiB",
            limit >> 20
        ));
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => WasmOutcome::LimitExceeded(format!(
            "ran out of fuel (limit {})",
            limits
                .fuel
                .map(|f| f.to_string())
                .unwrap_or_else(|| "none".into())
        )),
        Some(Trap::StackOverflow) => {
            WasmOutcome::Trapped("stack overflow (unbounded recursion?)".into())
        }
        _ => WasmOutcome::Trapped(trap_reason(e, stderr)),
    }
}

/// A panic's own message when the plugin printed one, else the trap.
fn trap_reason(e: &wasmtime::Error, stderr: &str) -> String {
    // Rust prints `thread '…' panicked at FILE:LINE:COL:` and the message on the next line
    let mut lines = stderr.lines();
    if let Some(line) = lines.by_ref().find(|l| l.contains("panicked at ")) {
        let place = line
            .split("panicked at ")
            .nth(1)
            .unwrap_or("")
            .trim()
            .trim_end_matches(':');
        let message = lines.next().unwrap_or("").trim();
        return format!("panicked at {place}: {message}");
    }
    match e.downcast_ref::<Trap>() {
        Some(trap) => format!("trapped: {trap}"),
        None => format!("{e:#}"),
    }
}

/// stdout/stderr for a plugin: keeps the first `limit` bytes and drops the rest without ever
/// failing a write, so a chatty plugin is neither stalled nor trapped by its own output.
#[derive(Clone)]
struct BoundedPipe {
    limit: usize,
    buffer: Arc<Mutex<Vec<u8>>>,
}

impl BoundedPipe {
    fn new(limit: usize) -> Self {
        BoundedPipe {
            limit,
            buffer: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn keep(&self, bytes: &[u8]) {
        let mut buf = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.limit.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl IsTerminal for BoundedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for BoundedPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for BoundedPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.keep(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_plugin_is_compiled_only_from_the_pinned_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("p.wasm");
        std::fs::write(&plugin, b"not the pinned plugin").unwrap();
        let rt = Runtime::new(None, 0).unwrap();
        let mut grants = Grants {
            workstream: dir.path().to_path_buf(),
            read: vec![],
            write: vec![],
            pinned: Some(sha256_bytes(b"the pinned plugin")),
            check_file: false,
        };
        let attempt = |grants: &Grants| {
            rt.run(&plugin, "{}", grants, &Limits::default(), || false, None)
                .outcome
        };
        // the file its tools file checked was swapped before the attempt read it
        match attempt(&grants) {
            WasmOutcome::Error(e) => assert!(e.contains("and its tool pins"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(rt.describe(&plugin, grants.pinned.as_deref()).is_err());
        // the bytes it pins get as far as the compiler (these are no component)
        grants.pinned = Some(sha256_bytes(b"not the pinned plugin"));
        match attempt(&grants) {
            WasmOutcome::Error(e) => assert!(e.contains("cannot compile"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_plugin_rewritten_at_its_size_with_its_old_mtime_put_back_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("p.wasm");
        std::fs::write(&plugin, b"good").unwrap();
        // settled: its hash is kept from here on
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(sha256_file(&plugin).unwrap(), sha256_bytes(b"good"));
        let mtime = std::fs::metadata(&plugin).unwrap().modified().unwrap();
        std::fs::write(&plugin, b"evil").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&plugin)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(
            std::fs::metadata(&plugin).unwrap().modified().unwrap(),
            mtime
        );
        assert_eq!(
            sha256_file(&plugin).unwrap(),
            sha256_bytes(b"evil"),
            "a pin must see the new content"
        );
        // and a file just written is hashed each time until it settles
        std::fs::write(&plugin, b"even").unwrap();
        assert_eq!(sha256_file(&plugin).unwrap(), sha256_bytes(b"even"));
        std::fs::write(&plugin, b"more").unwrap();
        assert_eq!(sha256_file(&plugin).unwrap(), sha256_bytes(b"more"));
    }
}

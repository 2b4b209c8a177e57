//! The `uet` command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow};

mod cli;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use uet::adapters::wasm::{self, Runtime};
use uet::api::protocol::{Client, Request, Response};
use uet::engine::{self, Notice, RunSpec};
use uet::model::{RunState, StepState};
use uet::spec::doc::Problems;
use uet::spec::tools::{TOOLS_FILE, Tools};
use uet::spec::workflow;
use uet::state::Store;
use uet::views::report::RunView;

/// Exit codes, as DESIGN.md fixes them.
mod exit {
    pub const OK: u8 = 0;
    pub const RUN_FAILED: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const NO_DAEMON: u8 = 3;
}

#[derive(Parser)]
#[command(
    name = "uet",
    version,
    about = "Runs workflows step by step in sandboxed tools, with durable state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one workflow in-process, to the end.
    Run {
        /// The workflow file (TOML or JSON).
        file: PathBuf,
        /// The tools file [default: tools.toml beside the workflow].
        #[arg(long)]
        tools: Option<PathBuf>,
        /// The state folder [default: $UET_STATE, else $XDG_STATE_HOME/uet, else ~/.local/state/uet].
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        /// Print one JSON object instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// List tools: kind, capabilities and source. Those of the daemon's folders, or with
    /// `--tools` (or no daemon running) those of a tools file.
    Tools {
        /// The tools file [default: the daemon's, else ./tools.toml].
        #[arg(long)]
        tools: Option<PathBuf>,
        /// The state folder, whose plugin cache is used.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run the daemon: watch folders, run what is dropped in them, answer on a socket.
    Daemon {
        /// A config file (TOML) with any of the flags' settings; flags win.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A tools file for every watched folder [default: each folder's tools.toml].
        #[arg(long)]
        tools: Option<PathBuf>,
        /// A folder to watch (repeatable).
        #[arg(long)]
        watch: Vec<PathBuf>,
        /// The state folder.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        /// The control socket.
        #[arg(long, env = "UET_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// The daemon's state in brief.
    Status(ClientArgs),
    /// List the daemon's runs: the latest 1,000, oldest first.
    Runs {
        /// How many of the latest runs.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Every run, however many.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a run and its steps.
    Show {
        /// The run.
        run: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Have the daemon run a workflow file (its folder is the workstream).
    Submit {
        /// The workflow file.
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a run: its running steps are killed at once.
    Cancel {
        /// The run.
        run: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Re-run a failed or canceled run: steps that succeeded keep their outputs.
    Retry {
        /// The run.
        run: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put a quarantined run back in the queue.
    Release {
        /// The run.
        run: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the event log (the audit trail) of a run, or of every run.
    Events {
        /// The run [default: every run].
        run: Option<u64>,
        /// Keep printing events as they happen (until the run ends, or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete finished runs (never pending, running or quarantined ones) with their steps,
    /// attempts and events (the daemon's, else the state's).
    Prune {
        /// Runs that finished longer ago than this ("30d", "12h").
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Keep only this many finished runs, the newest.
        #[arg(long)]
        keep: Option<usize>,
        /// The state folder, when no daemon answers.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A live view of the daemon: runs in flight with progress and ETA, the queue, tools and
    /// their breakers; `q` quits. Prints one frame when stdout is not a terminal.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        every: std::time::Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print metrics in Prometheus text format (the daemon's, else the state's).
    Metrics {
        /// The state folder, when no daemon answers.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check a run's event log against its hash chain (the daemon's, else the state's).
    Verify {
        /// The run.
        run: u64,
        /// The state folder, when no daemon answers.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop the daemon gracefully.
    Shutdown(ClientArgs),
    /// Check the state file, or put its last good copy back (no daemon may hold it).
    #[command(subcommand)]
    State(StateCommand),
    /// Work with plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Check workflow files and print every problem.
    Validate {
        /// The workflow files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The tools file [default: tools.toml beside each workflow].
        #[arg(long)]
        tools: Option<PathBuf>,
    },
}

/// How a client command finds the daemon.
#[derive(clap::Args)]
struct ClientArgs {
    /// The daemon's socket [default: $XDG_RUNTIME_DIR/uet/uet.sock, else /tmp/uet-UID/uet.sock].
    #[arg(long, env = "UET_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Read every row and verify every run's event chain, writing nothing; exit 1 when the
    /// state is damaged.
    Check {
        /// The state folder.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// When the state is damaged: set the file aside (uet.redb.damaged-SECONDS) and put the
    /// last good copy (uet.redb.bak) in its place, with the journal's changes since it.
    Recover {
        /// The state folder.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Scaffold a plugin crate that builds as it is.
    New {
        /// The plugin's name (lowercase, `-` allowed).
        name: String,
        /// The uet-plugin-sdk folder [default: the one beside this build of uet].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// An error that maps to an exit code; everything else is invalid input (2).
enum Failure {
    /// Problems in input files: printed one per line.
    Problems(Problems),
    /// Anything else, printed with its cause chain.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

std::thread_local! {
    /// Set while a panic is caught and reported as an error (the database's, on a damaged
    /// page): the panic hook then keeps it off the terminal.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on the state `file`, turning a panic inside it (redb's, on a damaged page) into an
/// error that names the file and says what to do.
fn guarded<T>(file: &Path, f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    QUIET_PANICS.with(|q| q.set(true));
    let result = uet::state::repair::quietly(f);
    QUIET_PANICS.with(|q| q.set(false));
    result.unwrap_or_else(|panic| {
        Err(anyhow!(
            "the state file {} cannot be read: {panic}; `uet state check` says what is damaged, \
             `uet state recover` puts the last good copy back",
            file.display()
        )
        .into())
    })
}

fn main() -> ExitCode {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !QUIET_PANICS.with(|q| q.get()) {
            default_hook(info);
        }
    }));
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run {
            file,
            tools,
            state,
            json,
        } => cmd_run(&file, tools.as_deref(), state, json),
        Command::Validate { files, tools } => cmd_validate(&files, tools.as_deref()),
        Command::Tools {
            tools,
            state,
            client: c,
        } => cmd_tools(tools.as_deref(), state, &c),
        Command::Daemon {
            config,
            tools,
            watch,
            state,
            socket,
        } => cmd_daemon(config, tools, watch, state, socket),
        Command::Status(c) => client(&c, Request::Status),
        Command::Runs {
            limit,
            all,
            client: c,
        } => client(
            &c,
            Request::Runs {
                limit: (!all).then_some(limit),
            },
        ),
        Command::Show { run, client: c } => client(&c, Request::Show { run, from: 0 }),
        Command::Submit { file, client: c } => match std::path::absolute(&file) {
            Ok(path) => client(&c, Request::Submit { path }),
            Err(e) => Err(anyhow!("{}: {e}", file.display()).into()),
        },
        Command::Cancel { run, client: c } => client(&c, Request::Cancel { run }),
        Command::Retry { run, client: c } => client(&c, Request::Retry { run }),
        Command::Release { run, client: c } => client(&c, Request::Release { run }),
        Command::Events {
            run,
            follow,
            client: c,
        } => client(&c, Request::Events { run, follow }),
        Command::Verify {
            run,
            state,
            client: c,
        } => cmd_verify(run, state, &c),
        Command::Metrics { state, client: c } => cmd_metrics(state, &c),
        Command::Top { every, client: c } => {
            if c.json {
                client(&c, Request::Top)
            } else {
                let socket = c
                    .socket
                    .clone()
                    .unwrap_or_else(uet::api::protocol::default_socket);
                match uet::views::top::run(&socket, every) {
                    Ok(()) => Ok(exit::OK),
                    Err(e @ uet::views::top::TopError::NoDaemon(..)) => {
                        eprintln!(
                            "uet: {e}; start one with `uet daemon --watch DIR`, or point --socket / UET_SOCKET at it"
                        );
                        Ok(exit::NO_DAEMON)
                    }
                    Err(e) => Err(anyhow!("{e}").into()),
                }
            }
        }
        Command::Prune {
            older_than,
            keep,
            state,
            client: c,
        } => {
            let older_than_ms = older_than.map(|d| d.as_millis() as u64);
            let code = client_quiet(
                &c,
                Request::Prune {
                    older_than_ms,
                    keep,
                },
                true,
            );
            match code {
                Ok(exit::NO_DAEMON) => with_local_state(state, true, |store| {
                    Ok(print_response(
                        &c,
                        uet::daemon::prune_answer(store, older_than_ms, keep),
                    ))
                }),
                other => other,
            }
        }
        Command::Shutdown(c) => client(&c, Request::Shutdown),
        Command::State(StateCommand::Check { state, json }) => cmd_state_check(state, json),
        Command::State(StateCommand::Recover { state }) => cmd_state_recover(state),
        Command::Plugin(PluginCommand::New { name, sdk }) => {
            let sdk = sdk.unwrap_or_else(cli::scaffold::default_sdk);
            cli::scaffold::new_plugin(Path::new("."), &name, &sdk)
                .map(|dir| {
                    println!("created {}: `cargo test` there, then `cargo build --release --target wasm32-wasip2`", dir.display());
                    exit::OK
                })
                .map_err(|e| Failure::Other(e.into()))
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Problems(p)) => {
            eprintln!("{p}");
            let n = p.count();
            eprintln!(
                "uet: {n} problem{}; nothing was run",
                if n == 1 { "" } else { "s" }
            );
            ExitCode::from(exit::INVALID)
        }
        Err(Failure::Other(e)) => {
            eprintln!("uet: {e:#}");
            ExitCode::from(exit::INVALID)
        }
    }
}

fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("uet"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("no HOME: pass --state DIR"))?;
    Ok(PathBuf::from(home).join(".local/state/uet"))
}

/// The daemon's config file: the flags' settings, flags winning.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DaemonFile {
    tools: Option<PathBuf>,
    #[serde(default)]
    watch: Vec<PathBuf>,
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

fn cmd_daemon(
    config: Option<PathBuf>,
    tools: Option<PathBuf>,
    watch: Vec<PathBuf>,
    state: Option<PathBuf>,
    socket: Option<PathBuf>,
) -> Result<u8, Failure> {
    let file: DaemonFile = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
        None => DaemonFile::default(),
    };
    let watch = if watch.is_empty() { file.watch } else { watch };
    if watch.is_empty() {
        return Err(
            anyhow!("nothing to watch: pass --watch DIR (or `watch = [...]` in --config)").into(),
        );
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
        keep_for: file.keep_for,
        keep_runs: file.keep_runs,
        max_file: match &file.max_file {
            Some(text) => uet::spec::doc::parse_bytes(text).ok_or_else(|| {
                anyhow!("max_file: bad size {text:?}; write e.g. \"8MiB\" or \"512KiB\"")
            })?,
            None => uet::spec::doc::MAX_FILE,
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(uet::daemon::serve(config))?;
    Ok(exit::OK)
}

/// Sends one request to the daemon and prints the answer.
fn client(args: &ClientArgs, request: Request) -> Result<u8, Failure> {
    client_quiet(args, request, false)
}

/// [`client`], saying nothing when no daemon answers if `quiet`: the caller has another way.
fn client_quiet(args: &ClientArgs, request: Request, quiet: bool) -> Result<u8, Failure> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(uet::api::protocol::default_socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut client = match Client::connect(&socket).await {
            Ok(c) => c,
            Err(e) => {
                if quiet {
                    // the caller says what it does without a daemon
                } else if e.kind() == std::io::ErrorKind::InvalidData {
                    eprintln!(
                        "uet: the daemon on {} does not speak this uet's protocol ({e}); use the uet that started it, or restart the daemon with this one",
                        socket.display()
                    );
                } else {
                    eprintln!(
                        "uet: no uet daemon answers on {} ({e}); start one with `uet daemon --watch DIR`, or point --socket / UET_SOCKET at it",
                        socket.display()
                    );
                }
                return Ok(exit::NO_DAEMON);
            }
        };
        let streaming = matches!(request, Request::Events { .. });
        let following = matches!(request, Request::Events { follow: true, .. });
        if let Request::Show { run, .. } = request {
            return show_pages(&mut client, &socket, args, run).await;
        }
        let mut response = client.call(&request).await;
        loop {
            let r = match response {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("uet: the daemon on {} stopped answering: {e}", socket.display());
                    return Ok(exit::NO_DAEMON);
                }
            };
            if let (true, Response::Done { message }) = (streaming, &r) {
                // the end of a followed run: a note for a person, nothing in a JSON-lines stream
                if following && !args.json {
                    eprintln!("uet: {message}");
                }
                return Ok(exit::OK);
            }
            let more = streaming && matches!(r, Response::Events { .. });
            let code = print_response(args, r);
            if !more {
                return Ok(code);
            }
            response = client.next().await;
        }
    })
}

/// `uet show`: the run a page at a time (a run of many steps does not fit one answer), printed
/// as one object.
async fn show_pages(
    client: &mut Client,
    socket: &Path,
    args: &ClientArgs,
    run: u64,
) -> Result<u8, Failure> {
    let mut from = 0;
    let mut whole: Option<serde_json::Value> = None;
    loop {
        let page = match client.call(&Request::Show { run, from }).await {
            Ok(Response::Run { run: page }) => page,
            Ok(other) => return Ok(print_response(args, other)),
            Err(e) => {
                eprintln!(
                    "uet: the daemon on {} stopped answering: {e}",
                    socket.display()
                );
                return Ok(exit::NO_DAEMON);
            }
        };
        let next = page["steps_next"].as_u64();
        match &mut whole {
            None => whole = Some(page),
            Some(w) => {
                let more = page["steps"].as_array().cloned().unwrap_or_default();
                if let Some(steps) = w["steps"].as_array_mut() {
                    steps.extend(more);
                }
            }
        }
        match next {
            Some(n) if n as usize > from => from = n as usize,
            _ => break,
        }
    }
    let mut run = whole.unwrap_or_default();
    if let Some(o) = run.as_object_mut() {
        o.remove("steps_next");
    }
    Ok(print_response(args, Response::Run { run }))
}

/// Prints one answer of the daemon and says what the command's exit code is.
fn print_response(args: &ClientArgs, response: Response) -> u8 {
    let mut out = std::io::stdout().lock();
    let code: Result<u8, Failure> = match response {
        Response::Error { message, invalid } => {
            eprintln!("{message}");
            Ok(if invalid {
                exit::INVALID
            } else {
                exit::RUN_FAILED
            })
        }
        Response::Status(status) if args.json => {
            let _ = writeln!(out, "{}", serde_json::to_value(&status).unwrap_or_default());
            Ok(exit::OK)
        }
        Response::Status(status) => {
            let counts: Vec<String> = status
                .runs
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            let _ = writeln!(
                out,
                "uet daemon {} (pid {}), up {}s, state {}\nwatching: {}\nruns: {} ({} active)",
                status.version,
                status.pid,
                status.uptime_seconds,
                status.state.display(),
                status
                    .watching
                    .iter()
                    .map(|w| w.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                if counts.is_empty() {
                    "none".to_string()
                } else {
                    counts.join(", ")
                },
                status.active,
            );
            Ok(exit::OK)
        }
        Response::Runs { runs } if args.json => {
            let _ = writeln!(out, "{}", serde_json::Value::Array(runs));
            Ok(exit::OK)
        }
        Response::Runs { runs } => {
            let _ = writeln!(
                out,
                "{:>6}  {:<11}  {:<24}  STARTED BY · REASON",
                "RUN", "STATE", "NAME"
            );
            for r in runs {
                let mut why = r["trigger"].as_str().unwrap_or("-").to_string();
                if r["state"] != "succeeded"
                    && let Some(reason) = r["reason"].as_str()
                {
                    why.push_str(&format!(" · {reason}"));
                }
                let _ = writeln!(
                    out,
                    "{:>6}  {:<11}  {:<24}  {why}",
                    r["run_id"].to_string(),
                    r["state"].as_str().unwrap_or("-"),
                    r["name"].as_str().unwrap_or("-"),
                );
            }
            Ok(exit::OK)
        }
        Response::Run { run } => {
            if args.json {
                let _ = writeln!(out, "{run}");
            } else {
                let _ = write!(out, "{}", uet::views::report::text(&run));
            }
            Ok(exit::OK)
        }
        Response::Submitted { run } => {
            if args.json {
                let _ = writeln!(out, "{}", serde_json::json!({ "run_id": run }));
            } else {
                let _ = writeln!(out, "submitted: run {run}");
            }
            Ok(exit::OK)
        }
        Response::Done { message } => {
            let _ = writeln!(out, "{message}");
            Ok(exit::OK)
        }
        Response::Events { events } => {
            for e in events {
                let _ = if args.json {
                    writeln!(out, "{e}")
                } else {
                    writeln!(out, "{}", uet::views::report::event_line(&e))
                };
            }
            let _ = out.flush();
            Ok(exit::OK)
        }
        Response::Tools { tools } => {
            drop(out);
            print_tools(tools, args.json);
            Ok(exit::OK)
        }
        Response::Top { view } => {
            if args.json {
                let _ = writeln!(out, "{view}");
            } else {
                for line in uet::views::top::frame(&view, 200) {
                    let _ = writeln!(out, "{line}");
                }
            }
            Ok(exit::OK)
        }
        Response::Metrics { text } => {
            let _ = write!(out, "{text}");
            Ok(exit::OK)
        }
        Response::Hello { .. } => Ok(exit::OK),
    };
    code.unwrap_or(exit::INVALID)
}

/// Starts the plugin runtime when any tool is a plugin, and asks plugins that list no
/// capabilities (every plugin when `all`) what they are.
fn plugin_runtime(
    tools: &mut Tools,
    state: &Path,
    all: bool,
) -> Result<Option<Arc<Runtime>>, Failure> {
    if !tools.has_plugins() {
        return Ok(None);
    }
    let runtime = Runtime::new(Some(wasm::cache_dir(state)), tools.max_memory())
        .context("cannot start the plugin runtime")?;
    wasm::describe_tools(tools, &runtime, all).map_err(Failure::Problems)?;
    Ok(Some(Arc::new(runtime)))
}

fn cmd_tools(
    tools: Option<&Path>,
    state: Option<PathBuf>,
    args: &ClientArgs,
) -> Result<u8, Failure> {
    let json = args.json;
    let local = PathBuf::from(TOOLS_FILE);
    if tools.is_none() {
        // the daemon's tools when one answers; a tools file here stands in when none does
        let code = client_quiet(args, Request::Tools, local.exists())?;
        if code != exit::NO_DAEMON || !local.exists() {
            return Ok(code);
        }
    }
    let path = tools.map(Path::to_path_buf).unwrap_or(local);
    let mut tools = Tools::load_to_read(&path).map_err(Failure::Problems)?;
    let state = match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    plugin_runtime(&mut tools, &state, true)?;
    let mut rows = tools.summary();
    // the breakers as the state last recorded them, when this process can open it
    let records = Store::open(&state)
        .ok()
        .and_then(|store| store.breakers().ok())
        .unwrap_or_default();
    uet::engine::breaker::annotate(&mut rows, &tools, |name| {
        records
            .iter()
            .find(|(t, _)| t == name)
            .map(|(_, r)| r.clone())
    });
    print_tools(rows, json);
    Ok(exit::OK)
}

/// Runs `f` on the state folder when no daemon holds it.
/// Runs `f` on the state in `state` (else the default folder), opened here because no daemon
/// answers. A command that only reads opens it without writing anything, and never creates a
/// state that is not there; only a state that uet left unclean is recovered first.
fn with_local_state(
    state: Option<PathBuf>,
    writes: bool,
    f: impl FnOnce(&Store) -> Result<u8, Failure>,
) -> Result<u8, Failure> {
    let state = match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    let file = state.join(uet::state::STATE_FILE);
    let opened = guarded(&file, || {
        let opened = if writes {
            Store::open(&state)
        } else {
            match Store::open_read_only(&state) {
                Err(uet::state::StateError::Unclean(_)) => {
                    tracing::info!("recovering the state {} first", file.display());
                    Store::open(&state)
                }
                other => other,
            }
        };
        Ok(opened.with_context(|| format!("cannot open the state in {}", state.display()))?)
    })?;
    guarded(&file, || f(&opened))
}

fn state_dir(state: Option<PathBuf>) -> Result<PathBuf, Failure> {
    Ok(match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    })
}

/// `uet state check`: 0 when every row reads and every chain verifies, 1 when not.
fn cmd_state_check(state: Option<PathBuf>, json: bool) -> Result<u8, Failure> {
    let dir = state_dir(state)?;
    QUIET_PANICS.with(|q| q.set(true));
    let checked = uet::state::repair::check(&dir);
    QUIET_PANICS.with(|q| q.set(false));
    let health = checked.with_context(|| format!("cannot check the state in {}", dir.display()))?;
    let backup = health.backup.as_ref().map(|(path, at)| {
        let age = at.elapsed().unwrap_or_default().as_secs();
        (path.display().to_string(), age)
    });
    if json {
        println!(
            "{}",
            serde_json::json!({
                "file": health.file,
                "sound": health.is_sound(),
                "unclean": health.unclean,
                "rows": health.rows,
                "runs": health.runs,
                "damage": health.damage,
                "unlisted": health.unlisted,
                "backup": backup.as_ref().map(|(p, age)| serde_json::json!({"file": p, "age_seconds": age})),
            })
        );
    } else {
        let how = if health.unclean {
            " (it was not closed cleanly: a recovered copy was checked)"
        } else {
            ""
        };
        if health.is_sound() {
            println!(
                "{}: sound{how}: {} rows, {} runs with their event chains verified",
                health.file.display(),
                health.rows,
                health.runs
            );
        } else {
            println!("{}: damaged{how}:", health.file.display());
            for d in &health.damage {
                println!("  {d}");
            }
            if health.unlisted > 0 {
                println!("  … and {} more", health.unlisted);
            }
            match &backup {
                Some((p, age)) => println!(
                    "`uet state recover` sets it aside and puts back {p}, written {} ago",
                    humantime::format_duration(std::time::Duration::from_secs(*age))
                ),
                None => println!("there is no good copy to put back (no uet.redb.bak)"),
            }
        }
    }
    Ok(if health.is_sound() {
        exit::OK
    } else {
        exit::RUN_FAILED
    })
}

/// `uet state recover`: sets a damaged file aside and puts the last good copy back.
fn cmd_state_recover(state: Option<PathBuf>) -> Result<u8, Failure> {
    use uet::state::repair::Recovered;
    let dir = state_dir(state)?;
    QUIET_PANICS.with(|q| q.set(true));
    let recovered = uet::state::repair::recover(&dir);
    QUIET_PANICS.with(|q| q.set(false));
    match recovered.with_context(|| format!("cannot recover the state in {}", dir.display()))? {
        Recovered::Sound(health) => {
            println!(
                "{}: sound, nothing to recover ({} runs)",
                health.file.display(),
                health.runs
            );
            Ok(exit::OK)
        }
        Recovered::Restored {
            health,
            damaged,
            copy_written,
            runs,
            replayed,
        } => {
            let age = copy_written.elapsed().unwrap_or_default().as_secs();
            println!(
                "{}: the damaged file is kept as {}; the copy written {} ago is back, with {} \
                 journaled batches since it: {runs} runs",
                health.file.display(),
                damaged.display(),
                humantime::format_duration(std::time::Duration::from_secs(age)),
                replayed
            );
            Ok(exit::OK)
        }
        Recovered::SetAside { health, damaged } => {
            println!(
                "{}: the damaged file is kept as {}; there was no good copy, so the next uet \
                 starts a new history",
                health.file.display(),
                damaged.display()
            );
            Ok(exit::RUN_FAILED)
        }
    }
}

fn cmd_metrics(state: Option<PathBuf>, args: &ClientArgs) -> Result<u8, Failure> {
    let code = client_quiet(args, Request::Metrics, true)?;
    if code != exit::NO_DAEMON {
        return Ok(code);
    }
    with_local_state(state, false, |store| {
        let breakers = store.breakers().context("cannot read the breakers")?;
        let text =
            uet::views::metrics::render(store, &breakers, None).context("cannot read the state")?;
        print!("{text}");
        Ok(exit::OK)
    })
}

fn cmd_verify(run: u64, state: Option<PathBuf>, args: &ClientArgs) -> Result<u8, Failure> {
    let code = client_quiet(args, Request::Verify { run }, true)?;
    if code != exit::NO_DAEMON {
        return Ok(code);
    }
    // no daemon holds the state: read it here
    with_local_state(state, false, |store| {
        Ok(print_response(args, uet::daemon::verify_answer(store, run)))
    })
}

/// Prints `uet tools` rows as a table or as a JSON list.
fn print_tools(rows: Vec<serde_json::Value>, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::Value::Array(rows));
        return;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<24} {:<30} SOURCE",
        "TOOL", "KIND", "CAPABILITIES", "BREAKER"
    );
    for r in rows {
        let caps: Vec<&str> = r["capabilities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        let mut source = r["source"].as_str().unwrap_or("").to_string();
        if let Some(v) = r["version"].as_str() {
            source.push_str(&format!(" (v{v})"));
        }
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<24} {:<30} {source}",
            r["name"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            caps.join(","),
            uet::engine::breaker::cell(&r["breaker"]),
        );
    }
}

/// The tools file for a workflow: `--tools`, else `tools.toml` beside it.
fn tools_path(workflow: &Path, given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workflow.parent().unwrap_or(Path::new(".")).join(TOOLS_FILE))
}

fn cmd_validate(files: &[PathBuf], tools: Option<&Path>) -> Result<u8, Failure> {
    let mut problems = Problems::new(Vec::new());
    for file in files {
        let tools_file = tools_path(file, tools);
        let mut tools = if tools.is_none() && !tools_file.exists() {
            // without a tools file the shape is still worth checking; say what was not
            eprintln!(
                "{}: note: no {} beside it; tool names not checked",
                file.display(),
                TOOLS_FILE
            );
            Tools::empty()
        } else {
            match Tools::load_to_read(&tools_file) {
                Ok(t) => t,
                Err(p) => {
                    problems.extend(p);
                    continue;
                }
            }
        };
        if let Err(failure) = default_state_dir()
            .map_err(Failure::from)
            .and_then(|state| plugin_runtime(&mut tools, &state, false))
        {
            match failure {
                Failure::Problems(p) => problems.extend(p),
                Failure::Other(e) => return Err(Failure::Other(e)),
            }
            continue;
        }
        match workflow::load(file, &tools) {
            Ok(plan) => println!(
                "{}: ok: `{}`, {} steps",
                file.display(),
                plan.name,
                plan.steps.len()
            ),
            Err(p) => problems.extend(p),
        }
    }
    if problems.count() == 0 {
        Ok(exit::OK)
    } else {
        Err(Failure::Problems(problems))
    }
}

fn cmd_run(
    file: &Path,
    tools: Option<&Path>,
    state: Option<PathBuf>,
    json: bool,
) -> Result<u8, Failure> {
    if !file.is_file() {
        return Err(anyhow!("{}: no such workflow file", file.display()).into());
    }
    let mut tools = Tools::load(&tools_path(file, tools)).map_err(Failure::Problems)?;
    let state_dir = match state {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    let wasm = plugin_runtime(&mut tools, &state_dir, false)?;
    let plan = workflow::load(file, &tools).map_err(Failure::Problems)?;
    let store = Store::open(&state_dir)
        .with_context(|| format!("cannot open the state in {}", state_dir.display()))?;
    // this process owns the state now: steps an earlier uet left running are stopped
    let (groups, _) = engine::open_groups(&store).map_err(anyhow::Error::from)?;
    let source = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let workstream = source.parent().unwrap_or(Path::new(".")).to_path_buf();
    let step_ids: Vec<String> = plan.steps.iter().map(|s| s.id.clone()).collect();
    let plan_json = serde_json::to_value(&plan).context("cannot encode the plan")?;
    let run = store
        .create_run(
            &plan.name,
            &source.to_string_lossy(),
            &workstream.to_string_lossy(),
            plan_json,
            &step_ids,
        )
        .context("cannot record the run")?;

    // one thread drives the run: the work is in the children and in plugin threads, and
    // handing each step between worker threads cost more than it gave (see PERFORMANCE.md)
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let final_state = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let on_signal = cancel.clone();
        // registered before any step starts: a Ctrl-C from then on cancels, never kills outright
        let mut interrupts =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tokio::spawn(async move {
            if interrupts.recv().await.is_some() {
                eprintln!("uet: canceling (Ctrl-C again to force)…");
                on_signal.cancel();
                if interrupts.recv().await.is_some() {
                    std::process::exit(130);
                }
            }
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let spec = RunSpec {
            run,
            plan: &plan,
            workstream: &workstream,
            tools: &tools,
            wasm,
            pause: None,
            breakers: Arc::new(uet::engine::breaker::Breakers::load(&store)?),
            groups: Arc::new(groups),
        };
        let printer = live_progress(&store, run, plan.steps.len(), rx);
        let (result, ()) = tokio::join!(
            engine::execute(&store, spec, cancel, (!json).then_some(tx)),
            printer
        );
        Ok::<_, anyhow::Error>(result?)
    });
    let final_state = final_state.context("the run could not be driven")?;
    let view = RunView::load(&store, run)
        .context("cannot read the run back")?
        .ok_or_else(|| anyhow!("run {run} vanished from the state"))?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", view.to_json());
    } else {
        let _ = write!(out, "{}", view.to_text());
    }
    Ok(match final_state {
        RunState::Succeeded => exit::OK,
        _ => exit::RUN_FAILED,
    })
}

/// Shows a run's progress on stderr as it goes: on a terminal, a bar with the steps running
/// and the ETA, redrawn in place, with a line above it for each step that ends; otherwise only
/// those lines, so logs stay plain.
async fn live_progress(
    store: &Store,
    run: u64,
    total: usize,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
) {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}") {
            bar.set_style(style.progress_chars("##-"));
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let mut running: std::collections::BTreeSet<String> = Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut eta = String::from("eta …");
    // the bar's message: the ETA (refreshed on the tick) and the steps running (at once)
    let message = |eta: &str, running: &std::collections::BTreeSet<String>| {
        let names: Vec<&str> = running.iter().map(String::as_str).take(4).collect();
        let more = running.len().saturating_sub(names.len());
        let mut msg = format!("{eta} · running: {}", names.join(", "));
        if more > 0 {
            msg.push_str(&format!(" +{more}"));
        }
        msg
    };
    loop {
        tokio::select! {
            notice = notices.recv() => {
                let Some(notice) = notice else { break };
                if let Notice::Step { id, state, .. } = &notice {
                    if *state == StepState::Running {
                        running.insert(id.clone());
                    } else {
                        running.remove(id);
                    }
                    if let (Some(bar), true) = (&bar, state.is_terminal()) {
                        bar.inc(1);
                    }
                }
                match (&bar, notice_line(&notice)) {
                    (Some(bar), Some(line)) if !matches!(notice, Notice::Step { state: StepState::Running, .. } | Notice::Progress { .. }) => bar.println(line),
                    (None, Some(line)) => eprintln!("{line}"),
                    _ => {}
                }
                if let Some(bar) = &bar {
                    bar.set_message(message(&eta, &running));
                }
            }
            _ = tick.tick(), if bar.is_some() => {
                eta = uet::engine::progress::load(store, run)
                    .ok()
                    .flatten()
                    .and_then(|p| p.eta_seconds)
                    .map(|e| format!("eta {e:.1}s"))
                    .unwrap_or_else(|| "eta unknown".into());
                if let Some(bar) = &bar {
                    bar.set_message(message(&eta, &running));
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// A progress line for stderr; quiet about the routine (a step starting) unless stderr is a
/// terminal, so logs of scripted runs stay short.
fn notice_line(notice: &Notice) -> Option<String> {
    match notice {
        Notice::Step {
            id,
            state,
            attempts,
            reason,
        } => {
            let mark = match state {
                StepState::Running if !std::io::stderr().is_terminal() => return None,
                StepState::Running => "…",
                StepState::Succeeded => "✓",
                StepState::Failed => "✗",
                StepState::Skipped => "-",
                StepState::Canceled => "⊘",
                StepState::Pending => return None,
            };
            let mut line = format!("{mark} {id} {state}");
            if state.is_terminal() && *attempts > 1 {
                line.push_str(&format!(" after {attempts} attempts"));
            }
            if let Some(r) = reason {
                line.push_str(&format!(": {r}"));
            }
            Some(line)
        }
        Notice::Progress {
            id,
            fraction,
            message,
        } => std::io::stderr()
            .is_terminal()
            .then(|| format!("… {id} {:.0}% {message}", fraction * 100.0)),
        Notice::Retry {
            id,
            attempt,
            error,
            delay,
        } => Some(format!(
            "↻ {id} attempt {attempt} failed ({error}); retrying in {}",
            humantime::format_duration(std::time::Duration::from_millis(delay.as_millis() as u64))
        )),
    }
}

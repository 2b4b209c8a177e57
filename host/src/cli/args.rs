//! The command line's words: every command and its flags, and the exit codes.

use std::path::PathBuf;
use uet::spec::workflow::Sets;

use clap::{Parser, Subcommand};

/// Exit codes, as the README lists them.
pub(crate) mod exit {
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
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Print what would run, in which order and with which tools, and run nothing.
        #[arg(long)]
        dry_run: bool,
        /// A value for one of the workflow's `[params]` (repeat for more).
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = Sets::parse_one)]
        set: Vec<(String, String)>,
    },
    /// Draw a workflow's plan: its steps and what each needs, as Mermaid or Graphviz DOT.
    Graph {
        /// The workflow file.
        file: PathBuf,
        /// The tools file [default: tools.toml beside the workflow].
        #[arg(long)]
        tools: Option<PathBuf>,
        /// `mermaid` (paste into Markdown) or `dot` (`| dot -Tsvg`).
        #[arg(long, value_enum, default_value = "mermaid")]
        format: GraphFormat,
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
        /// A folder to watch (repeatable); it must exist, unless --create.
        #[arg(long)]
        watch: Vec<PathBuf>,
        /// Create watched folders that do not exist yet (`create = true` in the config).
        #[arg(long)]
        create: bool,
        /// The state folder.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        /// The control socket.
        #[arg(long, env = "UET_SOCKET")]
        socket: Option<PathBuf>,
        /// Serve the web dashboard on this address, e.g. 127.0.0.1:7878 (`uet web` then
        /// prints a login address).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// Let --http be an address beyond this machine's loopback.
        #[arg(long)]
        http_public: bool,
        /// Join a fleet through these NATS servers (comma-separated), docs/FLEET.md.
        #[arg(long, value_delimiter = ',')]
        nats: Vec<String>,
        /// This node's name in the fleet [default: the host name].
        #[arg(long)]
        node: Option<String>,
    },
    /// Print a one-time login address of the daemon's web dashboard.
    Web {
        /// Open it in the desktop's browser too (xdg-open, or $BROWSER).
        #[arg(long)]
        open: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The daemon's state in brief.
    Status(ClientArgs),
    /// List the runs (the daemon's, else the state's): the latest 1,000, oldest first.
    Runs {
        /// How many of the latest runs.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Every run, however many.
        #[arg(long, conflicts_with = "limit")]
        all: bool,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Show a run and its steps (the daemon's, else the state's).
    Show {
        /// The run: its number, or `last` (the newest).
        run: RunRef,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Have the daemon run a workflow file (its folder is the workstream).
    Submit {
        /// The workflow file.
        file: PathBuf,
        /// Wait for the run to end, and exit with its code (0 succeeded, 1 otherwise).
        #[arg(long)]
        wait: bool,
        /// A value for one of the workflow's `[params]` (repeat for more).
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = Sets::parse_one)]
        set: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a run: its running steps are killed at once.
    Cancel {
        /// The run: its number, or `last` (the newest).
        run: RunRef,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Re-run a failed or canceled run: steps that succeeded keep their outputs.
    Retry {
        /// The run: its number, or `last` (the newest).
        run: RunRef,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put a quarantined run back in the queue.
    Release {
        /// The run: its number, or `last` (the newest).
        run: RunRef,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Withdraw a standing workflow (by name; `uet status` lists them): it no longer runs on
    /// changes or on its schedule, now or after a restart. A run going goes on.
    Unwatch {
        /// The workflow's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print what a run's attempts printed (a command's stdout and stderr) and logged (a
    /// plugin's log lines), step by step (the daemon's, else the state's).
    Logs {
        /// The run: its number, or `last` (the newest).
        run: RunRef,
        /// One step, by id [default: every step].
        step: Option<String>,
        /// One attempt of the step, by number [default: every attempt].
        #[arg(long, requires = "step")]
        attempt: Option<u32>,
        /// Keep printing each attempt as it ends, until the run ends; exit with the run's
        /// code (0 succeeded, 1 otherwise).
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print the event log (the audit trail) of a run, or of every run.
    Events {
        /// The run: its number, or `last` [default: every run].
        run: Option<RunRef>,
        /// Keep printing events as they happen (until the run ends, or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        /// Only events of the last while ("10m", "2h") or since a time ("2026-12-01T10:00:00Z").
        #[arg(long, value_parser = since_time)]
        since: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        state: StateArgs,
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
        /// Time between refreshes: seconds (`2`, `0.5`) or a duration (`500ms`).
        #[arg(long, default_value = "1", value_parser = seconds_or_duration)]
        every: std::time::Duration,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        state: StateArgs,
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
        /// The run: its number, or `last` (the newest).
        run: RunRef,
        /// The state folder, when no daemon answers.
        #[arg(long, env = "UET_STATE")]
        state: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop the daemon gracefully: running steps get its grace period, then go back to pending.
    Shutdown {
        /// Return only once the daemon has stopped (its socket gone).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check the state file, or put its last good copy back (no daemon may hold it).
    #[command(subcommand)]
    State(StateCommand),
    /// Work with plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print shell completions for `uet` (bash, zsh, fish, elvish, powershell): see
    /// docs/SERVICE.md for where each shell looks for them.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff: `uet man | man -l -`); with `--dir`, write a page for
    /// `uet` and one for each command (uet-run.1, ...) into that folder.
    Man {
        /// Where to write the pages, such as ~/.local/share/man/man1.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
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

impl Command {
    /// Whether the command only reads and prints (so may end when its reader does).
    pub(crate) fn only_prints(&self) -> bool {
        match self {
            Command::Run { dry_run, .. } => *dry_run,
            Command::Graph { .. }
            | Command::Tools { .. }
            | Command::Status(_)
            | Command::Runs { .. }
            | Command::Show { .. }
            | Command::Logs { .. }
            | Command::Events { .. }
            | Command::Metrics { .. }
            | Command::Verify { .. }
            | Command::Completions { .. }
            | Command::Man { dir: None }
            | Command::Validate { .. } => true,
            _ => false,
        }
    }
}

/// How a client command finds the daemon.
#[derive(clap::Args)]
pub(crate) struct ClientArgs {
    /// The daemon's socket [default: $XDG_RUNTIME_DIR/uet/uet.sock, else /tmp/uet-UID/uet.sock].
    #[arg(long, env = "UET_SOCKET")]
    pub(crate) socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Where a command that reads finds the state when no daemon answers.
#[derive(clap::Args)]
pub(crate) struct StateArgs {
    /// The state folder to read when no daemon answers [default: $UET_STATE, else
    /// $XDG_STATE_HOME/uet, else ~/.local/state/uet].
    #[arg(long, env = "UET_STATE")]
    pub(crate) state: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum StateCommand {
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
pub(crate) enum PluginCommand {
    /// Scaffold a plugin crate that builds as it is.
    New {
        /// The plugin's name (lowercase, `-` allowed).
        name: String,
        /// A uet-plugin-sdk folder to depend on [default: a copy of this uet's SDK, written
        /// into the new crate].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// A time given as seconds (`2`, `0.5`) or as a duration with its unit (`500ms`, `1m`).
fn seconds_or_duration(text: &str) -> Result<std::time::Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(std::time::Duration::from_secs_f64(s)),
        Ok(_) => Err(format!("{text:?} is not a positive number of seconds")),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// How `uet graph` draws.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum GraphFormat {
    /// A Mermaid flowchart.
    Mermaid,
    /// A Graphviz digraph.
    Dot,
}

/// A run as the command line names it: by number, or `last`, the newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunRef {
    /// Run N.
    Id(u64),
    /// The newest run.
    Last,
}

impl std::str::FromStr for RunRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "last" => Ok(RunRef::Last),
            n => n
                .parse()
                .map(RunRef::Id)
                .map_err(|_| format!("{n:?} is not a run: give its number, or `last`")),
        }
    }
}

/// `--since`: a while ago ("10m"), or an RFC 3339 time; as milliseconds since the epoch.
fn since_time(text: &str) -> Result<u64, String> {
    let at = match humantime::parse_duration(text) {
        Ok(ago) => std::time::SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text:?} reaches before 1970"))?,
        Err(_) => humantime::parse_rfc3339_weak(text).map_err(|_| {
            format!("{text:?} is neither a while (\"10m\") nor a time (\"2026-12-01T10:00:00Z\")")
        })?,
    };
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_millis() as u64)
}

//! The `uet` command line: parses the words, hands each command to its module (running a
//! workflow, the daemon, asking the daemon, reading a state), and turns the outcome into an
//! exit code, in one place.

mod args;
mod client;
mod daemon;
mod local;
mod plan;
mod print;
mod run;
pub mod scaffold;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use uet::spec::workflow::Sets;

use anyhow::{Context, anyhow};
use clap::Parser;

use uet::api::protocol::Request;
use uet::spec::doc::Problems;

use args::{Cli, Command, PluginCommand, StateCommand, exit};

/// An error that maps to an exit code; everything else is invalid input (2).
pub(crate) enum Failure {
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
    pub(crate) static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on the state `file`, turning a panic inside it (redb's, on a damaged page) into an
/// error that names the file and says what to do.
pub(crate) fn guarded<T>(
    file: &Path,
    f: impl FnOnce() -> Result<T, Failure>,
) -> Result<T, Failure> {
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

/// Runs the command line.
pub fn main() -> ExitCode {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !QUIET_PANICS.with(|q| q.get()) {
            default_hook(info);
        }
    }));
    let cli = Cli::parse();
    // uet's own lifecycle lines (a daemon's start and stop, runs submitted) and every warning;
    // colours only for a terminal, so a journal or a log file stays plain text
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,uet=info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if cli.command.only_prints() {
        // `uet show 1 | head`: a reader that stops early ends the printer quietly, as for any
        // Unix tool, instead of a "Broken pipe" panic. Only for commands that change nothing:
        // the daemon, the dashboard and `uet run` must never die of a closed pipe.
        // SAFETY: resetting a signal's disposition before any thread is started
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    report(dispatch(cli.command))
}

/// Hands a command to what carries it out.
fn dispatch(command: Command) -> Result<u8, Failure> {
    match command {
        Command::Run {
            file,
            tools,
            json,
            dry_run: true,
            set,
            ..
        } => plan::dry_run(&file, tools.as_deref(), &Sets(set), json),
        Command::Run {
            file,
            tools,
            state,
            json,
            dry_run: false,
            set,
        } => run::run(&file, tools.as_deref(), &Sets(set), state, json),
        Command::Graph {
            file,
            tools,
            format,
        } => plan::graph(&file, tools.as_deref(), format),
        Command::Validate { files, tools } => run::validate(&files, tools.as_deref()),
        Command::Tools {
            tools,
            state,
            client,
        } => run::tools(tools.as_deref(), state, &client),
        Command::Daemon {
            config,
            tools,
            watch,
            create,
            state,
            socket,
            http,
            http_public,
            nats,
            node,
        } => daemon::daemon(
            config,
            tools,
            daemon::Folders { watch, create },
            state,
            socket,
            daemon::Http {
                addr: http,
                public: http_public,
            },
            daemon::Nats { urls: nats, node },
        ),
        Command::Web { open, client } => client::web(&client, open),
        Command::Runs {
            limit,
            all,
            client,
            state,
        } => local::runs((!all).then_some(limit), &client, state.state),
        Command::Show { run, client, state } => {
            let run = run_number(run, &client, state.state.clone())?;
            local::show(run, &client, state.state)
        }
        Command::Events {
            run,
            follow,
            since,
            client,
            state,
        } => {
            let run = match run {
                Some(r) => Some(run_number(r, &client, state.state.clone())?),
                None => None,
            };
            local::events((run, since), follow, &client, state.state)
        }
        Command::Logs {
            run,
            step,
            attempt,
            follow,
            client,
            state,
        } => {
            let run = run_number(run, &client, state.state.clone())?;
            if follow {
                let code = client::follow_logs(&client, run, step.clone(), attempt)?;
                if code != exit::NO_DAEMON {
                    return Ok(code);
                }
            }
            // without a daemon nothing moves: what the state holds is all there is
            local::logs(run, step, attempt, &client, state.state)
        }
        Command::Top {
            every,
            client,
            state,
        } => local::top(every, &client, state.state),
        Command::Verify { run, state, client } => {
            let run = run_number(run, &client, state.clone())?;
            local::verify(run, state, &client)
        }
        Command::Metrics { state, client } => local::metrics(state, &client),
        Command::Prune {
            older_than,
            keep,
            state,
            client,
        } => local::prune(older_than, keep, state, &client),
        Command::State(StateCommand::Check { state, json }) => local::state_check(state, json),
        Command::State(StateCommand::Recover { state }) => local::state_recover(state),
        Command::Plugin(PluginCommand::New { name, sdk }) => new_plugin(&name, sdk),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "uet", &mut std::io::stdout());
            Ok(exit::OK)
        }
        Command::Man { dir } => manual(dir),
        other => ask_daemon(other),
    }
}

/// The number of the run the command line names: `last` is the newest run, the daemon's when
/// one answers, else the state's.
fn run_number(
    run: args::RunRef,
    client: &args::ClientArgs,
    state: Option<PathBuf>,
) -> Result<u64, Failure> {
    let newest = match run {
        args::RunRef::Id(n) => return Ok(n),
        args::RunRef::Last => match client::newest_run(client)? {
            Some(newest) => newest,
            None => local::newest_run(state)?,
        },
    };
    newest.ok_or_else(|| anyhow!("there is no run yet for `last` to name").into())
}

/// The commands that only a daemon can carry out.
fn ask_daemon(command: Command) -> Result<u8, Failure> {
    let (client, request) = match command {
        Command::Status(c) => (c, Request::Status),
        Command::Submit {
            file,
            wait,
            set,
            client,
        } => match std::path::absolute(&file) {
            Ok(path) if wait => return client::submit_and_wait(&client, path, Sets(set)),
            Ok(path) => (
                client,
                Request::Submit {
                    path,
                    sets: Sets(set),
                },
            ),
            Err(e) => return Err(anyhow!("{}: {e}", file.display()).into()),
        },
        Command::Cancel { run, client } => {
            let run = run_number(run, &client, None)?;
            (client, Request::Cancel { run })
        }
        Command::Retry { run, client } => {
            let run = run_number(run, &client, None)?;
            (client, Request::Retry { run })
        }
        Command::Release { run, client } => {
            let run = run_number(run, &client, None)?;
            (client, Request::Release { run })
        }
        Command::Unwatch { name, client } => (client, Request::Unwatch { name }),
        Command::Shutdown { wait: true, client } => return client::shutdown_and_wait(&client),
        Command::Shutdown { client, .. } => (client, Request::Shutdown),
        _ => unreachable!("dispatched before"),
    };
    client::send(&client, request)
}

/// `uet man`: the page on stdout, or every command's page into a folder.
fn manual(dir: Option<PathBuf>) -> Result<u8, Failure> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(cmd, &dir))
                .with_context(|| format!("cannot write manual pages into {}", dir.display()))?;
            println!("manual pages written to {}", dir.display());
        }
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("cannot print the manual page")?,
    }
    Ok(exit::OK)
}

fn new_plugin(name: &str, sdk: Option<PathBuf>) -> Result<u8, Failure> {
    let dir =
        scaffold::new_plugin(Path::new("."), name, sdk.as_deref()).map_err(anyhow::Error::from)?;
    println!(
        "created {}: `cargo test` there, then `cargo build --release --target wasm32-wasip2`",
        dir.display()
    );
    Ok(exit::OK)
}

/// The exit code of a command's outcome, with what went wrong on stderr.
fn report(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Problems(p)) => {
            eprintln!("{p}");
            eprintln!("{}", p.nothing_run());
            ExitCode::from(exit::INVALID)
        }
        Err(Failure::Other(e)) => {
            eprintln!("uet: {e:#}");
            ExitCode::from(exit::INVALID)
        }
    }
}

pub(crate) fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("uet"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("no HOME: pass --state DIR"))?;
    Ok(PathBuf::from(home).join(".local/state/uet"))
}

//! The `uet` command line; see `cli.rs`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

//! End-to-end tests: the real `uet` binary against real workflows, tools and state files.

mod util;

mod daemon;
mod plugins;
mod run;
mod state;
mod validate;

//! End-to-end tests: the real `uet` binary against real workflows, tools and state files.

mod util;

mod architecture;
mod browser;
mod daemon;
mod daemon_ops;
mod fleet;
mod hardening;
mod languages;
mod monitoring;
mod notify;
mod params;
mod plugins;
mod progress;
mod resilience;
mod run;
mod secrets;
mod service;
mod standing;
mod state;
mod terminal;
mod torture;
mod validate;
mod web;

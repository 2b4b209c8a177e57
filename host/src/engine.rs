//! Driving runs: the scheduler, the circuit breakers shared by runs, and progress with ETAs.
//! It reads and writes the state, and reaches tools only through the adapters.

pub mod breaker;
pub mod notify;
pub mod progress;
mod relay;
mod run;

pub use run::*;

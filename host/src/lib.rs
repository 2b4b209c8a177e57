//! uet: runs workflows dropped into watched folders, step by step, in sandboxed tools, with
//! durable state.

pub mod breaker;
pub mod daemon;
pub mod doc;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod process;
pub mod progress;
pub mod protocol;
pub mod report;
pub mod scaffold;
pub mod store;
pub mod template;
pub mod tools;
pub mod top;
pub mod wasm;
pub mod workflow;

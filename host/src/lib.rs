//! uet: runs workflows dropped into watched folders, step by step, in sandboxed tools, with
//! durable state.

pub mod model;
pub mod process;
pub mod store;

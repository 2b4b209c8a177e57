//! The durable state: one redb file behind a redo journal, its schema, the batches that change
//! it, the queries that read it, and its copies and repair. Nothing here knows the engine or
//! the daemon.

mod journal;
mod store;

pub use journal::JOURNAL_FILE;
pub use store::*;

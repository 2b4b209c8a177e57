//! What people and scrapers see: a run's report, `uet top`'s frames, Prometheus metrics, a
//! run's graph laid out.

pub mod graph;
pub mod metrics;
pub mod report;
pub mod top;

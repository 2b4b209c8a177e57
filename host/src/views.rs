//! What people and scrapers see: a run's report, `uet top`'s frames, Prometheus metrics.

pub mod metrics;
pub mod report;
pub mod top;

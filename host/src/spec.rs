//! What users write: the document reader both formats share, workflows, the tools file, and
//! the two small template languages. Built without the `runtime` feature too: it is what the
//! fuzz targets take apart.

pub mod doc;
#[cfg(feature = "runtime")]
pub mod inputs;
pub mod schedule;
pub mod template;
pub mod tools;
pub mod workflow;

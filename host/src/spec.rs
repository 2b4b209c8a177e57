//! What users write: the document reader both formats share, workflows, the tools file, and
//! the two small template languages. Built without the `runtime` feature too: it is what the
//! fuzz targets take apart.

pub mod doc;
pub mod schedule;
pub mod template;
pub mod tools;
pub mod workflow;

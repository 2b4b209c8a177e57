//! The command line's own parts, apart from `main`: scaffolding a plugin crate.

pub mod scaffold;

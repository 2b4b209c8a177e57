//! The plugin author's crate: implement one trait, call one macro, and build for
//! `wasm32-wasip2`. The interface lives in `wit/`; this crate arrives with the WASM plugin
//! runtime and stays empty until then.
#![warn(missing_docs)]

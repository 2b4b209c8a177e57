//! uet: runs workflows dropped into watched folders, step by step, in sandboxed tools, with
//! durable state.
//!
//! The rooms, by concern (docs/ARCHITECTURE.md has the map and the data flow):
//! [`spec`] what users write, [`model`] the records every room shares, [`state`] the durable
//! state, [`engine`] driving runs, [`adapters`] plugins and commands, [`daemon`] the watched
//! folders and the socket, [`views`] what people see, [`api`] the facade and the protocol, [`web`] the dashboard.

// What the fuzz targets build (without the `runtime` feature): the parsers and the frame decoder.
pub mod api;
pub mod model;
pub mod spec;

// The rest needs the `runtime` feature. Declared one by one, not by a macro: rustfmt does not
// look into modules a macro declares.
#[cfg(feature = "runtime")]
pub mod adapters;
#[cfg(feature = "runtime")]
pub mod daemon;
#[cfg(feature = "runtime")]
pub mod engine;
#[cfg(feature = "runtime")]
pub mod fleet;
#[cfg(feature = "runtime")]
pub mod state;
#[cfg(feature = "runtime")]
pub mod views;
#[cfg(feature = "runtime")]
pub mod web;

/// What a caught panic said: its message when it had one.
#[cfg(feature = "runtime")]
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Lower-case hex of a digest: event hashes, submission checksums, plugin cache keys. By table,
/// not a `format!` per byte, which was a third of the cost of recording an event.
#[cfg(feature = "runtime")]
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

//! uet: runs workflows dropped into watched folders, step by step, in sandboxed tools, with
//! durable state.

pub mod breaker;
pub mod daemon;
pub mod doc;
pub mod engine;
pub mod journal;
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

/// Lower-case hex of a digest: event hashes, submission checksums, plugin cache keys. By table,
/// not a `format!` per byte, which was a third of the cost of recording an event.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

//! uet: runs workflows dropped into watched folders, step by step, in sandboxed tools, with
//! durable state.

// What the fuzz targets build (without the `runtime` feature): the parsers and the frame decoder.
pub mod doc;
pub mod model;
pub mod protocol;
pub mod template;
pub mod tools;
pub mod workflow;

/// Declares modules that need the `runtime` feature.
macro_rules! runtime_modules {
    ($($module:ident),* $(,)?) => {
        $(
            #[cfg(feature = "runtime")]
            pub mod $module;
        )*
    };
}

runtime_modules!(
    beneath, breaker, daemon, engine, journal, metrics, process, progress, report, scaffold, spawn,
    store, top, wasm,
);

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

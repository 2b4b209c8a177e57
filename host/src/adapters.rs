//! Where steps meet the world: WASM plugins in their sandbox (the only module that names
//! wasmtime's types), commands in process groups, and the file-system helpers that keep a
//! grant inside its folder. Adapters know nothing of the engine or the state.

pub mod beneath;
pub mod process;
pub mod spawn;
pub mod wasm;

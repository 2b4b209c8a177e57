//! Write a uet tool plugin: implement [`Plugin`], call [`export_plugin!`], and build the crate
//! (`crate-type = ["cdylib", "rlib"]`) for `wasm32-wasip2`.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use uet_plugin_sdk::{Error, Plugin, export_plugin};
//!
//! /// Says hello to whoever the step names.
//! struct Greeter;
//!
//! #[derive(Deserialize)]
//! struct Input {
//!     name: String,
//! }
//!
//! #[derive(Serialize)]
//! struct Output {
//!     greeting: String,
//! }
//!
//! impl Plugin for Greeter {
//!     type Input = Input;
//!     type Output = Output;
//!     const CAPABILITIES: &'static [&'static str] = &["text.greet"];
//!
//!     fn run(input: Input) -> Result<Output, Error> {
//!         if input.name.is_empty() {
//!             return Err(Error::fatal("`name` is empty"));
//!         }
//!         uet_plugin_sdk::progress(1.0, "greeted");
//!         Ok(Output { greeting: format!("hello, {}", input.name) })
//!     }
//! }
//!
//! export_plugin!(Greeter);
//!
//! // the same logic, tested natively, the way the host calls it
//! let out = uet_plugin_sdk::testing::run::<Greeter>(r#"{"name": "ada"}"#).unwrap();
//! assert_eq!(out["greeting"], "hello, ada");
//! let err = uet_plugin_sdk::testing::run::<Greeter>(r#"{"nom": 1}"#).unwrap_err();
//! assert!(!err.is_retryable());
//! ```
//!
//! Files, clocks and randomness come through WASI (`std::fs`, `std::time`): the plugin sees only
//! the folders its tool entry grants, relative to the workstream (`std::fs::read("docs/a.md")`).
#![warn(missing_docs)]

// the generated bindings name this crate by its public path, as plugin crates see it
extern crate self as uet_plugin_sdk;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The generated bindings of `wit/plugin.wit`; the [`export_plugin!`] macro's business.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "uet_plugin_sdk::bindings",
        runtime_path: "uet_plugin_sdk::__wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// A tool plugin. Implement it on a unit struct and pass that struct to [`export_plugin!`].
pub trait Plugin {
    /// The step's `with`, decoded from JSON; a step whose input does not decode fails with an
    /// error that says why, and is not retried.
    type Input: DeserializeOwned;
    /// What the step hands on to later steps, encoded as JSON.
    type Output: Serialize;
    /// What the plugin can do (`"text.count"`); steps ask for these by `capability`.
    const CAPABILITIES: &'static [&'static str];

    /// A JSON schema of [`Plugin::Input`], shown by `uet tools`; any object by default.
    fn input_schema() -> serde_json::Value {
        serde_json::json!({ "type": "object" })
    }

    /// Runs one attempt of a step.
    fn run(input: Self::Input) -> Result<Self::Output, Error>;
}

/// Why a run failed, and whether another attempt could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    retryable: bool,
}

impl Error {
    /// A failure no retry can fix: bad input, a missing file.
    pub fn fatal(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            retryable: false,
        }
    }

    /// A failure another attempt may get past: a busy or unavailable resource.
    pub fn retryable(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            retryable: true,
        }
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether another attempt could succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error converts to a fatal one with its message, so `?` works on I/O and parsing.
impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Self {
        Error::fatal(e.to_string())
    }
}

/// Reports how far the current step has got (`fraction` from 0.0 to 1.0) and what it is doing.
pub fn progress(fraction: f32, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::uet::plugin::host::progress(fraction.clamp(0.0, 1.0), message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("progress {:.0}%: {message}", fraction * 100.0);
}

/// Logs a line at `info`; it lands in the run's event log.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs a line at `warn`.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs a line at `debug`.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// How much a log line matters.
pub use bindings::uet::plugin::host::Level;

/// Logs a line at any level.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    bindings::uet::plugin::host::log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("{level:?}: {message}");
}

/// Tests a plugin natively, the way the host calls it: JSON text in, JSON value out.
pub mod testing {
    use super::*;

    /// Runs `P` on a JSON input.
    pub fn run<P: Plugin>(input: &str) -> Result<serde_json::Value, Error> {
        let output = __private::run_json::<P>(input)?;
        serde_json::from_str(&output).map_err(|e| Error::fatal(e.to_string()))
    }
}

/// What [`export_plugin!`] expands to call.
#[doc(hidden)]
pub mod __private {
    use super::*;
    use crate::bindings::exports::uet::plugin::tool::{Description, RunError};

    pub fn describe<P: Plugin>(name: &str, version: &str) -> Description {
        Description {
            name: name.to_string(),
            version: version.to_string(),
            capabilities: P::CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            input_schema: P::input_schema().to_string(),
        }
    }

    pub fn run<P: Plugin>(input: &str) -> Result<String, RunError> {
        run_json::<P>(input).map_err(|e| RunError {
            message: e.message,
            retryable: e.retryable,
        })
    }

    pub(crate) fn run_json<P: Plugin>(input: &str) -> Result<String, Error> {
        let input: P::Input =
            serde_json::from_str(input).map_err(|e| Error::fatal(format!("invalid input: {e}")))?;
        let output = P::run(input)?;
        serde_json::to_string(&output)
            .map_err(|e| Error::fatal(format!("cannot encode the output: {e}")))
    }
}

/// Exports a [`Plugin`] as the component's `tool` interface; call it once per plugin crate.
///
/// ```ignore
/// uet_plugin_sdk::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __UetPluginExport;

        impl $crate::bindings::exports::uet::plugin::tool::Guest for __UetPluginExport {
            fn describe() -> $crate::bindings::exports::uet::plugin::tool::Description {
                $crate::__private::describe::<$plugin>(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            }

            fn run(
                input: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::bindings::exports::uet::plugin::tool::RunError> {
                $crate::__private::run::<$plugin>(&input)
            }
        }

        // native builds (the plugin's own tests) link as ordinary libraries, which cannot carry
        // the component's export names
        #[cfg(target_arch = "wasm32")]
        $crate::bindings::__export_plugin_world!(__UetPluginExport with_types_in $crate::bindings);
    };
}

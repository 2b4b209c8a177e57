//! `uet plugin new NAME`: a plugin crate that builds as it is.

use std::path::{Path, PathBuf};

/// Why a plugin could not be scaffolded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScaffoldError {
    /// The name cannot be a crate and component name.
    #[error("plugin name {0:?}: use lowercase letters, digits and `-`, starting with a letter")]
    BadName(String),
    /// Something is already there.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// The SDK folder was not found.
    #[error("no uet-plugin-sdk at {0}: pass --sdk PATH to the plugin-sdk folder of a uet checkout")]
    NoSdk(PathBuf),
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// What.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The SDK's source and the interface, carried in the binary: a scaffold gets its own copy, so
/// it builds wherever uet was installed from, and names no folder of the machine uet was
/// built on.
const SDK_LIB: &str = include_str!("../../../plugin-sdk/src/lib.rs");
const SDK_MANIFEST: &str = include_str!("../../../plugin-sdk/Cargo.toml");
const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");

/// The folder of the SDK's copy inside a scaffold.
const SDK_DIR: &str = "uet-plugin-sdk";

/// The copied SDK's manifest: the SDK's own dependencies, without the workspace it lives in.
fn sdk_manifest() -> String {
    let deps = SDK_MANIFEST
        .split_once("[dependencies]")
        .map(|(_, d)| d)
        .unwrap_or_default();
    format!(
        "[package]\nname = \"uet-plugin-sdk\"\nversion = \"{}\"\nedition = \"2024\"\npublish = false\n\n[dependencies]{deps}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Writes a new plugin crate named `name` into `dir/name`, and returns its folder. With `sdk`,
/// it depends on that SDK folder; without, on a copy of the SDK written beside it.
pub fn new_plugin(dir: &Path, name: &str, sdk: Option<&Path>) -> Result<PathBuf, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    let sdk = match sdk {
        Some(sdk) => {
            let sdk =
                std::fs::canonicalize(sdk).map_err(|_| ScaffoldError::NoSdk(sdk.to_path_buf()))?;
            if !sdk.join("Cargo.toml").is_file() {
                return Err(ScaffoldError::NoSdk(sdk));
            }
            Some(sdk.to_string_lossy().into_owned())
        }
        None => None,
    };
    let root = dir.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let mut files = vec![
        (
            "Cargo.toml",
            CARGO_TOML
                .replace("{name}", name)
                .replace("{sdk}", sdk.as_deref().unwrap_or(SDK_DIR)),
        ),
        (
            "src/lib.rs",
            LIB_RS.replace("{Type}", &type_name).replace("{name}", name),
        ),
        (
            "README.md",
            README_MD
                .replace("{name}", name)
                .replace("{snake}", &name.replace('-', "_")),
        ),
    ];
    if sdk.is_none() {
        // the SDK generates its bindings from `../wit`: the scaffold's own wit/ folder
        files.push(("uet-plugin-sdk/Cargo.toml", sdk_manifest()));
        files.push(("uet-plugin-sdk/src/lib.rs", SDK_LIB.to_string()));
        files.push(("wit/plugin.wit", PLUGIN_WIT.to_string()));
    }
    for (rel, text) in files {
        let path = root.join(rel);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap_or(&root))?;
            std::fs::write(&path, text)
        };
        write().map_err(|source| ScaffoldError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(root)
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# a plugin is its own workspace, wherever it sits
[workspace]

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
uet-plugin-sdk = { path = "{sdk}" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[profile.release]
strip = true
opt-level = "s"
"#;

const LIB_RS: &str = r##"//! A uet tool plugin: counts the characters of a text.

use serde::{Deserialize, Serialize};
use uet_plugin_sdk::{Error, Plugin, export_plugin};

/// The plugin.
pub struct {Type};

/// The step's `with`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The text to measure.
    pub text: String,
}

/// What the step hands on.
#[derive(Serialize)]
pub struct Output {
    /// Characters in `text`.
    pub chars: usize,
}

impl Plugin for {Type} {
    type Input = Input;
    type Output = Output;
    const CAPABILITIES: &'static [&'static str] = &["{name}.measure"];

    fn run(input: Input) -> Result<Output, Error> {
        uet_plugin_sdk::info("measuring");
        Ok(Output { chars: input.text.chars().count() })
    }
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_characters() {
        let out = uet_plugin_sdk::testing::run::<{Type}>(r#"{"text": "héllo"}"#).unwrap();
        assert_eq!(out["chars"], 5);
    }
}
"##;

const README_MD: &str = r#"# {name}

A uet tool plugin. `uet-plugin-sdk/` is the SDK and `wit/plugin.wit` the interface, as the
uet that made this crate had them. Test it natively, build it as a WASM component:

```sh
cargo test
cargo build --release --target wasm32-wasip2   # → target/wasm32-wasip2/release/{snake}.wasm
```

Register it in a `tools.toml`:

```toml
[[tools]]
name = "{name}"
wasm = "path/to/target/wasm32-wasip2/release/{snake}.wasm"
sandbox = { read = ["."] }
```
"#;

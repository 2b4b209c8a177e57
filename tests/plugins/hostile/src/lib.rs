//! A test plugin that misbehaves on request, so the tests can show that each misdeed ends its
//! own attempt only, with a clear reason.

use std::hint::black_box;

use serde::Deserialize;
use serde_json::{Value, json};
use uet_plugin_sdk::{Error, Plugin, export_plugin};

/// The plugin.
pub struct Hostile;

/// What to do.
#[derive(Deserialize)]
pub struct Input {
    /// The misdeed.
    pub mode: String,
    /// A path, for the file modes.
    #[serde(default)]
    pub path: String,
    /// Bytes, for the output mode.
    #[serde(default)]
    pub size: usize,
    /// Milliseconds, for the sleep mode.
    #[serde(default)]
    pub ms: u64,
}

impl Plugin for Hostile {
    type Input = Input;
    type Output = Value;
    const CAPABILITIES: &'static [&'static str] = &["test.hostile"];

    fn run(input: Input) -> Result<Value, Error> {
        match input.mode.as_str() {
            // nothing at all: what a plugin call costs by itself
            "noop" => Ok(json!({})),
            // a step that takes a while and then behaves: a worker can be killed during it
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_millis(input.ms));
                Ok(json!({"slept": input.ms}))
            }
            "ok" => {
                uet_plugin_sdk::info("behaving, for once");
                uet_plugin_sdk::progress(0.5, "halfway");
                Ok(json!({"mode": "ok", "path": input.path}))
            }
            "loop" => {
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "mark-then-loop" => {
                // tells the test it has started, then never returns on its own
                std::fs::write(&input.path, "started")
                    .map_err(|e| Error::fatal(format!("write {}: {e}", input.path)))?;
                let mut n = 0u64;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "recurse" => Ok(json!(recurse(black_box(0)))),
            "panic" => panic!("hostile plugin panics on purpose"),
            "read" => {
                let text = std::fs::read_to_string(&input.path)
                    .map_err(|e| Error::fatal(format!("read {}: {e}", input.path)))?;
                Ok(json!({"read": text}))
            }
            "write" => {
                std::fs::write(&input.path, "hostile was here")
                    .map_err(|e| Error::fatal(format!("write {}: {e}", input.path)))?;
                Ok(json!({"wrote": input.path}))
            }
            "env" => Ok(json!({"vars": std::env::vars().count()})),
            "stdout" => {
                // a flood on stdout must be cut, not fill the host's memory
                for _ in 0..100_000 {
                    println!("{}", "x".repeat(100));
                }
                Ok(json!({}))
            }
            // a result far larger than any step should hand on
            "big" => Ok(json!({"big": "x".repeat(input.size)})),
            // an error as long as a result could be
            "big-error" => Err(Error::fatal("e".repeat(input.size))),
            other => Err(Error::fatal(format!("unknown mode {other:?}"))),
        }
    }
}

// unbounded on purpose: the host must stop it with a stack-overflow trap
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    black_box(recurse(black_box(depth + 1))) + 1
}

export_plugin!(Hostile);

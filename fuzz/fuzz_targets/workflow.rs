//! The workflow parser and validator: any bytes give a plan or problems, never a panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use uet::spec::tools::Tools;

/// Tools the fuzzed workflows may name, by tool and by capability.
fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        Tools::parse(
            Path::new("tools.toml"),
            b"[[tools]]\nname = \"echo\"\ncommand = [\"cat\"]\ncapabilities = [\"text.count\"]\n\
              [[tools]]\nname = \"lint\"\ncommand = [\"lint\", \"{path}\"]\ncapabilities = [\"lint\"]\n",
        )
        .expect("the fuzz tools file is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    // the first byte picks the format, as a file's extension would
    let (name, body) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => ("w.json", rest),
        Some((_, rest)) => ("w.toml", rest),
        None => ("w.toml", data),
    };
    match uet::spec::workflow::parse(Path::new(name), body, tools()) {
        Ok(plan) => {
            // a plan that passed is usable: its needs point at earlier-checked steps
            for step in &plan.steps {
                assert!(step.needs.iter().all(|&n| n < plan.steps.len()));
            }
        }
        Err(problems) => assert!(problems.count() > 0),
    }
});

//! The tools file parser: any bytes give tools or problems, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match uet::spec::tools::Tools::parse(Path::new("/fuzz/tools.toml"), data) {
        Ok(tools) => {
            for tool in &tools.tools {
                assert!(!tool.name.is_empty());
            }
        }
        Err(problems) => assert!(problems.count() > 0),
    }
});

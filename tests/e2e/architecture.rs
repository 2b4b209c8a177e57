//! The walls between the rooms (docs/ARCHITECTURE.md): imports that must never exist.

use std::path::{Path, PathBuf};

/// Every `.rs` file of a room: its top file and its folder.
fn room(name: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join(format!("{name}.rs"))];
    let mut todo = vec![src.join(name)];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.retain(|f| f.exists());
    files
}

/// Lines of a room's files that name one of `forbidden` (`crate::engine`, `wasmtime`, ...).
fn crossings(name: &str, forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in room(name) {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for f in forbidden {
                if line.contains(f) {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    found
}

#[test]
fn the_rooms_import_only_through_their_doors() {
    let rules: [(&str, &[&str]); 7] = [
        (
            "state",
            &[
                "crate::engine",
                "crate::daemon",
                "crate::adapters",
                "crate::views",
                "crate::api",
            ],
        ),
        (
            "adapters",
            &[
                "crate::engine",
                "crate::state",
                "crate::daemon",
                "crate::api",
            ],
        ),
        (
            "engine",
            &[
                "crate::daemon",
                "crate::views",
                "crate::api",
                "crate::fleet",
            ],
        ),
        ("fleet", &["crate::daemon", "crate::cli", "crate::web"]),
        ("api", &["crate::daemon", "crate::cli", "crate::web"]),
        (
            "web",
            &[
                "crate::daemon",
                "crate::cli",
                "crate::engine",
                "crate::adapters",
                "crate::state",
            ],
        ),
        (
            "spec",
            &[
                "crate::state",
                "crate::engine",
                "crate::daemon",
                "crate::adapters",
                "crate::api",
            ],
        ),
    ];
    for (name, forbidden) in rules {
        assert!(!room(name).is_empty(), "no room {name}");
        let found = crossings(name, forbidden);
        assert!(
            found.is_empty(),
            "{name} reaches through a wall:\n{}",
            found.join("\n")
        );
    }
    for name in [
        "spec", "state", "engine", "daemon", "views", "api", "web", "fleet",
    ] {
        let found = crossings(name, &["wasmtime"]);
        assert!(
            found.is_empty(),
            "only adapters name wasmtime:\n{}",
            found.join("\n")
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for manifest in [
        "plugin-sdk/Cargo.toml",
        "plugins/wordcount/Cargo.toml",
        "plugins/template/Cargo.toml",
    ] {
        let text = std::fs::read_to_string(root.join(manifest)).unwrap();
        assert!(
            !text.contains("\"../../host\"") && !text.contains("\"../host\""),
            "{manifest} depends on the host"
        );
    }
}

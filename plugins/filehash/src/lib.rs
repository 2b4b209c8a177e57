//! The sha256 of each file matching a glob, and one digest over all of them, so a later step
//! (or a person) can tell whether anything changed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uet_plugin_sdk::{Error, Plugin, export_plugin};

/// The plugin.
pub struct FileHash;

/// What to hash.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Files to hash, relative to `root`: `"docs/**/*.md"`.
    pub glob: String,
    /// The folder the glob is relative to (relative to the workstream).
    #[serde(default = "dot")]
    pub root: String,
}

fn dot() -> String {
    ".".into()
}

/// The hashes.
#[derive(Serialize)]
pub struct Output {
    /// Each matching file, in path order.
    pub files: Vec<FileHashEntry>,
    /// sha256 over every `path\0hash\n` line, in path order: one value that changes when any
    /// file, or the set of files, changes.
    pub digest: String,
}

/// One file's hash.
#[derive(Serialize)]
pub struct FileHashEntry {
    /// Its path, relative to `root`.
    pub path: String,
    /// Its sha256, in hex.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

impl Plugin for FileHash {
    type Input = Input;
    type Output = Output;
    const CAPABILITIES: &'static [&'static str] = &["file.hash"];

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "glob": {"type": "string"},
                "root": {"type": "string", "description": "default ."}
            },
            "required": ["glob"],
            "additionalProperties": false
        })
    }

    fn run(input: Input) -> Result<Output, Error> {
        let matcher = globset::Glob::new(&input.glob)
            .map_err(|e| Error::fatal(format!("bad glob {:?}: {e}", input.glob)))?
            .compile_matcher();
        let root = PathBuf::from(&input.root);
        let mut files = Vec::new();
        walk(&root, &root, &matcher, &mut files)?;
        files.sort();
        let mut all = Sha256::new();
        let mut out = Vec::with_capacity(files.len());
        for (rel, path) in files {
            let data = std::fs::read(&path)
                .map_err(|e| Error::fatal(format!("{}: {e}", path.display())))?;
            let sha = hex(&Sha256::digest(&data));
            all.update(format!("{rel}\0{sha}\n"));
            out.push(FileHashEntry {
                path: rel,
                sha256: sha,
                bytes: data.len() as u64,
            });
        }
        Ok(Output {
            files: out,
            digest: hex(&all.finalize()),
        })
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    matcher: &globset::GlobMatcher,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), Error> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::fatal(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, matcher, out)?;
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            if matcher.is_match(rel) {
                out.push((rel.to_string_lossy().into_owned(), path));
            }
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

export_plugin!(FileHash);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(root: &Path, glob: &str) -> serde_json::Value {
        let input = serde_json::json!({"root": root, "glob": glob}).to_string();
        uet_plugin_sdk::testing::run::<FileHash>(&input).unwrap()
    }

    #[test]
    fn hashes_matching_files_and_the_digest_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.md"), "abc").unwrap();
        std::fs::write(dir.path().join("b.txt"), "no").unwrap();
        let out = run(dir.path(), "*.md");
        assert_eq!(out["files"].as_array().unwrap().len(), 1);
        assert_eq!(
            out["files"][0]["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let before = out["digest"].clone();
        assert_eq!(run(dir.path(), "*.md")["digest"], before, "stable");
        std::fs::write(dir.path().join("a.md"), "abd").unwrap();
        assert_ne!(run(dir.path(), "*.md")["digest"], before);
    }

    #[test]
    fn a_bad_glob_is_fatal() {
        let err =
            uet_plugin_sdk::testing::run::<FileHash>(r#"{"glob": "a[", "root": "."}"#).unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.message().contains("bad glob"));
    }
}

//! Line, word and byte counts of a file, or of the files under a folder that match a glob.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uet_plugin_sdk::{Error, Plugin, export_plugin};

/// The plugin.
pub struct WordCount;

/// What to count.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// A file, or a folder to walk (relative to the workstream).
    #[serde(default = "dot")]
    pub path: String,
    /// Under a folder, only the files whose path (relative to it) matches; all files by default.
    #[serde(default)]
    pub glob: Option<String>,
}

fn dot() -> String {
    ".".into()
}

/// The counts, in total and per file.
#[derive(Serialize, Debug, PartialEq)]
pub struct Output {
    /// Files counted.
    pub files: u64,
    /// Lines (newline characters, plus a last line without one).
    pub lines: u64,
    /// Words: runs of non-whitespace.
    pub words: u64,
    /// Bytes.
    pub bytes: u64,
    /// Each file, in path order.
    pub per_file: Vec<FileCount>,
}

/// One file's counts.
#[derive(Serialize, Debug, PartialEq)]
pub struct FileCount {
    /// Its path, as the step names it.
    pub path: String,
    /// Lines.
    pub lines: u64,
    /// Words.
    pub words: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Plugin for WordCount {
    type Input = Input;
    type Output = Output;
    const CAPABILITIES: &'static [&'static str] = &["text.count"];

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "file or folder, default ."},
                "glob": {"type": "string", "description": "under a folder, files to count"}
            },
            "additionalProperties": false
        })
    }

    fn run(input: Input) -> Result<Output, Error> {
        let root = PathBuf::from(&input.path);
        let matcher = match &input.glob {
            Some(g) => Some(
                globset::Glob::new(g)
                    .map_err(|e| Error::fatal(format!("bad glob {g:?}: {e}")))?
                    .compile_matcher(),
            ),
            None => None,
        };
        let meta =
            std::fs::metadata(&root).map_err(|e| Error::fatal(format!("{}: {e}", input.path)))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            walk(&root, &root, matcher.as_ref(), &mut files)?;
        } else {
            files.push(root.clone());
        }
        files.sort();
        let mut out = Output {
            files: 0,
            lines: 0,
            words: 0,
            bytes: 0,
            per_file: Vec::new(),
        };
        let total = files.len().max(1) as f32;
        for (i, file) in files.iter().enumerate() {
            let data = std::fs::read(file)
                .map_err(|e| Error::fatal(format!("{}: {e}", file.display())))?;
            let c = count(&data);
            out.files += 1;
            out.lines += c.0;
            out.words += c.1;
            out.bytes += data.len() as u64;
            out.per_file.push(FileCount {
                path: file.to_string_lossy().into_owned(),
                lines: c.0,
                words: c.1,
                bytes: data.len() as u64,
            });
            uet_plugin_sdk::progress((i + 1) as f32 / total, &file.to_string_lossy());
        }
        Ok(out)
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    matcher: Option<&globset::GlobMatcher>,
    out: &mut Vec<PathBuf>,
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
            if matcher.is_none_or(|m| m.is_match(rel)) {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// (lines, words) of a byte buffer.
fn count(data: &[u8]) -> (u64, u64) {
    let mut lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
    if data.last().is_some_and(|&b| b != b'\n') {
        lines += 1;
    }
    let words = data
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .count() as u64;
    (lines, words)
}

export_plugin!(WordCount);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_folder_with_a_glob() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.md"), "one two\nthree\n").unwrap();
        std::fs::write(dir.path().join("sub/b.md"), "four  five six").unwrap();
        std::fs::write(dir.path().join("c.txt"), "ignored words here").unwrap();
        let input = serde_json::json!({"path": dir.path(), "glob": "**/*.md"}).to_string();
        let out = uet_plugin_sdk::testing::run::<WordCount>(&input).unwrap();
        assert_eq!(out["files"], 2);
        assert_eq!(out["words"], 6);
        assert_eq!(out["lines"], 3);
        assert_eq!(out["bytes"], 14 + 14);
    }

    #[test]
    fn a_missing_path_is_a_fatal_error() {
        let err =
            uet_plugin_sdk::testing::run::<WordCount>(r#"{"path": "/no/such/place"}"#).unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.message().contains("/no/such/place"));
        let err = uet_plugin_sdk::testing::run::<WordCount>(r#"{"paht": "."}"#).unwrap_err();
        assert!(err.message().contains("invalid input"), "{err}");
    }

    #[test]
    fn counting() {
        assert_eq!(count(b""), (0, 0));
        assert_eq!(count(b"a b\n"), (1, 2));
        assert_eq!(count(b"a\n\nb"), (3, 2));
    }
}

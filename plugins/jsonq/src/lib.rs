//! Reads a value out of a JSON or TOML file (or out of a value a step hands it) by a dotted
//! path, optionally picking fields from each element of an array.

use serde::{Deserialize, Serialize};
use uet_plugin_sdk::{Error, Plugin, export_plugin};

/// The plugin.
pub struct JsonQuery;

/// Where to look, and what for.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// A `.json` or `.toml` file (relative to the workstream); or give `value`.
    #[serde(default)]
    pub file: Option<String>,
    /// A value to query, such as an upstream step's output.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// Keys and array indices, dot-separated: `package.version`, `items.0.name`. Empty for the
    /// whole document.
    #[serde(default)]
    pub query: String,
    /// When the query lands on an array of objects, keep only these fields of each.
    #[serde(default)]
    pub pick: Vec<String>,
}

/// What the query found.
#[derive(Serialize)]
pub struct Output {
    /// The value.
    pub value: serde_json::Value,
}

impl Plugin for JsonQuery {
    type Input = Input;
    type Output = Output;
    const CAPABILITIES: &'static [&'static str] = &["data.query"];

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "file": {"type": "string"},
                "value": {},
                "query": {"type": "string"},
                "pick": {"type": "array", "items": {"type": "string"}}
            },
            "additionalProperties": false
        })
    }

    fn run(input: Input) -> Result<Output, Error> {
        let doc = match (input.file, input.value) {
            (Some(file), None) => load(&file)?,
            (None, Some(value)) => value,
            _ => return Err(Error::fatal("give exactly one of `file` and `value`")),
        };
        let mut here = &doc;
        for key in input.query.split('.').filter(|k| !k.is_empty()) {
            here = match here {
                serde_json::Value::Object(m) => m.get(key),
                serde_json::Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            }
            .ok_or_else(|| Error::fatal(format!("`{}` not found: no `{key}`", input.query)))?;
        }
        let value = match here {
            serde_json::Value::Array(items) if !input.pick.is_empty() => serde_json::Value::Array(
                items
                    .iter()
                    .map(|item| {
                        let picked = input
                            .pick
                            .iter()
                            .filter_map(|f| item.get(f).map(|v| (f.clone(), v.clone())))
                            .collect();
                        serde_json::Value::Object(picked)
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        Ok(Output { value })
    }
}

fn load(file: &str) -> Result<serde_json::Value, Error> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::fatal(format!("{file}: {e}")))?;
    if file.ends_with(".toml") {
        let value: toml::Value =
            toml::from_str(&text).map_err(|e| Error::fatal(format!("{file}: {e}")))?;
        serde_json::to_value(value).map_err(|e| Error::fatal(format!("{file}: {e}")))
    } else {
        serde_json::from_str(&text).map_err(|e| Error::fatal(format!("{file}: {e}")))
    }
}

export_plugin!(JsonQuery);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(input: serde_json::Value) -> Result<serde_json::Value, Error> {
        uet_plugin_sdk::testing::run::<JsonQuery>(&input.to_string()).map(|o| o["value"].clone())
    }

    #[test]
    fn queries_values_and_toml_files() {
        let doc = json!({"items": [{"name": "a", "n": 1}, {"name": "b", "n": 2}]});
        assert_eq!(
            run(json!({"value": doc, "query": "items.1.name"})).unwrap(),
            "b"
        );
        assert_eq!(
            run(json!({"value": doc, "query": "items", "pick": ["n"]})).unwrap(),
            json!([{"n": 1}, {"n": 2}])
        );
        assert!(run(json!({"value": doc, "query": "items.7"})).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("Cargo.toml");
        std::fs::write(&file, "[package]\nname = \"x\"\nversion = \"1.2.3\"\n").unwrap();
        assert_eq!(
            run(json!({"file": file, "query": "package.version"})).unwrap(),
            "1.2.3"
        );
    }
}

//! Renders a template with `{{ name }}` placeholders (dotted paths reach into objects and
//! arrays) from the step's `vars`, and writes the result to a file — under a folder the tool
//! entry grants for writing, such as `out/`.

use serde::{Deserialize, Serialize};
use uet_plugin_sdk::{Error, Plugin, export_plugin};

/// The plugin.
pub struct Template;

/// What to render, and where.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The template text; or give `template_file`.
    #[serde(default)]
    pub template: Option<String>,
    /// A file holding the template (relative to the workstream).
    #[serde(default)]
    pub template_file: Option<String>,
    /// The values placeholders name.
    #[serde(default)]
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// The file to write (relative to the workstream); its folder is created.
    pub out: String,
}

/// What was written.
#[derive(Serialize)]
pub struct Output {
    /// The file.
    pub path: String,
    /// Its size.
    pub bytes: u64,
}

impl Plugin for Template {
    type Input = Input;
    type Output = Output;
    const CAPABILITIES: &'static [&'static str] = &["render.template"];

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "template": {"type": "string"},
                "template_file": {"type": "string"},
                "vars": {"type": "object"},
                "out": {"type": "string"}
            },
            "required": ["out"],
            "additionalProperties": false
        })
    }

    fn run(input: Input) -> Result<Output, Error> {
        let template = match (input.template, input.template_file) {
            (Some(t), None) => t,
            (None, Some(file)) => {
                std::fs::read_to_string(&file).map_err(|e| Error::fatal(format!("{file}: {e}")))?
            }
            _ => {
                return Err(Error::fatal(
                    "give exactly one of `template` and `template_file`",
                ));
            }
        };
        let text = render(&template, &input.vars)?;
        if let Some(parent) = std::path::Path::new(&input.out).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::fatal(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&input.out, &text)
            .map_err(|e| Error::fatal(format!("{}: {e}", input.out)))?;
        Ok(Output {
            path: input.out,
            bytes: text.len() as u64,
        })
    }
}

/// Fills `{{ path }}` placeholders; `{{{{` writes a literal `{{`.
pub fn render(
    template: &str,
    vars: &serde_json::Map<String, serde_json::Value>,
) -> Result<String, Error> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        if let Some(tail) = after.strip_prefix("{{") {
            out.push_str("{{");
            rest = tail;
            continue;
        }
        let end = after
            .find("}}")
            .ok_or_else(|| Error::fatal("unclosed `{{` in the template"))?;
        let name = after[..end].trim();
        let value = lookup(vars, name).ok_or_else(|| {
            Error::fatal(format!(
                "the template uses `{name}`, which `vars` does not have"
            ))
        })?;
        match value {
            serde_json::Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn lookup<'a>(
    vars: &'a serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Option<&'a serde_json::Value> {
    let mut keys = path.split('.');
    let mut here = vars.get(keys.next()?)?;
    for key in keys {
        here = match here {
            serde_json::Value::Object(m) => m.get(key)?,
            serde_json::Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(here)
}

export_plugin!(Template);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_values_and_paths() {
        let vars = json!({"n": 3, "who": {"name": "ada"}, "list": ["x", "y"]});
        let out = render(
            "{{ who.name }} has {{n}} {{list.1}} {{{{lit}}",
            vars.as_object().unwrap(),
        )
        .unwrap();
        assert_eq!(out, "ada has 3 y {{lit}}");
        assert!(render("{{ missing }}", vars.as_object().unwrap()).is_err());
        assert!(render("{{ open", vars.as_object().unwrap()).is_err());
    }

    #[test]
    fn writes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out/r.md");
        let input = json!({"template": "words: {{w}}", "vars": {"w": 12}, "out": out}).to_string();
        let result = uet_plugin_sdk::testing::run::<Template>(&input).unwrap();
        assert_eq!(result["bytes"], 9);
        assert_eq!(std::fs::read_to_string(out).unwrap(), "words: 12");
    }
}

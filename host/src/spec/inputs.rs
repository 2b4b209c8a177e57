//! Steps' inputs against their plugins' input schemas (`uet validate`): each WASM step's
//! `with`, its parameters filled in, checked against the JSON Schema the plugin describes,
//! every problem reported at the value it concerns.

use std::path::Path;

use crate::spec::doc::{Node, Problems, Source, Value};
use crate::spec::template;
use crate::spec::tools::{ToolKind, Tools};
use crate::spec::workflow::{Plan, Target};

/// Checks every step that names a described plugin by `tool`; a value filled from an upstream
/// output (`${steps...}`) is known only when the step runs and is not checked.
pub fn check(path: &Path, plan: &Plan, tools: &Tools) -> Result<(), Problems> {
    let bytes = crate::spec::doc::read_file(path, crate::spec::doc::MAX_FILE, "a workflow")?;
    let text = crate::spec::doc::decode_text(path, &bytes)?;
    let mut src = Source::new(path, text);
    let Some(root) = src.parse() else {
        return Err(src.into_problems());
    };
    let written = entry(&root, "steps").and_then(|n| match &n.value {
        Value::Array(items) => Some(items),
        _ => None,
    });
    for (i, step) in plan.steps.iter().enumerate() {
        let Target::Tool(name) = &step.target else {
            continue;
        };
        let Some(tool) = tools.by_name(name) else {
            continue;
        };
        let (ToolKind::Wasm { .. }, Some(described)) = (&tool.kind, &tool.described) else {
            continue;
        };
        let Ok(schema) = serde_json::from_str::<serde_json::Value>(&described.input_schema) else {
            continue;
        };
        let Ok(validator) = jsonschema::validator_for(&schema) else {
            continue;
        };
        let node = written.and_then(|items| items.get(i));
        let with_node = node.and_then(|n| entry(n, "with"));
        let (input, unknown) = filled(&step.with, &plan.params);
        for error in validator.iter_errors(&input) {
            let pointer = error.instance_path().as_str().to_string();
            if unknown
                .iter()
                .any(|u| pointer == *u || pointer.starts_with(&format!("{u}/")))
            {
                continue;
            }
            let at = with_node
                .map(|w| locate(w, &pointer))
                .or(node)
                .map(|n| n.span.clone())
                .unwrap_or(0..0);
            let place = if pointer.is_empty() {
                String::new()
            } else {
                format!(" at {pointer}")
            };
            src.error(
                &at,
                format!(
                    "step `{}`: `with`{place}: {error} (the input schema of tool `{name}`)",
                    step.id
                ),
            );
        }
    }
    if src.has_problems() {
        Err(src.into_problems())
    } else {
        Ok(())
    }
}

/// A key's value in a table node.
fn entry<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    match &node.value {
        Value::Table(entries) => entries.iter().find(|e| e.key == key).map(|e| &e.node),
        _ => None,
    }
}

/// The input as it will be, as far as it is known now: parameters filled in; with the JSON
/// pointers of the values that an upstream output fills.
fn filled(with: &serde_json::Value, params: &template::Params) -> (serde_json::Value, Vec<String>) {
    let mut unknown = Vec::new();
    let none = |_: &str| None;
    fn walk(
        v: &serde_json::Value,
        at: &str,
        params: &template::Params,
        none: &dyn Fn(&str) -> Option<serde_json::Value>,
        unknown: &mut Vec<String>,
    ) -> serde_json::Value {
        match v {
            serde_json::Value::String(_) => match template::resolve(v, none, params) {
                Ok(filled) => filled,
                Err(_) => {
                    unknown.push(at.to_string());
                    v.clone()
                }
            },
            serde_json::Value::Array(items) => serde_json::Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| walk(item, &format!("{at}/{i}"), params, none, unknown))
                    .collect(),
            ),
            serde_json::Value::Object(map) => serde_json::Value::Object(
                map.iter()
                    .map(|(k, item)| {
                        let key = k.replace('~', "~0").replace('/', "~1");
                        (
                            k.clone(),
                            walk(item, &format!("{at}/{key}"), params, none, unknown),
                        )
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    let input = walk(with, "", params, &none, &mut unknown);
    (input, unknown)
}

/// The node a JSON pointer names under `node`, or the deepest one on its way.
fn locate<'n>(node: &'n Node, pointer: &str) -> &'n Node {
    let mut here = node;
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        let next = match &here.value {
            Value::Table(entries) => entries.iter().find(|e| e.key == token).map(|e| &e.node),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(n) => here = n,
            None => break,
        }
    }
    here
}

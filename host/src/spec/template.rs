//! The two small template languages of uet: `{key}` in a command tool's argv, filled from the
//! step's input, and `${steps.ID.output.PATH}` and `${params.NAME}` in a step's `with`, filled
//! from upstream outputs and the run's parameters.

use std::fmt;

/// A malformed template, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

/// One argv entry of a command tool: text with `{key}` placeholders (`{{` and `}}` for braces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key(String),
}

impl Template {
    /// Parses an argv entry.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut buf = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    buf.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    buf.push('}');
                }
                '{' => {
                    let key: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    if key.is_empty()
                        || !key
                            .chars()
                            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(TemplateError(format!(
                            "bad placeholder `{{{key}` in {text:?}: write `{{key}}` with a key of the step's `with`, or `{{{{` for a brace"
                        )));
                    }
                    if !buf.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut buf)));
                    }
                    parts.push(Part::Key(key));
                }
                '}' => {
                    return Err(TemplateError(format!(
                        "unmatched `}}` in {text:?}: write `}}}}` for a brace"
                    )));
                }
                c => buf.push(c),
            }
        }
        if !buf.is_empty() {
            parts.push(Part::Text(buf));
        }
        Ok(Template(parts))
    }

    /// The keys the template needs.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Key(k) => Some(k.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The key whose value begins the argument, if one does: a value there that starts with
    /// `-` would be read by most programs as an option, not as the value it was meant to be.
    pub fn leading_key(&self) -> Option<&str> {
        match self.0.first() {
            Some(Part::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// Fills an argument as [`Template::render`] does, refusing a value that would begin the
    /// argument with `-` unless the tool allows options from its input: a workflow that says
    /// `path = "--output=/etc/x"` must not choose the program's options.
    pub fn render_arg(
        &self,
        input: &serde_json::Value,
        allow_options: bool,
    ) -> Result<String, TemplateError> {
        let arg = self.render(input)?;
        match self.leading_key() {
            Some(key) if !allow_options && arg.starts_with('-') => {
                Err(TemplateError(option_refusal(key, &arg)))
            }
            _ => Ok(arg),
        }
    }

    /// Fills the placeholders from a step input: strings as they are, anything else as JSON.
    pub fn render(&self, input: &serde_json::Value) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Key(k) => match input.get(k) {
                    Some(serde_json::Value::String(s)) => out.push_str(s),
                    Some(v) => out.push_str(&v.to_string()),
                    None => {
                        return Err(TemplateError(format!(
                            "the command needs `{k}` in the step's `with`"
                        )));
                    }
                },
            }
        }
        Ok(out)
    }
}

/// Why a value that starts with `-` was not put where a program reads options.
pub fn option_refusal(key: &str, value: &str) -> String {
    let shown: String = value.chars().take(40).collect();
    format!(
        "`{key}` is {shown:?}, which starts with `-` and would be read as an option; the tool \
         takes such values only with `allow_options = true` in its entry"
    )
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.0 {
            match part {
                Part::Text(t) => f.write_str(&t.replace('{', "{{").replace('}', "}}"))?,
                Part::Key(k) => write!(f, "{{{k}}}")?,
            }
        }
        Ok(())
    }
}

/// A piece of a string in a step's `with`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text.
    Text(String),
    /// `${steps.STEP.output.PATH}`.
    Ref(Reference),
    /// `${params.NAME}`: one of the run's parameters.
    Param(String),
}

/// A reference to (part of) an upstream step's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The step whose output is read.
    pub step: String,
    /// Keys (or array indices) into the output; empty for the whole output.
    pub path: Vec<String>,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${{steps.{}.output", self.step)?;
        for key in &self.path {
            write!(f, ".{key}")?;
        }
        f.write_str("}")
    }
}

/// Splits a string into text and `${steps...}` references; `$${` stands for a literal `${`.
pub fn parse_pieces(text: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut buf = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        buf.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            buf.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                return Err(TemplateError(format!("unclosed `${{` in {text:?}")));
            };
            let piece = parse_reference(&tail[..end])?;
            if !buf.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut buf)));
            }
            pieces.push(piece);
            rest = &tail[end + 1..];
        } else {
            buf.push('$');
            rest = after;
        }
    }
    buf.push_str(rest);
    if !buf.is_empty() {
        pieces.push(Piece::Text(buf));
    }
    Ok(pieces)
}

fn parse_reference(inner: &str) -> Result<Piece, TemplateError> {
    let bad = || {
        TemplateError(format!(
            "bad reference `${{{inner}}}`: write `${{steps.ID.output}}`, `${{steps.ID.output.KEY...}}` or `${{params.NAME}}` (`$${{` for a literal `${{`)"
        ))
    };
    if let Some(name) = inner.trim().strip_prefix("params.") {
        return if is_param_name(name) {
            Ok(Piece::Param(name.to_string()))
        } else {
            Err(bad())
        };
    }
    let mut parts = inner.trim().split('.');
    if parts.next() != Some("steps") {
        return Err(bad());
    }
    let step = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
    if parts.next() != Some("output") {
        return Err(bad());
    }
    let path: Vec<String> = parts.map(str::to_string).collect();
    if path.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(Piece::Ref(Reference {
        step: step.to_string(),
        path,
    }))
}

/// A parameter's name: letters, digits, `_` and `-`.
pub fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// The parameters a JSON value's strings name, in order, each once.
pub fn params_named(value: &serde_json::Value) -> Vec<String> {
    let mut names = Vec::new();
    collect(value, &mut names);
    return names;

    fn collect(v: &serde_json::Value, names: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => {
                for piece in parse_pieces(s).unwrap_or_default() {
                    if let Piece::Param(name) = piece
                        && !names.contains(&name)
                    {
                        names.push(name);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| collect(i, names)),
            serde_json::Value::Object(map) => map.values().for_each(|i| collect(i, names)),
            _ => {}
        }
    }
}

/// Every reference in a JSON value's strings, and every malformed one.
pub fn references(value: &serde_json::Value) -> (Vec<Reference>, Vec<TemplateError>) {
    let mut refs = Vec::new();
    let mut errors = Vec::new();
    collect(value, &mut refs, &mut errors);
    return (refs, errors);

    fn collect(v: &serde_json::Value, refs: &mut Vec<Reference>, errors: &mut Vec<TemplateError>) {
        match v {
            serde_json::Value::String(s) => match parse_pieces(s) {
                Ok(pieces) => refs.extend(pieces.into_iter().filter_map(|p| match p {
                    Piece::Ref(r) => Some(r),
                    Piece::Text(_) | Piece::Param(_) => None,
                })),
                Err(e) => errors.push(e),
            },
            serde_json::Value::Array(items) => items.iter().for_each(|i| collect(i, refs, errors)),
            serde_json::Value::Object(map) => map.values().for_each(|i| collect(i, refs, errors)),
            _ => {}
        }
    }
}

/// A run's parameters by name, their values final (defaults and `--set`s applied).
pub type Params = std::collections::BTreeMap<String, serde_json::Value>;

/// `a=1, b=text`: parameters on one line, strings as they are and the rest as JSON (the dry
/// run's `params:` line, the `run.created` event).
pub fn params_line(params: &Params) -> String {
    params
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            v => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fills every reference in `value` with the output or parameter it names. A string that is
/// exactly one reference takes the referenced value with its type; a reference inside longer
/// text is written into it (strings as they are, anything else as JSON). What is filled in is
/// never read again for references: a value cannot smuggle one in.
pub fn resolve(
    value: &serde_json::Value,
    output_of: &dyn Fn(&str) -> Option<serde_json::Value>,
    params: &Params,
) -> Result<serde_json::Value, TemplateError> {
    use serde_json::Value as J;
    let param = |name: &str| {
        params
            .get(name)
            .cloned()
            .ok_or_else(|| TemplateError(format!("`${{params.{name}}}`: no such parameter")))
    };
    Ok(match value {
        J::String(s) => {
            let pieces = parse_pieces(s)?;
            match pieces.as_slice() {
                [Piece::Ref(r)] => lookup(r, output_of)?,
                [Piece::Param(name)] => param(name)?,
                _ => {
                    let mut out = String::new();
                    for piece in pieces {
                        let filled = match piece {
                            Piece::Text(t) => {
                                out.push_str(&t);
                                continue;
                            }
                            Piece::Ref(r) => lookup(&r, output_of)?,
                            Piece::Param(name) => param(&name)?,
                        };
                        match filled {
                            J::String(s) => out.push_str(&s),
                            v => out.push_str(&v.to_string()),
                        }
                    }
                    J::String(out)
                }
            }
        }
        J::Array(items) => J::Array(
            items
                .iter()
                .map(|i| resolve(i, output_of, params))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => J::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve(v, output_of, params)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

fn lookup(
    r: &Reference,
    output_of: &dyn Fn(&str) -> Option<serde_json::Value>,
) -> Result<serde_json::Value, TemplateError> {
    let output = output_of(&r.step)
        .ok_or_else(|| TemplateError(format!("{r}: step `{}` has no output", r.step)))?;
    let mut here = &output;
    for key in &r.path {
        let next = match here {
            serde_json::Value::Object(map) => map.get(key),
            serde_json::Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        here = next.ok_or_else(|| {
            TemplateError(format!(
                "{r}: the output of step `{}` has no `{key}` (output: {})",
                r.step,
                crate::spec::template::preview(&output)
            ))
        })?;
    }
    Ok(here.clone())
}

/// A JSON value cut to a readable length for an error message.
pub fn preview(value: &serde_json::Value) -> String {
    const MAX: usize = 200;
    let text = value.to_string();
    if text.len() <= MAX {
        text
    } else {
        let cut = (0..=MAX)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &text[..cut])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn argv_placeholders() {
        let t = Template::parse("--file={path}.{{x}}").unwrap();
        assert_eq!(
            t.render(&json!({"path": "a.md"})).unwrap(),
            "--file=a.md.{x}"
        );
        assert_eq!(t.render(&json!({"path": 3})).unwrap(), "--file=3.{x}");
        assert!(t.render(&json!({})).is_err());
        assert_eq!(t.keys().collect::<Vec<_>>(), vec!["path"]);
        assert!(Template::parse("{a b}").is_err());
        assert!(Template::parse("a}").is_err());
        assert_eq!(Template::parse("x{{y}}").unwrap().to_string(), "x{{y}}");
    }

    #[test]
    fn references_keep_types_or_interpolate() {
        let outputs = |s: &str| (s == "count").then(|| json!({"words": 42, "files": ["a", "b"]}));
        let v = json!({"n": "${steps.count.output.words}", "s": "total: ${steps.count.output.words}",
                       "f": "${steps.count.output.files.1}", "lit": "$${steps.x}", "all": "${steps.count.output}"});
        let r = resolve(&v, &outputs, &Params::new()).unwrap();
        assert_eq!(r["n"], json!(42));
        assert_eq!(r["s"], json!("total: 42"));
        assert_eq!(r["f"], json!("b"));
        assert_eq!(r["lit"], json!("${steps.x}"));
        assert_eq!(r["all"]["words"], json!(42));
        let err = resolve(
            &json!("${steps.count.output.nope}"),
            &outputs,
            &Params::new(),
        )
        .unwrap_err();
        assert!(err.0.contains("has no `nope`"), "{err:?}");
    }

    #[test]
    fn parameters_keep_types_and_what_they_fill_in_is_not_read_again() {
        let params: Params = [
            ("n".to_string(), json!(3)),
            ("who".to_string(), json!("${steps.secret.output}")),
        ]
        .into();
        let none = |_: &str| None;
        let v = json!({"n": "${params.n}", "s": "n=${params.n}, who=${params.who}", "lit": "$${params.n}"});
        let r = resolve(&v, &none, &params).unwrap();
        assert_eq!(r["n"], json!(3));
        assert_eq!(r["s"], json!("n=3, who=${steps.secret.output}"));
        assert_eq!(r["lit"], json!("${params.n}"));
        assert_eq!(params_named(&v), vec!["n", "who"]);
        assert!(parse_pieces("${params.}").is_err());
        assert!(parse_pieces("${params.a.b}").is_err());
        let err = resolve(&json!("${params.nope}"), &none, &params).unwrap_err();
        assert!(err.0.contains("no such parameter"), "{err:?}");
    }

    #[test]
    fn malformed_references() {
        for bad in [
            "${steps.x}",
            "${env.HOME}",
            "${steps..output}",
            "${steps.x.output.}",
            "${steps.x.output",
        ] {
            assert!(parse_pieces(bad).is_err(), "{bad}");
        }
        let (refs, errors) =
            references(&json!({"a": ["${steps.x.output.y}", "${steps.z.output}", "${x}"]}));
        assert_eq!(errors.len(), 1);
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].step, "x");
    }
}

//! The one place that parses YAML.
//!
//! teeway uses the YAML organization's maintained continuation of `serde_yaml` (package
//! `yaml_serde`, imported under the old name). Keeping every call behind [`parse`] means a change
//! of YAML library touches this file only.

pub use serde_yaml::{Mapping, Value};

/// A YAML document that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct YamlError(String);

/// Parses one YAML document into a value tree. An empty document is an empty mapping.
pub fn parse(text: &str) -> Result<Value, YamlError> {
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    serde_yaml::from_str(text).map_err(|e| YamlError(with_position(text, e.to_string())))
}

/// The parser names a duplicate key with the position of the mapping that holds it (or none):
/// give the line and column of the key's second appearance in that mapping instead.
fn with_position(text: &str, message: String) -> String {
    const NEEDLE: &str = "duplicate entry with key \"";
    let Some(at) = message.find(NEEDLE) else {
        return message;
    };
    let rest = &message[at + NEEDLE.len()..];
    let Some(key) = rest.split('"').next() else {
        return message;
    };
    // The mapping's own position, when the parser gave one: the search starts there.
    let (head, start_line) = match message.rfind(" at line ") {
        Some(p) if p > at => {
            let line = message[p + 9..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(1);
            (message[..p].to_owned(), line)
        }
        _ => (message.clone(), 1),
    };
    let mut first_indent: Option<usize> = None;
    for (number, line) in text.lines().enumerate().skip(start_line.saturating_sub(1)) {
        let body = line.trim_start_matches([' ', '-']);
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        if let Some(first) = first_indent {
            if indent < first {
                break; // the mapping ended without a second one
            }
        }
        let named = body
            .strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with(':'));
        if !named {
            continue;
        }
        match first_indent {
            Some(first) if first == indent => {
                return format!("{head} at line {} column {}", number + 1, indent + 1);
            }
            Some(_) => {}
            None => first_indent = Some(indent),
        }
    }
    message
}

/// Parses a stream of YAML documents separated by `---` (Kubernetes manifests); empty
/// documents are left out.
pub fn parse_all(text: &str) -> Result<Vec<Value>, YamlError> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| YamlError(e.to_string()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mapping_and_reports_position() {
        let v = parse("a: 1\nb: [x, y]\n").expect("valid");
        assert_eq!(v.get("a").and_then(Value::as_u64), Some(1));
        let err = parse("a: [unclosed\n").expect_err("invalid");
        assert!(err.to_string().contains("line"), "{err}");
        assert!(parse("").expect("empty").as_mapping().is_some());
    }

    #[test]
    fn a_duplicate_key_is_reported_where_it_is() {
        let err = parse("listen: a\nroutes: []\nlisten: b\n").expect_err("duplicate");
        assert_eq!(
            err.to_string(),
            "duplicate entry with key \"listen\" at line 3 column 1"
        );
        let nested = "routes:\n  - name: a\n    timeout: 1s\n  - name: b\n    timeout: 2s\n    timeout: 3s\n";
        let err = parse(nested).expect_err("duplicate");
        assert!(
            err.to_string()
                .ends_with("duplicate entry with key \"timeout\" at line 6 column 5"),
            "{err}"
        );
    }

    #[test]
    fn parses_a_stream_of_documents() {
        let docs = parse_all("kind: A\n---\n---\nkind: B\n").expect("valid");
        let kinds: Vec<_> = docs
            .iter()
            .filter_map(|d| d.get("kind")?.as_str())
            .collect();
        assert_eq!(kinds, ["A", "B"]);
        assert!(parse_all("a: [\n---\nb: 1\n").is_err());
    }
}

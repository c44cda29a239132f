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

/// The parser names a duplicate key without saying where: add the line and column of the
/// key's second appearance at the same indentation as its first (a good guess, said as one).
fn with_position(text: &str, message: String) -> String {
    let Some(key) = message
        .strip_prefix("duplicate entry with key \"")
        .and_then(|rest| rest.split('"').next())
    else {
        return message;
    };
    let mut seen: Vec<usize> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let body = line.trim_start_matches([' ', '-']);
        let indent = line.len() - body.len();
        let named = body
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'));
        if !named {
            continue;
        }
        if seen.contains(&indent) {
            return format!("{message} at line {} column {}", number + 1, indent + 1);
        }
        seen.push(indent);
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

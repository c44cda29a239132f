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
    serde_yaml::from_str(text).map_err(|e| YamlError(e.to_string()))
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

//! Field paths (JSON Pointers, RFC 6901) as the comparison walks a document, and the patterns
//! that configuration names fields by: `/data/items/*/price`, where `*` stands for any one key
//! or index.

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    /// Any element (an unordered array's).
    Any,
}

/// Where the walk is in a document.
#[derive(Debug, Clone, Default)]
pub struct FieldPath {
    steps: Vec<Step>,
}

impl FieldPath {
    /// The document itself.
    pub fn root() -> Self {
        Self::default()
    }

    /// Into the member `key`.
    pub fn push_key(&mut self, key: &str) {
        self.steps.push(Step::Key(key.to_owned()));
    }

    /// Into element `i`.
    pub fn push_index(&mut self, i: usize) {
        self.steps.push(Step::Index(i));
    }

    /// Into any element.
    pub fn push_any(&mut self) {
        self.steps.push(Step::Any);
    }

    /// Back out one step.
    pub fn pop(&mut self) {
        self.steps.pop();
    }

    /// The field it counts under: indices as `*`, identifier-like keys as `{id}`.
    pub fn field(&self) -> String {
        self.render(false)
    }

    /// Where it is: with its indices.
    pub fn at(&self) -> String {
        self.render(true)
    }

    fn render(&self, indices: bool) -> String {
        if self.steps.is_empty() {
            // The document itself (a JSON Pointer's "", which a page cannot link to).
            return "(document)".to_owned();
        }
        let mut out = String::new();
        for step in &self.steps {
            out.push('/');
            match step {
                // A map keyed by ids (`{"users": {"17": ...}}`) is one field, as an array is.
                Step::Key(k) if !indices && crate::endpoint::is_identifier(k) => {
                    out.push_str("{id}")
                }
                Step::Key(k) => escape(k, &mut out),
                Step::Index(i) if indices => out.push_str(&i.to_string()),
                Step::Index(_) | Step::Any => out.push('*'),
            }
        }
        out
    }
}

/// `~` as `~0`, `/` as `~1`.
fn escape(key: &str, out: &mut String) {
    for c in key.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
}

/// A configured field pattern: `/data/items/*/price`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// `None`: `*`, any one step.
    steps: Vec<Option<String>>,
}

impl Pattern {
    /// Reads a pattern; `Err` says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self { steps: Vec::new() });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "`{text}` is not a field path; give one such as /data/items/*/price"
            ));
        };
        let steps = rest
            .split('/')
            .map(|s| {
                if s == "*" {
                    Ok(None)
                } else if s.contains('~') && !valid_escapes(s) {
                    Err(format!("`{text}`: `~` must be `~0` (a ~) or `~1` (a /)"))
                } else {
                    Ok(Some(s.replace("~1", "/").replace("~0", "~")))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { steps })
    }

    /// Whether `path` is exactly this field.
    pub fn matches(&self, path: &FieldPath) -> bool {
        self.steps.len() == path.steps.len() && self.prefix_of(path)
    }

    /// Whether `path` is this field or inside it.
    pub fn covers(&self, path: &FieldPath) -> bool {
        self.steps.len() <= path.steps.len() && self.prefix_of(path)
    }

    fn prefix_of(&self, path: &FieldPath) -> bool {
        self.steps
            .iter()
            .zip(&path.steps)
            .all(|(want, step)| match (want, step) {
                (None, _) => true,
                (Some(k), Step::Key(key)) => k == key,
                (Some(k), Step::Index(i)) => k.parse::<usize>().is_ok_and(|n| n == *i),
                (Some(_), Step::Any) => false,
            })
    }
}

fn valid_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .enumerate()
        .all(|(i, c)| *c != b'~' || matches!(b.get(i + 1), Some(b'0' | b'1')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(steps: &[&str]) -> FieldPath {
        let mut p = FieldPath::root();
        for s in steps {
            match s.parse::<usize>() {
                Ok(i) => p.push_index(i),
                Err(_) => p.push_key(s),
            }
        }
        p
    }

    #[test]
    fn patterns_match_fields_and_cover_what_is_inside() {
        let p = Pattern::parse("/data/items/*/price").expect("valid");
        assert!(p.matches(&path(&["data", "items", "3", "price"])));
        assert!(!p.matches(&path(&["data", "items", "3"])));
        assert!(p.covers(&path(&["data", "items", "3", "price", "amount"])));
        let exact = Pattern::parse("/items/0").expect("valid");
        assert!(exact.matches(&path(&["items", "0"])));
        assert!(!exact.matches(&path(&["items", "1"])));
        let slash = Pattern::parse("/a~1b/~0x").expect("valid");
        assert!(slash.matches(&path(&["a/b", "~x"])));
        assert_eq!(path(&["a/b", "~x", "2"]).at(), "/a~1b/~0x/2");
        assert_eq!(path(&["a/b", "~x", "2"]).field(), "/a~1b/~0x/*");
        assert!(Pattern::parse("data").is_err());
        assert!(Pattern::parse("/a~2").is_err());
        assert!(Pattern::parse("")
            .expect("the whole document")
            .covers(&path(&["x"])));
        let mut by_id = FieldPath::root();
        by_id.push_key("users");
        by_id.push_key("3fa85f64-5717-4562-b3fc-2c963f66afa6");
        by_id.push_key("name");
        assert_eq!(by_id.field(), "/users/{id}/name");
        assert_eq!(
            by_id.at(),
            "/users/3fa85f64-5717-4562-b3fc-2c963f66afa6/name"
        );
    }
}

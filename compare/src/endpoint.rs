//! Endpoints: a request's method and a template of its path, so that `/users/17` and
//! `/users/42` are counted, compared and shown together as `GET /users/{id}`.
//!
//! Templates a user configures (`GET /orders/{order}/items/{item}`, or without a method for
//! every method) are tried first, in order. Otherwise each path segment that looks like an
//! identifier is folded to `{id}`: a number, a UUID, a run of 16 or more hex digits with a digit
//! among them (object ids, hashes), or a token of 20 or more letters and digits with both among
//! them (ULIDs, base64 ids). Other segments are kept, so `/users/me` stays itself. The query is
//! never part of an endpoint.

use std::fmt;

/// Configured templates, tried in order before segments are folded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Templates {
    list: Vec<Template>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    /// `None`: any method.
    method: Option<String>,
    segments: Vec<Segment>,
    /// As configured, for the endpoint's name.
    path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}`: any one segment.
    Variable,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Not `METHOD /path` or `/path`.
    #[error("`{0}` is not a template; give a path such as /users/{{id}}, or GET /users/{{id}}")]
    Shape(String),
    /// A segment that mixes a variable with text (`user-{id}`).
    #[error("`{0}`: a variable must be a whole segment, such as /users/{{id}}")]
    Partial(String),
}

impl Templates {
    /// Reads templates such as `GET /users/{id}` or `/orders/{order}/items/{item}`.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Self, TemplateError> {
        let list = list
            .iter()
            .map(|t| Template::parse(t.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self { list })
    }

    /// The endpoint of a request with `method` to `path` (its query, if any, left out).
    pub fn endpoint(&self, method: &str, path: &str) -> Endpoint {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let matched = self.list.iter().find(|t| t.matches(method, path));
        let template = match matched {
            Some(t) => t.path.clone(),
            None => fold(path),
        };
        Endpoint(format!("{} {template}", method.to_ascii_uppercase()))
    }
}

impl Template {
    fn parse(text: &str) -> Result<Self, TemplateError> {
        let text = text.trim();
        let (method, path) = match text.split_once(' ') {
            Some((m, p)) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                (Some(m.to_ascii_uppercase()), p.trim())
            }
            Some(_) => return Err(TemplateError::Shape(text.to_owned())),
            None => (None, text),
        };
        if !path.starts_with('/') || path.contains(['?', ' ']) {
            return Err(TemplateError::Shape(text.to_owned()));
        }
        let segments = segments(path)
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if !name.is_empty() && !name.contains(['{', '}']) => {
                        Ok(Segment::Variable)
                    }
                    _ if s.contains(['{', '}']) => Err(TemplateError::Partial(text.to_owned())),
                    _ => Ok(Segment::Literal(s.to_owned())),
                },
            )
            .collect::<Result<_, _>>()?;
        Ok(Self {
            method,
            segments,
            path: path.to_owned(),
        })
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        if self
            .method
            .as_deref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        let mut given = segments(path);
        for want in &self.segments {
            match (want, given.next()) {
                (Segment::Literal(l), Some(g)) if l == g => {}
                (Segment::Variable, Some(g)) if !g.is_empty() => {}
                _ => return false,
            }
        }
        given.next().is_none()
    }
}

/// The segments after the leading `/` (an empty path has one empty segment).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

/// `path` with its identifier-like segments folded to `{id}`.
fn fold(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in segments(path) {
        out.push('/');
        out.push_str(if is_identifier(segment) {
            "{id}"
        } else {
            segment
        });
    }
    out
}

/// Whether a path segment names one thing among many (see the module's rules).
pub fn is_identifier(segment: &str) -> bool {
    let b = segment.as_bytes();
    if b.is_empty() {
        return false;
    }
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    if digits == b.len() {
        return true;
    }
    let uuid = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    let hex = b.len() >= 16 && digits > 0 && b.iter().all(u8::is_ascii_hexdigit);
    let token = b.len() >= 20
        && digits > 0
        && digits < b.len()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_');
    uuid || hex || token
}

/// `METHOD /template`: what differences are counted and shown by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(String);

impl Endpoint {
    /// The endpoint as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_fold_and_words_stay() {
        let t = Templates::default();
        let e = |m, p| t.endpoint(m, p).to_string();
        assert_eq!(e("GET", "/users/17"), "GET /users/{id}");
        assert_eq!(e("get", "/users/42?x=1"), "GET /users/{id}");
        assert_eq!(e("GET", "/users/me"), "GET /users/me");
        assert_eq!(
            e(
                "DELETE",
                "/carts/3fa85f64-5717-4562-b3fc-2c963f66afa6/items/9"
            ),
            "DELETE /carts/{id}/items/{id}"
        );
        assert_eq!(e("GET", "/blobs/5f2b9c1e8a7d4e3f9b1c"), "GET /blobs/{id}");
        assert_eq!(e("GET", "/o/01HZX3K9V2QJ7W8T5R4M6N1P0B"), "GET /o/{id}");
        assert_eq!(e("GET", "/v1/health"), "GET /v1/health", "v1 is a word");
        assert_eq!(
            e("GET", "/deadbeefcafe"),
            "GET /deadbeefcafe",
            "short, no digit"
        );
        assert_eq!(
            e("GET", "/a-long-readable-slug-here"),
            "GET /a-long-readable-slug-here"
        );
        assert_eq!(e("GET", "/"), "GET /");
    }

    #[test]
    fn configured_templates_come_first() {
        let t = Templates::parse(&["GET /users/{name}/posts", "/files/{path}"]).expect("valid");
        let e = |m, p| t.endpoint(m, p).to_string();
        assert_eq!(e("GET", "/users/alice/posts"), "GET /users/{name}/posts");
        assert_eq!(
            e("POST", "/users/alice/posts"),
            "POST /users/alice/posts",
            "the template is for GET only"
        );
        assert_eq!(e("PUT", "/files/report.pdf"), "PUT /files/{path}");
        assert_eq!(
            e("PUT", "/files/a/b"),
            "PUT /files/a/b",
            "one segment per variable"
        );
        assert!(matches!(
            Templates::parse(&["users/{id}"]),
            Err(TemplateError::Shape(_))
        ));
        assert!(matches!(
            Templates::parse(&["/users/user-{id}"]),
            Err(TemplateError::Partial(_))
        ));
        assert!(matches!(
            Templates::parse(&["GET  /x?y"]),
            Err(TemplateError::Shape(_))
        ));
    }
}

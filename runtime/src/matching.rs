//! Request matching shared by the agent's mirror rules and the gateway's routes.
//!
//! A `match:` block holds conditions that must all hold:
//!
//! ```yaml
//! match:
//!   host: api.example.com          # exact, case-insensitive, port ignored; or *.example.com
//!   path_prefix: /v1               # or `path: /exact` or `path_regex: ^/users/[0-9]+$`
//!   methods: [GET, HEAD]
//!   headers:
//!     x-canary: "^(yes|true)$"     # present with a value matching the regex
//!     x-debug: true                # present, any value
//!     x-internal: false            # absent
//! ```
//!
//! Regexes are the `regex` crate's (linear time, no backtracking), so a rule can never make the
//! request path slow whatever it is given; they are unanchored unless written with `^`/`$`.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

use crate::config::{self as cfg, Problems, Section};
use crate::yaml::Value;

/// How the host is matched.
#[derive(Debug, Clone)]
pub enum HostMatch {
    /// This name, lowercased.
    Exact(String),
    /// Any name ending with `.` + this suffix (written `*.suffix`), at least one label before it.
    Subdomain(String),
}

/// How the path is matched (the query string is never part of it).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Starts with.
    Prefix(String),
    /// Equals.
    Exact(String),
    /// Matches the regex somewhere (anchor it to match it whole).
    Regex(Regex),
}

/// How one header is matched.
#[derive(Debug, Clone)]
pub enum HeaderMatch {
    /// Present, any value.
    Present,
    /// Absent.
    Absent,
    /// Present, and one of its values matches.
    Value(Regex),
}

/// A request's header fields as a matcher reads them: a [`HeaderMap`], or the fields of a head
/// read in place (the agent's HTTP/1 path), so that deciding on a request needs no map.
pub trait Fields {
    /// The first value of the fields named `name` (names compare case-insensitively).
    fn first(&self, name: &HeaderName) -> Option<&[u8]>;

    /// Whether any value of the fields named `name` satisfies `pred`.
    fn any_value(&self, name: &HeaderName, pred: impl FnMut(&[u8]) -> bool) -> bool;
}

impl Fields for HeaderMap {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(HeaderValue::as_bytes)
    }

    fn any_value(&self, name: &HeaderName, mut pred: impl FnMut(&[u8]) -> bool) -> bool {
        self.get_all(name).iter().any(|v| pred(v.as_bytes()))
    }
}

/// A field value as text, as [`HeaderValue::to_str`] reads it: visible ASCII and tabs only.
pub fn field_text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// A `match:` block. The default matches everything.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// Host condition.
    pub host: Option<HostMatch>,
    /// Path condition.
    pub path: Option<PathMatch>,
    /// Allowed methods.
    pub methods: Option<Vec<Method>>,
    /// Header conditions, all of which must hold.
    pub headers: Vec<(HeaderName, HeaderMatch)>,
}

impl RequestMatch {
    /// Whether a request with these parts satisfies every condition.
    pub fn matches(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &impl Fields,
    ) -> bool {
        if let Some(want) = &self.host {
            let Some(host) = host else { return false };
            if !host_matches(want, host) {
                return false;
            }
        }
        if let Some(want) = &self.path {
            let ok = match want {
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                PathMatch::Exact(p) => path == p,
                PathMatch::Regex(r) => r.is_match(path),
            };
            if !ok {
                return false;
            }
        }
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| match want {
            HeaderMatch::Present => headers.first(name).is_some(),
            HeaderMatch::Absent => headers.first(name).is_none(),
            HeaderMatch::Value(r) => {
                headers.any_value(name, |v| field_text(v).is_some_and(|v| r.is_match(v)))
            }
        })
    }

    /// The path prefix condition, if that is how the path is matched.
    pub fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }

    /// Reads the conditions of `m` (a `match:` section); `extra` keys are left for the caller.
    /// Every problem is recorded with its path.
    pub fn read(m: &mut Section<'_>, p: &mut Problems) -> Self {
        let host = m.optional(
            p,
            "host",
            "give a host name such as api.example.com or *.example.com",
            parse_host,
        );
        let prefix = m.optional(p, "path_prefix", "start it with /, such as /v1", |v| {
            slash_path(v)
        });
        let exact = m.optional(p, "path", "give the whole path, such as /healthz", |v| {
            slash_path(v)
        });
        let regex = m.optional(
            p,
            "path_regex",
            "give a regular expression such as ^/users/[0-9]+$",
            parse_regex,
        );
        let given = [prefix.is_some(), exact.is_some(), regex.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
        if given > 1 {
            p.push(
                m.path(),
                None,
                "has more than one of path_prefix, path and path_regex",
                "keep one way of matching the path",
            );
        }
        let path = prefix
            .map(PathMatch::Prefix)
            .or(exact.map(PathMatch::Exact))
            .or(regex.map(PathMatch::Regex));
        let methods = m.list(
            p,
            "methods",
            "give HTTP methods such as [GET, HEAD]",
            parse_method,
        );
        let mut headers = Vec::new();
        let headers_path = m.path_of("headers");
        match m.get("headers") {
            None => {}
            Some(Value::Mapping(map)) => {
                for (name, want) in map {
                    let Some(name_text) = name.as_str() else {
                        p.push(
                            &headers_path,
                            Some(name),
                            "has a header name that is not text",
                            "write header names as text",
                        );
                        continue;
                    };
                    let path = format!("{headers_path}.{name_text}");
                    let Ok(header) = HeaderName::from_bytes(name_text.as_bytes()) else {
                        p.push(
                            path,
                            None,
                            "is not a valid header name",
                            "use letters, digits and dashes",
                        );
                        continue;
                    };
                    let condition = match want {
                        Value::Bool(true) => Ok(HeaderMatch::Present),
                        Value::Bool(false) => Ok(HeaderMatch::Absent),
                        other => parse_regex(other).map(HeaderMatch::Value),
                    };
                    match condition {
                        Ok(c) => headers.push((header, c)),
                        Err(message) => p.push(
                            path,
                            Some(want),
                            message,
                            "give a regex for the value, true (present) or false (absent)",
                        ),
                    }
                }
            }
            Some(other) => p.push(
                headers_path,
                Some(other),
                "must be a mapping of header name to condition",
                "write `headers: { x-canary: \"^yes$\" }`",
            ),
        }
        Self {
            host,
            path,
            methods,
            headers,
        }
    }
}

fn host_matches(want: &HostMatch, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    match want {
        HostMatch::Exact(h) => host == *h,
        HostMatch::Subdomain(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix.as_str())
                && host[..host.len() - suffix.len()].ends_with('.')
        }
    }
}

fn parse_host(v: &Value) -> Result<HostMatch, String> {
    let h = cfg::nonempty_string(v)?.to_ascii_lowercase();
    let (bare, wildcard) = match h.strip_prefix("*.") {
        Some(rest) => (rest.to_owned(), true),
        None => (h, false),
    };
    if bare.is_empty() || bare.contains(['/', ':', ' ', '*']) {
        return Err("must be a host name without port or path".into());
    }
    Ok(if wildcard {
        HostMatch::Subdomain(bare)
    } else {
        HostMatch::Exact(bare)
    })
}

fn slash_path(v: &Value) -> Result<String, String> {
    let s = cfg::nonempty_string(v)?;
    if !s.starts_with('/') {
        return Err("must start with /".into());
    }
    Ok(s)
}

/// A regular expression (the `regex` crate's syntax).
pub fn parse_regex(v: &Value) -> Result<Regex, String> {
    let s = cfg::nonempty_string(v)?;
    Regex::new(&s).map_err(|e| format!("is not a valid regular expression: {e}"))
}

/// An HTTP method name, upper case.
pub fn parse_method(v: &Value) -> Result<Method, String> {
    let s = cfg::nonempty_string(v)?;
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("methods are upper case".into());
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| "is not an HTTP method".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<RequestMatch, String> {
        let doc = crate::yaml::parse(text).expect("yaml");
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);
        let m = RequestMatch::read(&mut root, &mut p);
        root.finish(&mut p);
        p.finish(m).map_err(|e| e.to_string())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn every_condition_must_hold() {
        let m = read(
            "host: API.example.com\npath_prefix: /v1\nmethods: [GET, HEAD]\nheaders: { x-canary: \"^yes$\", x-debug: true, x-internal: false }\n",
        )
        .expect("valid");
        let ok = headers(&[("x-canary", "yes"), ("x-debug", "")]);
        let get = Method::GET;
        assert!(m.matches(&get, Some("api.example.com"), "/v1/a", &ok));
        assert!(m.matches(&get, Some("API.EXAMPLE.COM"), "/v1", &ok));
        assert!(!m.matches(&Method::POST, Some("api.example.com"), "/v1", &ok));
        assert!(!m.matches(&get, Some("www.example.com"), "/v1", &ok));
        assert!(!m.matches(&get, None, "/v1", &ok));
        assert!(!m.matches(&get, Some("api.example.com"), "/v2", &ok));
        let wrong_value = headers(&[("x-canary", "yes!"), ("x-debug", "")]);
        assert!(!m.matches(&get, Some("api.example.com"), "/v1", &wrong_value));
        let missing = headers(&[("x-canary", "yes")]);
        assert!(!m.matches(&get, Some("api.example.com"), "/v1", &missing));
        let forbidden = headers(&[("x-canary", "yes"), ("x-debug", ""), ("x-internal", "1")]);
        assert!(!m.matches(&get, Some("api.example.com"), "/v1", &forbidden));
    }

    #[test]
    fn path_forms_and_wildcard_hosts() {
        let exact = read("path: /healthz").expect("valid");
        assert!(exact.matches(&Method::GET, None, "/healthz", &HeaderMap::new()));
        assert!(!exact.matches(&Method::GET, None, "/healthz/x", &HeaderMap::new()));
        let re = read("path_regex: ^/users/[0-9]+$").expect("valid");
        assert!(re.matches(&Method::GET, None, "/users/42", &HeaderMap::new()));
        assert!(!re.matches(&Method::GET, None, "/users/42/x", &HeaderMap::new()));
        let wild = read("host: \"*.example.com\"").expect("valid");
        let h = HeaderMap::new();
        assert!(wild.matches(&Method::GET, Some("a.b.example.com"), "/", &h));
        assert!(!wild.matches(&Method::GET, Some("example.com"), "/", &h));
        assert!(!wild.matches(&Method::GET, Some("badexample.com"), "/", &h));
        assert!(RequestMatch::default().matches(&Method::DELETE, None, "/", &h));
    }

    #[test]
    fn problems_name_the_field() {
        let err = read(
            "path_prefix: v1\npath_regex: \"(\"\nmethods: [get, \"BAD METHOD\"]\nheaders: { \"bad header\": x, x-a: 3 }\nhost: \"a:80\"\n",
        )
        .expect_err("invalid");
        for needle in [
            "path_prefix: must start with /",
            "path_regex: is not a valid regular expression",
            "methods[0]: methods are upper case",
            "methods[1]: is not an HTTP method",
            "headers.bad header: is not a valid header name",
            "host: must be a host name without port or path",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
        let both = read("path: /a\npath_prefix: /b").expect_err("two path forms");
        assert!(both.contains("more than one of path_prefix"), "{both}");
    }
}

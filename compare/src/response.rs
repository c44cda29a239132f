//! Two responses compared whole: status, the headers a route names, and the body.
//!
//! Fields are named so that a report can tell them apart: `status`; `header:NAME`;
//! a JSON body's fields as JSON Pointers (`/data/items/*/price`); `body:type` when the two
//! bodies are of different kinds (JSON and text, say); a text body's lines as `body:line/N`
//! (from 1; past [`MAX_TEXT_LINES`] lines, `body:text` whole); other bodies by
//! `body:length`, and `body:digest` when two of one length hold different bytes;
//! `grpc-status` and `grpc-message/*` for gRPC.

use http::{HeaderMap, HeaderName};
use regex::Regex;

use crate::body::{self, Body, BodyError};

/// Text bodies of more lines than this are compared whole (`body:text`): past it, a line's
/// number says little, and its key would be one of too many.
pub const MAX_TEXT_LINES: usize = 1_000;
use crate::json::{self, Change, Differences, FieldDiff, JsonOptions};

/// One response as read from a target (or as production answered it).
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// Its status code.
    pub status: u16,
    /// Its headers.
    pub headers: &'a HeaderMap,
    /// Its trailers, if any came.
    pub trailers: Option<&'a HeaderMap>,
    /// Its body, as received (encoded), whole or up to the capture limit.
    pub body: &'a [u8],
    /// Whether the body was cut at the capture limit.
    pub truncated: bool,
}

/// What is compared, and what is not.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Headers compared (names in lower case); others are not.
    pub headers: Vec<HeaderName>,
    /// Values that differ but both match one of these are not a difference (timestamps,
    /// request ids): JSON strings and header values.
    pub ignore_values: Vec<Regex>,
    /// How JSON bodies are compared (unordered arrays, ignored fields, the limit).
    pub json: JsonOptions,
    /// Largest decoded body compared.
    pub max_body: usize,
}

/// Why two responses were not compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// One body was cut at the capture limit: a difference would say nothing.
    Truncated,
    /// One body could not be made comparable.
    Body(BodyError),
}

impl Skip {
    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::Truncated => "truncated",
            Skip::Body(e) => e.reason(),
        }
    }
}

/// The differences between `baseline` and `candidate` under `rules`.
pub fn compare(
    baseline: &Response<'_>,
    candidate: &Response<'_>,
    rules: &Rules,
) -> Result<Differences, Skip> {
    if baseline.truncated || candidate.truncated {
        return Err(Skip::Truncated);
    }
    let a = read(baseline, rules)?;
    let b = read(candidate, rules)?;
    Ok(compare_read(baseline, &a, candidate, &b, rules))
}

/// An answer's body as [`compare`] reads it (decoded, parsed), so that an answer compared with
/// several others is read once; `Err` when it cannot be compared.
pub fn read(response: &Response<'_>, rules: &Rules) -> Result<Body, Skip> {
    if response.truncated {
        return Err(Skip::Truncated);
    }
    body::read(
        response.headers,
        response.trailers,
        response.body,
        rules.max_body,
    )
    .map_err(Skip::Body)
}

/// [`compare`] of two answers whose bodies were [`read`]: `a` the baseline's, `b` the
/// candidate's.
pub fn compare_read(
    baseline: &Response<'_>,
    a: &Body,
    candidate: &Response<'_>,
    b: &Body,
    rules: &Rules,
) -> Differences {
    let mut out = Differences::default();
    let push = |out: &mut Differences, field: String, at: String, change: Change| {
        out.push(FieldDiff { field, at, change }, rules.json.limit);
    };
    if baseline.status != candidate.status {
        push(&mut out, "status".into(), "status".into(), Change::Value);
    }
    for name in &rules.headers {
        let field = format!("header:{name}");
        let values = |h: &HeaderMap| {
            h.get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (x, y) = (
            baseline.headers.contains_key(name),
            candidate.headers.contains_key(name),
        );
        let change = match (x, y) {
            (true, false) => Some(Change::Missing),
            (false, true) => Some(Change::Extra),
            (false, false) => None,
            (true, true) => {
                let (p, q) = (values(baseline.headers), values(candidate.headers));
                (p != q && !json::both_match(&rules.ignore_values, &p, &q)).then_some(Change::Value)
            }
        };
        if let Some(change) = change {
            push(&mut out, field.clone(), field, change);
        }
    }
    match (a, b) {
        (Body::Json(x), Body::Json(y)) => {
            let found = json::diff_with(x, y, &rules.json, &rules.ignore_values);
            out.extend(found, rules.json.limit);
        }
        (
            Body::Grpc {
                status: s,
                messages: m,
            },
            Body::Grpc {
                status: t,
                messages: n,
            },
        ) => {
            if s != t {
                push(
                    &mut out,
                    "grpc-status".into(),
                    "grpc-status".into(),
                    Change::Value,
                );
            }
            for i in 0..m.len().max(n.len()) {
                let change = match (m.get(i), n.get(i)) {
                    (Some(p), Some(q)) if p == q => continue,
                    (Some(_), Some(_)) => Change::Value,
                    (Some(_), None) => Change::Missing,
                    _ => Change::Extra,
                };
                push(
                    &mut out,
                    "grpc-message/*".into(),
                    format!("grpc-message/{i}"),
                    change,
                );
            }
        }
        (Body::Text(x), Body::Text(y)) if x != y => {
            let (p, q): (Vec<&str>, Vec<&str>) = (x.lines().collect(), y.lines().collect());
            if p.len().max(q.len()) > MAX_TEXT_LINES {
                push(
                    &mut out,
                    "body:text".into(),
                    "body:text".into(),
                    Change::Value,
                );
            } else {
                for i in 0..p.len().max(q.len()) {
                    let change = match (p.get(i), q.get(i)) {
                        (Some(a), Some(b))
                            if a == b
                                || json::both_match(&rules.ignore_values, a, b)
                                || masked(&rules.ignore_values, a)
                                    == masked(&rules.ignore_values, b) =>
                        {
                            continue
                        }
                        (Some(_), Some(_)) => Change::Value,
                        (Some(_), None) => Change::Missing,
                        _ => Change::Extra,
                    };
                    let line = format!("body:line/{}", i + 1);
                    push(&mut out, line.clone(), line, change);
                }
            }
        }
        (Body::Binary(x), Body::Binary(y)) if x != y => {
            let field = if x.len() == y.len() {
                "body:digest"
            } else {
                "body:length"
            };
            push(&mut out, field.into(), field.into(), Change::Value);
        }
        _ if a.kind() != b.kind() => push(
            &mut out,
            "body:type".into(),
            "body:type".into(),
            Change::Type,
        ),
        _ => {}
    }
    out
}

/// A text line with what `patterns` match in it blanked out: two lines that differ only there
/// are no difference (`ignore.values`: a line both of whose versions a pattern matches, as a
/// JSON value, or whose differing parts the patterns match).
fn masked<'a>(patterns: &[Regex], line: &'a str) -> std::borrow::Cow<'a, str> {
    let mut line = std::borrow::Cow::Borrowed(line);
    for r in patterns {
        if r.is_match(&line) {
            line = std::borrow::Cow::Owned(r.replace_all(&line, "\u{0}").into_owned());
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::Pattern;
    use http::HeaderValue;

    fn rules() -> Rules {
        Rules {
            headers: vec![
                HeaderName::from_static("content-type"),
                HeaderName::from_static("x-version"),
            ],
            ignore_values: vec![Regex::new(r"^\d{4}-\d\d-\d\dT").expect("regex")],
            json: JsonOptions {
                limit: 50,
                ignore: vec![Pattern::parse("/trace").expect("pattern")],
                ..JsonOptions::default()
            },
            max_body: 1 << 20,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    fn response<'a>(status: u16, headers: &'a HeaderMap, body: &'a [u8]) -> Response<'a> {
        Response {
            status,
            headers,
            trailers: None,
            body,
            truncated: false,
        }
    }

    fn fields(d: &Differences) -> Vec<(&str, &'static str)> {
        d.fields
            .iter()
            .map(|f| (f.field.as_str(), f.change.as_str()))
            .collect()
    }

    #[test]
    fn status_selected_headers_and_json_fields() {
        let h1 = headers(&[
            ("content-type", "application/json"),
            ("x-version", "1"),
            ("date", "a"),
        ]);
        let h2 = headers(&[("content-type", "application/json"), ("date", "b")]);
        let v1 = br#"{"price": 10, "at": "2026-11-26T10:00:00Z", "trace": "abc", "name": "x"}"#;
        let v2 = br#"{"price": 12, "at": "2026-11-26T10:00:01Z", "trace": "def", "name": "x"}"#;
        let d =
            compare(&response(200, &h1, v1), &response(201, &h2, v2), &rules()).expect("compared");
        assert_eq!(
            fields(&d),
            [("status", "value"), ("header:x-version", "missing"), ("/price", "value")],
            "date is not a compared header; the timestamp matches an ignored pattern; /trace is ignored"
        );
        let same =
            compare(&response(200, &h1, v1), &response(200, &h1, v1), &rules()).expect("compared");
        assert_eq!(same, Differences::default());
    }

    #[test]
    fn text_by_lines_bytes_by_length_and_digest_and_cut_bodies_not_at_all() {
        let text = headers(&[("content-type", "text/plain")]);
        let json = headers(&[("content-type", "application/json")]);
        let d = compare(
            &response(200, &text, b"a\nb\n2026-11-26T10:00:00Z ok\nd"),
            &response(200, &text, b"a\nc\n2026-11-26T10:00:07Z ok"),
            &rules(),
        );
        assert_eq!(
            d.as_ref().map(fields),
            Ok(vec![("body:line/2", "value"), ("body:line/4", "missing")]),
            "line 3 differs only in an ignored timestamp"
        );
        let mut clock = rules();
        clock.ignore_values = vec![Regex::new(r"\d\d:\d\d:\d\d").expect("regex")];
        let d = compare(
            &response(200, &text, b"served at 10:00:00 by a"),
            &response(200, &text, b"served at 10:00:07 by a"),
            &clock,
        );
        assert_eq!(
            d,
            Ok(Differences::default()),
            "what the pattern matches is blanked"
        );
        let long: String = (0..=MAX_TEXT_LINES).map(|i| format!("{i}\n")).collect();
        let d = compare(
            &response(200, &text, long.as_bytes()),
            &response(200, &text, b"0\n"),
            &rules(),
        );
        assert_eq!(d.as_ref().map(fields), Ok(vec![("body:text", "value")]));
        let bytes = headers(&[("content-type", "application/octet-stream")]);
        let d = compare(
            &response(200, &bytes, b"\x00\x01"),
            &response(200, &bytes, b"\x00\x02"),
            &rules(),
        );
        assert_eq!(d.as_ref().map(fields), Ok(vec![("body:digest", "value")]));
        let d = compare(
            &response(200, &bytes, b"\x00\x01"),
            &response(200, &bytes, b"\x00"),
            &rules(),
        );
        assert_eq!(d.as_ref().map(fields), Ok(vec![("body:length", "value")]));
        let d = compare(
            &response(200, &json, b"{}"),
            &response(200, &text, b"{}"),
            &rules(),
        );
        assert_eq!(
            d.as_ref().map(fields),
            Ok(vec![
                ("header:content-type", "value"),
                ("body:type", "type")
            ])
        );
        let mut cut = response(200, &text, b"a");
        cut.truncated = true;
        assert_eq!(
            compare(&cut, &response(200, &text, b"a"), &rules()).map_err(|s| s.reason()),
            Err("truncated")
        );
    }
}

//! HAR 1.2 export, so a person can open captured traffic in a browser's devtools or any HAR
//! viewer.
//!
//! Entries are written as they are read, one JSON object at a time, so a large archive never
//! sits in memory as one document. A request is held back (up to [`MAX_PENDING`] of them) until
//! its response arrives, so that archives with `record_responses` show both; a request without
//! one gets status 0, as browsers show a request that never got an answer. Bodies that are not
//! UTF-8 are base64-encoded (`"encoding": "base64"`), as HAR allows for response content; request
//! bodies that are not UTF-8 are written the same way with a `comment` saying so.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::Arc;

use serde_json::{json, Value};
use teeway_runtime::proxy::percent_decode;

use crate::{Envelope, MirroredRequest, ResponseRecord};

/// Largest decoded body written into a HAR entry: a small compressed body can decode to
/// gigabytes.
const MAX_DECODED_BODY: usize = 16 << 20;

/// Requests held back waiting for their responses.
pub const MAX_PENDING: usize = 10_000;

/// Writes a HAR document entry by entry.
pub struct HarWriter<W: Write> {
    out: W,
    first: bool,
    /// Requests held back, and whether a response has been written for them yet (a request
    /// replayed to several targets gets one entry per target's answer), by (agent session,
    /// source cluster, id): what ties a response to its request.
    pending: HashMap<(u64, Arc<str>, u64), (MirroredRequest, bool)>,
    order: VecDeque<(u64, Arc<str>, u64)>,
    /// Entries written.
    pub entries: u64,
}

impl<W: Write> std::fmt::Debug for HarWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HarWriter")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl<W: Write> HarWriter<W> {
    /// Starts the document.
    pub fn new(mut out: W) -> io::Result<Self> {
        let creator = json!({"name": "teeway", "version": env!("CARGO_PKG_VERSION")});
        write!(
            out,
            "{{\"log\":{{\"version\":\"1.2\",\"creator\":{creator},\"entries\":["
        )?;
        Ok(Self {
            out,
            first: true,
            pending: HashMap::new(),
            order: VecDeque::new(),
            entries: 0,
        })
    }

    /// Adds a record: a request waits for its response; a response completes its request.
    pub fn push(&mut self, record: Envelope) -> io::Result<()> {
        match record {
            Envelope::HttpRequest(r) => {
                let key = r.meta.key();
                // Production's answer, carried with the request, is its first entry's.
                let answered = match &r.production {
                    Some(production) => {
                        self.entry(&r, Some(&production.to_record(&r)))?;
                        true
                    }
                    None => false,
                };
                if let Some((previous, answered)) = self.pending.insert(key.clone(), (r, answered))
                {
                    if !answered {
                        self.entry(&previous, None)?;
                    }
                }
                self.order.push_back(key);
                while self.pending.len() > MAX_PENDING {
                    self.flush_oldest()?;
                }
            }
            // An interim response (100 Continue, 103 Early Hints) is not the answer.
            Envelope::HttpResponse(resp)
                if resp.status.is_informational() && resp.status != 101 => {}
            Envelope::HttpResponse(resp) => {
                let key = resp.meta.key();
                if let Some((request, _)) = self.pending.remove(&key) {
                    let written = self.entry(&request, Some(&resp));
                    self.pending.insert(key, (request, true));
                    written?;
                }
            }
            // HAR holds HTTP only.
            Envelope::RpcRequest(_) | Envelope::Other { .. } => {}
        }
        Ok(())
    }

    fn flush_oldest(&mut self) -> io::Result<()> {
        while let Some(key) = self.order.pop_front() {
            if let Some((request, answered)) = self.pending.remove(&key) {
                if answered {
                    continue;
                }
                return self.entry(&request, None);
            }
        }
        Ok(())
    }

    /// Writes what is still pending and closes the document; the output and the number of
    /// entries written (requests wait for their responses, so [`HarWriter::entries`] counts
    /// only some of them until now).
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        while !self.pending.is_empty() && !self.order.is_empty() {
            self.flush_oldest()?;
        }
        write!(self.out, "]}}}}")?;
        self.out.flush()?;
        Ok((self.out, self.entries))
    }

    fn entry(&mut self, r: &MirroredRequest, resp: Option<&ResponseRecord>) -> io::Result<()> {
        let value = entry(r, resp);
        if !self.first {
            self.out.write_all(b",")?;
        }
        self.first = false;
        serde_json::to_writer(&mut self.out, &value)?;
        self.entries += 1;
        Ok(())
    }
}

fn entry(r: &MirroredRequest, resp: Option<&ResponseRecord>) -> Value {
    let host = r.host().unwrap_or("unknown.invalid");
    let host_port = r
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| r.uri.authority().map(|a| a.as_str()))
        .unwrap_or(host);
    let path = r.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let url = format!("http://{host_port}{path}");
    let query: Vec<Value> = r
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            json!({"name": percent_decode(n), "value": percent_decode(v)})
        })
        .collect();
    let mut request = json!({
        "method": r.method.as_str(),
        "url": url,
        "httpVersion": version(r.version),
        "cookies": request_cookies(&r.headers),
        "headers": headers(&r.headers),
        "queryString": query,
        "headersSize": -1,
        "bodySize": r.body.len(),
    });
    if !r.body.is_empty() {
        let mime = content_type(&r.headers);
        let mut post = match std::str::from_utf8(&r.body) {
            Ok(text) => json!({"mimeType": mime, "text": text}),
            Err(_) => json!({
                "mimeType": mime,
                "text": base64(&r.body),
                "comment": "base64: the body is not UTF-8",
            }),
        };
        if r.body_truncated {
            post["comment"] = json!(
                "truncated (at the agent's max_body_bytes, or cut short of its Content-Length in a capture)"
            );
        }
        request["postData"] = post;
    }
    let (response, wait) = match resp {
        Some(resp) => {
            // As browsers export it: `text` is the body after Content-Encoding is undone,
            // `compression` what the encoding saved.
            let (decoded, problem) = decode_content(&resp.headers, &resp.body);
            let mut content = json!({
                "size": decoded.len(),
                "compression": decoded.len() as i64 - resp.body.len() as i64,
                "mimeType": content_type(&resp.headers),
            });
            match std::str::from_utf8(&decoded) {
                Ok(text) => content["text"] = json!(text),
                Err(_) => {
                    content["text"] = json!(base64(&decoded));
                    content["encoding"] = json!("base64");
                }
            }
            let mut notes = Vec::new();
            if let Some(problem) = problem {
                notes.push(problem);
            }
            if resp.body_truncated {
                notes.push("body truncated at the archive's max_response_body".to_owned());
            }
            if !notes.is_empty() {
                content["comment"] = json!(notes.join("; "));
            }
            (
                json!({
                    "status": resp.status.as_u16(),
                    "statusText": resp.status.canonical_reason().unwrap_or(""),
                    "httpVersion": version(resp.version),
                    "cookies": response_cookies(&resp.headers),
                    "headers": headers(&resp.headers),
                    "content": content,
                    "redirectURL": "",
                    "headersSize": -1,
                    "bodySize": resp.body.len(),
                }),
                resp.latency.as_secs_f64() * 1000.0,
            )
        }
        None => (
            json!({
                "status": 0,
                "statusText": "",
                "httpVersion": version(r.version),
                "cookies": [],
                "headers": [],
                "content": {"size": 0, "mimeType": "x-unknown"},
                "redirectURL": "",
                "headersSize": -1,
                "bodySize": -1,
                "comment": "no response recorded",
            }),
            0.0,
        ),
    };
    json!({
        "startedDateTime": iso8601(r.meta.received_at),
        "time": wait,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": wait, "receive": 0},
        "comment": match resp {
            Some(resp) if !resp.target.is_empty() => format!(
                "source cluster {}, id {}, answered by {}",
                r.meta.source_cluster, r.meta.id, resp.target
            ),
            _ => format!("source cluster {}, id {}", r.meta.source_cluster, r.meta.id),
        },
    })
}

/// The body with its `Content-Encoding` undone ([`teeway_compare::body::undo`]), or the body as
/// it is, and why it could not be.
fn decode_content(headers: &http::HeaderMap, body: &[u8]) -> (Vec<u8>, Option<String>) {
    use teeway_compare::body::{undo, Undone};
    let (data, undone) = undo(headers, body, MAX_DECODED_BODY);
    let problem = match undone {
        Undone::Whole => None,
        Undone::Unknown(other) => Some(format!(
            "content-encoding {other} is not decoded: text is the body as sent"
        )),
        Undone::Cut(limit) => Some(format!(
            "decoded body cut at {} MiB (a compression bomb, or a very large answer)",
            limit >> 20
        )),
        // A body the archive cut (max_response_body) decodes up to the cut: that is kept.
        Undone::Broken {
            coding,
            error,
            partial: false,
        } => Some(format!(
            "content-encoding {coding} could not be undone ({error}): text is the body as sent"
        )),
        Undone::Broken {
            coding,
            error,
            partial: true,
        } => Some(format!(
            "content-encoding {coding}: the decoded start of a body that does not decode whole ({error}; cut by the archive?)"
        )),
    };
    (data, problem)
}

/// HAR cookies of a request: each `name=value` pair of its `Cookie` headers.
fn request_cookies(headers: &http::HeaderMap) -> Vec<Value> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            Some(json!({"name": name.trim(), "value": value.trim()}))
        })
        .collect()
}

/// HAR cookies of a response: one per `Set-Cookie`, with its attributes.
fn response_cookies(headers: &http::HeaderMap) -> Vec<Value> {
    headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let mut parts = v.split(';');
            let (name, value) = parts.next()?.trim().split_once('=')?;
            let mut cookie = json!({"name": name.trim(), "value": value.trim()});
            for attribute in parts {
                let (key, val) = attribute
                    .trim()
                    .split_once('=')
                    .map_or((attribute.trim(), ""), |(k, v)| (k.trim(), v.trim()));
                match key.to_ascii_lowercase().as_str() {
                    "path" => cookie["path"] = json!(val),
                    "domain" => cookie["domain"] = json!(val),
                    "expires" => cookie["expires"] = json!(val),
                    "httponly" => cookie["httpOnly"] = json!(true),
                    "secure" => cookie["secure"] = json!(true),
                    _ => {}
                }
            }
            Some(cookie)
        })
        .collect()
}

fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn headers(h: &http::HeaderMap) -> Vec<Value> {
    h.iter()
        .map(|(n, v)| json!({"name": n.as_str(), "value": String::from_utf8_lossy(v.as_bytes())}))
        .collect()
}

fn content_type(h: &http::HeaderMap) -> String {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned()
}

/// `2026-11-21T10:15:00.123Z`.
pub fn iso8601(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = crate::write::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::tests::{sample_request, sample_response};

    #[test]
    fn document_is_valid_har_with_paired_responses() {
        let mut w = HarWriter::new(Vec::new()).expect("start");
        w.push(Envelope::HttpRequest(sample_request(1, b"{\"a\":1}")))
            .expect("push");
        w.push(Envelope::HttpRequest(sample_request(2, &[0xff, 0x00])))
            .expect("push");
        w.push(Envelope::HttpResponse(sample_response(1)))
            .expect("push");
        let (out, written) = w.finish().expect("finish");
        assert_eq!(written, 2, "entries still pending at the end are counted");
        let doc: Value = serde_json::from_slice(&out).expect("valid JSON");
        let entries = doc["log"]["entries"].as_array().expect("entries");
        assert_eq!(doc["log"]["version"], "1.2");
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0]["request"]["url"],
            "http://api.example.com/v1/items?id=7&x=%20"
        );
        assert_eq!(entries[0]["response"]["status"], 201);
        assert_eq!(entries[0]["request"]["postData"]["text"], "{\"a\":1}");
        assert_eq!(entries[0]["request"]["queryString"][0]["name"], "id");
        assert_eq!(entries[1]["response"]["status"], 0);
        assert_eq!(entries[1]["request"]["postData"]["text"], "/wA=");
        assert!(entries[0]["startedDateTime"]
            .as_str()
            .expect("date")
            .starts_with("2023-11-14T22:13:20.000"));
    }

    #[test]
    fn entries_look_as_browsers_export_them() {
        use std::io::Write as _;
        let mut request = sample_request(9, b"");
        request.uri = http::Uri::from_static("/s?q=caf%C3%A9%20au+lait&empty=&flag");
        request
            .headers
            .insert("cookie", "session=abc; theme=dark".parse().expect("value"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"ok\":true}").expect("gzip");
        let mut answer = sample_response(9);
        answer.target = "http://v2.test:8080".into();
        answer.body = bytes::Bytes::from(gz.finish().expect("gzip"));
        answer
            .headers
            .insert("content-encoding", "gzip".parse().expect("value"));
        answer.headers.append(
            "set-cookie",
            "id=7; Path=/; HttpOnly; Secure".parse().expect("value"),
        );
        let mut second = answer.clone();
        second.target = "http://v3.test:8080".into();
        second.body = bytes::Bytes::from_static(b"plain");
        second.headers.remove("content-encoding");
        let mut interim = sample_response(9);
        interim.status = http::StatusCode::CONTINUE;

        let mut w = HarWriter::new(Vec::new()).expect("start");
        w.push(Envelope::HttpRequest(request)).expect("push");
        w.push(Envelope::HttpResponse(interim)).expect("push");
        w.push(Envelope::HttpResponse(answer)).expect("push");
        w.push(Envelope::HttpResponse(second)).expect("push");
        let (out, written) = w.finish().expect("finish");
        assert_eq!(
            written, 2,
            "one entry per target's answer, none for the 100"
        );
        let doc: Value = serde_json::from_slice(&out).expect("valid JSON");
        let e = &doc["log"]["entries"];
        let query = &e[0]["request"]["queryString"];
        assert_eq!(query[0]["value"], "café au+lait");
        assert_eq!(query[1]["name"], "empty");
        assert_eq!(e[0]["request"]["cookies"][1]["name"], "theme");
        assert_eq!(e[0]["request"]["cookies"][1]["value"], "dark");
        assert_eq!(e[0]["response"]["status"], 201);
        assert_eq!(e[0]["response"]["content"]["text"], "{\"ok\":true}");
        assert_eq!(e[0]["response"]["content"]["size"], 11);
        let cookie = &e[0]["response"]["cookies"][0];
        assert_eq!(
            (cookie["name"].as_str(), cookie["path"].as_str()),
            (Some("id"), Some("/"))
        );
        assert_eq!(cookie["httpOnly"], true);
        assert!(e[0]["comment"]
            .as_str()
            .expect("comment")
            .ends_with("answered by http://v2.test:8080"));
        assert_eq!(e[1]["response"]["content"]["text"], "plain");
        assert!(e[1]["comment"]
            .as_str()
            .expect("comment")
            .ends_with("answered by http://v3.test:8080"));
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }
}

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

use crate::{MirroredRequest, Record, ResponseRecord};

/// Requests held back waiting for their responses.
pub const MAX_PENDING: usize = 10_000;

/// Writes a HAR document entry by entry.
pub struct HarWriter<W: Write> {
    out: W,
    first: bool,
    pending: HashMap<(Arc<str>, u64), MirroredRequest>,
    order: VecDeque<(Arc<str>, u64)>,
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
    pub fn push(&mut self, record: Record) -> io::Result<()> {
        match record {
            Record::Request(r) => {
                let key = (r.source_cluster.clone(), r.id);
                if let Some(previous) = self.pending.insert(key.clone(), r) {
                    self.entry(&previous, None)?;
                }
                self.order.push_back(key);
                while self.pending.len() > MAX_PENDING {
                    self.flush_oldest()?;
                }
            }
            Record::Response(resp) => {
                let key = (resp.source_cluster.clone(), resp.request_id);
                if let Some(request) = self.pending.remove(&key) {
                    self.entry(&request, Some(&resp))?;
                }
            }
        }
        Ok(())
    }

    fn flush_oldest(&mut self) -> io::Result<()> {
        while let Some(key) = self.order.pop_front() {
            if let Some(request) = self.pending.remove(&key) {
                return self.entry(&request, None);
            }
        }
        Ok(())
    }

    /// Writes what is still pending and closes the document; the output and the number of
    /// entries written (requests wait for their responses, so [`HarWriter::entries`] counts
    /// only some of them until now).
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        while !self.pending.is_empty() {
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
            json!({"name": n, "value": v})
        })
        .collect();
    let mut request = json!({
        "method": r.method.as_str(),
        "url": url,
        "httpVersion": version(r.version),
        "cookies": [],
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
            post["comment"] = json!("truncated at the agent's max_body_bytes");
        }
        request["postData"] = post;
    }
    let (response, wait) = match resp {
        Some(resp) => {
            let mut content = json!({
                "size": resp.body.len(),
                "mimeType": content_type(&resp.headers),
            });
            match std::str::from_utf8(&resp.body) {
                Ok(text) => content["text"] = json!(text),
                Err(_) => {
                    content["text"] = json!(base64(&resp.body));
                    content["encoding"] = json!("base64");
                }
            }
            (
                json!({
                    "status": resp.status.as_u16(),
                    "statusText": resp.status.canonical_reason().unwrap_or(""),
                    "httpVersion": version(resp.version),
                    "cookies": [],
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
        "startedDateTime": iso8601(r.received_at),
        "time": wait,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": wait, "receive": 0},
        "comment": format!("source cluster {}, id {}", r.source_cluster, r.id),
    })
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
        w.push(Record::Request(sample_request(1, b"{\"a\":1}")))
            .expect("push");
        w.push(Record::Request(sample_request(2, &[0xff, 0x00])))
            .expect("push");
        w.push(Record::Response(sample_response(1))).expect("push");
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

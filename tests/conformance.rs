//! Differential conformance: production never sees the agent.
//!
//! A corpus of odd-but-legal HTTP/1.0, HTTP/1.1 and h2 requests is sent twice, once straight to
//! a byte-recording primary and once through the agent, and what the primary received and what
//! the client got back are compared, byte for byte but for the written list of allowed
//! differences below ([`ALLOWED_DIFFERENCES`]). The shadow side is compared the same way: every
//! copy the shadow receives must be what the primary received through the agent, but for the
//! documented differences of the copy.
//!
//! The primary and the shadow are [`Recorder`]s: raw TCP servers that keep each request's exact
//! bytes (filed by its `x-case` field) and answer with exact scripted bytes, so the case, order
//! and absence of response fields can be checked at the client. HTTP/1.x clients are raw sockets
//! writing exact bytes; h2 clients are hyper's, and their direct baseline is the HTTP/1.1 request
//! an HTTP/1.1 client would send for the same thing (the primary speaks HTTP/1.1).
//!
//! Every case runs; each test reports all the cases that differ together, each with what
//! differed, then fails once. Adding a case is one line in [`corpus`].
//!
//! # Allowed differences
//!
//! Primary side (what the primary receives) and client side (what the client gets back):
//!
//! - **P1 forwarding**: `x-forwarded-for`, `via` and `x-forwarded-proto` may be added or
//!   extended; they are not compared.
//! - **P2 hop-by-hop**: `Connection`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`,
//!   `TE`, `Upgrade` and every field named in `Connection` may be removed or added; they are not
//!   compared (except on a `101`, where `Connection` and `Upgrade` are the handshake).
//! - **P3 framing**: chunk sizes, boundaries and extensions may be re-framed, and a
//!   close-delimited response may reach the client chunked or the reverse; the decoded body and
//!   the trailer fields are compared.
//! - **P4 version**: requests reach the primary as HTTP/1.1 (checked); the version in the status
//!   line is the agent's; an HTTP/1.0 request without `Host` may get one.
//! - **P5 absolute-form**: `GET http://a/x` reaches the primary as `GET /x` with `Host: a`,
//!   whatever Host the client sent (RFC 9112 section 3.2.2).
//! - **P6 whitespace**: optional whitespace around a field value is not part of it (RFC 9110
//!   section 5.5).
//! - **P7 expect**: the agent answers `Expect: 100-continue` itself (hyper sends `100 Continue`
//!   when the body is first read), so `100 Continue` interim answers are not compared, and the
//!   expectation must not reach the primary (checked: a primary told to expect would answer an
//!   expectation the agent already met).
//! - **H1 h2 clients**: field names are lower-case (RFC 9113 section 8.2.2); `:authority` is the
//!   primary's `Host` (its position among the fields is not compared); an h2 response has no
//!   reason phrase; the test's h2 client (hyper) groups fields by name and drops interim
//!   responses, so order across names and 1xx are not compared for h2.
//!
//! - **P8 grouping**: fields of one name are kept together in their own order (hyper's
//!   `HeaderMap` groups them), so order is compared by each name's first appearance; values
//!   per name are compared in order.
//! - **P9 trailer case**: trailer field names are written lower-case (hyper keeps the case of
//!   head fields only); names and values are compared.
//! - **P10 repeated Content-Length**: several `Content-Length` fields of one value may be merged
//!   into one (RFC 9110 section 8.6).
//! - **P11 interim answers**: 1xx answers other than the agent's own `100 Continue` are not
//!   forwarded (hyper's server cannot send them; nginx 1.22 does not forward 103 either).
//! - **P12 304**: a `304`'s `Content-Length` may be dropped (hyper's server omits it; RFC 9110
//!   section 8.6 makes it optional).
//! - **P13 response trailers**: reach the client only when it sent `TE: trailers`; without it
//!   they may be discarded (RFC 9110 section 6.5.1).
//! - `Content-Length: 3, 3` is not in this corpus: the agent refuses it with 400 as nginx does
//!   (RFC 9110 section 8.6 allows it), counted as `bad_request`; `tests/transparency.rs` checks it.
//!
//! Shadow side (what the shadow receives, against what the primary received):
//!
//! - **S1 redaction**: the default credential fields (`Authorization`, `Cookie`, `X-Api-Key`...:
//!   `teeway_agent::policy::DEFAULT_REDACTED_HEADERS`) are removed from the copy, and the
//!   default token query parameters from its target.
//! - **S2 marker**: the gateway adds its marker field `x-teeway-mirror`.
//! - **S3 whole copy**: P2 and P3 again, and a body the primary got chunked may reach the shadow
//!   with a `Content-Length` of its decoded length (the copy is sent whole); trailers must still
//!   arrive.
//! - **S4 copy case**: field names in the copy are lower-case (the wire format carries names
//!   normalised); names, values and order are compared.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use teeway::stack::loopback_target;
use teeway_agent::metrics as am;
use teeway_gateway::config::TargetConfig;
use teeway_gateway::metrics as gm;
use teeway_runtime::config::UpstreamProtocol;

use support::recorder::{
    head_end, parse_body, request_framing, response_framing, show, show_short, trim_ows, Body,
    Field, Framing, Head, Log, Recorded, Recorder, Script, Scripts, Wire, GATE_LIMIT,
};
use support::{agent_settled, assert_agent_identity, gateway_settled, settle, Stack};

/// The written list of allowed differences (see the module documentation), printed with every
/// failure report. Anything not named here is compared byte for byte.
const ALLOWED_DIFFERENCES: &[&str] = &[
    "P1 forwarding: x-forwarded-for, via, x-forwarded-proto may be added or extended (not compared)",
    "P2 hop-by-hop: Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding, TE, Upgrade and \
     fields named in Connection may be removed or added (a 101's Connection and Upgrade are compared)",
    "P3 framing: chunk sizes, boundaries and extensions may be re-framed, close-delimited may become \
     chunked and the reverse; decoded body and trailers are compared",
    "P4 version: requests reach the primary as HTTP/1.1 (checked); the status line's version is the \
     agent's; an HTTP/1.0 request without Host may get one",
    "P5 absolute-form: `GET http://a/x` reaches the primary as `GET /x` with Host `a` (RFC 9112 3.2.2)",
    "P6 whitespace: optional whitespace around a field value is not part of it (RFC 9110 5.5)",
    "P7 expect: the agent answers Expect: 100-continue itself: 100 Continue interim answers are not \
     compared, and the expectation must not reach the primary (checked)",
    "H1 h2 clients: lower-case names; :authority is the primary's Host (position not compared); no \
     reason phrase; order across names and 1xx not observed by the test's h2 client",
    "P8 grouping: fields of one name are kept together in their own order; order is compared by \
     each name's first appearance",
    "P9 trailer case: trailer field names are written lower-case",
    "P10 repeated Content-Length: several Content-Length fields of one value may become one",
    "P11 interim answers: 1xx other than the agent's own 100 Continue are not forwarded",
    "P12 304: a 304's Content-Length may be dropped",
    "P13 response trailers: reach the client only when it sent TE: trailers",
    "S1 copy: default credential fields (Authorization, Cookie, X-Api-Key...) removed (redaction)",
    "S2 copy: the gateway's marker x-teeway-mirror added",
    "S3 copy: P2, P3, and a body the primary got chunked may reach the shadow with Content-Length of \
     its decoded length; trailers must still arrive",
    "S4 copy case: field names in the copy are lower-case",
];

/// The issue asks for at least this many cases.
const MIN_CASES: usize = 300;

/// Time one case has for all its exchanges: ample on loopback, short enough that a handful of
/// stuck cases keep the file well under a minute.
const CASE_LIMIT: Duration = Duration::from_secs(5);

/// Interim responses read before a final one at most.
const MAX_INTERIM: usize = 8;

/// Replays the shadow may have in flight: the whole corpus, so the gateway sheds none and every
/// copy can be compared.
const SHADOW_CONCURRENCY: usize = 1024;

/// The Date every scripted answer carries (but the one that tests its absence).
const DATE: &str = "date: Sun, 06 Nov 1994 08:49:37 GMT\r\n";

/// The authority clients address.
const AUTHORITY: &str = "api.example.com";

/// Fields the agent may add or extend (P1).
const FORWARDING: [&str; 3] = ["x-forwarded-for", "via", "x-forwarded-proto"];

/// Hop-by-hop fields (P2), besides those `Connection` names.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
];

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

/// Which test runs a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// HTTP/1.0 and HTTP/1.1 requests with ordinary exchanges.
    Http1,
    /// h2 requests (to an HTTP/1.1 primary).
    H2,
    /// Exchanges where timing matters: 100-continue, early answers, aborts, events, upgrades.
    Streaming,
}

/// Whether the shadow must get a copy of a case's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mirror {
    /// Each request the primary got whole is copied.
    Expected,
    /// Never copied (an upgrade, an aborted body).
    Never,
    /// Not specified (the primary answered before reading the body).
    Either,
}

/// How an HTTP/1.x client talks.
#[derive(Clone, Debug)]
enum Flow {
    /// Writes all the bytes at once (one request, or several pipelined) and reads one answer per
    /// request.
    Send(Vec<u8>),
    /// Writes each request once the previous one is answered, on one connection.
    Sequential(Vec<Vec<u8>>),
    /// Writes the head, then the body once `100 Continue` arrives; a final answer first means
    /// the body is never sent.
    Expect { head: Vec<u8>, body: Vec<u8> },
    /// Writes the head, then the body alongside reading the answer.
    EarlyAnswer { head: Vec<u8>, body: Vec<u8> },
    /// Writes the head and the first `part` body bytes, waits for the primary to have them,
    /// then closes the connection.
    Abort {
        bytes: Vec<u8>,
        key: String,
        part: usize,
    },
    /// Writes the handshake; after a `101`, writes `after` and reads its echo.
    Upgrade {
        head: Vec<u8>,
        after: Vec<u8>,
        key: String,
    },
    /// Writes the request and reads a streamed answer, notifying `gate` once `marker` arrives.
    Events {
        request: Vec<u8>,
        marker: Vec<u8>,
        gate: Arc<Notify>,
    },
}

/// An h2 request body.
#[derive(Clone, Debug)]
enum H2Body {
    Empty,
    /// One data frame; the request carries `content-length`.
    Full(Vec<u8>),
    /// Several data frames and trailers, no `content-length`.
    Streamed {
        chunks: Vec<Vec<u8>>,
        trailers: Vec<(String, Vec<u8>)>,
    },
}

/// An h2 request, and the HTTP/1.1 flow that is its direct baseline.
#[derive(Clone, Debug)]
struct H2Case {
    method: Method,
    authority: String,
    path: String,
    /// Fields in order (lower-case names, as h2 has them).
    fields: Vec<(String, Vec<u8>)>,
    body: H2Body,
    /// For a streamed answer: the first event's text and the gate to notify on it.
    events: Option<(Vec<u8>, Arc<Notify>)>,
    /// What an HTTP/1.1 client sends for the same request, straight to the primary.
    h1: Flow,
}

#[derive(Clone, Debug)]
enum Send {
    H1(Flow),
    H2(Box<H2Case>),
}

/// One case: what the client sends, how the primary answers, whether the shadow gets a copy.
#[derive(Clone, Debug)]
struct Case {
    /// `cNNN`, the `x-case` value (`cNNN.2`, `cNNN.3` for further requests of the case).
    id: String,
    name: String,
    group: Group,
    send: Send,
    scripts: Vec<(String, Script)>,
    mirror: Mirror,
}

/// Builds the corpus, numbering cases as they are added.
#[derive(Default)]
struct Corpus {
    cases: Vec<Case>,
}

impl Corpus {
    fn next_id(&self) -> String {
        format!("c{:03}", self.cases.len())
    }

    fn add(
        &mut self,
        group: Group,
        name: impl Into<String>,
        mirror: Mirror,
        make: impl FnOnce(&str) -> (Send, Vec<(String, Script)>),
    ) {
        let id = self.next_id();
        let (send, scripts) = make(&id);
        self.cases.push(Case {
            id,
            name: name.into(),
            group,
            send,
            scripts,
            mirror,
        });
    }

    /// One HTTP/1.x request (`{id}` in it is the case key) answered with `answer`.
    fn h1(&mut self, name: impl Into<String>, request: &[u8], answer: Vec<u8>) {
        self.h1_script(name, request, bytes(answer), Mirror::Expected);
    }

    fn h1_script(
        &mut self,
        name: impl Into<String>,
        request: &[u8],
        script: Script,
        mirror: Mirror,
    ) {
        self.add(Group::Http1, name, mirror, |id| {
            (
                Send::H1(Flow::Send(fill(request, id))),
                vec![(id.to_owned(), script)],
            )
        });
    }

    /// Several requests (keys `{id}`, `{id}.2`, ...) and their answers, sent by `flow`.
    fn h1_many(
        &mut self,
        name: impl Into<String>,
        flow: impl FnOnce(&str) -> Flow,
        answers: Vec<Vec<u8>>,
    ) {
        self.add(Group::Http1, name, Mirror::Expected, |id| {
            let scripts = answers
                .into_iter()
                .enumerate()
                .map(|(i, a)| (sub_key(id, i), bytes(a)))
                .collect();
            (Send::H1(flow(id)), scripts)
        });
    }

    /// An h2 request answered with `answer`.
    fn h2(
        &mut self,
        name: impl Into<String>,
        method: Method,
        path: &str,
        fields: &[(&str, &[u8])],
        body: H2Body,
        answer: Vec<u8>,
    ) {
        self.add(Group::H2, name, Mirror::Expected, |id| {
            let case = h2_case(id, method, AUTHORITY, path, fields, body);
            (
                Send::H2(Box::new(case)),
                vec![(id.to_owned(), bytes(answer))],
            )
        });
    }

    fn streaming(
        &mut self,
        name: impl Into<String>,
        mirror: Mirror,
        make: impl FnOnce(&str) -> (Send, Vec<(String, Script)>),
    ) {
        self.add(Group::Streaming, name, mirror, make);
    }
}

/// Key of a case's `i`th request: `{id}`, then `{id}.2`, `{id}.3`...
fn sub_key(id: &str, i: usize) -> String {
    if i == 0 {
        id.to_owned()
    } else {
        format!("{id}.{}", i + 1)
    }
}

/// `template` with every `{id}` replaced by `id`.
fn fill(template: &[u8], id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(template.len() + 8);
    let mut rest = template;
    while let Some(p) = rest.windows(4).position(|w| w == b"{id}") {
        out.extend_from_slice(&rest[..p]);
        out.extend_from_slice(id.as_bytes());
        rest = &rest[p + 4..];
    }
    out.extend_from_slice(rest);
    out
}

fn bytes(answer: Vec<u8>) -> Script {
    Script::Bytes {
        bytes: answer,
        close: false,
    }
}

/// `METHOD target HTTP/1.1` with lower-case `host` and `x-case`, then `extra` field lines (each
/// ending in CRLF) and `body` with its `content-length` when there is one.
fn request(method: &str, target: &str, extra: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nhost: {AUTHORITY}\r\nx-case: {{id}}\r\n")
        .into_bytes();
    out.extend_from_slice(extra);
    if !body.is_empty() {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn get(target: &str, extra: &str) -> Vec<u8> {
    request("GET", target, extra.as_bytes(), b"")
}

fn post(target: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    request("POST", target, extra.as_bytes(), body)
}

/// A chunked POST: `extra` field lines, then `chunks` as written (last chunk and trailers too).
fn chunked(target: &str, extra: &str, chunks: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {target} HTTP/1.1\r\nhost: {AUTHORITY}\r\nx-case: {{id}}\r\n{extra}transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(chunks);
    out
}

/// A `200` with lower-case fields, a Date and `body`.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{DATE}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An answer from its status line, field lines (framing included) and body.
fn answer(status_line: &str, fields: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{status_line}\r\n").into_bytes();
    out.extend_from_slice(fields);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A target of exactly `len` bytes.
fn long_target(len: usize) -> String {
    let mut t = String::from("/long/");
    let pattern = "segment-";
    while t.len() < len {
        let room = len - t.len();
        t.push_str(&pattern[..room.min(pattern.len())]);
    }
    t
}

/// `n` field lines `x-filler-i: value-i`.
fn filler_fields(n: usize) -> String {
    (0..n)
        .map(|i| format!("x-filler-{i}: value-{i}\r\n"))
        .collect()
}

/// The h2 request and the HTTP/1.1 request an HTTP/1.1 client sends for it: `host` first from
/// the authority, then the same fields, the body framed by `content-length` or chunked.
/// `content-length` is set where hyper's h2 client would set it, so both carry the same fields.
fn h2_case(
    id: &str,
    method: Method,
    authority: &str,
    path: &str,
    fields: &[(&str, &[u8])],
    body: H2Body,
) -> H2Case {
    let mut all: Vec<(String, Vec<u8>)> = vec![("x-case".into(), id.as_bytes().to_vec())];
    all.extend(fields.iter().map(|(n, v)| ((*n).to_owned(), fill(v, id))));
    let payload_method = !matches!(
        method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    );
    match &body {
        H2Body::Full(b) if !b.is_empty() || payload_method => {
            all.push(("content-length".into(), b.len().to_string().into_bytes()));
        }
        H2Body::Empty if payload_method => {
            all.push(("content-length".into(), b"0".to_vec()));
        }
        _ => {}
    }
    let h1 = h1_equivalent(&method, authority, path, &all, &body);
    H2Case {
        method,
        authority: authority.to_owned(),
        path: path.to_owned(),
        fields: all,
        body,
        events: None,
        h1: Flow::Send(h1),
    }
}

/// The HTTP/1.1 request for an h2 request's method, authority, path, fields and body: `host`
/// first, then the fields, then the body with its framing.
fn h1_equivalent(
    method: &Method,
    authority: &str,
    path: &str,
    fields: &[(String, Vec<u8>)],
    body: &H2Body,
) -> Vec<u8> {
    let field_line = |out: &mut Vec<u8>, name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    let mut h1 = format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\n").into_bytes();
    for (n, v) in fields {
        field_line(&mut h1, n, v);
    }
    match body {
        H2Body::Empty => h1.extend_from_slice(b"\r\n"),
        H2Body::Full(b) => {
            h1.extend_from_slice(b"\r\n");
            h1.extend_from_slice(b);
        }
        H2Body::Streamed { chunks, trailers } => {
            h1.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            for c in chunks {
                h1.extend_from_slice(&chunk(c));
            }
            h1.extend_from_slice(b"0\r\n");
            for (n, v) in trailers {
                field_line(&mut h1, n, v);
            }
            h1.extend_from_slice(b"\r\n");
        }
    }
    h1
}

/// Field lines of an h2 request: lower-case name, value (`{id}` in it is the case key).
type Fields<'a> = &'a [(&'a str, &'a [u8])];

/// Paths of the request grid: odd, legal, to be kept verbatim.
const GRID_PATHS: [(&str, &str); 8] = [
    ("root", "/"),
    ("percent-encoded", "/caf%C3%A9/%7Euser%20name"),
    ("%2F", "/files/a%2Fb%2fc"),
    ("dot segments", "/a/../b/./c"),
    ("leading ./", "/./x"),
    (
        "repeated query keys",
        "/search?tag=a&tag=b&tag=a&empty=&flag",
    ),
    (
        "query with / and ?",
        "/p?redirect=/x%3Fy%3D1&q=a+b&q=%F0%9F%A6%80",
    ),
    ("path parameters", "/a;b=c/d;e=f,g"),
];

const GRID_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Field sets of the grid: as curl writes them (Title-Case), lower-case, with repeated names,
/// with credentials.
const GRID_FIELD_SETS: [(&str, &str); 4] = [
    (
        "curl-style",
        "Host: api.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Case: {id}\r\n",
    ),
    (
        "lower-case",
        "host: api.example.com\r\naccept: application/json\r\nx-request-id: r-{id}\r\nx-case: {id}\r\n",
    ),
    (
        "repeated-name",
        "host: api.example.com\r\naccept-language: de\r\naccept-language: en;q=0.8\r\nx-case: {id}\r\nx-trace: a\r\nx-trace: b\r\n",
    ),
    (
        "credentials",
        "host: api.example.com\r\nauthorization: Bearer t0k3n\r\ncookie: session=abc; theme=dark\r\nx-case: {id}\r\naccept: */*\r\n",
    ),
];

/// One request of the grid: POST and PATCH with a Content-Length body, PUT chunked.
fn grid_request(method: &str, path: &str, set: &str, fields: &str) -> Vec<u8> {
    let title = set == "curl-style";
    let mut out = format!("{method} {path} HTTP/1.1\r\n{fields}").into_bytes();
    let json = br#"{"name":"caf\u00e9","n":[1,2,3]}"#;
    match method {
        "POST" | "PATCH" => {
            let (ct, cl) = if title {
                ("Content-Type", "Content-Length")
            } else {
                ("content-type", "content-length")
            };
            out.extend_from_slice(
                format!("{ct}: application/json\r\n{cl}: {}\r\n\r\n", json.len()).as_bytes(),
            );
            out.extend_from_slice(json);
        }
        "PUT" => {
            let te = if title {
                "Transfer-Encoding"
            } else {
                "transfer-encoding"
            };
            out.extend_from_slice(format!("{te}: chunked\r\n\r\n").as_bytes());
            out.extend_from_slice(b"7\r\n{\"a\":1,\r\n6\r\n\"b\":2}\r\n0\r\n\r\n");
        }
        _ => out.extend_from_slice(b"\r\n"),
    }
    out
}

/// The grid's answer: Title-Case fields for curl-style requests (as many servers write them),
/// lower-case otherwise; no body for HEAD.
fn grid_answer(method: &str, set: &str) -> Vec<u8> {
    let body: &[u8] = if method == "HEAD" { b"" } else { b"hello" };
    if set == "curl-style" {
        answer(
            "HTTP/1.1 200 OK",
            b"Content-Type: text/plain\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 5\r\n",
            body,
        )
    } else {
        answer(
            "HTTP/1.1 200 OK",
            format!("content-type: text/plain\r\n{DATE}content-length: 5\r\n").as_bytes(),
            body,
        )
    }
}

/// A chunk of an answer's chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The whole corpus, every group, numbered in order.
fn corpus() -> Vec<Case> {
    let mut c = Corpus::default();

    // Request targets, which must reach the primary verbatim.
    let target_16k = long_target(16 * 1024);
    let target_64k = long_target(64_000);
    let targets: [(&str, &str); 13] = [
        (
            "percent-encoded UTF-8, space and plus",
            "/caf%C3%A9/%E2%82%AC?name=J%C3%B6rg&x=%20%2B%25",
        ),
        ("%2F kept encoded", "/repos/a%2Fb/contents/dir%2Ffile.txt"),
        ("lower-case percent hex", "/a%2fb%3a%7e"),
        ("dot segments /a/../b", "/a/../b"),
        ("dot segment /./x", "/./x"),
        ("encoded dot segments", "/a/%2e%2e/b/%2E/c"),
        ("double slashes", "//a//b/"),
        ("repeated query keys", "/q?a=1&a=2&a=1&b&b=&a"),
        ("query holding ? and /", "/p?next=/x?y=1&z=/"),
        ("empty query", "/p?"),
        ("sub-delims, colon and at", "/a;b=c/d,e;f/!$&'()*+=:@x"),
        ("16 KB target", &target_16k),
        ("64,000-byte target", &target_64k),
    ];
    for (name, target) in targets {
        c.h1(format!("target: {name}"), &get(target, ""), ok(name));
    }
    c.h1(
        "target: asterisk-form OPTIONS *",
        &request("OPTIONS", "*", b"", b""),
        answer(
            "HTTP/1.1 200 OK",
            format!("allow: GET, HEAD, OPTIONS\r\n{DATE}content-length: 0\r\n").as_bytes(),
            b"",
        ),
    );
    c.h1(
        "target: absolute-form with a different Host (the target wins)",
        b"GET http://api.example.com/x?y=1 HTTP/1.1\r\nhost: other.example\r\nx-case: {id}\r\n\r\n",
        ok("absolute"),
    );
    c.h1(
        "target: absolute-form with a port",
        b"GET http://api.example.com:8080/x HTTP/1.1\r\nhost: api.example.com:8080\r\nx-case: {id}\r\n\r\n",
        ok("absolute with port"),
    );

    // Request fields.
    let fields: [(&str, String); 17] = [
        ("X-Custom-Header keeps its case", "X-Custom-Header: Value\r\n".into()),
        ("repeated name, adjacent", "accept: text/html\r\naccept: application/json\r\n".into()),
        ("repeated name, interleaved", "x-a: 1\r\nx-b: 2\r\nx-a: 3\r\n".into()),
        ("empty value", "x-empty:\r\nx-after: 1\r\n".into()),
        ("whitespace around a value", "x-pad: \t padded  value \t\r\n".into()),
        ("8 KB value", format!("x-big: {}\r\n", "v".repeat(8192))),
        ("quoted list", "x-list: \"a,b\", c;q=0.5, \"d\\\"e\"\r\n".into()),
        ("97 more field lines (99 in all)", filler_fields(97)),
        ("98 more field lines (100 in all)", filler_fields(98)),
        ("99 more field lines (101 in all)", filler_fields(99)),
        ("148 more field lines (150 in all)", filler_fields(148)),
        (
            "Connection names a field",
            "connection: x-private\r\nx-private: secret\r\nx-after: 1\r\nx-mid: 2\r\nx-last: 3\r\n".into(),
        ),
        (
            "Keep-Alive and Proxy-Connection",
            "connection: keep-alive\r\nkeep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nx-after: 1\r\nx-mid: 2\r\nx-last: 3\r\n".into(),
        ),
        ("TE: trailers", "te: trailers\r\nx-after: 1\r\n".into()),
        (
            "forwarding fields from an earlier proxy",
            "x-forwarded-for: 203.0.113.9\r\nvia: 1.1 edge\r\nx-forwarded-proto: https\r\nx-after: 1\r\n".into(),
        ),
        (
            "credentials",
            "authorization: Bearer abc.def\r\ncookie: session=1; theme=dark\r\nproxy-authorization: Basic dTpw\r\nx-after: 1\r\nx-last: 2\r\n".into(),
        ),
        ("Title-Case names", "User-Agent: Mozilla/5.0\r\nAccept-Language: en-GB\r\nX-Request-ID: abc\r\n".into()),
    ];
    for (name, extra) in fields {
        c.h1(format!("fields: {name}"), &get("/f", &extra), ok(name));
    }
    c.h1(
        "fields: obs-text values (bytes 0x80-0xFF)",
        &request(
            "GET",
            "/f",
            b"x-name: caf\xe9\r\nx-raw: \x80\x81\xfe\xff\r\n",
            b"",
        ),
        ok("obs-text"),
    );
    c.h1(
        "fields: Host with a port",
        b"GET /f HTTP/1.1\r\nhost: api.example.com:8443\r\nx-case: {id}\r\n\r\n",
        ok("port"),
    );
    c.h1(
        "fields: Host in mixed case",
        b"GET /f HTTP/1.1\r\nHost: API.Example.COM\r\nx-case: {id}\r\n\r\n",
        ok("host case"),
    );
    c.h1(
        "fields: Host not the first field",
        b"GET /f HTTP/1.1\r\nx-case: {id}\r\naccept: */*\r\nhost: api.example.com\r\n\r\n",
        ok("host last"),
    );

    // Request bodies and their framing.
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    c.h1(
        "body: Content-Length",
        &post("/b", "content-type: application/json\r\n", b"{\"a\":1}"),
        ok("cl"),
    );
    c.h1(
        "body: bytes 0-255",
        &post(
            "/b",
            "content-type: application/octet-stream\r\n",
            &all_bytes,
        ),
        ok("binary"),
    );
    c.h1(
        "body: Content-Length: 0",
        &post("/b", "content-length: 0\r\n", b""),
        ok("empty"),
    );
    c.h1("body: 256 KiB", &post("/b", "", &big), ok("big"));
    c.h1(
        "body: chunked",
        &chunked("/b", "", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ok("chunked"),
    );
    c.h1(
        "body: chunk extensions",
        &chunked(
            "/b",
            "",
            b"5;name=value\r\nhello\r\n6;a;b=\"c d\"\r\n world\r\n0;end\r\n\r\n",
        ),
        ok("extensions"),
    );
    c.h1(
        "body: chunked with a trailer",
        &chunked(
            "/b",
            "trailer: X-Checksum\r\n",
            b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n",
        ),
        ok("trailer"),
    );
    c.h1(
        "body: chunked with two trailers and TE: trailers",
        &chunked(
            "/b",
            "te: trailers\r\ntrailer: x-checksum, x-count\r\n",
            b"3\r\nabc\r\n0\r\nx-checksum: 900150983cd24fb0\r\nx-count: 1\r\n\r\n",
        ),
        ok("trailers"),
    );
    c.h1(
        "body: upper-case hex chunk sizes with leading zeros",
        &chunked("/b", "", b"000A\r\n0123456789\r\n00\r\n\r\n"),
        ok("hex"),
    );
    let one_byte_chunks: Vec<u8> = (0..100u8)
        .flat_map(|i| chunk(&[b'a' + i % 26]))
        .chain(b"0\r\n\r\n".iter().copied())
        .collect();
    c.h1(
        "body: 100 one-byte chunks",
        &chunked("/b", "", &one_byte_chunks),
        ok("small chunks"),
    );
    c.h1(
        "body: Content-Length twice, equal",
        &request(
            "POST",
            "/b",
            b"content-length: 3\r\ncontent-length: 3\r\n",
            b"",
        )
        .into_iter()
        .chain(b"abc".iter().copied())
        .collect::<Vec<u8>>(),
        ok("3 and 3"),
    );
    c.h1(
        "body: DELETE with a body",
        &request("DELETE", "/b/1", b"content-type: text/plain\r\n", b"why"),
        ok("deleted"),
    );
    c.h1(
        "body: GET with a body",
        &request("GET", "/b", b"content-type: text/plain\r\n", b"query"),
        ok("get body"),
    );

    // Methods.
    c.h1(
        "method: HEAD, answer with Content-Length",
        &request("HEAD", "/m", b"", b""),
        answer(
            "HTTP/1.1 200 OK",
            format!("content-type: text/plain\r\n{DATE}content-length: 1234\r\n").as_bytes(),
            b"",
        ),
    );
    c.h1(
        "method: HEAD, chunked answer",
        &request("HEAD", "/m", b"", b""),
        answer(
            "HTTP/1.1 200 OK",
            format!("content-type: text/plain\r\n{DATE}transfer-encoding: chunked\r\n").as_bytes(),
            b"",
        ),
    );
    c.h1(
        "method: PURGE (an extension method)",
        &request("PURGE", "/m", b"", b""),
        ok("purged"),
    );
    c.h1(
        "method: PROPFIND with a body",
        &request(
            "PROPFIND",
            "/dav/",
            b"depth: 1\r\ncontent-type: application/xml\r\n",
            b"<?xml version=\"1.0\"?><propfind xmlns=\"DAV:\"><allprop/></propfind>",
        ),
        answer(
            "HTTP/1.1 207 Multi-Status",
            format!("content-type: application/xml\r\n{DATE}content-length: 13\r\n").as_bytes(),
            b"<multistatus>",
        ),
    );
    c.h1(
        "method: OPTIONS with Allow",
        &request("OPTIONS", "/m", b"", b""),
        answer(
            "HTTP/1.1 204 No Content",
            format!("allow: GET, POST, OPTIONS\r\n{DATE}").as_bytes(),
            b"",
        ),
    );

    // Answers from the primary.
    let answers: [(&str, &[u8], Vec<u8>); 23] = [
        (
            "103 Early Hints before the 200",
            b"",
            [
                &b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload; as=style\r\n\r\n"[..],
                &ok("after hints"),
            ]
            .concat(),
        ),
        (
            "204 No Content",
            b"",
            answer(
                "HTTP/1.1 204 No Content",
                format!("{DATE}x-after: 1\r\n").as_bytes(),
                b"",
            ),
        ),
        (
            "304 with ETag and the resource's Content-Length",
            b"if-none-match: \"v1\"\r\n",
            answer(
                "HTTP/1.1 304 Not Modified",
                format!("etag: \"v1\"\r\ncache-control: max-age=60\r\n{DATE}content-length: 1234\r\n")
                    .as_bytes(),
                b"",
            ),
        ),
        (
            "no Date field",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                b"content-type: text/plain\r\ncontent-length: 7\r\n",
                b"no date",
            ),
        ),
        (
            "field case and order",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                b"Server: recorder\r\nX-Zeta: 1\r\nContent-Type: text/plain\r\nX-Alpha: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n",
                b"ok",
            ),
        ),
        (
            "repeated name, interleaved",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("x-a: 1\r\nx-b: 2\r\nx-a: 3\r\n{DATE}content-length: 2\r\n").as_bytes(),
                b"ok",
            ),
        ),
        (
            "custom reason phrase",
            b"",
            answer(
                "HTTP/1.1 200 Fine Thanks",
                format!("{DATE}content-length: 2\r\n").as_bytes(),
                b"ok",
            ),
        ),
        (
            "empty reason phrase",
            b"",
            answer(
                "HTTP/1.1 200 ",
                format!("{DATE}content-length: 2\r\n").as_bytes(),
                b"ok",
            ),
        ),
        (
            "chunked with a trailer, client sent TE: trailers",
            b"te: trailers\r\n",
            answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}trailer: x-checksum\r\ntransfer-encoding: chunked\r\n").as_bytes(),
                b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n",
            ),
        ),
        (
            "chunked with a trailer, no TE",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}trailer: x-checksum\r\ntransfer-encoding: chunked\r\n").as_bytes(),
                b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n",
            ),
        ),
        (
            "chunk extensions",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}transfer-encoding: chunked\r\n").as_bytes(),
                b"5;a=b\r\nhello\r\n0;c\r\n\r\n",
            ),
        ),
        (
            "UTF-8 bytes in a field value",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("x-name: caf\u{e9}\r\n{DATE}content-length: 2\r\n").as_bytes(),
                b"ok",
            ),
        ),
        (
            "120 field lines",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("{}{DATE}content-length: 2\r\n", filler_fields(118)).as_bytes(),
                b"ok",
            ),
        ),
        (
            "302 with Location",
            b"",
            answer(
                "HTTP/1.1 302 Found",
                format!("location: /elsewhere?a=%2F&b=1\r\n{DATE}content-length: 0\r\n").as_bytes(),
                b"",
            ),
        ),
        (
            "404 with a body",
            b"",
            answer(
                "HTTP/1.1 404 Not Found",
                format!("content-type: text/html\r\n{DATE}content-length: 9\r\n").as_bytes(),
                b"not found",
            ),
        ),
        (
            "500",
            b"",
            answer(
                "HTTP/1.1 500 Internal Server Error",
                format!("{DATE}content-length: 4\r\n").as_bytes(),
                b"oops",
            ),
        ),
        (
            "503 with Retry-After",
            b"",
            answer(
                "HTTP/1.1 503 Service Unavailable",
                format!("retry-after: 120\r\n{DATE}content-length: 0\r\n").as_bytes(),
                b"",
            ),
        ),
        (
            "Connection names a field",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("connection: x-hop\r\nx-hop: 1\r\nx-after: 2\r\nx-mid: 3\r\nx-last: 4\r\n{DATE}content-length: 2\r\n")
                    .as_bytes(),
                b"ok",
            ),
        ),
        (
            "Keep-Alive field",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("connection: keep-alive\r\nkeep-alive: timeout=5, max=100\r\nx-after: 1\r\n{DATE}content-length: 2\r\n")
                    .as_bytes(),
                b"ok",
            ),
        ),
        (
            "64 KiB body",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("content-type: application/octet-stream\r\n{DATE}content-length: 65536\r\n")
                    .as_bytes(),
                &vec![b'z'; 65536],
            ),
        ),
        (
            "three Set-Cookie fields",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("set-cookie: a=1; Path=/\r\nset-cookie: b=2; HttpOnly\r\nset-cookie: c=3; Secure\r\n{DATE}content-length: 2\r\n")
                    .as_bytes(),
                b"ok",
            ),
        ),
        (
            "Content-Length: 2, 2",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}content-length: 2, 2\r\n").as_bytes(),
                b"ok",
            ),
        ),
        (
            "Title-Case Content-Type and Cache-Control",
            b"",
            answer(
                "HTTP/1.1 200 OK",
                format!("Content-Type: text/plain\r\nCache-Control: no-store\r\n{DATE}content-length: 2\r\n")
                    .as_bytes(),
                b"ok",
            ),
        ),
    ];
    for (name, extra, primary_answer) in answers {
        c.h1(
            format!("answer: {name}"),
            &request("GET", "/r", extra, b""),
            primary_answer,
        );
    }
    c.h1(
        "answer: obs-text bytes in a field value",
        &get("/r", ""),
        answer(
            "HTTP/1.1 200 OK",
            &[
                &b"x-bytes: \x80\xff\r\n"[..],
                DATE.as_bytes(),
                b"content-length: 2\r\n",
            ]
            .concat(),
            b"ok",
        ),
    );
    c.h1_script(
        "answer: close-delimited body",
        &get("/r", ""),
        Script::Bytes {
            bytes: answer(
                "HTTP/1.1 200 OK",
                format!("content-type: text/plain\r\n{DATE}connection: close\r\n").as_bytes(),
                b"until the connection closes",
            ),
            close: true,
        },
        Mirror::Expected,
    );

    // Connections: pipelining, keep-alive, HTTP/1.0.
    c.h1_many(
        "connection: three GETs pipelined",
        |id| {
            Flow::Send(
                [
                    fill(&get("/p/1", ""), id),
                    fill(&get("/p/2", ""), &sub_key(id, 1)),
                    fill(&get("/p/3", ""), &sub_key(id, 2)),
                ]
                .concat(),
            )
        },
        vec![ok("one"), ok("two"), ok("three")],
    );
    c.h1_many(
        "connection: GET, chunked POST and HEAD pipelined",
        |id| {
            Flow::Send(
                [
                    fill(&get("/p/1", "accept: */*\r\n"), id),
                    fill(
                        &chunked("/p/2", "", b"3\r\nabc\r\n0\r\n\r\n"),
                        &sub_key(id, 1),
                    ),
                    fill(&request("HEAD", "/p/3", b"", b""), &sub_key(id, 2)),
                ]
                .concat(),
            )
        },
        vec![
            ok("one"),
            ok("two"),
            answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}content-length: 5\r\n").as_bytes(),
                b"",
            ),
        ],
    );
    c.h1_many(
        "connection: three requests in turn on one connection",
        |id| {
            Flow::Sequential(
                (0..3)
                    .map(|i| fill(&get(&format!("/k/{i}"), ""), &sub_key(id, i)))
                    .collect(),
            )
        },
        vec![ok("one"), ok("two"), ok("three")],
    );
    c.h1_script(
        "connection: HTTP/1.1 Connection: close",
        &get(
            "/c",
            "connection: close\r\nx-after: 1\r\nx-mid: 2\r\nx-last: 3\r\n",
        ),
        Script::Bytes {
            bytes: answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}connection: close\r\ncontent-length: 2\r\n").as_bytes(),
                b"ok",
            ),
            close: true,
        },
        Mirror::Expected,
    );
    c.h1(
        "connection: HTTP/1.0 with Host",
        b"GET /h10 HTTP/1.0\r\nhost: api.example.com\r\nx-case: {id}\r\n\r\n",
        ok("1.0"),
    );
    c.h1(
        "connection: HTTP/1.0 without Host",
        b"GET /h10 HTTP/1.0\r\nx-case: {id}\r\naccept: */*\r\n\r\n",
        ok("1.0 no host"),
    );
    c.h1(
        "connection: HTTP/1.0 POST with a body",
        b"POST /h10 HTTP/1.0\r\nhost: api.example.com\r\nx-case: {id}\r\ncontent-length: 4\r\n\r\nabcd",
        ok("1.0 post"),
    );
    let keep_alive_answer = answer(
        "HTTP/1.1 200 OK",
        format!("connection: keep-alive\r\n{DATE}content-length: 2\r\n").as_bytes(),
        b"ok",
    );
    c.h1_many(
        "connection: HTTP/1.0 Connection: keep-alive, two requests",
        |id| {
            Flow::Sequential(
                (0..2)
                    .map(|i| {
                        fill(
                            b"GET /ka HTTP/1.0\r\nhost: api.example.com\r\nconnection: keep-alive\r\nx-case: {id}\r\n\r\n",
                            &sub_key(id, i),
                        )
                    })
                    .collect(),
            )
        },
        vec![keep_alive_answer.clone(), keep_alive_answer],
    );
    c.h1_script(
        "connection: upgrade asked, primary declines with a 200",
        &get(
            "/ws",
            "connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        ),
        bytes(ok("no upgrade")),
        Mirror::Never,
    );

    // The grid: methods x paths x field sets.
    for (set, set_fields) in GRID_FIELD_SETS {
        for method in GRID_METHODS {
            for (path_name, path) in GRID_PATHS {
                c.h1(
                    format!("grid: {method} {path_name}, {set} fields"),
                    &grid_request(method, path, set, set_fields),
                    grid_answer(method, set),
                );
            }
        }
    }

    // h2 clients to the HTTP/1.1 primary.
    let none: &[(&str, &[u8])] = &[];
    c.h2(
        "h2: :authority reaches the primary as Host",
        Method::GET,
        "/x",
        none,
        H2Body::Empty,
        ok("h2"),
    );
    c.add(
        Group::H2,
        "h2: :authority with a port",
        Mirror::Expected,
        |id| {
            let case = h2_case(
                id,
                Method::GET,
                "api.example.com:8443",
                "/x",
                &[],
                H2Body::Empty,
            );
            (
                Send::H2(Box::new(case)),
                vec![(id.to_owned(), bytes(ok("port")))],
            )
        },
    );
    c.h2(
        "h2: POST with Content-Length",
        Method::POST,
        "/b",
        &[("content-type", b"application/json")],
        H2Body::Full(b"{\"a\":1}".to_vec()),
        ok("posted"),
    );
    c.h2(
        "h2: POST streamed without Content-Length",
        Method::POST,
        "/b",
        &[("content-type", b"text/plain")],
        H2Body::Streamed {
            chunks: vec![b"hello".to_vec(), b" world".to_vec()],
            trailers: Vec::new(),
        },
        ok("streamed"),
    );
    c.h2(
        "h2: request trailers",
        Method::POST,
        "/b",
        &[("te", b"trailers"), ("trailer", b"x-checksum")],
        H2Body::Streamed {
            chunks: vec![b"hello".to_vec()],
            trailers: vec![("x-checksum".into(), b"abc".to_vec())],
        },
        ok("trailers"),
    );
    c.add(Group::H2, "h2: two cookie fields", Mirror::Expected, |id| {
        // RFC 9113 section 8.2.3: an h2 client may split cookie; HTTP/1.1 has one, joined "; ".
        let mut case = h2_case(
            id,
            Method::GET,
            AUTHORITY,
            "/c",
            &[("cookie", b"a=1"), ("cookie", b"b=2")],
            H2Body::Empty,
        );
        case.h1 = Flow::Send(fill(
            b"GET /c HTTP/1.1\r\nhost: api.example.com\r\nx-case: {id}\r\ncookie: a=1; b=2\r\n\r\n",
            id,
        ));
        (
            Send::H2(Box::new(case)),
            vec![(id.to_owned(), bytes(ok("cookies")))],
        )
    });
    c.h2(
        "h2: obs-text value",
        Method::GET,
        "/f",
        &[("x-raw", b"\x80\x81\xfe\xff"), ("x-name", b"caf\xe9")],
        H2Body::Empty,
        ok("obs"),
    );
    let filler: Vec<(String, Vec<u8>)> = (0..148)
        .map(|i| (format!("x-filler-{i}"), format!("value-{i}").into_bytes()))
        .collect();
    let filler_refs: Vec<(&str, &[u8])> = filler
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    c.h2(
        "h2: 150 fields",
        Method::GET,
        "/f",
        &filler_refs,
        H2Body::Empty,
        ok("many"),
    );
    c.h2(
        "h2: repeated name",
        Method::GET,
        "/f",
        &[("accept", b"text/html"), ("accept", b"application/json")],
        H2Body::Empty,
        ok("repeated"),
    );
    c.h2(
        "h2: 16 KB path",
        Method::GET,
        &long_target(16 * 1024),
        none,
        H2Body::Empty,
        ok("long"),
    );
    c.h2(
        "h2: HEAD",
        Method::HEAD,
        "/m",
        none,
        H2Body::Empty,
        answer(
            "HTTP/1.1 200 OK",
            format!("content-type: text/plain\r\n{DATE}content-length: 1234\r\n").as_bytes(),
            b"",
        ),
    );
    let h2_answers: [(&str, Fields, Vec<u8>); 7] = [
        (
            "answer without Date",
            none,
            answer(
                "HTTP/1.1 200 OK",
                b"content-type: text/plain\r\ncontent-length: 7\r\n",
                b"no date",
            ),
        ),
        (
            "answer 204",
            none,
            answer("HTTP/1.1 204 No Content", DATE.as_bytes(), b""),
        ),
        (
            "answer 304",
            &[("if-none-match", b"\"v1\"")],
            answer(
                "HTTP/1.1 304 Not Modified",
                format!("etag: \"v1\"\r\n{DATE}content-length: 1234\r\n").as_bytes(),
                b"",
            ),
        ),
        (
            "answer with trailers, client sent te: trailers",
            &[("te", b"trailers")],
            answer(
                "HTTP/1.1 200 OK",
                format!("{DATE}trailer: x-checksum\r\ntransfer-encoding: chunked\r\n").as_bytes(),
                b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n",
            ),
        ),
        (
            "answer naming a field in Connection",
            none,
            answer(
                "HTTP/1.1 200 OK",
                format!("connection: x-hop\r\nx-hop: 1\r\nx-after: 2\r\nx-mid: 3\r\nx-last: 4\r\n{DATE}content-length: 2\r\n")
                    .as_bytes(),
                b"ok",
            ),
        ),
        (
            "answer with Title-Case fields",
            none,
            answer(
                "HTTP/1.1 200 OK",
                b"Content-Type: text/plain\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n",
                b"ok",
            ),
        ),
        (
            "answer with three Set-Cookie fields",
            none,
            answer(
                "HTTP/1.1 200 OK",
                format!("set-cookie: a=1\r\nset-cookie: b=2\r\nset-cookie: c=3\r\n{DATE}content-length: 2\r\n")
                    .as_bytes(),
                b"ok",
            ),
        ),
    ];
    for (name, fields, primary_answer) in h2_answers {
        c.h2(
            format!("h2: {name}"),
            Method::GET,
            "/r",
            fields,
            H2Body::Empty,
            primary_answer,
        );
    }
    for method in [Method::GET, Method::POST, Method::DELETE] {
        for (path_name, path) in GRID_PATHS {
            for (set, fields) in [
                (
                    "lower-case",
                    &[
                        ("accept", &b"application/json"[..]),
                        ("x-request-id", b"r-{id}"),
                    ][..],
                ),
                (
                    "credentials",
                    &[
                        ("authorization", &b"Bearer t0k3n"[..]),
                        ("cookie", b"session=abc; theme=dark"),
                        ("accept", b"*/*"),
                    ][..],
                ),
            ] {
                let body = if method == Method::POST {
                    H2Body::Full(b"{\"n\":1}".to_vec())
                } else {
                    H2Body::Empty
                };
                c.h2(
                    format!("h2 grid: {method} {path_name}, {set} fields"),
                    method.clone(),
                    path,
                    fields,
                    body,
                    ok("hello"),
                );
            }
        }
    }

    // Streaming and timing.
    c.streaming(
        "expect: 100-continue, primary sends 100 Continue",
        Mirror::Expected,
        |id| {
            let head = fill(
                b"PUT /e HTTP/1.1\r\nhost: api.example.com\r\nx-case: {id}\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
                id,
            );
            (
                Send::H1(Flow::Expect {
                    head,
                    body: b"hello".to_vec(),
                }),
                vec![(id.to_owned(), Script::Continue { bytes: ok("continued") })],
            )
        },
    );
    c.streaming(
        "expect: 100-continue, primary refuses at once with 417",
        Mirror::Either,
        |id| {
            let head = fill(
                b"PUT /e HTTP/1.1\r\nhost: api.example.com\r\nx-case: {id}\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
                id,
            );
            (
                Send::H1(Flow::Expect {
                    head,
                    body: b"hello".to_vec(),
                }),
                vec![(
                    id.to_owned(),
                    Script::Early {
                        bytes: answer(
                            "HTTP/1.1 417 Expectation Failed",
                            format!("{DATE}connection: close\r\ncontent-length: 0\r\n").as_bytes(),
                            b"",
                        ),
                    },
                )],
            )
        },
    );
    c.streaming(
        "early answer: primary answers 413 before reading a 512 KiB body",
        Mirror::Either,
        |id| {
            let body = vec![b'b'; 512 * 1024];
            let head = fill(
                format!(
                    "POST /upload HTTP/1.1\r\nhost: api.example.com\r\nx-case: {{id}}\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
                id,
            );
            (
                Send::H1(Flow::EarlyAnswer { head, body }),
                vec![(
                    id.to_owned(),
                    Script::Early {
                        bytes: answer(
                            "HTTP/1.1 413 Content Too Large",
                            format!("{DATE}connection: close\r\ncontent-length: 8\r\n").as_bytes(),
                            b"too big\n",
                        ),
                    },
                )],
            )
        },
    );
    c.streaming("abort: the client closes mid-body", Mirror::Never, |id| {
        let mut sent = fill(
            b"POST /upload HTTP/1.1\r\nhost: api.example.com\r\nx-case: {id}\r\ncontent-length: 100000\r\n\r\n",
            id,
        );
        sent.extend_from_slice(&[b'p'; 1000]);
        (
            Send::H1(Flow::Abort {
                bytes: sent,
                key: id.to_owned(),
                part: 1000,
            }),
            vec![(id.to_owned(), bytes(ok("never")))],
        )
    });
    for (name, chunked_answer) in [("chunked", true), ("close-delimited", false)] {
        c.streaming(
            format!("events: server-sent events, {name}: the first event arrives before the last is sent"),
            Mirror::Expected,
            |id| {
                let gate = Arc::new(Notify::new());
                let (first, rest) = event_answer(chunked_answer);
                (
                    Send::H1(Flow::Events {
                        request: fill(&get("/events", "accept: text/event-stream\r\n"), id),
                        marker: b"data: one".to_vec(),
                        gate: gate.clone(),
                    }),
                    vec![(id.to_owned(), Script::Stream { first, rest, gate })],
                )
            },
        );
    }
    c.streaming(
        "events: h2 client, the first event arrives before the last is sent",
        Mirror::Expected,
        |id| {
            let gate = Arc::new(Notify::new());
            let (first, rest) = event_answer(true);
            let mut case = h2_case(
                id,
                Method::GET,
                AUTHORITY,
                "/events",
                &[("accept", b"text/event-stream")],
                H2Body::Empty,
            );
            case.events = Some((b"data: one".to_vec(), gate.clone()));
            case.h1 = Flow::Events {
                request: h1_equivalent(
                    &case.method,
                    &case.authority,
                    &case.path,
                    &case.fields,
                    &case.body,
                ),
                marker: b"data: one".to_vec(),
                gate: gate.clone(),
            };
            (
                Send::H2(Box::new(case)),
                vec![(id.to_owned(), Script::Stream { first, rest, gate })],
            )
        },
    );
    c.streaming("upgrade: WebSocket handshake, then bytes both ways", Mirror::Never, |id| {
        let head = fill(
            b"GET /chat HTTP/1.1\r\nhost: api.example.com\r\nx-case: {id}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            id,
        );
        (
            Send::H1(Flow::Upgrade {
                head,
                after: b"\x81\x05hello\x81\x05world".to_vec(),
                key: id.to_owned(),
            }),
            vec![(
                id.to_owned(),
                Script::Upgrade {
                    bytes: b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n".to_vec(),
                },
            )],
        )
    });

    c.cases
}

/// A server-sent events answer in two parts: the head and first event, then two more events
/// and the end.
fn event_answer(chunked: bool) -> (Vec<u8>, Vec<u8>) {
    let events: [&[u8]; 3] = [
        b"id: 1\ndata: one\n\n",
        b"id: 2\ndata: two\n\n",
        b"id: 3\ndata: three\n\n",
    ];
    let framing = if chunked {
        "transfer-encoding: chunked\r\n"
    } else {
        "connection: close\r\n"
    };
    let mut first = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{DATE}{framing}\r\n"
    )
    .into_bytes();
    let mut rest = Vec::new();
    if chunked {
        first.extend_from_slice(&chunk(events[0]));
        rest.extend_from_slice(&chunk(events[1]));
        rest.extend_from_slice(&chunk(events[2]));
        rest.extend_from_slice(b"0\r\n\r\n");
    } else {
        first.extend_from_slice(events[0]);
        rest.extend_from_slice(events[1]);
        rest.extend_from_slice(events[2]);
    }
    (first, rest)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// One answer as the client got it.
#[derive(Clone, Debug)]
struct Answer {
    /// Interim (1xx) heads before it.
    interim: Vec<Head>,
    head: Head,
    body: Body,
    /// It came over h2 (names lower-case, no reason phrase).
    h2: bool,
}

/// Everything a client saw in one case.
#[derive(Clone, Debug, Default)]
struct ClientSaw {
    answers: Vec<Answer>,
    /// Why the exchange ended before every answer arrived, if it did.
    trouble: Option<String>,
    /// Bytes received after a `101`.
    upgraded: Vec<u8>,
}

/// The methods of the requests in `bytes`, in order (to know which answers have no body).
fn request_methods(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut methods = Vec::new();
    while let Some(end) = head_end(bytes) {
        let Ok(head) = Head::parse(&bytes[..end - 4]) else {
            break;
        };
        methods.push(head.words().0.to_vec());
        let framing = request_framing(&head).unwrap_or(Framing::Empty);
        let used = match parse_body(&framing, &bytes[end..], true) {
            Ok((_, used)) => used,
            Err(_) => break,
        };
        bytes = &bytes[end + used..];
    }
    methods
}

/// Reads one answer (after any interim ones). On a `100 Continue`, `on_continue`'s bytes are
/// written first.
async fn read_answer<R: tokio::io::AsyncRead + Unpin>(
    wire: &mut Wire<R>,
    method: &[u8],
    deadline: Instant,
    mut on_continue: Option<(&mut OwnedWriteHalf, &[u8])>,
) -> Result<Answer, String> {
    let mut interim = Vec::new();
    for _ in 0..MAX_INTERIM {
        let (head, _) = wire
            .read_head(deadline)
            .await?
            .ok_or_else(|| "the connection closed before an answer".to_owned())?;
        let status = head.status()?;
        if (100..200).contains(&status) && status != 101 {
            if status == 100 {
                if let Some((write, body)) = on_continue.take() {
                    write
                        .write_all(body)
                        .await
                        .map_err(|e| format!("writing the body after 100 failed: {e}"))?;
                }
            }
            interim.push(head);
            continue;
        }
        let framing = response_framing(&head, method)?;
        let (body, _) = wire.read_body(&framing, deadline, |_| {}).await?;
        return Ok(Answer {
            interim,
            head,
            body,
            h2: false,
        });
    }
    Err("too many interim answers".into())
}

/// Runs an HTTP/1.x flow against `addr`, whose primary is `primary`.
async fn run_flow(flow: &Flow, addr: SocketAddr, primary: &Recorder) -> ClientSaw {
    let mut saw = ClientSaw::default();
    if let Err(e) = flow_exchanges(flow, addr, primary, &mut saw).await {
        saw.trouble = Some(e);
    }
    saw
}

async fn flow_exchanges(
    flow: &Flow,
    addr: SocketAddr,
    primary: &Recorder,
    saw: &mut ClientSaw,
) -> Result<(), String> {
    let deadline = Instant::now() + CASE_LIMIT;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut wire = Wire::new(read);
    let written = |e: std::io::Error| format!("write failed: {e}");
    match flow {
        Flow::Send(bytes) => {
            write.write_all(bytes).await.map_err(written)?;
            for method in request_methods(bytes) {
                saw.answers
                    .push(read_answer(&mut wire, &method, deadline, None).await?);
            }
        }
        Flow::Sequential(requests) => {
            for request in requests {
                write.write_all(request).await.map_err(written)?;
                for method in request_methods(request) {
                    saw.answers
                        .push(read_answer(&mut wire, &method, deadline, None).await?);
                }
            }
        }
        Flow::Expect { head, body } => {
            write.write_all(head).await.map_err(written)?;
            let method = request_methods(head).pop().unwrap_or_default();
            saw.answers
                .push(read_answer(&mut wire, &method, deadline, Some((&mut write, body))).await?);
        }
        Flow::EarlyAnswer { head, body } => {
            write.write_all(head).await.map_err(written)?;
            let body = body.clone();
            let writer = tokio::spawn(async move {
                let _ = write.write_all(&body).await;
                write
            });
            let method = request_methods(head).pop().unwrap_or_default();
            let answer = read_answer(&mut wire, &method, deadline, None).await;
            writer.abort();
            saw.answers.push(answer?);
        }
        Flow::Abort { bytes, key, part } => {
            write.write_all(bytes).await.map_err(written)?;
            let got = primary
                .wait_until(CASE_LIMIT, |r| r.progress(key) >= *part)
                .await;
            drop(write);
            drop(wire);
            if !got {
                return Err(format!(
                    "the primary did not get the first {part} body bytes (it got {})",
                    primary.progress(key)
                ));
            }
            primary
                .wait_until(CASE_LIMIT, |r| !r.case(key).is_empty())
                .await;
        }
        Flow::Upgrade { head, after, key } => {
            write.write_all(head).await.map_err(written)?;
            let answer = read_answer(&mut wire, b"GET", deadline, None).await?;
            let switched = answer.head.status() == Ok(101);
            saw.answers.push(answer);
            if switched {
                write.write_all(after).await.map_err(written)?;
                while wire.buf.len() < after.len() && !wire.eof {
                    if let Err(e) = wire.fill(deadline).await {
                        saw.trouble = Some(format!("reading the echo: {e}"));
                        break;
                    }
                }
                saw.upgraded = std::mem::take(&mut wire.buf);
                drop(write);
                drop(wire);
                primary
                    .wait_until(CASE_LIMIT, |r| !r.case(key).is_empty())
                    .await;
            }
        }
        Flow::Events {
            request,
            marker,
            gate,
        } => {
            write.write_all(request).await.map_err(written)?;
            let (head, _) = wire
                .read_head(deadline)
                .await?
                .ok_or_else(|| "the connection closed before an answer".to_owned())?;
            let framing = response_framing(&head, b"GET")?;
            let mut told = false;
            let body = loop {
                let (body, _) = parse_body(&framing, &wire.buf, wire.eof)?;
                if !told && contains(&body.data, marker) {
                    gate.notify_one();
                    told = true;
                }
                if body.cut.is_none() || wire.eof {
                    break body;
                }
                if let Err(e) = wire.fill(deadline).await {
                    let mut body = body;
                    body.cut = Some(e);
                    break body;
                }
            };
            saw.answers.push(Answer {
                interim: Vec::new(),
                head,
                body,
                h2: false,
            });
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

type H2RequestBody = BoxBody<Bytes, Infallible>;

/// Sends an h2 request to `addr` over a fresh h2c connection.
async fn run_h2(case: &H2Case, addr: SocketAddr) -> ClientSaw {
    let mut saw = ClientSaw::default();
    match tokio::time::timeout(CASE_LIMIT, h2_exchange(case, addr)).await {
        Ok(Ok(answer)) => saw.answers.push(answer),
        Ok(Err(e)) => saw.trouble = Some(e),
        Err(_) => saw.trouble = Some("timed out".into()),
    }
    saw
}

async fn h2_exchange(case: &H2Case, addr: SocketAddr) -> Result<Answer, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2 handshake failed: {e}"))?;
    tokio::spawn(conn);
    let body: H2RequestBody = match &case.body {
        H2Body::Empty => Full::new(Bytes::new()).boxed(),
        H2Body::Full(b) => Full::new(Bytes::from(b.clone())).boxed(),
        H2Body::Streamed { chunks, trailers } => {
            let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from(c.clone()))))
                .collect();
            if !trailers.is_empty() {
                let mut map = http::HeaderMap::new();
                for (n, v) in trailers {
                    map.append(header_name(n)?, header_value(v)?);
                }
                frames.push(Ok(Frame::trailers(map)));
            }
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        }
    };
    let mut request = Request::builder()
        .method(case.method.clone())
        .uri(format!("http://{}{}", case.authority, case.path))
        .body(body)
        .map_err(|e| format!("bad h2 request: {e}"))?;
    for (n, v) in &case.fields {
        request
            .headers_mut()
            .append(header_name(n)?, header_value(v)?);
    }
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("h2 request failed: {e}"))?;
    let (parts, mut incoming) = response.into_parts();
    let mut body = Body::default();
    let mut told = false;
    while let Some(frame) = incoming.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                body.cut = Some(format!("h2 body failed: {e}"));
                break;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                body.data.extend_from_slice(&data);
                if let Some((marker, gate)) = &case.events {
                    if !told && contains(&body.data, marker) {
                        gate.notify_one();
                        told = true;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    body.trailers = fields_of(&trailers);
                }
            }
        }
    }
    Ok(Answer {
        interim: Vec::new(),
        head: Head {
            start: format!("HTTP/2 {}", parts.status.as_u16()).into_bytes(),
            fields: fields_of(&parts.headers),
        },
        body,
        h2: true,
    })
}

fn header_name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("field name {n}: {e}"))
}

fn header_value(v: &[u8]) -> Result<HeaderValue, String> {
    HeaderValue::from_bytes(v).map_err(|e| format!("field value {}: {e}", show(v)))
}

fn fields_of(map: &http::HeaderMap) -> Vec<Field> {
    map.iter()
        .map(|(n, v)| Field::new(n.as_str(), v.as_bytes()))
        .collect()
}

/// The case sent straight to the primary.
async fn run_direct(case: &Case, primary: &Recorder) -> ClientSaw {
    match &case.send {
        Send::H1(flow) => run_flow(flow, primary.addr, primary).await,
        Send::H2(h2) => run_flow(&h2.h1, primary.addr, primary).await,
    }
}

/// The case sent through the agent at `agent`, whose primary is `primary`.
async fn run_via_agent(case: &Case, agent: SocketAddr, primary: &Recorder) -> ClientSaw {
    match &case.send {
        Send::H1(flow) => run_flow(flow, agent, primary).await,
        Send::H2(h2) => run_h2(h2, agent).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/// One difference: its kind (for the summary) and what exactly differed.
#[derive(Debug, Clone)]
struct Diff {
    kind: String,
    detail: String,
}

/// Labels of the two sides compared: the reference and the one under test.
#[derive(Clone, Copy)]
struct Sides {
    reference: &'static str,
    tested: &'static str,
}

const DIRECT_VS_AGENT: Sides = Sides {
    reference: "direct",
    tested: "through the agent",
};

const PRIMARY_VS_SHADOW: Sides = Sides {
    reference: "primary",
    tested: "shadow",
};

fn diff(out: &mut Vec<Diff>, kind: impl Into<String>, detail: impl Into<String>) {
    out.push(Diff {
        kind: kind.into(),
        detail: detail.into(),
    });
}

/// Fields without `names` (any case).
fn without(fields: &[Field], names: &[&str]) -> Vec<Field> {
    fields
        .iter()
        .filter(|f| !names.iter().any(|n| f.is(n)))
        .cloned()
        .collect()
}

/// Fields without the hop-by-hop ones (P2), but those in `keep`.
fn end_to_end(fields: &[Field], keep: &[&str]) -> Vec<Field> {
    let named: Vec<Vec<u8>> = fields
        .iter()
        .filter(|f| f.is("connection"))
        .flat_map(|f| {
            f.value
                .split(|b| *b == b',')
                .map(|t| trim_ows(t).to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    fields
        .iter()
        .filter(|f| keep.iter().any(|k| f.is(k)) || !HOP_BY_HOP.iter().any(|h| f.is(h)))
        .filter(|f| keep.iter().any(|k| f.is(k)) || !named.contains(&f.key()))
        .cloned()
        .collect()
}

fn list(items: &[String], max: usize) -> String {
    if items.len() <= max {
        items.join("; ")
    } else {
        format!(
            "{}; and {} more",
            items[..max].join("; "),
            items.len() - max
        )
    }
}

fn show_values(values: &[&[u8]]) -> String {
    let shown: Vec<String> = values.iter().map(|v| show_short(v, 60)).collect();
    format!("[{}]", shown.join(" | "))
}

/// Compares two field sections: which fields were removed, added or changed (by name, values in
/// order), which kept their values but changed name case, and whether the order of those that
/// kept their values changed.
fn diff_fields(
    what: &str,
    sides: Sides,
    reference: &[Field],
    tested: &[Field],
    out: &mut Vec<Diff>,
) {
    // P10: repeated Content-Length fields of one value count as one.
    let merged = |fields: &[Field]| -> Vec<Field> {
        let mut seen_length: Option<Vec<u8>> = None;
        fields
            .iter()
            .filter(|f| {
                if !f.is("content-length") {
                    return true;
                }
                let first = seen_length.is_none();
                if first {
                    seen_length = Some(f.value.clone());
                }
                first || seen_length.as_deref() != Some(f.value.as_slice())
            })
            .cloned()
            .collect()
    };
    let (reference, tested) = (&merged(reference)[..], &merged(tested)[..]);
    // P9 and S4: trailers and copies carry lower-case names.
    let case_kept = !what.contains("trailer") && !what.starts_with("copy");
    let mut names: Vec<Vec<u8>> = Vec::new();
    for f in reference.iter().chain(tested) {
        let k = f.key();
        if !names.contains(&k) {
            names.push(k);
        }
    }
    let (mut removed, mut added, mut changed, mut recased) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut stable: BTreeSet<Vec<u8>> = BTreeSet::new();
    for name in &names {
        let r: Vec<&Field> = reference.iter().filter(|f| f.key() == *name).collect();
        let t: Vec<&Field> = tested.iter().filter(|f| f.key() == *name).collect();
        let rv: Vec<&[u8]> = r.iter().map(|f| f.value.as_slice()).collect();
        let tv: Vec<&[u8]> = t.iter().map(|f| f.value.as_slice()).collect();
        if rv == tv {
            stable.insert(name.clone());
            for (x, y) in r.iter().zip(&t) {
                if case_kept && x.name != y.name {
                    recased.push(format!("{} became {}", show(&x.name), show(&y.name)));
                }
            }
        } else if tv.is_empty() {
            removed.push(format!("{}: {}", show(name), show_values(&rv)));
        } else if rv.is_empty() {
            added.push(format!("{}: {}", show(name), show_values(&tv)));
        } else {
            changed.push(format!(
                "{}: {} {} vs {} {}",
                show(name),
                sides.reference,
                show_values(&rv),
                sides.tested,
                show_values(&tv)
            ));
        }
    }
    if !removed.is_empty() {
        diff(out, format!("{what} missing"), list(&removed, 4));
    }
    if !added.is_empty() {
        diff(out, format!("{what} added"), list(&added, 4));
    }
    if !changed.is_empty() {
        diff(out, format!("{what} value changed"), list(&changed, 4));
    }
    if !recased.is_empty() {
        diff(out, format!("{what} name case changed"), list(&recased, 4));
    }
    // P8: by each name's first appearance.
    let order = |fields: &[Field]| -> Vec<String> {
        let mut seen = BTreeSet::new();
        fields
            .iter()
            .map(Field::key)
            .filter(|k| stable.contains(k) && seen.insert(k.clone()))
            .map(|k| show(&k))
            .collect()
    };
    let (ro, to) = (order(reference), order(tested));
    if ro != to {
        let at = ro.iter().zip(&to).take_while(|(a, b)| a == b).count();
        let window = |o: &[String]| {
            let from = at.saturating_sub(1);
            let to = (at + 4).min(o.len());
            let mut s = o[from..to].join(", ");
            if to < o.len() {
                s.push_str(", ...");
            }
            s
        };
        diff(
            out,
            format!("{what} order changed"),
            format!(
                "from field {at}: {} [{}] vs {} [{}]",
                sides.reference,
                window(&ro),
                sides.tested,
                window(&to)
            ),
        );
    }
}

/// Where two byte strings first differ, for a readable body diff.
fn describe_bytes(sides: Sides, a: &[u8], b: &[u8]) -> String {
    let at = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    format!(
        "{} bytes {} vs {} {}; first difference at byte {at}: {} {:?} vs {} {:?}",
        a.len(),
        sides.reference,
        b.len(),
        sides.tested,
        sides.reference,
        show_short(&a[at.min(a.len())..], 40),
        sides.tested,
        show_short(&b[at.min(b.len())..], 40),
    )
}

fn compare_bodies(
    what: &str,
    sides: Sides,
    reference: Option<&Body>,
    tested: Option<&Body>,
    out: &mut Vec<Diff>,
) {
    match (reference, tested) {
        (None, None) => {}
        (Some(_), None) => diff(
            out,
            format!("{what} body"),
            format!("read {}, left unread {}", sides.reference, sides.tested),
        ),
        (None, Some(_)) => diff(
            out,
            format!("{what} body"),
            format!("left unread {}, read {}", sides.reference, sides.tested),
        ),
        (Some(r), Some(t)) => {
            if r.data != t.data {
                diff(
                    out,
                    format!("{what} body"),
                    describe_bytes(sides, &r.data, &t.data),
                );
            }
            if r.cut != t.cut {
                let end = |b: &Body| b.cut.clone().unwrap_or_else(|| "complete".into());
                diff(
                    out,
                    format!("{what} body end"),
                    format!(
                        "{}: {}; {}: {}",
                        sides.reference,
                        end(r),
                        sides.tested,
                        end(t)
                    ),
                );
            }
            diff_fields(
                &format!("{what} trailer"),
                sides,
                &r.trailers,
                &t.trailers,
                out,
            );
        }
    }
}

/// `http://authority/rest` as its authority and origin-form target.
fn absolute_form(target: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let lower = target.to_ascii_lowercase();
    let rest = lower
        .strip_prefix(b"http://")
        .or_else(|| lower.strip_prefix(b"https://"))?;
    let skip = target.len() - rest.len();
    let rest = &target[skip..];
    let end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    let mut origin = rest[end..].to_vec();
    if !origin.starts_with(b"/") {
        origin.insert(0, b'/');
    }
    Some((rest[..end].to_vec(), origin))
}

/// Host set to `authority`: the first Host field takes it, any other goes, none means first.
fn set_host(fields: &mut Vec<Field>, authority: &[u8]) {
    match fields.iter().position(|f| f.is("host")) {
        Some(p) => {
            fields[p].value = authority.to_vec();
            let mut seen = 0;
            fields.retain(|f| {
                if f.is("host") {
                    seen += 1;
                    seen == 1
                } else {
                    true
                }
            });
        }
        None => fields.insert(0, Field::new("host", authority)),
    }
}

/// The Host field moved first (H1: its position is not compared for h2 clients).
fn host_first(fields: &mut Vec<Field>) {
    if let Some(p) = fields.iter().position(|f| f.is("host")) {
        let host = fields.remove(p);
        fields.insert(0, host);
    }
}

/// Whether the direct run went as scripted: every request recorded, every answer read. A case
/// whose baseline fails says nothing about the agent; it is a bug of the test, reported as such.
fn baseline(case: &Case, direct_saw: &ClientSaw, direct: &Log, out: &mut Vec<Diff>) {
    const KIND: &str = "baseline (a bug of the test, not the agent)";
    if let Some(trouble) = &direct_saw.trouble {
        diff(out, KIND, format!("the direct exchange failed: {trouble}"));
    }
    let aborts = matches!(case.send, Send::H1(Flow::Abort { .. }));
    if direct_saw.answers.is_empty() && !aborts {
        diff(out, KIND, "no answer came back directly");
    }
    for (key, _) in &case.scripts {
        if !direct.contains_key(key) {
            diff(out, KIND, format!("the primary recorded no request {key}"));
        }
    }
}

/// What the primary got directly against what it got through the agent, request by request.
fn compare_primary(case: &Case, direct: &Log, via_agent: &Log, out: &mut Vec<Diff>) {
    let h2 = matches!(case.send, Send::H2(_));
    let keys: BTreeSet<&String> = direct.keys().chain(via_agent.keys()).collect();
    for key in keys {
        let d = direct.get(key).map(Vec::as_slice).unwrap_or_default();
        let a = via_agent.get(key).map(Vec::as_slice).unwrap_or_default();
        if d.len() != a.len() {
            diff(
                out,
                "requests at the primary",
                format!(
                    "{key}: the primary got {} direct and {} through the agent",
                    d.len(),
                    a.len()
                ),
            );
        }
        for (d, a) in d.iter().zip(a) {
            compare_request(d, a, h2, out);
        }
    }
}

fn compare_request(d: &Recorded, a: &Recorded, h2: bool, out: &mut Vec<Diff>) {
    let sides = DIRECT_VS_AGENT;
    let (dm, dt, dv) = d.head.words();
    let (am, at, av) = a.head.words();
    let mut df = without(&end_to_end(&d.head.fields, &[]), &FORWARDING);
    let mut af = without(&end_to_end(&a.head.fields, &[]), &FORWARDING);
    let mut dt = dt.to_vec();
    if let Some((authority, origin)) = absolute_form(&dt) {
        dt = origin;
        set_host(&mut df, &authority);
    }
    if dm != am || dt != at {
        diff(
            out,
            "request line",
            format!(
                "direct `{} {}` vs through the agent `{} {}`",
                show_short(dm, 20),
                show_short(&dt, 80),
                show_short(am, 20),
                show_short(at, 80)
            ),
        );
    }
    if av != b"HTTP/1.1" {
        diff(
            out,
            "version toward the primary",
            format!("`{}`, not HTTP/1.1", show(av)),
        );
    }
    if dv == b"HTTP/1.0" && !df.iter().any(|f| f.is("host")) {
        af.retain(|f| !f.is("host"));
    }
    if h2 {
        host_first(&mut df);
        host_first(&mut af);
    }
    let expects = |f: &Field| f.is("expect") && f.value.eq_ignore_ascii_case(b"100-continue");
    if af.iter().any(expects) {
        diff(
            out,
            "Expect forwarded to the primary",
            "the primary was asked to expect 100-continue, which the agent answers itself",
        );
    }
    df.retain(|f| !expects(f));
    af.retain(|f| !expects(f));
    diff_fields("request field", sides, &df, &af, out);
    compare_bodies("request", sides, d.body.as_ref(), a.body.as_ref(), out);
    if d.upgraded != a.upgraded {
        diff(
            out,
            "upgraded bytes at the primary",
            describe_bytes(sides, &d.upgraded, &a.upgraded),
        );
    }
    if d.gate_opened != a.gate_opened {
        diff(
            out,
            "streaming",
            format!(
                "the client had the first event before the primary sent the rest: direct {:?}, through the agent {:?} (waited {GATE_LIMIT:?})",
                d.gate_opened, a.gate_opened
            ),
        );
    }
}

/// What the client got directly against what it got through the agent.
/// `asked_trailers`: the client sent `TE: trailers` (P13).
fn compare_client(
    direct: &ClientSaw,
    agent: &ClientSaw,
    asked_trailers: bool,
    out: &mut Vec<Diff>,
) {
    if direct.trouble != agent.trouble {
        diff(
            out,
            "client exchange",
            format!(
                "direct: {}; through the agent: {}",
                direct.trouble.as_deref().unwrap_or("every answer"),
                agent.trouble.as_deref().unwrap_or("every answer")
            ),
        );
    }
    if direct.answers.len() != agent.answers.len() {
        let statuses = |s: &ClientSaw| {
            s.answers
                .iter()
                .map(|a| show(&a.head.start))
                .collect::<Vec<_>>()
                .join(", ")
        };
        diff(
            out,
            "answers to the client",
            format!(
                "{} direct [{}] vs {} through the agent [{}]",
                direct.answers.len(),
                statuses(direct),
                agent.answers.len(),
                statuses(agent)
            ),
        );
    }
    for (d, a) in direct.answers.iter().zip(&agent.answers) {
        compare_answer(d, a, asked_trailers, out);
    }
    if direct.upgraded != agent.upgraded {
        diff(
            out,
            "upgraded bytes at the client",
            describe_bytes(DIRECT_VS_AGENT, &direct.upgraded, &agent.upgraded),
        );
    }
}

fn compare_answer(d: &Answer, a: &Answer, asked_trailers: bool, out: &mut Vec<Diff>) {
    let sides = DIRECT_VS_AGENT;
    let (_, dcode, dreason) = d.head.words();
    let (_, acode, areason) = a.head.words();
    let keep: &[&str] = if dcode == b"101" {
        &["connection", "upgrade"]
    } else {
        &[]
    };
    let mut df = end_to_end(&d.head.fields, keep);
    let mut af = end_to_end(&a.head.fields, keep);
    if a.h2 {
        if dcode != acode {
            diff(
                out,
                "status",
                format!(
                    "direct {} vs through the agent {}",
                    show(dcode),
                    show(acode)
                ),
            );
        }
        // H1: lower-case names; fields grouped by name by the test's client.
        for f in df.iter_mut().chain(af.iter_mut()) {
            f.name = f.key();
        }
        df.sort_by_key(Field::key);
        af.sort_by_key(Field::key);
    } else {
        if dcode != acode || dreason != areason {
            diff(
                out,
                "status",
                format!(
                    "direct `{} {}` vs through the agent `{} {}`",
                    show(dcode),
                    show(dreason),
                    show(acode),
                    show(areason)
                ),
            );
        }
        // P7: 100 Continue is the agent's own; P11: other 1xx are not forwarded.
        let interim = |x: &Answer| -> Vec<Head> {
            x.interim
                .iter()
                .filter(|h| !matches!(h.status(), Ok(100..=199)))
                .cloned()
                .collect()
        };
        let (dh, ah) = (interim(d), interim(a));
        let codes =
            |heads: &[Head]| -> Vec<String> { heads.iter().map(|h| show(h.words().1)).collect() };
        let (di, ai) = (codes(&dh), codes(&ah));
        if di != ai {
            diff(
                out,
                "interim answers",
                format!(
                    "direct [{}] vs through the agent [{}]",
                    di.join(", "),
                    ai.join(", ")
                ),
            );
        } else {
            for (x, y) in dh.iter().zip(&ah) {
                diff_fields(
                    "interim field",
                    sides,
                    &end_to_end(&x.fields, &[]),
                    &end_to_end(&y.fields, &[]),
                    out,
                );
            }
        }
    }
    if dcode == b"304" {
        // P12.
        df.retain(|f| !f.is("content-length"));
        af.retain(|f| !f.is("content-length"));
    }
    diff_fields("response field", sides, &df, &af, out);
    if asked_trailers || a.body.trailers.is_empty() == d.body.trailers.is_empty() {
        compare_bodies("response", sides, Some(&d.body), Some(&a.body), out);
    } else {
        // P13: without `TE: trailers` the trailers may be dropped; the rest is compared.
        let mut without = d.body.clone();
        without.trailers.clear();
        compare_bodies("response", sides, Some(&without), Some(&a.body), out);
    }
}

/// What the shadow got against what the primary got through the agent (S1-S3).
fn compare_shadow(case: &Case, primary: &Log, shadow: &Log, out: &mut Vec<Diff>) {
    match case.mirror {
        Mirror::Either => {}
        Mirror::Never => {
            let n: usize = shadow.values().map(Vec::len).sum();
            if n > 0 {
                diff(
                    out,
                    "copy of a request that is never copied",
                    format!("the shadow got {n} request(s)"),
                );
            }
        }
        Mirror::Expected => {
            let keys: BTreeSet<&String> = primary.keys().chain(shadow.keys()).collect();
            for key in keys {
                // A request the primary did not get whole is not a copy anyone expects.
                let p: Vec<&Recorded> = primary
                    .get(key)
                    .map(|v| {
                        v.iter()
                            .filter(|r| r.body.as_ref().is_some_and(|b| b.cut.is_none()))
                            .collect()
                    })
                    .unwrap_or_default();
                let s: Vec<&Recorded> = shadow
                    .get(key)
                    .map(|v| v.iter().collect())
                    .unwrap_or_default();
                if p.len() != s.len() {
                    diff(
                        out,
                        "copies at the shadow",
                        format!(
                            "{key}: the primary got {} through the agent, the shadow {}",
                            p.len(),
                            s.len()
                        ),
                    );
                }
                for (p, s) in p.iter().zip(&s) {
                    compare_copy(p, s, out);
                }
            }
        }
    }
}

fn compare_copy(p: &Recorded, s: &Recorded, out: &mut Vec<Diff>) {
    let sides = PRIMARY_VS_SHADOW;
    let (pm, pt, pv) = p.head.words();
    let (sm, st, sv) = s.head.words();
    if pm != sm || pt != st || pv != sv {
        diff(
            out,
            "copy request line",
            format!(
                "primary `{}` vs shadow `{}`",
                show_short(&p.head.start, 100),
                show_short(&s.head.start, 100)
            ),
        );
    }
    let pf: Vec<Field> = end_to_end(&p.head.fields, &[])
        .into_iter()
        .filter(|f| {
            !teeway_agent::policy::DEFAULT_REDACTED_HEADERS
                .iter()
                .any(|h| f.is(h.as_str()))
        })
        .collect();
    let mut sf = without(&end_to_end(&s.head.fields, &[]), &[MARKER]);
    if request_framing(&p.head) == Ok(Framing::Chunked) {
        let decoded = p
            .body
            .as_ref()
            .map_or(0, |b| b.data.len())
            .to_string()
            .into_bytes();
        sf.retain(|f| !(f.is("content-length") && f.value == decoded));
    }
    diff_fields("copy field", sides, &pf, &sf, out);
    compare_bodies("copy", sides, p.body.as_ref(), s.body.as_ref(), out);
}

const MARKER: &str = teeway_gateway::config::DEFAULT_MARKER_HEADER;

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

/// Cases whose raw recordings are printed: ids in `TEEWAY_CONFORMANCE_DUMP` (`c043,c061`), for
/// looking at the exact bytes behind a difference.
fn dump(case: &Case, label: &str, log: &Log) {
    let wanted = std::env::var("TEEWAY_CONFORMANCE_DUMP").unwrap_or_default();
    if !wanted.split(',').any(|id| id.trim() == case.id) {
        return;
    }
    for (key, requests) in log {
        for r in requests {
            eprintln!(
                "---- {key} {label}: head {}\n     body {}",
                show_short(&r.raw_head, 2000),
                show_short(&r.raw_body, 2000)
            );
        }
    }
}

/// Every case's differences, reported together.
struct Report {
    title: &'static str,
    ran: usize,
    failing: Vec<(String, Vec<Diff>)>,
}

impl Report {
    fn new(title: &'static str) -> Self {
        Self {
            title,
            ran: 0,
            failing: Vec::new(),
        }
    }

    fn add(&mut self, case: &Case, diffs: Vec<Diff>) {
        self.ran += 1;
        if !diffs.is_empty() {
            self.failing
                .push((format!("{} {}", case.id, case.name), diffs));
        }
    }

    /// Prints every difference, then fails once if there were any.
    fn finish(self) {
        let mut detail = String::new();
        let mut by_kind: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (case, diffs) in &self.failing {
            let _ = writeln!(detail, "  {case}");
            for d in diffs {
                let _ = writeln!(detail, "      [{}] {}", d.kind, d.detail);
                let cases = by_kind.entry(d.kind.as_str()).or_default();
                if cases.last() != Some(&case.as_str()) {
                    cases.push(case.as_str());
                }
            }
        }
        let mut summary = format!(
            "{}: {} of {} cases differ.\nAllowed differences:\n",
            self.title,
            self.failing.len(),
            self.ran
        );
        for a in ALLOWED_DIFFERENCES {
            let _ = writeln!(summary, "  - {a}");
        }
        let _ = writeln!(summary, "Differences by kind:");
        for (kind, cases) in &by_kind {
            let ids: Vec<&str> = cases
                .iter()
                .map(|c| c.split(' ').next().unwrap_or(c))
                .collect();
            let _ = writeln!(
                summary,
                "  {kind} ({} cases): {}",
                cases.len(),
                list(&ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(), 40)
            );
        }
        let _ = writeln!(summary, "Failing cases:");
        for (case, diffs) in &self.failing {
            let kinds: BTreeSet<&str> = diffs.iter().map(|d| d.kind.as_str()).collect();
            let _ = writeln!(
                summary,
                "  {case}: {}",
                kinds.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        eprintln!("==== {} : every difference ====\n{detail}", self.title);
        eprintln!("{summary}");
        assert!(self.failing.is_empty(), "{summary}");
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// An agent (mirroring everything) whose primary is `primary` and whose gateway's one shadow is
/// `shadow`, spoken to in HTTP/1.1 like the default deployment.
async fn start_stack(primary: SocketAddr, shadow: SocketAddr) -> Stack {
    Stack::start_configured(
        100.0,
        |g| {
            let route = &mut g.routes[0];
            route.protocol = UpstreamProtocol::Http1;
            let mut target = TargetConfig::new(loopback_target(shadow));
            target.max_concurrency = SHADOW_CONCURRENCY;
            route.targets = vec![target];
        },
        |a| {
            a.primary = Some(loopback_target(primary));
            a.primary_protocol = UpstreamProtocol::Http1;
        },
    )
    .await
}

/// Scripts for every case, by key.
fn scripts_of(corpus: &[Case]) -> Scripts {
    corpus
        .iter()
        .flat_map(|c| c.scripts.iter().cloned())
        .collect()
}

/// Runs `group`'s cases straight to one recording primary and through the agent to another, and
/// compares what the primaries got and what the clients got back.
async fn differential(group: Group, title: &'static str) {
    let corpus = corpus();
    assert!(
        corpus.len() >= MIN_CASES,
        "the corpus has {} cases, fewer than {MIN_CASES}",
        corpus.len()
    );
    let scripts = Arc::new(scripts_of(&corpus));
    let direct = Recorder::start(scripts.clone())
        .await
        .expect("direct primary");
    let via = Recorder::start(scripts).await.expect("the agent's primary");
    let shadow = Recorder::start(Arc::default()).await.expect("shadow");
    let stack = start_stack(via.addr, shadow.addr).await;

    let cases: Vec<&Case> = corpus.iter().filter(|c| c.group == group).collect();
    assert!(!cases.is_empty(), "no {group:?} cases");
    let mut report = Report::new(title);
    for case in cases {
        let direct_saw = run_direct(case, &direct).await;
        let agent_saw = run_via_agent(case, stack.agent.addr, &via).await;
        let (direct_log, agent_log) = (direct.case(&case.id), via.case(&case.id));
        dump(case, "primary, direct", &direct_log);
        dump(case, "primary, through the agent", &agent_log);
        let mut diffs = Vec::new();
        baseline(case, &direct_saw, &direct_log, &mut diffs);
        compare_primary(case, &direct_log, &agent_log, &mut diffs);
        let asked_trailers = direct_log.values().flatten().any(|r| {
            r.head.fields.iter().any(|f| {
                f.is("te")
                    && String::from_utf8_lossy(&f.value)
                        .to_ascii_lowercase()
                        .contains("trailers")
            })
        });
        compare_client(&direct_saw, &agent_saw, asked_trailers, &mut diffs);
        report.add(case, diffs);
    }
    stack.stop().await;
    report.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_corpus_reaches_the_primary_and_the_client_unchanged() {
    differential(Group::Http1, "HTTP/1.x corpus, primary and client").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_corpus_reaches_the_http1_primary_and_the_client_unchanged() {
    differential(Group::H2, "h2 corpus, primary and client").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_timing_cases_behave_as_without_the_agent() {
    differential(Group::Streaming, "streaming and timing cases").await;
}

/// Every case through the agent; then every copy the shadow got is compared with what the
/// primary got (S1-S3), and the agent's books must balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_receives_what_the_primary_received() {
    let corpus = corpus();
    let scripts = Arc::new(scripts_of(&corpus));
    let via = Recorder::start(scripts).await.expect("the agent's primary");
    let shadow = Recorder::start(Arc::default()).await.expect("shadow");
    let stack = start_stack(via.addr, shadow.addr).await;

    for case in &corpus {
        run_via_agent(case, stack.agent.addr, &via).await;
    }
    let a = settle(|| stack.agent_metrics(), agent_settled).await;
    assert_agent_identity(&a);
    let mirrored = a.get(am::MIRRORED_TOTAL);
    assert!(mirrored > 0.0, "nothing was mirrored: {a:?}");
    let g = settle(
        || stack.gateway_metrics(),
        |g| gateway_settled(g, 1.0) && g.get(gm::RECEIVED_TOTAL) == mirrored,
    )
    .await;
    assert_eq!(g.get(gm::RECEIVED_TOTAL), mirrored, "{g:?}");

    let mut report = Report::new("shadow side (copies against the primary)");
    let expected: Vec<&Case> = corpus
        .iter()
        .filter(|c| c.mirror == Mirror::Expected)
        .collect();
    let copied = expected
        .iter()
        .filter(|c| !shadow.case(&c.id).is_empty())
        .count();
    assert!(
        copied * 10 >= expected.len() * 8,
        "only {copied} of {} copyable cases reached the shadow at all: the comparison would say little",
        expected.len()
    );
    for case in &corpus {
        let mut diffs = Vec::new();
        dump(case, "primary, through the agent", &via.case(&case.id));
        dump(case, "shadow", &shadow.case(&case.id));
        compare_shadow(
            case,
            &via.case(&case.id),
            &shadow.case(&case.id),
            &mut diffs,
        );
        report.add(case, diffs);
    }
    stack.stop().await;
    report.finish();
}

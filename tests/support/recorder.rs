//! A byte-recording HTTP/1.x server and the raw HTTP/1 message reader the conformance suite's
//! clients use.
//!
//! The [`Recorder`] reads each request exactly as it arrives (head, then the body by its
//! Content-Length or chunked framing, chunk extensions and trailers included), files it under
//! its case key (the `x-case` field), and answers with the exact bytes its [`Script`] gives for
//! that key: so the fields' case and order, a missing `Date` or an interim `103` reach the other
//! side as written. Nothing here normalises anything; comparison is the suite's business.
//!
//! Messages are read incrementally from a buffer ([`Wire`]): a parse of what has arrived so far
//! either ends the message or asks for more bytes. The parser accepts what RFC 9112 lets a
//! sender send (CRLF line ends, no obs-fold) and says why when it does not.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// The field whose value files a request under its case.
pub const CASE_FIELD: &str = "x-case";

/// Largest head accepted: above the suite's 64,000-byte target plus 150 field lines, well below
/// anything that could hurt the test machine.
pub const MAX_HEAD_BYTES: usize = 1 << 20;

/// Largest body accepted, for the same reason.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// How long the recorder waits on a quiet connection (an idle pooled connection, a body that
/// stopped coming) before giving it up: longer than any case, so it only bounds a stuck test.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// How long a streaming answer waits for the client to say it got the first event.
pub const GATE_LIMIT: Duration = Duration::from_secs(5);

/// What a primary answers when no script names the request: an empty `200`.
const DEFAULT_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

/// Bytes as text, with everything but printable ASCII escaped (`\r`, `\n`, `\t`, `\xNN`).
pub fn show(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// [`show`], cut to `max` characters with the total length said.
pub fn show_short(bytes: &[u8], max: usize) -> String {
    let text = show(bytes);
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...({} bytes)", &text[..cut], bytes.len())
}

/// One field line: its name as written and its value without the optional whitespace around it.
#[derive(Clone, PartialEq, Eq)]
pub struct Field {
    /// The name, case as on the wire.
    pub name: Vec<u8>,
    /// The value, bytes as on the wire (obs-text included), surrounding OWS removed.
    pub value: Vec<u8>,
}

impl Field {
    /// A field from text.
    pub fn new(name: &str, value: &[u8]) -> Self {
        Self {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
        }
    }

    /// The name, lower-cased (field names are case-insensitive).
    pub fn key(&self) -> Vec<u8> {
        self.name.to_ascii_lowercase()
    }

    /// Whether this field is called `name` (any case).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

impl fmt::Debug for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", show(&self.name), show_short(&self.value, 80))
    }
}

/// A message head: the start line and the field lines.
#[derive(Clone, Debug)]
pub struct Head {
    /// Request line or status line, without its CRLF.
    pub start: Vec<u8>,
    /// The field lines in order.
    pub fields: Vec<Field>,
}

impl Head {
    /// Parses a head: the bytes before the empty line that ends it (so without the last
    /// line's CRLF). Lines end in CRLF; a bare CR or LF is refused.
    pub fn parse(text: &[u8]) -> Result<Head, String> {
        let mut lines = Vec::new();
        let mut rest = text;
        loop {
            match find_crlf(rest) {
                Some(p) => {
                    lines.push(&rest[..p]);
                    rest = &rest[p + 2..];
                }
                None => {
                    lines.push(rest);
                    break;
                }
            }
        }
        if let Some(bad) = lines
            .iter()
            .find(|l| l.contains(&b'\r') || l.contains(&b'\n'))
        {
            return Err(format!("a bare CR or LF in: {}", show_short(bad, 60)));
        }
        let (start, field_lines) = lines
            .split_first()
            .ok_or_else(|| "an empty head".to_owned())?;
        let fields = field_lines
            .iter()
            .map(|line| parse_field(line))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Head {
            start: start.to_vec(),
            fields,
        })
    }

    /// The values of the fields called `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |f| f.is(name))
            .map(|f| f.value.as_slice())
    }

    /// Whether a comma-separated list field `name` has the element `token` (any case).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(|b| *b == b','))
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
    }

    /// The start line's three parts: method, target, version for a request; version, status
    /// code, reason for a response (the reason may hold spaces, or be empty).
    pub fn words(&self) -> (&[u8], &[u8], &[u8]) {
        let mut parts = self.start.splitn(3, |b| *b == b' ');
        let a = parts.next().unwrap_or_default();
        let b = parts.next().unwrap_or_default();
        let c = parts.next().unwrap_or_default();
        (a, b, c)
    }

    /// The status code of a status line.
    pub fn status(&self) -> Result<u16, String> {
        std::str::from_utf8(self.words().1)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not a status line: {}", show_short(&self.start, 60)))
    }

    /// The case key: the first `x-case` value.
    pub fn case_key(&self) -> String {
        self.values(CASE_FIELD)
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| "?".to_owned())
    }
}

/// `name ":" OWS value OWS`.
fn parse_field(line: &[u8]) -> Result<Field, String> {
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| format!("a field line without a colon: {}", show_short(line, 60)))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
        return Err(format!("not a field name: {}", show_short(name, 60)));
    }
    Ok(Field {
        name: name.to_vec(),
        value: trim_ows(&line[colon + 1..]).to_vec(),
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Removes spaces and tabs at both ends.
pub fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |p| p + 1);
    &bytes[start..end.max(start)]
}

/// Where the head at the start of `buf` ends (just after its empty line), if it is all there.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// How a message's body is delimited (RFC 9112 section 6.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(usize),
    /// Chunked transfer coding, trailers included.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// How a request's body is delimited. Several equal Content-Length values (`3, 3`) are one
/// length, as RFC 9110 section 8.6 lets a recipient take them.
pub fn request_framing(head: &Head) -> Result<Framing, String> {
    if head.values("transfer-encoding").next().is_some() {
        return if last_coding_is_chunked(head) {
            Ok(Framing::Chunked)
        } else {
            Err("a request transfer coding other than chunked".into())
        };
    }
    match content_length(head)? {
        Some(n) => Ok(Framing::Length(n)),
        None => Ok(Framing::Empty),
    }
}

/// How a response to a `method` request is delimited.
pub fn response_framing(head: &Head, method: &[u8]) -> Result<Framing, String> {
    let status = head.status()?;
    if method.eq_ignore_ascii_case(b"HEAD") || (100..200).contains(&status) || status == 204 {
        return Ok(Framing::Empty);
    }
    if status == 304 {
        return Ok(Framing::Empty);
    }
    if head.values("transfer-encoding").next().is_some() {
        return Ok(if last_coding_is_chunked(head) {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    Ok(match content_length(head)? {
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

fn last_coding_is_chunked(head: &Head) -> bool {
    head.values("transfer-encoding")
        .flat_map(|v| v.split(|b| *b == b','))
        .map(trim_ows)
        .filter(|t| !t.is_empty())
        .last()
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
}

fn content_length(head: &Head) -> Result<Option<usize>, String> {
    let mut length = None;
    for item in head
        .values("content-length")
        .flat_map(|v| v.split(|b| *b == b','))
    {
        let n: usize = std::str::from_utf8(trim_ows(item))
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not a content-length: {}", show_short(item, 40)))?;
        if length.is_some_and(|l| l != n) {
            return Err("content-length values differ".into());
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > MAX_BODY_BYTES => Err(format!("content-length {n} is over the limit")),
        other => Ok(other),
    }
}

/// A body as read: its bytes decoded from the framing, its trailers, how it was chunked, and
/// why it stopped short if it did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Body {
    /// The decoded bytes.
    pub data: Vec<u8>,
    /// Trailer fields (chunked only).
    pub trailers: Vec<Field>,
    /// Each chunk's size and extension (after the size, `;` included), last chunk included.
    pub chunks: Vec<(usize, Vec<u8>)>,
    /// `None` when the body ended as its framing says; else why it did not.
    pub cut: Option<String>,
}

/// Parses the body at the start of `buf` as far as it goes: the body, and the bytes it took
/// when it is complete. `eof`: no more bytes will come.
pub fn parse_body(framing: &Framing, buf: &[u8], eof: bool) -> Result<(Body, usize), String> {
    let mut body = Body::default();
    match framing {
        Framing::Empty => Ok((body, 0)),
        Framing::Length(n) => {
            let take = (*n).min(buf.len());
            body.data = buf[..take].to_vec();
            if take < *n {
                body.cut = Some(format!("{take} of {n} bytes"));
            }
            Ok((body, take))
        }
        Framing::Close => {
            if buf.len() > MAX_BODY_BYTES {
                return Err("a close-delimited body over the limit".into());
            }
            body.data = buf.to_vec();
            if !eof {
                body.cut = Some(format!("{} bytes so far", buf.len()));
            }
            Ok((body, buf.len()))
        }
        Framing::Chunked => parse_chunked(buf, body),
    }
}

fn parse_chunked(buf: &[u8], mut body: Body) -> Result<(Body, usize), String> {
    let mut pos = 0;
    let incomplete = |mut body: Body, what: &str| {
        body.cut = Some(format!("chunked body stopped in {what}"));
        Ok((body, buf.len()))
    };
    loop {
        let Some(line_len) = find_crlf(&buf[pos..]) else {
            return incomplete(body, "a chunk-size line");
        };
        let line = &buf[pos..pos + line_len];
        let (size_text, ext) = match line.iter().position(|b| *b == b';') {
            Some(p) => (&line[..p], &line[p..]),
            None => (line, &line[line.len()..]),
        };
        let size_text = trim_ows(size_text);
        let size = std::str::from_utf8(size_text)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .filter(|n| *n <= MAX_BODY_BYTES)
            .ok_or_else(|| format!("not a chunk size: {}", show_short(line, 40)))?;
        body.chunks.push((size, ext.to_vec()));
        pos += line_len + 2;
        if size == 0 {
            loop {
                let Some(line_len) = find_crlf(&buf[pos..]) else {
                    return incomplete(body, "the trailer section");
                };
                let line = &buf[pos..pos + line_len];
                pos += line_len + 2;
                if line.is_empty() {
                    return Ok((body, pos));
                }
                body.trailers.push(parse_field(line)?);
            }
        }
        if body.data.len() + size > MAX_BODY_BYTES {
            return Err("a chunked body over the limit".into());
        }
        let available = buf.len().saturating_sub(pos);
        if available < size + 2 {
            body.data
                .extend_from_slice(&buf[pos..pos + available.min(size)]);
            return incomplete(body, "a chunk");
        }
        body.data.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        pos += size + 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A byte stream read message by message.
#[derive(Debug)]
pub struct Wire<R> {
    /// The stream.
    pub io: R,
    /// Bytes read and not yet taken by a message.
    pub buf: Vec<u8>,
    /// The peer closed its side.
    pub eof: bool,
}

impl<R: AsyncRead + Unpin> Wire<R> {
    /// A reader of `io`.
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Reads more bytes, by `deadline`.
    pub async fn fill(&mut self, deadline: Instant) -> Result<(), String> {
        if self.eof {
            return Err("the connection is closed".into());
        }
        let mut chunk = vec![0u8; READ_CHUNK];
        let n = tokio::time::timeout_at(deadline.into(), self.io.read(&mut chunk))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next head and its raw bytes; `None` when the peer closed before sending any byte of
    /// one.
    pub async fn read_head(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(Head, Vec<u8>)>, String> {
        loop {
            if let Some(end) = head_end(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..end).collect();
                let head = Head::parse(&raw[..end - 4])?;
                return Ok(Some((head, raw)));
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(format!("a head over {MAX_HEAD_BYTES} bytes"));
            }
            if self.eof {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(format!(
                        "the connection closed inside a head: {}",
                        show_short(&self.buf, 80)
                    ))
                };
            }
            self.fill(deadline).await?;
        }
    }

    /// The body that follows a head framed by `framing`, and its raw bytes; `progress` sees the
    /// body after every read. A body cut short (closed, timed out) comes back with `cut` set.
    pub async fn read_body(
        &mut self,
        framing: &Framing,
        deadline: Instant,
        mut progress: impl FnMut(&Body),
    ) -> Result<(Body, Vec<u8>), String> {
        loop {
            let (mut body, used) = parse_body(framing, &self.buf, self.eof)?;
            progress(&body);
            if body.cut.is_none() {
                return Ok((body, self.buf.drain(..used).collect()));
            }
            let stopped = if self.eof {
                Some("the connection closed".to_owned())
            } else {
                self.fill(deadline).await.err()
            };
            if let Some(why) = stopped {
                let so_far = body.cut.take().unwrap_or_default();
                body.cut = Some(format!("{so_far}; {why}"));
                return Ok((body, std::mem::take(&mut self.buf)));
            }
        }
    }
}

/// How the recorder answers one case's request.
#[derive(Clone, Debug)]
pub enum Script {
    /// These bytes once the request is read; with `close`, the connection is closed after.
    Bytes {
        /// The answer, exactly.
        bytes: Vec<u8>,
        /// Close after writing it.
        close: bool,
    },
    /// `100 Continue` after the head when the request expects it, then `bytes` once the body is
    /// read.
    Continue {
        /// The final answer.
        bytes: Vec<u8>,
    },
    /// `bytes` right after the head, the body left unread (then read and dropped until the peer
    /// closes, so the close is clean).
    Early {
        /// The answer, exactly.
        bytes: Vec<u8>,
    },
    /// `first`, then `rest` once `gate` is notified (the client got `first`) or after
    /// [`GATE_LIMIT`]; then the connection is closed.
    Stream {
        /// Head and first event.
        first: Vec<u8>,
        /// The remaining events and the end.
        rest: Vec<u8>,
        /// Notified by the client.
        gate: Arc<Notify>,
    },
    /// `bytes` (a `101`), then every byte received is recorded and echoed until the peer
    /// closes.
    Upgrade {
        /// The `101` answer.
        bytes: Vec<u8>,
    },
}

/// Scripts by case key.
pub type Scripts = HashMap<String, Script>;

/// One request as the recorder received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Its case key.
    pub key: String,
    /// The head, parsed.
    pub head: Head,
    /// The head's exact bytes.
    pub raw_head: Vec<u8>,
    /// The body; `None` when the script answered without reading it.
    pub body: Option<Body>,
    /// The body's exact bytes as framed.
    pub raw_body: Vec<u8>,
    /// Bytes received after a `101`.
    pub upgraded: Vec<u8>,
    /// For a streaming answer: whether the client said it had the first event before the rest
    /// was sent.
    pub gate_opened: Option<bool>,
    /// Which connection (numbered from 1 in accept order) carried it.
    pub connection: u64,
}

/// Requests by case key, in arrival order.
pub type Log = BTreeMap<String, Vec<Recorded>>;

#[derive(Debug)]
struct Shared {
    scripts: Arc<Scripts>,
    log: Mutex<Log>,
    /// Body bytes received so far per key, for requests still being read.
    progress: Mutex<HashMap<String, usize>>,
    /// Bumped on every change to `log` or `progress`.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn push(&self, recorded: Recorded) {
        if let Ok(mut log) = self.log.lock() {
            log.entry(recorded.key.clone()).or_default().push(recorded);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn note_progress(&self, key: &str, bytes: usize) {
        if let Ok(mut progress) = self.progress.lock() {
            progress.insert(key.to_owned(), bytes);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// The script for `key`: its own, else its case's (`c7.2` falls back to `c7`).
    fn script(&self, key: &str) -> Option<Script> {
        self.scripts.get(key).cloned().or_else(|| {
            key.rsplit_once('.')
                .and_then(|(case, _)| self.scripts.get(case).cloned())
        })
    }
}

/// A byte-recording HTTP/1.x server on `127.0.0.1:0`; stops when dropped.
#[derive(Debug)]
pub struct Recorder {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    /// Starts a recorder answering by `scripts` (an empty `200` for keys it has no script for).
    pub async fn start(scripts: Arc<Scripts>) -> std::io::Result<Recorder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            scripts,
            log: Mutex::new(Log::new()),
            progress: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        });
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                // Connection tasks live in the set, so they end with the accept loop.
                let mut connections = JoinSet::new();
                let mut next = 0u64;
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                next += 1;
                                connections.spawn(serve_connection(shared.clone(), stream, next));
                            }
                            Err(_) => break,
                        },
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            }
        });
        Ok(Recorder { addr, shared, task })
    }

    /// The requests of case `id`: keys `id` and `id.N`.
    pub fn case(&self, id: &str) -> Log {
        let dotted = format!("{id}.");
        self.shared
            .log
            .lock()
            .map(|log| {
                log.iter()
                    .filter(|(k, _)| *k == id || k.starts_with(&dotted))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything recorded.
    pub fn log(&self) -> Log {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Body bytes received so far for the request `key` still being read.
    pub fn progress(&self, key: &str) -> usize {
        self.shared
            .progress
            .lock()
            .map(|p| p.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Waits until `done` holds for this recorder (re-checked on every change), at most
    /// `limit`; whether it held.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&Recorder) -> bool) -> bool {
        let mut changed = self.shared.changed.subscribe();
        let wait = async {
            loop {
                if done(self) {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        done(self)
    }
}

/// Reads requests off one connection, files them and answers them by script, until the peer
/// closes or a script ends the connection.
async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, connection: u64) {
    let _ = stream.set_nodelay(true);
    let mut wire = Wire::new(stream);
    loop {
        let Ok(Some((head, raw_head))) = wire.read_head(Instant::now() + IDLE_LIMIT).await else {
            return;
        };
        let key = head.case_key();
        let script = shared.script(&key);
        let mut recorded = Recorded {
            key: key.clone(),
            head,
            raw_head,
            body: None,
            raw_body: Vec::new(),
            upgraded: Vec::new(),
            gate_opened: None,
            connection,
        };
        let framing = match request_framing(&recorded.head) {
            Ok(f) => f,
            Err(e) => {
                recorded.body = Some(Body {
                    cut: Some(format!("unreadable framing: {e}")),
                    ..Body::default()
                });
                shared.push(recorded);
                return;
            }
        };
        if let Some(Script::Early { bytes }) = &script {
            shared.push(recorded);
            if wire.io.write_all(bytes).await.is_err() {
                return;
            }
            // Drain until the peer closes, so it reads the answer rather than a reset.
            let deadline = Instant::now() + IDLE_LIMIT;
            while wire.fill(deadline).await.is_ok() && !wire.eof {
                wire.buf.clear();
            }
            return;
        }
        let continue_first = matches!(script, Some(Script::Continue { .. }))
            && recorded.head.has_token("expect", "100-continue");
        if continue_first
            && wire
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let read = wire
            .read_body(&framing, Instant::now() + IDLE_LIMIT, |b| {
                shared.note_progress(&key, b.data.len())
            })
            .await;
        let (body, raw_body) = match read {
            Ok(pair) => pair,
            Err(e) => (
                Body {
                    cut: Some(format!("unreadable body: {e}")),
                    ..Body::default()
                },
                std::mem::take(&mut wire.buf),
            ),
        };
        let cut = body.cut.is_some();
        recorded.body = Some(body);
        recorded.raw_body = raw_body;
        if cut {
            shared.push(recorded);
            return;
        }
        match script {
            None => {
                shared.push(recorded);
                if wire.io.write_all(DEFAULT_ANSWER).await.is_err() {
                    return;
                }
            }
            Some(Script::Bytes { bytes, close }) => {
                shared.push(recorded);
                if wire.io.write_all(&bytes).await.is_err() || close {
                    let _ = wire.io.shutdown().await;
                    return;
                }
            }
            Some(Script::Continue { bytes }) => {
                shared.push(recorded);
                if wire.io.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Some(Script::Early { .. }) => return,
            Some(Script::Stream { first, rest, gate }) => {
                if wire.io.write_all(&first).await.is_err() {
                    return;
                }
                let opened = tokio::time::timeout(GATE_LIMIT, gate.notified())
                    .await
                    .is_ok();
                recorded.gate_opened = Some(opened);
                shared.push(recorded);
                let _ = wire.io.write_all(&rest).await;
                let _ = wire.io.shutdown().await;
                return;
            }
            Some(Script::Upgrade { bytes }) => {
                if wire.io.write_all(&bytes).await.is_err() {
                    return;
                }
                let deadline = Instant::now() + IDLE_LIMIT;
                loop {
                    let fresh = std::mem::take(&mut wire.buf);
                    if !fresh.is_empty() {
                        recorded.upgraded.extend_from_slice(&fresh);
                        if wire.io.write_all(&fresh).await.is_err() {
                            break;
                        }
                    }
                    if wire.eof || wire.fill(deadline).await.is_err() {
                        break;
                    }
                }
                shared.push(recorded);
                let _ = wire.io.shutdown().await;
                return;
            }
        }
    }
}

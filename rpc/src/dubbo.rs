//! Dubbo 2: the 16-byte header (magic `0xdabb`, request/two-way/event flags, serialization id,
//! status, request id, body length) and, in the Hessian2 serialization, what an invocation calls.
//!
//! ```text
//! header = 0xda 0xbb  flags:u8  status:u8  id:u64  length:u32      (big-endian)
//! flags  = request:0x80  two_way:0x40  event:0x20  serialization:0x1f (2 = hessian2)
//! body   = dubbo_version  service  version  method  parameter_types  arguments...  attachments
//! ```
//!
//! A [`Scanner`] delimits messages by their header, in any pieces and without keeping them.
//! [`Invocation::read`] reads a request body's strings and attachments (skipping arguments of any
//! Hessian2 type: objects and their class definitions, typed and untyped lists and maps,
//! references, chunked strings and binaries); [`Invocation::redacted`] writes the message again
//! with some attachments removed or masked. [`Outcome::of`] tells a response's result from an
//! exception or an error status.

use crate::CodecError;

/// The header's length.
pub const HEADER_LEN: usize = 16;
/// The header's first two bytes.
pub const MAGIC: [u8; 2] = [0xda, 0xbb];
/// Largest body accepted (Dubbo's default `payload` is 8 MiB).
pub const MAX_BODY: u32 = 256 * 1024 * 1024;
/// The Hessian2 serialization id.
pub const HESSIAN2: u8 = 2;
/// Status of a response that carries a result or an exception.
pub const OK: u8 = 20;

const FLAG_REQUEST: u8 = 0x80;
const FLAG_TWO_WAY: u8 = 0x40;
const FLAG_EVENT: u8 = 0x20;

/// A message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// A request (else a response).
    pub request: bool,
    /// A request that expects a response.
    pub two_way: bool,
    /// An event (a heartbeat): never an invocation.
    pub event: bool,
    /// The body's serialization (2: Hessian2).
    pub serialization: u8,
    /// A response's status (20: OK).
    pub status: u8,
    /// The request id a response answers.
    pub id: u64,
    /// The body's length.
    pub body_len: u32,
}

impl Header {
    /// Reads a header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, CodecError> {
        if b[..2] != MAGIC {
            return Err(CodecError::Unexpected {
                byte: b[0],
                at: "where a Dubbo header begins (magic 0xdabb)",
            });
        }
        let body_len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        if body_len > MAX_BODY {
            return Err(CodecError::BadNumber {
                what: "Dubbo body length",
            });
        }
        Ok(Header {
            request: b[2] & FLAG_REQUEST != 0,
            two_way: b[2] & FLAG_TWO_WAY != 0,
            event: b[2] & FLAG_EVENT != 0,
            serialization: b[2] & 0x1f,
            status: b[3],
            id: u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]),
            body_len,
        })
    }

    /// Whether it heads an invocation: a request that is not an event.
    pub fn is_invocation(&self) -> bool {
        self.request && !self.event
    }

    /// Writes `id` into a message's header (`message` starts with it).
    pub fn set_id(message: &mut [u8], id: u64) {
        message[4..12].copy_from_slice(&id.to_be_bytes());
    }

    /// A heartbeat response to the request `id` (Hessian2, a null body), as a provider's
    /// consumer answers the heartbeats the provider sends.
    pub fn heartbeat_response(id: u64) -> [u8; HEADER_LEN + 1] {
        let mut m = [0u8; HEADER_LEN + 1];
        m[..2].copy_from_slice(&MAGIC);
        m[2] = FLAG_EVENT | HESSIAN2;
        m[3] = OK;
        m[4..12].copy_from_slice(&id.to_be_bytes());
        m[12..16].copy_from_slice(&1u32.to_be_bytes());
        m[16] = b'N';
        m
    }
}

/// Where a stream's current message is: its header being gathered, or its body being passed.
#[derive(Debug, Clone)]
pub struct Scanner {
    gathered: [u8; HEADER_LEN],
    have: usize,
    /// Body bytes left of the message under way, once its header is read.
    left: Option<u32>,
    current: Option<Header>,
    last: Option<Header>,
    /// The first body byte of the message under way, and of the last finished (a response's
    /// type: value, null or exception).
    first: Option<u8>,
    last_first: Option<u8>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner at the start of a stream.
    pub fn new() -> Self {
        Scanner {
            gathered: [0; HEADER_LEN],
            have: 0,
            left: None,
            current: None,
            last: None,
            first: None,
            last_first: None,
        }
    }

    /// The first body byte of the last message finished (`None`: an empty body).
    pub fn first_body_byte(&self) -> Option<u8> {
        self.last_first
    }

    /// The header of the last message finished.
    pub fn header(&self) -> Option<Header> {
        self.last
    }

    /// The header of the message under way, once read.
    pub fn current(&self) -> Option<Header> {
        self.current
    }

    /// Reads `chunk` with [`crate::redis::Scanner::feed`]'s contract.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Option<usize>, CodecError> {
        let mut i = 0;
        loop {
            match self.left {
                Some(0) => {
                    self.left = None;
                    self.last = self.current.take();
                    self.last_first = self.first.take();
                    return Ok(Some(i));
                }
                Some(left) => {
                    let take = (left as usize).min(chunk.len() - i);
                    if take == 0 {
                        return Ok(None);
                    }
                    if self.current.is_some_and(|h| h.body_len == left) {
                        self.first = Some(chunk[i]);
                    }
                    i += take;
                    self.left = Some(left - take as u32);
                }
                None => {
                    let take = (HEADER_LEN - self.have).min(chunk.len() - i);
                    if take == 0 {
                        return Ok(None);
                    }
                    self.gathered[self.have..self.have + take].copy_from_slice(&chunk[i..i + take]);
                    self.have += take;
                    i += take;
                    if self.have == HEADER_LEN {
                        self.have = 0;
                        let header = Header::parse(&self.gathered)?;
                        self.current = Some(header);
                        self.left = Some(header.body_len);
                    }
                }
            }
        }
    }
}

/// One attachment of an invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its name.
    pub name: String,
    /// Its value when it is a string (else `None`: a number, a map...).
    pub value: Option<String>,
    /// Its value is null.
    pub null: bool,
    /// Where its name and value lie in the body, to copy them as they are.
    span: (usize, usize),
}

/// What a Hessian2 invocation calls, read from its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The Dubbo version the consumer speaks.
    pub dubbo_version: String,
    /// The service path (its interface, mostly).
    pub service: String,
    /// The service version (`0.0.0`, or empty, for none).
    pub version: String,
    /// The method.
    pub method: String,
    /// The parameter types, as a JVM descriptor (`Ljava/lang/String;I`).
    pub parameter_types: String,
    /// Its attachments, in order (empty when the body has none, or was only partly read).
    pub attachments: Vec<Attachment>,
    /// Where the attachments map starts in the body (`None`: not reached).
    attachments_at: Option<usize>,
}

impl Invocation {
    /// Reads `body` (a Hessian2 request body, whole or only its start): the five strings that
    /// name the call, then, when the body is whole, the arguments skipped and the attachments
    /// read. `Err` when the body is not what a Hessian2 invocation starts with.
    pub fn read(body: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        let string = |r: &mut Reader<'_>| r.string().map(Option::unwrap_or_default);
        let dubbo_version = string(&mut r)?;
        let service = string(&mut r)?;
        let version = string(&mut r)?;
        let method = string(&mut r)?;
        let parameter_types = string(&mut r)?;
        let mut inv = Invocation {
            dubbo_version,
            service,
            version,
            method,
            parameter_types,
            attachments: Vec::new(),
            attachments_at: None,
        };
        // The rest only when the body is whole: a start is enough to route and decide.
        if inv.read_rest(&mut r).is_err() {
            inv.attachments.clear();
            inv.attachments_at = None;
        }
        Ok(inv)
    }

    /// An invocation nothing could be read of (another serialization than Hessian2, a body
    /// that is not an invocation): no service, no method, attachments not read.
    pub fn unknown() -> Self {
        Invocation {
            dubbo_version: String::new(),
            service: String::new(),
            version: String::new(),
            method: String::new(),
            parameter_types: String::new(),
            attachments: Vec::new(),
            attachments_at: None,
        }
    }

    /// Whether its attachments were read (the body was whole and every argument could be
    /// skipped): only then can they be redacted.
    pub fn attachments_read(&self) -> bool {
        self.attachments_at.is_some()
    }

    fn read_rest(&mut self, r: &mut Reader<'_>) -> Result<(), CodecError> {
        for _ in 0..argument_count(&self.parameter_types) {
            r.skip()?;
        }
        if r.at_end() {
            return Ok(());
        }
        let at = r.pos;
        match r.peek()? {
            b'H' => {
                r.pos += 1;
                while r.peek()? != b'Z' {
                    let start = r.pos;
                    let name = r.string()?.unwrap_or_default();
                    let null = r.peek()? == b'N';
                    let value = if is_string_start(r.peek()?) {
                        r.string()?
                    } else {
                        r.skip()?;
                        None
                    };
                    self.attachments.push(Attachment {
                        name,
                        value,
                        null,
                        span: (start, r.pos),
                    });
                }
                r.pos += 1;
            }
            b'N' => r.pos += 1,
            byte => {
                return Err(CodecError::Unexpected {
                    byte,
                    at: "where an invocation's attachments begin",
                })
            }
        }
        self.attachments_at = Some(at);
        Ok(())
    }

    /// Whether every attachment `redact` names can be removed or masked safely: its value is a
    /// string or null (an object's class definition or a reference in it would shift what later
    /// values refer to).
    pub fn redactable(&self, redact: impl Fn(&str) -> bool) -> bool {
        self.attachments_read()
            && self
                .attachments
                .iter()
                .all(|a| !redact(&a.name) || a.value.is_some() || a.null)
    }

    /// `message` (header and whole body) with the attachments `redact` names (in any case)
    /// removed, or replaced by `mask` when one is given; `None` when nothing changes, or the
    /// attachments were not read.
    pub fn redacted(
        &self,
        message: &[u8],
        redact: impl Fn(&str) -> bool,
        mask: Option<&str>,
    ) -> Option<Vec<u8>> {
        let at = HEADER_LEN + self.attachments_at?;
        if !self.attachments.iter().any(|a| redact(&a.name)) {
            return None;
        }
        let mut out = Vec::with_capacity(message.len());
        out.extend_from_slice(&message[..at]);
        out.push(b'H');
        for a in &self.attachments {
            if !redact(&a.name) {
                out.extend_from_slice(&message[HEADER_LEN + a.span.0..HEADER_LEN + a.span.1]);
            } else if let Some(mask) = mask {
                put_string(&mut out, &a.name);
                put_string(&mut out, mask);
            }
        }
        out.push(b'Z');
        let body_len = u32::try_from(out.len() - HEADER_LEN).ok()?;
        out[12..16].copy_from_slice(&body_len.to_be_bytes());
        Some(out)
    }
}

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A value (or null).
    Value,
    /// The provider threw: an application exception.
    Exception,
    /// A status other than OK (service not found, bad request, server error, timeout...).
    Status(u8),
    /// A heartbeat (or other event) response.
    Event,
}

impl Outcome {
    /// How the response with `header` and (the start of) `body` ended.
    pub fn of(header: &Header, body: &[u8]) -> Self {
        if header.event {
            return Outcome::Event;
        }
        if header.status != OK {
            return Outcome::Status(header.status);
        }
        if header.serialization != HESSIAN2 {
            return Outcome::Value;
        }
        // The response type: 0 exception, 1 value, 2 null; 3, 4, 5 the same with attachments.
        match Reader::new(body).int() {
            Ok(0 | 3) => Outcome::Exception,
            _ => Outcome::Value,
        }
    }
}

/// Text as Java's Hessian2 writes it: UTF-8, except that a character beyond the BMP is its two
/// UTF-16 surrogates, three bytes each (CESU-8). `None` when it is neither.
fn cesu8(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(text) => {
                out.push_str(text);
                return Some(out);
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).ok()?);
                let [0xed, h1 @ 0xa0..=0xaf, h2 @ 0x80..=0xbf, 0xed, l1 @ 0xb0..=0xbf, l2 @ 0x80..=0xbf, ..] =
                    *bad
                else {
                    return None;
                };
                let unit =
                    |b1: u8, b2: u8| 0xd000 | (u32::from(b1 & 0x3f) << 6) | u32::from(b2 & 0x3f);
                let (high, low) = (unit(h1, h2), unit(l1, l2));
                out.push(char::from_u32(
                    0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00),
                )?);
                rest = &bad[6..];
            }
        }
    }
}

/// How many arguments a JVM parameter descriptor (`Ljava/lang/String;[IJ`) declares.
pub fn argument_count(descriptor: &str) -> usize {
    let mut count = 0;
    let mut chars = descriptor.bytes();
    while let Some(c) = chars.next() {
        match c {
            b'[' => continue,
            b'L' => {
                for c in chars.by_ref() {
                    if c == b';' {
                        break;
                    }
                }
                count += 1;
            }
            _ => count += 1,
        }
    }
    count
}

fn is_string_start(b: u8) -> bool {
    matches!(b, 0x00..=0x1f | 0x30..=0x33 | b'R' | b'S')
}

/// Appends `s` as a Hessian2 string (lengths count UTF-16 units, as Java does).
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    let units: usize = s.chars().map(char::len_utf16).sum();
    if units <= 31 {
        out.push(units as u8);
    } else if units <= 1023 {
        out.push(0x30 + (units >> 8) as u8);
        out.push(units as u8);
    } else {
        // One final chunk when it fits, else chunks of 32,768 units.
        let mut rest = s;
        loop {
            let mut taken = 0;
            let mut bytes = 0;
            for c in rest.chars() {
                if taken + c.len_utf16() > 0x8000 {
                    break;
                }
                taken += c.len_utf16();
                bytes += c.len_utf8();
            }
            let last = bytes == rest.len();
            out.push(if last { b'S' } else { b'R' });
            out.extend_from_slice(&(taken as u16).to_be_bytes());
            out.extend_from_slice(&rest.as_bytes()[..bytes]);
            if last {
                return;
            }
            rest = &rest[bytes..];
        }
    }
    out.extend_from_slice(s.as_bytes());
}

/// Deepest nesting of Hessian2 values followed.
const MAX_DEPTH: usize = 64;

/// A Hessian2 reader over one body: class definitions and type names are remembered, as
/// references to them are by index.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The field count of each class definition seen.
    classes: Vec<usize>,
    depth: usize,
}

const SHORT: CodecError = CodecError::BadNumber {
    what: "Hessian2 value (the body ends inside it)",
};

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            classes: Vec::new(),
            depth: 0,
        }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn peek(&self) -> Result<u8, CodecError> {
        self.buf.get(self.pos).copied().ok_or(SHORT)
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(SHORT)?;
        let s = self.buf.get(self.pos..end).ok_or(SHORT)?;
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<i64, CodecError> {
        let bytes = self.take(n)?;
        let mut v: i64 = if bytes[0] & 0x80 != 0 { -1 } else { 0 };
        for b in bytes {
            v = (v << 8) | i64::from(*b);
        }
        Ok(v)
    }

    /// An int (any of its encodings).
    fn int(&mut self) -> Result<i64, CodecError> {
        let b = self.byte()?;
        Ok(match b {
            0x80..=0xbf => i64::from(b) - 0x90,
            0xc0..=0xcf => ((i64::from(b) - 0xc8) << 8) | i64::from(self.byte()?),
            0xd0..=0xd7 => ((i64::from(b) - 0xd4) << 16) | (self.be(2)? & 0xffff),
            b'I' => self.be(4)?,
            byte => {
                return Err(CodecError::Unexpected {
                    byte,
                    at: "where a Hessian2 int belongs",
                })
            }
        })
    }

    fn count(&mut self) -> Result<usize, CodecError> {
        usize::try_from(self.int()?).map_err(|_| CodecError::BadNumber {
            what: "Hessian2 length",
        })
    }

    /// A string, or null; chunks joined (a surrogate pair may straddle two), then decoded.
    fn string(&mut self) -> Result<Option<String>, CodecError> {
        let mut raw = Vec::new();
        if !self.string_with(|chunk| raw.extend_from_slice(chunk))? {
            return Ok(None);
        }
        String::from_utf8(raw)
            .or_else(|e| cesu8(e.as_bytes()).ok_or(()))
            .map(Some)
            .map_err(|()| CodecError::BadNumber {
                what: "UTF-8 in a Hessian2 string",
            })
    }

    /// Steps over a string (or null) without keeping it, nor judging its text: the message is
    /// copied as it is, whatever the text.
    fn skip_string(&mut self) -> Result<(), CodecError> {
        self.string_with(|_| {}).map(drop)
    }

    /// A string's chunks, their bytes handed to `chunk` in order; `false` for null.
    fn string_with(&mut self, mut chunk: impl FnMut(&'a [u8])) -> Result<bool, CodecError> {
        loop {
            let b = self.byte()?;
            let (units, last) = match b {
                b'N' => return Ok(false),
                0x00..=0x1f => (usize::from(b), true),
                0x30..=0x33 => (
                    (usize::from(b - 0x30) << 8) | usize::from(self.byte()?),
                    true,
                ),
                b'S' | b'R' => (self.be(2)? as usize & 0xffff, b == b'S'),
                byte => {
                    return Err(CodecError::Unexpected {
                        byte,
                        at: "where a Hessian2 string belongs",
                    })
                }
            };
            chunk(self.utf8_units(units)?);
            if last {
                return Ok(true);
            }
        }
    }

    /// The bytes of `units` UTF-16 units of UTF-8 text.
    fn utf8_units(&mut self, units: usize) -> Result<&'a [u8], CodecError> {
        let start = self.pos;
        // Names, versions and most values are ASCII: one unit a byte, checked at once.
        if let Some(run) = self.buf.get(start..start + units) {
            if run.is_ascii() {
                self.pos += units;
                return Ok(run);
            }
        }
        let mut left = units;
        while left > 0 {
            let b = self.peek()?;
            let (len, u) = match b {
                0x00..=0x7f => (1, 1),
                0xc0..=0xdf => (2, 1),
                0xe0..=0xef => (3, 1),
                _ => (4, 2),
            };
            self.take(len)?;
            left = left.saturating_sub(u);
        }
        Ok(&self.buf[start..self.pos])
    }

    /// A list's or map's type: a string, or a reference (an int) to an earlier one.
    fn skip_type(&mut self) -> Result<(), CodecError> {
        if is_string_start(self.peek()?) {
            self.skip_string()?;
        } else {
            self.int()?;
        }
        Ok(())
    }

    /// Skips one value of any type.
    fn skip(&mut self) -> Result<(), CodecError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(CodecError::TooDeep(MAX_DEPTH));
        }
        let result = self.skip_value();
        self.depth -= 1;
        result
    }

    fn skip_value(&mut self) -> Result<(), CodecError> {
        let b = self.peek()?;
        match b {
            0x00..=0x1f | 0x30..=0x33 | b'R' | b'S' => {
                self.skip_string()?;
            }
            0x80..=0xbf | 0xc0..=0xcf | 0xd0..=0xd7 | b'I' => {
                self.int()?;
            }
            _ => {
                self.pos += 1;
                match b {
                    b'N' | b'T' | b'F' | 0x5b | 0x5c => {}
                    0x20..=0x2f => {
                        self.take(usize::from(b - 0x20))?;
                    }
                    0x34..=0x37 => {
                        let n = (usize::from(b - 0x34) << 8) | usize::from(self.byte()?);
                        self.take(n)?;
                    }
                    b'A' | b'B' => {
                        let mut last = b == b'B';
                        loop {
                            let n = self.be(2)? as usize & 0xffff;
                            self.take(n)?;
                            if last {
                                break;
                            }
                            // Then the next chunk's marker.
                            let next = self.byte()?;
                            if !matches!(next, b'A' | b'B') {
                                return Err(CodecError::Unexpected {
                                    byte: next,
                                    at: "between Hessian2 binary chunks",
                                });
                            }
                            last = next == b'B';
                        }
                    }
                    0x38..=0x3f | 0xf0..=0xff => {
                        let extra = if b <= 0x3f { 2 } else { 1 };
                        self.take(extra)?;
                    }
                    0xd8..=0xef => {}
                    b'Y' | b'K' | 0x5f => {
                        self.take(4)?;
                    }
                    b'L' | b'D' | b'J' => {
                        self.take(8)?;
                    }
                    0x5d => {
                        self.take(1)?;
                    }
                    0x5e => {
                        self.take(2)?;
                    }
                    b'Q' => {
                        self.int()?;
                    }
                    b'C' => {
                        self.skip_string()?;
                        let fields = self.count()?;
                        for _ in 0..fields {
                            self.skip_string()?;
                        }
                        self.classes.push(fields);
                        // A definition is followed by a value (its first instance, mostly).
                        self.skip()?;
                    }
                    b'O' | 0x60..=0x6f => {
                        let class = if b == b'O' {
                            self.count()?
                        } else {
                            usize::from(b - 0x60)
                        };
                        let fields = *self.classes.get(class).ok_or(CodecError::BadNumber {
                            what: "Hessian2 class reference",
                        })?;
                        for _ in 0..fields {
                            self.skip()?;
                        }
                    }
                    b'H' | b'M' | b'U' | b'W' => {
                        if matches!(b, b'M' | b'U') {
                            self.skip_type()?;
                        }
                        while self.peek()? != b'Z' {
                            self.skip()?;
                        }
                        self.pos += 1;
                    }
                    b'V' | b'X' | 0x70..=0x7f => {
                        if matches!(b, b'V' | 0x70..=0x77) {
                            self.skip_type()?;
                        }
                        let n = match b {
                            0x70..=0x77 => usize::from(b - 0x70),
                            0x78..=0x7f => usize::from(b - 0x78),
                            _ => self.count()?,
                        };
                        for _ in 0..n {
                            self.skip()?;
                        }
                    }
                    byte => {
                        return Err(CodecError::Unexpected {
                            byte,
                            at: "as a Hessian2 value",
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Hessian2 request body: the five strings, `args` (already encoded), attachments.
    fn body(method: &str, types: &str, args: &[u8], attachments: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [
            "2.0.2",
            "org.apache.dubbo.samples.basic.api.DemoService",
            "0.0.0",
            method,
            types,
        ] {
            put_string(&mut b, s);
        }
        b.extend_from_slice(args);
        b.push(b'H');
        for (k, v) in attachments {
            put_string(&mut b, k);
            put_string(&mut b, v);
        }
        b.push(b'Z');
        b
    }

    fn message(flags: u8, id: u64, body: &[u8]) -> Vec<u8> {
        let mut m = MAGIC.to_vec();
        m.extend([flags, 0]);
        m.extend(id.to_be_bytes());
        m.extend((body.len() as u32).to_be_bytes());
        m.extend(body);
        m
    }

    /// Arguments of many Hessian2 types: a string, an int, a long, a double, a list, a map, an
    /// object with its class definition, a second instance of it, a reference, binary.
    fn rich_args() -> (String, Vec<u8>) {
        let mut a = Vec::new();
        put_string(&mut a, "wörld 😀");
        a.extend([0xc8, 0x30]); // int 48
        a.extend([0x59, 0, 0, 1, 0]); // long as int
        a.extend([0x5f, 0x3f, 0x80, 0, 0]); // float-sized double
        a.extend([0x7a, 0x91, 0x92]); // untyped list of 2
        a.extend([b'M', 0x03]);
        a.extend(b"Map"); // typed map
        a.extend([0x01, b'k', 0x90, b'Z']);
        a.extend([b'C', 0x04]);
        a.extend(b"User");
        a.extend([0x92, 0x02]);
        a.extend(b"id");
        a.extend([0x04]);
        a.extend(b"name");
        a.extend([0x60, 0x91, 0x01, b'a']); // instance of class 0
        a.extend([b'O', 0x90, 0x92, b'N']); // another, by 'O'
        a.extend([b'Q', 0x90]); // a reference
        a.extend([0x23, 1, 2, 3]); // binary of 3
        (
            "Ljava/lang/String;IJD[Ljava/lang/Object;Ljava/util/Map;Lcom/x/User;Lcom/x/User;Lcom/x/User;[B"
                .to_owned(),
            a,
        )
    }

    #[test]
    fn text_as_java_writes_it_reads_surrogate_pairs_and_all() {
        // "a😀" as Java's Hessian2Output writes it: the emoji as two 3-byte surrogates (CESU-8),
        // 3 UTF-16 units in all.
        let cesu = [0x03, b'a', 0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80];
        let mut args = cesu.to_vec();
        args.extend([0x91]); // int 1
        let mut b = body("sayHello", "Ljava/lang/String;I", &args, &[("user", "u1")]);
        // An attachment whose value is that text too.
        let z = b.len() - 1;
        b.splice(z..z, [0x04, b'n', b'i', b'c', b'k'].into_iter().chain(cesu));
        let inv = Invocation::read(&b).expect("reads");
        assert!(inv.attachments_read(), "past the CESU-8 argument");
        let values: Vec<_> = inv
            .attachments
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_deref()))
            .collect();
        assert_eq!(values, [("user", Some("u1")), ("nick", Some("a😀"))]);
        // A lone surrogate, or bytes that are no text at all, are not.
        assert_eq!(cesu8(&[0xed, 0xa0, 0xbd]), None);
        assert_eq!(cesu8(&[0xff]), None);
        assert_eq!(
            cesu8("plain wörld".as_bytes()).as_deref(),
            Some("plain wörld")
        );
    }

    #[test]
    fn invocations_are_read_past_arguments_of_every_type() {
        let (types, args) = rich_args();
        assert_eq!(argument_count(&types), 10);
        let b = body(
            "sayHello",
            &types,
            &args,
            &[("user", "u1"), ("token", "s3cret")],
        );
        let inv = Invocation::read(&b).expect("reads");
        assert_eq!(
            inv.service,
            "org.apache.dubbo.samples.basic.api.DemoService"
        );
        assert_eq!(
            (inv.version.as_str(), inv.method.as_str()),
            ("0.0.0", "sayHello")
        );
        let names: Vec<_> = inv
            .attachments
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_deref()))
            .collect();
        assert_eq!(names, [("user", Some("u1")), ("token", Some("s3cret"))]);
        // A start is enough for the strings.
        let cut = b.len() - args.len() / 2 - 40;
        let start = Invocation::read(&b[..cut]).expect("a start");
        assert_eq!(start.method, "sayHello");
        assert!(start.attachments.is_empty() && !start.attachments_read());
        assert!(inv.attachments_read());
    }

    #[test]
    fn attachments_are_redacted_in_a_message_that_stays_whole() {
        let b = body(
            "sayHello",
            "Ljava/lang/String;",
            &[0x05, b'w', b'o', b'r', b'l', b'd'],
            &[("user", "u1"), ("Token", "s3cret")],
        );
        let m = message(FLAG_REQUEST | FLAG_TWO_WAY | HESSIAN2, 9, &b);
        let inv = Invocation::read(&m[HEADER_LEN..]).expect("reads");
        let redact = |name: &str| name.eq_ignore_ascii_case("token");
        for (mask, want) in [
            (None, vec![("user", Some("u1"))]),
            (
                Some("***"),
                vec![("user", Some("u1")), ("Token", Some("***"))],
            ),
        ] {
            let out = inv.redacted(&m, redact, mask).expect("changed");
            let mut s = Scanner::new();
            assert_eq!(
                s.feed(&out),
                Ok(Some(out.len())),
                "the header's length fits the new body"
            );
            let again = Invocation::read(&out[HEADER_LEN..]).expect("reads");
            let got: Vec<_> = again
                .attachments
                .iter()
                .map(|a| (a.name.as_str(), a.value.as_deref()))
                .collect();
            assert_eq!(got, want);
            assert_eq!(again.method, "sayHello");
        }
        assert!(inv.redacted(&m, |_| false, None).is_none());
        assert!(inv.redactable(redact));

        // A value that is not a string (an int here; an object could define classes later values
        // refer to): not redactable, so not copied.
        let mut b = body("sayHello", "", &[], &[]);
        b.pop(); // the map's end
        put_string(&mut b, "token");
        b.push(0x91);
        put_string(&mut b, "none");
        b.push(b'N');
        b.push(b'Z');
        let inv = Invocation::read(&b).expect("reads");
        assert!(!inv.redactable(|n| n == "token"));
        assert!(inv.redactable(|n| n == "none"), "null is fine");
    }

    #[test]
    fn messages_are_delimited_in_any_pieces() {
        let b = body("sayHello", "", &[], &[]);
        let one = message(FLAG_REQUEST | FLAG_TWO_WAY | HESSIAN2, 1, &b);
        let heartbeat = message(FLAG_REQUEST | FLAG_TWO_WAY | FLAG_EVENT | HESSIAN2, 2, b"N");
        let stream = [one.clone(), heartbeat.clone()].concat();
        for step in 1..=stream.len() {
            let mut s = Scanner::new();
            let mut ends = Vec::new();
            let mut headers = Vec::new();
            let mut offset = 0;
            for piece in stream.chunks(step) {
                let mut rest = piece;
                let mut at = offset;
                while let Some(n) = s.feed(rest).expect("reads") {
                    at += n;
                    ends.push(at);
                    headers.push(s.header().expect("a header"));
                    rest = &rest[n..];
                }
                offset += piece.len();
            }
            assert_eq!(ends, [one.len(), stream.len()], "step {step}");
            assert!(headers[0].is_invocation() && headers[0].two_way);
            assert!(!headers[1].is_invocation(), "a heartbeat");
            assert_eq!(headers[1].id, 2);
        }
        assert!(
            Scanner::new().feed(&[0xca, 0xfe, 0, 0]).is_ok(),
            "not yet a header"
        );
        assert!(Scanner::new().feed(&[0xca; HEADER_LEN]).is_err());
    }

    #[test]
    fn responses_tell_values_from_exceptions_and_errors() {
        let header = |status, event| Header {
            request: false,
            two_way: false,
            event,
            serialization: HESSIAN2,
            status,
            id: 1,
            body_len: 0,
        };
        assert_eq!(
            Outcome::of(&header(OK, false), &[0x91, 0x01, b'x']),
            Outcome::Value
        );
        assert_eq!(Outcome::of(&header(OK, false), &[0x92]), Outcome::Value);
        assert_eq!(
            Outcome::of(&header(OK, false), &[0x90, b'N']),
            Outcome::Exception
        );
        assert_eq!(
            Outcome::of(&header(OK, false), &[0x93, b'N']),
            Outcome::Exception
        );
        assert_eq!(Outcome::of(&header(60, false), &[]), Outcome::Status(60));
        assert_eq!(Outcome::of(&header(OK, true), b"N"), Outcome::Event);
        let hb = Header::heartbeat_response(7);
        let parsed = Header::parse(hb[..HEADER_LEN].try_into().expect("16 bytes")).expect("parses");
        assert!(parsed.event && !parsed.request && parsed.id == 7);
    }

    /// Frames captured between PyPI's dubbo-ssl-python and the test provider
    /// (tests/interop/dubbo/README.md).
    fn sample(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../tests/interop/dubbo/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn frames_of_a_real_consumer_and_provider_are_read() {
        let request = sample("sample_request.bin");
        let mut s = Scanner::new();
        assert_eq!(s.feed(&request), Ok(Some(request.len())));
        let header = s.header().expect("a header");
        assert!(header.is_invocation() && header.two_way);
        assert_eq!((header.id, header.serialization), (2, HESSIAN2));
        let inv = Invocation::read(&request[HEADER_LEN..]).expect("reads");
        assert_eq!(
            inv.service,
            "org.apache.dubbo.samples.basic.api.DemoService"
        );
        assert_eq!(
            (inv.version.as_str(), inv.method.as_str()),
            ("1.0.0", "sayHello")
        );
        assert!(inv.attachments_read());
        let user = inv.attachments.iter().find(|a| a.name == "user");
        assert_eq!(user.and_then(|a| a.value.as_deref()), Some("u1"));
        let group = inv.attachments.iter().find(|a| a.name == "group");
        assert_eq!(group.map(|a| a.value.as_deref()), Some(None), "null");
        let out = inv
            .redacted(&request, |n| n == "user", None)
            .expect("redacted");
        let again = Invocation::read(&out[HEADER_LEN..]).expect("reads");
        assert!(again.attachments.iter().all(|a| a.name != "user"));
        assert_eq!(again.attachments.len(), inv.attachments.len() - 1);

        for (name, want) in [
            ("sample_response.bin", Outcome::Value),
            ("sample_exception.bin", Outcome::Exception),
        ] {
            let frame = sample(name);
            let mut s = Scanner::new();
            assert_eq!(s.feed(&frame), Ok(Some(frame.len())), "{name}");
            let header = s.header().expect("a header");
            assert!(!header.request);
            let first = [s.first_body_byte().expect("a body")];
            assert_eq!(Outcome::of(&header, &first), want, "{name}");
        }
    }

    #[test]
    fn long_strings_are_written_in_chunks_and_read_back() {
        for len in [0, 31, 32, 1023, 1024, 40_000, 70_000] {
            let s = "é".repeat(len);
            let mut b = Vec::new();
            put_string(&mut b, &s);
            assert_eq!(Reader::new(&b).string().expect("reads"), Some(s), "{len}");
        }
    }
}

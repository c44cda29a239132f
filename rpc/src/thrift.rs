//! Thrift: framed and unframed (buffered) transports; the binary protocol (strict, and the old
//! unversioned form) and the compact protocol.
//!
//! A [`Scanner`] walks each message as its bytes come, in any pieces: the transport's frame (a
//! 4-byte length), the message head (type, name, sequence id) and the struct that follows, field
//! by field, nested structs, lists, sets and maps included. It keeps only its place (a stack of
//! open structs and containers) and the head it read, never the message, so it can delimit an
//! unframed message of any size, and it checks that a framed message's struct ends exactly with
//! its frame. [`Head`] is what mirroring needs of a message: which method, which call (the
//! sequence id a gateway rewrites), and for a reply whether it carries the result (field 0) or a
//! declared exception (field 1 and up).
//!
//! [`Codec::detect`] tells the transport and protocol a client speaks from its first bytes.

use crate::CodecError;

/// Deepest nesting of structs and containers followed.
pub const MAX_DEPTH: usize = 64;
/// Longest string or binary, and largest container, accepted (a frame or count beyond is taken
/// for a broken stream).
pub const MAX_LEN: u64 = 256 * 1024 * 1024;
/// Bytes of a method name kept (longer names are cut; they are names, not data).
pub const MAX_NAME: usize = 256;

/// How a connection carries its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Each message behind a 4-byte big-endian length (`TFramedTransport`).
    Framed,
    /// Messages back to back (`TBufferedTransport`, `TSocket`).
    Unframed,
}

/// How a message's values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `TBinaryProtocol`: fixed-width big-endian numbers (strict heads, or the old unversioned
    /// ones).
    Binary,
    /// `TCompactProtocol`: varints, zigzag, field-id deltas.
    Compact,
}

/// A transport and a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Codec {
    /// How messages are delimited.
    pub transport: Transport,
    /// How values are written.
    pub protocol: Protocol,
}

/// `0x80 0x01`: a strict binary head's first bytes (version 1).
const BINARY_VERSION: [u8; 2] = [0x80, 0x01];
/// A compact head's first byte.
const COMPACT_ID: u8 = 0x82;

impl Codec {
    /// The codec a stream starting with `start` is in; `Ok(None)` until enough bytes came to
    /// tell (at most 8).
    pub fn detect(start: &[u8]) -> Result<Option<Codec>, CodecError> {
        let codec = |transport, protocol| {
            Ok(Some(Codec {
                transport,
                protocol,
            }))
        };
        match start {
            [] | [_] => Ok(None),
            [0x80, 0x01, ..] => codec(Transport::Unframed, Protocol::Binary),
            [COMPACT_ID, b, ..] if b & 0x1f == 1 => codec(Transport::Unframed, Protocol::Compact),
            [_, _, _, _, 0x80, 0x01, ..] => codec(Transport::Framed, Protocol::Binary),
            [_, _, _, _, COMPACT_ID, ..] => codec(Transport::Framed, Protocol::Compact),
            s if s.len() < 8 => Ok(None),
            // The old unversioned binary head: a name length, then the name. Framed, the frame's
            // length comes first and the name's length (smaller) after it.
            s => {
                let first = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
                let second = u32::from_be_bytes([s[4], s[5], s[6], s[7]]);
                if first == 0 || u64::from(first) > MAX_LEN {
                    Err(CodecError::Unexpected {
                        byte: s[0],
                        at: "where a Thrift message begins",
                    })
                } else if second > 0 && second < first && second <= MAX_NAME as u32 {
                    codec(Transport::Framed, Protocol::Binary)
                } else {
                    codec(Transport::Unframed, Protocol::Binary)
                }
            }
        }
    }

    /// Its code in an envelope's flags: bit 0 framed, bit 1 compact.
    pub fn code(self) -> u8 {
        u8::from(self.transport == Transport::Framed)
            | (u8::from(self.protocol == Protocol::Compact) << 1)
    }

    /// The codec of `code` (see [`Codec::code`]).
    pub fn from_code(code: u8) -> Self {
        Codec {
            transport: if code & 1 != 0 {
                Transport::Framed
            } else {
                Transport::Unframed
            },
            protocol: if code & 2 != 0 {
                Protocol::Compact
            } else {
                Protocol::Binary
            },
        }
    }
}

/// A message's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// A call that expects a reply.
    Call,
    /// A reply: field 0 the result, a higher field a declared exception.
    Reply,
    /// A `TApplicationException` (unknown method, internal error...).
    Exception,
    /// A call that expects none.
    Oneway,
}

impl MessageType {
    fn of(code: u8) -> Result<Self, CodecError> {
        Ok(match code {
            1 => MessageType::Call,
            2 => MessageType::Reply,
            3 => MessageType::Exception,
            4 => MessageType::Oneway,
            byte => {
                return Err(CodecError::Unexpected {
                    byte,
                    at: "as a message type",
                })
            }
        })
    }
}

/// What a scanner read of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its type.
    pub kind: MessageType,
    /// The method's name as sent (`Service:method` through a multiplexed protocol), at most
    /// [`MAX_NAME`] bytes.
    pub name: Vec<u8>,
    /// The sequence id the caller gave it.
    pub seqid: i32,
    /// Where the sequence id is in the message (from its first byte, frame included) and how many
    /// bytes it takes there (4, or a compact varint's 1 to 5), so that it can be rewritten.
    pub seqid_at: (usize, usize),
    /// The id of the first field of its struct; `None` when the struct is empty (a `void`
    /// method's result).
    pub first_field: Option<i16>,
}

impl Head {
    fn empty() -> Self {
        Head {
            kind: MessageType::Call,
            name: Vec::new(),
            seqid: 0,
            seqid_at: (0, 0),
            first_field: None,
        }
    }

    /// A reply that is not a result: a declared exception, or a `TApplicationException`.
    pub fn is_exception(&self) -> bool {
        match self.kind {
            MessageType::Exception => true,
            MessageType::Reply => self.first_field.is_some_and(|id| id != 0),
            MessageType::Call | MessageType::Oneway => false,
        }
    }

    /// The service (before `:`, as `TMultiplexedProtocol` names it) and the method.
    pub fn service_and_method(&self) -> (&[u8], &[u8]) {
        match self.name.iter().position(|b| *b == b':') {
            Some(at) => (&self.name[..at], &self.name[at + 1..]),
            None => (&[], &self.name),
        }
    }
}

/// Binary protocol type ids (the compact ones are mapped onto them).
mod ty {
    pub const BOOL: u8 = 2;
    pub const BYTE: u8 = 3;
    pub const DOUBLE: u8 = 4;
    pub const I16: u8 = 6;
    pub const I32: u8 = 8;
    pub const I64: u8 = 10;
    pub const STRING: u8 = 11;
    pub const STRUCT: u8 = 12;
    pub const MAP: u8 = 13;
    pub const SET: u8 = 14;
    pub const LIST: u8 = 15;
    pub const UUID: u8 = 16;
}

/// A compact type id as the binary one (`None`: not a type).
fn from_compact(t: u8) -> Option<u8> {
    Some(match t {
        1 | 2 => ty::BOOL,
        3 => ty::BYTE,
        4 => ty::I16,
        5 => ty::I32,
        6 => ty::I64,
        7 => ty::DOUBLE,
        8 => ty::STRING,
        9 => ty::LIST,
        10 => ty::SET,
        11 => ty::MAP,
        12 => ty::STRUCT,
        13 => ty::UUID,
        _ => return None,
    })
}

/// What the bytes being gathered are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    FrameLength,
    /// Binary: a strict head's version and type, or an old head's name length.
    BinaryHead,
    /// A name's length (binary strict: 4 bytes; compact: a varint).
    NameLength,
    /// Binary old head: the type byte after the name.
    OldType,
    /// The sequence id.
    SeqId,
    /// Compact head: 0x82, then the version and type byte.
    CompactHead,
    /// A value passed over.
    Value,
    /// A string's or binary's length.
    StringLength,
    /// A struct field's header (binary: the type byte; compact: delta and type).
    FieldHeader,
    /// A binary field's id, for a field of this type.
    FieldId(u8),
    /// A compact field's id (zigzag varint), for a field of this compact type.
    CompactFieldId(u8),
    /// Binary list or set header: element type and size.
    ListHeader,
    /// Binary map header: key type, value type, size.
    MapHeader,
    /// Compact list or set header byte.
    CompactListHeader,
    /// Compact list or set size (a varint), for elements of this type.
    CompactListSize(u8),
    /// Compact map size.
    CompactMapSize,
    /// Compact map key and value types, for a map of this many entries.
    CompactMapTypes(u64),
}

/// What the scanner gathers next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// This many bytes (at most 8), for `Use`.
    Fixed(u8, Use),
    /// A varint, for `Use`.
    Varint(Use),
    /// Bytes passed over (a string's contents, a UUID).
    Skip(u64),
    /// The method name's bytes, kept.
    Name(u64),
    /// The next thing the innermost open struct or container says.
    Next,
}

/// An open struct or container.
#[derive(Debug, Clone, Copy)]
enum Open {
    /// A struct's fields; compact field ids are deltas from `last`. `top`: the message's own.
    Fields { last: i16, top: bool },
    /// A container's elements left (a map's keys and values each count), of key type `k` and
    /// (maps) value type `v`.
    Elements {
        left: u64,
        k: u8,
        v: Option<u8>,
        key_next: bool,
    },
}

/// Where a stream's current message is; see the module docs.
#[derive(Debug, Clone)]
pub struct Scanner {
    codec: Codec,
    want: Want,
    open: Vec<Open>,
    /// Bytes gathered for a `Fixed` or `Varint` want.
    gathered: [u8; 10],
    have: usize,
    /// Bytes of the message read so far (its frame included).
    offset: usize,
    /// Framed: where the frame ends, from the message's first byte.
    frame_end: Option<usize>,
    /// A binary head without a version (the type follows the name).
    old_head: bool,
    /// Whether the message under way has begun.
    started: bool,
    /// The head of the message under way, as far as it was read.
    current: Head,
    /// The head of the last message finished.
    head: Head,
}

impl Scanner {
    /// A scanner at the start of a stream in `codec`.
    pub fn new(codec: Codec) -> Self {
        let mut s = Scanner {
            codec,
            want: Want::Next,
            open: Vec::with_capacity(8),
            gathered: [0; 10],
            have: 0,
            offset: 0,
            frame_end: None,
            old_head: false,
            started: false,
            current: Head::empty(),
            head: Head::empty(),
        };
        s.begin();
        s
    }

    /// The codec it reads.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Whether the message under way has begun (some of its bytes were fed).
    pub fn in_message(&self) -> bool {
        self.started
    }

    /// The head of the last message finished.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The head of the message under way, as far as it was read.
    pub fn current(&self) -> &Head {
        &self.current
    }

    fn begin(&mut self) {
        self.open.clear();
        self.offset = 0;
        self.frame_end = None;
        self.old_head = false;
        self.started = false;
        self.have = 0;
        self.current = Head::empty();
        self.want = match self.codec.transport {
            Transport::Framed => Want::Fixed(4, Use::FrameLength),
            Transport::Unframed => self.head_want(),
        };
    }

    fn head_want(&self) -> Want {
        match self.codec.protocol {
            Protocol::Binary => Want::Fixed(4, Use::BinaryHead),
            Protocol::Compact => Want::Fixed(2, Use::CompactHead),
        }
    }

    /// Reads `chunk`, the next bytes of the stream, with [`crate::redis::Scanner::feed`]'s
    /// contract: `Ok(Some(n))` when the message under way ended after `chunk[..n]`.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Option<usize>, CodecError> {
        let mut i = 0;
        loop {
            if self.want == Want::Next {
                if self.step()? {
                    return self.finished().map(|()| Some(i));
                }
                continue;
            }
            if i == chunk.len() {
                return Ok(None);
            }
            self.started = true;
            match self.want {
                Want::Next => {}
                Want::Skip(left) | Want::Name(left) => {
                    let take = left.min((chunk.len() - i) as u64) as usize;
                    let naming = matches!(self.want, Want::Name(_));
                    if naming {
                        let room = MAX_NAME.saturating_sub(self.current.name.len());
                        let kept = take.min(room);
                        self.current.name.extend_from_slice(&chunk[i..i + kept]);
                    }
                    i += take;
                    self.offset += take;
                    let left = left - take as u64;
                    self.want = match (left, naming) {
                        (0, true) => self.named()?,
                        (0, false) => Want::Next,
                        (left, true) => Want::Name(left),
                        (left, false) => Want::Skip(left),
                    };
                }
                Want::Fixed(n, what) => {
                    let n = usize::from(n);
                    let take = (n - self.have).min(chunk.len() - i);
                    self.gathered[self.have..self.have + take].copy_from_slice(&chunk[i..i + take]);
                    self.have += take;
                    i += take;
                    self.offset += take;
                    if self.have == n {
                        self.have = 0;
                        self.want = self.fixed(what)?;
                    }
                }
                Want::Varint(what) => {
                    let byte = chunk[i];
                    i += 1;
                    self.offset += 1;
                    if self.have == self.gathered.len() {
                        return Err(CodecError::BadNumber { what: "varint" });
                    }
                    self.gathered[self.have] = byte;
                    self.have += 1;
                    if byte & 0x80 == 0 {
                        let mut value = 0u64;
                        for (k, b) in self.gathered[..self.have].iter().enumerate() {
                            value |= u64::from(b & 0x7f) << (7 * k);
                        }
                        let len = self.have;
                        self.have = 0;
                        self.want = self.varint(what, value, len)?;
                    }
                }
            }
            if let Some(end) = self.frame_end {
                if self.offset > end {
                    return Err(CodecError::BadNumber {
                        what: "frame length (the message runs past it)",
                    });
                }
            }
        }
    }

    fn finished(&mut self) -> Result<(), CodecError> {
        if let Some(end) = self.frame_end {
            if end != self.offset {
                return Err(CodecError::BadNumber {
                    what: "frame length (the message ends before it)",
                });
            }
        }
        self.head = std::mem::replace(&mut self.current, Head::empty());
        self.begin();
        Ok(())
    }

    /// After the name: the sequence id (binary strict), the type (binary old), or the struct
    /// (compact, whose sequence id came before the name).
    fn named(&mut self) -> Result<Want, CodecError> {
        Ok(match self.codec.protocol {
            Protocol::Binary if self.old_head => Want::Fixed(1, Use::OldType),
            Protocol::Binary => Want::Fixed(4, Use::SeqId),
            Protocol::Compact => {
                self.open_struct(true)?;
                Want::Next
            }
        })
    }

    /// The name's bytes (`len` of them) come next.
    fn name(&mut self, len: u64) -> Result<Want, CodecError> {
        match Self::length(len)? {
            0 => self.named(),
            len => Ok(Want::Name(len)),
        }
    }

    fn fixed(&mut self, what: Use) -> Result<Want, CodecError> {
        let g = self.gathered;
        let be32 = u32::from_be_bytes([g[0], g[1], g[2], g[3]]);
        Ok(match what {
            Use::FrameLength => {
                let len = u64::from(be32);
                if len == 0 || len > MAX_LEN {
                    return Err(CodecError::BadNumber {
                        what: "frame length",
                    });
                }
                self.frame_end = Some(4 + len as usize);
                self.head_want()
            }
            Use::BinaryHead if g[0] & 0x80 != 0 => {
                if g[0..2] != BINARY_VERSION {
                    return Err(CodecError::Unexpected {
                        byte: g[1],
                        at: "as a binary protocol version",
                    });
                }
                self.current.kind = MessageType::of(g[3])?;
                Want::Fixed(4, Use::NameLength)
            }
            Use::BinaryHead => {
                // The old form: this was the name's length.
                self.old_head = true;
                self.name(u64::from(be32))?
            }
            Use::NameLength => self.name(u64::from(be32))?,
            Use::OldType => {
                self.current.kind = MessageType::of(g[0])?;
                Want::Fixed(4, Use::SeqId)
            }
            Use::SeqId => {
                self.current.seqid = be32 as i32;
                self.current.seqid_at = (self.offset - 4, 4);
                self.open_struct(true)?;
                Want::Next
            }
            Use::CompactHead => {
                if g[0] != COMPACT_ID || g[1] & 0x1f != 1 {
                    return Err(CodecError::Unexpected {
                        byte: g[0],
                        at: "as a compact protocol head",
                    });
                }
                self.current.kind = MessageType::of(g[1] >> 5)?;
                Want::Varint(Use::SeqId)
            }
            Use::Value => Want::Next,
            Use::StringLength => Want::Skip(Self::length(u64::from(be32))?),
            Use::FieldHeader => match (self.codec.protocol, g[0]) {
                (_, 0) => {
                    self.open.pop();
                    Want::Next
                }
                (Protocol::Binary, t) => Want::Fixed(2, Use::FieldId(t)),
                (Protocol::Compact, b) => {
                    let (delta, t) = (b >> 4, b & 0x0f);
                    if delta == 0 {
                        Want::Varint(Use::CompactFieldId(t))
                    } else {
                        let id = self.last_field().wrapping_add(i16::from(delta));
                        self.field(id, t)?
                    }
                }
            },
            Use::FieldId(t) => self.field(i16::from_be_bytes([g[0], g[1]]), t)?,
            Use::ListHeader => {
                let size = u32::from_be_bytes([g[1], g[2], g[3], g[4]]);
                self.open_elements(u64::from(size), g[0], None)?;
                Want::Next
            }
            Use::MapHeader => {
                let size = u32::from_be_bytes([g[2], g[3], g[4], g[5]]);
                self.open_elements(u64::from(size), g[0], Some(g[1]))?;
                Want::Next
            }
            Use::CompactListHeader => {
                let t = Self::compact_type(g[0] & 0x0f)?;
                match g[0] >> 4 {
                    15 => Want::Varint(Use::CompactListSize(t)),
                    n => {
                        self.open_elements(u64::from(n), t, None)?;
                        Want::Next
                    }
                }
            }
            Use::CompactMapTypes(size) => {
                let k = Self::compact_type(g[0] >> 4)?;
                let v = Self::compact_type(g[0] & 0x0f)?;
                self.open_elements(size, k, Some(v))?;
                Want::Next
            }
            Use::CompactFieldId(_) | Use::CompactListSize(_) | Use::CompactMapSize => {
                return Err(CodecError::BadNumber { what: "varint" })
            }
        })
    }

    fn varint(&mut self, what: Use, value: u64, len: usize) -> Result<Want, CodecError> {
        let zigzag = |v: u64| ((v >> 1) as i64) ^ -((v & 1) as i64);
        Ok(match what {
            Use::SeqId => {
                // The compact head's sequence id is a plain varint (not zigzag).
                self.current.seqid = value as i32;
                self.current.seqid_at = (self.offset - len, len);
                Want::Varint(Use::NameLength)
            }
            Use::NameLength => self.name(value)?,
            Use::CompactFieldId(t) => {
                let id = i16::try_from(zigzag(value))
                    .map_err(|_| CodecError::BadNumber { what: "field id" })?;
                self.field(id, t)?
            }
            Use::CompactListSize(t) => {
                self.open_elements(value, t, None)?;
                Want::Next
            }
            Use::CompactMapSize if value == 0 => Want::Next,
            Use::CompactMapSize => Want::Fixed(1, Use::CompactMapTypes(Self::length(value)?)),
            Use::StringLength => Want::Skip(Self::length(value)?),
            Use::Value => Want::Next,
            _ => return Err(CodecError::BadNumber { what: "varint" }),
        })
    }

    fn length(n: u64) -> Result<u64, CodecError> {
        if n > MAX_LEN {
            return Err(CodecError::BadNumber { what: "length" });
        }
        Ok(n)
    }

    fn compact_type(t: u8) -> Result<u8, CodecError> {
        from_compact(t).ok_or(CodecError::Unexpected {
            byte: t,
            at: "as a compact type",
        })
    }

    fn last_field(&self) -> i16 {
        match self.open.last() {
            Some(Open::Fields { last, .. }) => *last,
            _ => 0,
        }
    }

    fn open_struct(&mut self, top: bool) -> Result<(), CodecError> {
        if self.open.len() >= MAX_DEPTH {
            return Err(CodecError::TooDeep(MAX_DEPTH));
        }
        self.open.push(Open::Fields { last: 0, top });
        Ok(())
    }

    fn open_elements(&mut self, size: u64, k: u8, v: Option<u8>) -> Result<(), CodecError> {
        let size = Self::length(size)?;
        if self.open.len() >= MAX_DEPTH {
            return Err(CodecError::TooDeep(MAX_DEPTH));
        }
        self.open.push(Open::Elements {
            left: if v.is_some() { size * 2 } else { size },
            k,
            v,
            key_next: true,
        });
        Ok(())
    }

    /// A field with `id` of wire type `t` (binary, or compact): its value comes next.
    fn field(&mut self, id: i16, t: u8) -> Result<Want, CodecError> {
        if let Some(Open::Fields { last, top }) = self.open.last_mut() {
            *last = id;
            if *top && self.current.first_field.is_none() {
                self.current.first_field = Some(id);
            }
        }
        match self.codec.protocol {
            Protocol::Binary => self.value(t),
            // A compact bool field carries its value in its type.
            Protocol::Compact if t == 1 || t == 2 => Ok(Want::Next),
            Protocol::Compact => self.value(Self::compact_type(t)?),
        }
    }

    /// A value of (binary) type `t` comes next.
    fn value(&mut self, t: u8) -> Result<Want, CodecError> {
        let compact = self.codec.protocol == Protocol::Compact;
        Ok(match t {
            ty::BOOL | ty::BYTE => Want::Fixed(1, Use::Value),
            ty::DOUBLE => Want::Fixed(8, Use::Value),
            ty::UUID => Want::Skip(16),
            ty::I16 | ty::I32 | ty::I64 if compact => Want::Varint(Use::Value),
            ty::I16 => Want::Fixed(2, Use::Value),
            ty::I32 => Want::Fixed(4, Use::Value),
            ty::I64 => Want::Fixed(8, Use::Value),
            ty::STRING if compact => Want::Varint(Use::StringLength),
            ty::STRING => Want::Fixed(4, Use::StringLength),
            ty::STRUCT => {
                self.open_struct(false)?;
                Want::Next
            }
            ty::LIST | ty::SET if compact => Want::Fixed(1, Use::CompactListHeader),
            ty::LIST | ty::SET => Want::Fixed(5, Use::ListHeader),
            ty::MAP if compact => Want::Varint(Use::CompactMapSize),
            ty::MAP => Want::Fixed(6, Use::MapHeader),
            byte => {
                return Err(CodecError::Unexpected {
                    byte,
                    at: "as a value type",
                })
            }
        })
    }

    /// Sets what comes next from the innermost open struct or container; `true` when the
    /// message's struct is closed (the message is over).
    fn step(&mut self) -> Result<bool, CodecError> {
        let want = match self.open.last_mut() {
            None => return Ok(true),
            Some(Open::Fields { .. }) => Want::Fixed(1, Use::FieldHeader),
            Some(Open::Elements { left: 0, .. }) => {
                self.open.pop();
                Want::Next
            }
            Some(Open::Elements {
                left,
                k,
                v,
                key_next,
            }) => {
                *left -= 1;
                let t = match v {
                    Some(v) if !*key_next => *v,
                    _ => *k,
                };
                if v.is_some() {
                    *key_next = !*key_next;
                }
                // In containers, compact bools take a byte each, like binary ones.
                self.value(t)?
            }
        };
        self.want = want;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary strict: `put(1: string key, 2: map<string,list<i32>> m, 3: set<bool> s,
    /// 4: struct {1: double d, 2: uuid u})` as a call.
    fn binary_call(seqid: i32) -> Vec<u8> {
        let mut m = vec![0x80, 0x01, 0x00, 0x01];
        m.extend(3u32.to_be_bytes());
        m.extend(b"put");
        m.extend(seqid.to_be_bytes());
        m.extend([ty::STRING, 0, 1]);
        m.extend(2u32.to_be_bytes());
        m.extend(b"k1");
        m.extend([ty::MAP, 0, 2, ty::STRING, ty::LIST]);
        m.extend(1u32.to_be_bytes());
        m.extend(1u32.to_be_bytes());
        m.extend(b"a");
        m.extend([ty::I32]);
        m.extend(2u32.to_be_bytes());
        m.extend(7u32.to_be_bytes());
        m.extend(8u32.to_be_bytes());
        m.extend([ty::SET, 0, 3, ty::BOOL]);
        m.extend(2u32.to_be_bytes());
        m.extend([1, 0]);
        m.extend([ty::STRUCT, 0, 4, ty::DOUBLE, 0, 1]);
        m.extend(1.5f64.to_be_bytes());
        m.extend([ty::UUID, 0, 2]);
        m.extend([9u8; 16]);
        m.extend([0, 0]); // inner stop, outer stop
        m
    }

    /// Compact: a reply of `get` raising declared exception 1 (a struct with a string), after a
    /// bool field, seqid 300 (a two-byte varint).
    fn compact_exception_reply() -> Vec<u8> {
        let mut m = vec![COMPACT_ID, (2 << 5) | 1, 0xac, 0x02, 3];
        m.extend(b"get");
        m.extend([0x1c]); // field 1 (delta 1), struct
        m.extend([0x18, 1, b'k']); // field 1, binary of 1 byte
        m.extend([0x11]); // field 2, bool true
        m.extend([0x19, 0x25]); // field 3, list of 2 i32
        m.extend([0x04, 0x06]);
        m.extend([0x1b, 0x00]); // field 4: empty map
        m.extend([0x1b, 0x01, 0x85]); // field 5: map<binary,i32> of 1 entry
        m.extend([0x01, b'z', 0x02]); // "z" => 1
        m.extend([0x00]); // inner stop
        m.extend([0x00]); // outer stop
        m
    }

    fn framed(m: &[u8]) -> Vec<u8> {
        let mut f = (m.len() as u32).to_be_bytes().to_vec();
        f.extend(m);
        f
    }

    fn ends(codec: Codec, stream: &[u8], step: usize) -> Result<Vec<(usize, Head)>, CodecError> {
        let mut s = Scanner::new(codec);
        let mut out = Vec::new();
        let mut offset = 0;
        for piece in stream.chunks(step) {
            let mut rest = piece;
            let mut at = offset;
            while let Some(n) = s.feed(rest)? {
                at += n;
                out.push((at, s.head().clone()));
                rest = &rest[n..];
            }
            offset += piece.len();
        }
        Ok(out)
    }

    #[test]
    fn binary_messages_are_walked_in_any_pieces_framed_or_not() {
        let call = binary_call(7);
        for (transport, message) in [
            (Transport::Unframed, call.clone()),
            (Transport::Framed, framed(&call)),
        ] {
            let codec = Codec {
                transport,
                protocol: Protocol::Binary,
            };
            let stream = [message.clone(), message.clone()].concat();
            for step in 1..=stream.len() {
                let got = ends(codec, &stream, step).expect("walks");
                assert_eq!(got.len(), 2, "{transport:?} step {step}");
                assert_eq!(got[0].0, message.len());
                assert_eq!(got[1].0, stream.len());
                let head = &got[1].1;
                assert_eq!(head.kind, MessageType::Call);
                assert_eq!(head.name, b"put");
                assert_eq!(head.seqid, 7);
                assert_eq!(head.first_field, Some(1));
                let (at, len) = head.seqid_at;
                assert_eq!(&message[at..at + len], &7i32.to_be_bytes());
            }
            assert_eq!(Codec::detect(&stream), Ok(Some(codec)));
        }
    }

    #[test]
    fn compact_messages_and_their_exceptions_are_read() {
        let reply = compact_exception_reply();
        for transport in [Transport::Unframed, Transport::Framed] {
            let codec = Codec {
                transport,
                protocol: Protocol::Compact,
            };
            let message = match transport {
                Transport::Framed => framed(&reply),
                Transport::Unframed => reply.clone(),
            };
            for step in [1, 2, 3, message.len()] {
                let got = ends(codec, &message, step).expect("walks");
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].0, message.len());
                let head = &got[0].1;
                assert_eq!((head.kind, head.seqid), (MessageType::Reply, 300));
                assert_eq!(head.first_field, Some(1));
                assert!(head.is_exception());
                let (at, len) = head.seqid_at;
                assert_eq!(&message[at..at + len], &[0xac, 0x02]);
            }
            assert_eq!(Codec::detect(&message), Ok(Some(codec)));
        }
    }

    #[test]
    fn old_binary_heads_and_multiplexed_names_are_read() {
        let mut m = 11u32.to_be_bytes().to_vec();
        m.extend(b"Store:check");
        m.push(4); // oneway
        m.extend(5i32.to_be_bytes());
        m.push(0); // empty struct
        let codec = Codec::detect(&m).expect("detects").expect("enough");
        assert_eq!(codec.protocol, Protocol::Binary);
        assert_eq!(codec.transport, Transport::Unframed);
        let got = ends(codec, &m, 1).expect("walks");
        let head = &got[0].1;
        assert_eq!(head.kind, MessageType::Oneway);
        assert_eq!(head.service_and_method(), (&b"Store"[..], &b"check"[..]));
        assert_eq!(head.first_field, None);
        let framed_old = framed(&m);
        let codec = Codec::detect(&framed_old)
            .expect("detects")
            .expect("enough");
        assert_eq!(codec.transport, Transport::Framed);
        assert_eq!(ends(codec, &framed_old, 3).expect("walks").len(), 1);
    }

    #[test]
    fn a_frame_that_does_not_hold_its_message_is_an_error() {
        let call = binary_call(1);
        let mut short = framed(&call);
        short[3] -= 1;
        let codec = Codec {
            transport: Transport::Framed,
            protocol: Protocol::Binary,
        };
        assert!(Scanner::new(codec).feed(&short).is_err());
        let mut long = framed(&call);
        long[3] += 1;
        long.push(0);
        assert!(Scanner::new(codec).feed(&long).is_err());
        let binary = Codec {
            transport: Transport::Unframed,
            protocol: Protocol::Binary,
        };
        let mut bad_type = binary_call(1);
        bad_type[15] = 99;
        assert!(Scanner::new(binary).feed(&bad_type).is_err());
        let mut deep = vec![0x80, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        for _ in 0..=MAX_DEPTH {
            deep.extend([ty::STRUCT, 0, 1]);
        }
        assert_eq!(
            Scanner::new(binary).feed(&deep),
            Err(CodecError::TooDeep(MAX_DEPTH))
        );
    }

    #[test]
    fn codec_codes_round_trip() {
        for transport in [Transport::Framed, Transport::Unframed] {
            for protocol in [Protocol::Binary, Protocol::Compact] {
                let c = Codec {
                    transport,
                    protocol,
                };
                assert_eq!(Codec::from_code(c.code()), c);
            }
        }
        assert_eq!(Codec::detect(&[0x80]), Ok(None));
        assert!(Codec::detect(&[0, 0, 0, 0, 1, 2, 3, 4]).is_err());
    }
}

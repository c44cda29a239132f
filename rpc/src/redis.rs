//! Redis: RESP2 and RESP3, as clients send commands and servers answer them.
//!
//! A [`Scanner`] finds where each message ends, fed the stream in any pieces: a client's command
//! (an array of bulk strings, or an inline command line), or a server's reply (any RESP2 or
//! RESP3 value, nested aggregates, attributes and nulls included). It keeps only its place (a
//! few numbers per open aggregate), never the bytes, so a 512 MiB value is delimited as cheaply
//! as a `PING`. [`Command`] then reads a whole command's arguments in place, and [`Session`]
//! follows the state a connection carries between commands: its database (`SELECT`), an open
//! transaction (`MULTI`), subscriptions.
//!
//! What can be replayed alone on a shadow's shared connection is a command that depends on no
//! state of its connection: [`Class`] sorts commands by the command table's flags (writes) and by
//! what would break a shared connection or leak a secret (`AUTH`, `HELLO`, transactions, pub/sub,
//! replication, admin: [`Class::Never`]).

use crate::CodecError;

/// Longest inline command line (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Longest bulk string (Redis's default `proto-max-bulk-len`).
pub const MAX_BULK: u64 = 512 * 1024 * 1024;
/// Deepest nesting of aggregates followed in a reply.
pub const MAX_DEPTH: usize = 32;
/// Most digits in a length or count.
const MAX_DIGITS: u8 = 19;

/// Which side of a connection a scanner reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// What a client sends: commands (arrays of bulk strings, or inline lines).
    Client,
    /// What a server sends: replies, any RESP2 or RESP3 value.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a value's type byte.
    Type,
    /// Reading the number of a header line of type `kind` (`*`, `$`, `%`...).
    Number(u8),
    /// Skipping a line to its end (simple strings, errors, integers, doubles...).
    Line,
    /// Reading an inline command line.
    Inline,
    /// Skipping a bulk payload and its CRLF: bytes left.
    Bulk(u64),
}

/// Where a stream's current message is; see the module docs.
#[derive(Debug, Clone)]
pub struct Scanner {
    side: Side,
    state: State,
    /// Elements left in each open aggregate, innermost last.
    open: Vec<u64>,
    /// The header line's number so far.
    value: u64,
    digits: u8,
    negative: bool,
    /// Bytes of the inline line so far.
    line: usize,
    /// Whether the current message has begun.
    started: bool,
    /// The current (or last finished) message is an error reply (`-` or `!` at its top).
    error: bool,
}

impl Scanner {
    /// A scanner at the start of a stream read from `side`.
    pub fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Type,
            open: Vec::with_capacity(4),
            value: 0,
            digits: 0,
            negative: false,
            line: 0,
            started: false,
            error: false,
        }
    }

    /// Whether the message under way has begun (some of its bytes were fed).
    pub fn in_message(&self) -> bool {
        self.started
    }

    /// Whether the last message finished was an error reply (RESP2 `-`, RESP3 `!`).
    pub fn was_error(&self) -> bool {
        self.error
    }

    /// Reads `chunk`, the next bytes of the stream. `Ok(Some(n))`: the message under way ended
    /// after `chunk[..n]` (the scanner is ready for the next, which the caller feeds
    /// `chunk[n..]`); `Ok(None)`: all of `chunk` belongs to it and it goes on. After an error the
    /// stream cannot be followed any more.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Option<usize>, CodecError> {
        let mut i = 0;
        while i < chunk.len() {
            match self.state {
                State::Type => {
                    let byte = chunk[i];
                    i += 1;
                    if !self.started {
                        self.started = true;
                        self.error = matches!(byte, b'-' | b'!');
                        if self.side == Side::Client && byte != b'*' {
                            // An inline command (as typed in telnet); a bare newline is an
                            // empty one, which servers ignore.
                            if byte == b'\n' {
                                return Ok(Some(self.finished(i)));
                            }
                            self.state = State::Inline;
                            self.line = 1;
                            continue;
                        }
                    }
                    if self.side == Side::Client && byte != b'$' && !self.open.is_empty() {
                        return Err(CodecError::Unexpected {
                            byte,
                            at: "in a command (bulk strings only)",
                        });
                    }
                    self.state = match byte {
                        b'*' | b'~' | b'>' | b'%' | b'|' | b'$' | b'=' | b'!' => {
                            self.value = 0;
                            self.digits = 0;
                            self.negative = false;
                            State::Number(byte)
                        }
                        b'+' | b'-' | b':' | b',' | b'_' | b'#' | b'(' => State::Line,
                        _ => {
                            return Err(CodecError::Unexpected {
                                byte,
                                at: "where a value begins",
                            })
                        }
                    };
                }
                State::Number(kind) => {
                    let byte = chunk[i];
                    i += 1;
                    match byte {
                        b'0'..=b'9' if self.digits < MAX_DIGITS => {
                            self.value = self.value * 10 + u64::from(byte - b'0');
                            self.digits += 1;
                        }
                        b'-' if self.digits == 0 && !self.negative => self.negative = true,
                        b'\r' => {}
                        b'\n' if self.digits > 0 => {
                            if self.header(kind)? {
                                return Ok(Some(self.finished(i)));
                            }
                        }
                        _ => return Err(CodecError::BadNumber { what: "length" }),
                    }
                }
                State::Line | State::Inline => match chunk[i..].iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        i += at + 1;
                        if self.state == State::Inline && self.line + at + 1 > MAX_INLINE {
                            return Err(CodecError::LineTooLong {
                                what: "inline command",
                                limit: MAX_INLINE,
                            });
                        }
                        if self.value_done() {
                            return Ok(Some(self.finished(i)));
                        }
                    }
                    None => {
                        self.line += chunk.len() - i;
                        i = chunk.len();
                        if self.state == State::Inline && self.line > MAX_INLINE {
                            return Err(CodecError::LineTooLong {
                                what: "inline command",
                                limit: MAX_INLINE,
                            });
                        }
                    }
                },
                State::Bulk(left) => {
                    let take = left.min((chunk.len() - i) as u64);
                    i += take as usize;
                    if take == left {
                        if self.value_done() {
                            return Ok(Some(self.finished(i)));
                        }
                    } else {
                        self.state = State::Bulk(left - take);
                    }
                }
            }
        }
        Ok(None)
    }

    /// A header line of type `kind` ended with its number; `true` when that ended the message.
    fn header(&mut self, kind: u8) -> Result<bool, CodecError> {
        let null = self.negative;
        if null && self.value != 1 {
            return Err(CodecError::BadNumber { what: "length" });
        }
        let n = self.value;
        match kind {
            b'$' | b'=' | b'!' => {
                if null {
                    return Ok(self.value_done());
                }
                if n > MAX_BULK {
                    return Err(CodecError::BadNumber {
                        what: "bulk length",
                    });
                }
                self.state = State::Bulk(n + 2);
                Ok(false)
            }
            _ => {
                let elements = match kind {
                    b'%' => n.saturating_mul(2),
                    // Attributes precede the value they describe: one more element.
                    b'|' => n.saturating_mul(2).saturating_add(1),
                    _ => n,
                };
                if self.side == Side::Client && self.open.is_empty() && (null || n == 0) {
                    // `*0` and `*-1`: an empty command, which servers ignore.
                    return Ok(self.value_done());
                }
                if null || elements == 0 {
                    return Ok(self.value_done());
                }
                if self.open.len() >= MAX_DEPTH {
                    return Err(CodecError::TooDeep(MAX_DEPTH));
                }
                self.open.push(elements);
                self.state = State::Type;
                Ok(false)
            }
        }
    }

    /// A value ended; `true` when it was the message's last.
    fn value_done(&mut self) -> bool {
        self.state = State::Type;
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return false;
            }
            self.open.pop();
        }
        true
    }

    /// Readies the scanner for the next message; returns `at`.
    fn finished(&mut self, at: usize) -> usize {
        self.state = State::Type;
        self.open.clear();
        self.started = false;
        self.line = 0;
        at
    }
}

/// A whole command's arguments, read in place: an array of bulk strings, or an inline line split
/// at spaces (quotes are not undone: inline commands are for people at a terminal).
#[derive(Debug, Clone)]
pub struct Command<'a> {
    args: Vec<&'a [u8]>,
    /// The command table's entry for its name, looked up once.
    info: Info,
}

impl<'a> Command<'a> {
    /// Reads the command `message` holds (as a [`Scanner`] of [`Side::Client`] delimited it);
    /// `None` for an empty one. At most `max_args` arguments are read (the rest are not needed
    /// to decide on it); given only the start of a command, the arguments it holds whole.
    pub fn parse(message: &'a [u8], max_args: usize) -> Option<Self> {
        let mut args = Vec::with_capacity(max_args.min(4));
        if message.first() == Some(&b'*') {
            let mut rest = message;
            let count = number_line(&mut rest)?;
            for _ in 0..count.min(max_args as u64) {
                // The start of a message (one too large to keep whole) reads as far as it goes.
                let Some(arg) = bulk(&mut rest) else { break };
                args.push(arg);
            }
        } else {
            let line = message.strip_suffix(b"\n").unwrap_or(message);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            args.extend(
                line.split(|b| *b == b' ' || *b == b'\t')
                    .filter(|a| !a.is_empty())
                    .take(max_args),
            );
            // Redis undoes quotes and escapes in an inline line, and skips any leading space:
            // `"AUTH" secret` is AUTH. Such a line is never copied, whatever it says.
            let plain = |b: &u8| {
                (b.is_ascii_graphic() || matches!(b, b' ' | b'\t'))
                    && !matches!(b, b'"' | b'\'' | b'\\')
            };
            if !line.iter().all(plain) || line.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
                let name = args.first()?;
                return Some(Self {
                    info: Info {
                        name: None,
                        class: Class::Never,
                        key: KeyAt::None,
                    },
                    args: vec![name],
                });
            }
        }
        let info = Info::of(args.first()?);
        Some(Self { args, info })
    }

    /// The command's name as sent (any case).
    pub fn name(&self) -> &'a [u8] {
        self.args[0]
    }

    /// Argument `i` (0 is the name), if it was read.
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        self.args.get(i).copied()
    }

    /// The command as the table knows it.
    pub fn info(&self) -> Info {
        self.info
    }

    /// The command's first key, where the command table puts it (`None`: it has none, or it
    /// lies beyond the arguments read).
    pub fn first_key(&self) -> Option<&'a [u8]> {
        match self.info().key {
            KeyAt::None => None,
            KeyAt::Arg(i) => self.arg(i),
            KeyAt::AfterNumKeys(i) => {
                let numkeys: u64 = std::str::from_utf8(self.arg(i)?).ok()?.parse().ok()?;
                if numkeys == 0 {
                    None
                } else {
                    self.arg(i + 1)
                }
            }
            KeyAt::AfterStreams => {
                let at = self
                    .args
                    .iter()
                    .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
                self.arg(at + 1)
            }
        }
    }
}

/// Reads one bulk string off the front of `rest`.
fn bulk<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    if rest.first() != Some(&b'$') {
        return None;
    }
    let mut after = *rest;
    let len = usize::try_from(number_line(&mut after)?).ok()?;
    let arg = after.get(..len)?;
    *rest = after.get(len + 2..)?;
    Some(arg)
}

/// Reads `<type><number>\r\n` off the front of `rest`.
fn number_line(rest: &mut &[u8]) -> Option<u64> {
    let end = rest.iter().position(|b| *b == b'\n')?;
    let line = rest.get(1..end)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let n = std::str::from_utf8(line).ok()?.parse().ok()?;
    *rest = &rest[end + 1..];
    Some(n)
}

/// What mirroring makes of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Reads data only.
    Read,
    /// May change data (the command table's `write` flag, scripts and functions included).
    Write,
    /// Never copied: it depends on or changes its connection's state (`AUTH`, `HELLO`,
    /// `SELECT`, `MULTI`, pub/sub, `CLIENT`...), administers the server (replication, `CONFIG`,
    /// `SHUTDOWN`, `DEBUG`...), or blocks the connection it runs on (`BLPOP` and the other
    /// blocking pops and moves; `XREAD ... BLOCK`).
    Never,
}

/// Where a command's first key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAt {
    /// It has no key.
    None,
    /// Argument `i`.
    Arg(usize),
    /// Argument `i` is the number of keys, which follow it (`EVAL`, `ZUNIONSTORE`-like `*MPOP`).
    AfterNumKeys(usize),
    /// After the `STREAMS` argument (`XREAD`, `XREADGROUP`).
    AfterStreams,
}

/// A command as the table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// Its name in capitals (`None`: a command the table does not know, such as a module's).
    pub name: Option<&'static str>,
    /// What mirroring makes of it (an unknown command is a [`Class::Read`]: "writes only"
    /// copies no command it cannot vouch for).
    pub class: Class,
    /// Where its first key is.
    pub key: KeyAt,
}

impl Info {
    /// Looks `name` up, in any case: a binary search over integers (names packed into 128
    /// bits), as it is done for every command a listener reads.
    pub fn of(name: &[u8]) -> Self {
        let unknown = Info {
            name: None,
            class: Class::Read,
            key: KeyAt::Arg(1),
        };
        if name.len() > MAX_NAME {
            return unknown;
        }
        let Ok(i) = KEYS.binary_search(&packed(name)) else {
            return unknown;
        };
        let (known, class, key) = COMMANDS[i];
        // Names longer than 16 bytes share their key with anything of the same start.
        if (name.len() > 16 || known.len() > 16) && !known.as_bytes().eq_ignore_ascii_case(name) {
            return unknown;
        }
        Info {
            name: Some(known),
            class,
            key,
        }
    }
}

/// The longest command name looked up.
const MAX_NAME: usize = 24;

/// The first 16 bytes of `name` in capitals, big-endian, zero-padded: integers that sort as the
/// names do.
fn packed(name: &[u8]) -> u128 {
    let mut key = 0u128;
    for i in 0..16 {
        key = (key << 8) | u128::from(name.get(i).map_or(0, u8::to_ascii_uppercase));
    }
    key
}

/// [`COMMANDS`]' names, packed.
static KEYS: std::sync::LazyLock<Vec<u128>> = std::sync::LazyLock::new(|| {
    COMMANDS
        .iter()
        .map(|(name, _, _)| packed(name.as_bytes()))
        .collect()
});

use Class::{Never as N, Read as R, Write as W};
use KeyAt::{AfterNumKeys as Nk, Arg as A, None as NoKey};

/// The commands whose class or key position is known, sorted by name. Writes follow Redis 7's
/// command table (`write` flag; scripts and functions, which may write, too); commands not
/// listed are reads with their key at argument 1.
const COMMANDS: &[(&str, Class, KeyAt)] = &[
    ("ACL", N, NoKey),
    ("APPEND", W, A(1)),
    ("ASKING", N, NoKey),
    ("AUTH", N, NoKey),
    ("BGREWRITEAOF", N, NoKey),
    ("BGSAVE", N, NoKey),
    ("BITCOUNT", R, A(1)),
    ("BITFIELD", W, A(1)),
    ("BITOP", W, A(2)),
    ("BLMOVE", N, A(1)),
    ("BLMPOP", N, Nk(2)),
    ("BLPOP", N, A(1)),
    ("BRPOP", N, A(1)),
    ("BRPOPLPUSH", N, A(1)),
    ("BZMPOP", N, Nk(2)),
    ("BZPOPMAX", N, A(1)),
    ("BZPOPMIN", N, A(1)),
    ("CLIENT", N, NoKey),
    ("CLUSTER", N, NoKey),
    ("COMMAND", R, NoKey),
    ("CONFIG", N, NoKey),
    ("COPY", W, A(1)),
    ("DBSIZE", R, NoKey),
    ("DEBUG", N, NoKey),
    ("DECR", W, A(1)),
    ("DECRBY", W, A(1)),
    ("DEL", W, A(1)),
    ("DISCARD", N, NoKey),
    ("ECHO", R, NoKey),
    ("EVAL", W, Nk(2)),
    ("EVALSHA", W, Nk(2)),
    ("EVALSHA_RO", R, Nk(2)),
    ("EVAL_RO", R, Nk(2)),
    ("EXEC", N, NoKey),
    ("EXPIRE", W, A(1)),
    ("EXPIREAT", W, A(1)),
    ("FAILOVER", N, NoKey),
    ("FCALL", W, Nk(2)),
    ("FCALL_RO", R, Nk(2)),
    ("FLUSHALL", W, NoKey),
    ("FLUSHDB", W, NoKey),
    ("FUNCTION", W, NoKey),
    ("GEOADD", W, A(1)),
    ("GEORADIUS", W, A(1)),
    ("GEORADIUSBYMEMBER", W, A(1)),
    ("GEOSEARCHSTORE", W, A(1)),
    ("GETDEL", W, A(1)),
    ("GETEX", W, A(1)),
    ("GETSET", W, A(1)),
    ("HDEL", W, A(1)),
    ("HELLO", N, NoKey),
    ("HEXPIRE", W, A(1)),
    ("HEXPIREAT", W, A(1)),
    ("HGETDEL", W, A(1)),
    ("HGETEX", W, A(1)),
    ("HINCRBY", W, A(1)),
    ("HINCRBYFLOAT", W, A(1)),
    ("HMSET", W, A(1)),
    ("HPERSIST", W, A(1)),
    ("HPEXPIRE", W, A(1)),
    ("HPEXPIREAT", W, A(1)),
    ("HSET", W, A(1)),
    ("HSETEX", W, A(1)),
    ("HSETNX", W, A(1)),
    ("INCR", W, A(1)),
    ("INCRBY", W, A(1)),
    ("INCRBYFLOAT", W, A(1)),
    ("INFO", R, NoKey),
    ("KEYS", R, NoKey),
    ("LASTSAVE", R, NoKey),
    ("LINSERT", W, A(1)),
    ("LMOVE", W, A(1)),
    ("LMPOP", W, Nk(1)),
    ("LPOP", W, A(1)),
    ("LPUSH", W, A(1)),
    ("LPUSHX", W, A(1)),
    ("LREM", W, A(1)),
    ("LSET", W, A(1)),
    ("LTRIM", W, A(1)),
    ("MEMORY", R, A(2)),
    ("MIGRATE", N, NoKey),
    ("MODULE", N, NoKey),
    ("MONITOR", N, NoKey),
    ("MOVE", W, A(1)),
    ("MSET", W, A(1)),
    ("MSETNX", W, A(1)),
    ("MULTI", N, NoKey),
    ("OBJECT", R, A(2)),
    ("PERSIST", W, A(1)),
    ("PEXPIRE", W, A(1)),
    ("PEXPIREAT", W, A(1)),
    ("PFADD", W, A(1)),
    ("PFCOUNT", W, A(1)),
    ("PFDEBUG", W, A(2)),
    ("PFMERGE", W, A(1)),
    ("PING", R, NoKey),
    ("PSETEX", W, A(1)),
    ("PSUBSCRIBE", N, NoKey),
    ("PSYNC", N, NoKey),
    ("PUBLISH", N, NoKey),
    ("PUBSUB", N, NoKey),
    ("PUNSUBSCRIBE", N, NoKey),
    ("QUIT", N, NoKey),
    ("RANDOMKEY", R, NoKey),
    ("READONLY", N, NoKey),
    ("READWRITE", N, NoKey),
    ("RENAME", W, A(1)),
    ("RENAMENX", W, A(1)),
    ("REPLCONF", N, NoKey),
    ("REPLICAOF", N, NoKey),
    ("RESET", N, NoKey),
    ("RESTORE", W, A(1)),
    ("RPOP", W, A(1)),
    ("RPOPLPUSH", W, A(1)),
    ("RPUSH", W, A(1)),
    ("RPUSHX", W, A(1)),
    ("SADD", W, A(1)),
    ("SAVE", N, NoKey),
    ("SCAN", R, NoKey),
    ("SCRIPT", N, NoKey),
    ("SDIFFSTORE", W, A(1)),
    ("SELECT", N, NoKey),
    ("SET", W, A(1)),
    ("SETBIT", W, A(1)),
    ("SETEX", W, A(1)),
    ("SETNX", W, A(1)),
    ("SETRANGE", W, A(1)),
    ("SHUTDOWN", N, NoKey),
    ("SINTERSTORE", W, A(1)),
    ("SLAVEOF", N, NoKey),
    ("SLOWLOG", N, NoKey),
    ("SMOVE", W, A(1)),
    ("SORT", W, A(1)),
    ("SPOP", W, A(1)),
    ("SPUBLISH", N, NoKey),
    ("SREM", W, A(1)),
    ("SSUBSCRIBE", N, NoKey),
    ("SUBSCRIBE", N, NoKey),
    ("SUNIONSTORE", W, A(1)),
    ("SUNSUBSCRIBE", N, NoKey),
    ("SWAPDB", W, NoKey),
    ("SYNC", N, NoKey),
    ("TIME", R, NoKey),
    ("UNLINK", W, A(1)),
    ("UNSUBSCRIBE", N, NoKey),
    ("UNWATCH", N, NoKey),
    ("WAIT", N, NoKey),
    ("WAITAOF", N, NoKey),
    ("WATCH", N, NoKey),
    ("XACK", W, A(1)),
    ("XADD", W, A(1)),
    ("XAUTOCLAIM", W, A(1)),
    ("XCLAIM", W, A(1)),
    ("XDEL", W, A(1)),
    ("XGROUP", W, A(2)),
    ("XREAD", R, KeyAt::AfterStreams),
    ("XREADGROUP", W, KeyAt::AfterStreams),
    ("XSETID", W, A(1)),
    ("XTRIM", W, A(1)),
    ("ZADD", W, A(1)),
    ("ZDIFFSTORE", W, A(1)),
    ("ZINCRBY", W, A(1)),
    ("ZINTERSTORE", W, A(1)),
    ("ZMPOP", W, Nk(1)),
    ("ZPOPMAX", W, A(1)),
    ("ZPOPMIN", W, A(1)),
    ("ZRANGESTORE", W, A(1)),
    ("ZREM", W, A(1)),
    ("ZREMRANGEBYLEX", W, A(1)),
    ("ZREMRANGEBYRANK", W, A(1)),
    ("ZREMRANGEBYSCORE", W, A(1)),
    ("ZUNIONSTORE", W, A(1)),
];

/// Arguments searched for `BLOCK` in `XREAD` and `XREADGROUP` (it comes before `STREAMS`).
const MAX_BLOCK_ARG: usize = 8;

/// The state a client's connection carries between its commands, as far as copying them goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The database `SELECT` chose (0 until then, and after `RESET`).
    pub db: u32,
    /// A transaction is open (`MULTI` until `EXEC` or `DISCARD`): its commands are queued by
    /// the server, and copying them one by one would run them outside it (or run a discarded
    /// one), so none is copied.
    pub in_transaction: bool,
}

impl Session {
    /// Follows `command`, sent on this connection; returns whether it may be copied (replayed
    /// alone on a shared connection, against database [`Session::db`]).
    pub fn follow(&mut self, command: &Command<'_>) -> bool {
        let info = command.info();
        match info.name {
            Some("SELECT") => {
                // Plain digits, as Redis takes them (no sign, no leading zero).
                let plain = |a: &[u8]| {
                    !a.is_empty()
                        && a.iter().all(u8::is_ascii_digit)
                        && (a.len() == 1 || a[0] != b'0')
                };
                if let Some(db) = command
                    .arg(1)
                    .filter(|a| plain(a))
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .and_then(|a| a.parse().ok())
                {
                    // Inside a transaction it takes effect at EXEC; a failed one is the
                    // client's trouble and the copy follows the likely case.
                    self.db = db;
                }
            }
            Some("MULTI") => self.in_transaction = true,
            Some("EXEC" | "DISCARD") => self.in_transaction = false,
            Some("RESET") => *self = Session::default(),
            _ => {}
        }
        // A blocking read holds the shared shadow connection it is replayed on.
        let blocks = matches!(info.name, Some("XREAD" | "XREADGROUP"))
            && (2..MAX_BLOCK_ARG).any(|i| {
                command
                    .arg(i)
                    .is_some_and(|a| a.eq_ignore_ascii_case(b"BLOCK"))
            });
        info.class != Class::Never && !self.in_transaction && !blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes and returns the messages' ends.
    fn ends(side: Side, stream: &[u8], step: usize) -> Result<Vec<usize>, CodecError> {
        let mut scanner = Scanner::new(side);
        let mut ends = Vec::new();
        let mut offset = 0;
        for piece in stream.chunks(step) {
            let mut rest = piece;
            let mut at = offset;
            while let Some(n) = scanner.feed(rest)? {
                at += n;
                ends.push(at);
                rest = &rest[n..];
            }
            offset += piece.len();
        }
        Ok(ends)
    }

    #[test]
    fn commands_are_delimited_in_any_pieces() {
        let stream =
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nPING\r\n\n*1\r\n$4\r\nPING\r\n*0\r\n";
        let want = vec![31, 37, 38, 52, 56];
        for step in 1..=stream.len() {
            assert_eq!(
                ends(Side::Client, stream, step).expect("test input"),
                want,
                "step {step}"
            );
        }
    }

    #[test]
    fn replies_of_every_resp3_type_are_delimited() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            b":42\r\n",
            b"$-1\r\n",
            b"$0\r\n\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n*1\r\n:1\r\n$1\r\nx\r\n",
            b"%1\r\n+k\r\n*2\r\n_\r\n,3.14\r\n",
            b"|1\r\n+ttl\r\n:3\r\n$2\r\nok\r\n",
            b"~2\r\n#t\r\n(12345678901234567890\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"!3\r\nERR\r\n",
            b">2\r\n+message\r\n+x\r\n",
        ];
        let stream: Vec<u8> = replies.concat();
        let mut want = Vec::new();
        let mut at = 0;
        for r in replies {
            at += r.len();
            want.push(at);
        }
        for step in [1, 2, 3, 7, stream.len()] {
            assert_eq!(
                ends(Side::Server, &stream, step).expect("test input"),
                want,
                "step {step}"
            );
        }
    }

    #[test]
    fn an_error_reply_is_told_apart() {
        let mut s = Scanner::new(Side::Server);
        assert_eq!(s.feed(b"-ERR no\r\n"), Ok(Some(9)));
        assert!(s.was_error());
        assert_eq!(s.feed(b"*1\r\n-ERR inner\r\n"), Ok(Some(16)));
        assert!(!s.was_error(), "only an error at the top is the reply's");
        assert_eq!(s.feed(b"!2\r\nno\r\n"), Ok(Some(8)));
        assert!(s.was_error());
    }

    #[test]
    fn a_huge_bulk_is_skipped_without_being_held() {
        let mut s = Scanner::new(Side::Client);
        assert_eq!(s.feed(b"*2\r\n$3\r\nSET\r\n$100000000\r\n"), Ok(None));
        let piece = vec![b'x'; 1 << 20];
        for _ in 0..95 {
            assert_eq!(s.feed(&piece), Ok(None));
        }
        let rest = 100_000_000 - 95 * (1 << 20);
        let mut tail = vec![b'x'; rest];
        tail.extend_from_slice(b"\r\n*1\r\n");
        assert_eq!(s.feed(&tail), Ok(Some(rest + 2)));
        assert!(!s.in_message());
    }

    #[test]
    fn broken_streams_are_errors() {
        for bad in [
            &b"*2\r\n:1\r\n"[..],
            b"*x\r\n",
            b"*2\r\n$-5\r\n",
            b"*1\r\n$99999999999\r\n",
        ] {
            let mut s = Scanner::new(Side::Client);
            assert!(s.feed(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut s = Scanner::new(Side::Client);
        assert!(s.feed(&vec![b'a'; MAX_INLINE + 1]).is_err());
        let mut s = Scanner::new(Side::Server);
        assert!(s.feed(&b"*1\r\n".repeat(MAX_DEPTH + 1)).is_err());
        assert!(Scanner::new(Side::Server).feed(b"?\r\n").is_err());
    }

    #[test]
    fn commands_read_in_place() {
        let c =
            Command::parse(b"*3\r\n$3\r\nset\r\n$4\r\nuser\r\n$1\r\nv\r\n", 4).expect("test input");
        assert_eq!(c.name(), b"set");
        assert_eq!(c.info().name, Some("SET"));
        assert_eq!(c.info().class, Class::Write);
        assert_eq!(c.first_key(), Some(&b"user"[..]));
        let c = Command::parse(b"get  session:1\r\n", 4).expect("test input");
        assert_eq!(c.info().class, Class::Read);
        assert_eq!(c.first_key(), Some(&b"session:1"[..]));
        let eval = b"*5\r\n$4\r\nEVAL\r\n$6\r\nreturn\r\n$1\r\n1\r\n$2\r\nk1\r\n$1\r\na\r\n";
        assert_eq!(
            Command::parse(eval, 8).expect("test input").first_key(),
            Some(&b"k1"[..])
        );
        let xread = b"*4\r\n$5\r\nXREAD\r\n$7\r\nSTREAMS\r\n$1\r\ns\r\n$1\r\n0\r\n";
        assert_eq!(
            Command::parse(xread, 8).expect("test input").first_key(),
            Some(&b"s"[..])
        );
        assert!(Command::parse(b"\r\n", 4).is_none());
        assert!(Command::parse(b"*0\r\n", 4).is_none());
        let start =
            Command::parse(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$9999\r\nxx", 4).expect("test input");
        assert_eq!(
            (start.name(), start.first_key()),
            (&b"SET"[..], Some(&b"k"[..]))
        );
        assert_eq!(Info::of(b"JSON.SET").name, None);
    }

    #[test]
    fn the_table_is_sorted_and_in_capitals() {
        for pair in COMMANDS.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
        for pair in KEYS.windows(2) {
            assert!(
                pair[0] < pair[1],
                "packed keys sort as names and are distinct"
            );
        }
        for (name, _, _) in COMMANDS {
            assert_eq!(
                Info::of(name.to_ascii_lowercase().as_bytes()).name,
                Some(*name)
            );
        }
        assert_eq!(Info::of(b"GEORADIUSBYMEMBERX").name, None);
        assert_eq!(Info::of(b"GEORADIUSBYMEMBE").name, None);
        assert!(COMMANDS
            .iter()
            .all(|(n, _, _)| n.len() <= 24 && n.bytes().all(|b| !b.is_ascii_lowercase())));
    }

    #[test]
    fn a_session_follows_select_and_transactions() {
        let mut s = Session::default();
        let cmd = |m: &'static [u8]| Command::parse(m, 4).expect("test input");
        assert!(s.follow(&cmd(b"SET a 1\r\n")));
        assert!(!s.follow(&cmd(b"SELECT 3\r\n")));
        assert_eq!(s.db, 3);
        assert!(!s.follow(&cmd(b"MULTI\r\n")));
        assert!(!s.follow(&cmd(b"SET a 1\r\n")), "queued in a transaction");
        assert!(!s.follow(&cmd(b"EXEC\r\n")));
        assert!(s.follow(&cmd(b"INCR a\r\n")));
        assert!(!s.follow(&cmd(b"AUTH secret\r\n")));
        assert!(!s.follow(&cmd(b"RESET\r\n")));
        assert_eq!(s, Session::default());
        assert!(
            !s.follow(&cmd(b"SELECT +3\r\n")) && s.db == 0,
            "Redis refuses +3"
        );
        assert!(!s.follow(&cmd(b"SELECT 03\r\n")) && s.db == 0);
        assert!(
            !s.follow(&cmd(b"BRPOP q 0\r\n")),
            "blocks a shared connection"
        );
        assert!(!s.follow(&cmd(b"XREAD COUNT 1 BLOCK 0 STREAMS s $\r\n")));
        assert!(s.follow(&cmd(b"XREAD COUNT 1 STREAMS s 0\r\n")));
    }

    #[test]
    fn quoted_inline_commands_are_never_copied() {
        let mut s = Session::default();
        for line in [
            &b"\"AUTH\" hunter2\r\n"[..],
            b"AU\"TH\" hunter2\r\n",
            b"\x0bAUTH hunter2\r\n",
            b" SELECT 5\r\n",
            b"SET k 'v'\r\n",
        ] {
            let c = Command::parse(line, 4).expect("a command");
            assert_eq!(
                c.info().class,
                Class::Never,
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert!(!s.follow(&c));
        }
        assert_eq!(s.db, 0);
    }
}

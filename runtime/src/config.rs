//! Reading a YAML configuration while collecting every problem.
//!
//! `#[serde(deny_unknown_fields)]` stops at the first mistake; an operator fixing a file wants the
//! whole list at once. So configurations are read in two steps: [`crate::yaml::parse`] into a
//! value tree, then a [`Section`] walk that converts each field, records a [`Problem`] for every
//! bad, missing or unknown one (field path, the value found, how to fix it), and never stops
//! early. The typed configuration is returned only when the list is empty.
//!
//! The same walk runs for `teeway check`, at start-up before any port is bound, and on reload.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::yaml::{Mapping, Value};

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, such as `mirror.percentage` or `routes[1].targets[0]`.
    pub path: String,
    /// The value found there, as written, when there was one.
    pub value: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(value) = &self.value {
            write!(f, " (found `{value}`)")?;
        }
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// The problems found so far in one configuration.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem.
    pub fn push(
        &mut self,
        path: impl Into<String>,
        value: Option<&Value>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Problem {
            path: path.into(),
            value: value.map(render),
            message: message.into(),
            fix: fix.into(),
        });
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many problems were recorded; a section compares it before and after reading itself.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `Ok(value)` when no problem was recorded, else every problem.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                source_name: None,
                problems: self.0,
            })
        }
    }
}

/// A configuration that cannot be used, with every reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file it came from, when known.
    pub source_name: Option<String>,
    /// Everything that is wrong, in document order.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// A configuration that could not be read at all (missing file, YAML syntax).
    pub fn unreadable(source_name: &str, message: impl Into<String>, fix: &str) -> Self {
        Self {
            source_name: Some(source_name.to_owned()),
            problems: vec![Problem {
                path: "(file)".into(),
                value: None,
                message: message.into(),
                fix: fix.into(),
            }],
        }
    }

    /// Names the file these problems came from.
    pub fn in_file(mut self, source_name: &str) -> Self {
        self.source_name = Some(source_name.to_owned());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        match &self.source_name {
            Some(name) => write!(f, "{name}: {n} problem{}", if n == 1 { "" } else { "s" })?,
            None => write!(
                f,
                "{n} configuration problem{}",
                if n == 1 { "" } else { "s" }
            )?,
        }
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads a configuration file's text; an unreadable file is a [`ConfigError`] naming it.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigError::unreadable(
            &path.display().to_string(),
            format!("cannot read the file: {e}"),
            "check the path",
        )
    })
}

/// A mapping being read: remembers which keys were asked for, so the rest can be reported as
/// unknown by [`Section::finish`].
#[derive(Debug)]
pub struct Section<'v> {
    path: String,
    map: Option<&'v Mapping>,
    known: Vec<&'static str>,
}

impl<'v> Section<'v> {
    /// The document root, which must be a mapping.
    pub fn root(value: &'v Value, problems: &mut Problems) -> Self {
        Self::at(String::new(), value, problems)
    }

    /// A mapping found elsewhere (an entry of a list that may also hold scalars), at `path`.
    pub fn nested(path: String, value: &'v Value, problems: &mut Problems) -> Self {
        Self::at(path, value, problems)
    }

    fn at(path: String, value: &'v Value, problems: &mut Problems) -> Self {
        let map = match value {
            Value::Mapping(map) => Some(map),
            Value::Null => None,
            other => {
                problems.push(
                    display_path(&path),
                    Some(other),
                    "must be a mapping of `key: value` lines",
                    "indent the keys of this block under it",
                );
                None
            }
        };
        Self {
            path,
            map,
            known: Vec::new(),
        }
    }

    /// Whether the section was written at all.
    pub fn is_present(&self) -> bool {
        self.map.is_some()
    }

    /// The path of this section itself (`routes[1]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of `key` in this section.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The raw value of `key`, if present and not null.
    pub fn get(&mut self, key: &'static str) -> Option<&'v Value> {
        self.known.push(key);
        match self.map?.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// An optional field converted by `parse`; a conversion failure is recorded with `fix`.
    pub fn optional<T>(
        &mut self,
        problems: &mut Problems,
        key: &'static str,
        fix: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.get(key)?;
        match parse(value) {
            Ok(v) => Some(v),
            Err(message) => {
                problems.push(self.path_of(key), Some(value), message, fix);
                None
            }
        }
    }

    /// A required field; its absence is recorded with `fix`.
    pub fn required<T>(
        &mut self,
        problems: &mut Problems,
        key: &'static str,
        fix: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        if self
            .map
            .is_some_and(|m| m.get(key).is_some_and(|v| !v.is_null()))
        {
            self.optional(problems, key, fix, parse)
        } else {
            self.known.push(key);
            problems.push(self.path_of(key), None, "is required", fix);
            None
        }
    }

    /// A nested mapping (absent: an empty section).
    pub fn section(&mut self, problems: &mut Problems, key: &'static str) -> Section<'v> {
        let path = self.path_of(key);
        match self.get(key) {
            Some(value) => Section::at(path, value, problems),
            None => Section {
                path,
                map: None,
                known: Vec::new(),
            },
        }
    }

    /// A list of nested mappings, each with its path (`routes[0]`).
    pub fn sections(&mut self, problems: &mut Problems, key: &'static str) -> Vec<Section<'v>> {
        let path = self.path_of(key);
        match self.get(key) {
            None => Vec::new(),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| Section::at(format!("{path}[{i}]"), item, problems))
                .collect(),
            Some(other) => {
                problems.push(
                    path,
                    Some(other),
                    "must be a list",
                    "write each entry on its own line starting with `- `",
                );
                Vec::new()
            }
        }
    }

    /// A list of scalars converted by `parse`, each failure recorded with its index.
    pub fn list<T>(
        &mut self,
        problems: &mut Problems,
        key: &'static str,
        fix: &str,
        mut parse: impl FnMut(&Value) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let path = self.path_of(key);
        let items = match self.get(key)? {
            Value::Sequence(items) => items,
            other => {
                problems.push(path, Some(other), "must be a list", fix);
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match parse(item) {
                Ok(v) => out.push(v),
                Err(message) => problems.push(format!("{path}[{i}]"), Some(item), message, fix),
            }
        }
        Some(out)
    }

    /// Records every key of this section that nobody asked for.
    pub fn finish(self, problems: &mut Problems) {
        let Some(map) = self.map else { return };
        for key in map.keys() {
            let name = match key {
                Value::String(s) => s.as_str(),
                other => {
                    problems.push(
                        display_path(&self.path),
                        Some(other),
                        "keys must be strings",
                        "",
                    );
                    continue;
                }
            };
            if self.known.contains(&name) {
                continue;
            }
            let fix = match closest(name, &self.known) {
                Some(near) => format!(
                    "did you mean `{near}`? known keys here: {}",
                    self.known.join(", ")
                ),
                None => format!("remove it; known keys here: {}", self.known.join(", ")),
            };
            problems.push(self.path_of(name), None, "unknown key", fix);
        }
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(document)".into()
    } else {
        path.into()
    }
}

/// The known key nearest to `name` by edit distance, if it is near enough to be a typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(cur)
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// A value as the operator wrote it, for error messages (which reach logs and `/config`): a
/// URL's password masked.
fn render(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => crate::reload::without_url_password(s).unwrap_or_else(|| s.clone()),
        Value::Sequence(_) => "[...]".into(),
        Value::Mapping(_) => "{...}".into(),
        Value::Tagged(t) => format!("!{} ...", t.tag),
    }
}

// Conversions, each returning a message that reads after the field path.

/// `true` or `false`; a quoted one is refused with a message that says so.
pub fn boolean(value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => {
            Err("must be true or false, not a quoted string".to_owned())
        }
        _ => Err("must be true or false".to_owned()),
    }
}

/// A string (numbers and booleans are accepted as written).
pub fn string(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err("must be a single value, not a list or mapping".into()),
    }
}

/// A non-empty string.
pub fn nonempty_string(value: &Value) -> Result<String, String> {
    let s = string(value)?;
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s)
}

/// A whole number.
pub fn whole_number(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| "must be a whole number, 0 or more".into()),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| "must be a whole number, 0 or more".into()),
        _ => Err("must be a whole number".into()),
    }
}

/// A number (fractions allowed).
pub fn number(value: &Value) -> Result<f64, String> {
    let n = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches('%').parse().ok(),
        _ => None,
    };
    n.filter(|f| f.is_finite())
        .ok_or_else(|| "must be a number".into())
}

/// A percentage from 0 to 100, fractions allowed; a trailing `%` is accepted.
pub fn percentage(value: &Value) -> Result<f64, String> {
    let n = number(value)?;
    if !(0.0..=100.0).contains(&n) {
        return Err("must be between 0 and 100".into());
    }
    Ok(n)
}

/// A byte size: a whole number of bytes or a string with a unit (see [`crate::units`]).
pub fn size(value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| "must be a whole number of bytes or a size such as 1MiB".into()),
        Value::String(s) => crate::units::parse_size(s),
        _ => Err("must be a size such as 64KiB or 1MiB".into()),
    }
}

/// A duration string (see [`crate::units`]).
pub fn duration(value: &Value) -> Result<Duration, String> {
    crate::units::parse_duration(&string(value)?)
}

/// A duration from `min` to `max`, both written as a configuration writes them (`"1s"`,
/// `"10m"`), so that the error says the range in the reader's words: `must be from 1s to 10m`.
pub fn duration_from_to(
    min: &'static str,
    max: &'static str,
) -> impl Fn(&Value) -> Result<Duration, String> {
    let low = crate::units::parse_duration(min).unwrap_or(Duration::ZERO);
    let high = crate::units::parse_duration(max).unwrap_or(Duration::MAX);
    move |value| match duration(value)? {
        d if d >= low && d <= high => Ok(d),
        _ => Err(format!("must be from {min} to {max}")),
    }
}

/// A listener's name (an agent's `tcp:` and `rpc:` listeners): it labels metrics and is what a
/// gateway's routes match.
pub fn listener_name(value: &Value) -> Result<String, String> {
    let name = nonempty_string(value)?;
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("must be at most 64 letters, digits, `-`, `_` or `.`".into());
    }
    Ok(name)
}

/// A whole number from `min` to `max`: `must be from 16 to 65536` otherwise.
pub fn whole_number_from_to(min: u64, max: u64) -> impl Fn(&Value) -> Result<u64, String> {
    move |value| match whole_number(value)? {
        n if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be from {min} to {max}")),
    }
}

/// A duration above zero (a timeout of `0s` would fail everything at once).
pub fn positive_duration(value: &Value) -> Result<Duration, String> {
    match duration(value)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// An IP socket address to listen on, `ip:port` (`[v6]:port` for IPv6).
pub fn socket_addr(value: &Value) -> Result<SocketAddr, String> {
    let s = string(value)?;
    s.trim()
        .parse()
        .map_err(|_| "is not an `ip:port` address to listen on".into())
}

/// Whether two listen addresses cannot both be bound: the same port (not 0) and the same
/// address, or one of them the wildcard covering the other (`0.0.0.0` covers IPv4; `[::]`,
/// dual-stack on Linux, covers both families).
pub fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let covers = |wild: SocketAddr, other: SocketAddr| match wild.ip() {
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => true,
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => other.is_ipv4(),
        _ => false,
    };
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

/// `host:port` as text, an IPv6 literal in brackets (`[::1]:4433`), for logs and URIs.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A `host:port` pair where host may be a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn host_port(value: &Value) -> Result<(String, u16), String> {
    let s = string(value)?;
    split_host_port(s.trim()).ok_or_else(|| "is not a `host:port` address".into())
}

/// Splits `host:port` (`[v6]:port`); `None` when either part is missing or invalid.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        (host, rest.strip_prefix(':')?)
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 || !valid_host(host) {
        return None;
    }
    Some((host.to_owned(), port))
}

fn valid_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Which HTTP version to speak to an upstream (the primary, or a shadow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 whatever the client spoke (default: what nearly every service accepts).
    Http1,
    /// HTTP/2 with prior knowledge (h2c) whatever the client spoke.
    Http2,
    /// The client's own version: HTTP/2 clients get h2c upstream (gRPC needs this).
    Auto,
}

impl UpstreamProtocol {
    /// Whether a request that arrived as `version` goes upstream as HTTP/2.
    pub fn use_http2(self, version: http::Version) -> bool {
        match self {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Auto => version == http::Version::HTTP_2,
        }
    }
}

/// `http1`, `http2` or `auto`.
pub fn upstream_protocol(value: &Value) -> Result<UpstreamProtocol, String> {
    match string(value)?.as_str() {
        "http1" => Ok(UpstreamProtocol::Http1),
        "http2" => Ok(UpstreamProtocol::Http2),
        "auto" => Ok(UpstreamProtocol::Auto),
        _ => Err("is not a protocol".into()),
    }
}

/// An `http://host:port` or `https://host:port` URL with no path, query or credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port (80 for http, 443 for https when not written).
    pub port: u16,
    /// `https://`: connections are TLS, verified against the target's trust (see [`tls_block`]).
    pub tls: bool,
    /// The URL as written, normalised (no trailing slash).
    pub url: String,
}

impl HttpTarget {
    /// `host:port` as it goes in a URI authority (IPv6 in brackets).
    pub fn authority(&self) -> &str {
        self.url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
    }
}

/// An `http://host[:port]` or `https://host[:port]` URL.
pub fn http_target(value: &Value) -> Result<HttpTarget, String> {
    let s = string(value)?;
    let s = s.trim();
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "is not a URL (expected http://host:port or https://host:port)".to_string())?;
    let (tls, default_port) = match uri.scheme_str() {
        Some("http") => (false, 80),
        Some("https") => (true, 443),
        _ => return Err("must start with http:// or https://".into()),
    };
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry credentials".into());
    }
    if uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty())
    {
        return Err("must not have a path or query: requests keep their own".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if !valid_host(host) {
        return Err(format!("has an invalid host `{host}`"));
    }
    let port = authority.port_u16().unwrap_or(default_port);
    let scheme = if tls { "https" } else { "http" };
    Ok(HttpTarget {
        host: host.to_owned(),
        port,
        tls,
        url: format!("{scheme}://{authority}"),
    })
}

/// How an `https://` upstream is verified: `{ ca, server_name }`, both optional.
#[derive(Debug, Clone)]
pub struct UpstreamTlsConfig {
    /// Which CAs the upstream's certificate must chain to.
    pub trust: teeway_wire::tls::UpstreamTrust,
    /// The name its certificate must carry (SNI too); default: the URL's host.
    pub server_name: String,
    /// The client configurations built from them at load time.
    pub configs: teeway_wire::tls::UpstreamTls,
    /// The bundle's bytes when loaded, so that a reload sees a changed bundle as a change.
    bundle: Vec<u8>,
}

impl PartialEq for UpstreamTlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.trust == other.trust
            && self.server_name == other.server_name
            && self.bundle == other.bundle
    }
}

/// Reads the TLS block `key` (`{ ca: file, server_name: name }`) of an upstream whose URL is
/// `target`. Absent: an `https://` target trusts the system's CAs and its own host name; `None`
/// for `http://` targets. The block on an `http://` target is a problem (it would be ignored).
/// The trust is loaded here, so a bad bundle is reported before anything is bound.
pub fn tls_block(
    parent: &mut Section<'_>,
    p: &mut Problems,
    key: &'static str,
    base: &Path,
    target: Option<&HttpTarget>,
) -> Option<UpstreamTlsConfig> {
    let problems_before = p.len();
    let mut t = parent.section(p, key);
    let present = t.is_present();
    let ca = t.optional(
        p,
        "ca",
        "give a PEM file of the CA certificates the upstream's certificate chains to",
        readable_file(base),
    );
    let server_name = t.optional(
        p,
        "server_name",
        "give the DNS name (or IP) the upstream's certificate carries",
        |v| {
            let name = nonempty_string(v)?;
            rustls_pki_types::ServerName::try_from(name.clone())
                .map_err(|_| "is not a DNS name or IP address".to_string())?;
            Ok(name)
        },
    );
    let block_path = t.path().to_owned();
    let ca_path = t.path_of("ca");
    t.finish(p);
    let target = target?;
    if p.len() > problems_before {
        return None;
    }
    if !target.tls {
        if present {
            p.push(
                block_path,
                None,
                format!("is set but the URL `{}` is not https", target.url),
                "write the URL as https://host:port, or remove this block",
            );
        }
        return None;
    }
    let at = if ca.is_some() { ca_path } else { block_path };
    upstream_tls_config(p, &at, target, ca, server_name)
}

/// Loads the trust for the `https://` `target`: the bundle `ca` (else the system's CAs) and the
/// name `server_name` (else the URL's host). A problem at `path` when the trust cannot be loaded.
pub fn upstream_tls_config(
    p: &mut Problems,
    path: &str,
    target: &HttpTarget,
    ca: Option<PathBuf>,
    server_name: Option<String>,
) -> Option<UpstreamTlsConfig> {
    let bundle = ca
        .as_deref()
        .and_then(|path| std::fs::read(path).ok())
        .unwrap_or_default();
    let fix = if ca.is_some() {
        "give a PEM bundle of CA certificates"
    } else {
        "name a CA bundle with `ca:` in the URL's tls block, or install the system's CA certificates"
    };
    let trust = ca.map_or(teeway_wire::tls::UpstreamTrust::System, |path| {
        teeway_wire::tls::UpstreamTrust::Bundle(path)
    });
    match teeway_wire::tls::upstream_tls(&trust) {
        Ok(configs) => Some(UpstreamTlsConfig {
            trust,
            server_name: server_name.unwrap_or_else(|| target.host.clone()),
            configs,
            bundle,
        }),
        Err(e) => {
            p.push(path, None, e.to_string(), fix);
            None
        }
    }
}

/// A path to a readable file, relative paths taken from `base` (the config file's folder).
pub fn readable_file(base: &Path) -> impl Fn(&Value) -> Result<PathBuf, String> + '_ {
    move |value| {
        let s = string(value)?;
        let path = base.join(s.trim());
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                std::fs::File::open(&path).map_err(|e| format!("cannot be read: {e}"))?;
                Ok(path)
            }
            Ok(_) => Err(format!("{} is not a file", path.display())),
            Err(e) => Err(format!("cannot be read: {} ({e})", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    #[test]
    fn ranges_say_their_bounds_as_written() {
        let value = |text: &str| parse(&format!("v: {text}")).expect("yaml")["v"].clone();
        let timeout = duration_from_to("1s", "10m");
        assert_eq!(timeout(&value("1s")), Ok(Duration::from_secs(1)));
        assert_eq!(timeout(&value("10m")), Ok(Duration::from_secs(600)));
        assert_eq!(timeout(&value("0s")), Err("must be from 1s to 10m".into()));
        assert_eq!(timeout(&value("11m")), Err("must be from 1s to 10m".into()));
        let streams = whole_number_from_to(16, 65_536);
        assert_eq!(streams(&value("16")), Ok(16));
        assert_eq!(
            streams(&value("15")),
            Err("must be from 16 to 65536".into())
        );
    }

    #[test]
    fn collects_every_problem_with_path_value_and_fix() {
        let doc =
            parse("listen: not-an-address\nmirror:\n  percentage: 150\n  queu: 5\nextra: 1\n")
                .expect("yaml");
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);
        root.required(&mut p, "listen", "write ip:port", socket_addr);
        root.required(
            &mut p,
            "primary",
            "set primary: http://host:port",
            http_target,
        );
        let mut mirror = root.section(&mut p, "mirror");
        mirror.optional(&mut p, "percentage", "use 0..100", percentage);
        mirror.optional(&mut p, "queue", "a count", whole_number);
        mirror.finish(&mut p);
        root.finish(&mut p);
        let err = p.finish(()).expect_err("problems");
        let text = err.to_string();
        assert_eq!(err.problems.len(), 5, "{text}");
        assert!(
            text.contains(
                "listen: is not an `ip:port` address to listen on (found `not-an-address`)"
            ),
            "{text}"
        );
        assert!(text.contains("primary: is required; set primary"), "{text}");
        assert!(
            text.contains("mirror.percentage: must be between 0 and 100 (found `150`)"),
            "{text}"
        );
        assert!(
            text.contains("mirror.queu: unknown key; did you mean `queue`?"),
            "{text}"
        );
        assert!(text.contains("extra: unknown key; remove it"), "{text}");
    }

    #[test]
    fn wildcards_clash_with_what_they_cover() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(addresses_clash(a("127.0.0.1:80"), a("0.0.0.0:80")));
        assert!(addresses_clash(a("[::]:80"), a("[::1]:80")));
        assert!(
            addresses_clash(a("[::]:80"), a("127.0.0.1:80")),
            "dual-stack"
        );
        assert!(!addresses_clash(a("0.0.0.0:80"), a("[::1]:80")));
        assert!(!addresses_clash(a("127.0.0.1:80"), a("127.0.0.1:81")));
        assert!(
            !addresses_clash(a("127.0.0.1:0"), a("127.0.0.1:0")),
            "port 0 never clashes"
        );
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("gw.example:4433"),
            Some(("gw.example".into(), 4433))
        );
        assert_eq!(
            split_host_port("127.0.0.1:1"),
            Some(("127.0.0.1".into(), 1))
        );
        assert_eq!(split_host_port("[::1]:4433"), Some(("::1".into(), 4433)));
        assert_eq!(split_host_port("::1:4433"), None);
        assert_eq!(split_host_port("gw.example"), None);
        assert_eq!(split_host_port("gw.example:0"), None);
        assert_eq!(split_host_port("bad host:1"), None);
        assert_eq!(split_host_port(":80"), None);
    }

    #[test]
    fn http_targets() {
        let t = http_target(&Value::from("http://127.0.0.1:9000")).expect("ok");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9000));
        let t = http_target(&Value::from("http://svc.ns/")).expect("ok");
        assert_eq!(
            (t.host.as_str(), t.port, t.url.as_str()),
            ("svc.ns", 80, "http://svc.ns")
        );
        let t = http_target(&Value::from("https://[::1]/")).expect("ok");
        assert_eq!(
            (t.host.as_str(), t.port, t.tls, t.authority()),
            ("::1", 443, true, "[::1]")
        );
        assert!(!http_target(&Value::from("http://x")).expect("ok").tls);
        assert!(http_target(&Value::from("ftp://x")).is_err());
        assert!(http_target(&Value::from("https://x/path")).is_err());
        assert!(http_target(&Value::from("http://x/path")).is_err());
        assert!(http_target(&Value::from("127.0.0.1:80")).is_err());
    }

    #[test]
    fn upstream_protocol_choice() {
        use http::Version;
        assert!(!UpstreamProtocol::Http1.use_http2(Version::HTTP_2));
        assert!(UpstreamProtocol::Http2.use_http2(Version::HTTP_11));
        assert!(UpstreamProtocol::Auto.use_http2(Version::HTTP_2));
        assert!(!UpstreamProtocol::Auto.use_http2(Version::HTTP_11));
        assert_eq!(
            upstream_protocol(&Value::from("auto")),
            Ok(UpstreamProtocol::Auto)
        );
        assert!(upstream_protocol(&Value::from("h3")).is_err());
    }

    #[test]
    fn percentages_accept_fractions_and_percent_sign() {
        assert_eq!(percentage(&Value::from(0.5)), Ok(0.5));
        assert_eq!(percentage(&Value::from("12.5%")), Ok(12.5));
        assert!(percentage(&Value::from(-1)).is_err());
    }
}

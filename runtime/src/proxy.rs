//! HTTP proxy hygiene shared by the agent (client to primary) and the gateway (record to shadow).

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Headers that describe one connection, never the message (RFC 9110 section 7.6.1), which a
/// proxy must not forward. `te` is handled apart: `te: trailers` is kept (gRPC needs it).
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `%XX` sequences decoded (as UTF-8, lossily; an invalid sequence is kept as written, and `+`
/// stays `+`): query parameter names compared by meaning, HAR query values as browsers show them.
/// Text without `%` is returned as it is, without a copy.
pub fn percent_decode(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Removes hop-by-hop headers, including every header named in `Connection`, and keeps the
/// order of the rest.
///
/// `HeaderMap::remove` fills the hole with the last entry, which reorders what follows; a
/// primary's response must reach the client in the order it was sent, so when anything is to be
/// removed the map is rebuilt in order instead. (Lines of one name stay together, in their own
/// order: `HeaderMap` groups them, so interleaving with other names is not kept.)
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them (a `Connection` naming others is one of them): one pass
    // over the names tells, before anything is collected.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == header::TE)
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let te_trailers_only = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let remove = |name: &HeaderName| {
        named.contains(name)
            || HOP_BY_HOP.contains(name)
            || (name == header::TE && !te_trailers_only)
    };
    remove_in_order(headers, remove);
}

/// Removes every field whose name `remove` picks, keeping the order of the rest (see
/// [`remove_hop_by_hop`] for why `HeaderMap::remove` will not do). Costs nothing when no name
/// matches.
pub fn remove_in_order(headers: &mut HeaderMap, remove: impl Fn(&HeaderName) -> bool) {
    if !headers.keys().any(&remove) {
        return;
    }
    let mut kept = HeaderMap::with_capacity(headers.len());
    let mut current: Option<HeaderName> = None;
    for (name, value) in std::mem::take(headers) {
        // `into_iter` names each group's first value only.
        if let Some(name) = name {
            current = Some(name);
        }
        match &current {
            Some(name) if !remove(name) => {
                kept.append(name.clone(), value);
            }
            _ => {}
        }
    }
    *headers = kept;
}

/// The forwarding headers a proxy adds to every request of one client connection
/// (`x-forwarded-for` with the client's address, `via` with this hop), made once per connection:
/// formatting the address per request cost more than the rest of the header handling.
#[derive(Debug, Clone)]
pub struct Forwarding {
    client: HeaderValue,
}

impl Forwarding {
    /// The headers for a connection from `client`.
    pub fn new(client: IpAddr) -> Self {
        let client = HeaderValue::from_str(&client.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { client }
    }

    /// The client's address, as `x-forwarded-for` gets it.
    pub fn client(&self) -> &HeaderValue {
        &self.client
    }

    /// Adds the client's address to `x-forwarded-for` and this hop to `via` (a list already
    /// there is folded into one line and extended). `version` is the request's, which `via`
    /// names.
    pub fn apply(&self, headers: &mut HeaderMap, version: Version) {
        append_list(headers, X_FORWARDED_FOR, &self.client);
        let via = HeaderValue::from_static(match version {
            Version::HTTP_10 => "1.0 teeway",
            Version::HTTP_2 => "2 teeway",
            Version::HTTP_3 => "3 teeway",
            _ => "1.1 teeway",
        });
        append_list(headers, header::VIA, &via);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Appends `item` to a comma-separated list header, folding existing lines into one. Without
/// existing lines, `item` is inserted as it is (no copy).
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &HeaderValue) {
    let mut existing = headers.get_all(&name).iter().peekable();
    if existing.peek().is_none() {
        headers.insert(name, item.clone());
        return;
    }
    let mut joined = Vec::new();
    for v in existing {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(item.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn removal_keeps_the_order_of_the_rest() {
        let mut h = HeaderMap::new();
        h.append("x-first", HeaderValue::from_static("1"));
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append("x-second", HeaderValue::from_static("2"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.append("x-third", HeaderValue::from_static("3"));
        remove_hop_by_hop(&mut h);
        let order: Vec<(&str, &str)> = h
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().expect("ascii")))
            .collect();
        assert_eq!(
            order,
            [
                ("x-first", "1"),
                ("x-second", "2"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("x-third", "3"),
            ]
        );
    }

    #[test]
    fn keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut h);
        assert_eq!(
            h.get(header::TE).map(HeaderValue::as_bytes),
            Some(&b"trailers"[..])
        );
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        let forwarding = Forwarding::new("192.0.2.7".parse().expect("ip"));
        forwarding.apply(&mut h, Version::HTTP_11);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h[header::VIA], "1.1 teeway");
        let mut fresh = HeaderMap::new();
        Forwarding::new("2001:db8::1".parse().expect("ip")).apply(&mut fresh, Version::HTTP_2);
        assert_eq!(fresh["x-forwarded-for"], "2001:db8::1");
        assert_eq!(fresh[header::VIA], "2 teeway");
    }
}

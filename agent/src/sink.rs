//! The mirror sink: takes the copies an existing ingress already sends (nginx `mirror`, Envoy
//! `request_mirror_policies`, Istio `mirror:`) and forwards them like captured ones.
//!
//! Each request that arrives is a copy already: it is admitted by the same mirror policy
//! (sampling, rules, redaction, body limit) and counted in the same identity as a request the
//! proxy captured, its body is read (copied up to `max_body_bytes`, the rest read and thrown
//! away, so memory stays bounded) and it is answered `204 No Content` at once: nothing waits for
//! the gateway. An empty answer also lets nginx keep its mirror connection open (its mirror
//! subrequest never reads a body).
//!
//! Envoy, and Istio with it, append `-shadow` to the Host of what they mirror
//! (`api.example.com` becomes `api.example.com-shadow`), which breaks host-based routing at the
//! gateway. The sink strips that suffix (configurable, `""` keeps the Host as received) from the
//! host part of `Host` and of the HTTP/2 `:authority`, before the policy sees the request.
//!
//! No forwarding headers are added: the peer is the ingress, and the ingress already says who
//! the client was (`X-Forwarded-For` and the like travel with the copy, subject to redaction).

use std::sync::Arc;

use http::uri::Authority;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;

use teeway_runtime::proxy::remove_hop_by_hop;

use crate::downstream::ProxyBody;
use crate::tee::Tee;

/// Answers mirror feeds at once and tees what they carry.
#[derive(Debug)]
pub struct Sink {
    tee: Arc<Tee>,
    /// Removed from the end of the host; empty: Host kept as received.
    strip_host_suffix: Arc<str>,
}

impl Sink {
    /// A sink teeing into `tee`, stripping `strip_host_suffix` from hosts.
    pub fn new(tee: Arc<Tee>, strip_host_suffix: &str) -> Self {
        Self {
            tee,
            strip_host_suffix: strip_host_suffix.into(),
        }
    }

    /// Takes one mirrored request: admits it, reads its body, answers `204`.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        if !self.strip_host_suffix.is_empty() {
            if let Some(host) = parts.headers.get(header::HOST) {
                if let Some(stripped) = strip_host(host.as_bytes(), &self.strip_host_suffix) {
                    if let Ok(value) = HeaderValue::from_bytes(stripped.as_bytes()) {
                        parts.headers.insert(header::HOST, value);
                    }
                }
            }
            if let Some(uri) = strip_authority(&parts.uri, &self.strip_host_suffix) {
                parts.uri = uri;
            }
        }
        let copy = self
            .tee
            .admit(&parts.method, &parts.uri, parts.version, &parts.headers);
        // Reading the body to its end is what completes the copy; past the limit the tee stops
        // copying and the rest is only read.
        let mut body = self.tee.body(body, copy);
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                // The ingress went away mid-body; the tee has counted the copy's fate.
                tracing::debug!(error = %e, "mirrored request body ended early");
                break;
            }
        }
        let mut resp = Response::new(Either::Right(Full::default()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        resp
    }
}

/// `host[:port]` with `suffix` removed from the end of the host part; `None` when it is not
/// there (or nothing would be left of the host). Also takes the suffix after the port
/// (`host:8080-shadow`), as some Envoy versions wrote it.
pub fn strip_host(value: &[u8], suffix: &str) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    if let Some(host) = value.strip_suffix(suffix) {
        if !host.is_empty() && !host.ends_with(':') {
            return Some(host.to_owned());
        }
    }
    // The port, if any, follows the last ':' outside an IPv6 literal's brackets.
    let (host, port) = match value.rfind(':') {
        Some(i) if !value[i..].contains(']') => (&value[..i], Some(&value[i..])),
        _ => (value, None),
    };
    let host = host.strip_suffix(suffix).filter(|h| !h.is_empty())?;
    Some(format!("{host}{}", port.unwrap_or("")))
}

fn strip_authority(uri: &Uri, suffix: &str) -> Option<Uri> {
    let authority = uri.authority()?;
    let stripped = strip_host(authority.as_str().as_bytes(), suffix)?;
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(stripped.parse::<Authority>().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_suffix_leaves_the_host_wherever_envoy_put_it() {
        let s = |v: &str| strip_host(v.as_bytes(), "-shadow");
        assert_eq!(
            s("api.example.com-shadow").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            s("api.example.com-shadow:8080").as_deref(),
            Some("api.example.com:8080")
        );
        assert_eq!(
            s("api.example.com:8080-shadow").as_deref(),
            Some("api.example.com:8080")
        );
        assert_eq!(s("[::1]:80"), None);
        assert_eq!(s("[::1]").as_deref(), None);
        assert_eq!(s("api.example.com"), None);
        assert_eq!(s("api.example.com:8080"), None);
        assert_eq!(s("-shadow"), None, "nothing left");
        assert_eq!(s("-shadow:80"), None, "nothing left");
        assert_eq!(
            strip_host(b"orders.mirror", ".mirror").as_deref(),
            Some("orders")
        );
    }

    #[test]
    fn the_authority_of_an_http2_request_is_stripped_too() {
        let uri: Uri = "http://grpc.internal-shadow:50051/echo.Echo/Say"
            .parse()
            .expect("uri");
        let stripped = strip_authority(&uri, "-shadow").expect("stripped");
        assert_eq!(
            stripped.to_string(),
            "http://grpc.internal:50051/echo.Echo/Say"
        );
        let origin: Uri = "/only/a/path".parse().expect("uri");
        assert_eq!(strip_authority(&origin, "-shadow"), None);
    }
}

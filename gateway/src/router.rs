//! Routing: which shadow targets a mirrored request is replayed to. First match wins.

use std::sync::Arc;

use teeway_wire::MirroredRequest;

use crate::config::RouteMatch;
use crate::replay::Target;

/// A route ready to dispatch to.
#[derive(Debug)]
pub struct Route {
    /// What it takes; `None` takes everything.
    pub matcher: Option<RouteMatch>,
    /// Where matching records go.
    pub targets: Vec<Arc<Target>>,
}

/// The routing table.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// A table over `routes`, in order.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes }
    }

    /// Whether there are no routes (a capture-only gateway).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route that takes `record`.
    pub fn route(&self, record: &MirroredRequest) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matcher.as_ref().is_none_or(|m| matches(m, record)))
    }
}

fn matches(m: &RouteMatch, record: &MirroredRequest) -> bool {
    if let Some(want) = &m.host {
        let Some(host) = record.host() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let ok = match want.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host[..host.len() - suffix.len()].ends_with('.')
            }
            None => host == *want,
        };
        if !ok {
            return false;
        }
    }
    if let Some(prefix) = &m.path_prefix {
        if !record.path().starts_with(prefix.as_str()) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method, Uri, Version};
    use std::time::UNIX_EPOCH;

    fn record(host: &str, path: &'static str) -> MirroredRequest {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().expect("host"));
        MirroredRequest {
            id: 1,
            received_at: UNIX_EPOCH,
            source_cluster: "c".into(),
            method: Method::GET,
            uri: Uri::from_static(path),
            version: Version::HTTP_11,
            headers,
            body: bytes::Bytes::new(),
            trailers: None,
            body_truncated: false,
        }
    }

    fn m(host: Option<&str>, prefix: Option<&str>) -> RouteMatch {
        RouteMatch {
            host: host.map(Into::into),
            path_prefix: prefix.map(Into::into),
        }
    }

    #[test]
    fn host_and_prefix_must_both_hold() {
        let rule = m(Some("api.example.com"), Some("/v1"));
        assert!(matches(&rule, &record("api.example.com", "/v1/items")));
        assert!(matches(&rule, &record("API.example.com:8080", "/v1")));
        assert!(!matches(&rule, &record("api.example.com", "/v2/items")));
        assert!(!matches(&rule, &record("www.example.com", "/v1/items")));
    }

    #[test]
    fn wildcard_hosts_need_a_label() {
        let rule = m(Some("*.example.com"), None);
        assert!(matches(&rule, &record("a.example.com", "/")));
        assert!(matches(&rule, &record("a.b.example.com", "/")));
        assert!(!matches(&rule, &record("example.com", "/")));
        assert!(!matches(&rule, &record("badexample.com", "/")));
    }

    #[test]
    fn first_match_wins() {
        let router = Router::new(vec![
            Route {
                matcher: Some(m(None, Some("/v1"))),
                targets: vec![],
            },
            Route {
                matcher: None,
                targets: vec![],
            },
        ]);
        let first = router.route(&record("x", "/v1/a")).expect("route");
        assert!(first.matcher.is_some());
        let fallback = router.route(&record("x", "/v2")).expect("route");
        assert!(fallback.matcher.is_none());
    }
}

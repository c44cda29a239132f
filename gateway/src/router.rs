//! Routing: which shadow targets a mirrored request is replayed to. First match wins.
//!
//! A route matches on the source cluster (the agent identity from its client certificate, not
//! what the agent says of itself) and on the request's host, path, methods and headers.

use std::sync::Arc;

use teeway_wire::MirroredRequest;

use crate::config::{identity_matches, RouteMatch};
use crate::metrics::TargetMetrics;
use crate::replay::Target;

/// A route ready to dispatch to.
#[derive(Debug)]
pub struct Route {
    /// Its name (`routes[i]` when none was given).
    pub name: String,
    /// What it takes; `None` takes everything.
    pub matcher: Option<RouteMatch>,
    /// Where matching records go, each with its (route, target) metrics.
    pub targets: Vec<(Arc<Target>, Arc<TargetMetrics>)>,
    /// Whether copies with truncated bodies are replayed.
    pub replay_truncated: bool,
    /// `compare:`: its targets' answers compared.
    pub compare: Option<Arc<crate::compare::RouteCompare>>,
}

/// The routing table.
#[derive(Debug, Default)]
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

    /// Every target of every route (to reuse them across a reload).
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.routes
            .iter()
            .flat_map(|r| r.targets.iter().map(|(t, _)| t))
    }

    /// The comparison of the route named `name`, if it compares.
    pub fn compare_of(&self, name: &str) -> Option<&Arc<crate::compare::RouteCompare>> {
        self.routes
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.compare.as_ref())
    }

    /// All routes' comparisons.
    pub fn compares(&self) -> impl Iterator<Item = &Arc<crate::compare::RouteCompare>> {
        self.routes.iter().filter_map(|r| r.compare.as_ref())
    }

    /// The first route that takes `record`, sent by the agent `identity`.
    pub fn route(&self, record: &MirroredRequest, identity: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            r.matcher
                .as_ref()
                .is_none_or(|m| matches(m, record, identity))
        })
    }
}

fn matches(m: &RouteMatch, record: &MirroredRequest, identity: &str) -> bool {
    (m.source_clusters.is_empty()
        || m.source_clusters
            .iter()
            .any(|p| identity_matches(p, identity)))
        && m.request.matches(
            &record.method,
            record.host(),
            record.path(),
            &record.headers,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method, Uri, Version};
    use std::time::UNIX_EPOCH;
    use teeway_runtime::matching::{HostMatch, PathMatch, RequestMatch};

    fn record(host: &str, path: &'static str) -> MirroredRequest {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().expect("host"));
        MirroredRequest {
            meta: teeway_wire::Meta::basic(1, UNIX_EPOCH, "self-declared".into()),
            method: Method::GET,
            uri: Uri::from_static(path),
            version: Version::HTTP_11,
            headers,
            body: bytes::Bytes::new(),
            trailers: None,
            body_truncated: false,
            production: None,
        }
    }

    fn route(name: &str, matcher: Option<RouteMatch>) -> Route {
        Route {
            name: name.into(),
            matcher,
            targets: vec![],
            replay_truncated: false,
            compare: None,
        }
    }

    #[test]
    fn first_match_wins_and_source_cluster_is_the_identity() {
        let router = Router::new(vec![
            route(
                "eu-v1",
                Some(RouteMatch {
                    source_clusters: vec!["prod-eu-*".into()],
                    request: RequestMatch {
                        host: Some(HostMatch::Exact("api.example.com".into())),
                        path: Some(PathMatch::Prefix("/v1".into())),
                        ..RequestMatch::default()
                    },
                }),
            ),
            route(
                "v1",
                Some(RouteMatch {
                    source_clusters: vec![],
                    request: RequestMatch {
                        path: Some(PathMatch::Prefix("/v1".into())),
                        ..RequestMatch::default()
                    },
                }),
            ),
            route("rest", None),
        ]);
        let r = record("API.example.com:8080", "/v1/items");
        assert_eq!(router.route(&r, "prod-eu-1").expect("route").name, "eu-v1");
        // The record's self-declared cluster is not what is matched.
        assert_eq!(router.route(&r, "prod-us-1").expect("route").name, "v1");
        assert_eq!(
            router
                .route(&record("x", "/v2"), "prod-eu-1")
                .expect("route")
                .name,
            "rest"
        );
    }
}

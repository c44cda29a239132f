//! The admin HTTP listener: `GET /metrics`, `/healthz`, `/readyz`, `/config`.
//!
//! It runs on its own port so that scrapes and probes never compete with production traffic, and
//! it answers HTTP/1.1 only. `/healthz` is 200 while the process serves; `/readyz` is 200 only
//! while [`AdminState::ready`] says so (for the agent: while its uplink is connected).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Registry;

/// What the admin listener reports on.
pub trait AdminState: Send + Sync + 'static {
    /// The instance's metrics.
    fn registry(&self) -> &Registry;
    /// Whether the instance is ready for traffic.
    fn ready(&self) -> bool;
    /// Extra text for `/readyz`: why it is or is not ready.
    fn readiness_detail(&self) -> String {
        String::new()
    }
    /// The configuration in force, as JSON (see [`crate::reload::ConfigState::render`]).
    fn config(&self) -> Option<String> {
        None
    }
    /// Another endpoint of this instance at `path` (`query`: its query string, still
    /// percent-encoded); `None` when it has none there.
    fn page(&self, _path: &str, _query: Option<&str>) -> Option<Page> {
        None
    }
}

/// What an instance's own endpoint answers.
#[derive(Debug)]
pub struct Page {
    /// The status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Page {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }
}

/// The address of an optional admin listener, for start-up logs (empty when there is none).
pub fn listen_addr(listener: Option<&TcpListener>) -> String {
    listener
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "none".to_owned(), |a| a.to_string())
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<dyn AdminState>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&*state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = conn => if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                },
                () = shutdown.cancelled() => {}
            }
        });
    }
}

fn respond(state: &dyn AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, state.registry().render());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/config" => match state.config() {
            Some(json) => {
                let mut resp = text(StatusCode::OK, json);
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                resp
            }
            None => text(StatusCode::NOT_FOUND, "no configuration to show\n".into()),
        },
        "/readyz" => {
            let detail = state.readiness_detail();
            if state.ready() {
                text(StatusCode::OK, format!("ready {detail}\n"))
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready {detail}\n"),
                )
            }
        }
        path => match state.page(path, req.uri().query()) {
            Some(page) => {
                let mut resp = text(page.status, page.body);
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(page.content_type),
                );
                resp
            }
            None => text(
                StatusCode::NOT_FOUND,
                "try /metrics, /healthz, /readyz or /config\n".into(),
            ),
        },
    }
}

/// The value of `name` in a query string (`a=1&b=x%20y`), percent-decoded (`+` is a space);
/// `None` when absent or not UTF-8 once decoded.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let raw = query?.split('&').find_map(|pair| {
        pair.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
    })?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        let q = Some("route=api&endpoint=GET+%2Fusers%2F%7Bid%7D&x");
        assert_eq!(
            query_value(q, "endpoint").as_deref(),
            Some("GET /users/{id}")
        );
        assert_eq!(query_value(q, "route").as_deref(), Some("api"));
        assert_eq!(query_value(q, "x"), None);
        assert_eq!(query_value(Some("a=%zz"), "a"), None);
        assert_eq!(query_value(None, "a"), None);
    }
}

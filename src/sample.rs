//! Sample services for `teeway demo` and the end-to-end tests: a primary that answers with a
//! digest of what it received, and a shadow that records every request it is sent.
//!
//! Both speak HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, like a real service
//! behind the agent might.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running sample service; stops when dropped.
#[derive(Debug)]
pub struct Service {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Service {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits for the accept loop to end.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the sample primary answers: method, target, body length and an FNV-1a digest of the
/// body, so a client can check that the primary saw exactly what it sent.
pub fn primary_answer(method: &Method, target: &str, body: &[u8]) -> String {
    format!("{method} {target} {} {:016x}\n", body.len(), fnv1a(body))
}

/// FNV-1a, 64 bits: a small stable digest for comparing bodies in summaries.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Starts the sample primary on `127.0.0.1:0`.
pub async fn start_primary() -> std::io::Result<Service> {
    serve(
        |req: Request<Incoming>| async move {
            let method = req.method().clone();
            let target = req
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(primary_answer(
                &method, &target, &body,
            ))));
            resp.headers_mut().insert(
                "x-served-by",
                http::HeaderValue::from_static("sample-primary"),
            );
            resp
        },
        "127.0.0.1",
    )
    .await
}

/// One request as the shadow received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: Method,
    /// Request target.
    pub uri: Uri,
    /// Version it arrived in.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// When the request head reached the shadow.
    pub arrived: std::time::Instant,
}

/// The shadow's log of requests.
#[derive(Debug, Clone)]
pub struct Recording {
    requests: Arc<Mutex<Vec<Recorded>>>,
    count_tx: Arc<watch::Sender<usize>>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Recording {
    /// Waits until at least `n` requests were recorded, or `limit` passes; returns how many were.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> usize {
        let mut rx = self.count_tx.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|count| *count >= n)).await;
        let count = *rx.borrow();
        count
    }

    /// Everything recorded so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many requests were recorded.
    pub fn count(&self) -> usize {
        *self.count_tx.borrow()
    }

    /// How many requests were answered (after the shadow's delay).
    pub fn answered(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Starts a recording shadow on `127.0.0.1:0` that answers `200 shadow ok` after `delay`.
pub async fn start_shadow(delay: Duration) -> std::io::Result<(Service, Recording)> {
    start_shadow_on("127.0.0.1", delay).await
}

/// As [`start_shadow`], listening on `ip` (port 0).
pub async fn start_shadow_on(ip: &str, delay: Duration) -> std::io::Result<(Service, Recording)> {
    let recording = Recording {
        requests: Arc::new(Mutex::new(Vec::new())),
        count_tx: Arc::new(watch::channel(0).0),
        answered: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let log = recording.clone();
    let service = serve(
        move |req: Request<Incoming>| {
            let log = log.clone();
            async move {
                let arrived = std::time::Instant::now();
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                if let Ok(mut requests) = log.requests.lock() {
                    requests.push(Recorded {
                        method: parts.method,
                        uri: parts.uri,
                        version: parts.version,
                        headers: parts.headers,
                        body,
                        arrived,
                    });
                    log.count_tx.send_replace(requests.len());
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                log.answered
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut resp = Response::new(Full::new(Bytes::from_static(b"shadow ok\n")));
                *resp.status_mut() = StatusCode::OK;
                resp
            }
        },
        ip,
    )
    .await?;
    Ok((service, recording))
}

async fn serve<F, Fut>(handler: F, ip: &str) -> std::io::Result<Service>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // As permissive as nginx: many header lines are legal (hyper refuses more than 100).
        builder.http1().max_headers(4096);
        loop {
            let stream = tokio::select! {
                () = token.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let handler = handler.clone();
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let token = token.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = conn => {},
                    () = token.cancelled() => {},
                }
            });
        }
    });
    Ok(Service {
        addr,
        stop,
        task: Some(task),
    })
}

//! Replaying a mirrored request to a shadow target, then reading the response to the end and
//! dropping it.
//!
//! Each target has its own pooled hyper clients (HTTP/1.1, and HTTP/2 with prior knowledge, as the
//! route's `protocol` says) and its own concurrency limit. A record that finds every slot taken
//! waits for one, briefly ([`SLOT_WAIT`]) and only while fewer than [`WAITING_PER_SLOT`] records
//! per slot ([`MAX_WAITING`] at most), and [`WAITING_BYTES`], are waiting already; otherwise it is dropped and counted as
//! `overloaded`. Batches arriving together (an agent has several in flight, of up to 256 records
//! each) no longer lose their tails to a shadow that keeps up, and a slow shadow still cannot make
//! the gateway hoard: what waits is bounded in count and bytes, and for 200 ms at most.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use teeway_archive::{ResponseOrigin, ResponseRecord};
use teeway_runtime::config::UpstreamProtocol;
use teeway_runtime::connect::{TlsSetup, UpstreamConnector};
use teeway_runtime::dns::Resolver;
use teeway_runtime::proxy::remove_hop_by_hop;
use teeway_wire::MirroredRequest;

use crate::config::{HostPolicy, RateLimit, Rewrite, TargetConfig};
use crate::metrics::{FailReason, GatewayMetrics, TargetMetrics};

/// How long an idle pooled connection to a shadow is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// How long one connection attempt to a shadow may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type ShadowClient = Client<UpstreamConnector, RecordBody>;

/// A copy's body as the shadow gets it: the bytes, then the trailers the client sent, if any.
/// With trailers the length is left unknown, so HTTP/1.1 sends the body chunked and the trailers
/// after it (hyper sends those the copy's `Trailer` header declares, as RFC 9110 §6.6.2 asks).
pub struct RecordBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl RecordBody {
    /// The body of `record`.
    pub fn of(record: &MirroredRequest) -> Self {
        Self {
            data: Some(record.body.clone()).filter(|b| !b.is_empty()),
            trailers: record.trailers.clone(),
        }
    }
}

impl http_body::Body for RecordBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = match self.data.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => self.trailers.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.data, &self.trailers) {
            (data, None) => {
                http_body::SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            (_, Some(_)) => http_body::SizeHint::default(),
        }
    }
}

/// Everything that defines a target: two targets with equal specs are interchangeable, so a
/// reload keeps the old one (its pooled connections, its slots, its tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSpec {
    /// URL, share, timeout, concurrency, rate limit.
    pub target: TargetConfig,
    /// HTTP version spoken to it.
    pub protocol: UpstreamProtocol,
    /// What the replayed request looks like.
    pub rewrite: Rewrite,
}

/// How long a record that finds every slot of its target taken may wait for one. Long enough
/// for a shadow that keeps up to work through batches that landed together (with 50 ms, HTTP/2
/// and gRPC clients in tests/bench, scenarios 10 and 13, still lost 0.2-0.5% of their copies;
/// with 200 ms, none); short enough that a stalled shadow sheds what it cannot take.
pub const SLOT_WAIT: Duration = Duration::from_millis(200);

/// Records that may wait for a slot, per slot of the target (`max_concurrency`). An agent may
/// have 32 batches of up to 256 records in flight, and they can land together: with as many
/// waiting as slots, scenario 5 of tests/bench shed 17 copies in 115,000; with 4 per slot,
/// HTTP/2 and gRPC clients (scenarios 10, 13) still lost 0.6%.
pub const WAITING_PER_SLOT: usize = 16;

/// Records that may wait for a slot, per target, whatever `max_concurrency` is (up to 65,536):
/// each waiting record is a task with its decoded head, more than its bytes on the wire.
pub const MAX_WAITING: usize = 4096;

/// Bytes of records (as framed on the wire) that may wait for a slot, per target: what bounds
/// the waiting records' memory, whatever their count.
pub const WAITING_BYTES: u64 = 16 * 1024 * 1024;

/// A record's place at a target, as [`Target::admit`] grants it.
#[derive(Debug)]
pub enum Slot {
    /// A slot, free when it was asked for.
    Held(OwnedSemaphorePermit),
    /// A place among the records waiting for a slot.
    Waiting(WaitingSlot),
}

/// The records waiting for a target's slots: how many, and their bytes.
#[derive(Debug, Default)]
struct Waiting {
    count: AtomicUsize,
    bytes: AtomicU64,
}

/// A record waiting for a slot; counted among the target's waiting records until dropped.
#[derive(Debug)]
pub struct WaitingSlot {
    limit: Arc<Semaphore>,
    waiting: Arc<Waiting>,
    bytes: u64,
}

impl Drop for WaitingSlot {
    fn drop(&mut self) {
        self.waiting.count.fetch_sub(1, Ordering::Relaxed);
        self.waiting.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Slot {
    /// Whether the slot was free at once (not a place among those waiting for one).
    pub fn is_held(&self) -> bool {
        matches!(self, Slot::Held(_))
    }

    /// The slot: at once, or after waiting up to [`SLOT_WAIT`]; `None` if none came free.
    pub async fn take(self) -> Option<OwnedSemaphorePermit> {
        match self {
            Slot::Held(permit) => Some(permit),
            Slot::Waiting(waiting) => {
                let permit =
                    tokio::time::timeout(SLOT_WAIT, waiting.limit.clone().acquire_owned()).await;
                drop(waiting);
                permit.ok().and_then(Result::ok)
            }
        }
    }
}

/// One shadow service of one route.
pub struct Target {
    /// The URL as configured.
    pub url: String,
    spec: TargetSpec,
    authority: Authority,
    http1: ShadowClient,
    http2: ShadowClient,
    limit: Arc<Semaphore>,
    /// Records waiting for a slot of `limit` (at most [`WAITING_PER_SLOT`] per slot), and their
    /// bytes (at most [`WAITING_BYTES`]).
    waiting: Arc<Waiting>,
    /// A draw below this is replayed; `None` replays all.
    sample_below: Option<u64>,
    bucket: Option<Mutex<Bucket>>,
    /// When the target last shed a record for want of a slot, in milliseconds since `born`
    /// (0: never): see [`Target::shedding`].
    shed_at: AtomicU64,
    born: Instant,
}

/// How long a target that shed a record for want of a slot counts as shedding: the longest a
/// record waits for a slot.
pub const SHEDDING_FOR: Duration = SLOT_WAIT;

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A token bucket, refilled on use.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    limit: RateLimit,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens =
            (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a [`Target`] could not be built from its (validated) configuration.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL's host and port do not form a URI authority.
    #[error("target `{0}`: cannot be used as a URI authority: {1}")]
    Authority(String, http::uri::InvalidUri),
    /// `tls.server_name` is not a name a certificate can carry.
    #[error("target `{0}`: tls.server_name: {1}")]
    ServerName(String, std::io::Error),
}

/// Why [`Target::admit`] turned a record away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The target's percentage passed it over.
    NotSampled,
    /// No token in the rate limit's bucket.
    RateLimited,
    /// `max_concurrency` replays under way, and [`WAITING_PER_SLOT`] times as many records
    /// waiting for a slot.
    Overloaded,
}

impl Target {
    /// A target with its own pools, limit and bucket.
    pub fn new(spec: TargetSpec, resolver: Resolver) -> Result<Self, TargetError> {
        let target = &spec.target.target;
        let authority: Authority = target
            .authority()
            .parse()
            .map_err(|e| TargetError::Authority(target.url.clone(), e))?;
        let tls = match &spec.target.tls {
            Some(tls) => Some(
                TlsSetup::new(tls.configs.clone(), &tls.server_name)
                    .map_err(|e| TargetError::ServerName(target.url.clone(), e))?,
            ),
            None => None,
        };
        let connector =
            UpstreamConnector::new(&target.host, target.port, resolver, CONNECT_TIMEOUT, tls);
        let client = |http2_only: bool| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE)
                .http2_only(http2_only)
                .build(connector.for_version(http2_only))
        };
        let percentage = spec.target.percentage;
        Ok(Self {
            url: target.url.clone(),
            authority,
            http1: client(false),
            http2: client(true),
            limit: Arc::new(Semaphore::new(spec.target.max_concurrency)),
            waiting: Arc::default(),
            sample_below: (percentage < 100.0).then(|| {
                ((percentage / 100.0).clamp(0.0, 1.0) * 18_446_744_073_709_551_616.0) as u64
            }),
            bucket: spec.target.rate_limit.map(|limit| {
                Mutex::new(Bucket {
                    tokens: f64::from(limit.burst),
                    at: Instant::now(),
                    limit,
                })
            }),
            shed_at: AtomicU64::new(0),
            born: Instant::now(),
            spec,
        })
    }

    /// Whether the target shed a record for want of a slot within [`SHEDDING_FOR`]: a record
    /// that must wait for a slot then will most likely be shed too.
    pub fn shedding(&self) -> bool {
        let at = self.shed_at.load(Ordering::Relaxed);
        at != 0 && self.millis() < at.saturating_add(SHEDDING_FOR.as_millis() as u64)
    }

    fn note_shed(&self) {
        self.shed_at.store(self.millis(), Ordering::Relaxed);
    }

    /// Milliseconds since the target was made, from 1.
    fn millis(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// What the target was built from.
    pub fn spec(&self) -> &TargetSpec {
        &self.spec
    }

    /// Decides, without waiting, whether `record` is replayed to this target: its share, then
    /// its rate limit, then a free slot, or a place among those waiting for one.
    pub fn admit(&self, record: &MirroredRequest) -> Result<Slot, Refusal> {
        if let Some(below) = self.sample_below {
            if fastrand::u64(..) >= below {
                return Err(Refusal::NotSampled);
            }
        }
        if let Some(bucket) = &self.bucket {
            // Held for a few arithmetic operations; never across an await.
            let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
            if !b.take(Instant::now()) {
                return Err(Refusal::RateLimited);
            }
        }
        if let Ok(permit) = self.limit.clone().try_acquire_owned() {
            return Ok(Slot::Held(permit));
        }
        let may_wait = (self.spec.target.max_concurrency * WAITING_PER_SLOT).min(MAX_WAITING);
        let bytes = record.frame_len() as u64;
        let waiting = &self.waiting;
        let count = waiting.count.fetch_add(1, Ordering::Relaxed);
        let held = waiting.bytes.fetch_add(bytes, Ordering::Relaxed);
        let slot = WaitingSlot {
            limit: self.limit.clone(),
            waiting: waiting.clone(),
            bytes,
        };
        if count >= may_wait || held + bytes > WAITING_BYTES {
            // Dropping the place gives both back.
            drop(slot);
            self.note_shed();
            return Err(Refusal::Overloaded);
        }
        Ok(Slot::Waiting(slot))
    }

    /// Waits for a replay slot (for `teeway replay`, which paces itself rather than shedding).
    pub async fn reserve(&self) -> OwnedSemaphorePermit {
        match self.limit.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("target semaphore closed"),
        }
    }

    /// Replays `record`, reads the response to the end, counts the outcome and returns it (with
    /// the response and up to `capture` bytes of its body, when `capture` is set). The caller
    /// counted the pair in `replay_in_flight` when [`Target::admit`] granted `slot`; it leaves
    /// that gauge here, once its outcome is counted. A record still waiting for its slot after
    /// [`SLOT_WAIT`] is counted `overloaded`.
    pub async fn replay(
        &self,
        record: &MirroredRequest,
        source: &str,
        (metrics, handles): (&GatewayMetrics, &TargetMetrics),
        capture: Option<u64>,
        slot: Slot,
    ) -> Result<Answer, FailReason> {
        let Some(_slot) = slot.take().await else {
            self.note_shed();
            metrics.failed(handles, FailReason::Overloaded);
            metrics.in_flight.decrement(1.0);
            return Err(FailReason::Overloaded);
        };
        let outcome = match self.send(record, source, capture).await {
            Ok(answer) => {
                handles.replayed(
                    answer.status,
                    answer.elapsed,
                    answer.grpc_status.as_ref().map(|v| v.as_bytes()),
                );
                Ok(answer)
            }
            Err(reason) => {
                metrics.failed(handles, reason);
                Err(reason)
            }
        };
        // Only after the outcome is counted: a scrape never sees the pair in neither bucket.
        metrics.in_flight.decrement(1.0);
        outcome
    }

    /// Sends `record` (mirrored from the agent `source`) and reads the response to the end.
    /// With `capture` set, the response is returned with up to that many body bytes; the rest is
    /// read and dropped.
    pub async fn send(
        &self,
        record: &MirroredRequest,
        source: &str,
        capture: Option<u64>,
    ) -> Result<Answer, FailReason> {
        let request = self
            .request_for(record, source)
            .ok_or(FailReason::InvalidRequest)?;
        let client = if request.version() == Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        };
        let started = Instant::now();
        let exchange = async {
            let response = client.request(request).await.map_err(|e| {
                tracing::debug!(shadow = %self.url, error = %e, "replay failed");
                if e.is_connect() {
                    FailReason::Connect
                } else {
                    FailReason::Error
                }
            })?;
            let head_at = (SystemTime::now(), started.elapsed());
            let (parts, mut body) = response.into_parts();
            // gRPC: in the trailers, or in the head of a trailers-only answer.
            let mut grpc_status = parts.headers.get(GRPC_STATUS).cloned();
            let limit = capture.unwrap_or(0) as usize;
            let mut kept = Vec::new();
            let mut truncated = false;
            // Drain: the shadow's answer is read so the connection can be reused.
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| FailReason::Error)?;
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(status) = trailers.get(GRPC_STATUS) {
                        grpc_status = Some(status.clone());
                    }
                }
                if let Some(data) = frame.data_ref() {
                    let room = limit.saturating_sub(kept.len());
                    if data.len() > room {
                        truncated |= capture.is_some();
                    }
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            let response = capture.map(|_| {
                Box::new(ResponseRecord {
                    meta: teeway_wire::Meta {
                        received_at: head_at.0,
                        ..record.meta.clone()
                    },
                    origin: ResponseOrigin::Replayed,
                    target: self.url.clone(),
                    latency: head_at.1,
                    status: parts.status,
                    version: parts.version,
                    headers: parts.headers,
                    body: Bytes::from(kept),
                    body_truncated: truncated,
                })
            });
            Ok((parts.status, response, grpc_status))
        };
        match tokio::time::timeout(self.spec.target.timeout, exchange).await {
            Ok(Ok((status, response, grpc_status))) => Ok(Answer {
                status,
                elapsed: started.elapsed(),
                response,
                grpc_status,
            }),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(FailReason::Timeout),
        }
    }

    /// The request the shadow receives: the record's method, target, headers and body, with the
    /// route's rewrites (Host policy, path prefix, headers set and removed, the marker header)
    /// and hop-by-hop headers removed.
    fn request_for(&self, record: &MirroredRequest, source: &str) -> Option<Request<RecordBody>> {
        let rewrite = &self.spec.rewrite;
        let host = || match (&rewrite.host, original_host(record)) {
            (HostPolicy::Keep, Some(h)) => h,
            (HostPolicy::AppendShadow, Some(h)) => append_shadow(&h),
            (HostPolicy::Literal(h), _) => h.clone(),
            (_, _) => self.authority.as_str().to_owned(),
        };
        let original = record
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let path = match &rewrite.path_prefix {
            Some((from, to)) if original.path().starts_with(from.as_str()) => {
                // Plain text replacement of the prefix, as Envoy's prefix_rewrite does.
                let rest = &original.as_str()[from.len()..];
                PathAndQuery::try_from(format!("{to}{rest}")).ok()?
            }
            _ => original,
        };
        let mut headers = record.headers.clone();
        remove_hop_by_hop(&mut headers);
        for name in &rewrite.remove_headers {
            headers.remove(name);
        }
        for (name, value) in &rewrite.set_headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(marker) = &rewrite.marker {
            headers.insert(marker.clone(), HeaderValue::from_str(source).ok()?);
        }
        if record.body_truncated && headers.contains_key(header::CONTENT_LENGTH) {
            // A body cut by the agent (or short in a capture) is sent as what it is: announced
            // at its real length, the shadow would wait for bytes that never come.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.body.len()));
        }
        let version = if self.spec.protocol.use_http2(record.version) {
            Version::HTTP_2
        } else if rewrite.keep_http10 && record.version == Version::HTTP_10 {
            // A 1.0 request replayed as 1.0: servers answer 1.0 differently (no chunking,
            // connection closed by default), and that difference is what is being tested. Unless
            // the client asked for keep-alive, the server closes after answering: say so, so the
            // connection is not pooled for the next request (which would fail on it).
            let keep_alive = record
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"keep-alive"));
            headers.insert(
                header::CONNECTION,
                HeaderValue::from_static(if keep_alive { "keep-alive" } else { "close" }),
            );
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let authority = if version == Version::HTTP_2 {
            // HTTP/2 carries the host in `:authority`, taken from the URI.
            headers.remove(header::HOST);
            host().parse::<Authority>().ok()?
        } else {
            // The usual case, the copy's own Host kept, is already in place.
            // (Unless `set_headers` or `remove_headers` changed it: the host policy wins.)
            let kept = matches!(rewrite.host, HostPolicy::Keep)
                && headers.get_all(header::HOST).iter().count() == 1
                && headers.get(header::HOST) == record.headers.get(header::HOST)
                && headers
                    .get(header::HOST)
                    .is_some_and(|h| h.to_str().is_ok());
            if !kept {
                headers.insert(header::HOST, HeaderValue::from_str(&host()).ok()?);
            }
            self.authority.clone()
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if self.spec.target.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        });
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        let mut request = Request::new(RecordBody::of(record));
        *request.method_mut() = record.method.clone();
        *request.uri_mut() = Uri::from_parts(parts).ok()?;
        *request.version_mut() = version;
        *request.headers_mut() = headers;
        Some(request)
    }
}

/// What one replay got back.
#[derive(Debug)]
pub struct Answer {
    /// The response status.
    pub status: http::StatusCode,
    /// From sending the request to the end of the response body.
    pub elapsed: Duration,
    /// The response, when asked for (boxed: most replays carry none).
    pub response: Option<Box<ResponseRecord>>,
    /// The `grpc-status` the shadow answered (trailers, or a trailers-only head), if any.
    pub grpc_status: Option<HeaderValue>,
}

/// gRPC's status trailer.
const GRPC_STATUS: &str = "grpc-status";

/// The Host the client addressed, port included: `Host` (HTTP/1) or the URI authority (HTTP/2).
fn original_host(record: &MirroredRequest) -> Option<String> {
    if let Some(host) = record
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        return Some(host.to_owned());
    }
    record.uri.authority().map(|a| a.as_str().to_owned())
}

/// `api.example.com:8080` becomes `api.example.com-shadow:8080`, as Envoy and Istio do.
fn append_shadow(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method};
    use std::time::UNIX_EPOCH;

    fn spec(rewrite: Rewrite) -> TargetSpec {
        let t = teeway_runtime::config::HttpTarget {
            host: "127.0.0.1".into(),
            port: 9100,
            tls: false,
            url: "http://127.0.0.1:9100".into(),
        };
        TargetSpec {
            target: TargetConfig::new(t),
            protocol: UpstreamProtocol::Auto,
            rewrite,
        }
    }

    fn target(policy: HostPolicy) -> Target {
        let resolver = Resolver::from_system().expect("resolver");
        Target::new(spec(Rewrite::host_only(policy)), resolver).expect("target")
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_target_lets_a_bounded_number_wait_briefly_and_sheds_the_rest() {
        let mut spec = spec(Rewrite::host_only(HostPolicy::Keep));
        spec.target.max_concurrency = 2;
        let resolver = Resolver::from_system().expect("resolver");
        let target = Target::new(spec, resolver).expect("target");
        let small = record(Version::HTTP_11, "/", Some("a"));
        let mut held: Vec<_> = (0..2)
            .map(|_| target.admit(&small).expect("free slot"))
            .collect();
        assert!(held.iter().all(|s| matches!(s, Slot::Held(_))));
        let mut waiting: Vec<_> = (0..2 * WAITING_PER_SLOT)
            .map(|_| target.admit(&small).expect("may wait"))
            .collect();
        assert!(waiting.iter().all(|s| matches!(s, Slot::Waiting(_))));
        assert!(!target.shedding(), "records waiting is not shedding");
        assert_eq!(
            target.admit(&small).err(),
            Some(Refusal::Overloaded),
            "waiting is bounded in count"
        );
        assert!(target.shedding(), "a record refused for want of a slot is");

        // A slot freed within the wait goes to a waiting record.
        let first = waiting.remove(0);
        let waiter = tokio::spawn(first.take());
        tokio::task::yield_now().await;
        drop(held.pop());
        let permit = waiter.await.expect("task");
        assert!(permit.is_some());
        // It left the waiting count: exactly one place is free again.
        let refill = target.admit(&small).expect("a place came free");
        assert!(matches!(refill, Slot::Waiting(_)));
        assert_eq!(target.admit(&small).err(), Some(Refusal::Overloaded));
        // One that no slot comes free for gives up after SLOT_WAIT, and leaves its place too.
        let started = tokio::time::Instant::now();
        assert!(refill.take().await.is_none());
        assert_eq!(started.elapsed(), SLOT_WAIT);
        let again = target.admit(&small).expect("a place came free");
        assert!(matches!(again, Slot::Waiting(_)));
        // In bytes: with places free, a record as large as the whole allowance does not wait.
        drop((again, waiting.pop()));
        let mut large = record(Version::HTTP_11, "/", Some("a"));
        large.body = Bytes::from(vec![0; WAITING_BYTES as usize]);
        assert_eq!(target.admit(&large).err(), Some(Refusal::Overloaded));
        assert!(matches!(target.admit(&small), Ok(Slot::Waiting(_))));
        drop((permit, held, waiting));
    }

    fn record(version: Version, uri: &'static str, host: Option<&'static str>) -> MirroredRequest {
        let mut headers = HeaderMap::new();
        if let Some(h) = host {
            headers.insert(header::HOST, HeaderValue::from_static(h));
        }
        headers.insert("x-keep", HeaderValue::from_static("1"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        MirroredRequest {
            meta: teeway_wire::Meta::basic(1, UNIX_EPOCH, "c".into()),
            method: Method::PUT,
            uri: Uri::from_static(uri),
            version,
            headers,
            body: Bytes::from_static(b"body"),
            trailers: None,
            body_truncated: false,
            production: None,
        }
    }

    #[tokio::test]
    async fn host_policies_on_http1() {
        let r = record(Version::HTTP_11, "/v1/x?q=1", Some("api.example.com:8080"));
        let keep = target(HostPolicy::Keep)
            .request_for(&r, "prod")
            .expect("request");
        assert_eq!(keep.headers()[header::HOST], "api.example.com:8080");
        assert_eq!(keep.uri(), "http://127.0.0.1:9100/v1/x?q=1");
        assert_eq!(keep.method(), Method::PUT);
        assert!(keep.headers().get(header::CONNECTION).is_none());
        assert_eq!(keep.headers()["x-keep"], "1");
        let t = target(HostPolicy::Target)
            .request_for(&r, "prod")
            .expect("request");
        assert_eq!(t.headers()[header::HOST], "127.0.0.1:9100");
        let s = target(HostPolicy::AppendShadow)
            .request_for(&r, "prod")
            .expect("request");
        assert_eq!(s.headers()[header::HOST], "api.example.com-shadow:8080");
    }

    #[tokio::test]
    async fn http2_records_carry_host_in_authority() {
        let r = record(Version::HTTP_2, "http://api.example.com/pkg.Svc/Call", None);
        let req = target(HostPolicy::Keep)
            .request_for(&r, "prod")
            .expect("request");
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://api.example.com/pkg.Svc/Call");
        assert!(req.headers().get(header::HOST).is_none());
    }

    #[tokio::test]
    async fn route_rewrites_apply() {
        let rewrite = Rewrite {
            host: HostPolicy::Literal("orders.test:81".into()),
            path_prefix: Some(("/v1".into(), "/v2".into())),
            set_headers: vec![(
                http::HeaderName::from_static("x-env"),
                HeaderValue::from_static("test"),
            )],
            remove_headers: vec![http::HeaderName::from_static("x-keep")],
            marker: Some(http::HeaderName::from_static("x-teeway-mirror")),
            keep_http10: false,
        };
        let t =
            Target::new(spec(rewrite), Resolver::from_system().expect("resolver")).expect("target");
        let r = record(Version::HTTP_11, "/v1/x?q=1", Some("api.example.com"));
        let req = t.request_for(&r, "prod-eu-1").expect("request");
        assert_eq!(req.uri(), "http://127.0.0.1:9100/v2/x?q=1");
        assert_eq!(req.headers()[header::HOST], "orders.test:81");
        assert_eq!(req.headers()["x-env"], "test");
        assert_eq!(req.headers()["x-teeway-mirror"], "prod-eu-1");
        assert!(req.headers().get("x-keep").is_none());
        let outside = record(Version::HTTP_11, "/v10/x", Some("a"));
        let req = t.request_for(&outside, "p").expect("request");
        assert_eq!(
            req.uri().path(),
            "/v20/x",
            "a prefix is text, as in the match"
        );
    }

    #[tokio::test]
    async fn a_kept_host_is_the_copys_even_if_set_headers_or_remove_headers_name_host() {
        for (set, remove) in [
            (
                vec![(header::HOST, HeaderValue::from_static("other.example"))],
                vec![],
            ),
            (vec![], vec![header::HOST]),
        ] {
            let rewrite = Rewrite {
                set_headers: set,
                remove_headers: remove,
                ..Rewrite::host_only(HostPolicy::Keep)
            };
            let t = Target::new(spec(rewrite), Resolver::from_system().expect("resolver"))
                .expect("target");
            let r = record(Version::HTTP_11, "/x", Some("api.example.com"));
            let req = t.request_for(&r, "prod").expect("request");
            assert_eq!(req.headers()[header::HOST], "api.example.com");
            assert_eq!(req.headers().get_all(header::HOST).iter().count(), 1);
        }
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            at: start,
            limit: RateLimit {
                per_second: 10.0,
                burst: 3,
            },
        };
        assert!((0..3).all(|_| b.take(start)));
        assert!(!b.take(start));
        assert!(b.take(start + Duration::from_millis(100)));
        assert!(!b.take(start + Duration::from_millis(150)));
        // Idle time fills up to the burst, no further.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    }

    #[test]
    fn append_shadow_keeps_port() {
        assert_eq!(append_shadow("a.example"), "a.example-shadow");
        assert_eq!(append_shadow("a.example:80"), "a.example-shadow:80");
    }
}

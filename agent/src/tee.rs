//! The tee: deciding which requests are copied, copying their bodies while they stream to the
//! primary, and handing finished copies to the uplink without ever waiting.
//!
//! Production never waits for the mirror. On the request path the tee does three things, none of
//! which can block or await: a sampling draw (a thread-local RNG), appending body chunks to a
//! buffer capped at `max_body_bytes` (over the cap, copying stops and the buffer is freed), and a
//! `try_send` into a bounded queue (full: the copy is dropped and counted).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use teeway_wire::MirroredRequest;
use tokio::sync::mpsc;

use crate::metrics::{Accounting, DropReason, Ticket};
use crate::uplink::UplinkState;
use teeway_archive::{Archive, Record};

/// Headers removed from every copy before it leaves the agent: credentials never leave
/// production. (The primary still receives them unchanged.)
pub const REDACTED_HEADERS: [http::HeaderName; 4] = [
    http::header::AUTHORIZATION,
    http::header::COOKIE,
    http::header::SET_COOKIE,
    http::header::PROXY_AUTHORIZATION,
];

/// Removes [`REDACTED_HEADERS`] from a copy's headers.
pub fn redact(headers: &mut HeaderMap) {
    for name in &REDACTED_HEADERS {
        headers.remove(name);
    }
}

/// Decides, per request, whether it is copied.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// A request is sampled when a uniform `u64` falls below this; `None` means always.
    threshold: Option<u64>,
}

impl Sampler {
    /// A sampler that copies `percentage` percent of requests (0 to 100, fractions allowed).
    pub fn new(percentage: f64) -> Self {
        if percentage >= 100.0 {
            return Self { threshold: None };
        }
        let fraction = (percentage / 100.0).clamp(0.0, 1.0);
        // 2^64 * fraction, computed in f64: precise to well below one in a million.
        let threshold = (fraction * 18_446_744_073_709_551_616.0) as u64;
        Self {
            threshold: Some(threshold),
        }
    }

    /// One draw.
    pub fn sample(&self) -> bool {
        match self.threshold {
            None => true,
            Some(0) => false,
            Some(t) => fastrand::u64(..) < t,
        }
    }
}

/// A finished copy on its way to the uplink, with its account.
#[derive(Debug)]
pub struct Queued {
    /// The copy.
    pub record: MirroredRequest,
    /// Its account, resolved by the uplink.
    pub ticket: Ticket,
}

/// The request-path side of the tee.
#[derive(Debug)]
pub struct Tee {
    /// Copies to the uplink task, which owns the receiving end.
    queue_tx: mpsc::Sender<Queued>,
    accounting: Arc<Accounting>,
    sampler: Sampler,
    max_body_bytes: usize,
    source_cluster: Arc<str>,
    next_id: AtomicU64,
    /// Read on every sampled request: with no uplink, a copy is dropped before it is made.
    /// `None` when copies go only to an archive.
    uplink: Option<Arc<UplinkState>>,
    /// When copies go to a gateway and an archive both: the archive's handle. Each queued copy
    /// is also offered to it (never waiting; its drops are the archive's own to count).
    archive_also: Option<Archive>,
}

/// What the tee needs to know of a request head.
#[derive(Debug)]
pub struct Head {
    /// Method.
    pub method: Method,
    /// Request target as received.
    pub uri: Uri,
    /// Version the client spoke.
    pub version: Version,
    /// Headers as forwarded to the primary.
    pub headers: HeaderMap,
    /// When the head arrived.
    pub received_at: SystemTime,
}

impl Tee {
    /// A tee feeding `queue_tx`.
    pub fn new(
        queue_tx: mpsc::Sender<Queued>,
        accounting: Arc<Accounting>,
        sampler: Sampler,
        max_body_bytes: u64,
        source_cluster: &str,
        uplink: Option<Arc<UplinkState>>,
        archive_also: Option<Archive>,
    ) -> Self {
        Self {
            queue_tx,
            accounting,
            sampler,
            max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
            source_cluster: source_cluster.into(),
            next_id: AtomicU64::new(1),
            uplink,
            archive_also,
        }
    }

    /// Counts the request and draws whether it is copied; `Some(ticket)` when it is.
    ///
    /// While the uplink is down a sampled request is counted as a `no_uplink` drop here, before
    /// any header is cloned or body byte copied: a dead gateway costs production nothing.
    pub fn admit(self: &Arc<Self>) -> Option<Ticket> {
        self.accounting.requests.increment(1);
        if !self.sampler.sample() {
            self.accounting.not_sampled.increment(1);
            return None;
        }
        let ticket = self.accounting.ticket();
        if self.uplink.as_ref().is_some_and(|u| !u.is_connected()) {
            ticket.dropped(DropReason::NoUplink);
            return None;
        }
        Some(ticket)
    }

    /// Wraps a request body so that it is copied as it streams to the primary.
    ///
    /// `copy` is the head and account of a sampled request, `None` for one passed over.
    pub fn body<B>(self: &Arc<Self>, inner: B, copy: Option<(Head, Ticket)>) -> TeeBody<B>
    where
        B: Body<Data = Bytes>,
    {
        let mut body = TeeBody {
            inner,
            capture: copy.map(|(head, ticket)| Capture {
                tee: self.clone(),
                head: Some(head),
                body: BytesMut::new(),
                trailers: None,
                ticket: Some(ticket),
            }),
        };
        if body.inner.is_end_stream() {
            // No body (a GET, say): hyper may never poll it, so the copy is complete now.
            if let Some(capture) = body.capture.take() {
                capture.finish();
            }
        }
        body
    }

    fn enqueue(&self, record: MirroredRequest, mut ticket: Ticket) {
        if let Err(reason) = ticket.hold(record.frame_len() as u64) {
            ticket.dropped(reason);
            return;
        }
        if let Some(archive) = &self.archive_also {
            archive.try_submit(Record::Request(record.clone()), None);
        }
        match self.queue_tx.try_send(Queued { record, ticket }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(q)) => q.ticket.dropped(DropReason::QueueFull),
            Err(mpsc::error::TrySendError::Closed(q)) => q.ticket.dropped(DropReason::Shutdown),
        }
    }
}

/// The copy being built while the body streams.
struct Capture {
    tee: Arc<Tee>,
    head: Option<Head>,
    body: BytesMut,
    trailers: Option<HeaderMap>,
    ticket: Option<Ticket>,
}

impl Capture {
    /// Appends a chunk; `false` when the body outgrew the limit (the copy is then dropped).
    fn push(&mut self, chunk: &[u8]) -> bool {
        if self.body.len() + chunk.len() > self.tee.max_body_bytes {
            if let Some(ticket) = self.ticket.take() {
                ticket.dropped(DropReason::BodyTooLarge);
            }
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }

    fn finish(mut self) {
        let (Some(head), Some(ticket)) = (self.head.take(), self.ticket.take()) else {
            return;
        };
        let record = MirroredRequest {
            id: self.tee.next_id.fetch_add(1, Ordering::Relaxed),
            received_at: head.received_at,
            source_cluster: self.tee.source_cluster.clone(),
            method: head.method,
            uri: head.uri,
            version: head.version,
            headers: head.headers,
            body: std::mem::take(&mut self.body).freeze(),
            trailers: self.trailers.take(),
            body_truncated: false,
        };
        self.tee.enqueue(record, ticket);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // Dropped before the body ended: the client went away, or the primary answered without
        // reading the whole body. The copy would be a lie, so it is counted and not sent.
        if let Some(ticket) = self.ticket.take() {
            ticket.dropped(DropReason::IncompleteBody);
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that passes every frame through unchanged and copies it on the side.
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        capture: Option<Capture>,
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(capture) = this.capture.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        if !capture.push(data) {
                            *this.capture = None;
                        }
                    } else if let Some(trailers) = frame.trailers_ref() {
                        capture.trailers = Some(trailers.clone());
                    }
                }
                if this.inner.is_end_stream() {
                    if let Some(capture) = this.capture.take() {
                        capture.finish();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(capture) = this.capture.take() {
                    capture.finish();
                }
            }
            // An error ends the copy as incomplete (through Capture's Drop).
            Poll::Ready(Some(Err(_))) => *this.capture = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use teeway_runtime::metrics::Snapshot;

    #[test]
    fn sampler_extremes_and_rate() {
        assert!((0..1000).all(|_| Sampler::new(100.0).sample()));
        assert!((0..1000).all(|_| !Sampler::new(0.0).sample()));
        fastrand::seed(7);
        let s = Sampler::new(25.0);
        let n = 200_000;
        let hits = (0..n).filter(|_| s.sample()).count() as f64;
        // Binomial sd = sqrt(n p (1-p)) ~ 194; allow 5 sd.
        assert!((hits - 50_000.0).abs() < 1_000.0, "hits {hits}");
    }

    fn head() -> Head {
        Head {
            method: Method::POST,
            uri: Uri::from_static("/x"),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            received_at: SystemTime::now(),
        }
    }

    fn tee(queue: usize, max_body: u64) -> (Arc<Tee>, mpsc::Receiver<Queued>, Arc<Accounting>) {
        let acc = Arc::new(Accounting::new(1 << 20));
        let (tx, rx) = mpsc::channel(queue);
        let uplink = Arc::new(UplinkState::default());
        uplink.set(true);
        (
            Arc::new(Tee::new(
                tx,
                acc.clone(),
                Sampler::new(100.0),
                max_body,
                "c",
                Some(uplink),
                None,
            )),
            rx,
            acc,
        )
    }

    fn dropped(acc: &Accounting, reason: &str) -> f64 {
        Snapshot::parse(&acc.registry().render()).get(&format!(
            "teeway_agent_mirror_dropped_total{{reason=\"{reason}\"}}"
        ))
    }

    #[tokio::test]
    async fn body_streams_through_and_copy_is_identical() {
        let (tee, mut rx, _) = tee(4, 1024);
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
        ];
        let ticket = tee.admit();
        let body = tee.body(
            StreamBody::new(futures_util::stream::iter(chunks)),
            ticket.map(|t| (head(), t)),
        );
        let passed = body.collect().await.expect("body").to_bytes();
        assert_eq!(&passed[..], b"hello world");
        let q = rx.try_recv().expect("copy queued");
        assert_eq!(&q.record.body[..], b"hello world");
        q.ticket.mirrored();
    }

    #[test]
    fn redaction_removes_credentials_only() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer secret".parse().expect("value"),
        );
        h.append(http::header::COOKIE, "a=1".parse().expect("value"));
        h.append(http::header::COOKIE, "b=2".parse().expect("value"));
        h.insert(
            http::header::PROXY_AUTHORIZATION,
            "Basic x".parse().expect("value"),
        );
        h.insert("x-keep", "1".parse().expect("value"));
        redact(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[tokio::test]
    async fn empty_body_is_queued_without_polling() {
        let (tee, mut rx, _) = tee(4, 1024);
        let ticket = tee.admit();
        let _body = tee.body(Full::new(Bytes::new()), ticket.map(|t| (head(), t)));
        assert!(rx.try_recv().is_ok());
    }

    #[tokio::test]
    async fn oversized_body_passes_but_is_not_copied() {
        let (tee, mut rx, acc) = tee(4, 4);
        let ticket = tee.admit();
        let body = tee.body(
            Full::new(Bytes::from_static(b"too long")),
            ticket.map(|t| (head(), t)),
        );
        assert_eq!(
            &body.collect().await.expect("body").to_bytes()[..],
            b"too long"
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(dropped(&acc, "body_too_large"), 1.0);
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        let (tee, _rx, acc) = tee(1, 1024);
        for _ in 0..3 {
            let ticket = tee.admit();
            let _ = tee.body(Full::new(Bytes::new()), ticket.map(|t| (head(), t)));
        }
        assert_eq!(dropped(&acc, "queue_full"), 2.0);
    }

    #[tokio::test]
    async fn without_uplink_nothing_is_copied() {
        let acc = Arc::new(Accounting::new(1 << 20));
        let (tx, mut rx) = mpsc::channel(4);
        let down = Arc::new(UplinkState::default());
        let tee = Arc::new(Tee::new(
            tx,
            acc.clone(),
            Sampler::new(100.0),
            1024,
            "c",
            Some(down),
            None,
        ));
        assert!(tee.admit().is_none(), "no ticket, so no copy is made");
        assert!(rx.try_recv().is_err());
        assert_eq!(dropped(&acc, "no_uplink"), 1.0);
        let s = Snapshot::parse(&acc.registry().render());
        assert_eq!(s.get(crate::metrics::MIRROR_IN_FLIGHT), 0.0);
        assert_eq!(s.get(crate::metrics::REQUESTS_TOTAL), 1.0);
    }

    #[tokio::test]
    async fn abandoned_body_counts_as_incomplete() {
        let (tee, mut rx, acc) = tee(4, 1024);
        let ticket = tee.admit();
        let body = tee.body(
            Full::new(Bytes::from_static(b"unread")),
            ticket.map(|t| (head(), t)),
        );
        drop(body);
        assert!(rx.try_recv().is_err());
        assert_eq!(dropped(&acc, "incomplete_body"), 1.0);
    }
}

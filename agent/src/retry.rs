//! Retrying a request the primary never processed, and finishing a copy the primary left unread.
//!
//! An HTTP/2 primary that sends GOAWAY (nginx does every `keepalive_requests`, 1000 by default)
//! refuses the streams above its last-stream-id: they were never processed, so RFC 9113 §8.7
//! allows sending them again on a new connection, as Envoy and nginx do. A keep-alive HTTP/1.1
//! connection the primary closes just as a request goes out fails the same way. Forwarding such a
//! failure as a 502 would make the agent visible to production, so the proxy retries, and needs
//! the request body again: [`ReplayBody`] keeps what it has passed on (up to a byte limit) so that
//! a second attempt can start from the first byte.
//!
//! The same shared state decides what happens to a copy when the primary did not read the whole
//! body (it failed, or answered early): the rule is that a request that arrived whole is
//! mirrored, whatever the primary did. When the last holder of the body lets go with the body
//! unfinished, the rest is read in the background (only while the copy still wants it, and for at
//! most [`COPY_DRAIN_TIMEOUT`]) so the copy completes; a client that went away ends it as
//! `client_aborted`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};

/// Bytes of a request body kept for a retry; a longer body that has already started flowing to
/// the primary cannot be sent again, and its failure is answered 502.
pub const RETRY_BUFFER_BYTES: usize = 64 * 1024;
/// Attempts at the primary for one request, the first included.
pub const MAX_ATTEMPTS: usize = 3;
/// How long the agent goes on reading a body the primary left unread, to complete its copy.
pub const COPY_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// What one kept frame costs besides its bytes, charged against [`RETRY_BUFFER_BYTES`].
const FRAME_OVERHEAD: usize = 64;

/// A body whose copy may still want the bytes the primary did not read.
pub trait Unfinished: Body<Data = Bytes> + Send + Unpin + 'static {
    /// Whether anything still wants the rest of the body (a copy being made).
    fn wants_rest(&self) -> bool;
}

struct Shared<B: Unfinished> {
    inner: Option<B>,
    /// Frames passed on so far, while they fit in `limit`.
    frames: Vec<Frame<Bytes>>,
    buffered: usize,
    limit: usize,
    /// More than `limit` bytes went out: no retry is possible any more.
    overflowed: bool,
    /// The inner body ended (its last frame passed).
    ended: bool,
    /// The inner body failed: the client went away mid-body.
    client_error: bool,
    /// Whether the rest may be read after the primary lets go (not when the client waits for
    /// `100 Continue` before sending it).
    drain_allowed: bool,
    /// The attempt allowed to read: an older attempt hyper still holds reads nothing more.
    generation: u64,
}

impl<B: Unfinished> Drop for Shared<B> {
    fn drop(&mut self) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        if self.ended || self.client_error || !self.drain_allowed || !inner.wants_rest() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Nobody else holds the body now: read the rest for the copy, bounded in time. The copy
        // stops wanting it (and this stops) when it completes or outgrows its limit.
        runtime.spawn(async move {
            let drain = async {
                while inner.wants_rest() {
                    match std::future::poll_fn(|cx| Pin::new(&mut inner).poll_frame(cx)).await {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
            };
            if tokio::time::timeout(COPY_DRAIN_TIMEOUT, drain)
                .await
                .is_err()
            {
                tracing::debug!("gave up reading a body the primary left unread");
            }
        });
    }
}

/// One attempt's view of a request body that can be sent again from the start.
///
/// Every attempt made with [`ReplayBody::again`] shares the inner body: frames already taken
/// from it are replayed from the buffer, then the inner body is read on. Attempts run one after
/// the other, never at once.
pub struct ReplayBody<B: Unfinished> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Next buffered frame this attempt passes on.
    pos: usize,
    /// Which attempt this is; only the latest reads.
    generation: u64,
}

impl<B: Unfinished> ReplayBody<B> {
    /// Wraps `inner`, keeping up to `limit` bytes for another attempt. `drain_allowed`: the rest
    /// may be read for the copy once the primary lets go of the body.
    pub fn new(inner: B, limit: usize, drain_allowed: bool) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                inner: Some(inner),
                frames: Vec::new(),
                buffered: 0,
                limit,
                overflowed: false,
                ended: false,
                client_error: false,
                drain_allowed,
                generation: 0,
            })),
            pos: 0,
            generation: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<B>> {
        // Plain data: a panic while polling leaves it usable.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body for another attempt, from the first byte; `None` when too much has gone out to
    /// send it again.
    pub fn again(&self) -> Option<Self> {
        let mut shared = self.lock();
        if shared.overflowed {
            return None;
        }
        shared.generation += 1;
        Some(Self {
            shared: self.shared.clone(),
            pos: 0,
            generation: shared.generation,
        })
    }

    /// Whether another attempt could still start from the first byte.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// No further attempt will be made (the primary answered): the kept bytes are let go.
    pub fn release(&self) {
        let mut shared = self.lock();
        shared.overflowed = true;
        shared.frames = Vec::new();
    }

    /// Whether reading the body failed: the client went away before sending all of it.
    pub fn client_failed(&self) -> bool {
        self.lock().client_error
    }
}

impl<B: Unfinished> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if this.generation != shared.generation {
            // Superseded by a later attempt: it owns the body now.
            return Poll::Ready(None);
        }
        if !shared.overflowed && this.pos < shared.frames.len() {
            let frame = copy_frame(&shared.frames[this.pos]);
            this.pos += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if shared.ended {
            return Poll::Ready(None);
        }
        let Some(inner) = shared.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let ended_now = inner.is_end_stream();
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if !shared.overflowed {
                    // Each frame is charged for its bookkeeping too: a body of one-byte chunks
                    // must not hold thousands of frames under a byte limit.
                    let len = frame.data_ref().map_or(0, Bytes::len) + FRAME_OVERHEAD;
                    if shared.buffered + len > shared.limit {
                        shared.overflowed = true;
                        shared.frames = Vec::new();
                    } else {
                        shared.buffered += len;
                        shared.frames.push(copy_frame(frame));
                        this.pos = shared.frames.len();
                    }
                }
                if ended_now {
                    shared.ended = true;
                }
            }
            Poll::Ready(None) => shared.ended = true,
            Poll::Ready(Some(Err(_))) => shared.client_error = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        let replaying = !shared.overflowed && self.pos < shared.frames.len();
        !replaying && (shared.ended || shared.inner.as_ref().is_none_or(B::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.lock();
        let inner = shared
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), B::size_hint);
        let replay: u64 = if shared.overflowed {
            0
        } else {
            shared.frames[self.pos.min(shared.frames.len())..]
                .iter()
                .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                .sum()
        };
        // The upper bound first: `set_lower` asserts lower <= upper.
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + replay);
        }
        hint.set_lower(inner.lower() + replay);
        hint
    }
}

/// A copy of `frame` (`Frame` is not `Clone`): data shares its bytes, trailers are cloned.
fn copy_frame(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match (frame.data_ref(), frame.trailers_ref()) {
        (Some(data), _) => Frame::data(data.clone()),
        (None, Some(trailers)) => Frame::trailers(trailers.clone()),
        // No other kind of frame exists today; an empty chunk changes no body.
        (None, None) => Frame::data(Bytes::new()),
    }
}

/// Whether a request that failed with `error` may be sent again: the primary cannot have
/// processed it. Refused HTTP/2 streams (GOAWAY above the last-stream-id, or `REFUSED_STREAM`)
/// and requests hyper never sent qualify for any method; a connection closed before any response
/// (a keep-alive connection the primary closed as the request went out) only for idempotent
/// methods (RFC 9110 §9.2.2).
pub fn may_retry(error: &(dyn std::error::Error + 'static), method: &Method) -> bool {
    let idempotent = method.is_idempotent();
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            if h2.is_remote() && h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR) {
                return true;
            }
            if h2.is_remote() && h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
            return idempotent && h2.is_go_away();
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return true;
            }
            if hyper.is_incomplete_message() {
                return idempotent;
            }
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    struct Plain<B>(B);

    impl<B: Body<Data = Bytes> + Unpin> Body for Plain<B> {
        type Data = Bytes;
        type Error = B::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_end_stream()
        }
    }

    impl<B: Body<Data = Bytes> + Send + Unpin + 'static> Unfinished for Plain<B> {
        fn wants_rest(&self) -> bool {
            false
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Plain<impl Body<Data = Bytes, Error = Infallible>> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        Plain(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_second_attempt_gets_every_byte_again() {
        let first = ReplayBody::new(chunks(&[b"abc", b"def"]), 1024, false);
        let mut partial = first.again().expect("fits");
        // The first attempt takes one chunk and fails.
        let frame = partial.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.data_ref().map(|d| &d[..]), Some(&b"abc"[..]));
        drop(partial);
        let second = first.again().expect("still fits");
        let all = second.collect().await.expect("body").to_bytes();
        assert_eq!(&all[..], b"abcdef");
    }

    #[tokio::test]
    async fn past_the_limit_no_retry_is_offered() {
        let first = ReplayBody::new(chunks(&[b"abcd", b"efgh"]), 6 + FRAME_OVERHEAD, false);
        let attempt = first.again().expect("nothing sent yet");
        let all = attempt.collect().await.expect("body").to_bytes();
        assert_eq!(&all[..], b"abcdefgh", "the attempt itself is whole");
        assert!(first.again().is_none());
    }

    struct Exact(Option<Bytes>, u64);

    impl Body for Exact {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let next = self.0.take().map(|b| {
                self.1 -= b.len() as u64;
                Ok(Frame::data(b))
            });
            Poll::Ready(next)
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_none()
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.1)
        }
    }

    impl Unfinished for Exact {
        fn wants_rest(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn a_retry_of_a_known_length_body_says_its_whole_length() {
        // As a Content-Length body: hyper writes the length from the exact size hint.
        let first = ReplayBody::new(Exact(Some(Bytes::from_static(b"hello")), 5), 1024, false);
        let mut attempt = first.again().expect("first");
        assert_eq!(attempt.size_hint().exact(), Some(5));
        let _ = attempt.frame().await;
        let second = first.again().expect("second");
        assert_eq!(second.size_hint().exact(), Some(5), "replayed bytes count");
        assert!(
            attempt.frame().await.is_none(),
            "a superseded attempt reads nothing more"
        );
        let all = second.collect().await.expect("body").to_bytes();
        assert_eq!(&all[..], b"hello");
    }

    #[test]
    fn only_unprocessed_failures_are_retried() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        // A locally made reason is not the primary's word.
        assert!(!may_retry(&refused, &Method::POST));
        let io = std::io::Error::other("reset");
        assert!(!may_retry(&io, &Method::GET));
    }
}

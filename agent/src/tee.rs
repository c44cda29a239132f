//! The tee: deciding which requests are copied, copying their bodies while they stream to the
//! primary, and handing finished copies to the uplink without ever waiting.
//!
//! Production never waits for the mirror. On the request path the tee does only things that
//! cannot block or await: one lock-free load of the [`MirrorPolicy`] in force, a rule match and
//! a sampling draw, appending body chunks to a buffer capped at `max_body_bytes` (over the cap,
//! copying stops: the copy is dropped or, with `over_limit: truncate`, sent truncated), and a
//! `try_send` into a bounded queue (full: the copy is dropped and counted).
//!
//! A copy is encoded once, as it is made: when a request is sampled its redacted head goes into
//! a new buffer as an `ENVELOPE` frame ([`RequestFrame`]), the body's chunks are appended to it as
//! they stream, and the finished frame is what the uplink sends, the spool and the archive store.
//! The copy holds nothing of hyper's buffers: a queued copy costs what `queue_bytes` counts.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use teeway_runtime::matching::Fields;
use teeway_wire::record::empty;
use teeway_wire::{Meta, Production, RequestFrame, Sampling};
use tokio::sync::mpsc;

use crate::downstream::Tap;
use crate::metrics::{AnswerFate, Books, DropReason, Hold, Ticket};
use crate::pace;
use crate::policy::{CaptureResponse, Chosen, MirrorPolicy, OverLimit, Target};
use crate::uplink::{Queued, UplinkState};
use teeway_archive::Archive;

/// Most body bytes reserved for a copy before they arrive. A larger body's buffer grows as it
/// comes (and is moved to one of its own size at the end if growing left much unused).
const MAX_BODY_RESERVE: usize = 64 * 1024;

/// What a copy costs beside its frame's bytes, held against `queue_bytes` with them: its slot in
/// the queue (a `Queued`, its account included), then its account's place in a batch, and about
/// 100 bytes that the allocator and `Bytes` keep for its frame's buffer (header, rounding, the
/// shared handle). Bench scenario 24 measures it: counting frame bytes alone, the agent's memory
/// grew 12-14% more than what it counted while copies piled up.
const PER_COPY: u64 = (std::mem::size_of::<Queued>() + std::mem::size_of::<Ticket>() + 96) as u64;

/// The body length a head announces (`Content-Length`); 0 when it announces none.
fn announced_length(headers: &HeaderMap) -> usize {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
}

/// The bytes a copy whose frame has `capacity` bytes holds against `queue_bytes`.
fn footprint(capacity: usize) -> u64 {
    capacity as u64 + PER_COPY
}

/// The request-path side of the tee.
#[derive(Debug)]
pub struct Tee {
    /// Where its copies go, and whose books count them.
    out: Outlet,
    /// The policy in force; swapped whole by a reload.
    policy: Arc<ArcSwap<MirrorPolicy>>,
    /// Its copies may wait for production's answer (the proxy's tee, not the sink's, which
    /// sees no answer).
    answers: bool,
}

/// What every tap shares past its own decision: the books a copy is counted in, its envelope's
/// metadata, and the queue to the uplink (or archive). The HTTP [`Tee`] and each `rpc:`
/// listener own one.
#[derive(Debug)]
pub struct Outlet {
    /// Copies to the uplink task, which owns the receiving end.
    queue_tx: mpsc::Sender<Queued>,
    pub(crate) books: Arc<Books>,
    source_cluster: Arc<str>,
    /// The tap its copies come from (`http`, `sink`, an `rpc:` listener's name), which their
    /// envelopes name.
    tap: Arc<str>,
    /// The agent process's session, which envelopes carry.
    session: u64,
    next_id: AtomicU64,
    /// Read on every sampled request: with no uplink, a copy is dropped before it is made.
    /// `None` when copies go only to an archive.
    uplink: Option<Arc<UplinkState>>,
    /// When copies go to a gateway and an archive both: the archive's handle. Each queued copy
    /// is also offered to it (never waiting; its drops are the archive's own to count).
    archive_also: Option<Archive>,
}

/// Who a tee's copies say they come from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The agent's `cluster`.
    pub cluster: Arc<str>,
    /// The tap: `http` (the proxy) or `sink`.
    pub tap: Arc<str>,
    /// The agent process's session (random per start, not 0).
    pub session: u64,
}

impl Outlet {
    /// An outlet feeding `queue_tx`, counting in `books`.
    pub fn new(
        queue_tx: mpsc::Sender<Queued>,
        books: Arc<Books>,
        origin: Origin,
        uplink: Option<Arc<UplinkState>>,
        archive_also: Option<Archive>,
    ) -> Self {
        Self {
            queue_tx,
            books,
            source_cluster: origin.cluster,
            tap: origin.tap,
            session: origin.session,
            next_id: AtomicU64::new(1),
            uplink,
            archive_also,
        }
    }
}

impl Tee {
    /// A tee deciding under `policy`, its copies going out through `out`.
    pub fn new(out: Outlet, policy: Arc<ArcSwap<MirrorPolicy>>) -> Self {
        Self {
            out,
            policy,
            answers: false,
        }
    }

    /// The tee of a proxy, whose copies carry production's answers when the policy says so
    /// (`mirror.capture_response`).
    pub fn with_answers(mut self) -> Self {
        self.answers = true;
        self
    }

    /// Counts the request and decides, under the policy in force, whether it is copied;
    /// `Some` with the copy's frame (its redacted head encoded) and its account when it is.
    ///
    /// While the uplink is down a sampled request is counted as a `no_uplink` drop here, before
    /// any header is cloned or body byte copied: a dead gateway costs production nothing.
    pub fn admit(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
    ) -> Option<Admitted> {
        self.admit_head(method, uri, version, Cow::Borrowed(headers))
    }

    /// [`Tee::admit`] for a head made for the copy alone: a sampled copy takes it as it is, no
    /// clone made.
    pub fn admit_owned(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: HeaderMap,
    ) -> Option<Admitted> {
        self.admit_head(method, uri, version, Cow::Owned(headers))
    }

    fn admit_head(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: Cow<'_, HeaderMap>,
    ) -> Option<Admitted> {
        self.out.books.requests.increment(1);
        // A guard for the decision (no reference count touched); an owned `Arc` only for the
        // sampled requests whose copy keeps the policy it was admitted under.
        let policy = self.policy.load();
        let (ticket, meta) = self
            .out
            .decided(policy.decide(method, uri, &headers, || fastrand::u64(..)))?;
        let policy = arc_swap::Guard::into_inner(policy);
        self.copy(policy, ticket, &meta, method, uri, version, headers)
    }

    /// [`Tee::admit`] for an HTTP/1.1 head read in place: decided on the client's fields as they
    /// came (`target` is origin-form), with no `HeaderMap` made unless the request is copied;
    /// then `head` makes the copy's URI and fields, as the primary gets them. A policy that
    /// reads fields the proxy changes decides on `head`'s fields instead.
    pub fn admit_parsed(
        self: &Arc<Self>,
        method: &Method,
        target: &str,
        fields: &impl Fields,
        head: impl FnOnce() -> Option<(Uri, HeaderMap)>,
    ) -> Option<Admitted> {
        let policy = self.policy.load();
        if policy.reads_proxied_fields() {
            drop(policy);
            let Some((uri, headers)) = head() else {
                return self.unmakeable();
            };
            return self.admit_owned(method, &uri, Version::HTTP_11, headers);
        }
        self.out.books.requests.increment(1);
        let target = Target::origin_form(target);
        let chosen = policy.decide_on(method, target, fields, || fastrand::u64(..));
        let (ticket, meta) = self.out.decided(chosen)?;
        let policy = arc_swap::Guard::into_inner(policy);
        let Some((uri, headers)) = head() else {
            ticket.dropped(DropReason::NotMirrorable);
            return None;
        };
        self.copy(
            policy,
            ticket,
            &meta,
            method,
            &uri,
            Version::HTTP_11,
            Cow::Owned(headers),
        )
    }

    /// Counts a request whose copy's head could not be made (never, for heads the HTTP/1 path
    /// takes): `not_mirrorable`.
    fn unmakeable(&self) -> Option<Admitted> {
        self.out.books.requests.increment(1);
        self.out.books.ticket().dropped(DropReason::NotMirrorable);
        None
    }
}

impl Outlet {
    /// After the policy's decision: `None` for a request not copied (counted: not sampled, no
    /// uplink, or passed over by its rule's pace); else the copy's account and metadata.
    pub(crate) fn decided(&self, chosen: Option<Chosen<'_>>) -> Option<(Ticket, Meta)> {
        self.decided_at(chosen, SystemTime::now)
    }

    /// [`Outlet::decided`] for a request received at `received_at()` (read only for a copy):
    /// the requests of one read share the time it was read at.
    pub(crate) fn decided_at(
        &self,
        chosen: Option<Chosen<'_>>,
        received_at: impl FnOnce() -> SystemTime,
    ) -> Option<(Ticket, Meta)> {
        let Some(chosen) = chosen else {
            self.books.not_sampled.increment(1);
            return None;
        };
        if self.uplink.as_ref().is_some_and(|u| !u.is_connected()) {
            self.books.unmade(DropReason::NoUplink);
            return None;
        }
        // Copies the gateway would shed are not made at all (see `pace`), unless this agent
        // archives them too: an archived copy is of use whatever the gateway makes of it.
        let mut rate_ppm = chosen.fraction.ppm();
        let paced = match (chosen.pace, &self.uplink, &self.archive_also) {
            (Some(pace), Some(_), None) => {
                let position = chosen.position;
                let draw = || position.unwrap_or_else(|| fastrand::u32(..pace::FULL));
                let Some((ppm, paced)) = pace.admits(draw) else {
                    self.books.unmade(DropReason::GatewayShedding);
                    return None;
                };
                if ppm < pace::FULL {
                    let paced_rate = u64::from(rate_ppm) * u64::from(ppm) / u64::from(pace::FULL);
                    rate_ppm = u32::try_from(paced_rate).unwrap_or(rate_ppm).max(1);
                }
                Some(paced)
            }
            _ => None,
        };
        let mut ticket = self.books.ticket();
        if let Some(paced) = paced {
            ticket.paced_by(paced);
        }
        let meta = Meta {
            session: self.session,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            received_at: received_at(),
            source_cluster: self.source_cluster.clone(),
            // The gateway names the agent from its certificate.
            source_identity: empty(),
            tap: self.tap.clone(),
            sampling: Sampling {
                rule: chosen.rule.cloned().unwrap_or_else(empty),
                rate_ppm,
            },
            extra: Bytes::new(),
        };
        Some((ticket, meta))
    }

    /// Queues a finished copy, which holds `held` bytes (its frame's allocation).
    pub(crate) fn enqueue(&self, frame: Bytes, held: usize, ticket: Ticket) {
        let mut queued = Queued::new(frame, ticket);
        if let Err(reason) = queued.ticket.hold_total(footprint(held)) {
            queued.ticket.dropped(reason);
            return;
        }
        if let Some(archive) = &self.archive_also {
            archive.try_submit_frame(queued.frame.clone(), None);
        }
        match self.queue_tx.try_send(queued) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(q)) => q.ticket.dropped(DropReason::QueueFull),
            Err(mpsc::error::TrySendError::Closed(q)) => q.ticket.dropped(DropReason::Shutdown),
        }
    }
}

impl Tee {
    /// Makes a sampled request's copy: its redacted head encoded, room set aside for its body.
    #[allow(clippy::too_many_arguments)]
    fn copy(
        self: &Arc<Self>,
        policy: Arc<MirrorPolicy>,
        mut ticket: Ticket,
        meta: &Meta,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: Cow<'_, HeaderMap>,
    ) -> Option<Admitted> {
        // Room for the body as announced (no more than is kept, and no more than a client that
        // announces much and sends little could make the agent set aside up front): such a
        // body is copied once, into a buffer of its size.
        let announced = announced_length(&headers);
        let mut copy_headers = headers.into_owned();
        let uri = policy.redaction.apply(&mut copy_headers, uri);
        let max_body_bytes = usize::try_from(policy.max_body_bytes).unwrap_or(usize::MAX);
        let frame = RequestFrame::new(
            meta,
            method,
            &uri,
            version,
            &copy_headers,
            announced.min(max_body_bytes).min(MAX_BODY_RESERVE),
        );
        // What a copy sets aside counts from the start, not from when it is queued: copies in
        // the making are bounded by `queue_bytes` too.
        if let Err(reason) = ticket.hold(footprint(frame.capacity())) {
            ticket.dropped(reason);
            return None;
        }
        let expected_body = match announced {
            0 => max_body_bytes,
            announced => announced.min(max_body_bytes),
        };
        let (pairing, answer) = match (&policy.capture_response, self.answers) {
            (Some(capture), true) => {
                let pairing = Arc::new(Pairing {
                    tee: self.clone(),
                    state: Mutex::new(Pair::Open),
                    wait: capture.wait,
                    closed: std::sync::atomic::AtomicBool::new(false),
                    timer: std::sync::OnceLock::new(),
                });
                let answer = Answer {
                    pairing: Some(pairing.clone()),
                    books: self.out.books.clone(),
                    capture: capture.clone(),
                    policy: policy.clone(),
                };
                (Some(pairing), Some(answer))
            }
            _ => (None, None),
        };
        Some(Admitted {
            frame,
            expected_body,
            ticket,
            policy,
            pairing,
            answer,
        })
    }

    /// Queues the copy of a request that has no body: it is complete as admitted.
    pub fn complete(self: &Arc<Self>, copy: Admitted) {
        self.capture(copy).finish();
    }

    /// Counts a request that is proxied but cannot be copied (an HTTP/1.1 upgrade: WebSocket and
    /// the like): `not_sampled` when the policy passes it over, else dropped as `not_mirrorable`.
    pub fn unmirrorable(&self, method: &Method, uri: &Uri, headers: &HeaderMap) {
        self.out.books.requests.increment(1);
        if self
            .policy
            .load()
            .decide(method, uri, headers, || fastrand::u64(..))
            .is_none()
        {
            self.out.books.not_sampled.increment(1);
            return;
        }
        self.out.books.ticket().dropped(DropReason::NotMirrorable);
    }

    /// Wraps a request body so that it is copied as it streams to the primary.
    ///
    /// `copy` is what [`Tee::admit`] returned: `None` for a request passed over.
    pub fn body<B>(self: &Arc<Self>, inner: B, copy: Option<Admitted>) -> TeeBody<B>
    where
        B: Body<Data = Bytes>,
    {
        let mut body = TeeBody {
            inner,
            capture: copy.map(|copy| self.capture(copy)),
        };
        if body.inner.is_end_stream() {
            // No body (a GET, say): hyper may never poll it, so the copy is complete now.
            if let Some(capture) = body.capture.take() {
                capture.finish();
            }
        }
        body
    }

    fn capture(self: &Arc<Self>, copy: Admitted) -> Capture {
        Capture {
            pairing: copy.pairing,
            tee: self.clone(),
            frame: Some(copy.frame),
            trailers: None,
            ticket: Some(copy.ticket),
            max_body_bytes: usize::try_from(copy.policy.max_body_bytes).unwrap_or(usize::MAX),
            expected_body: copy.expected_body,
            over_limit: copy.policy.over_limit,
            truncated: false,
            policy: copy.policy,
        }
    }
}

/// A sampled request's copy in the making, as [`Tee::admit`] hands it out.
#[derive(Debug)]
pub struct Admitted {
    /// The copy's frame, its redacted head encoded.
    frame: RequestFrame,
    /// Body bytes it will keep at most: the announced length, or the limit.
    expected_body: usize,
    /// Its account.
    pub ticket: Ticket,
    /// The policy it was decided under, which also sets its body limit.
    policy: Arc<MirrorPolicy>,
    /// The copy waits for production's answer: where it meets it.
    pairing: Option<Arc<Pairing>>,
    /// What hears production's answer, until the proxy takes it.
    answer: Option<Answer>,
}

impl Admitted {
    /// What hears production's answer to the request, when its copy waits for it
    /// (`mirror.capture_response`). Not taken, it is let go with the copy's body, and the
    /// request goes alone.
    pub fn take_answer(&mut self) -> Option<Answer> {
        self.answer.take()
    }
}

/// The copy being built while the body streams.
struct Capture {
    /// The copy waits for production's answer: where it meets it.
    pairing: Option<Arc<Pairing>>,
    tee: Arc<Tee>,
    frame: Option<RequestFrame>,
    trailers: Option<HeaderMap>,
    ticket: Option<Ticket>,
    max_body_bytes: usize,
    /// Body bytes the copy will keep at most: the announced length, or the limit.
    expected_body: usize,
    over_limit: OverLimit,
    /// Over the limit with `over_limit: truncate`: later chunks pass without being copied.
    truncated: bool,
    /// The policy the copy was admitted under: its redaction applies to trailers too.
    policy: Arc<MirrorPolicy>,
}

impl Capture {
    /// Appends a chunk; `false` when the body outgrew the limit and the copy is dropped.
    fn push(&mut self, chunk: &[u8]) -> bool {
        let Some(frame) = self.frame.as_mut() else {
            return false;
        };
        if self.truncated {
            return true;
        }
        let kept = frame.body_len();
        let chunk = if kept + chunk.len() > self.max_body_bytes {
            if self.over_limit != OverLimit::Truncate {
                if let Some(ticket) = self.ticket.take() {
                    ticket.dropped(DropReason::BodyTooLarge);
                }
                return false;
            }
            self.truncated = true;
            &chunk[..self.max_body_bytes - kept]
        } else {
            chunk
        };
        frame.push_body(chunk, self.expected_body);
        // A body longer than what was set aside grows its buffer: that counts as it happens.
        let held = footprint(frame.capacity());
        if let Some(ticket) = self.ticket.as_mut() {
            if let Err(reason) = ticket.hold_total(held) {
                if let Some(ticket) = self.ticket.take() {
                    ticket.dropped(reason);
                }
                return false;
            }
        }
        true
    }

    fn finish(mut self) {
        let (Some(frame), Some(ticket)) = (self.frame.take(), self.ticket.take()) else {
            return;
        };
        let (frame, held) = frame.finish(self.trailers.as_ref(), self.truncated);
        // A body that came without a length grew its buffer by doubling: a copy that would hold
        // much more than its bytes is moved into a buffer of its own size, so that what the
        // queue counts is what it holds.
        let (frame, held) = if held - frame.len() > frame.len() / 16 + 64 {
            let exact = Bytes::copy_from_slice(&frame);
            drop(frame);
            let held = exact.len();
            (exact, held)
        } else {
            (frame, held)
        };
        if self.truncated {
            self.tee.out.books.truncated.increment(1);
        }
        match self.pairing.take() {
            Some(pairing) => pairing.request(Finished {
                frame,
                held,
                ticket,
            }),
            None => self.tee.out.enqueue(frame, held, ticket),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(pairing) = self.pairing.take() {
            // The copy is lost (counted below, or where it was given up): nobody waits for
            // the answer.
            pairing.request_lost();
        }
        // Dropped before the body ended: nobody read it to the end (the primary answered or
        // failed without reading it, and the rest did not arrive in time to complete the copy).
        // The copy would be a lie, so it is counted and not sent.
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
                        let mut trailers = trailers.clone();
                        capture.policy.redaction.apply_headers(&mut trailers);
                        capture.trailers = Some(trailers);
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
            // The client went away mid-body: the copy would be a lie.
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut capture) = this.capture.take() {
                    if let Some(ticket) = capture.ticket.take() {
                        ticket.dropped(DropReason::ClientAborted);
                    }
                }
            }
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

impl<B> crate::retry::Unfinished for TeeBody<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
{
    fn wants_rest(&self) -> bool {
        // A truncated copy has what it keeps: the rest is not read for it.
        self.capture.as_ref().is_some_and(|c| !c.truncated)
    }
}

/// A copy that waits for production's answer (`mirror.capture_response`): whichever of the
/// request's copy and the answer ends second queues the copy, with the answer or alone.
#[derive(Debug)]
struct Pairing {
    tee: Arc<Tee>,
    state: Mutex<Pair>,
    /// `capture_response.wait`: from the request's end, the longest its copy waits.
    wait: std::time::Duration,
    /// Met, or given up: the answer's tap keeps nothing more.
    closed: std::sync::atomic::AtomicBool,
    /// Lets the request go alone once `wait` has passed, whether or not anything polls the
    /// answer (a client that stops reading stops it).
    timer: std::sync::OnceLock<tokio::task::AbortHandle>,
}

#[derive(Debug)]
enum Pair {
    /// Neither has ended.
    Open,
    /// The request's copy is finished, and waits.
    Request(Finished),
    /// The answer has ended (or is known not to come), and waits.
    Answer(Answered),
    /// Both met, or the copy was lost.
    Closed,
}

/// A request's finished copy.
#[derive(Debug)]
struct Finished {
    frame: Bytes,
    held: usize,
    ticket: Ticket,
}

/// What became of production's answer.
#[derive(Debug)]
enum Answered {
    /// Kept (whole, or cut at the limit: [`AnswerFate::Truncated`]), its bytes held meanwhile.
    Kept(Box<Production>, AnswerFate, Hold),
    /// None to send.
    Not(AnswerFate),
}

impl Pairing {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pair> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The request's copy is finished.
    fn request(self: &Arc<Self>, finished: Finished) {
        let answered = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, Pair::Closed) {
                Pair::Open => {
                    *state = Pair::Request(finished);
                    drop(state);
                    self.start_timer();
                    return;
                }
                Pair::Answer(answered) => answered,
                // Not seen: a copy finishes once.
                Pair::Request(_) | Pair::Closed => Answered::Not(AnswerFate::NoAnswer),
            }
        };
        self.meet(finished, answered);
    }

    /// From now, `wait` at most: then the request goes alone (`too_late`).
    fn start_timer(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pairing = Arc::downgrade(self);
        let wait = self.wait;
        let timer = runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(pairing) = pairing.upgrade() {
                pairing.answer(Answered::Not(AnswerFate::TooLate));
            }
        });
        let _ = self.timer.set(timer.abort_handle());
    }

    /// The request's copy was given up (counted where it was): the answer is not waited for.
    fn request_lost(&self) {
        self.close();
        let lost = std::mem::replace(&mut *self.lock(), Pair::Closed);
        drop(lost);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(timer) = self.timer.get() {
            timer.abort();
        }
    }

    /// Production's answer ended, or will not come.
    fn answer(self: &Arc<Self>, answered: Answered) {
        let finished = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, Pair::Closed) {
                Pair::Open => {
                    *state = Pair::Answer(answered);
                    return;
                }
                Pair::Request(finished) => finished,
                Pair::Answer(_) | Pair::Closed => return,
            }
        };
        self.meet(finished, answered);
    }

    /// Both ended: the copy is joined and queued off the path that ended second (the client's
    /// answer, or the request's body), on a task of its own: joining copies the request's frame.
    fn meet(self: &Arc<Self>, finished: Finished, answered: Answered) {
        self.close();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let pairing = self.clone();
                runtime.spawn(async move { pairing.send(finished, answered) });
            }
            Err(_) => self.send(finished, answered),
        }
    }

    /// Queues the copy with its answer, or alone when there is none or no room for it.
    fn send(&self, mut finished: Finished, answered: Answered) {
        let out = &self.tee.out;
        let fate = match answered {
            Answered::Kept(production, fate, hold) => {
                let joined = teeway_wire::frame::with_production(&finished.frame, &production);
                drop(production);
                // The answer's bytes move into the copy's frame, held by its ticket.
                drop(hold);
                match joined {
                    // Past a frame, the gateway would refuse the batch: the request goes alone.
                    Some(frame) if frame.len() > teeway_wire::MAX_FRAME_LEN as usize => {
                        AnswerFate::TooLarge
                    }
                    Some(frame) if finished.ticket.hold_total(footprint(frame.len())).is_ok() => {
                        out.books.answer(fate);
                        let held = frame.len();
                        return out.enqueue(frame, held, finished.ticket);
                    }
                    Some(_) => AnswerFate::QueueBytes,
                    // Not seen: the tee finished the frame.
                    None => AnswerFate::NoAnswer,
                }
            }
            Answered::Not(fate) => fate,
        };
        out.books.answer(fate);
        out.enqueue(finished.frame, finished.held, finished.ticket);
    }
}

/// Hears production's answer to a copied request, until its head: then it becomes an
/// [`AnswerTap`]. Let go before (the primary failed, the client went away), the request goes
/// alone.
pub struct Answer {
    pairing: Option<Arc<Pairing>>,
    books: Arc<Books>,
    capture: Arc<CaptureResponse>,
    /// The copy's policy: its redaction scrubs the answer too.
    policy: Arc<MirrorPolicy>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").finish_non_exhaustive()
    }
}

impl Answer {
    /// The answer's head came, `latency` after the request was sent: its fields (as the client
    /// gets them) are kept, scrubbed, and the body is watched from here.
    pub fn head(
        mut self,
        status: StatusCode,
        version: Version,
        headers: &HeaderMap,
        latency: Duration,
    ) -> AnswerTap {
        let mut headers = headers.clone();
        self.capture.scrub(&self.policy.redaction, &mut headers);
        let max = self.capture.max_body_bytes;
        let announced = announced_length(&headers);
        let head_bytes = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 8)
            .sum::<usize>() as u64;
        let mut tap = AnswerTap {
            pairing: self.pairing.take(),
            production: Some(Box::new(Production {
                latency,
                status,
                version,
                headers,
                body: Bytes::new(),
                trailers: None,
                body_truncated: false,
            })),
            body: BytesMut::with_capacity(announced.min(max).min(MAX_BODY_RESERVE)),
            max,
            head_bytes,
            hold: self.books.hold(),
            books: self.books.clone(),
            deadline: Box::pin(tokio::time::sleep(self.capture.wait)),
            capture: self.capture.clone(),
            policy: self.policy.clone(),
        };
        tap.held_now();
        tap
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(pairing) = self.pairing.take() {
            pairing.answer(Answered::Not(AnswerFate::NoAnswer));
        }
    }
}

/// Production's answer to a copied request, kept as it passes to the client (up to
/// `capture_response.max_body_bytes`, its bytes held against `mirror.queue_bytes`) until it
/// ends; then the copy is queued with it. Let go before, the request goes alone.
pub struct AnswerTap {
    pairing: Option<Arc<Pairing>>,
    /// The answer's head, until it is kept.
    production: Option<Box<Production>>,
    body: BytesMut,
    max: usize,
    /// What the answer's fields take.
    head_bytes: u64,
    hold: Hold,
    books: Arc<Books>,
    /// `capture_response.wait` from the head: then the request goes alone.
    deadline: Pin<Box<tokio::time::Sleep>>,
    capture: Arc<CaptureResponse>,
    policy: Arc<MirrorPolicy>,
}

impl AnswerTap {
    /// Body bytes on their way to the client; `false` once it keeps no more (it is done).
    pub fn data(&mut self, chunk: &[u8]) -> bool {
        match &self.pairing {
            None => return false,
            // Given up meanwhile (`wait` passed): what it holds is let go.
            Some(p) if p.closed.load(Ordering::Relaxed) => {
                self.pairing = None;
                self.body = BytesMut::new();
                return false;
            }
            Some(_) => {}
        }
        let room = self.max - self.body.len();
        let cut = chunk.len() > room;
        let kept = &chunk[..chunk.len().min(room)];
        if !kept.is_empty() {
            if self.body.capacity() - self.body.len() < kept.len() {
                // Doubling, but never past the limit.
                let grown = (self.body.capacity() * 2)
                    .max(self.body.len() + kept.len())
                    .min(self.max);
                self.body.reserve(grown - self.body.len());
            }
            self.body.extend_from_slice(kept);
            if !self.held_now() {
                return false;
            }
        }
        if cut {
            if let Some(p) = self.production.as_mut() {
                p.body_truncated = true;
            }
            self.keep();
            return false;
        }
        true
    }

    /// Holds what the answer takes now; `false` (the request goes alone) when there is no room.
    fn held_now(&mut self) -> bool {
        let total = self.head_bytes + self.body.capacity() as u64;
        if self.hold.hold_total(total).is_err() {
            self.resolve(Answered::Not(AnswerFate::QueueBytes));
            return false;
        }
        true
    }

    /// The answer ended: the copy goes with it.
    pub fn finish(mut self) {
        self.keep();
    }

    fn keep(&mut self) {
        let Some(mut production) = self.production.take() else {
            return;
        };
        let fate = if production.body_truncated {
            AnswerFate::Truncated
        } else {
            AnswerFate::Sent
        };
        production.body = std::mem::take(&mut self.body).freeze();
        let emptied = self.books.hold();
        let hold = std::mem::replace(&mut self.hold, emptied);
        self.resolve(Answered::Kept(production, fate, hold));
    }

    fn resolve(&mut self, answered: Answered) {
        if let Some(pairing) = self.pairing.take() {
            pairing.answer(answered);
        }
    }
}

impl Tap for AnswerTap {
    fn frame(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            return self.data(data);
        }
        if let Some(trailers) = frame.trailers_ref() {
            let mut trailers = trailers.clone();
            self.capture.scrub(&self.policy.redaction, &mut trailers);
            if let Some(p) = self.production.as_mut() {
                p.trailers = Some(trailers);
            }
        }
        true
    }

    fn end(self: Box<Self>) {
        self.finish();
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pairing.is_none() {
            return Poll::Ready(());
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.resolve(Answered::Not(AnswerFate::TooLate));
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for AnswerTap {
    fn drop(&mut self) {
        // Cut short: the client went away, or the primary failed mid-answer.
        self.resolve(Answered::Not(AnswerFate::NoAnswer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_copy_is_one_frame_that_keeps_nothing_of_the_read_buffer() {
        // Values and target as hyper makes them: slices of one large read buffer.
        let read_buffer = Bytes::from(
            b"/orders/17?page=2 api.example.com application/json \xe9t\xe9"
                .iter()
                .copied()
                .chain(std::iter::repeat_n(b' ', 16 * 1024))
                .collect::<Vec<u8>>(),
        );
        let uri = Uri::from_maybe_shared(read_buffer.slice(0..17)).expect("uri");
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::HOST,
            HeaderValue::from_maybe_shared(read_buffer.slice(18..33)).expect("host"),
        );
        headers.append(
            "x-kind",
            HeaderValue::from_maybe_shared(read_buffer.slice(34..50)).expect("value"),
        );
        headers.append(
            "x-kind",
            HeaderValue::from_maybe_shared(read_buffer.slice(51..56)).expect("obs-text"),
        );
        headers.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        headers.append(http::header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let (tee, mut rx, _) = tee(4, 1024);
        let copy = tee.admit(&Method::PUT, &uri, Version::HTTP_11, &headers);
        let body = tee.body(Full::new(Bytes::from_static(b"hello")), copy);
        body.collect().await.expect("body");
        let q = rx.try_recv().expect("copy queued");

        let buffer = read_buffer.as_ptr_range();
        let frame = q.frame.as_ptr_range();
        assert!(
            frame.end <= buffer.start || frame.start >= buffer.end,
            "the frame is an allocation of its own"
        );
        let copy = decoded(&q);
        assert_eq!(copy.uri, uri);
        assert_eq!(copy.method, Method::PUT);
        assert_eq!(&copy.body[..], b"hello");
        let mut want = headers.clone();
        want.remove(http::header::AUTHORIZATION);
        assert_eq!(
            copy.headers, want,
            "same fields, same order, credentials removed"
        );
        assert_eq!(&*copy.meta.tap, "http");
        assert_eq!(copy.meta.session, 9);
        assert_eq!(copy.meta.sampling.rate_ppm, 1_000_000);
        q.ticket.mirrored();
    }

    /// The copy a queued frame holds.
    fn decoded(q: &Queued) -> teeway_wire::MirroredRequest {
        match teeway_wire::Frame::decode(&mut bytes::BytesMut::from(&q.frame[..])) {
            Ok(Some(teeway_wire::Frame::Envelope(teeway_wire::Envelope::HttpRequest(r)))) => r,
            other => panic!("not a request's envelope: {other:?}"),
        }
    }

    use http::HeaderValue;
    use http_body_util::{BodyExt, Full, StreamBody};
    use teeway_runtime::metrics::Snapshot;

    use crate::metrics::Accounting;

    fn policy(max_body: u64, over_limit: OverLimit) -> Arc<ArcSwap<MirrorPolicy>> {
        let mut config = crate::policy::PolicyConfig::simple(100.0, max_body);
        config.over_limit = over_limit;
        Arc::new(ArcSwap::from_pointee(config.build(None)))
    }

    fn tee_with(
        queue: usize,
        policy: Arc<ArcSwap<MirrorPolicy>>,
    ) -> (Arc<Tee>, mpsc::Receiver<Queued>, Arc<Accounting>) {
        let acc = Arc::new(Accounting::new(1 << 20));
        let (tx, rx) = mpsc::channel(queue);
        let uplink = Arc::new(UplinkState::default());
        uplink.set(true);
        (
            Arc::new(Tee::new(
                Outlet::new(tx, acc.books.clone(), origin(), Some(uplink), None),
                policy,
            )),
            rx,
            acc,
        )
    }

    fn origin() -> Origin {
        Origin {
            cluster: "c".into(),
            tap: "http".into(),
            session: 9,
        }
    }

    fn tee(queue: usize, max_body: u64) -> (Arc<Tee>, mpsc::Receiver<Queued>, Arc<Accounting>) {
        tee_with(queue, policy(max_body, OverLimit::Skip))
    }

    fn admit(tee: &Arc<Tee>) -> Option<Admitted> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer s"),
        );
        tee.admit(
            &Method::POST,
            &Uri::from_static("/x"),
            Version::HTTP_11,
            &headers,
        )
    }

    /// A proxy's tee whose copies wait for production's answer (bodies up to `max_answer`,
    /// `wait` for the rest), within `queue_bytes`.
    fn answering_tee(
        max_answer: usize,
        wait: Duration,
        queue_bytes: u64,
    ) -> (Arc<Tee>, mpsc::Receiver<Queued>, Arc<Accounting>) {
        let mut config = crate::policy::PolicyConfig::simple(100.0, 1024);
        config.capture_response = Some(Arc::new(CaptureResponse {
            max_body_bytes: max_answer,
            wait,
            redact_headers: vec![http::HeaderName::from_static("x-session")],
        }));
        let acc = Arc::new(Accounting::new(queue_bytes));
        let (tx, rx) = mpsc::channel(8);
        let uplink = Arc::new(UplinkState::default());
        uplink.set(true);
        let tee = Tee::new(
            Outlet::new(tx, acc.books.clone(), origin(), Some(uplink), None),
            Arc::new(ArcSwap::from_pointee(config.build(None))),
        )
        .with_answers();
        (Arc::new(tee), rx, acc)
    }

    /// The next copy queued (joined on a task of its own), if one comes within 60 s.
    async fn next(rx: &mut mpsc::Receiver<Queued>) -> Option<Queued> {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .ok()
            .flatten()
    }

    fn answers(acc: &Accounting, result: &str) -> f64 {
        Snapshot::parse(&acc.registry().render()).get(&format!(
            "teeway_agent_production_answers_total{{result=\"{result}\"}}"
        ))
    }

    fn held(acc: &Accounting) -> f64 {
        Snapshot::parse(&acc.registry().render()).get("teeway_agent_mirror_held_bytes")
    }

    fn answer_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("content-type", HeaderValue::from_static("application/json"));
        h.append(http::header::SET_COOKIE, HeaderValue::from_static("sid=1"));
        h.append("x-session", HeaderValue::from_static("s3cret"));
        h.append("x-request-id", HeaderValue::from_static("r-1"));
        h.append(
            http::header::LOCATION,
            HeaderValue::from_static(
                "https://bucket.example/o?X-Amz-Signature=abc&part=2#access_token=t",
            ),
        );
        h
    }

    /// Admits a request, streams its body, and gives back what hears its answer.
    async fn request_with_answer(tee: &Arc<Tee>) -> Answer {
        let mut copy = admit(tee);
        let answer = copy
            .as_mut()
            .and_then(Admitted::take_answer)
            .expect("the copy waits for its answer");
        let body = tee.body(Full::new(Bytes::from_static(b"ask")), copy);
        body.collect().await.expect("body");
        answer
    }

    /// [`request_with_answer`], its answer's head come: a 200 with no fields.
    async fn plain_answer(tee: &Arc<Tee>) -> AnswerTap {
        request_with_answer(tee).await.head(
            StatusCode::OK,
            Version::HTTP_11,
            &HeaderMap::new(),
            Duration::ZERO,
        )
    }

    #[tokio::test]
    async fn a_copy_waits_for_productions_answer_and_carries_it_scrubbed() {
        let (tee, mut rx, acc) = answering_tee(1024, Duration::from_secs(30), 1 << 20);
        let answer = request_with_answer(&tee).await;
        assert!(rx.try_recv().is_err(), "the copy waits for the answer");
        let mut tap = answer.head(
            StatusCode::CREATED,
            Version::HTTP_11,
            &answer_headers(),
            Duration::from_millis(3),
        );
        assert!(tap.data(b"{\"price\":"));
        assert!(tap.data(b"10}"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert(http::header::SET_COOKIE, HeaderValue::from_static("t=1"));
        assert!(Tap::frame(&mut tap, &Frame::trailers(trailers)));
        assert!(rx.try_recv().is_err(), "until it ends");
        tap.finish();

        let q = next(&mut rx).await.expect("queued with its answer");
        let copy = decoded(&q);
        assert_eq!(&copy.body[..], b"ask");
        let production = copy.production.expect("the answer travels with the copy");
        assert_eq!(production.status, StatusCode::CREATED);
        assert_eq!(production.latency, Duration::from_millis(3));
        assert_eq!(&production.body[..], b"{\"price\":10}");
        assert!(!production.body_truncated);
        let names: Vec<&str> = production.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-request-id", "location"],
            "set-cookie and x-session stay"
        );
        assert_eq!(
            production.headers[http::header::LOCATION],
            "https://bucket.example/o?part=2",
            "a presigned URL's signature and a redirect's token stay"
        );
        let trailers = production.trailers.expect("trailers");
        assert_eq!(trailers.len(), 1, "grpc-status kept, set-cookie not");
        assert_eq!(answers(&acc, "sent"), 1.0);
        q.ticket.mirrored();
        assert_eq!(held(&acc), 0.0, "every byte held is let go");
    }

    #[tokio::test]
    async fn an_answer_that_ends_first_waits_for_the_request() {
        let (tee, mut rx, acc) = answering_tee(1024, Duration::from_secs(30), 1 << 20);
        let mut copy = admit(&tee);
        let answer = copy
            .as_mut()
            .and_then(Admitted::take_answer)
            .expect("waits");
        // The primary answers before the request body has ended.
        let tap = answer.head(
            StatusCode::OK,
            Version::HTTP_2,
            &HeaderMap::new(),
            Duration::ZERO,
        );
        tap.finish();
        assert!(rx.try_recv().is_err(), "the request's copy is not finished");
        tee.body(Full::new(Bytes::from_static(b"late")), copy)
            .collect()
            .await
            .expect("body");
        let q = next(&mut rx).await.expect("queued once both ended");
        assert_eq!(
            decoded(&q).production.expect("answer").version,
            Version::HTTP_2
        );
        assert_eq!(answers(&acc, "sent"), 1.0);
        q.ticket.mirrored();
    }

    #[tokio::test]
    async fn without_an_answer_the_request_goes_alone_and_each_fate_is_counted() {
        let (tee, mut rx, acc) = answering_tee(8, Duration::from_secs(30), 1 << 20);
        // The primary failed: the answer is let go before its head.
        drop(request_with_answer(&tee).await);
        let q = next(&mut rx).await.expect("the request goes alone");
        assert!(decoded(&q).production.is_none());
        assert_eq!(answers(&acc, "no_answer"), 1.0);
        q.ticket.mirrored();

        // The client went away mid-answer.
        let mut tap = plain_answer(&tee).await;
        assert!(tap.data(b"part"));
        drop(tap);
        let q = next(&mut rx).await.expect("alone");
        assert!(decoded(&q).production.is_none());
        assert_eq!(answers(&acc, "no_answer"), 2.0);
        q.ticket.mirrored();

        // Longer than the limit: cut there, flagged, and sent at once.
        let mut tap = plain_answer(&tee).await;
        assert!(!tap.data(b"0123456789"), "it keeps no more");
        let q = next(&mut rx)
            .await
            .expect("sent without waiting for the rest");
        let production = decoded(&q).production.expect("answer");
        assert_eq!(&production.body[..], b"01234567");
        assert!(production.body_truncated);
        assert_eq!(answers(&acc, "truncated"), 1.0);
        drop(tap);
        assert_eq!(answers(&acc, "no_answer"), 2.0, "counted once");
        q.ticket.mirrored();
        assert_eq!(held(&acc), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_does_not_end_in_time_lets_the_request_go_alone() {
        let (tee, mut rx, acc) = answering_tee(1024, Duration::from_secs(5), 1 << 20);
        let mut tap = plain_answer(&tee).await;
        assert!(tap.data(b"event: 1\n\n"));
        let expired = std::future::poll_fn(|cx| Tap::poll_expired(&mut tap, cx));
        tokio::time::timeout(Duration::from_secs(6), expired)
            .await
            .expect("expires after `wait`");
        let q = next(&mut rx).await.expect("the request went alone");
        assert!(decoded(&q).production.is_none());
        assert_eq!(answers(&acc, "too_late"), 1.0);
        assert!(!tap.data(b"event: 2\n\n"), "the tap keeps nothing more");
        drop(tap);
        assert_eq!(answers(&acc, "no_answer"), 0.0);
        q.ticket.mirrored();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_does_not_hold_the_copy_past_wait() {
        // Nothing polls the answer (the client's window is shut): the copy still goes.
        let (tee, mut rx, acc) = answering_tee(1024, Duration::from_secs(5), 1 << 20);
        let mut tap = plain_answer(&tee).await;
        assert!(tap.data(b"part of it"));
        let q = next(&mut rx)
            .await
            .expect("the request went alone after `wait`");
        assert!(decoded(&q).production.is_none());
        assert_eq!(answers(&acc, "too_late"), 1.0);
        assert!(!tap.data(b"more"), "the tap keeps nothing more");
        q.ticket.mirrored();
        drop(tap);
        assert_eq!(held(&acc), 0.0);
        assert_eq!(answers(&acc, "no_answer"), 0.0, "counted once");
    }

    #[tokio::test]
    async fn an_answer_with_no_room_in_queue_bytes_is_left_out() {
        // Room for the request's copy, not for a 64 KiB answer besides.
        let (tee, mut rx, acc) = answering_tee(1 << 20, Duration::from_secs(30), 16 * 1024);
        let mut tap = plain_answer(&tee).await;
        assert!(!tap.data(&[b'x'; 64 * 1024]));
        let q = next(&mut rx).await.expect("the request went alone");
        assert!(decoded(&q).production.is_none());
        assert_eq!(answers(&acc, "queue_bytes"), 1.0);
        assert_eq!(
            dropped(&acc, "queue_bytes"),
            0.0,
            "the copy itself is not lost"
        );
        drop(tap);
        q.ticket.mirrored();
        assert_eq!(held(&acc), 0.0);
    }

    #[tokio::test]
    async fn a_sinks_tee_never_waits_for_an_answer() {
        let mut config = crate::policy::PolicyConfig::simple(100.0, 1024);
        config.capture_response = Some(Arc::new(CaptureResponse {
            max_body_bytes: 1024,
            wait: Duration::from_secs(1),
            redact_headers: vec![],
        }));
        let (tee, mut rx, acc) = tee_with(4, Arc::new(ArcSwap::from_pointee(config.build(None))));
        let mut copy = admit(&tee);
        assert!(copy.as_mut().and_then(Admitted::take_answer).is_none());
        tee.body(Full::new(Bytes::new()), copy)
            .collect()
            .await
            .expect("body");
        let q = next(&mut rx).await.expect("queued at once");
        assert!(decoded(&q).production.is_none());
        assert_eq!(answers(&acc, "no_answer"), 0.0);
        q.ticket.mirrored();
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
        let copy = admit(&tee);
        let body = tee.body(StreamBody::new(futures_util::stream::iter(chunks)), copy);
        let passed = body.collect().await.expect("body").to_bytes();
        assert_eq!(&passed[..], b"hello world");
        let q = rx.try_recv().expect("copy queued");
        assert_eq!(&decoded(&q).body[..], b"hello world");
        q.ticket.mirrored();
    }

    #[tokio::test]
    async fn over_limit_truncate_sends_a_flagged_prefix() {
        let (tee, mut rx, acc) = tee_with(4, policy(4, OverLimit::Truncate));
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"defg"))),
            Ok(Frame::data(Bytes::from_static(b"hij"))),
        ];
        let copy = admit(&tee);
        let body = tee.body(StreamBody::new(futures_util::stream::iter(chunks)), copy);
        let passed = body.collect().await.expect("body").to_bytes();
        assert_eq!(&passed[..], b"abcdefghij", "the primary gets every byte");
        let q = rx.try_recv().expect("copy queued");
        let copy = decoded(&q);
        assert_eq!(&copy.body[..], b"abcd");
        assert!(copy.body_truncated);
        assert!(copy.headers.get(http::header::AUTHORIZATION).is_none());
        q.ticket.mirrored();
        let s = Snapshot::parse(&acc.registry().render());
        assert_eq!(s.get(crate::metrics::MIRROR_TRUNCATED_TOTAL), 1.0);
        assert_eq!(dropped(&acc, "body_too_large"), 0.0);
    }

    #[tokio::test]
    async fn a_reload_applies_to_requests_admitted_after_it() {
        let holder = policy(1024, OverLimit::Skip);
        let (tee, mut rx, acc) = tee_with(4, holder.clone());
        let before = admit(&tee);
        holder.store(Arc::new(
            crate::policy::PolicyConfig::simple(0.0, 1024).build(None),
        ));
        assert!(admit(&tee).is_none(), "the new policy copies nothing");
        // The request admitted before the swap finishes under its own policy.
        let _body = tee.body(Full::new(Bytes::new()), before);
        assert!(rx.try_recv().is_ok());
        let s = Snapshot::parse(&acc.registry().render());
        assert_eq!(s.get(crate::metrics::NOT_SAMPLED_TOTAL), 1.0);
    }

    #[tokio::test]
    async fn empty_body_is_queued_without_polling() {
        let (tee, mut rx, _) = tee(4, 1024);
        let copy = admit(&tee);
        let _body = tee.body(Full::new(Bytes::new()), copy);
        assert!(rx.try_recv().is_ok());
    }

    #[tokio::test]
    async fn oversized_body_passes_but_is_not_copied() {
        let (tee, mut rx, acc) = tee(4, 4);
        let copy = admit(&tee);
        let body = tee.body(Full::new(Bytes::from_static(b"too long")), copy);
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
            let copy = admit(&tee);
            let _ = tee.body(Full::new(Bytes::new()), copy);
        }
        assert_eq!(dropped(&acc, "queue_full"), 2.0);
    }

    #[tokio::test]
    async fn without_uplink_nothing_is_copied() {
        let acc = Arc::new(Accounting::new(1 << 20));
        let (tx, mut rx) = mpsc::channel(4);
        let down = Arc::new(UplinkState::default());
        let tee = Arc::new(Tee::new(
            Outlet::new(tx, acc.books.clone(), origin(), Some(down), None),
            policy(1024, OverLimit::Skip),
        ));
        assert!(admit(&tee).is_none(), "no ticket, so no copy is made");
        assert!(rx.try_recv().is_err());
        assert_eq!(dropped(&acc, "no_uplink"), 1.0);
        let s = Snapshot::parse(&acc.registry().render());
        assert_eq!(s.get(crate::metrics::MIRROR_IN_FLIGHT), 0.0);
        assert_eq!(s.get(crate::metrics::REQUESTS_TOTAL), 1.0);
    }

    #[tokio::test]
    async fn what_a_client_announces_is_not_set_aside_before_it_comes() {
        let (tee, _rx, _) = tee(4, 8 << 20);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from_static("8000000"),
        );
        let copy = tee
            .admit(
                &Method::POST,
                &Uri::from_static("/x"),
                Version::HTTP_11,
                &headers,
            )
            .expect("sampled");
        assert!(
            copy.frame.capacity() <= MAX_BODY_RESERVE + 1024,
            "{} bytes reserved for 8 MB announced",
            copy.frame.capacity()
        );
        let mut small = HeaderMap::new();
        small.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from_static("3000"),
        );
        let copy = tee
            .admit(
                &Method::POST,
                &Uri::from_static("/x"),
                Version::HTTP_11,
                &small,
            )
            .expect("sampled");
        assert!(
            copy.frame.capacity() >= 3000,
            "an announced small body fits at once"
        );
    }

    #[tokio::test]
    async fn copies_in_the_making_count_against_queue_bytes() {
        let acc = Arc::new(Accounting::new(8 * 1024));
        let (tx, mut rx) = mpsc::channel(4);
        let uplink = Arc::new(UplinkState::default());
        uplink.set(true);
        let tee = Arc::new(Tee::new(
            Outlet::new(tx, acc.books.clone(), origin(), Some(uplink), None),
            policy(1 << 20, OverLimit::Skip),
        ));
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from_static("5000"),
        );
        let admit = || {
            tee.admit(
                &Method::POST,
                &Uri::from_static("/x"),
                Version::HTTP_11,
                &headers,
            )
        };
        let first = admit().expect("room for one");
        assert!(
            admit().is_none(),
            "the first one's 5000 bytes are set aside already"
        );
        assert_eq!(dropped(&acc, "queue_bytes"), 1.0);
        let body = tee.body(Full::new(Bytes::from(vec![7u8; 5000])), Some(first));
        body.collect().await.expect("body");
        let q = rx.try_recv().expect("queued");
        assert_eq!(decoded(&q).body.len(), 5000);
        q.ticket.mirrored();
        assert!(
            admit().is_some(),
            "room again once the first one is resolved"
        );
    }

    #[tokio::test]
    async fn held_bytes_return_to_zero_whatever_becomes_of_a_copy() {
        let held = |acc: &Accounting| {
            Snapshot::parse(&acc.registry().render()).get(crate::metrics::MIRROR_HELD_BYTES)
        };
        let body = |b: &'static [u8]| Full::new(Bytes::from_static(b));
        for over_limit in [OverLimit::Skip, OverLimit::Truncate] {
            let (tee, mut rx, acc) = tee_with(1, policy(16, over_limit));
            // Too large (dropped, or truncated and queued), in one chunk and in several.
            let passed = tee.body(body(&[1; 40]), admit(&tee));
            passed.collect().await.expect("body");
            let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..10)
                .map(|_| Ok(Frame::data(Bytes::from_static(&[2; 5]))))
                .collect();
            let passed = tee.body(
                StreamBody::new(futures_util::stream::iter(chunks)),
                admit(&tee),
            );
            passed.collect().await.expect("body");
            // The client goes away mid-body.
            let aborted: Vec<Result<Frame<Bytes>, &str>> =
                vec![Ok(Frame::data(Bytes::from_static(b"ab"))), Err("gone")];
            let passed = tee.body(
                StreamBody::new(futures_util::stream::iter(aborted)),
                admit(&tee),
            );
            assert!(passed.collect().await.is_err());
            // Nobody reads the body to its end.
            drop(tee.body(body(b"unread"), admit(&tee)));
            // Fits, queued (the queue holds one; the rest find it full).
            for _ in 0..3 {
                tee.body(body(b"fits"), admit(&tee))
                    .collect()
                    .await
                    .expect("body");
            }
            assert!(held(&acc) > 0.0, "the queued copy holds its frame");
            while let Ok(q) = rx.try_recv() {
                q.ticket.mirrored();
            }
            assert_eq!(held(&acc), 0.0, "{over_limit:?}");
            let s = Snapshot::parse(&acc.registry().render());
            assert_eq!(s.get(crate::metrics::MIRROR_IN_FLIGHT), 0.0);
        }
    }

    #[tokio::test]
    async fn abandoned_body_counts_as_incomplete() {
        let (tee, mut rx, acc) = tee(4, 1024);
        let copy = admit(&tee);
        let body = tee.body(Full::new(Bytes::from_static(b"unread")), copy);
        drop(body);
        assert!(rx.try_recv().is_err());
        assert_eq!(dropped(&acc, "incomplete_body"), 1.0);
    }
}

//! The agent's metrics and its accounting of every request it sees.
//!
//! Every request ends in exactly one bucket:
//!
//! ```text
//! teeway_agent_requests_total = teeway_agent_not_sampled_total
//!                             + teeway_agent_mirrored_total
//!                             + sum(teeway_agent_mirror_dropped_total{reason})
//!                             + teeway_agent_mirror_in_flight
//!                             + teeway_agent_mirror_spooled_total
//! ```
//!
//! A sampled request takes a [`Ticket`] when its head arrives. The ticket is resolved exactly once,
//! as mirrored (the gateway acknowledged it) or dropped with a [`DropReason`]; a ticket dropped
//! without being resolved counts as a `shutdown` drop, so nothing can vanish from the sum, even
//! when a task is aborted. The ticket also holds the copy's bytes against `mirror.queue_bytes`
//! until it resolves, which bounds the memory held by queued and in-flight copies together.
//!
//! A copy written to the disk spool (`gateway.spool`, while no gateway is reachable) leaves this
//! identity as `spooled`; from there the spool's own identity accounts for it (see
//! the `spool` module).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{Counter, Gauge};
use teeway_runtime::logging::Throttle;
use teeway_runtime::metrics::Registry;

use crate::pace::{Pace, Paced};

/// Requests seen by the agent's listener.
pub const REQUESTS_TOTAL: &str = "teeway_agent_requests_total";
/// Requests the mirror policy passed over: not sampled, a rule `off`, or a method not allowed
/// (not a drop).
pub const NOT_SAMPLED_TOTAL: &str = "teeway_agent_not_sampled_total";
/// Copies delivered: acknowledged by the gateway, or written to the archive when the agent
/// has no gateway.
pub const MIRRORED_TOTAL: &str = "teeway_agent_mirrored_total";
/// Copies sent with their body cut at `max_body_bytes` (`over_limit: truncate`); each is also
/// counted as mirrored or dropped like any other copy.
pub const MIRROR_TRUNCATED_TOTAL: &str = "teeway_agent_mirror_truncated_total";
/// Copies given up, by reason.
pub const MIRROR_DROPPED_TOTAL: &str = "teeway_agent_mirror_dropped_total";
pub use crate::spool::{
    SPOOL_BYTES, SPOOL_DROPPED_TOTAL, SPOOL_PENDING, SPOOL_RECOVERED_TOTAL, SPOOL_SENT_TOTAL,
};
/// Copies written to the disk spool while no gateway was reachable; the spool metrics take over.
pub const MIRROR_SPOOLED_TOTAL: &str = "teeway_agent_mirror_spooled_total";
/// Copies sampled and not yet resolved (body being read, queued, or awaiting the gateway's ack).
pub const MIRROR_IN_FLIGHT: &str = "teeway_agent_mirror_in_flight";
/// Bytes of copies held against `mirror.queue_bytes`.
pub const MIRROR_HELD_BYTES: &str = "teeway_agent_mirror_held_bytes";
/// 1 while at least one gateway link is delivering (welcomed and not stalled), else 0.
pub const UPLINK_CONNECTED: &str = "teeway_agent_uplink_connected";
/// Delivering links (gateways that have welcomed this agent and are taking batches), by
/// transport.
pub const UPLINK_LINKS: &str = "teeway_agent_uplink_links";
/// Links judged stalled: batches out and nothing heard from the gateway for 1.5 s.
pub const UPLINK_STALLS_TOTAL: &str = "teeway_agent_uplink_stalls_total";
/// Uplink connection attempts, by result.
pub const UPLINK_CONNECTS_TOTAL: &str = "teeway_agent_uplink_connects_total";
/// Always 1; its labels say which production cluster this agent serves (`cluster`) and which
/// teeway version runs (`version`), for dashboards to group by.
pub const AGENT_INFO: &str = "teeway_agent_info";
/// Responses the agent produced itself because the primary could not answer.
pub const PRIMARY_ERRORS_TOTAL: &str = "teeway_agent_primary_errors_total";
/// Requests sent to the primary again because it never processed them (HTTP/2 GOAWAY or
/// REFUSED_STREAM, a keep-alive connection closed as the request went out).
pub const PRIMARY_RETRIES_TOTAL: &str = "teeway_agent_primary_retries_total";
/// Requests whose client went away before the primary's response (mid-body, or waiting).
pub const CLIENT_ABORTS_TOTAL: &str = "teeway_agent_client_aborts_total";
/// Client connections open on `listen`.
pub const CLIENT_CONNECTIONS: &str = "teeway_agent_client_connections";
/// Client connections the agent closed itself, by reason (`header_timeout`, `idle_timeout`,
/// `connection_limit`, `shutdown`).
pub const CLIENT_CONNECTIONS_CLOSED_TOTAL: &str = "teeway_agent_client_connections_closed_total";
/// Requests refused before they reached the proxy, by reason (`header_timeout`,
/// `head_too_large`, `uri_too_long`, `bad_request`): outside the accounting identity, as they
/// never reached the primary.
pub const REQUESTS_REFUSED_TOTAL: &str = "teeway_agent_requests_refused_total";
/// Failed accepts on `listen` (out of file descriptors and the like).
pub const ACCEPT_ERRORS_TOTAL: &str = "teeway_agent_accept_errors_total";
/// Responses the primary gave, by status class: production's own health, as the agent saw it.
pub const PRIMARY_RESPONSES_TOTAL: &str = "teeway_agent_primary_responses_total";
/// Time from sending a request to the primary to its response head (retries included).
pub const PRIMARY_DURATION_SECONDS: &str = "teeway_agent_primary_duration_seconds";
/// Bytes of the batches gateways acknowledged.
pub const UPLINK_BYTES_SENT_TOTAL: &str = "teeway_agent_uplink_bytes_sent_total";

/// Requests (commands, calls) read by each `rpc:` listener, by `listener`; the same identity as
/// the HTTP families, per listener, over the `teeway_agent_rpc_*` families below.
pub const RPC_REQUESTS_TOTAL: &str = "teeway_agent_rpc_requests_total";
/// RPC requests the listener's policy passed over, or that are never copied.
pub const RPC_NOT_SAMPLED_TOTAL: &str = "teeway_agent_rpc_not_sampled_total";
/// RPC copies delivered.
pub const RPC_MIRRORED_TOTAL: &str = "teeway_agent_rpc_mirrored_total";
/// RPC copies given up, by `reason`.
pub const RPC_DROPPED_TOTAL: &str = "teeway_agent_rpc_dropped_total";
/// RPC copies written to the disk spool.
pub const RPC_SPOOLED_TOTAL: &str = "teeway_agent_rpc_spooled_total";
/// RPC copies sampled and not yet resolved.
pub const RPC_IN_FLIGHT: &str = "teeway_agent_rpc_in_flight";

/// Production's answers captured for copies (`mirror.capture_response`), by what became of
/// them: one per copy that waited for its answer and was then queued.
pub const PRODUCTION_ANSWERS_TOTAL: &str = "teeway_agent_production_answers_total";

/// What became of production's answer to a copy that waited for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFate {
    /// The copy carries it, whole.
    Sent,
    /// The copy carries its first `capture_response.max_body_bytes` of body.
    Truncated,
    /// There was none to send: the primary failed, or the client went away before it ended.
    NoAnswer,
    /// It did not end within `capture_response.wait`: the request went alone.
    TooLate,
    /// Holding it would have spent `mirror.queue_bytes`: the request went alone.
    QueueBytes,
    /// The request and it together pass the protocol's frame limit: the request went alone.
    TooLarge,
}

impl AnswerFate {
    /// Every fate, in label order.
    pub const ALL: [AnswerFate; 6] = [
        AnswerFate::Sent,
        AnswerFate::Truncated,
        AnswerFate::NoAnswer,
        AnswerFate::TooLate,
        AnswerFate::QueueBytes,
        AnswerFate::TooLarge,
    ];

    /// Its `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerFate::Sent => "sent",
            AnswerFate::Truncated => "truncated",
            AnswerFate::NoAnswer => "no_answer",
            AnswerFate::TooLate => "too_late",
            AnswerFate::QueueBytes => "queue_bytes",
            AnswerFate::TooLarge => "too_large",
        }
    }
}

/// Why a copy was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The body was larger than `mirror.max_body_bytes`.
    BodyTooLarge,
    /// Nobody read the body to its end: the primary failed or answered without reading it and
    /// the rest did not arrive within the drain time (or the client waited for `100 Continue`).
    IncompleteBody,
    /// The queue held `mirror.queue` copies already.
    QueueFull,
    /// Copies held already used `mirror.queue_bytes`.
    QueueBytes,
    /// No gateway connection when the copy was due to be sent.
    NoUplink,
    /// The connection failed while the copy was on its way; the gateway never acknowledged it.
    UplinkError,
    /// The gateway refused the batch that carried the copy.
    Rejected,
    /// The agent stopped before the copy could be sent.
    Shutdown,
    /// Writing the copy to the archive failed (agents that archive instead of sending).
    ArchiveError,
    /// Writing the copy to the disk spool failed (disk full, I/O error).
    SpoolError,
    /// The request upgrades the connection (WebSocket and the like): it is passed through to the
    /// primary, and what follows the upgrade is not HTTP, so there is nothing to replay.
    NotMirrorable,
    /// The client went away before its request arrived whole.
    ClientAborted,
    /// The gateway was shedding copies of the request's rule (every target full or over its
    /// rate limit): the rule's pace passed this one over (see `mirror.follow_shedding`).
    GatewayShedding,
    /// An RPC request was larger than its listener's `max_message_bytes`.
    MessageTooLarge,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 14] = [
        DropReason::BodyTooLarge,
        DropReason::IncompleteBody,
        DropReason::QueueFull,
        DropReason::QueueBytes,
        DropReason::NoUplink,
        DropReason::UplinkError,
        DropReason::Rejected,
        DropReason::Shutdown,
        DropReason::ArchiveError,
        DropReason::SpoolError,
        DropReason::NotMirrorable,
        DropReason::ClientAborted,
        DropReason::GatewayShedding,
        DropReason::MessageTooLarge,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BodyTooLarge => "body_too_large",
            DropReason::IncompleteBody => "incomplete_body",
            DropReason::QueueFull => "queue_full",
            DropReason::QueueBytes => "queue_bytes",
            DropReason::NoUplink => "no_uplink",
            DropReason::UplinkError => "uplink_error",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
            DropReason::ArchiveError => "archive_error",
            DropReason::SpoolError => "spool_error",
            DropReason::NotMirrorable => "not_mirrorable",
            DropReason::ClientAborted => "client_aborted",
            DropReason::GatewayShedding => "gateway_shedding",
            DropReason::MessageTooLarge => "message_too_large",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The books of one tap: what its requests became, each in exactly one bucket (the module's
/// identity). The HTTP listener (or sink) keeps the unlabelled `teeway_agent_*` families; each
/// `rpc:` listener keeps its own, labelled by `listener` ([`Books::rpc`]). All of them hold
/// their copies' bytes against the one `mirror.queue_bytes` budget.
pub struct Books {
    pub(crate) requests: Counter,
    pub(crate) not_sampled: Counter,
    pub(crate) truncated: Counter,
    /// `teeway_agent_production_answers_total`, by [`AnswerFate`] (HTTP books only).
    pub(crate) answers: [Counter; AnswerFate::ALL.len()],
    mirrored: Counter,
    spooled: Counter,
    dropped: [Counter; DropReason::ALL.len()],
    in_flight: Gauge,
    budget: Arc<Budget>,
    /// One log summary per drop reason (drops are counted always, logged in summary).
    drop_logs: [Throttle; DropReason::ALL.len()],
}

impl std::fmt::Debug for Books {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Books").finish_non_exhaustive()
    }
}

/// `mirror.queue_bytes`: the memory every tap's copies share, held from when a copy is made
/// until it resolves.
struct Budget {
    held: AtomicU64,
    limit: u64,
    gauge: Gauge,
}

impl Budget {
    /// Holds `bytes` more; `false` (nothing held) when that would pass the limit.
    fn take(&self, bytes: u64) -> bool {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.limit {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        self.gauge.increment(bytes as f64);
        true
    }

    /// Lets `bytes` held go.
    fn give(&self, bytes: u64) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            self.gauge.decrement(bytes as f64);
        }
    }
}

/// The agent's counters, registered once; the hot path only touches atomics.
pub struct Accounting {
    registry: Registry,
    /// The HTTP listener's (or the sink's) books.
    pub(crate) books: Arc<Books>,
    budget: Arc<Budget>,
    pub(crate) uplink_connected: Gauge,
    pub(crate) uplink_links_quic: Gauge,
    pub(crate) uplink_links_tls: Gauge,
    pub(crate) uplink_stalls: Counter,
    pub(crate) connects_ok: Counter,
    pub(crate) connects_failed: Counter,
    pub(crate) primary_errors: Counter,
    pub(crate) primary_retries: Counter,
    pub(crate) client_aborts: Counter,
    primary_responses: [Counter; 5],
    primary_duration: metrics::Histogram,
    pub(crate) uplink_bytes: Counter,
    /// Primary failures, logged in summary for the same reason.
    pub(crate) primary_error_log: Throttle,
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting").finish_non_exhaustive()
    }
}

impl Accounting {
    /// Registers every agent metric; `held_bytes_limit` is `mirror.queue_bytes`.
    pub fn new(held_bytes_limit: u64) -> Self {
        let registry = Registry::new();
        let budget = Arc::new(Budget {
            held: AtomicU64::new(0),
            limit: held_bytes_limit,
            gauge: registry.gauge(
                MIRROR_HELD_BYTES,
                "Bytes of copies held (being copied, queued or in flight) against mirror.queue_bytes",
                &[],
            ),
        });
        let books = Arc::new(Books::http(&registry, budget.clone()));
        Self {
            books,
            budget,
            uplink_connected: registry.gauge(
                UPLINK_CONNECTED,
                "1 while at least one gateway link is delivering (welcomed, not stalled)",
                &[],
            ),
            uplink_links_quic: registry.gauge(
                UPLINK_LINKS,
                "Delivering gateway links (welcomed, not stalled), by transport",
                &[("transport", "quic")],
            ),
            uplink_links_tls: registry.gauge(
                UPLINK_LINKS,
                "Delivering gateway links (welcomed, not stalled), by transport",
                &[("transport", "tls")],
            ),
            uplink_stalls: registry.counter(
                UPLINK_STALLS_TOTAL,
                "Gateway links judged stalled: batches out and nothing heard for 1.5 s",
                &[],
            ),
            connects_ok: registry.counter(
                UPLINK_CONNECTS_TOTAL,
                "Uplink connection attempts, by result",
                &[("result", "ok")],
            ),
            connects_failed: registry.counter(
                UPLINK_CONNECTS_TOTAL,
                "Uplink connection attempts, by result",
                &[("result", "failed")],
            ),
            primary_errors: registry.counter(
                PRIMARY_ERRORS_TOTAL,
                "Requests answered with 502 because the primary could not be reached",
                &[],
            ),
            primary_retries: registry.counter(
                PRIMARY_RETRIES_TOTAL,
                "Requests sent to the primary again because it never processed them (GOAWAY, refused stream, keep-alive close)",
                &[],
            ),
            client_aborts: registry.counter(
                CLIENT_ABORTS_TOTAL,
                "Requests whose client went away before the primary's response (not a primary fault)",
                &[],
            ),
            primary_responses: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
                registry.counter(
                    PRIMARY_RESPONSES_TOTAL,
                    "Responses the primary gave, by status class",
                    &[("status_class", class)],
                )
            }),
            primary_duration: registry.histogram(
                PRIMARY_DURATION_SECONDS,
                "Time from sending a request to the primary to its response head",
                &[],
            ),
            uplink_bytes: registry.counter(
                UPLINK_BYTES_SENT_TOTAL,
                "Bytes of the batches gateways acknowledged",
                &[],
            ),
            registry,
            primary_error_log: Throttle::named("primary requests failed (answered 502)"),
        }
    }

    /// Counts a response head from the primary, `elapsed` after the request was sent.
    pub(crate) fn primary_answered(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.primary_responses[class].increment(1);
        self.primary_duration.record(elapsed.as_secs_f64());
    }

    /// The registry to render on `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A new account in the HTTP listener's books (see [`Books::ticket`]).
    pub fn ticket(&self) -> Ticket {
        self.books.ticket()
    }

    /// The books of the `rpc:` listener `name`, sharing this agent's `mirror.queue_bytes`.
    pub fn rpc_books(&self, name: &str) -> Arc<Books> {
        Arc::new(Books::rpc(&self.registry, name, self.budget.clone()))
    }
}

impl Books {
    /// The HTTP listener's (or sink's) books: the unlabelled `teeway_agent_*` families.
    fn http(registry: &Registry, budget: Arc<Budget>) -> Self {
        Self {
            requests: registry.counter(REQUESTS_TOTAL, "Requests seen by the agent", &[]),
            not_sampled: registry.counter(
                NOT_SAMPLED_TOTAL,
                "Requests the sampler passed over",
                &[],
            ),
            truncated: registry.counter(
                MIRROR_TRUNCATED_TOTAL,
                "Copies whose body was cut at max_body_bytes (over_limit: truncate)",
                &[],
            ),
            answers: AnswerFate::ALL.map(|f| {
                registry.counter(
                    PRODUCTION_ANSWERS_TOTAL,
                    "Production's answers captured for copies (mirror.capture_response), by what became of them",
                    &[("result", f.as_str())],
                )
            }),
            mirrored: registry.counter(MIRRORED_TOTAL, "Copies delivered: acknowledged by the gateway, or written to the archive when there is no gateway", &[]),
            spooled: registry.counter(
                MIRROR_SPOOLED_TOTAL,
                "Copies written to the disk spool while no gateway was reachable",
                &[],
            ),
            dropped: DropReason::ALL.map(|r| {
                if r == DropReason::MessageTooLarge {
                    return Counter::noop();
                }
                registry.counter(
                    MIRROR_DROPPED_TOTAL,
                    "Copies of sampled requests given up, by reason",
                    &[("reason", r.as_str())],
                )
            }),
            in_flight: registry.gauge(
                MIRROR_IN_FLIGHT,
                "Copies sampled and not yet mirrored or dropped",
                &[],
            ),
            budget,
            drop_logs: DropReason::ALL
                .map(|r| Throttle::named(format!("mirror copies dropped ({})", r.as_str()))),
        }
    }

    /// The books of the `rpc:` listener `listener`: the `teeway_agent_rpc_*` families.
    fn rpc(registry: &Registry, listener: &str, budget: Arc<Budget>) -> Self {
        let name = || ("listener", listener.to_owned());
        Self {
            requests: registry.counter_labels(
                RPC_REQUESTS_TOTAL,
                "Requests (commands, calls) an rpc listener read from its clients",
                &[name()],
            ),
            not_sampled: registry.counter_labels(
                RPC_NOT_SAMPLED_TOTAL,
                "Requests an rpc listener's policy passed over (or that are never copied)",
                &[name()],
            ),
            // No RPC copy is ever truncated: one over max_message_bytes is dropped.
            truncated: Counter::noop(),
            answers: AnswerFate::ALL.map(|_| Counter::noop()),
            mirrored: registry.counter_labels(
                RPC_MIRRORED_TOTAL,
                "RPC copies delivered: acknowledged by the gateway, or archived",
                &[name()],
            ),
            spooled: registry.counter_labels(
                RPC_SPOOLED_TOTAL,
                "RPC copies written to the disk spool while no gateway was reachable",
                &[name()],
            ),
            dropped: DropReason::ALL.map(|r| {
                // What only an HTTP body can come to.
                if matches!(
                    r,
                    DropReason::BodyTooLarge
                        | DropReason::IncompleteBody
                        | DropReason::ClientAborted
                ) {
                    return Counter::noop();
                }
                registry.counter_labels(
                    RPC_DROPPED_TOTAL,
                    "RPC copies of sampled requests given up, by reason",
                    &[name(), ("reason", r.as_str().to_owned())],
                )
            }),
            in_flight: registry.gauge_owned(
                RPC_IN_FLIGHT,
                "RPC copies sampled and not yet mirrored or dropped",
                &[name()],
            ),
            budget,
            drop_logs: DropReason::ALL.map(|r| {
                Throttle::named(format!(
                    "rpc listener {listener}: copies dropped ({})",
                    r.as_str()
                ))
            }),
        }
    }

    /// Opens the account of one sampled request.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        self.in_flight.increment(1.0);
        Ticket {
            books: Some(self.clone()),
            held: 0,
            pace: None,
        }
    }

    /// Counts a sampled request whose copy is not made at all (no uplink, or its rule's pace
    /// passed it over): dropped for `reason`, never in flight.
    pub(crate) fn unmade(&self, reason: DropReason) {
        self.count_drop(reason);
    }

    fn count_drop(&self, reason: DropReason) {
        self.dropped[reason.index()].increment(1);
        if reason == DropReason::GatewayShedding {
            return; // deliberate: the rule's pace says so in its own line
        }
        if let Some(dropped) = self.drop_logs[reason.index()].note() {
            tracing::warn!(
                reason = reason.as_str(),
                dropped,
                "mirror copies dropped (one line a minute at most per reason; see {MIRROR_DROPPED_TOTAL} and {RPC_DROPPED_TOTAL})"
            );
        }
    }

    fn resolve(&self, held: u64, outcome: End) {
        match outcome {
            End::Mirrored => self.mirrored.increment(1),
            End::Spooled => self.spooled.increment(1),
            End::Dropped(reason) => self.count_drop(reason),
        }
        self.budget.give(held);
        self.in_flight.decrement(1.0);
    }

    /// Counts what became of production's answer to a copy.
    pub(crate) fn answer(&self, fate: AnswerFate) {
        self.answers[fate as usize].increment(1);
    }

    /// Bytes held for a copy beside its ticket (production's answer while it streams).
    pub(crate) fn hold(self: &Arc<Self>) -> Hold {
        Hold {
            books: self.clone(),
            held: 0,
        }
    }
}

/// Bytes held against `mirror.queue_bytes` beside a copy's [`Ticket`], let go when dropped.
#[derive(Debug)]
pub struct Hold {
    books: Arc<Books>,
    held: u64,
}

impl Hold {
    /// Holds exactly `total` bytes, more or less than before; `Err(QueueBytes)` when growing
    /// would spend the budget, and what was held stays held.
    pub fn hold_total(&mut self, total: u64) -> Result<(), DropReason> {
        let budget = &self.books.budget;
        if total > self.held {
            if !budget.take(total - self.held) {
                return Err(DropReason::QueueBytes);
            }
        } else {
            budget.give(self.held - total);
        }
        self.held = total;
        Ok(())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.books.budget.give(self.held);
    }
}

/// Where a ticket ended.
enum End {
    Mirrored,
    Spooled,
    Dropped(DropReason),
}

/// The account of one sampled request; see the module docs.
#[derive(Debug)]
pub struct Ticket {
    books: Option<Arc<Books>>,
    held: u64,
    /// The pace of the rule that chose the copy, told what the gateway made of it.
    pace: Option<Paced>,
}

impl Ticket {
    /// Holds `bytes` against `mirror.queue_bytes`; `Err(QueueBytes)` when the budget is spent.
    pub fn hold(&mut self, bytes: u64) -> Result<(), DropReason> {
        let Some(books) = &self.books else {
            return Ok(());
        };
        if !books.budget.take(bytes) {
            return Err(DropReason::QueueBytes);
        }
        self.held += bytes;
        Ok(())
    }

    /// Holds exactly `total` bytes against `mirror.queue_bytes`, more or less than before (a copy
    /// in the making grows; a finished one settles at its size); `Err(QueueBytes)` when growing
    /// would spend the budget, and what was held stays held.
    pub fn hold_total(&mut self, total: u64) -> Result<(), DropReason> {
        if total == self.held {
            return Ok(());
        }
        if total > self.held {
            return self.hold(total - self.held);
        }
        if let Some(books) = &self.books {
            books.budget.give(self.held - total);
        }
        self.held = total;
        Ok(())
    }

    /// Tells `pace` what the gateway makes of the copy.
    pub(crate) fn paced_by(&mut self, pace: Paced) {
        self.pace = Some(pace);
    }

    /// The gateway acknowledged the copy; `shed`: it could not replay it anywhere. Returns the
    /// pace it told, to be settled once the batch is counted.
    pub(crate) fn acknowledged(mut self, shed: bool) -> Option<Arc<Pace>> {
        let pace = self.pace.take().map(|p| p.acknowledged(shed));
        self.mirrored();
        pace
    }

    /// The gateway acknowledged the copy.
    pub fn mirrored(mut self) {
        if let Some(books) = self.books.take() {
            books.resolve(self.held, End::Mirrored);
        }
    }

    /// The copy was written to the disk spool, whose metrics account for it from now on.
    pub fn spooled(mut self) {
        if let Some(books) = self.books.take() {
            books.resolve(self.held, End::Spooled);
        }
    }

    /// The copy was given up.
    pub fn dropped(mut self, reason: DropReason) {
        if let Some(books) = self.books.take() {
            books.resolve(self.held, End::Dropped(reason));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(books) = self.books.take() {
            books.resolve(self.held, End::Dropped(DropReason::Shutdown));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use teeway_runtime::metrics::Snapshot;

    fn snapshot(acc: &Accounting) -> Snapshot {
        Snapshot::parse(&acc.registry().render())
    }

    #[test]
    fn every_ticket_resolves_exactly_once() {
        let acc = Arc::new(Accounting::new(1000));
        let a = acc.ticket();
        let b = acc.ticket();
        let c = acc.ticket();
        assert_eq!(snapshot(&acc).get(MIRROR_IN_FLIGHT), 3.0);
        a.mirrored();
        b.dropped(DropReason::QueueFull);
        drop(c); // never resolved: counted as shutdown
        let s = snapshot(&acc);
        assert_eq!(s.get(MIRRORED_TOTAL), 1.0);
        assert_eq!(
            s.get("teeway_agent_mirror_dropped_total{reason=\"queue_full\"}"),
            1.0
        );
        assert_eq!(
            s.get("teeway_agent_mirror_dropped_total{reason=\"shutdown\"}"),
            1.0
        );
        assert_eq!(s.get(MIRROR_IN_FLIGHT), 0.0);
    }

    #[test]
    fn byte_budget_is_held_until_resolution() {
        let acc = Arc::new(Accounting::new(100));
        let mut a = acc.ticket();
        let mut b = acc.ticket();
        assert_eq!(a.hold(60), Ok(()));
        assert_eq!(b.hold(60), Err(DropReason::QueueBytes));
        b.dropped(DropReason::QueueBytes);
        assert_eq!(snapshot(&acc).get(MIRROR_HELD_BYTES), 60.0);
        a.mirrored();
        let mut c = acc.ticket();
        assert_eq!(c.hold(100), Ok(()), "released bytes are reusable");
        c.mirrored();
        assert_eq!(snapshot(&acc).get(MIRROR_HELD_BYTES), 0.0);
    }
}

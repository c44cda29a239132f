//! The gateway's metric names and handles.
//!
//! Every record received is dispatched to each target of its route, and each (record, target)
//! pair ends in exactly one bucket:
//!
//! ```text
//! teeway_gateway_received_total × targets of its route
//!   = sum(teeway_gateway_replayed_total{status_class}) + sum(teeway_gateway_replay_failed_total{reason})
//!     + sum(teeway_gateway_replay_skipped_total{reason}) + teeway_gateway_replay_in_flight
//! ```
//!
//! (a record that matches no route counts once, as `replay_failed_total{reason="no_route"}`
//! with empty `route` and `target`; a capture-only gateway replays nothing, and its records end
//! in `teeway_archive_*`). Skipped is by policy (a target's `percentage`, a truncated body the
//! route does not replay); failed is everything else, `rate_limited` and `overloaded` included.
//!
//! The replay families carry `route` (the route's name) and `target` (the target's URL), so
//! with fan-out each shadow's failures are its own; both are bounded by the configuration (a
//! reload adds the series of new routes and targets; those of removed ones stay, unchanged, until
//! the process restarts). [`TargetMetrics`] holds one (route, target) pair's handles.

use metrics::{Counter, Gauge, Histogram};
use teeway_runtime::logging::Throttle;
use teeway_runtime::metrics::Registry;

/// Records received from agents.
pub const RECEIVED_TOTAL: &str = "teeway_gateway_received_total";
/// Replays whose response was read to the end, by status class.
pub const REPLAYED_TOTAL: &str = "teeway_gateway_replayed_total";
/// Replays that did not complete, by reason.
pub const REPLAY_FAILED_TOTAL: &str = "teeway_gateway_replay_failed_total";
/// Replays under way.
pub const REPLAY_IN_FLIGHT: &str = "teeway_gateway_replay_in_flight";
/// Time from sending a replay to the end of the shadow's response.
pub const REPLAY_DURATION_SECONDS: &str = "teeway_gateway_replay_duration_seconds";
/// Completed gRPC replays by the `grpc-status` the shadow answered.
pub const REPLAY_GRPC_TOTAL: &str = "teeway_gateway_replay_grpc_total";
/// Replays not attempted by policy, by reason.
pub const REPLAY_SKIPPED_TOTAL: &str = "teeway_gateway_replay_skipped_total";
/// Agent connection attempts, by result.
pub const HANDSHAKES_TOTAL: &str = "teeway_gateway_handshakes_total";
/// Agents connected now.
pub const AGENTS_CONNECTED: &str = "teeway_gateway_agents_connected";
/// Records of batches an agent sent again that had been received already: acknowledged, not
/// replayed.
pub const DUPLICATES_TOTAL: &str = "teeway_gateway_duplicates_total";
/// Records of batches an agent marked as sent before that were dispatched (not known here as
/// received: a late first copy, or one a restarted gateway cannot remember; possibly a duplicate).
pub const RETRIED_TOTAL: &str = "teeway_gateway_retried_total";
/// Bytes buffered from agents now (batches not yet complete), against `limits.buffer_bytes`.
pub const BUFFERED_BYTES: &str = "teeway_gateway_buffered_bytes";
/// Streams refused because they broke the protocol, by reason.
pub const STREAMS_REJECTED_TOTAL: &str = "teeway_gateway_streams_rejected_total";
/// TCP tee streams received from agents (one per teed production connection).
pub const TCP_STREAMS_TOTAL: &str = "teeway_gateway_tcp_streams_total";
/// TCP replays ended, by result (one per stream and target; `no_route` once per stream).
pub const TCP_REPLAYS_TOTAL: &str = "teeway_gateway_tcp_replays_total";
/// TCP replay connections under way.
pub const TCP_REPLAYS_IN_FLIGHT: &str = "teeway_gateway_tcp_replays_in_flight";
/// Bytes written to TCP replay connections.
pub const TCP_BYTES_REPLAYED_TOTAL: &str = "teeway_gateway_tcp_bytes_replayed_total";

/// How a TCP replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpResult {
    /// Every byte the client sent was written to the target.
    Completed,
    /// No `tcp_routes` entry names the stream's listener for this agent.
    NoRoute,
    /// The target had `max_connections` replays open already.
    Overloaded,
    /// The target could not be connected to.
    Connect,
    /// Writing to the target failed, or it closed while the client still sent.
    Io,
    /// The target fell more than its queue behind the stream.
    Lagging,
    /// The agent gave the stream up (its copy fell behind, or it stopped) or it broke the protocol.
    Incomplete,
    /// The gateway stopped first.
    Shutdown,
}

impl TcpResult {
    const ALL: [TcpResult; 8] = [
        TcpResult::Completed,
        TcpResult::NoRoute,
        TcpResult::Overloaded,
        TcpResult::Connect,
        TcpResult::Io,
        TcpResult::Lagging,
        TcpResult::Incomplete,
        TcpResult::Shutdown,
    ];

    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TcpResult::Completed => "completed",
            TcpResult::NoRoute => "no_route",
            TcpResult::Overloaded => "overloaded",
            TcpResult::Connect => "connect",
            TcpResult::Io => "io_error",
            TcpResult::Lagging => "lagging",
            TcpResult::Incomplete => "incomplete",
            TcpResult::Shutdown => "shutdown",
        }
    }
}

/// Why a replay did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// No route matched the record.
    NoRoute,
    /// The target already had `max_concurrency` replays in flight.
    Overloaded,
    /// The target could not be connected to.
    Connect,
    /// The replay took longer than the route's `timeout`.
    Timeout,
    /// The record could not be made into a request for this target.
    InvalidRequest,
    /// The exchange failed after connecting (reset, malformed response).
    Error,
    /// The target's `rate_limit` had no token left.
    RateLimited,
}

/// Why a replay was not attempted, by policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The target's `percentage` passed it over.
    NotSampled,
    /// The agent truncated the body and the route does not replay truncated copies.
    Truncated,
}

impl SkipReason {
    const ALL: [SkipReason; 2] = [SkipReason::NotSampled, SkipReason::Truncated];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotSampled => "not_sampled",
            SkipReason::Truncated => "truncated",
        }
    }
}

impl FailReason {
    const ALL: [FailReason; 7] = [
        FailReason::NoRoute,
        FailReason::Overloaded,
        FailReason::Connect,
        FailReason::Timeout,
        FailReason::InvalidRequest,
        FailReason::Error,
        FailReason::RateLimited,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::NoRoute => "no_route",
            FailReason::Overloaded => "overloaded",
            FailReason::Connect => "connect",
            FailReason::Timeout => "timeout",
            FailReason::InvalidRequest => "invalid_request",
            FailReason::Error => "error",
            FailReason::RateLimited => "rate_limited",
        }
    }
}

/// Registered handles.
pub struct GatewayMetrics {
    registry: Registry,
    pub(crate) received: Counter,
    /// `replay_failed_total{route="",target="",reason="no_route"}`.
    no_route: Counter,
    /// One log summary per failure reason: failures can come at request rate.
    failed_logs: [Throttle; 7],
    pub(crate) in_flight: Gauge,
    pub(crate) handshakes_ok: Counter,
    pub(crate) handshakes_unauthorized: Counter,
    pub(crate) agents_connected: Gauge,
    pub(crate) streams_rejected_protocol: Counter,
    pub(crate) streams_rejected_too_large: Counter,
    pub(crate) streams_rejected_over_budget: Counter,
    pub(crate) streams_rejected_timeout: Counter,
    pub(crate) handshakes_connection_limit: Counter,
    /// `handshakes_total{result}` of each [`HANDSHAKE_CAUSES`] entry.
    handshakes_failed: [Counter; HANDSHAKE_CAUSES.len()],
    /// `teeway_gateway_buffered_bytes`.
    pub(crate) buffered: Gauge,
    pub(crate) duplicates: Counter,
    pub(crate) retried: Counter,
    /// Refused streams, logged in summary (an authenticated peer could send many).
    pub(crate) rejected_log: Throttle,
    /// Refused handshakes, logged in summary per cause (anyone who can reach the port can cause
    /// them; one cause must not hide another).
    handshake_logs: [Throttle; HANDSHAKE_CAUSES.len()],
    /// Agents refused by `agents.allow`, logged in summary per identity (a refused agent
    /// retries every second or so), for up to `MAX_LOGGED_IDENTITIES` identities.
    unauthorized_logs: std::sync::Mutex<std::collections::HashMap<String, Throttle>>,
    pub(crate) tcp_streams: Counter,
    tcp_replays: [Counter; 8],
    /// One log summary per TCP result other than `completed`.
    tcp_logs: [Throttle; 8],
    pub(crate) tcp_in_flight: Gauge,
    pub(crate) tcp_bytes: Counter,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Registers every gateway metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let no_route = r.counter(
            REPLAY_FAILED_TOTAL,
            FAILED_HELP,
            &[("route", ""), ("target", ""), ("reason", "no_route")],
        );
        let rejected = |reason| {
            r.counter(
                STREAMS_REJECTED_TOTAL,
                "Agent streams refused, by reason",
                &[("reason", reason)],
            )
        };
        let tcp_replays = TcpResult::ALL.map(|result| {
            r.counter(
                TCP_REPLAYS_TOTAL,
                "TCP replays ended, by result",
                &[("result", result.as_str())],
            )
        });
        Self {
            tcp_streams: r.counter(
                TCP_STREAMS_TOTAL,
                "TCP tee streams received from agents",
                &[],
            ),
            tcp_replays,
            tcp_logs: TcpResult::ALL
                .map(|r| Throttle::named(format!("TCP replays ended {}", r.as_str()))),
            tcp_in_flight: r.gauge(
                TCP_REPLAYS_IN_FLIGHT,
                "TCP replay connections under way",
                &[],
            ),
            tcp_bytes: r.counter(
                TCP_BYTES_REPLAYED_TOTAL,
                "Bytes written to TCP replay connections",
                &[],
            ),
            received: r.counter(
                RECEIVED_TOTAL,
                "Mirrored requests received from agents",
                &[],
            ),
            no_route,
            failed_logs: FailReason::ALL
                .map(|r| Throttle::named(format!("replays failed ({})", r.as_str()))),
            in_flight: r.gauge(REPLAY_IN_FLIGHT, "Replays under way", &[]),
            handshakes_ok: r.counter(
                HANDSHAKES_TOTAL,
                "Agent connection attempts, by result",
                &[("result", "ok")],
            ),
            handshakes_unauthorized: r.counter(
                HANDSHAKES_TOTAL,
                "Agent connection attempts, by result",
                &[("result", "unauthorized")],
            ),
            agents_connected: r.gauge(AGENTS_CONNECTED, "Agents connected now", &[]),
            streams_rejected_protocol: rejected("protocol"),
            streams_rejected_too_large: rejected("too_large"),
            streams_rejected_over_budget: rejected("over_budget"),
            streams_rejected_timeout: rejected("timeout"),
            handshakes_connection_limit: r.counter(
                HANDSHAKES_TOTAL,
                "Agent connection attempts, by result",
                &[("result", "connection_limit")],
            ),
            handshakes_failed: HANDSHAKE_CAUSES.map(|(_, _, _, result)| {
                r.counter(
                    HANDSHAKES_TOTAL,
                    "Agent connection attempts, by result",
                    &[("result", result)],
                )
            }),
            duplicates: r.counter(
                DUPLICATES_TOTAL,
                "Records of batches sent again and received already: acknowledged, not replayed",
                &[],
            ),
            retried: r.counter(
                RETRIED_TOTAL,
                "Records of batches marked as sent before, dispatched (possibly duplicates)",
                &[],
            ),
            buffered: r.gauge(
                BUFFERED_BYTES,
                "Bytes buffered from agents (batches not yet complete), against limits.buffer_bytes",
                &[],
            ),
            rejected_log: Throttle::named("agent streams refused"),
            handshake_logs: HANDSHAKE_CAUSES.map(|(cause, _, _, _)| {
                Throttle::named(format!("agent handshakes refused ({cause})"))
            }),
            unauthorized_logs: Default::default(),
            registry: r,
        }
    }

    /// The registry rendered on `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The handles of one (route, target) pair: registered on first use, found again after.
    pub fn for_target(&self, route: &str, target: &str) -> TargetMetrics {
        let r = &self.registry;
        let labels = |extra: Option<(&'static str, &'static str)>| {
            let mut l = vec![("route", route.to_owned()), ("target", target.to_owned())];
            if let Some((k, v)) = extra {
                l.push((k, v.to_owned()));
            }
            l
        };
        TargetMetrics {
            route: route.into(),
            target: target.into(),
            replayed: STATUS_CLASSES.map(|class| {
                r.counter_labels(
                    REPLAYED_TOTAL,
                    REPLAYED_HELP,
                    &labels(Some(("status_class", class))),
                )
            }),
            // `no_route` belongs to no route: it has its own series, with empty labels.
            failed: FailReason::ALL.map(|reason| {
                if reason == FailReason::NoRoute {
                    return Counter::noop();
                }
                r.counter_labels(
                    REPLAY_FAILED_TOTAL,
                    FAILED_HELP,
                    &labels(Some(("reason", reason.as_str()))),
                )
            }),
            skipped: SkipReason::ALL.map(|reason| {
                r.counter_labels(
                    REPLAY_SKIPPED_TOTAL,
                    "Replays not attempted by policy, by reason",
                    &labels(Some(("reason", reason.as_str()))),
                )
            }),
            duration: r.histogram_labels(
                REPLAY_DURATION_SECONDS,
                "Time from sending a replay to the end of the shadow's response",
                &labels(None),
            ),
            grpc: GRPC_CODES.map(|code| {
                r.counter_labels(
                    REPLAY_GRPC_TOTAL,
                    "Completed gRPC replays, by the grpc-status the shadow answered",
                    &labels(Some(("grpc_status", code))),
                )
            }),
        }
    }

    /// Counts a refused handshake and logs it, in summary per cause, with what to do.
    pub(crate) fn refused_handshake(&self, error: &str) {
        let (cause, _) = handshake_cause(error);
        let index = HANDSHAKE_CAUSES
            .iter()
            .position(|(c, _, _, _)| *c == cause)
            .unwrap_or(HANDSHAKE_CAUSES.len() - 1);
        self.handshakes_failed[index].increment(1);
        let (cause, _, fix, _) = HANDSHAKE_CAUSES[index];
        if cause == "abandoned" {
            // Normal for agents racing QUIC and TLS: counted, not warned about.
            tracing::debug!(%error, "agent handshake abandoned by the peer: {fix}");
            return;
        }
        if let Some(refused) = self.handshake_logs[index].note() {
            tracing::warn!(cause, %error, refused, "agent handshake refused: {fix} (one line a minute at most per cause)");
        }
    }

    /// Counts an agent whose identity `agents.allow` does not name, and logs it in summary per
    /// identity.
    pub(crate) fn unauthorized(&self, identity: &str) {
        self.handshakes_unauthorized.increment(1);
        let due = {
            let mut logs = self
                .unauthorized_logs
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let key = if logs.contains_key(identity) || logs.len() < MAX_LOGGED_IDENTITIES {
                identity
            } else {
                "(other identities)"
            };
            logs.entry(key.to_owned())
                .or_insert_with(|| {
                    Throttle::named(format!("agent {key} refused: not in agents.allow"))
                })
                .note()
        };
        if let Some(refused) = due {
            tracing::warn!(%identity, refused, "agent refused: its certificate identity is not in agents.allow; add it there (or a pattern such as prod-*) if it should mirror (one line a minute at most per identity)");
        }
    }

    /// Counts a record no route takes.
    pub fn no_route(&self) {
        self.no_route.increment(1);
        self.log_failure(FailReason::NoRoute, "", "");
    }

    fn log_failure(&self, reason: FailReason, route: &str, target: &str) {
        if let Some(failed) = self.failed_logs[reason as usize].note() {
            tracing::warn!(
                reason = reason.as_str(),
                route,
                target,
                failed,
                "replays failed (one line a minute at most per reason, naming the last route and target; see {REPLAY_FAILED_TOTAL})"
            );
        }
    }

    /// Counts a TCP replay's end.
    pub fn tcp_replay(&self, result: TcpResult) {
        self.tcp_replays[result as usize].increment(1);
        if result == TcpResult::Completed {
            return;
        }
        if let Some(ended) = self.tcp_logs[result as usize].note() {
            tracing::warn!(
                result = result.as_str(),
                ended,
                "TCP replays did not complete (one line a minute at most per result; see {TCP_REPLAYS_TOTAL})"
            );
        }
    }

    /// Counts a replay to `target` that did not complete.
    pub fn failed(&self, target: &TargetMetrics, reason: FailReason) {
        target.failed[reason as usize].increment(1);
        self.log_failure(reason, &target.route, &target.target);
    }
}

/// Identities logged one by one when refused by `agents.allow`; more share one line.
const MAX_LOGGED_IDENTITIES: usize = 256;

/// Why an agent handshake failed, told from the error text (rustls and quinn name the cause),
/// with what an operator does about it. The last entry takes the rest.
/// The last field is the `handshakes_total{result}` label: every certificate problem is
/// `refused`; a peer that speaks no teeway version, or no TLS at all, or too slowly, is not.
const HANDSHAKE_CAUSES: [(&str, &[&str], &str, &str); 10] = [
    (
        "certificate_expired",
        &["Expired", "expired", "NotValidYet", "not valid yet", "not valid before"],
        "the agent's certificate has expired or is not yet valid: renew it (`teeway certs issue`), check the clocks",
        "refused",
    ),
    (
        "unknown_ca",
        &["UnknownIssuer", "BadSignature", "UnknownCA", "unknown issuer", "bad signature"],
        "the agent's certificate is not signed by a CA in tls.ca: issue it from the gateway's CA or add its CA to tls.ca",
        "refused",
    ),
    (
        "no_certificate",
        &["NoCertificatesPresented", "CertificateRequired", "no certificates", "certificate required"],
        "the peer presented no client certificate: only teeway agents with gateway.cert connect here",
        "refused",
    ),
    (
        "not_client_certificate",
        &["InvalidPurpose", "UnsupportedCertificate", "extended key usage"],
        "the agent's certificate is not for client authentication (extendedKeyUsage clientAuth)",
        "refused",
    ),
    (
        // Before "alpn": quinn words a peer's close during the handshake "the application or
        // application protocol caused the connection to be closed".
        "abandoned",
        &["aborted by peer", "handshake eof"],
        "the peer closed before the handshake finished: an agent that got through another way (it tries QUIC and TLS side by side), or a TCP health check",
        "abandoned",
    ),
    (
        "alpn",
        &["NoApplicationProtocol", "known protocol", "application protocol"],
        "the peer does not speak a teeway protocol version this gateway knows (ALPN)",
        "alpn",
    ),
    (
        "not_tls",
        &["InvalidContentType", "corrupt message", "InvalidMessage", "invalid message"],
        "the peer does not speak TLS on this port (a port scanner, or plain HTTP)",
        "not_tls",
    ),
    (
        "timeout",
        &["timed out", "TimedOut", "not completed in time"],
        "the handshake did not finish in time: a slow or lossy path, or a port scanner",
        "timeout",
    ),
    (
        "certificate",
        &["certificate", "Certificate"],
        "the agent's certificate was not accepted: see the error",
        "refused",
    ),
    ("other", &[], "see the error", "failed"),
];

/// The cause [`GatewayMetrics::refused_handshake`] logs for `error`, and its result label.
fn handshake_cause(error: &str) -> (&'static str, &'static str) {
    let (cause, _, _, result) = HANDSHAKE_CAUSES
        .iter()
        .find(|(_, needles, _, _)| needles.iter().any(|n| error.contains(n)))
        .unwrap_or(&HANDSHAKE_CAUSES[HANDSHAKE_CAUSES.len() - 1]);
    (cause, result)
}

const REPLAYED_HELP: &str =
    "Replays completed, by route, target and status class of the shadow's response";
const FAILED_HELP: &str = "Replays that did not complete, by route, target and reason";

/// The `grpc_status` label values: the codes of the gRPC specification, and `other`.
const GRPC_CODES: [&str; 18] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "other",
];

/// The replay handles of one (route, target) pair.
pub struct TargetMetrics {
    route: Box<str>,
    target: Box<str>,
    replayed: [Counter; 5],
    failed: [Counter; 7],
    skipped: [Counter; 2],
    duration: Histogram,
    grpc: [Counter; 18],
}

impl std::fmt::Debug for TargetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetMetrics")
            .field("route", &self.route)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TargetMetrics {
    /// Counts a completed replay: status class, time, and the `grpc-status` when there was one.
    pub fn replayed(
        &self,
        status: http::StatusCode,
        elapsed: std::time::Duration,
        grpc: Option<&[u8]>,
    ) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.replayed[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
        if let Some(code) = grpc {
            let index = std::str::from_utf8(code)
                .ok()
                .and_then(|c| c.trim().parse::<usize>().ok())
                .filter(|&c| c <= 16)
                .unwrap_or(17);
            self.grpc[index].increment(1);
        }
    }

    /// Counts a replay not attempted by policy.
    pub fn skipped(&self, reason: SkipReason) {
        self.skipped[reason as usize].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_errors_are_told_apart_as_rustls_and_quinn_word_them() {
        for (error, cause, result) in [
            ("the cryptographic handshake failed: error 42: invalid peer certificate: certificate expired: verification time 1700000000 (UNIX), but certificate is not valid after 1600000000 (100000000 seconds ago)", "certificate_expired", "refused"),
            ("invalid peer certificate: certificate not valid yet: verification time 1, but certificate is not valid before 2", "certificate_expired", "refused"),
            ("the cryptographic handshake failed: error 51: invalid peer certificate: BadSignature", "unknown_ca", "refused"),
            ("invalid peer certificate: UnknownIssuer", "unknown_ca", "refused"),
            ("peer sent no certificates", "no_certificate", "refused"),
            ("invalid peer certificate: certificate does not allow extended key usage for client authentication", "not_client_certificate", "refused"),
            ("peer doesn't support any known protocol", "alpn", "alpn"),
            ("aborted by peer: the application or application protocol caused the connection to be closed during the handshake", "abandoned", "abandoned"),
            ("tls handshake eof", "abandoned", "abandoned"),
            ("received corrupt message of type InvalidContentType", "not_tls", "not_tls"),
            ("handshake not completed in time", "timeout", "timeout"),
            ("invalid peer certificate: certificate revoked", "certificate", "refused"),
            ("connection reset by peer", "other", "failed"),
        ] {
            assert_eq!(handshake_cause(error), (cause, result), "{error}");
        }
    }
}

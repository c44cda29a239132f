//! The dispatcher: what both agent listeners hand their batches to. It owns the gateway's side
//! of the books (received, duplicates, refusals), the memory budget, exactly-once delivery
//! across connections (`dedupe`), the archive, and routing each record to its replays.
//!
//! Listeners ([`crate::listener`]) own transports and framing; the dispatcher knows neither.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use teeway_wire::{Envelope, Frame, MirroredRequest, Shed, Welcome};

use crate::budget::{Budget, ConnectionBudget, MAX_STREAM_BYTES};
use crate::metrics::{FailReason, GatewayMetrics, SkipReason};
use crate::observe::{Observers, Outcome};
use crate::replay::Refusal;
use crate::Routing;

/// What stream handlers share.
pub struct Dispatcher {
    /// Routes and allowed agents in force; swapped whole by a reload.
    pub(crate) routing: Arc<ArcSwap<Routing>>,
    pub(crate) metrics: Arc<GatewayMetrics>,
    /// Replays under way, awaited at shutdown.
    pub(crate) replays: TaskTracker,
    /// Where every received record is also written, if anywhere.
    pub(crate) archive: Option<teeway_archive::Archive>,
    /// What sees each answer, and (if any asks) each copy's finished exchange with every
    /// target's outcome; none asking: no exchange is made.
    pub(crate) observers: Observers,
    /// Memory for what agents send (`limits:`).
    pub(crate) budget: Arc<Budget>,
    /// Batches received, by agent session, so that one sent again is not replayed twice.
    pub(crate) dedupe: crate::dedupe::Dedupe,
    /// This dispatcher (and its `dedupe` memory), named in `WELCOME` (version 4) so that agents
    /// send a batch again on a new connection only when it reaches the same one.
    pub(crate) instance: u64,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// The `WELCOME` for an agent `identity` on a connection of protocol `version`: this
    /// gateway's instance from version 4 on (older agents would refuse the extra field).
    pub(crate) fn welcome(&self, version: u16, identity: &str) -> Welcome {
        Welcome {
            protocol_version: version,
            agent_identity: identity.to_owned(),
            software: concat!("teeway ", env!("CARGO_PKG_VERSION")).to_owned(),
            gateway_instance: if version >= 4 { self.instance } else { 0 },
        }
    }

    /// Counts a failed handshake and says why (one line a minute at most: anyone can knock).
    pub(crate) fn refused_handshake(&self, error: &str) {
        self.metrics.refused_handshake(error);
    }

    /// Counts and logs an agent whose identity `agents.allow` does not name.
    pub(crate) fn unauthorized(&self, identity: &str) {
        self.metrics.unauthorized(identity);
    }

    /// A connection's share of the memory budget, or why the identity may not open another
    /// (counted and logged in summary).
    pub(crate) fn connection_budget(
        &self,
        identity: &Arc<str>,
    ) -> Result<ConnectionBudget, String> {
        self.budget.connection(identity).map_err(|too_many| {
            self.metrics.handshakes_connection_limit.increment(1);
            let why = format!(
                "agent identity {identity:?} holds limits.connections_per_identity ({}) connections already",
                too_many.limit
            );
            self.note_rejected(identity, &why);
            why
        })
    }

    /// Counts a refused stream by reason and logs it in summary.
    pub(crate) fn refuse_stream(&self, identity: &str, why: Refused) {
        let m = &self.metrics;
        let text = match why {
            Refused::Protocol(problem) => {
                m.streams_rejected_protocol.increment(1);
                problem
            }
            Refused::TooLarge => {
                m.streams_rejected_too_large.increment(1);
                format!("a stream larger than the protocol allows ({MAX_STREAM_BYTES} bytes)")
            }
            Refused::OverBudget => {
                m.streams_rejected_over_budget.increment(1);
                "the memory budget for incoming data is spent (limits.buffer_bytes or connection_buffer_bytes); the agent retries".to_owned()
            }
            Refused::Timeout(after) => {
                m.streams_rejected_timeout.increment(1);
                format!("a batch did not arrive whole within limits.stream_timeout ({after:?})")
            }
        };
        self.note_rejected(identity, &text);
    }

    /// Logs, in summary, a stream (or TLS connection) refused.
    pub(crate) fn note_rejected(&self, identity: &str, problem: &str) {
        if let Some(streams) = self.metrics.rejected_log.note() {
            tracing::warn!(
                %identity,
                %problem,
                streams,
                "agent streams refused and reset (one line a minute at most; see teeway_gateway_streams_rejected_total)"
            );
        }
    }

    /// Takes a whole batch from `identity`, an agent of protocol `version`: dispatches its records
    /// unless `id` names a batch received already, and answers with the `ACK`: every record
    /// accepted, and (version 6) those no target could take marked shed.
    pub(crate) fn take_batch(
        &self,
        version: u16,
        id: Option<teeway_wire::BatchId>,
        records: Vec<Envelope>,
        identity: &Arc<str>,
    ) -> Frame {
        let accepted = u32::try_from(records.len()).unwrap_or(u32::MAX);
        let mut shed = Shed::default();
        if let Some(id) = id {
            match self.dedupe.mark(identity, id.session, id.seq) {
                crate::dedupe::Verdict::Duplicate => {
                    self.metrics.duplicates.increment(u64::from(accepted));
                    return Frame::Ack { accepted, shed };
                }
                crate::dedupe::Verdict::New | crate::dedupe::Verdict::Unknown if id.retry => {
                    self.metrics.retried.increment(u64::from(accepted));
                }
                _ => {}
            }
        }
        for (index, mut record) in records.into_iter().enumerate() {
            // Who sent it is what the certificate says, whatever the agent wrote.
            record.meta_mut().source_identity = identity.clone();
            if self.dispatch(record, identity) == Taken::Shed && version >= 6 {
                shed.insert(index);
            }
        }
        Frame::Ack { accepted, shed }
    }

    /// Counts `record` from the agent `identity`, archives it, and hands it to the replayer of
    /// its kind; never waits.
    pub(crate) fn dispatch(&self, record: Envelope, identity: &Arc<str>) -> Taken {
        self.metrics.received.increment(1);
        let routing = self.routing.load();
        if let Some(archive) = &self.archive {
            archive.try_submit(record.clone(), None);
            if routing.router.is_empty() {
                // A capture-only gateway: the archive is the destination.
                return Taken::Kept;
            }
        }
        let taken = match record {
            Envelope::HttpRequest(request) => self.dispatch_http(request, identity, &routing),
            // Requests have replayers; anything else has no route here, and is counted so.
            Envelope::RpcRequest(request) => self.dispatch_rpc(request, identity, &routing),
            Envelope::HttpResponse(_) | Envelope::Other { .. } => {
                self.metrics.no_route();
                Taken::Kept
            }
        };
        // An archived copy was of use, whatever its targets made of it.
        if self.archive.is_some() {
            Taken::Kept
        } else {
            taken
        }
    }

    /// Routes an HTTP request's copy and starts its replays.
    fn dispatch_http(
        &self,
        record: MirroredRequest,
        identity: &Arc<str>,
        routing: &Routing,
    ) -> Taken {
        let Some(route) = routing.router.route(&record, identity) else {
            self.metrics.no_route();
            return Taken::Kept;
        };
        let record = Arc::new(record);
        let own = route
            .compare
            .clone()
            .map(|c| c as Arc<dyn crate::observe::Observer>);
        let pending = self
            .observers
            .exchange(&record, identity, &route.name, own.as_ref(), || {
                route.targets.iter().map(|(t, _)| t.url.clone()).collect()
            });
        let report = |index: usize, outcome: Outcome| {
            if let Some(pending) = &pending {
                pending.report(index, outcome);
            }
        };
        if record.body_truncated && !route.replay_truncated {
            for (index, (_, handles)) in route.targets.iter().enumerate() {
                handles.skipped(SkipReason::Truncated);
                report(index, Outcome::Skipped(SkipReason::Truncated));
            }
            return Taken::Kept;
        }
        let capture = self.observers.capture_with(own.as_ref());
        // Shed unless a target replays it at once, if any target was full or over its rate.
        let mut taken = Taken::Kept;
        for (index, (target, handles)) in route.targets.iter().enumerate() {
            let slot = match target.admit(&record) {
                Ok(slot) => {
                    // A record that must wait for a slot of a target that has been shedding
                    // will most likely be shed too, after the ACK has gone: it is marked. (A
                    // burst that a target keeping up absorbs by a brief wait is not.)
                    if slot.is_held() || !target.shedding() {
                        taken = Taken::Replayed;
                    } else if taken == Taken::Kept {
                        taken = Taken::Shed;
                    }
                    slot
                }
                Err(Refusal::NotSampled) => {
                    handles.skipped(SkipReason::NotSampled);
                    report(index, Outcome::Skipped(SkipReason::NotSampled));
                    continue;
                }
                Err(refusal @ (Refusal::RateLimited | Refusal::Overloaded)) => {
                    let reason = match refusal {
                        Refusal::RateLimited => FailReason::RateLimited,
                        _ => FailReason::Overloaded,
                    };
                    self.metrics.failed(handles, reason);
                    report(index, Outcome::Failed(reason));
                    if taken == Taken::Kept {
                        taken = Taken::Shed;
                    }
                    continue;
                }
            };
            // In flight from admission, not from when the task first runs, so the identity
            // holds at every scrape.
            self.metrics.in_flight.increment(1.0);
            let target = target.clone();
            let handles = handles.clone();
            let record = record.clone();
            let metrics = self.metrics.clone();
            let identity = identity.clone();
            let pending = pending.clone();
            let observers = self.observers.clone();
            self.replays.spawn(async move {
                let outcome = target
                    .replay(&record, &identity, (&metrics, &handles), capture, slot)
                    .await;
                if let Ok(answer) = &outcome {
                    observers.answered(&record, &target.url, answer);
                }
                if let Some(pending) = pending {
                    pending.report(
                        index,
                        outcome.map_or_else(Outcome::Failed, Outcome::Answered),
                    );
                }
            });
        }
        taken
    }
}

impl Dispatcher {
    /// Routes an RPC request's copy and starts its replays, one per target of its route.
    fn dispatch_rpc(
        &self,
        request: teeway_wire::RpcRequest,
        identity: &Arc<str>,
        routing: &Routing,
    ) -> Taken {
        let Some(route) = routing.rpc.route(&request, identity) else {
            self.metrics.no_route();
            return Taken::Kept;
        };
        let request = Arc::new(request);
        let mut taken = Taken::Kept;
        for (target, handles) in &route.targets {
            let Some(permit) = target.admit(request.message.len()) else {
                crate::rpc::overloaded(&request, handles);
                if taken == Taken::Kept {
                    taken = Taken::Shed;
                }
                continue;
            };
            taken = Taken::Replayed;
            // Sent here, in the order the copies came; the connection settles its account.
            let replay = crate::rpc::Replay::start(
                request.clone(),
                handles.clone(),
                permit,
                self.replays.token(),
            );
            target.send(replay, route.timeout());
        }
        taken
    }
}

/// What became of a record at dispatch: what the agent learns of it in the `ACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// At least one target is replaying it.
    Replayed,
    /// Every target that would replay it was full (it was dropped, or waits briefly for a slot
    /// of a target that has been shedding) or over its rate limit, and no archive kept it: a
    /// copy the targets could not take, which the agent is told of so that it makes fewer.
    Shed,
    /// Anything else: archived, no route, skipped by every target, or not of a kind replayed.
    Kept,
}

/// Why a stream (or, over TLS, a connection's batch) was refused.
#[derive(Debug)]
pub(crate) enum Refused {
    /// It broke the protocol.
    Protocol(String),
    /// It announced or carried more than the protocol allows.
    TooLarge,
    /// Its bytes did not fit in the memory budget.
    OverBudget,
    /// It did not arrive whole in time.
    Timeout(std::time::Duration),
}

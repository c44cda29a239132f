//! Observers: what sees each copy once, when every target of its route has answered, failed or
//! been skipped. A copy replayed to several targets is one [`Exchange`] with one [`Outcome`] per
//! target, so the answers meet here: the response archive is an observer, and so is each compare
//! route's comparison of a candidate's answers with a primary's ([`crate::router::Route`] holds
//! it; it sees its own route's exchanges only).
//!
//! Each answer is also shown to observers as soon as it is read (the archive writes responses
//! then, so nothing waits for the slowest target). The dispatcher makes an exchange only when
//! some observer asks for whole exchanges: without one, a copy costs nothing more here.
//! Per-target metrics stay where each replay ends (see [`crate::replay`]), so the books never
//! wait for the slowest target.

use std::sync::{Arc, Mutex};

use teeway_archive::{Archive, Envelope, ResponseRecord};
use teeway_wire::MirroredRequest;

use crate::metrics::{FailReason, SkipReason};
use crate::replay::Answer;

/// One copy and what each target of its route made of it.
#[derive(Debug)]
pub struct Exchange {
    /// The copy.
    pub record: Arc<MirroredRequest>,
    /// The agent identity it came from.
    #[expect(dead_code, reason = "no observer reports by source yet")]
    pub source: Arc<str>,
    /// The route it took.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "a route's comparison sees its own exchanges only")
    )]
    pub route: String,
    /// Per target, in the route's order.
    pub outcomes: Vec<TargetOutcome>,
}

/// What one target made of a copy.
#[derive(Debug)]
pub struct TargetOutcome {
    /// The target's URL as configured.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "comparisons find their targets by place")
    )]
    pub target: String,
    /// Its answer, failure or skip.
    pub outcome: Outcome,
}

/// How one replay ended.
#[derive(Debug)]
pub enum Outcome {
    /// The target answered (any status); its answer was read to the end.
    Answered(Answer),
    /// The replay failed or was shed.
    Failed(
        #[cfg_attr(
            not(test),
            expect(dead_code, reason = "comparisons count any failure as `failed`")
        )]
        FailReason,
    ),
    /// The copy was not sent to this target.
    Skipped(
        #[cfg_attr(
            not(test),
            expect(dead_code, reason = "comparisons count any skip as `not_replayed`")
        )]
        SkipReason,
    ),
}

/// Sees each target's answer as it comes, and, if it asks, each finished exchange. Called on the
/// task of the replay that ended (for an exchange: the last one; when no target was sent the
/// copy, the dispatcher's): an observer must not block (hand slow work to a queue of its own, as
/// the archive does).
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Whether this observer needs each target's response in its [`Answer`], and if so how many
    /// of its body bytes at most; `None`: it needs none.
    fn response_body_bytes(&self) -> Option<u64>;
    /// Whether it wants whole exchanges ([`Observer::finished`]). An exchange holds every
    /// target's answer until the slowest target ends, so only an observer that compares answers
    /// should ask.
    fn wants_exchanges(&self) -> bool {
        false
    }
    /// An exchange of `record` is under way (called only when it wants exchanges).
    fn started(&self, _record: &MirroredRequest) {}
    /// One target's answer, as soon as it is read.
    fn answered(&self, _record: &MirroredRequest, _target: &str, _answer: &Answer) {}
    /// One exchange, finished.
    fn finished(&self, _exchange: &Exchange) {}
}

/// The observers installed, with what they ask of every copy worked out once.
#[derive(Debug, Clone)]
pub struct Observers {
    list: Arc<[Arc<dyn Observer>]>,
    /// The most response body bytes any observer needs; `None`: no response is kept.
    capture: Option<u64>,
    /// Some observer wants whole exchanges.
    exchanges: bool,
}

impl Observers {
    /// These observers (possibly none).
    pub fn new(list: Vec<Arc<dyn Observer>>) -> Self {
        Self {
            capture: list.iter().filter_map(|o| o.response_body_bytes()).max(),
            exchanges: list.iter().any(|o| o.wants_exchanges()),
            list: list.into(),
        }
    }

    /// How many response body bytes each replay of a route with its own observer `own` keeps.
    pub fn capture_with(&self, own: Option<&Arc<dyn Observer>>) -> Option<u64> {
        match (self.capture, own.and_then(|o| o.response_body_bytes())) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// An exchange for `record` over `targets`, if some observer (or the route's own, `own`)
    /// wants exchanges.
    pub fn exchange(
        &self,
        record: &Arc<MirroredRequest>,
        source: &Arc<str>,
        route: &str,
        own: Option<&Arc<dyn Observer>>,
        targets: impl FnOnce() -> Vec<String>,
    ) -> Option<Arc<Pending>> {
        let own = own.filter(|o| o.wants_exchanges()).cloned();
        if !self.exchanges && own.is_none() {
            return None;
        }
        let observers = match own {
            None => self.list.clone(),
            Some(own) => {
                own.started(record);
                let mut all = self.list.to_vec();
                all.push(own);
                all.into()
            }
        };
        Some(Arc::new(Pending::new(
            record.clone(),
            source.clone(),
            route,
            targets(),
            observers,
        )))
    }

    /// Shows every observer one target's answer.
    pub fn answered(&self, record: &MirroredRequest, target: &str, answer: &Answer) {
        for observer in self.list.iter() {
            observer.answered(record, target, answer);
        }
    }
}

/// Writes every answered replay's response to the archive (`archive.record_responses`).
#[derive(Debug)]
pub struct ArchiveResponses {
    archive: Archive,
}

impl ArchiveResponses {
    /// An observer writing to `archive`, which must be recording responses.
    pub fn new(archive: Archive) -> Self {
        Self { archive }
    }
}

impl Observer for ArchiveResponses {
    fn response_body_bytes(&self) -> Option<u64> {
        Some(self.archive.config().max_response_body)
    }

    fn answered(&self, _record: &MirroredRequest, _target: &str, answer: &Answer) {
        if let Some(response) = &answer.response {
            let mut record = ResponseRecord::clone(response);
            // A compare route keeps more of each body than the archive's limit: cut to it.
            let max =
                usize::try_from(self.archive.config().max_response_body).unwrap_or(usize::MAX);
            if record.body.len() > max {
                record.body.truncate(max);
                record.body_truncated = true;
            }
            self.archive
                .try_submit(Envelope::HttpResponse(record), None);
        }
    }
}

/// An exchange being put together: each target's slot is filled as its replay ends, and the last
/// to fill one hands the whole to the observers.
#[derive(Debug)]
pub struct Pending {
    record: Arc<MirroredRequest>,
    source: Arc<str>,
    route: String,
    targets: Vec<String>,
    slots: Mutex<Slots>,
    observers: Arc<[Arc<dyn Observer>]>,
}

#[derive(Debug)]
struct Slots {
    outcomes: Vec<Option<Outcome>>,
    missing: usize,
}

impl Pending {
    /// An exchange of `record` over `targets` (their URLs, in the route's order).
    pub fn new(
        record: Arc<MirroredRequest>,
        source: Arc<str>,
        route: &str,
        targets: Vec<String>,
        observers: Arc<[Arc<dyn Observer>]>,
    ) -> Self {
        let slots = Slots {
            outcomes: targets.iter().map(|_| None).collect(),
            missing: targets.len(),
        };
        Self {
            record,
            source,
            route: route.to_owned(),
            targets,
            slots: Mutex::new(slots),
            observers,
        }
    }

    /// Target `index`'s outcome; the last one hands the exchange to the observers. A second
    /// report for the same target is ignored.
    pub fn report(&self, index: usize, outcome: Outcome) {
        let outcomes = {
            // Held for a few moves; never across an await or an observer.
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.outcomes.get_mut(index) {
                Some(slot @ None) => *slot = Some(outcome),
                _ => return,
            }
            slots.missing -= 1;
            if slots.missing > 0 {
                return;
            }
            std::mem::take(&mut slots.outcomes)
        };
        let exchange = Exchange {
            record: self.record.clone(),
            source: self.source.clone(),
            route: self.route.clone(),
            outcomes: self
                .targets
                .iter()
                .zip(outcomes.into_iter().flatten())
                .map(|(target, outcome)| TargetOutcome {
                    target: target.clone(),
                    outcome,
                })
                .collect(),
        };
        for observer in self.observers.iter() {
            observer.finished(&exchange);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<(String, Vec<String>)>>);

    impl Observer for Seen {
        fn response_body_bytes(&self) -> Option<u64> {
            None
        }

        fn wants_exchanges(&self) -> bool {
            true
        }

        fn finished(&self, exchange: &Exchange) {
            let outcomes = exchange
                .outcomes
                .iter()
                .map(|o| {
                    let what = match &o.outcome {
                        Outcome::Answered(a) => a.status.as_str().to_owned(),
                        Outcome::Failed(f) => f.as_str().to_owned(),
                        Outcome::Skipped(s) => s.as_str().to_owned(),
                    };
                    format!("{} {what}", o.target)
                })
                .collect();
            self.0
                .lock()
                .expect("lock")
                .push((exchange.route.clone(), outcomes));
        }
    }

    fn record() -> Arc<MirroredRequest> {
        Arc::new(MirroredRequest {
            meta: teeway_wire::Meta::basic(7, UNIX_EPOCH, "c".into()),
            method: http::Method::GET,
            uri: http::Uri::from_static("/"),
            version: http::Version::HTTP_11,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
            trailers: None,
            body_truncated: false,
            production: None,
        })
    }

    #[test]
    fn every_target_reported_in_any_order_makes_one_exchange_in_route_order() {
        let seen = Arc::new(Seen::default());
        let observers: Arc<[Arc<dyn Observer>]> = Arc::new([seen.clone() as Arc<dyn Observer>]);
        let pending = Pending::new(
            record(),
            "agent-a".into(),
            "api",
            vec!["http://v1".into(), "http://v2".into(), "http://v3".into()],
            observers,
        );
        let answer = |status: u16| Answer {
            status: http::StatusCode::from_u16(status).expect("status"),
            elapsed: Duration::from_millis(3),
            response: None,
            grpc_status: None,
        };
        pending.report(2, Outcome::Failed(FailReason::Timeout));
        pending.report(0, Outcome::Answered(answer(200)));
        pending.report(2, Outcome::Answered(answer(500)));
        assert!(
            seen.0.lock().expect("lock").is_empty(),
            "a target is missing"
        );
        pending.report(1, Outcome::Skipped(SkipReason::NotSampled));
        pending.report(1, Outcome::Answered(answer(204)));
        let seen = seen.0.lock().expect("lock");
        assert_eq!(
            *seen,
            vec![(
                "api".to_owned(),
                vec![
                    "http://v1 200".to_owned(),
                    "http://v2 not_sampled".to_owned(),
                    "http://v3 timeout".to_owned(),
                ]
            )],
            "once, with every outcome, the first report per target kept"
        );
    }
}

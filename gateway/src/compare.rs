//! Comparing versions (`routes[].compare`): each copy on such a route is replayed to a
//! *candidate* (the new version), a *primary* (the last known-good one) and optionally a
//! *secondary* (a second instance of the known-good one); once all have answered, the
//! candidate's answer is compared with the primary's, and the secondary's with the primary's to
//! learn what is noise ([`teeway_compare`]).
//!
//! ```text
//! exchange finished ─▶ RouteCompare::finished ─▶ bounded queue ─▶ worker thread: compare,
//!   (every target                                 (records and     count per endpoint and key,
//!    answered)                                     bytes)           keep samples
//! ```
//!
//! Comparing is CPU work on bodies of up to `max_body`: it runs on a thread of its own per
//! route, fed by a queue bounded in copies and bytes, so replays never wait for it. A copy the
//! queue has no room for is skipped and counted (`busy`).
//!
//! Every copy on a compare route ends in exactly one of:
//!
//! ```text
//! exchanges = sum(teeway_gateway_compare_copies_total{result})   (identical, noise_only,
//!           + teeway_gateway_compare_in_flight                    differing, skipped)
//! ```
//!
//! with `teeway_gateway_compare_skipped_total{reason}` saying why copies were skipped:
//! `not_replayed` (a compared target did not get it: its `percentage`, a truncated body),
//! `failed` (the primary did not answer), `busy`, and, from the bodies, `truncated` (cut at
//! `max_body` while read), `encoding`, `too_large` (decoded past `max_body`), `corrupt`. A
//! candidate that did not answer while the primary did is no skip: it is a difference, counted
//! under `(no answer)`.
//!
//! What the comparisons found is kept per endpoint (at most `max_endpoints`, the rest together)
//! and key (a field, with the kind of change for missing, extra and type changes; at most
//! `max_fields` each), with up to `samples` examples per key, all of them within
//! [`SAMPLE_BYTES`] per route, the oldest let go first. A reload keeps the findings while the
//! route keeps its name, its roles' targets and what it compares; only the noise thresholds and
//! the samples kept may change without starting afresh.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use metrics::{Counter, Gauge};
use serde_json::{json, Value};

use teeway_compare::json::{Change, Differences, FieldDiff, JsonOptions};
use teeway_compare::noise::{EndpointStats, Verdict};
use teeway_compare::response::{compare_read, read, Response, Rules, Skip};
use teeway_wire::{MirroredRequest, ResponseRecord};

use crate::config::{Baseline, CompareConfig};
use crate::metrics::GatewayMetrics;
use crate::observe::{Exchange, Observer, Outcome, TargetOutcome};
use crate::replay::Answer;

/// Copies compared, by route and result.
pub const COMPARE_COPIES_TOTAL: &str = "teeway_gateway_compare_copies_total";
/// Copies not compared, by route and reason.
pub const COMPARE_SKIPPED_TOTAL: &str = "teeway_gateway_compare_skipped_total";
/// Copies of compare routes being replayed or compared.
pub const COMPARE_IN_FLIGHT: &str = "teeway_gateway_compare_in_flight";
/// Copies compared, by route, endpoint and result.
pub const COMPARE_ENDPOINT_TOTAL: &str = "teeway_gateway_compare_endpoint_copies_total";

/// The findings as a web page (`/compare/ui` on the admin port): reads `/compare` and
/// `/compare/samples`, shows every text as text.
pub const PAGE: &str = include_str!("compare.html");

/// The findings page as a static report: `PAGE` with `findings` (as `/compare` answers) and
/// every sample (route, then endpoint, then key, as [`RouteCompare::all_samples`] gives them)
/// in it, so that it shows them with no server (`teeway diff --report`).
pub fn static_report(findings: &Value, samples: &Value) -> String {
    let data = json!({ "summary": findings, "samples": samples }).to_string();
    // Inside a script element, `<` could end it (`</script>`): written as an escape, which
    // JSON and JavaScript read the same.
    let data = data.replace('<', "\\u003c");
    PAGE.replacen(
        "<!--report-->",
        &format!("<script>window.TEEWAY_REPORT = {data};</script>"),
        1,
    )
}

/// Bytes of samples kept per route.
pub const SAMPLE_BYTES: u64 = 32 * 1024 * 1024;
/// Body bytes a sample keeps of each message (decoded).
const SAMPLE_BODY: usize = 16 * 1024;
/// Differences listed per comparison.
const DIFFERENCES: usize = 256;
/// Copies waiting for a route's comparing thread.
const QUEUE: usize = 1024;
/// … and their bytes.
const QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// The endpoint that endpoints past `max_endpoints` are counted under.
pub const OTHER_ENDPOINTS: &str = "(other endpoints)";
/// How the findings name production as the primary (`primary: production`).
pub const PRODUCTION: &str = "production";
/// `grpc-status`, where gRPC says how a call ended.
const GRPC_STATUS: &str = "grpc-status";
/// The key a candidate that did not answer is counted under.
pub const NO_ANSWER: &str = "(no answer)";
/// Why copies are skipped, in label order.
const SKIP_REASONS: [&str; 8] = [
    "not_replayed",
    "failed",
    "no_production",
    "busy",
    "truncated",
    "encoding",
    "too_large",
    "corrupt",
];

/// What a compared copy showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyResult {
    /// The candidate answered as the primary did.
    Identical,
    /// It differed only in keys that were noise by then.
    NoiseOnly,
    /// It differed in a key that was not noise by then.
    Differing,
}

impl CopyResult {
    const ALL: [CopyResult; 3] = [
        CopyResult::Identical,
        CopyResult::NoiseOnly,
        CopyResult::Differing,
    ];

    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyResult::Identical => "identical",
            CopyResult::NoiseOnly => "noise_only",
            CopyResult::Differing => "differing",
        }
    }
}

/// A compare route's comparison: its settings, queue and thread, and its findings (which a
/// reload may hand on to the next one).
#[derive(Debug)]
pub struct RouteCompare {
    inner: Arc<Inner>,
    queue: SyncSender<Work>,
}

/// What the comparing thread is given.
enum Work {
    Compare(Box<Job>),
    /// Answered once everything queued before it is done.
    #[cfg(test)]
    Barrier(mpsc::Sender<()>),
}

#[derive(Debug)]
struct Inner {
    route: String,
    config: CompareConfig,
    /// The roles' target URLs: candidate, primary, secondary.
    roles: Vec<String>,
    /// What findings depend on: findings made under another are not handed on.
    fingerprint: String,
    rules: Rules,
    store: Arc<Mutex<Store>>,
    queued_bytes: AtomicU64,
    handles: Handles,
}

#[derive(Debug)]
struct Handles {
    copies: [Counter; 3],
    skipped: Counter,
    reasons: [Counter; SKIP_REASONS.len()],
    in_flight: Gauge,
    metrics: Arc<GatewayMetrics>,
}

/// One role's answer: the response, and its `grpc-status` (trailers).
struct Answered {
    response: Box<ResponseRecord>,
    grpc_status: Option<HeaderValue>,
}

/// One copy to compare.
struct Job {
    record: Arc<MirroredRequest>,
    /// `None`: the candidate did not answer.
    candidate: Option<Answered>,
    primary: Answered,
    secondary: Option<Answered>,
    bytes: u64,
}

impl RouteCompare {
    /// The comparison of route `route` (whose targets' URLs are `targets`), going on with
    /// `old`'s findings when it compares the same targets the same way.
    pub fn build(
        route: &str,
        config: &CompareConfig,
        targets: &[String],
        old: Option<&Arc<RouteCompare>>,
        metrics: &Arc<GatewayMetrics>,
    ) -> Arc<RouteCompare> {
        let url = |i: usize| targets.get(i).cloned().unwrap_or_default();
        let mut roles = vec![
            url(config.candidate),
            match config.primary {
                Baseline::Target(i) => url(i),
                Baseline::Production => PRODUCTION.to_owned(),
            },
        ];
        roles.extend(config.secondary.map(url));
        let fingerprint = format!(
            "{roles:?} {:?} {:?} {:?} {:?} {:?} {} {} {}",
            config.headers,
            config.ignore_fields,
            config
                .ignore_values
                .iter()
                .map(regex::Regex::as_str)
                .collect::<Vec<_>>(),
            config.unordered,
            config.endpoints,
            config.max_body,
            config.max_endpoints,
            config.max_fields,
        );
        let store = match old {
            Some(old) if old.inner.route == route && old.inner.fingerprint == fingerprint => {
                old.inner.store.clone()
            }
            _ => Arc::new(Mutex::new(Store::default())),
        };
        let labels = |more: Vec<(&'static str, String)>| {
            let mut l = vec![("route", route.to_owned())];
            l.extend(more);
            l
        };
        let r = metrics.registry();
        let copies = |result: &str| {
            r.counter_labels(
                COMPARE_COPIES_TOTAL,
                "Copies of compare routes, by result (skipped: see teeway_gateway_compare_skipped_total)",
                &labels(vec![("result", result.to_owned())]),
            )
        };
        let handles = Handles {
            copies: CopyResult::ALL.map(|c| copies(c.as_str())),
            skipped: copies("skipped"),
            reasons: SKIP_REASONS.map(|reason| {
                r.counter_labels(
                    COMPARE_SKIPPED_TOTAL,
                    "Copies of compare routes not compared, by reason",
                    &labels(vec![("reason", reason.to_owned())]),
                )
            }),
            in_flight: r.gauge_owned(
                COMPARE_IN_FLIGHT,
                "Copies of compare routes being replayed or compared",
                &labels(vec![]),
            ),
            metrics: metrics.clone(),
        };
        let rules = Rules {
            headers: config.headers.clone(),
            ignore_values: config.ignore_values.clone(),
            json: JsonOptions {
                unordered: config.unordered.clone(),
                ignore: config.ignore_fields.clone(),
                limit: DIFFERENCES,
            },
            max_body: usize::try_from(config.max_body).unwrap_or(usize::MAX),
        };
        let inner = Arc::new(Inner {
            route: route.to_owned(),
            config: config.clone(),
            roles,
            fingerprint,
            rules,
            store,
            queued_bytes: AtomicU64::new(0),
            handles,
        });
        let (queue, jobs) = mpsc::sync_channel(QUEUE);
        let worker = inner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("compare-{route}"))
            .spawn(move || worker.run(jobs));
        if let Err(e) = spawned {
            // Without its thread every copy is skipped as `busy` (the queue fills), counted.
            tracing::error!(route, error = %e, "cannot start the comparing thread");
        }
        Arc::new(RouteCompare { inner, queue })
    }

    /// Waits (at most `limit`) until every copy queued so far is compared; `false` if it was
    /// not in time.
    #[cfg(test)]
    pub fn settle(&self, limit: std::time::Duration) -> bool {
        let (done, wait) = mpsc::channel();
        self.queue.send(Work::Barrier(done)).is_ok() && wait.recv_timeout(limit).is_ok()
    }

    /// What was found, for the admin API: endpoints most likely regressed first (by the
    /// largest share of copies in which a key that is not noise differs).
    pub fn summary(&self) -> Value {
        let store = self.inner.lock_store();
        let thresholds = self.inner.config.noise;
        let mut endpoints: Vec<Value> = store
            .endpoints
            .iter()
            .map(|(name, e)| e.summary(name, thresholds))
            .collect();
        if store.other.stats.compared > 0 {
            endpoints.push(store.other.summary(OTHER_ENDPOINTS, thresholds));
        }
        let by = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        endpoints.sort_by(|a, b| {
            by(b, "score")
                .total_cmp(&by(a, "score"))
                .then(by(b, "differing_rate").total_cmp(&by(a, "differing_rate")))
        });
        json!({
            "route": self.inner.route,
            "candidate": self.inner.roles.first(),
            "primary": self.inner.roles.get(1),
            "secondary": self.inner.config.secondary.and_then(|_| self.inner.roles.get(2)),
            "endpoints": endpoints,
            "sample_bytes": store.sample_bytes,
        })
    }

    /// The samples kept for `key` at `endpoint`, newest first.
    pub fn samples(&self, endpoint: &str, key: &str) -> Vec<Value> {
        let store = self.inner.lock_store();
        let entry = match store.endpoints.get(endpoint) {
            Some(e) => e,
            None if endpoint == OTHER_ENDPOINTS => &store.other,
            None => return Vec::new(),
        };
        entry
            .samples
            .get(key)
            .map(|s| s.iter().rev().map(|s| s.to_json()).collect())
            .unwrap_or_default()
    }
}

impl Observer for RouteCompare {
    fn response_body_bytes(&self) -> Option<u64> {
        Some(self.inner.config.max_body)
    }

    fn wants_exchanges(&self) -> bool {
        true
    }

    fn started(&self, _record: &MirroredRequest) {
        self.inner.handles.in_flight.increment(1.0);
    }

    fn finished(&self, exchange: &Exchange) {
        let Some(job) = self.job(exchange) else {
            return;
        };
        let bytes = job.bytes;
        let inner = &self.inner;
        if inner.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > QUEUE_BYTES {
            inner.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return inner.skip("busy");
        }
        if self.queue.try_send(Work::Compare(Box::new(job))).is_err() {
            // Full, or its thread is gone: the copy is let go, counted.
            inner.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            inner.skip("busy");
        }
    }
}

impl RouteCompare {
    /// Compares one copy now, on the caller's thread (offline, `teeway diff`, where nothing
    /// waits on the comparison but the next copy): `answers` are the route's targets' answers
    /// in order, `None` for one that failed. Counted like a replayed copy.
    pub fn compare_now(&self, record: Arc<MirroredRequest>, answers: Vec<Option<Answer>>) {
        self.started(&record);
        let exchange = Exchange {
            source: record.meta.source_identity.clone(),
            record,
            route: self.inner.route.clone(),
            outcomes: answers
                .into_iter()
                .map(|answer| TargetOutcome {
                    target: String::new(),
                    outcome: match answer {
                        Some(a) => Outcome::Answered(a),
                        None => Outcome::Failed(crate::metrics::FailReason::Error),
                    },
                })
                .collect(),
        };
        if let Some(job) = self.job(&exchange) {
            self.inner.compare(&job);
        }
    }

    /// Every sample kept, by endpoint and key, for a report that holds them all.
    pub fn all_samples(&self) -> Value {
        let store = self.inner.lock_store();
        let mut out = serde_json::Map::new();
        let endpoints = store
            .endpoints
            .iter()
            .map(|(name, e)| (name.as_str(), e))
            .chain(std::iter::once((OTHER_ENDPOINTS, &store.other)));
        for (name, entry) in endpoints {
            let keys: serde_json::Map<String, Value> = entry
                .samples
                .iter()
                .map(|(key, s)| {
                    (
                        key.clone(),
                        Value::from(s.iter().rev().map(|s| s.to_json()).collect::<Vec<_>>()),
                    )
                })
                .collect();
            if !keys.is_empty() {
                out.insert(name.to_owned(), Value::Object(keys));
            }
        }
        Value::Object(out)
    }

    /// The copy's comparison job; `None` when it is skipped (counted).
    fn job(&self, exchange: &Exchange) -> Option<Job> {
        let inner = &self.inner;
        let answer = |i: usize| match exchange.outcomes.get(i).map(|o| &o.outcome) {
            Some(Outcome::Answered(a)) => match &a.response {
                Some(r) => Ok(Answered {
                    response: r.clone(),
                    grpc_status: a.grpc_status.clone(),
                }),
                // Kept by every replay of a compare route: not seen unless a target was
                // reconfigured while the copy was replayed.
                None => Err("not_replayed"),
            },
            Some(Outcome::Failed(_)) => Err("failed"),
            Some(Outcome::Skipped(_)) | None => Err("not_replayed"),
        };
        let primary = match inner.config.primary {
            Baseline::Target(i) => answer(i),
            Baseline::Production => production(&exchange.record),
        };
        let primary = match primary {
            Ok(a) => a,
            Err(reason) => {
                inner.skip(reason);
                return None;
            }
        };
        let candidate = match answer(inner.config.candidate) {
            Ok(a) => Some(a),
            // The primary answered and the candidate did not: a difference, not a skip.
            Err("failed") => None,
            Err(reason) => {
                inner.skip(reason);
                return None;
            }
        };
        // A secondary that did not answer only means no noise is learned from this copy.
        let secondary = inner.config.secondary.and_then(|i| answer(i).ok());
        let bytes = [candidate.as_ref(), Some(&primary), secondary.as_ref()]
            .into_iter()
            .flatten()
            .map(|a| a.response.body.len() as u64)
            .sum();
        Some(Job {
            record: exchange.record.clone(),
            candidate,
            primary,
            secondary,
            bytes,
        })
    }
}

/// Production's answer to the copy, carried with it (`primary: production`); `no_production`
/// when the agent sent none.
fn production(record: &MirroredRequest) -> Result<Answered, &'static str> {
    let production = record.production.as_deref().ok_or("no_production")?;
    let grpc_status = production
        .trailers
        .as_ref()
        .and_then(|t| t.get(GRPC_STATUS))
        // A trailers-only answer carries it in its head.
        .or_else(|| production.headers.get(GRPC_STATUS))
        .cloned();
    Ok(Answered {
        response: Box::new(production.to_record(record)),
        grpc_status,
    })
}

impl Inner {
    fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a copy not compared, for `reason` (one of [`SKIP_REASONS`]).
    fn skip(&self, reason: &str) {
        let h = &self.handles;
        if let Some(i) = SKIP_REASONS.iter().position(|r| *r == reason) {
            h.reasons[i].increment(1);
        }
        h.skipped.increment(1);
        h.in_flight.decrement(1.0);
    }

    /// The comparing thread: until the route's last handle goes.
    fn run(self: Arc<Self>, jobs: Receiver<Work>) {
        for work in jobs {
            match work {
                Work::Compare(job) => {
                    self.queued_bytes.fetch_sub(job.bytes, Ordering::AcqRel);
                    self.compare(&job);
                }
                #[cfg(test)]
                Work::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn compare(&self, job: &Job) {
        let trailers = |a: &Answered| {
            a.grpc_status.as_ref().map(|status| {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", status.clone());
                t
            })
        };
        fn view<'a>(a: &'a Answered, t: Option<&'a HeaderMap>) -> Response<'a> {
            Response {
                status: a.response.status.as_u16(),
                headers: &a.response.headers,
                trailers: t,
                body: &a.response.body,
                truncated: a.response.body_truncated,
            }
        }
        let rules = &self.rules;
        // The primary's body is read once, for the candidate and the secondary both.
        let primary_trailers = trailers(&job.primary);
        let primary = view(&job.primary, primary_trailers.as_ref());
        let primary_body = read(&primary, rules);
        let compared = |other: &Answered| {
            let t = trailers(other);
            let other = view(other, t.as_ref());
            let base = primary_body.as_ref().map_err(Clone::clone)?;
            let body = read(&other, rules)?;
            Ok::<_, Skip>(compare_read(&primary, base, &other, &body, rules))
        };
        let raw = match &job.candidate {
            Some(candidate) => match compared(candidate) {
                Ok(d) => d,
                Err(skip) => return self.skip(skip.reason()),
            },
            None => {
                let mut d = Differences::default();
                d.push(
                    FieldDiff {
                        field: NO_ANSWER.to_owned(),
                        at: NO_ANSWER.to_owned(),
                        change: Change::Missing,
                    },
                    DIFFERENCES,
                );
                d
            }
        };
        // The secondary's differences from the primary: noise. Unreadable, it teaches nothing.
        let noise = job.secondary.as_ref().and_then(|s| compared(s).ok());
        let endpoint = self
            .config
            .endpoints
            .endpoint(job.record.method.as_str(), job.record.uri.path())
            .to_string();
        // Made before the lock, and only if it can be kept at all.
        let sample = (!raw.is_empty() && self.config.samples > 0)
            .then(|| Sample::new(job, &raw, self.rules.max_body));
        let result = {
            let mut guard = self.lock_store();
            let store = &mut *guard;
            let known = store.endpoints.contains_key(&endpoint);
            let (name, entry) = if known || store.endpoints.len() < self.config.max_endpoints {
                let entry = store.endpoints.entry(endpoint.clone()).or_default();
                (endpoint, entry)
            } else {
                (OTHER_ENDPOINTS.to_owned(), &mut store.other)
            };
            // Counted first: a copy's own differences weigh in its verdict.
            entry
                .stats
                .record(&raw, noise.as_ref(), self.config.max_fields);
            let result = entry.classify(&raw, self.config.noise);
            entry.results[result as usize] += 1;
            // Registered once per endpoint and result, not per copy.
            entry.counters[result as usize]
                .get_or_insert_with(|| {
                    self.handles.metrics.registry().counter_labels(
                        COMPARE_ENDPOINT_TOTAL,
                        "Copies of compare routes compared, by endpoint and result",
                        &[
                            ("route", self.route.clone()),
                            ("endpoint", name.clone()),
                            ("result", result.as_str().to_owned()),
                        ],
                    )
                })
                .increment(1);
            if let Some(sample) = sample {
                store.place(&name, sample, self.config.samples);
                store.evict(SAMPLE_BYTES);
            }
            result
        };
        let h = &self.handles;
        h.copies[result as usize].increment(1);
        h.in_flight.decrement(1.0);
    }
}

/// What a route's comparisons found.
#[derive(Debug, Default)]
struct Store {
    endpoints: BTreeMap<String, Entry>,
    /// Endpoints past `max_endpoints`, together.
    other: Entry,
    /// Bytes of the samples kept.
    sample_bytes: u64,
    /// Where samples were placed (sample, endpoint, key), oldest first: what is let go first
    /// when the samples are over their bytes. A place a newer sample took since (each key keeps
    /// its newest few) stays here until it comes up, or until those outnumber the places in use
    /// and are swept: it stays within twice them.
    order: VecDeque<(u64, String, String)>,
    /// Places in use: samples kept, once per key each is kept under.
    placed: usize,
    /// The next sample's number.
    next_seq: u64,
}

impl Store {
    /// Keeps `sample` at endpoint `name`, under each of its keys counted by name (at most
    /// `per_field` per key, the oldest let go).
    fn place(&mut self, name: &str, mut sample: Sample, per_field: usize) {
        sample.seq = self.next_seq;
        self.next_seq += 1;
        let seq = sample.seq;
        let entry = match self.endpoints.get_mut(name) {
            Some(e) => e,
            None => &mut self.other,
        };
        let keys = entry.keep(
            Arc::new(sample),
            per_field,
            &mut self.sample_bytes,
            &mut self.placed,
        );
        for key in keys {
            self.order.push_back((seq, name.to_owned(), key));
        }
        if self.order.len() > 2 * self.placed + 64 {
            let (endpoints, other) = (&self.endpoints, &self.other);
            self.order.retain(|(seq, endpoint, key)| {
                endpoints
                    .get(endpoint)
                    .unwrap_or(other)
                    .samples
                    .get(key)
                    .is_some_and(|kept| kept.iter().any(|s| s.seq == *seq))
            });
        }
    }

    /// Lets the oldest samples go until they hold at most `limit` bytes.
    fn evict(&mut self, limit: u64) {
        while self.sample_bytes > limit {
            let Some((seq, endpoint, key)) = self.order.pop_front() else {
                break;
            };
            let entry = match self.endpoints.get_mut(&endpoint) {
                Some(e) => e,
                None => &mut self.other,
            };
            // The oldest place is its key's list's front, unless a newer sample took it.
            let Some(kept) = entry.samples.get_mut(&key) else {
                continue;
            };
            if kept.front().is_some_and(|s| s.seq == seq) {
                if let Some(old) = kept.pop_front() {
                    self.placed -= 1;
                    if Arc::strong_count(&old) == 1 {
                        self.sample_bytes = self.sample_bytes.saturating_sub(old.bytes);
                    }
                }
            }
        }
    }
}

/// One endpoint's findings.
#[derive(Debug, Default)]
struct Entry {
    stats: EndpointStats,
    /// Copies by [`CopyResult`].
    results: [u64; 3],
    /// Per key, the newest samples last.
    samples: BTreeMap<String, VecDeque<Arc<Sample>>>,
    /// `teeway_gateway_compare_endpoint_copies_total` by [`CopyResult`], once registered.
    counters: [Option<Counter>; 3],
}

impl Entry {
    /// What a copy with `raw` differences showed, given what is noise so far.
    fn classify(
        &self,
        raw: &Differences,
        thresholds: teeway_compare::noise::Thresholds,
    ) -> CopyResult {
        if raw.is_empty() {
            return CopyResult::Identical;
        }
        let differing = raw
            .keys
            .iter()
            .any(|k| self.stats.verdict(self.stats.counts_of(k), thresholds) == Verdict::Differing);
        if differing {
            CopyResult::Differing
        } else {
            CopyResult::NoiseOnly
        }
    }

    /// Keeps `sample` under each key it differs in that is counted by name (at most
    /// `per_field` each, the oldest let go), adding its bytes to `bytes` once; returns the keys
    /// it was placed under.
    fn keep(
        &mut self,
        sample: Arc<Sample>,
        per_field: usize,
        bytes: &mut u64,
        placed: &mut usize,
    ) -> Vec<String> {
        let keys: Vec<String> = sample
            .differences
            .iter()
            .map(FieldDiff::key)
            .filter(|k| self.stats.fields.contains_key(k))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if keys.is_empty() || per_field == 0 {
            return Vec::new();
        }
        *bytes += sample.bytes;
        for key in &keys {
            let kept = self.samples.entry(key.clone()).or_default();
            kept.push_back(sample.clone());
            *placed += 1;
            while kept.len() > per_field {
                if let Some(old) = kept.pop_front() {
                    *placed -= 1;
                    // Its bytes go with its last place.
                    if Arc::strong_count(&old) == 1 {
                        *bytes = bytes.saturating_sub(old.bytes);
                    }
                }
            }
        }
        keys
    }

    fn summary(&self, name: &str, thresholds: teeway_compare::noise::Thresholds) -> Value {
        let compared = self.stats.compared;
        let differing = self.results[CopyResult::Differing as usize];
        let rate = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 / of as f64 };
        let fields: Vec<Value> = self
            .stats
            .fields
            .iter()
            .map(|(field, counts)| {
                json!({
                    "field": field,
                    "verdict": self.stats.verdict(*counts, thresholds).as_str(),
                    "raw": counts.raw,
                    "raw_rate": rate(counts.raw, compared),
                    "noise": counts.noise,
                    "noise_rate": rate(counts.noise, self.stats.with_secondary),
                    "samples": self.samples.get(field).map_or(0, VecDeque::len),
                })
            })
            .collect();
        // By the verdicts in force now (a copy's own result was judged when it came).
        let score = self
            .stats
            .differing(thresholds)
            .first()
            .map_or(0.0, |(_, r)| *r);
        json!({
            "endpoint": name,
            "compared": compared,
            "with_secondary": self.stats.with_secondary,
            "identical": self.results[CopyResult::Identical as usize],
            "noise_only": self.results[CopyResult::NoiseOnly as usize],
            "differing": differing,
            "differing_rate": rate(differing, compared),
            "score": score,
            "fields": fields,
            "other_fields": {"raw": self.stats.other.raw, "noise": self.stats.other.noise},
        })
    }
}

/// One compared copy kept as an example: the request, both answers, what differed.
#[derive(Debug)]
struct Sample {
    at: SystemTime,
    method: String,
    uri: String,
    request_headers: Vec<(String, String)>,
    request_body: Bytes,
    candidate: Option<SampleAnswer>,
    primary: SampleAnswer,
    differences: Vec<FieldDiff>,
    /// Its size, as counted against [`SAMPLE_BYTES`].
    bytes: u64,
    /// Its number in the store, in the order samples were kept.
    seq: u64,
}

#[derive(Debug)]
struct SampleAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    truncated: bool,
}

/// Headers as a sample shows them: credential-like values (`Authorization`, `Set-Cookie`,
/// API keys...) masked, as `/config` masks them.
fn shown_headers(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            let value = if teeway_runtime::reload::credential_like(k.as_str()) {
                "(masked)".to_owned()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            (k.as_str().to_owned(), value)
        })
        .collect()
}

impl Sample {
    fn new(job: &Job, raw: &Differences, max_body: usize) -> Self {
        let r = &job.record;
        // Decoded (gzip, br...) when it can be, cut to SAMPLE_BODY; copied, never a slice that
        // would keep the whole body alive.
        let excerpt = |headers: &HeaderMap, body: &Bytes| -> (Bytes, bool) {
            let decoded = teeway_compare::body::decode(headers, body, max_body)
                .map(Bytes::from)
                .unwrap_or_else(|_| body.clone());
            let cut = decoded.len() > SAMPLE_BODY;
            (
                Bytes::copy_from_slice(&decoded[..decoded.len().min(SAMPLE_BODY)]),
                cut,
            )
        };
        let answer = |a: &Answered| {
            let (body, cut) = excerpt(&a.response.headers, &a.response.body);
            SampleAnswer {
                status: a.response.status.as_u16(),
                headers: shown_headers(&a.response.headers),
                body,
                truncated: a.response.body_truncated || cut,
            }
        };
        let (request_body, _) = excerpt(&r.headers, &r.body);
        let mut sample = Sample {
            at: r.meta.received_at,
            method: r.method.to_string(),
            uri: r.uri.to_string(),
            request_headers: shown_headers(&r.headers),
            request_body,
            candidate: job.candidate.as_ref().map(answer),
            primary: answer(&job.primary),
            differences: raw.fields.clone(),
            bytes: 0,
            seq: 0,
        };
        let text = |pairs: &[(String, String)]| {
            pairs
                .iter()
                .map(|(k, v)| k.len() + v.len() + 32)
                .sum::<usize>()
        };
        let answer_bytes = |a: &SampleAnswer| text(&a.headers) + a.body.len();
        sample.bytes = (512
            + sample.uri.len()
            + text(&sample.request_headers)
            + sample.request_body.len()
            + sample.candidate.as_ref().map_or(0, answer_bytes)
            + answer_bytes(&sample.primary)
            + sample
                .differences
                .iter()
                .map(|d| d.field.len() + d.at.len() + 64)
                .sum::<usize>()) as u64;
        sample
    }

    fn to_json(&self) -> Value {
        let answer = |a: &SampleAnswer| {
            json!({
                "status": a.status,
                "headers": a.headers,
                "body": String::from_utf8_lossy(&a.body),
                "truncated": a.truncated,
            })
        };
        json!({
            "at": teeway_wire::record::unix_nanos(self.at),
            "request": {
                "method": self.method,
                "uri": self.uri,
                "headers": self.request_headers,
                "body": String::from_utf8_lossy(&self.request_body),
            },
            "candidate": self.candidate.as_ref().map(answer),
            "primary": answer(&self.primary),
            "differences": self.differences.iter().map(|d| json!({
                "field": d.field, "at": d.at, "change": d.change.as_str(), "key": d.key(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    use http::{HeaderValue, StatusCode};
    use teeway_runtime::metrics::Snapshot;
    use teeway_wire::{Meta, ResponseOrigin};

    use crate::observe::TargetOutcome;
    use crate::replay::Answer as Replied;

    fn config(secondary: bool) -> CompareConfig {
        CompareConfig {
            candidate: 0,
            primary: Baseline::Target(1),
            secondary: secondary.then_some(2),
            headers: vec![http::header::CONTENT_TYPE],
            ignore_fields: vec![],
            ignore_values: vec![],
            unordered: vec![],
            endpoints: teeway_compare::endpoint::Templates::default(),
            noise: teeway_compare::noise::Thresholds::default(),
            max_body: 1 << 20,
            max_endpoints: 2,
            max_fields: 8,
            samples: 2,
        }
    }

    fn request(path: &str) -> Arc<MirroredRequest> {
        Arc::new(MirroredRequest {
            meta: Meta::basic(1, UNIX_EPOCH, "prod".into()),
            method: http::Method::GET,
            uri: path.parse().expect("uri"),
            version: http::Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            trailers: None,
            body_truncated: false,
            production: None,
        })
    }

    fn answered(body: String) -> Outcome {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Outcome::Answered(Replied {
            status: StatusCode::OK,
            elapsed: Duration::from_millis(1),
            response: Some(response(headers, body.into_bytes())),
            grpc_status: None,
        })
    }

    /// A shadow's 200 answer with `headers` and `body`.
    fn response(headers: HeaderMap, body: Vec<u8>) -> Box<ResponseRecord> {
        Box::new(ResponseRecord {
            meta: Meta::basic(1, UNIX_EPOCH, "prod".into()),
            origin: ResponseOrigin::Replayed,
            target: String::new(),
            latency: Duration::from_millis(1),
            status: StatusCode::OK,
            version: http::Version::HTTP_11,
            headers,
            body: Bytes::from(body),
            body_truncated: false,
        })
    }

    fn exchange(path: &str, outcomes: Vec<Outcome>) -> Exchange {
        Exchange {
            record: request(path),
            source: "prod".into(),
            route: "api".into(),
            outcomes: outcomes
                .into_iter()
                .map(|outcome| TargetOutcome {
                    target: String::new(),
                    outcome,
                })
                .collect(),
        }
    }

    #[test]
    fn production_as_the_primary_is_the_answer_the_copy_carries() {
        let metrics = Arc::new(GatewayMetrics::new());
        let urls = ["http://v2", "http://v1"].map(String::from);
        let mut config = config(true);
        config.primary = Baseline::Production;
        config.secondary = Some(1);
        let compare = RouteCompare::build("api", &config, &urls, None, &metrics);
        let with_production = |path: &str, body: &str| {
            let mut record = (*request(path)).clone();
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            record.production = Some(Box::new(teeway_wire::Production {
                latency: Duration::from_millis(2),
                status: StatusCode::OK,
                version: http::Version::HTTP_11,
                headers,
                body: Bytes::from(body.to_owned()),
                trailers: None,
                body_truncated: false,
            }));
            Arc::new(record)
        };
        for (i, (candidate, secondary)) in [
            // The candidate prices wrong; the test cluster's v1 differs from production only
            // in its id: noise.
            (r#"{"id": 9, "price": 11}"#, r#"{"id": 8, "price": 10}"#),
            (r#"{"id": 7, "price": 11}"#, r#"{"id": 6, "price": 10}"#),
        ]
        .into_iter()
        .enumerate()
        {
            let record = with_production("/users/1", &format!(r#"{{"id": {i}, "price": 10}}"#));
            compare.started(&record);
            let mut exchange = exchange(
                "/users/1",
                vec![answered(candidate.into()), answered(secondary.into())],
            );
            exchange.record = record;
            compare.finished(&exchange);
        }
        // A copy the agent sent without production's answer.
        compare.started(&request("/users/1"));
        compare.finished(&exchange(
            "/users/1",
            vec![answered("{}".into()), answered("{}".into())],
        ));
        assert!(compare.settle(Duration::from_secs(10)));

        let s = Snapshot::parse(&metrics.registry().render());
        assert_eq!(
            s.sum_where(COMPARE_COPIES_TOTAL, &[("result", "differing")]),
            2.0
        );
        assert_eq!(
            s.sum_where(COMPARE_SKIPPED_TOTAL, &[("reason", "no_production")]),
            1.0
        );
        assert_eq!(s.sum(COMPARE_IN_FLIGHT), 0.0);
        let summary = compare.summary();
        assert_eq!(summary["primary"], PRODUCTION);
        assert_eq!(summary["secondary"], "http://v1");
        let fields = summary["endpoints"][0]["fields"]
            .as_array()
            .expect("fields");
        let verdict = |name: &str| {
            fields
                .iter()
                .find(|f| f["field"] == name)
                .map(|f| f["verdict"].clone())
        };
        assert_eq!(verdict("/price"), Some(Value::from("differing")));
        assert_eq!(verdict("/id"), Some(Value::from("noise")));
        let samples = compare.samples("GET /users/{id}", "/price");
        assert_eq!(samples[0]["primary"]["body"], r#"{"id": 1, "price": 10}"#);
    }

    #[test]
    fn regressions_are_told_from_noise_and_every_copy_is_counted_once() {
        let metrics = Arc::new(GatewayMetrics::new());
        let urls = ["http://v2", "http://v1", "http://v1b"].map(String::from);
        let compare = RouteCompare::build("api", &config(true), &urls, None, &metrics);
        for i in 0..40 {
            // Every answer has a random id; v2 prices /users/{id} wrong, and /health is the same.
            let v1 = |id: u32| format!(r#"{{"id": {id}, "price": 10, "name": "a"}}"#);
            let v2 = |id: u32| format!(r#"{{"id": {id}, "price": 11, "name": "a"}}"#);
            for path in [format!("/users/{i}"), "/health".to_owned()] {
                compare.started(&request(&path));
                let candidate = if path == "/health" {
                    v1(i * 7)
                } else {
                    v2(i * 7)
                };
                compare.finished(&exchange(
                    &path,
                    vec![
                        answered(candidate),
                        answered(v1(i * 3)),
                        answered(v1(i * 5)),
                    ],
                ));
            }
        }
        // A copy the candidate failed, one over the endpoint bound, one without a secondary.
        compare.started(&request("/users/1"));
        compare.finished(&exchange(
            "/users/1",
            vec![
                Outcome::Failed(crate::metrics::FailReason::Timeout),
                answered("{}".into()),
                answered("{}".into()),
            ],
        ));
        compare.started(&request("/orders"));
        compare.finished(&exchange(
            "/orders",
            vec![
                answered("{}".into()),
                answered("{}".into()),
                Outcome::Failed(crate::metrics::FailReason::Timeout),
            ],
        ));
        assert!(compare.settle(Duration::from_secs(10)));

        let s = Snapshot::parse(&metrics.registry().render());
        let copies = |result: &str| s.sum_where(COMPARE_COPIES_TOTAL, &[("result", result)]);
        assert_eq!(s.sum(COMPARE_IN_FLIGHT), 0.0);
        assert_eq!(
            copies("skipped"),
            0.0,
            "a candidate that failed is a difference"
        );
        assert_eq!(
            s.sum_where(COMPARE_SKIPPED_TOTAL, &[("reason", "failed")]),
            0.0
        );
        assert_eq!(
            copies("identical") + copies("noise_only") + copies("differing") + copies("skipped"),
            82.0,
            "every copy in exactly one result"
        );
        assert_eq!(
            copies("differing"),
            41.0,
            "every /users/{{id}} copy, and the one the candidate did not answer"
        );

        let summary = compare.summary();
        let endpoints = summary["endpoints"].as_array().expect("endpoints");
        assert_eq!(
            endpoints[0]["endpoint"], "GET /users/{id}",
            "most differing first: {summary}"
        );
        let field = |e: &Value, name: &str| {
            e["fields"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["field"] == name).cloned())
                .unwrap_or(Value::Null)
        };
        assert_eq!(field(&endpoints[0], "/price")["verdict"], "differing");
        assert_eq!(field(&endpoints[0], "/id")["verdict"], "noise");
        let health = endpoints
            .iter()
            .find(|e| e["endpoint"] == "GET /health")
            .expect("health");
        assert_eq!(health["differing"], 0, "only noise: {health}");
        assert_eq!(
            health["noise_only"].as_u64().unwrap_or(0) + health["identical"].as_u64().unwrap_or(0),
            40
        );
        assert!(
            endpoints.iter().any(|e| e["endpoint"] == OTHER_ENDPOINTS),
            "GET /orders past max_endpoints: {summary}"
        );
        let samples = compare.samples("GET /users/{id}", "/price");
        assert_eq!(samples.len(), 2, "samples per field");
        assert_eq!(samples[0]["request"]["uri"], "/users/39", "newest first");
        assert_eq!(samples[0]["differences"][0]["at"], "/id");

        // A reload that keeps the route's roles and rules goes on with what it found, under
        // its new settings (here: no samples); other roles or rules start afresh.
        let mut fewer = config(true);
        fewer.samples = 0;
        fewer.noise.relative = 1.0;
        let again = RouteCompare::build("api", &fewer, &urls, Some(&compare), &metrics);
        assert_eq!(again.summary()["endpoints"], compare.summary()["endpoints"]);
        let reordered = ["http://v1b", "http://v2", "http://v1"].map(String::from);
        let moved = CompareConfig {
            candidate: 1,
            primary: Baseline::Target(2),
            secondary: Some(0),
            ..config(true)
        };
        let same_roles = RouteCompare::build("api", &moved, &reordered, Some(&compare), &metrics);
        assert_eq!(
            same_roles.summary()["endpoints"],
            compare.summary()["endpoints"],
            "the targets moved in the list, the roles did not"
        );
        let other = RouteCompare::build("api", &config(false), &urls, Some(&compare), &metrics);
        assert_eq!(
            other.summary()["endpoints"],
            serde_json::json!([]),
            "no secondary now"
        );
        let mut ignoring = config(true);
        ignoring.ignore_fields =
            vec![teeway_compare::path::Pattern::parse("/id").expect("pattern")];
        let ignoring = RouteCompare::build("api", &ignoring, &urls, Some(&compare), &metrics);
        assert_eq!(
            ignoring.summary()["endpoints"],
            serde_json::json!([]),
            "other rules"
        );
        // The new one compares under its own settings and places: the candidate is now second.
        let before = again.summary()["endpoints"][0]["compared"]
            .as_u64()
            .unwrap_or(0);
        same_roles.started(&request("/users/7"));
        same_roles.finished(&exchange(
            "/users/7",
            vec![
                answered(r#"{"id": 1, "price": 10, "name": "a"}"#.into()),
                answered(r#"{"id": 2, "price": 11, "name": "a"}"#.into()),
                answered(r#"{"id": 3, "price": 10, "name": "a"}"#.into()),
            ],
        ));
        assert!(same_roles.settle(Duration::from_secs(10)));
        let users = same_roles.summary()["endpoints"][0].clone();
        assert_eq!(users["compared"].as_u64(), Some(before + 1));
        assert_eq!(users["endpoint"], "GET /users/{id}");
    }

    fn sample(keys: &[&str], bytes: u64) -> Sample {
        Sample {
            at: UNIX_EPOCH,
            method: "GET".into(),
            uri: "/".into(),
            request_headers: vec![],
            request_body: Bytes::new(),
            candidate: None,
            primary: SampleAnswer {
                status: 200,
                headers: vec![],
                body: Bytes::new(),
                truncated: false,
            },
            differences: keys
                .iter()
                .map(|k| FieldDiff {
                    field: (*k).to_owned(),
                    at: (*k).to_owned(),
                    change: Change::Value,
                })
                .collect(),
            bytes,
            seq: 0,
        }
    }

    #[test]
    fn samples_past_their_bytes_go_oldest_first_and_shared_ones_once() {
        let mut store = Store::default();
        let entry = store.endpoints.entry("E".into()).or_default();
        let mut keys = Differences::default();
        for k in ["/a", "/b"] {
            keys.push(
                FieldDiff {
                    field: k.into(),
                    at: k.into(),
                    change: Change::Value,
                },
                10,
            );
        }
        entry.stats.record(&keys, None, 8);
        for s in [
            sample(&["/a"], 100),
            sample(&["/a", "/b"], 100),
            sample(&["/b"], 100),
        ] {
            store.place("E", s, 5);
        }
        assert_eq!(store.sample_bytes, 300, "the shared sample counted once");
        store.evict(150);
        assert_eq!(store.sample_bytes, 100);
        let e = &store.endpoints["E"];
        assert!(e.samples["/a"].is_empty());
        assert_eq!(e.samples["/b"].len(), 1);
        assert_eq!(
            e.samples["/b"][0].differences[0].field, "/b",
            "the newest kept"
        );
    }

    #[test]
    fn places_newer_samples_took_are_swept_so_memory_stays_bounded() {
        let mut store = Store::default();
        let mut keys = Differences::default();
        for k in ["/a", "/b"] {
            keys.push(
                FieldDiff {
                    field: k.into(),
                    at: k.into(),
                    change: Change::Value,
                },
                10,
            );
        }
        store.other.stats.record(&keys, None, 8);
        // Copies of endpoints past the bound, every one kept: each key keeps its newest 3.
        for _ in 0..100_000 {
            store.place("elsewhere", sample(&["/a", "/b"], 100), 3);
            store.evict(SAMPLE_BYTES);
        }
        assert_eq!(store.placed, 6);
        assert!(
            store.order.len() <= 2 * store.placed + 64,
            "{} places remembered for {} in use",
            store.order.len(),
            store.placed
        );
        assert_eq!(
            store.sample_bytes, 300,
            "three samples, each under both keys"
        );
        // What is remembered still goes oldest first.
        store.evict(100);
        assert_eq!(store.sample_bytes, 100);
        let kept = &store.other.samples["/a"];
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].seq, 99_999, "the newest kept");
    }

    #[test]
    fn samples_show_bodies_decoded_and_credentials_masked() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(br#"{"price": 12}"#).expect("gzip");
        let body = gz.finish().expect("gzip");
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
        headers.insert(
            http::header::SET_COOKIE,
            HeaderValue::from_static("session=s3cret"),
        );
        let answered = |body: Vec<u8>| Answered {
            response: response(headers.clone(), body),
            grpc_status: None,
        };
        let job = Job {
            record: request("/x"),
            candidate: Some(answered(body.clone())),
            primary: answered(body),
            secondary: None,
            bytes: 0,
        };
        let shown = Sample::new(&job, &Differences::default(), 1 << 20).to_json();
        assert_eq!(shown["candidate"]["body"], r#"{"price": 12}"#);
        let cookie = shown["primary"]["headers"]
            .as_array()
            .and_then(|h| h.iter().find(|p| p[0] == "set-cookie").cloned())
            .expect("set-cookie shown");
        assert_eq!(cookie[1], "(masked)");
    }
}

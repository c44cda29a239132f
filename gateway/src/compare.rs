//! Comparing versions (`routes[].compare`): each copy on such a route is replayed to a
//! *candidate* (the new version), a *primary* (the last known-good one) and optionally a
//! *secondary* (a second instance of the known-good one); once all have answered, the
//! candidate's answer is compared with the primary's, and the secondary's with the primary's to
//! learn what is noise ([`teeway_compare`]).
//!
//! ```text
//! exchange finished ─▶ RouteCompare::finished ─▶ bounded queue ─▶ worker thread: compare,
//!   (every target                                 (records and     count per endpoint and field,
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
//! `failed` (a compared target did not answer: timeout, connection, shed), `busy`, and, from the
//! bodies, `truncated` (over `max_body`), `encoding`, `too_large`, `corrupt`.
//!
//! What the comparisons found is kept per endpoint (at most `max_endpoints`, the rest together)
//! and field (at most `max_fields` each), with up to `samples` examples per field, all of them
//! within [`SAMPLE_BYTES`] per route.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;
use metrics::{Counter, Gauge};
use serde_json::{json, Value};

use teeway_compare::json::{Differences, FieldDiff, JsonOptions};
use teeway_compare::noise::{EndpointStats, Verdict};
use teeway_compare::response::{compare, Response, Rules};
use teeway_wire::{MirroredRequest, ResponseRecord};

use crate::config::CompareConfig;
use crate::metrics::GatewayMetrics;
use crate::observe::{Exchange, Observer, Outcome};

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

/// Bytes of samples kept per route.
pub const SAMPLE_BYTES: u64 = 32 * 1024 * 1024;
/// Body bytes a sample keeps of each message.
const SAMPLE_BODY: usize = 16 * 1024;
/// Differences listed per comparison.
const DIFFERENCES: usize = 256;
/// Copies waiting for a route's comparing thread.
const QUEUE: usize = 1024;
/// … and their bytes.
const QUEUE_BYTES: u64 = 64 * 1024 * 1024;
/// The endpoint that endpoints past `max_endpoints` are counted under.
pub const OTHER_ENDPOINTS: &str = "(other endpoints)";

/// What a compared copy showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyResult {
    /// The candidate answered as the primary did.
    Identical,
    /// It differed only in fields that are noise.
    NoiseOnly,
    /// It differed in a field that is not noise.
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

/// A compare route's comparison: its settings, queue, thread and findings. Kept across reloads
/// while the route keeps its name and its roles' targets.
#[derive(Debug)]
pub struct RouteCompare {
    inner: Arc<Inner>,
    queue: SyncSender<Work>,
}

/// What the comparing thread is given.
enum Work {
    Compare(Job),
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
    rules: Rules,
    store: Mutex<Store>,
    queued_bytes: AtomicU64,
    handles: Handles,
}

#[derive(Debug)]
struct Handles {
    copies: [Counter; 3],
    skipped: Counter,
    in_flight: Gauge,
    metrics: Arc<GatewayMetrics>,
}

/// One copy to compare.
struct Job {
    record: Arc<MirroredRequest>,
    candidate: Box<ResponseRecord>,
    primary: Box<ResponseRecord>,
    secondary: Option<Box<ResponseRecord>>,
    bytes: u64,
}

impl RouteCompare {
    /// The comparison of route `route` (whose targets' URLs are `targets`), or `old`'s when it
    /// compares the same targets the same way (its findings go on).
    pub fn build(
        route: &str,
        config: &CompareConfig,
        targets: &[String],
        old: Option<&Arc<RouteCompare>>,
        metrics: &Arc<GatewayMetrics>,
    ) -> Arc<RouteCompare> {
        let roles: Vec<String> = [
            Some(config.candidate),
            Some(config.primary),
            config.secondary,
        ]
        .into_iter()
        .flatten()
        .filter_map(|i| targets.get(i).cloned())
        .collect();
        if let Some(old) = old {
            if old.inner.route == route && old.inner.roles == roles {
                return old.clone();
            }
        }
        let labels = |more: Vec<(&'static str, String)>| {
            let mut l = vec![("route", route.to_owned())];
            l.extend(more);
            l
        };
        let r = metrics.registry();
        let handles = Handles {
            copies: CopyResult::ALL
                .map(|c| c.as_str())
                .map(|result| {
                    r.counter_labels(
                        COMPARE_COPIES_TOTAL,
                        "Copies of compare routes, by result (skipped: see teeway_gateway_compare_skipped_total)",
                        &labels(vec![("result", result.to_owned())]),
                    )
                }),
            skipped: r.counter_labels(
                COMPARE_COPIES_TOTAL,
                "Copies of compare routes, by result (skipped: see teeway_gateway_compare_skipped_total)",
                &labels(vec![("result", "skipped".to_owned())]),
            ),
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
            rules,
            store: Mutex::new(Store::default()),
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

    /// The largest body its comparisons read: what each replay of the route keeps.
    pub fn max_body(&self) -> u64 {
        self.inner.config.max_body
    }

    /// What was found, for the admin API: endpoints by share of differing copies.
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
        endpoints.sort_by(|a, b| {
            let rate = |v: &Value| v["differing_rate"].as_f64().unwrap_or(0.0);
            rate(b).total_cmp(&rate(a))
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

    /// The samples kept for `field` at `endpoint`, newest first.
    pub fn samples(&self, endpoint: &str, field: &str) -> Vec<Value> {
        let store = self.inner.lock_store();
        let entry = match store.endpoints.get(endpoint) {
            Some(e) => e,
            None if endpoint == OTHER_ENDPOINTS => &store.other,
            None => return Vec::new(),
        };
        entry
            .samples
            .get(field)
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
        let inner = &self.inner;
        let answer = |i: usize| match exchange.outcomes.get(i).map(|o| &o.outcome) {
            Some(Outcome::Answered(a)) => match &a.response {
                Some(r) => Ok(r.clone()),
                // Kept by every replay of a compare route: not seen unless a target was
                // reconfigured while the copy was replayed.
                None => Err("not_replayed"),
            },
            Some(Outcome::Failed(_)) => Err("failed"),
            Some(Outcome::Skipped(_)) | None => Err("not_replayed"),
        };
        let job = answer(inner.config.candidate).and_then(|candidate| {
            let primary = answer(inner.config.primary)?;
            // A secondary that did not answer only means no noise is learned from this copy.
            let secondary = inner.config.secondary.and_then(|i| answer(i).ok());
            let bytes = [Some(&candidate), Some(&primary), secondary.as_ref()]
                .into_iter()
                .flatten()
                .map(|r| r.body.len() as u64)
                .sum();
            Ok(Job {
                record: exchange.record.clone(),
                candidate,
                primary,
                secondary,
                bytes,
            })
        });
        let job = match job {
            Ok(job) => job,
            Err(reason) => return inner.skip(reason),
        };
        let bytes = job.bytes;
        if inner.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > QUEUE_BYTES {
            inner.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return inner.skip("busy");
        }
        if self.queue.try_send(Work::Compare(job)).is_err() {
            // Full, or its thread is gone: the copy is let go, counted.
            inner.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            inner.skip("busy");
        }
    }
}

impl Inner {
    fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a copy not compared, for `reason`.
    fn skip(&self, reason: &'static str) {
        let h = &self.handles;
        h.metrics
            .registry()
            .counter_labels(
                COMPARE_SKIPPED_TOTAL,
                "Copies of compare routes not compared, by reason",
                &[("route", self.route.clone()), ("reason", reason.to_owned())],
            )
            .increment(1);
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
        fn view(r: &ResponseRecord) -> Response<'_> {
            Response {
                status: r.status.as_u16(),
                headers: &r.headers,
                trailers: None,
                body: &r.body,
                truncated: r.body_truncated,
            }
        }
        let raw = match compare(&view(&job.primary), &view(&job.candidate), &self.rules) {
            Ok(d) => d,
            Err(skip) => return self.skip(skip.reason()),
        };
        // The secondary's differences from the primary: noise. Unreadable, it teaches nothing.
        let noise = job
            .secondary
            .as_ref()
            .and_then(|s| compare(&view(&job.primary), &view(s), &self.rules).ok());
        let endpoint = self
            .config
            .endpoints
            .endpoint(job.record.method.as_str(), job.record.uri.path())
            .to_string();
        let result = {
            let mut guard = self.lock_store();
            let store = &mut *guard;
            let room = SAMPLE_BYTES.saturating_sub(store.sample_bytes);
            let max_endpoints = self.config.max_endpoints;
            let known = store.endpoints.contains_key(&endpoint);
            let (name, entry) = if known || store.endpoints.len() < max_endpoints {
                let entry = store.endpoints.entry(endpoint.clone()).or_default();
                (endpoint, entry)
            } else {
                (OTHER_ENDPOINTS.to_owned(), &mut store.other)
            };
            entry
                .stats
                .record(&raw, noise.as_ref(), self.config.max_fields);
            let result = entry.classify(&raw, self.config.noise);
            entry.results[result as usize] += 1;
            if !raw.fields.is_empty() {
                let (added, released) =
                    entry.keep(Sample::new(job, &raw), self.config.samples, room);
                store.sample_bytes = (store.sample_bytes + added).saturating_sub(released);
            }
            (name, result)
        };
        let (endpoint, result) = result;
        let h = &self.handles;
        h.copies[result as usize].increment(1);
        h.metrics
            .registry()
            .counter_labels(
                COMPARE_ENDPOINT_TOTAL,
                "Copies of compare routes compared, by endpoint and result",
                &[
                    ("route", self.route.clone()),
                    ("endpoint", endpoint),
                    ("result", result.as_str().to_owned()),
                ],
            )
            .increment(1);
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
}

/// One endpoint's findings.
#[derive(Debug, Default)]
struct Entry {
    stats: EndpointStats,
    /// Copies by [`CopyResult`].
    results: [u64; 3],
    /// Per field, the newest samples last.
    samples: BTreeMap<String, VecDeque<Arc<Sample>>>,
}

impl Entry {
    /// What a copy with `raw` differences showed, given what is noise by now.
    fn classify(
        &self,
        raw: &Differences,
        thresholds: teeway_compare::noise::Thresholds,
    ) -> CopyResult {
        if raw.fields.is_empty() && raw.more == 0 {
            return CopyResult::Identical;
        }
        let differing = raw.fields.iter().any(|f| {
            let counts = self
                .stats
                .fields
                .get(&f.field)
                .copied()
                .unwrap_or(self.stats.other);
            self.stats.verdict(counts, thresholds) == Verdict::Differing
        });
        if differing || raw.more > 0 {
            CopyResult::Differing
        } else {
            CopyResult::NoiseOnly
        }
    }

    /// Keeps `sample` under each field it differs in (at most `per_field` each, the oldest
    /// let go), if `room` bytes allow; returns the bytes added and the bytes let go.
    fn keep(&mut self, sample: Sample, per_field: usize, room: u64) -> (u64, u64) {
        let mut fields: Vec<&str> = sample
            .differences
            .iter()
            .map(|f| f.field.as_str())
            .collect();
        fields.sort_unstable();
        fields.dedup();
        let fields: Vec<String> = fields
            .into_iter()
            .filter(|f| self.stats.fields.contains_key(*f))
            .map(str::to_owned)
            .collect();
        if fields.is_empty() || sample.bytes > room {
            return (0, 0);
        }
        let sample = Arc::new(sample);
        let mut released = 0;
        for field in fields {
            let kept = self.samples.entry(field).or_default();
            kept.push_back(sample.clone());
            while kept.len() > per_field {
                if let Some(old) = kept.pop_front() {
                    // Its bytes are let go with its last place.
                    if Arc::strong_count(&old) == 1 {
                        released += old.bytes;
                    }
                }
            }
        }
        let added = if Arc::strong_count(&sample) > 1 {
            sample.bytes
        } else {
            0
        };
        (added, released)
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
        json!({
            "endpoint": name,
            "compared": compared,
            "with_secondary": self.stats.with_secondary,
            "identical": self.results[CopyResult::Identical as usize],
            "noise_only": self.results[CopyResult::NoiseOnly as usize],
            "differing": differing,
            "differing_rate": rate(differing, compared),
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
    candidate: Answer,
    primary: Answer,
    differences: Vec<FieldDiff>,
    /// Its size, as counted against [`SAMPLE_BYTES`].
    bytes: u64,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
    truncated: bool,
}

impl Sample {
    fn new(job: &Job, raw: &Differences) -> Self {
        let r = &job.record;
        let headers = |h: &HeaderMap| -> Vec<(String, String)> {
            h.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect()
        };
        // Copied, not sliced: a slice would keep the whole body alive.
        let excerpt = |b: &Bytes| Bytes::copy_from_slice(&b[..b.len().min(SAMPLE_BODY)]);
        let answer = |a: &ResponseRecord| Answer {
            status: a.status.as_u16(),
            headers: headers(&a.headers),
            body: excerpt(&a.body),
            truncated: a.body_truncated || a.body.len() > SAMPLE_BODY,
        };
        let mut sample = Sample {
            at: r.meta.received_at,
            method: r.method.to_string(),
            uri: r.uri.to_string(),
            request_headers: headers(&r.headers),
            request_body: excerpt(&r.body),
            candidate: answer(&job.candidate),
            primary: answer(&job.primary),
            differences: raw.fields.clone(),
            bytes: 0,
        };
        let text = |pairs: &[(String, String)]| {
            pairs
                .iter()
                .map(|(k, v)| k.len() + v.len() + 32)
                .sum::<usize>()
        };
        sample.bytes = (512
            + sample.uri.len()
            + text(&sample.request_headers)
            + text(&sample.candidate.headers)
            + text(&sample.primary.headers)
            + sample.request_body.len()
            + sample.candidate.body.len()
            + sample.primary.body.len()
            + sample
                .differences
                .iter()
                .map(|d| d.field.len() + d.at.len() + 64)
                .sum::<usize>()) as u64;
        sample
    }

    fn to_json(&self) -> Value {
        let answer = |a: &Answer| {
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
            "candidate": answer(&self.candidate),
            "primary": answer(&self.primary),
            "differences": self.differences.iter().map(|d| json!({
                "field": d.field, "at": d.at, "change": d.change.as_str(),
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
            primary: 1,
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
            response: Some(Box::new(ResponseRecord {
                meta: Meta::basic(1, UNIX_EPOCH, "prod".into()),
                origin: ResponseOrigin::Replayed,
                target: String::new(),
                latency: Duration::from_millis(1),
                status: StatusCode::OK,
                version: http::Version::HTTP_11,
                headers,
                body: Bytes::from(body),
                body_truncated: false,
            })),
            grpc_status: None,
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
        assert_eq!(copies("skipped"), 1.0);
        assert_eq!(
            s.sum_where(COMPARE_SKIPPED_TOTAL, &[("reason", "failed")]),
            1.0
        );
        assert_eq!(
            copies("identical") + copies("noise_only") + copies("differing") + copies("skipped"),
            82.0,
            "every copy in exactly one result"
        );
        assert_eq!(copies("differing"), 40.0, "every /users/{{id}} copy");

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

        // A reload that keeps the route's roles keeps what it found.
        let again = RouteCompare::build("api", &config(true), &urls, Some(&compare), &metrics);
        assert!(Arc::ptr_eq(&again, &compare));
        let other = RouteCompare::build("api", &config(false), &urls, Some(&compare), &metrics);
        assert!(
            !Arc::ptr_eq(&other, &compare),
            "another set of roles starts afresh"
        );
    }
}

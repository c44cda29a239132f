//! `teeway diff`: the comparison of a gateway's compare route (`routes[].compare`), offline.
//!
//! Each HTTP request of the archives is replayed to the candidate, the primary and the
//! secondary given by URL, all at once, and their answers are compared as a gateway compares
//! them: the same endpoints, fields, noise and samples (the gateway's own [`RouteCompare`]).
//! Answers can also come from the archives instead of a replay:
//!
//! - `--primary production`: what production answered, which an agent with
//!   `mirror.capture_response` sends with each copy (a native archive keeps it with the
//!   request), or a GoReplay capture's original responses (`2` records);
//! - `--from-archive`: every role's answer is read from the archives, none is replayed: a
//!   gateway archive with `record_responses: true` holds each target's answer, named by its URL.
//!
//! An answer read from the archives may come a little after its request: requests wait for
//! theirs among the last [`PENDING`] read, then are compared with what came (a role with no
//! answer counts as failed).
//!
//! The findings are printed, and written with `--report FILE` as the admin port's page, static:
//! one HTML file that shows them with no server.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use teeway_archive::read::Reader;
use teeway_archive::Envelope;
use teeway_gateway::compare::{RouteCompare, COMPARE_COPIES_TOTAL, COMPARE_SKIPPED_TOTAL};
use teeway_gateway::metrics::GatewayMetrics;
use teeway_gateway::replay::{Answer, Target};
use teeway_runtime::dns::Resolver;
use teeway_runtime::metrics::Snapshot;
use teeway_wire::{MirroredRequest, Production, ResponseOrigin, ResponseRecord};

use crate::replay::{http_target, HttpTargetOptions};

/// Requests waiting for their answers from the archives, at most.
pub const PENDING: usize = 4096;
/// The route name the findings carry.
const ROUTE: &str = "diff";
/// Records read ahead of the comparison.
const READ_AHEAD: usize = 1024;
/// Interval of the progress lines on stderr.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How `--primary` names production's own answer.
pub const PRODUCTION: &str = "production";

/// Options of one `teeway diff`.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Archives: files or directories.
    pub archives: Vec<PathBuf>,
    /// The new version's URL.
    pub candidate: String,
    /// The known-good version's URL, or `production`.
    pub primary: String,
    /// A second known-good instance's URL: what it answers differently is noise.
    pub secondary: Option<String>,
    /// What a compare block takes besides its roles (`headers`, `ignore`, `unordered`,
    /// `endpoints`, `noise`, `max_body`, `max_endpoints`, `max_fields`, `samples`), as YAML.
    pub settings: teeway_runtime::yaml::Mapping,
    /// Every answer from the archives: nothing is replayed.
    pub from_archive: bool,
    /// How replays are sent.
    pub http: HttpTargetOptions,
    /// Show progress on stderr.
    pub progress: bool,
}

/// What a diff found.
#[derive(Debug)]
pub struct Findings {
    /// As the gateway's `/compare` answers: `{"routes": [..]}`.
    pub summary: Value,
    /// Every sample kept, by route, endpoint and key.
    pub samples: Value,
    /// HTTP requests read.
    pub requests: u64,
    /// Copies by result: `identical`, `noise_only`, `differing`, `skipped`.
    pub results: Vec<(String, u64)>,
    /// Copies not compared, by reason.
    pub skipped: Vec<(String, u64)>,
    /// Records that are not HTTP requests: responses (used or not), RPC, kinds unknown.
    pub other_records: u64,
    /// Replays that failed, by role and reason.
    pub failed: Vec<(String, u64)>,
    /// Requests whose body the agent cut: not sent, as a gateway sends none of them.
    pub cut: u64,
    /// Roles whose answers were to come from the archives and none did, with the targets the
    /// archives do hold answers of (`production` for original responses).
    pub absent: Vec<String>,
}

impl Findings {
    /// Copies judged `differing`.
    pub fn differing(&self) -> u64 {
        self.result("differing")
    }

    /// Copies compared (not skipped).
    pub fn compared(&self) -> u64 {
        ["identical", "noise_only", "differing"]
            .iter()
            .map(|r| self.result(r))
            .sum()
    }

    fn result(&self, name: &str) -> u64 {
        self.results
            .iter()
            .find(|(r, _)| r == name)
            .map_or(0, |(_, n)| *n)
    }

    /// Replays that could not reach their target (a connection refused or not made).
    pub fn unreachable(&self) -> u64 {
        self.failed
            .iter()
            .filter(|(k, _)| k.ends_with(" connect"))
            .map(|(_, n)| n)
            .sum()
    }

    /// Fields whose verdict is `differing`, as `ENDPOINT FIELD`.
    pub fn regressions(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in endpoints(&self.summary) {
            for f in e["fields"].as_array().into_iter().flatten() {
                if f["verdict"] == "differing" {
                    out.push(format!(
                        "{} {}",
                        e["endpoint"].as_str().unwrap_or_default(),
                        f["field"].as_str().unwrap_or_default()
                    ));
                }
            }
        }
        out
    }

    /// The findings page, static: it shows them with no server.
    pub fn report_page(&self) -> String {
        teeway_gateway::compare::static_report(&self.summary, &self.samples)
    }
}

fn endpoints(summary: &Value) -> impl Iterator<Item = &Value> {
    summary["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["endpoints"].as_array().into_iter().flatten())
}

impl std::fmt::Display for Findings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let route = &self.summary["routes"][0];
        let role = |k: &str| route[k].as_str().unwrap_or("-").to_owned();
        writeln!(
            f,
            "candidate {} vs primary {}{}",
            role("candidate"),
            role("primary"),
            match route["secondary"].as_str() {
                Some(s) => format!(", noise from {s}"),
                None => " (no secondary: no noise learned)".to_owned(),
            }
        )?;
        let skipped = self.result("skipped");
        writeln!(
            f,
            "requests:  {} read, {} compared: {} differing, {} noise only, {} identical; {} skipped{}",
            self.requests,
            self.compared(),
            self.differing(),
            self.result("noise_only"),
            self.result("identical"),
            skipped,
            join(&self.skipped)
        )?;
        if self.cut > 0 {
            writeln!(
                f,
                "cut:       {} requests whose body the agent cut were not sent (as a gateway sends none)",
                self.cut
            )?;
        }
        if !self.failed.is_empty() {
            let list: Vec<String> = self
                .failed
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "failed:    {}", list.join(", "))?;
        }
        for e in endpoints(&self.summary) {
            let rate = e["differing_rate"].as_f64().unwrap_or(0.0);
            writeln!(
                f,
                "\n{}  {} compared, {} differing ({:.1}%)",
                e["endpoint"].as_str().unwrap_or_default(),
                e["compared"],
                e["differing"],
                rate * 100.0
            )?;
            let mut fields: Vec<&Value> = e["fields"].as_array().into_iter().flatten().collect();
            fields.sort_by_key(|f| f["verdict"] != "differing");
            for field in fields {
                let pct = |k: &str| field[k].as_f64().unwrap_or(0.0) * 100.0;
                // Without a secondary no known-good pair was measured.
                let noise = match route["secondary"].is_string() {
                    true => format!(", known-good versions {:.1}%", pct("noise_rate")),
                    false => String::new(),
                };
                writeln!(
                    f,
                    "  {:<9}  {}  candidate differs {:.1}%{noise}",
                    field["verdict"].as_str().unwrap_or_default(),
                    field["field"].as_str().unwrap_or_default(),
                    pct("raw_rate"),
                )?;
            }
        }
        Ok(())
    }
}

/// ` (a 1, b 2)`, or nothing for an empty list.
fn join(counts: &[(String, u64)]) -> String {
    if counts.is_empty() {
        return String::new();
    }
    let list: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!(" ({})", list.join(", "))
}

/// One role of the comparison.
struct Role {
    name: &'static str,
    /// Its URL as given (a target's), or `production`.
    url: String,
    /// Where its answers come from: replayed to it, or read from the archives.
    target: Option<Arc<Target>>,
}

/// Requests waiting for their answers from the archives, oldest first.
#[derive(Default)]
struct Pending {
    waiting: HashMap<(u64, Arc<str>, u64), Waiting>,
    /// Keys in the order they came; those answered since are swept once they outnumber the
    /// waiting, so it stays within twice them.
    order: VecDeque<(u64, Arc<str>, u64)>,
}

impl Pending {
    /// Lets `w` wait; returns what must be compared now: a request of the same key before it
    /// (one agent's spool read twice), and the oldest past [`PENDING`].
    fn wait(&mut self, w: Waiting) -> Vec<Waiting> {
        let mut now = Vec::new();
        let key = w.record.meta.key();
        self.order.push_back(key.clone());
        now.extend(self.waiting.insert(key, w));
        while self.waiting.len() > PENDING {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            now.extend(self.waiting.remove(&oldest));
        }
        if self.order.len() > 2 * self.waiting.len() + 1024 {
            let waiting = &self.waiting;
            self.order.retain(|k| waiting.contains_key(k));
        }
        now
    }

    /// Every request still waiting, oldest first.
    fn drain(&mut self) -> Vec<Waiting> {
        let order = std::mem::take(&mut self.order);
        order
            .into_iter()
            .filter_map(|k| self.waiting.remove(&k))
            .collect()
    }
}

/// Replays a request to every target role, then hands it to the comparison.
struct Dispatcher {
    slots: Arc<Semaphore>,
    /// Each role's name, and its target when its answers are replayed.
    roles: Vec<(String, Option<Arc<Target>>)>,
    ready: mpsc::Sender<(Arc<MirroredRequest>, Vec<Option<Answer>>)>,
    failed: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    max_body: u64,
    tasks: tokio_util::task::TaskTracker,
}

impl Dispatcher {
    /// Waits for a slot, then replays and compares `w` on a task of its own. With nothing to
    /// replay, `w` goes to the comparison at once, in the order read: the same archive gives
    /// the same findings every time.
    async fn dispatch(&self, w: Waiting) {
        if self.roles.iter().all(|(_, t)| t.is_none()) {
            let _ = self.ready.send((Arc::new(w.record), w.answers)).await;
            return;
        }
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let roles = self.roles.clone();
        let (ready, failed, max_body) = (self.ready.clone(), self.failed.clone(), self.max_body);
        self.tasks.spawn(async move {
            let record = Arc::new(w.record);
            let mut answers = w.answers;
            let sends = roles.iter().map(|(_, target)| {
                let record = record.clone();
                async move {
                    match target {
                        Some(t) => Some(
                            t.send(&record, &record.meta.source_cluster, Some(max_body))
                                .await,
                        ),
                        None => None,
                    }
                }
            });
            let sent = futures_util::future::join_all(sends).await;
            for (i, outcome) in sent.into_iter().enumerate() {
                match outcome {
                    Some(Ok(answer)) => answers[i] = Some(answer),
                    Some(Err(reason)) => {
                        if let Ok(mut f) = failed.lock() {
                            *f.entry(format!("{} {}", roles[i].0, reason.as_str()))
                                .or_default() += 1;
                        }
                    }
                    None => {}
                }
            }
            // The slot is held until the comparison takes the copy.
            let _ = ready.send((record, answers)).await;
            drop(slot);
        });
    }
}

/// A request waiting for answers from the archives.
struct Waiting {
    record: MirroredRequest,
    /// Per target role, its archived answer.
    answers: Vec<Option<Answer>>,
}

/// Runs the diff.
pub async fn run(options: DiffOptions) -> anyhow::Result<Findings> {
    let files = teeway_archive::read::discover(&options.archives)?;
    if options.http.concurrency == 0 || options.http.timeout.is_zero() {
        return Err(crate::usage(
            "--concurrency and --timeout must be above zero",
        ));
    }
    let production = options.primary == PRODUCTION;
    let resolver = Resolver::from_system()?;
    let mut roles = Vec::new();
    let named = [
        ("candidate", "--candidate", Some(options.candidate.clone())),
        (
            "primary",
            "--primary",
            (!production).then(|| options.primary.clone()),
        ),
        ("secondary", "--secondary", options.secondary.clone()),
    ];
    for (name, flag, url) in named {
        let Some(url) = url else { continue };
        let url = url.trim_end_matches('/').to_owned();
        let target = if options.from_archive {
            None
        } else {
            let target = http_target(flag, &url, &options.http, resolver.clone());
            Some(
                target.map_err(|e| match (name, e.downcast_ref::<crate::Usage>()) {
                    ("primary", Some(_)) => {
                        crate::usage(format!("{e}; or `production` for what production answered"))
                    }
                    _ => e,
                })?,
            )
        };
        roles.push(Role { name, url, target });
    }
    let config = compare_config(&options)?;
    let urls: Vec<String> = roles.iter().map(|r| r.url.clone()).collect();
    let metrics = Arc::new(GatewayMetrics::new());
    let max_body = config.max_body;
    let compare = RouteCompare::build(ROUTE, &config, &urls, None, &metrics);

    // The comparisons run on a thread of their own, in the order copies are ready.
    let (ready, mut jobs) = mpsc::channel::<(Arc<MirroredRequest>, Vec<Option<Answer>>)>(256);
    let compared = Arc::new(AtomicU64::new(0));
    let comparing = {
        let compare = compare.clone();
        let compared = compared.clone();
        tokio::task::spawn_blocking(move || {
            while let Some((record, answers)) = jobs.blocking_recv() {
                compare.compare_now(record, answers);
                compared.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let read = Arc::new(AtomicU64::new(0));
    let progress = options
        .progress
        .then(|| tokio::spawn(progress(read.clone(), compared.clone())));

    let (tx, mut rx) = mpsc::channel::<Envelope>(READ_AHEAD);
    let reader = tokio::task::spawn_blocking(move || {
        let mut reader = Reader::with_files(files, teeway_archive::read::DEFAULT_WINDOW);
        for record in reader.by_ref() {
            if tx.blocking_send(record).is_err() {
                break;
            }
        }
        reader.stats
    });

    let failed = Arc::new(std::sync::Mutex::new(HashMap::<String, u64>::new()));
    let tasks = tokio_util::task::TaskTracker::new();
    let dispatcher = Dispatcher {
        // Requests at the targets, or waiting for the comparison, at most: an archive of any
        // size streams through in bounded memory.
        slots: Arc::new(Semaphore::new(options.http.concurrency)),
        roles: roles
            .iter()
            .map(|r| (r.name.to_owned(), r.target.clone()))
            .collect(),
        ready: ready.clone(),
        failed: failed.clone(),
        max_body,
        tasks: tasks.clone(),
    };
    let mut pending = Pending::default();
    let mut requests = 0u64;
    let mut other_records = 0u64;
    let mut cut = 0u64;
    // Answers found in the archives: by target URL (`production`: original responses).
    let mut archived: std::collections::BTreeMap<String, u64> = Default::default();
    while let Some(record) = rx.recv().await {
        match record {
            Envelope::HttpRequest(r) => {
                requests += 1;
                read.store(requests, Ordering::Relaxed);
                if r.production.is_some() {
                    *archived.entry(PRODUCTION.to_owned()).or_default() += 1;
                }
                if r.body_truncated {
                    cut += 1;
                    continue;
                }
                let waits = options.from_archive || (production && r.production.is_none());
                let w = Waiting {
                    answers: (0..roles.len()).map(|_| None).collect(),
                    record: r,
                };
                if !waits {
                    dispatcher.dispatch(w).await;
                    continue;
                }
                for w in pending.wait(w) {
                    dispatcher.dispatch(w).await;
                }
            }
            Envelope::HttpResponse(resp) => {
                other_records += 1;
                let from = match resp.origin {
                    ResponseOrigin::Original => PRODUCTION.to_owned(),
                    ResponseOrigin::Replayed => resp.target.trim_end_matches('/').to_owned(),
                };
                *archived.entry(from).or_default() += 1;
                let key = resp.meta.key();
                let Some(w) = pending.waiting.get_mut(&key) else {
                    continue;
                };
                take_answer(w, &roles, resp, production);
                let complete = (!production || w.record.production.is_some())
                    && (!options.from_archive || w.answers.iter().all(Option::is_some));
                if complete {
                    if let Some(w) = pending.waiting.remove(&key) {
                        dispatcher.dispatch(w).await;
                    }
                }
            }
            Envelope::RpcRequest(_) | Envelope::Other { .. } => other_records += 1,
        }
    }
    let stats = reader.await.context("archive reader failed")?;
    for w in pending.drain() {
        dispatcher.dispatch(w).await;
    }
    drop(dispatcher);
    tasks.close();
    tasks.wait().await;
    drop(ready);
    comparing.await.context("the comparing thread failed")?;
    if let Some(p) = progress {
        p.abort();
    }
    if stats.skipped() > 0 {
        tracing::warn!(
            skipped = stats.skipped(),
            "parts of the archives could not be read (teeway archive verify lists them)"
        );
    }
    let snapshot = Snapshot::parse(&metrics.registry().render());
    let labelled = |name: &str, label: &str| -> Vec<(String, u64)> {
        let key = format!("{label}=\"");
        snapshot
            .series(name)
            .into_iter()
            .filter(|(_, v)| *v > 0.0)
            .filter_map(|(series, v)| {
                let rest = &series[series.find(&key)? + key.len()..];
                Some((rest[..rest.find('"')?].to_owned(), v as u64))
            })
            .collect()
    };
    let mut failed: Vec<(String, u64)> = failed
        .lock()
        .map(|f| f.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default();
    failed.sort();
    // Roles whose answers were to be read from the archives and are not there: every copy
    // would read as a regression (or a skip) for a reason the findings would not show.
    let held: Vec<&str> = archived.keys().map(String::as_str).collect();
    let absent = roles
        .iter()
        .filter(|r| r.target.is_none())
        .map(|r| (r.name, r.url.clone()))
        .chain(production.then(|| ("primary", PRODUCTION.to_owned())))
        .filter(|(_, url)| !archived.contains_key(url))
        .map(|(name, url)| {
            format!(
                "--{name} {url}: the archives hold no answer of it (they hold answers of: {})",
                if held.is_empty() {
                    "none".to_owned()
                } else {
                    held.join(", ")
                }
            )
        })
        .collect();
    Ok(Findings {
        summary: json!({ "routes": [compare.summary()] }),
        samples: json!({ ROUTE: compare.all_samples() }),
        requests,
        results: labelled(COMPARE_COPIES_TOTAL, "result"),
        skipped: labelled(COMPARE_SKIPPED_TOTAL, "reason"),
        other_records,
        failed,
        cut,
        absent,
    })
}

/// The compare block the options make, read as a gateway reads one.
fn compare_config(options: &DiffOptions) -> anyhow::Result<teeway_gateway::config::CompareConfig> {
    use teeway_runtime::yaml::Value as Yaml;
    let mut block = options.settings.clone();
    let role = |url: &str| Yaml::from(url.trim_end_matches('/'));
    block.insert(Yaml::from("candidate"), role(&options.candidate));
    block.insert(Yaml::from("primary"), role(&options.primary));
    if let Some(secondary) = &options.secondary {
        block.insert(Yaml::from("secondary"), role(secondary));
    }
    let urls: Vec<&str> = [
        Some(options.candidate.as_str()),
        (options.primary != PRODUCTION).then_some(options.primary.as_str()),
        options.secondary.as_deref(),
    ]
    .into_iter()
    .flatten()
    .map(|u| u.trim_end_matches('/'))
    .collect();
    teeway_gateway::config::compare_config(&Yaml::Mapping(block), &urls)
        .map_err(|e| crate::usage(e.to_string()))
}

/// Files an archived answer with the request it answers: production's (an original response)
/// or a target role's (a replayed response from its URL).
fn take_answer(w: &mut Waiting, roles: &[Role], resp: ResponseRecord, production: bool) {
    match resp.origin {
        ResponseOrigin::Original if production && w.record.production.is_none() => {
            // Interim answers (100 Continue, 103 Early Hints) are not the answer.
            if resp.status.is_informational() {
                return;
            }
            w.record.production = Some(Box::new(Production {
                latency: resp.latency,
                status: resp.status,
                version: resp.version,
                headers: resp.headers,
                body: resp.body,
                trailers: None,
                body_truncated: resp.body_truncated,
            }));
        }
        ResponseOrigin::Replayed => {
            let target = resp.target.trim_end_matches('/');
            if let Some(i) = roles.iter().position(|r| r.url == target) {
                if w.answers[i].is_none() && !resp.status.is_informational() {
                    let grpc_status = resp.headers.get("grpc-status").cloned();
                    w.answers[i] = Some(Answer {
                        status: resp.status,
                        elapsed: resp.latency,
                        response: Some(Box::new(resp)),
                        grpc_status,
                    });
                }
            }
        }
        ResponseOrigin::Original => {}
    }
}

/// A line on stderr every few seconds while the diff runs.
async fn progress(read: Arc<AtomicU64>, compared: Arc<AtomicU64>) {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        // A closed stderr stops the lines, not the diff.
        let line = format!(
            "diff: {} requests read, {} copies compared",
            read.load(Ordering::Relaxed),
            compared.load(Ordering::Relaxed)
        );
        use std::io::Write;
        if writeln!(std::io::stderr().lock(), "{line}").is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(id: u64) -> Waiting {
        Waiting {
            record: MirroredRequest {
                meta: teeway_wire::Meta::basic(id, std::time::UNIX_EPOCH, "c".into()),
                method: http::Method::GET,
                uri: http::Uri::from_static("/"),
                version: http::Version::HTTP_11,
                headers: http::HeaderMap::new(),
                body: bytes::Bytes::new(),
                trailers: None,
                body_truncated: false,
                production: None,
            },
            answers: vec![None],
        }
    }

    #[test]
    fn requests_wait_in_bounded_memory_and_leave_oldest_first() {
        let mut pending = Pending::default();
        // Answered at once, as a gateway's archive answers them: nothing is left behind.
        for id in 0..100_000 {
            assert!(pending.wait(waiting(id)).is_empty());
            pending.waiting.remove(&(0, Arc::from("c"), id));
        }
        assert!(pending.order.len() <= 1024 + 1, "{}", pending.order.len());
        // Never answered: the oldest past the bound are compared without their answers.
        let mut released = Vec::new();
        for id in 0..(PENDING as u64 + 10) {
            released.extend(
                pending
                    .wait(waiting(id))
                    .into_iter()
                    .map(|w| w.record.meta.id),
            );
        }
        assert_eq!(released, (0..10).collect::<Vec<u64>>());
        let rest: Vec<u64> = pending
            .drain()
            .into_iter()
            .map(|w| w.record.meta.id)
            .collect();
        assert_eq!(rest.len(), PENDING);
        assert_eq!(rest[0], 10, "oldest first");
    }
}

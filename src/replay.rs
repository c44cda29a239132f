//! `teeway replay`: sends archived requests to a target, at the recorded pace or faster.
//!
//! Archives are read on a blocking thread into a bounded channel, so a large archive streams
//! through in constant memory. Each request is sent through the gateway's own replay
//! [`Target`] (pooled connections, DNS, Host policy, hop-by-hop hygiene), bounded by
//! `--concurrency`. Pacing:
//!
//! - `--speed S`: the gap between two requests is the recorded gap divided by `S`, never
//!   negative (out-of-order timestamps send at once) and never longer than `--max-wait`
//!   (GoReplay users meet hour-long sleeps from one odd timestamp; GoReplay issue 680).
//! - `--rate N`: N requests per second, whatever the recording says.
//! - `--max-rate`: as fast as `--concurrency` allows.
//!
//! When the target cannot keep up, requests go out as soon as a slot frees: the schedule is a
//! floor, not a promise. The report says how far behind schedule the replay ran.
//!
//! RPC copies (envelope kind 3) go to `redis://`, `thrift://` or `dubbo://` targets through the
//! gateway's [`RpcTarget`]: pooled, pipelined connections on which one recorded client
//! connection's requests keep their order, Thrift sequence ids and Dubbo request ids rewritten,
//! a Redis client's `SELECT`ed database selected first. Records of another protocol than the
//! target's are skipped (`other_protocol`), so one archive of mixed traffic replays to each
//! kind of target in turn.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use regex::Regex;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use teeway_archive::read::{ReadStats, Reader};
use teeway_archive::Envelope;
use teeway_gateway::config::HostPolicy;
use teeway_gateway::config::{Rewrite, RpcRouteConfig, TargetConfig};
use teeway_gateway::metrics::GatewayMetrics;
use teeway_gateway::replay::{Target, TargetSpec};
use teeway_gateway::rpc::{Notice, Replay, RpcOutcome, RpcTarget, RpcTargetMetrics};
use teeway_runtime::config::{split_host_port, UpstreamProtocol};
use teeway_runtime::dns::Resolver;
use teeway_wire::RpcProtocol;

/// Default cap on one wait between two requests.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
/// Records read ahead of the sender.
const READ_AHEAD: usize = 1024;
/// Interval of the plain progress lines written when stderr is not a terminal.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// How requests are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Recorded gaps divided by this factor.
    Speed(f64),
    /// Fixed requests per second.
    Rate(f64),
    /// No spacing: as fast as the concurrency allows.
    Max,
}

/// Options of one replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Archives: files or directories.
    pub archives: Vec<PathBuf>,
    /// The target: `http://host:port`, `https://host:port`, or `redis://`, `thrift://`,
    /// `dubbo://` and `host:port` for RPC copies.
    pub target: String,
    /// CA bundle an https target's certificate chains to; `None`: the system's CAs.
    pub ca: Option<PathBuf>,
    /// Spacing.
    pub pace: Pace,
    /// Longest single wait under `Pace::Speed`.
    pub max_wait: Duration,
    /// How many times to go through the archives.
    pub loops: u32,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Only requests whose path matches (HTTP).
    pub filter_path: Option<Regex>,
    /// Only requests whose method matches (HTTP methods; Redis commands, Thrift and Dubbo
    /// methods).
    pub filter_method: Option<Regex>,
    /// Host header: the recorded one, or the target's.
    pub host_header: HostPolicy,
    /// HTTP version to the target.
    pub protocol: UpstreamProtocol,
    /// Time allowed for one request and its response.
    pub timeout: Duration,
    /// Show progress on stderr.
    pub progress: bool,
    /// Read, filter and pace without sending anything.
    pub dry_run: bool,
    /// Send records whose body was cut (by the agent, or short in a capture) as they are.
    pub replay_truncated: bool,
}

/// Spaces requests according to a [`Pace`]; pure, so it is tested without a clock.
#[derive(Debug)]
pub struct Pacer {
    pace: Pace,
    max_wait: Duration,
    previous: Option<u64>,
    /// Recorded gaps `max_wait` shortened.
    pub shortened: u64,
    /// Time those gaps lost, after dividing by the speed.
    pub shortened_by: Duration,
}

impl Pacer {
    /// A pacer for `pace`; `max_wait` caps one wait under `Pace::Speed`.
    pub fn new(pace: Pace, max_wait: Duration) -> Self {
        Self {
            pace,
            max_wait,
            previous: None,
            shortened: 0,
            shortened_by: Duration::ZERO,
        }
    }

    /// The wait between the previous request and this one, recorded at `at_ns`.
    pub fn gap(&mut self, at_ns: u64) -> Duration {
        let previous = self.previous.replace(at_ns);
        match (self.pace, previous) {
            (_, None) | (Pace::Max, _) => Duration::ZERO,
            (Pace::Rate(rate), Some(_)) => Duration::from_secs_f64(1.0 / rate),
            (Pace::Speed(speed), Some(prev)) => {
                // Out of order: no wait, and the next gap is measured from the later time.
                if at_ns < prev {
                    self.previous = Some(prev);
                    return Duration::ZERO;
                }
                let gap = Duration::from_nanos(at_ns - prev).div_f64(speed);
                if gap > self.max_wait {
                    self.shortened += 1;
                    self.shortened_by += gap - self.max_wait;
                    return self.max_wait;
                }
                gap
            }
        }
    }

    /// Starts again (a new loop over the archive).
    pub fn reset(&mut self) {
        self.previous = None;
    }
}

/// What a replay did.
#[derive(Debug)]
pub struct Report {
    /// Requests sent.
    pub sent: u64,
    /// Requests that got a response (any status; an RPC error reply too).
    pub succeeded: u64,
    /// Requests that got none, by reason.
    pub failed: BTreeMap<&'static str, u64>,
    /// Responses by status class (`2xx`...); RPC replies as `ok` or `error_reply`.
    pub status: BTreeMap<String, u64>,
    /// The protocol replayed: `http`, `redis`, `thrift` or `dubbo`.
    pub protocol: &'static str,
    /// Requests of other protocols than the target's, by protocol (skipped as `other_protocol`).
    pub other_protocols: BTreeMap<&'static str, u64>,
    /// Requests skipped: path filter, truncated bodies.
    pub skipped: BTreeMap<&'static str, u64>,
    /// Response latency in microseconds.
    pub latency: hdrhistogram::Histogram<u64>,
    /// How long the replay took.
    pub elapsed: Duration,
    /// Longest time a request went out after its scheduled time.
    pub max_behind: Duration,
    /// How requests were spaced.
    pub pace: Pace,
    /// Recorded gaps `--max-wait` shortened, and the time that took out of the schedule.
    pub shortened: (u64, Duration),
    /// Response records in the input (not replayed).
    pub responses: u64,
    /// Nothing was sent: `--dry-run`.
    pub dry_run: bool,
    /// Time the schedule spans (what the recorded pace makes of the gaps).
    pub scheduled: Duration,
    /// What reading the archives counted.
    pub read: ReadStats,
}

impl Report {
    fn new(pace: Pace, dry_run: bool, protocol: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            pace,
            protocol,
            other_protocols: BTreeMap::new(),
            shortened: (0, Duration::ZERO),
            responses: 0,
            dry_run,
            scheduled: Duration::ZERO,
            sent: 0,
            succeeded: 0,
            failed: BTreeMap::new(),
            status: BTreeMap::new(),
            skipped: BTreeMap::new(),
            latency: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            elapsed: Duration::ZERO,
            max_behind: Duration::ZERO,
            read: ReadStats::default(),
        })
    }

    /// Requests that could not connect: the target was unreachable.
    pub fn unreachable(&self) -> u64 {
        self.failed.get("connect").copied().unwrap_or(0)
    }

    /// When no request was for the target though the archives hold requests of another
    /// protocol: what they hold, such as `redis 120, http 3`.
    pub fn wrong_protocol(&self) -> Option<String> {
        (self.sent == 0 && !self.other_protocols.is_empty()).then(|| {
            self.other_protocols
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// Achieved requests per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 && !self.dry_run {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }

    fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// The report for machines.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "protocol": self.protocol,
            "sent": self.sent,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "status": self.status,
            "skipped": self.skipped,
            "latency_ms": {
                "p50": self.percentile_ms(0.50),
                "p90": self.percentile_ms(0.90),
                "p99": self.percentile_ms(0.99),
                "max": self.latency.max() as f64 / 1000.0,
            },
            "elapsed_s": self.elapsed.as_secs_f64(),
            "rate_per_s": self.rate(),
            "max_behind_schedule_ms": self.max_behind.as_secs_f64() * 1000.0,
            "scheduled_s": self.scheduled.as_secs_f64(),
            "max_wait_shortened": {
                "gaps": self.shortened.0,
                "by_s": self.shortened.1.as_secs_f64(),
            },
            "responses_in_input": self.responses,
            "dry_run": self.dry_run,
            "archive": {
                "files": self.read.files,
                "records": self.read.records,
                "torn": self.read.torn,
                "corrupt": self.read.corrupt,
                "unreadable": self.read.unreadable,
            },
        })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let failed: u64 = self.failed.values().sum();
        if self.dry_run {
            writeln!(
                f,
                "dry run: {} request(s) would be sent over {:.2} s at this pace; nothing was sent",
                self.sent,
                self.scheduled.as_secs_f64()
            )?;
        } else {
            writeln!(
                f,
                "sent {} in {:.2} s ({:.1}/s): {} answered, {failed} failed",
                self.sent,
                self.elapsed.as_secs_f64(),
                self.rate(),
                self.succeeded
            )?;
        }
        fn join<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
        if !self.status.is_empty() {
            let label = if self.protocol == "http" {
                "status: "
            } else {
                "replies:"
            };
            writeln!(f, "{label}  {}", join(&self.status))?;
        }
        if failed > 0 {
            writeln!(f, "failed:   {}", join(&self.failed))?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "skipped:  {}", join(&self.skipped))?;
        }
        if self.succeeded > 0 {
            writeln!(
                f,
                "latency:  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                self.percentile_ms(0.50),
                self.percentile_ms(0.90),
                self.percentile_ms(0.99),
                self.latency.max() as f64 / 1000.0
            )?;
        }
        if self.pace != Pace::Max && !self.dry_run {
            writeln!(
                f,
                "schedule: at most {:.1} ms behind",
                self.max_behind.as_secs_f64() * 1000.0
            )?;
        }
        if self.shortened.0 > 0 {
            writeln!(
                f,
                "max-wait: {} recorded gap(s) shortened, {:.2} s taken out of the schedule",
                self.shortened.0,
                self.shortened.1.as_secs_f64()
            )?;
        }
        if self.responses > 0 {
            writeln!(
                f,
                "responses: {} response record(s) (or records of kinds this teeway does not know) in the input, not replayed",
                self.responses
            )?;
        }
        let r = &self.read;
        write!(
            f,
            "archive:  {} file(s), {} record(s) read; {} torn, {} corrupt, {} unreadable",
            r.files, r.records, r.torn, r.corrupt, r.unreadable
        )
    }
}

/// Where a replay sends its requests.
enum Destination {
    /// An HTTP(S) service.
    Http(Arc<Target>),
    /// A Redis, Thrift or Dubbo service, taking RPC copies of its protocol.
    Rpc {
        protocol: RpcProtocol,
        target: Arc<RpcTarget>,
        handles: Arc<RpcTargetMetrics>,
    },
}

impl Destination {
    fn protocol(&self) -> &'static str {
        match self {
            Destination::Http(_) => "http",
            Destination::Rpc { protocol, .. } => protocol.name(),
        }
    }
}

/// `redis://host[:port]`, `thrift://…`, `dubbo://…`: the protocol and address of an RPC target
/// (default ports 6379, 9090, 20880); `None` when `text` names no RPC scheme.
pub fn rpc_target(text: &str) -> Option<Result<(RpcProtocol, String, u16), String>> {
    let (scheme, rest) = text.trim().split_once("://")?;
    let (protocol, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "redis" => (RpcProtocol::Redis, 6379),
        "thrift" => (RpcProtocol::Thrift, 9090),
        "dubbo" => (RpcProtocol::Dubbo, 20880),
        _ => return None,
    };
    let address = rest.strip_suffix('/').unwrap_or(rest);
    if address.is_empty() || address.contains(['/', '@', '?']) {
        return Some(Err(format!(
            "give {scheme}://host:port, without a path, user or query"
        )));
    }
    // Without a port, the protocol's own: the address is checked the same way.
    let bare = !address.contains(':') || address.starts_with('[') && address.ends_with(']');
    let parsed = if bare {
        split_host_port(&format!("{address}:{default_port}"))
    } else {
        split_host_port(address)
    };
    Some(
        parsed
            .map(|(host, port)| (protocol, host, port))
            .ok_or_else(|| format!("`{address}` is not a host:port address")),
    )
}

/// The target of `options`, checked against the options that apply to it.
fn destination(options: &ReplayOptions, resolver: Resolver) -> anyhow::Result<Destination> {
    if let Some(rpc) = rpc_target(&options.target) {
        let (protocol, host, port) =
            rpc.map_err(|e| crate::usage(format!("--target {}: {e}", options.target)))?;
        if options.ca.is_some() || options.filter_path.is_some() {
            return Err(crate::usage(format!(
                "--target {} is an RPC target: --ca and --filter-path apply to http(s) targets (filter RPC requests with --filter-method)",
                options.target
            )));
        }
        let config = RpcRouteConfig {
            timeout: options.timeout,
            max_concurrency: options.concurrency,
            ..RpcRouteConfig::new("replay", protocol, vec![(host, port)])
        };
        let metrics = Arc::new(GatewayMetrics::new());
        let (target, handles) = RpcTarget::lone(&config, resolver, metrics)
            .ok_or_else(|| anyhow::anyhow!("no target"))?;
        return Ok(Destination::Rpc {
            protocol,
            target,
            handles,
        });
    }
    let value = teeway_runtime::yaml::Value::from(options.target.as_str());
    if let Err(e) = teeway_runtime::config::http_target(&value) {
        return Err(crate::usage(format!(
            "--target {}: {e}; or give redis://, thrift:// or dubbo://host:port to replay RPC copies",
            options.target
        )));
    }
    let target = http_target(
        "--target",
        &options.target,
        &HttpTargetOptions {
            ca: options.ca.clone(),
            timeout: options.timeout,
            concurrency: options.concurrency,
            protocol: options.protocol,
            host_header: options.host_header.clone(),
        },
        resolver,
    )?;
    Ok(Destination::Http(target))
}

/// How archived requests are sent to an HTTP target (`teeway replay`, `teeway diff`).
#[derive(Debug, Clone)]
pub struct HttpTargetOptions {
    /// CA bundle an https target's certificate chains to; `None`: the system's CAs.
    pub ca: Option<PathBuf>,
    /// Time allowed for one request and its response.
    pub timeout: Duration,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// HTTP version to the target.
    pub protocol: UpstreamProtocol,
    /// Host header: the recorded one, or the target's.
    pub host_header: HostPolicy,
}

/// The gateway's replay target for `url`, given as the option `flag`
/// (`http://host:port` or `https://host:port`).
pub fn http_target(
    flag: &str,
    url: &str,
    options: &HttpTargetOptions,
    resolver: Resolver,
) -> anyhow::Result<Arc<Target>> {
    let target_value = teeway_runtime::yaml::Value::from(url);
    let target_url = teeway_runtime::config::http_target(&target_value)
        .map_err(|e| crate::usage(format!("{flag} {url}: {e}")))?;
    if options.ca.is_some() && !target_url.tls {
        return Err(crate::usage(format!(
            "--ca is given but {flag} {url} is not https"
        )));
    }
    let tls = if target_url.tls {
        let mut problems = teeway_runtime::config::Problems::default();
        let tls = teeway_runtime::config::upstream_tls_config(
            &mut problems,
            "--ca",
            &target_url,
            options.ca.clone(),
            None,
        );
        problems.finish(())?;
        tls
    } else {
        None
    };
    let target = Target::new(
        TargetSpec {
            target: TargetConfig {
                timeout: options.timeout,
                max_concurrency: options.concurrency.max(1),
                tls,
                ..TargetConfig::new(target_url)
            },
            protocol: options.protocol,
            rewrite: Rewrite::host_only(options.host_header.clone()),
        },
        resolver,
    )
    .with_context(|| format!("{flag} {url}"))?;
    Ok(Arc::new(target))
}

/// Keeps `report` told of each RPC replay's end.
fn rpc_notice(report: &Arc<Mutex<Report>>) -> Notice {
    let report = report.clone();
    Arc::new(move |outcome: RpcOutcome, elapsed: Duration| {
        let Ok(mut r) = report.lock() else { return };
        match outcome {
            RpcOutcome::Ok | RpcOutcome::ErrorReply => {
                r.succeeded += 1;
                *r.status.entry(outcome.as_str().to_owned()).or_default() += 1;
                let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
                r.latency.saturating_record(micros.max(1));
            }
            // Named as HTTP's unreachable targets are: the exit status looks at it.
            RpcOutcome::ConnectError => *r.failed.entry("connect").or_default() += 1,
            other => *r.failed.entry(other.as_str()).or_default() += 1,
        }
    })
}

/// Replays the archives; the report, or why nothing could be replayed.
pub async fn run(options: ReplayOptions) -> anyhow::Result<Report> {
    let files = teeway_archive::read::discover(&options.archives)?;
    if options.loops == 0 || options.concurrency == 0 || options.timeout.is_zero() {
        return Err(crate::usage(
            "--loop, --concurrency and --timeout must be above zero",
        ));
    }
    let destination = destination(&options, Resolver::from_system()?)?;
    let loops = options.loops.max(1);
    let report = Arc::new(Mutex::new(Report::new(
        options.pace,
        options.dry_run,
        destination.protocol(),
    )?));
    let notice = rpc_notice(&report);
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = Progress::start(options.progress, report.clone(), total.clone());
    let started = Instant::now();
    let tasks = tokio_util::task::TaskTracker::new();
    let mut pacer = Pacer::new(options.pace, options.max_wait);
    let mut read_stats = ReadStats::default();
    let mut scheduled = Duration::ZERO;
    for pass in 0..loops {
        pacer.reset();
        let (tx, mut rx) = mpsc::channel::<Envelope>(READ_AHEAD);
        let files = files.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut reader = Reader::with_files(files, teeway_archive::read::DEFAULT_WINDOW);
            let (mut requests, mut responses) = (0u64, 0u64);
            for record in reader.by_ref() {
                match record {
                    Envelope::HttpRequest(_) | Envelope::RpcRequest(_) => {
                        requests += 1;
                        if tx.blocking_send(record).is_err() {
                            break;
                        }
                    }
                    // Responses, and kinds written by a newer teeway: counted, not replayed.
                    Envelope::HttpResponse(_) | Envelope::Other { .. } => responses += 1,
                }
            }
            (reader.stats, requests, responses)
        });
        let mut due = Instant::now();
        let mut this_pass = 0u64;
        while let Some(record) = rx.recv().await {
            let at = record.unix_nanos();
            let for_target = match (&record, &destination) {
                (Envelope::HttpRequest(_), Destination::Http(_)) => true,
                (Envelope::RpcRequest(r), Destination::Rpc { protocol, .. }) => {
                    r.call.protocol == *protocol
                }
                _ => false,
            };
            if !for_target {
                let of = match &record {
                    Envelope::RpcRequest(r) => r.call.protocol.name(),
                    _ => "http",
                };
                if let Ok(mut r) = report.lock() {
                    *r.skipped.entry("other_protocol").or_default() += 1;
                    *r.other_protocols.entry(of).or_default() += 1;
                }
                continue;
            }
            if let Some(why) = skipped(&record, &options) {
                skip(&report, why);
                continue;
            }
            this_pass += 1;
            let gap = pacer.gap(at);
            scheduled += gap;
            if options.dry_run {
                if let Ok(mut r) = report.lock() {
                    r.sent += 1;
                }
                continue;
            }
            due += gap;
            tokio::time::sleep_until(due).await;
            match (record, &destination) {
                (Envelope::HttpRequest(request), Destination::Http(target)) => {
                    let slot = target.reserve().await;
                    sent(&report, due);
                    let target = target.clone();
                    let report = report.clone();
                    tasks.spawn(async move {
                        let outcome = target
                            .send(&request, &request.meta.source_cluster, None)
                            .await;
                        drop(slot);
                        let Ok(mut r) = report.lock() else { return };
                        match outcome {
                            Ok(exchange) => {
                                r.succeeded += 1;
                                let class = format!("{}xx", exchange.status.as_u16() / 100);
                                *r.status.entry(class).or_default() += 1;
                                let micros =
                                    u64::try_from(exchange.elapsed.as_micros()).unwrap_or(u64::MAX);
                                r.latency.saturating_record(micros.max(1));
                            }
                            Err(reason) => *r.failed.entry(reason.as_str()).or_default() += 1,
                        }
                    });
                }
                (
                    Envelope::RpcRequest(request),
                    Destination::Rpc {
                        target, handles, ..
                    },
                ) => {
                    let Some(slot) = target.reserve(request.message.len()).await else {
                        // The target's slots closed (they never do): counted, not waited for.
                        if let Ok(mut r) = report.lock() {
                            *r.failed.entry("overloaded").or_default() += 1;
                        }
                        continue;
                    };
                    sent(&report, due);
                    // Handed over in the order read: one recorded connection's requests reach
                    // the target in the order of their timestamps (their agent's clock).
                    let replay =
                        Replay::start(Arc::new(request), handles.clone(), slot, tasks.token())
                            .notify(notice.clone());
                    target.send(replay, options.timeout);
                }
                _ => {}
            }
        }
        let (stats, requests, responses) = reader.await.context("archive reader failed")?;
        if pass == 0 {
            // Every pass sends the same: from now on the progress line knows the total.
            total.store(
                this_pass * u64::from(loops),
                std::sync::atomic::Ordering::Relaxed,
            );
            if requests == 0 {
                tracing::warn!(
                    responses,
                    records = stats.records,
                    "the archives hold no request to replay{}",
                    if responses > 0 {
                        " (only responses)"
                    } else {
                        ""
                    }
                );
            }
            if let Ok(mut r) = report.lock() {
                r.responses = responses;
            }
            // Every pass reads the same files: the report describes the archive once.
            read_stats = stats;
        }
    }
    tasks.close();
    tasks.wait().await;
    // The RPC target's connections and the notice hold the report: let them go first.
    drop((notice, destination));
    progress.stop().await;
    let mut report = Arc::try_unwrap(report)
        .map_err(|_| anyhow::anyhow!("replay tasks still hold the report"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a replay task panicked"))?;
    report.elapsed = started.elapsed();
    report.read = read_stats;
    report.shortened = (pacer.shortened, pacer.shortened_by);
    report.scheduled = scheduled;
    Ok(report)
}

/// Why the options pass an archived request over, if they do.
fn skipped(record: &Envelope, options: &ReplayOptions) -> Option<&'static str> {
    let method = match record {
        Envelope::HttpRequest(r) => r.method.as_str(),
        Envelope::RpcRequest(r) => r.call.method.as_str(),
        _ => return None,
    };
    if options
        .filter_method
        .as_ref()
        .is_some_and(|f| !f.is_match(method))
    {
        return Some("filter_method");
    }
    let Envelope::HttpRequest(r) = record else {
        return None;
    };
    if options
        .filter_path
        .as_ref()
        .is_some_and(|f| !f.is_match(r.uri.path()))
    {
        return Some("filter_path");
    }
    if r.body_truncated && !options.replay_truncated {
        return Some("truncated_body");
    }
    None
}

/// Counts a request sent, due at `due`.
fn sent(report: &Mutex<Report>, due: Instant) {
    let behind = Instant::now().saturating_duration_since(due);
    if let Ok(mut r) = report.lock() {
        r.sent += 1;
        r.max_behind = r.max_behind.max(behind);
    }
}

fn skip(report: &Mutex<Report>, why: &'static str) {
    if let Ok(mut r) = report.lock() {
        *r.skipped.entry(why).or_default() += 1;
    }
}

/// Progress on stderr: a bar on a terminal, a plain line every few seconds otherwise.
struct Progress {
    stop: tokio_util::sync::CancellationToken,
    /// The task drawing it; it holds a handle on the report until it ends.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// `total`: requests the whole replay sends, once known (0 until then).
    fn start(
        enabled: bool,
        report: Arc<Mutex<Report>>,
        total: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut task = None;
        if enabled {
            let token = stop.clone();
            let terminal = std::io::stderr().is_terminal();
            task = Some(tokio::spawn(async move {
                let bar = terminal.then(|| {
                    let bar = indicatif::ProgressBar::new_spinner();
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                let started = Instant::now();
                let interval = if terminal {
                    Duration::from_millis(250)
                } else {
                    PROGRESS_INTERVAL
                };
                loop {
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(interval) => {}
                    }
                    let line = match report.lock() {
                        Ok(r) => {
                            let failed: u64 = r.failed.values().sum();
                            let rate = r.sent as f64 / started.elapsed().as_secs_f64().max(0.001);
                            let sent = match total.load(std::sync::atomic::Ordering::Relaxed) {
                                0 => r.sent.to_string(),
                                total => format!("{} of {total}", r.sent),
                            };
                            format!(
                                "sent {sent} answered {} failed {failed} ({rate:.0}/s)",
                                r.succeeded
                            )
                        }
                        Err(_) => break,
                    };
                    match &bar {
                        Some(bar) => bar.set_message(line),
                        None => {
                            // A closed stderr stops the lines, not the replay.
                            use std::io::Write;
                            let _ = writeln!(std::io::stderr().lock(), "replay: {line}");
                        }
                    }
                }
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
            }));
        }
        Self { stop, task }
    }

    /// Stops drawing and waits until the drawing task has let go of the report.
    async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            // A panic in the drawing task is not the replay's failure.
            let _ = task.await;
        }
    }
}

/// Parses `--rate`: `200` or `200/s`.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    match number.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!(
            "`{text}` is not a rate; give requests per second such as 200 or 200/s"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn speed_divides_recorded_gaps_and_caps_each_wait() {
        let mut p = Pacer::new(Pace::Speed(1.0), Duration::from_secs(1));
        let gaps: Vec<u64> = [0, 100 * MS, 350 * MS, 5_000 * MS, 5_010 * MS]
            .into_iter()
            .map(|t| p.gap(t).as_millis() as u64)
            .collect();
        assert_eq!(gaps, [0, 100, 250, 1000, 10]);
        let mut fast = Pacer::new(Pace::Speed(2.0), Duration::from_secs(1));
        let gaps: Vec<u64> = [0, 100 * MS, 300 * MS]
            .into_iter()
            .map(|t| fast.gap(t).as_millis() as u64)
            .collect();
        assert_eq!(gaps, [0, 50, 100]);
    }

    #[test]
    fn out_of_order_timestamps_never_wait_or_rewind() {
        let mut p = Pacer::new(Pace::Speed(1.0), Duration::from_secs(10));
        assert_eq!(p.gap(1_000 * MS), Duration::ZERO);
        assert_eq!(p.gap(900 * MS), Duration::ZERO, "earlier: sent at once");
        assert_eq!(
            p.gap(1_100 * MS),
            Duration::from_millis(100),
            "measured from the latest time seen"
        );
    }

    #[test]
    fn rate_and_max_ignore_the_recording() {
        let mut p = Pacer::new(Pace::Rate(4.0), Duration::from_secs(1));
        assert_eq!(p.gap(0), Duration::ZERO);
        assert_eq!(p.gap(10_000 * MS), Duration::from_millis(250));
        let mut m = Pacer::new(Pace::Max, Duration::from_secs(1));
        assert_eq!(m.gap(0), Duration::ZERO);
        assert_eq!(m.gap(10_000 * MS), Duration::ZERO);
        p.reset();
        assert_eq!(p.gap(5), Duration::ZERO, "a new loop starts at once");
    }

    #[test]
    fn rpc_targets_parse_with_their_default_ports() {
        let parse = |t: &str| rpc_target(t).map(|r| r.map(|(p, h, port)| (p.name(), h, port)));
        assert_eq!(
            parse("redis://cache:6380"),
            Some(Ok(("redis", "cache".into(), 6380)))
        );
        assert_eq!(
            parse("redis://cache/"),
            Some(Ok(("redis", "cache".into(), 6379)))
        );
        assert_eq!(
            parse("THRIFT://[::1]"),
            Some(Ok(("thrift", "::1".into(), 9090)))
        );
        assert_eq!(
            parse("dubbo://10.0.0.5:20881"),
            Some(Ok(("dubbo", "10.0.0.5".into(), 20881)))
        );
        assert_eq!(parse("http://x:80"), None, "not an RPC target");
        assert!(matches!(parse("redis://"), Some(Err(_))));
        assert!(matches!(parse("redis://h:6379/0"), Some(Err(_))));
        assert!(matches!(parse("redis://user@h:6379"), Some(Err(_))));
        assert!(matches!(parse("redis://h:port"), Some(Err(_))));
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("200"), Ok(200.0));
        assert_eq!(parse_rate("2.5/s"), Ok(2.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}

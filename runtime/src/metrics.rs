//! A metrics registry per agent or gateway instance, rendered as Prometheus text.
//!
//! Each instance owns its own [`metrics_exporter_prometheus::PrometheusRecorder`] instead of
//! installing a process-global one: two agents in one process (the demo, the tests) keep separate
//! counts, and nothing depends on initialisation order. Handles are registered once at start-up,
//! so the hot path increments an atomic and never looks a name up.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Histogram buckets for latencies in seconds: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One instance's metrics.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Names described already. The exporter appends every description to a log that only a
    /// render trims, so a handle registered on a hot path (a compare route's endpoints) would
    /// grow it per call: each name is described once.
    described: Mutex<HashSet<&'static str>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry; histograms get latency buckets.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets(LATENCY_BUCKETS) {
            Ok(b) => b,
            // Only an empty bucket list is refused, and ours is not empty.
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let registry = Self {
            recorder,
            handle,
            described: Mutex::default(),
        };
        registry
            .gauge_owned(
                BUILD_INFO,
                "Always 1: the version and commit of the running binary",
                &[
                    ("version", crate::build::VERSION.to_owned()),
                    ("commit", crate::build::COMMIT.to_owned()),
                ],
            )
            .set(1.0);
        registry
    }

    /// Sets `teeway_certificate_expiry_timestamp_seconds{cert=field}` to the earliest `notAfter`
    /// of `certs` (a chain's leaf alone, or a CA bundle); nothing when none parses.
    pub fn certificate_expiry(&self, field: &str, certs: &[rustls_pki_types::CertificateDer<'_>]) {
        let Some(earliest) = certs.iter().filter_map(teeway_wire::tls::not_after).min() else {
            return;
        };
        self.gauge_owned(
            CERTIFICATE_EXPIRY,
            "When a certificate in use stops being valid (notAfter), in seconds since the epoch, by configuration field",
            &[("cert", field.to_owned())],
        )
        .set(earliest as f64);
    }

    /// Registers (or finds) a counter and records its help text.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        self.describe(name, help, Recorder::describe_counter);
        self.recorder
            .register_counter(&key(name, labels), &metadata())
    }

    /// Registers (or finds) a counter whose label value is known only at run time (a rule or
    /// route name from the configuration: bounded by the configuration, never by traffic).
    pub fn counter_owned(
        &self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        value: &str,
    ) -> Counter {
        self.describe(name, help, Recorder::describe_counter);
        let key = Key::from_parts(name, vec![Label::new(label, value.to_owned())]);
        self.recorder.register_counter(&key, &metadata())
    }

    /// Describes `name` with `help` the first time it is registered.
    fn describe(
        &self,
        name: &'static str,
        help: &'static str,
        describe: fn(&PrometheusRecorder, KeyName, Option<metrics::Unit>, SharedString),
    ) {
        let mut described = self.described.lock().unwrap_or_else(|e| e.into_inner());
        if described.insert(name) {
            describe(
                &self.recorder,
                KeyName::from_const_str(name),
                None,
                SharedString::const_str(help),
            );
        }
    }

    /// Registers (or finds) a counter with several labels whose values are known only at run
    /// time (a listener name from the configuration and a fixed reason, say).
    pub fn counter_labels(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Counter {
        self.describe(name, help, Recorder::describe_counter);
        self.recorder
            .register_counter(&Key::from_parts(name, owned_labels(labels)), &metadata())
    }

    /// Registers (or finds) a gauge whose label values are known only at run time (an info
    /// metric such as `teeway_agent_info{cluster="..."}`: one series per process).
    pub fn gauge_owned(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Gauge {
        self.describe(name, help, Recorder::describe_gauge);
        self.recorder
            .register_gauge(&Key::from_parts(name, owned_labels(labels)), &metadata())
    }

    /// Registers (or finds) a gauge and records its help text.
    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Gauge {
        self.describe(name, help, Recorder::describe_gauge);
        self.recorder
            .register_gauge(&key(name, labels), &metadata())
    }

    /// Registers (or finds) a histogram and records its help text.
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Histogram {
        self.describe(name, help, Recorder::describe_histogram);
        self.recorder
            .register_histogram(&key(name, labels), &metadata())
    }

    /// Registers (or finds) a histogram whose label values are known only at run time (a
    /// route and a target from the configuration).
    pub fn histogram_labels(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
    ) -> Histogram {
        self.describe(name, help, Recorder::describe_histogram);
        self.recorder
            .register_histogram(&Key::from_parts(name, owned_labels(labels)), &metadata())
    }

    /// The Prometheus text exposition of every metric, families sorted by name and series by
    /// labels (the exporter's own order changes from one scrape to the next), then the process
    /// families (`process_*`).
    pub fn render(&self) -> String {
        let mut text = sorted(&self.handle.render());
        text.push_str(&process_families());
        text
    }

    /// Folds pending histogram samples so memory stays bounded between scrapes; the admin
    /// listener calls it periodically.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// How often histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `upkeep` (a registry's [`Registry::run_upkeep`]) every [`UPKEEP_INTERVAL`] until `stop`.
/// The exporter keeps each histogram sample until upkeep or a scrape folds it: an agent nobody
/// scrapes (no `admin:`) would otherwise grow by a sample per request, so the agent and the
/// gateway run this whether or not they serve `/metrics`.
pub async fn upkeep_until(upkeep: impl Fn() + Send, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => upkeep(),
        }
    }
}

/// `teeway_build_info{version,commit}`.
pub const BUILD_INFO: &str = "teeway_build_info";
/// `teeway_certificate_expiry_timestamp_seconds{cert}`.
pub const CERTIFICATE_EXPIRY: &str = "teeway_certificate_expiry_timestamp_seconds";

/// Families (blocks separated by a blank line) in name order; in each, the `#` lines first,
/// then the series ordered by their labels, `le` aside, so a histogram's buckets keep their
/// order and stay next to their `_sum` and `_count`.
fn sorted(text: &str) -> String {
    let mut families: Vec<(String, Vec<&str>)> = text
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut lines: Vec<&str> = block.lines().filter(|l| !l.is_empty()).collect();
            let name = lines
                .iter()
                .find_map(|l| l.strip_prefix("# TYPE "))
                .or_else(|| lines.first().copied())
                .unwrap_or("")
                .split([' ', '{'])
                .next()
                .unwrap_or("")
                .to_owned();
            let comments = lines.iter().take_while(|l| l.starts_with('#')).count();
            lines[comments..].sort_by_key(|l| series_key(l));
            (name, lines)
        })
        .collect();
    families.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::with_capacity(text.len() + 2);
    for (_, lines) in families {
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// A series line's labels without `le`: what orders the series of a family.
fn series_key(line: &str) -> String {
    let Some((_, rest)) = line.split_once('{') else {
        return String::new();
    };
    let labels = rest.split('}').next().unwrap_or("");
    labels
        .split(',')
        .filter(|l| !l.starts_with("le="))
        .collect::<Vec<_>>()
        .join(",")
}

/// The standard process families (Prometheus client conventions), read from `/proc/self` at each
/// scrape; empty where there is no `/proc`.
fn process_families() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return out;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // USER_HZ is 100 on every Linux ABI teeway builds for; pages are read from `statm` in bytes.
    const TICKS: f64 = 100.0;
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            );
        }
    };
    let cpu = field(14).zip(field(15)).map(|(u, s)| (u + s) / TICKS);
    family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent in seconds.",
        cpu,
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| kib * 1024.0)
        });
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        rss,
    );
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        fds,
    );
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        });
    family(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max_fds,
    );
    let start = field(22)
        .zip(boot_time())
        .map(|(ticks, boot)| boot + ticks / TICKS);
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        start,
    );
    out
}

/// The system's boot time, seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Labels whose values are known only at run time.
fn owned_labels(labels: &[(&'static str, String)]) -> Vec<Label> {
    labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect()
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::from_static_parts(k, v))
        .collect();
    Key::from_parts(name, labels)
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, None)
}

/// Sample values read back from Prometheus text: what a scraper would see.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot(BTreeMap<String, f64>);

impl Snapshot {
    /// Parses the text exposition format (comments skipped, labels kept in the series name).
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    samples.insert(series.to_owned(), v);
                }
            }
        }
        Self(samples)
    }

    /// The value of one series, written as Prometheus prints it: `name` or
    /// `name{label="value"}`. Absent: 0, as for a counter never incremented.
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// The sum over every label set of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.as_str() == name
                    || series
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum over the series of `name` that carry every `label="value"` pair of `labels`
    /// (other labels may vary): `sum_where(REPLAY_FAILED_TOTAL, &[("target", url)])`.
    pub fn sum_where(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series(name)
            .into_iter()
            .filter(|(series, _)| {
                labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every series of `name` with its value, labels included in the key.
    pub fn series(&self, name: &str) -> Vec<(&str, f64)> {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.as_str() == name
                    || series
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{'))
            })
            .map(|(s, v)| (s.as_str(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_independent_and_render_zero_counters() {
        let a = Registry::new();
        let b = Registry::new();
        let ca = a.counter("x_total", "help", &[("reason", "r1")]);
        let _cb = b.counter("x_total", "help", &[("reason", "r1")]);
        let _zero = a.counter("x_total", "help", &[("reason", "r2")]);
        ca.increment(3);
        let sa = Snapshot::parse(&a.render());
        let sb = Snapshot::parse(&b.render());
        assert_eq!(sa.get("x_total{reason=\"r1\"}"), 3.0);
        assert_eq!(sa.get("x_total{reason=\"r2\"}"), 0.0);
        assert_eq!(sa.sum("x_total"), 3.0);
        assert_eq!(sb.get("x_total{reason=\"r1\"}"), 0.0);
        assert!(a.render().contains("# HELP x_total help"));
    }

    #[test]
    fn histograms_render_buckets() {
        let r = Registry::new();
        let h = r.histogram("lat_seconds", "latency", &[]);
        h.record(0.003);
        let text = r.render();
        assert!(
            text.contains("lat_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert_eq!(Snapshot::parse(&text).get("lat_seconds_count"), 1.0);
    }
}

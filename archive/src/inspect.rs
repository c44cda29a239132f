//! The summary printed by `teeway archive inspect`: what an archive holds, and what in it could
//! not be read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use teeway_runtime::units::format_size;

use crate::har::iso8601;
use crate::read::{ReadStats, Reader};
use crate::Envelope;

/// Distinct paths counted one by one; past this, new paths are counted as `(other)`.
const MAX_DISTINCT_PATHS: usize = 10_000;
/// Paths listed in the summary.
const TOP_PATHS: usize = 10;
/// Distinct agents, taps, rules counted by name; past this, as `(other)`.
const MAX_DISTINCT_LABELS: usize = 100;
/// Distinct agent sessions counted.
const MAX_DISTINCT_SESSIONS: usize = 10_000;

/// What an archive holds.
#[derive(Debug, Default)]
pub struct Summary {
    /// Requests read.
    pub requests: u64,
    /// Responses read.
    pub responses: u64,
    /// Requests that carry production's answer (the agent's `mirror.capture_response`).
    pub with_production: u64,
    /// RPC requests read (Redis commands, Thrift and Dubbo calls).
    pub rpc_requests: u64,
    /// RPC requests by protocol, service and method.
    pub rpc_calls: BTreeMap<String, u64>,
    /// Records of kinds this teeway does not know (written by a newer one).
    pub other_kinds: u64,
    /// Earliest and latest record timestamps (ns since the epoch).
    pub span: Option<(u64, u64)>,
    /// Requests by method.
    pub methods: BTreeMap<String, u64>,
    /// Requests by path (without query).
    pub paths: HashMap<String, u64>,
    /// Requests whose path was not counted by name (too many distinct paths).
    pub other_paths: u64,
    /// Request body bytes, total.
    pub body_bytes: u64,
    /// Largest request body.
    pub max_body: u64,
    /// Requests whose body was cut at the agent's limit.
    pub truncated: u64,
    /// Requests by source cluster.
    pub clusters: BTreeMap<String, u64>,
    /// Requests by agent identity (from its certificate, as the gateway read it).
    pub agents: BTreeMap<String, u64>,
    /// Requests by the agent listener that saw them.
    pub taps: BTreeMap<String, u64>,
    /// Requests by the mirror rule that chose them.
    pub rules: BTreeMap<String, u64>,
    /// Agent processes (sessions) the requests came from, up to 10,000.
    pub sessions: HashSet<u64>,
    /// Requests without envelope metadata (no tap: archive format 1, an agent of protocol 4, a
    /// copy spooled before envelopes, a gor file): no session, tap or sampling.
    pub without_metadata: u64,
    /// What the reader counted and skipped.
    pub read: ReadStats,
}

impl Summary {
    /// Reads everything `reader` yields.
    pub fn of(mut reader: Reader) -> Self {
        let mut s = Summary::default();
        for record in reader.by_ref() {
            let at = record.unix_nanos();
            s.span = Some(match s.span {
                None => (at, at),
                Some((a, b)) => (a.min(at), b.max(at)),
            });
            match record {
                Envelope::HttpRequest(r) => {
                    s.requests += 1;
                    s.with_production += u64::from(r.production.is_some());
                    *s.methods.entry(r.method.to_string()).or_default() += 1;
                    *s.clusters
                        .entry(r.meta.source_cluster.to_string())
                        .or_default() += 1;
                    let path = r.uri.path();
                    if let Some(n) = s.paths.get_mut(path) {
                        *n += 1;
                    } else if s.paths.len() < MAX_DISTINCT_PATHS {
                        s.paths.insert(path.to_owned(), 1);
                    } else {
                        s.other_paths += 1;
                    }
                    s.body_bytes += r.body.len() as u64;
                    s.max_body = s.max_body.max(r.body.len() as u64);
                    s.truncated += u64::from(r.body_truncated);
                    let m = &r.meta;
                    // A tap is what every agent of protocol 5 or later names; gor files, archives of
                    // format 1 and agents of protocol 4 say nothing of it.
                    if m.tap.is_empty() {
                        s.without_metadata += 1;
                    } else {
                        if s.sessions.len() < MAX_DISTINCT_SESSIONS {
                            s.sessions.insert(m.session);
                        }
                        tally(&mut s.taps, &m.tap);
                        let rule = if m.sampling.rule.is_empty() {
                            "mirror.percentage"
                        } else {
                            &m.sampling.rule
                        };
                        tally(&mut s.rules, rule);
                    }
                    if !m.source_identity.is_empty() {
                        tally(&mut s.agents, &m.source_identity);
                    }
                }
                Envelope::HttpResponse(_) => s.responses += 1,
                Envelope::RpcRequest(r) => {
                    s.rpc_requests += 1;
                    let c = &r.call;
                    let call = if c.service.is_empty() {
                        format!("{} {}", c.protocol.name(), c.method)
                    } else {
                        format!("{} {}.{}", c.protocol.name(), c.service, c.method)
                    };
                    tally(&mut s.rpc_calls, &call);
                    *s.clusters
                        .entry(r.meta.source_cluster.to_string())
                        .or_default() += 1;
                }
                Envelope::Other { .. } => s.other_kinds += 1,
            }
        }
        s.read = reader.stats;
        s
    }

    /// The most frequent paths, most frequent first.
    pub fn top_paths(&self) -> Vec<(&str, u64)> {
        let mut paths: Vec<(&str, u64)> =
            self.paths.iter().map(|(p, n)| (p.as_str(), *n)).collect();
        paths.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        paths.truncate(TOP_PATHS);
        paths
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.read;
        if r.open_segments == 0 {
            writeln!(f, "files:      {}", r.files)?;
        } else {
            // A `.partial` segment is being written now, or was left by a crash and not yet
            // closed by a writer starting in its directory: the file cannot tell which.
            writeln!(
                f,
                "files:      {} ({} not closed: `.partial`, being written or left by a crash)",
                r.files, r.open_segments
            )?;
        }
        let rpc = if self.rpc_requests > 0 {
            format!(", {} rpc requests", self.rpc_requests)
        } else {
            String::new()
        };
        writeln!(
            f,
            "records:    {} ({} requests, {} responses{rpc})",
            self.requests + self.responses + self.rpc_requests + self.other_kinds,
            self.requests,
            self.responses
        )?;
        if self.with_production > 0 {
            writeln!(
                f,
                "            {} requests carry production's answer",
                self.with_production
            )?;
        }
        // Lines about HTTP say nothing of an archive of RPC copies alone.
        let http = self.requests + self.responses > 0 || self.rpc_requests == 0;
        if self.other_kinds > 0 {
            writeln!(
                f,
                "            {} of kinds this teeway does not know (written by a newer one)",
                self.other_kinds
            )?;
        }
        if let Some((first, last)) = self.span {
            let t = |ns: u64| iso8601(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns));
            let secs = (last - first) as f64 / 1e9;
            writeln!(f, "time span:  {} .. {} ({secs:.3} s)", t(first), t(last))?;
        }
        let listed = |map: &BTreeMap<String, u64>| {
            map.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if http {
            writeln!(f, "methods:    {}", listed(&self.methods))?;
        }
        if self.rpc_requests > 0 {
            writeln!(
                f,
                "rpc:        {} requests: {}",
                self.rpc_requests,
                listed(&self.rpc_calls)
            )?;
        }
        writeln!(f, "clusters:   {}", listed(&self.clusters))?;
        if !self.agents.is_empty() {
            writeln!(
                f,
                "agents:     {} (certificate identities)",
                listed(&self.agents)
            )?;
        }
        if !self.sessions.is_empty() {
            writeln!(
                f,
                "sessions:   {}{} agent process(es)",
                self.sessions.len(),
                if self.sessions.len() >= MAX_DISTINCT_SESSIONS {
                    "+"
                } else {
                    ""
                }
            )?;
            writeln!(f, "taps:       {}", listed(&self.taps))?;
            writeln!(f, "sampled by: {}", listed(&self.rules))?;
        }
        if self.without_metadata > 0 {
            writeln!(
                f,
                "            {} request(s) without envelope metadata (no session, tap or sampling rule: written before envelopes or by GoReplay, sent by an agent of protocol 4, or spooled before envelopes)",
                self.without_metadata
            )?;
        }
        if http {
            let mean = self.body_bytes.checked_div(self.requests).unwrap_or(0);
            writeln!(
                f,
                "bodies:     {} in all, mean {}, largest {}, {} truncated (by the agent's limit, or short of their Content-Length in a capture)",
                format_size(self.body_bytes),
                format_size(mean),
                format_size(self.max_body),
                self.truncated
            )?;
            writeln!(f, "top paths:")?;
            for (path, n) in self.top_paths() {
                writeln!(f, "  {n:>10}  {path}")?;
            }
            if self.other_paths > 0 {
                writeln!(
                    f,
                    "  {:>10}  (paths past the first {MAX_DISTINCT_PATHS} distinct)",
                    self.other_paths
                )?;
            }
        }
        writeln!(
            f,
            "skipped:    {} torn tail(s), {} corrupt record(s), {} unreadable part(s); {} out of order beyond the window",
            r.torn, r.corrupt, r.unreadable, r.reordered
        )?;
        for issue in &r.issues {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

/// Counts one more `key` in `map`, by name for the first [`MAX_DISTINCT_LABELS`] names.
fn tally(map: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_DISTINCT_LABELS {
        map.insert(key.to_owned(), 1);
    } else {
        *map.entry("(other)".to_owned()).or_default() += 1;
    }
}

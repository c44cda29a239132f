//! The mirror policy: which requests are copied, how they are sampled, and what is scrubbed from
//! a copy before it leaves production.
//!
//! A policy is immutable; a reload builds a new one and swaps it in whole (see
//! [`crate::Agent::reload_yaml`]), so a request is decided, redacted and size-limited under the one
//! policy that was in force when its head arrived.
//!
//! # Decision
//!
//! `mirror.rules` are tried in order; the first whose `match` holds decides, else the `mirror`
//! block's own `percentage` and `methods` do. A decision is a method allow-list and a sampling
//! fraction (or `off`). With `sample_by`, the draw is a hash of the request's key (a header or a
//! query parameter) instead of a random number: the same key always gets the same decision, on
//! every agent replica and across restarts, so one user's whole session is mirrored or none of
//! it. Requests without the key fall back to a random draw.
//!
//! # Redaction (a security guarantee)
//!
//! Before a copy is queued, every header named in `redact.headers` (always including
//! [`DEFAULT_REDACTED_HEADERS`] unless explicitly listed in `redact.pass`) and every query
//! parameter named in `redact.query` (always including [`DEFAULT_REDACTED_QUERY`], also in the
//! query of a `Referer`, unless listed in `redact.pass`) is removed, replaced by a
//! fixed marker, or replaced by a keyed hash (HMAC-SHA-256 with a secret read from a file,
//! truncated to 128 bits and hex-encoded), which keeps equality without revealing the value. The
//! primary always receives the request unchanged; only the copy is scrubbed.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use metrics::Counter;

use teeway_runtime::config::{self as cfg, Problems, Section};
use teeway_runtime::matching::{field_text, parse_method, Fields, RequestMatch};
use teeway_runtime::metrics::Registry;
use teeway_runtime::yaml::Value;

use crate::pace::Pace;

/// Requests matched by each rule (`rule="default"` for none).
pub const RULE_MATCHED_TOTAL: &str = "teeway_agent_rule_matched_total";

/// The share of each rule's sampled requests copied while the gateway sheds ([`Pace`]).
pub const PACE_RATIO: &str = "teeway_agent_mirror_pace_ratio";

/// The headers that never leave production unless `redact.pass` names them: the standard
/// credentials, and the de-facto ones API gateways, cloud SDKs, CSRF protection and OAuth
/// proxies carry.
pub const DEFAULT_REDACTED_HEADERS: [HeaderName; 15] = [
    http::header::AUTHORIZATION,
    http::header::COOKIE,
    http::header::SET_COOKIE,
    http::header::PROXY_AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-auth-token"),
    HeaderName::from_static("x-access-token"),
    HeaderName::from_static("x-refresh-token"),
    HeaderName::from_static("x-amz-security-token"),
    HeaderName::from_static("x-csrf-token"),
    HeaderName::from_static("x-xsrf-token"),
    HeaderName::from_static("x-forwarded-authorization"),
    HeaderName::from_static("x-forwarded-access-token"),
    HeaderName::from_static("x-vault-token"),
    HeaderName::from_static("x-goog-iap-jwt-assertion"),
];

/// Query parameters that never leave production unless `redact.pass` names them (matched
/// without regard to case): OAuth tokens, API keys, passwords, and the signatures of presigned
/// URLs (AWS SigV4, Azure SAS). Also scrubbed from the query of a `Referer` header.
pub const DEFAULT_REDACTED_QUERY: [&str; 14] = [
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "api_key",
    "apikey",
    "password",
    "passwd",
    "client_secret",
    "secret",
    "x-amz-security-token",
    "x-amz-signature",
    "x-amz-credential",
    "sig",
];
/// Default replacement text for `action: mask`.
pub const DEFAULT_MARKER: &str = "redacted";
/// Shortest accepted `hash_key_file` content.
const MIN_HASH_KEY_BYTES: usize = 16;

/// A sampling fraction, with at least per-million precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    /// A draw `d` (uniform over `u64`) is taken when `d < threshold`; `None` takes all.
    threshold: Option<u64>,
}

impl Fraction {
    /// `percentage` percent, 0 to 100; fractions allowed.
    pub fn percent(percentage: f64) -> Self {
        if percentage >= 100.0 {
            return Self { threshold: None };
        }
        let fraction = (percentage / 100.0).clamp(0.0, 1.0);
        // 2^64 * fraction in f64: 53 bits of precision, far below one in a million.
        Self {
            threshold: Some((fraction * 18_446_744_073_709_551_616.0) as u64),
        }
    }

    /// Nothing.
    pub const OFF: Fraction = Fraction { threshold: Some(0) };

    /// Whether the draw `d` is taken.
    pub fn takes(self, d: u64) -> bool {
        match self.threshold {
            None => true,
            Some(t) => d < t,
        }
    }
}

/// Why a request was copied: what its envelope says of the decision.
#[derive(Debug, Clone, Copy)]
pub struct Chosen<'a> {
    /// The rule that matched; `None`: none did (`mirror.percentage`).
    pub rule: Option<&'a Arc<str>>,
    /// The share of such requests copied.
    pub fraction: Fraction,
    /// The rule's pace, which the gateway's shedding lowers; `None` with
    /// `mirror.follow_shedding: false`.
    pub(crate) pace: Option<&'a Arc<Pace>>,
    /// Where the request fell in the share its rule copies, in parts per million: from its
    /// sampling key when it has one (so a paced rule keeps a key's requests together), else
    /// `None` (a random draw will do).
    pub(crate) position: Option<u32>,
}

impl Fraction {
    /// The share in parts per million, to the nearest (1,000,000: all; a share that takes
    /// anything is at least 1, as 0 means "not known" in an envelope).
    pub fn ppm(self) -> u32 {
        match self.threshold {
            None => 1_000_000,
            Some(0) => 0,
            Some(t) => (((u128::from(t) * 1_000_000) + (1 << 63)) >> 64).max(1) as u32,
        }
    }
}

/// What a matching request gets.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Share copied.
    pub fraction: Fraction,
    /// Methods copied; `None` copies every method.
    pub methods: Option<Vec<Method>>,
}

/// One `mirror.rules` entry.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `name`, or `rules[i]`; the `rule` label of [`RULE_MATCHED_TOTAL`], and what a copy's
    /// envelope names as the rule that chose it.
    pub name: Arc<str>,
    /// When it applies.
    pub matcher: RequestMatch,
    /// What it decides.
    pub decision: Decision,
    matched: Counter,
    pace: Arc<Pace>,
}

/// Where the consistent-sampling key is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleKey {
    /// A request header's value.
    Header(HeaderName),
    /// A query parameter's raw value.
    Query(String),
}

/// What to do with a sensitive value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedactAction {
    /// Remove the header or parameter.
    Remove,
    /// Replace the value with the marker.
    Mask,
    /// Replace the value with `hmac-sha256:<32 hex digits>` of it.
    Hash,
}

impl RedactAction {
    fn parse(v: &Value) -> Result<Self, String> {
        match cfg::string(v)?.as_str() {
            "remove" => Ok(Self::Remove),
            "mask" => Ok(Self::Mask),
            "hash" => Ok(Self::Hash),
            _ => Err("is not a redaction action".into()),
        }
    }

    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Remove => "remove",
            Self::Mask => "mask",
            Self::Hash => "hash",
        }
    }
}

/// `redact:`.
#[derive(Clone)]
pub struct Redaction {
    /// Headers and what happens to them.
    pub headers: Vec<(HeaderName, RedactAction)>,
    /// Query parameter names (matched exactly, before percent-decoding) and what happens to them.
    pub query: Vec<(String, RedactAction)>,
    marker: HeaderValue,
    key: Option<ring::hmac::Key>,
}

impl std::fmt::Debug for Redaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redaction")
            .field("headers", &self.headers)
            .field("query", &self.query)
            .field("marker", &self.marker)
            .field("key", &self.key.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Default for Redaction {
    fn default() -> Self {
        Self {
            headers: DEFAULT_REDACTED_HEADERS
                .iter()
                .map(|h| (h.clone(), RedactAction::Remove))
                .collect(),
            query: DEFAULT_REDACTED_QUERY
                .iter()
                .map(|q| ((*q).to_owned(), RedactAction::Remove))
                .collect(),
            marker: HeaderValue::from_static(DEFAULT_MARKER),
            key: None,
        }
    }
}

impl Redaction {
    /// Scrubs a copy's headers and request target. The primary's request is never touched.
    pub fn apply(&self, headers: &mut HeaderMap, uri: &Uri) -> Uri {
        self.apply_headers(headers);
        self.scrub_referer(headers);
        if self.query.is_empty() {
            return uri.clone();
        }
        self.scrub_query(uri)
    }

    /// The query of `Referer` (the page the request came from: often a URL with a token) gets
    /// the same scrubbing as the request's own, and its userinfo goes.
    fn scrub_referer(&self, headers: &mut HeaderMap) {
        self.scrub_url_header(headers, &http::header::REFERER);
    }

    /// Scrubs the URLs header `name` holds as a request's target is scrubbed: query parameters
    /// `redact.query` names, userinfo and fragment (an answer's `Location` can carry a
    /// presigned URL's credentials, or an OAuth redirect's token).
    pub fn scrub_url_header(&self, headers: &mut HeaderMap, name: &HeaderName) {
        if !headers.contains_key(name) {
            return;
        }
        // Every value, in order: a second one must not carry what the first does not.
        let values: Vec<Option<HeaderValue>> = headers
            .get_all(name)
            .iter()
            .map(|v| self.scrubbed_referer(v))
            .collect();
        headers.remove(name);
        for v in values.into_iter().flatten() {
            headers.append(name.clone(), v);
        }
    }

    /// One `Referer` value scrubbed; `None` when it cannot be (not text) and so does not leave.
    fn scrubbed_referer(&self, value: &HeaderValue) -> Option<HeaderValue> {
        let text = value.to_str().ok()?;
        let (without_fragment, fragment) = match text.split_once('#') {
            Some((a, f)) => (a, Some(f)),
            None => (text, None),
        };
        let (base, query) = match without_fragment.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (without_fragment, None),
        };
        let base = without_userinfo(base);
        let scrubbed = query.and_then(|q| self.scrubbed_query(q));
        if scrubbed.is_none() && fragment.is_none() && matches!(base, std::borrow::Cow::Borrowed(_))
        {
            return Some(value.clone());
        }
        let mut out = base.into_owned();
        if let Some(q) = scrubbed.or_else(|| query.map(str::to_owned)) {
            if !q.is_empty() {
                out.push('?');
                out.push_str(&q);
            }
        }
        // A fragment can carry tokens too (OAuth implicit flow): it does not leave.
        HeaderValue::from_str(&out).ok()
    }

    /// Scrubs a copy's header fields: its head, or its trailers (credentials can travel in
    /// either).
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        // Removal keeps the order of the rest: the shadow sees the fields as the primary did.
        teeway_runtime::proxy::remove_in_order(headers, |name| {
            self.headers
                .iter()
                .any(|(n, action)| n == name && matches!(action, RedactAction::Remove))
        });
        for (name, action) in &self.headers {
            match action {
                RedactAction::Remove => {}
                RedactAction::Mask | RedactAction::Hash => {
                    if let http::header::Entry::Occupied(mut entry) = headers.entry(name) {
                        let replaced: Vec<HeaderValue> = entry
                            .iter()
                            .map(|v| self.replacement(*action, v.as_bytes()))
                            .collect();
                        let mut values = replaced.into_iter();
                        if let Some(first) = values.next() {
                            entry.insert(first);
                        }
                        for v in values {
                            entry.append(v);
                        }
                    }
                }
            }
        }
    }

    fn replacement(&self, action: RedactAction, value: &[u8]) -> HeaderValue {
        match (action, &self.key) {
            (RedactAction::Hash, Some(key)) => {
                let tag = ring::hmac::sign(key, value);
                let mut text = String::from("hmac-sha256:");
                for b in &tag.as_ref()[..16] {
                    let _ = write!(text, "{b:02x}");
                }
                // Hex digits and a colon are always a valid header value.
                HeaderValue::from_str(&text).unwrap_or_else(|_| self.marker.clone())
            }
            // Config validation requires a key for `hash`; without one, mask (never leak).
            _ => self.marker.clone(),
        }
    }

    fn scrub_query(&self, uri: &Uri) -> Uri {
        let Some(query) = uri.query() else {
            return uri.clone();
        };
        let Some(out) = self.scrubbed_query(query) else {
            return uri.clone();
        };
        let path_and_query = if out.is_empty() {
            uri.path().to_owned()
        } else {
            format!("{}?{out}", uri.path())
        };
        let mut parts = uri.clone().into_parts();
        match PathAndQuery::try_from(path_and_query) {
            Ok(pq) => parts.path_and_query = Some(pq),
            // Cannot happen (only valid pieces are reassembled); if it did, drop the whole query
            // rather than risk sending a secret.
            Err(_) => parts.path_and_query = PathAndQuery::try_from(uri.path()).ok(),
        }
        Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
    }
}

impl Redaction {
    /// A query string with the parameters named in `redact.query` scrubbed (names compared
    /// without regard to case, after percent-decoding, so `Access_Token` and `access%5Ftoken`
    /// are the same parameter).
    fn scrubbed_query(&self, query: &str) -> Option<String> {
        // Every sampled copy with a query passes here (the defaults are never empty): nothing is
        // built unless some parameter is to be scrubbed.
        let pairs = || {
            query.split('&').map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (pair, name, value, self.query_action(name))
            })
        };
        if pairs().all(|(.., action)| action.is_none()) {
            // The query stays byte for byte (an empty `?` included).
            return None;
        }
        let mut out = String::with_capacity(query.len());
        for (pair, name, value, action) in pairs() {
            let piece = match action {
                None => pair.to_owned(),
                Some(RedactAction::Remove) => continue,
                Some(a) => {
                    let v = self.replacement(a, value.as_bytes());
                    format!("{name}={}", v.to_str().unwrap_or(DEFAULT_MARKER))
                }
            };
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&piece);
        }
        Some(out)
    }

    /// What happens to query parameter `name` (as written, percent-encoded or not).
    fn query_action(&self, name: &str) -> Option<RedactAction> {
        let decoded = teeway_runtime::proxy::percent_decode(name);
        self.query
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&decoded))
            .map(|(_, a)| *a)
    }
}

/// `scheme://user:pass@host/...` without `user:pass@`.
fn without_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]).into(),
        None => url.into(),
    }
}

/// What happens to a copy whose body is over `max_body_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// Not copied; counted as `body_too_large`.
    Skip,
    /// Copied with the first `max_body_bytes` bytes, flagged truncated; counted as truncated.
    Truncate,
}

/// The whole policy: decisions, sampling key, redaction and body limit.
#[derive(Debug, Clone)]
pub struct MirrorPolicy {
    /// Ordered rules.
    pub rules: Vec<Rule>,
    /// For requests no rule matches.
    pub default: Decision,
    /// Consistent-sampling key.
    pub sample_by: Option<SampleKey>,
    /// What is scrubbed.
    pub redaction: Redaction,
    /// Largest body copied.
    pub max_body_bytes: u64,
    /// Beyond it.
    pub over_limit: OverLimit,
    /// `mirror.follow_shedding`: copies of a rule the gateway sheds are made less often.
    pub follow_shedding: bool,
    /// `mirror.capture_response`: production's answer goes with each copy the proxy makes.
    pub capture_response: Option<Arc<CaptureResponse>>,
    default_matched: Option<Counter>,
    default_pace: Arc<Pace>,
    /// See [`MirrorPolicy::reads_proxied_fields`].
    reads_proxied_fields: bool,
}

/// The parts of `mirror:` and `redact:` read from a document, before metrics are attached.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// `mirror.percentage`: the share of requests no rule matches.
    pub percentage: f64,
    /// See [`MirrorPolicy::rules`]; counters are attached by [`PolicyConfig::build`].
    pub rules: Vec<(String, RequestMatch, Decision)>,
    /// See [`MirrorPolicy::default`].
    pub default: Decision,
    /// See [`MirrorPolicy::sample_by`].
    pub sample_by: Option<SampleKey>,
    /// See [`MirrorPolicy::redaction`].
    pub redaction: Redaction,
    /// See [`MirrorPolicy::max_body_bytes`].
    pub max_body_bytes: u64,
    /// See [`MirrorPolicy::over_limit`].
    pub over_limit: OverLimit,
    /// See [`MirrorPolicy::follow_shedding`].
    pub follow_shedding: bool,
    /// See [`MirrorPolicy::capture_response`].
    pub capture_response: Option<Arc<CaptureResponse>>,
}

/// `mirror.capture_response`: what of production's answer a copy carries, and how long it waits
/// for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureResponse {
    /// Largest answer body kept; a longer one is cut there and flagged.
    pub max_body_bytes: usize,
    /// Longest a copy waits, from the answer's head, for the answer to end; then the request
    /// goes alone.
    pub wait: Duration,
    /// Answer headers (and trailers) removed beside `set-cookie` and `redact.headers`.
    pub redact_headers: Vec<HeaderName>,
}

/// Default `mirror.capture_response.max_body_bytes`: the gateway's `compare.max_body`.
pub const DEFAULT_ANSWER_BODY_BYTES: u64 = 1024 * 1024;
/// Largest `mirror.capture_response.max_body_bytes`: with a request body of the protocol's
/// largest, the record stays within a frame.
pub const MAX_ANSWER_BODY_BYTES: u64 = 4 * 1024 * 1024;
/// Default `mirror.capture_response.wait`.
pub const DEFAULT_ANSWER_WAIT: Duration = Duration::from_secs(30);

impl CaptureResponse {
    /// `mirror.capture_response`, `None` when absent or `enabled: false`.
    fn read(m: &mut Section<'_>, p: &mut Problems) -> Option<Arc<Self>> {
        let mut c = m.section(p, "capture_response");
        if !c.is_present() {
            return None;
        }
        let enabled = c
            .optional(
                p,
                "enabled",
                "use true (send production's answer with each copy) or false (default)",
                cfg::boolean,
            )
            .unwrap_or(false);
        let max_body_bytes = c
            .optional(
                p,
                "max_body_bytes",
                "use a size from 1KiB to 4MiB, such as 1MiB",
                |v| match cfg::size(v)? {
                    n if n > MAX_ANSWER_BODY_BYTES => Err("must be at most 4MiB".into()),
                    // Smaller, every answer with a body would be cut, and cut answers are
                    // never compared.
                    n if n < 1024 => Err("must be at least 1KiB".into()),
                    n => Ok(n),
                },
            )
            .unwrap_or(DEFAULT_ANSWER_BODY_BYTES);
        let wait = c
            .optional(
                p,
                "wait",
                "use a duration from 100ms to 10m, such as 30s",
                cfg::duration_from_to("100ms", "10m"),
            )
            .unwrap_or(DEFAULT_ANSWER_WAIT);
        let redact_headers = c
            .list(
                p,
                "redact_headers",
                "list response header names such as [x-session-token]",
                |v| {
                    HeaderName::from_bytes(cfg::nonempty_string(v)?.trim().as_bytes())
                        .map_err(|_| "is not a header name".to_owned())
                },
            )
            .unwrap_or_default();
        c.finish(p);
        enabled.then(|| {
            Arc::new(Self {
                max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
                wait,
                redact_headers,
            })
        })
    }

    /// Scrubs an answer's headers or trailers: `set-cookie` always, then what `redaction`
    /// scrubs from requests, the query of `Location` and `Content-Location` as a request's,
    /// then this block's own names. Answer bodies leave as they are, as request bodies do.
    pub fn scrub(&self, redaction: &Redaction, headers: &mut HeaderMap) {
        headers.remove(http::header::SET_COOKIE);
        redaction.apply_headers(headers);
        for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
            redaction.scrub_url_header(headers, &name);
        }
        for name in &self.redact_headers {
            headers.remove(name);
        }
    }
}

impl PolicyConfig {
    /// Everything mirrored at `percentage`, default redaction.
    pub fn simple(percentage: f64, max_body_bytes: u64) -> Self {
        Self {
            percentage,
            rules: Vec::new(),
            default: Decision {
                fraction: Fraction::percent(percentage),
                methods: None,
            },
            sample_by: None,
            redaction: Redaction::default(),
            max_body_bytes,
            over_limit: OverLimit::Skip,
            follow_shedding: true,
            capture_response: None,
        }
    }

    /// See [`MirrorPolicy::reads_proxied_fields`].
    fn reads_proxied_fields(&self) -> bool {
        let by_rules = self
            .rules
            .iter()
            .flat_map(|(_, matcher, _)| matcher.headers.iter().map(|(name, _)| name));
        let by_key = match &self.sample_by {
            Some(SampleKey::Header(name)) => Some(name),
            _ => None,
        };
        by_rules
            .chain(by_key)
            .any(|name| PROXIED_FIELDS.contains(&name.as_str()))
    }

    /// The policy, with its per-rule counters registered in `registry` (or found there, after a
    /// reload).
    pub fn build(&self, registry: Option<&Registry>) -> MirrorPolicy {
        self.build_after(registry, None)
    }

    /// [`PolicyConfig::build`] for a reload: each rule keeps the pace of the rule of its name
    /// in `previous` (the default, the default's), so that a reload does not send a shedding
    /// gateway a burst of copies.
    pub fn build_after(
        &self,
        registry: Option<&Registry>,
        previous: Option<&MirrorPolicy>,
    ) -> MirrorPolicy {
        let counter = |name: &str| {
            registry.map(|r| {
                r.counter_owned(
                    RULE_MATCHED_TOTAL,
                    "Requests matched by each mirror rule (default: by none)",
                    "rule",
                    name,
                )
            })
        };
        let pace = |name: &str| {
            let kept = previous.and_then(|p| {
                if name == "default" {
                    return Some(&p.default_pace);
                }
                p.rules.iter().find(|r| &*r.name == name).map(|r| &r.pace)
            });
            if let Some(kept) = kept {
                return kept.clone();
            }
            let gauge = registry.map_or_else(metrics::Gauge::noop, |r| {
                r.gauge_owned(
                    PACE_RATIO,
                    "Share of each mirror rule's sampled requests copied: below 1 while the gateway sheds them (mirror.follow_shedding)",
                    &[("rule", name.to_owned())],
                )
            });
            Arc::new(Pace::new(name.into(), gauge))
        };
        MirrorPolicy {
            rules: self
                .rules
                .iter()
                .map(|(name, matcher, decision)| Rule {
                    name: name.as_str().into(),
                    matcher: matcher.clone(),
                    decision: decision.clone(),
                    matched: counter(name).unwrap_or_else(Counter::noop),
                    pace: pace(name),
                })
                .collect(),
            default: self.default.clone(),
            sample_by: self.sample_by.clone(),
            redaction: self.redaction.clone(),
            max_body_bytes: self.max_body_bytes,
            over_limit: self.over_limit,
            follow_shedding: self.follow_shedding,
            capture_response: self.capture_response.clone(),
            default_matched: counter("default"),
            default_pace: pace("default"),
            reads_proxied_fields: self.reads_proxied_fields(),
        }
    }

    /// Reads `mirror:` (already opened as `m`, whose `percentage` is `percentage`) and the root's
    /// `redact:`. Problems are recorded with their paths.
    pub fn read(
        m: &mut Section<'_>,
        root: &mut Section<'_>,
        p: &mut Problems,
        base_dir: &Path,
        percentage: f64,
        max_body_bytes: u64,
    ) -> Self {
        let default_methods = m.list(
            p,
            "methods",
            "give HTTP methods such as [GET, HEAD]",
            parse_method,
        );
        let sample_by = m.optional(
            p,
            "sample_by",
            "use header:NAME or query:NAME, such as header:x-user-id",
            parse_sample_key,
        );
        let over_limit = m
            .optional(
                p,
                "over_limit",
                "use skip (default) or truncate",
                |v| match cfg::string(v)?.as_str() {
                    "skip" => Ok(OverLimit::Skip),
                    "truncate" => Ok(OverLimit::Truncate),
                    _ => Err("is not an over-limit policy".into()),
                },
            )
            .unwrap_or(OverLimit::Skip);
        let follow_shedding = m
            .optional(
                p,
                "follow_shedding",
                "use true (default: make fewer copies of what the gateway sheds) or false",
                cfg::boolean,
            )
            .unwrap_or(true);
        let capture_response = CaptureResponse::read(m, p);
        let mut rules = Vec::new();
        for mut r in m.sections(p, "rules") {
            let named = r.optional(
                p,
                "name",
                "give a short name such as checkout",
                cfg::nonempty_string,
            );
            let unnamed = named.is_none();
            let name = named.unwrap_or_else(|| r.path().trim_start_matches("mirror.").to_owned());
            // A rule's name labels its metrics and keys its pace across reloads.
            if name == "default" || rules.iter().any(|(n, _, _)| *n == name) {
                let message = if unnamed {
                    format!("this rule has no name, and `{name}`, the one it gets, is taken by another rule")
                } else {
                    format!("`{name}` is taken (by another rule, or by `default`: requests no rule matches)")
                };
                p.push(
                    r.path_of("name"),
                    None,
                    message,
                    "give each rule a name of its own",
                );
            }
            let mut ms = r.section(p, "match");
            let matcher = RequestMatch::read(&mut ms, p);
            ms.finish(p);
            let fraction = r
                .required(
                    p,
                    "percentage",
                    "use a number from 0 to 100 (such as 5 or 0.01), or off",
                    |v| match v {
                        Value::String(s) if s == "off" => Ok(Fraction::OFF),
                        Value::Bool(false) => Ok(Fraction::OFF),
                        other => cfg::percentage(other).map(Fraction::percent),
                    },
                )
                .unwrap_or(Fraction::OFF);
            let methods = r.list(
                p,
                "methods",
                "give HTTP methods such as [GET, HEAD]",
                parse_method,
            );
            r.finish(p);
            rules.push((name, matcher, Decision { fraction, methods }));
        }
        let redaction = read_redaction(root, p, base_dir);
        Self {
            percentage,
            rules,
            default: Decision {
                fraction: Fraction::percent(percentage),
                methods: default_methods,
            },
            sample_by,
            redaction,
            max_body_bytes,
            over_limit,
            follow_shedding,
            capture_response,
        }
    }
}

impl MirrorPolicy {
    /// Whether the request is copied, and if so by which rule (`None`: by `mirror.percentage`)
    /// and at what rate. `draw` gives a uniform random `u64` when the request has no sampling
    /// key (a parameter so that tests can seed it).
    pub fn decide(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        draw: impl FnOnce() -> u64,
    ) -> Option<Chosen<'_>> {
        self.decide_on(method, Target::of(uri), headers, draw)
    }

    /// [`MirrorPolicy::decide`] on a request's parts: its target, and its fields however they
    /// are held.
    pub fn decide_on(
        &self,
        method: &Method,
        target: Target<'_>,
        fields: &impl Fields,
        draw: impl FnOnce() -> u64,
    ) -> Option<Chosen<'_>> {
        // The host is read only for rules to match it on.
        let host = if self.rules.is_empty() {
            None
        } else {
            target.host(fields)
        };
        let rule = self
            .rules
            .iter()
            .find(|r| r.matcher.matches(method, host, target.path, fields));
        let (decision, pace) = match rule {
            Some(rule) => {
                rule.matched.increment(1);
                (&rule.decision, &rule.pace)
            }
            None => {
                if let Some(c) = &self.default_matched {
                    c.increment(1);
                }
                (&self.default, &self.default_pace)
            }
        };
        if decision
            .methods
            .as_ref()
            .is_some_and(|m| !m.contains(method))
        {
            return None;
        }
        choose(
            rule.map(|r| &r.name),
            decision.fraction,
            self.follow_shedding.then_some(pace),
            || self.sample_key(&target, fields),
            draw,
        )
    }

    /// Whether deciding reads a field the proxy changes on the way to the primary (hop-by-hop
    /// fields, `x-forwarded-for`, `x-forwarded-proto`, `via`): a request must then be decided on
    /// its fields as the primary gets them, not as the client sent them.
    pub fn reads_proxied_fields(&self) -> bool {
        self.reads_proxied_fields
    }

    fn sample_key<'a>(&self, target: &Target<'a>, fields: &'a impl Fields) -> Option<&'a [u8]> {
        match self.sample_by.as_ref()? {
            SampleKey::Header(name) => fields.first(name),
            SampleKey::Query(name) => target.query?.split('&').find_map(|pair| {
                let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                (n == name).then_some(v.as_bytes())
            }),
        }
    }
}

/// The fields the proxy changes on the way to the primary: a rule reading one of them decides
/// on the primary's view of the request.
const PROXIED_FIELDS: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "via",
    "forwarded",
];

/// What a policy reads of a request's target.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The host of the URI's authority (HTTP/2, absolute-form); `None`: the `Host` field names it.
    pub authority: Option<&'a str>,
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without the `?`.
    pub query: Option<&'a str>,
}

impl<'a> Target<'a> {
    /// A URI's parts.
    pub fn of(uri: &'a Uri) -> Self {
        Self {
            authority: uri.authority().map(http::uri::Authority::host),
            path: uri.path(),
            query: uri.query(),
        }
    }

    /// An origin-form request target's parts (`/path?query`).
    pub fn origin_form(target: &'a str) -> Self {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        Self {
            authority: None,
            path: if path.is_empty() { "/" } else { path },
            query,
        }
    }

    /// The host the request names: the authority's, or the `Host` field's without its port.
    pub fn host(&self, fields: &'a impl Fields) -> Option<&'a str> {
        if let Some(host) = self.authority {
            return Some(host);
        }
        let host = field_text(fields.first(&http::header::HOST)?)?;
        if let Some(rest) = host.strip_prefix('[') {
            return rest.split_once(']').map(|(v6, _)| v6);
        }
        Some(match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        })
    }
}

/// The host a request names: its URI authority (HTTP/2, absolute-form) or its Host header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    Target::of(uri).host(headers)
}

/// The draw for a request that `rule` (`None`: the default) copies at `fraction`, under `pace`
/// (`None`: not following the gateway's shedding): `key` gives its sampling key, read only when
/// it decides (a fraction below all) or places the request for a pace below full; without one,
/// `draw` is random.
pub(crate) fn choose<'a, 'k>(
    rule: Option<&'a Arc<str>>,
    fraction: Fraction,
    pace: Option<&'a Arc<Pace>>,
    key: impl FnOnce() -> Option<&'k [u8]>,
    draw: impl FnOnce() -> u64,
) -> Option<Chosen<'a>> {
    if fraction == Fraction::OFF {
        return None;
    }
    let paced = pace.is_some_and(|p| !p.is_full());
    let key = if fraction.threshold.is_some() || paced {
        key().map(key_hash)
    } else {
        None
    };
    let d = match (key, fraction.threshold) {
        (Some(hash), _) => hash,
        (None, Some(_)) => draw(),
        (None, None) => 0,
    };
    if !fraction.takes(d) {
        return None;
    }
    // The draw's place below the threshold: uniform over the sampled share.
    let share = fraction.threshold.map_or(1u128 << 64, u128::from);
    let position = key.map(|_| (u128::from(d) * 1_000_000 / share.max(1)) as u32);
    Some(Chosen {
        rule,
        fraction,
        pace,
        position,
    })
}

/// A fixed, documented hash of a sampling key: FNV-1a 64 then the SplitMix64 finalizer (FNV
/// alone spreads short keys poorly in the high bits). Fixed forever: changing it would move
/// every user between sampled and not sampled across an upgrade.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn parse_sample_key(v: &Value) -> Result<SampleKey, String> {
    let s = cfg::nonempty_string(v)?;
    match s.split_once(':') {
        Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
            .map(SampleKey::Header)
            .map_err(|_| "names an invalid header".into()),
        Some(("query", name)) if !name.trim().is_empty() => {
            Ok(SampleKey::Query(name.trim().to_owned()))
        }
        _ => Err("is not header:NAME or query:NAME".into()),
    }
}

fn read_redaction(root: &mut Section<'_>, p: &mut Problems, base_dir: &Path) -> Redaction {
    let mut r = root.section(p, "redact");
    let default_action = r
        .optional(
            p,
            "action",
            "use remove (default), mask or hash",
            RedactAction::parse,
        )
        .unwrap_or(RedactAction::Remove);
    let marker = r
        .optional(
            p,
            "marker",
            "use letters, digits, dots, dashes or underscores, such as redacted",
            |v| {
                let s = cfg::nonempty_string(v)?;
                if !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
                {
                    return Err("must be safe in a header and a query string".into());
                }
                HeaderValue::from_str(&s).map_err(|_| "is not a valid header value".to_owned())
            },
        )
        .unwrap_or(HeaderValue::from_static(DEFAULT_MARKER));
    let entry = |v: &Value| -> Result<(String, Option<RedactAction>), String> {
        match v {
            Value::Mapping(map) => {
                let name = map
                    .get("name")
                    .ok_or("needs a `name`")
                    .and_then(|n| cfg::nonempty_string(n).map_err(|_| "needs a `name`"))?;
                let action = map.get("action").map(RedactAction::parse).transpose()?;
                if map
                    .keys()
                    .any(|k| !matches!(k.as_str(), Some("name" | "action")))
                {
                    return Err("has a key other than name and action".into());
                }
                Ok((name, action))
            }
            other => Ok((cfg::nonempty_string(other)?, None)),
        }
    };
    let entry_fix = "give a name, or { name: x-api-key, action: hash }";
    let listed_headers = r
        .list(p, "headers", entry_fix, |v| {
            let (name, action) = entry(v)?;
            let header = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| "is not a valid header name".to_owned())?;
            Ok((header, action))
        })
        .unwrap_or_default();
    let pass: Vec<String> = r
        .list(
            p,
            "pass",
            "list default-redacted headers or query parameters that may leave production, such as [cookie, token]",
            |v| {
                let name = cfg::nonempty_string(v)?.to_ascii_lowercase();
                let known = DEFAULT_REDACTED_HEADERS.iter().any(|h| h.as_str() == name)
                    || DEFAULT_REDACTED_QUERY.contains(&name.as_str());
                if known {
                    Ok(name)
                } else {
                    Err("is not one of the headers or query parameters redacted by default (README, Redaction)".to_owned())
                }
            },
        )
        .unwrap_or_default();
    let listed_query = r.list(p, "query", entry_fix, entry).unwrap_or_default();
    let mut query: Vec<(String, RedactAction)> = DEFAULT_REDACTED_QUERY
        .iter()
        .filter(|q| !pass.iter().any(|p| p == *q))
        .map(|q| ((*q).to_owned(), default_action))
        .collect();
    for (name, action) in listed_query {
        let action = action.unwrap_or(default_action);
        match query
            .iter_mut()
            .find(|(q, _)| q.eq_ignore_ascii_case(&name))
        {
            Some(existing) => existing.1 = action,
            None => query.push((name, action)),
        }
    }
    let key_path = r.path_of("hash_key_file");
    let key_given = r.get("hash_key_file").is_some();
    let key = r.optional(
        p,
        "hash_key_file",
        "give a file holding at least 16 secret bytes (for example from `head -c 32 /dev/urandom`)",
        |v| {
            let path = cfg::readable_file(base_dir)(v)?;
            let bytes = std::fs::read(&path).map_err(|e| format!("cannot be read: {e}"))?;
            if bytes.len() < MIN_HASH_KEY_BYTES {
                return Err(format!(
                    "holds {} bytes; a key needs at least {MIN_HASH_KEY_BYTES}",
                    bytes.len()
                ));
            }
            Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes))
        },
    );
    r.finish(p);

    let mut headers: Vec<(HeaderName, RedactAction)> = DEFAULT_REDACTED_HEADERS
        .iter()
        .filter(|h| !pass.iter().any(|p| p == h.as_str()))
        .map(|h| (h.clone(), default_action))
        .collect();
    for (name, action) in listed_headers {
        let action = action.unwrap_or(default_action);
        match headers.iter_mut().find(|(h, _)| *h == name) {
            Some(existing) => existing.1 = action,
            None => headers.push((name, action)),
        }
    }
    let hashes = headers
        .iter()
        .map(|(_, a)| *a)
        .chain(query.iter().map(|(_, a)| *a))
        .any(|a| a == RedactAction::Hash);
    if hashes && !key_given {
        p.push(
            key_path,
            None,
            "is required when a header or parameter is redacted with `hash`",
            "give a file holding at least 16 secret bytes, or use remove or mask",
        );
    }
    Redaction {
        headers,
        query,
        marker,
        key,
    }
}

/// A policy read from an agent document's `mirror:` and `redact:` (`percentage` 100 unless
/// given, `max_body_bytes` 1 KiB), for tests.
#[cfg(test)]
pub(crate) fn test_policy(yaml: &str) -> Result<MirrorPolicy, String> {
    tests::policy(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn policy(yaml: &str) -> Result<MirrorPolicy, String> {
        let doc = teeway_runtime::yaml::parse(yaml).expect("yaml");
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);
        let mut m = root.section(&mut p, "mirror");
        let pct = m
            .optional(&mut p, "percentage", "", cfg::percentage)
            .unwrap_or(100.0);
        let config = PolicyConfig::read(&mut m, &mut root, &mut p, Path::new("."), pct, 1024);
        m.finish(&mut p);
        root.finish(&mut p);
        p.finish(config.build(None)).map_err(|e| e.to_string())
    }

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> (Method, Uri, HeaderMap) {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        (method, uri.parse().expect("uri"), h)
    }

    #[test]
    fn sampling_rates_in_parts_per_million() {
        assert_eq!(Fraction::percent(100.0).ppm(), 1_000_000);
        assert_eq!(Fraction::percent(30.0).ppm(), 300_000);
        assert_eq!(Fraction::percent(0.1).ppm(), 1_000);
        assert_eq!(
            Fraction::percent(0.00001).ppm(),
            1,
            "anything at all is not 'not known'"
        );
        assert_eq!(Fraction::OFF.ppm(), 0);
    }

    fn decide(p: &MirrorPolicy, r: &(Method, Uri, HeaderMap), d: u64) -> bool {
        p.decide(&r.0, &r.1, &r.2, || d).is_some()
    }

    #[test]
    fn rule_names_are_unique_and_not_default() {
        for (yaml, path) in [
            (
                "mirror: { rules: [ { name: a, percentage: 1 }, { name: a, percentage: 2 } ] }",
                "mirror.rules[1].name",
            ),
            (
                "mirror: { rules: [ { name: default, percentage: 1 } ] }",
                "mirror.rules[0].name",
            ),
        ] {
            let error = policy(yaml).expect_err(yaml);
            assert!(
                error.contains(path) && error.contains("is taken"),
                "{error}"
            );
        }
        assert!(
            policy("mirror: { rules: [ { name: a, percentage: 1 }, { percentage: 2 } ] }").is_ok()
        );
    }

    #[test]
    fn first_matching_rule_decides_and_default_applies_otherwise() {
        let p = policy(
            "mirror:
  percentage: 100
  rules:
    - name: health
      match: { path: /healthz }
      percentage: off
    - match: { path_prefix: /api, headers: { x-canary: \"^yes$\" } }
      percentage: 100
      methods: [GET, HEAD]
    - match: { path_prefix: /api }
      percentage: 0
",
        )
        .expect("valid");
        assert_eq!(&*p.rules[1].name, "rules[1]");
        let any = u64::MAX - 1;
        assert!(!decide(&p, &req(Method::GET, "/healthz", &[]), 0));
        assert!(decide(
            &p,
            &req(Method::GET, "/api/x", &[("x-canary", "yes")]),
            any
        ));
        assert!(!decide(
            &p,
            &req(Method::POST, "/api/x", &[("x-canary", "yes")]),
            0
        ));
        assert!(!decide(&p, &req(Method::GET, "/api/x", &[]), 0));
        assert!(decide(&p, &req(Method::DELETE, "/other", &[]), any));
    }

    #[test]
    fn percentage_is_accurate_to_a_millionth() {
        let f = Fraction::percent(0.0001); // one in a million
        let t = f.threshold.expect("threshold");
        let expected = 18_446_744_073_709_551_616.0 / 1_000_000.0;
        assert!((t as f64 - expected).abs() / expected < 1e-9);
        assert!(Fraction::percent(100.0).takes(u64::MAX));
        assert!(!Fraction::OFF.takes(0));
    }

    #[test]
    fn seeded_sampling_hits_the_percentage() {
        let p = policy("mirror: { percentage: 12.5 }").expect("valid");
        let r = req(Method::GET, "/", &[]);
        let mut rng = fastrand::Rng::with_seed(42);
        let n = 400_000;
        let hits = (0..n).filter(|_| decide(&p, &r, rng.u64(..))).count() as f64;
        // Binomial: mean 50,000, sd = sqrt(n p (1-p)) ~ 209; 5 sd.
        assert!((hits - 50_000.0).abs() < 5.0 * 209.2, "hits {hits}");
    }

    #[test]
    fn consistent_sampling_is_a_function_of_the_key() {
        let yaml = "mirror: { percentage: 30, sample_by: \"header:x-user\" }";
        // Two independently built policies: two agent replicas, or one agent before and after
        // a restart.
        let (a, b) = (policy(yaml).expect("valid"), policy(yaml).expect("valid"));
        let mut taken = 0;
        for user in 0..20_000 {
            let r = req(Method::GET, "/", &[("x-user", &format!("user-{user}"))]);
            // The random draw must not matter when the key is present.
            let first = decide(&a, &r, 0);
            assert_eq!(first, decide(&a, &r, u64::MAX));
            assert_eq!(first, decide(&b, &r, 12345));
            taken += usize::from(first);
        }
        // The hash spreads keys evenly: 30% within 5 sd (sd ~ 65).
        assert!((taken as f64 - 6_000.0).abs() < 325.0, "taken {taken}");
        // The hash is fixed: a known key keeps its decision across releases.
        // (Value computed independently from the documented algorithm.)
        assert_eq!(key_hash(b"user-1"), 0xc499_b5f8_a721_df58);
        let q = policy("mirror: { percentage: 50, sample_by: \"query:session\" }").expect("valid");
        let with = req(Method::GET, "/a?x=1&session=abc", &[]);
        let same = req(Method::POST, "/b?session=abc", &[]);
        assert_eq!(decide(&q, &with, 0), decide(&q, &same, u64::MAX));
    }

    #[test]
    fn redaction_removes_masks_and_hashes() {
        let dir = tempfile_dir("redact");
        std::fs::write(dir.join("key"), b"0123456789abcdef0123456789abcdef").expect("key");
        let doc = teeway_runtime::yaml::parse(
            "redact:
  headers: [x-api-key, { name: cookie, action: hash }]
  query: [token, { name: email, action: hash }, { name: sig, action: mask }]
  hash_key_file: key
",
        )
        .expect("yaml");
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);
        let r = read_redaction(&mut root, &mut p, &dir);
        root.finish(&mut p);
        p.finish(()).expect("valid");
        let (_, uri, mut h) = req(
            Method::GET,
            "/p?token=s3cret&a=1&email=a%40b.c&sig=xyz",
            &[
                ("authorization", "Bearer s3cret"),
                ("cookie", "sid=1"),
                ("x-api-key", "k"),
                ("x-keep", "v"),
            ],
        );
        let scrubbed = r.apply(&mut h, &uri);
        assert!(h.get("authorization").is_none());
        assert!(h.get("x-api-key").is_none());
        assert_eq!(h.get("x-keep").map(HeaderValue::as_bytes), Some(&b"v"[..]));
        let cookie = h.get("cookie").expect("hashed").to_str().expect("text");
        assert!(
            cookie.starts_with("hmac-sha256:") && cookie.len() == 12 + 32,
            "{cookie}"
        );
        assert!(!cookie.contains("sid"));
        // Equal values hash equal, so a shadow can still correlate.
        let mut again = HeaderMap::new();
        again.insert("cookie", HeaderValue::from_static("sid=1"));
        r.apply(&mut again, &uri);
        assert_eq!(again.get("cookie"), h.get("cookie"));
        let q = scrubbed.query().expect("query");
        assert!(!q.contains("s3cret") && !q.contains("token"), "{q}");
        assert!(q.starts_with("a=1&email=hmac-sha256:"), "{q}");
        assert!(q.ends_with("&sig=redacted"), "{q}");
        assert_eq!(scrubbed.path(), "/p");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn default_credentials_leave_neither_headers_nor_query_nor_referer() {
        let r = Redaction::default();
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-api-key", "k1"),
            ("X-Auth-Token", "t1"),
            ("x-amz-security-token", "s1"),
            ("x-csrf-token", "c1"),
            ("x-forwarded-authorization", "Bearer f1"),
            (
                "referer",
                "https://u:pw1@app.example.com/cb?code=7&access_token=r1&x=1#id_token=h1",
            ),
            ("x-kept", "visible"),
        ] {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_static(value),
            );
        }
        let uri = Uri::from_static(
            "/p?access_token=a1&api_key=a2&Token=a3&password=a4&access%5Ftoken=a5&X-Amz-Signature=a6&page=2",
        );
        let scrubbed = r.apply(&mut headers, &uri);
        assert_eq!(scrubbed.query(), Some("page=2"), "{scrubbed}");
        assert_eq!(
            headers["referer"], "https://app.example.com/cb?code=7&x=1",
            "query tokens, userinfo and the fragment go"
        );
        assert_eq!(headers["x-kept"], "visible");
        // Two Referer values: each scrubbed, in order.
        let mut two = HeaderMap::new();
        two.append("referer", HeaderValue::from_static("https://a.example/"));
        two.append(
            "referer",
            HeaderValue::from_static("https://b.example/?access_token=t2&q=1"),
        );
        r.apply(&mut two, &Uri::from_static("/"));
        let values: Vec<&str> = two
            .get_all("referer")
            .iter()
            .map(|v| v.to_str().expect("text"))
            .collect();
        assert_eq!(values, ["https://a.example/", "https://b.example/?q=1"]);
        let all = format!("{headers:?}");
        for secret in ["k1", "t1", "s1", "c1", "f1", "pw1", "r1", "h1"] {
            assert!(!all.contains(secret), "{secret} left in {all}");
        }
    }

    #[test]
    fn defaults_always_apply_unless_passed() {
        let p = policy(
            "redact: { headers: [x-api-key, x-custom], pass: [cookie, x-csrf-token, token] }",
        )
        .expect("valid");
        let names: Vec<&str> = p
            .redaction
            .headers
            .iter()
            .map(|(h, _)| h.as_str())
            .collect();
        let defaults = DEFAULT_REDACTED_HEADERS;
        let expected: Vec<&str> = defaults
            .iter()
            .map(HeaderName::as_str)
            .filter(|h| !["cookie", "x-csrf-token"].contains(h))
            .chain(["x-custom"])
            .collect();
        assert_eq!(
            names, expected,
            "passed ones go, listed ones are added once"
        );
        let queries: Vec<&str> = p.redaction.query.iter().map(|(q, _)| q.as_str()).collect();
        assert!(
            queries.contains(&"access_token") && !queries.contains(&"token"),
            "{queries:?}"
        );
        let err = policy("redact: { action: hash, pass: [x-other] }").expect_err("invalid");
        assert!(
            err.contains(
                "redact.pass[0]: is not one of the headers or query parameters redacted by default"
            ),
            "{err}"
        );
        assert!(err.contains("redact.hash_key_file: is required"), "{err}");
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("teeway-policy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }
}

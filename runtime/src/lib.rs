//! Process plumbing shared by the teeway agent and gateway.
//!
//! Everything here does I/O or owns process-wide concerns, which is why it is not in the sans-IO
//! `teeway-wire` crate: the agent and the gateway both need it, and neither should depend on the
//! other.
//!
//! # Layout
//!
//! - [`config`]: reading a YAML document into a typed configuration while collecting every
//!   problem (field path, bad value, fix) instead of stopping at the first.
//! - [`yaml`]: the one function that parses YAML.
//! - [`units`]: sizes (`1MiB`) and durations (`5s`) as configuration strings.
//! - [`metrics`]: a per-instance metrics registry rendered as Prometheus text.
//! - [`admin`]: the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`build`]: version and commit of the binary.
//! - [`dns`]: name resolution with hickory-resolver.
//! - [`connect`]: a hyper connector that dials one configured upstream.
//! - [`proxy`]: HTTP proxy hygiene shared by the agent (to the primary) and the gateway (to
//!   shadows).
//! - [`shutdown`]: SIGTERM / SIGINT as a cancellation token.
//! - [`logging`]: throttled summaries for events that can repeat at request rate.
//! - [`reload`]: live configuration (and certificate) reload.
//! - [`matching`]: request matchers shared by agent rules and gateway routes.

pub mod admin;
pub mod build;
pub mod config;
pub mod connect;
pub mod dns;
pub mod logging;
pub mod matching;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod shutdown;
pub mod units;
pub mod yaml;

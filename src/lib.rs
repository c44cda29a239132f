//! teeway: cross-cluster traffic mirroring. This crate is the `teeway` binary's library half:
//! the commands that are more than a call into the agent or gateway crates, and the in-process
//! stack that the demo and the end-to-end tests share.
//!
//! # Layout
//!
//! - [`archive_cmd`]: `teeway archive inspect` and `teeway archive convert`.
//! - [`certs`]: `teeway certs init`.
//! - [`check`]: `teeway check`, the same validation the servers run.
//! - [`demo`]: `teeway demo`.
//! - [`replay`]: `teeway replay`.
//! - [`stack`]: an agent and a gateway wired together in one process on loopback.
//! - [`sample`]: a sample primary and a recording shadow.
//!
//! The workspace's other crates: `teeway-wire` (protocol, TLS), `teeway-runtime` (config reading,
//! admin, DNS), `teeway-archive` (archive formats, readers, writer), `teeway-agent` and `teeway-gateway`. Errors here use `anyhow`: these are
//! commands, whose errors are printed to an operator, not matched on.

pub mod archive_cmd;
pub mod certs;
pub mod check;
pub mod demo;
pub mod replay;
pub mod sample;
pub mod stack;

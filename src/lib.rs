//! teeway: cross-cluster traffic mirroring. This crate is the `teeway` binary's library half:
//! the commands that are more than a call into the agent or gateway crates, and the in-process
//! stack that the demo and the end-to-end tests share.
//!
//! # Layout
//!
//! - [`archive_cmd`]: `teeway archive inspect|verify|convert`.
//! - [`certs`]: `teeway certs init|issue`.
//! - [`check`]: `teeway check`, the same validation the servers run.
//! - [`demo`]: `teeway demo`.
//! - [`replay`]: `teeway replay`.
//! - [`stack`]: an agent and a gateway wired together in one process on loopback.
//! - [`sample`]: a sample primary and a recording shadow.
//!
//! The workspace's other crates: `teeway-wire` (protocol, TLS), `teeway-runtime` (config reading,
//! admin, DNS), `teeway-archive` (archive formats, readers, writer), `teeway-agent` and
//! `teeway-gateway`. Errors here use `anyhow`: these are commands, whose errors are printed to
//! an operator; one kind is told apart, [`Usage`], the command line asking for something
//! impossible (exit code 2, as opposed to 1 for a command that ran and failed).

pub mod archive_cmd;
pub mod certs;
pub mod check;
pub mod demo;
pub mod diff;
pub mod replay;
pub mod sample;
pub mod stack;

/// The command line asks for something impossible (a bad flag value, a missing name): nothing
/// was done. `teeway` exits 2 for it, as clap does for what it checks itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// An [`anyhow::Error`] for a bad command line.
pub fn usage(text: impl Into<String>) -> anyhow::Error {
    Usage(text.into()).into()
}

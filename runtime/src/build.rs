//! What the binary is: its version and the commit it was built from (see `runtime/build.rs`).

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit built, 12 hex digits, or `unknown` (no git and no `TEEWAY_COMMIT` at build time).
pub const COMMIT: &str = env!("TEEWAY_COMMIT");
/// `0.1.0 (commit 0123456789ab)`: what `teeway --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TEEWAY_COMMIT"),
    ")"
);

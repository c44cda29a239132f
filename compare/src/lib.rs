//! teeway's comparison of shadow responses, sans-IO: what the gateway (and `teeway diff`) use
//! to find how a new version answers differently from the last known-good one.
//!
//! - [`endpoint`]: a request's method and path template (`GET /users/{id}`), what differences are
//!   counted and shown by.
//! - [`body`]: response bodies decoded and read as JSON, text, gRPC messages or bytes.
//! - [`json`]: structural differences between JSON documents, as field paths
//!   (`/data/items/*/price`); [`path`]: the paths and the patterns configuration names fields by.
//! - [`response`]: two responses compared whole (status, selected headers, body).
//! - [`noise`]: per endpoint and field, how often the candidate differs from the primary beside
//!   how often two known-good versions differ from each other; what is noise, what is not.
//!
//! Nothing here does I/O, keeps a clock or grows without a bound its caller sets.

pub mod body;
pub mod endpoint;
pub mod json;
pub mod noise;
pub mod path;
pub mod response;

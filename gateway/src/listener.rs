//! The two agent listeners: [`quic`] (QUIC, the default) and [`tls`] (TLS over TCP, for networks
//! that block UDP). Both accept agents by client certificate, speak the frames of
//! `docs/protocol.md`, and hand every batch to the [`Dispatcher`](crate::dispatch::Dispatcher).

pub(crate) mod quic;
pub(crate) mod tls;

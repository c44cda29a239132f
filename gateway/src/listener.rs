//! The two agent listeners: [`quic`] (QUIC, the default) and [`tls`] (TLS over TCP, for networks
//! that block UDP). Both accept agents by client certificate, speak the frames of
//! `docs/protocol.md`, and hand every batch to the [`Dispatcher`](crate::dispatch::Dispatcher).

pub(crate) mod quic;
pub(crate) mod tls;

use teeway_wire::{Envelope, Frame};

/// The record a batch frame carries on a connection of protocol `version`: an `ENVELOPE` from
/// version 5 on, a `REQUEST` before (an HTTP request with the metadata protocol 4 had). Any
/// other frame, or one of the other version, is handed back: it is out of place in a batch.
// The frame is handed back as it came (a move, only when a batch is out of place).
#[allow(clippy::result_large_err)]
pub(crate) fn record(frame: Frame, version: u16) -> Result<Envelope, Frame> {
    if !is_record(&frame, version) {
        return Err(frame);
    }
    match frame {
        Frame::Envelope(envelope) => Ok(envelope),
        Frame::Request(request) => Ok(Envelope::HttpRequest(request)),
        other => Err(other),
    }
}

/// Whether `frame` is a record on a connection of protocol `version` (see [`record`]).
pub(crate) fn is_record(frame: &Frame, version: u16) -> bool {
    match frame {
        Frame::Envelope(_) => version >= 5,
        Frame::Request(_) => version < 5,
        _ => false,
    }
}

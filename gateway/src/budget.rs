//! Memory for what agents send, bounded against an agent that holds a valid certificate.
//!
//! A certificate proves who an agent is, not that it behaves: a buggy or hostile one can open
//! thousands of streams, announce 16 MiB frames on each and send a byte a second. Everything
//! the gateway buffers from agents before dispatch (the bytes of a batch stream not yet complete,
//! the records of a TLS batch not yet closed by `END`) is therefore taken from three byte
//! budgets: the whole gateway's (`limits.buffer_bytes`), the agent identity's
//! (`limits.identity_buffer_bytes`, so one identity cannot take it all) and
//! the connection's (`limits.connection_buffer_bytes`). A stream whose
//! next bytes do not fit is reset ([`teeway_wire::codes::OVERLOADED`]) and its bytes given back
//! at once; nothing waits for budget, so budget never deadlocks. A batch must also arrive whole
//! within `limits.stream_timeout`, and an identity may hold at most
//! `limits.connections_per_identity` connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest stream (or, over TLS, batch) accepted: a full batch plus one maximal frame (a batch
/// stops growing once it reaches `MAX_BATCH_BYTES`, so its last record may pass that mark).
pub const MAX_STREAM_BYTES: usize =
    teeway_wire::MAX_BATCH_BYTES + teeway_wire::MAX_FRAME_LEN as usize + 4;

/// Default `limits.buffer_bytes`: bytes buffered from all agents at once.
pub const DEFAULT_BUFFER_BYTES: u64 = 128 * 1024 * 1024;
/// Default `limits.identity_buffer_bytes`: half the gateway's, so one identity leaves room.
pub const DEFAULT_IDENTITY_BUFFER_BYTES: u64 = 64 * 1024 * 1024;
/// Default `limits.connection_buffer_bytes`: a little over one largest stream.
pub const DEFAULT_CONNECTION_BUFFER_BYTES: u64 = 32 * 1024 * 1024;
/// Default `limits.streams_per_connection` (QUIC concurrent streams).
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 4096;
/// Default `limits.connections_per_identity`: agent pods of one cluster share an identity.
pub const DEFAULT_CONNECTIONS_PER_IDENTITY: usize = 512;
/// Default `limits.stream_timeout`: a batch arrives whole within it (agents give up after 15 s).
pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The gateway's `limits:` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes buffered from all agents at once.
    pub buffer_bytes: u64,
    /// Bytes buffered from the connections of one agent identity at once.
    pub identity_buffer_bytes: u64,
    /// Bytes buffered from one connection at once.
    pub connection_buffer_bytes: u64,
    /// Streams one QUIC connection may have open at once.
    pub streams_per_connection: u32,
    /// Connections one agent identity may hold at once.
    pub connections_per_identity: usize,
    /// Time for one batch (stream, or TLS batch) to arrive whole.
    pub stream_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            identity_buffer_bytes: DEFAULT_IDENTITY_BUFFER_BYTES,
            connection_buffer_bytes: DEFAULT_CONNECTION_BUFFER_BYTES,
            streams_per_connection: DEFAULT_STREAMS_PER_CONNECTION,
            connections_per_identity: DEFAULT_CONNECTIONS_PER_IDENTITY,
            stream_timeout: DEFAULT_STREAM_TIMEOUT,
        }
    }
}

/// Semaphore permits are counted in `u32` per acquisition, and the total must stay under
/// tokio's `Semaphore::MAX_PERMITS`.
fn permits(bytes: u64) -> usize {
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// An identity's connections and its byte budget.
type IdentityShare = (usize, Arc<Semaphore>);

/// The gateway's budget: shared by every connection.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    global: Arc<Semaphore>,
    /// Connections and byte budget per identity (while it has connections).
    identities: Mutex<HashMap<Arc<str>, IdentityShare>>,
    /// `teeway_gateway_buffered_bytes`.
    buffered: Gauge,
}

/// Why a connection was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections {
    /// The limit in force.
    pub limit: usize,
}

impl Budget {
    /// A budget of `limits`, reporting bytes in use on `buffered`.
    pub fn new(limits: Limits, buffered: Gauge) -> Arc<Self> {
        Arc::new(Self {
            limits,
            global: Arc::new(Semaphore::new(permits(limits.buffer_bytes))),
            identities: Mutex::new(HashMap::new()),
            buffered,
        })
    }

    /// A connection's share for `identity`, or a refusal when the identity holds its limit of
    /// connections already. The share counts the connection until dropped.
    pub fn connection(
        self: &Arc<Self>,
        identity: &Arc<str>,
    ) -> Result<ConnectionBudget, TooManyConnections> {
        let mut identities = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        let (connections, shared) = identities.entry(identity.clone()).or_insert_with(|| {
            (
                0,
                Arc::new(Semaphore::new(permits(self.limits.identity_buffer_bytes))),
            )
        });
        if *connections >= self.limits.connections_per_identity {
            return Err(TooManyConnections {
                limit: self.limits.connections_per_identity,
            });
        }
        *connections += 1;
        Ok(ConnectionBudget {
            budget: self.clone(),
            identity: identity.clone(),
            shared: shared.clone(),
            own: Arc::new(Semaphore::new(permits(self.limits.connection_buffer_bytes))),
        })
    }
}

/// One connection's share of the budget.
#[derive(Debug)]
pub struct ConnectionBudget {
    budget: Arc<Budget>,
    identity: Arc<str>,
    /// The identity's budget, shared by its connections.
    shared: Arc<Semaphore>,
    own: Arc<Semaphore>,
}

impl ConnectionBudget {
    /// An empty holding, grown as bytes arrive.
    pub fn hold(&self) -> Held {
        Held {
            budget: self.budget.clone(),
            own: self.own.clone(),
            shared: self.shared.clone(),
            permits: None,
            bytes: 0,
        }
    }

    /// The time a batch has to arrive whole.
    pub fn stream_timeout(&self) -> Duration {
        self.budget.limits.stream_timeout
    }
}

impl Drop for ConnectionBudget {
    fn drop(&mut self) {
        let mut identities = self
            .budget
            .identities
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((connections, _)) = identities.get_mut(&self.identity) {
            *connections = connections.saturating_sub(1);
            if *connections == 0 {
                identities.remove(&self.identity);
            }
        }
    }
}

/// Bytes held from both budgets for one stream or batch; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    own: Arc<Semaphore>,
    shared: Arc<Semaphore>,
    /// Permits of the connection, the identity and the gateway.
    permits: Option<[OwnedSemaphorePermit; 3]>,
    bytes: u64,
}

impl Held {
    /// Takes `bytes` more from the connection's and the gateway's budgets, both or neither;
    /// false when either is short (the caller refuses the stream).
    pub fn grow(&mut self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(bytes) else {
            return false;
        };
        // All three or none: a permit taken is given back when a later one is short.
        let Ok(own) = self.own.clone().try_acquire_many_owned(n) else {
            return false;
        };
        let Ok(shared) = self.shared.clone().try_acquire_many_owned(n) else {
            return false;
        };
        let Ok(global) = self.budget.global.clone().try_acquire_many_owned(n) else {
            return false;
        };
        match &mut self.permits {
            Some(held) => {
                for (held, more) in held.iter_mut().zip([own, shared, global]) {
                    held.merge(more);
                }
            }
            None => self.permits = Some([own, shared, global]),
        }
        self.bytes += u64::from(n);
        self.budget.buffered.increment(f64::from(n));
        true
    }

    /// Gives `bytes` back (at most what is held): the part of a buffer that was consumed.
    pub fn shrink(&mut self, bytes: usize) {
        let n = bytes.min(usize::try_from(self.bytes).unwrap_or(usize::MAX));
        if n == 0 {
            return;
        }
        if let Some(held) = &mut self.permits {
            for permit in held.iter_mut() {
                drop(permit.split(n));
            }
        }
        self.bytes -= n as u64;
        self.budget.buffered.decrement(n as f64);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.buffered.decrement(self.bytes as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: u64, per_connection: u64, per_identity: usize) -> Arc<Budget> {
        Budget::new(
            Limits {
                buffer_bytes: total,
                identity_buffer_bytes: total,
                connection_buffer_bytes: per_connection,
                connections_per_identity: per_identity,
                ..Limits::default()
            },
            metrics::Gauge::noop(),
        )
    }

    #[test]
    fn one_identity_leaves_room_for_the_others() {
        let b = Budget::new(
            Limits {
                buffer_bytes: 100,
                identity_buffer_bytes: 50,
                connection_buffer_bytes: 30,
                ..Limits::default()
            },
            metrics::Gauge::noop(),
        );
        let hostile: Arc<str> = "hostile".into();
        let good: Arc<str> = "good".into();
        let (h1, h2) = (
            b.connection(&hostile).expect("1"),
            b.connection(&hostile).expect("2"),
        );
        let (mut a, mut c) = (h1.hold(), h2.hold());
        assert!(a.grow(30));
        assert!(!c.grow(30), "the identity's 50 are nearly spent");
        assert!(c.grow(20));
        let g = b.connection(&good).expect("good");
        let mut d = g.hold();
        assert!(d.grow(30), "another identity still finds room");
    }

    #[test]
    fn a_connection_cannot_take_more_than_its_share_nor_all_of_them_more_than_the_total() {
        let b = budget(100, 60, 10);
        let id: Arc<str> = "prod".into();
        let one = b.connection(&id).expect("one");
        let two = b.connection(&id).expect("two");
        let mut a = one.hold();
        assert!(a.grow(60));
        assert!(!a.grow(1), "its share is spent");
        let mut c = two.hold();
        assert!(!c.grow(41), "only 40 left in the gateway");
        assert!(c.grow(40));
        assert_eq!((a.bytes(), c.bytes()), (60, 40));
        drop(a);
        let mut d = two.hold();
        assert!(d.grow(20), "given back when dropped");
        assert!(!d.grow(1), "the second connection's share is spent");
        d.shrink(15);
        assert_eq!(d.bytes(), 5);
        assert!(d.grow(15), "given back when shrunk");
    }

    #[test]
    fn an_identity_holds_at_most_its_connections_and_gets_them_back() {
        let b = budget(100, 10, 2);
        let id: Arc<str> = "prod".into();
        let other: Arc<str> = "other".into();
        let first = b.connection(&id).expect("1");
        let _second = b.connection(&id).expect("2");
        assert_eq!(
            b.connection(&id).map(drop),
            Err(TooManyConnections { limit: 2 })
        );
        assert!(b.connection(&other).is_ok(), "per identity");
        drop(first);
        assert!(b.connection(&id).is_ok(), "a closed connection makes room");
    }
}

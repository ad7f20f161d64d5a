//! The most recent proxied connections, with both identities: what the
//! access log says, kept in memory for `/debug/connections` and for tests
//! that check which identity a peer saw.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::Serialize;

/// How many connections are remembered.
pub const CAPACITY: usize = 512;

/// One finished connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnRecord {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The source workload's identity; `None` for plaintext.
    pub src_identity: Option<String>,
    pub dst_identity: String,
    pub dst_addr: SocketAddr,
    /// The TCP peer: the source ztunnel (inbound) or the local workload (outbound).
    pub peer_addr: SocketAddr,
    /// The `forwarded` header of the CONNECT (inbound HBONE).
    pub forwarded: Option<String>,
    /// The W3C `traceparent` of the CONNECT (inbound HBONE).
    pub traceparent: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<String>,
}

/// A bounded log of recent connections.
#[derive(Debug, Default)]
pub struct ConnLog {
    recent: Mutex<VecDeque<ConnRecord>>,
}

impl ConnLog {
    pub fn push(&self, record: ConnRecord) {
        let mut q = self.recent.lock().expect("connlog lock");
        if q.len() == CAPACITY {
            q.pop_front();
        }
        q.push_back(record);
    }

    /// Oldest first.
    pub fn recent(&self) -> Vec<ConnRecord> {
        self.recent
            .lock()
            .expect("connlog lock")
            .iter()
            .cloned()
            .collect()
    }
}

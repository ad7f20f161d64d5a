//! The HBONE client: HTTP/2 `CONNECT` streams over mTLS to peer ztunnels.
//!
//! Many streams share one connection per (source identity, destination
//! identity, destination node address): the connection presents the source
//! workload's certificate and checked the server's SAN against the
//! destination workload's identity, so it can carry any stream between those
//! two identities, and no other. A connection that closes is replaced on the
//! next request; concurrent first requests for one key wait for a single
//! handshake instead of racing their own.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshid_common::{CredentialsRx, SpiffeId};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// A pooled connection takes no new stream this close to the expiry of one
/// of its certificates, so the peer never sees a stream arrive on an
/// expired certificate.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// HTTP/2 PING period on pooled connections, to notice a dead peer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a pooled connection is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    /// The destination node's HBONE address.
    pub node_addr: SocketAddr,
}

/// One CONNECT to send.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// `:authority`, the destination workload's `ip:port`.
    pub authority: SocketAddr,
    /// For the `forwarded: for="…"` header.
    pub source_ip: std::net::IpAddr,
    /// The destination node, for error messages.
    pub node: String,
}

/// A pooled connection and when it stops taking new streams: the earlier
/// expiry of the two certificates of its handshake, so no stream is opened
/// on the authority of an expired certificate (revocation by TTL).
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    usable_until: SystemTime,
}

type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

/// Shared HBONE connections of one ztunnel.
#[derive(Clone)]
pub struct Pool {
    slots: Arc<Mutex<HashMap<PoolKey, Slot>>>,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("keys", &self.slots.lock().map(|s| s.len()).unwrap_or(0))
            .finish()
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Pool {
            slots: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout,
            metrics,
        }
    }

    /// Open connections in the pool.
    pub fn open_connections(&self) -> usize {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .expect("pool lock")
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .filter(|s| {
                s.try_lock()
                    .map(|g| g.as_ref().is_some_and(|c| !c.sender.is_closed()))
                    .unwrap_or(true)
            })
            .count()
    }

    /// Forgets connections that are closed or too close to a certificate's
    /// expiry; they close once their last stream ends. Returns how many
    /// were let go.
    pub fn sweep(&self) -> usize {
        let now = SystemTime::now();
        let mut slots = self.slots.lock().expect("pool lock");
        let before = slots.len();
        slots.retain(|_, slot| match slot.try_lock() {
            // In use right now (a dial in progress): keep.
            Err(_) => true,
            Ok(guard) => guard
                .as_ref()
                .is_some_and(|p| !p.sender.is_closed() && now < p.usable_until),
        });
        before - slots.len()
    }

    /// Opens a CONNECT stream to `req.authority` through the peer ztunnel
    /// of `key`, presenting the certificate on `source_creds`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        source_creds: &CredentialsRx,
        req: &ConnectRequest,
    ) -> Result<Upgraded> {
        let slot = self
            .slots
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .clone();
        // One retry: a pooled connection may have been closed by the peer
        // (GOAWAY, idle close) between our check and the request.
        for attempt in 0..2 {
            let mut sender = self.sender(key, &slot, source_creds, req).await?;
            let request = build_request(req)?;
            match sender.send_request(request).await {
                Ok(response) => {
                    if response.status() != StatusCode::OK {
                        return Err(Error::ConnectRefused {
                            addr: key.node_addr,
                            authority: req.authority.to_string(),
                            status: response.status(),
                        });
                    }
                    return hyper::upgrade::on(response).await.map_err(|e| Error::Http {
                        addr: key.node_addr,
                        reason: format!("CONNECT stream: {e}"),
                    });
                }
                Err(e) if attempt == 0 && (e.is_closed() || e.is_canceled()) => {
                    tracing::debug!(error = %e, "pooled HBONE connection closed; reconnecting");
                }
                Err(e) => {
                    return Err(Error::Http {
                        addr: key.node_addr,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Err(Error::Http {
            addr: key.node_addr,
            reason: "the connection closed twice".into(),
        })
    }

    async fn sender(
        &self,
        key: &PoolKey,
        slot: &Slot,
        source_creds: &CredentialsRx,
        req: &ConnectRequest,
    ) -> Result<SendRequest<Empty<Bytes>>> {
        let mut guard = slot.lock().await;
        if let Some(p) = guard.as_ref()
            && !p.sender.is_closed()
            && SystemTime::now() < p.usable_until
        {
            return Ok(p.sender.clone());
        }
        let pooled = self.dial(key, source_creds, req).await?;
        let sender = pooled.sender.clone();
        // The old connection, if any, closes once its streams are done.
        *guard = Some(pooled);
        Ok(sender)
    }

    async fn dial(
        &self,
        key: &PoolKey,
        source_creds: &CredentialsRx,
        req: &ConnectRequest,
    ) -> Result<Pooled> {
        let addr = key.node_addr;
        let timeout = self.connect_timeout;
        let timed_out = |what: &str| Error::Timeout {
            what: format!("{what} {addr} (node {})", req.node),
            after: timeout,
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("connecting to"))?
            .map_err(|source| Error::PeerConnect {
                node: req.node.clone(),
                addr,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let config = crate::tls::client_config(source_creds.clone(), &key.destination)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = tokio::time::timeout(
            timeout,
            connector.connect(meshid_common::tls::sni_for(&key.destination), tcp),
        )
        .await
        .map_err(|_| timed_out("TLS handshake with"))?
        .map_err(|e| Error::Tls {
            peer: key.destination.to_string(),
            addr,
            reason: e.to_string(),
        })?;
        crate::tls::check_session(tls.get_ref().1).map_err(|reason| Error::Tls {
            peer: key.destination.to_string(),
            addr,
            reason,
        })?;
        let server_not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| meshid_common::CertInfo::from_der(leaf).ok())
            .map(|l| l.not_after);
        let client_not_after = source_creds
            .borrow()
            .as_ref()
            .map(|c| c.svid.leaf().not_after);
        let usable_until = server_not_after
            .into_iter()
            .chain(client_not_after)
            .min()
            .and_then(|t| t.checked_sub(EXPIRY_MARGIN))
            .unwrap_or_else(SystemTime::now);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .max_frame_size(256 * 1024)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| Error::Http {
                addr,
                reason: format!("HTTP/2 handshake: {e}"),
            })?;
        self.metrics.hbone_pool_connections.inc();
        let span = tracing::debug_span!(
            "hbone.pool_conn",
            src.identity = %key.source,
            dst.identity = %key.destination,
            peer.addr = %addr,
        );
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "HBONE connection ended");
                }
            }
            .instrument(span),
        );
        tracing::debug!(
            src.identity = %key.source,
            dst.identity = %key.destination,
            peer.addr = %addr,
            "new HBONE connection"
        );
        Ok(Pooled {
            sender,
            usable_until,
        })
    }
}

fn build_request(req: &ConnectRequest) -> Result<Request<Empty<Bytes>>> {
    let forwarded = match req.source_ip {
        std::net::IpAddr::V4(ip) => format!("for=\"{ip}\""),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .header("forwarded", forwarded)
        .body(Empty::new())
        .map_err(|e| Error::Http {
            addr: req.authority,
            reason: format!("building CONNECT: {e}"),
        })?;
    meshid_common::telemetry::inject_http(request.headers_mut());
    Ok(request)
}

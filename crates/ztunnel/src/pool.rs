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

use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use hyper::body::Bytes;
use meshid_common::{CredentialsRx, SpiffeId};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::h2io::H2Stream;
use crate::metrics::Metrics;

/// HTTP/2 settings of both ends of an HBONE connection: windows large
/// enough that one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

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
    /// Send SNI as a hint: the dialled IP does not name the destination
    /// workload by itself (a real ztunnel never needs to).
    pub send_sni: bool,
}

/// A pooled connection and when it stops taking new streams: the earlier
/// expiry of the two certificates of its handshake, so no stream is opened
/// on the authority of an expired certificate (revocation by TTL), and as
/// soon as the source workload's certificate has been renewed, so new
/// streams ride on the new certificate while the old one still has half
/// its life (a stream sent just before the old one expires could reach a
/// slow peer after it).
struct Pooled {
    sender: SendRequest<Bytes>,
    /// Cancelled when the connection task ends.
    closed: CancellationToken,
    usable_until: SystemTime,
    /// Serial of the source certificate offered in the handshake.
    client_serial: Option<String>,
}

impl Pooled {
    fn usable(&self, now: SystemTime) -> bool {
        !self.closed.is_cancelled() && now < self.usable_until
    }

    /// Usable, and still on the source's current certificate.
    fn usable_with(&self, now: SystemTime, source_creds: &CredentialsRx) -> bool {
        self.usable(now) && self.client_serial == current_serial(source_creds)
    }
}

fn current_serial(source_creds: &CredentialsRx) -> Option<String> {
    source_creds
        .borrow()
        .as_ref()
        .map(|c| c.svid.leaf().serial.clone())
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
                    .map(|g| g.as_ref().is_some_and(|c| !c.closed.is_cancelled()))
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
            Ok(guard) => guard.as_ref().is_some_and(|p| p.usable(now)),
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
    ) -> Result<H2Stream> {
        let slot = self
            .slots
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let http_err = |reason: String| Error::Http {
            addr: key.node_addr,
            reason,
        };
        // One retry: a pooled connection may have been closed by the peer
        // (GOAWAY, idle close) between our check and the request.
        for attempt in 0..2 {
            let sender = self.sender(key, &slot, source_creds, req).await?;
            let request = build_request(req)?;
            let sent = async {
                let mut sender = sender.ready().await?;
                sender.send_request(request, false)
            }
            .await;
            let (response, send) = match sent {
                Ok(r) => r,
                Err(e) if attempt == 0 && (e.is_go_away() || e.is_io() || e.is_reset()) => {
                    tracing::debug!(error = %e, "pooled HBONE connection unusable; reconnecting");
                    if let Some(p) = slot.lock().await.as_ref() {
                        p.closed.cancel();
                    }
                    continue;
                }
                Err(e) => return Err(http_err(e.to_string())),
            };
            let response = response
                .await
                .map_err(|e| http_err(format!("CONNECT: {e}")))?;
            if response.status() != StatusCode::OK {
                return Err(Error::ConnectRefused {
                    addr: key.node_addr,
                    authority: req.authority.to_string(),
                    status: response.status(),
                });
            }
            return Ok(H2Stream::new(send, response.into_body()));
        }
        Err(http_err("the connection closed twice".into()))
    }

    async fn sender(
        &self,
        key: &PoolKey,
        slot: &Slot,
        source_creds: &CredentialsRx,
        req: &ConnectRequest,
    ) -> Result<SendRequest<Bytes>> {
        let mut guard = slot.lock().await;
        if let Some(p) = guard.as_ref()
            && p.usable_with(SystemTime::now(), source_creds)
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
        // The source certificate this handshake will offer (read before it).
        let client_before = source_creds
            .borrow()
            .as_ref()
            .map(|c| (c.svid.leaf().serial.clone(), c.svid.leaf().not_after))
            .unzip();
        let config =
            crate::tls::client_config(source_creds.clone(), &key.destination, req.send_sni)?;
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
        // The client certificate is read again after the handshake: a
        // renewal during it must shorten, never lengthen, the connection's use.
        let client_not_after = source_creds
            .borrow()
            .as_ref()
            .map(|c| c.svid.leaf().not_after)
            .into_iter()
            .chain(client_before.1)
            .min();
        let usable_until = server_not_after
            .into_iter()
            .chain(client_not_after)
            .min()
            .and_then(|t| t.checked_sub(EXPIRY_MARGIN))
            .unwrap_or_else(SystemTime::now);
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls)
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
        let closed = CancellationToken::new();
        let ping_pong = conn.ping_pong();
        let done = closed.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    r = &mut conn => if let Err(e) = r {
                        tracing::debug!(error = %e, "HBONE connection ended");
                    },
                    _ = keepalive(ping_pong) => {
                        tracing::debug!("HBONE peer stopped answering PINGs; closing");
                    }
                }
                done.cancel();
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
            closed,
            usable_until,
            client_serial: client_before.0,
        })
    }
}

/// Pings every [`KEEPALIVE_INTERVAL`]; returns when a PING goes unanswered
/// for [`KEEPALIVE_TIMEOUT`] (never when the connection cannot ping).
async fn keepalive(ping_pong: Option<h2::PingPong>) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // A PING error means the connection is gone; the connection
            // future reports it.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

fn build_request(req: &ConnectRequest) -> Result<Request<()>> {
    let forwarded = match req.source_ip {
        std::net::IpAddr::V4(ip) => format!("for=\"{ip}\""),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .header("forwarded", forwarded)
        .body(())
        .map_err(|e| Error::Http {
            addr: req.authority,
            reason: format!("building CONNECT: {e}"),
        })?;
    meshid_common::telemetry::inject_http(request.headers_mut());
    Ok(request)
}

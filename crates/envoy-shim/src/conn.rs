//! What inbound and outbound connections share: the access log event, byte
//! counting, the bidirectional copy with half-close, and naming TLS failures.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use meshid_common::SpiffeId;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Per-direction copy buffer. TLS records carry at most 16 KiB of plaintext;
/// handing rustls four at a time keeps 64 KiB messages at one write each
/// (16 KiB cost a third of the 64 KiB request rate in the proxy bench).
pub(crate) const COPY_BUFFER: usize = 64 * 1024;

/// Read buffer under each TLS session. rustls pulls ciphertext 4 KiB at a
/// time; this turns those pulls into memory copies, so the socket is read
/// in record-sized chunks (fewer syscalls for bulk transfers). 32 KiB bought
/// no throughput the bench could see and cost 16 KiB of heap per connection.
pub(crate) const TLS_READ_BUFFER: usize = 16 * 1024;

/// A socket ready to carry TLS: buffered reads, direct writes.
pub(crate) fn tls_io(tcp: tokio::net::TcpStream) -> tokio::io::BufReader<tokio::net::TcpStream> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Which listener took the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnResult {
    /// Proxied until both sides closed.
    Ok,
    /// The TLS handshake failed or timed out.
    HandshakeFailed,
    /// Authenticated, but the policy does not allow this peer.
    Denied,
    /// Both SDS secrets have not arrived yet.
    NotReady,
    /// The local app (inbound) or the destination (outbound) refused or timed out.
    UpstreamUnavailable,
    /// The connection limit was reached.
    Overflow,
    /// An I/O error while proxying.
    Error,
    /// Cut at shutdown after the grace period.
    Drained,
}

impl ConnResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnResult::Ok => "ok",
            ConnResult::HandshakeFailed => "handshake_failed",
            ConnResult::Denied => "denied",
            ConnResult::NotReady => "not_ready",
            ConnResult::UpstreamUnavailable => "upstream_unavailable",
            ConnResult::Overflow => "overflow",
            ConnResult::Error => "error",
            ConnResult::Drained => "drained",
        }
    }
}

/// The access log record of one connection.
#[derive(Clone, Debug, Serialize)]
pub struct AccessEvent {
    pub direction: Direction,
    /// `STRICT` / `PERMISSIVE` / `DISABLE` inbound, `ISTIO_MUTUAL` / `DISABLE` outbound.
    pub mode: &'static str,
    /// The downstream peer's address.
    pub peer_addr: SocketAddr,
    /// The authenticated SPIFFE ID of the mTLS peer (client inbound, server outbound).
    pub peer_id: Option<SpiffeId>,
    /// Where the connection was forwarded to.
    pub upstream: SocketAddr,
    /// Whether the mesh side of the connection was mTLS.
    pub tls: bool,
    /// Bytes read from the downstream peer.
    pub bytes_received: u64,
    /// Bytes written to the downstream peer.
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub result: ConnResult,
    /// Short machine-readable failure class (`expired`, `unknown_issuer`, `timeout`…).
    pub failure: Option<&'static str>,
    /// Human-readable reason, naming the peer identity when there is one.
    pub reason: Option<String>,
}

/// Emits access events to the log, the metrics and any subscribers.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: broadcast::Sender<AccessEvent>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        AccessLog {
            tx: broadcast::Sender::new(1024),
            metrics,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AccessEvent> {
        self.tx.subscribe()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn emit(&self, ev: AccessEvent) {
        let m = &self.metrics;
        m.connection(ev.direction.as_str(), ev.mode, ev.result.as_str());
        m.bytes(ev.direction.as_str(), ev.bytes_received, ev.bytes_sent);
        if ev.result == ConnResult::HandshakeFailed {
            m.handshake_failure(ev.direction.as_str(), ev.failure.unwrap_or("other"));
        }
        let peer_id = ev.peer_id.as_ref().map(|p| p.as_str()).unwrap_or("-");
        let reason = ev.reason.as_deref().unwrap_or("-");
        tracing::info!(
            target: "meshid_envoy_shim::access",
            direction = ev.direction.as_str(),
            mode = ev.mode,
            peer.addr = %ev.peer_addr,
            peer.id = peer_id,
            upstream = %ev.upstream,
            tls = ev.tls,
            bytes.received = ev.bytes_received,
            bytes.sent = ev.bytes_sent,
            duration_ms = ev.duration_ms,
            result = ev.result.as_str(),
            failure = ev.failure.unwrap_or("-"),
            reason,
            "connection closed"
        );
        let _ = self.tx.send(ev);
    }
}

/// Builds an [`AccessEvent`] over the life of a connection.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub ev: AccessEvent,
    start: Instant,
}

impl Tracker {
    pub fn new(
        direction: Direction,
        mode: &'static str,
        peer_addr: SocketAddr,
        upstream: SocketAddr,
    ) -> Self {
        Tracker {
            ev: AccessEvent {
                direction,
                mode,
                peer_addr,
                peer_id: None,
                upstream,
                tls: false,
                bytes_received: 0,
                bytes_sent: 0,
                duration_ms: 0,
                result: ConnResult::Ok,
                failure: None,
                reason: None,
            },
            start: Instant::now(),
        }
    }

    pub fn fail(&mut self, result: ConnResult, failure: &'static str, reason: impl Into<String>) {
        self.ev.result = result;
        self.ev.failure = Some(failure);
        self.ev.reason = Some(reason.into());
    }

    pub fn finish(mut self, log: &AccessLog) {
        self.ev.duration_ms = self.start.elapsed().as_millis() as u64;
        log.emit(self.ev);
    }
}

/// Holds the active-connections gauge up for the life of a connection.
pub(crate) struct Active(prometheus_client::metrics::gauge::Gauge);

impl Active {
    pub fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Active(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts bytes through a stream. A TLS peer that closes without
/// `close_notify` reads as a normal end of stream, as in Envoy: framing is
/// the application's business.
pub(crate) struct Counted<S> {
    inner: S,
    pub read: u64,
    pub written: u64,
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                self.read += (buf.filled().len() - before) as u64;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Copies both ways until both sides have closed, passing each half-close
/// on (EOF on one side shuts down writing on the other). Cut when `abort`
/// fires. Records bytes and the outcome in `t`.
pub(crate) async fn splice<D, U>(
    t: &mut Tracker,
    downstream: D,
    upstream: U,
    abort: &CancellationToken,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut down = Counted::new(downstream);
    let mut up = Counted::new(upstream);
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, COPY_BUFFER, COPY_BUFFER) => Some(r),
        _ = abort.cancelled() => None,
    };
    t.ev.bytes_received = down.read;
    t.ev.bytes_sent = down.written;
    match result {
        Some(Ok(_)) => {}
        Some(Err(e)) => t.fail(ConnResult::Error, "io", format!("while proxying: {e}")),
        None => t.fail(
            ConnResult::Drained,
            "shutdown",
            "closed at shutdown after the drain grace period",
        ),
    }
}

/// Names a failed TLS handshake: a short class for metrics and a readable
/// reason (naming the peer's identity when the failure is about it).
pub(crate) fn classify_tls_error(err: &io::Error) -> (&'static str, String) {
    use rustls::{CertificateError, Error as TlsError};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<TlsError>()) else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => (
                "eof",
                "peer closed the connection during the TLS handshake".to_owned(),
            ),
            io::ErrorKind::TimedOut => ("timeout", err.to_string()),
            _ => ("io", format!("I/O error during the TLS handshake: {err}")),
        };
    };
    let class = match tls {
        TlsError::NoCertificatesPresented => "no_client_cert",
        TlsError::InvalidMessage(_)
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. } => "not_tls",
        TlsError::AlertReceived(_) => "alert_received",
        TlsError::PeerIncompatible(_) => "incompatible",
        TlsError::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "invalid_purpose"
            }
            CertificateError::BadEncoding => "bad_encoding",
            CertificateError::Other(other) => {
                let inner: &(dyn std::error::Error + 'static) = &*other.0;
                return match inner.downcast_ref::<meshid_common::Error>() {
                    Some(e) => (identity_class(e), format!("peer certificate refused: {e}")),
                    None => (
                        "bad_certificate",
                        format!("peer certificate refused: {inner}"),
                    ),
                };
            }
            _ => "bad_certificate",
        },
        _ => "tls_error",
    };
    (class, format!("TLS handshake failed: {tls}"))
}

fn identity_class(e: &meshid_common::Error) -> &'static str {
    use meshid_common::Error as E;
    match e {
        E::ForeignTrustDomain { .. } => "foreign_trust_domain",
        E::NoSpiffeId { .. } | E::MultipleUriSans { .. } => "no_spiffe_id",
        E::UnexpectedPeer { .. } => "unexpected_peer",
        E::PeerNotAllowed { .. } => "not_allowed",
        E::Untrusted { .. } => "untrusted",
        E::NoCredentials => "no_credentials",
        _ => "bad_certificate",
    }
}

/// `connect` with a deadline, turning the timeout into an I/O error.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

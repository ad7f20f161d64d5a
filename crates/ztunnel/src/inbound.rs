//! Inbound: the HBONE server (:15008) and the plaintext listener (:15006).
//!
//! HBONE: the server picks the identity to present as the real ztunnel does,
//! by the address the client dialled (DESIGN §2.5; a real ztunnel sends no
//! SNI): the connection's `SO_ORIGINAL_DST` when iptables redirected it,
//! else its local address. When that IP is the address of exactly one
//! workload this node serves, that workload's identity is presented, whatever
//! the SNI says. Otherwise (process mode: the node's own address, or several
//! workloads sharing one loopback IP) the SNI, if the client sent one, is a
//! hint naming a hosted identity ([`meshid_common::tls::sni_for`]). The one
//! exception: a listener bound to one IP (not `0.0.0.0`) is the node's
//! address, so a connection made straight to it lets a hosted identity in
//! the SNI win over a workload that happens to share the node's IP. The
//! handshake then finishes with that identity's certificate (waiting for it,
//! with priority, if it is not fetched yet); the client must present a chain
//! that verifies to the bundle and names an identity of our trust domain; the
//! session must be TLS 1.3 with `h2`. Each HTTP/2 request then gets:
//!
//! | answer | when |
//! |---|---|
//! | 400 | not `CONNECT`, or `:authority` is not `ip:port` |
//! | 431 | the headers exceed [`MAX_HEADER_LIST_SIZE`] (answered by h2) |
//! | 404 | no workload of this node listens at `:authority` |
//! | 401 | the workload is not the identity the client dialled, or its policy denies the client |
//! | 503 | the workload does not accept the TCP connection |
//! | 200 | otherwise; bytes flow both ways until either side closes |
//!
//! A connection to an address that names no single served workload and
//! carries no SNI naming a hosted identity, no TLS at all, or a client
//! certificate that does not verify is closed during the handshake, logged
//! with the dialled address and counted in
//! `ztunnel_hbone_handshake_failures{reason}`.
//!
//! Plaintext: the destination is the connection's `SO_ORIGINAL_DST` when
//! iptables redirected it here; otherwise (process mode) the client sends a
//! PROXY protocol v1 line naming it (`PROXY TCP4 <src> <dst> <sport>
//! <dport>\r\n`). The destination must be a local workload in PERMISSIVE mode.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Bytes;
use meshid_common::SpiffeId;
use meshid_common::serve::Drain;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::certs::CertManager;
use crate::connlog::{ConnLog, ConnRecord};
use crate::directory::{Directory, WorkloadInfo};
use crate::error::{Error, Result};
use crate::h2io::H2Stream;
use crate::metrics::{
    CodeLabels, Metrics, Peer, ReasonLabels, Reporter, SecurityPolicy, TrafficLabels,
};
use crate::policy::{Mode, Policies};

/// Buffer size of each direction of a proxied connection: each write becomes
/// an HTTP/2 DATA frame, so larger writes go faster; 32 KiB keeps 1,000
/// open connections under 64 MiB of buffers per node.
pub const COPY_BUFFER: usize = 32 * 1024;

/// HTTP/2 streams one HBONE connection may carry at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// The largest header list an HBONE request may carry (hyper's server
/// default, which a real ztunnel keeps); h2 alone would take 16 MiB. A
/// request above it is answered 431.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// What every inbound connection needs.
#[derive(Debug)]
pub struct Inbound {
    pub trust_domain: String,
    /// Trust domains read as `trust_domain` in a client's ID.
    pub trust_domain_aliases: Vec<String>,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub certs: CertManager,
    /// The policy in force; replaced when the policy file changes.
    pub policies: watch::Receiver<Arc<Policies>>,
    pub metrics: Arc<Metrics>,
    pub connlog: Arc<ConnLog>,
    pub connect_timeout: Duration,
    /// The IP the HBONE listener is bound to, unless it listens on all
    /// addresses: a connection that came straight to it dialled the node,
    /// not a pod (process mode).
    pub node_hbone_ip: Option<std::net::IpAddr>,
}

/// An accepted CONNECT: the workload's connection and what the log needs.
struct Accepted {
    upstream: TcpStream,
    dst: Arc<WorkloadInfo>,
    target: SocketAddr,
    forwarded: Option<String>,
    traceparent: Option<String>,
}

/// The two ends of one HBONE connection.
#[derive(Clone, Debug)]
struct ConnInfo {
    peer_addr: SocketAddr,
    /// The identity we presented (chosen by the dialled address, or SNI).
    local_id: SpiffeId,
    /// The client's identity, from its verified certificate.
    peer_id: SpiffeId,
    /// When the client's certificate expires: no new stream after that.
    peer_not_after: std::time::SystemTime,
}

impl Inbound {
    /// Accepts HBONE connections on `drain` until it stops.
    pub fn serve_hbone(self: Arc<Self>, listener: TcpListener, drain: &Drain) {
        let cancel = drain.stopping().clone();
        drain.serve("HBONE", listener, move |stream, peer| {
            self.clone().handle_hbone(stream, peer, cancel.clone())
        });
    }

    async fn handle_hbone(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        let conn = match self.handshake(stream, peer).await {
            Ok(c) => c,
            Err(e) => {
                let reason = e.handshake_failure_reason();
                self.metrics
                    .hbone_handshake_failures
                    .get_or_create(&ReasonLabels {
                        reason: reason.to_owned(),
                    })
                    .inc();
                tracing::warn!(peer.addr = %peer, reason, error = %e, "HBONE handshake refused");
                return;
            }
        };
        let (tls, info) = conn;
        let built = h2::server::Builder::new()
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .initial_window_size(crate::pool::STREAM_WINDOW)
            .initial_connection_window_size(crate::pool::CONNECTION_WINDOW)
            .max_frame_size(crate::pool::MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls)
            .await;
        let mut h2 = match built {
            Ok(h2) => h2,
            Err(e) => {
                tracing::warn!(peer.addr = %peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
        };
        let info = Arc::new(info);
        loop {
            tokio::select! {
                next = h2.accept() => match next {
                    Some(Ok((req, respond))) => {
                        let this = self.clone();
                        let info = info.clone();
                        tokio::spawn(async move { this.handle_stream(req, respond, &info).await });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer.addr = %peer, error = %e, "HBONE connection ended");
                        return;
                    }
                    None => return,
                },
                _ = cancel.cancelled() => {
                    // GOAWAY, then drive the connection until its streams end.
                    h2.graceful_shutdown();
                    // A connection error ends the drain (accept keeps
                    // returning it).
                    while let Some(Ok((_, mut respond))) = h2.accept().await {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                    return;
                }
            }
        }
    }

    async fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, ConnInfo)> {
        let tls_err = |peer_name: &str, reason: String| Error::Tls {
            peer: peer_name.to_owned(),
            addr: peer,
            reason,
        };
        let timeout = self.connect_timeout;
        // Where the client meant to go: the pod IP before an iptables
        // REDIRECT, else the address it connected to.
        let dialled = crate::capture::original_dst(&stream)
            .ok()
            .flatten()
            .or_else(|| stream.local_addr().ok());
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = tokio::time::timeout(timeout, acceptor)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("reading a ClientHello from {peer}"),
                after: timeout,
            })?
            .map_err(|e| tls_err("client", format!("not a TLS ClientHello: {e}")))?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let local_id = self.identity_to_present(peer, dialled, sni.as_deref())?;
        let (entry, _) = self.certs.wait_for(&local_id).await?;
        let config =
            crate::tls::server_config(&entry, &self.trust_domain, &self.trust_domain_aliases)?;
        let tls = tokio::time::timeout(timeout, start.into_stream(config))
            .await
            .map_err(|_| Error::Timeout {
                what: format!("TLS handshake with {peer}"),
                after: timeout,
            })?
            .map_err(|e| tls_err("client", e.to_string()))?;
        let session = tls.get_ref().1;
        crate::tls::check_session(session).map_err(|r| tls_err("client", r))?;
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| tls_err("client", "no client certificate".into()))?;
        let leaf = meshid_common::CertInfo::from_der(leaf)?;
        let peer_id = leaf
            .spiffe_id
            .clone()
            .ok_or_else(|| tls_err("client", "no SPIFFE ID in the client certificate".into()))?;
        Ok((
            tls,
            ConnInfo {
                peer_addr: peer,
                local_id,
                peer_id,
                peer_not_after: leaf.not_after,
            },
        ))
    }

    /// The hosted identity a connection from `peer` to `dialled` is for:
    /// the served workload whose IP was dialled; else the one `sni` names.
    fn identity_to_present(
        &self,
        peer: SocketAddr,
        dialled: Option<SocketAddr>,
        sni: Option<&str>,
    ) -> Result<SpiffeId> {
        // Process mode: the client dialled the node's own HBONE address, so
        // the IP names the node; a hosted identity in the SNI says which
        // workload (even when one local workload shares the node's IP).
        let dialled_node = dialled.is_some_and(|a| Some(a.ip()) == self.node_hbone_ip);
        if dialled_node && let Some(id) = sni.and_then(|hint| self.certs.identity_for_sni(hint)) {
            return Ok(id);
        }
        if let Some(addr) = dialled
            && let Some(w) = self.directory.borrow().local_by_ip(addr.ip())
        {
            if let Some(hint) = sni
                && self.certs.identity_for_sni(hint).as_ref() != Some(&w.identity)
            {
                // A real ztunnel goes by the address too.
                tracing::debug!(
                    peer.addr = %peer,
                    dst.addr = %addr,
                    sni = hint,
                    dst.identity = %w.identity,
                    "SNI ignored: the dialled address names the workload"
                );
            }
            return Ok(w.identity.clone());
        }
        let dialled_str =
            dialled.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
        let refuse = |why: String| Error::NoHostedDestination {
            peer,
            dialled: dialled_str.clone(),
            why,
        };
        match sni {
            Some(hint) => self.certs.identity_for_sni(hint).ok_or_else(|| {
                refuse(format!(
                    "no single workload of this node has that IP, and SNI {hint:?} names no identity hosted here"
                ))
            }),
            None => Err(refuse(
                "no single workload of this node has that IP (and no SNI hint): refused".into(),
            )),
        }
    }

    async fn handle_stream(
        &self,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        conn: &ConnInfo,
    ) {
        let span = tracing::info_span!(
            "hbone.inbound",
            src.identity = %conn.peer_id,
            dst.identity = %conn.local_id,
            peer.addr = %conn.peer_addr,
            dst.addr = tracing::field::Empty,
        );
        meshid_common::telemetry::set_remote_parent(
            &span,
            meshid_common::telemetry::extract_http(req.headers()),
        );
        let outcome = self.route(&req, conn).instrument(span.clone()).await;
        let status = match &outcome {
            Ok(_) => StatusCode::OK,
            Err(status) => *status,
        };
        self.metrics
            .hbone_responses
            .get_or_create(&CodeLabels {
                code: status.as_u16().to_string(),
            })
            .inc();
        let mut response = Response::new(());
        *response.status_mut() = status;
        let Ok(accepted) = outcome else {
            let _ = respond.send_response(response, true);
            return;
        };
        let send = match respond.send_response(response, false) {
            Ok(send) => send,
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "CONNECT answer not sent"));
                return;
            }
        };
        let mut client = H2Stream::new(send, req.into_body());
        let labels = {
            // The source workload is the one at the `forwarded` address, if
            // it runs as the identity the peer proved; else only the proven
            // identity (and its namespace) is known.
            let dir = self.directory.borrow();
            let source = accepted
                .forwarded
                .as_deref()
                .and_then(forwarded_for)
                .and_then(|ip| dir.at_ip_as(ip, &conn.peer_id));
            TrafficLabels::new(
                Reporter::Destination,
                Peer {
                    workload: source.map(|w| &w.workload),
                    principal: Some(&conn.peer_id),
                },
                Peer::of(&accepted.dst),
                SecurityPolicy::MutualTls,
            )
        };
        forward(
            &self.metrics,
            &self.connlog,
            labels,
            &mut client,
            accepted.upstream,
            AccessLog {
                src: Some(&conn.peer_id),
                dst: &accepted.dst,
                peer_addr: conn.peer_addr,
                forwarded: accepted.forwarded.as_deref(),
                traceparent: accepted.traceparent.as_deref(),
                target: accepted.target,
            },
        )
        .instrument(span)
        .await;
    }

    /// Decides the answer: the workload's connection, or the status to refuse with.
    async fn route(
        &self,
        req: &Request<RecvStream>,
        conn: &ConnInfo,
    ) -> std::result::Result<Accepted, StatusCode> {
        let refuse = |status: StatusCode, reason: &str| {
            tracing::warn!(
                direction = "inbound",
                src.identity = %conn.peer_id,
                dst.identity = %conn.local_id,
                status = status.as_u16(),
                reason,
                "HBONE request refused"
            );
            Err(status)
        };
        let head = parse_connect(req);
        if let Err(ConnectRefusal::NotConnect) = head {
            return refuse(StatusCode::BAD_REQUEST, ConnectRefusal::NotConnect.reason());
        }
        if std::time::SystemTime::now() > conn.peer_not_after {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "the client certificate of this connection has expired",
            );
        }
        let head = match head {
            Ok(head) => head,
            Err(refusal) => return refuse(StatusCode::BAD_REQUEST, refusal.reason()),
        };
        let target = head.target;
        tracing::Span::current().record("dst.addr", tracing::field::display(target));
        let Some(dst) = self.directory.borrow().local_at(target).cloned() else {
            return refuse(
                StatusCode::NOT_FOUND,
                "no workload of this node at that address",
            );
        };
        if dst.identity != conn.local_id {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "the workload at that address is not the identity this connection was opened for",
            );
        }
        let policy = self.policies.borrow().for_workload(
            &dst.workload,
            &self.trust_domain,
            &self.trust_domain_aliases,
        );
        if let Err(e) = policy.peers.check(&conn.peer_id) {
            return refuse(StatusCode::UNAUTHORIZED, &e.to_string());
        }
        let upstream = match connect(target, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        };
        Ok(Accepted {
            upstream,
            dst,
            target,
            forwarded: head.forwarded,
            traceparent: head.traceparent,
        })
    }

    /// Accepts plaintext connections on `drain` until it stops.
    pub fn serve_plaintext(self: Arc<Self>, listener: TcpListener, drain: &Drain) {
        drain.serve("plaintext inbound", listener, move |stream, peer| {
            let this = self.clone();
            async move {
                if let Err(e) = this.handle_plaintext(stream, peer).await {
                    tracing::warn!(peer.addr = %peer, error = %e, "plaintext inbound refused");
                }
            }
        });
    }

    async fn handle_plaintext(&self, stream: TcpStream, peer: SocketAddr) -> Result<()> {
        let _ = stream.set_nodelay(true);
        let redirected = crate::capture::original_dst(&stream).ok().flatten();
        let mut reader = BufReader::new(stream);
        let target = match redirected {
            Some(t) => t,
            None => self.read_proxy_header(&mut reader, peer).await?,
        };
        self.forward_plaintext(reader, peer, target).await
    }

    /// Process mode: the first line names the destination.
    async fn read_proxy_header(
        &self,
        reader: &mut BufReader<TcpStream>,
        peer: SocketAddr,
    ) -> Result<SocketAddr> {
        let mut line = Vec::with_capacity(108);
        let read = async {
            let mut limited = (&mut *reader).take(108);
            limited.read_until(b'\n', &mut line).await
        };
        tokio::time::timeout(self.connect_timeout, read)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("reading the PROXY header from {peer}"),
                after: self.connect_timeout,
            })?
            .map_err(|source| Error::Io {
                what: "PROXY header from",
                path: peer.to_string().into(),
                source,
            })?;
        parse_proxy_v1(&line).ok_or(Error::BadProxyHeader(peer))
    }

    async fn forward_plaintext(
        &self,
        mut reader: BufReader<TcpStream>,
        peer: SocketAddr,
        target: SocketAddr,
    ) -> Result<()> {
        let dst = self
            .directory
            .borrow()
            .local_at(target)
            .cloned()
            .ok_or(Error::UnknownDestination(target))?;
        let policy = self.policies.borrow().for_workload(
            &dst.workload,
            &self.trust_domain,
            &self.trust_domain_aliases,
        );
        if policy.mode != Mode::Permissive {
            return Err(Error::PlaintextRefused(dst.name()));
        }
        let upstream = connect(target, self.connect_timeout).await?;
        let labels = TrafficLabels::new(
            Reporter::Destination,
            Peer::default(),
            Peer::of(&dst),
            SecurityPolicy::Unknown,
        );
        forward(
            &self.metrics,
            &self.connlog,
            labels,
            &mut reader,
            upstream,
            AccessLog {
                src: None,
                dst: &dst,
                peer_addr: peer,
                forwarded: None,
                traceparent: None,
                target,
            },
        )
        .await;
        Ok(())
    }
}

/// What an HBONE request asks for, read from its head alone (no I/O, no
/// state): the part of [`Inbound`]'s routing that a peer's bytes reach
/// first, kept pure so it is fuzzed (fuzz/fuzz_targets/hbone_connect.rs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectHead {
    /// `:authority`, which must be `ip:port`.
    pub target: SocketAddr,
    /// The `forwarded` header, when it is valid UTF-8.
    pub forwarded: Option<String>,
    /// The `traceparent` header, when it is valid UTF-8.
    pub traceparent: Option<String>,
}

/// Why a request head is refused with 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectRefusal {
    NotConnect,
    BadAuthority,
}

impl ConnectRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            ConnectRefusal::NotConnect => "not a CONNECT request",
            ConnectRefusal::BadAuthority => ":authority is not ip:port",
        }
    }
}

/// Reads an HBONE request head: a `CONNECT` to `ip:port`, and the headers
/// the access log and the metrics use.
pub fn parse_connect<B>(req: &Request<B>) -> std::result::Result<ConnectHead, ConnectRefusal> {
    if req.method() != Method::CONNECT {
        return Err(ConnectRefusal::NotConnect);
    }
    let target = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(ConnectRefusal::BadAuthority)?;
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Ok(ConnectHead {
        target,
        forwarded: header("forwarded"),
        traceparent: header("traceparent"),
    })
}

/// The address of a `forwarded: for="<ip>"` header (RFC 7239; the first
/// element, IPv6 in brackets, an optional port).
pub fn forwarded_for(header: &str) -> Option<IpAddr> {
    let first = header.split(',').next()?;
    let value = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for")
            .then_some(v.trim().trim_matches('"'))
    })?;
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    value
        .parse::<IpAddr>()
        .ok()
        .or_else(|| value.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// `PROXY TCP4 src dst sport dport\r\n` → `dst:dport`.
pub fn parse_proxy_v1(line: &[u8]) -> Option<SocketAddr> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix("\r\n")?;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "TCP4" | "TCP6", _src, dst, _sport, dport] => {
            Some(SocketAddr::new(dst.parse().ok()?, dport.parse().ok()?))
        }
        _ => None,
    }
}

async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| Error::Timeout {
            what: format!("connecting to workload {target}"),
            after: timeout,
        })?
        .map_err(|source| Error::Io {
            what: "connecting to workload",
            path: target.to_string().into(),
            source,
        })?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

struct AccessLog<'a> {
    src: Option<&'a SpiffeId>,
    dst: &'a WorkloadInfo,
    peer_addr: SocketAddr,
    forwarded: Option<&'a str>,
    traceparent: Option<&'a str>,
    target: SocketAddr,
}

async fn forward<C>(
    metrics: &Metrics,
    connlog: &ConnLog,
    labels: TrafficLabels,
    client: &mut C,
    mut upstream: TcpStream,
    log: AccessLog<'_>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    metrics.connection_opened(&labels);
    let result =
        tokio::io::copy_bidirectional_with_sizes(client, &mut upstream, COPY_BUFFER, COPY_BUFFER)
            .await;
    let (from_client, to_client) = result.as_ref().map(|r| *r).unwrap_or((0, 0));
    metrics.connection_closed(&labels, from_client, to_client);
    tracing::info!(
        direction = "inbound",
        src.identity = log.src.map(|s| s.as_str()).unwrap_or("none (plaintext)"),
        dst.identity = %log.dst.identity,
        dst.workload = %log.dst.name(),
        dst.addr = %log.target,
        peer.addr = %log.peer_addr,
        forwarded = log.forwarded,
        bytes_sent = from_client,
        bytes_received = to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        error = result.as_ref().err().map(|e| e.to_string()),
        "connection complete"
    );
    connlog.push(ConnRecord {
        direction: "inbound",
        src_identity: log.src.map(|s| s.to_string()),
        dst_identity: log.dst.identity.to_string(),
        dst_addr: log.target,
        peer_addr: log.peer_addr,
        forwarded: log.forwarded.map(str::to_owned),
        traceparent: log.traceparent.map(str::to_owned),
        bytes_sent: from_client,
        bytes_received: to_client,
        error: result.err().map(|e| e.to_string()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_heads_are_read_or_refused() {
        let req = |method: Method, uri: &str| {
            Request::builder()
                .method(method)
                .uri(uri)
                .header("forwarded", "for=\"10.0.0.7\"")
                .body(())
                .unwrap()
        };
        let head = parse_connect(&req(Method::CONNECT, "10.0.0.9:8080")).unwrap();
        assert_eq!(head.target, "10.0.0.9:8080".parse().unwrap());
        assert_eq!(head.forwarded.as_deref(), Some("for=\"10.0.0.7\""));
        assert_eq!(head.traceparent, None);
        assert_eq!(
            parse_connect(&req(Method::GET, "10.0.0.9:8080")),
            Err(ConnectRefusal::NotConnect)
        );
        assert_eq!(
            parse_connect(&req(Method::CONNECT, "backend.default:8080")),
            Err(ConnectRefusal::BadAuthority)
        );
    }

    #[test]
    fn forwarded_for_reads_the_source_address() {
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(forwarded_for("for=\"10.0.0.7\""), Some(v4));
        assert_eq!(forwarded_for("for=10.0.0.7:5555"), Some(v4));
        assert_eq!(forwarded_for("proto=http; For=\"[fd00::7]:80\""), Some(v6));
        assert_eq!(forwarded_for("for=\"[fd00::7]\", for=1.1.1.1"), Some(v6));
        assert_eq!(forwarded_for("for=unknown"), None);
        assert_eq!(forwarded_for("by=10.0.0.7"), None);
    }

    #[test]
    fn proxy_v1_headers_name_the_destination() {
        assert_eq!(
            parse_proxy_v1(b"PROXY TCP4 127.0.0.9 127.0.0.2 5555 8080\r\n"),
            Some("127.0.0.2:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proxy_v1(b"PROXY TCP6 ::1 ::2 5555 80\r\n"),
            Some("[::2]:80".parse().unwrap())
        );
        assert_eq!(parse_proxy_v1(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(parse_proxy_v1(b"PROXY TCP4 a b c d\r\n"), None);
        assert_eq!(parse_proxy_v1(b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2"), None);
    }
}

//! Outbound: a local workload's connection leaves through HBONE.
//!
//! In process mode each route is a listener owned by one source workload and
//! bound to one destination address (`--outbound NS/POD@LISTEN=DEST`): what
//! arrives on it comes from that workload and goes to that destination. With
//! transparent capture (`--capture`), iptables redirects workloads'
//! connections to one listener (:15001); the destination is the
//! connection's `SO_ORIGINAL_DST` and the source the workload with the
//! client's IP. The
//! registry names the destination's node and identity; the connection is
//! tunnelled as an HTTP/2 CONNECT stream over mTLS presenting the **source
//! workload's** certificate to the destination node's ztunnel, which must
//! present the destination workload's identity. A destination that is not
//! in the registry is refused (no passthrough), as is a source that is not a
//! workload this ztunnel serves.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use meshid_common::serve::Drain;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use crate::certs::CertManager;
use crate::connlog::{ConnLog, ConnRecord};
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Peer, Reporter, SecurityPolicy, TrafficLabels};
use crate::pool::{ConnectRequest, Pool, PoolKey};

/// What every outbound connection needs.
#[derive(Debug)]
pub struct Outbound {
    pub node: String,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub certs: CertManager,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub connlog: Arc<ConnLog>,
    /// This node's own HBONE address (for destinations on this node).
    pub local_hbone: SocketAddr,
    /// Configured peer HBONE addresses by node name.
    pub peers: std::sync::RwLock<Vec<(String, SocketAddr)>>,
    /// Port of a peer's HBONE server when its address is not configured.
    pub default_hbone_port: u16,
}

/// One outbound route.
#[derive(Clone, Debug)]
pub struct Route {
    pub namespace: String,
    pub pod: String,
    pub destination: SocketAddr,
}

impl Outbound {
    /// Where the ztunnel of `node` listens for HBONE, to reach `dest`. As
    /// a real ztunnel, `<dest ip>:<HBONE port>` — unless the node's HBONE
    /// address is configured with a specific IP (process mode), which is
    /// then dialled instead.
    pub fn hbone_address(&self, node: &str, dest: SocketAddr) -> SocketAddr {
        let configured = if node == self.node {
            Some(self.local_hbone)
        } else {
            self.peers
                .read()
                .expect("peers lock")
                .iter()
                .find(|(n, _)| n == node)
                .map(|(_, a)| *a)
        };
        match configured {
            Some(a) if !a.ip().is_unspecified() => a,
            Some(a) => SocketAddr::new(dest.ip(), a.port()),
            None => SocketAddr::new(dest.ip(), self.default_hbone_port),
        }
    }

    /// Accepts connections on `listener`, all bound for `route`, on `drain`
    /// until it stops.
    pub fn serve(self: Arc<Self>, listener: TcpListener, route: Route, drain: &Drain) {
        drain.serve("outbound", listener, move |stream, peer| {
            let (this, route) = (self.clone(), route.clone());
            async move { this.handle(stream, peer, &route).await }
        });
    }

    /// Accepts redirected connections (transparent capture) on `drain` until
    /// it stops: the destination is the connection's `SO_ORIGINAL_DST`, the
    /// source the served local workload with the client's IP.
    pub fn serve_captured(self: Arc<Self>, listener: TcpListener, drain: &Drain) {
        drain.serve("outbound capture", listener, move |stream, peer| {
            let this = self.clone();
            async move {
                let route = match this.captured_route(&stream, peer) {
                    Ok(r) => r,
                    Err(e) => {
                        this.metrics.outbound_failures.inc();
                        tracing::warn!(peer.addr = %peer, error = %e, "captured connection refused");
                        return;
                    }
                };
                this.handle(stream, peer, &route).await
            }
        });
    }

    fn captured_route(&self, stream: &TcpStream, peer: SocketAddr) -> Result<Route> {
        let destination = crate::capture::original_dst(stream)
            .map_err(|source| Error::Io {
                what: "SO_ORIGINAL_DST of a connection from",
                path: peer.to_string().into(),
                source,
            })?
            .ok_or_else(|| {
                Error::UnknownSource(format!("{peer} (connection was not redirected)"))
            })?;
        let dir = self.directory.borrow();
        let src = dir.local_by_ip(peer.ip()).ok_or_else(|| {
            Error::UnknownSource(format!(
                "{} (no single served workload has that IP)",
                peer.ip()
            ))
        })?;
        Ok(Route {
            namespace: src.workload.namespace.clone(),
            pod: src.workload.name.clone(),
            destination,
        })
    }

    async fn handle(&self, mut stream: TcpStream, peer: SocketAddr, route: &Route) {
        let _ = stream.set_nodelay(true);
        let started = Instant::now();
        let span = tracing::info_span!(
            "hbone.connect",
            src.workload = %format!("{}/{}", route.namespace, route.pod),
            dst.addr = %route.destination,
            src.identity = tracing::field::Empty,
            dst.identity = tracing::field::Empty,
            peer.addr = tracing::field::Empty,
        );
        let opened = async {
            let (tunnel, src, dst) = self.open(peer, route).await?;
            Ok::<_, Error>((tunnel, src, dst))
        }
        .instrument(span.clone())
        .await;
        let (tunnel, src, dst) = match opened {
            Ok(t) => t,
            Err(e) => {
                self.metrics.outbound_failures.inc();
                span.in_scope(|| tracing::warn!(error = %e, "outbound connection refused"));
                return;
            }
        };
        let labels = TrafficLabels::new(
            Reporter::Source,
            Peer::of(&src),
            Peer::of(&dst),
            SecurityPolicy::MutualTls,
        );
        self.metrics.connection_opened(&labels);
        let mut tunnel = tunnel;
        let result = tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut tunnel,
            crate::inbound::COPY_BUFFER,
            crate::inbound::COPY_BUFFER,
        )
        .await;
        let (sent, received) = match &result {
            Ok((s, r)) => (*s, *r),
            Err(_) => (0, 0),
        };
        self.metrics.connection_closed(&labels, sent, received);
        span.in_scope(|| {
            tracing::info!(
                direction = "outbound",
                src.identity = %src.identity,
                dst.identity = %dst.identity,
                dst.addr = %route.destination,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms = started.elapsed().as_millis() as u64,
                error = result.as_ref().err().map(|e| e.to_string()),
                "connection complete"
            )
        });
        self.connlog.push(ConnRecord {
            direction: "outbound",
            src_identity: Some(src.identity.to_string()),
            dst_identity: dst.identity.to_string(),
            dst_addr: route.destination,
            peer_addr: peer,
            forwarded: None,
            traceparent: None,
            bytes_sent: sent,
            bytes_received: received,
            error: result.err().map(|e| e.to_string()),
        });
    }

    async fn open(
        &self,
        peer: SocketAddr,
        route: &Route,
    ) -> Result<(
        crate::h2io::H2Stream,
        Arc<crate::directory::WorkloadInfo>,
        Arc<crate::directory::WorkloadInfo>,
    )> {
        let (src, dst, alone_at_ip) = {
            let dir = self.directory.borrow();
            let src = dir
                .local_by_name(&route.namespace, &route.pod)
                .cloned()
                .ok_or_else(|| {
                    Error::UnknownSource(format!("{}/{}", route.namespace, route.pod))
                })?;
            let dst = dir
                .lookup(route.destination)
                .cloned()
                .ok_or(Error::UnknownDestination(route.destination))?;
            let alone = dir.alone_at_ip(route.destination.ip());
            (src, dst, alone)
        };
        let span = tracing::Span::current();
        span.record("src.identity", tracing::field::display(&src.identity));
        span.record("dst.identity", tracing::field::display(&dst.identity));
        let (entry, _) = self.certs.wait_for(&src.identity).await?;
        let node_addr = self.hbone_address(&dst.workload.node, route.destination);
        span.record("peer.addr", tracing::field::display(node_addr));
        let key = PoolKey {
            source: src.identity.clone(),
            destination: dst.identity.clone(),
            node_addr,
        };
        let source_ip = src.workload.ip().unwrap_or(match peer.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        });
        let req = ConnectRequest {
            authority: route.destination,
            source_ip,
            node: dst.workload.node.clone(),
            // The server knows the workload by the dialled IP when it is
            // the workload's own; SNI is only a hint for when it is not.
            send_sni: !(node_addr.ip() == route.destination.ip() && alone_at_ip),
        };
        let tunnel = self.pool.connect(&key, &entry.credentials(), &req).await?;
        Ok((tunnel, src, dst))
    }
}

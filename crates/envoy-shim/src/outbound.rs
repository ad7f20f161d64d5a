//! Outbound listeners (Istio's :15001, or one per destination): the local
//! app connects here and the shim dials the destination with mTLS using
//! the workload SVID (ISTIO_MUTUAL), refusing a server whose SPIFFE ID is
//! not the one configured for that destination (secure naming). A
//! destination configured as outside the mesh gets plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_common::serve::Drain;
use meshid_common::tls::{PeerMatcher, client_config, sni_for};
use meshid_common::{CredentialsRx, SpiffeId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::OutboundRoute;
use crate::conn::{
    AccessLog, Active, ConnResult, Direction, Tracker, classify_tls_error, connect, splice, tls_io,
};
use crate::error::Result;

/// Everything an outbound connection on one listener needs.
pub(crate) struct Outbound {
    pub dest: SocketAddr,
    /// `None`: outside the mesh, plaintext.
    pub tls: Option<(SpiffeId, TlsConnector)>,
    pub creds: CredentialsRx,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub limit: Arc<Semaphore>,
    pub log: AccessLog,
    pub abort: CancellationToken,
}

/// The TLS connector for a mesh destination: our SVID, and only the route's
/// peer accepted, in `trust_domain` or any of its `aliases` (istiod expands a
/// destination's SANs to every alias).
pub(crate) fn connector(
    route: &OutboundRoute,
    creds: &CredentialsRx,
    trust_domain: &str,
    aliases: &[String],
) -> Result<Option<(SpiffeId, TlsConnector)>> {
    match &route.peer {
        None => Ok(None),
        Some(id) => {
            // A route naming the alias twin expects the primary one too.
            let expected = if aliases.iter().any(|a| id.is_member_of(a)) {
                id.with_trust_domain(trust_domain)?
            } else {
                id.clone()
            };
            let matcher = PeerMatcher::Exact(expected).with_aliases(aliases);
            let config = client_config(creds.clone(), matcher)?;
            Ok(Some((id.clone(), TlsConnector::from(Arc::new(config)))))
        }
    }
}

/// Accepts on `drain` until it stops.
pub(crate) fn serve(listener: TcpListener, ctx: Arc<Outbound>, drain: &Drain) {
    drain.serve("outbound", listener, move |tcp, peer| {
        handle(ctx.clone(), tcp, peer)
    });
}

async fn handle(ctx: Arc<Outbound>, app: TcpStream, peer: SocketAddr) {
    let mode = if ctx.tls.is_some() {
        "ISTIO_MUTUAL"
    } else {
        "DISABLE"
    };
    let mut t = Tracker::new(Direction::Outbound, mode, peer, ctx.dest);
    let Ok(_permit) = ctx.limit.clone().try_acquire_owned() else {
        t.fail(ConnResult::Overflow, "overflow", "connection limit reached");
        return t.finish(&ctx.log);
    };
    let _active = Active::new(ctx.log.metrics().active(Direction::Outbound.as_str()));
    let _ = app.set_nodelay(true);
    if ctx.tls.is_some() && ctx.creds.borrow().is_none() {
        t.fail(
            ConnResult::NotReady,
            "not_ready",
            "no SDS secrets yet (default and ROOTCA)",
        );
    } else {
        match connect(ctx.dest, ctx.connect_timeout).await {
            Err(e) => t.fail(
                ConnResult::UpstreamUnavailable,
                "upstream_unavailable",
                format!("destination {} unavailable: {e}", ctx.dest),
            ),
            Ok(upstream) => match &ctx.tls {
                None => splice(&mut t, app, upstream, &ctx.abort).await,
                Some((id, connector)) => {
                    t.ev.tls = true;
                    let deadline = Instant::now() + ctx.handshake_timeout;
                    match tokio::time::timeout_at(
                        deadline,
                        connector.connect(sni_for(id), tls_io(upstream)),
                    )
                    .await
                    {
                        Err(_) => t.fail(
                            ConnResult::HandshakeFailed,
                            "timeout",
                            format!(
                                "TLS handshake with {} ({id}) not finished within {:?}",
                                ctx.dest, ctx.handshake_timeout
                            ),
                        ),
                        Ok(Err(e)) => {
                            let (class, reason) = classify_tls_error(&e);
                            t.fail(
                                ConnResult::HandshakeFailed,
                                class,
                                format!("to {} expecting {id}: {reason}", ctx.dest),
                            );
                        }
                        Ok(Ok(tls)) => {
                            t.ev.peer_id = Some(id.clone());
                            splice(&mut t, app, tls, &ctx.abort).await;
                        }
                    }
                }
            },
        }
    }
    t.finish(&ctx.log);
}

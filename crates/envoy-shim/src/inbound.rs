//! The inbound listener (Istio's :15006): peers connect here and are
//! forwarded to the local app according to the current [`Policy`](crate::policy::Policy).
//!
//! STRICT terminates mTLS (client SVID chained to the bundle, trust domain
//! checked in the handshake); PERMISSIVE peeks at the first bytes and takes
//! a TLS record header (`0x16 0x03 0x0X`) as mTLS and anything else as
//! plaintext on the same port; DISABLE is plaintext. The allow-list is
//! checked after the handshake (as Envoy's RBAC filter does), so a denied
//! peer is logged by name. Nothing is accepted before both SDS secrets
//! have arrived.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_common::CredentialsRx;
use meshid_common::serve::Drain;
use meshid_common::tls::{ClientAuth, PeerMatcher, peer_spiffe_id, server_config};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::conn::{
    AccessLog, Active, ConnResult, Direction, Tracker, classify_tls_error, connect, splice, tls_io,
};
use crate::error::Result;
use crate::policy::{Mode, PolicyRx};

/// Everything an inbound connection needs.
pub(crate) struct Inbound {
    pub app_addr: SocketAddr,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub creds: CredentialsRx,
    pub policy: PolicyRx,
    pub acceptor: TlsAcceptor,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub limit: Arc<Semaphore>,
    pub log: AccessLog,
    pub abort: CancellationToken,
}

/// The inbound TLS acceptor: chain and trust domain are checked in the
/// handshake, the allow-list after it.
pub(crate) fn acceptor(
    creds: CredentialsRx,
    trust_domain: &str,
    aliases: &[String],
) -> Result<TlsAcceptor> {
    let config = server_config(
        creds,
        PeerMatcher::TrustDomain(trust_domain.to_owned()).with_aliases(aliases),
        ClientAuth::Required,
    )?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts on `drain` until it stops.
pub(crate) fn serve(listener: TcpListener, ctx: Arc<Inbound>, drain: &Drain) {
    drain.serve("inbound", listener, move |tcp, peer| {
        handle(ctx.clone(), tcp, peer)
    });
}

async fn handle(ctx: Arc<Inbound>, tcp: TcpStream, peer: SocketAddr) {
    let policy = ctx.policy.borrow().clone();
    let mut t = Tracker::new(Direction::Inbound, policy.mode.as_str(), peer, ctx.app_addr);
    let Ok(_permit) = ctx.limit.clone().try_acquire_owned() else {
        t.fail(ConnResult::Overflow, "overflow", "connection limit reached");
        return t.finish(&ctx.log);
    };
    let _active = Active::new(ctx.log.metrics().active(Direction::Inbound.as_str()));
    if ctx.creds.borrow().is_none() {
        t.fail(
            ConnResult::NotReady,
            "not_ready",
            "no SDS secrets yet (default and ROOTCA)",
        );
    } else {
        let _ = tcp.set_nodelay(true);
        let deadline = Instant::now() + ctx.handshake_timeout;
        let tls = match policy.mode {
            Mode::Strict => true,
            Mode::Disable => false,
            Mode::Permissive => match sniff_tls(&tcp, deadline).await {
                Ok(Some(is_tls)) => is_tls,
                Ok(None) => {
                    t.fail(
                        ConnResult::Error,
                        "eof",
                        "peer closed before sending anything",
                    );
                    return t.finish(&ctx.log);
                }
                Err(e) => {
                    t.fail(
                        ConnResult::Error,
                        "io",
                        format!("reading the first bytes: {e}"),
                    );
                    return t.finish(&ctx.log);
                }
            },
        };
        if tls {
            mtls(&ctx, &mut t, tcp, deadline, &policy).await;
        } else {
            t.ev.tls = false;
            match policy.authorize(None, &ctx.trust_domain, &ctx.trust_domain_aliases) {
                Err(reason) => t.fail(ConnResult::Denied, "not_allowed", reason),
                Ok(()) => match connect(ctx.app_addr, ctx.connect_timeout).await {
                    Ok(app) => splice(&mut t, tcp, app, &ctx.abort).await,
                    Err(e) => app_down(&ctx, &mut t, e),
                },
            }
        }
    }
    t.finish(&ctx.log);
}

async fn mtls(
    ctx: &Inbound,
    t: &mut Tracker,
    tcp: TcpStream,
    deadline: Instant,
    policy: &crate::policy::Policy,
) {
    t.ev.tls = true;
    let stream = match tokio::time::timeout_at(deadline, ctx.acceptor.accept(tls_io(tcp))).await {
        Err(_) => {
            return t.fail(
                ConnResult::HandshakeFailed,
                "timeout",
                format!(
                    "TLS handshake not finished within {:?}",
                    ctx.handshake_timeout
                ),
            );
        }
        Ok(Err(e)) => {
            let (class, reason) = classify_tls_error(&e);
            return t.fail(ConnResult::HandshakeFailed, class, reason);
        }
        Ok(Ok(s)) => s,
    };
    let peer_id = peer_spiffe_id(stream.get_ref().1.peer_certificates());
    t.ev.peer_id = peer_id.clone();
    if let Err(reason) = policy.authorize(
        peer_id.as_ref(),
        &ctx.trust_domain,
        &ctx.trust_domain_aliases,
    ) {
        return t.fail(ConnResult::Denied, "not_allowed", reason);
    }
    match connect(ctx.app_addr, ctx.connect_timeout).await {
        Ok(app) => splice(t, stream, app, &ctx.abort).await,
        Err(e) => {
            app_down(ctx, t, e);
            // Close the TLS session cleanly so the peer sees an orderly end.
            let mut stream = stream;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncWriteExt::shutdown(&mut stream),
            )
            .await;
        }
    }
}

fn app_down(ctx: &Inbound, t: &mut Tracker, e: std::io::Error) {
    t.fail(
        ConnResult::UpstreamUnavailable,
        "app_unavailable",
        format!("local app {} unavailable: {e}", ctx.app_addr),
    );
}

/// Peeks at the first bytes: `Some(true)` for a TLS handshake record,
/// `Some(false)` for anything else (or nothing sent before the deadline, as
/// for server-first protocols), `None` if the peer closed without a byte.
pub(crate) async fn sniff_tls(tcp: &TcpStream, deadline: Instant) -> std::io::Result<Option<bool>> {
    let mut buf = [0u8; 3];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Some(false)),
        };
        if n == 0 {
            return Ok(None);
        }
        if buf[0] != 0x16 {
            return Ok(Some(false));
        }
        if n >= 3 {
            return Ok(Some(buf[1] == 0x03 && buf[2] <= 0x04));
        }
        // A record header split across segments: wait for the rest.
        if Instant::now() >= deadline {
            return Ok(Some(true));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniff(bytes: &[u8], close: bool) -> Option<bool> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        c.write_all(bytes).await.unwrap();
        if close {
            c.shutdown().await.unwrap();
        }
        sniff_tls(&s, Instant::now() + Duration::from_millis(300))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn tells_tls_from_plaintext() {
        assert_eq!(
            sniff(&[0x16, 0x03, 0x01, 0x02, 0x00], false).await,
            Some(true)
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n", false).await, Some(false));
        assert_eq!(sniff(&[0x16, 0x09, 0x09], false).await, Some(false));
        assert_eq!(sniff(b"", true).await, None);
        // Server-first protocol: nothing sent before the deadline.
        assert_eq!(sniff(b"", false).await, Some(false));
    }
}

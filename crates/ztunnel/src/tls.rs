//! The rustls configs of HBONE (DESIGN §2.5), built on meshid-common's SPIFFE
//! verifiers.
//!
//! - Server: one config per hosted identity, presenting that identity's
//!   certificate and demanding a client certificate of the trust domain. The
//!   HBONE server reads the ClientHello first and picks the config of the
//!   workload at the dialled address (or, failing that, the one whose
//!   [`sni_for`](meshid_common::tls::sni_for) matches the SNI), so it always
//!   presents the certificate of the workload being dialled, and can wait
//!   (with priority) for a certificate not fetched yet.
//! - Client: one config per (source identity, destination identity),
//!   presenting the source workload's certificate and accepting only a server
//!   whose SAN is the destination workload's identity. Like the real
//!   ztunnel it sends no SNI when it dials the destination workload's own
//!   IP; it sends one only as a hint where that IP cannot name the workload
//!   (process mode: a node address, or a loopback IP shared by workloads).
//!
//! Both offer TLS 1.3 only, so an older peer fails in the handshake, and set
//! ALPN `h2`; [`check_session`] still refuses, on both sides, any session
//! that is not TLS 1.3 with `h2` before a byte of HTTP/2 flows (a peer may
//! offer no ALPN at all).

use std::sync::Arc;

use meshid_common::tls::{ClientAuth, PeerMatcher, TlsVersions};
use meshid_common::{CredentialsRx, SpiffeId};

use crate::certs::Entry;
use crate::error::Result;

pub const ALPN_H2: &[u8] = b"h2";

/// The HBONE server config of `entry`'s identity (built once per identity):
/// clients of `trust_domain` or of one of its `aliases` (same roots).
pub fn server_config(
    entry: &Entry,
    trust_domain: &str,
    aliases: &[String],
) -> Result<Arc<rustls::ServerConfig>> {
    if let Some(c) = entry.server_config.get() {
        return Ok(c.clone());
    }
    let mut config = meshid_common::tls::server_config_for(
        entry.credentials(),
        PeerMatcher::TrustDomain(trust_domain.to_owned()).with_aliases(aliases),
        ClientAuth::Required,
        TlsVersions::Tls13Only,
    )?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let config = Arc::new(config);
    Ok(entry.server_config.get_or_init(|| config).clone())
}

/// An HBONE client config presenting `source`'s certificate to a server that
/// must be `destination`, sending SNI only when `send_sni`.
pub fn client_config(
    source: CredentialsRx,
    destination: &SpiffeId,
    send_sni: bool,
) -> Result<rustls::ClientConfig> {
    let mut config = meshid_common::tls::client_config_for(
        source,
        PeerMatcher::Exact(destination.clone()),
        TlsVersions::Tls13Only,
    )?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = send_sni;
    Ok(config)
}

/// Ok when the session is TLS 1.3 with ALPN `h2`; else why not.
pub fn check_session(state: &rustls::CommonState) -> std::result::Result<(), String> {
    if state.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err(format!(
            "negotiated {:?}; HBONE requires TLS 1.3",
            state.protocol_version()
        ));
    }
    if state.alpn_protocol() != Some(ALPN_H2) {
        return Err(format!(
            "negotiated ALPN {:?}; HBONE requires h2",
            state.alpn_protocol().map(String::from_utf8_lossy)
        ));
    }
    Ok(())
}

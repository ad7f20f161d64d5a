//! The inbound listener in each PeerAuthentication mode, the allow-list,
//! policy reloads, and bad input.

use std::time::{Duration, SystemTime};

use meshid_common::SpiffeId;
use meshid_common::cert::LeafSpec;
use meshid_common::testing::TestPki;
use meshid_envoy_shim::{AllowList, ConnResult, Mode, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn strict_accepts_a_mesh_peer_and_refuses_plaintext() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();

    let mut tls = mtls(addr, creds(&pki, "client"), &shim.id).await.unwrap();
    assert_eq!(
        roundtrip(&mut tls, b"hello mesh").await.unwrap(),
        b"hello mesh"
    );
    drop(tls);
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::Ok, "{ev:?}");
    assert_eq!(ev.mode, "STRICT");
    assert!(ev.tls);
    assert_eq!(ev.peer_id, Some(pki.id("default", "client")));
    assert_eq!(ev.bytes_received, 10);
    assert_eq!(ev.bytes_sent, 10);

    let mut plain = TcpStream::connect(addr).await.unwrap();
    assert_refused(&mut plain, b"GET / HTTP/1.1\r\n\r\n").await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::HandshakeFailed, "{ev:?}");
    assert_eq!(ev.failure, Some("not_tls"), "{ev:?}");
}

#[tokio::test]
async fn permissive_accepts_mtls_and_plaintext_on_one_port() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Permissive, |_, _| {}).await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();

    let mut plain = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut plain, b"plain").await.unwrap(), b"plain");
    drop(plain);
    let ev = shim.event().await;
    assert_eq!(
        (ev.result, ev.tls, ev.mode),
        (ConnResult::Ok, false, "PERMISSIVE"),
        "{ev:?}"
    );
    assert_eq!(ev.peer_id, None);

    let mut tls = mtls(addr, creds(&pki, "client"), &shim.id).await.unwrap();
    assert_eq!(roundtrip(&mut tls, b"secret").await.unwrap(), b"secret");
    drop(tls);
    let ev = shim.event().await;
    assert_eq!((ev.result, ev.tls), (ConnResult::Ok, true), "{ev:?}");
    assert_eq!(ev.peer_id, Some(pki.id("default", "client")));
}

#[tokio::test]
async fn disable_is_plaintext_only() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Disable, |_, _| {}).await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();
    let mut plain = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut plain, b"plain").await.unwrap(), b"plain");
    drop(plain);
    let ev = shim.event().await;
    assert_eq!(
        (ev.result, ev.tls, ev.mode),
        (ConnResult::Ok, false, "DISABLE"),
        "{ev:?}"
    );
    // A TLS client reaches the app's plaintext socket (the echo sends its
    // ClientHello back), so no handshake completes.
    assert!(mtls(addr, creds(&pki, "client"), &shim.id).await.is_err());
}

#[tokio::test]
async fn allow_list_denies_a_peer_by_name_and_admits_listed_ones() {
    let pki = pki();
    let policy = Policy {
        mode: Mode::Strict,
        allow: Some(AllowList {
            principals: vec![pki.id("default", "client")],
            namespaces: vec!["monitoring".into()],
        }),
    };
    let mut shim = Shim::start_as(&pki, "server", Some(policy), |_, _| {}).await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();

    let mut ok = mtls(addr, creds(&pki, "client"), &shim.id).await.unwrap();
    assert_eq!(roundtrip(&mut ok, b"in").await.unwrap(), b"in");
    drop(ok);
    assert_eq!(shim.event().await.result, ConnResult::Ok);

    let (_t, mon) = pki.channel("monitoring", "prometheus").unwrap();
    let mut ok = mtls(addr, mon, &shim.id).await.unwrap();
    assert_eq!(roundtrip(&mut ok, b"ns").await.unwrap(), b"ns");
    drop(ok);
    assert_eq!(shim.event().await.result, ConnResult::Ok);

    let mut denied = mtls(addr, creds(&pki, "stranger"), &shim.id).await.unwrap();
    assert_refused(&mut denied, b"let me in").await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::Denied, "{ev:?}");
    assert_eq!(ev.peer_id, Some(pki.id("default", "stranger")));
    let reason = ev.reason.unwrap();
    assert!(
        reason.contains("spiffe://cluster.local/ns/default/sa/stranger"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_policy_file_change_switches_permissive_to_strict_for_new_connections() {
    let pki = pki();
    let mut shim = Shim::start_as(&pki, "server", None, |c, dir| {
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "mtls:\n  mode: PERMISSIVE\n").unwrap();
        c.policy_file = Some(path);
    })
    .await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();
    let mut old = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut old, b"before").await.unwrap(), b"before");

    let mut changes = shim.app.policy().subscribe();
    std::fs::write(
        shim.dir.path().join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    tokio::time::timeout(WAIT, changes.wait_for(|p| p.mode == Mode::Strict))
        .await
        .unwrap()
        .unwrap();

    let mut plain = TcpStream::connect(addr).await.unwrap();
    assert_refused(&mut plain, b"after").await;
    let ev = shim.event().await;
    assert_eq!(
        (ev.mode, ev.result),
        ("STRICT", ConnResult::HandshakeFailed),
        "{ev:?}"
    );
    let mut tls = mtls(addr, creds(&pki, "client"), &shim.id).await.unwrap();
    assert_eq!(roundtrip(&mut tls, b"mtls").await.unwrap(), b"mtls");
    // The connection accepted under PERMISSIVE carries on.
    assert_eq!(
        roundtrip(&mut old, b"still here").await.unwrap(),
        b"still here"
    );

    // A broken file keeps the policy in force.
    std::fs::write(
        shim.dir.path().join("policy.yaml"),
        "mtls: {mode: SOMETIMES}\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(shim.app.policy().current().mode, Mode::Strict);
}

/// A ClientHello as rustls would send it, to cut short.
fn client_hello(pki: &TestPki, server: &SpiffeId) -> Vec<u8> {
    let config = meshid_common::tls::client_config(
        creds(pki, "client"),
        meshid_common::PeerMatcher::Exact(server.clone()),
    )
    .unwrap();
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        meshid_common::tls::sni_for(server),
    )
    .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test]
async fn bad_input_closes_that_connection_with_a_reason_and_others_carry_on() {
    let pki = pki();
    let policy = Policy {
        mode: Mode::Strict,
        allow: Some(AllowList {
            principals: vec![pki.id("default", "client")],
            namespaces: vec![],
        }),
    };
    let mut shim = Shim::start_as(&pki, "server", Some(policy), |c, _| {
        c.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();
    let server = shim.id.clone();

    // A connection that stays open and working through all of it.
    let mut steady = mtls(addr, creds(&pki, "client"), &server).await.unwrap();
    assert_eq!(roundtrip(&mut steady, b"start").await.unwrap(), b"start");

    let hello = client_hello(&pki, &server);
    let now = SystemTime::now();
    let other_root = TestPki::new(TD).unwrap();
    let cases: Vec<(&str, &str)> = vec![
        ("garbage bytes", "not_tls"),
        ("partial ClientHello then close", "eof"),
        ("handshake that never finishes", "timeout"),
        ("client cert from another root", "bad_signature"),
        ("expired client cert", "expired"),
        ("SVID of another trust domain", "foreign_trust_domain"),
        ("cert without a URI SAN", "no_spiffe_id"),
        ("peer not on the allow-list", "not_allowed"),
    ];
    for (case, expected) in cases {
        match case {
            "garbage bytes" => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                assert_refused(&mut s, &[0x42; 300]).await;
            }
            "partial ClientHello then close" => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&hello[..hello.len() / 2]).await.unwrap();
                s.shutdown().await.unwrap();
                let mut buf = [0u8; 16];
                let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap();
            }
            "handshake that never finishes" => {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&hello[..hello.len() / 2]).await.unwrap();
                let mut buf = [0u8; 16];
                // The shim gives up after its 500 ms handshake timeout.
                let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                    .await
                    .expect("closed by the shim");
                assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
            }
            "client cert from another root" => {
                let svid = other_root.svid("default", "client").unwrap();
                let (_, rx) = tokio::sync::watch::channel(Some(meshid_common::Credentials {
                    svid: std::sync::Arc::new(svid),
                    bundle: std::sync::Arc::new(pki.bundle()),
                }));
                refused_tls(addr, rx, &server).await;
            }
            "expired client cert" => {
                let svid = pki
                    .svid_at(
                        &pki.id("default", "client"),
                        Duration::from_secs(60),
                        now - Duration::from_secs(3600),
                    )
                    .unwrap();
                let (_, rx) = tokio::sync::watch::channel(Some(pki.credentials(svid)));
                refused_tls(addr, rx, &server).await;
            }
            "SVID of another trust domain" => {
                let evil = SpiffeId::parse("spiffe://evil.example/ns/default/sa/client").unwrap();
                let svid = pki.svid_at(&evil, Duration::from_secs(600), now).unwrap();
                let (_, rx) = tokio::sync::watch::channel(Some(pki.credentials(svid)));
                refused_tls(addr, rx, &server).await;
            }
            "cert without a URI SAN" => {
                let spec = LeafSpec {
                    dns_names: vec!["client.example".into()],
                    ..LeafSpec::new(Duration::from_secs(600))
                };
                let config = raw_client_config(&pki, &server, &spec, now);
                match mtls_with(addr, config, &server).await {
                    Err(_) => {}
                    Ok(mut s) => assert_refused(&mut s, b"x").await,
                }
            }
            "peer not on the allow-list" => {
                let mut s = mtls(addr, creds(&pki, "stranger"), &server).await.unwrap();
                assert_refused(&mut s, b"x").await;
            }
            _ => unreachable!(),
        }
        let ev = shim.event().await;
        assert_eq!(ev.failure, Some(expected), "{case}: {ev:?}");
        assert_ne!(ev.result, ConnResult::Ok, "{case}");
        let reason = ev.reason.clone().unwrap_or_default();
        assert!(!reason.is_empty(), "{case}: no reason");
        match expected {
            "foreign_trust_domain" => assert!(reason.contains("evil.example"), "{case}: {reason}"),
            "not_allowed" => assert!(reason.contains("sa/stranger"), "{case}: {reason}"),
            "no_spiffe_id" => assert!(reason.contains("SPIFFE ID"), "{case}: {reason}"),
            _ => {}
        }
        // The proxy still serves a good peer, and the open connection still works.
        let mut good = mtls(addr, creds(&pki, "client"), &server).await.unwrap();
        assert_eq!(
            roundtrip(&mut good, case.as_bytes()).await.unwrap(),
            case.as_bytes(),
            "{case}"
        );
        drop(good);
        assert_eq!(shim.event().await.result, ConnResult::Ok, "{case}");
        assert_eq!(
            roundtrip(&mut steady, b"alive").await.unwrap(),
            b"alive",
            "{case}"
        );
    }

    let (_, metrics) = http_get(shim.app.admin_addr(), "/metrics").await;
    for reason in [
        "not_tls",
        "eof",
        "timeout",
        "bad_signature",
        "expired",
        "foreign_trust_domain",
        "no_spiffe_id",
    ] {
        let line = format!(
            "meshid_shim_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}} 1"
        );
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    assert!(
        metrics.contains("meshid_shim_connections_total{direction=\"inbound\",mode=\"STRICT\",result=\"denied\"} 1"),
        "{metrics}"
    );
}

/// The handshake fails, or the connection is closed right after it (TLS 1.3
/// clients finish before the server has judged their certificate).
async fn refused_tls(
    addr: std::net::SocketAddr,
    client: meshid_common::CredentialsRx,
    server: &SpiffeId,
) {
    match mtls(addr, client, server).await {
        Err(_) => {}
        Ok(mut s) => assert_refused(&mut s, b"x").await,
    }
}

#[tokio::test]
async fn nothing_is_accepted_before_both_secrets_arrive() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sds.sock");
    // Only `default` at first: the scripted peer holds `ROOTCA` back.
    let sds = ScriptedSds::start(&sock).await.unwrap();
    let svid = pki.svid("default", "server").unwrap();
    sds.set_secret(meshid_common::sds::tls_certificate("default", &svid));
    let echo = echo_server().await;
    let mut config = meshid_envoy_shim::Config::local(sock, echo);
    config.default_mode = Mode::Permissive;
    let app = meshid_envoy_shim::App::build(config).await.unwrap();
    let mut events = app.access_log();
    sds.wait_for_request(WAIT, |r| {
        r.resource_names == ["default"] && !r.response_nonce.is_empty()
    })
    .await
    .unwrap();

    let (code, body) = http_get(app.admin_addr(), "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("ROOTCA") && !body.contains("default"),
        "{body}"
    );
    let mut plain = TcpStream::connect(app.inbound_addr()).await.unwrap();
    assert_refused(&mut plain, b"too early").await;
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.result, ConnResult::NotReady, "{ev:?}");

    sds.set_secret(meshid_common::sds::validation_context(
        "ROOTCA",
        &pki.bundle(),
    ));
    assert!(app.ready(WAIT).await);
    assert_eq!(http_get(app.admin_addr(), "/ready").await.0, 200);
    let mut plain = TcpStream::connect(app.inbound_addr()).await.unwrap();
    assert_eq!(roundtrip(&mut plain, b"now").await.unwrap(), b"now");
}

#[tokio::test]
async fn connection_limit_refuses_the_overflow() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Permissive, |c, _| c.max_connections = 1).await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut first, b"one").await.unwrap(), b"one");
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert_refused(&mut second, b"two").await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::Overflow, "{ev:?}");
    drop(first);
    assert_eq!(shim.event().await.result, ConnResult::Ok);
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut third, b"three").await.unwrap(), b"three");
}

#[tokio::test]
async fn half_close_passes_through_mtls() {
    let pki = pki();
    let mut shim = Shim::start(&pki, Mode::Strict, |_, _| {}).await;
    shim.ready().await;
    let mut tls = mtls(shim.app.inbound_addr(), creds(&pki, "client"), &shim.id)
        .await
        .unwrap();
    let payload = vec![7u8; 200_000];
    tls.write_all(&payload).await.unwrap();
    // Done sending: close_notify + FIN. The app still answers afterwards.
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), payload.len());
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::Ok, "{ev:?}");
    assert_eq!((ev.bytes_received, ev.bytes_sent), (200_000, 200_000));
}

#[tokio::test]
async fn an_app_that_is_down_is_a_clean_error() {
    let pki = pki();
    // A port with nothing listening (reserved: no other process is handed it).
    let dead = meshid_common::testing::ports::reserve().unwrap();
    let mut shim = Shim::start(&pki, Mode::Strict, |c, _| c.app_addr = dead).await;
    shim.ready().await;
    let mut tls = mtls(shim.app.inbound_addr(), creds(&pki, "client"), &shim.id)
        .await
        .unwrap();
    assert_refused(&mut tls, b"anyone?").await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::UpstreamUnavailable, "{ev:?}");
    assert!(ev.reason.unwrap().contains(&dead.to_string()));
    assert_eq!(ev.peer_id, Some(pki.id("default", "client")));
}

#[tokio::test]
async fn shutdown_drains_open_connections() {
    let pki = pki();
    let shim = Shim::start(&pki, Mode::Permissive, |c, _| {
        c.drain_grace = Duration::from_millis(300)
    })
    .await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut open, b"x").await.unwrap(), b"x");
    let mut events = shim.app.access_log();
    let started = std::time::Instant::now();
    shim.app.shutdown().await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.result, ConnResult::Drained, "{ev:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

/// Credentials of `spiffe://<td>/ns/default/sa/<sa>`, signed by `pki`'s root.
fn creds_in(pki: &TestPki, td: &str, sa: &str) -> meshid_common::CredentialsRx {
    let id = SpiffeId::parse(&format!("spiffe://{td}/ns/default/sa/{sa}")).unwrap();
    let svid = pki
        .svid_at(&id, Duration::from_secs(600), SystemTime::now())
        .unwrap();
    tokio::sync::watch::channel(Some(pki.credentials(svid))).1
}

#[tokio::test]
async fn strict_accepts_an_alias_domain_peer_as_its_twin_and_refuses_a_foreign_domain() {
    let pki = pki();
    // The allow-list names the primary-domain identity only.
    let policy = Policy {
        mode: Mode::Strict,
        allow: Some(AllowList {
            principals: vec![pki.id("default", "client")],
            namespaces: vec![],
        }),
    };
    let mut shim = Shim::start_as(&pki, "server", Some(policy), |c, _| {
        c.trust_domain_aliases = vec!["old.example".into()];
    })
    .await;
    shim.ready().await;
    let addr = shim.app.inbound_addr();

    let alias_client = SpiffeId::parse("spiffe://old.example/ns/default/sa/client").unwrap();
    let mut tls = mtls(addr, creds_in(&pki, "old.example", "client"), &shim.id)
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut tls, b"alias").await.unwrap(), b"alias");
    drop(tls);
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::Ok, "{ev:?}");
    assert_eq!(ev.peer_id, Some(alias_client));

    // The alias twin of an unlisted identity is still denied by name.
    let mut denied = mtls(addr, creds_in(&pki, "old.example", "stranger"), &shim.id)
        .await
        .unwrap();
    assert_refused(&mut denied, b"let me in").await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::Denied, "{ev:?}");
    assert!(
        ev.reason
            .as_deref()
            .unwrap_or_default()
            .contains("old.example/ns/default/sa/stranger"),
        "{ev:?}"
    );

    // Same root, but a trust domain that is no alias: refused in the handshake.
    refused_tls(addr, creds_in(&pki, "evil.example", "client"), &shim.id).await;
    let ev = shim.event().await;
    assert_eq!(ev.result, ConnResult::HandshakeFailed, "{ev:?}");
    assert_eq!(ev.failure, Some("foreign_trust_domain"), "{ev:?}");
}

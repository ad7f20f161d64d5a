//! Two ztunnels in one process: workloads on node-a reach workloads on
//! node-b through HBONE, with each side presenting the workload's own
//! certificate, and the HBONE server refuses what it must.

use crate::support;

use std::time::{Duration, SystemTime};

use http::Method;
use meshid_common::registry::Registry;
use meshid_ztunnel::certs::CertState;
use meshid_ztunnel::policy::{Allow, Mode, PolicyRule};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Topology {
    mesh: Mesh,
    cache: std::net::SocketAddr,
    db: std::net::SocketAddr,
    locked: std::net::SocketAddr,
    down: std::net::SocketAddr,
    legacy: std::net::SocketAddr,
}

/// node-a: web-0 (sa web), cache-0 (sa cache). node-b: db-0 (sa db), locked-0 (only sa admin
/// may call it), down-0 (nothing listens), legacy-0 (PERMISSIVE).
async fn topology() -> Topology {
    let web = echo_server("127.0.0.1").await;
    let cache = echo_server("127.0.0.1").await;
    let db = echo_server("127.0.0.2").await;
    let locked = echo_server("127.0.0.2").await;
    let down = closed_port("127.0.0.2").await;
    let legacy = echo_server("127.0.0.2").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", web));
    registry.upsert_workload(pod("cache-0", "cache", "node-a", cache));
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    registry.upsert_workload(pod("locked-0", "locked", "node-b", locked));
    registry.upsert_workload(pod("down-0", "down", "node-b", down));
    registry.upsert_workload(pod("legacy-0", "legacy", "node-b", legacy));
    let policies = vec![
        PolicyRule {
            namespace: "default".into(),
            workload: Some("locked-0".into()),
            mode: Mode::Strict,
            allow: Some(Allow {
                ids: vec![sa_id("admin")],
                namespaces: vec![],
            }),
        },
        PolicyRule {
            namespace: "default".into(),
            workload: Some("legacy-0".into()),
            mode: Mode::Permissive,
            allow: None,
        },
    ];
    let mesh = Mesh::start(registry, policies, Duration::from_secs(3600)).await;
    Topology {
        mesh,
        cache,
        db,
        locked,
        down,
        legacy,
    }
}

fn sa_id(sa: &str) -> meshid_common::SpiffeId {
    meshid_common::SpiffeId::for_service_account(TD, "default", sa).unwrap()
}

#[tokio::test]
async fn a_node_a_workload_reaches_a_node_b_workload_as_itself() {
    let t = topology().await;
    let m = &t.mesh;
    let route = m.route_a("web-0", t.db).await;
    // Several connections at once share one mTLS connection.
    let mut tasks = Vec::new();
    for i in 0..10 {
        tasks.push(tokio::spawn(async move {
            let msg = format!("hello {i}");
            let back = echo_through(route, msg.as_bytes()).await.unwrap();
            assert_eq!(back, msg.as_bytes());
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let opened = m.a.metrics().hbone_pool_connections.get();
    assert_eq!(opened, 1, "10 streams over one HBONE connection");

    // node-b saw web's identity, not a ztunnel's.
    wait_until("10 inbound records", || {
        m.b.recent_connections().len() == 10
    })
    .await;
    let seen = m.b.recent_connections();
    assert_eq!(seen.len(), 10);
    for c in &seen {
        assert_eq!(c.direction, "inbound");
        assert_eq!(c.src_identity.as_deref(), Some(m.id("web").as_str()));
        assert_eq!(c.dst_identity, m.id("db").as_str());
        assert_eq!(c.forwarded.as_deref(), Some("for=\"127.0.0.1\""));
        assert_eq!(c.bytes_sent, c.bytes_received);
    }
    let out = m.a.recent_connections();
    assert!(
        out.iter()
            .all(|c| c.direction == "outbound" && c.error.is_none())
    );
    // Both ztunnels count the connections as istio/ztunnel labels them:
    // node-a as the source's reporter, node-b as the destination's, each
    // with both workloads and the identities.
    let workloads = concat!(
        "source_workload=\"web-0\",source_canonical_service=\"web-0\",",
        "source_canonical_revision=\"latest\",source_workload_namespace=\"default\",",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/web\","
    );
    let destination = concat!(
        "destination_workload=\"db-0\",destination_canonical_service=\"db-0\",",
        "destination_canonical_revision=\"latest\",destination_workload_namespace=\"default\",",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/db\","
    );
    let tail =
        "request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"}";
    wait_until("10 outbound connections closed", || {
        m.a.recent_connections().len() == 10
    })
    .await;
    for (ztunnel, reporter) in [(&m.a, "source"), (&m.b, "destination")] {
        let metrics = ztunnel.metrics().render();
        for name in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            let series = metrics
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{reporter=\"{reporter}\",")))
                .unwrap_or_else(|| panic!("no {name} reported by {reporter}: {metrics}"));
            assert!(series.contains(workloads), "{series}");
            assert!(series.contains(destination), "{series}");
            assert!(series.ends_with(&format!("{tail} 10")), "{series}");
        }
        // Each echo sent back what it got: both byte counts equal.
        let bytes = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{reporter=\"{reporter}\",")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} reported by {reporter}: {metrics}"))
        };
        let sent = bytes("istio_tcp_sent_bytes_total");
        assert!(sent > 0);
        assert_eq!(sent, bytes("istio_tcp_received_bytes_total"));
    }
    let metrics = m.b.metrics().render();
    assert!(
        metrics.contains("ztunnel_hbone_responses_total{code=\"200\"} 10"),
        "{metrics}"
    );
}

/// One connection whose request (7 bytes) and response (2 bytes) differ:
/// `istio_tcp_received_bytes` counts what the source sent,
/// `istio_tcp_sent_bytes` what came back, as Istio's proxies count them.
#[tokio::test]
async fn byte_counters_follow_istio_request_and_response_sides() {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        s.write_all(b"ok").await.unwrap();
        s.shutdown().await.unwrap();
    });
    let client_addr = echo_server("127.0.0.1").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod(
        "client-5f7d9c8b6-q2w3e",
        "client",
        "node-a",
        client_addr,
    ));
    registry.upsert_workload(pod("server-0", "server", "node-b", server));
    let m = Mesh::start(registry, vec![], Duration::from_secs(3600)).await;
    let route = m.route_a("client-5f7d9c8b6-q2w3e", server).await;
    assert_eq!(echo_through(route, b"request").await.unwrap(), b"ok");
    wait_until("both sides to log the connection", || {
        m.a.recent_connections().len() == 1 && m.b.recent_connections().len() == 1
    })
    .await;
    for (ztunnel, reporter) in [(&m.a, "source"), (&m.b, "destination")] {
        let metrics = ztunnel.metrics().render();
        let value = |name: &str| {
            let series = metrics
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{reporter=\"{reporter}\",")))
                .unwrap_or_else(|| panic!("no {name} reported by {reporter}: {metrics}"));
            // The Deployment's pod is counted under its Deployment's name.
            assert!(
                series.contains("source_workload=\"client\",")
                    && series.contains("destination_workload=\"server-0\","),
                "{series}"
            );
            series.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(value("istio_tcp_received_bytes_total"), 7, "{reporter}");
        assert_eq!(value("istio_tcp_sent_bytes_total"), 2, "{reporter}");
    }
}

#[tokio::test]
async fn the_server_presents_the_dialled_workloads_cert_and_checks_the_client() {
    let t = topology().await;
    let m = &t.mesh;
    let web = m.pki.svid("default", "web").unwrap();
    // The server must present db's identity when db is dialled...
    let mut h = raw_hbone(&m.pki, web, &m.id("db"), m.b.hbone_addr())
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.db.to_string()).await,
        200
    );
    // ...and locked's when locked is dialled (the client checks the SAN).
    let web = m.pki.svid("default", "web").unwrap();
    let mut h = raw_hbone(&m.pki, web, &m.id("locked"), m.b.hbone_addr())
        .await
        .unwrap();
    // The policy of locked-0 lets only sa admin in.
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.locked.to_string()).await,
        401
    );
    let admin = m.pki.svid("default", "admin").unwrap();
    let mut h = raw_hbone(&m.pki, admin, &m.id("locked"), m.b.hbone_addr())
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.locked.to_string()).await,
        200
    );
}

#[tokio::test]
async fn a_client_in_a_trust_domain_alias_is_served_as_its_primary_twin() {
    let db = echo_server("127.0.0.2").await;
    let locked = echo_server("127.0.0.2").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    registry.upsert_workload(pod("locked-0", "locked", "node-b", locked));
    let policies = vec![PolicyRule {
        namespace: "default".into(),
        workload: Some("locked-0".into()),
        mode: Mode::Strict,
        allow: Some(Allow {
            ids: vec![sa_id("admin")],
            namespaces: vec![],
        }),
    }];
    let m = Mesh::start_with(registry, policies, Duration::from_secs(3600), |c| {
        c.trust_domain_aliases = vec!["old.example".into()];
    })
    .await;
    let b = m.b.hbone_addr();
    // Same root; the SVID names the alias trust domain (a peer not yet moved).
    let svid_in = |td: &str, sa: &str| {
        let id =
            meshid_common::SpiffeId::parse(&format!("spiffe://{td}/ns/default/sa/{sa}")).unwrap();
        m.pki
            .svid_at(&id, Duration::from_secs(600), SystemTime::now())
            .unwrap()
    };
    let mut h = raw_hbone(&m.pki, svid_in("old.example", "web"), &m.id("db"), b)
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &db.to_string()).await,
        200
    );
    // The allow-list names spiffe://cluster.local/…/sa/admin: its alias twin
    // is in, another alias identity is not.
    let mut h = raw_hbone(&m.pki, svid_in("old.example", "admin"), &m.id("locked"), b)
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &locked.to_string()).await,
        200
    );
    let mut h = raw_hbone(&m.pki, svid_in("old.example", "web"), &m.id("locked"), b)
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &locked.to_string()).await,
        401
    );
    // A trust domain that is no alias still gets no tunnel.
    let refused = match raw_hbone(&m.pki, svid_in("evil.example", "web"), &m.id("db"), b).await {
        Err(_) => true,
        Ok(mut h) => {
            let req = http::Request::builder()
                .method(Method::CONNECT)
                .uri(db.to_string())
                .body(http_body_util::Empty::new())
                .unwrap();
            h.send_request(req).await.is_err()
        }
    };
    assert!(refused, "a foreign trust domain must not get a tunnel");
}

#[tokio::test]
async fn bad_input_is_refused_with_the_right_answer() {
    let t = topology().await;
    let m = &t.mesh;
    let b = m.b.hbone_addr();
    let web = || m.pki.svid("default", "web").unwrap();

    let mut h = raw_hbone(&m.pki, web(), &m.id("db"), b).await.unwrap();
    // Not CONNECT.
    assert_eq!(
        status_of(&mut h, Method::GET, &format!("https://{}/", t.db)).await,
        400
    );
    // CONNECT to an address with no workload of node-b (web-0 is on node-a).
    let web_addr =
        m.a.directory()
            .by_name("default", "web-0")
            .unwrap()
            .workload
            .socket_addr()
            .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &web_addr.to_string()).await,
        404
    );
    assert_eq!(status_of(&mut h, Method::CONNECT, "127.0.0.2:1").await, 404);
    // CONNECT over db's connection to another workload of the node.
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.legacy.to_string()).await,
        401
    );
    // The workload does not accept the connection.
    let mut h = raw_hbone(&m.pki, web(), &m.id("down"), b).await.unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.down.to_string()).await,
        503
    );

    // Plaintext on the HBONE port: the handshake fails, nothing is served.
    let mut s = TcpStream::connect(b).await.unwrap();
    s.write_all(b"CONNECT 127.0.0.2:80 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server closes");
    assert!(n.is_err() || !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));

    // A client cert of another trust domain (same root, so only the name is wrong).
    let evil = meshid_common::SpiffeId::parse("spiffe://evil.example/ns/default/sa/web").unwrap();
    let evil_svid = m
        .pki
        .svid_at(&evil, Duration::from_secs(600), SystemTime::now())
        .unwrap();
    let refused = match raw_hbone(&m.pki, evil_svid, &m.id("db"), b).await {
        Err(_) => true,
        // TLS 1.3: the client may finish before the server's verdict; the
        // first request then fails.
        Ok(mut h) => {
            let req = http::Request::builder()
                .method(Method::CONNECT)
                .uri(t.db.to_string())
                .body(http_body_util::Empty::new())
                .unwrap();
            h.send_request(req).await.is_err()
        }
    };
    assert!(refused, "a foreign trust domain must not get a tunnel");

    // An identity this ztunnel does not host (web runs on node-a).
    let err = match raw_hbone(&m.pki, web(), &m.id("web"), b).await {
        Err(e) => e,
        Ok(mut h) => {
            let req = http::Request::builder()
                .method(Method::CONNECT)
                .uri(web_addr.to_string())
                .body(http_body_util::Empty::new())
                .unwrap();
            h.send_request(req)
                .await
                .map(|_| ())
                .unwrap_err()
                .to_string()
        }
    };
    assert!(!err.is_empty());
    // The server counts a refusal after the client has seen it.
    wait_until("plaintext, foreign domain, unhosted to be counted", || {
        m.b.metrics().hbone_handshake_failures_total() >= 3
    })
    .await;
    // 127.0.0.2 is shared by node-b's workloads, and web's SNI names none.
    assert_eq!(
        m.b.metrics()
            .hbone_handshake_failures_for("unknown_destination"),
        1
    );
    let metrics = m.b.metrics().render();
    for code in ["400", "404", "401", "503"] {
        assert!(
            metrics.contains(&format!("ztunnel_hbone_responses_total{{code=\"{code}\"}}")),
            "{code}: {metrics}"
        );
    }
}

#[tokio::test]
async fn plaintext_inbound_only_reaches_permissive_workloads() {
    let t = topology().await;
    let m = &t.mesh;
    let plain = m.b.plaintext_addr().unwrap();
    let send = |dst: std::net::SocketAddr| async move {
        let mut s = TcpStream::connect(plain).await.unwrap();
        let header = format!("PROXY TCP4 127.0.0.9 {} 40000 {}\r\n", dst.ip(), dst.port());
        s.write_all(header.as_bytes()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        out
    };
    assert_eq!(
        send(t.legacy).await,
        b"ping",
        "PERMISSIVE accepts plaintext"
    );
    assert!(send(t.db).await.is_empty(), "STRICT refuses plaintext");
    wait_until("a plaintext record", || {
        m.b.recent_connections()
            .iter()
            .any(|c| c.src_identity.is_none() && c.dst_addr == t.legacy)
    })
    .await;
}

#[tokio::test]
async fn certificates_follow_the_registry_and_the_admin_pages_show_them() {
    let mut t = topology().await;
    let m = &mut t.mesh;
    let db = m.id("db");
    assert!(m.b.certs().current(&db).is_some());
    let (status, body) = admin_get(m.b.admin_addr(), "/debug/certs").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(db.as_str()) && body.contains("\"available\""),
        "{body}"
    );
    let (status, _) = admin_get(m.b.admin_addr(), "/ready").await;
    assert_eq!(status, 200);
    let (status, body) = admin_get(m.b.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("ztunnel_workload_certs{state=\"available\"} 4"),
        "{body}"
    );

    // db-0 leaves node-b; a new workload arrives.
    let extra = echo_server("127.0.0.2").await;
    m.update_registry(|r| {
        r.remove_workload("default", "db-0");
        r.upsert_workload(pod("new-0", "new", "node-b", extra));
    });
    let new = m.id("new");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Both nodes poll the registry on their own: node-a must know where the
    // new workload lives before it can tunnel to it.
    while m.b.certs().current(&new).is_none()
        || m.b.certs().entry(&db).is_some()
        || m.a.directory().lookup(extra).is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registry change not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let states: Vec<_> =
        m.b.certs()
            .snapshot()
            .into_iter()
            .map(|s| s.state)
            .collect();
    assert_eq!(states, vec![CertState::Available; 4]);
    // node-a now reaches the new workload, and no longer finds db-0.
    let to_new = m.route_a("web-0", extra).await;
    assert_eq!(echo_through(to_new, b"hi").await.unwrap(), b"hi");
    let to_db = m.route_a("web-0", t.db).await;
    assert!(
        echo_through(to_db, b"hi")
            .await
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test]
async fn a_neighbour_on_the_same_node_is_reached_through_hbone_too() {
    let t = topology().await;
    let m = &t.mesh;
    let route = m.route_a("web-0", t.cache).await;
    assert_eq!(
        echo_through(route, b"next door").await.unwrap(),
        b"next door"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let inbound: Vec<_> =
        m.a.recent_connections()
            .into_iter()
            .filter(|c| c.direction == "inbound")
            .collect();
    assert_eq!(inbound.len(), 1);
    assert_eq!(
        inbound[0].src_identity.as_deref(),
        Some(m.id("web").as_str())
    );
    assert_eq!(inbound[0].dst_identity, m.id("cache").as_str());
    // A source that is not a workload of this node is refused.
    let stranger =
        m.a.add_outbound(&meshid_ztunnel::config::OutboundRoute {
            source: "default/db-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            destination: t.cache,
        })
        .await
        .unwrap();
    assert!(
        echo_through(stranger, b"x")
            .await
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(m.a.metrics().outbound_failures.get(), 1);
    // Nothing expired or closed: the sweep keeps the pooled connection.
    assert_eq!(m.a.pool().sweep(), 0);
    assert_eq!(m.a.pool().open_connections(), 1);
}

#[tokio::test]
async fn no_new_stream_rides_on_an_expired_client_certificate() {
    let t = topology().await;
    let m = &t.mesh;
    let short = m
        .pki
        .svid_at(&m.id("web"), Duration::from_secs(2), SystemTime::now())
        .unwrap();
    let mut h = raw_hbone(&m.pki, short, &m.id("db"), m.b.hbone_addr())
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.db.to_string()).await,
        200
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The TLS session is still up, but its client certificate has expired.
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &t.db.to_string()).await,
        401
    );
}

#[tokio::test]
async fn megabytes_flow_both_ways_under_http2_flow_control() {
    let t = topology().await;
    let route = t.mesh.route_a("web-0", t.db).await;
    let s = TcpStream::connect(route).await.unwrap();
    let (mut r, mut w) = s.into_split();
    const SIZE: usize = 24 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..SIZE / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(SIZE);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .expect("no flow-control stall")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), SIZE);
    assert!(back.chunks(65_536).all(|c| c[250] == 250 && c[251] == 0));
}

/// A log sink for one test: what the ztunnel logs on this thread.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A real ztunnel sends no SNI: it dials `<pod ip>:15008` and expects the
/// server to present the identity of the workload at that address. node-b
/// listens on 0.0.0.0 and hosts db-0 (127.0.0.12) and api-0 (127.0.0.13).
#[tokio::test]
async fn the_server_picks_its_certificate_by_the_dialled_address_without_sni() {
    let logs = LogBuffer::default();
    let sink = logs.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish(),
    );
    meshid_common::tls::install_crypto_provider();
    let web = echo_server("127.0.0.11").await;
    let db = echo_server("127.0.0.12").await;
    let api = echo_server("127.0.0.13").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", web));
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    registry.upsert_workload(pod("api-0", "api", "node-b", api));
    let pki = std::sync::Arc::new(
        meshid_common::testing::TestPki::new(TD)
            .unwrap()
            .with_intermediate()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("registry.json");
    registry.write_atomic(&registry_path).unwrap();
    let ttl = Duration::from_secs(3600);
    let b = meshid_ztunnel::App::build_with_source(
        meshid_ztunnel::Config {
            hbone_addr: "0.0.0.0:0".parse().unwrap(),
            ..config("node-b", "127.0.0.2", &registry_path)
        },
        test_ca(&pki, ttl),
    )
    .await
    .unwrap();
    let a = meshid_ztunnel::App::build_with_source(
        meshid_ztunnel::Config {
            peers: vec![("node-b".into(), b.hbone_addr())],
            ..config("node-a", "127.0.0.1", &registry_path)
        },
        test_ca(&pki, ttl),
    )
    .await
    .unwrap();
    b.wait_ready(Duration::from_secs(20)).await.unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    let port = b.hbone_addr().port();
    let at = |ip: std::net::SocketAddr| std::net::SocketAddr::new(ip.ip(), port);
    let id = |sa: &str| pki.id("default", sa);
    let web_svid = || pki.svid("default", "web").unwrap();

    // No SNI: the dialled address alone names the workload.
    for (addr, sa) in [(db, "db"), (api, "api")] {
        let mut h = raw_hbone_sni(&pki, web_svid(), &id(sa), at(addr), None)
            .await
            .unwrap_or_else(|e| panic!("no-SNI handshake to {sa} at {}: {e}", at(addr)));
        assert_eq!(
            status_of(&mut h, Method::CONNECT, &addr.to_string()).await,
            200
        );
    }

    // SNI is a hint only: the address wins (as in istio/ztunnel), so a
    // client dialling db's IP with api's SNI still gets db...
    let mut h = raw_hbone_sni(&pki, web_svid(), &id("db"), at(db), Some(&id("api")))
        .await
        .unwrap();
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &db.to_string()).await,
        200
    );
    // ...and one that insists on api there fails its own SAN check.
    assert!(
        raw_hbone_sni(&pki, web_svid(), &id("api"), at(db), Some(&id("api")))
            .await
            .is_err(),
        "db's address must present db's certificate"
    );

    // An address node-b does not host, no SNI: refused in the handshake,
    // counted and logged with the address.
    let unhosted: std::net::SocketAddr = format!("127.0.0.99:{port}").parse().unwrap();
    let refused = match raw_hbone_sni(&pki, web_svid(), &id("db"), unhosted, None).await {
        Err(_) => true,
        Ok(mut h) => {
            let req = http::Request::builder()
                .method(Method::CONNECT)
                .uri(db.to_string())
                .body(http_body_util::Empty::new())
                .unwrap();
            h.send_request(req).await.is_err()
        }
    };
    assert!(refused, "an unhosted address must not get a tunnel");
    wait_until("the refusal to be counted", || {
        b.metrics()
            .hbone_handshake_failures_for("unknown_destination")
            == 1
    })
    .await;
    assert!(
        b.metrics()
            .render()
            .contains("ztunnel_hbone_handshake_failures_total{reason=\"unknown_destination\"} 1"),
        "{}",
        b.metrics().render()
    );
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("HBONE handshake refused") && l.contains(&unhosted.to_string())),
        "the refusal log names the dialled address: {text}"
    );

    // node-a's client dials db's IP on node-b's HBONE port, without SNI.
    let route = a
        .add_outbound(&meshid_ztunnel::config::OutboundRoute {
            source: "default/web-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            destination: db,
        })
        .await
        .unwrap();
    assert_eq!(echo_through(route, b"hi db").await.unwrap(), b"hi db");
    wait_until("the inbound record", || {
        b.recent_connections().iter().any(|c| {
            c.src_identity.as_deref() == Some(id("web").as_str())
                && c.dst_identity == id("db").as_str()
        })
    })
    .await;
}

/// The client side: dialling a destination workload's own IP, the ztunnel
/// sends no SNI (as istio/ztunnel, whose ClientHello names nothing). A fake
/// HBONE server at db's IP records the ClientHello.
#[tokio::test]
async fn the_client_sends_no_sni_when_it_dials_the_workloads_ip() {
    meshid_common::tls::install_crypto_provider();
    let web = echo_server("127.0.0.21").await;
    let fake = tokio::net::TcpListener::bind("127.0.0.22:0").await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    // db-0 is registered on its own IP; node-b's "ztunnel" listens there.
    let db: std::net::SocketAddr = "127.0.0.22:8080".parse().unwrap();
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", web));
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    let pki = std::sync::Arc::new(meshid_common::testing::TestPki::new(TD).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("registry.json");
    registry.write_atomic(&registry_path).unwrap();
    let a = meshid_ztunnel::App::build_with_source(
        meshid_ztunnel::Config {
            peers: vec![("node-b".into(), fake_addr)],
            ..config("node-a", "127.0.0.1", &registry_path)
        },
        test_ca(&pki, Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    let hello = tokio::spawn(async move {
        let (tcp, _) = fake.accept().await.unwrap();
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .unwrap();
        start.client_hello().server_name().map(str::to_owned)
    });
    let route = a
        .add_outbound(&meshid_ztunnel::config::OutboundRoute {
            source: "default/web-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            destination: db,
        })
        .await
        .unwrap();
    // The fake server never answers: the connection fails, the hello is read.
    let _ = tokio::time::timeout(Duration::from_secs(5), echo_through(route, b"x")).await;
    let sni = tokio::time::timeout(Duration::from_secs(10), hello)
        .await
        .expect("the client dialled db's IP")
        .unwrap();
    assert_eq!(sni, None, "no SNI when the dialled IP is the workload's");
}

/// Process mode: node-b's HBONE listener is bound to the node's address
/// (127.0.0.32), which db-0 happens to share, while api-0 has its own IP.
/// A client dialling the node address with api's SNI must get api, not db;
/// one that sends no SNI gets the workload at the address.
#[tokio::test]
async fn a_node_address_shared_with_one_workload_still_honours_the_sni() {
    meshid_common::tls::install_crypto_provider();
    let web = echo_server("127.0.0.31").await;
    let db = echo_server("127.0.0.32").await;
    let api = echo_server("127.0.0.33").await;
    let mut registry = Registry::default();
    registry.upsert_workload(pod("web-0", "web", "node-a", web));
    registry.upsert_workload(pod("db-0", "db", "node-b", db));
    registry.upsert_workload(pod("api-0", "api", "node-b", api));
    let pki = std::sync::Arc::new(meshid_common::testing::TestPki::new(TD).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let registry_path = dir.path().join("registry.json");
    registry.write_atomic(&registry_path).unwrap();
    let ttl = Duration::from_secs(3600);
    let b = meshid_ztunnel::App::build_with_source(
        config("node-b", "127.0.0.32", &registry_path),
        test_ca(&pki, ttl),
    )
    .await
    .unwrap();
    let a = meshid_ztunnel::App::build_with_source(
        meshid_ztunnel::Config {
            peers: vec![("node-b".into(), b.hbone_addr())],
            ..config("node-a", "127.0.0.1", &registry_path)
        },
        test_ca(&pki, ttl),
    )
    .await
    .unwrap();
    b.wait_ready(Duration::from_secs(20)).await.unwrap();
    a.wait_ready(Duration::from_secs(20)).await.unwrap();
    let id = |sa: &str| pki.id("default", sa);
    let web_svid = || pki.svid("default", "web").unwrap();
    let node_b = b.hbone_addr();

    let mut h = raw_hbone_sni(&pki, web_svid(), &id("api"), node_b, Some(&id("api")))
        .await
        .expect("api's SNI at the node address gets api's certificate");
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &api.to_string()).await,
        200
    );
    let mut h = raw_hbone_sni(&pki, web_svid(), &id("db"), node_b, None)
        .await
        .expect("no SNI at db's address gets db's certificate");
    assert_eq!(
        status_of(&mut h, Method::CONNECT, &db.to_string()).await,
        200
    );
    // node-a dials node-b's configured address for api, with api's SNI.
    let route = a
        .add_outbound(&meshid_ztunnel::config::OutboundRoute {
            source: "default/web-0".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            destination: api,
        })
        .await
        .unwrap();
    assert_eq!(echo_through(route, b"hi api").await.unwrap(), b"hi api");
}

#[tokio::test]
async fn a_renewed_source_certificate_moves_new_streams_to_a_new_connection() {
    let t = topology().await;
    let m = &t.mesh;
    let route = m.route_a("web-0", t.db).await;
    let opened = || m.a.metrics().hbone_pool_connections.get();
    assert_eq!(echo_through(route, b"one").await.unwrap(), b"one");
    assert_eq!(echo_through(route, b"two").await.unwrap(), b"two");
    let before = opened();
    assert!(before >= 1, "the first stream dialled");

    // web's certificate is renewed long before it expires: the pooled
    // connection still offers the old one, so the next stream dials anew.
    let web = m.id("web");
    let worker = m.a.certs().entry(&web).unwrap().worker().clone();
    let old = worker.current().unwrap().svid.leaf().serial.clone();
    let mut creds = worker.credentials();
    worker.refresh_now();
    tokio::time::timeout(
        Duration::from_secs(10),
        creds.wait_for(|c| c.as_ref().is_some_and(|c| c.svid.leaf().serial != old)),
    )
    .await
    .expect("renewed")
    .unwrap();
    assert_eq!(echo_through(route, b"three").await.unwrap(), b"three");
    assert_eq!(
        opened(),
        before + 1,
        "a new connection for the new certificate"
    );
    assert_eq!(echo_through(route, b"four").await.unwrap(), b"four");
    assert_eq!(opened(), before + 1, "and it is pooled in turn");
}

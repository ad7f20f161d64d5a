//! The agent against a fake Istio CA over real TLS gRPC: headers, refusals,
//! malformed answers, a CA that comes up late, a CA we must not trust.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_agent::App;
use meshid_agent::Clock;

use crate::support::{AgentBuilder, Answer, FakeCa, FakeCaServer, eventually, fake_ca, init};

/// An agent using the real CA client towards `addr`, trusting `root_pem`.
async fn agent_for(addr: SocketAddr, root_pem: &str, extra: &[&str]) -> (App, tempfile::TempDir) {
    init();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "wire.jwt").unwrap();
    std::fs::write(dir.path().join("ca-root.pem"), root_pem).unwrap();
    let extra_args = [
        "--ca-address",
        &format!("https://{addr}"),
        "--cluster-id",
        "east",
        "--ca-timeout",
        "2s",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    let builder = AgentBuilder {
        extra_args,
        ..AgentBuilder::default()
    };
    let app = App::build(builder.config(dir.path())).await.unwrap();
    (app, dir)
}

async fn wait_ready(app: &App) -> String {
    let mut rx = app.credentials();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("ready within 10 s")
        .unwrap()
        .as_ref()
        .unwrap()
        .svid
        .leaf()
        .serial
        .clone()
}

#[tokio::test]
async fn the_csr_carries_the_token_and_cluster_id_over_tls() {
    let ca = fake_ca(Clock::System);
    let server = FakeCaServer::start(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (app, _dir) = agent_for(server.addr, &server.root_pem, &[]).await;
    wait_ready(&app).await;
    let calls = ca.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].token, "wire.jwt");
    assert_eq!(calls[0].cluster_id.as_deref(), Some("east"));
    assert_eq!(calls[0].ttl, Duration::from_secs(3600));
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_answers_over_the_wire_are_refused_and_the_cert_kept() {
    let ca = fake_ca(Clock::System);
    let server = FakeCaServer::start(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (app, _dir) = agent_for(server.addr, &server.root_pem, &[]).await;
    let serial = wait_ready(&app).await;
    for (answer, needle) in [
        (Answer::OneElement, "1 element"),
        (Answer::OtherIdentity, "sa/impostor"),
        (Answer::OtherKey, "public key"),
    ] {
        ca.set_answer(answer.clone());
        let before = ca.calls().len();
        app.manager().refresh_now();
        let seen = eventually(Duration::from_secs(10), || {
            ca.calls().len() > before
                && app
                    .manager()
                    .status()
                    .last_error
                    .is_some_and(|e| e.contains(needle))
        })
        .await;
        assert!(seen, "{answer:?}: {:?}", app.manager().status());
        let current = app.manager().current().unwrap();
        assert_eq!(current.svid.leaf().serial, serial, "{answer:?}");
        assert!(app.manager().status().ready);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn an_unauthenticated_answer_makes_the_agent_not_ready() {
    let ca = fake_ca(Clock::System);
    ca.set_answer(Answer::Fail(tonic::Code::Unauthenticated));
    let server = FakeCaServer::start(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (app, _dir) = agent_for(server.addr, &server.root_pem, &[]).await;
    let refused = eventually(Duration::from_secs(10), || app.manager().status().refused).await;
    assert!(refused, "{:?}", app.manager().status());
    let status = app.manager().status();
    assert!(!status.ready);
    assert!(status.reason.contains("Unauthenticated"), "{status:?}");
    // At the cap (500 ms in tests), not in a tight loop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(ca.calls().len() <= 4, "{} calls in ~1 s", ca.calls().len());
    app.shutdown().await;
}

#[tokio::test]
async fn a_ca_that_is_down_at_start_is_used_once_it_comes_up() {
    let port = meshid_common::testing::ports::reserve().unwrap();
    let ca = fake_ca(Clock::System);
    // The root is known in advance: build the server only later, on that port.
    let pending = PendingServer::new(ca.clone(), port);
    let (app, _dir) = agent_for(port, &pending.root_pem, &[]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = app.manager().status();
    assert!(
        !status.ready && status.consecutive_failures >= 1,
        "{status:?}"
    );
    assert!(ca.calls().is_empty());
    let _server = pending.start().await;
    wait_ready(&app).await;
    assert!(app.manager().status().ready);
    app.shutdown().await;
}

/// A CA whose certificate does not chain to CA_ROOT_CA gets no CSR. Root
/// rotation reaches the agent through that file: once the roots that
/// verify the CA are written there, the next attempt gets through, with no
/// restart.
#[tokio::test]
async fn a_ca_is_untrusted_until_roots_verifying_it_are_written_to_ca_root_ca() {
    let ca = fake_ca(Clock::System);
    let server = FakeCaServer::start(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let stranger = meshid_common::testing::TestPki::new("serving.ca").unwrap();
    let (app, dir) = agent_for(server.addr, &stranger.bundle().to_pem(), &[]).await;
    let failed = eventually(Duration::from_secs(10), || {
        app.manager().status().consecutive_failures >= 1
    })
    .await;
    assert!(failed);
    assert!(ca.calls().is_empty(), "no CSR reaches an untrusted CA");
    assert!(!app.manager().status().ready);
    // Both roots, as a rotation publishes them.
    let both = format!("{}{}", stranger.bundle().to_pem(), server.root_pem);
    std::fs::write(dir.path().join("ca-root.pem"), both).unwrap();
    wait_ready(&app).await;
    assert_eq!(
        ca.calls().len(),
        1,
        "one CSR, over the newly trusted connection"
    );
    app.shutdown().await;
}

/// A fake CA server whose serving root is chosen before it listens.
struct PendingServer {
    ca: Arc<FakeCa>,
    addr: SocketAddr,
    root_pem: String,
    serving: meshid_common::testing::TestPki,
}

impl PendingServer {
    fn new(ca: Arc<FakeCa>, addr: SocketAddr) -> Self {
        let serving = meshid_common::testing::TestPki::new("serving.ca").unwrap();
        PendingServer {
            ca,
            addr,
            root_pem: serving.bundle().to_pem(),
            serving,
        }
    }

    async fn start(self) -> FakeCaServer {
        FakeCaServer::start_with(self.ca, self.addr, self.serving).await
    }
}

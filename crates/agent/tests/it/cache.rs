//! The secret manager under paused time: rotation point, backoff, refusal,
//! expiry, token handling and malformed CA answers.

use std::sync::Arc;
use std::time::Duration;

use meshid_agent::cache::{ManagerConfig, SecretManager};
use meshid_agent::metrics::Metrics;
use meshid_agent::rotation::Clock;
use meshid_agent::token::TokenFile;
use meshid_common::{KeyType, SpiffeId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{Answer, FakeCa, TD, init};

struct Harness {
    manager: Arc<SecretManager>,
    ca: Arc<FakeCa>,
    metrics: Arc<Metrics>,
    token_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
    cancel: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn cfg(ttl: Duration) -> ManagerConfig {
    ManagerConfig {
        id: SpiffeId::for_service_account(TD, "default", "web").unwrap(),
        key_type: KeyType::EcdsaP256,
        ttl,
        grace_period_ratio: 0.5,
        grace_period_ratio_jitter: 0.0,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(64),
        ca_timeout: Duration::from_secs(10),
        first_fetch_delay: Duration::ZERO,
    }
}

fn start(cfg: ManagerConfig, token: Option<&str>) -> Harness {
    init();
    let clock = Clock::tokio();
    let ca = FakeCa::new(clock);
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    if let Some(t) = token {
        std::fs::write(&token_path, t).unwrap();
    }
    let metrics = Arc::new(Metrics::new());
    let manager = SecretManager::new(
        cfg,
        ca.clone(),
        TokenFile::new(&token_path),
        clock,
        metrics.clone(),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(manager.clone().run(cancel.clone()));
    Harness {
        manager,
        ca,
        metrics,
        token_path,
        _dir: dir,
        cancel,
    }
}

impl Harness {
    fn serial(&self) -> Option<String> {
        self.manager.current().map(|c| c.svid.leaf().serial.clone())
    }

    async fn wait_serial(&self) -> String {
        let mut rx = self.manager.credentials();
        rx.wait_for(Option::is_some)
            .await
            .unwrap()
            .as_ref()
            .unwrap()
            .svid
            .leaf()
            .serial
            .clone()
    }
}

/// Lets every ready task run (time does not move unless all are idle).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn rotates_at_half_life_and_publishes_the_new_cert() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt-1"));
    let first = h.wait_serial().await;
    let t0 = Instant::now();
    assert!(h.manager.status().ready);
    let mut rx = h.manager.credentials();
    rx.borrow_and_update();
    rx.changed().await.unwrap();
    let elapsed = t0.elapsed();
    assert!(
        (Duration::from_secs(49)..=Duration::from_secs(51)).contains(&elapsed),
        "rotated after {elapsed:?}, expected ~50 s"
    );
    assert_ne!(h.serial().unwrap(), first);
    assert_eq!(h.ca.calls().len(), 2);
    assert_eq!(h.manager.status().issued, 2);
}

#[tokio::test(start_paused = true)]
async fn the_token_is_read_again_for_every_csr() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt-1"));
    h.wait_serial().await;
    std::fs::write(&h.token_path, "jwt-2\n").unwrap();
    h.manager.refresh_now();
    let mut rx = h.manager.credentials();
    rx.borrow_and_update();
    rx.changed().await.unwrap();
    let tokens: Vec<String> = h.ca.calls().into_iter().map(|c| c.token).collect();
    assert_eq!(tokens, vec!["jwt-1", "jwt-2"]);
    assert_eq!(h.ca.calls()[0].ttl, Duration::from_secs(100));
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_keeps_the_cert_and_backs_off_exponentially() {
    let h = start(cfg(Duration::from_secs(1000)), Some("jwt"));
    let first = h.wait_serial().await;
    h.ca.set_answer(Answer::Fail(tonic::Code::Unavailable));
    // Past the rotation point (500 s), through several retries.
    tokio::time::sleep(Duration::from_secs(560)).await;
    settle().await;
    assert_eq!(
        h.serial().as_deref(),
        Some(first.as_str()),
        "the cert is kept"
    );
    let status = h.manager.status();
    assert!(status.ready, "a valid cert is still offered: {status:?}");
    assert!(status.consecutive_failures >= 4, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("Unavailable"),
        "{status:?}"
    );
    let calls = h.ca.calls();
    let gaps: Vec<Duration> = calls
        .windows(2)
        .skip(1)
        .map(|w| w[1].at - w[0].at)
        .collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] >= pair[0], "gaps grow: {gaps:?}");
    }
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(64)),
        "capped: {gaps:?}"
    );
    assert!(
        gaps.last().unwrap() >= &Duration::from_secs(8),
        "doubling: {gaps:?}"
    );
    let text = h.metrics.encode();
    assert!(
        text.contains(&format!(
            "num_failed_outgoing_requests_total{{request_type=\"csr\"}} {}",
            calls.len() - 1
        )),
        "{text}"
    );

    // The CA comes back: the next retry succeeds and the backoff resets.
    h.ca.set_answer(Answer::Good);
    let mut rx = h.manager.credentials();
    rx.wait_for(|c| c.as_ref().unwrap().svid.leaf().serial != first)
        .await
        .unwrap();
    let status = h.manager.status();
    assert!(
        status.ready && status.consecutive_failures == 0,
        "{status:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_cert_is_withdrawn_and_the_agent_is_not_ready() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt"));
    let first = h.wait_serial().await;
    h.ca.set_answer(Answer::Fail(tonic::Code::Internal));
    let mut rx = h.manager.credentials();
    let t0 = Instant::now();
    rx.wait_for(Option::is_none).await.unwrap();
    let gone_after = t0.elapsed();
    assert!(
        (Duration::from_secs(99)..=Duration::from_secs(102)).contains(&gone_after),
        "withdrawn at expiry, not before: {gone_after:?}"
    );
    let status = h.manager.status();
    assert!(!status.ready);
    assert!(
        status.reason.contains("expired") && status.reason.contains(&first),
        "{status:?}"
    );
    // Recovery when the CA answers again.
    h.ca.set_answer(Answer::Good);
    rx.wait_for(Option::is_some).await.unwrap();
    assert!(h.manager.status().ready);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_backs_off_to_the_cap_and_reports_not_ready() {
    for code in [tonic::Code::Unauthenticated, tonic::Code::InvalidArgument] {
        let h = start(cfg(Duration::from_secs(3600)), Some("jwt"));
        h.ca.set_answer(Answer::Fail(code));
        tokio::time::sleep(Duration::from_secs(300)).await;
        settle().await;
        let calls = h.ca.calls();
        // At the cap (64 s, jitter down to 48 s) from the first failure on.
        assert!(
            (2..=7).contains(&calls.len()),
            "{code:?}: {} calls in 300 s",
            calls.len()
        );
        for w in calls.windows(2) {
            assert!(w[1].at - w[0].at >= Duration::from_secs(48), "{code:?}");
        }
        let status = h.manager.status();
        assert!(!status.ready && status.refused, "{status:?}");
        assert!(status.reason.contains("refuses"), "{status:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_during_renewal_keeps_the_cert_but_is_not_ready() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt"));
    let first = h.wait_serial().await;
    h.ca.set_answer(Answer::Fail(tonic::Code::Unauthenticated));
    h.manager.refresh_now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(h.serial().as_deref(), Some(first.as_str()));
    let status = h.manager.status();
    assert!(!status.ready && status.refused, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_missing_or_unreadable_token_fails_before_calling_the_ca() {
    let h = start(cfg(Duration::from_secs(3600)), None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert!(h.ca.calls().is_empty(), "no CSR without a token");
    let status = h.manager.status();
    assert!(!status.ready);
    let err = status.last_error.unwrap();
    assert!(
        err.contains("token") && err.contains(&h.token_path.display().to_string()),
        "{err}"
    );
    assert!(!err.contains("jwt"), "{err}");

    // A directory where the file should be: unreadable.
    std::fs::create_dir(&h.token_path).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    settle().await;
    assert!(h.ca.calls().is_empty());
    assert!(
        h.manager
            .status()
            .last_error
            .unwrap()
            .contains("cannot read")
    );

    // The token appears: the next retry gets a certificate.
    std::fs::remove_dir(&h.token_path).unwrap();
    std::fs::write(&h.token_path, "late.jwt").unwrap();
    h.wait_serial().await;
    assert_eq!(h.ca.calls()[0].token, "late.jwt");
    assert!(h.manager.status().ready);
}

#[tokio::test(start_paused = true)]
async fn malformed_answers_are_refused_and_the_current_cert_kept() {
    let h = start(cfg(Duration::from_secs(1000)), Some("jwt"));
    let mut current = h.wait_serial().await;
    for (answer, needle) in [
        (Answer::OneElement, "1 element"),
        (Answer::OtherIdentity, "sa/impostor"),
        (Answer::OtherKey, "public key"),
    ] {
        h.ca.set_answer(answer.clone());
        let before = h.ca.calls().len();
        h.manager.refresh_now();
        let ok = crate::support::eventually(Duration::from_secs(5), || {
            h.ca.calls().len() > before && h.manager.status().last_error.is_some()
        })
        .await;
        assert!(ok, "{answer:?}: no attempt");
        let status = h.manager.status();
        let err = status.last_error.clone().unwrap();
        assert!(err.contains("refused the CA's answer"), "{answer:?}: {err}");
        assert!(err.contains(needle), "{answer:?}: {err}");
        assert_eq!(h.serial().as_deref(), Some(current.as_str()), "{answer:?}");
        assert!(status.ready, "the current cert is still valid: {status:?}");

        // Back to a good answer before the next case.
        h.ca.set_answer(Answer::Good);
        h.manager.refresh_now();
        let mut rx = h.manager.credentials();
        let old = current.clone();
        rx.wait_for(|c| c.as_ref().unwrap().svid.leaf().serial != old)
            .await
            .unwrap();
        current = h.serial().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_ca_at_start_means_ready_once_it_answers() {
    let h = start(cfg(Duration::from_secs(3600)), Some("jwt"));
    h.ca.set_answer(Answer::Fail(tonic::Code::Unavailable));
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    assert!(!h.manager.status().ready);
    assert!(h.manager.current().is_none());
    assert!(h.ca.calls().len() >= 3);
    h.ca.set_answer(Answer::Good);
    h.wait_serial().await;
    assert!(h.manager.status().ready);
}

#[tokio::test(start_paused = true)]
async fn the_first_csr_waits_for_a_client_or_the_delay() {
    let mut c = cfg(Duration::from_secs(3600));
    c.first_fetch_delay = Duration::from_secs(5);
    let h = start(c, Some("jwt"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert!(h.ca.calls().is_empty());
    h.manager.request(None);
    h.wait_serial().await;
    assert_eq!(h.ca.calls().len(), 1);

    // Without a client, the delay starts it.
    let mut c = cfg(Duration::from_secs(3600));
    c.first_fetch_delay = Duration::from_secs(5);
    let h = start(c, Some("jwt"));
    let t0 = Instant::now();
    h.wait_serial().await;
    assert!(t0.elapsed() >= Duration::from_secs(5));
}

//! The renewal engine under paused time, once for every component: the
//! rotation point, backoff, refusals, expiry, the token, malformed answers,
//! the first fetch, the fetch limiter and waiting for a certificate.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fake::{Answer, TestCa};
use super::*;
use crate::testing::TestPki;
use crate::{KeyType, SpiffeId};

const TD: &str = "cluster.local";

#[derive(Default)]
struct Counted {
    sent: AtomicUsize,
    failed: AtomicUsize,
    issued: AtomicUsize,
    states: std::sync::Mutex<Vec<(Option<CertState>, Option<CertState>)>>,
}

impl RenewalEvents for Counted {
    fn csr_sent(&self) {
        self.sent.fetch_add(1, Ordering::SeqCst);
    }
    fn csr_failed(&self) {
        self.failed.fetch_add(1, Ordering::SeqCst);
    }
    fn issued(&self) {
        self.issued.fetch_add(1, Ordering::SeqCst);
    }
    fn state_changed(&self, from: Option<CertState>, to: Option<CertState>) {
        self.states.lock().unwrap().push((from, to));
    }
}

struct Harness {
    worker: Arc<Worker>,
    ca: Arc<TestCa>,
    events: Arc<Counted>,
    token_path: std::path::PathBuf,
    _dir: TempDir,
    cancel: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A directory removed on drop (no tempfile dependency in this crate).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "meshid-identity-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn span(id: &SpiffeId, _: KeyType, _: Option<&str>) -> tracing::Span {
    tracing::info_span!("test.csr", spiffe.id = id.as_str())
}

fn cfg(ttl: Duration) -> WorkerConfig {
    WorkerConfig {
        id: SpiffeId::for_service_account(TD, "default", "web").unwrap(),
        key_type: KeyType::EcdsaP256,
        ttl,
        policy: RenewalPolicy {
            grace_period_ratio: 0.5,
            grace_period_ratio_jitter: 0.0,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(64),
        },
        ca_timeout: Duration::from_secs(10),
        on_behalf: false,
        first_fetch: FirstFetch::Now,
        span,
    }
}

fn start(cfg: WorkerConfig, token: Option<&str>) -> Harness {
    start_with(cfg, token, None)
}

fn start_with(
    cfg: WorkerConfig,
    token: Option<&str>,
    limiter: Option<Arc<FetchLimiter>>,
) -> Harness {
    crate::tls::install_crypto_provider();
    let clock = Clock::tokio();
    let ca = TestCa::new(
        Arc::new(TestPki::new(TD).unwrap().with_intermediate().unwrap()),
        clock,
    );
    let dir = TempDir::new();
    let token_path = dir.0.join("token");
    if let Some(t) = token {
        std::fs::write(&token_path, t).unwrap();
    }
    let events = Arc::new(Counted::default());
    let worker = Worker::new(
        cfg,
        WorkerParts {
            source: ca.clone(),
            token: TokenFile::new(&token_path),
            clock,
            events: events.clone(),
            limiter,
        },
    );
    let cancel = CancellationToken::new();
    tokio::spawn(worker.clone().run(cancel.clone()));
    Harness {
        worker,
        ca,
        events,
        token_path,
        _dir: dir,
        cancel,
    }
}

impl Harness {
    fn serial(&self) -> Option<String> {
        self.worker.current().map(|c| c.svid.leaf().serial.clone())
    }

    async fn wait_serial(&self) -> String {
        let mut rx = self.worker.credentials();
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

/// Polls `f` under paused time until it holds or `limit` passes.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test(start_paused = true)]
async fn rotates_at_half_life_and_publishes_the_new_cert() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt-1"));
    let first = h.wait_serial().await;
    let t0 = Instant::now();
    assert!(h.worker.status().ready);
    let mut rx = h.worker.credentials();
    rx.borrow_and_update();
    rx.changed().await.unwrap();
    let elapsed = t0.elapsed();
    assert!(
        (Duration::from_secs(49)..=Duration::from_secs(51)).contains(&elapsed),
        "rotated after {elapsed:?}, expected ~50 s"
    );
    assert_ne!(h.serial().unwrap(), first);
    assert_eq!(h.ca.calls().len(), 2);
    assert_eq!(h.worker.status().issued, 2);
}

#[tokio::test(start_paused = true)]
async fn the_token_is_read_again_for_every_csr() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt-1"));
    h.wait_serial().await;
    std::fs::write(&h.token_path, "jwt-2\n").unwrap();
    h.worker.refresh_now();
    let mut rx = h.worker.credentials();
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
    let status = h.worker.status();
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
    assert_eq!(
        h.events.failed.load(Ordering::SeqCst),
        calls.len() - 1,
        "every failure is counted"
    );

    // The CA comes back: the next retry succeeds and the backoff resets.
    h.ca.set_answer(Answer::Good);
    let mut rx = h.worker.credentials();
    rx.wait_for(|c| c.as_ref().unwrap().svid.leaf().serial != first)
        .await
        .unwrap();
    let status = h.worker.status();
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
    let mut rx = h.worker.credentials();
    let t0 = Instant::now();
    rx.wait_for(Option::is_none).await.unwrap();
    let gone_after = t0.elapsed();
    assert!(
        (Duration::from_secs(99)..=Duration::from_secs(102)).contains(&gone_after),
        "withdrawn at expiry, not before: {gone_after:?}"
    );
    let status = h.worker.status();
    assert!(!status.ready);
    assert!(
        status.reason.contains("expired") && status.reason.contains(&first),
        "{status:?}"
    );
    // Recovery when the CA answers again.
    h.ca.set_answer(Answer::Good);
    rx.wait_for(Option::is_some).await.unwrap();
    assert!(h.worker.status().ready);
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
        let status = h.worker.status();
        assert!(!status.ready && status.refused, "{status:?}");
        assert!(status.reason.contains("refuses"), "{status:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_during_renewal_keeps_the_cert_but_is_not_ready() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt"));
    let first = h.wait_serial().await;
    h.ca.set_answer(Answer::Fail(tonic::Code::Unauthenticated));
    h.worker.refresh_now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(h.serial().as_deref(), Some(first.as_str()));
    let status = h.worker.status();
    assert!(!status.ready && status.refused, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_missing_or_unreadable_token_fails_before_calling_the_ca() {
    let h = start(cfg(Duration::from_secs(3600)), None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert!(h.ca.calls().is_empty(), "no CSR without a token");
    let status = h.worker.status();
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
        h.worker
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
    assert!(h.worker.status().ready);
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
        h.worker.refresh_now();
        let ok = eventually(Duration::from_secs(5), || {
            h.ca.calls().len() > before && h.worker.status().last_error.is_some()
        })
        .await;
        assert!(ok, "{answer:?}: no attempt");
        let status = h.worker.status();
        let err = status.last_error.clone().unwrap();
        assert!(err.contains("CA response rejected"), "{answer:?}: {err}");
        assert!(err.contains(needle), "{answer:?}: {err}");
        assert_eq!(h.serial().as_deref(), Some(current.as_str()), "{answer:?}");
        assert!(status.ready, "the current cert is still valid: {status:?}");

        // Back to a good answer before the next case.
        h.ca.set_answer(Answer::Good);
        h.worker.refresh_now();
        let mut rx = h.worker.credentials();
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
    assert!(!h.worker.status().ready);
    assert!(h.worker.current().is_none());
    assert!(h.ca.calls().len() >= 3);
    h.ca.set_answer(Answer::Good);
    h.wait_serial().await;
    assert!(h.worker.status().ready);
}

#[tokio::test(start_paused = true)]
async fn the_first_csr_waits_for_a_client_or_the_delay() {
    let mut c = cfg(Duration::from_secs(3600));
    c.first_fetch = FirstFetch::OnDemandOrAfter(Duration::from_secs(5));
    let h = start(c, Some("jwt"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert!(h.ca.calls().is_empty());
    h.worker.request(None);
    h.wait_serial().await;
    assert_eq!(h.ca.calls().len(), 1);

    // Without a client, the delay starts it.
    let mut c = cfg(Duration::from_secs(3600));
    c.first_fetch = FirstFetch::OnDemandOrAfter(Duration::from_secs(5));
    let h = start(c, Some("jwt"));
    let t0 = Instant::now();
    h.wait_serial().await;
    assert!(t0.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn states_move_and_are_reported_once_each() {
    let h = start(cfg(Duration::from_secs(100)), Some("jwt"));
    h.wait_serial().await;
    assert_eq!(h.worker.state(), CertState::Available);
    h.ca.set_answer(Answer::Fail(tonic::Code::Unavailable));
    let mut rx = h.worker.credentials();
    rx.wait_for(Option::is_none).await.unwrap();
    assert_eq!(h.worker.state(), CertState::Unavailable);
    h.worker.retire();
    h.worker.retire();
    let states = h.events.states.lock().unwrap().clone();
    use CertState::*;
    assert_eq!(
        states,
        vec![
            (None, Some(Initializing)),
            (Some(Initializing), Some(Available)),
            (Some(Available), Some(Unavailable)),
            (Some(Unavailable), None),
        ]
    );
    assert_eq!(h.events.issued.load(Ordering::SeqCst), 1);
    assert!(h.events.sent.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(start_paused = true)]
async fn a_fatal_setup_error_waits_at_the_cap_like_a_refusal() {
    let h = start(cfg(Duration::from_secs(3600)), Some("jwt"));
    h.ca.set_answer(Answer::Fail(tonic::Code::Unimplemented));
    tokio::time::sleep(Duration::from_secs(100)).await;
    settle().await;
    let calls = h.ca.calls();
    assert!((2..=3).contains(&calls.len()), "{} calls", calls.len());
    let status = h.worker.status();
    assert_eq!(status.verdict, Some(Verdict::Fatal));
    assert!(status.refused && !status.ready, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn on_behalf_requests_say_so_to_the_source() {
    let mut c = cfg(Duration::from_secs(3600));
    c.on_behalf = true;
    let h = start(c, Some("node-jwt"));
    h.wait_serial().await;
    let call = &h.ca.calls()[0];
    assert!(call.on_behalf);
    assert_eq!(call.token, "node-jwt");
    assert_eq!(call.id.as_ref(), Some(h.worker.id()));
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_never_answers_is_cut_at_the_deadline() {
    let mut c = cfg(Duration::from_secs(3600));
    c.ca_timeout = Duration::from_secs(2);
    let h = start(c, Some("jwt"));
    h.ca.set_delay(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(3)).await;
    settle().await;
    let status = h.worker.status();
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("no answer within"),
        "{status:?}"
    );
    assert_eq!(status.verdict, Some(Verdict::Retry));
}

#[tokio::test(start_paused = true)]
async fn the_limiter_caps_requests_in_flight_and_a_waiter_goes_first() {
    crate::tls::install_crypto_provider();
    let clock = Clock::tokio();
    let ca = TestCa::new(Arc::new(TestPki::new(TD).unwrap()), clock);
    ca.set_delay(Duration::from_millis(100));
    let dir = TempDir::new();
    std::fs::write(dir.0.join("token"), "jwt").unwrap();
    let limiter = FetchLimiter::new(8);
    let cancel = CancellationToken::new();
    let workers: Vec<Arc<Worker>> = (0..100)
        .map(|i| {
            let mut c = cfg(Duration::from_secs(3600));
            c.id = SpiffeId::for_service_account(TD, "default", &format!("sa-{i}")).unwrap();
            c.on_behalf = true;
            let w = Worker::new(
                c,
                WorkerParts {
                    source: ca.clone(),
                    token: TokenFile::new(dir.0.join("token")),
                    clock,
                    events: Arc::new(()),
                    limiter: Some(limiter.clone()),
                },
            );
            tokio::spawn(w.clone().run(cancel.clone()));
            w
        })
        .collect();
    settle().await;
    let last = workers[99].clone();
    let waiter = tokio::spawn(async move { last.wait_valid(Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(350)).await;
    settle().await;
    assert!(
        waiter.is_finished(),
        "the waiting identity was served early"
    );
    waiter.await.unwrap().unwrap();
    let pos = ca
        .order()
        .iter()
        .position(|i| i == workers[99].id())
        .unwrap();
    assert!(pos < 24, "fetched in the first batches, at {pos}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ca.max_in_flight(), 8);
    assert!(workers.iter().all(|w| w.state() == CertState::Available));
    assert_eq!(limiter.available(), 8, "every permit came back");
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn waiting_fails_fast_after_a_failure_and_times_out_otherwise() {
    let h = start(cfg(Duration::from_secs(3600)), Some("jwt"));
    h.ca.set_answer(Answer::OtherIdentity);
    let err = h
        .worker
        .wait_valid(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("impostor"), "{err}");

    let mut c = cfg(Duration::from_secs(3600));
    c.first_fetch = FirstFetch::OnDemandOrAfter(Duration::from_secs(60));
    let h = start(c, Some("jwt"));
    h.ca.set_delay(Duration::from_secs(30));
    let err = h
        .worker
        .wait_valid(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, crate::Error::CertificateWait { .. }), "{err}");
    h.worker.retire();
    let err = h
        .worker
        .wait_valid(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer managed"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_renewal_retries_as_soon_as_the_token_file_changes() {
    // istio#26225: an expired token must not cost the certificate once a
    // good token is back; waiting out the refusal backoff cap could.
    let h = start(cfg(Duration::from_secs(100)), Some("expired.jwt"));
    let first = h.wait_serial().await;
    h.ca.set_answer(Answer::Fail(tonic::Code::Unauthenticated));
    h.worker.refresh_now();
    assert!(eventually(Duration::from_secs(5), || h.worker.status().refused).await);
    let calls = h.ca.calls().len();
    // The same token: no early retry (the cap is 64 s).
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        h.ca.calls().len(),
        calls,
        "no retry while the token is unchanged"
    );
    assert_eq!(
        h.serial().as_deref(),
        Some(first.as_str()),
        "the cert is kept"
    );
    h.ca.set_answer(Answer::Good);
    std::fs::write(&h.token_path, "fresh.jwt").unwrap();
    let t0 = Instant::now();
    let mut rx = h.worker.credentials();
    rx.wait_for(|c| c.as_ref().unwrap().svid.leaf().serial != first)
        .await
        .unwrap();
    assert!(
        t0.elapsed() <= Duration::from_secs(3),
        "renewed {:?} after the token changed",
        t0.elapsed()
    );
    assert_eq!(h.ca.calls().last().unwrap().token, "fresh.jwt");
    assert!(h.worker.status().ready);
}

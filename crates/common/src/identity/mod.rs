//! The identity engine: how a component that holds workload certificates
//! (the agent for its pod, the ztunnel for each workload on its node) gets
//! them and keeps them fresh. One [`Worker`] per identity makes a key and a
//! CSR in memory, reads the service-account token ([`TokenFile`]), asks a
//! [`CertificateSource`] (the Istio CA through [`CaSource`], or a fake in
//! tests), checks the answer (a leaf and a root bundle, our key, our
//! identity, verifying to the returned roots), publishes the credentials on
//! a `watch` channel, renews at the shared refresh policy, backs off with
//! one [`Backoff`] after a failure, reads time through one [`Clock`] and
//! withdraws a certificate once it expires. CA answers are classified in
//! one place ([`classify`]). The settings every such component takes are
//! one set of flags ([`CaClientArgs`]) resolved once ([`CaClientSettings`]).

mod args;
mod limiter;
mod source;
mod token;
mod worker;

#[cfg(any(test, feature = "testing"))]
pub mod fake;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

pub use args::{
    CaClientArgs, CaClientSettings, DEFAULT_CA_ROOT_CA, DEFAULT_CA_TIMEOUT, DEFAULT_CLUSTER_ID,
    DEFAULT_GRACE_PERIOD_RATIO, DEFAULT_GRACE_PERIOD_RATIO_JITTER, DEFAULT_INITIAL_BACKOFF,
    DEFAULT_KEY_TYPE, DEFAULT_MAX_BACKOFF, DEFAULT_SECRET_TTL, DEFAULT_TOKEN_PATH, MAX_SECRET_TTL,
};
pub use limiter::{FetchLimiter, Permit};
pub use source::{CaSource, CertificateSource, JwtRequest, JwtSource, SignRequest};
pub use token::{Token, TokenFile};
pub use worker::{
    CertState, FirstFetch, RenewalEvents, SpanFn, Status, Worker, WorkerConfig, WorkerParts,
};

use crate::error::Error;
use crate::refresh::{backoff_delay, random_unit};

/// Renewals are never scheduled closer together than this, whatever the
/// certificate's life: a CA that hands out nearly expired certificates must
/// not make a worker spin.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_millis(500);

/// When to renew and how to retry (Istio's names in the fields' docs).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct RenewalPolicy {
    /// `SECRET_GRACE_PERIOD_RATIO`: renew when this part of the life remains.
    pub grace_period_ratio: f64,
    /// `SECRET_GRACE_PERIOD_RATIO_JITTER`: ± on the ratio, drawn per certificate.
    pub grace_period_ratio_jitter: f64,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    #[serde(serialize_with = "crate::config::serialize_duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "crate::config::serialize_duration")]
    pub max_backoff: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            grace_period_ratio: DEFAULT_GRACE_PERIOD_RATIO,
            grace_period_ratio_jitter: DEFAULT_GRACE_PERIOD_RATIO_JITTER,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// What a failed certificate request means for the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// An outage, a timeout, a bad answer, a token not written yet: retry
    /// with growing backoff.
    Retry,
    /// The CA said no to who we are or what we asked (`UNAUTHENTICATED`,
    /// `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `FAILED_PRECONDITION`):
    /// retrying soon cannot help; retry at the backoff cap.
    Refused,
    /// Our own setup is wrong (no such service at the CA address, an
    /// unusable CA address, roots or key type): retry at the cap, and say
    /// that an operator must act.
    Fatal,
}

/// The one classification of CA-path errors (agent and ztunnel alike).
pub fn classify(e: &Error) -> Verdict {
    use tonic::Code;
    match e {
        Error::Ca { code, .. } => match code {
            Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition => Verdict::Refused,
            Code::Unimplemented => Verdict::Fatal,
            _ => Verdict::Retry,
        },
        Error::CaConnect { .. } | Error::UnknownKeyType(_) | Error::KeyGeneration { .. } => {
            Verdict::Fatal
        }
        _ => Verdict::Retry,
    }
}

/// Capped exponential backoff with jitter, reset on success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The next delay; each call doubles the base up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = backoff_delay(self.attempt, self.initial, self.max, random_unit());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Jumps to the cap: for answers that retrying soon cannot change.
    pub fn at_cap(&mut self) -> Duration {
        self.attempt = 31;
        backoff_delay(self.attempt, self.initial, self.max, random_unit())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Wall-clock time for certificate validity. [`Clock::System`] in
/// production; [`Clock::tokio`] derives wall time from Tokio's clock so tests
/// with paused time see certificates age and expire.
#[derive(Clone, Copy, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    Tokio {
        wall: SystemTime,
        mono: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that moves with `tokio::time` (and so with `pause`/`advance`).
    pub fn tokio() -> Self {
        Clock::Tokio {
            wall: SystemTime::now(),
            mono: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { wall, mono } => *wall + mono.elapsed(),
        }
    }

    /// The Tokio instant at which this clock reads `at` (now if it is past).
    pub fn instant_at(&self, at: SystemTime) -> tokio::time::Instant {
        tokio::time::Instant::now() + at.duration_since(self.now()).unwrap_or_default()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(i, m);
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= m && d >= Duration::from_millis(75), "{d:?}");
            last = d;
        }
        assert!(last >= m.mul_f64(0.75));
        b.reset();
        assert!(b.next_delay() <= i);
        assert!(b.at_cap() >= m.mul_f64(0.75));
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_paused_time() {
        let clock = Clock::tokio();
        let start = clock.now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(
            clock.now().duration_since(start).unwrap(),
            Duration::from_secs(3600)
        );
        let target = clock.now() + Duration::from_secs(10);
        assert_eq!(
            clock.instant_at(target) - tokio::time::Instant::now(),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn ca_answers_are_classified_once() {
        use tonic::Code;
        let ca = |code| Error::Ca {
            code,
            message: "x".into(),
        };
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
        ] {
            assert_eq!(classify(&ca(code)), Verdict::Refused, "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
            Code::Unknown,
        ] {
            assert_eq!(classify(&ca(code)), Verdict::Retry, "{code:?}");
        }
        assert_eq!(classify(&ca(Code::Unimplemented)), Verdict::Fatal);
        assert_eq!(
            classify(&Error::CaConnect {
                address: "a".into(),
                reason: "b".into()
            }),
            Verdict::Fatal
        );
        assert_eq!(
            classify(&Error::CaResponse("wrong identity".into())),
            Verdict::Retry
        );
        assert_eq!(
            classify(&Error::TokenEmpty { path: "/t".into() }),
            Verdict::Retry
        );
    }
}

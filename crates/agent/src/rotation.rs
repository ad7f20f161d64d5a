//! When to renew and how long to wait after a failure: small pure functions
//! ([`refresh_at`], [`backoff_delay`]) and the clock the secret manager reads.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

/// The moment to renew a certificate valid from `not_before` to `not_after`:
/// when `ratio + jitter` of its life remains (Istio's
/// `SECRET_GRACE_PERIOD_RATIO`; 0.5 renews at half-life). `jitter` is the
/// signed offset already drawn for this certificate (see [`draw_jitter`]).
/// The result always lies within `[not_before, not_after]`.
pub fn refresh_at(
    not_before: SystemTime,
    not_after: SystemTime,
    ratio: f64,
    jitter: f64,
) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let grace = (ratio + jitter).clamp(0.0, 1.0);
    not_after - life.mul_f64(grace)
}

/// A uniform draw in `[-max, max]`.
pub fn draw_jitter(max: f64) -> f64 {
    max * (2.0 * random_unit() - 1.0)
}

/// A uniform draw in `[0, 1)`, from the standard library's per-process
/// random hash keys: plenty for spreading timers, not for cryptography.
pub fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The delay before retry number `attempt` (0 for the first retry):
/// `initial · 2^attempt`, capped at `max`, then shortened by up to a quarter
/// by `unit` (a draw in `[0, 1)`) so that agents that failed together do not
/// retry together.
pub fn backoff_delay(attempt: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let exp = initial.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
    let capped = exp.min(max);
    capped.mul_f64(1.0 - 0.25 * unit.clamp(0.0, 1.0))
}

/// Capped exponential backoff with jitter.
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

    /// Jumps to the cap: for refusals that retrying soon cannot fix.
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
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn half_life_by_default() {
        assert_eq!(refresh_at(t(1000), t(2000), 0.5, 0.0), t(1500));
    }

    #[test]
    fn the_ratio_is_the_part_of_life_that_remains() {
        // Istio: rotate when 20% of the life is left, i.e. at 80%.
        assert_eq!(refresh_at(t(0), t(1000), 0.2, 0.0), t(800));
        assert_eq!(refresh_at(t(0), t(1000), 0.8, 0.0), t(200));
    }

    #[test]
    fn jitter_moves_the_point_both_ways_and_stays_inside_the_life() {
        assert_eq!(refresh_at(t(0), t(1000), 0.5, 0.01), t(490));
        assert_eq!(refresh_at(t(0), t(1000), 0.5, -0.01), t(510));
        assert_eq!(refresh_at(t(0), t(1000), 0.5, 0.9), t(0));
        assert_eq!(refresh_at(t(0), t(1000), 0.5, -0.9), t(1000));
        for _ in 0..1000 {
            let j = draw_jitter(0.01);
            assert!((-0.01..=0.01).contains(&j), "{j}");
            let at = refresh_at(t(0), t(86_400), 0.5, j);
            let secs = at.duration_since(t(0)).unwrap().as_secs_f64();
            assert!((42_335.0..=44_065.0).contains(&secs), "{secs}");
        }
    }

    #[test]
    fn a_cert_that_is_not_yet_valid_or_inverted_does_not_panic() {
        assert_eq!(refresh_at(t(2000), t(1000), 0.5, 0.0), t(1000));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(backoff_delay(0, i, m, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(1, i, m, 0.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(3, i, m, 0.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(5, i, m, 0.0), m);
        assert_eq!(backoff_delay(1000, i, m, 0.0), m);
        assert_eq!(backoff_delay(5, i, m, 1.0), Duration::from_millis(1500));
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
}

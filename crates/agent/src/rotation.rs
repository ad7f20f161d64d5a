//! When to renew and how long to wait after a failure: the shared pure
//! functions of [`meshid_common::refresh`], the agent's [`Backoff`] state and
//! the clock the secret manager reads.

use std::time::{Duration, SystemTime};

pub use meshid_common::refresh::{backoff_delay, draw_jitter, random_unit, refresh_at};

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
}

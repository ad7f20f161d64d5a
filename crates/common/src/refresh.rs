//! When to renew a certificate and how long to wait after a failure: the
//! small pure functions every component that holds certificates (agent,
//! ztunnel) uses, so `SECRET_GRACE_PERIOD_RATIO` means the same everywhere:
//! the fraction of the life that REMAINS at renewal, as in Istio.

use std::time::{Duration, SystemTime};

/// The moment to renew a certificate valid from `not_before` to `not_after`:
/// when `ratio + jitter` of its life remains (Istio's
/// `SECRET_GRACE_PERIOD_RATIO`; 0.5 renews at half-life). `jitter` is the
/// signed offset already drawn for this certificate (see [`draw_jitter`]).
/// The result always lies within `[not_before, not_after]`.
///
/// Pass as `not_before` the later of the leaf's NotBefore and the time it
/// was received: CAs backdate NotBefore for clock skew (two minutes here),
/// which would otherwise put the renewal of a short-lived certificate at
/// once.
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

/// A uniform draw in `[0, 1)` from the system RNG: for spreading timers,
/// not for cryptography.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
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
    fn backoff_doubles_to_the_cap_and_jitter_only_shortens() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(backoff_delay(0, i, m, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(1, i, m, 0.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(3, i, m, 0.0), Duration::from_millis(800));
        assert_eq!(backoff_delay(5, i, m, 0.0), m);
        assert_eq!(backoff_delay(1000, i, m, 0.0), m);
        assert_eq!(backoff_delay(u32::MAX, i, m, 0.0), m);
        assert_eq!(backoff_delay(5, i, m, 1.0), Duration::from_millis(1500));
    }

    #[test]
    fn random_units_are_in_range_and_vary() {
        let draws: Vec<f64> = (0..100).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }
}

//! What every component's configuration reads: environment variables
//! through [`EnvSource`] (the process, or a map in tests, so tests never
//! mutate the process environment) and durations written the way Istio and
//! Go write them (`24h`, `1h30m`, `250ms`, `1.5s`; a bare number is seconds).

use std::collections::HashMap;
use std::time::Duration;

/// Where environment variables come from.
pub trait EnvSource {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl EnvSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl EnvSource for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| (*v).to_owned())
    }
}

/// Parses a duration: number-unit pairs (units `ns`, `us`/`µs`, `ms`, `s`,
/// `m`, `h`, `d`; numbers may have a fraction), or a bare whole number of
/// seconds. The error says what is wrong, for a config error or clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("{text:?}: expected a number at {rest:?}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{text:?}: {:?} is not a number", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "" => return Err(format!("{text:?}: a number needs a unit (ms, s, m, h, d)")),
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (ns, us, ms, s, m, h, d)"
                ));
            }
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_form_the_components_accept() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("24h"), Duration::from_secs(86_400));
        assert_eq!(ok("90d"), Duration::from_secs(90 * 86_400));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1h30m0s"), Duration::from_secs(5400));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("500us"), Duration::from_micros(500));
        assert_eq!(ok("60"), Duration::from_secs(60));
        assert_eq!(ok(" 20s "), Duration::from_secs(20));
    }

    #[test]
    fn bad_durations_say_why() {
        for (s, why) in [
            ("", "empty"),
            ("h", "expected a number"),
            ("5", "__ok__"),
            ("5x", "unknown unit"),
            ("5 parsecs", "unknown unit"),
            ("1.2.3s", "not a number"),
            ("10m5", "needs a unit"),
        ] {
            match parse_duration(s) {
                Ok(_) => assert_eq!(why, "__ok__", "{s:?} should fail"),
                Err(e) => assert!(e.contains(why), "{s:?}: {e}"),
            }
        }
    }

    #[test]
    fn env_from_a_map() {
        let env: HashMap<&str, &str> = [("TRUST_DOMAIN", "example.org")].into();
        assert_eq!(
            EnvSource::get(&env, "TRUST_DOMAIN").as_deref(),
            Some("example.org")
        );
        assert_eq!(EnvSource::get(&env, "NOPE"), None);
    }
}

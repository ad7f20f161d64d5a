//! What every component's configuration reads: environment variables
//! through [`EnvSource`] (the process, or a map in tests, so tests never
//! mutate the process environment) and durations written the way Istio and
//! Go write them (`24h`, `1h30m`, `250ms`, `1.5s`; a bare number is seconds).
//! Every component prints its resolved configuration at start the same way:
//! as YAML, through [`log_config`].

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

/// A setting that could not be read: the message names it and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingError(pub String);

/// Resolves a setting the way every component does: the flag, else the
/// environment variable (unset and blank are the same), else the default.
#[derive(Clone, Copy)]
pub struct Layers<'a> {
    env: &'a dyn EnvSource,
}

impl std::fmt::Debug for Layers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Layers")
    }
}

impl<'a> Layers<'a> {
    pub fn new(env: &'a dyn EnvSource) -> Self {
        Layers { env }
    }

    /// The variable `key`, unless unset or blank.
    pub fn env(&self, key: &str) -> Option<String> {
        self.env.get(key).filter(|v| !v.trim().is_empty())
    }

    /// A duration from the flag or `key` (Go syntax, see
    /// [`parse_duration`]), else `default`; errors name `name`.
    pub fn duration(
        &self,
        flag: Option<String>,
        key: Option<&str>,
        default: Duration,
        name: &str,
    ) -> Result<Duration, SettingError> {
        match flag.or_else(|| key.and_then(|k| self.env(k))) {
            Some(s) => parse_duration(&s).map_err(|e| SettingError(format!("{name}: {e}"))),
            None => Ok(default),
        }
    }

    /// A number from the flag or `key`, else `default`.
    pub fn float(&self, flag: Option<f64>, key: &str, default: f64) -> Result<f64, SettingError> {
        match flag {
            Some(v) => Ok(v),
            None => match self.env(key) {
                Some(s) => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| SettingError(format!("{key}: {s:?} is not a number"))),
                None => Ok(default),
            },
        }
    }
}

/// `config` as YAML: the one start-up format of every component. A config
/// holds paths and names, never key material or tokens (each component's
/// `Serialize` leaves them out).
///
/// Written here over `serde_json` (which every binary links already) rather
/// than with a YAML library: printing a config is all the components other
/// than the shim need YAML for, and a YAML crate would add its weight to
/// each binary.
pub fn to_yaml<T: serde::Serialize + ?Sized>(config: &T) -> String {
    match serde_json::to_value(config) {
        Ok(value) => {
            let mut out = String::new();
            yaml_value(&value, 0, &mut out);
            out
        }
        Err(e) => format!("<the configuration cannot be printed: {e}>\n"),
    }
}

/// Block-style YAML of `value` at `indent` spaces; ends with a newline.
fn yaml_value(value: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, v) in map {
                out.push_str(&pad);
                out.push_str(&yaml_scalar_str(key));
                out.push(':');
                yaml_nested(v, indent, true, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for v in items {
                out.push_str(&pad);
                out.push('-');
                yaml_nested(v, indent, false, out);
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
}

/// What follows `key:` (`under_key`) or `-`: a scalar on the same line, or
/// a nested block (a list under a key at the key's own indentation, as
/// YAML writers commonly print it).
fn yaml_nested(v: &serde_json::Value, indent: usize, under_key: bool, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            yaml_value(v, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            yaml_value(v, if under_key { indent } else { indent + 2 }, out);
        }
        scalar => {
            out.push(' ');
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
}

fn yaml_scalar(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_scalar_str(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string plain when YAML reads it back as the same string, else
/// double-quoted (JSON's escapes are YAML's).
fn yaml_scalar_str(s: &str) -> String {
    let plain_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./:@+-".contains(c));
    let starts_well = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || "_./".contains(c));
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
    ) || s.parse::<f64>().is_ok()
        || s.starts_with("0x")
        || s.starts_with("0o")
        || s.contains(": ")
        || s.ends_with(':');
    if plain_chars && starts_well && !reserved {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

/// Logs `component`'s configuration at start, as YAML ([`to_yaml`]).
pub fn log_config<T: serde::Serialize + ?Sized>(component: &str, config: &T) {
    tracing::info!("{component} configuration:\n{}", to_yaml(config));
}

/// `1h30m0s`, `90s`, `250ms`: short and readable, parseable by
/// [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let total_ms = d.as_millis();
    if total_ms < 1000 && !d.is_zero() {
        return format!("{total_ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let ms = d.subsec_millis();
    let s_part = if ms > 0 {
        format!("{s}.{ms:03}s")
    } else {
        format!("{s}s")
    };
    match (h, m) {
        (0, 0) => s_part,
        (0, m) => format!("{m}m{s_part}"),
        (h, m) => format!("{h}h{m}m{s_part}"),
    }
}

/// Serializes a duration as [`format_duration`] writes it, for
/// `#[serde(serialize_with = "...")]`.
pub fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
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
    fn yaml_reads_back_as_the_same_value() {
        let value = serde_json::json!({
            "address": "https://localhost:15012",
            "ttl": "24h0m0s",
            "ratio": 0.5,
            "count": 8,
            "on": true,
            "nothing": null,
            "empty": "",
            "tricky": ["yes", "123", "a: b", "#x", " pad", "-dash", "line\nbreak", "ok/path"],
            "nested": {"peers": [], "map": {}, "deep": {"node": "node-a"}},
            "list_of_maps": [{"a": 1, "b": "x"}, {"c": [1, 2]}],
        });
        let yaml = to_yaml(&value);
        let back: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, value, "{yaml}");
        assert!(
            yaml.contains("address: https://localhost:15012\n"),
            "{yaml}"
        );
        assert!(yaml.contains("ttl: 24h0m0s\n"), "{yaml}");
        assert!(yaml.contains("- \"yes\"\n"), "{yaml}");
    }
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
    fn formatted_durations_parse_back() {
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h0m0s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        for d in [
            Duration::from_secs(86_400),
            Duration::from_millis(250),
            Duration::from_millis(90_500),
            Duration::from_secs(61),
            Duration::ZERO,
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
    }

    #[test]
    fn configs_print_as_yaml() {
        #[derive(serde::Serialize)]
        struct Demo {
            trust_domain: &'static str,
            #[serde(serialize_with = "serialize_duration")]
            ttl: Duration,
            audiences: Vec<&'static str>,
        }
        let yaml = to_yaml(&Demo {
            trust_domain: "cluster.local",
            ttl: Duration::from_secs(5400),
            audiences: vec!["istio-ca"],
        });
        assert_eq!(
            yaml,
            "trust_domain: cluster.local\nttl: 1h30m0s\naudiences:\n- istio-ca\n"
        );
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

    #[test]
    fn layers_take_the_flag_then_the_variable_then_the_default() {
        let env: HashMap<&str, &str> = [("TTL", "2h"), ("BLANK", "  "), ("RATIO", "half")].into();
        let l = Layers::new(&env);
        let d = Duration::from_secs(60);
        assert_eq!(
            l.duration(Some("5s".into()), Some("TTL"), d, "ttl"),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(
            l.duration(None, Some("TTL"), d, "ttl"),
            Ok(Duration::from_secs(7200))
        );
        assert_eq!(
            l.duration(None, Some("BLANK"), d, "blank"),
            Ok(d),
            "blank is unset"
        );
        assert_eq!(l.duration(None, None, d, "x"), Ok(d));
        let err = l
            .duration(Some("5 parsecs".into()), None, d, "SECRET_TTL")
            .unwrap_err();
        assert!(err.0.starts_with("SECRET_TTL:"), "{err}");
        assert_eq!(l.float(Some(0.3), "RATIO", 0.5), Ok(0.3));
        assert_eq!(l.float(None, "NONE", 0.5), Ok(0.5));
        let err = l.float(None, "RATIO", 0.5).unwrap_err();
        assert!(err.0.contains("RATIO") && err.0.contains("half"), "{err}");
        assert_eq!(l.env("BLANK"), None);
    }
}

//! SPIFFE IDs and trust domains, validated by the SPIFFE-ID specification.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

const SCHEME: &str = "spiffe://";
/// Longest trust domain name the spec allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest whole SPIFFE ID the spec allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A trust domain name such as `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidTrustDomain {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("empty"));
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(bad("longer than 255 bytes"));
        }
        if let Some(reason) = name.bytes().find_map(trust_domain_char_problem) {
            return Err(bad(reason));
        }
        Ok(TrustDomain(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>` — the trust domain's own ID, as used for bundle keys.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

fn trust_domain_char_problem(b: u8) -> Option<&'static str> {
    match b {
        b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => None,
        b'A'..=b'Z' => Some("uppercase letters are not allowed in a trust domain"),
        b':' => Some("a port is not allowed in a trust domain"),
        b'@' => Some("userinfo is not allowed in a trust domain"),
        b'%' => Some("percent-encoding is not allowed"),
        _ => Some("trust domain characters must be a-z, 0-9, '.', '-' or '_'"),
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TrustDomain::new(s.strip_prefix(SCHEME).unwrap_or(s))
    }
}

/// A validated SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(id: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidSpiffeId {
            id: truncate_for_error(id),
            reason,
        };
        if id.is_empty() {
            return Err(bad("empty"));
        }
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = match id.get(..SCHEME.len()) {
            Some(prefix) if prefix == SCHEME => &id[SCHEME.len()..],
            Some(prefix) if prefix.eq_ignore_ascii_case(SCHEME) => {
                return Err(bad("scheme must be lowercase 'spiffe'"));
            }
            _ => return Err(bad("scheme must be 'spiffe://'")),
        };
        let td_end = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_end];
        if td.is_empty() {
            return Err(bad("trust domain is missing"));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(bad("trust domain is longer than 255 bytes"));
        }
        if let Some(reason) = td.bytes().find_map(trust_domain_char_problem) {
            return Err(bad(reason));
        }
        let path = &rest[td_end..];
        if !path.is_empty() {
            validate_path(path).map_err(bad)?;
        }
        Ok(SpiffeId {
            id: id.to_owned(),
            path_start: SCHEME.len() + td_end,
        })
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`, Istio's identity for a service account.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self> {
        SpiffeId::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, without scheme.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, starting with `/`, or empty for a trust domain ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The Kubernetes namespace and service account when the path has Istio's
    /// `/ns/<ns>/sa/<sa>` shape.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The namespace of an Istio-shaped ID.
    pub fn namespace(&self) -> Option<&str> {
        self.service_account().map(|(ns, _)| ns)
    }

    pub fn is_member_of(&self, trust_domain: &str) -> bool {
        self.trust_domain() == trust_domain
    }

    /// The same path in another trust domain (how an identity in a trust
    /// domain alias maps to the primary one, as Istio's trustDomainAliases).
    pub fn with_trust_domain(&self, trust_domain: &str) -> Result<Self> {
        SpiffeId::parse(&format!("{SCHEME}{trust_domain}{}", self.path()))
    }
}

fn validate_path(path: &str) -> std::result::Result<(), &'static str> {
    // `path` starts with '/' by construction.
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err("path has an empty segment or a trailing '/'"),
            "." | ".." => return Err("path segments '.' and '..' are not allowed"),
            _ => {}
        }
        for b in segment.bytes() {
            match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
                b'%' => return Err("percent-encoding is not allowed"),
                b'?' => return Err("a query is not allowed"),
                b'#' => return Err("a fragment is not allowed"),
                _ => return Err("path characters must be a-z, A-Z, 0-9, '.', '-' or '_'"),
            }
        }
    }
    Ok(())
}

/// Bad IDs can be huge (that is one way to be bad): keep errors readable.
fn truncate_for_error(id: &str) -> String {
    const MAX: usize = 128;
    if id.len() <= MAX {
        return id.to_owned();
    }
    let mut end = MAX;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &id[..end], id.len())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SpiffeId::parse(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        SpiffeId::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reason(id: &str) -> &'static str {
        match SpiffeId::parse(id) {
            Err(Error::InvalidSpiffeId { reason, .. }) => reason,
            other => panic!("{id:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn istio_identity_round_trips() {
        let id = SpiffeId::for_service_account("cluster.local", "default", "bookinfo-productpage")
            .unwrap();
        assert_eq!(
            id.as_str(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/bookinfo-productpage");
        assert_eq!(
            id.service_account(),
            Some(("default", "bookinfo-productpage"))
        );
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn trust_domain_only_id_is_valid() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "");
        assert_eq!(id.service_account(), None);
    }

    #[test]
    fn non_istio_paths_have_no_service_account() {
        for id in [
            "spiffe://td/ns/a/sa",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/x/a/sa/b",
        ] {
            assert_eq!(SpiffeId::parse(id).unwrap().service_account(), None, "{id}");
        }
    }

    #[test]
    fn spec_edge_cases_are_rejected_with_a_reason() {
        assert_eq!(reason(""), "empty");
        assert_eq!(
            reason("spiffe://Cluster.local/ns/a/sa/b"),
            "uppercase letters are not allowed in a trust domain"
        );
        assert_eq!(
            reason("SPIFFE://td/ns/a"),
            "scheme must be lowercase 'spiffe'"
        );
        assert_eq!(reason("https://td/ns/a"), "scheme must be 'spiffe://'");
        assert_eq!(reason("spiffe:/td/ns/a"), "scheme must be 'spiffe://'");
        assert_eq!(reason("spiffe:///ns/a"), "trust domain is missing");
        assert_eq!(
            reason("spiffe://td/ns/../sa/b"),
            "path segments '.' and '..' are not allowed"
        );
        assert_eq!(
            reason("spiffe://td/ns/./sa/b"),
            "path segments '.' and '..' are not allowed"
        );
        assert_eq!(
            reason("spiffe://td/ns/a/"),
            "path has an empty segment or a trailing '/'"
        );
        assert_eq!(
            reason("spiffe://td/"),
            "path has an empty segment or a trailing '/'"
        );
        assert_eq!(
            reason("spiffe://td//a"),
            "path has an empty segment or a trailing '/'"
        );
        assert_eq!(
            reason("spiffe://td/ns/a%20b"),
            "percent-encoding is not allowed"
        );
        assert_eq!(
            reason("spiffe://t%41d/ns"),
            "percent-encoding is not allowed"
        );
        assert_eq!(reason("spiffe://td/ns?x=1"), "a query is not allowed");
        assert_eq!(reason("spiffe://td/ns#frag"), "a fragment is not allowed");
        assert_eq!(
            reason("spiffe://td:8080/ns"),
            "a port is not allowed in a trust domain"
        );
        assert_eq!(
            reason("spiffe://user@td/ns"),
            "userinfo is not allowed in a trust domain"
        );
        assert_eq!(
            reason("spiffe://td/ns/ä"),
            "path characters must be a-z, A-Z, 0-9, '.', '-' or '_'"
        );
    }

    #[test]
    fn length_limits_are_exact() {
        let td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{td}")).is_ok());
        assert_eq!(
            reason(&format!("spiffe://{td}a")),
            "trust domain is longer than 255 bytes"
        );

        let prefix = "spiffe://td/";
        let ok = format!("{prefix}{}", "p".repeat(MAX_SPIFFE_ID_LEN - prefix.len()));
        assert_eq!(ok.len(), 2048);
        assert!(SpiffeId::parse(&ok).is_ok());
        let too_long = format!("{ok}p");
        assert_eq!(too_long.len(), 2049);
        assert_eq!(reason(&too_long), "longer than 2048 bytes");
    }

    #[test]
    fn errors_truncate_huge_inputs() {
        let err = SpiffeId::parse(&"x".repeat(5000)).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
        assert!(err.contains("5000 bytes"), "{err}");
    }

    #[test]
    fn trust_domain_validation() {
        assert_eq!(
            TrustDomain::new("cluster.local").unwrap().as_str(),
            "cluster.local"
        );
        assert_eq!(
            "spiffe://example.org"
                .parse::<TrustDomain>()
                .unwrap()
                .as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("Example.org").is_err());
        assert!(TrustDomain::new("").is_err());
        assert!(TrustDomain::new(&"a".repeat(256)).is_err());
        assert_eq!(TrustDomain::new("td").unwrap().id_string(), "spiffe://td");
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,12}".prop_filter("not . or ..", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn valid_ids_parse_and_round_trip(td in "[a-z0-9._-]{1,40}", segs in prop::collection::vec(segment(), 0..6)) {
            let path: String = segs.iter().map(|s| format!("/{s}")).collect();
            let raw = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&raw).unwrap();
            prop_assert_eq!(id.as_str(), raw.as_str());
            prop_assert_eq!(id.trust_domain(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
        }

        #[test]
        fn parser_never_panics_and_accepts_only_what_it_can_reprint(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!(s.starts_with("spiffe://"));
                prop_assert!(!s.ends_with('/'));
                prop_assert!(!s.contains('%') && !s.contains('?') && !s.contains('#'));
            }
        }

        #[test]
        fn one_bad_byte_in_the_trust_domain_is_rejected(td in "[a-z0-9]{1,10}", bad in "[A-Z:@%/ !]") {
            let raw = format!("spiffe://{td}{bad}x/p");
            // A '/' just ends the trust domain early, which is fine; anything else is invalid.
            if bad != "/" {
                prop_assert!(SpiffeId::parse(&raw).is_err());
            }
        }
    }
}

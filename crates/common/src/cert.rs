//! The X.509-SVID certificate profile: parsing certificates into what meshid
//! needs, and issuing leaves, intermediates and roots.
//!
//! Issued leaves follow DESIGN §2.2 exactly: empty subject, one critical URI
//! SAN, BasicConstraints cA=false, KeyUsage digitalSignature (+keyEncipherment for RSA keys),
//! ExtKeyUsage serverAuth+clientAuth, a random 128-bit serial, NotBefore
//! backdated two minutes, NotAfter capped at the signer's own.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::error::{Error, Result};
use crate::keys::{KeyType, PrivateKey, pem_encode};
use crate::spiffe::SpiffeId;

/// How far NotBefore is backdated, for clock skew between nodes.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(120);

/// What meshid reads out of a certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The SPIFFE ID when the certificate carries exactly one `spiffe://` URI SAN.
    pub spiffe_id: Option<SpiffeId>,
    /// Every URI SAN, as written.
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// Lowercase hex, no leading zeros (as Envoy's admin `/certs` shows it).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub subject: String,
    pub issuer: String,
    /// DER SubjectPublicKeyInfo.
    pub public_key_spki: Vec<u8>,
}

impl fmt::Debug for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertInfo")
            .field("spiffe_id", &self.spiffe_id.as_ref().map(SpiffeId::as_str))
            .field("serial", &self.serial)
            .field("not_before", &unix_secs(self.not_before))
            .field("not_after", &unix_secs(self.not_after))
            .field("is_ca", &self.is_ca)
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| Error::BadCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::BadCertificate(format!(
                "{} trailing bytes after the certificate",
                rest.len()
            )));
        }
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        let mut is_ca = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                            GeneralName::DNSName(dns) => dns_sans.push((*dns).to_owned()),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                _ => {}
            }
        }
        let spiffe_uris: Vec<&String> = uri_sans
            .iter()
            .filter(|u| u.starts_with("spiffe://"))
            .collect();
        let spiffe_id = match (spiffe_uris.as_slice(), uri_sans.len()) {
            ([one], 1) => SpiffeId::parse(one).ok(),
            _ => None,
        };
        let validity = cert.validity();
        Ok(CertInfo {
            spiffe_id,
            serial: cert.tbs_certificate.serial.to_str_radix(16),
            not_before: from_unix(validity.not_before.timestamp()),
            not_after: from_unix(validity.not_after.timestamp()),
            is_ca,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            public_key_spki: cert.public_key().raw.to_vec(),
            uri_sans,
            dns_sans,
        })
    }

    /// The SVID identity, or an error that says why there is none.
    pub fn require_spiffe_id(&self) -> Result<&SpiffeId> {
        if self.uri_sans.len() > 1 {
            return Err(Error::MultipleUriSans {
                serial: self.serial.clone(),
                count: self.uri_sans.len(),
            });
        }
        self.spiffe_id.as_ref().ok_or_else(|| Error::NoSpiffeId {
            serial: self.serial.clone(),
        })
    }

    /// Total lifetime.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }
}

fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Seconds since the Unix epoch (negative before it), for logs and JSON.
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Parses every `CERTIFICATE` block of a PEM string, in order. Errors if there
/// are none or one is malformed.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::BadPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(Error::NotPem {
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// Whether `der` is signed by its own key (a root). Names alone cannot tell:
/// Istio intermediates often carry their root's subject (`O=cluster.local`).
pub fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
}

/// PEM-encodes one DER certificate.
pub fn cert_to_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// PEM-encodes several certificates, concatenated.
pub fn certs_to_pem<'a>(ders: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    ders.into_iter().map(|d| cert_to_pem(d)).collect()
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(unix_secs(t))
}

/// digitalSignature always; keyEncipherment only for an RSA key: RFC 5480
/// §3 forbids it for EC keys (pkilint reports it as an error), while
/// istiod sets it for every key.
fn leaf_key_usages(public_key_spki: &[u8]) -> Vec<KeyUsagePurpose> {
    use x509_parser::x509::SubjectPublicKeyInfo;
    let rsa = SubjectPublicKeyInfo::from_der(public_key_spki).is_ok_and(|(_, spki)| {
        spki.algorithm.algorithm == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
    });
    let mut usages = vec![KeyUsagePurpose::DigitalSignature];
    if rsa {
        usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    usages
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| Error::CertificateBuild("no randomness".into()))?;
    // A serial must be positive and non-zero; DER encoding adds a leading 0 if needed.
    if bytes.iter().all(|b| *b == 0) {
        bytes[15] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// A signing certificate with its key: a self-signed root, an intermediate,
/// or a plugged-in CA.
pub struct CertificateAuthority {
    issuer: Issuer<'static, PrivateKey>,
    cert: CertificateDer<'static>,
    info: CertInfo,
    /// Certificates between this one and the root, nearest first (from
    /// `cert-chain.pem` minus this cert and the roots).
    intermediates: Vec<CertificateDer<'static>>,
    /// The certificate is signed by its own key.
    self_signed: bool,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert", &self.info)
            .field("intermediates", &self.intermediates.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

/// What goes into a leaf beyond the fixed profile; see
/// [`CertificateAuthority::issue_custom`].
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub uri_sans: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub server_auth: bool,
    pub client_auth: bool,
    pub ttl: Duration,
}

impl LeafSpec {
    /// No names, both usages.
    pub fn new(ttl: Duration) -> Self {
        LeafSpec {
            uri_sans: Vec::new(),
            dns_names: Vec::new(),
            ips: Vec::new(),
            server_auth: true,
            client_auth: true,
            ttl,
        }
    }

    /// The X.509-SVID profile for `id`.
    pub fn svid(id: &SpiffeId, ttl: Duration) -> Self {
        LeafSpec {
            uri_sans: vec![id.to_string()],
            ..LeafSpec::new(ttl)
        }
    }
}

/// Options for CA certificates made by [`CertificateAuthority::self_signed_root`]
/// and [`CertificateAuthority::issue_intermediate`].
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// Subject organisation; Istio uses the trust domain.
    pub organization: String,
    pub common_name: Option<String>,
    pub ttl: Duration,
    pub key_type: KeyType,
    /// BasicConstraints path length (None = unconstrained).
    pub path_len: Option<u8>,
}

impl CaOptions {
    pub fn new(organization: &str, ttl: Duration) -> Self {
        CaOptions {
            organization: organization.to_owned(),
            common_name: None,
            ttl,
            key_type: KeyType::EcdsaP256,
            path_len: None,
        }
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed root.
    pub fn self_signed_root(opts: &CaOptions) -> Result<Self> {
        let key = PrivateKey::generate(opts.key_type)?;
        let params = ca_params(opts, SystemTime::now())?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::CertificateBuild(e.to_string()))?;
        Self::from_parts(cert.der().clone(), key, Vec::new())
    }

    /// Issues an intermediate CA signed by this one.
    pub fn issue_intermediate(&self, opts: &CaOptions) -> Result<Self> {
        let key = PrivateKey::generate(opts.key_type)?;
        let mut params = ca_params(opts, SystemTime::now())?;
        params.not_after = params.not_after.min(to_offset(self.info.not_after));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| Error::CertificateBuild(e.to_string()))?;
        // A root is never part of its descendants' chains.
        let intermediates = if self.is_self_signed() {
            Vec::new()
        } else {
            std::iter::once(self.cert.clone())
                .chain(self.intermediates.iter().cloned())
                .collect()
        };
        Self::from_parts(cert.der().clone(), key, intermediates)
    }

    /// Loads a CA from its certificate and key (PEM), e.g. a plugged-in
    /// `ca-cert.pem` / `ca-key.pem`. `intermediates` are the certificates
    /// between it and the root, nearest first, roots excluded.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        intermediates: Vec<CertificateDer<'static>>,
    ) -> Result<Self> {
        let mut certs = parse_pem_certs(cert_pem)?;
        let cert = certs.remove(0);
        let key = PrivateKey::from_pem(key_pem)?;
        Self::from_parts(cert, key, intermediates)
    }

    fn from_parts(
        cert: CertificateDer<'static>,
        key: PrivateKey,
        intermediates: Vec<CertificateDer<'static>>,
    ) -> Result<Self> {
        let info = CertInfo::from_der(&cert)?;
        if !info.is_ca {
            return Err(Error::BadCertificate(format!(
                "certificate {} ({}) is not a CA (BasicConstraints cA is not true)",
                info.serial, info.subject
            )));
        }
        if info.public_key_spki != key.public_key_spki() {
            return Err(Error::InvalidPrivateKey(format!(
                "the key does not match CA certificate {} ({})",
                info.serial, info.subject
            )));
        }
        let self_signed = is_self_signed(&cert);
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| Error::BadCertificate(e.to_string()))?;
        Ok(CertificateAuthority {
            issuer,
            cert,
            info,
            intermediates,
            self_signed,
        })
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> String {
        cert_to_pem(&self.cert)
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub fn key(&self) -> &PrivateKey {
        self.issuer.key()
    }

    /// Intermediates between this CA and the root, nearest first.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// Whether this CA is its own root.
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }

    /// Issues a workload leaf for `id` over the public key `public_key_spki`
    /// (DER SubjectPublicKeyInfo, e.g. from a verified CSR), valid for `ttl`
    /// from `now`, capped at this CA's NotAfter.
    pub fn issue_leaf(
        &self,
        public_key_spki: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>> {
        self.issue_custom(public_key_spki, &LeafSpec::svid(id, ttl), now)
    }

    /// Issues a TLS server certificate (DNS and IP SANs, serverAuth only) —
    /// the CA's own serving certificate.
    pub fn issue_server_cert(
        &self,
        public_key_spki: &[u8],
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>> {
        let spec = LeafSpec {
            dns_names: dns_names.to_vec(),
            ips: ips.to_vec(),
            client_auth: false,
            ..LeafSpec::new(ttl)
        };
        self.issue_custom(public_key_spki, &spec, now)
    }

    /// Issues a leaf as `spec` says. The profile's fixed parts (empty subject,
    /// cA=false, key usages, random serial, backdating, NotAfter cap) always
    /// apply; tools and tests use this for certificates outside the SVID
    /// profile, such as one without a URI SAN or without clientAuth.
    pub fn issue_custom(
        &self,
        public_key_spki: &[u8],
        spec: &LeafSpec,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>> {
        let mut params = self.leaf_params(spec.ttl, now, public_key_spki)?;
        params.extended_key_usages = [
            (spec.server_auth, ExtendedKeyUsagePurpose::ServerAuth),
            (spec.client_auth, ExtendedKeyUsagePurpose::ClientAuth),
        ]
        .into_iter()
        .filter_map(|(on, eku)| on.then_some(eku))
        .collect();
        let build_err =
            |what: &str, e: rcgen::Error| Error::CertificateBuild(format!("{what}: {e}"));
        for uri in &spec.uri_sans {
            params.subject_alt_names.push(SanType::URI(
                uri.as_str().try_into().map_err(|e| build_err(uri, e))?,
            ));
        }
        for dns in &spec.dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                dns.as_str().try_into().map_err(|e| build_err(dns, e))?,
            ));
        }
        params
            .subject_alt_names
            .extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.sign(&params, public_key_spki)
    }

    fn leaf_params(
        &self,
        ttl: Duration,
        now: SystemTime,
        public_key_spki: &[u8],
    ) -> Result<CertificateParams> {
        if now >= self.info.not_after {
            return Err(Error::CertificateBuild(format!(
                "signing certificate {} expired at {} (unix seconds)",
                self.info.serial,
                unix_secs(self.info.not_after)
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = leaf_key_usages(public_key_spki);
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset(now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now));
        let wanted = now.checked_add(ttl).unwrap_or(self.info.not_after);
        params.not_after = to_offset(wanted.min(self.info.not_after));
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key_spki: &[u8],
    ) -> Result<CertificateDer<'static>> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(public_key_spki)
            .map_err(|e| Error::CertificateBuild(format!("unsupported public key: {e}")))?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| Error::CertificateBuild(e.to_string()))?;
        Ok(cert.der().clone())
    }
}

fn ca_params(opts: &CaOptions, now: SystemTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, opts.organization.as_str());
    if let Some(cn) = &opts.common_name {
        dn.push(DnType::CommonName, cn.as_str());
    }
    params.distinguished_name = dn;
    params.is_ca = match opts.path_len {
        Some(n) => IsCa::Ca(rcgen::BasicConstraints::Constrained(n)),
        None => IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
    };
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    params.not_before = to_offset(now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now));
    params.not_after = to_offset(now + opts.ttl);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::X509Certificate;

    fn root() -> CertificateAuthority {
        CertificateAuthority::self_signed_root(&CaOptions::new(
            "cluster.local",
            Duration::from_secs(86400 * 365),
        ))
        .unwrap()
    }

    fn web() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
    }

    #[test]
    fn an_rsa_leaf_also_gets_key_encipherment() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let der = ca
            .issue_leaf(
                key.public_key_spki(),
                &web(),
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
    }

    #[test]
    fn leaf_follows_the_svid_profile() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let now = SystemTime::now();
        let der = ca
            .issue_leaf(
                key.public_key_spki(),
                &web(),
                Duration::from_secs(3600),
                now,
            )
            .unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(cert.subject().to_string(), "");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "URI SAN must be critical");
        assert_eq!(san.value.general_names.len(), 1);
        let bc = cert
            .basic_constraints()
            .unwrap()
            .expect("BasicConstraints present");
        assert!(!bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(
            !ku.value.key_encipherment(),
            "keyEncipherment is for RSA keys only (RFC 5480)"
        );
        assert!(!ku.value.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(
            cert.tbs_certificate.serial.bits() > 64,
            "serial should be random 128-bit"
        );

        let info = CertInfo::from_der(&der).unwrap();
        assert_eq!(info.spiffe_id.as_ref(), Some(&web()));
        assert_eq!(info.public_key_spki, key.public_key_spki());
        assert_eq!(unix_secs(info.not_before), unix_secs(now) - 120);
        assert_eq!(unix_secs(info.not_after), unix_secs(now) + 3600);
    }

    #[test]
    fn serials_differ() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let now = SystemTime::now();
        let a = CertInfo::from_der(
            &ca.issue_leaf(key.public_key_spki(), &web(), Duration::from_secs(60), now)
                .unwrap(),
        )
        .unwrap();
        let b = CertInfo::from_der(
            &ca.issue_leaf(key.public_key_spki(), &web(), Duration::from_secs(60), now)
                .unwrap(),
        )
        .unwrap();
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn not_after_is_capped_at_the_signer() {
        let ca =
            CertificateAuthority::self_signed_root(&CaOptions::new("td", Duration::from_secs(600)))
                .unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let leaf = ca
            .issue_leaf(
                key.public_key_spki(),
                &web(),
                Duration::from_secs(86400),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(
            CertInfo::from_der(&leaf).unwrap().not_after,
            ca.info().not_after
        );
    }

    #[test]
    fn expired_signer_refuses_to_sign() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let later = ca.info().not_after + Duration::from_secs(1);
        let err = ca
            .issue_leaf(
                key.public_key_spki(),
                &web(),
                Duration::from_secs(60),
                later,
            )
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn rsa_and_p384_keys_get_leaves_and_can_sign() {
        let rsa_root = CertificateAuthority::self_signed_root(&CaOptions {
            key_type: KeyType::Rsa2048,
            ..CaOptions::new("td", Duration::from_secs(3600))
        })
        .unwrap();
        for kt in [KeyType::Rsa2048, KeyType::EcdsaP384, KeyType::EcdsaP256] {
            let key = PrivateKey::generate(kt).unwrap();
            let leaf = rsa_root
                .issue_leaf(
                    key.public_key_spki(),
                    &web(),
                    Duration::from_secs(60),
                    SystemTime::now(),
                )
                .unwrap();
            assert_eq!(
                CertInfo::from_der(&leaf).unwrap().public_key_spki,
                key.public_key_spki(),
                "{kt}"
            );
        }
    }

    #[test]
    fn intermediate_chain_and_pem_round_trip() {
        let root = root();
        let inter = root
            .issue_intermediate(&CaOptions {
                path_len: Some(0),
                ..CaOptions::new("cluster.local", Duration::from_secs(3600))
            })
            .unwrap();
        assert!(inter.info().is_ca);
        assert!(!inter.is_self_signed());
        assert!(root.is_self_signed());
        assert!(
            inter.intermediates().is_empty(),
            "the root is not part of the chain"
        );
        let loaded =
            CertificateAuthority::from_pem(&inter.cert_pem(), &inter.key().to_pkcs8_pem(), vec![])
                .unwrap();
        assert_eq!(loaded.info().serial, inter.info().serial);

        let other = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let err = CertificateAuthority::from_pem(&inter.cert_pem(), &other.to_pkcs8_pem(), vec![])
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let leaf = ca
            .issue_leaf(
                key.public_key_spki(),
                &web(),
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        let err = CertificateAuthority::from_pem(&cert_to_pem(&leaf), &key.to_pkcs8_pem(), vec![])
            .unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn pem_parsing() {
        let ca = root();
        let two = format!("{}{}", ca.cert_pem(), ca.cert_pem());
        assert_eq!(parse_pem_certs(&two).unwrap().len(), 2);
        assert!(matches!(
            parse_pem_certs("no pem here"),
            Err(Error::NotPem { .. })
        ));
        assert!(
            parse_pem_certs("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }

    #[test]
    fn leaves_are_accepted_by_the_spiffe_crate() {
        let root = root();
        let inter = root
            .issue_intermediate(&CaOptions::new("cluster.local", Duration::from_secs(3600)))
            .unwrap();
        for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let key = PrivateKey::generate(kt).unwrap();
            let leaf = inter
                .issue_leaf(
                    key.public_key_spki(),
                    &web(),
                    Duration::from_secs(600),
                    SystemTime::now(),
                )
                .unwrap();
            let chain: Vec<u8> = leaf.iter().chain(inter.cert().iter()).copied().collect();
            let svid = spiffe::X509Svid::parse_from_der(&chain, key.pkcs8_der())
                .unwrap_or_else(|e| panic!("{kt}: {e}"));
            assert_eq!(svid.spiffe_id().to_string(), web().to_string());
            assert_eq!(svid.cert_chain().len(), 2);
            let bundle =
                spiffe::X509Bundle::parse_from_der("cluster.local".parse().unwrap(), root.cert())
                    .unwrap();
            assert_eq!(bundle.authorities().len(), 1);
        }
    }

    #[test]
    fn leaves_verify_with_webpki_for_client_and_server_auth() {
        let root = root();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let leaf = root
            .issue_leaf(
                key.public_key_spki(),
                &web(),
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .unwrap();
        let anchors = [webpki::anchor_from_trusted_cert(root.cert()).unwrap()];
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let now = rustls_pki_types::UnixTime::now();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                now,
                usage,
                None,
                None,
            )
            .expect("webpki accepts the leaf");
        }
        // The CA's own serving cert is server-only.
        let server = root
            .issue_server_cert(
                key.public_key_spki(),
                &["istiod.istio-system.svc".into()],
                &[],
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .unwrap();
        let ee = webpki::EndEntityCert::try_from(&server).unwrap();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .unwrap();
        assert!(
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None
            )
            .is_err()
        );
        let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
        ee.verify_is_valid_for_subject_name(&name).unwrap();
    }

    #[test]
    fn self_signed_is_told_by_signature_not_by_name() {
        let root = root();
        // Same subject as the root (O=cluster.local, no CN), signed by it.
        let inter = root
            .issue_intermediate(&CaOptions::new("cluster.local", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(inter.info().subject, root.info().subject);
        assert!(is_self_signed(root.cert()));
        assert!(!is_self_signed(inter.cert()));
    }
}

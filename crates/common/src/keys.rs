//! Private keys and certificate signing requests.
//!
//! A [`PrivateKey`] lives only in memory: its PKCS#8 bytes are zeroized on
//! drop and never appear in `Debug` output. It signs through aws-lc-rs and
//! plugs into rcgen as a [`rcgen::SigningKey`], so no unzeroized copy of the
//! key is made to sign a CSR or a certificate.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;

/// Key algorithms meshid generates and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: meshid's default for workloads.
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384 (accepted for plugged-in CA keys).
    EcdsaP384,
    /// RSA-2048 with PKCS#1 v1.5 SHA-256: Istio's agent default.
    Rsa2048,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    fn ecdsa_alg(self) -> Option<&'static signature::EcdsaSigningAlgorithm> {
        match self {
            KeyType::EcdsaP256 => Some(&signature::ECDSA_P256_SHA256_ASN1_SIGNING),
            KeyType::EcdsaP384 => Some(&signature::ECDSA_P384_SHA384_ASN1_SIGNING),
            KeyType::Rsa2048 => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;
    /// Accepts meshid's names and Istio's `ECC_SIGNATURE_ALGORITHM` values
    /// (`ECDSA` means P-256; empty or `RSA` means RSA-2048).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "ecdsa" | "p256" | "ec" => Ok(KeyType::EcdsaP256),
            "ecdsa-p384" | "p384" => Ok(KeyType::EcdsaP384),
            "rsa-2048" | "rsa" | "rsa2048" => Ok(KeyType::Rsa2048),
            _ => Err(Error::UnknownKeyType(s.to_owned())),
        }
    }
}

enum Inner {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A private key held in memory only.
pub struct PrivateKey {
    key_type: KeyType,
    pkcs8: Zeroizing<Vec<u8>>,
    inner: Inner,
    /// Raw public key as rcgen wants it (EC point or PKCS#1 RSAPublicKey).
    public_raw: Vec<u8>,
    /// DER SubjectPublicKeyInfo.
    spki: Vec<u8>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("type", &self.key_type)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl PrivateKey {
    /// Generates a fresh key.
    pub fn generate(key_type: KeyType) -> Result<Self> {
        let fail = |reason: String| Error::KeyGeneration {
            key_type: key_type.as_str(),
            reason,
        };
        let pkcs8 = match key_type.ecdsa_alg() {
            Some(alg) => {
                let pair = EcdsaKeyPair::generate(alg).map_err(|e| fail(e.to_string()))?;
                let doc = pair.to_pkcs8v1().map_err(|e| fail(e.to_string()))?;
                Zeroizing::new(doc.as_ref().to_vec())
            }
            None => {
                let pair =
                    RsaKeyPair::generate(KeySize::Rsa2048).map_err(|e| fail(e.to_string()))?;
                let der = pair.as_der().map_err(|e| fail(e.to_string()))?;
                Zeroizing::new(der.as_ref().to_vec())
            }
        };
        Self::from_pkcs8(key_type, pkcs8)
    }

    fn from_pkcs8(key_type: KeyType, pkcs8: Zeroizing<Vec<u8>>) -> Result<Self> {
        let reject = |e: aws_lc_rs::error::KeyRejected| Error::InvalidPrivateKey(e.to_string());
        let (inner, (public_raw, spki)) = match key_type.ecdsa_alg() {
            Some(alg) => {
                let pair = EcdsaKeyPair::from_pkcs8(alg, &pkcs8).map_err(reject)?;
                let public = public_parts(&pair)?;
                (Inner::Ecdsa(pair), public)
            }
            None => {
                let pair = RsaKeyPair::from_pkcs8(&pkcs8).map_err(reject)?;
                let public = public_parts(&pair)?;
                (Inner::Rsa(pair), public)
            }
        };
        Ok(PrivateKey {
            key_type,
            pkcs8,
            inner,
            public_raw,
            spki,
        })
    }

    /// Reads a PEM private key: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1
    /// (`RSA PRIVATE KEY`), the forms plugged-in CA keys come in.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => Error::NotPem {
                expected: "PRIVATE KEY",
            },
            other => Error::BadPem(other.to_string()),
        })?;
        Self::from_der(&der)
    }

    /// Reads a DER private key in any of the forms [`PrivateKey::from_pem`] takes.
    pub fn from_der(der: &PrivateKeyDer<'_>) -> Result<Self> {
        let bytes = der.secret_der();
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let alg = key_type.ecdsa_alg().expect("ecdsa");
            if let Ok(pair) = EcdsaKeyPair::from_private_key_der(alg, bytes) {
                let doc = pair
                    .to_pkcs8v1()
                    .map_err(|e| Error::InvalidPrivateKey(e.to_string()))?;
                return Self::from_pkcs8(key_type, Zeroizing::new(doc.as_ref().to_vec()));
            }
        }
        let rsa = match der {
            PrivateKeyDer::Pkcs1(_) => RsaKeyPair::from_der(bytes),
            _ => RsaKeyPair::from_pkcs8(bytes),
        }
        .map_err(|e| {
            Error::InvalidPrivateKey(format!("not an ECDSA P-256/P-384 or RSA key: {e}"))
        })?;
        let bits = rsa.public_modulus_len() * 8;
        if bits < 2048 {
            return Err(Error::InvalidPrivateKey(format!(
                "RSA key of {bits} bits is too small (2048 at least)"
            )));
        }
        let doc = rsa
            .as_der()
            .map_err(|e| Error::InvalidPrivateKey(e.to_string()))?;
        Self::from_pkcs8(KeyType::Rsa2048, Zeroizing::new(doc.as_ref().to_vec()))
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The PKCS#8 DER bytes (for the SPIFFE Workload API and SDS, never logs).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// PKCS#8 PEM, zeroized when dropped.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.pkcs8))
    }

    /// DER SubjectPublicKeyInfo of the public half.
    pub fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    /// A rustls key for TLS configs.
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.to_vec()))
    }

    /// Builds a PEM CSR for `id`: empty subject, one URI SAN (critical because
    /// the subject is empty), nothing else — what Istio's agent sends.
    pub fn csr_for(&self, id: &SpiffeId) -> Result<String> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| Error::BadCsr(e.to_string()))?,
        )];
        let csr = params
            .serialize_request(self)
            .map_err(|e| Error::BadCsr(e.to_string()))?;
        csr.pem().map_err(|e| Error::BadCsr(e.to_string()))
    }
}

/// The raw public key (what rcgen signs over) and its DER SubjectPublicKeyInfo.
fn public_parts<K>(pair: &K) -> Result<(Vec<u8>, Vec<u8>)>
where
    K: KeyPair,
    K::PublicKey: AsRef<[u8]> + AsDer<aws_lc_rs::encoding::PublicKeyX509Der<'static>>,
{
    let spki = pair
        .public_key()
        .as_der()
        .map_err(|e| Error::InvalidPrivateKey(e.to_string()))?;
    Ok((pair.public_key().as_ref().to_vec(), spki.as_ref().to_vec()))
}

impl rcgen::PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.rcgen_alg()
    }
}

impl rcgen::SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ecdsa(pair) => pair
                .sign(&rng, msg)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| rcgen::Error::RingUnspecified),
            Inner::Rsa(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| rcgen::Error::RingUnspecified)?;
                Ok(sig)
            }
        }
    }
}

/// What the CA needs from a verified CSR.
#[derive(Clone, Debug)]
pub struct ParsedCsr {
    /// DER SubjectPublicKeyInfo of the requester's key.
    pub public_key_spki: Vec<u8>,
    /// Every URI SAN the CSR asks for.
    pub uri_sans: Vec<String>,
    /// Every DNS SAN the CSR asks for (ignored by the CA, reported in logs).
    pub dns_sans: Vec<String>,
    /// The subject, RFC 4514 style, empty for Istio CSRs.
    pub subject: String,
}

/// Parses a PEM CSR and verifies its self-signature. Errors say which of
/// "not PEM", "not a CSR" or "bad signature" it was.
pub fn parse_csr_pem(pem: &str) -> Result<ParsedCsr> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => Error::NotPem {
                expected: "CERTIFICATE REQUEST",
            },
            other => Error::BadPem(other.to_string()),
        })?;
    parse_csr_der(der.as_ref())
}

/// Parses a DER CSR and verifies its self-signature.
pub fn parse_csr_der(der: &[u8]) -> Result<ParsedCsr> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| Error::BadCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::BadCsr(format!(
            "{} trailing bytes after the CSR",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|_| Error::CsrSignature)?;
    let info = &csr.certification_request_info;
    let mut uri_sans = Vec::new();
    let mut dns_sans = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uri_sans.push((*uri).to_owned()),
                        GeneralName::DNSName(dns) => dns_sans.push((*dns).to_owned()),
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(ParsedCsr {
        public_key_spki: info.subject_pki.raw.to_vec(),
        uri_sans,
        dns_sans,
        subject: info.subject.to_string(),
    })
}

/// PEM text of `der` under `label` (64-column base64).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 32);
    out.push_str(&format!("-----BEGIN {label}-----\n"));
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys, serials and nonces come from aws-lc's DRBG, which the workspace
    /// builds to seed from the kernel (getrandom) with RDRAND as its second
    /// source, as BoringSSL and Go do, not from CPU timing jitter
    /// (.cargo/config.toml): jitter's start-up sampling cost every process
    /// 30-60 ms of CPU. A build with it links jitterentropy, whose functions
    /// this test binary would then name.
    #[test]
    fn aws_lc_seeds_from_the_kernel_not_from_cpu_jitter() {
        let exe = std::fs::read("/proc/self/exe").expect("read this test binary");
        let text = String::from_utf8_lossy(&exe);
        // Written backwards, so that this test's own strings do not match.
        let aws_lc: String = "setyb_DNAR".chars().rev().collect();
        let jitter: String = "tini_yportne_tnej".chars().rev().collect();
        assert!(
            text.contains(&aws_lc),
            "this test binary names no aws-lc function: the check cannot see its symbols"
        );
        assert!(
            !text.contains(&jitter),
            "aws-lc was built with CPU jitter entropy: build with AWS_LC_SYS_NO_JITTER_ENTROPY=1 \
             (.cargo/config.toml sets it for cargo run in this workspace)"
        );
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let dbg = format!("{key:?}");
        assert!(dbg.contains("[redacted]"), "{dbg}");
        let pem = key.to_pkcs8_pem();
        let body: String = pem.lines().nth(1).unwrap().chars().take(20).collect();
        assert!(!dbg.contains(&body));
    }

    #[test]
    fn csr_round_trips_for_every_key_type() {
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let key = PrivateKey::generate(key_type).unwrap();
            let pem = key.csr_for(&id()).unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
            let parsed = parse_csr_pem(&pem).unwrap();
            assert_eq!(parsed.uri_sans, vec![id().to_string()], "{key_type}");
            assert!(parsed.dns_sans.is_empty());
            assert_eq!(parsed.subject, "");
            assert_eq!(parsed.public_key_spki, key.public_key_spki(), "{key_type}");
        }
    }

    #[test]
    fn csr_san_is_critical() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let pem = key.csr_for(&id()).unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        let critical = csr
            .certification_request_info
            .iter_attributes()
            .flat_map(|attr| match attr.parsed_attribute() {
                x509_parser::prelude::ParsedCriAttribute::ExtensionRequest(req) => {
                    req.extensions.clone()
                }
                _ => vec![],
            })
            .find(|ext| {
                matches!(
                    ext.parsed_extension(),
                    ParsedExtension::SubjectAlternativeName(_)
                )
            })
            .map(|ext| ext.critical);
        assert_eq!(critical, Some(true));
    }

    #[test]
    fn bad_csrs_name_their_problem() {
        assert!(matches!(parse_csr_pem("hello"), Err(Error::NotPem { .. })));
        let garbage = pem_encode("CERTIFICATE REQUEST", b"\x30\x03garbage");
        assert!(
            matches!(parse_csr_pem(&garbage), Err(Error::BadCsr(_))),
            "{:?}",
            parse_csr_pem(&garbage)
        );

        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let pem = key.csr_for(&id()).unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Flip a byte inside the signed SAN: the structure still parses, the signature does not verify.
        let at = der.windows(6).position(|w| w == b"spiffe").unwrap();
        der[at + 9] ^= 0x01;
        let tampered = pem_encode("CERTIFICATE REQUEST", &der);
        assert!(
            matches!(parse_csr_pem(&tampered), Err(Error::CsrSignature)),
            "{:?}",
            parse_csr_pem(&tampered)
        );
    }

    #[test]
    fn pem_keys_in_every_form_load() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let back = PrivateKey::from_pem(&key.to_pkcs8_pem()).unwrap();
        assert_eq!(back.public_key_spki(), key.public_key_spki());
        assert_eq!(back.key_type(), KeyType::EcdsaP256);

        let rsa = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let back = PrivateKey::from_pem(&rsa.to_pkcs8_pem()).unwrap();
        assert_eq!(back.key_type(), KeyType::Rsa2048);
        assert_eq!(back.public_key_spki(), rsa.public_key_spki());

        assert!(matches!(
            PrivateKey::from_pem("nope"),
            Err(Error::NotPem { .. })
        ));
    }

    #[test]
    fn key_type_names() {
        assert_eq!("ECDSA".parse::<KeyType>().unwrap(), KeyType::EcdsaP256);
        assert_eq!("RSA".parse::<KeyType>().unwrap(), KeyType::Rsa2048);
        assert_eq!("ecdsa-p384".parse::<KeyType>().unwrap(), KeyType::EcdsaP384);
        assert!("dsa".parse::<KeyType>().is_err());
    }
}

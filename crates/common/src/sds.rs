//! Envoy SDS secrets (DESIGN §2.3), both ways: the resource names and type
//! URL, encoding credentials into `Secret`s (what the agent serves) and
//! decoding a `DiscoveryResponse` back into an SVID or a trust bundle (what
//! the shim accepts). One module, so the server, the client and the tests
//! cannot drift apart on the wire format.
//!
//! Key material is wiped from the intermediate buffers this module owns; the
//! encoded message handed back is the only copy that travels.

use prost::Message;
use zeroize::Zeroize;

use crate::bundle::TrustBundle;
use crate::cert::{certs_to_pem, parse_pem_certs};
use crate::error::{Error, Result};
use crate::keys::PrivateKey;
use crate::proto::discovery::DiscoveryResponse;
use crate::proto::envoy_core::{DataSource, data_source::Specifier};
use crate::proto::tls::{CertificateValidationContext, Secret, TlsCertificate, secret};
use crate::tls::{Credentials, Svid};

/// Type URL of an SDS `Secret` inside `Any`.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The secret holding the workload key and certificate chain.
pub const WORKLOAD_SECRET: &str = "default";

/// The secret holding the trust bundle.
pub const ROOT_SECRET: &str = "ROOTCA";

/// Prefix of a trust bundle read from a file (`file-root:<path>`), as
/// pilot-agent serves it.
pub const FILE_ROOT_PREFIX: &str = "file-root:";

/// Prefix of a key and chain read from files (`file-cert:<cert>~<key>`).
pub const FILE_CERT_PREFIX: &str = "file-cert:";

/// The OS trust store; istiod asks for it for every SIMPLE-TLS
/// DestinationRule without `caCertificates`.
pub const FILE_ROOT_SYSTEM: &str = "file-root:system";

/// A `tls_certificate` secret from PEM bytes as read from files (the
/// chain and the key, inline). The caller's key buffer is not kept.
pub fn tls_certificate_pem(name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem.to_vec()),
            private_key: inline(key_pem.to_vec()),
        })),
    }
}

/// A `validation_context` secret from PEM roots as read from a file.
pub fn validation_context_pem(name: &str, roots_pem: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(roots_pem.to_vec()),
            },
        )),
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
    })
}

/// A `tls_certificate` secret named `name`: the PEM chain and the PKCS#8
/// PEM key, inline.
pub fn tls_certificate(name: &str, svid: &Svid) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(certs_to_pem(svid.chain()).into_bytes()),
            private_key: inline(svid.key().to_pkcs8_pem().as_bytes().to_vec()),
        })),
    }
}

/// A `validation_context` secret named `name`: the bundle's PEM roots, inline.
pub fn validation_context(name: &str, bundle: &TrustBundle) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle.to_pem().into_bytes()),
            },
        )),
    }
}

/// The secret `name` out of `creds`: [`WORKLOAD_SECRET`] is the SVID, any
/// other name the trust bundle.
pub fn secret(name: &str, creds: &Credentials) -> Secret {
    if name == WORKLOAD_SECRET {
        tls_certificate(name, &creds.svid)
    } else {
        validation_context(name, &creds.bundle)
    }
}

/// `secret` as the `Any` a `DiscoveryResponse` carries. The secret's own
/// copy of a private key is wiped.
pub fn to_any(mut secret: Secret) -> prost_types::Any {
    let any = prost_types::Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        value: secret.encode_to_vec(),
    };
    wipe(&mut secret);
    any
}

/// [`secret`] of `name` from `creds`, encoded.
pub fn encode(name: &str, creds: &Credentials) -> prost_types::Any {
    to_any(secret(name, creds))
}

/// A response carrying `resources`, with the SDS type URL.
pub fn response(
    version_info: String,
    resources: Vec<prost_types::Any>,
    nonce: String,
) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info,
        resources,
        canary: false,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
    }
}

fn wipe(secret: &mut Secret) {
    if let Some(secret::Type::TlsCertificate(TlsCertificate {
        private_key:
            Some(DataSource {
                specifier: Some(Specifier::InlineBytes(key)),
            }),
        ..
    })) = &mut secret.r#type
    {
        key.zeroize();
    }
}

/// A usable secret decoded from a response.
#[derive(Debug)]
pub enum Decoded {
    /// A `tls_certificate`: the workload's SVID.
    Svid(Box<Svid>),
    /// A `validation_context`: the trust bundle.
    Bundle(TrustBundle),
}

/// Pulls the one secret named `name` out of `response` and checks it:
/// [`WORKLOAD_SECRET`] must be a `tls_certificate` whose key matches its
/// leaf, [`ROOT_SECRET`] a `validation_context`; only inline data is
/// accepted. The response's bytes are wiped afterwards (they may hold a
/// private key). Errors are [`Error::BadSecret`] and never quote key
/// material.
pub fn decode(name: &str, mut response: DiscoveryResponse) -> Result<Decoded> {
    let result = decode_inner(name, &response);
    for any in &mut response.resources {
        any.value.zeroize();
    }
    result
}

fn bad(name: &str, reason: String) -> Error {
    Error::BadSecret {
        name: name.to_owned(),
        reason,
    }
}

fn decode_inner(name: &str, response: &DiscoveryResponse) -> Result<Decoded> {
    let bad = |reason: String| bad(name, reason);
    if response.type_url != SECRET_TYPE_URL {
        return Err(bad(format!(
            "response type_url {:?}, expected {SECRET_TYPE_URL}",
            response.type_url
        )));
    }
    let mut found = None;
    for any in &response.resources {
        if any.type_url != SECRET_TYPE_URL {
            return Err(bad(format!(
                "resource of type {:?}, expected {SECRET_TYPE_URL}",
                any.type_url
            )));
        }
        let mut secret = Secret::decode(any.value.as_slice())
            .map_err(|e| bad(format!("undecodable Secret: {e}")))?;
        if secret.name == name {
            found = Some(secret);
        } else {
            wipe(&mut secret);
            tracing::debug!(secret = name, other = %secret.name, "ignoring a secret not asked for");
        }
    }
    let mut secret = found.ok_or_else(|| {
        bad(format!(
            "response holds {} resource(s), none named {name:?}",
            response.resources.len()
        ))
    })?;
    let is_workload = name == WORKLOAD_SECRET;
    match (is_workload, secret.r#type.take()) {
        (true, Some(secret::Type::TlsCertificate(mut tls))) => {
            let chain = inline_bytes(name, "certificate_chain", tls.certificate_chain.take())?;
            let mut key = inline_bytes(name, "private_key", tls.private_key.take())?;
            let parsed = (|| {
                let chain = std::str::from_utf8(&chain)
                    .map_err(|_| bad("certificate_chain is not UTF-8 PEM".into()))?;
                let chain =
                    parse_pem_certs(chain).map_err(|e| bad(format!("certificate_chain: {e}")))?;
                let key_pem = std::str::from_utf8(&key)
                    .map_err(|_| bad("private_key is not UTF-8 PEM".into()))?;
                let key =
                    PrivateKey::from_pem(key_pem).map_err(|e| bad(format!("private_key: {e}")))?;
                Svid::new(chain, key).map_err(|e| bad(e.to_string()))
            })();
            key.zeroize();
            Ok(Decoded::Svid(Box::new(parsed?)))
        }
        (false, Some(secret::Type::ValidationContext(vc))) => {
            let roots = inline_bytes(name, "trusted_ca", vc.trusted_ca)?;
            let pem = std::str::from_utf8(&roots)
                .map_err(|_| bad("trusted_ca is not UTF-8 PEM".into()))?;
            Ok(Decoded::Bundle(
                TrustBundle::from_pem(pem).map_err(|e| bad(format!("trusted_ca: {e}")))?,
            ))
        }
        (_, other) => {
            let mut other = Secret {
                name: String::new(),
                r#type: other,
            };
            let held = match &other.r#type {
                Some(secret::Type::TlsCertificate(_)) => "a tls_certificate",
                Some(secret::Type::ValidationContext(_)) => "a validation_context",
                None => "nothing",
            };
            wipe(&mut other);
            Err(bad(format!(
                "secret holds {held}, expected {}",
                if is_workload {
                    "a tls_certificate"
                } else {
                    "a validation_context"
                }
            )))
        }
    }
}

/// The bytes of an inline DataSource. Files and environment variables are
/// refused: secrets come over SDS only.
fn inline_bytes(name: &str, field: &str, source: Option<DataSource>) -> Result<Vec<u8>> {
    match source.and_then(|s| s.specifier) {
        Some(Specifier::InlineBytes(b)) => Ok(b),
        Some(Specifier::InlineString(s)) => Ok(s.into_bytes()),
        Some(Specifier::Filename(f)) => Err(bad(
            name,
            format!("{field} names file {f:?}; only inline secrets are accepted"),
        )),
        Some(Specifier::EnvironmentVariable(_)) => Err(bad(
            name,
            format!("{field} names an environment variable; only inline secrets are accepted"),
        )),
        None => Err(bad(name, format!("{field} is empty"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPki;

    fn one(secret: Secret) -> DiscoveryResponse {
        response("1".into(), vec![to_any(secret)], "n".into())
    }

    fn tls(name: &str, chain: &str, key: &str) -> Secret {
        Secret {
            name: name.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain.as_bytes().to_vec()),
                private_key: inline(key.as_bytes().to_vec()),
            })),
        }
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_credentials() {
        crate::tls::install_crypto_provider();
        let pki = TestPki::new("cluster.local")
            .unwrap()
            .with_intermediate()
            .unwrap();
        let creds = pki.credentials(pki.svid("ns", "sa").unwrap());
        let r = response(
            "v".into(),
            vec![encode(WORKLOAD_SECRET, &creds), encode(ROOT_SECRET, &creds)],
            "n".into(),
        );
        match decode(WORKLOAD_SECRET, r.clone()).unwrap() {
            Decoded::Svid(svid) => {
                assert_eq!(svid.leaf().serial, creds.svid.leaf().serial);
                assert_eq!(svid.chain().len(), 2);
            }
            other => panic!("{other:?}"),
        }
        match decode(ROOT_SECRET, r).unwrap() {
            Decoded::Bundle(b) => assert_eq!(b.roots(), creds.bundle.roots()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_secrets_are_explained_without_key_material() {
        crate::tls::install_crypto_provider();
        let pki = TestPki::new("cluster.local").unwrap();
        let svid = pki.svid("ns", "sa").unwrap();
        let chain = certs_to_pem(svid.chain());
        let key = svid.key().to_pkcs8_pem();
        let err = |name: &str, r: DiscoveryResponse| match decode(name, r) {
            Err(e) => e.to_string(),
            Ok(d) => panic!("accepted {d:?}"),
        };
        // Wrong type for the name.
        let roots = validation_context(WORKLOAD_SECRET, &pki.bundle());
        assert!(err(WORKLOAD_SECRET, one(roots)).contains("validation_context"));
        // Key of another cert.
        let other = pki.svid("ns", "other").unwrap();
        let e = err(
            WORKLOAD_SECRET,
            one(tls("default", &chain, &other.key().to_pkcs8_pem())),
        );
        assert!(e.contains("does not match"), "{e}");
        assert!(!e.contains("PRIVATE KEY"), "{e}");
        // Garbage PEM.
        let e = err(
            WORKLOAD_SECRET,
            one(tls("default", "-----BEGIN CERTIFICATE-----\nxx\n", &key)),
        );
        assert!(e.contains("certificate_chain"), "{e}");
        // Missing name.
        assert!(err(WORKLOAD_SECRET, one(tls("other", &chain, &key))).contains("none named"));
        // Wrong type URL.
        let mut r = one(tls("default", &chain, &key));
        r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(err(WORKLOAD_SECRET, r).contains("type_url"));
        // Files are refused.
        let file = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(DataSource {
                    specifier: Some(Specifier::Filename("/etc/cert.pem".into())),
                }),
                private_key: None,
            })),
        };
        assert!(err(WORKLOAD_SECRET, one(file)).contains("only inline"));
    }
}

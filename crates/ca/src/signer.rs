//! The signing CA: a plugged-in CA directory or a self-signed root kept on
//! disk, watched for rotation.
//!
//! A plugged-in directory holds Istio's four files (`ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`); a partial set is an
//! error. Without them the CA makes a self-signed root once and keeps it in
//! the same directory (`self-signed-ca-cert.pem`, `self-signed-ca-key.pem`,
//! the key mode 0600; a key readable by group or others is refused), so a
//! restarted CA keeps the mesh's trust.
//!
//! The current signing state is published through a watch channel. When the
//! directory changes, the new set is loaded and checked (the key matches the
//! certificate, the chain verifies to the roots); it replaces the old one
//! only if its root bundle is a superset or a subset of the one in use, so
//! roots rotate through a multi-root phase and never jump.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_common::cert::{CertInfo, cert_to_pem, parse_pem_certs, unix_secs};
use meshid_common::{
    CaOptions, CertificateAuthority, KeyType, PrivateKey, SpiffeId, TrustBundle, Usage,
};
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const SELF_SIGNED_CERT_FILE: &str = "self-signed-ca-cert.pem";
pub const SELF_SIGNED_KEY_FILE: &str = "self-signed-ca-key.pem";

const PLUGGED_FILES: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE];
const ALL_FILES: [&str; 6] = [
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
    SELF_SIGNED_CERT_FILE,
    SELF_SIGNED_KEY_FILE,
];

/// Where the signing material came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    PluggedIn,
    SelfSigned,
}

/// One consistent set of signing material.
#[derive(Debug)]
pub struct SigningState {
    pub ca: CertificateAuthority,
    pub bundle: TrustBundle,
    /// Certificates between an issued leaf and the roots, nearest first:
    /// the signing certificate (unless it is a root) and its intermediates.
    pub intermediates: Vec<CertificateDer<'static>>,
    intermediate_pems: Vec<String>,
    bundle_pem: String,
    pub source: Source,
    /// Bumped at every accepted rotation.
    pub generation: u64,
}

impl SigningState {
    fn new(
        ca: CertificateAuthority,
        bundle: TrustBundle,
        source: Source,
        dir: &Path,
    ) -> Result<Self> {
        let signing_is_root = ca.is_self_signed() || bundle.contains(ca.cert());
        let mut intermediates = Vec::new();
        if !signing_is_root {
            intermediates.push(ca.cert().clone());
        }
        intermediates.extend(ca.intermediates().iter().cloned());
        let state = SigningState {
            intermediate_pems: intermediates.iter().map(|c| cert_to_pem(c)).collect(),
            bundle_pem: bundle.to_pem(),
            intermediates,
            ca,
            bundle,
            source,
            generation: 0,
        };
        state.self_check(dir)?;
        Ok(state)
    }

    /// Issues a throwaway leaf and verifies it through the chain to the roots,
    /// at a moment when the signing certificate is valid (an expired signer
    /// still loads, so requests can say why they fail).
    fn self_check(&self, dir: &Path) -> Result<()> {
        let info = self.ca.info();
        let at = SystemTime::now().min(info.not_after - Duration::from_secs(1));
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let probe = SpiffeId::parse("spiffe://meshid.invalid/ns/meshid-ca/sa/self-check")?;
        let leaf = self
            .ca
            .issue_leaf(key.public_key_spki(), &probe, Duration::from_secs(60), at)
            .map_err(|e| Error::CaChain {
                dir: dir.to_owned(),
                reason: format!("the signing certificate cannot issue: {e}"),
            })?;
        let mut chain = vec![leaf];
        chain.extend(self.intermediates.iter().cloned());
        self.bundle
            .verify(&chain, Usage::ClientAuth, at)
            .map_err(|e| Error::CaChain {
                dir: dir.to_owned(),
                reason: format!(
                    "certificates issued by {} do not verify to the root bundle: {e}",
                    info.serial
                ),
            })?;
        Ok(())
    }

    /// The response chain for a leaf (DESIGN §2.1): leaf, one intermediate
    /// per element, the whole root bundle last.
    pub fn response_chain(&self, leaf: &CertificateDer<'_>) -> Vec<String> {
        let mut chain = Vec::with_capacity(self.intermediate_pems.len() + 2);
        chain.push(cert_to_pem(leaf));
        chain.extend(self.intermediate_pems.iter().cloned());
        chain.push(self.bundle_pem.clone());
        chain
    }

    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    fn same_material(&self, other: &SigningState) -> bool {
        self.ca.cert() == other.ca.cert()
            && self.bundle == other.bundle
            && self.intermediates == other.intermediates
    }
}

/// What the signer needs to know.
#[derive(Clone, Debug)]
pub struct SignerOptions {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub self_signed_ttl: Duration,
}

/// An issued leaf with the chain to send back.
#[derive(Debug)]
pub struct Issued {
    pub chain: Vec<String>,
    pub leaf: CertInfo,
}

/// Holds the current signing state and follows the CA directory.
#[derive(Debug)]
pub struct Signer {
    options: SignerOptions,
    tx: watch::Sender<Arc<SigningState>>,
}

impl Signer {
    /// Loads the CA directory, making and persisting a self-signed root when
    /// it holds no CA at all.
    pub fn open(options: SignerOptions) -> Result<Self> {
        let state = match load_dir(&options.dir)? {
            Some(state) => state,
            None => create_self_signed(&options)?,
        };
        log_state("signing CA loaded", &state, &options.dir);
        let (tx, _) = watch::channel(Arc::new(state));
        Ok(Signer { options, tx })
    }

    pub fn current(&self) -> Arc<SigningState> {
        self.tx.borrow().clone()
    }

    /// Sees every accepted rotation.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SigningState>> {
        self.tx.subscribe()
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// Issues a workload leaf for `id` over `public_key_spki`.
    pub fn sign(&self, public_key_spki: &[u8], id: &SpiffeId, ttl: Duration) -> Result<Issued> {
        let state = self.current();
        let now = SystemTime::now();
        let info = state.ca.info();
        if now >= info.not_after {
            return Err(Error::SignerExpired {
                serial: info.serial.clone(),
                not_after: unix_secs(info.not_after),
            });
        }
        let leaf = state
            .ca
            .issue_leaf(public_key_spki, id, ttl, now)
            .map_err(Error::Signing)?;
        let info = CertInfo::from_der(&leaf).map_err(Error::Signing)?;
        Ok(Issued {
            chain: state.response_chain(&leaf),
            leaf: info,
        })
    }

    /// Re-reads the directory. Returns whether the signing state changed;
    /// an error leaves the current state in force.
    pub fn reload(&self) -> Result<bool> {
        let dir = &self.options.dir;
        let Some(next) = load_dir(dir)? else {
            return Err(Error::CaChain {
                dir: dir.clone(),
                reason: "the CA files disappeared; keeping the CA in use".into(),
            });
        };
        self.rotate(next, dir)
    }

    /// A signer over material held in memory (a Kubernetes Secret): nothing
    /// is read from or written to `options.dir`, and [`Signer::watch`] is
    /// not for it; rotations come through [`Signer::rotate`].
    pub fn in_memory(options: SignerOptions, state: SigningState, origin: &Path) -> Self {
        log_state("signing CA loaded", &state, origin);
        let (tx, _) = watch::channel(Arc::new(state));
        Signer { options, tx }
    }

    /// Puts `next` in force under the rotation rule (its root bundle a
    /// superset or a subset of the one in use); `origin` names where it came
    /// from in logs and errors. Returns whether anything changed.
    pub fn rotate(&self, mut next: SigningState, origin: &Path) -> Result<bool> {
        let current = self.current();
        if next.same_material(&current) {
            return Ok(false);
        }
        if !(next.bundle.is_superset_of(&current.bundle)
            || current.bundle.is_superset_of(&next.bundle))
        {
            return Err(Error::RootRotationRefused {
                dir: origin.to_owned(),
            });
        }
        next.generation = current.generation + 1;
        log_state("signing CA rotated", &next, origin);
        self.tx.send_replace(Arc::new(next));
        Ok(true)
    }

    /// Polls the directory every `interval` until `cancel`, reloading once a
    /// change has settled (two polls alike), so a set copied file by file is
    /// read whole.
    pub async fn watch(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        // Nothing applied yet: the first settled poll re-reads the directory
        // (a no-op when nothing changed since `open`).
        let mut applied = Stamp::new();
        let mut previous = dir_stamp(&self.options.dir).await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = cancel.cancelled() => return,
            }
            let now = dir_stamp(&self.options.dir).await;
            let settled = now == previous;
            previous = now.clone();
            if !settled || now == applied {
                continue;
            }
            applied = now;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.reload()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "CA directory change not applied"),
                Err(e) => tracing::error!(error = %e, "CA reload task failed"),
            }
        }
    }
}

fn log_state(what: &str, state: &SigningState, dir: &Path) {
    let info = state.ca.info();
    let roots: Vec<String> = state.bundle.infos().map(|i| i.serial).collect();
    tracing::info!(
        dir = %dir.display(),
        source = ?state.source,
        cert.serial = %info.serial,
        cert.not_after = unix_secs(info.not_after),
        roots = ?roots,
        generation = state.generation,
        "{what}"
    );
    if SystemTime::now() >= info.not_after {
        tracing::error!(cert.serial = %info.serial, "the signing certificate has expired: every request will fail");
    }
}

type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

async fn dir_stamp(dir: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::with_capacity(ALL_FILES.len());
    for name in ALL_FILES {
        out.push(tokio::fs::metadata(dir.join(name)).await.ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        }));
    }
    out
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn material(path: &Path) -> impl Fn(meshid_common::Error) -> Error + '_ {
    move |source| Error::CaMaterial {
        path: path.to_owned(),
        source,
    }
}

/// The mode bits of a key file that let group or others read it, if any.
fn loose_mode(path: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    Ok((mode & 0o077 != 0).then_some(mode & 0o777))
}

/// Loads whatever CA the directory holds; `None` if it holds none.
fn load_dir(dir: &Path) -> Result<Option<SigningState>> {
    let present: Vec<bool> = PLUGGED_FILES.iter().map(|f| dir.join(f).exists()).collect();
    if present.iter().any(|p| *p) {
        if !present.iter().all(|p| *p) {
            let missing = PLUGGED_FILES
                .iter()
                .zip(&present)
                .filter(|(_, p)| !**p)
                .map(|(f, _)| (*f).to_owned())
                .collect();
            return Err(Error::PartialCaDir {
                dir: dir.to_owned(),
                missing,
            });
        }
        return load_plugged(dir).map(Some);
    }
    let cert = dir.join(SELF_SIGNED_CERT_FILE);
    let key = dir.join(SELF_SIGNED_KEY_FILE);
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, true) => load_self_signed(dir, &cert, &key).map(Some),
        (has_cert, _) => Err(Error::CaChain {
            dir: dir.to_owned(),
            reason: format!(
                "{} is there without {}",
                if has_cert {
                    SELF_SIGNED_CERT_FILE
                } else {
                    SELF_SIGNED_KEY_FILE
                },
                if has_cert {
                    SELF_SIGNED_KEY_FILE
                } else {
                    SELF_SIGNED_CERT_FILE
                },
            ),
        }),
    }
}

fn load_plugged(dir: &Path) -> Result<SigningState> {
    let [cert_path, key_path, chain_path, root_path] = PLUGGED_FILES.map(|f| dir.join(f));
    if let Some(mode) = loose_mode(&key_path)? {
        // Kubernetes mounts secrets 0644 by default: warn, as istiod does not refuse either.
        tracing::warn!(path = %key_path.display(), mode = format!("{mode:o}"), "plugged-in CA key is readable by group or others");
    }
    let key_pem = zeroize::Zeroizing::new(read(&key_path)?);
    plugged_from_pem(
        [
            (&cert_path, &read(&cert_path)?),
            (&key_path, &key_pem),
            (&chain_path, &read(&chain_path)?),
            (&root_path, &read(&root_path)?),
        ],
        dir,
    )
}

/// A plugged-in set from its four PEM texts, each with the name it is known
/// by (a file, or `Secret ns/name key`): `ca-cert.pem`, `ca-key.pem`,
/// `cert-chain.pem`, `root-cert.pem`, in that order. `origin` names the set.
fn plugged_from_pem(parts: [(&Path, &str); 4], origin: &Path) -> Result<SigningState> {
    let [
        (cert_path, cert_pem),
        (_, key_pem),
        (chain_path, chain_pem),
        (root_path, root_pem),
    ] = parts;
    let bundle = TrustBundle::from_pem(root_pem).map_err(material(root_path))?;
    let signing = parse_pem_certs(cert_pem).map_err(material(cert_path))?;
    let chain = parse_pem_certs(chain_pem).map_err(material(chain_path))?;
    let intermediates: Vec<CertificateDer<'static>> = chain
        .into_iter()
        .filter(|c| c != &signing[0] && !bundle.contains(c) && !is_self_signed(c))
        .collect();
    let ca = CertificateAuthority::from_pem(cert_pem, key_pem, intermediates)
        .map_err(material(cert_path))?;
    SigningState::new(ca, bundle, Source::PluggedIn, origin)
}

impl SigningState {
    /// A plugged-in CA held in memory (istiod's `cacerts` Secret): the
    /// parts are `(name, pem)` for `ca-cert.pem`, `ca-key.pem`,
    /// `cert-chain.pem` and `root-cert.pem`, in that order; errors name the
    /// part and `origin`.
    pub fn plugged_in_from_pem(parts: [(&Path, &str); 4], origin: &Path) -> Result<Self> {
        plugged_from_pem(parts, origin)
    }

    /// A self-signed root held in memory (istiod's `istio-ca-secret`);
    /// errors name `cert_name` and `origin`.
    pub fn self_signed_from_pem(
        cert_pem: &str,
        key_pem: &str,
        cert_name: &Path,
        origin: &Path,
    ) -> Result<Self> {
        self_signed_from_pem(cert_pem, key_pem, cert_name, origin)
    }

    /// A new self-signed root for `options.trust_domain`, made in memory;
    /// returns it with its certificate and key PEM (to be stored by the
    /// caller, e.g. in a Secret: this writes nothing).
    pub fn generate_self_signed(
        options: &SignerOptions,
        origin: &Path,
    ) -> Result<(Self, String, zeroize::Zeroizing<String>)> {
        let ca = new_self_signed_root(options)?;
        let (cert_pem, key_pem) = (ca.cert_pem(), ca.key().to_pkcs8_pem());
        let state = self_signed_from_pem(&cert_pem, &key_pem, origin, origin)?;
        Ok((state, cert_pem, key_pem))
    }
}

fn new_self_signed_root(options: &SignerOptions) -> Result<CertificateAuthority> {
    Ok(CertificateAuthority::self_signed_root(&CaOptions {
        common_name: Some(format!(
            "meshid self-signed root ({})",
            options.trust_domain
        )),
        ..CaOptions::new(&options.trust_domain, options.self_signed_ttl)
    })?)
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    meshid_common::cert::is_self_signed(der)
}

fn load_self_signed(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<SigningState> {
    if let Some(mode) = loose_mode(key_path)? {
        return Err(Error::KeyPermissions {
            path: key_path.to_owned(),
            mode,
        });
    }
    let cert_pem = read(cert_path)?;
    let key_pem = zeroize::Zeroizing::new(read(key_path)?);
    self_signed_from_pem(&cert_pem, &key_pem, cert_path, dir)
}

/// A self-signed root from its PEM texts; `cert_name` names the
/// certificate, `origin` the set.
fn self_signed_from_pem(
    cert_pem: &str,
    key_pem: &str,
    cert_name: &Path,
    origin: &Path,
) -> Result<SigningState> {
    let ca = CertificateAuthority::from_pem(cert_pem, key_pem, Vec::new())
        .map_err(material(cert_name))?;
    if !ca.is_self_signed() {
        return Err(Error::CaChain {
            dir: origin.to_owned(),
            reason: format!("{} is not a self-signed root", cert_name.display()),
        });
    }
    let bundle = TrustBundle::new(vec![ca.cert().clone()]).map_err(material(cert_name))?;
    SigningState::new(ca, bundle, Source::SelfSigned, origin)
}

fn create_self_signed(options: &SignerOptions) -> Result<SigningState> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = &options.dir;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let ca = new_self_signed_root(options)?;
    let key_path = dir.join(SELF_SIGNED_KEY_FILE);
    let cert_path = dir.join(SELF_SIGNED_CERT_FILE);
    let mut key_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    key_file
        .write_all(ca.key().to_pkcs8_pem().as_bytes())
        .and_then(|_| key_file.sync_all())
        .map_err(io(&key_path))?;
    // The certificate last: its presence says the pair is complete.
    let tmp = dir.join(format!(".{SELF_SIGNED_CERT_FILE}.tmp"));
    std::fs::write(&tmp, ca.cert_pem())
        .and_then(|_| std::fs::rename(&tmp, &cert_path))
        .map_err(io(&cert_path))?;
    tracing::info!(dir = %dir.display(), cert.serial = %ca.info().serial, "made a new self-signed root");
    load_self_signed(dir, &cert_path, &key_path)
}

/// Writes `pem` to `path` atomically (temporary file + rename), mode 0644.
pub fn write_atomic(path: &Path, pem: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, pem)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn options(dir: &Path) -> SignerOptions {
        SignerOptions {
            dir: dir.to_owned(),
            trust_domain: "cluster.local".into(),
            self_signed_ttl: Duration::from_secs(86_400 * 365),
        }
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()
    }

    /// Writes a plugged-in set: root → intermediate (signing).
    pub(crate) fn plug(
        dir: &Path,
        root: &CertificateAuthority,
        inter: &CertificateAuthority,
        roots_pem: &str,
    ) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(CA_CERT_FILE), inter.cert_pem()).unwrap();
        std::fs::write(dir.join(CA_KEY_FILE), inter.key().to_pkcs8_pem().as_bytes()).unwrap();
        std::fs::write(
            dir.join(CERT_CHAIN_FILE),
            format!("{}{}", inter.cert_pem(), root.cert_pem()),
        )
        .unwrap();
        std::fs::write(dir.join(ROOT_CERT_FILE), roots_pem).unwrap();
    }

    fn root(name: &str) -> CertificateAuthority {
        CertificateAuthority::self_signed_root(&CaOptions::new(name, Duration::from_secs(86_400)))
            .unwrap()
    }

    fn inter(root: &CertificateAuthority, ttl: Duration) -> CertificateAuthority {
        root.issue_intermediate(&CaOptions::new("inter", ttl))
            .unwrap()
    }

    #[test]
    fn self_signed_root_is_persisted_0600_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let first = Signer::open(options(&dir)).unwrap();
        let key = dir.join(SELF_SIGNED_KEY_FILE);
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = Signer::open(options(&dir)).unwrap();
        assert_eq!(first.current().bundle, again.current().bundle);
        assert_eq!(again.current().source, Source::SelfSigned);

        let k = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let issued = first
            .sign(k.public_key_spki(), &id(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(issued.chain.len(), 2, "[leaf, root]");
        assert_eq!(issued.chain[1], again.current().bundle_pem());

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Signer::open(options(&dir)).unwrap_err();
        assert!(matches!(err, Error::KeyPermissions { .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn plugged_in_chain_is_leaf_intermediate_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let r = root("root");
        let i = inter(&r, Duration::from_secs(3600));
        plug(tmp.path(), &r, &i, &r.cert_pem());
        let signer = Signer::open(options(tmp.path())).unwrap();
        assert_eq!(signer.current().source, Source::PluggedIn);
        let k = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let issued = signer
            .sign(k.public_key_spki(), &id(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(issued.chain.len(), 3);
        assert_eq!(issued.chain[1], i.cert_pem());
        assert_eq!(issued.chain[2], r.cert_pem());
    }

    #[test]
    fn a_partial_set_is_an_error_that_names_the_missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let r = root("root");
        let i = inter(&r, Duration::from_secs(3600));
        plug(tmp.path(), &r, &i, &r.cert_pem());
        std::fs::remove_file(tmp.path().join(CERT_CHAIN_FILE)).unwrap();
        let err = Signer::open(options(tmp.path())).unwrap_err();
        assert!(err.to_string().contains("cert-chain.pem"), "{err}");
    }

    #[test]
    fn a_chain_that_does_not_reach_the_roots_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let r = root("root");
        let i = inter(&r, Duration::from_secs(3600));
        plug(tmp.path(), &r, &i, &root("stranger").cert_pem());
        let err = Signer::open(options(tmp.path())).unwrap_err();
        assert!(err.to_string().contains("do not verify"), "{err}");
    }

    #[test]
    fn an_expired_signing_cert_is_internal_with_a_message() {
        let tmp = tempfile::tempdir().unwrap();
        let r = root("root");
        let i = inter(&r, Duration::from_secs(1));
        plug(tmp.path(), &r, &i, &r.cert_pem());
        std::thread::sleep(Duration::from_millis(2100));
        let signer = Signer::open(options(tmp.path())).expect("an expired signer still loads");
        let k = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let err = signer
            .sign(k.public_key_spki(), &id(), Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn rotation_accepts_supersets_and_subsets_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (old_root, new_root) = (root("old"), root("new"));
        let old_i = inter(&old_root, Duration::from_secs(3600));
        let new_i = inter(&new_root, Duration::from_secs(3600));
        plug(tmp.path(), &old_root, &old_i, &old_root.cert_pem());
        let signer = Signer::open(options(tmp.path())).unwrap();
        assert!(!signer.reload().unwrap(), "nothing changed");

        // Jump straight to an unrelated root: refused, old state kept.
        plug(tmp.path(), &new_root, &new_i, &new_root.cert_pem());
        let err = signer.reload().unwrap_err();
        assert!(matches!(err, Error::RootRotationRefused { .. }), "{err}");
        assert_eq!(signer.current().ca.cert(), old_i.cert());

        // Superset: both roots, new signer.
        let both = format!("{}{}", old_root.cert_pem(), new_root.cert_pem());
        plug(tmp.path(), &new_root, &new_i, &both);
        assert!(signer.reload().unwrap());
        assert_eq!(signer.current().ca.cert(), new_i.cert());
        assert_eq!(signer.current().bundle.roots().len(), 2);
        assert_eq!(signer.current().generation, 1);

        // Subset: drop the old root.
        plug(tmp.path(), &new_root, &new_i, &new_root.cert_pem());
        assert!(signer.reload().unwrap());
        assert_eq!(signer.current().bundle.roots().len(), 1);
    }
}

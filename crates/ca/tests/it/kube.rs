//! Cluster mode against the fake API server (`meshid_common::testing::kube`,
//! real HTTP and the API's JSON): the shared root in `istio-ca-secret` and
//! its create race, a corrupt root Secret, the plugged-in CA from `cacerts`
//! and its rotation, root publication to every namespace, Lease election
//! and hand-over, and the pod watch cache through 410s and dropped watches.
//! Run with `cargo nextest run -p meshid-ca --features kube -E 'test(kube::)'`.

#![cfg(feature = "kube")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use meshid_ca::cluster::client_for_url;
use meshid_ca::cluster::election::Election;
use meshid_ca::cluster::pods::PodCache;
use meshid_ca::cluster::publish::Publisher;
use meshid_ca::directory::PodDirectory;
use meshid_ca::signer::Source;
use meshid_ca::{App, Config};
use meshid_common::testing::TestPki;
use meshid_common::testing::kube::{FakeApiServer, status};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NS: &str = "istio-system";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn cluster_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        monitoring_addr: "127.0.0.1:0".parse().unwrap(),
        root_ca_dir: dir.join("cacerts"),
        ..Config::default()
    };
    c.kube = true;
    c.lease_holder = format!("ca-{}", dir.display());
    c
}

/// A cluster-mode CA against `fake`, its `--root-ca-dir` under `dir`.
async fn build(fake: &FakeApiServer, dir: &std::path::Path) -> meshid_ca::Result<App> {
    App::build_with_kube(cluster_config(dir), client_for_url(&fake.url()).unwrap()).await
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
           "status": {"phase": "Active"}})
}

fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(b64(v))))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": NS}, "data": data})
}

fn root_configmap(fake: &FakeApiServer, ns: &str) -> Option<String> {
    fake.get("api/v1", "configmaps", ns, "istio-ca-root-cert")
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_owned))
}

async fn eventually(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Two replicas start at once and both read "no Secret" (the fake answers
/// the first two reads 404, whatever is stored): both make a root, one
/// create wins, the other gets 409 AlreadyExists and must take the
/// winner's. One root, one Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_end_with_one_root() {
    init();
    let fake = FakeApiServer::start().await.unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let seen = reads.clone();
    fake.react(move |req| {
        let first_reads = req.method == http::Method::GET
            && req.resource == "secrets"
            && req.name == "istio-ca-secret"
            && seen.fetch_add(1, Ordering::SeqCst) < 2;
        first_reads.then(|| {
            (
                404,
                status(404, "NotFound", "secrets \"istio-ca-secret\" not found"),
            )
        })
    });
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = tokio::join!(build(&fake, d1.path()), build(&fake, d2.path()),);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        fake.count(|r| r.starts_with("POST /api/v1/namespaces/istio-system/secrets")),
        2,
        "both replicas tried to create the Secret"
    );
    assert_eq!(a.root_bundle(), b.root_bundle(), "two roots were made");
    assert!(reads.load(Ordering::SeqCst) >= 3, "the loser read again");
    let stored = fake
        .get("api/v1", "secrets", NS, "istio-ca-secret")
        .unwrap();
    assert_eq!(stored["type"], "istio.io/ca-root");
    let cert = base64::engine::general_purpose::STANDARD
        .decode(stored["data"]["ca-cert.pem"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(cert).unwrap(),
        a.root_bundle().to_pem(),
        "the root in use is the stored one"
    );
    assert_eq!(
        a.builtin_signer().unwrap().current().source,
        Source::SelfSigned
    );
    // Nothing of the root was written to disk.
    assert!(!d1.path().join("cacerts/self-signed-ca-key.pem").exists());
    assert!(!d2.path().join("cacerts/self-signed-ca-key.pem").exists());

    // A restart reads the same root back.
    let c = App::build_with_kube(
        cluster_config(tempfile::tempdir().unwrap().path()),
        client_for_url(&fake.url()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(c.root_bundle(), a.root_bundle());
    assert_the_manifests_allow(&fake);
}

#[tokio::test]
async fn a_corrupt_root_secret_stops_the_start_naming_the_secret() {
    init();
    let fake = FakeApiServer::start().await.unwrap();
    fake.insert(
        "secrets",
        secret(
            "istio-ca-secret",
            &[
                (
                    "ca-cert.pem",
                    "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
                ),
                ("ca-key.pem", "garbage"),
            ],
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let err = build(&fake, dir.path()).await.unwrap_err().to_string();
    assert!(err.contains("Secret istio-system/istio-ca-secret"), "{err}");
    assert!(err.contains("ca-cert.pem"), "{err}");
    assert_eq!(
        fake.count(|r| r.starts_with("POST")),
        0,
        "no second root is made over a corrupt one"
    );

    // A Secret without its key says which key.
    fake.insert(
        "secrets",
        secret("istio-ca-secret", &[("ca-cert.pem", "x")]),
    );
    let err = build(&fake, dir.path()).await.unwrap_err().to_string();
    assert!(err.contains("ca-key.pem is missing"), "{err}");
}

fn cacerts(
    root_pem: &str,
    pki_inter: &meshid_common::CertificateAuthority,
    chain_root: &str,
) -> Value {
    secret(
        "cacerts",
        &[
            ("ca-cert.pem", pki_inter.cert_pem().as_str()),
            ("ca-key.pem", pki_inter.key().to_pkcs8_pem().as_str()),
            (
                "cert-chain.pem",
                format!("{}{}", pki_inter.cert_pem(), chain_root).as_str(),
            ),
            ("root-cert.pem", root_pem),
        ],
    )
}

/// `cacerts` wins over the self-signed root, is followed for rotation,
/// and the leader keeps every namespace's ConfigMap current through it:
/// created where missing, rewritten when drifted or deleted, in namespaces
/// made later too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugged_in_ca_from_cacerts_rotates_and_is_published_everywhere() {
    init();
    let fake = FakeApiServer::start().await.unwrap();
    for ns in ["default", NS, "apps"] {
        fake.insert("namespaces", namespace(ns));
    }
    let old = TestPki::new("cluster.local")
        .unwrap()
        .with_intermediate()
        .unwrap();
    let old_inter = old.intermediate.as_ref().unwrap();
    fake.insert(
        "secrets",
        cacerts(&old.root.cert_pem(), old_inter, &old.root.cert_pem()),
    );
    let dir = tempfile::tempdir().unwrap();
    let app = build(&fake, dir.path()).await.unwrap();
    assert_eq!(
        app.builtin_signer().unwrap().current().source,
        Source::PluggedIn
    );
    assert_eq!(app.root_bundle(), old.bundle());
    assert!(
        fake.get("api/v1", "secrets", NS, "istio-ca-secret")
            .is_none(),
        "no self-signed root when cacerts is there"
    );
    let pem = app.root_bundle().to_pem();
    eventually(
        "a ConfigMap in every namespace",
        Duration::from_secs(20),
        || {
            ["default", NS, "apps"]
                .iter()
                .all(|ns| root_configmap(&fake, ns).as_deref() == Some(pem.as_str()))
        },
    )
    .await;
    let cm = fake
        .get("api/v1", "configmaps", "apps", "istio-ca-root-cert")
        .unwrap();
    assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");

    // A namespace made later gets one.
    fake.insert("namespaces", namespace("late"));
    eventually(
        "the new namespace's ConfigMap",
        Duration::from_secs(10),
        || root_configmap(&fake, "late").as_deref() == Some(pem.as_str()),
    )
    .await;
    // Drift is undone, a deleted one comes back.
    let mut drifted = cm.clone();
    drifted["data"]["root-cert.pem"] = json!("tampered");
    fake.insert("configmaps", drifted);
    fake.delete("api/v1", "configmaps", "default", "istio-ca-root-cert");
    eventually("drift undone", Duration::from_secs(10), || {
        root_configmap(&fake, "apps").as_deref() == Some(pem.as_str())
            && root_configmap(&fake, "default").as_deref() == Some(pem.as_str())
    })
    .await;

    // Rotation: the Secret now holds both roots and a new intermediate.
    let new = TestPki::new("cluster.local")
        .unwrap()
        .with_intermediate()
        .unwrap();
    let both = format!("{}{}", old.root.cert_pem(), new.root.cert_pem());
    fake.insert(
        "secrets",
        cacerts(
            &both,
            new.intermediate.as_ref().unwrap(),
            &new.root.cert_pem(),
        ),
    );
    eventually("the signer to rotate", Duration::from_secs(10), || {
        app.root_bundle().roots().len() == 2
    })
    .await;
    let both_pem = app.root_bundle().to_pem();
    eventually(
        "every ConfigMap to hold both roots",
        Duration::from_secs(10),
        || {
            ["default", NS, "apps", "late"]
                .iter()
                .all(|ns| root_configmap(&fake, ns).as_deref() == Some(both_pem.as_str()))
        },
    )
    .await;

    // An unrelated root is refused: the CA in use stays.
    let stranger = TestPki::new("cluster.local")
        .unwrap()
        .with_intermediate()
        .unwrap();
    fake.insert(
        "secrets",
        cacerts(
            &stranger.root.cert_pem(),
            stranger.intermediate.as_ref().unwrap(),
            &stranger.root.cert_pem(),
        ),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.root_bundle().to_pem(), both_pem);
    app.shutdown().await;
    assert_the_manifests_allow(&fake);
}

fn fast(holder: &str) -> Election {
    Election {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1200),
        retry_period: Duration::from_millis(100),
        ..Election::new(NS, "istio-namespace-controller-election", holder)
    }
}

/// One of two replicas leads, never both; when the leader shuts down it
/// releases the Lease and the other takes over at once; when a leader
/// vanishes without releasing, the other takes over after a lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_hand_over_on_release_and_on_a_silent_holder() {
    let fake = FakeApiServer::start().await.unwrap();
    let client = || client_for_url(&fake.url()).unwrap();
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let (a, run_a) = fast("a").start(client(), stop_a.clone());
    let (b, run_b) = fast("b").start(client(), stop_b.clone());
    let task_a = tokio::spawn(run_a);
    let task_b = tokio::spawn(run_b);
    eventually("a leader", Duration::from_secs(5), || {
        *a.borrow() || *b.borrow()
    })
    .await;
    // Watch for two leaders for a while.
    for _ in 0..100 {
        assert!(!(*a.borrow() && *b.borrow()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (leader, follower, stop_leader, task_leader, stop_follower, task_follower, follower_name) =
        if *a.borrow() {
            (a, b, stop_a, task_a, stop_b, task_b, "b")
        } else {
            (b, a, stop_b, task_b, stop_a, task_a, "a")
        };
    // Graceful: released, taken over well within a lease duration.
    let released = Instant::now();
    stop_leader.cancel();
    task_leader.await.unwrap();
    assert!(!*leader.borrow());
    eventually("the follower to take over", Duration::from_secs(3), || {
        *follower.borrow()
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_millis(1000),
        "took {:?}",
        released.elapsed()
    );
    let lease = fake
        .get(
            "apis/coordination.k8s.io/v1",
            "leases",
            NS,
            "istio-namespace-controller-election",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], follower_name);
    assert!(lease["spec"]["leaseTransitions"].as_i64().unwrap() >= 1);

    // Silent: the holder stops without a word; a newcomer waits a lease
    // duration of its own observation, then takes over.
    task_follower.abort();
    let _ = task_follower.await;
    drop(stop_follower);
    let (c, run_c) = fast("c").start(client(), CancellationToken::new());
    let silent = Instant::now();
    tokio::spawn(run_c);
    eventually("c to take over", Duration::from_secs(5), || *c.borrow()).await;
    assert!(
        silent.elapsed() >= Duration::from_millis(1900),
        "took over a live-looking lease after {:?}",
        silent.elapsed()
    );
    assert_the_manifests_allow(&fake);
}

/// A leader whose renewals the API server refuses steps down within the
/// lease period, and its publisher stops writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_stops_publication_within_one_lease_period() {
    init();
    let fake = FakeApiServer::start().await.unwrap();
    fake.insert("namespaces", namespace("default"));
    let client = client_for_url(&fake.url()).unwrap();
    let pki = TestPki::new("cluster.local").unwrap();
    let signer = {
        use meshid_ca::signer::{Signer, SignerOptions, SigningState};
        let origin = std::path::Path::new("test");
        let state = SigningState::self_signed_from_pem(
            &pki.root.cert_pem(),
            &pki.root.key().to_pkcs8_pem(),
            origin,
            origin,
        )
        .unwrap();
        let options = SignerOptions {
            dir: "/nonexistent".into(),
            trust_domain: "cluster.local".into(),
            self_signed_ttl: Duration::from_secs(86_400),
        };
        Arc::new(Signer::in_memory(options, state, origin))
    };
    let cancel = CancellationToken::new();
    let election = fast("a");
    let lease_duration = election.lease_duration;
    let (leader, run) = election.start(client.clone(), cancel.clone());
    tokio::spawn(run);
    tokio::spawn(
        Publisher {
            client,
            configmap: "istio-ca-root-cert".into(),
            signer: signer.clone(),
            resync: Duration::from_millis(200),
        }
        .run(leader.clone(), cancel.clone()),
    );
    let pem = signer.current().bundle_pem().to_owned();
    eventually("publication", Duration::from_secs(5), || {
        root_configmap(&fake, "default").as_deref() == Some(pem.as_str())
    })
    .await;

    // The API server refuses a's lease writes from now on.
    fake.react(|req| {
        (req.resource == "leases" && req.method == http::Method::PUT).then(|| {
            (
                403,
                status(403, "Forbidden", "leases.coordination.k8s.io is forbidden"),
            )
        })
    });
    let refused = Instant::now();
    eventually("a to step down", lease_duration * 2, || !*leader.borrow()).await;
    assert!(
        refused.elapsed() < lease_duration,
        "stepped down after {:?}, more than the lease duration",
        refused.elapsed()
    );
    // Publication has stopped: drift stays.
    let mut cm = fake
        .get("api/v1", "configmaps", "default", "istio-ca-root-cert")
        .unwrap();
    cm["data"]["root-cert.pem"] = json!("drifted");
    fake.insert("configmaps", cm);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(root_configmap(&fake, "default").as_deref(), Some("drifted"));
    cancel.cancel();
    assert_the_manifests_allow(&fake);
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"serviceAccountName": "web", "nodeName": node, "containers": []},
           "status": {"phase": "Running"}})
}

fn uid(fake: &FakeApiServer, name: &str) -> String {
    fake.get("api/v1", "pods", "default", name).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The pod cache lists once and then only watches; a dropped watch is
/// resumed from the last version (no new list); a watch the server has
/// forgotten (410 Gone) is replaced by a new list; lookups never call the API.
#[tokio::test]
async fn the_pod_cache_resumes_dropped_watches_and_relists_on_410() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.insert("pods", pod("web-0", "node-a"));
    let cache = PodCache::spawn(
        client_for_url(&fake.url()).unwrap(),
        CancellationToken::new(),
    );
    assert!(cache.wait_synced(Duration::from_secs(5)).await);
    let lists = || fake.count(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"));
    let watches = || fake.count(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"));
    eventually("the watch", Duration::from_secs(5), || watches() == 1).await;
    let requests_before = fake.requests().len();
    for _ in 0..10 {
        assert!(
            cache
                .live_pod("default", "web-0", &uid(&fake, "web-0"))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            cache
                .service_account_on_node("default", "web", "node-a")
                .await
                .unwrap()
        );
        assert!(
            !cache
                .service_account_on_node("default", "web", "node-b")
                .await
                .unwrap()
        );
    }
    assert!(
        cache
            .live_pod("default", "web-0", "stale-uid")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        fake.requests().len(),
        requests_before,
        "lookups made API calls"
    );

    fake.drop_watches();
    fake.insert("pods", pod("web-1", "node-b"));
    let w1 = uid(&fake, "web-1");
    tokio::time::timeout(Duration::from_secs(10), async {
        while cache
            .live_pod("default", "web-1", &w1)
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("web-1 through the resumed watch");
    assert_eq!(lists(), 1, "a dropped watch is resumed, not relisted");

    // History compacted while the watch is away: the resume gets 410.
    fake.compact();
    fake.drop_watches();
    fake.insert("pods", pod("web-2", "node-b"));
    let mut finished = pod("web-0", "node-a");
    finished["status"]["phase"] = json!("Succeeded");
    fake.insert("pods", finished);
    let w2 = uid(&fake, "web-2");
    tokio::time::timeout(Duration::from_secs(10), async {
        while cache
            .live_pod("default", "web-2", &w2)
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("web-2 through a relist");
    assert!(lists() >= 2, "410 makes a new list: {:?}", fake.requests());
    assert!(
        cache
            .live_pod("default", "web-0", &uid(&fake, "web-0"))
            .await
            .unwrap()
            .is_none(),
        "a finished pod is not live"
    );
    assert_the_manifests_allow(&fake);
}

// ---- istiod compatibility: Secrets as istiod and Istio's docs write them ----
//
// Facts from istio/istio (security/pkg/pki/ca/ca.go, pki/util/generate_cert.go,
// pki/util/crypto.go, pki/util/keycertbundle.go, k8s/secret/secret_util.go,
// tools/certs/common.mk): istiod's self-signed root is RSA-2048 (caKeySize),
// subject `O=<trust domain>` and nothing else, BasicConstraints CA (critical,
// no path length), KeyUsage keyCertSign only (critical), no SAN, a random
// 128-bit serial, ten years; its key is PKCS#1 (`RSA PRIVATE KEY`). It is
// stored in `istio-ca-secret`, type `istio.io/ca-root`, under `ca-cert.pem`
// and `ca-key.pem`, with `cert-chain.pem`, `key.pem` and `root-cert.pem`
// empty. istiod reads a key as `EC PRIVATE KEY`, `RSA PRIVATE KEY` or
// `PRIVATE KEY` and checks that ca-cert.pem verifies against itself (Go's
// default verify: no EKU, or one allowing serverAuth) and matches the key.
// Istio's cert tools make `cacerts` from RSA-4096 `openssl genrsa` keys: a
// root `O=Istio, CN=Root CA` and an intermediate `O=Istio, CN=Intermediate
// CA, L=<cluster>` with pathlen 0, KeyUsage digitalSignature,
// nonRepudiation, keyEncipherment, keyCertSign, SAN DNS
// `istiod.istio-system.svc`; cert-chain.pem is the intermediate then the root.

mod istiod {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::KeySize;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, PKCS_RSA_SHA256, SanType, SerialNumber,
    };
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use x509_parser::der_parser::parse_der;

    /// An RSA key as PKCS#8 DER, rcgen's key pair over it, and its PKCS#1
    /// PEM (`RSA PRIVATE KEY`, Go's `x509.MarshalPKCS1PrivateKey`).
    pub struct RsaKey {
        pub pkcs8: Vec<u8>,
        pub pair: KeyPair,
    }

    impl RsaKey {
        pub fn generate(size: KeySize) -> Self {
            let key = aws_lc_rs::rsa::KeyPair::generate(size).unwrap();
            let pkcs8 = key.as_der().unwrap().as_ref().to_vec();
            let pair = KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(pkcs8.clone()),
                &PKCS_RSA_SHA256,
            )
            .unwrap();
            RsaKey { pkcs8, pair }
        }

        /// The RSAPrivateKey inside the PKCS#8 PrivateKeyInfo.
        pub fn pkcs1_pem(&self) -> String {
            let (_, info) = parse_der(&self.pkcs8).unwrap();
            let fields = info.as_sequence().unwrap();
            let pkcs1 = fields[2].as_slice().unwrap();
            meshid_common::keys::pem_encode("RSA PRIVATE KEY", pkcs1)
        }

        pub fn pkcs8_pem(&self) -> String {
            meshid_common::keys::pem_encode("PRIVATE KEY", &self.pkcs8)
        }
    }

    fn serial() -> SerialNumber {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).unwrap();
        bytes[0] &= 0x7f;
        SerialNumber::from_slice(&bytes)
    }

    fn years(n: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
        let now = time::OffsetDateTime::now_utc();
        (now, now + time::Duration::days(365 * n))
    }

    /// A root as istiod's `GenCertKeyFromOptions` makes it for its
    /// self-signed CA (see the facts above).
    pub fn self_signed_root(org: &str) -> (String, RsaKey) {
        let key = RsaKey::generate(KeySize::Rsa2048);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, org);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.serial_number = Some(serial());
        (params.not_before, params.not_after) = years(10);
        let cert = params.self_signed(&key.pair).unwrap();
        (cert.pem(), key)
    }

    /// `cacerts` as Istio's cert tools make it: (root PEM, intermediate PEM,
    /// intermediate key).
    pub fn plugged_in(cluster: &str) -> (String, String, RsaKey) {
        let usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
        let root_key = RsaKey::generate(KeySize::Rsa4096);
        let mut root = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Istio");
        dn.push(DnType::CommonName, "Root CA");
        root.distinguished_name = dn;
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = usages.clone();
        root.serial_number = Some(serial());
        (root.not_before, root.not_after) = years(10);
        let root_cert = root.self_signed(&root_key.pair).unwrap();

        let inter_key = RsaKey::generate(KeySize::Rsa4096);
        let mut inter = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Istio");
        dn.push(DnType::CommonName, "Intermediate CA");
        dn.push(DnType::LocalityName, cluster);
        inter.distinguished_name = dn;
        inter.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        inter.key_usages = usages;
        inter.subject_alt_names = vec![SanType::DnsName(
            "istiod.istio-system.svc".try_into().unwrap(),
        )];
        inter.serial_number = Some(serial());
        (inter.not_before, inter.not_after) = years(2);
        let issuer = Issuer::new(root, &root_key.pair);
        let inter_cert = inter.signed_by(&inter_key.pair, &issuer).unwrap();
        (root_cert.pem(), inter_cert.pem(), inter_key)
    }
}

/// The Secret as istiod stores it: its five keys, three of them empty,
/// and its type.
fn istiod_ca_secret(cert_pem: &str, key_pem: &str) -> Value {
    let mut s = secret(
        "istio-ca-secret",
        &[
            ("ca-cert.pem", cert_pem),
            ("ca-key.pem", key_pem),
            ("cert-chain.pem", ""),
            ("key.pem", ""),
            ("root-cert.pem", ""),
        ],
    );
    s["type"] = json!("istio.io/ca-root");
    s
}

/// A leaf from the app's signer for `default/sa/web`, checked against
/// `root_pem` alone.
fn issue_and_verify(app: &App, root_pem: &str) -> meshid_common::CertInfo {
    use meshid_common::keys::{KeyType, PrivateKey};
    use meshid_common::spiffe::SpiffeId;
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let issued = app
        .builtin_signer()
        .unwrap()
        .sign(key.public_key_spki(), &id, Duration::from_secs(3600))
        .unwrap();
    let chain: Vec<_> = issued
        .chain
        .iter()
        .flat_map(|pem| meshid_common::cert::parse_pem_certs(pem).unwrap())
        .collect();
    meshid_common::TrustBundle::from_pem(root_pem)
        .unwrap()
        .verify(
            &chain,
            meshid_common::Usage::ClientAuth,
            std::time::SystemTime::now(),
        )
        .unwrap()
}

/// (a) A user migrating from istiod keeps its root: the `istio-ca-secret`
/// istiod wrote (RSA-2048, PKCS#1, its key names, empty extras) is loaded,
/// leaves chain to that root, and no new root or Secret write happens.
#[tokio::test]
async fn an_istiod_written_root_secret_is_taken_over() {
    init();
    let fake = FakeApiServer::start().await.unwrap();
    let (root_pem, key) = istiod::self_signed_root("cluster.local");
    let key_pem = key.pkcs1_pem();
    assert!(key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let stored = fake.insert("secrets", istiod_ca_secret(&root_pem, &key_pem));
    let dir = tempfile::tempdir().unwrap();
    let app = build(&fake, dir.path()).await.unwrap();
    assert_eq!(
        app.root_bundle().to_pem(),
        meshid_common::TrustBundle::from_pem(&root_pem)
            .unwrap()
            .to_pem(),
        "the root in use is istiod's"
    );
    assert_eq!(
        app.builtin_signer().unwrap().current().source,
        Source::SelfSigned
    );
    let leaf = issue_and_verify(&app, &root_pem);
    assert_eq!(leaf.issuer, "O=cluster.local", "{leaf:?}");
    assert_eq!(
        fake.count(|r| !r.starts_with("GET") && r.contains("/secrets")),
        0,
        "no Secret written: {:?}",
        fake.requests()
    );
    assert_eq!(
        fake.get("api/v1", "secrets", NS, "istio-ca-secret"),
        Some(stored),
        "istiod's Secret is left as it was"
    );
    app.shutdown().await;
}

/// (b) `cacerts` as Istio's docs make it (RSA-4096 root and intermediate,
/// cert-chain.pem = intermediate + root), with the key as PKCS#1 (OpenSSL
/// 1.1's `genrsa`) and as PKCS#8 (OpenSSL 3's); and as Istio's
/// `samples/certs` lay it out, cert-chain.pem holding the intermediate only.
#[tokio::test]
async fn a_cacerts_secret_made_by_istios_cert_tools_is_loaded() {
    init();
    let (root_pem, inter_pem, inter_key) = istiod::plugged_in("cluster1");
    let full_chain = format!("{inter_pem}{root_pem}");
    for (key_pem, chain) in [
        (inter_key.pkcs1_pem(), full_chain.as_str()),
        (inter_key.pkcs8_pem(), full_chain.as_str()),
        (inter_key.pkcs1_pem(), inter_pem.as_str()),
    ] {
        let fake = FakeApiServer::start().await.unwrap();
        fake.insert(
            "secrets",
            secret(
                "cacerts",
                &[
                    ("ca-cert.pem", inter_pem.as_str()),
                    ("ca-key.pem", key_pem.as_str()),
                    ("cert-chain.pem", chain),
                    ("root-cert.pem", root_pem.as_str()),
                ],
            ),
        );
        let dir = tempfile::tempdir().unwrap();
        let app = build(&fake, dir.path())
            .await
            .unwrap_or_else(|e| panic!("{} / {} chain: {e}", &key_pem[..32], chain.len()));
        assert_eq!(
            app.builtin_signer().unwrap().current().source,
            Source::PluggedIn
        );
        let leaf = issue_and_verify(&app, &root_pem);
        assert!(leaf.issuer.contains("CN=Intermediate CA"), "{leaf:?}");
        assert_eq!(
            fake.count(|r| r.starts_with("POST")),
            0,
            "no self-signed root next to cacerts"
        );
        app.shutdown().await;
    }
}

/// (c) The `istio-ca-secret` meshid-ca writes is one istiod can read back
/// (a user going back to istiod keeps the root): istiod's type and five
/// keys, one CERTIFICATE in ca-cert.pem, a key in a PEM type istiod's
/// ParsePemEncodedKey takes, matching the certificate, a self-signed CA
/// with no EKU (Go's default verify asks for serverAuth) and `O=<trust
/// domain>` (istiod's root rotator takes the org from there).
#[tokio::test]
async fn the_root_secret_meshid_writes_is_one_istiod_reads() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    init();
    let fake = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = build(&fake, dir.path()).await.unwrap();
    let stored = fake
        .get("api/v1", "secrets", NS, "istio-ca-secret")
        .unwrap();
    assert_eq!(stored["type"], "istio.io/ca-root");
    let data = stored["data"].as_object().unwrap();
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "key.pem",
            "root-cert.pem"
        ]
    );
    let text = |k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(data[k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    for empty in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        assert_eq!(text(empty), "", "{empty}");
    }
    let cert_pem = text("ca-cert.pem");
    let key_pem = text("ca-key.pem");
    let certs = meshid_common::cert::parse_pem_certs(&cert_pem).unwrap();
    assert_eq!(certs.len(), 1);
    assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    let key_type = key_pem
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .unwrap();
    assert!(
        ["EC PRIVATE KEY", "RSA PRIVATE KEY", "PRIVATE KEY"].contains(&key_type),
        "istiod cannot parse a {key_type:?}"
    );
    let key = meshid_common::keys::PrivateKey::from_pem(&key_pem).unwrap();
    let (_, cert) = X509Certificate::from_der(&certs[0]).unwrap();
    assert_eq!(cert.public_key().raw, key.public_key_spki(), "key ≠ cert");
    assert!(cert.is_ca());
    assert_eq!(cert.subject(), cert.issuer());
    cert.verify_signature(None).unwrap();
    let ku = cert.key_usage().unwrap().expect("a KeyUsage").value;
    assert!(ku.key_cert_sign());
    if let Some(eku) = cert.extended_key_usage().unwrap() {
        assert!(eku.value.any || eku.value.server_auth, "{:?}", eku.value);
    }
    let orgs: Vec<_> = cert
        .subject()
        .iter_organization()
        .map(|o| o.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(orgs, ["cluster.local"]);
    assert_eq!(app.root_bundle().roots(), &certs[..]);
    app.shutdown().await;
}

/// One rule of kind/overlays/ca/rbac.yaml: API groups, resources, verbs,
/// and the namespace it holds in (`None`: a ClusterRole, every namespace
/// and the cluster-scoped resources).
#[derive(Debug)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    namespace: Option<String>,
}

/// The rules the CA's manifests grant it, read from the file users apply.
fn manifest_rules() -> Vec<Rule> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../kind/overlays/ca/rbac.yaml"
    );
    let text = std::fs::read_to_string(path).expect("kind/overlays/ca/rbac.yaml");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut rules = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).expect("a YAML document");
        let namespace = match doc["kind"].as_str() {
            Some("ClusterRole") => None,
            Some("Role") => Some(doc["metadata"]["namespace"].as_str().unwrap().to_owned()),
            _ => continue,
        };
        for r in doc["rules"].as_array().into_iter().flatten() {
            rules.push(Rule {
                groups: strings(&r["apiGroups"]),
                resources: strings(&r["resources"]),
                verbs: strings(&r["verbs"]),
                namespace: namespace.clone(),
            });
        }
    }
    assert!(!rules.is_empty(), "no rules read from {path}");
    rules
}

/// Every request the CA made is one kind/overlays/ca/rbac.yaml allows: a
/// Role only in its own namespace, a ClusterRole anywhere. A call the
/// manifests forgot would be a 403 in a real cluster.
fn assert_the_manifests_allow(fake: &FakeApiServer) {
    let rules = manifest_rules();
    let requests = fake.placed_requests();
    assert!(!requests.is_empty(), "the CA made no API call");
    for (line, placed) in &requests {
        let request = placed
            .as_ref()
            .unwrap_or_else(|| panic!("not an API path: {line}"));
        let verb = request
            .rbac_verb()
            .unwrap_or_else(|| panic!("unexpected method in {line}"));
        let (group, resource, namespace) =
            (request.api_group(), &request.resource, &request.namespace);
        let allowed = rules.iter().any(|r| {
            r.groups.iter().any(|g| g == group)
                && r.resources.contains(resource)
                && r.verbs.iter().any(|v| v == verb)
                && r.namespace.as_ref().is_none_or(|ns| ns == namespace)
        });
        assert!(
            allowed,
            "kind/overlays/ca/rbac.yaml does not allow `{verb}` on {resource:?} (group {group:?}) \
             in namespace {namespace:?}, which the CA called: {line}"
        );
    }
}

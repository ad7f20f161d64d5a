//! Cluster mode against the fake API server (`meshid_common::testing::kube`,
//! real HTTP and the API's JSON): the shared root in `istio-ca-secret` and
//! its create race, a corrupt root Secret, the plugged-in CA from `cacerts`
//! and its rotation, root publication to every namespace, Lease election
//! and hand-over, and the pod watch cache through 410s and dropped watches.
//! Run with `cargo nextest run -p meshid-ca --features kube --test kube`.

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
    let (a, b) = tokio::join!(
        App::build_with_kube(
            cluster_config(d1.path()),
            client_for_url(&fake.url()).unwrap()
        ),
        App::build_with_kube(
            cluster_config(d2.path()),
            client_for_url(&fake.url()).unwrap()
        ),
    );
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
    let err = App::build_with_kube(
        cluster_config(dir.path()),
        client_for_url(&fake.url()).unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
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
    let err = App::build_with_kube(
        cluster_config(dir.path()),
        client_for_url(&fake.url()).unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
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
    let app = App::build_with_kube(
        cluster_config(dir.path()),
        client_for_url(&fake.url()).unwrap(),
    )
    .await
    .unwrap();
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
}
